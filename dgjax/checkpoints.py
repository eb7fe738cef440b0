"""Orbax checkpoints of one run's full train state in ``<output_dir>/checkpoints``.

The state is the params, the method's state, the step and the PRNG key (which is also the
minibatch sampler's state). The last ``keep`` checkpoints are kept. Once Orbax has written a
checkpoint, the sha256 of each of its files goes to ``<step>/dgjax_sha256.json``; restoring
checks them, and a checkpoint that is damaged (a file changed or missing, or no such manifest:
its save never finished) or unreadable is moved to ``checkpoints_unreadable/`` with a one-line
warning, falling back to the previous one. ``checkpoint_meta.json`` beside them records the
run's identity (:meth:`dgjax.config.TrainConfig.identity`), so that resuming another run is
refused with an error naming the field that differs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dgjax.interrupts import DeferredInterrupt


#: The file in each checkpoint's directory holding the sha256 of its other files.
MANIFEST_NAME = "dgjax_sha256.json"
META_NAME = "checkpoint_meta.json"


class CheckpointError(RuntimeError):
  """A checkpoint cannot be resumed: unreadable, or written by a different run."""


def _files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _sha256(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: Path) -> None:
  """The sha256 of every file of a finished checkpoint, written atomically beside them."""
  sums = {str(p.relative_to(step_dir)): _sha256(p) for p in _files(step_dir)}
  tmp = step_dir / (MANIFEST_NAME + ".tmp")
  with open(tmp, "w") as f:
    json.dump(sums, f, sort_keys=True, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / MANIFEST_NAME)


def verify(step_dir: Path) -> str | None:
  """``None`` when every file of the checkpoint matches its manifest, else what is wrong."""
  try:
    sums = json.loads((step_dir / MANIFEST_NAME).read_text())
  except FileNotFoundError:
    return f"no {MANIFEST_NAME} (its save did not finish)"
  except (OSError, ValueError) as e:
    return f"unreadable {MANIFEST_NAME} ({e})"
  found = {str(p.relative_to(step_dir)) for p in _files(step_dir)}
  if found != set(sums):
    missing, extra = sorted(set(sums) - found), sorted(found - set(sums))
    return f"files missing {missing[:3]}, unexpected {extra[:3]}"
  for name, digest in sums.items():
    if _sha256(step_dir / name) != digest:
      return f"checksum mismatch in {name}"
  return None


def check_identity(output_dir: str | Path, identity: Mapping[str, Any]) -> None:
  """A :class:`CheckpointError` naming the first field (``field: checkpoint A vs now B``)
  where ``<output_dir>/checkpoint_meta.json`` differs from ``identity``; nothing when there
  is no such file (no checkpoint yet)."""
  meta_path = Path(output_dir) / META_NAME
  if not meta_path.exists():
    return
  try:
    saved = json.loads(meta_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(
      f"{meta_path} is not valid JSON ({e.msg}): the checkpoint "
      "is corrupt; delete the output directory or choose another"
    ) from None
  now = json.loads(json.dumps(dict(identity)))  # normalise tuples -> lists
  diff = []
  for key, value in now.items():
    if key not in saved:
      diff.append(
        f"{key}: not recorded in the checkpoint (written by an older dgjax) vs now {value!r}"
      )
    elif saved[key] != value:
      if isinstance(value, dict) and isinstance(saved[key], dict):
        diff.extend(
          f"{key}.{k}: checkpoint {saved[key].get(k)!r} vs now {value.get(k)!r}"
          for k in sorted(set(value) | set(saved[key]))
          if saved[key].get(k) != value.get(k)
        )
      else:
        diff.append(f"{key}: checkpoint {saved[key]!r} vs now {value!r}")
  if diff:
    raise CheckpointError(
      f"the checkpoint in {Path(output_dir) / 'checkpoints'} belongs to "
      f"another run ({'; '.join(diff)}); use another --output_dir or the "
      "same settings"
    )


def latest_good_step(output_dir: str | Path) -> int | None:
  """The newest checkpoint step whose save finished (it has its manifest), from the disk."""
  root = Path(output_dir) / "checkpoints"
  steps = (
    [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / MANIFEST_NAME).exists()]
    if root.is_dir()
    else []
  )
  return max(steps, default=None)


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs the tracebacks of failed reads (from its thread pool) before raising;
  our error says what failed, so mute them while restoring."""
  loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint", "asyncio")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _drop_orbax_leftovers() -> None:
  """A failed Orbax read leaves coroutines it never awaited; collected later, each would print
  an "Exception ignored" traceback. Collect them now, quietly."""
  hook = sys.unraisablehook
  sys.unraisablehook = lambda *_: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


