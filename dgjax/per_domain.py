"""Per-domain losses and gradients.

A *domain batch* is any pytree whose leaves carry a leading domain axis ``[D, B, ...]``.
The per-domain gradient of ``loss_fn(params, batch)`` is, by definition,

    losses[d], grads[d] = value_and_grad(loss_fn)(params, batch[d])   for d = 0..D-1

computed as ``jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))``: one traced
program, no Python loop over domains. ``impl="unrolled"`` gives the same numbers from a
trace-time loop over the (static) domain axis; it exists only because XLA:CPU lowers the
vmapped convolution weight-gradients to slow grouped convolutions (see ``bench/``), and it
is tested to be equal to the vmapped definition.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from dgjax.types import PyTree

LossFn = Callable[..., Any]

Impl = Literal["vmap", "unrolled"]


def num_domains(batch: PyTree) -> int:
  """The size of the leading domain axis shared by every leaf of ``batch``."""
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(
      f"every leaf of a domain batch needs the same leading domain axis; got sizes {sorted(sizes)}"
    )
  return sizes.pop()


def map_over_leading(fn: Callable, xs: PyTree, impl: Impl = "vmap"):
  """``fn`` on each slice of the leading axis of ``xs``, outputs stacked: ``jax.vmap(fn)``, or
  with ``impl == "unrolled"`` a trace-time loop over the (static) axis (the CPU lowering, see
  the module docstring)."""
  if impl == "vmap":
    return jax.vmap(fn)(xs)
  if impl == "unrolled":
    n = num_domains(xs)
    outs = [fn(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(n)]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)
  raise ValueError(f"unknown per-domain impl {impl!r}; expected 'vmap' or 'unrolled'")


def per_domain_value_and_grad(
  loss_fn: LossFn,
  params: PyTree,
  batch: PyTree,
  *args: Any,
  has_aux: bool = False,
  impl: Impl = "vmap",
):
  """Per-domain losses ``[D]`` and gradients (every leaf gains a leading ``D`` axis).

  Args:
    loss_fn: ``loss_fn(params, domain_batch, *args) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux``), evaluated on one domain's batch (leaves ``[B, ...]``).
    params: parameters shared by all domains (no ``D`` axis).
    batch: pytree with leaves ``[D, B, ...]``.
    *args: extra arguments passed unchanged to ``loss_fn`` (not mapped).
    has_aux: as in ``jax.value_and_grad``.
    impl: ``"vmap"`` (the definition) or ``"unrolled"`` (a trace-time loop over the static
      domain axis, concatenated; numerically the same computation).

  Returns:
    ``(losses, grads)`` or ``((losses, aux), grads)`` with ``D`` leading every leaf.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
  return map_over_leading(lambda domain_batch: vg(params, domain_batch, *args), batch, impl)


def per_domain_grads(
  loss_fn: LossFn, params: PyTree, batch: PyTree, *args: Any, impl: Impl = "vmap"
) -> PyTree:
  """Per-domain gradients only; see :func:`per_domain_value_and_grad`."""
  return per_domain_value_and_grad(loss_fn, params, batch, *args, impl=impl)[1]
