"""Sweeps (dgjax.sweep, experiments.sweep): DomainBed's enumeration, seeds and job hashes, one
TrainConfig per job, states (Running from the run lock and the launch claim), vmap grouping by
structural hparams, the local / vmap / submitit / dry-run launchers, and two launches of one
sweep at once (real processes)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dgjax import methods
from dgjax import results as results_lib
from dgjax import sweep
from dgjax import train as train_lib
from dgjax.seeding import seed_hash
from experiments import sweep as sweep_cli

try:  # imported now: submitit's logger binds sys.stdout / sys.stderr at import, and a
  import submitit  # noqa: F401  capsys stream bound inside a test is closed after it
except ImportError:
  pass

REPO = Path(__file__).resolve().parents[1]

# A stand-in for experiments.train (same flags): records its flags, refuses an existing
# results.jsonl without --overwrite/--resume (as the real trainer does), fails when its
# output directory is $FAKE_FAIL_DIR, else writes one record and the done marker.
FAKE_TRAINER = textwrap.dedent("""\
    import json, os, pathlib, sys
    flags = {}
    for a in sys.argv[1:]:
      k, eq, v = a[2:].partition("=")
      flags[k] = v if eq else True
    out = pathlib.Path(flags["output_dir"])
    with open(pathlib.Path(__file__).with_name("calls.jsonl"), "a") as f:
      f.write(json.dumps(flags) + "\\n")
    if (out / "results.jsonl").exists() and not ("overwrite" in flags or "resume" in flags):
      sys.exit("results.jsonl exists")
    if flags["output_dir"] == os.environ.get("FAKE_FAIL_DIR"):
      sys.exit("boom")
    print("trained", flags["method"])
    (out / "results.jsonl").write_text(json.dumps({"step": 0}) + "\\n")
    (out / "done").write_text("done\\n")
    """)


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
  """Writes the fake trainer into tmp_path and makes it importable by the launched processes."""
  (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(REPO)]))
  return "fake_trainer"


def calls(tmp_path):
  path = tmp_path / "calls.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------- enumeration
def test_enumeration_order_matches_domainbed():
  args = sweep.make_args_list(
    ["ColoredMNIST"], ["erm", "sand"], n_trials=2, n_hparams=3, n_hparams_from=1, steps=10
  )
  # trial seed, dataset, method, test env, hparams seed (DomainBed's nesting), single test envs
  assert len(args) == 2 * 1 * 2 * 3 * 2
  key = lambda a: (a["trial_seed"], a["method"], a["test_envs"], a["hparams_seed"])
  assert [key(a) for a in args[:7]] == [
    (0, "erm", [0], 1),
    (0, "erm", [0], 2),
    (0, "erm", [1], 1),
    (0, "erm", [1], 2),
    (0, "erm", [2], 1),
    (0, "erm", [2], 2),
    (0, "sand", [0], 1),
  ]
  assert key(args[12]) == (1, "erm", [0], 1)
  assert all(a["steps"] == 10 and a["holdout_fraction"] == 0.2 for a in args)
  assert "data_dir" not in args[0] and "hparams" not in args[0]  # only when given
  # environment counts come from the dataset registry
  assert len(sweep.make_args_list(["RotatedMNIST"], ["erm"], n_trials=1, n_hparams=1)) == 6
  with pytest.raises(ValueError, match="valid datasets: .*Spirals"):
    sweep.make_args_list(["Toy"], ["erm"], n_trials=1, n_hparams=1)
  with pytest.raises(ValueError, match="valid methods"):
    sweep.make_args_list(["Spirals"], ["nope"], n_trials=1, n_hparams=1)


def test_job_hashes_and_seeds_follow_domainbed():
  (a,) = [
    a
    for a in sweep.make_args_list(["ColoredMNIST"], ["sand"], n_trials=2, n_hparams=3)
    if a["test_envs"] == [1] and a["hparams_seed"] == 2 and a["trial_seed"] == 1
  ]
  # misc.seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed): md5 of str(tuple)
  expected = int(hashlib.md5(b"('ColoredMNIST', 'sand', [1], 2, 1)").hexdigest(), 16) % 2**31
  assert a["seed"] == expected
  job = sweep.Job.create(a, "/sweep")
  assert job.output_dir.name == hashlib.md5(json.dumps(a, sort_keys=True).encode()).hexdigest()
  assert sweep.Job.create(dict(a, steps=5), "/sweep").output_dir != job.output_dir
  # the directories of existing sweeps are unchanged (pinned from the previous sweep module)
  (first,) = sweep.make_args_list(["ColoredMNIST"], ["erm"], n_trials=1, n_hparams=1, test_envs=[0])
  assert sweep.args_hash(first) == "e395660277aa55784bfdca8ad3e6b0e9"
  many = sweep.make_args_list(
    ["ColoredMNIST", "Spirals"],
    ["sand", "hutchinson"],
    n_trials=2,
    n_hparams=3,
    steps=10,
    test_envs=[-1],
    hparams='{"batch_size": 8}',
    extra_args={"max_examples": 32},
  )
  assert sweep.args_hash(many[0]) == "de90e7007a9cccd3212b64a3b251254d"
  assert (
    hashlib.md5("".join(map(sweep.args_hash, many)).encode()).hexdigest()
    == "5e5ffa154bc94206d42e05620d5c7a07"
  )


def test_holdout_pairs_keep_every_pair_of_the_chosen_test_envs(tmp_path, capsys):
  assert sweep.all_test_env_combinations(3) == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
  assert len(sweep.all_test_env_combinations(6)) == 6 + 15
  with pytest.raises(ValueError, match="at least 3"):
    sweep.all_test_env_combinations(2)
  args = sweep.make_args_list(
    ["ColoredMNIST"], ["erm"], n_trials=1, n_hparams=1, holdout_pairs=True
  )
  assert [a["test_envs"] for a in args] == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
  # --test_envs 2: the [2] run and the pairs leave-one-domain-out reads for it (it used to keep
  # only pairs starting with 2, i.e. none, silently)
  assert sweep.test_env_sets(3, holdout_pairs=True, test_envs=[2]) == [[0, 2], [1, 2], [2]]
  assert sweep.test_env_sets(3, holdout_pairs=True, test_envs=[1]) == [[0, 1], [1], [1, 2]]
  for i in range(6):
    sets = sweep.test_env_sets(6, holdout_pairs=True, test_envs=[i])
    assert sorted(map(sorted, sets)) == sorted([[i]] + [sorted([i, j]) for j in range(6) if j != i])
  assert sweep.test_env_sets(17, test_envs=[-1]) == [[16]]
  with pytest.raises(ValueError, match="out of range"):
    sweep.test_env_sets(3, test_envs=[3])
  out = tmp_path / "sweep"
  assert (
    sweep_cli.main(
      [
        "launch",
        "--datasets",
        "ColoredMNIST",
        "--methods",
        "erm",
        "--n_hparams",
        "1",
        "--n_trials",
        "1",
        "--holdout_pairs",
        "--test_envs",
        "2",
        "--output_dir",
        str(out),
        "--launcher",
        "dry_run",
        "--quiet",
      ]
    )
    == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("3 jobs:")
  assert [l.split("--test_envs=")[1].split()[0] for l in lines[1:]] == ["0,2", "1,2", "2"]


def test_job_config_draws_domainbeds_hparams():
  args = sweep.make_args_list(
    ["ColoredMNIST"],
    ["sand", "hutchinson"],
    n_trials=2,
    n_hparams=3,
    test_envs=[2],
    steps=7,
    data_dir="/d",
  )
  for a in args:
    config = sweep.Job.create(a, "/sweep").config()
    m, h, t = a["method"], a["hparams_seed"], a["trial_seed"]
    assert (config.method, config.seed, config.trial_seed, config.hparams_seed) == (
      m,
      a["seed"],
      t,
      h,
    )
    assert config.test_envs == (2,) and config.steps == 7 and config.data_dir == "/d"
    assert config.output_dir == f"/sweep/{sweep.args_hash(a)}"
    assert config.checkpoint_freq == 100  # the dataset's
    # DomainBed's train.py: defaults for hparams seed 0, else
    # random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed))
    expected = (
      methods.default_hparams(m)
      if h == 0
      else methods.random_hparams(m, seed_hash(h, t), "ColoredMNIST")
    )
    assert config.resolved_hparams == expected
  by_trial = [
    sweep.Job.create(a, "/s").config().resolved_hparams
    for a in args
    if a["method"] == "sand" and a["hparams_seed"] == 2
  ]
  assert by_trial[0] != by_trial[1]  # one hparams seed, other values in other trials
  (a,) = sweep.make_args_list(
    ["ColoredMNIST"],
    ["sand"],
    n_trials=1,
    n_hparams=2,
    n_hparams_from=1,
    test_envs=[2],
    hparams='{"lr": 0.5}',
  )
  hp = sweep.Job.create(a, "/s").config().resolved_hparams
  assert hp == dict(methods.random_hparams("sand", seed_hash(1, 0)), lr=0.5)


def test_train_args_are_config_fields():
  (a,) = sweep.make_args_list(
    ["Spirals"],
    ["erm"],
    n_trials=1,
    n_hparams=1,
    test_envs=[-1],
    extra_args={"max_examples": 100, "scan_steps": 2},
  )
  assert a["test_envs"] == [16] and a["max_examples"] == 100
  config = sweep.Job.create(a, "/s").config()
  assert (config.max_examples, config.scan_steps, config.steps) == (100, 2, 5001)
  assert "--max_examples=100" in sweep.Job.create(a, "/s").command()
  assert "max_examples" in sweep.train_arg_fields() and "seed" not in sweep.train_arg_fields()
  with pytest.raises(ValueError, match=r"not a training config field; valid: .*max_examples"):
    sweep.make_args_list(
      ["Spirals"], ["erm"], n_trials=1, n_hparams=1, extra_args={"max_exampels": 1}
    )
  with pytest.raises(ValueError, match=r"scan_steps must be int .*got '2'"):
    sweep.make_args_list(
      ["Spirals"], ["erm"], n_trials=1, n_hparams=1, extra_args={"scan_steps": "2"}
    )
  with pytest.raises(ValueError, match=r"downsample must be bool"):
    sweep.make_args_list(
      ["Spirals"], ["erm"], n_trials=1, n_hparams=1, extra_args={"downsample": 1}
    )
  with pytest.raises(ValueError, match=r"may not set 'steps'.*--steps"):
    sweep.make_args_list(["Spirals"], ["erm"], n_trials=1, n_hparams=1, extra_args={"steps": 1})


def test_cli_rejects_bad_input_before_any_work(tmp_path, capsys):
  base = [
    "launch",
    "--datasets",
    "Spirals",
    "--methods",
    "erm",
    "--n_hparams",
    "1",
    "--n_trials",
    "1",
    "--test_envs",
    "-1",
    "--output_dir",
    str(tmp_path / "s"),
    "--launcher",
    "local",
  ]
  for extra, message in [
    (["--train_arg", "max_exampels=3"], "valid: "),
    (["--train_arg", "max_examples=0"], "max_examples must be >= 1"),
    (["--hparams", '{"tau": 1}'], "unknown hparam"),
    (["--hparams", "[1]"], "JSON object"),
    (["--steps", "0"], "steps must be an integer >= 1"),
  ]:
    assert sweep_cli.main(base + extra) == 2
    assert message in capsys.readouterr().err
  assert not (tmp_path / "s").exists()


def test_command_round_trips_through_experiments_train(tmp_path):
  """The argv of a job, parsed by experiments.train's own flags (in a subprocess: absl flags
  are global), gives the job's config back."""
  args = sweep.make_args_list(
    ["Spirals"],
    ["hutchinson"],
    n_trials=2,
    n_hparams=2,
    n_hparams_from=1,
    test_envs=[-1],
    steps=3,
    checkpoint_freq=1,
    data_dir="/d",
    hparams='{"batch_size": 8}',
    extra_args={"max_examples": 50},
  )
  job = sweep.Job.create(args[-1], tmp_path)
  argv = job.command(("--resume",))
  check = textwrap.dedent("""\
      import dataclasses, json, sys
      from absl import flags
      from experiments import train
      flags.FLAGS(["x"] + sys.argv[1:])
      c = train.config_from_flags()
      print(json.dumps([{f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.init},
                        c.resolved_hparams, flags.FLAGS.resume], default=list))
      """)
  done = subprocess.run(
    [sys.executable, "-c", check, *argv[3:]], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  fields, resolved, resume = json.loads(done.stdout.splitlines()[-1])
  config = job.config()
  assert fields == json.loads(json.dumps({k: getattr(config, k) for k in fields}, default=list))
  assert resolved == config.resolved_hparams and resume is True


# ------------------------------------------------------------------------ states, launchers
def partial_sweep(tmp_path):
  """A 6-job sweep: job 0 done, job 1 incomplete (a results line, no done), the rest new."""
  args = sweep.make_args_list(["ColoredMNIST"], ["erm"], n_trials=1, n_hparams=2, steps=1)
  jobs = sweep.make_jobs(args, tmp_path / "sweep")
  jobs[0].output_dir.mkdir(parents=True)
  (jobs[0].output_dir / "done").write_text("done\n")
  jobs[1].output_dir.mkdir(parents=True)
  (jobs[1].output_dir / "results.jsonl").write_text('{"step": 0}\n')
  return jobs


def test_states_and_what_a_launch_runs(tmp_path):
  jobs = partial_sweep(tmp_path)
  lock = results_lib.RunLock(jobs[2].output_dir).acquire()  # a live run writes job 2
  claim = jobs[3].claim()  # a launcher has claimed job 3
  try:
    assert [j.state for j in jobs] == [
      sweep.DONE,
      sweep.INCOMPLETE,
      sweep.RUNNING,
      sweep.RUNNING,
      sweep.NOT_LAUNCHED,
      sweep.NOT_LAUNCHED,
    ]
    assert sweep.summary_line(jobs) == "6 jobs: 1 done, 2 running, 1 incomplete, 2 not launched."
    assert jobs[2].claim() is None and jobs[3].claim() is None and jobs[0].claim() is None
    launch = sweep.jobs_to_launch(jobs)
    assert [j for j, _ in launch] == [jobs[1], jobs[4], jobs[5]]
    assert [flags for _, flags in launch] == [("--resume",), (), ()]
    assert sweep.jobs_to_launch(jobs, "restart")[0][1] == ("--overwrite",)
    assert [j for j, _ in sweep.jobs_to_launch(jobs, "skip")] == jobs[4:]
    assert sweep.delete_incomplete(jobs) == [jobs[1]]  # running ones are left alone
    assert not jobs[1].output_dir.exists() and jobs[2].output_dir.exists()
    lines = sweep.dry_run_commands(jobs, python="python")
    assert len(lines) == 3 and lines[0].startswith("python -m experiments.train ")
    assert not jobs[4].output_dir.exists()  # a dry run creates nothing
  finally:
    lock.release()
    claim.release()
  assert jobs[2].state == jobs[3].state == sweep.INCOMPLETE  # released: no process left


def test_local_launch_skips_done_and_running_resumes_incomplete(
  tmp_path, fake_trainer, monkeypatch
):
  jobs = partial_sweep(tmp_path)
  lock = results_lib.RunLock(jobs[2].output_dir).acquire()
  monkeypatch.setenv("FAKE_FAIL_DIR", str(jobs[5].output_dir))  # job 5 fails
  logged = []
  try:
    codes = sweep.launch_local(
      jobs, max_parallel=2, module=fake_trainer, cwd=tmp_path, log=logged.append
    )
  finally:
    lock.release()
  assert codes == {
    jobs[1].output_dir: 0,
    jobs[3].output_dir: 0,
    jobs[4].output_dir: 0,
    jobs[5].output_dir: 1,
  }
  ran = {c["output_dir"]: c for c in calls(tmp_path)}
  assert set(ran) == {str(j.output_dir) for j in (jobs[1], jobs[3], jobs[4], jobs[5])}
  assert ran[str(jobs[1].output_dir)].get("resume") is True  # incomplete: resumed
  assert "resume" not in ran[str(jobs[3].output_dir)]
  assert ran[str(jobs[3].output_dir)]["test_envs"] == "1"
  assert (jobs[3].output_dir / "out.txt").read_text() == "trained erm\n"
  assert "boom" in (jobs[5].output_dir / "err.txt").read_text()
  assert any("FAILED (exit 1" in line for line in logged)
  assert [j.state for j in jobs] == [
    sweep.DONE,
    sweep.DONE,
    sweep.INCOMPLETE,
    sweep.DONE,
    sweep.DONE,
    sweep.INCOMPLETE,
  ]
  monkeypatch.delenv("FAKE_FAIL_DIR")
  codes = sweep.launch_local(
    jobs, incomplete="restart", module=fake_trainer, cwd=tmp_path, log=lambda _: None
  )
  assert set(codes) == {jobs[2].output_dir, jobs[5].output_dir}
  assert calls(tmp_path)[-1].get("overwrite") is True
  assert all(j.state == sweep.DONE for j in jobs)
  assert sweep.jobs_to_launch(jobs) == []


# ------------------------------------------------------------------------------------- CLI
def test_cli_dry_run_status_and_launch(tmp_path, capsys, fake_trainer, monkeypatch):
  out = tmp_path / "sweep"
  common = [
    "--datasets",
    "ColoredMNIST",
    "--methods",
    "erm",
    "sand",
    "--n_hparams",
    "2",
    "--n_trials",
    "1",
    "--steps",
    "1",
    "--output_dir",
    str(out),
    "--python",
    "python",
  ]
  assert sweep_cli.main(["launch", *common, "--launcher", "dry_run", "--quiet"]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == "12 jobs: 0 done, 0 running, 0 incomplete, 12 not launched."
  assert len(printed) == 13 and all(
    l.startswith("python -m experiments.train ") for l in printed[1:]
  )
  assert not out.exists()

  monkeypatch.chdir(tmp_path)
  args = [
    "--methods",
    "erm",
    "--n_hparams",
    "1",
    "--n_trials",
    "1",
    "--output_dir",
    str(out),
    "--module",
    fake_trainer,
    "--quiet",
  ]
  assert sweep_cli.main(["launch", *args, "--max_parallel", "2"]) == 0
  assert "3 jobs finished, 0 failed." in capsys.readouterr().out
  assert sweep_cli.main(["status", *args]) == 0
  assert (
    capsys.readouterr().out.strip() == "3 jobs: 3 done, 0 running, 0 incomplete, 0 not launched."
  )
  assert sweep_cli.main(["launch", *args]) == 0
  assert "Launching 0 jobs" in capsys.readouterr().out
  assert len(calls(tmp_path)) == 3


def test_cli_submitit_local(tmp_path, capsys, fake_trainer):
  pytest.importorskip("submitit")
  args = [
    "launch",
    "--methods",
    "erm",
    "--n_hparams",
    "1",
    "--n_trials",
    "1",
    "--test_envs",
    "0",
    "--output_dir",
    str(tmp_path / "sweep"),
    "--module",
    fake_trainer,
    "--quiet",
    "--launcher",
    "submitit",
    "--submitit_cluster",
    "local",
    "--wait",
  ]
  assert sweep_cli.main(args) == 0
  out = capsys.readouterr().out
  assert "Submitted 1 jobs" in out and "1 jobs finished, 0 failed." in out
  assert len(calls(tmp_path)) == 1 and (tmp_path / "sweep" / ".submitit").is_dir()
  (job,) = sweep.make_jobs(
    sweep.make_args_list(["ColoredMNIST"], ["erm"], n_trials=1, n_hparams=1, test_envs=[0]),
    tmp_path / "sweep",
  )
  assert job.state == sweep.DONE and (job.output_dir / "out.txt").read_text() == "trained erm\n"


# ------------------------------------------------------------------ K runs in one program
def test_vmap_groups_split_on_structural_hparams(tmp_path):
  # Hutchinson's random draws differ in hutchinson_samples (structural: the probe count is a
  # shape), so with batch_size fixed they still need three programs (the old grouping, by
  # batch_size only, put them in one, where the engine refuses them)
  hutch = sweep.make_jobs(
    sweep.make_args_list(
      ["Spirals"],
      ["hutchinson"],
      n_trials=1,
      n_hparams=3,
      test_envs=[-1],
      hparams='{"batch_size": 8}',
    ),
    tmp_path,
  )
  samples = [j.config().resolved_hparams["hutchinson_samples"] for j in hutch]
  assert len(set(samples)) == 3
  groups = sweep.vmap_groups(hutch)
  assert [len(g) for g in groups] == [1, 1, 1]
  with pytest.raises(ValueError, match="hutchinson_samples"):
    train_lib._check_group([j.config() for j in hutch])
  # float hparams vary inside one program; random batch sizes split it
  sand = sweep.make_jobs(
    sweep.make_args_list(
      ["Spirals"], ["sand"], n_trials=1, n_hparams=3, test_envs=[-1], hparams='{"batch_size": 8}'
    ),
    tmp_path,
  )
  assert [len(g) for g in sweep.vmap_groups(sand)] == [3]
  mixed = sweep.make_jobs(
    sweep.make_args_list(
      ["Spirals", "ColoredMNIST"],
      ["erm", "sand", "hutchinson"],
      n_trials=2,
      n_hparams=4,
      test_envs=[-1],
      steps=5,
    ),
    tmp_path,
  )
  groups = sweep.vmap_groups(mixed)
  assert sum(len(g) for g in groups) == len(mixed)
  for g in groups:
    configs = [j.config() for j in g]
    train_lib._check_group(configs)  # every group is one the engine accepts
    assert len({(c.dataset, c.method, c.trial_seed, c.test_envs) for c in configs}) == 1


def test_cli_vmap_launch_logs_per_job_and_reports_failed_groups(tmp_path, capsys, monkeypatch):
  out = tmp_path / "sweep"
  argv = [
    "launch",
    "--datasets",
    "Spirals",
    "--methods",
    "erm",
    "sand",
    "--n_hparams",
    "2",
    "--n_trials",
    "1",
    "--steps",
    "4",
    "--checkpoint_freq",
    "2",
    "--test_envs",
    "-1",
    "--train_arg",
    "max_examples=32",
    "--train_arg",
    "per_domain_impl=vmap",
    "--hparams",
    '{"batch_size": 8}',
    "--output_dir",
    str(out),
    "--launcher",
    "vmap",
    "--quiet",
  ]
  real_run_many = sweep.runs.run_many

  def run_many(configs, resume=False):
    if configs[0].method == "sand":
      raise FloatingPointError("sand diverged (a stand-in failure)")
    return real_run_many(configs, resume=resume)

  monkeypatch.setattr(sweep.runs, "run_many", run_many)
  assert sweep_cli.main(argv) == 1
  printed = capsys.readouterr().out
  assert "Launching 4 jobs as 2 vmapped programs (2, 2 runs each)." in printed
  assert "FAILED group of 2 (sand): FloatingPointError: sand diverged" in printed
  assert "done: 2 runs of erm" in printed and "2 jobs finished, 2 failed." in printed
  jobs = sweep.make_jobs(
    sweep.make_args_list(
      ["Spirals"],
      ["erm", "sand"],
      n_trials=1,
      n_hparams=2,
      test_envs=[-1],
      steps=4,
      checkpoint_freq=2,
      hparams='{"batch_size": 8}',
      extra_args={"max_examples": 32, "per_domain_impl": "vmap"},
    ),
    out,
  )
  assert [j.state for j in jobs] == [sweep.DONE] * 2 + [sweep.INCOMPLETE] * 2
  for job in jobs:
    text = (job.output_dir / "out.txt").read_text()
    assert text.startswith(f"sweep job {job.output_dir.name}: run ")
    assert f"seed {job.args['seed']}" in text
    err = (job.output_dir / "err.txt").read_text()
    if job.args["method"] == "sand":
      assert "Traceback" in err and "sand diverged" in err
      continue
    assert "erm x2 step 3/4" in err  # the group's progress lines
    recs = results_lib.read_jsonl(job.output_dir / "results.jsonl")
    assert [r["step"] for r in recs] == [0, 2, 3]
    assert recs[-1]["args"]["hparams_seed"] == job.args["hparams_seed"]
    assert recs[-1]["hparams"] == job.config().resolved_hparams
  assert sweep_cli.main(["status", *argv[1:]]) == 0
  assert (
    capsys.readouterr().out.strip() == "4 jobs: 2 done, 0 running, 2 incomplete, 0 not launched."
  )


# --------------------------------------------------------------- two launches at once
def test_a_second_launch_never_runs_a_running_job(tmp_path, capsys):
  """Two real launches of one sweep: the second starts while the first trains job 0; it lists
  job 0 as Running and does not start it; job 1 runs in one launch only (the second's, which
  claims it first, the first then skips it). Every job ends with its records once, in step
  order, from one process."""
  out = tmp_path / "sweep"
  argv = [
    "launch",
    "--datasets",
    "Spirals",
    "--methods",
    "erm",
    "--n_hparams",
    "2",
    "--n_trials",
    "1",
    "--test_envs",
    "-1",
    "--steps",
    "12",
    "--checkpoint_freq",
    "4",
    "--train_arg",
    "max_examples=16",
    "--train_arg",
    "per_domain_impl=vmap",
    "--hparams",
    '{"batch_size": 4}',
    "--output_dir",
    str(out),
  ]
  jobs = sweep.make_jobs(
    sweep.make_args_list(
      ["Spirals"],
      ["erm"],
      n_trials=1,
      n_hparams=2,
      test_envs=[-1],
      steps=12,
      checkpoint_freq=4,
      hparams='{"batch_size": 4}',
      extra_args={"max_examples": 16, "per_domain_impl": "vmap"},
    ),
    out,
  )
  first = subprocess.Popen(
    [sys.executable, "-m", "experiments.sweep", *argv],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.time() + 120
    while jobs[0].state != sweep.RUNNING:
      assert first.poll() is None and time.time() < deadline, first.communicate()[0]
      time.sleep(0.05)
    assert sweep_cli.main(argv) == 0
    second = capsys.readouterr().out
    first_out, _ = first.communicate(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, first_out
  assert f"Running: {jobs[0].output_dir}" in second  # listed as Running
  assert f"{jobs[0].output_dir.name}: done" in first_out  # ... and left to the first
  assert f"{jobs[0].output_dir.name}" not in second.split("Launching")[1]
  # job 1 ran in exactly one of the launches (the second, unless job 0 was very fast)
  ran = [f"{jobs[1].output_dir.name}: done" in o for o in (first_out, second)]
  assert sum(ran) == 1, (first_out, second)
  for job in jobs:
    assert job.state == sweep.DONE
    records = results_lib.read_jsonl(job.output_dir / "results.jsonl")
    assert [r["step"] for r in records] == [0, 4, 8, 11]
    assert (job.output_dir / "out.txt").read_text().count("results -> ") == 1  # one process each
