r"""Launch a DomainBed-style hyperparameter sweep (see :mod:`dgjax.sweep`).

    python -m experiments.sweep launch --datasets ColoredMNIST --methods erm sand \
        --n_hparams 20 --n_trials 3 --steps 5001 --output_dir sweeps/cmnist \
        --data_dir /path/to/mnist --launcher local --max_parallel 2

Prints every job with its state (Done / Running / Incomplete / Not launched) and a summary,
then: ``launch`` runs the jobs neither done nor running (``--launcher local``: processes
``python -m experiments.train``; ``vmap``: groups of jobs as one vmapped program in this
process; ``submitit``: Slurm or submitit's local executor; ``dry_run``: prints the commands
only), ``delete_incomplete`` removes the directories of incomplete jobs, ``status`` stops there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dgjax import compilation_cache
from dgjax import config as config_lib
from dgjax import sweep
from experiments import cli


def parse_train_args(items):
  """``KEY=VALUE`` pairs; a value is JSON when it parses (numbers, true/false), else a string."""
  out = {}
  for item in items or []:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"--train_arg wants KEY=VALUE, got {item!r}")
    try:
      out[key] = json.loads(value)
    except ValueError:
      out[key] = value
  return out


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The sweep's options: one per :class:`dgjax.sweep.SweepConfig` field, one per config field
  it passes to every job (:func:`dgjax.config.sweep_passed_fields`), ``--train_arg``, the
  sweep directory and the launchers' options (how and where jobs run: not run
  configuration)."""
  cli.add_arguments(p, config_lib.flag_specs(sweep.SweepConfig))
  cli.add_arguments(p, config_lib.sweep_passed_fields())
  p.add_argument(
    "--train_arg",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="another training config field for every job, e.g. max_examples=2000 "
    f"(part of the job hash); one of: {', '.join(sweep.train_arg_fields())}",
  )
  p.add_argument(
    "--output_dir", required=True, help="the sweep directory: one subdirectory per job"
  )
  p.add_argument(
    "--launcher",
    choices=["local", "vmap", "submitit", "dry_run"],
    default="local",
    help="local: one process per job; vmap: jobs that differ only in seeds and "
    "non-structural hparams train as ONE program in this process (vmapped; on CPU by "
    "default a loop over the runs: --train_arg runs_impl=...)",
  )
  p.add_argument(
    "--max_parallel", type=int, default=1, help="jobs at once (local; Slurm array parallelism)"
  )
  p.add_argument(
    "--incomplete",
    choices=sorted(sweep.INCOMPLETE_POLICIES),
    default="resume",
    help="what launch does with incomplete jobs: resume them from their last "
    "checkpoint (--resume), restart them (--overwrite) or skip them",
  )
  p.add_argument(
    "--compilation_cache",
    default=None,
    help=compilation_cache.FLAG_HELP + "; every job of the sweep reads and fills it",
  )
  p.add_argument("--python", default=sys.executable, help="interpreter in the commands")
  p.add_argument(
    "--module",
    default="experiments.train",
    help="module the commands run (it takes experiments.train's flags)",
  )
  p.add_argument("--submitit_cluster", choices=["auto", "slurm", "local", "debug"], default="auto")
  p.add_argument(
    "--submitit_dir", default=None, help="submitit logs (default <output_dir>/.submitit)"
  )
  p.add_argument("--slurm_partition", default=None)
  p.add_argument("--timeout_min", type=int, default=24 * 60)
  p.add_argument("--gpus_per_node", type=int, default=None)
  p.add_argument("--cpus_per_task", type=int, default=None)
  p.add_argument("--mem_gb", type=int, default=None)
  p.add_argument(
    "--wait", action="store_true", help="submitit: wait for the jobs and report failures"
  )
  p.add_argument("--yes", action="store_true", help="do not ask before deleting")
  p.add_argument("--quiet", action="store_true", help="print only the summary, not every job")


def parse_args(argv):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument("command", choices=["launch", "delete_incomplete", "status"])
  add_arguments(p)
  return p.parse_args(argv)


