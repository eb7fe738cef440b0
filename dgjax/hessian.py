"""Hessian alignment across domains: HGP, Hutchinson and closed-form CMA as optax transforms.

Hemati, Zhang, Estiri & Chen, "Understanding Hessian Alignment for Domain Generalization",
ICCV 2023 (arXiv:2308.11778), align across the training domains the gradients and Hessians of
the loss with respect to the *classifier head*. With ``g_e``, ``H_e`` the gradient and Hessian
of domain ``e``'s loss w.r.t. the head parameters and ``g = (1/E) sum_e g_e``,
``H = (1/E) sum_e H_e`` those of the mean loss over the ``E`` domains:

* **HGP** (Hessian-gradient product)::

      P = (1/E) sum_e [ alpha * ||H_e g_e - H g||^2 + beta * ||g_e - g||^2 ]

* **Hutchinson**::

      P = (1/E) sum_e [ alpha * ||diag(H_e) - diag(H)||^2 + beta * ||g_e - g||^2 ]

  with ``diag(H_e) ~ (1/S) sum_s z_s * (H_e z_s)``, ``z_s`` Rademacher. The same ``S`` probes
  serve every domain, so the estimate of ``diag(H)`` is exactly the mean of the per-domain
  estimates (the reference code draws independent probes per domain; sharing them removes
  the probe noise common to all domains from the differences).

* **CMA** (Chen, Si, Zhang & Zhao, "Moment Alignment: Unifying Gradient and Hessian Matching
  for Domain Generalization", UAI 2025): for a linear head ``logits = z W + b`` with softmax
  (or, for one logit column, sigmoid) cross-entropy on ``n`` examples, the head gradient and
  Hessian diagonal have closed forms in the features::

      dL/dW   = z^T (p - t) / n                 dL/db   = mean_b (p - t)
      d2L/dW2 = (z^2)^T (p (1 - p)) / n         d2L/db2 = mean_b p (1 - p)      (diagonal)

  with ``p`` the predicted probabilities and ``t`` the one-hot labels. The penalty is their
  variance across domains::

      P = alpha * (1/E) sum_e ||G_e - mean_e G_e||^2 + beta * (1/E) sum_e ||D_e - mean_e D_e||^2

  (``alpha`` weighs the gradient, ``beta`` the Hessian diagonal: each paper's naming.)

Hessian-vector products are ``jax.jvp(jax.grad(f), (w,), (v,))`` (forward-over-reverse); no
Hessian is ever materialised. Hutchinson's ``S`` probes are ``jax.vmap``-ed.

The penalties depend on *all* parameters through the features fed to the head: the
transforms differentiate ``P(head(params), head_inputs(params))`` w.r.t. ``params``, third-order
derivatives included (``grad`` of ``jvp`` of ``grad``), as ``create_graph=True`` does in the
reference PyTorch code.

``detach_target``: the published DomainBed code treats the mean targets (``H g``, ``diag(H)``,
``g``) as constants (``.detach()``); its Colored MNIST scripts do not. Both are supported;
the default (``True``) is DomainBed's.

Usage as optax transforms (extra arguments are forwarded by :func:`optax.chain`)::

    tx = optax.chain(dgjax.hessian.hessian_gradient_product(alpha=1.0, beta=1.0),
                     optax.adam(1e-3))
    obj_fn = lambda head, d: cross_entropy(head_logits(head, d["z"]), d["y"])  # one domain
    head_inputs = lambda p: {"z": features(p, x), "y": y}                       # leaves [D, B, ...]
    updates, state = tx.update(mean_loss_grads, state, params,
                               obj_fn=obj_fn, head_inputs=head_inputs)

One clock: a weight schedule (``weight=lambda step: ...``) reads the extra argument ``step``
when the caller passes it (a train loop's step, e.g. dgjax's engine's ``TrainState.step``, as
every other schedule of dgjax reads it), else the transform's own count of its calls
(standalone optax use, where the loop keeps no step of its own). The probe key likewise comes
from the extra argument ``key`` when given, else from the state.

Gradient accumulation: the penalty is a nonlinear function of a batch's per-domain statistics,
and ``optax.MultiSteps`` hands its inner chain the accumulated incoming gradient together with
the extra arguments (``head_inputs``) of the last micro-batch only, so the penalty gradient would
come from that micro-batch alone. The transforms therefore refuse to run inside
``optax.MultiSteps`` (or :func:`dgjax.masks.accumulate_per_domain`) with an error. To accumulate,
differentiate the penalised objective per micro-batch and accumulate that with a plain
optimizer (README, "optax recipes")::

    objective = lambda p, b: loss(p, b) + w * hgp_penalty(obj_fn, p["classifier"], head_inputs(p, b))
    tx = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=k)   # grads: jax.grad(objective)

which averages ``loss_i + w * P_i`` over the micro-batches ``i`` (the penalty of each
micro-batch, as the transform computes it on that batch). ``optax.apply_if_finite`` around a
chain with these transforms works as usual (they keep the updates' shape).

:func:`hessian_difference_norm` is the paper's diagnostic ``max_{e,e'} ||H_e - H_e'||_2``
(the transfer-measure bound), by power iteration on Hessian-vector products.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from dgjax import masks
from dgjax.types import PyTree

ObjFn = Callable[[PyTree, PyTree], jax.Array]  # obj_fn(head_params, domain_inputs) -> scalar
HeadSpec = Union[str, Sequence[str], Callable[[PyTree], PyTree]]
Weight = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

DEFAULT_HEAD = "classifier"


# --------------------------------------------------------------------------- helpers
def head_selector(head: HeadSpec = DEFAULT_HEAD) -> Callable[[PyTree], PyTree]:
  """``params -> head params`` from a top-level key (``"classifier"``), a key path
  (``("classifier", "kernel")``) or a function of the parameters."""
  if callable(head):
    return head
  path = (head,) if isinstance(head, str) else tuple(head)

  def select(params):
    tree = params
    for depth, k in enumerate(path):
      if not isinstance(tree, Mapping) or k not in tree:
        have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        hint = (
          " (model.init returns {'params': ...}: pass its ['params'])"
          if isinstance(tree, Mapping) and list(tree) == ["params"]
          else ""
        )
        raise KeyError(
          f"head {path!r}: no key {k!r} at {path[:depth]!r} of the params; "
          f"found {have}{hint}. Point head= at the head's parameters."
        )
      tree = tree[k]
    return tree

  return select


def _domain_axis(tree: PyTree) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
  if len(sizes) != 1:
    raise ValueError(
      f"every leaf of the head inputs needs the same leading domain axis; got {sorted(sizes)}"
    )
  return sizes.pop()


def _tree_sq_norm(tree: PyTree) -> jax.Array:
  """Sum of squares over every leaf (per leading axis when ``axis0``)."""
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def _mean0(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _spread(per_domain: PyTree, target: PyTree) -> jax.Array:
  """``(1/E) sum_e ||x_e - target||^2`` for leaves ``[E, ...]`` and a target without ``E``."""
  e = jax.tree.leaves(per_domain)[0].shape[0]
  diff = jax.tree.map(lambda x, t: x - t[None], per_domain, target)
  return _tree_sq_norm(diff) / e


def hvp(f: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """Hessian-vector product ``H(params) v`` of the scalar ``f``, forward-over-reverse:
  ``jax.jvp(jax.grad(f), (params,), (v,))``."""
  return jax.jvp(jax.grad(f), (params,), (v,))[1]


def per_domain_head_grads(obj_fn: ObjFn, head: PyTree, inputs: PyTree) -> PyTree:
  """``g_e = grad_head obj_fn(head, inputs[e])``; leaves gain a leading ``E`` axis."""
  return jax.vmap(jax.grad(obj_fn), in_axes=(None, 0))(head, inputs)


def rademacher_like(key: jax.Array, tree: PyTree, num_samples: int) -> PyTree:
  """``num_samples`` Rademacher (+-1) draws shaped like ``tree`` (leading sample axis)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  draws = [
    jax.random.rademacher(k, (num_samples,) + x.shape, dtype=x.dtype) for k, x in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, draws)


