"""A sweep's results as tables: DomainBed's ``collect_results.py`` and ``lib/reporting.py``
(Gulrajani & Lopez-Paz, ICLR 2021).

1. :func:`load_records` reads every ``results.jsonl`` under a directory.
2. :func:`group_records` groups the records by ``(trial_seed, dataset, method, test_env)``; a
   record of a run with two test environments belongs to both groups. The method is
   ``args.method`` (dgjax), else ``args.algorithm`` (DomainBed's records, read unchanged).
3. :func:`sweep_accs` picks the hyperparameter seed of every group with a selection method
   (:data:`dgjax.selection.SWEEP_SELECTION_METHODS`) and keeps its test accuracy.
4. :func:`results_tables` makes, per dataset, a table with one row per method and one column
   per environment of the dataset plus ``Avg``, and an ``Averages`` table over datasets, as
   DomainBed's ``print_results_tables``. A cell is the mean and standard error over trial
   seeds (:func:`mean_and_error`, DomainBed's ``format_mean``); an environment that was never
   a test environment (or whose groups the selection method cannot score) is ``X``, and
   ``Avg`` is ``X`` unless every environment has a result. In the Averages table, each
   trial's value is the mean over the test environments that trial has a result for, as
   DomainBed computes it (so a partial sweep has a number there; its dataset table shows
   which environments it covers).

As in DomainBed, every record found counts, whether or not its run has finished.
5. :func:`render` writes a table as plain text, Markdown or LaTeX; :func:`report` all of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from dgjax import domainbed_format
from dgjax import methods
from dgjax import selection
from dgjax.results import read_jsonl

Record = dict[str, Any]
Cell = Any  # (mean, err) in percent, a single percentage, or None (missing: "X")

FORMATS = ("text", "markdown", "latex")


def load_records(path: str | Path) -> list[Record]:
  """The records of every ``results.jsonl`` at or under ``path``, file by file in sorted
  path order. A malformed line raises naming the file and line (:func:`read_jsonl`)."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory")
  records = []
  for f in sorted(path.rglob("results.jsonl")):
    records.extend(read_jsonl(f))
  return records


def record_dataset(record: Record) -> str:
  return str(record["args"]["dataset"])


def record_method(record: Record) -> str:
  """``args.method`` (dgjax) or else ``args.algorithm`` (DomainBed)."""
  return domainbed_format.record_method(record)


def record_trial_seed(record: Record) -> int:
  return int(record["args"].get("trial_seed", 0))


class GroupKey(NamedTuple):
  trial_seed: int
  dataset: str
  method: str
  test_env: int


def group_records(records: Iterable[Record]) -> dict[GroupKey, list[Record]]:
  """DomainBed's ``get_grouped_records``: records by ``(trial_seed, dataset, method,
  test_env)``, one group per test environment of each record."""
  groups: dict[GroupKey, list[Record]] = {}
  for r in records:
    for env in selection.record_test_envs(r):
      key = GroupKey(record_trial_seed(r), record_dataset(r), record_method(r), env)
      groups.setdefault(key, []).append(r)
  return groups


class Selected(NamedTuple):
  """The run a selection method picked in one group."""

  hparams_seed: int
  val_acc: float
  test_acc: float
  step: int


def sweep_accs(
  groups: Mapping[GroupKey, Sequence[Record]], method: selection.SweepSelectionMethod
) -> dict[GroupKey, Selected]:
  """The selected run of every group the selection method can score (DomainBed's
  ``sweep_acc``; groups it cannot score, e.g. leave-one-out without held-out pairs, are
  left out)."""
  out = {}
  for key, recs in groups.items():
    chosen = selection.select_hparams(recs, key.test_env, method)
    if chosen is not None:
      seed, acc = chosen
      out[key] = Selected(seed, acc.val_acc, acc.test_acc, acc.step)
  return out


def mean_and_error(values: Sequence[float]) -> tuple[float, float] | None:
  """Mean and standard error in percent, as DomainBed's ``format_mean``:
  ``100 * mean`` and ``100 * std(values) / sqrt(n)`` with the population std (``ddof=0``);
  ``None`` for no values."""
  if not values:
    return None
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
  return 100 * mean, 100 * std / math.sqrt(n)


def average(cells: Sequence[Cell]) -> float | None:
  """The ``Avg`` column: the mean of the row's means, ``None`` if any is missing."""
  if not cells or any(c is None for c in cells):
    return None
  return sum(c[0] for c in cells) / len(cells)


@dataclasses.dataclass
class Table:
  """A results table: ``rows[i][0]`` is a row label, the other cells are :data:`Cell`."""

  title: str
  section: str  # the dataset's name, or "Averages"
  columns: list[str]  # including the row-label column
  rows: list[list[Cell]]


def method_order(names: Iterable[str]) -> list[str]:
  """Registered methods in registry order, then the others sorted (as DomainBed orders
  algorithms by ``algorithms.ALGORITHMS``)."""
  names = set(names)
  return [m for m in methods.METHODS if m in names] + sorted(names - set(methods.METHODS))


def dataset_environments(records: Sequence[Record]) -> list[str]:
  """The names of a dataset's environments: as many as the records with the most
  environments have, named by :func:`dgjax.domainbed_format.environment_names`."""
  widest = max(records, key=selection.num_envs)
  return domainbed_format.environment_names(widest)


