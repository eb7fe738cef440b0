"""The rest of DomainBed's ``datasets.DATASETS``: Debug28 / Debug224, SVIRO, WILDSCamelyon,
WILDSFMoW and the six Spawrious benchmarks, on small trees the tests write in each official
layout (no real data here), against references written from DomainBed's and the ``wilds``
package's definitions; the per-dataset training transforms; a 2-step run on Debug28."""

import csv

import jax
import numpy as np
import pytest
from PIL import Image

from dgjax import datasets, image_task, runs
from dgjax.data import debug, image_folder, image_pipeline, spawrious, wilds
from dgjax.data.idx import DataError

# DomainBed's ``datasets.DATASETS`` in its order: (ENVIRONMENTS, N_STEPS, CHECKPOINT_FREQ,
# in ``hparams_registry.SMALL_IMAGES``), from ``domainbed/datasets.py``.
SPAWRIOUS_ENVS = ("Test", "SC_group_1", "SC_group_2")
DOMAINBED = {
  "Debug28": (("0", "1", "2"), 5001, 100, True),
  "Debug224": (("0", "1", "2"), 5001, 100, False),
  "ColoredMNIST": (("+90%", "+80%", "-90%"), 5001, 100, True),
  "RotatedMNIST": (("0", "15", "30", "45", "60", "75"), 5001, 100, True),
  "VLCS": (("C", "L", "S", "V"), 5001, 300, False),
  "PACS": (("A", "C", "P", "S"), 5001, 300, False),
  "OfficeHome": (("A", "C", "P", "R"), 5001, 300, False),
  "TerraIncognita": (("L100", "L38", "L43", "L46"), 5001, 300, False),
  "DomainNet": (("clip", "info", "paint", "quick", "real", "sketch"), 5001, 1000, False),
  "SVIRO": (
    ("aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"),
    5001,
    300,
    False,
  ),
  "WILDSCamelyon": (tuple(f"hospital_{i}" for i in range(5)), 5001, 100, False),
  "WILDSFMoW": (tuple(f"region_{i}" for i in range(6)), 5001, 100, False),
  **{
    f"Spawrious{k}_{level}": (SPAWRIOUS_ENVS, 5001, 100, False)
    for k in ("O2O", "M2M")
    for level in ("easy", "medium", "hard")
  },
}


def test_every_domainbed_dataset_is_registered_in_its_order_with_its_constants():
  assert list(datasets.DATASETS)[: len(DOMAINBED)] == list(DOMAINBED)
  for name, (envs, steps, freq, small) in DOMAINBED.items():
    ds = datasets.get_dataset(name)
    assert (ds.env_names, ds.steps, ds.checkpoint_freq, ds.small_images) == (
      envs,
      steps,
      freq,
      small,
    ), name
    assert ds.default_test_env == 0 or name in ("ColoredMNIST",), name
  transforms = {n: s.train_transform for n, s in image_folder.IMAGE_DATASETS.items()}
  assert {n for n, t in transforms.items() if t == "resize_crop"} == {"WILDSCamelyon", "WILDSFMoW"}
  assert {n for n, t in transforms.items() if t == "resize_flip"} == {
    n for n in DOMAINBED if n.startswith("Spawrious")
  }
  assert [n for n, s in image_folder.IMAGE_DATASETS.items() if not s.augments] == ["Debug224"]


