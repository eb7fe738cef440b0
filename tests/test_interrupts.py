"""Ctrl-C inside dgjax.interrupts.DeferredInterrupt: recorded, raised where the caller checks,
never lost in a finaliser; a second Ctrl-C raises at once. In a subprocess (its own main thread
and Python's default SIGINT handler, which pytest's workers need not have)."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
  """
  import gc, os, signal
  from dgjax.interrupts import DeferredInterrupt

  def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)

  class Finaliser:  # Ctrl-C while a finaliser runs: Python's default handler loses it
    def __del__(self):
      ctrl_c()
      for _ in range(100000):
        pass  # the handler runs here, inside __del__

  out = []
  # 1. the default handler: a KeyboardInterrupt raised in a finaliser is ignored (lost)
  try:
    Finaliser(); gc.collect()
    out.append("default: lost")
  except KeyboardInterrupt:
    out.append("default: raised")
  # 2. deferred: recorded (no exception in the block), raised by check()
  with DeferredInterrupt() as interrupt:
    Finaliser(); gc.collect()
    out.append(f"deferred: recorded={interrupt.received}")
    try:
      interrupt.check()
    except KeyboardInterrupt:
      out.append("check: raised")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  # 3. not taken in the block: raised when it ends
  try:
    with DeferredInterrupt():
      ctrl_c()
      out.append("exit: not yet")
  except KeyboardInterrupt:
    out.append("exit: raised")
  # 4. a second Ctrl-C raises at once
  try:
    with DeferredInterrupt():
      ctrl_c()
      ctrl_c()
      out.append("second: not raised")
  except KeyboardInterrupt:
    out.append("second: raised")
  # 5. nested: the inner block leaves the outer one's handler alone
  with DeferredInterrupt() as outer:
    with DeferredInterrupt():
      ctrl_c()
    out.append(f"nested: outer recorded={outer.received}")
    outer.received = False
  print("|".join(out))
  """
)


def test_ctrl_c_is_deferred_to_safe_points_and_never_lost():
  proc = subprocess.run(
    [sys.executable, "-c", SCRIPT],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    # Python's default SIGINT handler even when the suite runs with SIGINT ignored (a shell's
    # `cmd &` without job control), which the child would inherit
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].split("|") == [
    "default: lost",
    "deferred: recorded=True",
    "check: raised",
    "exit: not yet",
    "exit: raised",
    "second: raised",
    "nested: outer recorded=True",
  ]
