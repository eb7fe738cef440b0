"""Model selection across a sweep and the results tables (dgjax.selection, dgjax.collect,
experiments.collect_results), on hand-made records with known answers."""

import hashlib
import json
import math

import numpy as np
import pytest

from dgjax import collect
from dgjax import domainbed_format
from dgjax import methods
from dgjax import selection
from dgjax.results import append_jsonl
from experiments import collect_results


def rec(step, test_envs, hseed, ins, outs=None, trial=0, method="erm", dataset="ColoredMNIST"):
  """One evaluation record: ``ins``/``outs`` are the in/out accuracies of envs 0, 1, 2."""
  outs = outs or ins
  r = {
    "step": step,
    "args": {
      "dataset": dataset,
      "method": method,
      "test_envs": list(test_envs),
      "hparams_seed": hseed,
      "trial_seed": trial,
    },
  }
  for i, (a, b) in enumerate(zip(ins, outs)):
    r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = a, b
  return r


# Test env 2. hparams seed 0: best training-domain validation at step 1 (0.8, test 0.2);
# seed 1: best at step 0 (0.7, test 0.5). Last steps: seed 0 test out 0.25, seed 1 0.85.
IID_GROUP = [
  rec(0, [2], 0, [0, 0, 0.3], [0.6, 0.6, 0.9]),
  rec(1, [2], 0, [0, 0, 0.2], [0.8, 0.8, 0.25]),
  rec(0, [2], 1, [0, 0, 0.5], [0.7, 0.7, 0.1]),
  rec(1, [2], 1, [0, 0, 0.9], [0.6, 0.6, 0.85]),
]


def test_training_domain_validation_across_hparams():
  assert selection.iid_run_acc(IID_GROUP[:2], 2) == selection.RunAcc(0.8, 0.2, 1)
  assert selection.iid_run_acc(IID_GROUP[2:], 2) == selection.RunAcc(0.7, 0.5, 0)
  seed, acc = selection.select_hparams(IID_GROUP, 2, selection.TRAINING_DOMAIN)
  assert (seed, acc.test_acc, acc.step) == (0, 0.2, 1)


def test_oracle_takes_the_last_step_and_selects_on_test_out():
  assert selection.oracle_run_acc(IID_GROUP[:2], 2) == selection.RunAcc(0.25, 0.2, 1)
  seed, acc = selection.select_hparams(list(reversed(IID_GROUP)), 2, selection.ORACLE)
  assert (seed, acc.test_acc, acc.step) == (1, 0.9, 1)  # record order does not matter


def test_ties_go_to_the_largest_hparams_seed_and_earliest_step():
  recs = [rec(0, [0], 3, [0.1, 0.5, 0.5]), rec(0, [0], 7, [0.2, 0.5, 0.5])]
  assert selection.select_hparams(recs, 0, selection.TRAINING_DOMAIN)[0] == 7
  run = [rec(0, [0], 1, [0.1, 0.5, 0.5]), rec(5, [0], 1, [0.9, 0.5, 0.5])]
  assert selection.iid_run_acc(run, 0).step == 0


# Leave-one-domain-out, test env 0 of 3: runs [0] (test), [0, 1] (validates on env 1's
# in-split) and [0, 2] (env 2's). Seed 0: step scores 0.5, 0.7 -> step 1, test 0.22.
# Seed 1: 0.9, 0.1 -> step 0, test 0.33. Seed 1 wins.
LOO_GROUP = [
  rec(0, [0], 0, [0.11, 0, 0]),
  rec(1, [0], 0, [0.22, 0, 0]),
  rec(0, [0, 1], 0, [0, 0.4, 0]),
  rec(1, [0, 1], 0, [0, 0.8, 0]),
  rec(0, [0, 2], 0, [0, 0, 0.6]),
  rec(1, [0, 2], 0, [0, 0, 0.6]),
  rec(0, [0], 1, [0.33, 0, 0]),
  rec(1, [0], 1, [0.44, 0, 0]),
  rec(0, [0, 1], 1, [0, 0.9, 0]),
  rec(1, [1, 0], 1, [0, 0.1, 0]),  # pair in either order
  rec(0, [0, 2], 1, [0, 0, 0.9]),
  rec(1, [0, 2], 1, [0, 0, 0.1]),
]


