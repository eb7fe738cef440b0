"""Host input pipeline for the image benchmarks: grain workers decode, crop and flip; a thread
keeps batches on the device.

Where the per-example work runs (DomainBed's transforms, ``domainbed/datasets.py``):

=========================================  ===========================================
host (grain worker processes, PIL, uint8)  device (:mod:`dgjax.augment`, jnp, float32)
=========================================  ===========================================
JPEG decode + ``convert("RGB")``           ColorJitter(0.3, 0.3, 0.3, 0.3)
eval: ``Resize((224, 224))``               RandomGrayscale(p=0.1)
train: ``RandomResizedCrop(224, (0.7, 1))``  ImageNet mean/std normalisation
train: ``RandomHorizontalFlip()``
=========================================  ===========================================

The host part of the training transform differs between DomainBed's datasets
(:data:`TRAIN_TRANSFORMS`, the ``transform`` argument of :func:`decode_train`):
``"crop"`` is the table above (``MultipleEnvironmentImageFolder``: VLCS, PACS, ...);
``"resize_crop"`` first resizes to 224x224, then crops and flips (``WILDSDataset``: the
crop box is drawn on the resized image); ``"resize_flip"`` resizes and flips, no crop
(``SpawriousBenchmark``). The device part is the same for all three.

Decoding and resampling are irregular, per-image work that PIL does well on CPU cores; the
colour operations are dense elementwise maths on the fixed-size batch, cheap on an
accelerator, and they move 1 byte per pixel to the device instead of 4.

Training stream (:func:`train_batches`): per training environment an infinite sampler *with
replacement*, as DomainBed's ``InfiniteDataLoader`` (``RandomSampler(replacement=True)``):
slot ``b`` of domain ``d`` at step ``s`` draws its image index uniformly from
``range(len(env_d))``, independently of every other draw. Each step yields
``{"x": uint8[D, B, H, W, 3], "y": int32[D, B]}``.

Randomness: example ``(s, d, b)`` gets its own ``numpy`` generator seeded by
``SeedSequence([*key_data(key), s, d, b])``: it draws the image index, the crop and the flip.
So the same key gives the same batches whatever the number of workers, and step ``s`` can be
regenerated on its own (resuming at ``start_step`` continues the same stream).

Evaluation stream (:func:`eval_batches`): one pass over a split in order, fixed-size batches
(the last one padded by repeating the first example, with ``mask`` False on the padding) so
one jitted evaluation step serves every batch.

An image is a file path or an :class:`EncodedImage` (its encoded bytes and a name, e.g. a
TFDS record: :mod:`dgjax.data.tfds_images`); both go through the same decode, crop and flip.
An image that cannot be decoded raises :class:`ImageDecodeError` naming the file; raised in a
worker process, grain re-raises it in the consumer (the iterator raises; nothing hangs).
"""

from __future__ import annotations

import io
import math
import queue
import threading
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageFile

from dgjax.data.idx import DataError

if TYPE_CHECKING:  # imported where used: a slow import (~0.6 s) only image runs need
  import grain

__all__ = [
  "CROP_RATIO",
  "CROP_SCALE",
  "IMAGE_SIZE",
  "TRAIN_TRANSFORMS",
  "DevicePrefetch",
  "EncodedImage",
  "ImageDecodeError",
  "decode_eval",
  "decode_train",
  "eval_batches",
  "example_rng",
  "key_entropy",
  "load_rgb",
  "random_resized_crop_box",
  "train_batches",
]

#: DomainBed's image side (``transforms.Resize((224, 224))`` / ``RandomResizedCrop(224)``).
IMAGE_SIZE = 224
#: ``RandomResizedCrop(224, scale=(0.7, 1.0))``: the crop's area fraction.
CROP_SCALE = (0.7, 1.0)
#: torchvision's default aspect-ratio range of ``RandomResizedCrop``.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: The host part of DomainBed's training transforms (see the module docstring): ``crop``
#: (image folders), ``resize_crop`` (WILDS), ``resize_flip`` (Spawrious).
TRAIN_TRANSFORMS = ("crop", "resize_crop", "resize_flip")


class ImageDecodeError(DataError):
  """An image file cannot be opened or decoded; the message names the file."""


class EncodedImage(NamedTuple):
  """An image given as its encoded bytes (JPEG, PNG, ...) instead of a path; ``name`` says
  where it came from in error messages."""

  data: bytes
  name: str


# --------------------------------------------------------------------------- randomness
def key_entropy(key) -> tuple[int, ...]:
  """The uint32 words of a JAX PRNG key (typed ``jax.random.key`` or raw ``uint32[2]``)."""
  import jax  # local: workers only need the resulting ints

  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = np.asarray(key).astype(np.uint32).ravel()
  return tuple(int(w) for w in words)


