"""Reproduction reports: our numbers beside the published ones, with the gap in standard errors.

Two benchmarks (``python -m experiments.reproduce BENCHMARK``):

* ``irm_cmnist``: the IRM-style Colored MNIST scripts' protocol (:mod:`dgjax.irm_benchmark`),
  beside Fishr's Table 2 (:data:`dgjax.irm_benchmark.PUBLISHED`);
* ``domainbed``: DomainBed's sweep protocol (random hparams x trials x every test
  environment, :mod:`dgjax.sweep`), selected by training-domain validation and by the oracle
  (:mod:`dgjax.collect`), beside DomainBed's published tables (:data:`DOMAINBED_PUBLISHED`).

The gap of a cell is ``(ours - published) / sqrt(se_ours^2 + se_published^2)``: |gap| below
about 2 is within noise; a run at another scale (fewer digits, hparams, trials or steps) is
not expected to match, and the report says at which scale it ran.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from dgjax import collect
from dgjax import irm_benchmark
from dgjax import selection

Cell = tuple[float, float]  # (mean, standard error) in %

#: Where :data:`DOMAINBED_PUBLISHED` comes from.
DOMAINBED_SOURCE = (
  "DomainBed (Gulrajani & Lopez-Paz, ICLR 2021), "
  "domainbed/results/2020_10_06_7df6f06/results.tex: 20 hparams x 3 trials, "
  "5,000 steps, full MNIST; mean ± standard error over the 3 trials"
)


def _rows(text: str) -> dict[str, list[Cell]]:
  """``"erm 71.7 0.1 72.9 0.2 ..."`` lines -> ``{method: [(mean, se), ...]}``."""
  out = {}
  for line in text.strip().splitlines():
    name, *values = line.split()
    nums = [float(v) for v in values]
    out[name] = list(zip(nums[0::2], nums[1::2]))
  return out


#: DomainBed's published tables, transcribed from :data:`DOMAINBED_SOURCE`:
#: ``{selection method name: {dataset: {method: [(mean, se) per test environment]}}}``,
#: environments in DomainBed's order (ColoredMNIST +90%, +80%, -90%; RotatedMNIST 0..75).
DOMAINBED_PUBLISHED: dict[str, dict[str, dict[str, list[Cell]]]] = {
  selection.TRAINING_DOMAIN.name: {
    "ColoredMNIST": _rows("""
            erm 71.7 0.1 72.9 0.2 10.0 0.1
            irm 72.5 0.1 73.3 0.5 10.2 0.3
            groupdro 73.1 0.3 73.2 0.2 10.0 0.2
            mixup 72.7 0.4 73.4 0.1 10.1 0.1
            mldg 71.5 0.2 73.1 0.2 9.8 0.1
            coral 71.6 0.3 73.1 0.1 9.9 0.1
            mmd 71.4 0.3 73.1 0.2 9.9 0.3
            dann 71.4 0.9 73.1 0.1 10.0 0.0
            cdann 72.0 0.2 73.0 0.2 10.2 0.1
            mtl 70.9 0.2 72.8 0.3 10.5 0.1
            sagnet 71.8 0.2 73.0 0.2 10.3 0.0
            arm 82.0 0.5 76.5 0.3 10.2 0.0
            vrex 72.4 0.3 72.9 0.4 10.2 0.0
            rsc 71.9 0.3 73.1 0.2 10.0 0.2"""),
    "RotatedMNIST": _rows("""
            erm 95.9 0.1 98.9 0.0 98.8 0.0 98.9 0.0 98.9 0.0 96.4 0.0
            irm 95.5 0.1 98.8 0.2 98.7 0.1 98.6 0.1 98.7 0.0 95.9 0.2
            groupdro 95.6 0.1 98.9 0.1 98.9 0.1 99.0 0.0 98.9 0.0 96.5 0.2
            mixup 95.8 0.3 98.9 0.0 98.9 0.0 98.9 0.0 98.8 0.1 96.5 0.3
            mldg 95.8 0.1 98.9 0.1 99.0 0.0 98.9 0.1 99.0 0.0 95.8 0.3
            coral 95.8 0.3 98.8 0.0 98.9 0.0 99.0 0.0 98.9 0.1 96.4 0.2
            mmd 95.6 0.1 98.9 0.1 99.0 0.0 99.0 0.0 98.9 0.0 96.0 0.2
            dann 95.0 0.5 98.9 0.1 99.0 0.0 99.0 0.1 98.9 0.0 96.3 0.2
            cdann 95.7 0.2 98.8 0.0 98.9 0.1 98.9 0.1 98.9 0.1 96.1 0.3
            mtl 95.6 0.1 99.0 0.1 99.0 0.0 98.9 0.1 99.0 0.1 95.8 0.2
            sagnet 95.9 0.3 98.9 0.1 99.0 0.1 99.1 0.0 99.0 0.1 96.3 0.1
            arm 96.7 0.2 99.1 0.0 99.0 0.0 99.0 0.1 99.1 0.1 96.5 0.4
            vrex 95.9 0.2 99.0 0.1 98.9 0.1 98.9 0.1 98.7 0.1 96.2 0.2
            rsc 94.8 0.5 98.7 0.1 98.8 0.1 98.8 0.0 98.9 0.1 95.9 0.2"""),
  },
  selection.ORACLE.name: {
    "ColoredMNIST": _rows("""
            erm 71.8 0.4 72.9 0.1 28.7 0.5
            irm 72.0 0.1 72.5 0.3 58.5 3.3
            groupdro 73.5 0.3 73.0 0.3 36.8 2.8
            mixup 72.5 0.2 73.9 0.4 28.6 0.2
            mldg 71.9 0.3 73.5 0.2 29.1 0.9
            coral 71.1 0.2 73.4 0.2 31.1 1.6
            mmd 69.0 2.3 70.4 1.6 50.6 0.2
            dann 72.4 0.5 73.9 0.5 24.9 2.7
            cdann 71.8 0.5 72.9 0.1 33.8 6.4
            mtl 71.2 0.2 73.5 0.2 28.0 0.6
            sagnet 72.1 0.3 73.2 0.3 29.4 0.5
            arm 84.9 0.9 76.8 0.6 27.9 2.1
            vrex 72.8 0.3 73.0 0.3 55.2 4.0
            rsc 72.0 0.1 73.2 0.1 30.2 1.6"""),
    "RotatedMNIST": _rows("""
            erm 95.3 0.2 98.7 0.1 98.9 0.1 98.7 0.2 98.9 0.0 96.2 0.2
            irm 94.9 0.6 98.7 0.2 98.6 0.1 98.6 0.2 98.7 0.1 95.2 0.3
            groupdro 95.9 0.1 99.0 0.1 98.9 0.1 98.8 0.1 98.6 0.1 96.3 0.4
            mixup 95.8 0.3 98.7 0.0 99.0 0.1 98.8 0.1 98.8 0.1 96.6 0.2
            mldg 95.7 0.2 98.9 0.1 98.8 0.1 98.9 0.1 98.6 0.1 95.8 0.4
            coral 96.2 0.2 98.8 0.1 98.8 0.1 98.8 0.1 98.9 0.1 96.4 0.2
            mmd 96.1 0.2 98.9 0.0 99.0 0.0 98.8 0.0 98.9 0.0 96.4 0.2
            dann 95.9 0.1 98.9 0.1 98.6 0.2 98.7 0.1 98.9 0.0 96.3 0.3
            cdann 95.9 0.2 98.8 0.0 98.7 0.1 98.9 0.1 98.8 0.1 96.1 0.3
            mtl 96.1 0.2 98.9 0.0 99.0 0.0 98.7 0.1 99.0 0.0 95.8 0.3
            sagnet 95.9 0.1 99.0 0.1 98.9 0.1 98.6 0.1 98.8 0.1 96.3 0.1
            arm 95.9 0.4 99.0 0.1 98.8 0.1 98.9 0.1 99.1 0.1 96.7 0.2
            vrex 95.5 0.2 99.0 0.0 98.7 0.2 98.8 0.1 98.8 0.0 96.4 0.0
            rsc 95.4 0.1 98.6 0.1 98.6 0.1 98.9 0.0 98.8 0.1 95.4 0.3"""),
  },
}

#: The selection methods a DomainBed report shows (those :data:`DOMAINBED_PUBLISHED` has).
REPORT_SELECTIONS = (selection.TRAINING_DOMAIN, selection.ORACLE)


def gap(ours: Cell, published: Cell) -> float:
  """``(ours - published) / sqrt(se_ours^2 + se_published^2)``; ``nan`` when both SEs are 0."""
  scale = math.hypot(ours[1], published[1])
  return (ours[0] - published[0]) / scale if scale > 0 else float("nan")


def _cell(c: Cell | None) -> str:
  return "X" if c is None else f"{c[0]:.1f} ± {c[1]:.1f}"


def _avg(cells: Sequence[Cell | None]) -> str:
  return "X" if any(c is None for c in cells) else f"{sum(c[0] for c in cells) / len(cells):.1f}"


def domainbed_tables(
  records: Sequence[Mapping[str, Any]],
  scale: str,
  published: Mapping[str, Mapping[str, Mapping[str, list[Cell]]]] = DOMAINBED_PUBLISHED,
) -> str:
  """Markdown: for each selection method and dataset of ``records``, three rows per method:
  ours (mean ± SE over trials, :func:`dgjax.collect.results_tables`), DomainBed's published
  row, and the gap in standard errors per test environment. ``scale`` says how the sweep ran."""
  parts = [
    f"## DomainBed protocol: dgjax beside DomainBed's published tables",
    "",
    f"dgjax: {scale}.",
    f"Published: {DOMAINBED_SOURCE}.",
    "Cells: test-environment accuracy (%), mean ± standard error over trials; "
    "gap: (dgjax - published) / sqrt(SE_dgjax² + SE_published²); X: no result.",
  ]
  for sel in REPORT_SELECTIONS:
    for table in collect.results_tables(records, sel):
      if table.section == "Averages":
        continue
      pub = published.get(sel.name, {}).get(table.section, {})
      parts += [
        "",
        f"### {table.section}, model selection: {sel.name}",
        "",
        "| algorithm | source | " + " | ".join(table.columns[1:]) + " |",
        "|---|---|" + "---:|" * (len(table.columns) - 1),
      ]
      for row in table.rows:
        method, cells = row[0], row[1:-1]
        parts.append(
          f"| {method} | dgjax | " + " | ".join(_cell(c) for c in cells) + f" | {_avg(cells)} |"
        )
        if method not in pub:
          parts.append(f"| {method} | DomainBed | not in DomainBed's table |" + " |" * (len(cells)))
          continue
        p = pub[method]
        parts.append(
          f"| {method} | DomainBed | " + " | ".join(_cell(c) for c in p) + f" | {_avg(p)} |"
        )
        gaps = ["" if c is None else f"{gap(c, pc):+.1f}" for c, pc in zip(cells, p)]
        parts.append(f"| {method} | gap (SE) | " + " | ".join(gaps) + " | |")
  return "\n".join(parts) + "\n"


def irm_cmnist_report(results: Sequence[Mapping[str, Any]], scale: str) -> str:
  """Markdown: the IRM-style table (:func:`dgjax.irm_benchmark.format_summary`) with its
  scale and the source of the published rows."""
  return (
    "\n".join(
      [
        "## IRM-style Colored MNIST: dgjax beside the published table",
        "",
        f"dgjax: {scale}.",
        f"Published: {irm_benchmark.PUBLISHED_SOURCE}.",
        "Cells: final accuracy (%), mean ± standard error over restarts; gap: (dgjax - published) "
        "/ sqrt(SE_dgjax² + SE_published²), SE_published = std / sqrt(10).",
        "",
        irm_benchmark.format_summary(list(results)),
      ]
    )
    + "\n"
  )