def test_leave_one_domain_out():
  seed0 = [r for r in LOO_GROUP if r["args"]["hparams_seed"] == 0]
  acc = selection.leave_one_out_run_acc(seed0, 0)
  assert acc.step == 1 and acc.test_acc == 0.22 and math.isclose(acc.val_acc, 0.7)
  seed, acc = selection.select_hparams(LOO_GROUP, 0, selection.LEAVE_ONE_OUT)
  assert (seed, acc.step, acc.test_acc) == (1, 0, 0.33) and math.isclose(acc.val_acc, 0.9)
  # a step with a missing pair is skipped; no pairs at all: no score
  no_pair_at_1 = [r for r in seed0 if not (r["step"] == 1 and r["args"]["test_envs"] == [0, 2])]
  assert selection.leave_one_out_run_acc(no_pair_at_1, 0).step == 0
  assert (
    selection.leave_one_out_run_acc([r for r in seed0 if len(r["args"]["test_envs"]) == 1], 0)
    is None
  )
  # the other selection methods only look at the single-test-env runs
  assert selection.select_hparams(LOO_GROUP, 0, selection.ORACLE)[1].test_acc == 0.44


def test_grouping_puts_pair_runs_in_both_groups():
  groups = collect.group_records(LOO_GROUP)
  assert set(groups) == {collect.GroupKey(0, "ColoredMNIST", "erm", e) for e in (0, 1, 2)}
  assert len(groups[collect.GroupKey(0, "ColoredMNIST", "erm", 1)]) == 4
  # dgjax's own records: args.test_env, args.method; DomainBed's: args.test_envs, args.algorithm
  ours = {
    "step": 0,
    "args": {"dataset": "D", "method": "sand", "test_env": 1, "hparams_seed": 0, "trial_seed": 2},
    "env0_in_acc": 0.5,
  }
  theirs = {
    "step": 0,
    "args": {
      "dataset": "D",
      "algorithm": "ERM",
      "test_envs": [1],
      "hparams_seed": 0,
      "trial_seed": 2,
    },
    "env0_in_acc": 0.5,
  }
  assert list(collect.group_records([ours, theirs])) == [
    collect.GroupKey(2, "D", "sand", 1),
    collect.GroupKey(2, "D", "ERM", 1),
  ]


def test_mean_and_standard_error_as_domainbed():
  # DomainBed's format_mean: 100 * mean, 100 * np.std(data / sqrt(n)) (population std)
  mean, err = collect.mean_and_error([0.2, 0.4])
  assert math.isclose(mean, 30.0) and math.isclose(err, 10 / math.sqrt(2))
  assert collect.mean_and_error([0.5]) == (50.0, 0.0)
  assert collect.mean_and_error([]) is None


def table_records():
  """erm: two trials, every test env (test accs .1 .2 .3 and .3 .4 .5); sand: env 2 only."""
  recs = []
  for trial, accs in ((0, (0.1, 0.2, 0.3)), (1, (0.3, 0.4, 0.5))):
    for env, acc in enumerate(accs):
      ins = [0.9, 0.9, 0.9]
      ins[env] = acc
      recs.append(rec(0, [env], 0, ins, trial=trial))
  recs.append(rec(0, [2], 0, [0.9, 0.9, 0.6], trial=0, method="sand"))
  return recs


def cells(line):
  return [c.strip() for c in line.split("  ") if c.strip()]


def test_tables_text():
  tables = collect.results_tables(table_records(), selection.TRAINING_DOMAIN)
  assert [t.section for t in tables] == ["ColoredMNIST", "Averages"]
  text = collect.render(tables[0], "text").splitlines()
  assert (
    text[0]
    == "-------- Dataset: ColoredMNIST, model selection method: training-domain validation set"
  )
  assert cells(text[1]) == ["Algorithm", "+90%", "+80%", "-90%", "Avg"]
  assert cells(text[2]) == ["erm", "20.0 +/- 7.1", "30.0 +/- 7.1", "40.0 +/- 7.1", "30.0"]
  assert cells(text[3]) == ["sand", "X", "X", "60.0 +/- 0.0", "X"]
  avg = collect.render(tables[1], "text").splitlines()
  assert cells(avg[1]) == ["Algorithm", "ColoredMNIST", "Avg"]
  # per trial: mean over test envs (.2 and .4), then mean +/- error over trials
  assert cells(avg[2]) == ["erm", "30.0 +/- 7.1", "30.0"]
  assert cells(avg[3]) == ["sand", "60.0 +/- 0.0", "60.0"]


