"""Training-curve plots (dgjax.plots, experiments.plot) from hand-made results.jsonl files."""

import hashlib
import json

import pytest

from dgjax import domainbed_format
from dgjax import plots
from dgjax.results import append_jsonl
from experiments import plot as plot_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_args(
  method="irm", test_envs=(2,), hparams_seed=0, trial_seed=0, env_names=None, dataset="ColoredMNIST"
):
  return domainbed_format.domainbed_args(
    method=method,
    algorithm=method.upper(),
    dataset=dataset,
    test_envs=list(test_envs),
    hparams_seed=hparams_seed,
    trial_seed=trial_seed,
    env_names=env_names,
  )


def write_run(run_dir, penalty=False, steps=(0, 10, 20), args=None):
  args = args or run_args()
  for s in steps:
    r = {"step": s, "loss": 0.7 - 0.01 * s, "args": args}
    for i in range(3):
      r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = 0.5 + 0.01 * s * (i != 2), 0.5
    if penalty:
      r["penalty"], r["penalty_weight"] = 1.0 / (s + 1), 1.0
    append_jsonl(run_dir / "results.jsonl", r)


def is_png(path):
  data = path.read_bytes()
  return len(data) > 1000 and data.startswith(PNG_MAGIC)


def legend(records):
  fig = plots.run_figure(records)
  return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def records_of(args, n=3):
  r = {"step": 0, "args": args}
  for i in range(n):
    r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = 0.5, 0.5
  return [r]


def test_legend_names_environments():
  # DomainBed's names for the dataset when the records carry none
  assert legend(records_of(run_args())) == [
    "+90% in",
    "+90% out",
    "+80% in",
    "+80% out",
    "-90% (test) in",
    "-90% (test) out",
  ]
  # the records' own args.env_names first
  assert legend(records_of(run_args(env_names=["red", "green", "blue"], test_envs=[0]))) == [
    "red (test) in",
    "red (test) out",
    "green in",
    "green out",
    "blue in",
    "blue out",
  ]
  # an unknown dataset, or names that do not match the environments: env<i>
  unknown = {
    "step": 0,
    "env0_in_acc": 0.5,
    "env0_out_acc": 0.5,
    "env1_in_acc": 0.5,
    "env1_out_acc": 0.5,
    "args": {"dataset": "Mine", "method": "erm", "test_envs": [1]},
  }
  assert legend([unknown]) == ["env0 in", "env0 out", "env1 (test) in", "env1 (test) out"]
  assert legend(records_of(run_args(), n=2)) == ["env0 in", "env0 out", "env1 in", "env1 out"]


def test_plot_run_command_writes_a_png(tmp_path, capsys):
  run = tmp_path / "run"
  run.mkdir()
  write_run(run, penalty=True)
  assert plot_cli.main([str(run)]) == 0
  assert capsys.readouterr().out.strip() == str(run / "curves.png")
  assert is_png(run / "curves.png")
  assert plot_cli.main([str(run), "--output", str(tmp_path / "x" / "c.png")]) == 0
  assert is_png(tmp_path / "x" / "c.png")


def md5_dir(root, args):
  run = root / hashlib.md5(json.dumps(args, sort_keys=True).encode()).hexdigest()
  run.mkdir(parents=True)
  return run


def test_sweep_plots_are_named_by_run_not_md5(tmp_path, capsys):
  sweep = tmp_path / "sweep"
  for args in (run_args("sand", [2], 3, 1), run_args("erm", [0, 1], 0, 0)):
    write_run(md5_dir(sweep, args), penalty=True, args=args)
  assert plot_cli.main([str(sweep)]) == 0
  written = sorted(p.rsplit("/", 1)[-1] for p in capsys.readouterr().out.split())
  assert written == [
    "ColoredMNIST_erm_test0-1_hparams0_trial0.png",
    "ColoredMNIST_sand_test2_hparams3_trial1.png",
  ]
  assert all(is_png(sweep / "plots" / n) for n in written)


def test_sweep_plot_names_that_collide_or_lack_args_use_the_directory(tmp_path, capsys):
  sweep = tmp_path / "sweep"
  for name in ("a", "b"):  # the same run arguments (e.g. differing only in other flags)
    (sweep / name).mkdir(parents=True)
    write_run(sweep / name, penalty=name == "a")
  (sweep / "c" / "d").mkdir(parents=True)
  append_jsonl(
    sweep / "c" / "d" / "results.jsonl",
    {"step": 0, "env0_in_acc": 0.5, "env0_out_acc": 0.5, "args": {}},
  )
  assert plot_cli.main([str(sweep)]) == 0
  written = [p.rsplit("/", 1)[-1] for p in capsys.readouterr().out.split()]
  assert written == [
    "ColoredMNIST_irm_test2_hparams0_trial0_a.png",
    "ColoredMNIST_irm_test2_hparams0_trial0_b.png",
    "c_d.png",
  ]
  assert all(is_png(sweep / "plots" / n) for n in written)


def test_run_name_and_title():
  recs = records_of(run_args("and", [16], 3, 1, dataset="Spirals"), n=17)
  assert plots.run_name(recs) == "Spirals_and_test16_hparams3_trial1"
  assert plots.run_title(recs) == "Spirals, and, test envs [test], hparams_seed 3, trial_seed 1"
  # DomainBed's own records (args.algorithm) and old dgjax ones (args.test_env)
  theirs = [
    {
      "step": 0,
      "args": {
        "dataset": "PACS",
        "algorithm": "ERM",
        "test_envs": [0, 3],
        "hparams_seed": 0,
        "trial_seed": 2,
      },
    }
  ]
  assert plots.run_name(theirs) == "PACS_ERM_test0-3_hparams0_trial2"
  old = [
    {
      "step": 0,
      "args": {
        "dataset": "ColoredMNIST",
        "method": "erm",
        "test_env": 2,
        "hparams_seed": 1,
        "trial_seed": 0,
      },
    }
  ]
  assert plots.run_name(old) == "ColoredMNIST_erm_test2_hparams1_trial0"
  # unsafe characters in a name become '-'; missing arguments: no name
  odd = [
    {
      "step": 0,
      "args": {
        "dataset": "a/b c",
        "method": "m",
        "test_envs": [0],
        "hparams_seed": 0,
        "trial_seed": 0,
      },
    }
  ]
  assert plots.run_name(odd) == "a-b-c_m_test0_hparams0_trial0"
  assert plots.run_name([{"step": 0, "args": {"dataset": "D"}}]) is None


def test_plot_errors(tmp_path, capsys):
  assert plot_cli.main([str(tmp_path)]) == 2
  assert "no results.jsonl" in capsys.readouterr().err
  with pytest.raises(ValueError, match="no records"):
    plots.plot_run([], tmp_path / "x.png")
