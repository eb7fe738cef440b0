r"""Plot training curves (see :mod:`dgjax.plots`).

    python -m experiments.plot <run_dir>                   # -> <run_dir>/curves.png
    python -m experiments.plot sweeps/cmnist               # -> sweeps/cmnist/plots/<run>.png
    python -m experiments.plot <run_dir> --output curves.png

A sweep's PNGs are named by run, e.g. ``ColoredMNIST_sand_test2_hparams3_trial0.png``
(dataset, method, test environments, hparams seed, trial seed), not by the md5 names of the
job directories. Prints the path of every PNG written.
"""

from __future__ import annotations

import argparse
import sys

from dgjax import plots


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description="Plot per-environment accuracy and loss/penalty over steps."
  )
  p.add_argument("path", help="a run directory (with results.jsonl) or a sweep directory")
  p.add_argument(
    "--output",
    default=None,
    help="PNG file for a run; directory for a sweep (default <run>/curves.png, <sweep>/plots)",
  )
  args = p.parse_args(argv)
  try:
    written = plots.plot_path(args.path, args.output)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
