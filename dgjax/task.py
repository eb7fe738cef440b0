"""The task protocol: every member the engine (:mod:`dgjax.train`) reads from a task.

A task supplies the model, the training data and how one step's batch is drawn from it
(inside ``jit``), the initial parameters and the evaluation; the engine owns the rest (the
method's step, the runs axis, checkpoints, records, progress). The engine calls these
members and nothing else, without probing: a task implements all of them, most by
inheriting :class:`TaskBase`'s defaults (:class:`dgjax.tasks.DomainBedTask`,
:class:`dgjax.image_task.ImageTask`, :class:`dgjax.irm_benchmark.IRMTask`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import jax

from dgjax.types import PyTree


@runtime_checkable
class Task(Protocol):
  """What the engine trains on.

  Attributes:
    model: the flax model the method's step applies.
    num_domains: training domains per batch (the leading ``D`` of ``[D, B, ...]``).
    variables: the model's non-param collections at the start (e.g. ``batch_stats``).
    per_run_data: ``data`` has a leading runs axis (run ``k`` trains on ``data[k]``).
    streams: the batches come from :meth:`stream` (one per step), not from ``data``.
    data: the device-resident training data :meth:`batch` reads (``None`` when streaming).
    has_val_loss: :meth:`val_loss` is defined (SWAD needs it; checked before training).
  """

  model: Any
  num_domains: int
  variables: Mapping[str, Any]
  per_run_data: bool
  streams: bool
  data: Any
  has_val_loss: bool

  def init_params(self, key: jax.Array) -> PyTree:
    """A run's initial params, drawn from ``key``."""

  def stream(self, start_step: int) -> Iterator[Any]:
    """The device batches from ``start_step`` on (a streaming task): an iterator with
    ``close()``, which the engine calls when it stops reading."""

  def batch(self, data: Any, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """One step's batch ``{"x": [D, B, ...], "y": [D, B]}`` from ``data`` (inside ``jit``)."""

  def epoch(self, step: int, batch_size: int) -> float:
    """The epochs ``step`` steps amount to (the records' ``epoch``)."""

  def evaluate(
    self, model_state: Any, run: int, predict: Any, *, step: int = 0, mesh: Any = None
  ) -> dict[str, float]:
    """The record's scores of ``predict(model_state, x)`` for run ``run`` at engine step
    ``step`` (``mesh``: sharded over its devices where the task can)."""

  def val_loss(self, model_state: Any, predict: Any, *, mesh: Any = None) -> float:
    """The training-domain validation loss SWAD reads."""

  def progress_numbers(self, record: Mapping[str, Any]) -> dict[str, float]:
    """The few numbers the progress line shows from ``record``."""


class TaskBase:
  """The protocol's defaults: full-batch or in-memory data shared by the runs, no stream, no
  extra variables, no validation loss, an ``epoch`` of ``step``, the record's loss on the
  progress line. A task subclasses it and defines ``model``,
  ``num_domains``, ``data``, :meth:`init_params`, :meth:`batch` and :meth:`evaluate`."""

  variables: Mapping[str, Any] = {}
  per_run_data = False
  streams = False
  data: Any = None
  has_val_loss = False

  def stream(self, start_step: int) -> Iterator[Any]:
    raise TypeError(f"{type(self).__name__} does not stream its batches (streams is False)")

  def epoch(self, step: int, batch_size: int) -> float:
    del batch_size
    return float(step)

  def val_loss(self, model_state: Any, predict: Any, *, mesh: Any = None) -> float:
    raise ValueError(f"{type(self).__name__} has no training-domain validation loss (val_loss)")

  def progress_numbers(self, record: Mapping[str, Any]) -> dict[str, float]:
    return {"loss": record["loss"]}


def is_task(obj: Any) -> bool:
  """``isinstance(obj, Task)``; ``False`` for an object whose members raise when read (an
  unbound flax module's ``variables``: Python 3.11's protocol check reads them with hasattr)."""
  try:
    return isinstance(obj, Task)
  except Exception:  # noqa: BLE001
    return False
