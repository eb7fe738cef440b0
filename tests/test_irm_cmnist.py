"""IRM-style Colored MNIST: data construction, the full-batch benchmark, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgjax.data import irm_cmnist
from dgjax.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]


def synthetic(n=1200, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def test_split_colours_and_noise():
  images, labels = synthetic()
  d = irm_cmnist.irm_colored_mnist(images, labels, seed=3)
  assert d.num_train_digits == 1000 and len(d.test.index) == 200
  e0, e1 = d.train
  assert len(e0.index) == len(e1.index) == 500
  assert set(e0.index) | set(e1.index) == set(range(1000)) and not set(e0.index) & set(e1.index)
  np.testing.assert_array_equal(d.test.index, np.arange(1000, 1200))
  for env, flip in ((e0, 0.2), (e1, 0.1), (d.test, 0.9)):
    np.testing.assert_array_equal(env.digit, labels[env.index])
    noise = np.mean(env.y != (env.digit < 5))
    disagree = np.mean(env.color != env.y)
    assert abs(noise - 0.25) < 0.08 and abs(disagree - flip) < 0.08, (env.name, noise, disagree)
  x = irm_cmnist.colorize(d.images, e0)
  assert x.shape == (500, 392) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
  grey = images[e0.index][:, ::2, ::2].reshape(500, -1) / 255.0
  ch = x.reshape(500, 2, 196)
  np.testing.assert_allclose(ch[np.arange(500), e0.color], grey, rtol=1e-6)
  assert np.all(ch[np.arange(500), 1 - e0.color] == 0)
  g = irm_cmnist.colorize(d.images, d.test, grayscale=True).reshape(-1, 2, 196)
  np.testing.assert_array_equal(g[:, 0], g[:, 1])
  # deterministic in the seed, different across seeds
  again = irm_cmnist.irm_colored_mnist(images, labels, seed=3)
  np.testing.assert_array_equal(again.train[0].index, e0.index)
  np.testing.assert_array_equal(again.test.color, d.test.color)
  other = irm_cmnist.irm_colored_mnist(images, labels, seed=4)
  assert not np.array_equal(other.train[0].index, e0.index)
  assert "proportions kept" in d.note and "1000 train" in d.note


def test_label_shift_proportions():
  images, labels = synthetic(n=3000)
  d = irm_cmnist.irm_colored_mnist(images, labels, seed=0, label_shift=0.97)
  e0, e1 = d.train
  low = np.sum(labels[:2500] < 5)
  high = 2500 - low
  assert np.sum(e0.digit < 5) == round(0.97 * low) and np.sum(e0.digit >= 5) == round(0.03 * high)
  assert len(e0.index) + len(e1.index) == 2500
  assert np.mean(e0.digit < 5) > 0.9 and np.mean(e1.digit < 5) < 0.1
  with pytest.raises(ValueError):
    irm_cmnist.irm_colored_mnist(images, labels, label_shift=1.5)


def test_uses_only_the_first_60000_digits():
  images = np.zeros((60010, 28, 28), np.uint8)
  labels = np.arange(60010) % 10
  d = irm_cmnist.irm_colored_mnist(images, labels)
  assert d.num_digits == 60000 and d.num_train_digits == 50000 and d.test.index.max() == 59999
  assert d.note.startswith("full MNIST")


def test_short_training_runs_reduce_the_gap(data_dir):
  """Every alignment method: finite penalty, and a smaller train-test gap than ERM."""
  from dgjax import irm_benchmark as B

  mnist = load_mnist(data_dir / "mnist-first10k")
  images, labels = mnist.images[:2000], mnist.labels[:2000]
  gaps, penalties = {}, {}
  for m in ("erm", "hgp", "hutchinson", "cma"):
    cfg = B.IRMConfig(
      method=m,
      steps=81,
      n_restarts=1,
      eval_every=80,
      hidden=32,
      lr=3e-3,
      penalty_anneal_iters=40,
      restarts_impl="sequential",
      hparams={"hutchinson_samples": 4} if m == "hutchinson" else {},
    )
    r = B.run(cfg, images, labels, log=lambda s: None)
    s = r["summary"]
    gaps[m] = s["train_acc"][0] - s["test_acc"][0]
    if m != "erm":
      penalties[m] = np.asarray([h["penalty"] for h in r["history"]])
  assert gaps["erm"] > 40, gaps  # ERM learns the colour
  for m, p in penalties.items():
    assert np.all(np.isfinite(p)), (m, p)
    assert gaps[m] < gaps["erm"] - 10, gaps


def test_cli_small(data_dir, tmp_path):
  out = tmp_path / "res.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.colored_mnist_irm",
      "--method=erm,cma",
      "--steps=3",
      "--n_restarts=2",
      "--eval_every=2",
      "--hessian_gap",
      "--restarts_impl=vmap",
      f"--data_dir={data_dir / 'mnist-first10k'}",
      f"--output={out}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8333 train / last 1/6 = 1667 test" in proc.stdout
  # the split and the real full-batch hparams come before the training, not after
  assert proc.stdout.index("data split:") < proc.stdout.index("== erm")
  assert '"batch_size": 4166' in proc.stdout and "2 x --l2_weight" in proc.stdout
  assert "| erm | 2 |" in proc.stdout and "| cma | 2 |" in proc.stdout
  assert "86.4 ± 0.2 / 14.0 ± 0.7 / 71.0 ± 0.7" in proc.stdout  # Fishr's Table 2
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["method"] for r in rows] == ["erm", "cma"]
  for r in rows:
    # --steps=3 is the scripts' loop length: 2 updates, the last record after both (step 1)
    assert len(r["final"]["test_acc"]) == 2 and [h["step"] for h in r["history"]] == [0, 1]
    assert all(np.isfinite(h["hessian_gap"]).all() for h in r["history"])
  assert all(np.isfinite(h["penalty"]).all() for h in rows[1]["history"])
  bad = subprocess.run(
    [sys.executable, "-m", "experiments.colored_mnist_irm", "--method=nope"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2 and "unknown method" in bad.stderr


PENALIZED = {
  "irm": ("irm_lambda", "irm_penalty_anneal_iters"),
  "vrex": ("vrex_lambda", "vrex_penalty_anneal_iters"),
  "fishr": ("lambda", "penalty_anneal_iters"),
  "coral": ("mmd_gamma", "penalty_anneal_iters"),
  "mmd": ("mmd_gamma", "penalty_anneal_iters"),
  "iga": ("penalty", "penalty_anneal_iters"),
  "sd": ("sd_reg", "penalty_anneal_iters"),
  "hgp": ("penalty_weight", "penalty_anneal_iters"),
  "hutchinson": ("penalty_weight", "penalty_anneal_iters"),
  "cma": ("penalty_weight", "penalty_anneal_iters"),
}


@pytest.mark.parametrize("method", sorted(PENALIZED))
def test_benchmark_gives_every_penalized_method_its_weight_and_schedule(method):
  """The benchmark maps its settings through the hparams' roles: coral, mmd and iga used to run
  it without its penalty weight and schedule (their names were missing from an alias table)."""
  from dgjax import irm_benchmark as B

  weight, anneal = PENALIZED[method]
  hp = B.benchmark_hparams(method, B.IRMConfig(), 123)
  assert hp[weight] == B.PENALTY_WEIGHT and hp[anneal] == B.PENALTY_ANNEAL_ITERS
  assert hp["lr"] == B.LR and hp["weight_decay"] == 2 * B.L2_WEIGHT and hp["batch_size"] == 123
  override = B.benchmark_hparams(method, B.IRMConfig(hparams={weight: 5.0}), 123)
  assert override[weight] == 5.0  # per-run overrides win


def test_every_penalty_weight_comes_with_a_schedule():
  """A method whose weight the benchmark sets must also take its schedule (an adversarial
  method's weight, with no schedule, has no role: the benchmark leaves it at its default)."""
  from dgjax import methods

  for name in methods.METHODS:
    roles = [s.role for s in methods.hparam_specs(name).values()]
    if "penalty_weight" in roles:
      assert "anneal_iters" in roles, name
