"""Methods that take inner optimisation steps on a copy of the parameters: Fish."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from dgjax.core import GradientSource, HParam, Method, Terms, domainbed_adam


class FishState(NamedTuple):
  inner: optax.OptState  # the inner optimizer's state, carried from step to step


def fish_gradients() -> GradientSource:
  """Fish (Shi et al., "Gradient Matching for Domain Generalization", ICLR 2022, Algorithm 2).

  Clone the parameters, take one inner optimizer step per domain in sequence (a
  ``lax.scan`` over the domain axis, unrolled: with its loop kept, XLA:CPU ran the Colored
  MNIST CNN step at 2.71x DomainBed's, unrolled at 1.45x, one thread, ``bench/vs_domainbed.py``
  in ``bench/RESULTS.md``; the same operations in the same order), then move the parameters
  towards the clone:

      theta~ <- theta;  for d = 1..D: theta~ <- theta~ - inner_step(grad L_d(theta~))
      theta  <- theta + meta_lr (theta~ - theta)

  The paper's inner steps are SGD; DomainBed's (and ours) are its Adam with weight decay, the
  state carried across outer steps (this source's state). The source returns the
  pseudo-gradient ``theta - theta~``; the method's optimizer is ``optax.sgd(meta_lr)``.
  """

  def init(ctx, params, key):
    del key
    return FishState(domainbed_adam()(ctx).init(params))

  def grads(ctx, params, state, batch, step, key):
    del step, key
    inner_tx = domainbed_adam()(ctx)

    def inner(carry, domain_batch):
      p, s = carry
      loss, g = jax.value_and_grad(ctx.loss)(p, domain_batch)
      u, s = inner_tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (clone, inner_state), losses = jax.lax.scan(inner, (params, state.inner), batch, unroll=True)
    pseudo = jax.tree.map(lambda p, c: p - c, params, clone)
    return pseudo, Terms(losses, state=FishState(inner_state))

  return GradientSource(grads, init)


FISH = Method(
  name="fish",
  description="Fish: sequential inner Adam steps over the domains on a clone, then a meta step "
  "towards it (Shi et al., ICLR 2022)",
  domainbed_name="Fish",
  hparams={
    "meta_lr": HParam(0.5, lambda r: r.choice([0.05, 0.1, 0.5]), "meta step size", positive=True)
  },
  gradients=fish_gradients(),
  optimizer=lambda ctx: optax.sgd(ctx.hparams["meta_lr"]),
  forward_per_domain=True,
)