def test_tables_markdown_and_latex():
  table = collect.results_tables(table_records(), selection.ORACLE)[0]
  md = collect.render(table, "markdown").splitlines()
  assert md[2] == "| Algorithm | +90% | +80% | -90% | Avg |"
  assert md[4] == "| erm | 20.0 ± 7.1 | 30.0 ± 7.1 | 40.0 ± 7.1 | 30.0 |"
  tex = collect.render(table, "latex")
  assert "\\textbf{+90\\%}" in tex and "\\begin{tabular}{lcccc}" in tex
  assert "erm & 20.0 $\\pm$ 7.1 & 30.0 $\\pm$ 7.1 & 40.0 $\\pm$ 7.1 & 30.0 \\\\" in tex
  assert collect.latex_escape("a_b & 5%") == "a\\_b \\& 5\\%"
  doc = collect.report(table_records(), "latex")
  assert doc.startswith("\\documentclass{article}") and doc.rstrip().endswith("\\end{document}")
  assert doc.count("\\begin{tabular}") == 6  # (dataset + averages) x 3 selection methods


def test_every_environment_is_a_column_x_where_not_run_and_avg_x_unless_all():
  # DomainBed prints a column per environment of the dataset; before, dgjax printed only the
  # sweep's test environments and averaged them into Avg (60.0 here): easy to misreport.
  recs = [rec(0, [2], 0, [0.9, 0.9, 0.6])]
  table = collect.results_tables(recs, selection.ORACLE)[0]
  assert table.columns == ["Algorithm", "+90%", "+80%", "-90%", "Avg"]
  assert table.rows == [["erm", None, None, (60.0, 0.0), None]]
  assert cells(collect.render(table).splitlines()[2]) == ["erm", "X", "X", "60.0 +/- 0.0", "X"]


def test_leave_one_out_column_is_x_without_pairs():
  text = collect.report(table_records(), "text", [selection.LEAVE_ONE_OUT])
  assert "leave-one-domain-out cross-validation" in text
  erm_rows = [cells(l) for l in text.splitlines() if l.startswith("erm")]
  assert erm_rows[0] == ["erm", "X", "X", "X", "X"]


def write_sweep(root, records):
  for r in records:
    a = r["args"]
    run = (
      root
      / f"{a['method']}_{'-'.join(map(str, a['test_envs']))}_{a['hparams_seed']}_{a['trial_seed']}"
    )
    run.mkdir(parents=True, exist_ok=True)
    append_jsonl(run / "results.jsonl", r)


def test_cli_prints_every_format(tmp_path, capsys):
  write_sweep(tmp_path / "sweep", table_records())
  assert collect_results.main([str(tmp_path / "sweep")]) == 0
  out = capsys.readouterr().out
  assert out.startswith("Total records: 7 from 7 runs.")
  for name in (
    "training-domain validation set",
    "leave-one-domain-out cross-validation",
    "test-domain validation set (oracle)",
  ):
    assert f"-------- Dataset: ColoredMNIST, model selection method: {name}" in out
    assert f"-------- Averages, model selection method: {name}" in out
  assert (
    collect_results.main([str(tmp_path / "sweep"), "--format=markdown", "--selection", "oracle"])
    == 0
  )
  out = capsys.readouterr().out
  assert "### Model selection: test-domain validation set (oracle)" in out and "| erm |" in out
  assert "training-domain" not in out
  assert collect_results.main([str(tmp_path / "sweep"), "--format=latex", "--save"]) == 0
  assert (tmp_path / "sweep" / "results.tex").read_text() == capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
  assert collect_results.main([str(tmp_path / "missing")]) == 2
  (tmp_path / "empty").mkdir()
  assert collect_results.main([str(tmp_path / "empty")]) == 2
  bad = tmp_path / "bad" / "run"
  bad.mkdir(parents=True)
  (bad / "results.jsonl").write_text('{"step": 0\n')
  assert collect_results.main([str(tmp_path / "bad")]) == 2
  assert "results.jsonl:1" in capsys.readouterr().err


