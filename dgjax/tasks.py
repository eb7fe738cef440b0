"""Tasks: what the engine (:mod:`dgjax.train`) trains on and how it evaluates.

A task supplies the model, the training data (device arrays the jitted step reads), how one
step's batch is drawn from it (inside ``jit``), the initial parameters and ``evaluate``. The
engine owns everything else: the method's step, the runs axis, checkpoints, records, progress.

* :class:`DomainBedTask`: DomainBed's protocol. Each step draws ``batch_size`` examples per
  training environment, uniformly with replacement (``InfiniteDataLoader``); each evaluation
  scores every environment's in and out split (``env{i}_in_acc``, ``env{i}_out_acc``).
* The IRM-style Colored MNIST benchmark is a task too (:class:`dgjax.irm_benchmark.IRMTask`):
  full batch, per-run data, its own evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgjax import sharding
from dgjax.losses import cross_entropy
from dgjax.task import TaskBase, arrays_fingerprint


@dataclasses.dataclass
class Split:
  """One evaluation split of one environment."""

  name: str  # e.g. "env0_in"
  x: np.ndarray
  y: np.ndarray


class TrainData(NamedTuple):
  """The training environments' in-splits concatenated: env ``d`` is
  ``x[offsets[d] : offsets[d] + sizes[d]]``."""

  x: jax.Array
  y: jax.Array
  offsets: jax.Array
  sizes: jax.Array


def make_train_data(envs_xy: Sequence[tuple[np.ndarray, np.ndarray]]) -> TrainData:
  sizes = np.array([len(y) for _, y in envs_xy], np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  return TrainData(
    x=jnp.asarray(np.concatenate([x for x, _ in envs_xy])),
    y=jnp.asarray(np.concatenate([y for _, y in envs_xy])),
    offsets=jnp.asarray(offsets),
    sizes=jnp.asarray(sizes),
  )


def sample_batch(key: jax.Array, data: TrainData, batch_size: int) -> dict[str, jax.Array]:
  """``batch_size`` indices per environment, uniform with replacement: leaves ``[D, B, ...]``."""
  d = data.offsets.shape[0]
  idx = data.offsets[:, None] + jax.random.randint(key, (d, batch_size), 0, data.sizes[:, None])
  return {"x": data.x[idx], "y": data.y[idx]}


def eval_chunk_size(
  split_sizes: Sequence[int], eval_batch_size: int, mesh=None, smallest: int | None = None
) -> int:
  """One chunk size for every split of a task, so one evaluation program serves them all:
  the size in ``[smallest, eval_batch_size]`` (``smallest`` by default
  ``eval_batch_size / 2``; a multiple of 8 when
  ``eval_batch_size >= 64``; rounded up to a multiple of ``mesh``'s device count) that pads the splits, each cut into whole chunks, with the fewest
  rows (the largest on a tie); smaller when every split is. E.g. DomainBed's Colored MNIST on
  10,000 digits (splits of 2668, 2667 and 666 examples) with 1000: 672, 0.8% padding where a
  1000-chunk with 128-rounded tails pads 6%. :class:`DomainBedTask` passes ``smallest =``
  :data:`CPU_EVAL_SUB_BATCH` where it evaluates in sub-batches (a small chunk then costs no
  speed): the first 2,000 digits (splits of 534 and 133) get 136, 2% padding, not 536, 61%."""
  sizes = [int(n) for n in split_sizes if n > 0]
  if not sizes:
    return sharding.round_up_to_devices(max(1, eval_batch_size), mesh)
  step = 8 if eval_batch_size >= 64 else 1
  hi = min(eval_batch_size, -(-max(sizes) // step) * step)
  floor = eval_batch_size // 2 if smallest is None else smallest
  lo = min(-(-max(1, floor) // step) * step, hi)
  candidates = {sharding.round_up_to_devices(c, mesh) for c in (*range(lo, hi + 1, step), hi)}

  def padded(c):
    return sum(-(-n // c) * c for n in sizes)

  return min(candidates, key=lambda c: (padded(c), -c))


#: Examples per sub-batch when :class:`DomainBedTask` evaluates a :func:`per_example` predict
#: on CPU (:func:`in_sub_batches`). MNIST_CNN's forward pass, ms per example by chunk size
#: (one thread / two; ``bench/eval_chunks.py``, ``bench/RESULTS.md``, "Evaluation in
#: sub-batches"): 32: 1.76 / 1.16, 64: 1.81 / 1.19, 136: 1.99 / 1.30, 672: 2.56 / 1.71; a
#: 672-chunk in sub-batches of 64: 1.80 / 1.15 (of 32: 1.80 / 1.12, of 128: 1.92 / 1.23).
CPU_EVAL_SUB_BATCH = 64


def per_example(predict):
  """Marks ``predict(model_state, x) -> logits`` as treating the examples of ``x``
  independently (an example's logits do not depend on the rest of the batch), so a task may
  evaluate it in sub-batches of its choosing. The engine marks a method's plain prediction
  (the network; not ARM's or MTL's, which adapt to the evaluated batch)."""
  predict.per_example = True
  return predict


def in_sub_batches(predict, size: int):
  """``predict`` over ``x`` in sub-batches of ``size`` examples inside one program
  (``jax.lax.map`` with ``batch_size``; a last partial sub-batch included): the same logits up
  to float rounding, for a :func:`per_example` ``predict``. On XLA:CPU a large chunk runs
  faster this way (the activations of a sub-batch stay in cache: :data:`CPU_EVAL_SUB_BATCH`)."""

  def sub_batched(model_state, x):
    if x.shape[0] <= size:
      return predict(model_state, x)
    return jax.lax.map(lambda xe: predict(model_state, xe[None])[0], x, batch_size=size)

  return sub_batched


def _cpu_sub_batched(predict, mesh=None):
  """``predict`` in sub-batches of :data:`CPU_EVAL_SUB_BATCH` on CPU when it is
  :func:`per_example` and the chunk is not split over a ``mesh``; else ``predict`` itself."""
  if getattr(predict, "per_example", False) and jax.default_backend() == "cpu" and mesh is None:
    return in_sub_batches(predict, CPU_EVAL_SUB_BATCH)
  return predict


def _chunked_sum(fn, params, x, y, eval_batch_size: int, mesh=None, fixed_shape=False) -> float:
  """``sum_chunks fn(params, x_chunk, y_chunk, valid)`` over host arrays, in chunks of
  ``eval_batch_size``; a last partial chunk is padded and masked by ``valid``: to
  ``eval_batch_size`` with ``fixed_shape`` (one compiled shape), else to a multiple of 128
  (so few shapes compile).

  With a ``mesh`` (``fn`` from :func:`dgjax.sharding.jit_eval`, ``params`` on the mesh) each
  chunk is split over all its devices: ``eval_batch_size`` and the padded tail are rounded up
  to a multiple of the device count (more padding, still masked), and each process puts its
  rows of the chunk (every process holds all of ``x`` and ``y``)."""
  eval_batch_size = sharding.round_up_to_devices(eval_batch_size, mesh)
  total = 0.0
  for start in range(0, len(y), eval_batch_size):
    xb, yb = x[start : start + eval_batch_size], y[start : start + eval_batch_size]
    m = len(yb)
    size = (
      eval_batch_size
      if fixed_shape
      else min(eval_batch_size, sharding.round_up_to_devices(-(-m // 128) * 128, mesh))
    )
    if m < size:
      xb = np.concatenate([xb, np.zeros((size - m,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((size - m,), yb.dtype)])
    batch = (xb, yb, np.arange(size) < m)
    if mesh is not None:
      rows = sharding.process_rows(mesh, size)
      batch = sharding.put_eval_batch(tuple(a[rows] for a in batch), mesh, size)
    total += float(fn(params, *batch))
  return total


def make_accuracy_fn(predict, eval_batch_size: int = 1000, mesh=None, *, fixed_shape=False):
  """``accuracy(model_state, x, y) -> float``: argmax accuracy (a single logit: ``> 0``) of
  ``predict(model_state, x) -> logits``, in jitted chunks of ``eval_batch_size`` (a last
  partial chunk is padded and masked: to ``eval_batch_size`` with ``fixed_shape``, so one
  program serves every split, else to a multiple of 128, so few shapes compile).

  With a ``mesh`` every chunk is split over its devices (``eval_batch_size`` rounded up to a
  multiple of the device count; see :func:`_chunked_sum`) and the model state is replicated
  on it; the count of correct examples, hence the accuracy, is that of the unsharded run."""

  def correct(params, x, y, valid):
    logits = predict(params, x)
    if logits.shape[-1] == 1:
      pred = (logits[..., 0] > 0).astype(y.dtype)
    else:
      pred = jnp.argmax(logits, -1).astype(y.dtype)
    return jnp.sum((pred == y) & valid)

  correct = sharding.jit_eval(correct, mesh)

  def accuracy(params, x, y):
    params = params if mesh is None else sharding.on_mesh(params, mesh)
    total = _chunked_sum(correct, params, x, y, eval_batch_size, mesh, fixed_shape)
    return total / max(len(y), 1)

  accuracy.correct = correct  # the jitted chunk function (tests inspect its shardings)
  return accuracy


def make_loss_fn(predict, eval_batch_size: int = 1000, mesh=None, *, fixed_shape=False):
  """``loss(model_state, x, y) -> float``: the mean cross-entropy (:func:`dgjax.losses.cross_entropy`,
  per example) of ``predict(model_state, x) -> logits``, chunked, padded and (with a
  ``mesh``) sharded as :func:`make_accuracy_fn` (up to float summation order)."""

  def loss_sum(params, x, y, valid):
    logits = predict(params, x)
    per_example = jax.vmap(lambda l, t: cross_entropy(l[None], t[None]))(logits, y)
    return jnp.sum(jnp.where(valid, per_example, 0.0))

  loss_sum = sharding.jit_eval(loss_sum, mesh)

  def loss(params, x, y):
    params = params if mesh is None else sharding.on_mesh(params, mesh)
    return _chunked_sum(loss_sum, params, x, y, eval_batch_size, mesh, fixed_shape) / len(y)

  loss.loss_sum = loss_sum  # the jitted chunk function (image tasks feed it their own batches)
  return loss


class DomainBedTask(TaskBase):
  """DomainBed's training and evaluation protocol on in-memory environments.

  Args:
    model: a flax classifier (``features`` / ``head`` methods, ``featurizer`` / ``classifier``
      params).
    splits_in, splits_out: per environment (index = environment), its in and out splits.
    test_envs: environments not trained on.
    eval_batch_size: at most this many examples per jitted evaluation chunk: every split is
      cut into chunks of one size (:func:`eval_chunk_size`; with a mesh, a multiple of its
      device count), the last padded and masked, so one program evaluates them all.
  """

  has_val_loss = True

  def __init__(
    self,
    model,
    splits_in: Sequence[Split],
    splits_out: Sequence[Split],
    test_envs: Sequence[int],
    eval_batch_size: int = 1000,
  ):
    n = len(splits_in)
    bad = [e for e in test_envs if not 0 <= e < n]
    if bad:
      raise ValueError(f"test_envs {bad} out of range: there are {n} environments (0..{n - 1})")
    self.model = model
    self.splits_in, self.splits_out = list(splits_in), list(splits_out)
    self.test_envs = tuple(test_envs)
    self.train_envs = [e for e in range(n) if e not in self.test_envs]
    if not self.train_envs:
      raise ValueError("every environment is a test environment: nothing to train on")
    empty = [self.splits_in[e].name for e in self.train_envs if len(self.splits_in[e].y) == 0]
    if empty:
      raise ValueError(f"training split(s) {empty} hold no examples")
    self.num_domains = len(self.train_envs)
    self.variables: Mapping[str, Any] = self._initial_variables()
    self.data = make_train_data(
      [(self.splits_in[e].x, self.splits_in[e].y) for e in self.train_envs]
    )
    self._min_train = min(len(self.splits_in[e].y) for e in self.train_envs)
    self._eval_batch_size = eval_batch_size
    self._accuracy = {}
    self._loss = {}

  def _initial_variables(self) -> Mapping[str, Any]:
    """The model's collections other than ``params`` (BatchNorm's running statistics, e.g. a
    Wide-ResNet's), as initialised; ``{}`` for models without any. Only models that take
    ``train`` (:class:`dgjax.core.Context`: the backbones) can have them."""
    if not getattr(self.model, "takes_train", False):
      return {}
    x0 = jnp.asarray(self.splits_in[self.train_envs[0]].x[:1])
    if set(jax.eval_shape(lambda: self.model.init(jax.random.key(0), x0))) <= {"params"}:
      return {}
    variables = jax.jit(self.model.init)(jax.random.key(0), x0)
    return {k: v for k, v in variables.items() if k != "params"}

  def init_params(self, key):
    return self.model.init(key, jnp.asarray(self.splits_in[self.train_envs[0]].x[:1]))["params"]

  def batch(self, data, key, batch_size):
    return sample_batch(key, data, batch_size)

  def epoch(self, step: int, batch_size: int) -> float:
    return step * batch_size / self._min_train

  def evaluate(
    self, model_state, run: int, predict, *, step: int = 0, mesh=None
  ) -> dict[str, float]:
    """Accuracy of ``predict(model_state, x)`` on every environment's in and out split; with
    a ``("domain", "data")`` ``mesh``, each chunk split over all its devices
    (:func:`make_accuracy_fn`)."""
    del run, step
    accuracy = self._accuracy_fn(predict, mesh)
    if mesh is not None:  # replicated once for all the splits
      model_state = sharding.on_mesh(model_state, mesh)
    out = {}
    for e in range(len(self.splits_in)):
      out[f"env{e}_in_acc"] = accuracy(model_state, self.splits_in[e].x, self.splits_in[e].y)
      out[f"env{e}_out_acc"] = accuracy(model_state, self.splits_out[e].x, self.splits_out[e].y)
    return out

  def _chunk_size(self, mesh=None, sub_batched: bool = False) -> int:
    """The one evaluation chunk size of every split (:func:`eval_chunk_size`); down to
    :data:`CPU_EVAL_SUB_BATCH` for a ``sub_batched`` prediction."""
    sizes = [len(s.y) for s in self.splits_in + self.splits_out]
    smallest = CPU_EVAL_SUB_BATCH if sub_batched else None
    return eval_chunk_size(sizes, self._eval_batch_size, mesh, smallest)

  def _evaluated(self, predict, mesh=None):
    """``(fn, chunk)``: ``predict`` as evaluated (in sub-batches where
    :func:`_cpu_sub_batched` says) and the chunk size that goes with it."""
    fn = _cpu_sub_batched(predict, mesh)
    return fn, self._chunk_size(mesh, sub_batched=fn is not predict)

  def _accuracy_fn(self, predict, mesh=None):
    if (predict, mesh) not in self._accuracy:
      fn, chunk = self._evaluated(predict, mesh)
      self._accuracy[predict, mesh] = make_accuracy_fn(fn, chunk, mesh, fixed_shape=True)
    return self._accuracy[predict, mesh]

  def val_loss(self, model_state, predict, *, mesh=None) -> float:
    """The training-domain validation loss SWAD reads (:mod:`dgjax.swad`; the reference's
    ``tr_outloss``): the mean cross-entropy of ``predict(model_state, x)`` on each training
    environment's out-split, averaged over the training environments. ``mesh``: as in
    :meth:`evaluate` (equal up to float summation order)."""
    empty = [self.splits_out[e].name for e in self.train_envs if len(self.splits_out[e].y) == 0]
    if empty:
      raise ValueError(
        f"no training-domain validation data: out-split(s) {empty} hold no "
        "examples (holdout_fraction must be > 0)"
      )
    if (predict, mesh) not in self._loss:
      fn, chunk = self._evaluated(predict, mesh)
      self._loss[predict, mesh] = make_loss_fn(fn, chunk, mesh, fixed_shape=True)
    loss = self._loss[predict, mesh]
    if mesh is not None:
      model_state = sharding.on_mesh(model_state, mesh)
    return float(
      np.mean(
        [loss(model_state, self.splits_out[e].x, self.splits_out[e].y) for e in self.train_envs]
      )
    )

  def progress_numbers(self, record: Mapping[str, Any]) -> dict[str, float]:
    test = np.mean([record[f"env{e}_in_acc"] for e in self.test_envs])
    return {"loss": record["loss"], "test_acc": float(test)}

  def data_fingerprint(self) -> str:
    """A digest of every environment's in and out splits (inputs and labels)."""
    splits = self.splits_in + self.splits_out
    n = sum(len(s.y) for s in splits)
    return arrays_fingerprint(
      (a for s in splits for a in (s.x, s.y)), f"{n} examples in {len(self.splits_in)} environments"
    )
