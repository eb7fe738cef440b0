"""DomainNet from a prepared TFDS copy (dgjax.data.tfds_images).

The copy is a tiny one this test prepares itself: TFDS's own ``domainnet`` builder (same
name, configs, version, features and 345 class names) with its download replaced by a few
generated JPEGs, written as ``array_record`` (no TensorFlow, no download). Each image is one
flat colour that encodes its TFDS label, so image/label alignment survives crops and flips.
"""

import io
import json
import shutil

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

from dgjax.data import env_split_seed, split_in_out  # noqa: E402
from dgjax.data.idx import DataError  # noqa: E402
from dgjax.data import image_folder, image_pipeline  # noqa: E402
from dgjax.data.tfds_images import TFDS_IMAGE_DATASETS, TfdsImages, tfds_image_environments  # noqa: E402
from tensorflow_datasets.image_classification.domainnet import domainnet  # noqa: E402

CONFIGS = TFDS_IMAGE_DATASETS["DomainNet"].configs
NAMES = domainnet._CLASS_NAMES  # TFDS's label order (the official DomainNet list)
SIZES = {"train": 7, "test": 4}  # records per split and config


def colour(label: int) -> tuple[int, int, int]:
  """A flat colour that identifies a TFDS label: base-8 digits, 32 levels apart (JPEG-safe)."""
  return tuple(32 * ((label >> (3 * k)) & 7) + 16 for k in range(3))


def label_of(pixel) -> int:
  return sum(int(round((float(c) - 16) / 32)) << (3 * k) for k, c in enumerate(pixel))


def tfds_label(config_index: int, split: str, i: int) -> int:
  # Chosen to hit classes whose TFDS index differs from the sorted one (The_* near the end).
  base = {"train": 0, "test": 100}[split]
  return (
    base + 50 * config_index + 37 * i + (NAMES.index("The_Eiffel_Tower") if i == 0 else 0)
  ) % len(NAMES)


def jpeg(label: int, shape) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((*shape, 3), colour(label), np.uint8)).save(
    buf, format="JPEG", quality=95
  )
  return buf.getvalue()


class _TinyDomainnet(domainnet.Domainnet, skip_registration=True):
  """TFDS's ``domainnet`` builder, its download replaced by generated images."""

  name = "domainnet"

  def _split_generators(self, dl_manager):
    return {split: self._examples(split) for split in SIZES}

  def _examples(self, split):
    c = CONFIGS.index(self.builder_config.name)
    for i in range(SIZES[split]):
      label = tfds_label(c, split, i)
      yield (
        f"{split}_{i:08d}",
        {"image": io.BytesIO(jpeg(label, (24 + i, 30 + 2 * c))), "label": label},
      )


def prepare(data_dir, configs=CONFIGS):
  for config in configs:
    _TinyDomainnet(
      config=config, data_dir=str(data_dir), file_format="array_record"
    ).download_and_prepare()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare(path)
  return path


@pytest.fixture(scope="module")
def envs(data_dir):
  return tfds_image_environments("DomainNet", data_dir)


def reference_records(data_dir, config):
  """TFDS's own reading (its PIL decoding), train then test: (images, TFDS labels)."""
  images, labels = [], []
  for split in SIZES:
    source = tfds.data_source(
      f"domainnet/{config}", split=split, data_dir=str(data_dir), download=False
    )
    for i in range(len(source)):
      images.append(np.asarray(source[i]["image"]))
      labels.append(int(source[i]["label"]))
  return images, labels


def test_environments_classes_and_records(envs, data_dir):
  assert [e.name for e in envs] == ["clip", "info", "paint", "quick", "real", "sketch"]
  sorted_names = tuple(sorted(NAMES))
  assert sorted_names[0] == "The_Eiffel_Tower" and NAMES[0] == "aircraft_carrier"
  for c, env in enumerate(envs):
    assert env.classes == sorted_names
    assert env.root == data_dir / "domainnet" / CONFIGS[c] / "1.0.0"
    assert isinstance(env.x, TfdsImages) and len(env.x) == len(env.y) == sum(SIZES.values())
    images, labels = reference_records(data_dir, CONFIGS[c])
    # labels: TFDS's renumbered by class name into the sorted order, pooled train then test
    assert env.y.tolist() == [sorted_names.index(NAMES[t]) for t in labels]
    assert sorted(labels) == sorted(tfds_label(c, s, i) for s in SIZES for i in range(SIZES[s]))
    for i in range(len(env.y)):
      ours = np.asarray(image_pipeline.load_rgb(env.x[i]))
      np.testing.assert_array_equal(ours, images[i])
      assert sorted_names[env.y[i]] == NAMES[label_of(ours[0, 0])]
  assert any(sorted(NAMES).index(NAMES[t]) != t for t in range(len(NAMES)))


