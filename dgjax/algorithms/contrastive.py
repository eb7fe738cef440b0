"""Contrastive domain bottlenecks: CAD and CondCAD (Ruan, Dubois & Maddison, "Optimal
Representations for Covariate Shift", ICLR 2022; DomainBed's ``AbstractCAD``).

One pooled forward pass of the ``D * B`` examples gives features ``z``; the objective is::

    CE(classifier(z), y) + lmbda * bottleneck(z, y, domain)

where the bottleneck is a supervised-contrastive (SupCon, Khosla et al. 2020) score of how
well an example's neighbours reveal its domain (:func:`cad_bottleneck_loss`): CAD minimises
``I(D; Z)``, CondCAD ``I(D; Z | Y)``. The loss is DomainBed's, case for case: logits
``z_i.z_j / T`` with the self-similarity set to 0 (not removed) before the row maximum is
subtracted, DomainBed's row filters (``mask_valid``), the ``T / 0.07`` scale, and the mean
over finite rows (``finite_mean``).

Differences from DomainBed: DomainBed's ``is_project=True`` raises (its projection head
refers to an undefined ``feature_dim``); here it builds the head the code meant,
``Linear(F, F) -> ReLU -> Linear(F, 128)`` on our features (``F`` read from the classifier
head's kernel), its parameters and their torch-Adam (``lr``, ``weight_decay``: the same as
DomainBed's one Adam over the union, Adam being elementwise) in the method's state (a
:class:`dgjax.core.ExtraNet`), drawn from the run's key (:func:`dgjax.core.extra_net_key`), so
trials of different seeds start it from different weights; earlier versions drew it from the
fixed ``fold_in(key(0), 2003)``, the same head in every trial. DomainBed logs
``clf_loss``, ``bn_loss`` and ``total_loss`` and no ``loss``; here ``loss`` is the classifier
cross-entropy (``clf_loss``), ``bn_loss`` (= ``penalty``) and ``objective`` (= ``total_loss``).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgjax.core import (
  ExtraNet,
  GradientSource,
  HParam,
  Method,
  Terms,
  domainbed_adam,
  env_losses_of,
  extra_net_key,
  flatten_domains,
)
from dgjax.models import TorchDense

#: DomainBed's ``base_temperature``: the bottleneck is scaled by ``temperature / 0.07``.
BASE_TEMPERATURE = 0.07


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """``log sum_{j: mask_ij} exp(x_ij)`` per row; ``-inf`` for rows with an empty mask (as
  ``logsumexp(x + log(mask))``), with finite gradients everywhere."""
  nonempty = jnp.any(mask, -1)
  safe = jnp.where(nonempty[:, None], mask, True)
  lse = jax.nn.logsumexp(jnp.where(safe, x, -jnp.inf), axis=-1)
  return jnp.where(nonempty, lse, -jnp.inf)


def cad_bottleneck_loss(
  z: jax.Array,
  y: jax.Array,
  domains: jax.Array,
  temperature,
  conditional: bool,
  flipped: bool = True,
  normalized: bool = False,
) -> jax.Array:
  """DomainBed's ``AbstractCAD.bn_loss`` on pooled features ``z`` ``[N, F]``, labels ``y`` and
  domain labels ``domains`` ``[N]``.

  With ``s_ij = z_i.z_j / T`` for ``j != i`` and ``s_ii = 0``, minus the row maximum
  (a constant), and ``c = T / 0.07``:

  * CAD (``conditional=False``): ``log p_ij = s_ij - logsumexp_{k != i} s_ik``; over rows that
    have another example of their label, flipped: ``-c logsumexp_{j: d_j != d_i} log p_ij``
    (maximise the probability of the other domains); else ``c logsumexp_{j: d_j = d_i} log p_ij``
    (``j = i`` included, as DomainBed).
  * CondCAD: ``log p_ij = s_ij - logsumexp_{k != i, y_k = y_i} s_ik``; flipped, over rows with a
    same-label example of another domain: ``-c logsumexp_{j != i: y_j = y_i, d_j != d_i}``;
    else, over rows with another same-label example of their domain:
    ``c logsumexp_{j != i: y_j = y_i, d_j = d_i}``.

  The loss is the mean of the finite row values (0 if there are none). ``normalized`` puts
  ``z`` on the unit sphere first (``F.normalize``).
  """
  n = z.shape[0]
  if normalized:
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  same_y = y[:, None] == y[None, :]
  same_d = domains[:, None] == domains[None, :]
  not_self = ~jnp.eye(n, dtype=bool)
  pos = same_y & not_self  # same label, another example
  pos_other_d = pos & ~same_d
  pos_same_d = pos & same_d

  logits = (z @ z.T) / temperature * not_self.astype(z.dtype)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))

  if not conditional:
    denominator_set = not_self
    target = ~same_d if flipped else same_d
    valid = jnp.any(pos, 1) & jnp.any(target, 1)
  else:
    denominator_set = pos
    target = pos_other_d if flipped else pos_same_d
    valid = jnp.any(target, 1)
  # rows left out get harmless masks, so that nothing non-finite reaches a gradient
  denominator_set = jnp.where(valid[:, None], denominator_set, not_self)
  target = jnp.where(valid[:, None], target, not_self)
  log_prob = logits - _masked_logsumexp(logits, denominator_set)[:, None]
  scale = temperature / BASE_TEMPERATURE
  rows = _masked_logsumexp(log_prob, target) * (-scale if flipped else scale)
  keep = valid & jnp.isfinite(rows)
  count = jnp.sum(keep)
  total = jnp.sum(jnp.where(keep, rows, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


class ProjectionHead(nn.Module):
  """``Linear(F, F) -> ReLU -> Linear(F, 128)`` (DomainBed's ``AbstractCAD.project``)."""

  features: int
  out: int = 128

  @nn.compact
  def __call__(self, z):
    hidden = nn.relu(TorchDense(self.features, name="dense0")(z))
    return TorchDense(self.out, name="dense1")(hidden)


class CADState(NamedTuple):
  projection: ExtraNet | tuple  # ``()`` without a projection head


def _feature_dim(params) -> int:
  return params["classifier"]["kernel"].shape[0]


def cad_gradients(conditional: bool) -> GradientSource:
  """The gradient of ``CE + lmbda * bottleneck`` (one pooled forward pass); with
  ``is_project`` the projection head takes its own torch-Adam step from the same objective."""

  def init(ctx, params, key):
    if not ctx.hparams["is_project"]:
      return CADState(())
    f = _feature_dim(params)
    head = ProjectionHead(f).init(extra_net_key(key, "projection"), jnp.zeros((1, f), jnp.float32))[
      "params"
    ]
    return CADState(ExtraNet.create(head, domainbed_adam()(ctx)))

  def grads(ctx, params, state, batch, step, key):
    del step, key
    hp = ctx.hparams
    project = bool(hp["is_project"])
    x, y = batch["x"], batch["y"]
    d, b = y.shape[:2]
    domains = jnp.repeat(jnp.arange(d), b)

    def objective(p, head):
      z = ctx.features(p, flatten_domains(x))
      logits = ctx.head_logits(p["classifier"], z)
      env_losses = env_losses_of(logits.reshape((d, b) + logits.shape[1:]), y)
      zb = ProjectionHead(z.shape[-1]).apply({"params": head}, z) if project else z
      bn = cad_bottleneck_loss(
        zb,
        flatten_domains(y),
        domains,
        hp["temperature"],
        conditional,
        bool(hp["is_flipped"]),
        bool(hp["is_normalized"]),
      )
      total = jnp.mean(env_losses) + hp["lmbda"] * bn
      return total, (env_losses, bn)

    head = state.projection.params if project else {}
    (total, (env_losses, bn)), (g, g_head) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True
    )(params, head)
    new_state = state
    if project:
      new_state = CADState(state.projection.apply_gradients(g_head, domainbed_adam()(ctx)))
    metrics = {
      "bn_loss": bn,
      "objective": total,
      "penalty_weight": jnp.asarray(hp["lmbda"], jnp.float32),
    }
    return g, Terms(env_losses, bn, metrics, new_state)

  return GradientSource(grads, init)


