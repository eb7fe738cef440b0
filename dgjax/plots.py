"""Training curves from ``results.jsonl``: per-environment accuracy, loss and penalty over
steps, drawn with matplotlib (Agg, no display needed).

A run's figure has one panel of accuracy (each environment's in-split solid, out-split
dashed; environments by name, ``+90%``, from ``args.env_names`` or the dataset's DomainBed
names; test environments marked ``(test)``) and one of the training objective's terms that
the run logged (``loss`` and ``objective``; ``penalty`` on its own right axis), plus a panel of
``kept_fraction`` (masks) or ``penalty_weight`` when logged. Records are DomainBed's keys
(Gulrajani & Lopez-Paz, ICLR 2021; :mod:`dgjax.domainbed_format`). A sweep's PNGs are named by
run (:func:`run_name`: dataset, method, test environments, hparams seed, trial seed), not by
the md5 names of its run directories.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from dgjax import domainbed_format
from dgjax.results import read_jsonl

Record = dict[str, Any]

LOSS_KEYS = ("loss", "penalty", "objective")
EXTRA_KEYS = ("kept_fraction", "penalty_weight")


def find_runs(path: str | Path) -> list[Path]:
  """Run directories at or under ``path``: every directory holding a ``results.jsonl``."""
  path = Path(path)
  if (path / "results.jsonl").is_file():
    return [path]
  return sorted(f.parent for f in path.rglob("results.jsonl"))


def _series(records: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      steps.append(r["step"])
      values.append(float(v))
  return steps, values


def _test_envs(record: Record) -> tuple[int, ...] | None:
  try:
    return domainbed_format.record_test_envs(record)
  except KeyError:
    return None


def _method(record: Record) -> str | None:
  try:
    return domainbed_format.record_method(record)
  except KeyError:
    return None


def run_title(records: Sequence[Record]) -> str:
  """``"<dataset>, <method>, test envs [<names>], hparams_seed <h>, trial_seed <t>"`` from the
  first record's ``args`` (what is there of it)."""
  args = records[0].get("args", {})
  parts = [str(v) for v in (args.get("dataset"), _method(records[0])) if v is not None]
  test_envs = _test_envs(records[0])
  if test_envs is not None:
    names = domainbed_format.environment_names(records[0])
    parts.append(
      "test envs [" + ", ".join(names[e] if e < len(names) else str(e) for e in test_envs) + "]"
    )
  parts += [f"{k} {args[k]}" for k in ("hparams_seed", "trial_seed") if k in args]
  return ", ".join(parts)


def run_name(records: Sequence[Record]) -> str | None:
  """A file name for a run: ``<dataset>_<method>_test<i>[-<j>]_hparams<h>_trial<t>`` from
  the first record's ``args`` (characters other than letters, digits, ``.+-`` become ``-``);
  ``None`` when the args lack any of these."""
  args = records[0].get("args", {})
  method, test_envs = _method(records[0]), _test_envs(records[0])
  if (
    method is None
    or test_envs is None
    or any(k not in args for k in ("dataset", "hparams_seed", "trial_seed"))
  ):
    return None
  parts = [
    str(args["dataset"]),
    method,
    "test" + "-".join(map(str, test_envs)),
    f"hparams{args['hparams_seed']}",
    f"trial{args['trial_seed']}",
  ]
  return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", p) for p in parts)


def run_figure(records: Sequence[Record], title: str | None = None):
  """One run's curves as a matplotlib ``Figure`` (not attached to pyplot: no display, no
  global state). The accuracy panel's legend names environments (``+90% (test) in``)."""
  import matplotlib
  from matplotlib.figure import Figure

  if not records:
    raise ValueError("no records to plot")
  records = sorted(records, key=lambda r: r["step"])
  test_envs = _test_envs(records[0]) or ()
  names = domainbed_format.environment_names(records[0])
  loss_keys = [k for k in LOSS_KEYS if _series(records, k)[0]]
  extra_keys = [k for k in EXTRA_KEYS if _series(records, k)[0]]
  n_panels = 1 + bool(loss_keys) + bool(extra_keys)
  fig = Figure(figsize=(5.5 * n_panels, 4))
  axes = fig.subplots(1, n_panels, squeeze=False)[0]

  ax = axes[0]
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, name in enumerate(names):
    color = colors[i % len(colors)]
    label = f"{name}{' (test)' if i in test_envs else ''}"
    for split, style in (("in", "-"), ("out", "--")):
      ax.plot(
        *_series(records, f"env{i}_{split}_acc"),
        style,
        color=color,
        label=f"{label} {split}",
        linewidth=2.2 if i in test_envs else 1.2,
      )
  ax.set(xlabel="step", ylabel="accuracy", title="accuracy (solid: in, dashed: out)")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)

  if loss_keys:
    plot_losses(axes[1], records, loss_keys)
  if extra_keys:
    ax = axes[-1]
    for k in extra_keys:
      ax.plot(*_series(records, k), label=k)
    ax.set(xlabel="step", title="other metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

  fig.suptitle(title if title is not None else run_title(records), fontsize=10)
  fig.tight_layout()
  return fig


def plot_run(records: Sequence[Record], output: str | Path, title: str | None = None) -> Path:
  """Draws one run's curves (:func:`run_figure`) to ``output`` (PNG); returns the path."""
  fig = run_figure(records, title)
  output = Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(output, dpi=100)
  return output


def plot_losses(ax, records: Sequence[Record], keys: Sequence[str]) -> None:
  """``loss`` (and ``objective``) on the left axis, ``penalty`` on its own right axis: the two
  differ by orders of magnitude for penalised methods."""
  left = [k for k in keys if k != "penalty"]
  lines = [ax.plot(*_series(records, k), label=k, color=f"C{j}")[0] for j, k in enumerate(left)]
  ax.set(xlabel="step", ylabel=" / ".join(left), title="training loss and penalty")
  ax.grid(alpha=0.3)
  if "penalty" in keys:
    right = ax.twinx()
    lines += right.plot(*_series(records, "penalty"), label="penalty", color="C3", linestyle=":")
    values = _series(records, "penalty")[1]
    if min(values) > 0 and max(values) / min(values) > 100:
      right.set_yscale("log")
    right.set_ylabel("penalty")
  ax.legend(lines, [l.get_label() for l in lines], fontsize=8)


def plot_path(path: str | Path, output: str | Path | None = None) -> list[Path]:
  """Plots a run directory, or every run under a sweep directory.

  A single run goes to ``output`` (default ``<run>/curves.png``); the runs of a sweep go to
  ``<output>/<run_name>.png`` (default output directory: ``<sweep>/plots``), named by
  :func:`run_name`; runs whose names collide, or whose records lack the arguments, are
  named (also) by their path relative to the sweep, ``/`` as ``_``. Returns the PNG paths.
  """
  path = Path(path)
  runs = find_runs(path)
  if not runs:
    raise FileNotFoundError(f"no results.jsonl at or under {path}")
  if runs == [path]:
    return [plot_run(read_jsonl(path / "results.jsonl"), output or path / "curves.png")]
  out_dir = Path(output) if output is not None else path / "plots"
  named = []
  for run in runs:
    records = read_jsonl(run / "results.jsonl")
    if records:
      named.append((run, records, run_name(records)))
  counts: dict[str | None, int] = {}
  for _, _, name in named:
    counts[name] = counts.get(name, 0) + 1
  written = []
  for run, records, name in named:
    rel = "_".join(run.relative_to(path).parts)
    if name is None:
      name = rel
    elif counts[name] > 1:
      name = f"{name}_{rel}"
    written.append(plot_run(records, out_dir / f"{name}.png"))
  return written
