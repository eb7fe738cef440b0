"""Methods that train on mixed examples: inter-domain Mixup."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dgjax.core import HParam, Method, Terms, domain_logits, env_losses_of, penalized


def mixup_terms(ctx, params, batch, key, state) -> Terms:
  """Inter-domain Mixup (Yan et al., "Improve Unsupervised Domain Adaptation with Mixup
  Training", 2020; Zhang et al., ICLR 2018), as DomainBed's ``Mixup``.

  The domains are put in a random cyclic order ``pi``; domain ``pi(i)`` is mixed with
  ``pi(i+1)`` (DomainBed's ``random_pairs_of_minibatches``) with ``lam_i ~ Beta(alpha, alpha)``:

      objective = (1/D) sum_i [ lam_i CE(f(x~_i), y_pi(i)) + (1 - lam_i) CE(f(x~_i), y_pi(i+1)) ],
      x~_i = lam_i x_pi(i) + (1 - lam_i) x_pi(i+1).

  ``env_losses[d]`` is the mixed loss of the pair led by domain ``d`` (so ``loss``, their
  mean, is the objective, as DomainBed logs it). Randomness from ``key``.

  One forward pass per mixed pair, as DomainBed's loop (unfrozen BatchNorm: each pair's own
  statistics); the running statistics move by the D raw domain batches' statistics
  (DomainBed's by the D mixed batches').
  """
  x, y = batch["x"], batch["y"]
  d = y.shape[0]
  alpha = ctx.hparams["mixup_alpha"]
  k_perm, k_lam = jax.random.split(key)
  order = jax.random.permutation(k_perm, d)
  partner = jnp.roll(order, -1)
  lam = jax.random.beta(k_lam, alpha, alpha, (d,), jnp.float32)
  lx = lam.reshape((d,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  logits = domain_logits(ctx, params, lx * x[order] + (1 - lx) * x[partner])
  pair = lam * env_losses_of(logits, y[order]) + (1 - lam) * env_losses_of(logits, y[partner])
  env_losses = jnp.zeros_like(pair).at[order].set(pair)
  return Terms(env_losses, None, {"mixup_lambda": jnp.mean(lam)}, state)


MIXUP = Method(
  name="mixup",
  description="Inter-domain Mixup of inputs and labels between random pairs of domains "
  "(Yan et al., 2020); loss = the mixed objective",
  domainbed_name="Mixup",
  hparams={
    "mixup_alpha": HParam(
      0.2, lambda r: 10 ** r.uniform(-1, 1), "Beta(alpha, alpha) mixing weights", positive=True
    )
  },
  gradients=penalized(mixup_terms),
  forward_per_domain=True,
)
