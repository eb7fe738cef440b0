r"""DomainBed's ``update()`` (PyTorch) beside dgjax's jitted step, same model, data shape, hparams.

    python bench/vs_domainbed.py --domainbed /path/to/DomainBed          # erm,sand,irm,coral,fish,mldg,arm
    python bench/vs_domainbed.py --domainbed DB --methods all --threads 1,2 --json out.json
    python bench/vs_domainbed.py --domainbed DB --methods erm \
        --jax_variant "fastmath=--xla_cpu_enable_fast_math=true" --jax_variant "xla=conv:xla"

The model is DomainBed's Colored MNIST ``MNIST_CNN``, 2 training domains x 64 images of
28x28x2, 2 classes, both sides with DomainBed's ``ColoredMNIST`` default hparams (dgjax's,
which are meant to be the same, are passed to DomainBed's algorithm; a name whose default
differs is listed). DomainBed's side is a worker process in ``--torch_python`` (an
environment with torch; DomainBed's ``torchvision`` / ``timm`` imports are stubbed, the CNN
needs neither) timing ``algorithm.update(minibatches)`` on fixed random minibatches (DomainBed
loads data outside ``update``); dgjax's side is a worker running the step
:func:`dgjax.train.build_run` compiles (sampling from device-resident data included),
compiled before timing. Each thread count gets fresh workers: ``torch.set_num_threads(N)``
and, for dgjax, ``XLA_FLAGS`` without the Eigen thread pool and ``intra_op_parallelism_threads=N``;
with ``taskset`` both are pinned to the first N CPUs. Steps alternate between the sides
(torch, jax, jax', ..., the order reversed every round) so the load of a shared machine hits
both alike; cells are medians over ``--reps`` rounds, of wall time and (the ``CPU time``
ratio) of each process's CPU time, which time spent waiting for a core does not inflate.

``--jax_variant NAME=SPEC`` adds a dgjax worker: SPEC is ``;``-separated XLA flags
(``--xla_...``) and ``conv:IMPL`` / ``per_domain:IMPL`` settings. The first dgjax column is
the default (``conv_impl="auto"``, ``per_domain_impl="auto"``, no extra flags).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = "erm,sand,irm,coral,fish,mldg,arm"
# DomainBed algorithms not timed: TRM's constructor moves a tensor to CUDA.
SKIP = {"TRM": "constructor calls .cuda()"}

# DomainBed's networks.py imports torchvision.models and timm at the top (for ResNets/ViTs)
MISSING = "def __getattr__(name):\n  raise ImportError(f'stubbed for the DomainBed side of bench/: {name}')\n"


# --------------------------------------------------------------------------- workers
def torch_worker(threads: int) -> None:
  import numpy as np
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  from domainbed import algorithms, hparams_registry

  live = {}
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "build":
      name = cmd["algorithm"]
      hp = hparams_registry.default_hparams(name, "ColoredMNIST")
      differ = {k: [hp[k], v] for k, v in cmd["hparams"].items() if k in hp and hp[k] != v}
      hp.update({k: v for k, v in cmd["hparams"].items() if k in hp})
      alg = algorithms.get_algorithm_class(name)((2, 28, 28), 2, 2, hp)
      rng = np.random.default_rng(0)
      mbs = [
        (
          torch.from_numpy(rng.uniform(size=(64, 2, 28, 28)).astype(np.float32)),
          torch.from_numpy(rng.integers(0, 2, 64)),
        )
        for _ in range(2)
      ]
      alg.train()
      t = time.perf_counter()
      try:
        alg.update(mbs)  # first call: allocations, lazy state
      except Exception as e:  # e.g. Fishr: BackPACK's grad_batch unset under torch 2.13
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        continue
      live[cmd["method"]] = (alg, mbs)
      out = {"first_s": time.perf_counter() - t, "differ": differ}
    else:
      alg, mbs = live[cmd["method"]]
      t, c = time.perf_counter(), time.process_time()
      alg.update(mbs)
      out = {"ms": 1e3 * (time.perf_counter() - t), "cpu_ms": 1e3 * (time.process_time() - c)}
    print(json.dumps(out), flush=True)


def jax_worker(conv_impl: str, per_domain_impl: str) -> None:
  sys.path.insert(0, str(HERE.parent))
  sys.path.insert(0, str(HERE))
  import jax
  from common import compile_stats
  from hessian_step_time import cnn_task

  from dgjax import methods
  from dgjax import train as train_lib

  live = {}
  for line in sys.stdin:
    cmd = json.loads(line)
    m = cmd["method"]
    if cmd["op"] == "build":
      hp = methods.resolve_hparams(m, 0, {"batch_size": 64}, dataset="ColoredMNIST")
      task = cnn_task(2, 2000, 0, conv_impl)
      step, state = train_lib.build_run(
        m, task, hp, 0, train_lib.resolve_per_domain_impl(per_domain_impl)
      )
      stats = compile_stats(step, state, task.data)
      step = stats["compiled"]
      t = time.perf_counter()
      state, metrics = step(state, task.data)
      jax.block_until_ready(metrics)
      live[m] = [step, state, task.data]
      out = {"first_s": time.perf_counter() - t, "compile_s": stats["compile_s"]}
      out["gflop"] = stats["flops"] / 1e9
    else:
      v = live[m]
      t, c = time.perf_counter(), time.process_time()
      v[1], metrics = v[0](v[1], v[2])
      jax.block_until_ready(metrics)
      out = {"ms": 1e3 * (time.perf_counter() - t), "cpu_ms": 1e3 * (time.process_time() - c)}
    print(json.dumps(out, default=float), flush=True)


# --------------------------------------------------------------------------- driver
class Worker:
  def __init__(self, argv, env, cpus):
    self.p = subprocess.Popen(
      pinned(cpus) + argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )

  def ask(self, **cmd):
    self.p.stdin.write(json.dumps(cmd) + "\n")
    self.p.stdin.flush()
    while line := self.p.stdout.readline():
      try:
        return json.loads(line)
      except json.JSONDecodeError:  # something the method itself printed (DomainBed's URM)
        print(f"  [worker output] {line.rstrip()}", file=sys.stderr, flush=True)
    raise RuntimeError(f"worker {self.p.args} died on {cmd}")

  def close(self):
    self.p.stdin.close()
    self.p.wait()


def parse_variant(text):
  name, _, spec = text.partition("=")
  flags, conv, per_domain = [], "auto", "auto"
  for part in filter(None, spec.split(";")):
    if part.startswith("conv:"):
      conv = part[5:]
    elif part.startswith("per_domain:"):
      per_domain = part[11:]
    else:
      flags.append(part)
  return {"name": name, "flags": flags, "conv": conv, "per_domain": per_domain}


# What DomainBed imports at the top of datasets.py / networks.py / its scripts, stubbed: an
# environment with only torch runs its CNN, its update() and its sweep. Only MNIST is real: it
# reads the IDX files dgjax reads (``BENCH_MAX_EXAMPLES``: the first N digits).
STUBS = {
  "PIL/__init__.py": "__version__ = 'stub'\n",
  "PIL/Image.py": "",
  "PIL/ImageFile.py": "LOAD_TRUNCATED_IMAGES = False\n",
  "tqdm/__init__.py": "def tqdm(it=None, *a, **k):\n  return it\n",
  "timm.py": MISSING,
  "wilds/__init__.py": "",
  "wilds/datasets/__init__.py": "",
  "wilds/datasets/camelyon17_dataset.py": "Camelyon17Dataset = None\n",
  "wilds/datasets/fmow_dataset.py": "FMoWDataset = None\n",
  "torchvision/__init__.py": "__version__ = 'stub'\nfrom . import datasets, models, transforms\n",
  "torchvision/models.py": MISSING,
  "torchvision/transforms/__init__.py": "",
  "torchvision/transforms/functional.py": "def rotate(*a, **k):\n  raise NotImplementedError\n",
  "torchvision/datasets/folder.py": "",
  "torchvision/datasets/__init__.py": '''
import gzip, os
import numpy as np
import torch
from . import folder

ImageFolder = None


def _idx(path):
  with gzip.open(path, "rb") as f:
    raw = f.read()
  dims = raw[3]
  shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


class MNIST:
  def __init__(self, root, train=True, download=False):
    prefix = "train" if train else "t10k"
    images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if os.path.exists(images):
      x = _idx(images)
      y = _idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    else:
      x, y = np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)
    n = int(os.environ.get("BENCH_MAX_EXAMPLES", "0")) or None
    if not train and n is not None:
      n = max(0, n - len(_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"))))
    self.data = torch.from_numpy(x[:n].copy())
    self.targets = torch.from_numpy(y[:n].astype(np.int64))
''',
}


def stub_dir(root: Path) -> Path:
  for name, text in STUBS.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  return root


def pinned(cpus: str | None) -> list[str]:
  """The ``taskset`` prefix pinning a command to ``cpus`` (none without taskset)."""
  return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


def thread_env(threads: int, *xla_flags: str, **extra) -> dict:
  """The environment of a process computing with ``threads`` threads: torch's (OpenMP, MKL)
  and XLA:CPU's (no Eigen pool, ``intra_op_parallelism_threads``), CPU only."""
  env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  base = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
  env.update(XLA_FLAGS=" ".join([base, *xla_flags]), JAX_PLATFORMS="cpu", **extra)
  return env


