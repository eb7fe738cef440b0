r"""Several steps per jit call (``lax.scan``, the engine's ``scan_steps``) vs one: ms per step.

    python bench/scan_steps.py                      # IRM MLP full batch and CMNIST CNN 2x64
    python bench/scan_steps.py --setting irm --calls 1,10,100 --reps 5

Each variant is the engine's step (:func:`dgjax.train.build_run`) with ``steps_per_call``
steps per call; its time per call is divided by the steps it runs. Variants are timed
interleaved (medians), so the ratios hold on a busy machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_stats, time_interleaved, warm_up  # noqa: E402
import hessian_step_time as H  # noqa: E402


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--setting", default="irm,cnn")
  p.add_argument("--calls", default="1,10,100", help="steps per jit call")
  p.add_argument("--method", default="erm")
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  print(
    f"backend {jax.default_backend()}, jax {jax.__version__}; {args.reps} timed calls per "
    "variant (median, interleaved)"
  )
  print("| setting | steps per call | ms/step | x one step per call | compile s |")
  print("|---|---|---|---|---|")
  for setting in args.setting.split(","):
    calls = [int(c) for c in args.calls.split(",")]
    if setting == "cnn":
      calls = [c for c in calls if c <= 10]
    live = []
    for n in calls:
      if setting == "irm":
        step, state, data = H.build_irm(args.method, {}, steps_per_call=n)
      else:
        step, state, data = H.build_cnn(args.method, {}, conv_impl="auto", steps_per_call=n)
      stats = compile_stats(step, state, data)
      state = warm_up(stats["compiled"], state, data)
      live.append({"n": n, "step": stats["compiled"], "state": state, "data": data, **stats})
    time_interleaved(live, args.reps)
    base = live[0]["ms"] / live[0]["n"]
    label = "IRM MLP full batch" if setting == "irm" else "CMNIST CNN 2x64"
    for v in live:
      per = v["ms"] / v["n"]
      print(
        f"| {label} ({args.method}) | {v['n']} | {per:.2f} | {per / base:.2f} | {v['compile_s']:.1f} |"
      )


if __name__ == "__main__":
  main()
