"""DomainBed's image benchmarks as file lists: VLCS, PACS, OfficeHome, TerraIncognita, DomainNet,
SVIRO; the table of every image benchmark (:data:`IMAGE_DATASETS`).

Each dataset is read from the directory layout DomainBed's ``domainbed/scripts/download.py``
produces under ``data_dir`` (Gulrajani & Lopez-Paz, "In Search of Lost Domain
Generalization", ICLR 2021; ``domainbed/datasets.py``: ``MultipleEnvironmentImageFolder``)::

    data_dir/PACS/art_painting/dog/pic_001.jpg
                 /cartoon/...
    data_dir/<dataset folder>/<environment folder>/<class folder>/<image>

| name | folder | environments (DomainBed name: folder) | classes | checkpoint freq |
| --- | --- | --- | --- | --- |
| ``VLCS`` | ``VLCS`` | C: Caltech101, L: LabelMe, S: SUN09, V: VOC2007 | 5 | 300 |
| ``PACS`` | ``PACS`` | A: art_painting, C: cartoon, P: photo, S: sketch | 7 | 300 |
| ``OfficeHome`` | ``office_home`` | A: Art, C: Clipart, P: Product, R: Real World | 65 | 300 |
| ``TerraIncognita`` | ``terra_incognita`` | L100, L38, L43, L46: location_<n> | 10 | 300 |
| ``DomainNet`` | ``domain_net`` | clip, info, paint, quick, real, sketch: clipart, ... | 345 | 1000 |
| ``SVIRO`` | ``sviro`` | aclass, escape, hilux, i3, lexus, tesla, tiguan, tucson, x5, zoe | 7 | 300 |

SVIRO (Dias Da Cruz et al., WACV 2020): DomainBed's subset of the grayscale seat rectangles
(``download_sviro`` renames the archive's ``SVIRO_DOMAINBED`` to ``sviro``), one environment
per vehicle; its environment folders are assumed to carry the names of DomainBed's
``ENVIRONMENTS`` (which DomainBed takes as the sorted folder list). Its class count is read
from the folders, as DomainBed does (SVIRO's classification lists 7 classes: background,
infant seat, child seat, person, everyday object, empty infant seat, empty child seat); not
checked against a real copy.

The other image benchmarks of DomainBed are read by their own modules, listed here with a
``reader``: :mod:`dgjax.data.wilds` (``WILDSCamelyon``, ``WILDSFMoW``),
:mod:`dgjax.data.spawrious` (the six ``Spawrious*``) and :mod:`dgjax.data.debug`
(``Debug224``).

Every dataset trains ``N_STEPS = 5001`` steps by default: DomainBed's base class value, which
no image dataset overrides (DomainNet included; DomainBed has never had a 15001 default).

Order, as DomainBed gets it:

* environments: DomainBed lists the sub-folders of the dataset folder and sorts them by name
  (``sorted(os.scandir(root))``); the fixed folder names above are already in that order, and
  ``ENVIRONMENTS`` (``["A", "C", "P", "S"]`` ...) names them in the same order. Here only the
  listed folders are read (DomainBed would also pick up any extra folder, shifting the
  environment indices);
* classes: torchvision's ``ImageFolder``: sub-folders sorted by name, label = index;
* images: ``ImageFolder``'s order, class by class, ``os.walk`` of the class folder (sorted
  directories, following links) with sorted file names, keeping the extensions torchvision
  accepts (case-insensitive). The in/out split indices therefore pick the same files as
  DomainBed's ``misc.split_dataset`` for the same seed.

Nothing is decoded here: an environment is a list of paths and labels (decoding happens in
:mod:`dgjax.data.image_pipeline`). Checks made before any training work, each raising
:class:`~dgjax.data.idx.DataError` naming the path: a missing folder, an environment without
classes or images, a class folder without images, and class sets that differ between
environments (torchvision would silently number the classes of each environment on its own,
so one missing class shifts every later label; DomainBed takes ``num_classes`` from the last
environment only). A file that is no image at all is named before training by
:func:`dgjax.data.image_check.check_image_files` (called by :func:`dgjax.image_task.make_task`);
one that fails later, when it is decoded, raises naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dgjax.data.colored_mnist import env_split_seed, split_in_out
from dgjax.data.idx import DataError

__all__ = [
  "IMAGE_DATASETS",
  "IMG_EXTENSIONS",
  "FileSplit",
  "ImageDatasetSpec",
  "ImageEnvironment",
  "ImageFolderDomains",
  "get_image_dataset",
  "image_dataset_environments",
  "image_splits",
]

#: File extensions torchvision's ``ImageFolder`` accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageDatasetSpec:
  """One of DomainBed's image benchmarks: where it lives and how DomainBed trains it.

  ``env_folders`` are the environment folders in DomainBed's (sorted) order and
  ``env_names`` DomainBed's ``ENVIRONMENTS`` for them; ``num_classes`` ``None``: read from
  the folders (checked otherwise); ``checkpoint_freq`` and ``n_steps`` are DomainBed's
  ``CHECKPOINT_FREQ`` and ``N_STEPS``. ``train_transform`` is the host part of DomainBed's
  training transform (:data:`dgjax.data.image_pipeline.TRAIN_TRANSFORMS`); ``augments``
  false: DomainBed transforms nothing, whatever ``data_augmentation`` says (Debug224).

  ``reader(data_dir, trial_seed)``, if given, returns the environments (a dataset not in
  the ``<folder>/<env>/<class>/<image>`` layout; ``env_folders`` then unused) and
  ``layout`` says what ``data_dir`` must hold; ``fetch`` is the command that fetches it
  (``{data_dir}`` filled in), named by the errors for missing data.
  """

  name: str
  folder: str
  env_folders: tuple[str, ...]
  env_names: tuple[str, ...]
  num_classes: int | None
  checkpoint_freq: int = 300
  n_steps: int = 5001
  input_shape: tuple[int, int, int] = (224, 224, 3)
  train_transform: str = "crop"
  augments: bool = True
  reader: Callable[[Any, int], list[ImageEnvironment]] | None = None
  layout: str = ""
  fetch: str = ""

  def fetch_command(self, data_dir) -> str:
    """The command that puts this dataset under ``data_dir``."""
    return self.fetch.format(data_dir=data_dir)

  @property
  def data_layout(self) -> str:
    """What ``data_dir`` must hold, in words."""
    return self.layout or (
      f"DomainBed's download.py layout: <data_dir>/{self.folder}/<env>/<class>/<image>"
    )

  def __post_init__(self):
    if self.reader is not None:
      return
    if len(self.env_folders) != len(self.env_names):
      raise ValueError(
        f"{self.name}: {len(self.env_folders)} folders for {len(self.env_names)} environment names"
      )
    if list(self.env_folders) != sorted(self.env_folders):
      raise ValueError(
        f"{self.name}: environment folders must be in sorted order "
        f"(DomainBed's), got {self.env_folders}"
      )


#: SVIRO's vehicles, DomainBed's ``ENVIRONMENTS`` (and, sorted, its environment folders).
SVIRO_VEHICLES = (
  "aclass",
  "escape",
  "hilux",
  "i3",
  "lexus",
  "tesla",
  "tiguan",
  "tucson",
  "x5",
  "zoe",
)


def _domainbed_download(function: str) -> str:
  """DomainBed's ``download.py`` function for one dataset, run in a DomainBed checkout (some
  read files of it; its ``__main__`` runs only ``download_terra_incognita``, the others are
  commented out there)."""
  return (
    "in a DomainBed checkout: python -c \"from domainbed.scripts.download import "
    f"{function}; {function}('{{data_dir}}')\""
  )


def _read_with(module: str, name: str):
  """The ``reader`` of dataset ``name``: ``dgjax.data.<module>.environments(name, data_dir,
  trial_seed)``, the module imported when first read (it imports this one)."""

  def read(data_dir, trial_seed=0):
    import importlib

    return importlib.import_module(f"dgjax.data.{module}").environments(name, data_dir, trial_seed)

  return read


def _spawrious(name: str) -> ImageDatasetSpec:
  return ImageDatasetSpec(
    name,
    "spawrious224",
    (),
    ("Test", "SC_group_1", "SC_group_2"),
    num_classes=4,
    checkpoint_freq=100,
    train_transform="resize_flip",
    reader=_read_with("spawrious", name),
    layout="the Spawrious archive: <data_dir>/spawrious224/{0,1}/<location>/<breed>/<image>",
    fetch=_domainbed_download("download_spawrious"),
  )


IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
  spec.name: spec
  for spec in (
    ImageDatasetSpec(
      "VLCS",
      "VLCS",
      ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
      ("C", "L", "S", "V"),
      num_classes=5,
      fetch=_domainbed_download("download_vlcs"),
    ),
    ImageDatasetSpec(
      "PACS",
      "PACS",
      ("art_painting", "cartoon", "photo", "sketch"),
      ("A", "C", "P", "S"),
      num_classes=7,
      fetch=_domainbed_download("download_pacs"),
    ),
    ImageDatasetSpec(
      "OfficeHome",
      "office_home",
      ("Art", "Clipart", "Product", "Real World"),
      ("A", "C", "P", "R"),
      num_classes=65,
      fetch=_domainbed_download("download_office_home"),
    ),
    ImageDatasetSpec(
      "TerraIncognita",
      "terra_incognita",
      ("location_100", "location_38", "location_43", "location_46"),
      ("L100", "L38", "L43", "L46"),
      num_classes=10,
      fetch=_domainbed_download("download_terra_incognita"),
    ),
    ImageDatasetSpec(
      "DomainNet",
      "domain_net",
      ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
      ("clip", "info", "paint", "quick", "real", "sketch"),
      num_classes=345,
      checkpoint_freq=1000,
      fetch=_domainbed_download("download_domain_net"),
    ),
    ImageDatasetSpec(
      "SVIRO",
      "sviro",
      SVIRO_VEHICLES,
      SVIRO_VEHICLES,
      num_classes=None,
      fetch=_domainbed_download("download_sviro"),
    ),
    ImageDatasetSpec(
      "Debug224",
      "",
      (),
      ("0", "1", "2"),
      num_classes=2,
      checkpoint_freq=100,
      augments=False,
      reader=_read_with("debug", "Debug224"),
      layout="nothing (random images drawn from the trial seed)",
      fetch="",
    ),
    ImageDatasetSpec(
      "WILDSCamelyon",
      "camelyon17_v1.0",
      (),
      tuple(f"hospital_{i}" for i in range(5)),
      num_classes=2,
      checkpoint_freq=100,
      train_transform="resize_crop",
      reader=_read_with("wilds", "WILDSCamelyon"),
      fetch="python -m wilds.download_datasets --root_dir {data_dir} --datasets camelyon17",
      layout="the wilds package's layout: <data_dir>/camelyon17_v1.0/metadata.csv and "
      "patches/patient_<p>_node_<n>/patch_patient_<p>_node_<n>_x_<x>_y_<y>.png",
    ),
    ImageDatasetSpec(
      "WILDSFMoW",
      "fmow_v1.1",
      (),
      tuple(f"region_{i}" for i in range(6)),
      num_classes=62,
      checkpoint_freq=100,
      train_transform="resize_crop",
      reader=_read_with("wilds", "WILDSFMoW"),
      fetch="python -m wilds.download_datasets --root_dir {data_dir} --datasets fmow",
      layout="the wilds package's layout: <data_dir>/fmow_v1.1/rgb_metadata.csv, "
      "country_code_mapping.csv and images/rgb_img_<i>.png",
    ),
    *(
      _spawrious(f"Spawrious{kind}_{level}")
      for kind in ("O2O", "M2M")
      for level in ("easy", "medium", "hard")
    ),
  )
}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageEnvironment:
  """One environment as a file list: ``x`` holds image paths (str array), ``y`` labels.

  ``x``/``y`` keep the interface of the in-memory environments (``name``, ``x``, ``y``) so
  the registry's generic split code applies; nothing is decoded.
  """

  name: str
  root: Path
  classes: tuple[str, ...]
  x: np.ndarray  # [n] str: absolute image paths
  y: np.ndarray  # [n] int32 labels, indices into ``classes``

  def __len__(self) -> int:
    return len(self.y)

  @property
  def paths(self) -> np.ndarray:
    return self.x

  @property
  def labels(self) -> np.ndarray:
    return self.y


@dataclasses.dataclass(frozen=True, eq=False)
class FileSplit:
  """One split (``env{i}_in`` / ``env{i}_out``) of an image environment: paths + labels."""

  name: str
  x: np.ndarray  # [n] str paths
  y: np.ndarray  # [n] int32

  def __len__(self) -> int:
    return len(self.y)


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMG_EXTENSIONS)


def _subdirs(path: Path) -> list[str]:
  return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def _class_files(class_dir: Path) -> list[str]:
  """``ImageFolder``'s files of one class: sorted ``os.walk`` (following links), sorted names."""
  files = []
  for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
    files.extend(os.path.join(dirpath, f) for f in sorted(fnames) if _is_image(f))
  return files


