"""DomainBed image benchmarks read from a prepared TensorFlow Datasets (TFDS) copy.

Of DomainBed's five image benchmarks (VLCS, PACS, OfficeHome, TerraIncognita, DomainNet),
TFDS 4.9 has only DomainNet: builder ``domainnet``, one config per domain (``clipart``,
``infograph``, ``painting``, ``quickdraw``, ``real``, ``sketch``), splits ``train`` and
``test`` (the official DomainNet lists), features ``image`` (JPEG) and ``label``
(``ClassLabel``, 345 names). TFDS downloads the same archives as DomainBed's ``download.py``
(``groundtruth/clipart.zip``, ``groundtruth/painting.zip`` and the four others).

How a TFDS copy becomes DomainBed's environments:

* environment ``i`` is config ``configs[i]`` (sorted: DomainBed's ``clip, info, paint, quick,
  real, sketch`` order), its ``train`` then ``test`` split pooled;
* classes are the ``ClassLabel`` names in sorted order, DomainBed's (``ImageFolder``) order,
  and labels are re-numbered accordingly. TFDS numbers DomainNet's classes in the official
  list's order (``aircraft_carrier`` = 0, ..., ``The_Eiffel_Tower`` near ``t``), which is
  not the sorted order (``The_Eiffel_Tower`` = 0): 328 of 345 indices differ;
* the in/out split is :func:`dgjax.data.image_folder.image_splits`, DomainBed's rule and seeds.

What differs from DomainBed's folders: TFDS keeps every image of the official lists, while
DomainBed's ``download.py`` deletes the 9,431 files of ``misc/domain_net_duplicates.txt``
(clipart 704, infograph 1,596, painting 3,493, real 2,380, sketch 1,258); and the pooled
order is TFDS's record order (shuffled at preparation), not ``ImageFolder``'s file order, so
the same seed holds out other images. TFDS records carry no file name, so neither can be
undone here: results on a TFDS copy are DomainNet results, not DomainBed's exact splits.

Reading needs no TensorFlow: ``tfds.data_source`` (random access to ``array_record``
shards) with the image left encoded (``tfds.decode.SkipDecoding``). An environment holds
its labels (read once, one pass over the records) and a :class:`TfdsImages`, whose item
``i`` is an :class:`~dgjax.data.image_pipeline.EncodedImage` read on demand, so the grain
workers of :mod:`dgjax.data.image_pipeline` read, decode, crop and flip it exactly as a file.
Preparing the copy needs TensorFlow and internet, elsewhere::

    pip install tensorflow tensorflow-datasets
    tfds build domainnet --file_format=array_record --data_dir=~/tensorflow_datasets
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dgjax.data.idx import DataError
from dgjax.data.image_folder import IMAGE_DATASETS, ImageEnvironment
from dgjax.data.image_pipeline import EncodedImage

__all__ = [
  "TFDS_IMAGE_DATASETS",
  "TfdsImageDataset",
  "TfdsImages",
  "default_tfds_data_dir",
  "tfds_image_environments",
]


@dataclasses.dataclass(frozen=True)
class TfdsImageDataset:
  """A DomainBed image benchmark as TFDS has it: one builder config per environment.

  ``configs[i]`` is environment ``i`` (DomainBed's order), named ``env_names[i]``; its
  ``splits`` are pooled in order. ``image_key`` / ``label_key`` name the features.
  """

  name: str
  builder: str
  configs: tuple[str, ...]
  env_names: tuple[str, ...]
  num_classes: int
  splits: tuple[str, ...] = ("train", "test")
  image_key: str = "image"
  label_key: str = "label"


TFDS_IMAGE_DATASETS: dict[str, TfdsImageDataset] = {
  "DomainNet": TfdsImageDataset(
    "DomainNet",
    "domainnet",
    ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
    IMAGE_DATASETS["DomainNet"].env_names,
    num_classes=345,
  ),
}


def default_tfds_data_dir() -> str:
  """TFDS's default data directory: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _build_command(builder: str, data_dir) -> str:
  return f"tfds build {builder} --file_format=array_record --data_dir={data_dir}"


def _open_source(
  data_dir: str, builder: str, config: str, version: str, split: str, image_key: str
):
  import tensorflow_datasets as tfds  # lazy: only where records are read

  return tfds.data_source(
    f"{builder}/{config}:{version}",
    split=split,
    data_dir=data_dir,
    download=False,
    decoders={image_key: tfds.decode.SkipDecoding()},
  )


class TfdsImages:
  """The encoded images of one TFDS config, its splits pooled in order; random access.

  ``images[i]`` (an int) reads record ``i`` of the pool and returns an
  :class:`~dgjax.data.image_pipeline.EncodedImage`; ``images[index_array]`` is another
  :class:`TfdsImages` over those records (how the in/out splits select). The data sources
  are opened on first read in each process, so the object pickles small (grain workers).
  """

  def __init__(
    self,
    data_dir: str,
    builder: str,
    config: str,
    version: str,
    splits: Sequence[tuple[str, int]],
    image_key: str = "image",
    index: np.ndarray | None = None,
  ):
    self.data_dir, self.builder, self.config, self.version = data_dir, builder, config, version
    self.splits = tuple((str(s), int(n)) for s, n in splits)
    self.image_key = image_key
    total = sum(n for _, n in self.splits)
    self.index = np.arange(total, dtype=np.int64) if index is None else np.asarray(index, np.int64)
    self._offsets = np.cumsum([0] + [n for _, n in self.splits])
    self._sources: dict[str, object] | None = None

  def __len__(self) -> int:
    return len(self.index)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sources"] = None
    return state

  def _source(self, split: str):
    if self._sources is None:
      self._sources = {}
    if split not in self._sources:
      self._sources[split] = _open_source(
        self.data_dir, self.builder, self.config, self.version, split, self.image_key
      )
    return self._sources[split]

  def locate(self, i: int) -> tuple[str, int]:
    """``(split, record index in that split)`` of item ``i``."""
    pooled = int(self.index[i])
    part = int(np.searchsorted(self._offsets, pooled, side="right")) - 1
    return self.splits[part][0], pooled - int(self._offsets[part])

  def __getitem__(self, key):
    if isinstance(key, (int, np.integer)):
      split, j = self.locate(int(key))
      name = f"TFDS {self.builder}/{self.config}:{self.version} {split}[{j}] in {self.data_dir}"
      data = self._source(split)[j][self.image_key]
      if not isinstance(data, bytes):
        raise DataError(
          f"{name}: feature {self.image_key!r} is {type(data).__name__}, "
          f"expected encoded image bytes"
        )
      return EncodedImage(data, name)
    return TfdsImages(
      self.data_dir,
      self.builder,
      self.config,
      self.version,
      self.splits,
      self.image_key,
      self.index[key],
    )

  def __repr__(self) -> str:
    return (
      f"TfdsImages({self.builder}/{self.config}:{self.version}, {len(self)} of "
      f"{dict(self.splits)}, data_dir={self.data_dir!r})"
    )


def _prepared_version(data_dir: Path, spec: TfdsImageDataset, config: str) -> str:
  """The newest version of ``builder/config`` prepared under ``data_dir``, else DataError."""
  config_dir = data_dir / spec.builder / config
  versions = sorted(
    (p.name for p in config_dir.glob("*") if (p / "dataset_info.json").is_file()),
    key=lambda v: tuple(int(x) if x.isdigit() else -1 for x in v.split(".")),
  )
  if not versions:
    raise DataError(
      f"{spec.name}: TFDS dataset {spec.builder}/{config} is not prepared in {data_dir} "
      f"(no {config_dir}/<version>/dataset_info.json). Prepare it where TensorFlow and "
      f"internet are available, then copy {data_dir / spec.builder} here: "
      f"{_build_command(spec.builder, data_dir)}"
    )
  return versions[-1]


def _read_labels(source, label_key: str, where: str, chunk: int = 1024) -> np.ndarray:
  n = len(source)
  labels = np.empty(n, np.int64)
  for start in range(0, n, chunk):
    keys = list(range(start, min(start + chunk, n)))
    try:
      records = source.__getitems__(keys)
    except TypeError:  # a source without a usable batched read: one by one
      records = [source[i] for i in keys]
    labels[start : start + len(keys)] = [int(r[label_key]) for r in records]
  if n and (labels.min() < 0):
    raise DataError(f"{where}: negative label {labels.min()}")
  return labels


def _class_names(source, spec: TfdsImageDataset, where: str) -> tuple[str, ...]:
  feature = source.dataset_info.features[spec.label_key]
  names = getattr(feature, "names", None)
  if not names:
    raise DataError(f"{where}: feature {spec.label_key!r} has no class names")
  return tuple(names)


def tfds_image_environments(
  name: str, data_dir=None, domains: Sequence[str] | None = None
) -> list[ImageEnvironment]:
  """The environments of DomainBed image dataset ``name`` from its prepared TFDS copy.

  ``data_dir``: the TFDS data directory holding ``<builder>/<config>/<version>/``
  (default :func:`default_tfds_data_dir`); it must be prepared as ``array_record``
  (``tfds build <builder> --file_format=array_record``); nothing is downloaded.
  ``domains``: a subset of environments, by DomainBed name (``"clip"``) or TFDS config
  (``"clipart"``), kept in DomainBed's order; default all.

  Returns :class:`~dgjax.data.image_folder.ImageEnvironment` s whose ``x`` is a
  :class:`TfdsImages`, ``y`` the labels numbered in sorted class-name order (DomainBed's),
  and ``classes`` the sorted names; :func:`dgjax.data.image_folder.image_splits` and the
  :mod:`dgjax.data.image_pipeline` streams take them as they are. Raises
  :class:`DataError` (naming the path and the ``tfds build`` command) for a dataset TFDS
  lacks, a config not prepared or not in ``array_record``, class names that differ
  between configs or a class count other than DomainBed's; ``ValueError`` for an
  unknown domain.
  """
  spec = TFDS_IMAGE_DATASETS.get(name)
  if spec is None:
    raise DataError(
      f"TFDS has no {name!r}; of DomainBed's image datasets it has only "
      f"{', '.join(TFDS_IMAGE_DATASETS)}. Read {name} from its folders instead "
      f"(--data_source=folder; fetch them with: "
      f"{IMAGE_DATASETS[name].fetch_command('<data_dir>') if name in IMAGE_DATASETS else 'python -m domainbed.scripts.download'})"
    )
  data_dir = Path(
    os.path.expanduser(str(data_dir if data_dir is not None else default_tfds_data_dir()))
  )
  if domains is None:
    picked = list(range(len(spec.configs)))
  else:
    lookup = {n: i for i, n in enumerate(spec.env_names)}
    lookup.update({c: i for i, c in enumerate(spec.configs)})
    unknown = [d for d in domains if d not in lookup]
    if unknown:
      raise ValueError(
        f"{name}: unknown domain(s) {', '.join(map(repr, unknown))}; valid: "
        + ", ".join(f"{n} ({c})" for n, c in zip(spec.env_names, spec.configs))
      )
    picked = sorted({lookup[d] for d in domains})
  if not data_dir.is_dir():
    raise DataError(
      f"{name}: TFDS data directory {data_dir} does not exist; prepare "
      f"{spec.builder} there with: {_build_command(spec.builder, data_dir)}"
    )
  versions = {i: _prepared_version(data_dir, spec, spec.configs[i]) for i in picked}

  envs, reference = [], None
  for i in picked:
    config, version = spec.configs[i], versions[i]
    where = f"TFDS {spec.builder}/{config}:{version} in {data_dir}"
    sources, labels, names = [], [], None
    for split in spec.splits:
      try:
        source = _open_source(str(data_dir), spec.builder, config, version, split, spec.image_key)
      except NotImplementedError as e:  # prepared, but not in a random-access format
        info = data_dir / spec.builder / config / version / "dataset_info.json"
        fmt = json.loads(info.read_text()).get("fileFormat", "tfrecord")
        raise DataError(
          f"{where} is prepared as {fmt}; reading without TensorFlow needs "
          f"array_record. Convert it (needs TensorFlow): tfds convert_format "
          f"--dataset_dir={data_dir / spec.builder} --out_file_format=array_record, "
          f"or rebuild: {_build_command(spec.builder, data_dir)}"
        ) from e
      except (KeyError, ValueError) as e:
        raise DataError(f"{where} has no split {split!r} ({type(e).__name__}: {e})") from e
      split_names = _class_names(source, spec, where)
      names = names or split_names
      sources.append((split, len(source)))
      labels.append(_read_labels(source, spec.label_key, f"{where} {split}"))
    if reference is None:
      reference = names
      if len(names) != spec.num_classes:
        raise DataError(
          f"{where} has {len(names)} classes, DomainBed's {name} has {spec.num_classes}"
        )
    elif names != reference:
      raise DataError(
        f"{where}: class names differ from those of {spec.builder}/{spec.configs[picked[0]]}"
      )
    classes = tuple(sorted(names))
    renumber = np.array([classes.index(c) for c in names], np.int32)  # TFDS -> sorted
    y = np.concatenate(labels) if labels else np.empty(0, np.int64)
    if len(y) == 0:
      raise DataError(f"{where} holds no examples in splits {', '.join(spec.splits)}")
    if y.max() >= len(names):
      raise DataError(f"{where}: label {y.max()} out of range for {len(names)} classes")
    images = TfdsImages(str(data_dir), spec.builder, config, version, sources, spec.image_key)
    envs.append(
      ImageEnvironment(
        name=spec.env_names[i],
        root=data_dir / spec.builder / config / version,
        classes=classes,
        x=images,
        y=renumber[y],
      )
    )
  return envs
