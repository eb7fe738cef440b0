"""Ctrl-C taken at safe points: the engine's loop and checkpoint saves never lose or half-do it.

Python's default SIGINT handler raises ``KeyboardInterrupt`` in whatever Python code the main
thread runs at that instant. When that is a finaliser or a weakref callback (JAX and Orbax run
many), Python prints "Exception ignored in ..." and carries on: the Ctrl-C is lost and the run
goes on (``tests/test_interrupts.py`` shows it). Inside :class:`DeferredInterrupt` the handler
only records the request; :meth:`check` raises ``KeyboardInterrupt`` where the caller can stop
cleanly (between steps), and leaving the block raises it if it was not taken. A second Ctrl-C
raises at once (a long compilation can still be cut short). Outside the main thread, or when
someone else's handler is installed (an outer block, a host program), the block changes nothing.
"""

from __future__ import annotations

import signal
import threading


class DeferredInterrupt:
  """``with DeferredInterrupt() as interrupt: ... interrupt.check() ...``"""

  def __init__(self):
    self.received = False
    self._installed = False

  def __enter__(self) -> "DeferredInterrupt":
    if (
      threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
      signal.signal(signal.SIGINT, self._record)
      self._installed = True
    return self

  def _record(self, signum, frame) -> None:
    if self.received:  # the second Ctrl-C: now
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.received = True

  def check(self) -> None:
    """Raises ``KeyboardInterrupt`` if Ctrl-C came since the block began (or since the last
    :meth:`check` that raised it: a request is taken once)."""
    if self.received:
      self.received = False
      raise KeyboardInterrupt

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._installed:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    if self.received and exc_type is None:
      raise KeyboardInterrupt
