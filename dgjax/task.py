"""The task protocol: every member the engine (:mod:`dgjax.train`) reads from a task.

A task supplies the model, the training data and how one step's batch is drawn from it
(inside ``jit``), the initial parameters and the evaluation; the engine owns the rest (the
method's step, the runs axis, checkpoints, records, progress). The engine calls these
members and nothing else, without probing: a task implements all of them, most by
inheriting :class:`TaskBase`'s defaults (:class:`dgjax.tasks.DomainBedTask`,
:class:`dgjax.image_task.ImageTask`, :class:`dgjax.irm_benchmark.IRMTask`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import jax
import numpy as np

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

  def data_fingerprint(self) -> str:
    """What the run trains and evaluates on, as a short text with a digest of the content
    (not of where it was read from): part of a checkpoint's identity (``data``), so that a
    resume on other data is refused and one on the same data moved elsewhere is not."""


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

  def data_fingerprint(self) -> str:
    """A digest of ``data``'s arrays (a task whose evaluation reads more overrides it)."""
    leaves = jax.tree.leaves(self.data)
    return arrays_fingerprint(leaves, f"{len(leaves)} arrays")


def arrays_fingerprint(arrays: Iterable[Any], what: str) -> str:
  """``"<what>, sha256 <16 hex digits>"`` of the arrays' dtypes, shapes and bytes."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(a.tobytes() if a.dtype.kind in "OUS" else memoryview(a).cast("B"))
  return f"{what}, sha256 {h.hexdigest()[:16]}"


def files_fingerprint(paths: Iterable[Any], labels: Iterable[Any]) -> str:
  """``"<n> files, sha256 <16 hex digits>"`` of the files' paths relative to their common
  folder, their sizes and their labels: the same for a tree moved or copied elsewhere,
  another for a file added, removed, renamed, resized or relabelled (a change that keeps
  a file's name and size is not seen: the files are not read)."""
  paths = [str(p) for p in paths]
  root = os.path.commonpath(paths) if paths else ""
  h = hashlib.sha256()
  for path, label in zip(paths, labels):
    h.update(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}\0{int(label)}\n".encode())
  return f"{len(paths)} files, sha256 {h.hexdigest()[:16]}"


def is_task(obj: Any) -> bool:
  """``isinstance(obj, Task)``; ``False`` for an object whose members raise when read (an
  unbound flax module's ``variables``: Python 3.11's protocol check reads them with hasattr)."""
  try:
    return isinstance(obj, Task)
  except Exception:  # noqa: BLE001
    return False
