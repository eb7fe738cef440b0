"""DomainBed's WILDS benchmarks, read from the ``wilds`` package's folders without it (or torch).

DomainBed (``domainbed/datasets.py``: ``WILDSDataset``, ``WILDSEnvironment``) wraps the
``wilds`` package's datasets (Koh et al., "WILDS: A Benchmark of in-the-Wild Distribution
Shifts", ICML 2021) and makes one environment per value of one metadata field, over *every*
example of the dataset (the official train / val / test splits are ignored): environment
``i`` holds the examples whose field equals the ``i``-th smallest value, in the dataset's row
order, and is named ``<field>_<value>``. Here the same environments are built from the
metadata files and the images directly:

``WILDSCamelyon`` (Camelyon17-WILDS, Bandi et al. 2018): ``<data_dir>/camelyon17_v1.0/``
  ``metadata.csv`` (first column the row index; ``patient``, ``node``, ``x_coord``,
  ``y_coord``, ``tumor``, ``slide``, ``center``, ``split``), one 96x96 patch per row at
  ``patches/patient_<patient>_node_<node>/patch_patient_<patient>_node_<node>_x_<x_coord>_y_<y_coord>.png``
  (``patient`` as written, zero-padded: the package reads it as a string). Field
  ``hospital`` = ``center`` (0-4): environments ``hospital_0`` ... ``hospital_4``; label
  ``tumor`` (2 classes).

``WILDSFMoW`` (FMoW-WILDS, Christie et al. 2018): ``<data_dir>/fmow_v1.1/``
  ``rgb_metadata.csv`` (``split``, ``category``, ``country_code``, ...),
  ``country_code_mapping.csv`` (``alpha-3``, ``region``) and ``images/rgb_img_<i>.png``
  for row ``i`` of ``rgb_metadata.csv`` (224x224). Rows whose ``split`` is ``seq`` (the
  sequestered images) are dropped, as the package does. Field ``region``: the
  ``country_code`` mapped through ``country_code_mapping.csv`` (a code it lacks is
  ``Other``), then numbered in order of first appearance in ``rgb_metadata.csv`` (all rows,
  ``seq`` ones included, as the package's ``unique()``): environments ``region_0`` ...
  ``region_5``. Which continent each number is depends on that order; the names are listed
  by :func:`fmow_regions`. Label: ``category``'s index in the package's list of 62
  categories (:data:`FMOW_CATEGORIES`).

Empty cells and pandas' default missing-value strings (``NA``, ``nan``, ...) count as missing,
as the package's ``pandas.read_csv`` reads them: a missing country code is ``Other``, a
missing region in the mapping one region of its own.

Training transform (``WILDSDataset``): ``Resize((224, 224))`` then DomainBed's crop, flip and
colour augmentation (:data:`dgjax.data.image_pipeline.TRAIN_TRANSFORMS` ``"resize_crop"``).
The ``wilds`` package (``python -m wilds.download_datasets``) fetches the data; it is not
needed to read it. TFDS has neither dataset (its ``patch_camelyon`` is Camelyon16's PCam,
without hospitals). Not run on the real data here: the tests use small trees in this layout.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from dgjax.data.idx import DataError
from dgjax.data.image_folder import ImageEnvironment, get_image_dataset

__all__ = ["FMOW_CATEGORIES", "environments", "fmow_regions", "wilds_environments"]

#: The ``wilds`` package's FMoW categories: label = index.
FMOW_CATEGORIES = (
  "airport",
  "airport_hangar",
  "airport_terminal",
  "amusement_park",
  "aquaculture",
  "archaeological_site",
  "barn",
  "border_checkpoint",
  "burial_site",
  "car_dealership",
  "construction_site",
  "crop_field",
  "dam",
  "debris_or_rubble",
  "educational_institution",
  "electric_substation",
  "factory_or_powerplant",
  "fire_station",
  "flooded_road",
  "fountain",
  "gas_station",
  "golf_course",
  "ground_transportation_station",
  "helipad",
  "hospital",
  "impoverished_settlement",
  "interchange",
  "lake_or_pond",
  "lighthouse",
  "military_facility",
  "multi-unit_residential",
  "nuclear_powerplant",
  "office_building",
  "oil_or_gas_facility",
  "park",
  "parking_lot_or_garage",
  "place_of_worship",
  "police_station",
  "port",
  "prison",
  "race_track",
  "railway_bridge",
  "recreational_facility",
  "road_bridge",
  "runway",
  "shipyard",
  "shopping_mall",
  "single-unit_residential",
  "smokestack",
  "solar_farm",
  "space_facility",
  "stadium",
  "storage_tank",
  "surface_mine",
  "swimming_pool",
  "toll_booth",
  "tower",
  "tunnel_opening",
  "waste_disposal",
  "water_treatment_facility",
  "wind_farm",
  "zoo",
)

#: Strings ``pandas.read_csv`` reads as missing by default (its ``na_values``).
_PANDAS_NA = frozenset(
  (
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
  )
)
_MISSING = None  # a missing cell, one value of its own (pandas' NaN in ``unique()``)


def _cell(value: str):
  return _MISSING if value in _PANDAS_NA else value


def _data_folder(name: str, data_dir) -> Path:
  spec = get_image_dataset(name)
  if data_dir is None:
    raise DataError(
      f"{name} needs --data_dir: the folder holding {spec.folder}/ ({spec.data_layout}); "
      f"fetch it with: {spec.fetch_command('<data_dir>')}"
    )
  root = Path(data_dir) / spec.folder
  if not root.is_dir():
    raise DataError(
      f"{name}: folder {root} does not exist; expected {spec.data_layout}. Fetch it with: "
      f"{spec.fetch_command(data_dir)}"
    )
  return root


def _rows(name: str, path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
  """``(row number, row)`` of the csv file ``path``, after checking its ``columns``."""
  spec = get_image_dataset(name)
  if not path.is_file():
    raise DataError(
      f"{name}: {path} does not exist; expected {spec.data_layout}. Fetch it with: "
      f"{spec.fetch_command(path.parent.parent)}"
    )
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise DataError(
        f"{name}: {path} lacks column(s) {', '.join(missing)} (has: "
        f"{', '.join(reader.fieldnames or ()) or 'no header'})"
      )
    yield from enumerate(reader)


def _int(name: str, path: Path, row: int, column: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise DataError(
      f"{name}: {path} row {row + 1} (after the header): {column} {value!r} is not an integer"
    ) from None


def _by_value(
  name: str, field: str, values: np.ndarray, paths: list[str], y: np.ndarray, classes, root
) -> list[ImageEnvironment]:
  """DomainBed's ``WILDSEnvironment`` s: one per sorted value of ``field``, rows in order."""
  spec = get_image_dataset(name)
  found = sorted(set(values.tolist()))
  names = tuple(f"{field}_{v}" for v in found)
  if names != spec.env_names:
    raise DataError(
      f"{name}: the {field} values in {root} are {found}, giving environments "
      f"{', '.join(names)}; DomainBed's {name} has {', '.join(spec.env_names)}"
    )
  paths_array = np.asarray(paths, dtype=str)
  envs = []
  for v, env_name in zip(found, names):
    rows = np.flatnonzero(values == v)
    envs.append(ImageEnvironment(env_name, root, tuple(classes), paths_array[rows], y[rows]))
  return envs


