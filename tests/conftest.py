import os
from pathlib import Path

import pytest

# The command lines turn JAX's persistent compilation cache on by default
# (dgjax.compilation_cache): the tests that run them, in this process or as subprocesses,
# compile as before and leave ~/.cache alone unless the environment names a cache.
os.environ.setdefault("DGJAX_COMPILATION_CACHE", "off")

# The suite is mostly XLA compile time: XLA:CPU's cheaper code generation (the same programs,
# unoptimised machine code) compiles them about 1.6x faster (tests/test_pinned_steps.py: 61 ->
# 37 CPU-seconds) and reaches the subprocess workers through the environment. The numbers the
# tests check do not depend on it; DGJAX_TEST_FULL_XLA=1 runs the suite as users compile.
if not os.environ.get("DGJAX_TEST_FULL_XLA"):
  os.environ["XLA_FLAGS"] = " ".join(
    [
      os.environ.get("XLA_FLAGS", ""),
      "--xla_backend_optimization_level=0",
      "--xla_llvm_disable_expensive_passes=true",
    ]
  ).strip()


# --- real data (dgjax.data) -------------------------------------------------
@pytest.fixture(scope="session")
def data_dir() -> Path:
  """Directory named by $DGJAX_DATA_DIR, holding ``mnist-first10k/``.

  Missing data fails the test in CI (``$CI`` set) and skips it elsewhere.
  """

  def unavailable(reason: str):
    if os.environ.get("CI"):
      pytest.fail(reason)
    pytest.skip(reason)

  value = os.environ.get("DGJAX_DATA_DIR")
  if not value:
    if os.environ.get("CI"):
      pytest.fail("DGJAX_DATA_DIR must be set in CI")
    pytest.skip(
      "set DGJAX_DATA_DIR to a directory holding mnist-first10k/ "
      "(see README) to run real-data tests"
    )
  path = Path(value)
  if not (path / "mnist-first10k").is_dir():
    unavailable(f"DGJAX_DATA_DIR={value} has no mnist-first10k/ subdirectory")
  return path
