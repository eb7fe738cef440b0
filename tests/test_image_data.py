"""Image benchmarks' file lists (dgjax.data.image_folder), the grain input pipeline
(dgjax.data.image_pipeline) and the on-device colour augmentation (dgjax.augment), on small
synthetic trees written by the tests."""

import colorsys
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dgjax import augment
from dgjax.data import DataError, env_split_seed, split_in_out
from dgjax.data import image_folder as imf
from dgjax.data import image_pipeline as pipe


def write_jpeg(path, rng, size=(40, 30)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_tree(root, env_folders, classes, per_class=3, real=False, seed=0):
  """``root/<env>/<class>/img{k}.jpg``; ``real=False`` writes empty placeholders (discovery
  never decodes)."""
  rng = np.random.default_rng(seed)
  for env in env_folders:
    for c in classes:
      for k in range(per_class):
        path = Path(root) / env / c / f"img{k}.jpg"
        if real:
          write_jpeg(path, rng)
        else:
          path.parent.mkdir(parents=True, exist_ok=True)
          path.touch()


# --------------------------------------------------------------------------- discovery
FOLDER_DATASETS = sorted(n for n, s in imf.IMAGE_DATASETS.items() if s.reader is None)


def test_folder_datasets_are_domainbeds_image_folders():
  assert FOLDER_DATASETS == sorted(
    ["VLCS", "PACS", "OfficeHome", "TerraIncognita", "DomainNet", "SVIRO"]
  )


@pytest.mark.parametrize("name", FOLDER_DATASETS)
def test_domainbed_layout_discovery_order_and_constants(tmp_path, name):
  spec = imf.IMAGE_DATASETS[name]
  num_classes = spec.num_classes or 7  # SVIRO: read from the folders
  classes = [f"class_{i:03d}" for i in range(num_classes)][::-1]  # written unsorted
  make_tree(tmp_path / spec.folder, spec.env_folders, classes, per_class=1)
  envs = imf.image_dataset_environments(name, tmp_path)
  assert [e.name for e in envs] == list(spec.env_names)
  assert [e.root.name for e in envs] == sorted(spec.env_folders) == list(spec.env_folders)
  for env in envs:
    assert env.classes == tuple(sorted(classes))
    np.testing.assert_array_equal(env.y, np.arange(num_classes))
    assert Path(env.x[0]).parent.name == "class_000"
  expected = {
    "VLCS": ("C", "L", "S", "V", 5),
    "PACS": ("A", "C", "P", "S", 7),
    "OfficeHome": ("A", "C", "P", "R", 65),
    "TerraIncognita": ("L100", "L38", "L43", "L46", 10),
    "DomainNet": ("clip", "info", "paint", "quick", "real", "sketch", 345),
    "SVIRO": (
      *("aclass", "escape", "hilux", "i3", "lexus", "tesla", "tiguan", "tucson", "x5", "zoe"),
      None,
    ),
  }[name]
  assert (*spec.env_names, spec.num_classes) == expected
  assert spec.checkpoint_freq == (1000 if name == "DomainNet" else 300)
  assert spec.n_steps == 5001


def test_folder_names_are_domainbeds():
  assert imf.IMAGE_DATASETS["PACS"].env_folders == ("art_painting", "cartoon", "photo", "sketch")
  assert imf.IMAGE_DATASETS["VLCS"].env_folders == ("Caltech101", "LabelMe", "SUN09", "VOC2007")
  assert imf.IMAGE_DATASETS["OfficeHome"].folder == "office_home"
  assert imf.IMAGE_DATASETS["OfficeHome"].env_folders[-1] == "Real World"
  assert imf.IMAGE_DATASETS["TerraIncognita"].env_folders[0] == "location_100"
  assert imf.IMAGE_DATASETS["DomainNet"].folder == "domain_net"


def test_image_folder_file_order_as_torchvision(tmp_path):
  """Sorted classes; per class sorted os.walk (nested folders) and sorted names; only image
  extensions (any case)."""
  for env in ("b_env", "a_env"):
    for rel in (
      "dog/z.jpg",
      "dog/a.PNG",
      "dog/sub/m.jpeg",
      "dog/notes.txt",
      "cat/x.webp",
      "cat/b.JPG",
    ):
      p = tmp_path / env / rel
      p.parent.mkdir(parents=True, exist_ok=True)
      p.touch()
  envs = imf.ImageFolderDomains(tmp_path)
  assert [e.name for e in envs] == ["a_env", "b_env"]
  env = envs[0]
  assert env.classes == ("cat", "dog")
  rel = [os.path.relpath(p, env.root) for p in env.x]
  assert rel == ["cat/b.JPG", "cat/x.webp", "dog/a.PNG", "dog/z.jpg", "dog/sub/m.jpeg"]
  np.testing.assert_array_equal(env.y, [0, 0, 1, 1, 1])
  named = imf.ImageFolderDomains(tmp_path, ["b_env"], ["B"])
  assert [e.name for e in named] == ["B"] and named[0].root == tmp_path / "b_env"


def test_splits_are_domainbeds_seeded_80_20_over_file_lists(tmp_path):
  make_tree(tmp_path, ["e0", "e1"], ["a", "b"], per_class=10)
  envs = imf.ImageFolderDomains(tmp_path)
  splits_in, splits_out = imf.image_splits(envs, 0.2, trial_seed=3)
  for i, env in enumerate(envs):
    idx_in, idx_out = split_in_out(len(env), 0.2, env_split_seed(3, i))
    np.testing.assert_array_equal(splits_in[i].x, env.x[idx_in])
    np.testing.assert_array_equal(splits_out[i].y, env.y[idx_out])
    assert (len(splits_in[i]), len(splits_out[i])) == (16, 4)
    assert set(splits_in[i].x) | set(splits_out[i].x) == set(env.x)
    assert not set(splits_in[i].x) & set(splits_out[i].x)
    assert (splits_in[i].name, splits_out[i].name) == (f"env{i}_in", f"env{i}_out")
  again = imf.image_splits(envs, 0.2, trial_seed=3)[1]
  other = imf.image_splits(envs, 0.2, trial_seed=4)[1]
  np.testing.assert_array_equal(again[0].x, splits_out[0].x)
  assert any(not np.array_equal(a.x, b.x) for a, b in zip(other, splits_out))


# --------------------------------------------------------------------------- errors
def test_errors_name_the_path(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path / "PACS")):
    imf.image_dataset_environments("PACS", tmp_path)
  make_tree(tmp_path / "PACS", ["art_painting", "cartoon", "photo"], [f"c{i}" for i in range(7)], 1)
  with pytest.raises(
    DataError, match="missing environment folder.*" + str(tmp_path / "PACS" / "sketch")
  ):
    imf.image_dataset_environments("PACS", tmp_path)
  (tmp_path / "PACS" / "sketch").mkdir()
  with pytest.raises(DataError, match=str(tmp_path / "PACS" / "sketch") + " is empty"):
    imf.image_dataset_environments("PACS", tmp_path)
  (tmp_path / "PACS" / "sketch" / "c0").mkdir()
  with pytest.raises(
    DataError, match=f"class folder {tmp_path / 'PACS' / 'sketch' / 'c0'} holds no image"
  ):
    imf.image_dataset_environments("PACS", tmp_path)
  make_tree(tmp_path / "PACS", ["sketch"], [f"c{i}" for i in range(6)], 1)
  with pytest.raises(
    DataError, match=str(tmp_path / "PACS" / "sketch") + r" lacks class folder\(s\) c6"
  ):
    imf.image_dataset_environments("PACS", tmp_path)
  make_tree(tmp_path / "PACS", ["sketch"], ["c6"], 1)
  assert len(imf.image_dataset_environments("PACS", tmp_path)) == 4
  # a class present in one environment only
  make_tree(tmp_path / "PACS", ["photo"], ["extra"], 1)
  with pytest.raises(DataError, match=r"art_painting lacks class folder\(s\) extra"):
    imf.image_dataset_environments("PACS", tmp_path)
  with pytest.raises(DataError, match="does not exist"):
    imf.ImageFolderDomains(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="unknown image dataset"):
    imf.get_image_dataset("Pacs")


