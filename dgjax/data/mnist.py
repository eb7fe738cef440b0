"""Loaders for MNIST-format datasets (MNIST, Fashion-MNIST).

Two sources are supported:

* a local directory holding the standard IDX files
  (``train-images-idx3-ubyte[.gz]`` etc.), read with :func:`load_mnist_idx`;
* a TFDS dataset already prepared in ``array_record`` format, read with
  ``tfds.data_source`` which needs no TensorFlow.

Following DomainBed (Gulrajani & Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021), the official train and test splits are pooled
(train first) and the environments are carved out of the pool afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from dgjax.data.idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, PathLike, read_idx

__all__ = ["MNISTData", "load_mnist", "load_mnist_idx", "IDX_FILE_NAMES"]

#: Canonical IDX file names (each may also end in ``.gz``, and the
#: ``-idx3-ubyte`` part may be spelled ``.idx3-ubyte``).
IDX_FILE_NAMES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}

# Where users can get the files, keyed by a normalised dataset name:
# (IDX download page, TFDS dataset name).
_SOURCES = {
  "mnist": ("http://yann.lecun.com/exdb/mnist/", "mnist"),
  "fashionmnist": ("https://github.com/zalandoresearch/fashion-mnist", "fashion_mnist"),
}

_TFDS_PREPARE = (
  "python -c \"import tensorflow_datasets as tfds; "
  "tfds.builder('{tfds_name}').download_and_prepare(file_format='array_record')\""
)


@dataclasses.dataclass(frozen=True)
class MNISTData:
  """Pooled MNIST-format examples.

  Attributes:
    images: ``uint8`` array of shape ``[N, 28, 28]``, values 0..255.
    labels: ``int64`` array of shape ``[N]``, values 0..9.
    source: human-readable description of where the data came from, e.g.
      ``"/data/mnist (train: 60000, t10k: 10000)"``.
  """

  images: np.ndarray
  labels: np.ndarray
  source: str

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def _expected_names(key: str) -> Tuple[str, ...]:
  """Accepted spellings for one IDX file, in order of preference."""
  stem = IDX_FILE_NAMES[key]
  dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
  return (stem, stem + ".gz", dotted, dotted + ".gz")


def _spell(key: str) -> str:
  stem = IDX_FILE_NAMES[key]
  return f"{stem}[.gz] (or {stem.replace('-idx', '.idx')}[.gz])"


def _find(data_dir: Path, key: str) -> Optional[Path]:
  for name in _expected_names(key):
    candidate = data_dir / name
    if candidate.is_file():
      return candidate
  return None


def _where_to_get(name: str) -> str:
  url, tfds_name = _SOURCES.get("".join(c for c in name.lower() if c.isalnum()), (None, None))
  files = ", ".join(f"{IDX_FILE_NAMES[k]}[.gz]" for k in IDX_FILE_NAMES)
  hint = f"the four {name} IDX files ({files})"
  hint += f" from {url} or any mirror" if url else " from any mirror"
  if tfds_name:
    hint += f"; or install TensorFlow and let TFDS download `{tfds_name}`"
  return hint


def _check_pair(images: np.ndarray, labels: np.ndarray, images_desc: str, labels_desc: str) -> None:
  """Validates one images/labels pair; raises DataError naming the files."""
  if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
    raise DataError(
      f"{images_desc}: expected uint8 images of shape (N, 28, 28), found "
      f"{images.dtype} of shape {images.shape}"
    )
  if labels.ndim != 1:
    raise DataError(f"{labels_desc}: expected labels of shape (N,), found shape {labels.shape}")
  if images.shape[0] != labels.shape[0]:
    raise DataError(
      f"{images_desc} holds {images.shape[0]} images but {labels_desc} "
      f"holds {labels.shape[0]} labels; expected equal counts"
    )
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataError(
      f"{labels_desc}: expected labels in 0..9, found values in {labels.min()}..{labels.max()}"
    )


def _read_pair(images_path: Path, labels_path: Path) -> Tuple[np.ndarray, np.ndarray]:
  images = read_idx(images_path, expected_magic=IMAGES_MAGIC)
  labels = read_idx(labels_path, expected_magic=LABELS_MAGIC)
  _check_pair(images, labels, str(images_path), str(labels_path))
  return images, labels.astype(np.int64)


def load_mnist_idx(data_dir: PathLike, name: str = "MNIST") -> MNISTData:
  """Loads MNIST-format IDX files from a directory, pooling train and test.

  ``data_dir`` must hold the training pair ``train-images-idx3-ubyte`` and
  ``train-labels-idx1-ubyte`` (each optionally ``.gz``; the dotted spelling
  ``train-images.idx3-ubyte`` is accepted too). If the test pair
  ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` is present it is
  appended after the training examples, as DomainBed pools MNIST train and
  test before building environments.

  Args:
    data_dir: directory holding the IDX files.
    name: dataset name used in messages (e.g. ``"Fashion-MNIST"``).

  Returns:
    :class:`MNISTData` with ``uint8 [N, 28, 28]`` images and ``int64 [N]``
    labels.

  Raises:
    DataError: directory or training pair missing, only one of the two test
      files present, a malformed file, or inconsistent counts/values.
  """
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    what = "is not a directory" if data_dir.exists() else "does not exist"
    raise DataError(
      f"{name} data directory {data_dir} {what}; expected a directory holding {_where_to_get(name)}"
    )
  found = {key: _find(data_dir, key) for key in IDX_FILE_NAMES}

  missing_train = [k for k in ("train_images", "train_labels") if found[k] is None]
  if missing_train:
    names = " and ".join(_spell(k) for k in missing_train)
    raise DataError(
      f"{data_dir}: missing {name} training file(s): expected {names}. Get {_where_to_get(name)}"
    )
  has_test = [found[k] is not None for k in ("test_images", "test_labels")]
  if any(has_test) and not all(has_test):
    present, absent = (
      ("test_images", "test_labels") if has_test[0] else ("test_labels", "test_images")
    )
    raise DataError(
      f"{data_dir}: found {found[present].name} but not its partner "
      f"{_spell(absent)}; provide both t10k files or neither"
    )

  images, labels = _read_pair(found["train_images"], found["train_labels"])
  counts = f"train: {len(labels)}"
  if all(has_test):
    test_images, test_labels = _read_pair(found["test_images"], found["test_labels"])
    images = np.concatenate([images, test_images])
    labels = np.concatenate([labels, test_labels])
    counts += f", t10k: {len(test_labels)}"
  return MNISTData(images=images, labels=labels, source=f"{data_dir} ({counts})")


def _source_to_arrays(source, split: str, chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
  """Converts a TFDS random-access data source to ``(images, labels)``."""
  n = len(source)
  images = np.empty((n, 28, 28), np.uint8)
  labels = np.empty((n,), np.int64)
  batched = True
  for start in range(0, n, chunk):
    keys = list(range(start, min(start + chunk, n)))
    if batched:
      try:
        records = source.__getitems__(keys)  # batched read
      except TypeError:
        # `tfds.testing.mock_data` (tfds 4.9) installs an unbound
        # `__getitems__` that cannot be called; read one by one.
        batched = False
    if not batched:
      records = [source[i] for i in keys]
    batch_images = np.stack([np.asarray(r["image"]) for r in records])
    if batch_images.dtype != np.uint8 or batch_images.size != len(keys) * 28 * 28:
      raise DataError(
        f"TFDS split {split!r}: expected uint8 images of shape (28, 28[, 1]), "
        f"found {batch_images.dtype} of shape {batch_images.shape[1:]}"
      )
    images[start : start + len(keys)] = batch_images.reshape(len(keys), 28, 28)
    labels[start : start + len(keys)] = [int(r["label"]) for r in records]
  return images, labels


def load_mnist(
  data_dir: Optional[PathLike] = None,
  tfds_name: str = "mnist",
  tfds_data_dir: Optional[PathLike] = None,
  name: str = "MNIST",
  tfds_splits: Sequence[str] = ("train", "test"),
  download: bool = True,
) -> MNISTData:
  """Loads an MNIST-format dataset from IDX files or from a prepared TFDS dataset.

  With ``data_dir`` this is :func:`load_mnist_idx`. Without it, the TFDS
  dataset ``tfds_name`` is read with ``tfds.data_source`` (random access to
  ``array_record`` files; TensorFlow is not needed) and its ``tfds_splits``
  are pooled in order. If the dataset is not prepared (``array_record``
  format under ``tfds_data_dir``, default: the TFDS default data directory)
  and TensorFlow is installed (``pip install "dgjax[tfds]"``) and
  ``download`` is true, TFDS downloads and prepares it once.

  Args:
    data_dir: directory holding the IDX files, or None to use TFDS.
    tfds_name: TFDS dataset name, e.g. ``"mnist"`` or ``"fashion_mnist"``.
    tfds_data_dir: TFDS data directory, or None for the TFDS default.
    name: dataset name used in messages.
    tfds_splits: TFDS splits to pool, in order.
    download: let TFDS download and prepare the dataset when TensorFlow is
      installed (preparing needs TensorFlow; reading does not).

  Returns:
    :class:`MNISTData`.

  Raises:
    DataError: the data is missing or malformed; for TFDS the message says
      how to provide the data offline or how to prepare it.
  """
  if data_dir is not None:
    return load_mnist_idx(data_dir, name=name)

  def read_prepared():
    sources = tfds.data_source(
      tfds_name, split=list(tfds_splits), data_dir=tfds_data_dir, download=False
    )
    return [_source_to_arrays(s, split) for s, split in zip(sources, tfds_splits)]

  try:
    import tensorflow_datasets as tfds  # slow import, hence lazy

    try:
      parts = read_prepared()
    except DataError:
      raise
    except Exception:
      if not download or importlib.util.find_spec("tensorflow") is None:
        raise
      # Preparing needs TensorFlow (and internet): download once, as array_record.
      print(f"TFDS: downloading and preparing '{tfds_name}' (once)...", flush=True)
      tfds.builder(tfds_name, data_dir=tfds_data_dir).download_and_prepare(
        file_format="array_record"
      )
      parts = read_prepared()
  except DataError:
    raise
  except Exception as e:  # any TFDS failure: not found, not prepared, no TF, offline, ...
    cause = " ".join(str(e).split())
    if len(cause) > 300:
      cause = cause[:297] + "..."
    files = ", ".join(f"{v}[.gz]" for v in IDX_FILE_NAMES.values())
    raise DataError(
      f"{name} is not available offline: TFDS dataset '{tfds_name}' could not be "
      f"read from {tfds_data_dir or 'the default TFDS data directory'} "
      f"({type(e).__name__}: {cause}). Either pass --data_dir pointing at a "
      f"directory with the {name} IDX files ({files}), or, with internet, "
      f"install TensorFlow (pip install 'dgjax[tfds]') so that TFDS can download "
      f"and prepare it, or run: {_TFDS_PREPARE.format(tfds_name=tfds_name)}"
    ) from e

  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  where = f"TFDS {tfds_name}" + (f" in {tfds_data_dir}" if tfds_data_dir else "")
  _check_pair(images, labels, where, where)
  counts = ", ".join(f"{s}: {len(p[1])}" for s, p in zip(tfds_splits, parts))
  return MNISTData(images=images, labels=labels, source=f"{where} ({counts})")
