r"""dgjax's IRM-style run started from a reference script's own data and initial weights.

    python bench/reference_cmnist_script.py --script .../cmnist_HGP.py --digits DIGITS \
        --python TORCH_PY --algorithm irm --n_restarts 1 --print_every 10 --dump restart0.npz
    python bench/irm_same_start.py --dump restart0.npz --method irm

The first command runs the paper's script and writes its restart 0 (the four environments and
the MLP's initial weights); this one trains dgjax's ``--method`` on the engine, from exactly
that start, under the benchmark's hparams, and prints train / test / gray accuracy every
``--eval_every`` steps beside the script's log lines, to compare trajectories rather than
means over restarts.

The engine stacks the two training environments, which must then have one size: the script's
environment 0 has one digit more (4,167 vs 4,166 with 10,000 digits). Two runs are made, one
without its last digit and one without its first: how far apart they end says how much one
digit of 4,167 moves the result, the scale against which any difference from the script is
read. (The engine's record labelled ``s`` is the model after ``s + 1`` updates, the script's
line ``s + 1``; the last record, after ``steps - 1`` updates, is the script's last line.)
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dgjax import irm_benchmark, train


def start_from_dump(path: str):
  """``(runs, params)``: the dumped environments as two engine runs (environment 0 without its
  last / first digit when the sizes differ) and the dumped weights as dgjax's MLP params."""
  d = np.load(path)
  flat = lambda k: d[k].reshape(len(d[k]), -1).astype(np.float32)
  label = lambda k: d[k][:, 0].astype(np.int32)
  n = min(len(d["env0_y"]), len(d["env1_y"]))
  runs = []
  for drop in ("last", "first"):
    start = len(d["env0_y"]) - n if drop == "first" else 0
    sl = slice(start, start + n)
    runs.append(
      {
        "train_x": np.stack([flat("env0_x")[sl], flat("env1_x")[:n]]),
        "train_y": np.stack([label("env0_y")[sl], label("env1_y")[:n]]),
        "test_x": flat("env2_x"),
        "test_y": label("env2_y"),
        "gray_x": flat("env3_x"),
        "gray_y": label("env3_y"),
      }
    )
  dense = lambda i: {"kernel": d[f"p__main.{i}.weight"].T, "bias": d[f"p__main.{i}.bias"]}
  params = {
    "classifier": {"kernel": d["p_classifier.weight"].T, "bias": d["p_classifier.bias"]},
    "featurizer": {"dense0": dense(0), "dense1": dense(2)},
  }
  return runs, jax.tree.map(jnp.asarray, params)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dump", required=True, help="restart 0 written by reference_cmnist_script.py")
  p.add_argument("--method", default="irm")
  p.add_argument("--steps", type=int, default=irm_benchmark.STEPS)
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--x64", action="store_true", help="train in float64 (rounding's share)")
  args = p.parse_args(argv)
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  runs, params = start_from_dump(args.dump)
  if args.x64:
    wide = lambda a: a.astype(np.float64) if a.dtype == np.float32 else a
    runs = [{k: wide(v) for k, v in r.items()} for r in runs]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  cfg = irm_benchmark.IRMConfig(method=args.method, steps=args.steps, n_restarts=len(runs))
  hidden = params["featurizer"]["dense0"]["kernel"].shape[1]
  task = irm_benchmark.IRMTask(runs, hidden)
  task.init_params = lambda key: params  # the script's initial weights, in every run
  n = runs[0]["train_y"].shape[1]
  configs = [
    train.TrainConfig(
      method=args.method,
      test_envs=(),
      steps=irm_benchmark.updates(cfg),
      checkpoint_freq=args.eval_every,
      seed=r,
      hparams=irm_benchmark.benchmark_overrides(args.method, cfg, n),
      preset=irm_benchmark.benchmark_preset(args.method),
      per_domain_impl="vmap",
      progress=False,
      scan_steps=args.eval_every,
    )
    for r in range(len(runs))
  ]
  records = train.train_many(configs, task)
  print("updates  | env 0 without its last digit: train test gray | without its first digit")
  for recs in zip(*records):
    cols = "  |  ".join(
      f"{r['train_acc']:.5f} {r['test_acc']:.5f} {r['gray_acc']:.5f}" for r in recs
    )
    print(f"{recs[0]['step'] + 1:7d}  |  {cols}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