def hutchinson_diagonal(
  f: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array, num_samples: int
) -> PyTree:
  """Hutchinson's estimate of ``diag(H)``: ``(1/S) sum_s z_s * (H z_s)``, ``z_s`` Rademacher,
  the ``S`` Hessian-vector products vmapped. Unbiased; the variance of entry ``i`` is
  ``sum_{j != i} H_ij^2 / S``."""
  z = rademacher_like(key, params, num_samples)
  hz = jax.vmap(lambda v: hvp(f, params, v))(z)
  return jax.tree.map(lambda a, b: jnp.mean(a * b, axis=0), z, hz)


# --------------------------------------------------------------------------- penalties
class AlignmentTerms(NamedTuple):
  """Unweighted terms of a Hessian-alignment penalty."""

  hessian: jax.Array  # the Hessian term (HGP: ||H_e g_e - H g||^2; Hutchinson/CMA: diagonals)
  gradient: jax.Array  # the gradient term ||g_e - g||^2 (mean over domains)


def hgp_terms(
  obj_fn: ObjFn, head: PyTree, inputs: PyTree, detach_target: bool = True
) -> AlignmentTerms:
  """HGP's terms ``(1/E) sum_e ||H_e g_e - H g||^2`` and ``(1/E) sum_e ||g_e - g||^2``.

  Args:
    obj_fn: ``obj_fn(head, domain_inputs) -> scalar``, one domain's loss.
    head: the head parameters (a pytree).
    inputs: pytree with leaves ``[E, ...]``; ``inputs[e]`` is what ``obj_fn`` gets for domain e.
    detach_target: treat ``H g`` and ``g`` as constants (DomainBed's code).
  """
  g = per_domain_head_grads(obj_fn, head, inputs)
  g_mean = _mean0(g)

  def domain_products(domain_inputs, g_e):
    f = lambda h: obj_fn(h, domain_inputs)
    tangents = jax.tree.map(lambda a, b: jnp.stack([a, b]), g_e, g_mean)
    return jax.vmap(lambda v: hvp(f, head, v))(tangents)  # [H_e g_e, H_e g]

  prods = jax.vmap(domain_products)(inputs, g)  # leaves [E, 2, ...]
  hg_e = jax.tree.map(lambda x: x[:, 0], prods)
  hg_target = jax.tree.map(lambda x: jnp.mean(x[:, 1], axis=0), prods)  # H g = mean_e H_e g
  g_target = g_mean
  if detach_target:
    hg_target, g_target = jax.lax.stop_gradient((hg_target, g_target))
  return AlignmentTerms(_spread(hg_e, hg_target), _spread(g, g_target))


