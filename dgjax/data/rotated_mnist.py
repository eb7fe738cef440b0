"""Rotated MNIST environments, as built by DomainBed.

Rotated MNIST (Ghifary et al., "Domain Generalization for Object Recognition with Multi-task
Autoencoders", ICCV 2015) in DomainBed's version (Gulrajani & Lopez-Paz, ICLR 2021;
``domainbed/datasets.py``: ``MultipleEnvironmentMNIST`` and ``RotatedMNIST.rotate_dataset``):

1. pool the MNIST train and test digits and shuffle them with a seeded permutation;
2. environment ``i`` of 6 takes every 6th example starting at ``i``;
3. environment ``i`` rotates its digits by ``0, 15, 30, 45, 60, 75`` degrees counter-clockwise
   about the image centre, bilinear interpolation, zero fill, same 28x28 canvas
   (torchvision's ``rotate`` on a PIL image);
4. the label is the digit (10 classes); pixels are scaled to ``[0, 1]``.

Differences from DomainBed: NHWC layout (``x`` is ``[n, 28, 28, 1]``); the shuffle draws
come from numpy generators derived from ``seed`` (the same permutation as
:func:`dgjax.data.environment_indices`); the rotation is computed here with numpy (PIL's
affine bilinear sampling, rounded to 8 bits as PIL stores it), no PIL/torchvision needed.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import numpy as np

from dgjax.data.colored_mnist import environment_indices
from dgjax.data.idx import DataError

__all__ = ["ANGLES", "LabeledEnvironment", "rotate_images", "rotated_mnist"]

#: DomainBed's rotation angles (degrees), one per environment.
ANGLES = (0, 15, 30, 45, 60, 75)


class LabeledEnvironment(NamedTuple):
  """One environment: ``name``, inputs ``x`` (float32) and labels ``y`` (int32 ``[n]``)."""

  name: str
  x: np.ndarray
  y: np.ndarray


def rotate_images(images: np.ndarray, angle: float) -> np.ndarray:
  """Rotates ``[n, H, W]`` images by ``angle`` degrees counter-clockwise about their centre.

  PIL's ``Image.rotate(angle, BILINEAR, fillcolor=0)``: output pixel centre ``(u, v)``
  (relative to the image centre, ``v`` down) samples the input at
  ``(u cos a - v sin a, u sin a + v cos a)`` bilinearly; samples outside the image are 0,
  neighbours past the border are clamped. Values keep the input's range (uint8 input gives
  uint8 output, rounded).
  """
  images = np.asarray(images)
  n, h, w = images.shape
  a = np.deg2rad(angle)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  v, u = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
  sx = np.cos(a) * u - np.sin(a) * v + cx
  sy = np.sin(a) * u + np.cos(a) * v + cy
  inside = (sx >= -0.5) & (sx < w - 0.5) & (sy >= -0.5) & (sy < h - 0.5)
  x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
  dx, dy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
  xa, xb = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
  ya, yb = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
  img = images.astype(np.float32)
  top = img[:, ya, xa] * (1 - dx) + img[:, ya, xb] * dx
  bottom = img[:, yb, xa] * (1 - dx) + img[:, yb, xb] * dx
  out = (top * (1 - dy) + bottom * dy) * inside
  if np.issubdtype(images.dtype, np.integer):
    info = np.iinfo(images.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(images.dtype)
  return out.astype(images.dtype)


def rotated_mnist(
  images: np.ndarray, labels: np.ndarray, seed: int = 0, angles: Sequence[float] = ANGLES
) -> List[LabeledEnvironment]:
  """Builds DomainBed's Rotated MNIST environments from pooled MNIST digits.

  Args:
    images: ``uint8 [N, 28, 28]`` digits (e.g. :func:`dgjax.data.load_mnist`).
    labels: ``[N]`` digit classes 0..9.
    seed: the shuffle's seed; environment ``i`` holds the examples
      ``environment_indices(N, len(angles), seed)[i]``.
    angles: rotation (degrees) of each environment.

  Returns:
    One :class:`LabeledEnvironment` per angle, named ``"0"``, ``"15"``, ... (DomainBed's
    names), ``x`` float32 ``[n, 28, 28, 1]`` in ``[0, 1]``, ``y`` int32 ``[n]``.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise DataError(
      "rotated_mnist: expected images [N, H, W] and labels [N], found "
      f"images {images.shape} and labels {labels.shape}"
    )
  envs = []
  for idx, angle in zip(environment_indices(len(labels), len(angles), seed), angles):
    rotated = rotate_images(images[idx].astype(np.uint8), angle)
    x = (rotated.astype(np.float32) / np.float32(255.0))[..., None]
    envs.append(LabeledEnvironment(name=f"{angle:g}", x=x, y=labels[idx].astype(np.int32)))
  return envs