def camelyon_environments(data_dir) -> list[ImageEnvironment]:
  """``WILDSCamelyon``: one environment per hospital (see the module docstring)."""
  name = "WILDSCamelyon"
  root = _data_folder(name, data_dir)
  path = root / "metadata.csv"
  columns = ("patient", "node", "x_coord", "y_coord", "tumor", "center")
  paths, labels, hospitals = [], [], []
  patches = os.path.join(root, "patches")
  for i, row in _rows(name, path, columns):
    patient = row["patient"]
    node, x, y = (_int(name, path, i, c, row[c]) for c in ("node", "x_coord", "y_coord"))
    folder = f"patient_{patient}_node_{node}"
    paths.append(os.path.join(patches, folder, f"patch_{folder}_x_{x}_y_{y}.png"))
    labels.append(_int(name, path, i, "tumor", row["tumor"]))
    hospitals.append(_int(name, path, i, "center", row["center"]))
  y = np.asarray(labels, dtype=np.int32)
  bad = sorted(set(y.tolist()) - {0, 1})
  if bad:
    raise DataError(f"{name}: {path} has tumor labels {bad}; expected 0 and 1")
  return _by_value(name, "hospital", np.asarray(hospitals), paths, y, ("normal", "tumor"), root)


def _fmow_metadata(data_dir):
  """``(root, rows, region per row, region names)`` of FMoW's ``rgb_metadata.csv``, every row
  (``seq`` ones included); regions numbered by first appearance."""
  name = "WILDSFMoW"
  root = _data_folder(name, data_dir)
  mapping_path = root / "country_code_mapping.csv"
  to_region = {}
  for _, row in _rows(name, mapping_path, ("alpha-3", "region")):
    code = _cell(row["alpha-3"])
    if code is not _MISSING:  # pandas' NaN keys match nothing
      to_region[code] = _cell(row["region"])
  path = root / "rgb_metadata.csv"
  rows = [r for _, r in _rows(name, path, ("split", "category", "country_code"))]
  region_names = [to_region.get(_cell(r["country_code"]), "Other") for r in rows]
  order = list(dict.fromkeys(region_names))  # pandas' unique(): first appearance
  index = {region: i for i, region in enumerate(order)}
  return root, path, rows, np.asarray([index[r] for r in region_names]), tuple(order)


