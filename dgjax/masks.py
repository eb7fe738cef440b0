"""Gradient-agreement masks as optax transforms: AND-mask and SAND-mask.

Both transforms take **per-domain** gradients (every leaf ``[D, ...]``, e.g. from
:func:`dgjax.per_domain_grads`) and return one masked mean gradient (leaves without the
``D`` axis), so they go first in a chain::

    tx = optax.chain(dgjax.sand_mask(tau=0.5, k=10.0), optax.adam(1e-3))
    updates, opt_state = tx.update(per_domain_grads, opt_state, params)

For each parameter tensor (pytree leaf) with per-domain gradients ``g_1..g_D``:

    agreement a = | (1/D) sum_d sign(g_d) |                       (elementwise, in [0, 1])
    mean      m = (1/D) sum_d g_d
    out         = (m * mask) / (1e-10 + mean(mask))              (per-leaf rescale)

with ``mask`` given by each method below. The rescale by the inverse fraction kept follows
DomainBed's ``ANDMask`` / ``SANDMask`` (Gulrajani & Lopez-Paz, ICLR 2021; Shahtalebi et al.).

Every gradient leaf is checked against ``params`` (shape ``[D, *param.shape]``, one ``D``) before
any work, so ordinary ``jax.grad`` output (no domain axis) is an error, not a silently wrong
mask over the first parameter axis.

optax wrappers (README, "optax recipes"): a mask changes the shape of what flows through the
chain (``[D, ...]`` in, params-shaped out), so it cannot sit inside a wrapper whose other branch
returns something shaped like its input (``optax.MultiSteps``, ``optax.apply_if_finite``,
``optax.conditionally_transform``, ``optax.conditionally_mask``); the masks refuse that with an
error saying what to do instead. Accumulate micro-batches with :func:`accumulate_per_domain`;
put ``apply_if_finite`` after the mask (NaN/Inf in any domain's gradient reach the mask's output).
"""

from __future__ import annotations

import numbers
import os
import sys
import warnings
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from dgjax.types import PyTree

_RESCALE_EPS = 1e-10  # DomainBed's guard in 1 / (1e-10 + mean(mask))


def _stat_dtype(dtype):
  """Statistics are taken in at least float32 (bf16/f16 sign means and variances are too coarse)."""
  return jnp.promote_types(dtype, jnp.float32)


def sign_agreement(g: jax.Array) -> jax.Array:
  """``|mean_d sign(g_d)|`` over the leading domain axis, in [0, 1]."""
  g = g.astype(_stat_dtype(g.dtype))
  return jnp.abs(jnp.mean(jnp.sign(g), axis=0))


def and_mask_weights(per_domain_grads: PyTree, tau: float) -> PyTree:
  """AND-mask (Parascandolo et al., "Learning explanations that are hard to vary", ICLR 2021).

  ``mask = 1[ |mean_d sign(g_d)| >= tau ]`` elementwise, one mask per leaf (no ``D`` axis).
  """
  return jax.tree.map(
    lambda g: (sign_agreement(g) >= tau).astype(_stat_dtype(g.dtype)), per_domain_grads
  )


def sand_mask_weights(per_domain_grads: PyTree, tau: float, k: float) -> PyTree:
  """SAND-mask (Shahtalebi et al., "SAND-mask: An Enhanced Gradient Masking Strategy for the
  Discovery of Invariances in Domain Generalization", 2021, arXiv:2106.02266), eq. (4)-(5):

      mask = max(0, tanh( k * (|mean_d sign(g_d)| - tau) / var_d(g_d) ))

  ``var_d`` is the unbiased (``ddof=1``) variance across domains, as ``torch.var`` in
  DomainBed's ``SANDMask``. Where that variance is zero (all domains give the same gradient
  entry; or a single domain) the ratio is taken at its limit: mask 1 where
  ``|mean sign| > tau``, else 0. DomainBed reaches the same values through ``inf``/``NaN``
  patching (NaN variance -> 1e-17, NaN mask -> 1e-17); we never produce ``inf``/``NaN``.
  """

  def leaf_mask(g):
    g = g.astype(_stat_dtype(g.dtype))
    a = sign_agreement(g) - tau
    d = g.shape[0]
    var = jnp.var(g, axis=0, ddof=1) if d > 1 else jnp.zeros(g.shape[1:], g.dtype)
    positive = var > 0
    smooth = jnp.tanh(k * a / jnp.where(positive, var, 1.0))
    limit = (a > 0).astype(g.dtype)
    return jnp.maximum(jnp.where(positive, smooth, limit), 0.0)

  return jax.tree.map(leaf_mask, per_domain_grads)