def run_threads(args, methods, algorithms, hparams, threads, stubs, skipped):
  cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
  tenv = thread_env(threads, PYTHONPATH=f"{stubs}{os.pathsep}{Path(args.domainbed).resolve()}")
  torch = Worker([args.torch_python, __file__, "--worker", f"torch:{threads}"], tenv, cpus)
  jaxes = []
  for v in args.variants:
    env = thread_env(threads, *v["flags"])
    argv = [sys.executable, __file__, "--worker", f"jax:{v['conv']}:{v['per_domain']}"]
    jaxes.append(Worker(argv, env, cpus))
  info = {}
  for m in list(methods):
    t = torch.ask(op="build", method=m, algorithm=algorithms[m], hparams=hparams[m])
    if "error" in t:
      print(f"  [{threads} thread(s)] DomainBed's {algorithms[m]} fails, not timed: {t['error']}")
      skipped[m] = f"DomainBed's update raised {t['error'][:200]}"
      methods.remove(m)
      continue
    info[m] = {"torch": t, "jax": [j.ask(op="build", method=m) for j in jaxes]}
    print(f"  [{threads} thread(s)] built {m}: {json.dumps(info[m], default=str)}", flush=True)
  times = {m: [[] for _ in range(1 + len(jaxes))] for m in methods}
  cpu = {m: [[] for _ in range(1 + len(jaxes))] for m in methods}
  sides = [torch, *jaxes]
  for r in range(args.reps):
    order = list(range(len(sides)))
    if r % 2:
      order.reverse()
    for m in methods:
      for i in order:
        r = sides[i].ask(op="step", method=m)
        times[m][i].append(r["ms"])
        cpu[m][i].append(r["cpu_ms"])
  for w in sides:
    w.close()
  return {
    m: {
      "domainbed_ms": statistics.median(times[m][0]),
      "dgjax_ms": [statistics.median(t) for t in times[m][1:]],
      "domainbed_cpu_ms": statistics.median(cpu[m][0]),
      "dgjax_cpu_ms": [statistics.median(t) for t in cpu[m][1:]],
      "times": times[m],
      "cpu_times": cpu[m],
      **info[m],
    }
    for m in methods
  }


