"""Meta-learning by gradients at an inner-updated clone: MLDG.

(Fish, which moves the parameters towards a clone, is in :mod:`dgjax.algorithms.meta_learning`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dgjax.core import (
  GradientSource,
  HParam,
  Method,
  Terms,
  domain_logits,
  domainbed_adam,
  env_losses_of,
)
from dgjax.per_domain import map_over_leading


def meta_split(num_domains: int, num_meta_test: int):
  """DomainBed's ``split_meta_train_test`` as positions into a random permutation ``perm``
  of the domains: meta-train ``perm[:D - n]``, meta-test ``perm[-n:]`` (Python slicing, so
  ``n >= D`` gives no pair), pair ``k`` = (meta-train ``k``, meta-test ``k mod n``).
  Returns ``(train_positions, test_positions)``, static lists of equal length."""
  positions = list(range(num_domains))
  train = positions[: num_domains - num_meta_test]
  test = positions[-num_meta_test:] if num_meta_test > 0 else []
  return train, [test[k % len(test)] for k in range(len(train))]


def mldg_gradients() -> GradientSource:
  """MLDG (Li et al., "Learning to Generalize: Meta-Learning for Domain Generalization", AAAI
  2018, Algorithm 1), first-order, as DomainBed's ``MLDG``.

  The domains are permuted at random (``key``) and split into meta-train and meta-test
  domains (:func:`meta_split`, ``n_meta_test`` of them meta-test). For each pair ``(i, j)``:
  a clone takes one step of a FRESH ``Adam(lr, weight_decay)`` on ``L_i``,
  ``theta_i = theta + adam_step(grad L_i(theta))``, and

      grad = (1 / D) sum_pairs [ grad L_i(theta) + beta grad L_j(theta_i) ]

  (the gradient of ``L_j`` at the clone, no second derivatives: DomainBed's first-order
  form), which the method's ``Adam(lr, weight_decay)`` applies. ``D`` is the number of
  training domains, not of pairs (DomainBed's ``num_mb``). With ``n_meta_test >= D`` there is
  no pair: the gradient is zero (e.g. DomainBed's default ``n_meta_test = 2`` on Colored
  MNIST's two training domains; only weight decay moves the parameters, through the optimizer
  as DomainBed's ``optimizer.step()`` on zero gradients). As in DomainBed, that step runs no
  forward pass at all: ``loss`` and ``env_losses`` are reported as zeros.

  ``loss`` is DomainBed's reported objective ``(1/D) sum_pairs (L_i + beta L_j)``;
  ``env_losses`` are the per-domain losses at ``theta`` (one extra forward pass, for logging;
  zeros when there is no pair).
  The paper's second-order form (DomainBed's commented-out ``update``) is not implemented.
  """

  def grads(ctx, params, state, batch, step, key):
    del step
    hp = ctx.hparams
    d = ctx.num_domains
    beta = hp["mldg_beta"]
    train_pos, test_pos = meta_split(d, int(hp["n_meta_test"]))
    if not train_pos:  # DomainBed's update runs no forward pass: neither does this
      zeros = jax.tree.map(jnp.zeros_like, params)
      loss = jnp.zeros((), batch["x"].dtype)
      return zeros, Terms(jnp.zeros((d,), loss.dtype), None, {"loss": loss}, state)
    env_losses = env_losses_of(
      jax.lax.stop_gradient(domain_logits(ctx, params, batch["x"])), batch["y"]
    )
    perm = jax.random.permutation(key, d)
    take = lambda idx: jax.tree.map(lambda a: a[idx], batch)
    pairs = (take(perm[jnp.asarray(train_pos)]), take(perm[jnp.asarray(test_pos)]))
    inner_tx = domainbed_adam()(ctx)

    def pair(bs):
      batch_i, batch_j = bs
      loss_i, g_i = jax.value_and_grad(ctx.loss)(params, batch_i)
      updates, _ = inner_tx.update(g_i, inner_tx.init(params), params)
      clone = optax.apply_updates(params, updates)
      loss_j, g_j = jax.value_and_grad(ctx.loss)(clone, batch_j)
      return loss_i, loss_j, jax.tree.map(lambda a, b: a + beta * b, g_i, g_j)

    loss_i, loss_j, g = map_over_leading(pair, pairs, ctx.per_domain_impl)
    total = jax.tree.map(lambda x: jnp.sum(x, axis=0) / d, g)
    objective = jnp.sum(loss_i + beta * loss_j) / d
    return total, Terms(env_losses, None, {"loss": objective}, state)

  return GradientSource(grads)


MLDG = Method(
  name="mldg",
  description="MLDG: first-order meta-learning, meta-test gradients at a clone after one "
  "Adam step on a meta-train domain (Li et al., AAAI 2018)",
  domainbed_name="MLDG",
  hparams={
    "mldg_beta": HParam(
      1.0, lambda r: float(10 ** r.uniform(-1, 1)), "weight of the meta-test loss", minimum=0.0
    ),
    "n_meta_test": HParam(
      2,
      lambda r: int(r.choice([1, 2])),
      "meta-test domains per step (the rest are meta-train)",
      kind="int",
      structural=True,
      minimum=1,
    ),
  },
  gradients=mldg_gradients(),
  optimizer=domainbed_adam(),
  forward_per_domain=True,
)
