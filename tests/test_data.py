"""Tests for dgjax.data: IDX reader, MNIST loaders, Colored MNIST, splits."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from dgjax.data import (
  ENVIRONMENT_NAMES,
  DataError,
  Environment,
  MNISTData,
  colored_mnist,
  env_split_seed,
  environment_indices,
  environment_name,
  load_mnist,
  load_mnist_idx,
  read_idx,
  split_in_out,
)

MNIST10K_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
_CODES = {
  np.uint8: 0x08,
  np.int8: 0x09,
  np.int16: 0x0B,
  np.int32: 0x0C,
  np.float32: 0x0D,
  np.float64: 0x0E,
}


# --- helpers ----------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
  """Serialises an array in IDX format (big-endian)."""
  code = _CODES[array.dtype.type]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = None) -> Path:
  data = idx_bytes(array)
  if compress is None:
    compress = path.name.endswith(".gz")
  path.write_bytes(gzip.compress(data) if compress else data)
  return path


def fake_mnist(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
    rng.integers(0, 10, n).astype(np.uint8),
  )


def write_split(directory: Path, prefix: str, n: int, suffix: str = ".gz", seed: int = 0):
  images, labels = fake_mnist(n, seed)
  write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
  write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
  return images, labels


def raises_naming(expected: str, fn, *args, **kwargs) -> str:
  """Asserts fn raises DataError whose message contains `expected`; returns it."""
  with pytest.raises(DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert expected in message, message
  return message


@pytest.fixture(scope="module")
def mnist10k(data_dir):
  return load_mnist_idx(data_dir / "mnist-first10k")


@pytest.fixture(scope="module")
def fashion_dir(data_dir):
  path = data_dir / "fashion-mnist"
  if not path.is_dir():
    reason = f"{data_dir} has no fashion-mnist/ subdirectory"
    if os.environ.get("CI"):
      pytest.fail(reason)
    pytest.skip(reason)
  return path


# --- real data --------------------------------------------------------------
def test_read_idx_real_files(data_dir):
  d = data_dir / "mnist-first10k"
  images = read_idx(d / "train-images-idx3-ubyte.gz")
  labels = read_idx(d / "train-labels-idx1-ubyte.gz")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  assert images.flags.writeable


def test_load_mnist_idx_real(mnist10k, data_dir):
  assert isinstance(mnist10k, MNISTData)
  assert mnist10k.images.shape == (10000, 28, 28) and mnist10k.images.dtype == np.uint8
  assert mnist10k.labels.shape == (10000,) and mnist10k.labels.dtype == np.int64
  assert np.bincount(mnist10k.labels, minlength=10).tolist() == MNIST10K_COUNTS
  assert str(data_dir / "mnist-first10k") in mnist10k.source
  assert mnist10k.source.endswith("(train: 10000)")
  assert len(mnist10k) == 10000


def test_load_mnist_fashion_pools_t10k(fashion_dir):
  data = load_mnist(fashion_dir, tfds_name="fashion_mnist", name="Fashion-MNIST")
  assert data.images.shape == (70000, 28, 28) and data.labels.shape == (70000,)
  assert "train: 60000, t10k: 10000" in data.source
  assert np.bincount(data.labels).tolist() == [7000] * 10
  test_images = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
  np.testing.assert_array_equal(data.images[60000:], test_images)


# --- read_idx on synthetic files ---------------------------------------------
@pytest.mark.parametrize("dtype", list(_CODES))
def test_read_idx_dtypes_roundtrip(tmp_path, dtype):
  array = (np.arange(24) - 7).reshape(2, 3, 4).astype(dtype)
  out = read_idx(write_idx(tmp_path / "a.idx", array))
  assert out.dtype == np.dtype(dtype) and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


def test_raw_files_accepted(tmp_path):
  images, labels = write_split(tmp_path, "train", 7, suffix="")
  write_split(tmp_path, "t10k", 3, suffix="", seed=1)
  data = load_mnist_idx(tmp_path)
  assert data.images.shape == (10, 28, 28)
  np.testing.assert_array_equal(data.images[:7], images)
  np.testing.assert_array_equal(data.labels[:7], labels)
  assert "train: 7, t10k: 3" in data.source


def test_dotted_spelling_and_raw_content_named_gz(tmp_path):
  images, labels = fake_mnist(5)
  write_idx(tmp_path / "train-images.idx3-ubyte", images)
  # Compression is detected from content, not name: raw bytes named .gz work.
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, compress=False)
  data = load_mnist_idx(tmp_path)
  np.testing.assert_array_equal(data.images, images)
  np.testing.assert_array_equal(data.labels, labels)


def test_gzip_detected_without_gz_name(tmp_path):
  labels = fake_mnist(4)[1]
  out = read_idx(write_idx(tmp_path / "labels", labels, compress=True))
  np.testing.assert_array_equal(out, labels)


# --- malformed inputs --------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_file(tmp_path, suffix):
  images, _ = fake_mnist(3)
  data = idx_bytes(images)[:-100]
  path = tmp_path / f"train-images-idx3-ubyte{suffix}"
  path.write_bytes(gzip.compress(data) if suffix else data)
  message = raises_naming(path.name, read_idx, path)
  assert "truncated" in message


def test_trailing_bytes(tmp_path):
  path = tmp_path / "x.idx"
  path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\0")
  assert "trailing" in raises_naming("x.idx", read_idx, path)


def test_corrupt_gzip(tmp_path):
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(gzip.compress(idx_bytes(fake_mnist(3)[0]))[:-30])
  assert "gzip" in raises_naming(path.name, read_idx, path)


def test_bad_magic(tmp_path):
  path = tmp_path / "garbage"
  path.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
  assert "magic" in raises_naming("garbage", read_idx, path)


def test_wrong_magic_labels_in_images_slot(tmp_path):
  _, labels = fake_mnist(5)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", labels)  # magic 2049
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  message = raises_naming("train-images-idx3-ubyte.gz", load_mnist_idx, tmp_path)
  assert "2051" in message and "2049" in message


def test_non_gzip_file_named_gz(tmp_path):
  write_split(tmp_path, "train", 4)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  path.write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")
  message = raises_naming(path.name, load_mnist_idx, tmp_path)
  assert "not gzip" in message


def test_count_mismatch(tmp_path):
  images, labels = fake_mnist(6)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:5])
  message = raises_naming("train-labels-idx1-ubyte.gz", load_mnist_idx, tmp_path)
  assert "train-images-idx3-ubyte.gz" in message and "6" in message and "5" in message


def test_wrong_image_size(tmp_path):
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 32, 32), np.uint8))
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
  assert "28, 28" in raises_naming("train-images-idx3-ubyte.gz", load_mnist_idx, tmp_path)


def test_label_out_of_range(tmp_path):
  images, labels = fake_mnist(3)
  labels[1] = 12
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  assert "0..9" in raises_naming("train-labels-idx1-ubyte.gz", load_mnist_idx, tmp_path)


@pytest.mark.parametrize("present,absent", [("images", "labels"), ("labels", "images")])
def test_only_one_t10k_file(tmp_path, present, absent):
  write_split(tmp_path, "train", 4)
  _, labels = fake_mnist(2)
  arrays = {"images": fake_mnist(2)[0], "labels": labels}
  ndim = {"images": 3, "labels": 1}
  write_idx(tmp_path / f"t10k-{present}-idx{ndim[present]}-ubyte.gz", arrays[present])
  message = raises_naming(f"t10k-{absent}-idx{ndim[absent]}-ubyte", load_mnist_idx, tmp_path)
  assert f"t10k-{present}-idx{ndim[present]}-ubyte.gz" in message


def test_missing_dir(tmp_path):
  missing = tmp_path / "nowhere"
  message = raises_naming(str(missing), load_mnist_idx, missing)
  assert "train-images-idx3-ubyte" in message and "yann.lecun.com" in message
  message = raises_naming(str(missing), load_mnist, missing, name="Fashion-MNIST")
  assert "Fashion-MNIST" in message and "fashion_mnist" in message


def test_missing_train_pair(tmp_path):
  write_split(tmp_path, "t10k", 3)
  message = raises_naming("train-images-idx3-ubyte", load_mnist_idx, tmp_path)
  assert "train-labels-idx1-ubyte" in message and str(tmp_path) in message


def test_missing_file(tmp_path):
  raises_naming("nothing.gz", read_idx, tmp_path / "nothing.gz")


# --- TFDS branch ---------------------------------------------------------------
def test_tfds_offline_not_prepared(tmp_path):
  message = raises_naming("--data_dir", load_mnist, tfds_data_dir=tmp_path)
  assert "download_and_prepare" in message and "'mnist'" in message
  message = raises_naming(
    "fashion_mnist",
    load_mnist,
    tfds_name="fashion_mnist",
    tfds_data_dir=tmp_path,
    name="Fashion-MNIST",
  )
  assert "Fashion-MNIST IDX files" in message


def test_tfds_unknown_dataset(tmp_path):
  raises_naming("--data_dir", load_mnist, tfds_name="no_such_dataset_xyz", tfds_data_dir=tmp_path)


@pytest.mark.parametrize("tfds_name", ["mnist", "fashion_mnist"])
def test_tfds_mock_data(tmp_path, tfds_name):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    data = load_mnist(tfds_name=tfds_name, tfds_data_dir=tmp_path)
  assert data.images.shape == (12, 28, 28) and data.images.dtype == np.uint8
  assert data.labels.shape == (12,) and data.labels.dtype == np.int64
  assert data.labels.min() >= 0 and data.labels.max() <= 9
  assert "train: 6, test: 6" in data.source


def test_tfds_array_record_without_tensorflow(tmp_path):
  """Real (unmocked) ArrayRecord data source: a tiny dataset prepared here.

  Preparing `mnist` itself needs TensorFlow (PNG encoding of its Image
  feature), so this builder stores the digits as a uint8 Tensor feature;
  the reading path (tfds.data_source, batched __getitems__) is the same.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  from dgjax.data.mnist import _source_to_arrays

  splits = {"train": fake_mnist(70, 1), "test": fake_mnist(9, 2)}

  class DgjaxTinyMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {k: self._generate_examples(k) for k in splits}

    def _generate_examples(self, split):
      images, labels = splits[split]
      for i in range(len(labels)):
        yield i, {"image": images[i, :, :, None], "label": int(labels[i])}

  DgjaxTinyMnist(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  data = load_mnist(tfds_name="dgjax_tiny_mnist", tfds_data_dir=tmp_path, name="Tiny")
  assert "train: 70, test: 9" in data.source

  def rows(images, labels):  # order-free comparison: TFDS shuffles on prepare
    return np.unique(
      np.concatenate([images.reshape(len(labels), -1), np.asarray(labels)[:, None]], 1).astype(int),
      axis=0,
    )

  np.testing.assert_array_equal(rows(data.images[:70], data.labels[:70]), rows(*splits["train"]))
  np.testing.assert_array_equal(rows(data.images[70:], data.labels[70:]), rows(*splits["test"]))
  # Several chunks per split.
  source = tfds.data_source("dgjax_tiny_mnist", split="train", data_dir=tmp_path)
  images, labels = _source_to_arrays(source, "train", chunk=16)
  np.testing.assert_array_equal(images, data.images[:70])
  np.testing.assert_array_equal(labels, data.labels[:70])


# --- Colored MNIST ---------------------------------------------------------------
@pytest.fixture(scope="module")
def cmnist(mnist10k):
  return colored_mnist(mnist10k.images, mnist10k.labels, seed=0)


def test_colored_mnist_shapes_and_names(cmnist, mnist10k):
  assert tuple(e.name for e in cmnist) == ENVIRONMENT_NAMES
  sizes = [len(e.y) for e in cmnist]
  assert sum(sizes) == 10000 and max(sizes) - min(sizes) <= 1
  for env in cmnist:
    assert isinstance(env, Environment)
    n = len(env.y)
    assert env.x.shape == (n, 28, 28, 2) and env.x.dtype == np.float32
    assert env.y.dtype == np.int32 and env.color.dtype == np.int32
    assert set(np.unique(env.y)) <= {0, 1} and set(np.unique(env.color)) <= {0, 1}
    assert env.x.min() >= 0.0 and env.x.max() <= 1.0


def test_colored_mnist_statistics(cmnist, mnist10k):
  indices = environment_indices(10000, 3, seed=0)
  for env, idx, e in zip(cmnist, indices, (0.1, 0.2, 0.9)):
    digits = mnist10k.labels[idx]
    assert abs(np.mean(env.color == env.y) - (1 - e)) < 0.02, env.name
    assert abs(np.mean(env.y != (digits < 5)) - 0.25) < 0.02, env.name


def test_colored_mnist_channels(cmnist, mnist10k):
  indices = environment_indices(10000, 3, seed=0)
  for env, idx in zip(cmnist, indices):
    grey = mnist10k.images[idx].astype(np.float32) / 255.0
    n = len(env.y)
    kept = env.x[np.arange(n), :, :, env.color]
    dropped = env.x[np.arange(n), :, :, 1 - env.color]
    np.testing.assert_array_equal(kept, grey)
    assert not dropped.any()
    # colour 0 -> channel 0 ("red"); colour 1 -> channel 1 ("green").
    red = env.color == 0
    assert not env.x[red][..., 1].any() and not env.x[~red][..., 0].any()


def test_environment_indices_partition():
  indices = environment_indices(10, 3, seed=4)
  assert [len(i) for i in indices] == [4, 3, 3]
  assert sorted(np.concatenate(indices).tolist()) == list(range(10))


def test_colored_mnist_determinism(mnist10k):
  images, labels = mnist10k.images[:600], mnist10k.labels[:600]
  a = colored_mnist(images, labels, seed=3)
  b = colored_mnist(images, labels, seed=3)
  c = colored_mnist(images, labels, seed=4)
  for ea, eb in zip(a, b):
    for field in ("x", "y", "color"):
      np.testing.assert_array_equal(getattr(ea, field), getattr(eb, field))
  assert any(
    not np.array_equal(ea.y, ec.y) or not np.array_equal(ea.x, ec.x) for ea, ec in zip(a, c)
  )


def test_colored_mnist_downsample(mnist10k):
  images, labels = mnist10k.images[:300], mnist10k.labels[:300]
  envs = colored_mnist(images, labels, seed=1, downsample=True)
  full = colored_mnist(images, labels, seed=1)
  for small, big in zip(envs, full):
    assert small.x.shape[1:] == (14, 14, 2)
    np.testing.assert_array_equal(small.x, big.x[:, ::2, ::2])
    np.testing.assert_array_equal(small.y, big.y)


def test_colored_mnist_generic_environments():
  images, labels = fake_mnist(50)
  envs = colored_mnist(images, labels, environments=(0.3, 0.7, 0.05, 0.5))
  assert [e.name for e in envs] == ["+70%", "-70%", "+95%", "-50%"]
  assert environment_name(0.1) == "+90%" and environment_name(0.9) == "-90%"


def test_colored_mnist_bad_input():
  images, labels = fake_mnist(5)
  with pytest.raises(DataError, match="labels"):
    colored_mnist(images, labels[:4])


# --- in/out splits -----------------------------------------------------------------
def test_split_in_out():
  in_idx, out_idx = split_in_out(1000, 0.2, seed=7)
  assert len(out_idx) == 200 and len(in_idx) == 800
  assert not set(in_idx.tolist()) & set(out_idx.tolist())
  assert sorted(np.concatenate([in_idx, out_idx]).tolist()) == list(range(1000))
  again = split_in_out(1000, 0.2, seed=7)
  np.testing.assert_array_equal(in_idx, again[0])
  np.testing.assert_array_equal(out_idx, again[1])
  assert not np.array_equal(out_idx, split_in_out(1000, 0.2, seed=8)[1])
  assert len(split_in_out(7, 0.2)[1]) == 1  # int(7 * 0.2) == 1


def test_split_matches_domainbed_shuffle():
  # DomainBed: keys = list(range(n)); np.random.RandomState(seed).shuffle(keys)
  keys = list(range(50))
  np.random.RandomState(123).shuffle(keys)
  in_idx, out_idx = split_in_out(50, 0.2, seed=123)
  assert out_idx.tolist() == keys[:10] and in_idx.tolist() == keys[10:]


def test_env_split_seed():
  # DomainBed misc.seed_hash(0, 1): md5 of "(0, 1)" modulo 2**31.
  assert env_split_seed(0, 1) == 1514274641
  seeds = {env_split_seed(t, e) for t in range(3) for e in range(3)}
  assert len(seeds) == 9 and all(0 <= s < 2**31 for s in seeds)
