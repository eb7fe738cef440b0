r"""Print a sweep's results tables (DomainBed's ``collect_results.py``; see :mod:`dgjax.collect`).

    python -m experiments.collect_results sweeps/cmnist                 # plain text
    python -m experiments.collect_results sweeps/cmnist --format=markdown
    python -m experiments.collect_results sweeps/cmnist --format=latex --save
    python -m experiments.collect_results --input_dir sweeps/cmnist --latex   # DomainBed's flags

For each model selection method (training-domain validation, leave-one-domain-out
cross-validation, test-domain oracle): one table per dataset (methods x environments, plus
Avg; ``X`` where an environment has no result, and ``Avg`` then) and an Averages table over
datasets; cells are mean +/- standard error over trials. Reads dgjax's records and
DomainBed's (``args.algorithm``) alike; DomainBed's own ``collect_results`` reads dgjax's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dgjax import collect
from dgjax import selection

SUFFIX = {"text": "txt", "markdown": "md", "latex": "tex"}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Print a sweep's results tables.")
  p.add_argument(
    "sweep_dir",
    nargs="?",
    help="directory holding the runs (searched recursively for results.jsonl)",
  )
  p.add_argument("--input_dir", help="the same as sweep_dir (DomainBed's flag)")
  p.add_argument("--format", choices=collect.FORMATS, default="text")
  p.add_argument(
    "--latex", action="store_true", help="the same as --format=latex (DomainBed's flag)"
  )
  p.add_argument(
    "--selection",
    nargs="+",
    choices=sorted(selection.SWEEP_SELECTION_METHODS),
    default=list(selection.SWEEP_SELECTION_METHODS),
    help="model selection methods (default: all three)",
  )
  p.add_argument(
    "--save",
    action="store_true",
    help="also write results.txt / results.md / results.tex into sweep_dir",
  )
  args = p.parse_args(argv)
  if (args.sweep_dir is None) == (args.input_dir is None):
    print("error: give the sweep directory once: as sweep_dir or as --input_dir", file=sys.stderr)
    return 2
  args.sweep_dir = args.sweep_dir or args.input_dir
  if args.latex:
    args.format = "latex"
  try:
    records = collect.load_records(args.sweep_dir)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not records:
    print(f"error: no results.jsonl under {args.sweep_dir}", file=sys.stderr)
    return 2
  try:
    text = collect.report(
      records, args.format, [selection.SWEEP_SELECTION_METHODS[s] for s in args.selection]
    )
  except KeyError as e:
    print(
      f"error: a record lacks a key ({e.args[0]}; need args.dataset, args.method or "
      f"args.algorithm, args.test_envs, args.hparams_seed)",
      file=sys.stderr,
    )
    return 2
  print(text, end="")
  if args.save:
    out = Path(args.sweep_dir) / f"results.{SUFFIX[args.format]}"
    out.write_text(text)
    print(f"\nwritten: {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