def write_png(path, rng, shape=(8, 8, 3)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------- Debug
def test_debug_datasets_are_domainbeds_shapes_and_deterministic():
  envs = datasets.load_environments("Debug28", trial_seed=3)
  assert [e.name for e in envs] == ["0", "1", "2"]
  for e in envs:  # DomainBed: randn(16, 3, 28, 28), randint(0, 2, (16,)); NHWC here
    assert e.x.shape == (16, 28, 28, 3) and e.x.dtype == np.float32 and e.y.shape == (16,)
    assert set(e.y.tolist()) <= {0, 1}
  x = np.concatenate([e.x for e in envs])
  assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02  # N(0, 1): 37632 draws
  again = datasets.load_environments("Debug28", trial_seed=3)
  other = datasets.load_environments("Debug28", trial_seed=4)
  np.testing.assert_array_equal(again[2].x, envs[2].x)
  np.testing.assert_array_equal(again[2].y, envs[2].y)
  assert not np.array_equal(other[0].x, envs[0].x)
  assert datasets.get_dataset("Debug28").model().num_classes == 2  # MNIST_CNN, 2 classes

  images = image_task.image_environments("Debug224", None, trial_seed=3)
  assert [e.name for e in images] == ["0", "1", "2"]
  assert all(len(e) == 16 and len(e.classes) == 2 for e in images)
  first = image_pipeline.decode_eval(images[1].x[5])  # PNG bytes, made on demand
  assert first.shape == (224, 224, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(
    first,
    image_pipeline.decode_eval(
      image_task.image_environments("Debug224", None, "folder", 3)[1].x[5]
    ),
  )
  # ImageNet-normalised, the pixels are N(0, 1) draws (quantised, clipped at about 2 sd)
  z = (first / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.06
  # round(255 * (mean_c + std_c * z)), clipped: 255 * 0.485 = 123.7; 255 * (0.456 + 0.224)
  # = 173.4; 255 * (0.406 - 0.225) = 46.2; then clipping below and above
  assert debug.to_pixels(np.array([[0.0, 1.0, -1.0], [-10.0, 0.0, 10.0]])).tolist() == [
    [124, 173, 46],
    [0, 116, 255],
  ]
  splits_in, splits_out = image_folder.image_splits(images, 0.2, 0)
  assert [len(s) for s in splits_out] == [3, 3, 3]  # DomainBed: int(16 * 0.2) held out
  assert isinstance(splits_in[0].x[0], image_pipeline.EncodedImage)


# --------------------------------------------------------------------------- SVIRO
def test_sviro_environments_classes_and_missing_folder(tmp_path):
  vehicles = DOMAINBED["SVIRO"][0]
  classes = ("7_everyday_object", "0_empty", "3_person")  # sorted by ImageFolder
  for v in reversed(vehicles):
    for c in classes:
      for k in range(2):
        (tmp_path / "sviro" / v / c).mkdir(parents=True, exist_ok=True)
        (tmp_path / "sviro" / v / c / f"img_{k}.png").touch()
  envs = datasets.load_environments("SVIRO", str(tmp_path))
  assert [e.name for e in envs] == list(vehicles)
  assert [e.root.name for e in envs] == list(vehicles)
  for e in envs:
    assert e.classes == ("0_empty", "3_person", "7_everyday_object")
    assert e.y.tolist() == [0, 0, 1, 1, 2, 2]
  with pytest.raises(DataError, match=r"sviro does not exist.*download_sviro\('"):
    datasets.load_environments("SVIRO", str(tmp_path / "elsewhere"))


# --------------------------------------------------------------------------- WILDS
CAMELYON_HEADER = ["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"]
#: (patient as written, node, x, y, tumor, slide, center, split) in file order
CAMELYON_ROWS = [
  ("004", 4, 3328, 21792, 1, 0, 0, 0),
  ("017", 1, 100, 200, 0, 9, 1, 3),
  ("004", 4, 3360, 21792, 0, 0, 0, 0),
  ("042", 3, 7, 9, 1, 23, 2, 2),
  ("060", 0, 1, 2, 0, 30, 3, 0),
  ("080", 2, 5, 6, 1, 40, 4, 1),
  ("017", 1, 132, 200, 1, 9, 1, 3),
]


def write_camelyon(root, rows=CAMELYON_ROWS, header=CAMELYON_HEADER, images=False):
  folder = root / "camelyon17_v1.0"
  folder.mkdir(parents=True)
  with open(folder / "metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for i, row in enumerate(rows):
      w.writerow([i, *row])
  if images:
    rng = np.random.default_rng(0)
    for patient, node, x, y, *_ in rows:
      rel = (
        f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"
      )
      write_png(folder / rel, rng, (6, 6, 3))
  return folder


def camelyon_reference(folder, rows):
  """DomainBed's WILDSEnvironment over the wilds package's Camelyon17Dataset: per sorted
  ``center`` value, the rows with that value in order; the package's path format."""
  out = []
  for v in sorted({r[6] for r in rows}):
    paths, labels = [], []
    for patient, node, x, y, tumor, _, center, _ in rows:
      if center == v:
        paths.append(
          str(
            folder
            / f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png"
          )
        )
        labels.append(tumor)
    out.append((f"hospital_{v}", paths, labels))
  return out


def test_camelyon_environments_are_domainbeds_hospitals(tmp_path):
  folder = write_camelyon(tmp_path)
  envs = datasets.load_environments("WILDSCamelyon", str(tmp_path))
  expected = camelyon_reference(folder, CAMELYON_ROWS)
  assert [(e.name, e.x.tolist(), e.y.tolist()) for e in envs] == expected
  assert [len(e) for e in envs] == [2, 2, 1, 1, 1]
  assert envs[0].x[0].endswith("patient_004_node_4/patch_patient_004_node_4_x_3328_y_21792.png")
  assert all(e.classes == ("normal", "tumor") for e in envs)


def test_camelyon_errors_name_the_path_and_the_command(tmp_path):
  with pytest.raises(
    DataError,
    match=r"camelyon17_v1.0 does not exist.*python -m wilds.download_datasets --root_dir .* --datasets camelyon17",
  ):
    datasets.load_environments("WILDSCamelyon", str(tmp_path))
  with pytest.raises(DataError, match="needs --data_dir"):
    datasets.load_environments("WILDSCamelyon", None)
  write_camelyon(
    tmp_path / "a", header=[h if h != "center" else "hospital" for h in CAMELYON_HEADER]
  )
  with pytest.raises(DataError, match=r"metadata.csv lacks column\(s\) center"):
    datasets.load_environments("WILDSCamelyon", str(tmp_path / "a"))
  write_camelyon(tmp_path / "b", rows=[r for r in CAMELYON_ROWS if r[6] != 3])
  with pytest.raises(DataError, match=r"hospital values .* are \[0, 1, 2, 4\].*hospital_3"):
    datasets.load_environments("WILDSCamelyon", str(tmp_path / "b"))
  (tmp_path / "c" / "camelyon17_v1.0").mkdir(parents=True)
  with pytest.raises(DataError, match=r"metadata.csv does not exist"):
    datasets.load_environments("WILDSCamelyon", str(tmp_path / "c"))


FMOW_HEADER = ["split", "img_filename", "category", "country_code", "timestamp", "lat", "lon"]
#: (split, category, country_code) in file order, and the region each gets (by hand, from
#: the wilds package's rule: the mapping, 'Other' for codes it lacks or missing codes)
FMOW_ROWS = [
  ("seq", "zoo", "FRA"),  # Europe first appears here: region 0 though the row is dropped
  ("train", "airport", "USA"),  # Americas: 1
  ("val", "dam", ""),  # missing code: Other, 2
  ("test", "port", "CHN"),  # Asia: 3
  ("train", "wind_farm", "KEN"),  # Africa: 4
  ("train", "multi-unit_residential", "AUS"),  # Oceania: 5
  ("id_val", "zoo", "DEU"),  # Europe: 0
  ("id_test", "airport", "XYZ"),  # not in the mapping: Other, 2
  ("seq", "dam", "USA"),  # dropped
  ("train", "port", "NA"),  # pandas reads NA as missing: Other, 2
  ("train", "dam", "JPN"),  # Asia: 3
]
FMOW_MAPPING = [("France", "FRA", "Europe"), ("Germany", "DEU", "Europe")]
FMOW_MAPPING += [("United States", "USA", "Americas"), ("China", "CHN", "Asia")]
FMOW_MAPPING += [("Japan", "JPN", "Asia"), ("Kenya", "KEN", "Africa")]
FMOW_MAPPING += [("Australia", "AUS", "Oceania")]
#: region_i -> its rows (file order, seq rows dropped); labels from the package's list
FMOW_EXPECTED = [[6], [1], [2, 7, 9], [3, 10], [4], [5]]
FMOW_LABELS = {"airport": 0, "dam": 12, "multi-unit_residential": 30, "port": 38, "wind_farm": 60}
FMOW_LABELS["zoo"] = 61


def write_fmow(root, rows=FMOW_ROWS, mapping=True):
  folder = root / "fmow_v1.1"
  folder.mkdir(parents=True)
  with open(folder / "rgb_metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(FMOW_HEADER)
    for i, (split, category, code) in enumerate(rows):
      w.writerow([split, f"{category}_{i}_rgb.jpg", category, code, "2016-02-01T00:00:00Z", 0, 0])
  if mapping:
    with open(folder / "country_code_mapping.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["name", "alpha-2", "alpha-3", "region"])
      for name, code, region in FMOW_MAPPING:
        w.writerow([name, code[:2], code, region])
  return folder


def test_fmow_environments_are_domainbeds_regions(tmp_path):
  folder = write_fmow(tmp_path)
  envs = datasets.load_environments("WILDSFMoW", str(tmp_path))
  assert [e.name for e in envs] == [f"region_{i}" for i in range(6)]
  for env, rows in zip(envs, FMOW_EXPECTED):
    assert env.x.tolist() == [str(folder / "images" / f"rgb_img_{i}.png") for i in rows]
    assert env.y.tolist() == [FMOW_LABELS[FMOW_ROWS[i][1]] for i in rows]
    assert env.classes == wilds.FMOW_CATEGORIES
  assert wilds.fmow_regions(tmp_path) == (
    "Europe",
    "Americas",
    "Other",
    "Asia",
    "Africa",
    "Oceania",
  )
  assert len(wilds.FMOW_CATEGORIES) == 62 == len(set(wilds.FMOW_CATEGORIES))


def test_fmow_errors(tmp_path):
  write_fmow(tmp_path, mapping=False)
  with pytest.raises(DataError, match=r"country_code_mapping.csv does not exist.*--datasets fmow"):
    datasets.load_environments("WILDSFMoW", str(tmp_path))
  write_fmow(tmp_path / "a", rows=[*FMOW_ROWS, ("train", "spaceport", "USA")])
  with pytest.raises(DataError, match=r"row 12 .*unknown category 'spaceport'"):
    datasets.load_environments("WILDSFMoW", str(tmp_path / "a"))
  write_fmow(tmp_path / "b", rows=[r for r in FMOW_ROWS if r[2] != "KEN"])
  with pytest.raises(DataError, match=r"region values .* are \[0, 1, 2, 3, 4\]"):
    datasets.load_environments("WILDSFMoW", str(tmp_path / "b"))


# --------------------------------------------------------------------------- Spawrious
BACKGROUNDS = ("beach", "desert", "dirt", "jungle", "mountain", "snow")
#: DomainBed's benchmark classes: (group, test, filler) as its constructors pass them
DOMAINBED_SPAWRIOUS = {
  "SpawriousO2O_easy": (
    ["desert", "jungle", "dirt", "snow"],
    ["dirt", "snow", "desert", "jungle"],
    "beach",
  ),
  "SpawriousO2O_medium": (
    ["mountain", "beach", "dirt", "jungle"],
    ["jungle", "dirt", "beach", "snow"],
    "desert",
  ),
  "SpawriousO2O_hard": (
    ["jungle", "mountain", "snow", "desert"],
    ["mountain", "snow", "desert", "jungle"],
    "beach",
  ),
  "SpawriousM2M_easy": (
    ["desert", "mountain", "dirt", "jungle"],
    ["dirt", "jungle", "mountain", "desert"],
    None,
  ),
  "SpawriousM2M_medium": (
    ["beach", "snow", "mountain", "desert"],
    ["desert", "mountain", "beach", "snow"],
    None,
  ),
  "SpawriousM2M_hard": (
    ["dirt", "jungle", "snow", "beach"],
    ["snow", "beach", "dirt", "jungle"],
    None,
  ),
}
TOTAL = 10  # images per folder in the test tree (3168 in the archive): the limits scale


def domainbed_spawrious_reference(name, root, total):
  """DomainBed's SpawriousBenchmark, line by line: the combination dicts of
  build_type1_combination / build_type2_combination, then _create_data_list's loops
  (ConcatDataset order), CustomImageFolder's files (sorted here) and [:limit]."""
  group, test, filler = DOMAINBED_SPAWRIOUS[name]
  type1 = filler is not None
  if type1:
    counts = [int(0.97 * total), int(0.87 * total)]
    train = {
      ("bulldog",): [(group[0], counts[0]), (group[0], counts[1])],
      ("dachshund",): [(group[1], counts[0]), (group[1], counts[1])],
      ("labrador",): [(group[2], counts[0]), (group[2], counts[1])],
      ("corgi",): [(group[3], counts[0]), (group[3], counts[1])],
      ("bulldog", "dachshund", "labrador", "corgi"): [
        (filler, total - counts[0]),
        (filler, total - counts[1]),
      ],
    }
    test_c = {
      ("bulldog",): [test[0], test[0]],
      ("dachshund",): [test[1], test[1]],
      ("labrador",): [test[2], test[2]],
      ("corgi",): [test[3], test[3]],
    }
  else:
    train = {
      ("bulldog",): [(group[0], total), (group[1], total)],
      ("dachshund",): [(group[1], total), (group[0], total)],
      ("labrador",): [(group[2], total), (group[3], total)],
      ("corgi",): [(group[3], total), (group[2], total)],
    }
    test_c = {
      ("bulldog",): [test[0], test[1]],
      ("dachshund",): [test[1], test[0]],
      ("labrador",): [test[2], test[3]],
      ("corgi",): [test[3], test[2]],
    }
  class_list = ["bulldog", "corgi", "dachshund", "labrador"]

  def create_data_list(combinations):
    for_each_class_group = []
    for classes, comb_list in combinations.items():
      for_each_class_group.append([])
      for ind, location_limit in enumerate(comb_list):
        location, limit = (
          location_limit if isinstance(location_limit, tuple) else (location_limit, None)
        )
        cg = []
        for cls in classes:
          folder = root / f"{0 if not type1 else ind}/{location}/{cls}"
          files = sorted(
            str(folder / f)
            for f in (p.name for p in folder.iterdir())
            if f.endswith((".png", ".jpg", ".jpeg"))
          )
          if limit:
            files = files[:limit]
          cg.append([(f, class_list.index(cls)) for f in files])
        for_each_class_group[-1].append([x for part in cg for x in part])
    return [
      [x for k in range(len(for_each_class_group)) for x in for_each_class_group[k][g]]
      for g in range(len(for_each_class_group[0]))
    ]

  test_env = [x for part in create_data_list(test_c) for x in part]
  return [test_env, *create_data_list(train)]


@pytest.fixture(scope="module")
def spawrious_tree(tmp_path_factory):
  """spawrious224/{0,1}/<background>/<breed>/ with TOTAL images each, plus files DomainBed
  skips (upper-case extension, text)."""
  root = tmp_path_factory.mktemp("spawrious") / "spawrious224"
  rng = np.random.default_rng(0)
  for d in ("0", "1"):
    for b in BACKGROUNDS:
      for breed in spawrious.BREEDS:
        folder = root / d / b / breed
        for k in reversed(range(TOTAL)):
          write_png(folder / f"{b}_{breed}_{k:02d}.{'png' if k % 3 else 'jpg'}", rng, (4, 4, 3))
        (folder / "z_upper.PNG").write_bytes(b"")
        (folder / "notes.txt").write_text("x")
  return root


@pytest.mark.parametrize("name", sorted(DOMAINBED_SPAWRIOUS))
def test_spawrious_environments_are_domainbeds(spawrious_tree, monkeypatch, name):
  monkeypatch.setattr(spawrious, "FOLDER_IMAGES", TOTAL)
  envs = datasets.load_environments(name, str(spawrious_tree.parent))
  expected = domainbed_spawrious_reference(name, spawrious_tree, TOTAL)
  assert [e.name for e in envs] == list(SPAWRIOUS_ENVS)
  for env, ref in zip(envs, expected):
    assert list(zip(env.x.tolist(), env.y.tolist())) == ref, env.name
    assert env.classes == ("bulldog", "corgi", "dachshund", "labrador")
  # O2O: test 2 x 4 x 10, training 4 x 9 + 4 x 1 and 4 x 8 + 4 x 2; M2M: 8 x 10, 4 x 10
  assert [len(e) for e in envs] == [80, 40, 40]
  # DomainBed's own --data_dir (the spawrious224 folder itself) reads the same
  same = datasets.load_environments(name, str(spawrious_tree))
  assert [e.x.tolist() for e in same] == [e.x.tolist() for e in envs]


def test_spawrious_o2o_limits_at_the_archives_size():
  folders = spawrious.environment_folders("SpawriousO2O_easy")
  assert [f[3] for f in folders[1]] == [3072] * 4 + [96] * 4
  assert [f[3] for f in folders[2]] == [2756] * 4 + [412] * 4
  assert folders[1][0] == ("0", "desert", "bulldog", 3072) and folders[2][4] == (
    "1",
    "beach",
    "bulldog",
    412,
  )


def test_spawrious_missing_folders_are_named(tmp_path):
  with pytest.raises(DataError, match=r"spawrious224 does not exist.*download_spawrious\('"):
    datasets.load_environments("SpawriousM2M_hard", str(tmp_path))
  root = tmp_path / "spawrious224"
  (root / "0" / "snow" / "bulldog").mkdir(parents=True)
  with pytest.raises(DataError, match=r"15 folder\(s\) missing: .*0/beach/dachshund.* and 11 more"):
    datasets.load_environments("SpawriousM2M_hard", str(tmp_path))


# --------------------------------------------------------------------------- transforms
def test_wilds_and_spawrious_training_transforms(tmp_path):
  """resize_crop: Resize((s, s)) then the crop box drawn on the s x s image; resize_flip:
  Resize and flip, no crop; both against PIL step by step with the same draws."""
  path = tmp_path / "img.png"
  write_png(path, np.random.default_rng(1), (12, 20, 3))  # not square: the order matters
  for i in range(6):
    got = image_pipeline.decode_train(
      str(path), image_pipeline.example_rng((5,), i), 8, transform="resize_crop"
    )
    rng = image_pipeline.example_rng((5,), i)
    image = Image.open(path).convert("RGB").resize((8, 8), Image.BILINEAR)
    top, left, h, w = image_pipeline.random_resized_crop_box(8, 8, rng)
    image = image.crop((left, top, left + w, top + h)).resize((8, 8), Image.BILINEAR)
    if rng.random() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    np.testing.assert_array_equal(got, np.asarray(image))

    got = image_pipeline.decode_train(
      str(path), image_pipeline.example_rng((5,), i), 8, transform="resize_flip"
    )
    rng = image_pipeline.example_rng((5,), i)
    image = np.asarray(Image.open(path).convert("RGB").resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(got, image[:, ::-1] if rng.random() < 0.5 else image)
  with pytest.raises(ValueError, match="unknown transform 'crop2'"):
    image_pipeline.train_batches(
      [image_folder.FileSplit("e", np.array([str(path)]), np.array([0]))],
      jax.random.key(0),
      1,
      transform="crop2",
    )


def test_make_task_gives_each_dataset_its_transform(tmp_path, spawrious_tree, monkeypatch):
  """make_task's wiring, the model left out (a stand-in ImageTask records its arguments)."""
  seen = {}

  class Recorder:
    def __init__(self, model, pretrained, splits_in, splits_out, test_envs, batch_size, seed, **kw):
      seen.update(kw, splits_in=splits_in, test_envs=test_envs)

  monkeypatch.setattr(image_task, "ImageTask", Recorder)
  monkeypatch.setattr(
    image_task, "make_model", lambda num_classes, hp, *args, **kwargs: num_classes
  )
  monkeypatch.setattr(spawrious, "FOLDER_IMAGES", TOTAL)
  common = {"method": "erm", "pretrained": "none", "image_size": 8, "output_dir": str(tmp_path)}
  config = runs.make_config("SpawriousM2M_easy", data_dir=str(spawrious_tree.parent), **common)
  assert config.test_envs == (0,)  # Test
  image_task.make_task(config)
  assert seen["augment"] is True and seen["train_transform"] == "resize_flip"
  write_camelyon(tmp_path, images=True)
  image_task.make_task(runs.make_config("WILDSCamelyon", data_dir=str(tmp_path), **common))
  assert seen["augment"] is True and seen["train_transform"] == "resize_crop"
  image_task.make_task(runs.make_config("Debug224", **common))
  assert seen["augment"] is False  # DomainBed transforms nothing, data_augmentation or not
  # a patch listed in metadata.csv but absent is named before any work
  with open(tmp_path / "camelyon17_v1.0" / "metadata.csv", "a", newline="") as f:
    csv.writer(f).writerow([7, "099", 1, 2, 3, 0, 49, 4, 0])
  with pytest.raises(DataError, match=r"1 of 8 image files .*patch_patient_099_node_1_x_2_y_3.png"):
    image_task.make_task(runs.make_config("WILDSCamelyon", data_dir=str(tmp_path), **common))


# --------------------------------------------------------------------------- training
def test_debug28_trains_two_steps(tmp_path):
  config = runs.make_config(
    "Debug28",
    method="erm",
    steps=2,
    checkpoint_freq=1,
    output_dir=str(tmp_path / "run"),
    progress=False,
  )
  assert config.test_envs == (0,) and config.resolved_hparams["lr"] == 1e-3  # SMALL_IMAGES
  records = runs.run(config)
  assert [r["step"] for r in records] == [0, 1]
  assert records[-1]["args"]["env_names"] == ["0", "1", "2"]
  for r in records:
    assert np.isfinite(r["loss"]) and len(r["env_losses"]) == 2
    for e in range(3):
      assert 0.0 <= r[f"env{e}_in_acc"] <= 1.0
  assert records[0]["loss"] != records[1]["loss"]