def _cad_hparams():
  return {
    "lmbda": HParam(
      1e-1,
      lambda r: float(r.choice([1e-4, 1e-3, 1e-2, 1e-1, 1, 1e1, 1e2])),
      "weight of the domain bottleneck",
      minimum=0.0,
    ),
    "temperature": HParam(
      0.1, lambda r: float(r.choice([0.05, 0.1])), "contrastive temperature T", positive=True
    ),
    "is_normalized": HParam(
      False,
      lambda r: False,
      "L2-normalise the features in the bottleneck",
      kind="bool",
      structural=True,
    ),
    "is_project": HParam(
      False,
      lambda r: False,
      "projection head F-F-128 before the bottleneck (broken in DomainBed; see the module docs)",
      kind="bool",
      structural=True,
    ),
    "is_flipped": HParam(
      True,
      lambda r: True,
      "maximise log p(other domains) instead of minimising log p(same domain)",
      kind="bool",
      structural=True,
    ),
  }


CAD = Method(
  name="cad",
  description="CAD: CE + lmbda * contrastive domain bottleneck minimising I(D; Z) "
  "(Ruan, Dubois & Maddison, ICLR 2022)",
  domainbed_name="CAD",
  hparams=_cad_hparams(),
  gradients=cad_gradients(conditional=False),
)

COND_CAD = Method(
  name="condcad",
  description="CondCAD: CE + lmbda * contrastive domain bottleneck minimising I(D; Z | Y) "
  "(Ruan, Dubois & Maddison, ICLR 2022)",
  domainbed_name="CondCAD",
  hparams=_cad_hparams(),
  gradients=cad_gradients(conditional=True),
)
