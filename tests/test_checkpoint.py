"""Checkpoint/resume and K runs vmapped in one program."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dgjax import results
from dgjax import train as train_lib
from dgjax.models import mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resume_worker  # noqa: E402

WORKER = Path(__file__).resolve().parent / "resume_worker.py"
ACC_KEYS = [f"env{e}_{s}_acc" for e in range(3) for s in ("in", "out")]


def strip_timing(records):
  return [{k: v for k, v in r.items() if k not in ("step_time", "eval_time")} for r in records]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  reference = resume_worker.run(tmp_path / "uninterrupted")
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(WORKER), str(killed)])
  results_file = killed / "results.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if results_file.exists() and len(results_file.read_text().splitlines()) >= 3:
      break
    if proc.poll() is not None:
      pytest.fail("the worker finished before it could be killed")
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  written = len(results.read_jsonl(results_file))
  assert 3 <= written < len(reference), written
  assert not (killed / "done").exists()
  resumed = subprocess.run(
    [sys.executable, str(WORKER), str(killed), "--resume"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert resumed.returncode == 0, resumed.stderr
  on_disk = results.read_jsonl(results_file)
  assert [r["step"] for r in on_disk] == [r["step"] for r in reference]
  assert strip_timing(on_disk) == json.loads(json.dumps(strip_timing(reference)))  # bitwise
  assert (killed / "done").exists()


def test_resume_refuses_other_runs_and_corrupt_checkpoints(tmp_path):
  ins, outs = resume_worker.splits()
  cfg = train_lib.TrainConfig(
    method="sand", steps=3, checkpoint_freq=2, hparams={"batch_size": 8}, progress=False
  )
  train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  # a fresh (non-resume) run never silently overwrites a checkpoint
  with pytest.raises(train_lib.CheckpointError, match="already holds a checkpoint"):
    train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  # another seed is another run
  other = dataclasses.replace(cfg, seed=1)
  with pytest.raises(
    train_lib.CheckpointError, match=r"belongs to another run \(seed: checkpoint 0 vs now 1\)"
  ):
    train_lib.train(other, mlp(2, (8,)), ins, outs, output_dir=tmp_path, resume=True)
  # another model does not fit the saved arrays
  with pytest.raises(train_lib.CheckpointError, match="cannot restore"):
    train_lib.train(cfg, mlp(2, (16,)), ins, outs, output_dir=tmp_path, resume=True)
  # corrupt files
  for f in (tmp_path / "checkpoints").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  with pytest.raises(train_lib.CheckpointError, match="cannot restore"):
    train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path, resume=True)


def test_k_vmapped_runs_equal_single_runs(tmp_path):
  ins, outs = resume_worker.splits()
  variants = [
    dict(seed=0, hparams={"lr": 1e-3, "tau": 0.5}),
    dict(seed=1, hparams={"lr": 3e-3, "tau": 0.2}),
    dict(seed=2, hparams={"lr": 1e-3, "tau": 0.8, "k": 100.0}),
  ]
  configs = [
    train_lib.TrainConfig(
      method="sand",
      steps=25,
      checkpoint_freq=10,
      progress=False,
      seed=v["seed"],
      hparams={"batch_size": 16, **v["hparams"]},
    )
    for v in variants
  ]
  model = mlp(2, (16,))
  together = train_lib.train_many(
    configs,
    train_lib.DomainBedTask(model, ins, outs, configs[0].test_envs),
    output_dirs=[tmp_path / f"k{i}" for i in range(3)],
  )
  for i, cfg in enumerate(configs):
    alone = train_lib.train(cfg, model, ins, outs, checkpoint=False)
    assert [r["step"] for r in together[i]] == [r["step"] for r in alone] == [0, 10, 20, 24]
    for a, b in zip(together[i], alone):
      np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
      np.testing.assert_allclose(a["kept_fraction"], b["kept_fraction"], rtol=1e-4, atol=1e-6)
      for key in ACC_KEYS:
        assert abs(a[key] - b[key]) <= 2 / 56, (key, a[key], b[key])
      assert a["hparams"] == b["hparams"]
    assert results.read_jsonl(tmp_path / f"k{i}" / "results.jsonl")[-1]["step"] == 24
    assert (tmp_path / f"k{i}" / "done").exists()
  # runs with different structural hparams cannot share a program
  bad = [configs[0], dataclasses.replace(configs[1], hparams={"batch_size": 8})]
  with pytest.raises(ValueError, match="structural hparam 'batch_size'"):
    train_lib.train_many(bad, train_lib.DomainBedTask(model, ins, outs, bad[0].test_envs))


def test_runs_differing_in_a_structural_hparam_cannot_share_a_program():
  """hutchinson_samples sets a vmapped axis length: runs with different values must not be
  grouped (the old check knew only batch_size, and int() of a traced value failed)."""
  ins, outs = resume_worker.splits()
  configs = [
    train_lib.TrainConfig(
      method="hutchinson",
      steps=1,
      progress=False,
      seed=s,
      hparams={"batch_size": 8, "hutchinson_samples": n},
    )
    for s, n in ((0, 3), (1, 5))
  ]
  with pytest.raises(ValueError, match="structural hparam 'hutchinson_samples'"):
    train_lib.train_many(
      configs, train_lib.DomainBedTask(mlp(2, (8,)), ins, outs, configs[0].test_envs)
    )
