"""Causality-based invariant representation learning: CausIRL-CORAL and CausIRL-MMD
(Chevalley, Bunne, Krause & Bauer, "Invariant Causal Mechanisms through Distribution Matching",
2022, arXiv:2206.11646; DomainBed's ``AbstractCausIRL``).

Instead of matching every pair of domains (CORAL / MMD), CausIRL cuts each domain's minibatch
at a random point ``s_d ~ U{0, ..., B-1}`` and matches the pooled heads against the pooled
tails::

    first  = concat_d z_d[:s_d],      second = concat_d z_d[s_d:]
    objective = mean_d CE_d + mmd_gamma * nan_to_num(dist(first, second))

with ``dist`` DomainBed's CORAL distance (feature means and covariances,
:func:`dgjax.penalties.coral_distance`) or its multi-bandwidth Gaussian MMD
(:func:`dgjax.penalties.mmd_distance`); the penalty is 0 unless both halves hold at least two
examples. The halves have data-dependent sizes, so here they are masks over the pooled
``[D * B]`` features and the distances are their masked forms (:func:`masked_coral_distance`,
:func:`masked_mmd_distance`): the same numbers as on the concatenated subsets.

Differences from DomainBed: the cut points are drawn from the step's key (DomainBed:
``np.random.randint``), and the ``+ 1e-16`` DomainBed adds to the logits before the
cross-entropy is left out (softmax cross-entropy is invariant to a constant shift of the
logits). DomainBed logs ``loss`` = mean CE and ``penalty``, as here.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dgjax import penalties
from dgjax.core import (
  HParam,
  Method,
  Terms,
  domain_features_and_logits,
  env_losses_of,
  flatten_domains,
  penalized,
)


def split_points(key: jax.Array, num_domains: int, batch_size: int) -> jax.Array:
  """Each domain's cut point ``s_d``, uniform on ``{0, ..., batch_size - 1}`` (DomainBed's
  ``np.random.randint(0, len(features[i]))``), shape ``[num_domains]``."""
  return jax.random.randint(key, (num_domains,), 0, batch_size)


def split_masks(points: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Masks ``[D * B]`` of the pooled heads (``index < s_d``) and tails (``index >= s_d``)."""
  head = (jnp.arange(batch_size)[None, :] < points[:, None]).reshape(-1)
  return head, ~head


def masked_coral_distance(z: jax.Array, in_x: jax.Array, in_y: jax.Array) -> jax.Array:
  """:func:`dgjax.penalties.coral_distance` between the rows of ``z`` ``[N, F]`` selected by the
  boolean masks ``in_x`` and ``in_y`` ``[N]`` (each needs at least two rows)::

      mu_x = sum_i m_i z_i / n_x,   C_x = sum_i m_i (z_i - mu_x)(z_i - mu_x)^T / (n_x - 1)
      mean_f (mu_x - mu_y)_f^2 + mean_{f,g} (C_x - C_y)_{fg}^2
  """

  def moments(mask):
    m = mask.astype(z.dtype)[:, None]
    n = jnp.sum(m)
    mean = jnp.sum(m * z, 0, keepdims=True) / jnp.maximum(n, 1.0)
    centred = m * (z - mean)
    return mean, centred.T @ centred / jnp.maximum(n - 1.0, 1.0)

  mx, cx = moments(in_x)
  my, cy = moments(in_y)
  return jnp.mean(jnp.square(mx - my)) + jnp.mean(jnp.square(cx - cy))


def masked_mmd_distance(
  z: jax.Array, in_x: jax.Array, in_y: jax.Array, gammas: Sequence[float] = penalties.MMD_GAMMAS
) -> jax.Array:
  """:func:`dgjax.penalties.mmd_distance` between the rows of ``z`` ``[N, F]`` selected by the
  boolean masks ``in_x`` and ``in_y`` ``[N]``: masked means of the one ``[N, N]`` kernel,

      sum_ij a_i a_j K_ij / n_x^2 + sum_ij b_i b_j K_ij / n_y^2 - 2 sum_ij a_i b_j K_ij / (n_x n_y).
  """
  k = penalties.gaussian_kernel(z, z, gammas)
  a = in_x.astype(z.dtype)
  b = in_y.astype(z.dtype)
  na, nb = jnp.maximum(jnp.sum(a), 1.0), jnp.maximum(jnp.sum(b), 1.0)
  return a @ k @ a / (na * na) + b @ k @ b / (nb * nb) - 2.0 * (a @ k @ b) / (na * nb)


def causirl_penalty(z: jax.Array, points: jax.Array, distance) -> jax.Array:
  """CausIRL's penalty on features ``z`` ``[D, B, F]`` cut at ``points`` ``[D]``:
  ``nan_to_num(distance(heads, tails))``, or 0 unless both halves hold more than one row."""
  batch = z.shape[1]
  in_x, in_y = split_masks(points, batch)
  ok = (jnp.sum(in_x) > 1) & (jnp.sum(in_y) > 1)
  value = jnp.nan_to_num(distance(flatten_domains(z), in_x, in_y))
  return jnp.where(ok, value, jnp.zeros((), value.dtype))


def causirl_terms(distance):
  """``terms(ctx, params, batch, key, state)`` of CausIRL with ``distance`` (masked)."""

  def terms(ctx, params, batch, key, state) -> Terms:
    z, logits = domain_features_and_logits(ctx, params, batch["x"])
    d, b = batch["y"].shape[:2]
    points = split_points(key, d, b)
    return Terms(
      env_losses_of(logits, batch["y"]), causirl_penalty(z, points, distance), state=state
    )

  return terms


def _mmd_gamma():
  return HParam(1.0, lambda r: 10 ** r.uniform(-1, 1), "penalty weight", minimum=0.0)


CAUSIRL_CORAL = Method(
  name="causirl_coral",
  description="CausIRL-CORAL: mean CE + gamma * CORAL distance between the pooled heads and "
  "tails of randomly cut domain batches (Chevalley et al., 2022)",
  domainbed_name="CausIRL_CORAL",
  hparams={"mmd_gamma": _mmd_gamma()},
  gradients=penalized(causirl_terms(masked_coral_distance), weight="mmd_gamma"),
  forward_per_domain=True,
)

CAUSIRL_MMD = Method(
  name="causirl_mmd",
  description="CausIRL-MMD: mean CE + gamma * Gaussian-kernel MMD between the pooled heads and "
  "tails of randomly cut domain batches (Chevalley et al., 2022)",
  domainbed_name="CausIRL_MMD",
  hparams={"mmd_gamma": _mmd_gamma()},
  gradients=penalized(causirl_terms(masked_mmd_distance), weight="mmd_gamma"),
  forward_per_domain=True,
)
