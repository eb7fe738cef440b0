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

from dgjax import config as config_lib
from experiments import cli

DEFAULT_IRM_METHODS = ("erm", "irm", "vrex", "fishr", "hgp", "hutchinson")
CACHE_HELP = (
  "directory of JAX's persistent compilation cache, 'off' to disable (default: "
  "$DGJAX_COMPILATION_CACHE, else ~/.cache/dgjax/jax; see dgjax.compilation_cache)"
)


def parse_args(argv):
  from dgjax import irm_benchmark
  from experiments import sweep as sweep_cli

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
  # the rest of the benchmark's config, one option per IRMConfig field (its defaults: the
  # published protocol)
  cli.add_arguments(irm, config_lib.flag_specs(irm_benchmark.IRMConfig), skip=("method",))
  irm.add_argument(
    "--results",
    default=None,
    help="JSON lines of each method's result, appended as it finishes; a method "
    "already there with the same config (its identity fields) is not run again",
  )
  irm.add_argument("--output", default=None, help="write the Markdown report here")
  irm.add_argument("--compilation_cache", default=None, help=CACHE_HELP)
  db = sub.add_parser(
    "domainbed",
    help="DomainBed's sweep protocol and selection",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  sweep_cli.add_arguments(db)  # the sweep's own options (experiments.sweep)
  db.set_defaults(
    command="launch",
    quiet=True,
    datasets=["ColoredMNIST", "RotatedMNIST"],
    methods=["erm", "irm", "vrex"],
    launcher="vmap",
  )
  db.add_argument("--output", default=None, help="write the Markdown report here")
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
  from dgjax import compilation_cache, irm_benchmark, reproduce
  from dgjax.data import DataError, load_mnist
  from dgjax.results import append_jsonl, read_jsonl

  try:
    compilation_cache.setup(args.compilation_cache)  # before anything compiles
    fields = cli.argument_fields(args, irm_benchmark.IRMConfig, skip=("method",))
    configs = irm_benchmark.method_configs(args.methods, **fields)
    mnist = load_mnist(fields["data_dir"])
  except (ValueError, DataError) as e:
    return fail(str(e))
  stored = read_jsonl(args.results) if args.results and Path(args.results).exists() else []
  results = []
  for cfg in configs:
    done = irm_benchmark.stored_result(stored, cfg)
    if done is not None:
      print(f"== {cfg.method}: from {args.results}", flush=True)
      results.append(done)
      continue
    impl = irm_benchmark.resolve_restarts_impl(cfg.restarts_impl)
    print(f"== {cfg.method}: {cfg.n_restarts} restarts ({impl})", flush=True)
    r = irm_benchmark.run(
      cfg, mnist.images, mnist.labels, log=lambda line: print("  " + line, flush=True)
    )
    print(f"   {r['train_seconds']:.0f} s", flush=True)
    results.append(r)
    if args.results:
      append_jsonl(args.results, r)
  cfg = configs[0]
  scale = (
    f"{results[0]['note']}; {cfg.steps} steps, {cfg.n_restarts} restarts per method, "
    f"seed {cfg.seed}; data: {mnist.source}"
  )
  write(reproduce.irm_cmnist_report(results, scale), args.output)
  return 0


def run_domainbed(args) -> int:
  from dgjax import collect, reproduce
  from experiments import sweep as sweep_cli

  code = sweep_cli.run(args)  # launch, quietly (parse_args' defaults)
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
    f"{len(args.datasets)} dataset(s), hparams seeds {args.n_hparams_from}.."
    f"{args.n_hparams - 1} x {args.n_trials} trial(s) x {envs}, steps "
    f"{args.steps or 'the dataset default'}"
    + (f", {', '.join(args.train_arg)}" if args.train_arg else "")
    + (f", data {args.data_dir}" if args.data_dir else "")
  )
  write(reproduce.domainbed_tables(records, scale), args.output)
  return 1 if code else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    return run_irm_cmnist(args) if args.benchmark == "irm_cmnist" else run_domainbed(args)
  except KeyboardInterrupt:  # what finished is kept (--results; the sweep's job directories)
    print("\ninterrupted (Ctrl-C); run the same command again to continue", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