def test_unreadable_image_raises_naming_the_file(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"this is not a jpeg")
  with pytest.raises(pipe.ImageDecodeError, match=str(bad)):
    pipe.decode_eval(str(bad))
  with pytest.raises(pipe.ImageDecodeError, match=str(bad)):
    pipe.decode_train(str(bad), np.random.default_rng(0))
  # a truncated JPEG decodes as far as it goes (DomainBed sets LOAD_TRUNCATED_IMAGES)
  good = tmp_path / "good.jpg"
  write_jpeg(good, np.random.default_rng(0), (64, 64))
  (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:-200])
  assert pipe.decode_eval(str(tmp_path / "cut.jpg"), 16).shape == (16, 16, 3)
  with pytest.raises(pipe.ImageDecodeError, match="cut.jpg"):
    pipe.load_rgb(str(tmp_path / "cut.jpg"), allow_truncated=False)


@pytest.mark.parametrize("threads", [False, True])
def test_files_that_are_no_images_are_named_in_one_line(tmp_path, monkeypatch, threads):
  from dgjax.data import image_check

  if threads:
    monkeypatch.setattr(image_check, "_THREADS_ABOVE", 0)
  rng = np.random.default_rng(0)
  for i in range(3):
    write_jpeg(tmp_path / f"{i}.jpg", rng)
  Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(
    tmp_path / "png.jpg", format="PNG"
  )
  (tmp_path / "notes.jpg").write_text("not an image at all")
  (tmp_path / "empty.png").touch()
  good = [str(tmp_path / f"{i}.jpg") for i in range(3)] + [str(tmp_path / "png.jpg")]
  warnings = []
  image_check.check_image_files(good, warn=warnings.append)  # a PNG named .jpg decodes
  assert warnings == []
  with pytest.raises(DataError) as err:
    image_check.check_image_files(good + [str(tmp_path / "notes.jpg"), str(tmp_path / "empty.png")])
  assert str(err.value) == (
    f"2 of 6 image files are not images (their first bytes match no image format): "
    f"{tmp_path / 'notes.jpg'} (starts b'not an image'), {tmp_path / 'empty.png'} (starts b''); "
    "remove or replace them"
  )
  (tmp_path / "cut.jpg").write_bytes((tmp_path / "0.jpg").read_bytes()[:-100])
  image_check.check_image_files(good + [str(tmp_path / "cut.jpg")], warn=warnings.append)
  assert warnings == [
    f"warning: 1 image files end early (truncated; decoded as far as they go, "
    f"as DomainBed does): {tmp_path / 'cut.jpg'}"
  ]
  assert image_check.sniff(str(tmp_path / "png.jpg")).format == "png"