def fmow_regions(data_dir) -> tuple:
  """FMoW's region names by number (``region_<i>`` is entry ``i``; ``None``: a missing
  region in the mapping file)."""
  return _fmow_metadata(data_dir)[4]


def fmow_environments(data_dir) -> list[ImageEnvironment]:
  """``WILDSFMoW``: one environment per region (see the module docstring)."""
  name = "WILDSFMoW"
  root, path, rows, regions, _ = _fmow_metadata(data_dir)
  category = {c: i for i, c in enumerate(FMOW_CATEGORIES)}
  keep = np.asarray([r["split"] != "seq" for r in rows], dtype=bool)
  paths, labels = [], []
  images = os.path.join(root, "images")
  for i in np.flatnonzero(keep):
    c = rows[i]["category"]
    if c not in category:
      raise DataError(
        f"{name}: {path} row {i + 1} (after the header): unknown category {c!r} "
        f"(the wilds package's 62 are dgjax.data.wilds.FMOW_CATEGORIES)"
      )
    paths.append(os.path.join(images, f"rgb_img_{i}.png"))
    labels.append(category[c])
  if not paths:
    raise DataError(f"{name}: {path} has no rows outside the 'seq' split")
  return _by_value(
    name,
    "region",
    regions[keep],
    paths,
    np.asarray(labels, dtype=np.int32),
    FMOW_CATEGORIES,
    root,
  )


def wilds_environments(name: str, data_dir) -> list[ImageEnvironment]:
  """The environments of ``WILDSCamelyon`` or ``WILDSFMoW`` under ``data_dir``: image paths
  and labels, DomainBed's order. Raises :class:`DataError` naming the missing folder or file
  (and the command that fetches it), a missing column, a bad value, or environments other
  than DomainBed's."""
  readers = {"WILDSCamelyon": camelyon_environments, "WILDSFMoW": fmow_environments}
  if name not in readers:
    raise ValueError(f"unknown WILDS dataset {name!r}; valid: {', '.join(readers)}")
  return readers[name](data_dir)


def environments(name: str, data_dir, trial_seed: int = 0) -> list[ImageEnvironment]:
  """The ``reader`` of :data:`dgjax.data.image_folder.IMAGE_DATASETS` (the seed is unused)."""
  del trial_seed
  return wilds_environments(name, data_dir)
