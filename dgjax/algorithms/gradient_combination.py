"""ERM, and the methods that combine per-domain gradients with an optax transform: AND-mask,
SAND-mask, GroupDRO (their gradients come from :func:`dgjax.core.per_domain_gradients`, one
forward and backward pass per domain, as DomainBed's loops over the minibatches)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgjax import masks
from dgjax.core import HParam, Method, penalized, per_domain_gradients, pooled_erm_terms


# ------------------------------------------------------------------------------ GroupDRO
class GroupDROState(NamedTuple):
  q: jax.Array  # [D] domain weights, on the simplex
  robust_loss: jax.Array  # sum_d q_d L_d of the last step (for logging)


def group_dro(eta: float, num_domains: int) -> optax.GradientTransformationExtraArgs:
  """GroupDRO (Sagawa et al., "Distributionally Robust Neural Networks for Group Shifts",
  ICLR 2020, Algorithm 1) as an optax transform of per-domain gradients.

  Online exponentiated-gradient ascent on the domain weights, then the weighted gradient:

      q_d <- q_d exp(eta * L_d) / sum_e q_e exp(eta * L_e)
      update = sum_d q_d g_d             ( = grad of sum_d q_d L_d with q held fixed)

  ``update(per_domain_grads, state, params=None, *, losses)`` takes the per-domain losses
  ``[D]`` as an extra argument (``optax.chain`` forwards it). The weights start uniform
  (DomainBed starts them at ones and normalises in the first step: the same ``q``) and are
  updated before they weight the gradient, as in DomainBed's ``GroupDRO.update``.
  """

  def init(params):
    del params
    return GroupDROState(
      q=jnp.full((num_domains,), 1.0 / num_domains, jnp.float32),
      robust_loss=jnp.zeros((), jnp.float32),
    )

  def update(per_domain_grads, state, params=None, *, losses, **extra):
    del params, extra
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    q = state.q * jnp.exp(eta * losses)
    q = q / jnp.sum(q)
    out = jax.tree.map(lambda g: jnp.tensordot(q.astype(g.dtype), g, axes=1), per_domain_grads)
    return out, GroupDROState(q=q, robust_loss=jnp.dot(q, losses))

  return optax.GradientTransformationExtraArgs(init, update)


# ------------------------------------------------------------------------------ methods
ERM = Method(
  name="erm",
  description="Empirical risk minimisation: cross-entropy of the concatenated domain batches "
  "(Vapnik, 1998)",
  domainbed_name="ERM",
  hparams={},
  gradients=penalized(pooled_erm_terms),
)

AND_MASK = Method(
  name="and",
  description="AND-mask: keep gradient entries whose sign the domains agree on "
  "(Parascandolo et al., ICLR 2021)",
  domainbed_name="ANDMask",
  hparams={
    "tau": HParam(
      1.0, lambda r: r.uniform(0.5, 1.0), "sign-agreement threshold", minimum=0.0, maximum=1.0
    )
  },
  gradients=per_domain_gradients(),
  combine=lambda ctx: masks.and_mask(tau=ctx.hparams["tau"]),
  logged_state={"kept_fraction": "kept_fraction"},
  forward_per_domain=True,
)

SAND_MASK = Method(
  name="sand",
  description="SAND-mask: smooth agreement mask tanh(k(|mean sign| - tau)/var) "
  "(Shahtalebi et al., 2021)",
  domainbed_name="SANDMask",
  hparams={
    # DomainBed's default tau=1.0 zeroes every mask entry (see dgjax.masks.sand_mask).
    "tau": HParam(
      0.5,
      lambda r: r.uniform(0.0, 1.0),
      "agreement threshold (DomainBed: 1.0, which never trains)",
      minimum=0.0,
      maximum=1.0,
    ),
    "k": HParam(10.0, lambda r: 10 ** r.uniform(-3, 5), "tanh steepness", positive=True),
  },
  gradients=per_domain_gradients(),
  combine=lambda ctx: masks.sand_mask(tau=ctx.hparams["tau"], k=ctx.hparams["k"]),
  logged_state={"kept_fraction": "kept_fraction"},
  forward_per_domain=True,
)

GROUP_DRO = Method(
  name="groupdro",
  description="GroupDRO: exponentiated-gradient weights on the domains' losses "
  "(Sagawa et al., ICLR 2020)",
  domainbed_name="GroupDRO",
  hparams={
    "groupdro_eta": HParam(
      1e-2, lambda r: 10 ** r.uniform(-3, -1), "step size of the domain weights", minimum=0.0
    )
  },
  gradients=per_domain_gradients(),
  combine=lambda ctx: group_dro(ctx.hparams["groupdro_eta"], ctx.num_domains),
  logged_state={"groupdro_q": "q", "robust_loss": "robust_loss"},
  forward_per_domain=True,
)
