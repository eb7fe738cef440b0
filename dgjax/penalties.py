"""Invariance penalties as pure functions of per-domain outputs, losses or gradients.

Every function here is a plain differentiable ``jnp`` function: the methods in
:mod:`dgjax.algorithms` add them to the objective and JAX differentiates through them (for
IGA and Fishr that means through gradients: second order). Shapes: a leading ``D`` axis
indexes training domains, ``B`` examples in a domain's batch, ``F`` features.

Formulas follow DomainBed (Gulrajani & Lopez-Paz, ICLR 2021, ``domainbed/algorithms.py``);
each docstring names the paper and any choice DomainBed makes that the paper leaves open.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgjax.losses import cross_entropy
from dgjax.types import PyTree


#: DomainBed's Gaussian-kernel bandwidths for MMD: ``k(x, y) = sum_g exp(-g |x - y|^2)``.
MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


# ------------------------------------------------------------------------------ IRM
def irm_penalty(
  logits: jax.Array,
  labels: jax.Array,
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """IRMv1 penalty of one domain (Arjovsky et al., "Invariant Risk Minimization", 2019, eq. 4).

  The squared norm of the gradient of the risk with respect to a dummy classifier scale
  ``w = 1.0``, ``|d/dw R(w * logits)|^2``, estimated without bias from two halves of the batch
  as DomainBed's ``IRM._irm_penalty`` (and the paper's Section 3.2) does:

      penalty = (d/dw R_even(w * logits))|_{w=1} * (d/dw R_odd(w * logits))|_{w=1}

  with ``R_even`` on examples ``0, 2, 4, ...`` and ``R_odd`` on ``1, 3, 5, ...``.

  Args:
    logits: ``[B, C]`` logits of one domain's batch.
    labels: ``[B]`` labels.
    loss_fn: ``loss_fn(logits, labels) -> scalar`` mean risk; default
      :func:`dgjax.losses.cross_entropy` (softmax CE; one logit column = logistic).
  """
  loss_fn = cross_entropy if loss_fn is None else loss_fn

  def scale_grad(lg, y):
    return jax.grad(lambda w: loss_fn(lg * w, y))(jnp.ones((), lg.dtype))

  return scale_grad(logits[0::2], labels[0::2]) * scale_grad(logits[1::2], labels[1::2])


def irm_penalty_full_batch(
  logits: jax.Array,
  labels: jax.Array,
  loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """IRMv1 penalty of one domain as the Colored MNIST scripts compute it (Arjovsky et al.'s
  ``colored_mnist/main.py`` ``penalty``; Fishr's and the Hessian paper's
  ``compute_irm_penalty``): the square of the dummy-scale gradient of the WHOLE batch,

      penalty = ((d/dw R(w * logits))|_{w=1})^2          (never negative)

  instead of DomainBed's product of two half-batch gradients (:func:`irm_penalty`).
  """
  loss_fn = cross_entropy if loss_fn is None else loss_fn
  g = jax.grad(lambda w: loss_fn(logits * w, labels))(jnp.ones((), logits.dtype))
  return jnp.square(g)


# ------------------------------------------------------------------------------ V-REx
def vrex_penalty(env_losses: jax.Array) -> jax.Array:
  """V-REx penalty (Krueger et al., "Out-of-Distribution Generalization via Risk
  Extrapolation", ICML 2021, eq. 8): the variance of the per-domain risks,

      penalty = (1/D) sum_d (R_d - mean_e R_e)^2        (biased, as DomainBed's ``VREx``).
  """
  return jnp.mean(jnp.square(env_losses - jnp.mean(env_losses)))


def risk_difference_penalty(env_losses: jax.Array) -> jax.Array:
  """V-REx penalty as the Colored MNIST scripts compute it (Fishr's and the Hessian paper's
  ``rex_penalty = (nll_0 - nll_1)^2``), for any number of domains the sum over pairs,

      penalty = sum_{d < e} (R_d - R_e)^2 = D * sum_d (R_d - mean R)^2

  which is ``(R_0 - R_1)^2`` for two domains (4 times DomainBed's :func:`vrex_penalty`).
  """
  d = env_losses.shape[0]
  return d * jnp.sum(jnp.square(env_losses - jnp.mean(env_losses)))


# ------------------------------------------------------------------------------ CORAL / MMD
def pairwise_mean(
  distance: Callable[[jax.Array, jax.Array], jax.Array], features: jax.Array
) -> jax.Array:
  """``2 / (D (D - 1)) sum_{i<j} distance(features[i], features[j])`` over the domain axis
  (DomainBed's ``AbstractMMD.update``), one vmapped program over the pairs; 0 when ``D < 2``."""
  d = features.shape[0]
  if d < 2:
    return jnp.zeros((), features.dtype)
  i, j = np.triu_indices(d, k=1)
  return jnp.mean(jax.vmap(distance)(features[i], features[j]))


def coral_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Deep CORAL distance (Sun & Saenko, ECCV-W 2016) as DomainBed's ``CORAL``: the mean
  squared difference of feature means plus that of feature covariances,

      mean_f (mu_x - mu_y)_f^2 + mean_{f,g} (C_x - C_y)_{fg}^2,
      C_x = (x - mu_x)^T (x - mu_x) / (B - 1).

  (The paper's loss is ``|C_x - C_y|_F^2 / (4 F^2)`` without the mean term; DomainBed's
  form is kept so that ``mmd_gamma`` means the same thing.)
  """
  mx, my = jnp.mean(x, 0, keepdims=True), jnp.mean(y, 0, keepdims=True)
  cx, cy = x - mx, y - my
  cov_x = cx.T @ cx / (x.shape[0] - 1)
  cov_y = cy.T @ cy / (y.shape[0] - 1)
  return jnp.mean(jnp.square(mx - my)) + jnp.mean(jnp.square(cov_x - cov_y))


def coral_penalty(features: jax.Array) -> jax.Array:
  """CORAL penalty: :func:`coral_distance` averaged over pairs of domains; ``features`` is
  ``[D, B, F]``."""
  return pairwise_mean(coral_distance, features)


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """``|x_i - y_j|^2`` as ``|x_i|^2 + |y_j|^2 - 2 x_i.y_j``, clamped at 1e-30 (DomainBed's
  ``my_cdist``)."""
  d = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T
  return jnp.maximum(d, 1e-30)


def gaussian_kernel(x: jax.Array, y: jax.Array, gammas: Sequence[float] = MMD_GAMMAS) -> jax.Array:
  """``K_ij = sum_g exp(-g |x_i - y_j|^2)``: DomainBed's multi-bandwidth Gaussian kernel."""
  d = squared_distances(x, y)
  return sum(jnp.exp(-g * d) for g in gammas)


def mmd_distance(x: jax.Array, y: jax.Array, gammas: Sequence[float] = MMD_GAMMAS) -> jax.Array:
  """Biased MMD^2 estimate (Gretton et al., 2012) with :func:`gaussian_kernel`, as used by
  MMD-AAE (Li et al., "Domain Generalization with Adversarial Feature Learning", CVPR 2018)
  and DomainBed's ``MMD``:

      mean_ij K(x_i, x_j) + mean_ij K(y_i, y_j) - 2 mean_ij K(x_i, y_j).
  """
  return (
    jnp.mean(gaussian_kernel(x, x, gammas))
    + jnp.mean(gaussian_kernel(y, y, gammas))
    - 2.0 * jnp.mean(gaussian_kernel(x, y, gammas))
  )


def mmd_penalty(features: jax.Array, gammas: Sequence[float] = MMD_GAMMAS) -> jax.Array:
  """MMD penalty: :func:`mmd_distance` averaged over pairs of domains; ``features`` is
  ``[D, B, F]``."""
  return pairwise_mean(lambda x, y: mmd_distance(x, y, gammas), features)


# ------------------------------------------------------------------------------ IGA
def gradient_variance_penalty(per_domain_grads: PyTree) -> jax.Array:
  """IGA penalty (Koyama & Yamaguchi, "When is invariance useful in an Out-of-Distribution
  Generalization problem?", 2020; DomainBed's ``IGA``): the summed squared deviation of each
  domain's gradient from the mean gradient, over the full parameter vector,

      penalty = sum_d |g_d - (1/D) sum_e g_e|^2        (g_d = grad_theta R_d, leaves [D, ...]).

  DomainBed detaches the mean gradient; that changes nothing: the derivative of the penalty
  is ``2 sum_d (H_d - H_mean)(g_d - g_mean) = 2 sum_d H_d (g_d - g_mean)`` either way.
  """
  leaves = jax.tree.leaves(per_domain_grads)
  return sum(jnp.sum(jnp.square(g - jnp.mean(g, 0, keepdims=True))) for g in leaves)


# ------------------------------------------------------------------------------ Fishr
def per_example_grads(
  loss_fn: Callable[..., jax.Array], params: PyTree, *batch: jax.Array
) -> PyTree:
  """Gradients of ``loss_fn(params, *example)`` for every example: ``vmap(grad)`` over the
  leading axis of every array in ``batch``; each leaf gains a leading ``N`` axis.

  ``loss_fn`` sees one example at a time (arrays without the ``N`` axis). This replaces
  BackPACK's ``BatchGrad`` in DomainBed's Fishr.
  """
  return jax.vmap(jax.grad(loss_fn), in_axes=(None,) + (0,) * len(batch))(params, *batch)


def domain_gradient_variances(per_example: PyTree) -> PyTree:
  """Per-domain variance of per-example gradients, ``leaves [D, B, ...] -> [D, ...]``:

  v_d = (1/B) sum_b (g_db - (1/B) sum_c g_dc)^2       (biased, DomainBed's Fishr)
  """

  def var(g):
    return jnp.mean(jnp.square(g - jnp.mean(g, 1, keepdims=True)), 1)

  return jax.tree.map(var, per_example)


def fishr_penalty(variances: PyTree, reduction: str = "mean") -> jax.Array:
  """Fishr penalty (Rame, Dancette & Cord, "Fishr: Invariant Gradient Variances for
  Out-of-Distribution Generalization", ICML 2022, eq. 4): the distance between each domain's
  gradient variance and their mean, averaged over domains,

      penalty = (1/D) sum_d mean_k (v_d[k] - (1/D) sum_e v_e[k])^2

  where ``k`` runs over every entry of every leaf (DomainBed's ``l2_between_dicts`` takes the
  mean over the concatenated vector). ``variances`` has leaves ``[D, ...]``.

  ``reduction="sum"`` is the Colored MNIST script's form (Fishr's ``train_coloredmnist.py``,
  ``l2_between_grads_variance`` summed over the two domains): the plain sum over domains and
  entries, ``sum_d sum_k (v_d[k] - mean_e v_e[k])^2``.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"fishr_penalty reduction must be 'mean' or 'sum', got {reduction!r}")
  leaves = jax.tree.leaves(variances)
  total = sum(int(np.prod(v.shape[1:])) for v in leaves)
  sq = sum(jnp.sum(jnp.square(v - jnp.mean(v, 0, keepdims=True))) for v in leaves)
  return sq if reduction == "sum" else sq / (leaves[0].shape[0] * total)