def _read_environment(env_dir: Path, name: str) -> ImageEnvironment:
  if not env_dir.is_dir():
    raise DataError(
      f"environment folder {env_dir} does not exist (expected {env_dir}/<class>/<image>)"
    )
  classes = _subdirs(env_dir)
  if not classes:
    raise DataError(
      f"environment folder {env_dir} is empty: it has no class folders "
      f"(expected {env_dir}/<class>/<image>)"
    )
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = _class_files(env_dir / cls)
    if not files:
      raise DataError(
        f"class folder {env_dir / cls} holds no image (extensions {', '.join(IMG_EXTENSIONS)})"
      )
    paths.extend(files)
    labels.extend([label] * len(files))
  return ImageEnvironment(
    name=name,
    root=env_dir,
    classes=tuple(classes),
    x=np.asarray(paths, dtype=str),
    y=np.asarray(labels, dtype=np.int32),
  )


def _check_same_classes(envs: Sequence[ImageEnvironment]) -> None:
  union = sorted(set().union(*(env.classes for env in envs)))
  problems = []
  for env in envs:
    missing = [c for c in union if c not in env.classes]
    if missing:
      shown = ", ".join(missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else ""
      )
      problems.append(f"{env.root} lacks class folder(s) {shown}")
  if problems:
    raise DataError(
      "environments must have the same class folders (labels are the sorted "
      "class folder index): " + "; ".join(problems)
    )