# --------------------------------------------------------------------------- host augmentation
def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  h, w = 300, 400
  boxes = np.array([pipe.random_resized_crop_box(h, w, rng) for _ in range(3000)])
  top, left, ch, cw = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
  scale = ch * cw / (h * w)
  assert scale.min() > 0.69 and scale.max() <= 1.0
  assert scale.min() < 0.72 and scale.max() > 0.97  # covers the range
  ratio = cw / ch
  assert ratio.min() > 0.74 and ratio.max() < 1.35
  # every try fails for a very elongated image: torchvision's central-crop fallback
  assert pipe.random_resized_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)
  assert pipe.random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)


def test_horizontal_flip_rate_and_determinism(tmp_path):
  ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (48, 1, 3))
  path = tmp_path / "ramp.png"
  Image.fromarray(ramp).save(path)
  flips = [pipe.decode_train(str(path), pipe.example_rng((1, 2), i), 16) for i in range(600)]
  flipped = np.array([f[:, 0].mean() > f[:, -1].mean() for f in flips])
  assert 0.44 < flipped.mean() < 0.56
  np.testing.assert_array_equal(
    pipe.decode_train(str(path), pipe.example_rng((1, 2), 5), 16), flips[5]
  )


# --------------------------------------------------------------------------- grain pipeline
@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("tree")
  make_tree(root, ["e0", "e1", "e2"], ["a", "b"], per_class=3, real=True)
  # e2 imbalanced: 1 image of class a, 3 of class b
  for k in (1, 2):
    (root / "e2" / "a" / f"img{k}.jpg").unlink()
  return root