def example_rng(entropy: Sequence[int], *index: int) -> np.random.Generator:
  """``numpy`` generator of one example: ``SeedSequence([*entropy, *index])``."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([*entropy, *index])))


# --------------------------------------------------------------------------- decoding
def load_rgb(path: str | EncodedImage, allow_truncated: bool = True) -> Image.Image:
  """The image at ``path`` (or the :class:`EncodedImage`) as RGB (torchvision's
  ``ImageFolder`` loader).

  ``allow_truncated`` decodes a truncated JPEG as far as it goes (DomainBed sets PIL's
  ``ImageFile.LOAD_TRUNCATED_IMAGES = True``). Any failure raises
  :class:`ImageDecodeError` naming ``path``.
  """
  name = path.name if isinstance(path, EncodedImage) else path

  def open_image():
    return Image.open(io.BytesIO(path.data) if isinstance(path, EncodedImage) else path)

  try:
    try:
      with open_image() as image:
        return image.convert("RGB")
    except OSError as e:
      if not (allow_truncated and "truncated" in str(e)):
        raise
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
      with open_image() as image:
        return image.convert("RGB")
    finally:
      ImageFile.LOAD_TRUNCATED_IMAGES = previous
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None


def random_resized_crop_box(
  height: int, width: int, rng: np.random.Generator, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of the crop.

  Up to 10 tries: area fraction ``~ U(scale)``, log aspect ratio ``~ U(log ratio)``,
  ``w = round(sqrt(area * ar))``, ``h = round(sqrt(area / ar))``; the first that fits is
  placed uniformly. Otherwise the central crop with the aspect ratio clipped to ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def decode_eval(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
  """DomainBed's evaluation input: ``Resize((size, size))`` (PIL bilinear), uint8 HWC."""
  image = load_rgb(path).resize((size, size), Image.BILINEAR)
  return np.asarray(image, dtype=np.uint8)


def decode_train(
  path: str,
  rng: np.random.Generator,
  size: int = IMAGE_SIZE,
  scale=CROP_SCALE,
  transform: str = "crop",
) -> np.ndarray:
  """DomainBed's host-side training transform ``transform`` (:data:`TRAIN_TRANSFORMS`),
  uint8 HWC.

  ``"crop"``: ``RandomResizedCrop(size, scale)`` then ``RandomHorizontalFlip()``: crop box
  from :func:`random_resized_crop_box`, ``crop`` then bilinear ``resize`` (PIL, as
  torchvision on PIL images), then a left-right flip with probability 1/2, all drawn from
  ``rng``. ``"resize_crop"``: the same after ``Resize((size, size))`` (the box is drawn on
  the resized image). ``"resize_flip"``: ``Resize((size, size))`` and the flip.
  """
  if transform not in TRAIN_TRANSFORMS:
    raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRAIN_TRANSFORMS)}")
  image = load_rgb(path)
  if transform != "crop":
    image = image.resize((size, size), Image.BILINEAR)
  if transform != "resize_flip":
    top, left, h, w = random_resized_crop_box(image.height, image.width, rng, scale)
    image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(image, dtype=np.uint8)


# --------------------------------------------------------------------------- grain streams
def _images(x):
  """Paths as a str array; any other random-access sequence of images (item ``j`` a path or
  an :class:`EncodedImage`, e.g. :class:`dgjax.data.tfds_images.TfdsImages`) as it is."""
  return np.asarray(x, dtype=str) if isinstance(x, (list, tuple, np.ndarray)) else x


def _image(images, j: int):
  image = images[j]
  return image if isinstance(image, EncodedImage) else str(image)


class _TrainExample:
  """Flat example index ``i = (s * D + d) * B + b`` -> one augmented (or resized) example."""

  def __init__(self, paths, labels, batch_size, entropy, size, augment, transform="crop"):
    self.paths = [_images(p) for p in paths]
    self.labels = [np.asarray(y, dtype=np.int32) for y in labels]
    self.batch_size = batch_size
    self.entropy = tuple(entropy)
    self.size = size
    self.augment = augment
    self.transform = transform

  def __call__(self, i: int):
    i = int(i)
    num_domains = len(self.paths)
    step, rest = divmod(i, num_domains * self.batch_size)
    domain, slot = divmod(rest, self.batch_size)
    rng = example_rng(self.entropy, step, domain, slot)
    j = int(rng.integers(0, len(self.labels[domain])))
    path = _image(self.paths[domain], j)
    if self.augment:
      x = decode_train(path, rng, self.size, transform=self.transform)
    else:
      x = decode_eval(path, self.size)
    return {"x": x, "y": self.labels[domain][j]}


class _DomainAxis:
  def __init__(self, num_domains):
    self.num_domains = num_domains

  def __call__(self, batch):
    return {k: v.reshape(self.num_domains, -1, *v.shape[1:]) for k, v in batch.items()}


class _EvalExample:
  def __init__(self, paths, labels, size):
    self.paths = _images(paths)
    self.labels = np.asarray(labels, dtype=np.int32)
    self.size = size

  def __call__(self, i: int):
    i = int(i)
    n = len(self.labels)
    j = i if i < n else 0
    return {
      "x": decode_eval(_image(self.paths, j), self.size),
      "y": self.labels[j],
      "mask": np.bool_(i < n),
    }


