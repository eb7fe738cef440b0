"""End to end on the real digits in $DGJAX_DATA_DIR/mnist-first10k: library and CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgjax import train as train_lib
from dgjax.data import colored_mnist, env_split_seed, load_mnist_idx, split_in_out
from dgjax.models import mnist_cnn

ROOT = Path(__file__).resolve().parents[1]


def real_splits(data_dir, max_eval=400):
  mnist = load_mnist_idx(data_dir / "mnist-first10k")
  envs = colored_mnist(mnist.images, mnist.labels, seed=0)
  ins, outs = [], []
  for i, env in enumerate(envs):
    idx_in, idx_out = split_in_out(len(env.y), 0.2, env_split_seed(0, i))
    ins.append(train_lib.Split(f"env{i}_in", env.x[idx_in], env.y[idx_in]))
    outs.append(
      train_lib.Split(f"env{i}_out", env.x[idx_out[:max_eval]], env.y[idx_out[:max_eval]])
    )
  return ins, outs


@pytest.mark.slow
def test_erm_learns_the_colour_shortcut(data_dir):
  ins, outs = real_splits(data_dir)  # train on the full in-splits, evaluate 400 per out-split
  cfg = train_lib.TrainConfig(
    method="erm", steps=150, checkpoint_freq=1000, hparams={"batch_size": 32}, progress=False
  )
  # train on the full in-splits; evaluate on small subsets
  records = train_lib.train(cfg, mnist_cnn(2, conv_impl="xla"), ins, outs)
  final = records[-1]
  train_acc = (final["env0_out_acc"] + final["env1_out_acc"]) / 2
  test_acc = final["env2_out_acc"]
  # colour agrees with the label 90% / 80% in training and 10% in the test environment:
  # a model that reads colour scores ~85% on training envs and ~10% on the test env.
  assert train_acc > 0.75, final
  assert test_acc < 0.35, final
  assert test_acc < train_acc - 0.4, final


def run_cli(*args, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "experiments.colored_mnist", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.slow
def test_cli_runs_and_writes_results(data_dir, tmp_path):
  out = tmp_path / "run"
  proc = run_cli(
    "--method=sand",
    f"--data_dir={data_dir / 'mnist-first10k'}",
    "--steps=1",
    "--checkpoint_freq=100",
    f"--output_dir={out}",
    "--hparams={\"batch_size\": 8}",
    "--noprogress",
  )
  assert proc.returncode == 0, proc.stderr
  lines = (out / "results.jsonl").read_text().splitlines()
  assert len(lines) == 1  # one step: step 0 is also the last
  rec = json.loads(lines[-1])
  assert rec["step"] == 0 and rec["hparams"]["batch_size"] == 8 and rec["args"]["method"] == "sand"
  assert {f"env{i}_{s}_acc" for i in range(3) for s in ("in", "out")} <= set(rec)
  assert "training-domain validation" in proc.stdout and "-90%*" in proc.stdout
  # an existing results file is never silently overwritten
  again = run_cli(
    "--method=sand", f"--data_dir={data_dir / 'mnist-first10k'}", f"--output_dir={out}"
  )
  assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.parametrize(
  "args,message",
  [
    (["--method=sandd"], "unknown method 'sandd'; valid methods: adrmx, and, arm, "),
    (
      ["--method=sand", '--hparams={"kk": 1}'],
      "unknown hparam(s) 'kk' for method 'sand'; valid hparams",
    ),
    (["--hparams={bad"], "--hparams is not valid JSON"),
    (["--data_dir=/nonexistent/mnist"], "/nonexistent/mnist"),
  ],
)
def test_cli_errors_are_clear(args, message, tmp_path):
  proc = run_cli(*args, f"--output_dir={tmp_path}", "--steps=1", timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