def collect(it, n):
  it = iter(it)
  out = [next(it) for _ in range(n)]
  if hasattr(it, "close"):
    it.close()
  return out


def test_train_stream_is_a_function_of_key_and_step(jpeg_tree):
  envs = imf.ImageFolderDomains(jpeg_tree)
  key = jax.random.key(7)
  ref = collect(pipe.train_batches(envs, key, 4, size=16, num_workers=0), 3)
  assert ref[0]["x"].shape == (3, 4, 16, 16, 3) and ref[0]["x"].dtype == np.uint8
  assert ref[0]["y"].shape == (3, 4)
  par = collect(pipe.train_batches(envs, key, 4, size=16, num_workers=2), 3)
  resumed = collect(pipe.train_batches(envs, key, 4, size=16, num_workers=0, start_step=1), 2)
  other = collect(pipe.train_batches(envs, jax.random.key(8), 4, size=16, num_workers=0), 1)
  for a, b in zip(ref, par):
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])
  np.testing.assert_array_equal(resumed[0]["x"], ref[1]["x"])
  np.testing.assert_array_equal(resumed[1]["x"], ref[2]["x"])
  assert not np.array_equal(other[0]["x"], ref[0]["x"])


def test_train_sampler_is_uniform_with_replacement(jpeg_tree):
  envs = imf.ImageFolderDomains(jpeg_tree)
  batches = collect(
    pipe.train_batches(envs, jax.random.key(0), 16, size=8, augment=False, num_workers=0), 25
  )
  y = np.stack([b["y"] for b in batches])  # [steps, D, B]
  assert 0.65 < y[:, 2].mean() < 0.85  # e2: 3 of 4 images are class b (label 1)
  assert 0.4 < y[:, 0].mean() < 0.6
  # with replacement: a batch of 16 from 6 images repeats images
  x0 = batches[0]["x"][0].reshape(16, -1)
  assert len({row.tobytes() for row in x0}) <= 6
  # augment=False is DomainBed's Resize of the drawn image
  assert any(np.array_equal(batches[0]["x"][0, 0], pipe.decode_eval(p, 8)) for p in envs[0].x)


def test_eval_stream_order_padding_and_mask(jpeg_tree):
  envs = imf.ImageFolderDomains(jpeg_tree)
  batches = collect(pipe.eval_batches(envs[0], 4, size=16, num_workers=0), 2)
  x = np.concatenate([b["x"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 6 + [False] * 2)
  for i in range(6):
    np.testing.assert_array_equal(x[i], pipe.decode_eval(envs[0].x[i], 16))
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches])[:6], envs[0].y)


def test_worker_error_surfaces_naming_the_file(tmp_path):
  make_tree(tmp_path, ["e0", "e1"], ["a", "b"], per_class=2, real=True)
  bad = tmp_path / "e1" / "b" / "img1.jpg"
  bad.write_bytes(b"garbage")
  envs = imf.ImageFolderDomains(tmp_path)
  stream = pipe.train_batches(envs, jax.random.key(0), 8, size=16, num_workers=2)
  with pytest.raises(pipe.ImageDecodeError, match=str(bad)):
    with pipe.DevicePrefetch(stream, size=2) as batches:
      for _ in range(50):
        next(batches)