# ------------------------------------------------------------- DomainBed's record format
#: dgjax method -> DomainBed's class name (DomainBed's algorithms.py; hgp and hutchinson as
#: the Hessian-alignment paper's fork, huawei-noah/Federated-Learning HessianAlignment,
#: spells them; cma has no DomainBed class: our name upper-cased).
ALGORITHM = {
  "erm": "ERM",
  "and": "ANDMask",
  "sand": "SANDMask",
  "irm": "IRM",
  "vrex": "VREx",
  "coral": "CORAL",
  "mmd": "MMD",
  "groupdro": "GroupDRO",
  "mixup": "Mixup",
  "fish": "Fish",
  "iga": "IGA",
  "fishr": "Fishr",
  "hgp": "HGP",
  "hutchinson": "Hutchinson",
  "cma": "CMA",
  "sd": "SD",
  "ib_erm": "IB_ERM",
  "ib_irm": "IB_IRM",
  "rsc": "RSC",
  "selfreg": "SelfReg",
  "eqrm": "EQRM",
  "rdm": "RDM",
  "trm": "TRM",
  "causirl_coral": "CausIRL_CORAL",
  "causirl_mmd": "CausIRL_MMD",
  "cad": "CAD",
  "condcad": "CondCAD",
  "erm_plus_plus": "ERMPlusPlus",
  "urm": "URM",
  "adrmx": "ADRMX",
  "dann": "DANN",
  "cdann": "CDANN",
  "mldg": "MLDG",
  "mtl": "MTL",
  "sagnet": "SagNet",
  "arm": "ARM",
  "transfer": "Transfer",
}

#: The keys of ``vars(args)`` in DomainBed's scripts/train.py.
DOMAINBED_TRAIN_ARGS = {
  "data_dir",
  "dataset",
  "algorithm",
  "task",
  "hparams",
  "hparams_seed",
  "trial_seed",
  "seed",
  "steps",
  "checkpoint_freq",
  "test_envs",
  "output_dir",
  "holdout_fraction",
  "uda_holdout_fraction",
  "skip_model_save",
  "save_model_every_checkpoint",
}


def test_domainbed_args_has_domainbed_keys_and_spellings():
  args = domainbed_format.domainbed_args(
    method="sand",
    algorithm="SANDMask",
    dataset="ColoredMNIST",
    test_envs=[-1],
    hparams_seed=3,
    trial_seed=1,
    seed=12345,
    output_dir="sweeps/x/abc",
    steps=101,
    checkpoint_freq=50,
    data_dir="/data",
    hparams={"tau": 0.5, "lr": 1e-3},
    env_names=["+90%", "+80%", "-90%"],
    max_examples=2000,
  )
  assert set(args) == DOMAINBED_TRAIN_ARGS | {"method", "env_names", "max_examples"}
  assert args["algorithm"] == "SANDMask" and args["method"] == "sand"
  assert args["test_envs"] == [2]  # -1 resolved against the 3 environments
  assert args["hparams"] == '{"lr": 0.001, "tau": 0.5}'  # DomainBed: the JSON string of --hparams
  assert (args["task"], args["uda_holdout_fraction"], args["holdout_fraction"]) == (
    "domain_generalization",
    0,
    0.2,
  )
  assert (
    args["steps"],
    args["checkpoint_freq"],
    args["hparams_seed"],
    args["trial_seed"],
    args["seed"],
    args["output_dir"],
    args["data_dir"],
  ) == (101, 50, 3, 1, 12345, "sweeps/x/abc", "/data")
  assert json.loads(json.dumps(args, allow_nan=False)) == args
  defaults = domainbed_format.domainbed_args(
    method="erm", algorithm="ERM", dataset="D", test_envs=(0, 1)
  )
  assert defaults["test_envs"] == [0, 1] and defaults["steps"] is None
  assert defaults["hparams"] is None and "env_names" not in defaults


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"test_envs": []}, "test_envs must be a non-empty list"),
    ({"test_envs": 2}, "test_envs must be a non-empty list"),
    ({"test_envs": [1, 1]}, "repeated"),
    ({"test_envs": [-1]}, "needs env_names"),
    ({"test_envs": [3], "env_names": ["a", "b", "c"]}, "out of range for 3"),
    ({"test_envs": ["0"]}, "test_envs must hold ints"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"checkpoint_freq": 1.5}, "checkpoint_freq must be an int"),
    ({"hparams_seed": -1}, "hparams_seed and trial_seed must be >= 0"),
    ({"holdout_fraction": 1.0}, "holdout_fraction"),
    ({"algorithm": "SAND Mask"}, "algorithm must be a class name"),
    ({"dataset": ""}, "dataset must be a non-empty string"),
    ({"task": "domain_adaptation"}, "may not redefine task"),
    ({"lr_scale": float("inf")}, "lr_scale=inf is not strict JSON"),
    ({"hparams": {"tau": float("nan")}}, "Out of range float"),
  ],
)
def test_domainbed_args_errors_name_the_argument(kwargs, match):
  base = dict(method="sand", algorithm="SANDMask", dataset="ColoredMNIST", test_envs=[0])
  with pytest.raises((ValueError, TypeError), match=match):
    domainbed_format.domainbed_args(**{**base, **kwargs})