def results_tables(
  records: Sequence[Record], method: selection.SweepSelectionMethod
) -> list[Table]:
  """One table per dataset (DomainBed's order, then the others sorted) and the ``Averages``
  table, as DomainBed's ``print_results_tables``: a column for every environment."""
  accs = sweep_accs(group_records(records), method)
  method_names = method_order(record_method(r) for r in records)
  datasets = domainbed_format.dataset_order(record_dataset(r) for r in records)
  tables = []
  for dataset in datasets:
    labels = dataset_environments([r for r in records if record_dataset(r) == dataset])
    rows = []
    for m in method_names:
      cells = [
        mean_and_error(
          [
            s.test_acc
            for k, s in sorted(accs.items())
            if (k.dataset, k.method, k.test_env) == (dataset, m, env)
          ]
        )
        for env in range(len(labels))
      ]
      rows.append([m] + cells + [average(cells)])
    tables.append(
      Table(
        f"Dataset: {dataset}, model selection method: {method.name}",
        dataset,
        ["Algorithm"] + labels + ["Avg"],
        rows,
      )
    )
  rows = []
  for m in method_names:
    cells = []
    for dataset in datasets:
      by_trial: dict[int, list[float]] = {}
      for k, s in sorted(accs.items()):
        if (k.dataset, k.method) == (dataset, m):
          by_trial.setdefault(k.trial_seed, []).append(s.test_acc)
      cells.append(mean_and_error([sum(v) / len(v) for _, v in sorted(by_trial.items())]))
    rows.append([m] + cells + [average(cells)])
  tables.append(
    Table(
      f"Averages, model selection method: {method.name}",
      "Averages",
      ["Algorithm"] + datasets + ["Avg"],
      rows,
    )
  )
  return tables


# ------------------------------------------------------------------------------ rendering
_PM = {"text": " +/- ", "markdown": " ± ", "latex": " $\\pm$ "}


def format_cell(cell: Cell, fmt: str) -> str:
  if cell is None:
    return "X"
  if isinstance(cell, str):
    return cell
  if isinstance(cell, tuple):
    return f"{cell[0]:.1f}{_PM[fmt]}{cell[1]:.1f}"
  return f"{cell:.1f}"


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}
_LATEX_SPECIAL.update(
  {"\\": "\\textbackslash{}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
)


def latex_escape(text: str) -> str:
  return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def render(table: Table, fmt: str = "text") -> str:
  """``table`` as ``"text"`` (DomainBed's ``print_table``), ``"markdown"`` or ``"latex"``
  (booktabs)."""
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  body = [[format_cell(c, fmt) for c in row] for row in table.rows]
  if fmt == "text":
    grid = [table.columns] + body
    widths = [max(len(r[j]) for r in grid) for j in range(len(table.columns))]
    lines = [f"-------- {table.title}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in grid]
    return "\n".join(lines)
  if fmt == "markdown":
    esc = lambda s: s.replace("|", "\\|")
    lines = [
      f"#### {esc(table.title)}",
      "",
      "| " + " | ".join(esc(c) for c in table.columns) + " |",
      "| " + " | ".join(["---"] + ["---:"] * (len(table.columns) - 1)) + " |",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines)
  head = " & ".join(["\\textbf{" + latex_escape(c) + "}" for c in table.columns]) + " \\\\"
  rows = [" & ".join([latex_escape(r[0])] + r[1:]) + " \\\\" for r in body]
  return "\n".join(
    [
      f"\\subsubsection{{{latex_escape(table.section)}}}",
      "",
      "\\begin{center}",
      "\\adjustbox{max width=\\textwidth}{%",
      "\\begin{tabular}{l" + "c" * (len(table.columns) - 1) + "}",
      "\\toprule",
      head,
      "\\midrule",
      *rows,
      "\\bottomrule",
      "\\end{tabular}}",
      "\\end{center}",
    ]
  )


def report(
  records: Sequence[Record],
  fmt: str = "text",
  selection_methods: Sequence[selection.SweepSelectionMethod] | None = None,
) -> str:
  """Every table of every selection method (DomainBed's order by default) as one document;
  LaTeX is a standalone ``article`` (booktabs, adjustbox)."""
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
  chosen = list(selection_methods or selection.SWEEP_SELECTION_METHODS.values())
  n_runs = len({json_key(r["args"]) for r in records})
  note = (
    f"Total records: {len(records)} from {n_runs} runs. Cells: test-domain accuracy (%), "
    f"mean {_PM[fmt].strip()} standard error over trial seeds; X: no result."
  )
  parts = []
  if fmt == "latex":
    parts += [
      "\\documentclass{article}",
      "\\usepackage{booktabs}",
      "\\usepackage{adjustbox}",
      "\\begin{document}",
      "\\section{Results}",
      f"% {note}",
    ]
  elif fmt == "markdown":
    parts += ["## Results", note]
  else:
    parts.append(note)
  for method in chosen:
    if fmt == "latex":
      parts.append(f"\\subsection{{Model selection: {latex_escape(method.name)}}}")
    elif fmt == "markdown":
      parts.append(f"### Model selection: {method.name}")
    parts += [render(t, fmt) for t in results_tables(records, method)]
  if fmt == "latex":
    parts.append("\\end{document}")
  return "\n\n".join(parts) + "\n"


def json_key(args: Mapping[str, Any]) -> str:
  return json.dumps(args, sort_keys=True, default=str)