def hutchinson_terms(
  obj_fn: ObjFn,
  head: PyTree,
  inputs: PyTree,
  key: jax.Array,
  num_samples: int = 100,
  detach_target: bool = True,
  independent_probes: bool = False,
) -> AlignmentTerms:
  """Hutchinson's terms ``(1/E) sum_e ||diag(H_e) - diag(H)||^2`` and ``(1/E) sum_e ||g_e - g||^2``.

  The diagonals are estimated with ``num_samples`` Rademacher probes. Shared probes (default)
  serve every domain, and ``diag(H)`` is the mean of the per-domain estimates (detaching it
  then changes nothing). ``independent_probes`` draws fresh probes for each domain and for
  ``diag(H)``, estimated from the Hessian of the mean loss, as the Hessian paper's DomainBed
  fork does (``calc_hessian_diag(..., repeat=300)`` per environment and for the mean).
  """
  g = per_domain_head_grads(obj_fn, head, inputs)
  if independent_probes:
    e = _domain_axis(inputs)
    keys = jax.random.split(key, e + 1)
    diag = jax.vmap(lambda d, k: hutchinson_diagonal(lambda h: obj_fn(h, d), head, k, num_samples))(
      inputs, keys[:e]
    )
    mean_obj = lambda h: jnp.mean(jax.vmap(lambda d: obj_fn(h, d))(inputs))
    diag_target = hutchinson_diagonal(mean_obj, head, keys[e], num_samples)
  else:
    diag = jax.vmap(lambda d: hutchinson_diagonal(lambda h: obj_fn(h, d), head, key, num_samples))(
      inputs
    )
    diag_target = _mean0(diag)
  g_target = _mean0(g)
  if detach_target:
    diag_target, g_target = jax.lax.stop_gradient((diag_target, g_target))
  return AlignmentTerms(_spread(diag, diag_target), _spread(g, g_target))