def _workers(
  dataset: grain.MapDataset, num_workers: int, buffer: int, read_threads: int
) -> grain.IterDataset:
  import grain  # a slow import (~0.6 s): only where images stream

  # grain reads absl flags in its worker machinery; a program without absl.app has not parsed
  # them (grain then raises UnparsedFlagAccessError): accept the defaults.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  it = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer)
  )
  if num_workers > 0:
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer)
    )
  return it


def train_batches(
  envs: Sequence[Any],
  key,
  batch_size: int,
  *,
  augment: bool = True,
  transform: str = "crop",
  start_step: int = 0,
  num_steps: int | None = None,
  size: int = IMAGE_SIZE,
  num_workers: int = 2,
  worker_buffer: int = 2,
  read_threads: int = 1,
) -> grain.IterDataset:
  """Per-step training batches ``{"x": uint8[D, B, size, size, 3], "y": int32[D, B]}``.

  ``envs``: the training environments (or their in-splits), each with ``x`` (image paths,
  or a random-access sequence of :class:`EncodedImage`) and ``y`` (labels). Domain ``d``
  of every step samples ``batch_size`` examples of ``envs[d]`` uniformly with replacement
  (DomainBed's ``InfiniteDataLoader``); ``augment`` applies the dataset's training
  ``transform`` (:func:`decode_train`; DomainBed's ``data_augmentation``), otherwise
  ``Resize``. All draws come from ``key`` (see the module docstring): the stream
  is a function of ``(key, step)`` only. Steps ``start_step, start_step + 1, ...``;
  infinite unless ``num_steps`` is given.

  ``num_workers`` grain worker processes (0: in this process) each build whole batches;
  ``read_threads`` threads per worker decode the examples of a batch.
  """
  import grain  # a slow import (~0.6 s): only where images stream

  if not envs:
    raise ValueError("train_batches needs at least one environment")
  if transform not in TRAIN_TRANSFORMS:
    raise ValueError(f"unknown transform {transform!r}; valid: {', '.join(TRAIN_TRANSFORMS)}")
  for i, env in enumerate(envs):
    if len(env.y) == 0:
      raise DataError(f"training environment {i} ({getattr(env, 'name', '?')}) is empty")
  per_step = len(envs) * batch_size
  stop = None if num_steps is None else start_step + num_steps
  first = start_step * per_step
  last = 2**62 if stop is None else stop * per_step
  example = _TrainExample(
    [e.x for e in envs],
    [e.y for e in envs],
    batch_size,
    key_entropy(key),
    size,
    augment,
    transform,
  )
  ds = (
    grain.MapDataset.range(first, last)
    .map(example)
    .batch(per_step, drop_remainder=True)
    .map(_DomainAxis(len(envs)))
  )
  return _workers(ds, num_workers, worker_buffer, read_threads)


def eval_batches(
  split: Any,
  batch_size: int,
  *,
  size: int = IMAGE_SIZE,
  num_workers: int = 2,
  worker_buffer: int = 2,
  read_threads: int = 1,
) -> grain.IterDataset:
  """One ordered pass over ``split`` (``x`` paths, ``y`` labels) in batches of
  ``batch_size``: ``{"x": uint8[B, size, size, 3], "y": int32[B], "mask": bool[B]}``; the
  last batch is padded with ``mask`` False."""
  import grain  # a slow import (~0.6 s): only where images stream

  n = len(split.y)
  if n == 0:
    raise DataError(f"split {getattr(split, 'name', '?')} is empty")
  padded = -(-n // batch_size) * batch_size
  ds = grain.MapDataset.range(padded).map(_EvalExample(split.x, split.y, size)).batch(batch_size)
  return _workers(ds, num_workers, worker_buffer, read_threads)


# --------------------------------------------------------------------------- device prefetch
_END = object()


class DevicePrefetch:
  """Iterate ``batches`` with ``size`` of them already transferred to the device.

  A background thread pulls from the host iterator and calls ``jax.device_put(batch,
  sharding)`` (asynchronous), keeping up to ``size`` device batches queued, so a step
  finds its input ready whenever the host keeps up. An exception of the host iterator
  (e.g. :class:`ImageDecodeError` from a worker) is re-raised by ``next``.
  Use as a context manager (or call :meth:`close`) to stop the thread early.
  """

  def __init__(self, batches, size: int = 2, sharding=None):
    import jax

    self._put = lambda b: jax.device_put(b, sharding) if sharding is not None else jax.device_put(b)
    self._source = iter(batches)
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True, name="DevicePrefetch")
    self._thread.start()

  def _offer(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for batch in self._source:
        if not self._offer(("ok", self._put(batch))):
          return
      self._offer(("end", _END))
    except BaseException as e:  # forwarded to the consumer
      self._offer(("error", e))

  def __iter__(self) -> Iterator:
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    kind, value = self._queue.get()
    if kind == "ok":
      return value
    self._stop.set()
    if kind == "error":
      raise value
    raise StopIteration

  def close(self):
    """Stops the thread, then closes the host iterator (grain: shuts its workers down)."""
    self._stop.set()
    self._thread.join(timeout=5)
    close = getattr(self._source, "close", None)
    if close is not None and not self._thread.is_alive():
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