def ImageFolderDomains(
  root, env_folders: Sequence[str] | None = None, env_names: Sequence[str] | None = None
) -> list[ImageEnvironment]:
  """The environments of a user's own ``root/<env>/<class>/<image>`` tree.

  ``env_folders`` defaults to every sub-folder of ``root``, sorted by name (DomainBed's
  rule); ``env_names`` defaults to the folder names. Environments must share their class
  folders; labels are the indices of the sorted class folder names (torchvision's
  ``ImageFolder``). Raises :class:`DataError` naming the path on a missing or empty folder,
  a class folder without images, or class sets that differ.
  """
  root = Path(root)
  if not root.is_dir():
    raise DataError(
      f"dataset folder {root} does not exist (expected {root}/<environment>/<class>/<image>)"
    )
  if env_folders is None:
    env_folders = _subdirs(root)
    if not env_folders:
      raise DataError(
        f"dataset folder {root} holds no environment folder "
        f"(expected {root}/<environment>/<class>/<image>)"
      )
  env_names = list(env_folders) if env_names is None else list(env_names)
  if len(env_names) != len(env_folders):
    raise ValueError(f"{len(env_names)} environment names for {len(env_folders)} folders")
  missing = [str(root / f) for f in env_folders if not (root / f).is_dir()]
  if missing:
    raise DataError(f"missing environment folder(s): {', '.join(missing)}")
  envs = [_read_environment(root / f, n) for f, n in zip(env_folders, env_names)]
  _check_same_classes(envs)
  return envs