def test_every_registered_method_has_a_domainbed_name():
  assert set(methods.METHODS) <= set(ALGORITHM)
  for name, expected in ALGORITHM.items():
    if name not in methods.METHODS:
      continue
    registered = getattr(methods.METHODS[name], "domainbed_name", None)
    if registered is None:  # the registry does not carry the field yet: algorithm= is needed
      with pytest.raises(ValueError, match="domainbed_name"):
        domainbed_format.domainbed_args(method=name, dataset="D", test_envs=[0])
    else:
      assert registered == expected
      assert (
        domainbed_format.domainbed_args(method=name, dataset="D", test_envs=[0])["algorithm"]
        == expected
      )


# A sweep in DomainBed's record format with known answers. Every run has steps 0 and 1 and
# hparams seeds 0 and 1; (h, s) decides the scores each selection method sees and the test
# in-accuracy's offset over the base, so each method picks a known checkpoint:
#   training-domain validation: mean out-acc of the other envs, best (1, 0) -> offset .02
#   oracle: the test env's out-acc at the LAST step only, best (0, 1) -> .01 ((1, 0) would
#     win with early stopping)
#   leave-one-domain-out: the held-out env's in-acc in the pair runs, best (0, 0) -> .00
IID_SCORE = {(0, 0): 0.5, (0, 1): 0.6, (1, 0): 0.8, (1, 1): 0.7}
ORACLE_SCORE = {(0, 0): 0.3, (0, 1): 0.9, (1, 0): 0.99, (1, 1): 0.4}
LOO_SCORE = {(0, 0): 0.9, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.3}

#: (method, dataset, n_envs, base accuracy of test env e in trial t, test-env sets run)
SWEEP_PLAN = [
  (
    "erm",
    "ColoredMNIST",
    3,
    lambda e, t: 0.5 + 0.1 * e + 0.05 * t,
    [[0], [1], [2], [0, 1], [0, 2], [1, 2]],
  ),
  ("sand", "ColoredMNIST", 3, lambda e, t: 0.3 + 0.05 * t, [[2], [2, 0], [2, 1]]),
  ("irm", "ColoredMNIST", 3, lambda e, t: 0.4 + 0.1 * e + 0.05 * t, [[0], [1], [2]]),
  ("erm", "PACS", 4, lambda e, t: 0.6 + 0.05 * t, [[1]]),
]


def domainbed_sweep():
  records = []
  for method, dataset, n, base, env_sets in SWEEP_PLAN:
    for trial in (0, 1):
      for envs in env_sets:
        for h in (0, 1):
          args = domainbed_format.domainbed_args(
            method=method,
            algorithm=ALGORITHM[method],
            dataset=dataset,
            test_envs=envs,
            hparams_seed=h,
            trial_seed=trial,
            seed=100 * h + trial,
            steps=2,
            checkpoint_freq=1,
          )
          for s in (0, 1):
            r = {"step": s, "epoch": s / 10, "loss": 0.5, "hparams": {"lr": 1e-3}, "args": args}
            for i in range(n):
              r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = 0.95, 0.95
            if len(envs) == 1:
              e = envs[0]
              for i in range(n):
                r[f"env{i}_out_acc"] = IID_SCORE[h, s]
              r[f"env{e}_in_acc"] = base(e, trial) + 0.01 * (2 * h + s)
              r[f"env{e}_out_acc"] = ORACLE_SCORE[h, s]
            else:
              for e in envs:
                r[f"env{e}_in_acc"], r[f"env{e}_out_acc"] = LOO_SCORE[h, s], 0.0
            records.append(r)
  return records