def masked_mean(per_domain_grads: PyTree, masks: PyTree) -> PyTree:
  """``mean_d(g_d) * mask / (1e-10 + mean(mask))`` per leaf, in the gradients' dtype."""

  def leaf(g, m):
    mean = jnp.mean(g.astype(_stat_dtype(g.dtype)), axis=0)
    out = mean * m / (_RESCALE_EPS + jnp.mean(m))
    return out.astype(g.dtype)

  return jax.tree.map(leaf, per_domain_grads, masks)


# --------------------------------------------------------------------------- input checks
def _shape_list(items, limit=4) -> str:
  shown = "; ".join(items[:limit])
  return shown + (f"; ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_per_domain_grads(
  per_domain_grads: PyTree, params: PyTree = None, where: str = "per-domain gradients"
) -> int:
  """Checks that every leaf is ``[D, *param.shape]`` with one ``D >= 1``; returns ``D``.

  With ``params`` each gradient leaf is compared with its parameter (same tree structure,
  trailing shape equal to the parameter's). Without ``params`` only a common leading axis is
  checked (every leaf at least 1-D, one leading size), which misses a gradient whose first
  parameter axis happens to be shared by every leaf: pass ``params``.

  Raises:
    ValueError naming ``where``, the offending leaf paths and their shapes.
  """
  grad_leaves, grad_def = jax.tree_util.tree_flatten_with_path(per_domain_grads)
  if not grad_leaves:
    return 0
  if params is not None:
    param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
    if grad_def != param_def:
      raise ValueError(
        f"{where}: the gradients' tree structure differs from params': {grad_def} vs {param_def}"
      )
    bad, like_params, sizes = [], 0, set()
    for (path, g), (_, p) in zip(grad_leaves, param_leaves):
      gs, ps = tuple(jnp.shape(g)), tuple(jnp.shape(p))
      if len(gs) == len(ps) + 1 and gs[1:] == ps:
        sizes.add(gs[0])
      else:
        like_params += gs == ps
        bad.append(f"{jax.tree_util.keystr(path)}: gradient {gs}, param {ps}")
    if bad:
      hint = (
        " The gradients are shaped like the parameters, with no domain axis: ordinary "
        "jax.grad output? Compute them per domain, e.g. dgjax.per_domain_grads(loss_fn, "
        "params, batch) with batch leaves [D, B, ...]."
        if like_params == len(bad)
        else ""
      )
      raise ValueError(
        f"{where} need a leading domain axis on every leaf, shaped "
        f"[D, *param.shape]; got {_shape_list(bad)}.{hint}"
      )
  else:
    sizes = {jnp.shape(g)[0] if jnp.ndim(g) else None for _, g in grad_leaves}
    if None in sizes or len(sizes) > 1:
      shapes = [f"{jax.tree_util.keystr(p)}: {tuple(jnp.shape(g))}" for p, g in grad_leaves]
      raise ValueError(
        f"{where} need a leading domain axis D shared by every leaf; got "
        f"{_shape_list(shapes)}. Pass params to update() to have each leaf "
        "checked against its parameter."
      )
  if len(sizes) > 1:
    raise ValueError(
      f"{where}: the leaves disagree on the number of domains (leading axis "
      f"sizes {sorted(sizes)}); every leaf needs the same D."
    )
  d = sizes.pop()
  if d < 1:
    raise ValueError(f"{where}: the domain axis is empty (D = 0).")
  return d


# optax wrappers that run their inner transform in one branch of a ``lax.cond`` (or an
# ``eval_shape``) and return something shaped like their *input* updates in the other.
_OPTAX_SHAPE_KEEPING_WRAPPERS = (
  "MultiSteps",
  "apply_if_finite",
  "conditionally_transform",
  "conditionally_mask",
)
_DGJAX_WRAPPERS = ("accumulate_per_domain",)
_OPTAX_DIR = os.sep + "optax" + os.sep


