"""Progress of a training run: a live bar on a terminal, one line per evaluation in a log.

On a terminal, a ``tqdm`` bar that advances every step and shows the numbers of the last
evaluation. When the stream is not a terminal (a log file, a pipe, a Slurm output), no
carriage returns: one plain line per evaluation, e.g.
``sand step 100/5001 (2.0%)  loss 0.4121  test_acc 0.512  0.31 s/step  elapsed 31s``.
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, TextIO


class Progress:
  def __init__(
    self,
    label: str,
    total: int,
    initial: int = 0,
    enabled: bool = True,
    stream: TextIO | None = None,
  ):
    self.label, self.total, self.enabled = label, total, enabled
    self.stream = stream or sys.stderr
    self.start = time.perf_counter()
    self.bar = None
    if enabled and getattr(self.stream, "isatty", lambda: False)():
      from tqdm.auto import tqdm

      self.bar = tqdm(
        total=total, initial=initial, desc=label, unit="step", file=self.stream, dynamic_ncols=True
      )

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def evaluated(self, step: int, numbers: Mapping[str, float], step_time: float) -> None:
    """Shows the record of an evaluation at ``step`` (0-based)."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in numbers.items()})
      return
    done = step + 1
    parts = "  ".join(f"{k} {v:.4g}" for k, v in numbers.items())
    self.stream.write(
      f"{self.label} step {step}/{self.total} ({100.0 * done / self.total:.1f}%)  "
      f"{parts}  {step_time:.3g} s/step  elapsed {time.perf_counter() - self.start:.0f}s\n"
    )
    self.stream.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