def test_device_prefetch_yields_device_arrays_in_order():
  batches = [{"x": np.full((2, 3), i, np.uint8)} for i in range(5)]
  with pipe.DevicePrefetch(batches, size=2) as it:
    got = list(it)
  assert [int(b["x"][0, 0]) for b in got] == list(range(5))
  assert isinstance(got[0]["x"], jax.Array)


# --------------------------------------------------------------------------- device augmentation
def _images(n, seed=0, size=8):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  )


def test_hue_and_hsv_match_colorsys():
  img = np.random.default_rng(1).uniform(size=(6, 6, 3)).astype(np.float32)
  img[0, 0] = img[0, 0, 0]  # a gray pixel
  for factor in (-0.3, 0.1, 0.25):
    got = np.asarray(augment.adjust_hue(jnp.asarray(img), factor))
    want = np.array(
      [
        [
          colorsys.hsv_to_rgb((h + factor) % 1.0, s, v)
          for h, s, v in (colorsys.rgb_to_hsv(*px) for px in row)
        ]
        for row in img
      ]
    )
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_jitter_ops_match_torchvision_formulas():
  img = np.random.default_rng(2).uniform(size=(5, 7, 3)).astype(np.float64)
  gray = img @ np.array([0.2989, 0.587, 0.114])
  np.testing.assert_allclose(
    augment.adjust_brightness(img, 1.2), np.clip(1.2 * img, 0, 1), atol=1e-6
  )
  np.testing.assert_allclose(
    augment.adjust_contrast(img, 0.8), np.clip(0.8 * img + 0.2 * gray.mean(), 0, 1), atol=1e-6
  )
  np.testing.assert_allclose(
    augment.adjust_saturation(img, 1.3),
    np.clip(1.3 * img + (-0.3) * gray[..., None], 0, 1),
    atol=1e-6,
  )
  x = _images(2)
  want = (np.asarray(x) / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
  np.testing.assert_allclose(augment.eval_preprocess(x), want, atol=1e-5)


def test_train_augment_deterministic_per_key_jittable_over_domain_axis():
  x = _images(6).reshape(2, 3, 8, 8, 3)
  f = jax.jit(augment.train_augment)
  a, b = f(jax.random.key(0), x), f(jax.random.key(0), x)
  c = f(jax.random.key(1), x)
  assert a.shape == (2, 3, 8, 8, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
  # vmappable over [D, B] with per-image keys
  keys = jax.random.split(jax.random.key(0), 6).reshape(2, 3)
  v = jax.jit(jax.vmap(jax.vmap(augment.train_augment_image)))(keys, x)
  assert v.shape == a.shape and np.isfinite(np.asarray(v)).all()


def test_grayscale_rate_and_jitter_factor_ranges():
  n = 2000
  x = _images(n, seed=3, size=4)
  out = jax.jit(augment.train_augment)(jax.random.key(5), x)
  img = np.asarray(out) * np.array(augment.IMAGENET_STD) + np.array(augment.IMAGENET_MEAN)
  gray = np.abs(img - img[..., :1]).max(axis=(1, 2, 3)) < 1e-5
  assert 0.08 < gray.mean() < 0.12  # RandomGrayscale(p=0.1)
  # brightness alone: output / input in [0.7, 1.3], spread over the range
  base = np.random.default_rng(0).uniform(0.2, 0.7, (n, 4, 4, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.key(9), n)
  bright = jax.jit(jax.vmap(lambda k, im: augment.color_jitter(k, im, 0.3, 0.0, 0.0, 0.0)))(
    keys, base
  )
  ratio = (np.asarray(bright) / base).mean(axis=(1, 2, 3))
  assert ratio.min() >= 0.7 - 1e-4 and ratio.max() <= 1.3 + 1e-4
  assert ratio.min() < 0.72 and ratio.max() > 1.28 and abs(ratio.mean() - 1.0) < 0.02