def enclosing_gradient_wrappers() -> tuple[str, ...]:
  """Names of the optax / dgjax gradient wrappers whose code is on the Python call stack,
  innermost first, e.g. ``("optax.MultiSteps",)``.

  Transforms call it from ``update`` (at trace time under ``jit``) to refuse a wrapper they
  cannot work in, with an error that says what to use instead, rather than a ``lax.cond``
  type error or a silently wrong update. Mechanism: the qualified names of the frames' code
  objects (``MultiSteps.update``, ``apply_if_finite.<locals>.update``, ...) in optax's source
  files and in this module. On Python < 3.11 (no ``co_qualname``) nothing is found.
  """
  found = []
  frame = sys._getframe(1)
  while frame is not None:
    code = frame.f_code
    outer = getattr(code, "co_qualname", "").split(".")[0]
    if outer in _OPTAX_SHAPE_KEEPING_WRAPPERS and _OPTAX_DIR in code.co_filename:
      name = "optax." + outer
    elif outer in _DGJAX_WRAPPERS and code.co_filename == __file__:
      name = "dgjax.masks." + outer
    else:
      name = None
    if name is not None and name not in found:
      found.append(name)
    frame = frame.f_back
  return tuple(found)


def _refuse_shape_keeping_wrappers(name: str) -> None:
  """A mask changes ``[D, ...]`` into params-shaped updates: refuse the optax wrappers that
  need their inner transform to keep the shape, before anything is computed."""
  for wrapper in enclosing_gradient_wrappers():
    if wrapper == "optax.MultiSteps":
      raise ValueError(
        f"{name} cannot sit inside optax.MultiSteps: MultiSteps accumulates the gradients it "
        "is given in a buffer shaped like params, but a mask takes per-domain gradients "
        "[D, ...] and must see the accumulated per-domain gradients (the mask of a mean is "
        "not the mean of masks). Use dgjax.masks.accumulate_per_domain(optax.chain(mask, "
        "optimizer), every_k_schedule=k, num_domains=D) instead (README, 'optax recipes')."
      )
    if wrapper.startswith("optax."):
      raise ValueError(
        f"{name} cannot sit inside {wrapper}: when it skips, {wrapper} returns zeros shaped "
        "like its input (per-domain gradients [D, ...]) while the mask returns params-shaped "
        f"updates. Put the wrapper after the mask, e.g. optax.chain({name}(...), "
        "optax.apply_if_finite(optax.adam(lr), max_consecutive_errors)): a NaN or Inf in any "
        "domain's gradient reaches the mask's output, so the same steps are skipped "
        "(README, 'optax recipes')."
      )


def _is_concrete_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


class MaskState(NamedTuple):
  """Keeps the fraction of gradient entries the last mask let through (for logging)."""

  kept_fraction: jax.Array


def _mask_transform(mask_fn, name: str) -> optax.GradientTransformation:

  def init_fn(params):
    del params
    return MaskState(kept_fraction=jnp.ones((), jnp.float32))

  def update_fn(updates, state, params=None):
    del state
    _refuse_shape_keeping_wrappers(name)
    check_per_domain_grads(updates, params, where=f"{name}'s gradients")
    masks = mask_fn(updates)
    sizes = [m.size for m in jax.tree.leaves(masks)]
    total = sum(jnp.sum(m, dtype=jnp.float32) for m in jax.tree.leaves(masks))
    kept = total / max(sum(sizes), 1)
    return masked_mean(updates, masks), MaskState(kept_fraction=kept)

  return optax.GradientTransformation(init_fn, update_fn)