def print_table(n, rows, vnames):
  """One thread count's markdown table: wall ms and dgjax / DomainBed ratios (wall, CPU time)."""
  cols = " | ".join(f"{v} ms | {v} / DB | {v} / DB, CPU time" for v in vnames)
  print(f"\n{n} thread(s) per side\n\n| method | DomainBed ms | {cols} |")
  print("|---|---:|" + "---:|---:|---:|" * len(vnames))
  ratios = [[] for _ in vnames]
  cpu_ratios = [[] for _ in vnames]
  for m, r in rows.items():
    cells = []
    for i, (ms, cms) in enumerate(zip(r["dgjax_ms"], r.get("dgjax_cpu_ms", r["dgjax_ms"]))):
      ratios[i].append(ms / r["domainbed_ms"])
      cpu_ratios[i].append(cms / r.get("domainbed_cpu_ms", r["domainbed_ms"]))
      cells.append(f"{ms:.0f} | {ratios[i][-1]:.2f} | {cpu_ratios[i][-1]:.2f}")
    print(f"| {m} | {r['domainbed_ms']:.0f} | " + " | ".join(cells) + " |")
  med = " | ".join(
    f"| {statistics.median(q):.2f} | {statistics.median(c):.2f}" for q, c in zip(ratios, cpu_ratios)
  )
  print(f"| median ratio | | {med} |")


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--domainbed", help="a DomainBed checkout (the folder holding domainbed/)")
  p.add_argument("--torch_python", default=sys.executable, help="an interpreter with torch")
  p.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of dgjax names, or 'all'")
  p.add_argument("--threads", default="1,2", help="comma list of thread counts per side")
  p.add_argument("--reps", type=int, default=9)
  p.add_argument("--jax_variant", action="append", default=[], help="NAME=SPEC (docstring)")
  p.add_argument("--json", help="write the rows here")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    kind, *rest = args.worker.split(":")
    return torch_worker(int(rest[0])) if kind == "torch" else jax_worker(*rest)
  if not args.domainbed or not (Path(args.domainbed) / "domainbed" / "algorithms.py").exists():
    p.error(
      f"--domainbed must be a DomainBed checkout with domainbed/algorithms.py: {args.domainbed!r}"
    )
  args.variants = [parse_variant("dgjax=")] + [parse_variant(v) for v in args.jax_variant]

  sys.path.insert(0, str(HERE.parent))
  from dgjax import methods as registry

  db_text = (Path(args.domainbed) / "domainbed" / "algorithms.py").read_text()
  wanted = sorted(registry.METHODS) if args.methods == "all" else args.methods.split(",")
  methods, algorithms, hparams, skipped = [], {}, {}, {}
  for m in wanted:
    alg = registry.get_method(m).domainbed_name  # an unknown name raises, listing the valid ones
    if not alg or f"class {alg}(" not in db_text:
      skipped[m] = "not in this DomainBed"
    elif alg in SKIP:
      skipped[m] = SKIP[alg]
    else:
      methods.append(m)
      hp = registry.resolve_hparams(m, 0, {"batch_size": 64}, dataset="ColoredMNIST")
      algorithms[m], hparams[m] = alg, json.loads(json.dumps(hp, default=float))

  load = [os.getloadavg()]
  with tempfile.TemporaryDirectory() as tmp:
    stubs = stub_dir(Path(tmp))
    results = {}
    for n in (int(t) for t in args.threads.split(",")):
      t0 = time.time()
      results[n] = run_threads(args, methods, algorithms, hparams, n, stubs, skipped)
      load.append(os.getloadavg())
      print(f"  [{n} thread(s)] {time.time() - t0:.0f} s", flush=True)

  vnames = [v["name"] for v in args.variants]
  print(
    f"\nDomainBed update() vs dgjax step, Colored MNIST MNIST_CNN 2 x 64, medians of "
    f"{args.reps} alternated rounds; load average before/after: "
    + ", ".join(f"{a:.1f}" for a, _, _ in load)
  )
  for n, rows in results.items():
    print_table(n, rows, vnames)
    differ = {m: r["torch"]["differ"] for m, r in rows.items() if r["torch"]["differ"]}
    if differ:
      print(f"hparam defaults that differ (DomainBed, dgjax; dgjax's used): {differ}")
  if skipped:
    print(f"not timed: {skipped}")
  if args.json:
    Path(args.json).write_text(
      json.dumps(
        {"variants": args.variants, "load": load, "skipped": skipped, "results": results},
        indent=1,
        default=float,
      )
    )


if __name__ == "__main__":
  main()