def split_linear_head(head: PyTree):
  """``(kernel, bias, rebuild)`` of a linear head ``logits = z @ kernel + bias``, whatever its
  leaves are named: exactly one 2-D leaf (the kernel ``[k, C]``) and at most one 1-D leaf (the
  bias ``[C]``; ``None`` when absent). ``rebuild(kernel_like, bias_like)`` puts two arrays of
  those shapes back in ``head``'s tree structure.

  Raises:
    ValueError when ``head`` is not such a head (naming its leaves and shapes).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(head)
  leaves = [x for _, x in flat]
  kernels = [i for i, x in enumerate(leaves) if jnp.ndim(x) == 2]
  biases = [i for i, x in enumerate(leaves) if jnp.ndim(x) == 1]
  if len(kernels) != 1 or len(biases) > 1 or len(kernels) + len(biases) != len(leaves):
    shapes = ", ".join(f"{jax.tree_util.keystr(p)}: {tuple(jnp.shape(x))}" for p, x in flat)
    raise ValueError(
      "CMA's closed forms need a linear head, logits = z @ kernel + bias: one 2-D leaf "
      f"(kernel [k, C]) and at most one 1-D leaf (bias [C]); got {{{shapes}}}. Point head= at "
      "the last linear layer (a key, a key path, or a function params -> {'kernel': W, "
      "'bias': b})."
      + (
        " A head with more than one layer is not linear in its input features; "
        "the layers before the last belong to the featurizer."
        if len(kernels) > 1
        else ""
      )
    )
  ki = kernels[0]
  bi = biases[0] if biases else None
  kernel = leaves[ki]
  bias = None if bi is None else leaves[bi]
  if bias is not None and jnp.shape(bias) != (kernel.shape[1],):
    raise ValueError(
      f"linear head: the bias {jax.tree_util.keystr(flat[bi][0])} has shape "
      f"{tuple(jnp.shape(bias))}, the kernel {jax.tree_util.keystr(flat[ki][0])} "
      f"{tuple(kernel.shape)} needs [C] = ({kernel.shape[1]},)"
    )

  def rebuild(kernel_like, bias_like):
    out = list(leaves)
    out[ki] = kernel_like
    if bi is not None:
      out[bi] = bias_like
    return jax.tree.unflatten(treedef, out)

  return kernel, bias, rebuild


def linear_head_moments(head: PyTree, z: jax.Array, y: jax.Array) -> tuple[PyTree, PyTree]:
  """Closed-form gradient and Hessian diagonal of the mean cross-entropy of a linear head.

  Args:
    head: a linear head ``logits = z @ kernel + bias``: ``{"kernel": [k, C], "bias": [C]}``, or
      any pytree with one 2-D leaf ``[k, C]`` and at most one 1-D leaf ``[C]``, whatever their
      names (:func:`split_linear_head`). A PyTorch/Equinox-style weight ``[C, k]`` goes in
      transposed.
    z: features ``[n, k]``; y: integer labels ``[n]`` (binary 0/1 when ``C == 1``: sigmoid).

  Returns:
    ``(grad, hess_diag)``, both shaped like ``head``:
    ``grad = {z^T (p - t) / n, mean(p - t)}``, ``hess_diag = {(z^2)^T p(1-p) / n, mean p(1-p)}``.
  """
  kernel, bias, rebuild = split_linear_head(head)
  if z.ndim != 2 or z.shape[-1] != kernel.shape[0]:
    raise ValueError(
      f"linear head: features z of shape {tuple(z.shape)} do not match the kernel "
      f"{tuple(kernel.shape)}; need z [n, k] with kernel [k, C] (logits = z @ kernel"
      " + bias). A weight stored as [C, k] (PyTorch, Equinox) goes in transposed: "
      "head=lambda p: {'kernel': W.T, 'bias': b}."
    )
  z = z.astype(kernel.dtype)
  logits = z @ kernel if bias is None else z @ kernel + bias
  n = z.shape[0]
  if kernel.shape[-1] == 1:
    p = jax.nn.sigmoid(logits)
    t = y.astype(p.dtype)[:, None]
  else:
    p = jax.nn.softmax(logits, axis=-1)
    t = jax.nn.one_hot(y, kernel.shape[-1], dtype=p.dtype)
  r = p - t
  curv = p * (1 - p)
  grad = rebuild(z.T @ r / n, jnp.mean(r, axis=0))
  hess = rebuild(jnp.square(z).T @ curv / n, jnp.mean(curv, axis=0))
  return grad, hess


def cma_terms(head: PyTree, inputs: PyTree) -> AlignmentTerms:
  """CMA's terms: across-domain variances of the closed-form head Hessian diagonal and
  gradient (``inputs = {"z": [E, n, k], "y": [E, n]}``; no HVPs, no sampling). ``head`` is any
  linear head (:func:`linear_head_moments`)."""
  grad, hess = jax.vmap(linear_head_moments, in_axes=(None, 0, 0))(head, inputs["z"], inputs["y"])
  return AlignmentTerms(_spread(hess, _mean0(hess)), _spread(grad, _mean0(grad)))


def hgp_penalty(
  obj_fn: ObjFn,
  head: PyTree,
  inputs: PyTree,
  alpha: float = 1.0,
  beta: float = 1.0,
  detach_target: bool = True,
) -> jax.Array:
  """HGP penalty ``(1/E) sum_e [alpha ||H_e g_e - H g||^2 + beta ||g_e - g||^2]``."""
  t = hgp_terms(obj_fn, head, inputs, detach_target)
  return alpha * t.hessian + beta * t.gradient


def hutchinson_penalty(
  obj_fn: ObjFn,
  head: PyTree,
  inputs: PyTree,
  key: jax.Array,
  num_samples: int = 100,
  alpha: float = 1.0,
  beta: float = 1.0,
  detach_target: bool = True,
) -> jax.Array:
  """Hutchinson penalty ``(1/E) sum_e [alpha ||diag(H_e) - diag(H)||^2 + beta ||g_e - g||^2]``."""
  t = hutchinson_terms(obj_fn, head, inputs, key, num_samples, detach_target)
  return alpha * t.hessian + beta * t.gradient


def cma_penalty(head: PyTree, inputs: PyTree, alpha: float = 1.0, beta: float = 1.0) -> jax.Array:
  """CMA penalty ``alpha * Var_e(grad) + beta * Var_e(diag Hessian)`` (closed forms)."""
  t = cma_terms(head, inputs)
  return alpha * t.gradient + beta * t.hessian


# --------------------------------------------------------------------------- diagnostic
def hessian_difference_norm(
  obj_fn: ObjFn, head: PyTree, inputs: PyTree, key: jax.Array, num_iters: int = 20
) -> jax.Array:
  """``max_{e < e'} ||H_e - H_e'||_2`` by power iteration on Hessian-vector products.

  The spectral norm of the symmetric ``A = H_e - H_e'`` is its largest ``|eigenvalue|``;
  ``num_iters`` steps of ``v <- A v / ||A v||`` from a random start, then ``||A v||``
  (a lower bound that converges to it). Hemati et al. (ICCV 2023, Thm. 3) bound the transfer
  measure by this quantity. All domain pairs are vmapped; no Hessian is materialised.
  """
  e = _domain_axis(inputs)
  if e < 2:
    return jnp.zeros((), jnp.float32)
  flat, unravel = ravel_pytree(head)
  pairs = jnp.array([(i, j) for i in range(e) for j in range(i + 1, e)], jnp.int32)

  def pair_norm(pair, k):
    di = jax.tree.map(lambda x: x[pair[0]], inputs)
    dj = jax.tree.map(lambda x: x[pair[1]], inputs)

    def a_times(v):
      t = unravel(v)
      hi = hvp(lambda h: obj_fn(h, di), head, t)
      hj = hvp(lambda h: obj_fn(h, dj), head, t)
      return ravel_pytree(hi)[0] - ravel_pytree(hj)[0]

    v0 = jax.random.normal(k, flat.shape, flat.dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def body(_, v):
      av = a_times(v)
      return av / jnp.maximum(jnp.linalg.norm(av), jnp.finfo(flat.dtype).tiny)

    v = jax.lax.fori_loop(0, num_iters, body, v0)
    return jnp.linalg.norm(a_times(v))

  keys = jax.random.split(key, pairs.shape[0])
  return jnp.max(jax.vmap(pair_norm)(pairs, keys))


# --------------------------------------------------------------------------- transforms
class HessianAlignmentState(NamedTuple):
  """State of the alignment transforms: the calls so far (``count``: the weight schedule's
  clock in standalone optax use, when no ``step`` is passed), the probe key, and the last
  penalty and its unweighted terms (for logging)."""

  count: jax.Array
  key: jax.Array
  penalty: jax.Array
  hessian_term: jax.Array
  gradient_term: jax.Array
  weight: jax.Array


def _resolve_weight(weight: Weight, count):
  return weight(count) if callable(weight) else weight


_ACCUMULATING_WRAPPERS = ("optax.MultiSteps", "dgjax.masks.accumulate_per_domain")


def _refuse_accumulation(name: str, penalty_name: str) -> None:
  """Refuse to run inside a gradient-accumulation wrapper (found on the call stack by
  :func:`dgjax.masks.enclosing_gradient_wrappers`), which would silently take the penalty from
  one micro-batch."""
  for wrapper in masks.enclosing_gradient_wrappers():
    if wrapper in _ACCUMULATING_WRAPPERS:
      raise ValueError(
        f"{name} cannot sit inside {wrapper}: the wrapper accumulates the gradients it is given "
        "over micro-batches but calls its inner chain with the extra arguments (head_inputs) of "
        "the last micro-batch only, so the penalty gradient would come from that micro-batch "
        "alone. Accumulate the penalised objective instead: per micro-batch, the gradient of "
        f"loss + weight * dgjax.hessian.{penalty_name}(...) into "
        "optax.MultiSteps(optax.adam(lr), every_k_schedule=k) (README, 'optax recipes')."
      )


def _alignment_transform(
  terms_fn, combine, weight: Weight, head: HeadSpec, random_seed, name: str, penalty_name: str
) -> optax.GradientTransformationExtraArgs:
  select = head_selector(head)

  def init_fn(params):
    del params
    if random_seed is None:
      key = jax.random.key(0)
    elif isinstance(random_seed, int):
      key = jax.random.key(random_seed)
    else:
      key = random_seed
    zero = jnp.zeros((), jnp.float32)
    return HessianAlignmentState(jnp.zeros((), jnp.int32), key, zero, zero, zero, zero)

  def update_fn(
    updates,
    state,
    params=None,
    *,
    obj_fn=None,
    head_inputs=None,
    key=None,
    step=None,
    **extra_args,
  ):
    del extra_args
    _refuse_accumulation(name, penalty_name)
    if params is None:
      raise ValueError("params must be given to a Hessian-alignment transform's update")
    if head_inputs is None:
      raise ValueError(
        "head_inputs must be given (extra argument): the head's per-domain inputs, "
        "or a function params -> inputs so that the penalty reaches the featurizer"
      )
    # ``key`` (extra argument, e.g. a train loop's per-step key) replaces the state's key.
    key, subkey = jax.random.split(state.key if key is None else key)

    def penalty_of(p):
      inputs = head_inputs(p) if callable(head_inputs) else head_inputs
      terms = terms_fn(obj_fn, select(p), inputs, subkey)
      return combine(terms), terms

    (penalty, terms), grads = jax.value_and_grad(penalty_of, has_aux=True)(params)
    # one clock: the caller's ``step`` (a train loop's, e.g. dgjax's engine) when given, else
    # the calls so far (standalone optax use)
    w = jnp.asarray(_resolve_weight(weight, state.count if step is None else step), jnp.float32)
    updates = jax.tree.map(lambda u, q: u + (w * q).astype(u.dtype), updates, grads)
    new_state = HessianAlignmentState(
      count=optax.safe_increment(state.count),
      key=key,
      penalty=penalty.astype(jnp.float32),
      hessian_term=terms.hessian.astype(jnp.float32),
      gradient_term=terms.gradient.astype(jnp.float32),
      weight=w,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _need_obj(obj_fn):
  if obj_fn is None:
    raise ValueError(
      "obj_fn must be given (extra argument): obj_fn(head_params, domain_inputs) -> loss"
    )
  return obj_fn


def hessian_gradient_product(
  alpha: float = 1.0,
  beta: float = 1.0,
  weight: Weight = 1.0,
  detach_target: bool = True,
  head: HeadSpec = DEFAULT_HEAD,
) -> optax.GradientTransformationExtraArgs:
  """HGP (Hemati et al., ICCV 2023) as a transform: ``updates + weight * grad_params P`` with
  ``P = (1/E) sum_e [alpha ||H_e g_e - H g||^2 + beta ||g_e - g||^2]`` on the head.

  Args:
    alpha: weight of the Hessian-gradient-product term.
    beta: weight of the gradient term.
    weight: penalty weight, a number or a schedule ``step -> weight``: ``step`` is the extra
      argument ``step`` when the caller passes it (a train loop's step: give it wherever a
      loop keeps one, so that every schedule reads the same clock), else the transform's own
      count of its calls (standalone optax use; the same numbers when the loop counts from 0).
    detach_target: treat ``H g`` and ``g`` as constants (DomainBed code; the CMNIST scripts don't).
    head: which parameters are the head (key, key path or function; default ``"classifier"``).

  ``update(updates, state, params, *, obj_fn, head_inputs, key=None, step=None)``:
  ``obj_fn(head, domain_inputs)`` is one domain's loss; ``head_inputs`` is a pytree with leaves ``[E, ...]`` or a function
  ``params -> that pytree`` (then the penalty's gradient reaches the featurizer).

  Refuses to run inside ``optax.MultiSteps``: for gradient accumulation differentiate
  ``loss + weight * hgp_penalty(...)`` per micro-batch instead (module docstring).
  """
  terms_fn = lambda obj, h, x, k: hgp_terms(_need_obj(obj), h, x, detach_target)
  return _alignment_transform(
    terms_fn,
    lambda t: alpha * t.hessian + beta * t.gradient,
    weight,
    head,
    None,
    "dgjax.hessian.hessian_gradient_product",
    "hgp_penalty",
  )


def hutchinson(
  alpha: float = 1.0,
  beta: float = 1.0,
  weight: Weight = 1.0,
  num_samples: int = 100,
  detach_target: bool = True,
  head: HeadSpec = DEFAULT_HEAD,
  random_seed: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Hutchinson alignment (Hemati et al., ICCV 2023) as a transform:
  ``updates + weight * grad_params P``,
  ``P = (1/E) sum_e [alpha ||diag(H_e) - diag(H)||^2 + beta ||g_e - g||^2]`` with the diagonals
  estimated from ``num_samples`` Rademacher probes (vmapped; a fresh key per step from the
  state, seeded by ``random_seed``, or from the optional extra argument ``key`` when given).
  Other arguments and extra arguments as :func:`hessian_gradient_product`; refuses
  ``optax.MultiSteps`` likewise (accumulate ``loss + weight * hutchinson_penalty(...)``).
  """
  terms_fn = lambda obj, h, x, k: hutchinson_terms(
    _need_obj(obj), h, x, k, num_samples, detach_target
  )
  return _alignment_transform(
    terms_fn,
    lambda t: alpha * t.hessian + beta * t.gradient,
    weight,
    head,
    random_seed,
    "dgjax.hessian.hutchinson",
    "hutchinson_penalty",
  )


def moment_alignment(
  alpha: float = 1.0, beta: float = 1.0, weight: Weight = 1.0, head: HeadSpec = DEFAULT_HEAD
) -> optax.GradientTransformationExtraArgs:
  """CMA (Chen et al., UAI 2025) as a transform: ``updates + weight * grad_params P`` with
  ``P = alpha Var_e(grad_head) + beta Var_e(diag Hessian_head)`` from the closed forms of a
  linear softmax/sigmoid head (:func:`linear_head_moments`).

  ``update(updates, state, params, *, head_inputs)`` with ``head_inputs = {"z": [E, n, k],
  "y": [E, n]}`` or a function of ``params`` returning it; ``obj_fn`` is accepted and unused.
  ``head`` selects any linear head: ``{"kernel", "bias"}`` or one 2-D leaf ``[k, C]`` and at
  most one 1-D leaf ``[C]`` by any names, or a function ``params -> head`` (e.g. to transpose
  a ``[C, k]`` weight); anything else raises (:func:`split_linear_head`). Refuses
  ``optax.MultiSteps`` like :func:`hessian_gradient_product` (accumulate
  ``loss + weight * cma_penalty(...)``).
  """
  terms_fn = lambda obj, h, x, k: cma_terms(h, x)
  return _alignment_transform(
    terms_fn,
    lambda t: alpha * t.gradient + beta * t.hessian,
    weight,
    head,
    None,
    "dgjax.hessian.moment_alignment",
    "cma_penalty",
  )
