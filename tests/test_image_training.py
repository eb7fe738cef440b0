"""DomainBed's image benchmarks on the engine: a synthetic PACS tree (JPEGs the test writes),
ResNet-18 at 32x32 from scratch, a few jitted steps of erm, sand and hgp through the same
``dgjax.runs.run`` the command line uses; pretrained weights required unless ``none``; resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgjax import results, runs
from dgjax.task import Task

ROOT = Path(__file__).resolve().parents[1]
PACS = ("art_painting", "cartoon", "photo", "sketch")


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("domainbed")
  rng = np.random.default_rng(0)
  classes = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
  for e, env in enumerate(PACS):
    for c, cls in enumerate(classes):
      d = root / "PACS" / env / cls
      d.mkdir(parents=True)
      for i in range(2):
        img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        img[..., c % 3] = (40 * e + 30 * c) % 256  # a little signal per class and domain
        Image.fromarray(img).save(d / f"{i}.jpg", quality=85)
  return root


def image_config(root, method, out, **kw):
  fields = {"steps": 3, "checkpoint_freq": 2, **kw}
  return runs.make_config(
    "PACS",
    test_envs=[3],
    method=method,
    data_dir=str(root),
    pretrained="none",
    image_size=32,
    output_dir=str(out),
    progress=False,
    data_workers=0,
    **{**fields, "hparams": {"batch_size": 2, "resnet18": True, **kw.get("hparams", {})}},
  )


@pytest.fixture(scope="module")
def erm_with_dropout(pacs_root, tmp_path_factory):
  """3 steps of erm with resnet_dropout 0.1, evaluated at every step (shared by two tests)."""
  out = tmp_path_factory.mktemp("full")
  return runs.run(
    image_config(pacs_root, "erm", out, checkpoint_freq=1, hparams={"resnet_dropout": 0.1})
  ), out


@pytest.mark.parametrize("method", ["erm", "sand", "hgp"])
def test_resnet18_trains_a_few_steps_on_a_synthetic_pacs_tree(
  pacs_root, tmp_path, method, erm_with_dropout
):
  if method == "erm":
    records, out = erm_with_dropout
    assert [r["step"] for r in records] == [0, 1, 2]
  else:
    # sand: unfrozen BatchNorm (current DomainBed's default); hgp: frozen (the paper's DomainBed)
    config = image_config(
      pacs_root, method, tmp_path / method, hparams={"freeze_bn": method == "hgp"}
    )
    assert config.resolved_hparams["freeze_bn"] == (method == "hgp")
    assert config.steps == 3 and config.resolved_hparams["lr"] == 5e-5  # DomainBed's image lr
    assert (
      config.resolved_hparams["batch_size"] == 2
      and config.resolved_hparams["resnet_dropout"] == 0.0
    )
    records, out = runs.run(config), tmp_path / method
    assert [r["step"] for r in records] == [0, 2]
  for r in records:
    assert np.isfinite(r["loss"]) and len(r["env_losses"]) == 3
    for e in range(4):
      assert 0.0 <= r[f"env{e}_in_acc"] <= 1.0 and 0.0 <= r[f"env{e}_out_acc"] <= 1.0
  on_disk = results.read_jsonl(out / "results.jsonl")
  assert on_disk[-1]["args"]["dataset"] == "PACS" and on_disk[-1]["args"]["env_names"] == [
    "A",
    "C",
    "P",
    "S",
  ]
  assert (out / "done").exists()


def test_image_runs_resume_to_the_same_numbers(pacs_root, tmp_path, erm_with_dropout):
  import dataclasses

  full, _ = erm_with_dropout
  part = image_config(
    pacs_root, "erm", tmp_path / "part", checkpoint_freq=1, hparams={"resnet_dropout": 0.1}
  )
  runs.run(dataclasses.replace(part, steps=2))  # checkpoints at steps 0, 1
  (tmp_path / "part" / "done").unlink()
  resumed = runs.run(part, resume=True)
  assert resumed[-1]["step"] == full[-1]["step"] == 2
  np.testing.assert_allclose(
    resumed[-1]["loss"], full[-1]["loss"], rtol=1e-6
  )  # same batches, same dropout
  # evaluation normalises with the BatchNorm running statistics the checkpoint restored
  for key in full[-1]:
    if key.endswith("_acc"):
      assert resumed[-1][key] == full[-1][key], key


def test_cli_needs_weights_or_none(pacs_root, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--dataset=PACS",
      f"--data_dir={pacs_root}",
      f"--output_dir={tmp_path / 'x'}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  # DomainBed's default backbone: ResNet-50 with timm's AugMix weights (resnet50_augmix=true)
  assert "resnet50_augmix needs ImageNet weights" in proc.stderr
  assert "resnet50.ram_in1k" in proc.stderr and "--pretrained=none" in proc.stderr
  assert "Traceback" not in proc.stderr
  bad = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--dataset=PACS",
      f"--data_dir={tmp_path / 'missing'}",
      "--pretrained=none",
      f"--output_dir={tmp_path / 'y'}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_image_task_val_loss_is_the_mean_cross_entropy_of_the_training_out_splits(pacs_root):
  """SWAD's validation loss on an image task: per training environment the mean cross-entropy
  over its out-split (evaluation preprocessing; padded last batches masked), then the mean
  over those environments; here against a loop over the images one at a time."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from dgjax import augment, image_task
  from dgjax.data import image_folder, image_pipeline

  class Tiny(nn.Module):  # a linear head on the mean colour (cheap to compile)
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(7)(jnp.mean(x, axis=(1, 2)))

  envs = image_task.image_environments("PACS", pacs_root)
  splits_in, splits_out = image_folder.image_splits(envs, 0.5, trial_seed=0)
  task = image_task.ImageTask(
    Tiny(),
    None,
    splits_in,
    splits_out,
    test_envs=(3,),
    batch_size=2,
    seed=0,
    eval_batch_size=4,
    num_workers=0,
    image_size=16,
  )
  assert isinstance(task, Task)  # the engine's protocol, every member
  params = task.init_params(jax.random.key(0))
  predict = lambda model_state, x: Tiny().apply({"params": model_state}, x)  # noqa: E731
  per_env = []
  for e in (0, 1, 2):
    split = splits_out[e]
    assert len(split.y) % 4 != 0  # the task's last batch is padded
    losses = [
      -jax.nn.log_softmax(predict(params, augment.eval_preprocess(b["x"])))[0, b["y"][0]]
      for b in image_pipeline.eval_batches(split, 1, size=16, num_workers=0)
    ]
    assert len(losses) == len(split.y)
    per_env.append(np.mean(losses))
  assert task.val_loss(params, predict) == pytest.approx(float(np.mean(per_env)), rel=1e-5)