def write_domainbed_sweep(root, records):
  """One directory per run named by the md5 of its args, as DomainBed's sweep does."""
  for r in records:
    run = root / hashlib.md5(json.dumps(r["args"], sort_keys=True).encode()).hexdigest()
    run.mkdir(parents=True, exist_ok=True)
    append_jsonl(run / "results.jsonl", r)


PM = "+/- 1.8"  # every cell averages two trials 5 points apart: 100 * .025 / sqrt(2)
EXPECTED = {
  "training-domain validation set": {
    "ColoredMNIST": [
      ["erm", f"54.5 {PM}", f"64.5 {PM}", f"74.5 {PM}", "64.5"],
      ["sand", "X", "X", f"34.5 {PM}", "X"],
      ["irm", f"44.5 {PM}", f"54.5 {PM}", f"64.5 {PM}", "54.5"],
    ],
    "PACS": [
      ["erm", "X", f"64.5 {PM}", "X", "X", "X"],
      ["sand", "X", "X", "X", "X", "X"],
      ["irm", "X", "X", "X", "X", "X"],
    ],
    "Averages": [
      ["erm", f"64.5 {PM}", f"64.5 {PM}", "64.5"],
      ["sand", f"34.5 {PM}", "X", "X"],
      ["irm", f"54.5 {PM}", "X", "X"],
    ],
  },
  "leave-one-domain-out cross-validation": {
    "ColoredMNIST": [
      ["erm", f"52.5 {PM}", f"62.5 {PM}", f"72.5 {PM}", "62.5"],
      ["sand", "X", "X", f"32.5 {PM}", "X"],
      ["irm", "X", "X", "X", "X"],
    ],
    "PACS": [
      ["erm", "X", "X", "X", "X", "X"],
      ["sand", "X", "X", "X", "X", "X"],
      ["irm", "X", "X", "X", "X", "X"],
    ],
    "Averages": [
      ["erm", f"62.5 {PM}", "X", "X"],
      ["sand", f"32.5 {PM}", "X", "X"],
      ["irm", "X", "X", "X"],
    ],
  },
  "test-domain validation set (oracle)": {
    "ColoredMNIST": [
      ["erm", f"53.5 {PM}", f"63.5 {PM}", f"73.5 {PM}", "63.5"],
      ["sand", "X", "X", f"33.5 {PM}", "X"],
      ["irm", f"43.5 {PM}", f"53.5 {PM}", f"63.5 {PM}", "53.5"],
    ],
    "PACS": [
      ["erm", "X", f"63.5 {PM}", "X", "X", "X"],
      ["sand", "X", "X", "X", "X", "X"],
      ["irm", "X", "X", "X", "X", "X"],
    ],
    "Averages": [
      ["erm", f"63.5 {PM}", f"63.5 {PM}", "63.5"],
      ["sand", f"33.5 {PM}", "X", "X"],
      ["irm", f"53.5 {PM}", "X", "X"],
    ],
  },
}


def parse_report(text):
  """{selection method: {dataset or "Averages": (header cells, [row cells])}} from the text
  report."""
  out, current = {}, None
  for line in text.splitlines():
    if line.startswith("-------- "):
      title = line[len("-------- ") :]
      section, method = title.split(", model selection method: ")
      section = section.removeprefix("Dataset: ")
      current = out.setdefault(method, {}).setdefault(section, ([], []))
    elif current is not None and line.strip():
      (current[0].extend if not current[0] else current[1].append)(cells(line))
    else:
      current = None
  return out