def get_image_dataset(name: str) -> ImageDatasetSpec:
  """The spec of DomainBed image dataset ``name``; an unknown name lists the valid ones."""
  try:
    return IMAGE_DATASETS[name]
  except KeyError:
    raise ValueError(
      f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}"
    ) from None


def image_dataset_environments(name: str, data_dir, trial_seed: int = 0) -> list[ImageEnvironment]:
  """The environments of DomainBed image dataset ``name`` under ``data_dir``.

  Reads ``data_dir/<folder>/<env folder>/<class>/<image>`` (see the module table); checks
  that the number of classes is DomainBed's. A dataset with a ``reader`` is read by it
  (``trial_seed``: the random Debug224 images).
  """
  spec = get_image_dataset(name)
  if spec.reader is not None:
    return spec.reader(data_dir, trial_seed)
  if data_dir is None:
    raise DataError(
      f"{name} needs a data directory holding {spec.folder}/ (DomainBed's download.py layout)"
    )
  root = Path(data_dir) / spec.folder
  if not root.is_dir():
    raise DataError(
      f"{name}: folder {root} does not exist; expected DomainBed's layout "
      f"{root}/{{{','.join(spec.env_folders)}}}/<class>/<image> "
      f"({spec.fetch_command(data_dir)})"
    )
  envs = ImageFolderDomains(root, spec.env_folders, spec.env_names)
  found = len(envs[0].classes)
  if spec.num_classes is not None and found != spec.num_classes:
    raise DataError(
      f"{name}: {root} has {found} class folders per environment, "
      f"DomainBed's {name} has {spec.num_classes}"
    )
  return envs


def image_splits(
  envs: Sequence[ImageEnvironment], holdout_fraction: float = 0.2, trial_seed: int = 0
) -> tuple[list[FileSplit], list[FileSplit]]:
  """DomainBed's in/out split of every environment, over file lists.

  Environment ``i`` is split by :func:`dgjax.data.split_in_out` with seed
  :func:`dgjax.data.env_split_seed` ``(trial_seed, i)``, exactly as the MNIST datasets.
  Returns ``(splits_in, splits_out)`` named ``env{i}_in`` / ``env{i}_out``.
  """
  splits_in, splits_out = [], []
  for i, env in enumerate(envs):
    idx_in, idx_out = split_in_out(len(env), holdout_fraction, env_split_seed(trial_seed, i))
    splits_in.append(FileSplit(f"env{i}_in", env.x[idx_in], env.y[idx_in]))
    splits_out.append(FileSplit(f"env{i}_out", env.x[idx_out], env.y[idx_out]))
  return splits_in, splits_out
