r"""Evaluation speed by chunk size: ms per example of DomainBed's Colored MNIST CNN forward pass.

    python bench/eval_chunks.py                    # this machine's threads
    python bench/eval_chunks.py --threads 1 --reps 5

Rows: one jitted accuracy-style program (logits, argmax, sum) over a chunk of ``n`` random
28x28x2 images, for each ``n`` in ``--sizes``, and a chunk of ``--chunk`` images evaluated in
sub-batches of ``s`` inside the program (:func:`dgjax.tasks.in_sub_batches`, ``lax.map``)
for each ``s`` in ``--sub``: what :class:`dgjax.tasks.DomainBedTask` does on CPU with
:data:`dgjax.tasks.CPU_EVAL_SUB_BATCH`. Variants are timed interleaved (each round runs every
variant on about ``--chunk`` examples), medians over ``--reps`` rounds. With ``--data_dir``
(MNIST IDX files) it also times the engine's whole evaluation of Colored MNIST
(``DomainBedTask.evaluate``, every in and out split) with whole chunks and in sub-batches,
wall and CPU seconds, and checks that the two give the same accuracies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--threads", type=int, default=0, help="XLA:CPU threads (0: XLA's default)")
  p.add_argument("--sizes", default="32,64,136,272,672,1000", help="whole-chunk sizes")
  p.add_argument("--chunk", type=int, default=672, help="the chunk the sub-batch rows split")
  p.add_argument("--sub", default="32,64,128", help="sub-batch sizes inside --chunk")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--data_dir", help="MNIST IDX files: also time a whole Colored MNIST evaluation")
  args = p.parse_args()
  if args.threads:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}"
    )

  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from dgjax import tasks
  from dgjax.models import mnist_cnn

  model = mnist_cnn(2, conv_impl="auto")
  params = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 2)))["params"]
  predict = lambda ms, x: model.apply({"params": ms[0]}, x)  # noqa: E731
  rng = np.random.default_rng(0)

  def program(fn):
    return jax.jit(lambda ms, x: jnp.sum(jnp.argmax(fn(ms, x), -1)))

  variants = []
  for n in (int(v) for v in args.sizes.split(",")):
    variants.append((f"whole chunk of {n}", program(predict), n))
  for s in (int(v) for v in args.sub.split(",")):
    variants.append(
      (
        f"chunk of {args.chunk} in sub-batches of {s}",
        program(tasks.in_sub_batches(predict, s)),
        args.chunk,
      )
    )
  state = (params, ())
  live = []
  for name, fn, n in variants:
    x = jnp.asarray(rng.uniform(size=(n, 28, 28, 2)).astype(np.float32))
    t = time.perf_counter()
    int(fn(state, x))
    live.append(
      {
        "name": name,
        "fn": fn,
        "x": x,
        "calls": max(1, args.chunk // n),
        "compile_s": time.perf_counter() - t,
        "ms": [],
      }
    )
  for _ in range(args.reps):
    for v in live:
      t = time.perf_counter()
      for _ in range(v["calls"]):
        int(v["fn"](state, v["x"]))
      v["ms"].append(1e3 * (time.perf_counter() - t) / (v["calls"] * v["x"].shape[0]))
  print(
    f"backend {jax.default_backend()}, jax {jax.__version__}, threads "
    f"{args.threads or 'default'}; MNIST_CNN forward + argmax, {args.reps} interleaved rounds"
  )
  print("| variant | ms / example | compile + first call s |")
  print("|---|---:|---:|")
  for v in live:
    print(f"| {v['name']} | {statistics.median(v['ms']):.3f} | {v['compile_s']:.1f} |")
  if args.data_dir:
    evaluation(args.data_dir, args.reps)


def evaluation(data_dir, reps):
  """Times ``DomainBedTask.evaluate`` on Colored MNIST: whole chunks vs sub-batches."""
  import jax

  from dgjax import runs, tasks
  from dgjax import train as train_lib

  cfg = train_lib.TrainConfig(method="erm", dataset="ColoredMNIST", data_dir=data_dir)
  task, _ = runs.load(cfg)
  state = (task.init_params(jax.random.key(0)), ())
  whole = lambda ms, x: task.model.apply({"params": ms[0]}, x)  # noqa: E731
  sub = tasks.per_example(lambda ms, x: task.model.apply({"params": ms[0]}, x))
  n = sum(len(s.y) for s in task.splits_in + task.splits_out)
  rows = {"whole chunks": [whole, [], []], "sub-batches (CPU default)": [sub, [], []]}
  accs = {}
  for name, (fn, _, _) in rows.items():
    accs[name] = task.evaluate(state, 0, fn)  # compiles
  assert accs["whole chunks"] == accs["sub-batches (CPU default)"], accs
  for _ in range(reps):
    for fn, walls, cpus in rows.values():
      t, c = time.perf_counter(), time.process_time()
      task.evaluate(state, 0, fn)
      walls.append(time.perf_counter() - t)
      cpus.append(time.process_time() - c)
  print(
    f"\nDomainBedTask.evaluate, Colored MNIST, {n} examples in {len(task.splits_in) * 2} splits, "
    f"chunk {task._chunk_size()}; accuracies equal"
  )
  print("| evaluation | wall s | CPU s |")
  print("|---|---:|---:|")
  for name, (_, walls, cpus) in rows.items():
    print(f"| {name} | {statistics.median(walls):.1f} | {statistics.median(cpus):.1f} |")


if __name__ == "__main__":
  main()
