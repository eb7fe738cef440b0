"""SWAD: dense weight averaging over an overfit-aware window (Cha et al., NeurIPS 2021).

SWAD averages the parameters of EVERY training step (not one per epoch, as SWA) between a
start and an end step read from a training-domain validation loss:
``theta_swad = 1 / (t_e - t_s + 1) * sum_{t = t_s}^{t_e} theta_t``. Here, in three parts:

* a pure, jittable averaging state for any JAX/optax loop, :class:`AverageState` with
  :func:`average_init`, :func:`average_update`, :func:`average_value`::

      avg = swad.average_init(params)
      for batch in batches:
        params, opt_state = train_step(params, opt_state, batch)
        avg = swad.average_update(avg, params)      # also inside a jitted step
      averaged_params = swad.average_value(avg)     # the mean of every params seen

* :class:`LossValley`, SWAD's window rule (the reference's ``LossValley``, khanrc/swad
  ``domainbed/swad.py``), fed at every evaluation with the segment's :class:`AverageState`
  (the steps since the last evaluation) and the current model's validation loss::

      valley = swad.LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
      segment = swad.average_init(params)
      for step in range(steps):
        params, opt_state = train_step(params, opt_state, next(batches))
        segment = swad.average_update(segment, params)
        if step % checkpoint_freq == 0:
          valley.update(segment, val_loss(params), end_step=step)
          segment = swad.average_init(params)
      swad_params = valley.final_params()

* :func:`update_bn`: BatchNorm statistics of averaged weights, recomputed by forward passes
  (the reference's ``swa_utils.update_bn``); the engine runs it before SWAD's final
  evaluation of a model whose BatchNorm trains (``freeze_bn=false``), as the reference.

The engine (:mod:`dgjax.train`, ``TrainConfig(swad=True)``, ``--swad``) keeps the segment's
sum in its train state (jitted, checkpointed) and, through :class:`SwadTracker`, feeds one
valley per run with DomainBed's training-domain validation loss
(:meth:`dgjax.tasks.DomainBedTask.val_loss`) and writes the averaged model's evaluation under
``swad_``-prefixed keys.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dgjax import core
from dgjax.types import PyTree


# ------------------------------------------------------------------- dense averaging
class AverageState(NamedTuple):
  """The running sum of the params seen and how many: their mean is ``total / count``."""

  total: PyTree
  count: jax.Array  # int32 scalar


def average_init(params: PyTree) -> AverageState:
  """An empty average shaped like ``params`` (nothing seen yet)."""
  return AverageState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))


def average_update(state: AverageState, params: PyTree) -> AverageState:
  """``state`` having also seen ``params`` (pure; jit, vmap and scan it)."""
  return AverageState(jax.tree.map(jnp.add, state.total, params), state.count + 1)


def average_reset(state: AverageState) -> AverageState:
  """An empty average shaped like ``state`` (keeps any leading runs axis)."""
  return AverageState(jax.tree.map(jnp.zeros_like, state.total), jnp.zeros_like(state.count))


def average_value(state: AverageState) -> PyTree:
  """The mean of the params seen (NaN where none were)."""
  return jax.tree.map(lambda t: t / state.count.astype(t.dtype), state.total)


# ------------------------------------------------------------------- the loss valley
@dataclasses.dataclass
class Segment:
  """The steps ``start_step..end_step`` between two evaluations: their params' sum (host
  arrays), how many, and the validation loss of the model at ``end_step``."""

  total: PyTree
  count: int
  start_step: int
  end_step: int
  val_loss: np.float32
  added: bool = False  # already in the average (the reference may add a segment twice)


class Window(NamedTuple):
  """A dense average over a window of steps: ``total / count`` are the averaged params."""

  total: PyTree
  count: int
  start_step: int
  end_step: int
  segments: int  # how many segments it spans

  def params(self) -> PyTree:
    return jax.tree.map(lambda t: (t / np.asarray(self.count, t.dtype)).astype(t.dtype), self.total)


def _host_tree(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


class LossValley:
  """SWAD's overfit-aware averaging window (the reference's ``LossValley``).

  Fed with one :class:`Segment` per evaluation (:meth:`update`: the segment's summed params
  and the validation loss of the model at its end), it decides, as the reference does:

  * **start**: the run has *converged* when, of the last ``n_converge`` segments, the oldest
    has the lowest validation loss (the first minimum on ties). That segment ``c`` fixes the
    threshold ``(1 + tolerance_ratio) * mean(those n_converge losses)``; averaging then starts
    at the segments of the tolerance window up to ``c`` that follow the last one above the
    threshold (``n_tolerance > n_converge``; the reference skips the first segment it could
    start at, and so do we), or with the ``n_converge - n_tolerance`` segments after ``c``
    (``n_tolerance < n_converge``), or at the next segment (equal sizes).
  * **growth**: at each later evaluation the oldest of the last ``n_tolerance`` segments joins
    the average once it ends no earlier than ``c``, while the minimum loss of those
    ``n_tolerance`` segments stays at or under the threshold;
  * **end**: the first time that minimum exceeds the threshold the valley is *dead*: the
    average is final (the reference stops training there; the engine trains on).
  * **at the end of training** (:meth:`final`): when not dead, the tolerance window's
    segments after its oldest join one by one, oldest first, while the minimum loss of those
    left is at or under the threshold (so a segment skipped at convergence may join here
    while it is still in the window, as in the reference).

  The reference running-averages the segments' averages (one weight per segment) and adds
  ``c`` twice (at convergence and when it becomes the oldest of the tolerance window);
  here each chosen segment's steps count once, as in the paper's dense average (the same
  numbers when the segments have equal length, as every segment after the first has in
  DomainBed's loop except a shorter last one). Before convergence there is no average;
  :meth:`final_params` then gives the last segment's, as the reference does.

  Losses are stored as float32 (the threshold too), so that a run resumed from a checkpoint
  (:meth:`state_dict` / :meth:`load_state_dict`) decides exactly as an uninterrupted one.

  Args:
    n_converge: the convergence window, in segments (SWAD's default 3).
    n_tolerance: the loss-smoothing window, in segments (default 6).
    tolerance_ratio: how far above the converged loss the valley may rise (default 0.3).
  """

  def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3):
    self.n_converge = _check_positive_int("n_converge", n_converge)
    self.n_tolerance = _check_positive_int("n_tolerance", n_tolerance)
    if isinstance(tolerance_ratio, bool) or not np.isfinite(tolerance_ratio) or tolerance_ratio < 0:
      raise ValueError(f"tolerance_ratio must be a finite number >= 0, got {tolerance_ratio!r}")
    self.tolerance_ratio = float(tolerance_ratio)
    self.slots = max(self.n_converge, self.n_tolerance)
    self.window: list[Segment] = []  # the last ``slots`` segments, oldest first
    self.converge_step: int | None = None
    self.threshold: np.float32 | None = None
    self.dead = False
    self._average: Window | None = None  # the segments added so far
    self._fallback = False  # _average is ``c`` itself, replaced by the first add

  @property
  def converged(self) -> bool:
    return self.converge_step is not None

  def update(self, segment: AverageState, val_loss: float, end_step: int) -> None:
    """Feeds the segment that ends at ``end_step`` (its steps are the ``segment.count``
    steps up to ``end_step``) and the validation loss of the model at ``end_step``."""
    count = int(jax.device_get(segment.count))
    if count < 1:
      raise ValueError(f"the segment ending at step {end_step} holds no params (count {count})")
    if not np.isfinite(val_loss):
      raise ValueError(f"validation loss at step {end_step} is {val_loss}")
    if self.window and end_step - count + 1 <= self.window[-1].end_step:
      raise ValueError(
        f"the segment of steps {end_step - count + 1}..{end_step} overlaps the "
        f"previous one (ending at step {self.window[-1].end_step})"
      )
    if self.dead:
      return
    self.window.append(
      Segment(
        _host_tree(segment.total),
        count,
        int(end_step) - count + 1,
        int(end_step),
        np.float32(val_loss),
      )
    )
    del self.window[: -self.slots]
    if not self.converged:
      self._try_converge()
      return
    smooth = self.window[-self.n_tolerance :]
    if smooth[0].end_step < self.converge_step:
      return
    if min(s.val_loss for s in smooth) > self.threshold:
      self.dead = True
      return
    self._add(smooth[0])

  def _try_converge(self) -> None:
    if len(self.window) < self.n_converge:
      return
    converge = self.window[-self.n_converge :]
    losses = [s.val_loss for s in converge]
    if int(np.argmin(losses)) != 0:
      return
    c = converge[0]
    self.converge_step = c.end_step
    self.threshold = np.float32(
      np.mean(np.asarray(losses, np.float64)) * (1.0 + self.tolerance_ratio)
    )
    self._average = Window(c.total, c.count, c.start_step, c.end_step, 1)
    self._fallback = True
    if self.n_tolerance < self.n_converge:
      for s in converge[1 : 1 + self.n_converge - self.n_tolerance]:
        self._add(s)
    elif self.n_tolerance > self.n_converge:
      before = self.window[-self.n_tolerance :][: self.n_tolerance - self.n_converge + 1]
      start = 0
      for i in range(len(before) - 1, -1, -1):
        if before[i].val_loss > self.threshold:
          start = i + 1
          break
      for s in before[start + 1 :]:
        self._add(s)

  def _add(self, s: Segment) -> None:
    self._average, self._fallback = self._joined(self._average, self._fallback, s)
    s.added = True

  @staticmethod
  def _joined(average: Window, fallback: bool, s: Segment) -> tuple[Window, bool]:
    if s.added:
      return average, fallback
    if fallback:
      return Window(s.total, s.count, s.start_step, s.end_step, 1), False
    return Window(
      jax.tree.map(np.add, average.total, s.total),
      average.count + s.count,
      min(average.start_step, s.start_step),
      max(average.end_step, s.end_step),
      average.segments + 1,
    ), False

  def final(self) -> Window | None:
    """The average if training ended now (``None`` before convergence); the valley itself
    is unchanged, so this may be asked at every evaluation."""
    if not self.converged:
      return None
    average, fallback = self._average, self._fallback
    if not self.dead:
      tail = self.window[-self.n_tolerance :][1:]
      while tail and min(s.val_loss for s in tail) <= self.threshold:
        average, fallback = self._joined(average, fallback, tail.pop(0))
    return average

  def final_params(self) -> PyTree:
    """The averaged params if training ended now; before convergence, the last segment's
    average (the reference's fallback)."""
    window = self.final()
    if window is not None:
      return window.params()
    if not self.window:
      raise ValueError("the loss valley has seen no segment yet")
    last = self.window[-1]
    return Window(last.total, last.count, last.start_step, last.end_step, 1).params()

  # -------------------------------------------------------------- checkpoints
  def state_dict(self, params_like: PyTree) -> dict[str, Any]:
    """The valley as a tree of fixed-shape arrays (``slots`` segments, padded), for a
    checkpoint; ``params_like`` gives the params' shapes when no segment was seen yet."""
    like = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), params_like)
    segs = self.window + [None] * (self.slots - len(self.window))
    totals = [like if s is None else s.total for s in segs]
    ints = lambda f: np.array([0 if s is None else f(s) for s in segs], np.int32)  # noqa: E731
    avg = self._average
    return {
      "totals": jax.tree.map(lambda *xs: np.stack(xs), *totals),
      "counts": ints(lambda s: s.count),
      "start_steps": ints(lambda s: s.start_step),
      "end_steps": ints(lambda s: s.end_step),
      "added": ints(lambda s: s.added),
      "val_losses": np.array([0 if s is None else s.val_loss for s in segs], np.float32),
      "n_segments": np.int32(len(self.window)),
      "average_total": like if avg is None else avg.total,
      "average": np.array(
        [0, 0, 0, 0] if avg is None else [avg.count, avg.start_step, avg.end_step, avg.segments],
        np.int32,
      ),
      "flags": np.array([self.converged, self.dead, self._fallback], np.int32),
      "converge_step": np.int32(-1 if self.converge_step is None else self.converge_step),
      "threshold": np.float32(0 if self.threshold is None else self.threshold),
    }

  def load_state_dict(self, tree: Mapping[str, Any]) -> None:
    """Restores the valley written by :meth:`state_dict`."""
    tree = jax.tree.map(np.asarray, jax.device_get(dict(tree)))
    n = int(tree["n_segments"])
    self.window = [
      Segment(
        jax.tree.map(lambda t, i=i: t[i].copy(), tree["totals"]),
        int(tree["counts"][i]),
        int(tree["start_steps"][i]),
        int(tree["end_steps"][i]),
        np.float32(tree["val_losses"][i]),
        bool(tree["added"][i]),
      )
      for i in range(n)
    ]
    converged, dead, fallback = (bool(v) for v in tree["flags"])
    self.converge_step = int(tree["converge_step"]) if converged else None
    self.threshold = np.float32(tree["threshold"]) if converged else None
    self.dead, self._fallback = dead, fallback
    count, start, end, segments = (int(v) for v in tree["average"])
    self._average = (
      Window(jax.tree.map(np.array, tree["average_total"]), count, start, end, segments)
      if converged
      else None
    )


# ------------------------------------------------------------------- the engine's glue
class SwadTracker:
  """The engine's SWAD for K runs: one :class:`LossValley` per run.

  At each evaluation :meth:`evaluate` closes run ``k``'s segment (the dense sum the jitted
  step accumulated since the last evaluation), computes the current model's training-domain
  validation loss with ``task.val_loss``, feeds the valley and, once averaging has started,
  scores the averaged params with ``task.evaluate`` (the method's current state alongside).
  Its record keys: ``val_loss``, ``swad_active`` (averaging has started), ``swad_dead`` (the
  window is closed), ``swad_segments``, ``swad_start_step``, ``swad_end_step``,
  ``swad_val_loss`` and the task's keys prefixed ``swad_`` (``swad_env0_in_acc``, ...).
  """

  def __init__(
    self, k_runs: int, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3
  ):
    self.valleys = [LossValley(n_converge, n_tolerance, tolerance_ratio) for _ in range(k_runs)]

  def evaluate(
    self,
    k: int,
    step: int,
    segment: AverageState,
    model_state: Any,
    task,
    predict: Callable,
    mesh=None,
    bn_batches: Callable[[], Iterable[Any]] | None = None,
  ) -> dict[str, Any]:
    """Feeds run ``k``'s segment and validation loss to its valley; evaluates the window's
    average once it is closed. ``mesh``: evaluate sharded over it (tasks that take one).

    ``model_state`` is ``(params, method state)``; the average is evaluated with the method
    state's variables. A model whose BatchNorm trains (its ``batch_norm_momentum`` is set:
    DomainBed's ``freeze_bn=false``) has no running statistics for the averaged weights:
    its average is evaluated only when ``bn_batches()`` gives training inputs, after
    :func:`update_bn` recomputes the statistics over them (the reference does so once,
    before its final evaluation; the engine passes them at the last step); records without
    them carry the window but not its scores."""
    t0 = time.perf_counter()
    val_loss = task.val_loss(model_state, predict, mesh=mesh)
    valley = self.valleys[k]
    valley.update(segment, val_loss, step)
    window = valley.final()
    record: dict[str, Any] = {
      "val_loss": val_loss,
      "swad_active": window is not None,
      "swad_dead": valley.dead,
      "swad_segments": 0 if window is None else window.segments,
    }
    if window is None:
      return record
    record.update(swad_start_step=window.start_step, swad_end_step=window.end_step)
    averaged = (jax.tree.map(jnp.asarray, window.params()), *model_state[1:])
    if core.batch_norm_momentum(task.model) is not None:  # BatchNorm trains
      if bn_batches is None:
        return record
      averaged = with_batch_norm_recomputed(task.model, averaged, bn_batches())
    record["swad_val_loss"] = task.val_loss(averaged, predict, mesh=mesh)
    record.update(
      {f"swad_{n}": v for n, v in task.evaluate(averaged, k, predict, step=step, mesh=mesh).items()}
    )
    record["swad_eval_time"] = time.perf_counter() - t0
    return record

  def state_dict(self, k: int, params_like: PyTree) -> dict[str, Any]:
    return jax.tree.map(jnp.asarray, self.valleys[k].state_dict(params_like))

  def load_state_dict(self, k: int, tree: Mapping[str, Any]) -> None:
    self.valleys[k].load_state_dict(tree)


# ------------------------------------------------------------------- BatchNorm
#: How many training batches :func:`update_bn` reads for the engine's final SWAD evaluation
#: (the reference's ``update_bn`` over 500 steps of the training iterator).
BN_UPDATE_BATCHES = 500


def _new_statistic_weight(module, args, kwargs) -> float | None:
  """The weight of the batch statistic in this BatchNorm call's running update, ``None``
  when the call does not train it (frozen, or evaluation mode)."""
  import flax.linen as nn
  from dgjax import resnet

  if isinstance(module, resnet.BatchNorm):  # torch's rule: r <- (1 - m) r + m s
    train = kwargs.get("train", args[1] if len(args) > 1 else False)
    return None if module.frozen or not train else float(module.momentum)
  if isinstance(module, nn.BatchNorm):  # flax's: r <- m r + (1 - m) s
    frozen = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    if module.use_running_average if frozen is None else frozen:
      return None
    return 1.0 - float(module.momentum)
  return None


def with_batch_norm_recomputed(model, model_state: tuple, inputs: Iterable[Any]) -> tuple:
  """``(params, method state)`` with the method state's ``batch_stats`` (its ``variables``,
  :class:`dgjax.core.StepState`) recomputed for ``params`` by :func:`update_bn` over
  ``inputs`` (the featurizer in training mode, where every BatchNorm sits)."""
  params, method_state = model_state[:2]
  variables = update_bn(
    model,
    {"params": params, **method_state.variables},
    inputs,
    method="features",
    train=True,
    rngs={"dropout": jax.random.key(0)},
  )
  del variables["params"]
  return (params, method_state._replace(variables=variables), *model_state[2:])


def update_bn(
  model, variables: Mapping[str, Any], batches: Iterable[Any], **apply_kwargs: Any
) -> dict[str, Any]:
  """``variables`` with ``batch_stats`` recomputed for their params by forward passes, as
  the reference's ``swa_utils.update_bn`` (khanrc/swad; torch's ``update_bn``): every
  BatchNorm's statistics reset, then with ``momentum=None`` (a cumulative average) one
  training-mode forward per batch, so each running statistic becomes the mean over
  ``batches`` of the statistic of each batch, one weight per batch. For dgjax's
  :class:`dgjax.resnet.BatchNorm` (torch's) the variance is the batch's unbiased one, as
  torch keeps it; for ``flax.linen.BatchNorm`` flax's biased one.

  Each batch runs ``model.apply(variables, x, mutable=["batch_stats"], **apply_kwargs)``
  (one jitted function); ``apply_kwargs`` must put the BatchNorms in training mode
  (``train=True`` for dgjax's models) and may name a ``method`` or give ``rngs`` (the same
  for every batch: a dropout after the last BatchNorm, as the ResNets', does not change
  the statistics). Every ``batch_stats`` leaf must belong to a BatchNorm called in training
  mode (an unfrozen dgjax BatchNorm, or a ``flax.linen.BatchNorm``).

  No-op (``variables`` returned as given) without ``batch_stats``: dgjax's MNIST networks
  use GroupNorm. The engine calls it (:meth:`SwadTracker.evaluate`) for SWAD's final
  evaluation of a ResNet whose BatchNorm trains (DomainBed's ``freeze_bn=false``), over the
  :data:`BN_UPDATE_BATCHES` training batches the run would draw next; frozen BatchNorm
  (``freeze_bn=true``, SWAD's default) keeps the statistics of the weights file.
  """
  import flax.linen as nn
  from flax import traverse_util

  if "batch_stats" not in variables:
    return dict(variables)
  weights: dict[tuple[str, ...], float | None] = {}

  def record_weight(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      weight = _new_statistic_weight(context.module, args, kwargs)
      if weight is not None or tuple(context.module.scope.path) not in weights:
        weights[tuple(context.module.scope.path)] = weight
    return next_fun(*args, **kwargs)

  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])

  @jax.jit
  def batch_statistics(x):  # from zero statistics, each stores weight * its batch statistic
    with nn.intercept_methods(record_weight):  # runs while tracing: fills ``weights``
      _, mutated = model.apply(
        {**variables, "batch_stats": zeros}, x, mutable=["batch_stats"], **apply_kwargs
      )
    flat = traverse_util.flatten_dict(mutated["batch_stats"])
    for path in flat:
      weight = weights.get(path[:-1])
      if weight is None:
        raise ValueError(
          f"batch_stats leaf {'/'.join(path)} does not belong to a BatchNorm "
          "called in training mode: pass the apply kwargs that put it there "
          "(train=True; an unfrozen BatchNorm)"
        )
      if weight == 0.0:
        raise ValueError(
          f"BatchNorm {'/'.join(path[:-1])} never updates its statistics "
          "(momentum 0 for dgjax's, 1 for flax's)"
        )
    return traverse_util.unflatten_dict({p: v / weights[p[:-1]] for p, v in flat.items()})

  total, n = None, 0
  for x in batches:
    stats = batch_statistics(x)
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    n += 1
  if n == 0:
    raise ValueError("update_bn needs at least one batch")
  return {**variables, "batch_stats": jax.tree.map(lambda t: t / n, total)}