def sweep_config(args: argparse.Namespace) -> sweep.SweepConfig:
  """The sweep's :class:`~dgjax.sweep.SweepConfig` from its parsed options."""
  return sweep.SweepConfig(
    **cli.argument_fields(args, sweep.SweepConfig),
    job_args={spec.name: getattr(args, spec.name) for spec in config_lib.sweep_passed_fields()},
    train_args=parse_train_args(args.train_arg),
  )


def main(argv=None) -> int:
  try:
    return run(parse_args(argv))
  except KeyboardInterrupt:  # the launchers stop the jobs they started; each keeps its records
    print(
      "\ninterrupted (Ctrl-C); `status` lists what each job kept, `launch` resumes the "
      "incomplete ones",
      file=sys.stderr,
    )
    return 130


def run(args: argparse.Namespace) -> int:
  """Runs ``args.command`` on the sweep of ``args`` (:func:`add_arguments`); the exit code."""
  try:
    if args.max_parallel < 1:
      raise ValueError(f"--max_parallel must be >= 1, got {args.max_parallel}")
    jobs = sweep_config(args).jobs(args.output_dir)
    sweep.check_configs(jobs)  # every job's config and hparams, before any work
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  if not args.quiet:
    for job in jobs:
      print(job.describe())
  print(sweep.summary_line(jobs))

  if args.command == "status":
    return 0
  if args.command == "delete_incomplete":
    doomed = [j for j in jobs if j.state == sweep.INCOMPLETE]
    print(f"About to delete {len(doomed)} incomplete jobs.")
    if doomed and not args.yes and input("Are you sure? (y/n) ").strip().lower()[:1] != "y":
      print("Nothing deleted.")
      return 0
    print(f"Deleted {len(sweep.delete_incomplete(jobs))} jobs.")
    return 0

  if args.launcher != "dry_run":
    try:  # this process (vmap) and every job it starts (they inherit the variable)
      cache = compilation_cache.setup(args.compilation_cache)
    except compilation_cache.CompilationCacheError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    os.environ[compilation_cache.ENV_VAR] = str(cache) if cache is not None else "off"
  if args.launcher == "dry_run":
    for line in sweep.dry_run_commands(jobs, args.incomplete, args.python, args.module):
      print(line)
    return 0
  if args.launcher == "vmap":
    codes = sweep.launch_vmap(jobs, args.incomplete)
    failed = sum(1 for c in codes.values() if c)
    print(f"{len(codes) - failed} jobs finished, {failed} failed.")
    return 1 if failed else 0
  if args.launcher == "local":
    print(
      f"Launching {len(sweep.jobs_to_launch(jobs, args.incomplete))} jobs "
      f"({args.max_parallel} at a time)."
    )
    codes = sweep.launch_local(jobs, args.incomplete, args.max_parallel, args.python, args.module)
    failed = sum(1 for c in codes.values() if c)
    print(f"{len(codes) - failed} jobs finished, {failed} failed.")
    return 1 if failed else 0

  cluster = None if args.submitit_cluster == "auto" else args.submitit_cluster
  params = {"timeout_min": args.timeout_min}
  for name in ("slurm_partition", "gpus_per_node", "cpus_per_task", "mem_gb"):
    if getattr(args, name) is not None:
      params[name] = getattr(args, name)
  executor = sweep.make_submitit_executor(
    args.submitit_dir or Path(args.output_dir) / ".submitit",
    cluster=cluster,
    max_parallel=args.max_parallel,
    **params,
  )
  submitted = sweep.launch_submitit(jobs, executor, args.incomplete, args.python, args.module)
  print(
    f"Submitted {len(submitted)} jobs: {', '.join(s.job_id for _, s in submitted[:5])}"
    f"{' ...' if len(submitted) > 5 else ''}"
  )
  if not args.wait:
    return 0
  failed = 0
  for job, s in submitted:
    try:
      status = s.result()
    except Exception as e:  # noqa: BLE001  (submitit re-raises the job's failure)
      failed += 1
      text = str(e).strip()
      print(
        f"FAILED {job.output_dir.name}: {text.splitlines()[-1] if text else e} "
        f"(see {job.output_dir / 'err.txt'})"
      )
      continue
    if status != "done":
      print(f"{job.output_dir.name}: {status}")
  print(f"{len(submitted) - failed} jobs finished, {failed} failed.")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
