r"""Step time of the Hessian-alignment methods: ms/step vs ERM, and how Hutchinson grows with S.

    python bench/hessian_step_time.py                        # both settings, S = 1, 10, 100, 300
    python bench/hessian_step_time.py --setting cnn --reps 5 --samples 1,10

Settings:
* ``cnn``: DomainBed's Colored MNIST CNN, 2 environments x 64 images (28x28x2), the
  :mod:`dgjax.train` step (sampling included).
* ``irm``: IRM-style Colored MNIST, MLP 392-390-390-1, full batch (2 x 4166 examples: the
  ``mnist-first10k`` split), the :mod:`dgjax.irm_benchmark` step.

Variants are timed interleaved (A, B, C, A, B, C, ...) and reported as medians, so ratios
hold on a busy machine; the compile time of each is reported too. Data are random (timing only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_stats, time_interleaved, warm_up  # noqa: E402

from dgjax import methods  # noqa: E402
from dgjax import train as train_lib  # noqa: E402
from dgjax.models import mnist_cnn  # noqa: E402


def variants(samples):
  out = [("erm", "erm", {}), ("cma", "cma", {}), ("hgp", "hgp", {}), ("iga", "iga", {})]
  out += [(f"hutchinson S={s}", "hutchinson", {"hutchinson_samples": s}) for s in samples]
  return out


def cnn_task(d=2, n=1000, seed=0, conv_impl="xla"):
  """DomainBed's Colored MNIST CNN on ``d`` environments of ``n`` random 28x28x2 images
  (timing only): a :class:`dgjax.tasks.DomainBedTask`, every environment a training one."""
  rng = np.random.default_rng(seed)
  splits = [
    train_lib.Split(
      f"env{e}_in",
      rng.uniform(size=(n, 28, 28, 2)).astype(np.float32),
      rng.integers(0, 2, n).astype(np.int32),
    )
    for e in range(d)
  ]
  return train_lib.DomainBedTask(mnist_cnn(2, conv_impl=conv_impl), splits, splits, test_envs=())


def build_cnn(
  method,
  overrides,
  d=2,
  b=64,
  n=1000,
  seed=0,
  conv_impl="xla",
  steps_per_call=1,
  per_domain_impl="auto",
):
  """The engine's step (:func:`dgjax.train.build_run`) of ``method`` on :func:`cnn_task`,
  ``b`` images per domain; ``steps_per_call`` steps per jit call (``lax.scan``)."""
  task = cnn_task(d, n, seed, conv_impl)
  hp = methods.resolve_hparams(method, 0, {"batch_size": b, **overrides})
  step, state = train_lib.build_run(method, task, hp, seed, per_domain_impl, steps_per_call)
  return step, state, task.data


def build_irm(method, overrides, n=4166, seed=0, steps_per_call=1):
  """The IRM-style benchmark's own step (:class:`dgjax.irm_benchmark.IRMTask`, full batch)
  through the engine's :func:`dgjax.train.build_run`; ``steps_per_call`` steps per jit
  call (``lax.scan``)."""
  from dgjax import irm_benchmark as B

  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(2, n, 392)).astype(np.float32) * (rng.uniform(size=(2, n, 1)) < 0.5)
  y = rng.integers(0, 2, (2, n)).astype(np.int32)
  task = B.IRMTask(
    [{"train_x": x, "train_y": y, "test_x": x[0], "gray_x": x[0], "test_y": y[0], "gray_y": y[0]}],
    hidden=B.HIDDEN,
  )
  hp = B.benchmark_hparams(method, B.IRMConfig(method=method, hparams=overrides), n)
  step, state = train_lib.build_run(method, task, hp, seed, "vmap", steps_per_call)
  return step, state, jax.tree.map(lambda a: a[0], task.data)  # the one run's data


def measure(setting, names, reps):
  """Rows (setting, name, ms, compile_s, flops, temp_mb) of ``(label, method, overrides)``
  variants in ``setting`` ("cnn" or "irm"), timed interleaved over ``reps`` rounds."""
  live = []
  for label, method, over in names:
    step, state, data = (build_cnn if setting == "cnn" else build_irm)(method, over)
    stats = compile_stats(step, state, data)
    state = warm_up(stats["compiled"], state, data)
    live.append({"name": label, "step": stats["compiled"], "state": state, "data": data, **stats})
  time_interleaved(live, reps)
  return [
    {
      "setting": setting,
      "name": v["name"],
      "ms": v["ms"],
      "compile_s": v["compile_s"],
      "flops": v["flops"],
      "temp_mb": v["temp_mb"],
    }
    for v in live
  ]


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--setting", default="cnn,irm", help="comma list of cnn, irm")
  p.add_argument("--samples", default="1,10,100,300", help="Hutchinson S values")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--json", help="also write the rows to this JSON file")
  args = p.parse_args()
  samples = [int(s) for s in args.samples.split(",")]
  rows = []
  for setting in args.setting.split(","):
    rows += measure(setting, variants(samples), args.reps)
  print(
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
    f"{args.reps} timed steps per variant (median, interleaved)"
  )
  print("| setting | method | ms/step | x ERM | compile s |")
  print("|---|---|---|---|---|")
  for setting in args.setting.split(","):
    erm = next(r["ms"] for r in rows if r["setting"] == setting and r["name"] == "erm")
    for r in rows:
      if r["setting"] == setting:
        label = "CNN 2x64" if setting == "cnn" else "IRM MLP full batch"
        print(
          f"| {label} | {r['name']} | {r['ms']:.1f} | {r['ms'] / erm:.2f} | {r['compile_s']:.1f} |"
        )
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