def and_mask(tau: float = 1.0) -> optax.GradientTransformation:
  """AND-mask over per-domain gradients (Parascandolo et al., ICLR 2021).

  ``out = mean_d(g_d) * 1[|mean_d sign(g_d)| >= tau] / (1e-10 + fraction kept)`` per leaf.

  Args:
    tau: agreement threshold in [0, 1]. Default 1.0 (DomainBed's default): keep only the
      entries whose sign all domains agree on. ``tau > 1`` keeps nothing and warns.

  Returns:
    A transform whose ``update(per_domain_grads, state, params)`` takes per-domain gradients
    (every leaf ``[D, *param.shape]``, checked against ``params``; without ``params`` only a
    shared leading axis is checked) and returns the masked mean gradient (no ``D`` axis).
    Raises inside ``optax.MultiSteps`` / ``optax.apply_if_finite`` (see the module docstring).
  """
  if _is_concrete_number(tau) and tau > 1.0:
    warnings.warn(
      f"and_mask(tau={tau}): |mean sign| <= 1, so tau > 1 masks every gradient entry and "
      "the model will not train. Use tau in [0, 1].",
      stacklevel=2,
    )
  return _mask_transform(lambda g: and_mask_weights(g, tau), "dgjax.and_mask")


def sand_mask(tau: float = 0.5, k: float = 10.0) -> optax.GradientTransformation:
  """SAND-mask over per-domain gradients (Shahtalebi et al., 2021, arXiv:2106.02266).

  ``mask = max(0, tanh(k * (|mean_d sign(g_d)| - tau) / var_d(g_d)))`` and
  ``out = mean_d(g_d) * mask / (1e-10 + mean(mask))`` per leaf (see module docstring).

  Args:
    tau: agreement threshold. Default 0.5, the centre of DomainBed's search range U(0, 1).
      DomainBed's default ``tau=1.0`` gives ``|mean sign| - tau <= 0`` everywhere, hence a
      mask of zeros and a model that never trains; ``tau >= 1`` warns here (the value is
      kept: reproducing that behaviour is the user's call).
    k: steepness of the tanh (DomainBed default 10).

  Returns:
    A transform whose ``update(per_domain_grads, state, params)`` takes per-domain gradients
    (every leaf ``[D, *param.shape]``, checked against ``params``; without ``params`` only a
    shared leading axis is checked) and returns the masked mean gradient (no ``D`` axis).
    Raises inside ``optax.MultiSteps`` / ``optax.apply_if_finite`` (see the module docstring).
  """
  if _is_concrete_number(tau) and tau >= 1.0:
    warnings.warn(
      f"sand_mask(tau={tau}): |mean sign| - tau <= 0 for every entry, so the SAND mask is "
      "zero everywhere and the model will not train (DomainBed's default tau=1.0 has this "
      "problem). Use tau < 1, e.g. the default 0.5.",
      stacklevel=2,
    )
  return _mask_transform(lambda g: sand_mask_weights(g, tau, k), "dgjax.sand_mask")


def mean_over_domains() -> optax.GradientTransformation:
  """The ERM combination: the plain mean of per-domain gradients (leaves lose the ``D`` axis).

  With equal per-domain batch sizes this is the gradient of the pooled-batch mean loss.
  Checks its input and refuses the same optax wrappers as the masks.
  """

  def update_fn(updates, state, params=None):
    _refuse_shape_keeping_wrappers("dgjax.mean_over_domains")
    check_per_domain_grads(updates, params, where="dgjax.mean_over_domains's gradients")
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------- accumulation
def _cast_like_leaf(new, old):
  """``new`` in ``old``'s dtype (strong), so that both ``lax.cond`` branches agree."""
  dtype = jnp.result_type(old)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return new
  return jnp.asarray(new, dtype)