def test_collect_results_on_a_domainbed_format_sweep(tmp_path, capsys):
  write_domainbed_sweep(tmp_path / "sweep", domainbed_sweep())
  assert collect_results.main(["--input_dir", str(tmp_path / "sweep")]) == 0
  out = capsys.readouterr().out
  assert out.startswith("Total records: 104 from 52 runs.")  # 2 steps x 52 runs
  tables = parse_report(out)
  assert list(tables) == list(EXPECTED)
  for method, expected in EXPECTED.items():
    assert list(tables[method]) == ["ColoredMNIST", "PACS", "Averages"]
    assert tables[method]["ColoredMNIST"][0] == ["Algorithm", "+90%", "+80%", "-90%", "Avg"]
    assert tables[method]["PACS"][0] == ["Algorithm", "A", "C", "P", "S", "Avg"]
    assert tables[method]["Averages"][0] == ["Algorithm", "ColoredMNIST", "PACS", "Avg"]
    for section, rows in expected.items():
      assert tables[method][section][1] == rows, (method, section)
  # --latex is --format=latex
  assert collect_results.main(["--input_dir", str(tmp_path / "sweep"), "--latex"]) == 0
  tex = capsys.readouterr().out
  assert "erm & X & 64.5 $\\pm$ 1.8 & X & X & X \\\\" in tex
  assert collect_results.main([]) == 2
  assert "give the sweep directory once" in capsys.readouterr().err


def test_domainbed_records_without_method_and_old_dgjax_records_read_alike(tmp_path, capsys):
  """DomainBed's own records (args.algorithm only) and older dgjax records (args.method,
  args.test_env) give the same table as the new format."""
  new = domainbed_sweep()
  theirs = [dict(r, args={k: v for k, v in r["args"].items() if k != "method"}) for r in new]
  old = []
  for r in new:
    if len(r["args"]["test_envs"]) == 1:
      a = {k: r["args"][k] for k in ("dataset", "method", "hparams_seed", "trial_seed")}
      old.append(dict(r, args={**a, "test_env": r["args"]["test_envs"][0]}))
  names = {"ERM": "erm", "SANDMask": "sand", "IRM": "irm"}
  for variant, recs in (("theirs", theirs), ("old", old)):
    write_domainbed_sweep(tmp_path / variant, recs)
    assert collect_results.main([str(tmp_path / variant), "--selection", "training_domain"]) == 0
    tables = parse_report(capsys.readouterr().out)["training-domain validation set"]
    for section, rows in EXPECTED["training-domain validation set"].items():
      got = tables[section][1]
      if variant == "theirs":  # rows named by DomainBed's class names, in our registry order
        got = [[names[r[0]]] + r[1:] for r in got]
        got = sorted(got, key=lambda r: ["erm", "sand", "irm"].index(r[0]))
      assert got == rows, (variant, section)


# ---------------------------------------- an independent reference of DomainBed's selection
def reference_sweep_acc(rule, group, test_env):
  """DomainBed's ``SelectionMethod.sweep_acc`` for one (trial, dataset, algorithm, test env)
  group, written as plain loops: the test accuracy of the best hparams seed (ties: the
  largest seed), or None."""
  best = None
  for seed in sorted({r["args"]["hparams_seed"] for r in group}):
    run = [r for r in group if r["args"]["hparams_seed"] == seed]
    singles = sorted((r for r in run if len(r["args"]["test_envs"]) == 1), key=lambda r: r["step"])
    n = sum(1 for k in group[0] if k.endswith("_out_acc"))
    acc = None
    if rule == "iid":
      for r in singles:
        val = np.mean([r[f"env{i}_out_acc"] for i in range(n) if i != test_env])
        if acc is None or val > acc[0]:
          acc = (val, r[f"env{test_env}_in_acc"])
    elif rule == "oracle" and singles:
      acc = (singles[-1][f"env{test_env}_out_acc"], singles[-1][f"env{test_env}_in_acc"])
    elif rule == "loo":
      for step in sorted({r["step"] for r in run}):
        at = [r for r in run if r["step"] == step]
        tests = [r for r in at if len(r["args"]["test_envs"]) == 1]
        if len(tests) != 1:
          continue
        val = {}
        for r in at:
          if len(r["args"]["test_envs"]) == 2:
            (j,) = set(r["args"]["test_envs"]) - {test_env}
            val[j] = r[f"env{j}_in_acc"]
        if set(val) != set(range(n)) - {test_env}:
          continue
        score = sum(val.values()) / (n - 1)
        if acc is None or score > acc[0]:
          acc = (score, tests[0][f"env{test_env}_in_acc"])
    if acc is not None and (best is None or acc[0] >= best[0]):
      best = acc
  return None if best is None else best[1]


