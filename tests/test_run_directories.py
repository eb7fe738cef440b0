"""Run directories you can trust: one writer per run, resume without duplicated or lost records,
checkpoint fallback, bad input refused before any work, progress that reads well in a log."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dgjax import results
from dgjax import runs
from dgjax import train as train_lib
from dgjax.checkpoints import CheckpointError
from dgjax.models import mlp
from dgjax.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def splits():
  rng = np.random.default_rng(0)
  ins, outs = [], []
  for e in range(3):
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * e > 0).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[:48], y[:48]))
    outs.append(train_lib.Split(f"env{e}_out", x[48:], y[48:]))
  return ins, outs


def config(**kw):
  return train_lib.TrainConfig(**{"method": "erm", "steps": 7, "checkpoint_freq": 2,
                                  "hparams": {"batch_size": 8}, "progress": False, **kw})


def test_a_second_process_cannot_write_a_running_run(tmp_path):
  out = tmp_path / "run"
  first = subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--dataset=Spirals", "--max_examples=32",
       "--steps=1000000", "--checkpoint_freq=1000000", f"--output_dir={out}", "--noprogress",
       '--hparams={"batch_size": 4}'], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not (out / "results.jsonl").exists():   # the first run is training (and holds its lock)
      assert first.poll() is None, first.communicate()[1][-2000:]
      assert time.time() < deadline, "the first run never took its lock"
      time.sleep(0.2)
    for extra in ([], ["--overwrite"], ["--resume"]):
      second = cli("--dataset=Spirals", "--max_examples=32", "--steps=3", f"--output_dir={out}",
                   "--noprogress", *extra)
      assert second.returncode == 2, second.stderr[-2000:]
      assert "being written by another running process" in second.stderr
      assert "Traceback" not in second.stderr
    assert first.poll() is None          # the first run was not disturbed ...
    assert (out / "results.jsonl").exists() and results.is_locked(out)   # ... nor its files
  finally:
    first.kill()
    first.wait()
  # the lock dies with its process: the directory can be resumed now
  assert not results.is_locked(out)


def test_resume_without_a_checkpoint_starts_over_without_duplicates(tmp_path):
  ins, outs = splits()
  cfg = config()
  # a run killed right after its step-0 record, before any checkpoint was committed
  results.append_jsonl(tmp_path / "results.jsonl", {"step": 0, "stale": True})
  records = train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path, resume=True)
  on_disk = results.read_jsonl(tmp_path / "results.jsonl")
  assert [r["step"] for r in on_disk] == [r["step"] for r in records] == [0, 2, 4, 6]
  assert not any(r.get("stale") for r in on_disk)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  ins, outs = splits()
  model = mlp(2, (8,))
  reference = train_lib.train(config(), model, ins, outs, checkpoint=False)
  cut = config(steps=5)                  # evaluations (and checkpoints) at steps 0, 2, 4
  train_lib.train(cut, model, ins, outs, output_dir=tmp_path)
  (tmp_path / "done").unlink()
  newest = tmp_path / "checkpoints" / "4"
  for f in newest.rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  resumed = train_lib.train(config(), model, ins, outs, output_dir=tmp_path, resume=True)
  err = capsys.readouterr().err
  assert "unreadable" in err and "resuming from the checkpoint of step 2" in err
  on_disk = results.read_jsonl(tmp_path / "results.jsonl")
  assert [r["step"] for r in on_disk] == [0, 2, 4, 6]       # step 4 recomputed, not duplicated
  for a, b in zip(on_disk, reference):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
  assert [r["step"] for r in resumed] == [0, 2, 4, 6]


def test_only_unreadable_checkpoints_is_a_one_line_error(tmp_path):
  ins, outs = splits()
  train_lib.train(config(steps=3), mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  for f in (tmp_path / "checkpoints").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match="cannot restore any checkpoint"):
    train_lib.train(config(steps=3), mlp(2, (8,)), ins, outs, output_dir=tmp_path, resume=True)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": -3}, "steps must be an integer >= 1"),
    ({"checkpoint_freq": 0}, "checkpoint_freq must be an integer >= 1"),
    ({"max_examples": 0}, "max_examples must be >= 1"),
    ({"hparams": {"batch_size": 0}}, "hparam 'batch_size' must be >= 1"),
    ({"method": "sand", "hparams": {"tau": "high"}}, "hparam 'tau' must be a number, got 'high'"),
    ({"method": "sand", "hparams": {"tau": 1.5}}, "hparam 'tau' must be <= 1.0"),
    ({"hparams": {"lr": -1}}, "hparam 'lr' must be > 0"),
    ({"method": "hgp", "hparams": {"detach_target": "yes"}}, "hparam 'detach_target' must be true or false"),
    ({"method": "hgp", "preset": "nope"}, "has no preset 'nope'; its presets: irm_cmnist, irm_schedule"),
])
def test_bad_settings_are_named_errors(fields, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    runs.make_config("Spirals", **fields)


def test_cli_refuses_bad_input_before_loading_data(tmp_path):
  """Errors come before the data is read: the data directory here does not exist, so any
  error about it would mean the checks ran too late."""
  missing = str(tmp_path / "no-such-data")
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  readonly.chmod(0o500)
  cases = [(["--steps=0"], "steps must be an integer >= 1"),
           (['--hparams={"batch_size": 0}'], "batch_size"),
           (["--method=sand", '--hparams={"tau": "high"}'], "hparam 'tau' must be a number"),
           ([f"--output_dir={readonly / 'run'}"], "cannot write to the output directory")]
  if os.geteuid() == 0:   # root writes anywhere: the read-only case cannot be made
    cases = cases[:-1]
  for extra, message in cases:
    proc = cli("--dataset=ColoredMNIST", f"--data_dir={missing}", f"--output_dir={tmp_path / 'out'}",
               *extra)
    assert proc.returncode == 2, (extra, proc.stderr[-2000:])
    assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
    assert not (tmp_path / "out" / "checkpoints").exists()
  assert not (tmp_path / "out" / "done").exists()


def test_progress_writes_one_line_per_evaluation_to_a_log():
  stream = io.StringIO()
  p = Progress("sand", 101, stream=stream)
  for step in range(101):
    p.advance()
    if step % 50 == 0 or step == 100:
      p.evaluated(step, {"loss": 0.5, "test_acc": 0.25}, 0.01)
  p.close()
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue() and len(lines) == 3
  assert lines[0].startswith("sand step 0/101") and "loss 0.5" in lines[0] and "test_acc 0.25" in lines[0]
