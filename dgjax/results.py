"""A run directory's results file, ``<output_dir>/results.jsonl`` (one JSON object per
evaluation), and the lock that makes its run its only writer.

* :class:`RunLock`: an exclusive, non-blocking ``filelock`` on ``<output_dir>/.lock``, taken
  before anything in the directory is read or deleted and held for the life of a run; a
  second writer fails at once with :class:`RunLockedError` naming the holder (its process id,
  host and command line, from ``.lock.holder``). The operating system releases it when the
  process dies, so a killed run never leaves a stale lock. :func:`is_locked` tells a sweep
  which jobs are running.
* :func:`append_jsonl`: one line per call, written with a single ``write`` on a file opened
  for appending (a reader such as ``tail -f`` never sees half a line from a live run), flushed
  and, with ``sync=True`` (at evaluations), ``fsync``-ed. Strict JSON: a non-finite number is
  written as ``null``.
* :func:`truncate_jsonl`: keeps the records at or before a step (resuming from a checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.holder"


class RunLockedError(RuntimeError):
  """Another process is writing the same run directory."""


def _to_jsonable(value):
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  elif hasattr(value, "tolist"):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {str(k): _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  return value


def dumps(record: Mapping[str, Any]) -> str:
  """``record`` as one line of strict JSON (sorted keys; NaN and infinities as ``null``)."""
  return json.dumps(_to_jsonable(record), sort_keys=True, allow_nan=False)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any], sync: bool = True) -> None:
  """Appends ``record`` as one line to ``path`` (created with the usual mode, 0644 under a
  022 umask) in one ``write``; ``fsync`` when ``sync``."""
  data = (dumps(record) + "\n").encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    written = os.write(fd, data)
    if written != len(data):  # a full disk; never leave half a line behind
      os.ftruncate(fd, os.fstat(fd).st_size - written)
      raise OSError(f"could not append a whole record to {path}")
    if sync:
      os.fsync(fd)
  finally:
    os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a results file; a malformed line raises naming the file and line number."""
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
  return records


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
  """Replaces ``path`` by ``records`` atomically (a temporary sibling renamed over it)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".rewrite")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(dumps(r) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def truncate_jsonl(path: str | os.PathLike, last_step: int | None) -> list[dict[str, Any]]:
  """Keeps the records with ``step <= last_step`` (none when ``last_step is None``);
  returns them. A missing file is an empty one."""
  path = Path(path)
  old = read_jsonl(path) if path.exists() else []
  kept = [] if last_step is None else [r for r in old if r["step"] <= last_step]
  if len(kept) != len(old):
    if kept:
      write_jsonl(path, kept)
    else:
      path.unlink()
  return kept


class RunLock:
  """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`.

  Beside the lock, ``.lock.holder`` says who holds it (process id, host, start time and
  command line), so that a refused writer can name the holder."""

  def __init__(self, output_dir: str | os.PathLike):
    from filelock import FileLock

    self.dir = Path(output_dir)
    self._lock = FileLock(str(self.dir / LOCK_NAME), is_singleton=False)

  @property
  def _key(self) -> str:
    return os.path.realpath(self.dir)

  def acquire(self, timeout: float = 1.0) -> "RunLock":
    """Takes the lock, waiting up to ``timeout`` seconds (a status probe holds it for an
    instant) before failing with :class:`RunLockedError`, which names the holder."""
    from filelock import Timeout

    self.dir.mkdir(parents=True, exist_ok=True)
    if self._key in _HELD:
      raise RunLockedError(
        f"{self.dir} is already being written by this process (pid {os.getpid()})"
      )
    try:
      self._lock.acquire(timeout=timeout)
    except Timeout:
      raise RunLockedError(
        f"{self.dir} is being written by another running process ({holder(self.dir)}); wait "
        "for it to finish, stop it, or choose another output directory"
      ) from None
    _HELD[self._key] = self
    try:
      (self.dir / HOLDER_NAME).write_text(
        json.dumps(
          {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
          }
        )
      )
    except OSError:
      pass  # only a message would lose its detail
    return self

  def release(self) -> None:
    if self._lock.is_locked:
      _HELD.pop(self._key, None)
      (self.dir / HOLDER_NAME).unlink(missing_ok=True)
      self._lock.release()

  def __enter__(self):
    return self if self._lock.is_locked else self.acquire()

  def __exit__(self, *exc):
    self.release()


#: The run locks this process holds, by real path.
_HELD: dict[str, RunLock] = {}


def held_here(output_dir: str | os.PathLike) -> bool:
  """Whether this process holds ``output_dir``'s run lock."""
  return os.path.realpath(output_dir) in _HELD


def holder(output_dir: str | os.PathLike) -> str:
  """Who holds ``output_dir``'s run lock, in words (from ``.lock.holder``)."""
  try:
    info = json.loads((Path(output_dir) / HOLDER_NAME).read_text())
    argv = " ".join(str(a) for a in info.get("argv", []))
    argv = argv if len(argv) <= 120 else argv[:117] + "..."
    return f"pid {info['pid']} on {info['host']} since {info['since']}: {argv}"
  except (OSError, ValueError, KeyError, TypeError):
    return f"its lock {Path(output_dir) / LOCK_NAME} is held"


def is_locked(output_dir: str | os.PathLike) -> bool:
  """Whether a live process (this one included) holds ``output_dir``'s run lock."""
  from filelock import FileLock, Timeout

  if held_here(output_dir):
    return True
  path = Path(output_dir) / LOCK_NAME
  if not path.exists():
    return False
  probe = FileLock(str(path), is_singleton=False)
  try:
    probe.acquire(timeout=0)
  except Timeout:
    return True
  probe.release()
  return False