def reference_format(values):
  if not values:
    return "X", None
  mean = 100 * np.mean(values)
  return f"{mean:.1f} +/- {100 * np.std(np.asarray(values) / np.sqrt(len(values))):.1f}", mean


#: DomainBed's ``datasets.DATASETS`` (its first entries): the order of its tables.
DOMAINBED_DATASETS = (
  "Debug28",
  "Debug224",
  "ColoredMNIST",
  "RotatedMNIST",
  "VLCS",
  "PACS",
  "OfficeHome",
  "TerraIncognita",
  "DomainNet",
  "SVIRO",
)


def reference_tables(records, rule, n_envs):
  """{dataset or "Averages": [row cells]} as DomainBed's print_results_tables."""
  method_names = collect.method_order(r["args"]["method"] for r in records)
  datasets = sorted(n_envs, key=DOMAINBED_DATASETS.index)
  acc = {}  # (trial, dataset, method, test env) -> sweep acc
  for key in {
    (r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["method"], e)
    for r in records
    for e in r["args"]["test_envs"]
  }:
    group = [
      r
      for r in records
      if (r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["method"]) == key[:3]
      and key[3] in r["args"]["test_envs"]
    ]
    a = reference_sweep_acc(rule, group, key[3])
    if a is not None:
      acc[key] = a
  tables = {}
  for d in datasets:
    rows = []
    for m in method_names:
      row, means = [m], []
      for e in range(n_envs[d]):
        text, mean = reference_format([a for k, a in acc.items() if k[1:] == (d, m, e)])
        row.append(text)
        means.append(mean)
      row.append("X" if None in means else f"{sum(means) / len(means):.1f}")
      rows.append(row)
    tables[d] = rows
  rows = []
  for m in method_names:
    row, means = [m], []
    for d in datasets:
      trials = sorted({k[0] for k in acc if k[1:3] == (d, m)})
      text, mean = reference_format(
        [np.mean([a for k, a in acc.items() if k[:3] == (t, d, m)]) for t in trials]
      )
      row.append(text)
      means.append(mean)
    row.append("X" if None in means else f"{sum(means) / len(means):.1f}")
    rows.append(row)
  tables["Averages"] = rows
  return tables


def random_sweep(seed):
  """Random accuracies; some runs and some evaluations missing."""
  rng = np.random.default_rng(seed)
  records = []
  for dataset, n in (("ColoredMNIST", 3), ("PACS", 4)):
    env_sets = [[e] for e in range(n)] + [[a, b] for a in range(n) for b in range(a + 1, n)]
    for method in ("erm", "sand", "irm"):
      for trial in range(3):
        for envs in env_sets:
          for h in range(4):
            if rng.random() < 0.2:
              continue
            args = domainbed_format.domainbed_args(
              method=method,
              algorithm=ALGORITHM[method],
              dataset=dataset,
              test_envs=envs,
              hparams_seed=h,
              trial_seed=trial,
            )
            for step in range(0, 30, 10):
              if rng.random() < 0.1:
                continue
              r = {"step": step, "args": args}
              for i in range(n):
                r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = rng.random(), rng.random()
              records.append(r)
  return records, {"ColoredMNIST": 3, "PACS": 4}


@pytest.mark.parametrize("seed", [0, 1])
def test_tables_match_an_independent_reference_of_domainbeds_rules(seed):
  records, n_envs = random_sweep(seed)
  rules = {"training_domain": "iid", "leave_one_out": "loo", "oracle": "oracle"}
  n_cells = 0
  for name, rule in rules.items():
    expected = reference_tables(records, rule, n_envs)
    got = {
      t.section: [cells(line) for line in collect.render(t).splitlines()[2:]]
      for t in collect.results_tables(records, selection.SWEEP_SELECTION_METHODS[name])
    }
    assert got == expected, name
    n_cells += sum(c != "X" for rows in expected.values() for row in rows for c in row[1:])
  assert n_cells > 50  # the comparison covers many numbers, not only X cells
