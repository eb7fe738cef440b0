"""Rotated MNIST, Spirals, Colored Fashion-MNIST: construction statistics; the dataset registry
and the experiments.train CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgjax import datasets
from dgjax.data import (
  ANGLES,
  DataError,
  environment_indices,
  load_mnist_idx,
  rotate_images,
  rotated_mnist,
  spirals,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ rotation
def test_rotation_by_0_is_identity_and_by_90_is_rot90():
  img = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
  np.testing.assert_array_equal(rotate_images(img, 0), img)
  np.testing.assert_array_equal(rotate_images(img, 90), np.rot90(img, 1, axes=(1, 2)))
  np.testing.assert_array_equal(rotate_images(img, 180), img[:, ::-1, ::-1])


def test_rotation_is_counter_clockwise_bilinear_about_the_centre():
  img = np.zeros((1, 28, 28), np.float32)
  img[0, 13, 20] = 1.0  # right of the centre (13.5, 13.5)
  out = rotate_images(img, 90)[0]
  assert np.argwhere(out > 0.5).tolist() == [[7, 13]]  # counter-clockwise: now above it
  # a smooth blob: bilinear rotation keeps its mass and moves its centre of mass by the angle
  yy, xx = np.mgrid[:28, :28]
  blob = np.exp(-((yy - 13.5) ** 2 + (xx - 19.5) ** 2) / 4.0)[None].astype(np.float32)
  rot = rotate_images(blob, 30)[0]
  assert rot.sum() == pytest.approx(blob.sum(), rel=1e-3)
  cy, cx = (rot * yy).sum() / rot.sum() - 13.5, (rot * xx).sum() / rot.sum() - 13.5
  assert np.degrees(np.arctan2(-cy, cx)) == pytest.approx(30, abs=0.5)
  assert np.hypot(cx, cy) == pytest.approx(6.0, abs=0.1)


def test_rotated_mnist_construction():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (62, 28, 28)).astype(np.uint8)
  images[:, :5], images[:, -5:], images[:, :, :5], images[:, :, -5:] = 0, 0, 0, 0  # MNIST border
  labels = rng.integers(0, 10, 62)
  envs = rotated_mnist(images, labels, seed=3)
  assert [e.name for e in envs] == ["0", "15", "30", "45", "60", "75"] and len(ANGLES) == 6
  idx = environment_indices(62, 6, 3)
  assert sorted(np.concatenate(idx).tolist()) == list(range(62))
  for e, i, angle in zip(envs, idx, ANGLES):
    assert e.x.shape == (len(i), 28, 28, 1) and e.x.dtype == np.float32 and e.y.dtype == np.int32
    np.testing.assert_array_equal(e.y, labels[i])
    assert 0.0 <= e.x.min() and e.x.max() <= 1.0
    np.testing.assert_allclose(e.x[..., 0], rotate_images(images[i], angle) / 255.0, atol=1e-6)
    # rotation about the centre keeps the ink (up to interpolation smoothing)
    assert e.x.sum() == pytest.approx(images[i].sum() / 255.0, rel=0.03)
  np.testing.assert_allclose(envs[0].x[..., 0], images[idx[0]] / 255.0)
  with pytest.raises(DataError, match="rotated_mnist"):
    rotated_mnist(images[:, 0], labels)


def test_rotated_mnist_on_real_digits(data_dir):
  mnist = load_mnist_idx(data_dir / "mnist-first10k")
  envs = datasets.load_environments("RotatedMNIST", data_dir / "mnist-first10k", max_examples=1200)
  assert [len(e.y) for e in envs] == [200] * 6
  assert sorted(np.concatenate([e.y for e in envs]).tolist()) == sorted(
    mnist.labels[:1200].tolist()
  )
  for e, idx in zip(envs, environment_indices(1200, 6, 0)):
    original = mnist.images[idx] / 255.0
    assert e.x.sum() == pytest.approx(original.sum(), rel=0.03)  # rotation keeps the ink
    moved = np.abs(e.x[..., 0] - original).mean()
    assert (moved < 1e-6) if e.name == "0" else (moved > 0.02)  # ... and moves it


# ------------------------------------------------------------------------------ Spirals
def test_spirals_construction():
  envs = spirals(num_train_envs=4, examples_per_env=2000, num_test=3000, n_dims=5, seed=0)
  assert [e.name for e in envs] == ["train0", "train1", "train2", "train3", "test"]
  signatures = []
  for e in envs:
    assert e.x.dtype == np.float32 and e.x.shape[1] == 7 and e.y.dtype == np.int32
    assert abs(e.y.mean() - 0.5) < 0.05
    np.testing.assert_allclose(e.x[:, :2].std(0), [1, 1], rtol=1e-4)  # unit-variance mechanism
    radius = np.hypot(*e.x[:, :2].T)
    assert radius.max() / radius.min() < 1.02 / 0.06 and radius.min() > 0
  for e in envs[:-1]:
    s = e.x[:, 2:] * (2 * e.y - 1)[:, None]  # (2y - 1) * signature = the environment's vector
    assert np.allclose(s, s[0])  # the shortcut predicts the label perfectly
    signatures.append(s[0])
  assert (
    min(np.linalg.norm(a - b) for i, a in enumerate(signatures) for b in signatures[i + 1 :]) > 0.1
  )
  test = envs[-1]
  assert abs(test.x[:, 2:].mean()) < 0.05 and abs(test.x[:, 2:].std() - 1) < 0.05
  assert np.all(np.abs(np.corrcoef(test.x[:, 2:].T, test.y)[-1, :-1]) < 0.1)  # no shortcut
  # the mechanism is shared: the label is the spiral arm (angle - 2 pi n r, before jitter)
  again = spirals(num_train_envs=4, examples_per_env=2000, num_test=3000, n_dims=5, seed=0)
  for a, b in zip(envs, again):
    np.testing.assert_array_equal(a.x, b.x)
  assert not np.array_equal(envs[0].x, spirals(4, 2000, 3000, 5, seed=1)[0].x)


def test_spiral_labels_are_the_spiral_arm():
  # with the signature dims dropped, a nearest-neighbour rule on the mechanism gets the
  # label right: the two arms never cross
  envs = spirals(num_train_envs=1, examples_per_env=3000, num_test=500, n_dims=1, seed=0)
  train, test = envs[0], envs[1]
  d = ((test.x[:, None, :2] - train.x[None, :, :2]) ** 2).sum(-1)
  pred = train.y[d.argmin(1)]
  assert (pred == test.y).mean() > 0.95


# ------------------------------------------------------------------------------ Colored Fashion-MNIST
def test_colored_fashion_mnist_statistics(data_dir):
  fashion = data_dir / "fashion-mnist"
  if not fashion.is_dir():
    pytest.skip(f"{fashion} missing")
  raw = load_mnist_idx(fashion, name="Fashion-MNIST")
  assert len(raw) == 70000
  envs = datasets.load_environments("ColoredFashionMNIST", fashion, max_examples=30000)
  assert [e.name for e in envs] == ["+90%", "+80%", "-90%"]
  idx = environment_indices(30000, 3, 0)
  for e, i, flip in zip(envs, idx, (0.1, 0.2, 0.9)):
    assert e.x.shape == (10000, 28, 28, 2)
    clean = (raw.labels[i] < 5).astype(np.int32)  # t-shirt..coat vs sandal..ankle boot
    assert abs((e.y != clean).mean() - 0.25) < 0.015  # 25% label noise
    assert abs((e.color != e.y).mean() - flip) < 0.015
    # the image is the garment in the channel named by its colour
    np.testing.assert_allclose(
      e.x[np.arange(10000), ..., e.color].sum((1, 2)),
      raw.images[i].astype(np.float64).sum((1, 2)) / 255,
      rtol=1e-4,
    )
    assert np.all(e.x[np.arange(10000), ..., 1 - e.color] == 0)


# ------------------------------------------------------------------------------ registry / CLI
def test_dataset_registry_errors_are_clear():
  with pytest.raises(
    ValueError,
    match="unknown dataset 'MNISTT'; valid datasets: ColoredFashionMNIST, "
    "ColoredMNIST, Debug224, Debug28, DomainNet, ImageFolder, OfficeHome, PACS, "
    "RotatedMNIST, SVIRO, SpawriousM2M_easy, SpawriousM2M_hard, SpawriousM2M_medium, "
    "SpawriousO2O_easy, SpawriousO2O_hard, SpawriousO2O_medium, Spirals, TerraIncognita, "
    "VLCS, WILDSCamelyon, WILDSFMoW",
  ):
    datasets.get_dataset("MNISTT")
  with pytest.raises(ValueError, match="takes no option"):
    datasets.load_environments("Spirals", downsample=True)
  with pytest.raises(DataError, match="/nonexistent"):
    datasets.load_environments("RotatedMNIST", "/nonexistent")
  envs = datasets.load_environments("Spirals", max_examples=20)
  ins, outs = datasets.make_splits(envs, 0.25, trial_seed=0)
  assert len(ins) == 17 and [len(s.y) for s in ins[:2]] == [15, 15] and len(outs[0].y) == 5


def test_a_new_small_image_dataset_is_one_declaration(monkeypatch, tmp_path):
  """One ``Dataset`` declaration with ``small_images=True``: DomainBed's small-image hparams
  (lr 1e-3, batch 64, their search ranges), its environment names in the records, and a step
  through the engine; the same declaration with ``small_images=False`` gets the large ones."""
  from dgjax import methods, runs
  from dgjax.data import LabeledEnvironment
  from dgjax.models import mlp

  def environments(data_dir=None, trial_seed=0, max_examples=None):
    rng = np.random.default_rng(trial_seed)
    return [
      LabeledEnvironment(
        name,
        rng.normal(size=(20, 4, 4, 1)).astype(np.float32),
        rng.integers(0, 3, 20).astype(np.int32),
      )
      for name in ("a", "b", "c")
    ]

  monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))  # restored after the test
  for name, small in (("Tiny28", True), ("Tiny224", False)):
    datasets.register(
      datasets.Dataset(
        name,
        "three tiny environments",
        environments,
        lambda conv_impl="auto": mlp(3, (8,)),
        default_test_env=-1,
        data="nothing",
        small_images=small,
        env_names=("a", "b", "c"),
      )
    )

  common = ("lr", "batch_size", "weight_decay")
  assert methods.default_hparams("erm", "Tiny28") == {
    "lr": 1e-3,
    "batch_size": 64,
    "weight_decay": 0.0,
  }
  assert {k: methods.default_hparams("erm", "Tiny224")[k] for k in common} == {
    "lr": 5e-5,
    "batch_size": 32,
    "weight_decay": 0.0,
  }
  for seed in (1, 2):  # the search ranges follow too (PACS: DomainBed's large-image ranges)
    assert methods.random_hparams("erm", seed, "Tiny28") == methods.random_hparams(
      "erm", seed, "ColoredMNIST"
    )
    large = methods.random_hparams("erm", seed, "PACS")
    assert methods.random_hparams("erm", seed, "Tiny224") == {k: large[k] for k in common}
  assert methods.default_hparams("rdm", "Tiny224")["batch_size"] == 88  # RDM's large default

  config = runs.make_config("Tiny28", steps=1, output_dir=str(tmp_path / "run"), progress=False)
  assert config.test_envs == (2,)
  assert (config.resolved_hparams["lr"], config.resolved_hparams["batch_size"]) == (1e-3, 64)
  [record] = runs.run(config)
  assert record["step"] == 0 and np.isfinite(record["loss"])
  assert record["hparams"]["lr"] == 1e-3 and record["hparams"]["batch_size"] == 64
  assert record["args"]["dataset"] == "Tiny28" and record["args"]["env_names"] == ["a", "b", "c"]


def run_cli(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", "experiments.train", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.slow
def test_train_cli_on_spirals(tmp_path):
  out = tmp_path / "run"
  proc = run_cli(
    "--dataset=Spirals",
    "--method=vrex",
    "--steps=2",
    "--max_examples=40",
    f"--output_dir={out}",
    '--hparams={"batch_size": 8}',
    "--noprogress",
  )
  assert proc.returncode == 0, proc.stderr
  rec = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
  assert rec["args"]["dataset"] == "Spirals" and rec["args"]["test_env"] == 16
  assert "test*" in proc.stdout and "training-domain validation" in proc.stdout
  bad = run_cli("--dataset=Spiral", f"--output_dir={tmp_path}")
  assert (
    bad.returncode == 2
    and "unknown dataset 'Spiral'" in bad.stderr
    and "Traceback" not in bad.stderr
  )
  bad = run_cli(
    "--dataset=RotatedMNIST", "--data_dir=/nonexistent/mnist", f"--output_dir={tmp_path}"
  )
  assert (
    bad.returncode == 2 and "/nonexistent/mnist" in bad.stderr and "Traceback" not in bad.stderr
  )