def test_splits_follow_domainbed_rule(envs):
  splits_in, splits_out = image_folder.image_splits(envs, holdout_fraction=0.3, trial_seed=1)
  for i, env in enumerate(envs):
    idx_in, idx_out = split_in_out(len(env.y), 0.3, env_split_seed(1, i))
    assert isinstance(splits_in[i].x, TfdsImages)
    np.testing.assert_array_equal(splits_in[i].x.index, idx_in)
    np.testing.assert_array_equal(splits_out[i].x.index, idx_out)
    np.testing.assert_array_equal(splits_in[i].y, env.y[idx_in])
    np.testing.assert_array_equal(splits_out[i].y, env.y[idx_out])
    j = int(idx_out[0])
    assert splits_out[i].x[0] == env.x[j]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_and_eval_batches(envs, num_workers):
  splits_in, splits_out = image_folder.image_splits(envs, 0.2, 0)
  train = [splits_in[e] for e in (0, 2, 5)]
  import jax

  batches = list(
    image_pipeline.train_batches(
      train, jax.random.key(3), 4, num_steps=2, size=32, num_workers=num_workers
    )
  )
  assert len(batches) == 2
  names = sorted(NAMES)
  for b in batches:
    assert b["x"].shape == (3, 4, 32, 32, 3) and b["x"].dtype == np.uint8
    assert b["y"].shape == (3, 4)
    for d, split in enumerate(train):
      assert set(b["y"][d].tolist()) <= set(split.y.tolist())
      for k in range(4):  # the image's colour says its label
        assert names[b["y"][d, k]] == NAMES[label_of(b["x"][d, k, 16, 16])]
  evals = list(image_pipeline.eval_batches(splits_out[1], 2, size=16, num_workers=0))
  n = len(splits_out[1].y)
  assert sum(int(b["mask"].sum()) for b in evals) == n
  got = np.concatenate([b["y"] for b in evals])[:n]
  np.testing.assert_array_equal(got, splits_out[1].y)


def test_domain_subset_and_unknown_domain(data_dir):
  envs = tfds_image_environments("DomainNet", data_dir, domains=["sketch", "clipart"])
  assert [e.name for e in envs] == ["clip", "sketch"]
  with pytest.raises(ValueError, match=r"unknown domain\(s\) 'photo'.*clip \(clipart\)"):
    tfds_image_environments("DomainNet", data_dir, domains=["clip", "photo"])


def test_errors_name_path_and_command(tmp_path):
  with pytest.raises(DataError, match="TFDS has no 'PACS'.*DomainNet"):
    tfds_image_environments("PACS", tmp_path)
  missing = tmp_path / "nowhere"
  with pytest.raises(
    DataError,
    match=f"{missing} does not exist.*tfds build domainnet "
    f"--file_format=array_record --data_dir={missing}",
  ):
    tfds_image_environments("DomainNet", missing)
  prepare(tmp_path, CONFIGS[:2])
  with pytest.raises(
    DataError,
    match=r"domainnet/painting is not prepared in .*"
    r"domainnet/painting/<version>/dataset_info.json.*tfds build",
  ):
    tfds_image_environments("DomainNet", tmp_path)
  assert len(tfds_image_environments("DomainNet", tmp_path, domains=["clip", "info"])) == 2


def test_tfrecord_copy_is_refused_with_the_conversion(data_dir, tmp_path):
  # A copy prepared in TFDS's default format (tfrecord) has no random access without TF.
  src = data_dir / "domainnet" / "clipart"
  dst = tmp_path / "domainnet" / "clipart"
  shutil.copytree(src, dst)
  info_file = dst / "1.0.0" / "dataset_info.json"
  info = json.loads(info_file.read_text())
  info["fileFormat"] = "tfrecord"
  info_file.write_text(json.dumps(info))
  with pytest.raises(
    DataError,
    match="prepared as tfrecord.*tfds convert_format "
    "--dataset_dir=.*--out_file_format=array_record",
  ):
    tfds_image_environments("DomainNet", tmp_path, domains=["clip"])


class _TrainOnly(_TinyDomainnet, skip_registration=True):
  name = "domainnet"

  def _split_generators(self, dl_manager):
    return {"train": self._examples("train")}


def test_missing_split_is_named(tmp_path):
  _TrainOnly(
    config="clipart", data_dir=str(tmp_path), file_format="array_record"
  ).download_and_prepare()
  with pytest.raises(DataError, match=r"domainnet/clipart:1.0.0 in .* has no split 'test'"):
    tfds_image_environments("DomainNet", tmp_path, domains=["clip"])


def test_training_config_selects_the_tfds_copy(data_dir):
  """``--data_source=tfds`` reaches the reader: the run's environments come from the TFDS copy
  (DomainBed's names), and an unknown source is refused before any work."""
  from dgjax import datasets, runs
  from dgjax.image_task import image_environments

  config = runs.make_config(
    dataset="DomainNet", method="erm", data_source="tfds", data_dir=str(data_dir), pretrained="none"
  )
  envs = image_environments(config.dataset, config.data_dir, config.data_source)
  assert [e.name for e in envs] == ["clip", "info", "paint", "quick", "real", "sketch"][: len(envs)]
  assert [e.name for e in envs] == [
    e.name
    for e in datasets.get_dataset("DomainNet").environments(str(data_dir), data_source="tfds")
  ]
  with pytest.raises(ValueError, match="data_source must be one of"):
    runs.make_config(dataset="DomainNet", method="erm", data_source="hub", pretrained="none")
