"""Orbax checkpoints of one run's full train state in ``<output_dir>/checkpoints``.

The state is the params, the method's state, the step and the PRNG key (which is also the
minibatch sampler's state). The last ``keep`` checkpoints are kept; restoring falls back to an
older one when the newest is unreadable, and says so. ``checkpoint_meta.json`` beside them
records the run's identity, so that resuming into another run is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp


class CheckpointError(RuntimeError):
  """A checkpoint cannot be resumed: unreadable, or written by a different run."""


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


class Checkpoints:
  """The checkpoints of one run. ``to_tree(state)`` / ``from_tree(tree)`` convert the train
  state to and from a tree of arrays (the PRNG key as its raw data)."""

  def __init__(self, output_dir: str | Path, identity: Mapping[str, Any], keep: int = 3):
    import orbax.checkpoint as ocp  # slow import: only when checkpointing
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self._ocp = ocp
    self.dir = (Path(output_dir) / "checkpoints").absolute()
    self.meta_path = Path(output_dir) / "checkpoint_meta.json"
    self.identity = json.loads(json.dumps(identity))  # normalise tuples -> lists
    self.keep = keep
    self.manager = self._open()

  def _open(self):
    return self._ocp.CheckpointManager(
        self.dir, options=self._ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                                             enable_async_checkpointing=False))

  def save(self, step: int, tree: Any) -> None:
    if jax.process_index() == 0 and not self.meta_path.exists():
      self.meta_path.write_text(json.dumps(self.identity, sort_keys=True, indent=1))
    self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def check_identity(self) -> None:
    if not self.meta_path.exists():
      return
    try:
      saved = json.loads(self.meta_path.read_text())
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{self.meta_path} is not valid JSON ({e.msg}): the checkpoint "
                            "is corrupt; delete the output directory or choose another") from None
    diff = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
    if diff:
      details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(f"the checkpoint in {self.dir} belongs to another run ({details}); "
                            "use another --output_dir or the same settings")

  def restore(self, like: Any, log: Callable[[str], None] | None = None) -> tuple[int, Any]:
    """The newest readable checkpoint as ``(step, tree)`` shaped like ``like``; older ones are
    tried when newer ones are unreadable (``log`` says which were skipped)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    self.check_identity()
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    errors, bad = [], []
    for step in reversed(self.steps()):
      try:
        with _quiet_orbax():
          tree = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
      except Exception as e:  # orbax raises many kinds: missing files, bad metadata, shapes
        errors.append(f"step {step}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        bad.append(step)
        continue
      if errors:
        aside = self.dir.parent / "checkpoints_unreadable"
        for b in bad:   # moved aside (not deleted), so the run can checkpoint those steps again
          aside.mkdir(exist_ok=True)
          shutil.move(str(self.dir / str(b)), str(aside / f"{b}-{int(time.time())}"))
        self.manager = self._open()
        log(f"warning: the newest checkpoint(s) in {self.dir} are unreadable "
            f"({'; '.join(errors)}); resuming from the checkpoint of step {step} (the unreadable "
            f"ones are moved to {aside})")
      return step, tree
    raise CheckpointError(f"cannot restore any checkpoint in {self.dir} ({'; '.join(errors)}); "
                          "they are corrupt or from a different model: delete the directory "
                          "to start over")


def key_to_data(key: jax.Array) -> jax.Array:
  return jax.random.key_data(key)


def key_from_data(data: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(jnp.asarray(data))
