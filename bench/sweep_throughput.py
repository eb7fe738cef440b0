r"""A sweep's throughput: DomainBed's own ``sweep.py`` beside dgjax's sweep launchers.

    python bench/sweep_throughput.py --domainbed /path/to/DomainBed --torch_python TORCH_PY \
        --data_dir $DGJAX_DATA_DIR/mnist-first10k --sides domainbed,local,vmap --cpus 0 \
        --steps 100 --max_examples 3000 --json out.json
    python bench/sweep_throughput.py --combine a.json b.json     # one table from several runs

Each side runs DomainBed's sweep protocol on Colored MNIST (``--methods`` x ``--n_hparams`` x
``--n_trials`` x the 3 single test environments, hparams drawn as DomainBed draws them, with
``--hparams`` fixed on both sides) from an empty output directory, and is timed from the
launch command to its exit:

* ``domainbed``: ``python -m domainbed.scripts.sweep launch --command_launcher local
  --single_test_envs`` in ``--torch_python`` (each job is DomainBed's ``scripts/train.py``
  in its own process, one after another, with its data loader's worker processes).
  DomainBed's ``torchvision``, ``PIL``, ``tqdm``, ``timm`` and ``wilds`` imports are stubbed;
  the stub ``torchvision.datasets.MNIST`` reads the same IDX files as dgjax (``--data_dir``;
  ``train=False`` is empty when there is no ``t10k`` pair) and keeps the first
  ``--max_examples`` digits, as dgjax's ``max_examples`` does.
* ``local``: ``python -m experiments.sweep launch --launcher local`` (one process per job,
  one at a time), with a fresh compilation cache (so the first job of each program compiles
  it and the others read it).
* ``vmap``: the same with ``--launcher vmap`` (the jobs that differ only in seeds and float
  hparams trained as one vmapped program).

Every process is pinned (``taskset``) to ``--cpus`` with one compute thread
(``OMP_NUM_THREADS=1``; XLA without its Eigen pool). The table gives wall time, jobs done,
jobs per hour and seconds per job. The two datasets' splits come from each side's own random
permutation, so the accuracies are not compared here; the records are left in ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_domainbed import pinned, stub_dir, thread_env


def timed(argv, env, cwd, log: Path) -> float:
  t = time.perf_counter()
  with open(log, "w") as f:
    rc = subprocess.call(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
  wall = time.perf_counter() - t
  if rc:
    print(f"  exit status {rc}; see {log}", flush=True)
  return wall


def count_jobs(out: Path) -> tuple[int, int]:
  if not out.is_dir():
    return 0, 0
  jobs = [d for d in out.iterdir() if d.is_dir() and not d.name.startswith(".")]
  return len(jobs), sum((d / "done").exists() for d in jobs)


def run_side(side: str, args, work: Path) -> dict:
  out = work / side
  shutil.rmtree(out, ignore_errors=True)
  pin = pinned(args.cpus)
  hparams = json.dumps(args.hparams)
  common = ["--n_hparams", str(args.n_hparams), "--n_trials", str(args.n_trials)]
  common += ["--steps", str(args.steps), "--hparams", hparams, "--data_dir", args.data_dir]
  common += ["--output_dir", str(out)]
  if side == "domainbed":
    stubs = stub_dir(work / "stubs")
    bin_dir = work / "bin"  # DomainBed's local launcher runs `python -m domainbed.scripts.train`
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").unlink(missing_ok=True)  # never write through an old link
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{args.torch_python}" "$@"\n')
    (bin_dir / "python").chmod(0o755)  # a wrapper, not a link: a venv's python finds its venv
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    pythonpath = f"{stubs}{os.pathsep}{Path(args.domainbed).resolve()}"
    env = thread_env(1, PATH=path, PYTHONPATH=pythonpath)
    env["BENCH_MAX_EXAMPLES"] = str(args.max_examples or 0)
    names = args.domainbed_names
    argv = pin + [args.torch_python, "-m", "domainbed.scripts.sweep", "launch"]
    argv += ["--datasets", "ColoredMNIST", "--algorithms", *names, *common]
    argv += ["--command_launcher", "local", "--single_test_envs", "--skip_confirmation"]
  else:
    env = thread_env(1)
    cache = work / f"cache-{side}"
    shutil.rmtree(cache, ignore_errors=True)
    argv = pin + [sys.executable, "-m", "experiments.sweep", "launch"]
    argv += ["--datasets", "ColoredMNIST", "--methods", *args.methods, *common]
    argv += ["--launcher", side, "--compilation_cache", str(cache)]
    if args.max_examples:
      argv += ["--train_arg", f"max_examples={args.max_examples}"]
  print(f"  {side}: {' '.join(argv)}", flush=True)
  wall = timed(argv, env, HERE.parent, work / f"{side}.log")
  jobs, done = count_jobs(out)
  row = {"side": side, "wall_s": wall, "jobs": jobs, "done": done}
  row.update(load=os.getloadavg()[0], steps=args.steps, max_examples=args.max_examples)
  print(f"  {side}: {done}/{jobs} jobs done in {wall:.0f} s", flush=True)
  return row


LABELS = {
  "domainbed": "DomainBed `sweep.py`, local launcher",
  "local": "dgjax `experiments.sweep`, local launcher",
  "vmap": "dgjax `experiments.sweep`, vmap launcher",
}


def print_table(rows) -> None:
  base = next((r["wall_s"] for r in rows if r["side"] == "domainbed"), None)
  print("\n| launcher | jobs done | wall s | jobs / hour | s / job | wall / DomainBed |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    per_hour = 3600 * r["done"] / r["wall_s"]
    ratio = f"{r['wall_s'] / base:.2f}" if base else ""
    print(
      f"| {LABELS[r['side']]} | {r['done']}/{r['jobs']} | {r['wall_s']:.0f} | {per_hour:.0f} "
      f"| {r['wall_s'] / max(r['done'], 1):.1f} | {ratio} |"
    )


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--domainbed", help="a DomainBed checkout (the folder holding domainbed/)")
  p.add_argument("--torch_python", default=sys.executable, help="an interpreter with torch")
  p.add_argument("--data_dir", help="MNIST IDX files (train-*-idx*-ubyte.gz, optional t10k-*)")
  p.add_argument("--sides", default="domainbed,local,vmap")
  p.add_argument("--methods", nargs="+", default=["erm", "sand"], help="dgjax names")
  p.add_argument("--n_hparams", type=int, default=4)
  p.add_argument("--n_trials", type=int, default=2)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--hparams", type=json.loads, default={"batch_size": 64})
  p.add_argument("--max_examples", type=int, default=None, help="first N digits (both sides)")
  p.add_argument("--cpus", default="0", help="taskset CPU list for every process ('' for none)")
  p.add_argument("--work_dir", help="sweeps and logs go here (default: a temporary folder)")
  p.add_argument("--json", help="write the rows here")
  p.add_argument("--combine", nargs="+", help="print one table from these --json files")
  args = p.parse_args(argv)
  if args.combine:
    return print_table([r for f in args.combine for r in json.loads(Path(f).read_text())])
  sides = args.sides.split(",")
  if unknown := set(sides) - set(LABELS):
    p.error(f"--sides: unknown {sorted(unknown)}; valid: {sorted(LABELS)}")
  if not args.data_dir or not (Path(args.data_dir) / "train-images-idx3-ubyte.gz").exists():
    p.error(f"--data_dir must hold train-images-idx3-ubyte.gz: {args.data_dir!r}")
  if "domainbed" in sides and not (Path(args.domainbed or "") / "domainbed" / "scripts").exists():
    p.error(f"--domainbed must be a DomainBed checkout (domainbed/scripts/): {args.domainbed!r}")
  sys.path.insert(0, str(HERE.parent))
  from dgjax import methods as registry

  try:
    args.domainbed_names = [registry.get_method(m).domainbed_name for m in args.methods]
  except ValueError as e:
    p.error(f"--methods: {e}")
  if "domainbed" in sides:
    text = (Path(args.domainbed) / "domainbed" / "algorithms.py").read_text()
    lacking = [m for m, n in zip(args.methods, args.domainbed_names) if f"class {n}(" not in text]
    if lacking:
      p.error(f"--methods: {lacking} are not algorithms of this DomainBed ({args.domainbed})")
  args.data_dir = str(Path(args.data_dir).resolve())
  with tempfile.TemporaryDirectory() as tmp:
    work = Path(args.work_dir or tmp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = [run_side(side, args, work) for side in sides]
  print_table(rows)
  if args.json:
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