def accumulate_per_domain(
  inner: optax.GradientTransformation,
  every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
  num_domains: int,
  use_grad_mean: bool = True,
  accumulator_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """Gradient accumulation over micro-batches for a chain that starts with a mask.

  ``optax.MultiSteps`` for per-domain gradients: each call adds the micro-batch's per-domain
  gradients (leaves ``[D, *param.shape]``) to a ``[D, ...]`` accumulator; every ``k``-th call
  hands their mean (``use_grad_mean``, Welford's update as in ``optax.MultiSteps``) or sum to
  ``inner`` and returns its update, the other calls return zeros and leave ``inner``'s state
  alone. With equal micro-batches and mean losses, the mean of the micro-batches' per-domain
  gradients is the per-domain gradient of the big batch, so::

      accumulate_per_domain(optax.chain(dgjax.sand_mask(...), optax.adam(lr)), k, D)

  fed ``k`` micro-batches of ``B`` gives the update of ``optax.chain(dgjax.sand_mask(...),
  optax.adam(lr))`` fed one batch of ``k B`` (tested). ``optax.MultiSteps`` itself cannot do
  this: its accumulator is shaped like ``params`` (``optax.tree.zeros_like(params)``), so the
  masks refuse to sit inside it.

  ``inner`` runs (in a ``lax.cond`` branch) only at the steps that emit, with that call's
  ``params`` and extra arguments. The Hessian-alignment transforms of :mod:`dgjax.hessian`
  refuse to run inside it (their penalty would see the last micro-batch only).

  Args:
    inner: the transform to feed the accumulated per-domain gradients, e.g.
      ``optax.chain(dgjax.sand_mask(...), optax.adam(lr))``.
    every_k_schedule: micro-batches per update, an int or a function of the update count.
    num_domains: ``D``, the leading axis of the per-domain gradients (the accumulator's shape
      is fixed at ``init``, which sees ``params`` only).
    use_grad_mean: average the micro-batches' gradients (default) or sum them.
    accumulator_dtype: dtype of the accumulator (default float32, as ``optax.MultiSteps``).

  Returns:
    A transform with ``optax.MultiStepsState`` as state (``acc_grads`` leaves ``[D, ...]``,
    ``skip_state=()``); ``update(per_domain_grads, state, params, **extra_args)`` needs params.
  """
  if (
    isinstance(num_domains, bool)
    or not isinstance(num_domains, numbers.Integral)
    or num_domains < 1
  ):
    raise ValueError(
      f"accumulate_per_domain: num_domains must be a positive int; got {num_domains!r}"
    )
  if callable(every_k_schedule):
    k_of = every_k_schedule
  else:
    if (
      isinstance(every_k_schedule, bool)
      or not isinstance(every_k_schedule, numbers.Integral)
      or every_k_schedule < 1
    ):
      raise ValueError(
        "accumulate_per_domain: every_k_schedule must be a positive int or a "
        f"function of the update count; got {every_k_schedule!r}"
      )
    k_of = lambda step: every_k_schedule
  inner = optax.with_extra_args_support(inner)
  acc_dtype = jnp.dtype(accumulator_dtype)

  def init_fn(params):
    acc = jax.tree.map(lambda p: jnp.zeros((num_domains,) + jnp.shape(p), acc_dtype), params)
    zero = jnp.zeros([], jnp.int32)
    return optax.MultiStepsState(
      mini_step=zero,
      gradient_step=zero,
      inner_opt_state=inner.init(params),
      acc_grads=acc,
      skip_state=(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        "accumulate_per_domain: pass params to update() (the per-domain gradients "
        "are checked against them, and the inner transform gets them)"
      )
    d = check_per_domain_grads(updates, params, where="accumulate_per_domain's gradients")
    if d != num_domains:
      raise ValueError(
        f"accumulate_per_domain was built for num_domains={num_domains}; the gradients have D = {d}"
      )
    k = k_of(state.gradient_step)
    n = state.mini_step.astype(acc_dtype)
    if use_grad_mean:
      acc = jax.tree.map(
        lambda g, a: a + (g.astype(acc_dtype) - a) / (n + 1), updates, state.acc_grads
      )
    else:
      acc = jax.tree.map(lambda g, a: a + g.astype(acc_dtype), updates, state.acc_grads)
    emit = state.mini_step >= k - 1
    acc_in = optax.tree.cast_like(acc, updates)

    def run_inner():
      out, new_inner = inner.update(acc_in, state.inner_opt_state, params, **extra_args)
      new_inner = jax.tree.map(_cast_like_leaf, new_inner, state.inner_opt_state)
      return out, new_inner

    out_shapes = jax.eval_shape(run_inner)[0]

    def hold():
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
      return zeros, state.inner_opt_state

    out, inner_state = jax.lax.cond(emit, run_inner, hold)
    new_state = optax.MultiStepsState(
      mini_step=jnp.where(emit, 0, optax.safe_increment(state.mini_step)),
      gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step), state.gradient_step),
      inner_opt_state=inner_state,
      acc_grads=jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc),
      skip_state=state.skip_state,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
