r"""Reproduction reports: dgjax beside a paper's published table (see :mod:`dgjax.reproduce`).

    python -m experiments.reproduce irm_cmnist --data_dir /path/to/mnist --output report.md
    python -m experiments.reproduce domainbed --datasets ColoredMNIST RotatedMNIST \
        --methods erm irm vrex --output_dir sweeps/repro --data_dir /path/to/mnist

``irm_cmnist`` trains erm, irm, vrex, fishr, hgp and hutchinson (``--methods``) under the
IRM-style Colored MNIST scripts' protocol, ``--n_restarts`` each (10, as published), and prints
a Markdown table of train / test / gray-test accuracy, mean ± standard error, beside Fishr's
Table 2 and the gap in standard errors.

``domainbed`` runs DomainBed's sweep protocol through ``experiments.sweep`` (``--n_hparams``
random hparams x ``--n_trials`` trials x every test environment; 20 x 3 and the dataset's
steps by default, DomainBed's protocol), then selects by training-domain validation and by
the oracle and prints each dataset's table beside DomainBed's published one. A sweep already
in ``--output_dir`` is resumed, not redone.

Both write the report to ``--output`` (Markdown) when given; the report names its scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_IRM_METHODS = ("erm", "irm", "vrex", "fishr", "hgp", "hutchinson")
CACHE_HELP = (
  "directory of JAX's persistent compilation cache, 'off' to disable (default: "
  "$DGJAX_COMPILATION_CACHE, else ~/.cache/dgjax/jax; see dgjax.compilation_cache)"
)


def parse_args(argv):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  sub = p.add_subparsers(dest="benchmark", required=True)
  irm = sub.add_parser(
    "irm_cmnist",
    help="the IRM-style Colored MNIST scripts' protocol",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  irm.add_argument("--methods", nargs="+", default=list(DEFAULT_IRM_METHODS))
  irm.add_argument("--n_restarts", type=int, default=10)
  irm.add_argument("--steps", type=int, default=501, help="the scripts' loop length")
  irm.add_argument("--seed", type=int, default=0)
  irm.add_argument("--data_dir", default=None, help="MNIST IDX files (default: TFDS 'mnist')")
  irm.add_argument(
    "--restarts_impl",
    choices=["auto", "vmap", "sequential"],
    default="auto",
    help="auto: sequential on CPU, vmapped elsewhere",
  )
  irm.add_argument(
    "--results",
    default=None,
    help="JSON lines of each method's result, appended as it finishes; a method "
    "already there with the same restarts, steps and seed is not run again",
  )
  irm.add_argument("--output", default=None, help="write the Markdown report here")
  irm.add_argument("--compilation_cache", default=None, help=CACHE_HELP)
  db = sub.add_parser(
    "domainbed",
    help="DomainBed's sweep protocol and selection",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  db.add_argument("--datasets", nargs="+", default=["ColoredMNIST", "RotatedMNIST"])
  db.add_argument("--methods", nargs="+", default=["erm", "irm", "vrex"])
  db.add_argument("--n_hparams", type=int, default=20)
  db.add_argument("--n_trials", type=int, default=3)
  db.add_argument(
    "--test_envs",
    nargs="+",
    type=int,
    default=None,
    help="only the jobs holding out these environments (default: every one)",
  )
  db.add_argument("--steps", type=int, default=None, help="default: the dataset's (DomainBed's)")
  db.add_argument("--checkpoint_freq", type=int, default=None, help="default: the dataset's")
  db.add_argument(
    "--train_arg",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="passed to the sweep, e.g. max_examples=2000 (a reduced run)",
  )
  db.add_argument("--output_dir", required=True, help="the sweep directory")
  db.add_argument("--data_dir", default=None)
  db.add_argument("--launcher", choices=["local", "vmap"], default="vmap")
  db.add_argument("--max_parallel", type=int, default=1)
  db.add_argument("--output", default=None, help="write the Markdown report here")
  db.add_argument("--compilation_cache", default=None, help=CACHE_HELP)
  return p.parse_args(argv)


def fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def write(report: str, output: str | None) -> None:
  print(report)
  if output:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(report)
    print(f"report written to {output}")


def run_irm_cmnist(args) -> int:
  from dgjax import compilation_cache, irm_benchmark, methods, reproduce
  from dgjax.data import DataError, load_mnist
  from dgjax.results import append_jsonl, read_jsonl

  try:
    compilation_cache.setup(args.compilation_cache)  # before anything compiles
    for m in args.methods:
      methods.get_method(m)
    if args.n_restarts < 1 or args.steps < 2:
      raise ValueError("--n_restarts must be >= 1 and --steps >= 2")
    mnist = load_mnist(args.data_dir)
  except (ValueError, DataError) as e:
    return fail(str(e))
  impl = irm_benchmark.resolve_restarts_impl(args.restarts_impl)
  done = {}
  if args.results and Path(args.results).exists():
    for r in read_jsonl(args.results):
      if (r["n_restarts"], r["steps"], r["seed"]) == (args.n_restarts, args.steps, args.seed):
        done[r["method"]] = r
  results = []
  for m in args.methods:
    if m in done:
      print(f"== {m}: from {args.results}", flush=True)
      results.append(done[m])
      continue
    cfg = irm_benchmark.IRMConfig(
      method=m, steps=args.steps, n_restarts=args.n_restarts, seed=args.seed, restarts_impl=impl
    )
    print(f"== {m}: {args.n_restarts} restarts ({impl})", flush=True)
    r = irm_benchmark.run(
      cfg, mnist.images, mnist.labels, log=lambda line: print("  " + line, flush=True)
    )
    print(f"   {r['train_seconds']:.0f} s", flush=True)
    results.append(r)
    if args.results:
      append_jsonl(args.results, r)
  scale = (
    f"{results[0]['note']}; {args.steps} steps, {args.n_restarts} restarts per method, "
    f"seed {args.seed}; data: {mnist.source}"
  )
  write(reproduce.irm_cmnist_report(results, scale), args.output)
  return 0


def run_domainbed(args) -> int:
  from dgjax import collect, reproduce
  from experiments import sweep as sweep_cli

  argv = [
    "launch",
    "--datasets",
    *args.datasets,
    "--methods",
    *args.methods,
    "--n_hparams",
    str(args.n_hparams),
    "--n_trials",
    str(args.n_trials),
    "--output_dir",
    args.output_dir,
    "--launcher",
    args.launcher,
    "--max_parallel",
    str(args.max_parallel),
    "--quiet",
  ]
  for flag in ("steps", "checkpoint_freq", "data_dir", "compilation_cache"):
    if getattr(args, flag) is not None:
      argv += [f"--{flag}", str(getattr(args, flag))]
  if args.test_envs is not None:
    argv += ["--test_envs", *map(str, args.test_envs)]
  for item in args.train_arg:
    argv += ["--train_arg", item]
  code = sweep_cli.main(argv)
  if code == 2:
    return code
  records = collect.load_records(args.output_dir)
  if not records:
    return fail(f"no records under {args.output_dir}")
  envs = (
    "every test environment"
    if args.test_envs is None
    else f"test environment(s) {' '.join(map(str, args.test_envs))}"
  )
  scale = (
    f"{len(args.datasets)} dataset(s), hparams seeds 0..{args.n_hparams - 1} x "
    f"{args.n_trials} trial(s) x {envs}, steps "
    f"{args.steps or 'the dataset default'}"
    + (f", {', '.join(args.train_arg)}" if args.train_arg else "")
    + (f", data {args.data_dir}" if args.data_dir else "")
  )
  write(reproduce.domainbed_tables(records, scale), args.output)
  return 1 if code else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  return run_irm_cmnist(args) if args.benchmark == "irm_cmnist" else run_domainbed(args)


if __name__ == "__main__":
  sys.exit(main())
