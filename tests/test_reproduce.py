"""The reproduction reports (dgjax.reproduce, experiments.reproduce): published tables, gaps in
standard errors, and both benchmarks' commands end to end at toy scale."""

import math

import pytest

from dgjax import irm_benchmark, reproduce, selection
from experiments import reproduce as reproduce_cli
from test_collect import table_records


def test_published_tables_have_one_cell_per_environment():
  for sel, datasets in reproduce.DOMAINBED_PUBLISHED.items():
    assert sel in {s.name for s in reproduce.REPORT_SELECTIONS}
    for dataset, rows in datasets.items():
      width = {"ColoredMNIST": 3, "RotatedMNIST": 6}[dataset]
      assert {"erm", "irm", "vrex", "coral"} <= set(rows)
      assert all(len(cells) == width for cells in rows.values()), dataset
  # spot checks against the source (results.tex): ERM's averages 51.5 and 57.8 on ColoredMNIST
  erm = reproduce.DOMAINBED_PUBLISHED[selection.TRAINING_DOMAIN.name]["ColoredMNIST"]["erm"]
  assert erm == [(71.7, 0.1), (72.9, 0.2), (10.0, 0.1)]
  oracle = reproduce.DOMAINBED_PUBLISHED[selection.ORACLE.name]["ColoredMNIST"]["erm"]
  assert round(sum(m for m, _ in oracle) / 3, 1) == 57.8
  assert irm_benchmark.PUBLISHED["fishr"] == ((71.0, 0.9), (69.5, 1.0), (70.2, 1.1))


def test_gap_in_standard_errors():
  assert reproduce.gap((13.0, 3.0), (9.0, 4.0)) == pytest.approx(4.0 / 5.0)
  assert math.isnan(reproduce.gap((1.0, 0.0), (2.0, 0.0)))
  # the IRM table: published std over 10 restarts -> SE = std / sqrt(10)
  g = irm_benchmark.gap_in_standard_errors((70.0, 3.0, 1.0), (71.0, math.sqrt(10)))
  assert g == pytest.approx(-1.0 / math.sqrt(2))


def test_domainbed_tables_put_ours_beside_the_published_rows():
  text = reproduce.domainbed_tables(table_records(), "toy records")
  assert "dgjax: toy records." in text and "results.tex" in text
  lines = text.splitlines()
  i = lines.index("### ColoredMNIST, model selection: training-domain validation set")
  assert lines[i + 2] == "| algorithm | source | +90% | +80% | -90% | Avg |"
  assert lines[i + 4] == "| erm | dgjax | 20.0 ± 7.1 | 30.0 ± 7.1 | 40.0 ± 7.1 | 30.0 |"
  assert lines[i + 5] == "| erm | DomainBed | 71.7 ± 0.1 | 72.9 ± 0.2 | 10.0 ± 0.1 | 51.5 |"
  gaps = [float(c) for c in lines[i + 6].split("|")[3:6]]
  assert gaps == pytest.approx(
    [
      (20 - 71.7) / math.hypot(7.071, 0.1),
      (30 - 72.9) / math.hypot(7.071, 0.2),
      (40 - 10.0) / math.hypot(7.071, 0.1),
    ],
    abs=0.06,
  )
  assert "| sand | DomainBed | not in DomainBed's table |" in text
  assert "### ColoredMNIST, model selection: test-domain validation set (oracle)" in text


def test_irm_cmnist_report_end_to_end(data_dir, tmp_path, capsys):
  out = tmp_path / "report.md"
  args = [
    "irm_cmnist",
    "--methods",
    "vrex",
    "--n_restarts",
    "2",
    "--steps",
    "3",
    "--data_dir",
    str(data_dir / "mnist-first10k"),
    "--results",
    str(tmp_path / "r.jsonl"),
    "--output",
    str(out),
  ]
  assert reproduce_cli.main(args) == 0
  text = out.read_text()
  # a second call finds vrex's result in --results and writes the same report without training
  assert reproduce_cli.main(args) == 0
  assert "== vrex: from" in capsys.readouterr().out and out.read_text() == text
  assert "8333 train / last 1/6 = 1667 test" in text and "3 steps, 2 restarts" in text
  assert "| vrex | 2 |" in text and "67.2 ± 1.5" in text  # Fishr's V-REx row beside ours
  row = next(line for line in text.splitlines() if line.startswith("| vrex | 2 |"))
  assert len(row.split("|")[-2].split("/")) == 3  # a gap for each accuracy


def test_domainbed_report_end_to_end(data_dir, tmp_path, capsys):
  """DomainBed's protocol through the sweep at toy scale: ColoredMNIST's test environment 2,
  one hparams draw, one trial, two steps on 300 digits (every environment is the default)."""
  out = tmp_path / "report.md"
  code = reproduce_cli.main(
    [
      "domainbed",
      "--datasets",
      "ColoredMNIST",
      "--methods",
      "erm",
      "--n_hparams",
      "1",
      "--n_trials",
      "1",
      "--steps",
      "2",
      "--test_envs",
      "2",
      "--checkpoint_freq",
      "1",
      "--train_arg",
      "max_examples=300",
      "--output_dir",
      str(tmp_path / "sweep"),
      "--data_dir",
      str(data_dir / "mnist-first10k"),
      "--output",
      str(out),
    ]
  )
  assert code == 0, capsys.readouterr().err
  text = out.read_text()
  assert "test environment(s) 2, steps 2, max_examples=300" in text
  for sel in ("training-domain validation set", "test-domain validation set (oracle)"):
    block = text.split(f"### ColoredMNIST, model selection: {sel}")[1]
    ours = next(line for line in block.splitlines() if line.startswith("| erm | dgjax |"))
    assert ours.split("|")[3:6][:2] == [" X ", " X "] and "X" not in ours.split("|")[5]
    assert "| erm | DomainBed |" in block and "| erm | gap (SE) |" in block
