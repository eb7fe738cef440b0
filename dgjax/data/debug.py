"""DomainBed's smoke-test datasets ``Debug28`` and ``Debug224``: random inputs, random labels.

DomainBed's ``Debug`` (``domainbed/datasets.py``): three environments ``0``, ``1``, ``2``, each
16 examples of ``torch.randn(16, *INPUT_SHAPE)`` with labels ``torch.randint(0, 2, (16,))``
(2 classes), no transform; ``INPUT_SHAPE`` is ``(3, 28, 28)`` for ``Debug28`` (in
``SMALL_IMAGES``; DomainBed's featurizer for 28x28 inputs is ``MNIST_CNN``) and
``(3, 224, 224)`` for ``Debug224`` (the ResNet). Its draws come from torch's global seed
(the run's ``--seed``); here from ``trial_seed`` (the seed of every dataset construction in
dgjax), by numpy: the same distribution, other numbers.

* ``Debug28`` (:func:`debug28_environments`): float32 ``[16, 28, 28, 3]`` N(0, 1) arrays in
  memory, trained as the MNIST datasets are.
* ``Debug224`` (:func:`debug224_environments`): goes through the image pipeline like every
  224x224 benchmark, so its images are uint8 RGB images (PNG bytes made on demand, nothing on
  disk): each pixel is ``round(255 * (mean_c + std_c * z))`` clipped to 0..255, ``z ~ N(0,
  1)`` and ``mean``, ``std`` ImageNet's, so that after the pipeline's ImageNet normalisation
  the ResNet sees ``z`` quantised and truncated (at about -2.1 / +2.2 standard deviations)
  where DomainBed's sees ``z``. No augmentation, as DomainBed's (its ``data_augmentation``
  hparam does nothing for the Debug datasets).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dgjax.data.image_folder import ImageEnvironment
from dgjax.data.image_pipeline import EncodedImage
from dgjax.data.rotated_mnist import LabeledEnvironment

__all__ = [
  "ENV_NAMES",
  "EXAMPLES",
  "NUM_CLASSES",
  "DebugImages",
  "debug28_environments",
  "debug224_environments",
  "environments",
]

ENV_NAMES = ("0", "1", "2")
EXAMPLES = 16  # per environment
NUM_CLASSES = 2
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _draws(seed: int, shape, examples: int):
  """Per environment ``(z [examples, *shape] float32 N(0, 1), y [examples] int32)``: one
  generator seeded by ``seed``, environment after environment, inputs then labels (as
  DomainBed's loop)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in ENV_NAMES:
    z = rng.standard_normal((examples, *shape), dtype=np.float32)
    out.append((z, rng.integers(0, NUM_CLASSES, examples).astype(np.int32)))
  return out


def debug28_environments(seed: int = 0, examples: int = EXAMPLES) -> list[LabeledEnvironment]:
  """``Debug28``: three environments of ``examples`` N(0, 1) inputs ``[28, 28, 3]`` and
  random binary labels."""
  return [
    LabeledEnvironment(name, z, y)
    for name, (z, y) in zip(ENV_NAMES, _draws(seed, (28, 28, 3), examples))
  ]


def to_pixels(z: np.ndarray) -> np.ndarray:
  """uint8 RGB pixels whose ImageNet normalisation is ``z`` (quantised, clipped)."""
  pixels = np.rint(255.0 * (_IMAGENET_MEAN + _IMAGENET_STD * z))
  return np.clip(pixels, 0, 255).astype(np.uint8)


class DebugImages:
  """Random-access PNG images of uint8 ``pixels [n, H, W, 3]``: item ``i`` an
  :class:`~dgjax.data.image_pipeline.EncodedImage`, an index array another
  :class:`DebugImages` (how the in/out splits select)."""

  def __init__(self, pixels: np.ndarray, name: str):
    self.pixels, self.name = pixels, name

  def __len__(self) -> int:
    return len(self.pixels)

  def __getitem__(self, i):
    if isinstance(i, (int, np.integer)):
      from PIL import Image

      buffer = io.BytesIO()
      Image.fromarray(self.pixels[i]).save(buffer, format="PNG", compress_level=1)
      return EncodedImage(buffer.getvalue(), f"{self.name}[{int(i)}]")
    return DebugImages(self.pixels[np.asarray(i)], self.name)


def debug224_environments(seed: int = 0, examples: int = EXAMPLES) -> list[ImageEnvironment]:
  """``Debug224``: three environments of ``examples`` random 224x224 images (see the module
  docstring) and random binary labels."""
  envs = []
  for name, (z, y) in zip(ENV_NAMES, _draws(seed, (224, 224, 3), examples)):
    envs.append(
      ImageEnvironment(
        name,
        Path("Debug224"),
        tuple(str(c) for c in range(NUM_CLASSES)),
        DebugImages(to_pixels(z), f"Debug224 environment {name}"),
        y,
      )
    )
  return envs


def environments(name: str, data_dir=None, trial_seed: int = 0) -> list[ImageEnvironment]:
  """The ``reader`` of :data:`dgjax.data.image_folder.IMAGE_DATASETS` (``Debug224``; no
  ``data_dir``)."""
  del data_dir
  if name != "Debug224":
    raise ValueError(f"the image pipeline's debug dataset is Debug224, not {name!r}")
  return debug224_environments(trial_seed)
