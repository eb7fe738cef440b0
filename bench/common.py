"""Shared pieces of the benchmarks: matmul rate, compile statistics, interleaved timing.

Used by ``bench/step_time.py``, ``bench/hessian_step_time.py`` and ``bench/suite.py``.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp


def matmul_rate(n=2048, reps=10) -> float:
  """Median float32 matmul rate of this device, FLOP/s (a jitted ``n^3`` matmul)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(times)


def compile_stats(step, state, data) -> dict:
  """Compiles jitted ``step(state, data)``; returns the executable and its statistics.

  Keys: ``compiled`` (callable), ``compile_s`` (lower + compile wall time), ``flops`` (XLA
  cost analysis; NaN when the backend gives none) and the XLA memory analysis in MB:
  ``temp_mb``, ``arg_mb``, ``out_mb``, ``alias_mb``.
  """
  t = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  mem = compiled.memory_analysis()

  def mb(field):
    return getattr(mem, field, float("nan")) / 2**20 if mem is not None else float("nan")

  return {
    "compiled": compiled,
    "compile_s": compile_s,
    "flops": float(cost.get("flops", float("nan"))),
    "temp_mb": mb("temp_size_in_bytes"),
    "arg_mb": mb("argument_size_in_bytes"),
    "out_mb": mb("output_size_in_bytes"),
    "alias_mb": mb("alias_size_in_bytes"),
  }


def warm_up(step, state, data):
  """One step (run and waited for); returns the new state. ``step`` may donate ``state``."""
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  return state


def time_interleaved(live, reps):
  """Times ``reps`` rounds of one step per variant, interleaved (A, B, C, A, B, C, ...).

  ``live``: dicts with ``step``, ``state`` and ``data``; each gets ``times`` (seconds, one
  per round), ``ms`` (their median, milliseconds) and its final ``state``.
  """
  for v in live:
    v["times"] = []
  for _ in range(reps):
    for v in live:
      t = time.perf_counter()
      v["state"], m = v["step"](v["state"], v["data"])
      jax.block_until_ready(m)
      v["times"].append(time.perf_counter() - t)
  for v in live:
    v["ms"] = 1e3 * statistics.median(v["times"])
  return live


def load_average():
  """The 1, 5 and 15 minute load averages (NaNs where the OS has none)."""
  try:
    return tuple(os.getloadavg())
  except OSError:
    return (float("nan"),) * 3
