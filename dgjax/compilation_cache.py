"""JAX's persistent compilation cache, where dgjax's command lines keep compiled programs.

The entry points (``experiments/*``: ``train``, ``colored_mnist``, ``colored_mnist_irm``,
``sweep``, ``reproduce``) call :func:`setup` before any compilation, so a second run of the
same program (the same step, shapes and flags; every job of a sweep after the first) loads
its executables from disk instead of compiling them again. The library never turns the
cache on by itself: call :func:`setup` or :func:`enable` (or set JAX's own
``jax_compilation_cache_dir``) in your own program if you want it.

Where (first that applies):

1. the ``--compilation_cache`` flag of the entry point: a directory, or ``off``;
2. the ``DGJAX_COMPILATION_CACHE`` environment variable: a directory; set but empty, or
   ``off``, disables the cache;
3. the default, ``$XDG_CACHE_HOME/dgjax/jax`` (``~/.cache/dgjax/jax`` without
   ``XDG_CACHE_HOME``).

Every compiled program is written, however quick its compile (:data:`MIN_COMPILE_TIME_SECS`;
JAX's default threshold, 1 s, would skip the evaluation program and the small programs of
start-up, which together cost a second or more on CPU; the whole Colored MNIST run is 18
files, 0.4 MB). What the cache cannot skip is tracing and lowering (about a second for the
Colored MNIST step on CPU). JAX keys an entry by the program, the compile options, the backend
and the jax / jaxlib versions, so a stale entry is never
used. The directory only grows (delete it to reclaim the space; JAX's LRU eviction is off
by default). The cache is trusted code: do not point it at a directory others can write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV_VAR = "DGJAX_COMPILATION_CACHE"
#: Values of the flag or the environment variable that turn the cache off (case-insensitive).
OFF = ("", "off", "none", "false", "0")
#: Programs compiled in at least this many seconds are written to the cache (all of them).
MIN_COMPILE_TIME_SECS = 0.0

FLAG_HELP = (
  "directory of JAX's persistent compilation cache, which makes a second run (and every job "
  f"of a sweep) skip compiling; 'off' disables it (default: ${ENV_VAR}, else "
  "$XDG_CACHE_HOME/dgjax/jax, i.e. ~/.cache/dgjax/jax)"
)


class CompilationCacheError(ValueError):
  """The cache directory asked for cannot be used (not creatable or not writable)."""


def default_dir(environ: Mapping[str, str] | None = None) -> Path:
  """``$XDG_CACHE_HOME/dgjax/jax``, or ``~/.cache/dgjax/jax``."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return Path(base).expanduser() / "dgjax" / "jax"


def resolve(flag: str | None = None, environ: Mapping[str, str] | None = None):
  """``(directory or None, source)``: where the cache goes for ``flag`` (``None``: not given)
  and ``environ`` (default ``os.environ``); ``None`` when it is off. ``source`` is
  ``"flag"``, ``"env"`` or ``"default"``."""
  environ = os.environ if environ is None else environ
  if flag is not None:
    value, source = flag, "flag"
  elif ENV_VAR in environ:
    value, source = environ[ENV_VAR], "env"
  else:
    return default_dir(environ), "default"
  if value.strip().lower() in OFF:
    return None, source
  return Path(value).expanduser(), source


def enable(
  directory: str | os.PathLike, min_compile_time_secs: float = MIN_COMPILE_TIME_SECS
) -> Path:
  """Turns JAX's persistent compilation cache on in ``directory`` (created if missing) for
  this process. Call it before the first compilation: JAX opens the cache once."""
  import jax

  path = Path(directory).expanduser().absolute()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # every size
  return path


def setup(flag: str | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
  """The entry points' call: :func:`resolve` then :func:`enable`; returns the directory, or
  ``None`` when the cache is off.

  A directory given by the flag or the environment variable that cannot be created or
  written raises :class:`CompilationCacheError` (naming it and how to turn the cache off);
  the default directory in that case only turns the cache off, with a warning."""
  path, source = resolve(flag, environ)
  if path is None:
    return None
  problem = _unusable(path)
  if problem is None:
    return enable(path)
  where = "--compilation_cache" if source == "flag" else ENV_VAR
  if source != "default":
    raise CompilationCacheError(
      f"compilation cache {where}={path}: {problem}; give a writable directory, or "
      f"'off' to run without the cache"
    )
  import warnings

  warnings.warn(
    f"compilation cache off: the default directory {path} {problem} (set {ENV_VAR} to a "
    "writable directory, or to 'off' to silence this)",
    stacklevel=2,
  )
  return None


def _unusable(path: Path) -> str | None:
  """Why ``path`` cannot hold the cache (``None``: it can)."""
  if path.exists() and not path.is_dir():
    return "is not a directory"
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    return f"cannot be created ({e.strerror or e})"
  if not os.access(path, os.W_OK | os.X_OK):
    return "is not writable"
  return None