class Checkpoints:
  """The checkpoints of one run. ``to_tree(state)`` / ``from_tree(tree)`` convert the train
  state to and from a tree of arrays (the PRNG key as its raw data)."""

  def __init__(self, output_dir: str | Path, identity: Mapping[str, Any], keep: int = 3):
    import orbax.checkpoint as ocp  # slow import: only when checkpointing

    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self._ocp = ocp
    self.dir = (Path(output_dir) / "checkpoints").absolute()
    self.output_dir = Path(output_dir)
    self.meta_path = self.output_dir / META_NAME
    self.identity = json.loads(json.dumps(identity))  # normalise tuples -> lists
    self.keep = keep
    self.manager = self._open()

  def _open(self):
    return self._ocp.CheckpointManager(
      self.dir,
      options=self._ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, enable_async_checkpointing=False
      ),
    )

  def save(self, step: int, tree: Any) -> None:
    if jax.process_index() == 0 and not self.meta_path.exists():
      tmp = self.meta_path.with_name(META_NAME + ".tmp")
      tmp.write_text(json.dumps(self.identity, sort_keys=True, indent=1))
      os.replace(tmp, self.meta_path)
    with DeferredInterrupt():  # a save is never cut in half (Orbax's threads would go on)
      with _quiet_orbax():  # a failure (a full disk) is raised, not logged as tracebacks
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()
      if jax.process_index() == 0:
        write_manifest(self.dir / str(step))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def check_identity(self) -> None:
    check_identity(self.output_dir, self.identity)

  def restore(self, like: Any, log: Callable[[str], None] | None = None) -> tuple[int, Any]:
    """The newest intact, readable checkpoint as ``(step, tree)`` shaped like ``like``; older
    ones are tried when newer ones are damaged (:func:`verify`) or unreadable (``log`` says
    which were skipped, in one line)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    self.check_identity()
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like
    )
    errors, bad = [], []
    for step in reversed(self.steps()):
      damage = verify(self.dir / str(step))
      if damage is not None:
        errors.append(f"step {step}: damaged, {damage}")
        bad.append(step)
        continue
      try:
        with DeferredInterrupt(), _quiet_orbax():
          tree = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
      except Exception as e:  # orbax raises many kinds: missing files, bad metadata, shapes
        errors.append(f"step {step}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        bad.append(step)
        del e
        _drop_orbax_leftovers()
        continue
      if errors:
        aside = self.dir.parent / "checkpoints_unreadable"
        for b in bad:  # moved aside (not deleted), so the run can checkpoint those steps again
          aside.mkdir(exist_ok=True)
          shutil.move(str(self.dir / str(b)), str(aside / f"{b}-{int(time.time())}"))
        self.manager = self._open()
        log(
          f"warning: the newest checkpoint(s) in {self.dir} are unreadable "
          f"({'; '.join(errors)}); resuming from the checkpoint of step {step} (the bad "
          f"ones are moved to {aside})"
        )
      return step, tree
    raise CheckpointError(
      f"cannot restore any checkpoint in {self.dir} ({'; '.join(errors)}); "
      "they are corrupt or from a different model: delete the directory "
      "to start over"
    )


def key_to_data(key: jax.Array) -> jax.Array:
  return jax.random.key_data(key)


def key_from_data(data: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(jnp.asarray(data))
