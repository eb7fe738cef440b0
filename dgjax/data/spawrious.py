"""DomainBed's six Spawrious benchmarks: dog breeds on backgrounds, spurious by construction.

Spawrious (Lynch et al., "Spawrious: A Benchmark for Fine Control of Spurious Correlation
Biases", 2023) has images of 4 breeds (classes, labels in this order: ``bulldog``,
``corgi``, ``dachshund``, ``labrador``) on 6 backgrounds (``beach``, ``desert``, ``dirt``,
``jungle``, ``mountain``, ``snow``), in the archive's folders
``spawrious224/<d>/<background>/<breed>/<image>`` with ``<d>`` in ``0``, ``1`` (3168 images a
folder). DomainBed's ``SpawriousBenchmark`` (``domainbed/datasets.py``) builds three
environments from them, in this order: ``Test``, ``SC_group_1``, ``SC_group_2``.

Each benchmark names four backgrounds ``g`` (for the training environments), four ``t``
(for the test one) and, one-to-one only, a ``filler``. With ``F[d, b, k]`` the first ``k``
images of folder ``<d>/<b>/<breed>`` (all of them when ``k`` is ``None``):

* one-to-one (``SpawriousO2O_*``; ``n0 = int(0.97 * 3168) = 3072``, ``n1 = int(0.87 * 3168)
  = 2756``): ``SC_group_<d+1>`` (``d`` = 0, 1) is ``F[d, g0, n_d]`` of bulldog,
  ``F[d, g1, n_d]`` of dachshund, ``F[d, g2, n_d]`` of labrador, ``F[d, g3, n_d]`` of
  corgi, then ``F[d, filler, 3168 - n_d]`` of bulldog, dachshund, labrador and corgi: each
  breed on its own background 97% (87%) of the time. ``Test`` is, for ``d`` = 0 then 1,
  bulldog on ``t0``, dachshund on ``t1``, labrador on ``t2``, corgi on ``t3``, every image;
* many-to-many (``SpawriousM2M_*``, folder ``0`` only, at most 3168 images a folder):
  ``SC_group_1`` is bulldog on ``g0``, dachshund on ``g1``, labrador on ``g2``, corgi on
  ``g3``; ``SC_group_2`` bulldog on ``g1``, dachshund on ``g0``, labrador on ``g3``, corgi
  on ``g2``; ``Test`` is bulldog on ``t0``, dachshund ``t1``, labrador ``t2``, corgi ``t3``,
  then bulldog ``t1``, dachshund ``t0``, labrador ``t3``, corgi ``t2``, every image.

========================  ===================================  ===================================  ========
benchmark                 g (training backgrounds)             t (test backgrounds)                 filler
========================  ===================================  ===================================  ========
``SpawriousO2O_easy``     desert, jungle, dirt, snow           dirt, snow, desert, jungle           beach
``SpawriousO2O_medium``   mountain, beach, dirt, jungle        jungle, dirt, beach, snow            desert
``SpawriousO2O_hard``     jungle, mountain, snow, desert       mountain, snow, desert, jungle       beach
``SpawriousM2M_easy``     desert, mountain, dirt, jungle       dirt, jungle, mountain, desert
``SpawriousM2M_medium``   beach, snow, mountain, desert        desert, mountain, beach, snow
``SpawriousM2M_hard``     dirt, jungle, snow, beach            snow, beach, dirt, jungle
========================  ===================================  ===================================  ========

Files of a folder: those whose name ends in ``.png``, ``.jpg`` or ``.jpeg`` (case-sensitive, not
recursive), as DomainBed's ``CustomImageFolder``, but in sorted order: DomainBed takes
``os.listdir``'s order, which the file system decides, so where a folder is cut (the
one-to-one benchmarks keep 3072 or 2756 of 3168, and 96 or 412 of the filler) DomainBed may
keep other images than these, from one machine to the next. A folder with fewer images than
its limit gives what it has (as DomainBed); a missing or empty folder raises.

``Test`` is DomainBed's test environment by construction (``SpawriousBenchmark`` gives it the
evaluation transform whatever ``--test_envs`` says); its default here too. Training transform
(DomainBed's Spawrious one): ``Resize((224, 224))`` and a flip, then the colour augmentation,
no crop (:data:`dgjax.data.image_pipeline.TRAIN_TRANSFORMS` ``"resize_flip"``); here it goes
to whichever environments train. DomainBed's ``--data_dir`` for Spawrious must be the
``spawrious224`` folder itself (it reads ``<data_dir>/0/...``) while its ``download.py``
extracts the archive as ``<data_dir>/spawrious224``: both are accepted here. Not run on the
real archive here: the tests use small trees in its layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from dgjax.data.idx import DataError
from dgjax.data.image_folder import ImageEnvironment, get_image_dataset

__all__ = [
  "BENCHMARKS",
  "BREEDS",
  "FOLDER_IMAGES",
  "SpawriousBenchmark",
  "environment_folders",
  "environments",
  "spawrious_environments",
]

#: The classes, in label order (DomainBed's ``class_list``).
BREEDS = ("bulldog", "corgi", "dachshund", "labrador")
#: Images per ``<d>/<background>/<breed>`` folder of the archive (DomainBed's ``total``).
FOLDER_IMAGES = 3168
#: DomainBed's ``build_type1_combination`` per-breed order (and the filler's).
_ORDER = ("bulldog", "dachshund", "labrador", "corgi")
_EXTENSIONS = (".png", ".jpg", ".jpeg")


class SpawriousBenchmark(NamedTuple):
  """One benchmark: ``one_to_one`` (else many-to-many), training backgrounds ``group``,
  test backgrounds ``test``, and the one-to-one ``filler``."""

  one_to_one: bool
  group: tuple[str, str, str, str]
  test: tuple[str, str, str, str]
  filler: str | None = None


BENCHMARKS: dict[str, SpawriousBenchmark] = {
  "SpawriousO2O_easy": SpawriousBenchmark(
    True, ("desert", "jungle", "dirt", "snow"), ("dirt", "snow", "desert", "jungle"), "beach"
  ),
  "SpawriousO2O_medium": SpawriousBenchmark(
    True, ("mountain", "beach", "dirt", "jungle"), ("jungle", "dirt", "beach", "snow"), "desert"
  ),
  "SpawriousO2O_hard": SpawriousBenchmark(
    True,
    ("jungle", "mountain", "snow", "desert"),
    ("mountain", "snow", "desert", "jungle"),
    "beach",
  ),
  "SpawriousM2M_easy": SpawriousBenchmark(
    False, ("desert", "mountain", "dirt", "jungle"), ("dirt", "jungle", "mountain", "desert")
  ),
  "SpawriousM2M_medium": SpawriousBenchmark(
    False, ("beach", "snow", "mountain", "desert"), ("desert", "mountain", "beach", "snow")
  ),
  "SpawriousM2M_hard": SpawriousBenchmark(
    False, ("dirt", "jungle", "snow", "beach"), ("snow", "beach", "dirt", "jungle")
  ),
}

Folder = tuple[str, str, str, "int | None"]  # (d, background, breed, limit)


def environment_folders(name: str) -> list[list[Folder]]:
  """The folders of each environment (``Test``, ``SC_group_1``, ``SC_group_2``) in order:
  ``(d, background, breed, limit)``, ``limit`` ``None`` for every image."""
  try:
    b = BENCHMARKS[name]
  except KeyError:
    raise ValueError(f"unknown Spawrious benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
  g, t = dict(zip(_ORDER, b.group)), dict(zip(_ORDER, b.test))
  if b.one_to_one:
    counts = (int(0.97 * FOLDER_IMAGES), int(0.87 * FOLDER_IMAGES))
    train = [
      [(str(d), g[breed], breed, n) for breed in _ORDER]
      + [(str(d), b.filler, breed, FOLDER_IMAGES - n) for breed in _ORDER]
      for d, n in enumerate(counts)
    ]
    test = [(str(d), t[breed], breed, None) for d in range(2) for breed in _ORDER]
  else:
    swap = {
      "bulldog": "dachshund",
      "dachshund": "bulldog",
      "labrador": "corgi",
      "corgi": "labrador",
    }
    train = [
      [("0", g[breed], breed, FOLDER_IMAGES) for breed in _ORDER],
      [("0", g[swap[breed]], breed, FOLDER_IMAGES) for breed in _ORDER],
    ]
    test = [("0", t[breed], breed, None) for breed in _ORDER]
    test += [("0", t[swap[breed]], breed, None) for breed in _ORDER]
  return [test, *train]


def _root(name: str, data_dir) -> Path:
  spec = get_image_dataset(name)
  if data_dir is None:
    raise DataError(
      f"{name} needs --data_dir: the folder holding spawrious224/ ({spec.data_layout}); "
      f"fetch it with: {spec.fetch_command('<data_dir>')}"
    )
  data_dir = Path(data_dir)
  root = data_dir / spec.folder
  if root.is_dir():
    return root
  if (data_dir / "0").is_dir():  # DomainBed's own --data_dir: the spawrious224 folder
    return data_dir
  raise DataError(
    f"{name}: folder {root} does not exist (nor {data_dir / '0'}); expected "
    f"{spec.data_layout}. Fetch it with: {spec.fetch_command(data_dir)}"
  )


def _files(folder: Path) -> list[str]:
  return sorted(
    str(folder / f.name)
    for f in folder.iterdir()
    if f.name.endswith(_EXTENSIONS)  # DomainBed's CustomImageFolder: case-sensitive
  )


def spawrious_environments(name: str, data_dir) -> list[ImageEnvironment]:
  """The environments ``Test``, ``SC_group_1``, ``SC_group_2`` of Spawrious benchmark ``name``
  (see the module docstring) under ``data_dir`` (holding ``spawrious224/``, or that folder
  itself). Raises :class:`DataError` naming every missing or empty folder it needs, and the
  command that fetches the archive."""
  spec = get_image_dataset(name)
  plan = environment_folders(name)
  root = _root(name, data_dir)
  needed = dict.fromkeys(root / d / b / breed for env in plan for d, b, breed, _ in env)
  missing = [str(f) for f in needed if not f.is_dir()]
  if missing:
    raise DataError(
      f"{name}: {len(missing)} folder(s) missing: {', '.join(missing[:4])}"
      f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}; expected "
      f"{spec.data_layout}. Fetch it with: {spec.fetch_command(root.parent)}"
    )
  files = {f: _files(f) for f in needed}
  empty = [str(f) for f, names in files.items() if not names]
  if empty:
    raise DataError(
      f"{name}: folder(s) without .png/.jpg/.jpeg images: {', '.join(empty[:4])}"
      f"{f' and {len(empty) - 4} more' if len(empty) > 4 else ''}"
    )
  envs = []
  for env_name, folders in zip(spec.env_names, plan):
    paths, labels = [], []
    for d, b, breed, limit in folders:
      kept = files[root / d / b / breed][:limit]
      paths.extend(kept)
      labels.extend([BREEDS.index(breed)] * len(kept))
    envs.append(
      ImageEnvironment(
        env_name, root, BREEDS, np.asarray(paths, dtype=str), np.asarray(labels, np.int32)
      )
    )
  return envs


def environments(name: str, data_dir, trial_seed: int = 0) -> list[ImageEnvironment]:
  """The ``reader`` of :data:`dgjax.data.image_folder.IMAGE_DATASETS` (the seed is unused)."""
  del trial_seed
  return spawrious_environments(name, data_dir)
