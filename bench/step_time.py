r"""Train-step speed on the Colored MNIST CNN: ms/step, compile time, memory, vs the matmul floor.

    python bench/step_time.py                       # erm/and/sand with the default lowering
    python bench/step_time.py --all                 # every per-domain x conv lowering
    python bench/step_time.py --reps 20 --conv xla,auto --per_domain vmap,unrolled
    python bench/step_time.py --methods all         # every registered method
    python bench/step_time.py --runs 4 --runs_impl vmap,unrolled   # K runs in one program

The step is the one `dgjax.train` runs: sample 2 domains x 64 images (28x28x2) from
device-resident data, per-domain losses and gradients, the method's transform, Adam. Its
FLOP count comes from XLA's cost analysis of the compiled step; the floor is that count
divided by the float32 matmul rate measured in the same process (a jitted 2048^3 matmul).
With ``--runs K`` each variant is the step of K runs trained as one program, as the vmap
launcher builds it (:func:`dgjax.train.build_runs`; the runs differ in seed), with each
``--runs_impl``; its ms are for all K runs, its FLOPs too. Variants are timed interleaved
(A, B, C, A, B, C, ...) and reported as medians, so the ratios between them hold on a noisy
machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_stats, matmul_rate, time_interleaved, warm_up  # noqa: E402,F401
from hessian_step_time import cnn_task  # noqa: E402

from dgjax import conv as conv_lib  # noqa: E402
from dgjax import methods  # noqa: E402
from dgjax import train as train_lib  # noqa: E402
from dgjax.losses import cross_entropy  # noqa: E402


def build(
  method,
  per_domain_impl,
  conv_impl,
  pooled=False,
  d=2,
  b=64,
  n=2000,
  seed=0,
  runs=1,
  runs_impl=None,
):
  """A jitted step, its initial state and data: the engine's (:func:`dgjax.train.build_run`
  on :func:`hessian_step_time.cnn_task`; with ``runs_impl``, :func:`dgjax.train.build_runs`
  of ``runs`` seeds), or with ``pooled`` one gradient of the mean loss over all d*b images and
  plain Adam (the ERM lower bound: no per-domain split)."""
  task = cnn_task(d, n, seed, conv_impl)
  if runs_impl is not None:
    configs = [
      train_lib.TrainConfig(
        method=method,
        seed=seed + k,
        hparams={"batch_size": b},
        per_domain_impl=per_domain_impl,
        runs_impl=runs_impl,
        progress=False,
      )
      for k in range(runs)
    ]
    step, state = train_lib.build_runs(configs, task)
    return step, state, task.data
  hp = methods.resolve_hparams(method, 0, {"batch_size": b})
  step, state = train_lib.build_run(method, task, hp, seed, per_domain_impl)
  if pooled:
    adam = optax.adam(hp["lr"])
    state = state._replace(opt_state=adam.init(state.params))

    def loss_fn(params, batch):
      return cross_entropy(task.model.apply({"params": params}, batch["x"]), batch["y"])

    @jax.jit
    def step(state, data):
      key, sk = jax.random.split(state.key)
      batch = task.batch(data, sk, b)
      flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
      loss, g = jax.value_and_grad(loss_fn)(state.params, flat)
      upd, opt = adam.update(g, state.opt_state, state.params)
      return train_lib.TrainState(
        state.step + 1, optax.apply_updates(state.params, upd), opt, key
      ), {"loss": loss}

  return step, state, task.data


def measure(variants, reps):
  """Rows (name, lowering, compile_s, flops, temp_mb, pooled, ms) of ``(name, build kwargs)``
  variants, timed interleaved over ``reps`` rounds."""
  live = []
  for name, kw in variants:
    step, state, data = build(**kw)
    stats = compile_stats(step, state, data)
    step = stats["compiled"]  # time the executable compiled once here
    state = warm_up(step, state, data)  # (donates the first state)
    live.append({"name": name, "step": step, "state": state, "data": data, **stats, **kw})
  time_interleaved(live, reps)
  return [
    {
      k: v[k]
      for k in ("name", "method", "per_domain_impl", "conv_impl", "compile_s", "flops", "temp_mb")
    }
    | {"pooled": v.get("pooled", False), "ms": v["ms"]}
    for v in live
  ]


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--reps", type=int, default=10)
  p.add_argument(
    "--methods", default="erm,and,sand", help="comma list of registered methods, or 'all'"
  )
  p.add_argument("--per_domain", default="auto", help="comma list of vmap,unrolled,auto")
  p.add_argument(
    "--conv",
    default="auto",
    help=f"comma list of {','.join(getattr(conv_lib, 'CONV_IMPLS', {'xla': 0}))},auto",
  )
  p.add_argument(
    "--all", action="store_true", help="every per-domain x conv lowering, for sand and pooled erm"
  )
  p.add_argument("--runs", type=int, default=1, help="K runs per program (the vmap launcher's)")
  p.add_argument(
    "--runs_impl", default="vmap,unrolled", help="with --runs K > 1: comma list of vmap,unrolled"
  )
  p.add_argument("--json", help="also write the rows to this JSON file")
  args = p.parse_args()
  if args.methods == "all":
    args.methods = ",".join(sorted(methods.METHODS))
  for m in args.methods.split(","):
    methods.get_method(m)  # an unknown name fails here, listing the valid ones

  variants = []
  if args.all:
    convs = list(getattr(conv_lib, "CONV_IMPLS", {"xla": None}))
    for c in convs:
      variants.append(
        (f"erm pooled / {c}", dict(method="erm", per_domain_impl="vmap", conv_impl=c, pooled=True))
      )
      for pd in ("vmap", "unrolled"):
        variants.append((f"sand {pd} / {c}", dict(method="sand", per_domain_impl=pd, conv_impl=c)))
  elif args.runs > 1:
    for ri in args.runs_impl.split(","):
      for c in args.conv.split(","):
        for m in args.methods.split(","):
          rpd = train_lib.resolve_per_domain_impl(args.per_domain.split(",")[0])
          variants.append(
            (
              f"{m} K={args.runs} {ri} / {c}",
              dict(method=m, per_domain_impl=rpd, conv_impl=c, runs=args.runs, runs_impl=ri),
            )
          )
  else:
    for pd in args.per_domain.split(","):
      for c in args.conv.split(","):
        for m in args.methods.split(","):
          rpd = train_lib.resolve_per_domain_impl(pd)
          variants.append((f"{m} {rpd} / {c}", dict(method=m, per_domain_impl=rpd, conv_impl=c)))
        if "erm" in args.methods.split(","):
          variants.append(
            (
              f"erm pooled / {c}",
              dict(method="erm", per_domain_impl="vmap", conv_impl=c, pooled=True),
            )
          )

  rate = matmul_rate()
  rows = measure(variants, args.reps)
  rate_after = matmul_rate()
  rate = max(rate, rate_after)
  print(
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
    f"D=2 domains x 64 images 28x28x2, {args.runs} run(s) per step, {args.reps} timed steps "
    "per variant (median)"
  )
  print(f"float32 matmul rate: {rate / 1e9:.0f} GFLOP/s (2048^3, best of before/after)")
  head = f"{'variant':34s} {'ms/step':>8s} {'GFLOP':>6s} {'floor ms':>8s} {'x floor':>7s} {'GFLOP/s':>7s} {'compile s':>9s} {'XLA temp MB':>11s}"
  print(head)
  print("-" * len(head))
  for r in rows:
    floor_ms = 1e3 * r["flops"] / rate
    print(
      f"{r['name']:34s} {r['ms']:8.1f} {r['flops'] / 1e9:6.1f} {floor_ms:8.1f} {r['ms'] / floor_ms:7.2f} "
      f"{r['flops'] / r['ms'] / 1e6:7.0f} {r['compile_s']:9.2f} {r['temp_mb']:11.1f}"
    )
  if args.json:
    Path(args.json).write_text(json.dumps({"matmul_flops_per_s": rate, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
