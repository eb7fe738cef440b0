"""On-device colour augmentation and normalisation of DomainBed's image benchmarks (jnp).

DomainBed's training transform (``domainbed/datasets.py``, Gulrajani & Lopez-Paz, ICLR 2021)
ends with ``ColorJitter(0.3, 0.3, 0.3, 0.3)``, ``RandomGrayscale()`` (p = 0.1),
``ToTensor()`` and ``Normalize(ImageNet mean, std)``; evaluation only normalises. The crop and
flip run on the host (:mod:`dgjax.data.image_pipeline`); this module takes the uint8 batch on
the device and does the rest, from explicit keys, jittable and vmappable.

``color_jitter`` follows torchvision's ``ColorJitter`` on tensors
(``torchvision.transforms.functional``, float images in ``[0, 1]``):

* factors ``b, c, s ~ U[max(0, 1 - 0.3), 1 + 0.3]``, ``h ~ U[-0.3, 0.3]``, and the order of
  the four operations is a uniformly random permutation (``torch.randperm(4)``);
* brightness ``clip(b * x)``; contrast ``clip(c * x + (1 - c) * mean(gray(x)))`` with the
  mean over the whole image; saturation ``clip(s * x + (1 - s) * gray(x))``; hue: RGB -> HSV,
  ``H <- (H + h) mod 1``, HSV -> RGB; ``gray = 0.2989 R + 0.587 G + 0.114 B``.

Difference from DomainBed: DomainBed jitters *PIL* images, where every operation rounds to
uint8 (and contrast uses the rounded integer mean of PIL's ``L`` image, hue shifts PIL's
8-bit HSV). Here the four operations stay in float32 and one rounding-free result is
normalised: per pixel the two differ by at most a few 1/255 steps; the distribution of
factors, the order and the grayscale probability are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "adjust_brightness",
  "adjust_contrast",
  "adjust_hue",
  "adjust_saturation",
  "color_jitter",
  "eval_preprocess",
  "hsv_to_rgb",
  "normalize",
  "random_grayscale",
  "rgb_to_grayscale",
  "rgb_to_hsv",
  "train_augment",
  "train_augment_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def rgb_to_grayscale(img):
  """``[..., 3] -> [..., 1]``: ``0.2989 R + 0.587 G + 0.114 B`` (torchvision)."""
  return img[..., 0:1] * _GRAY[0] + img[..., 1:2] * _GRAY[1] + img[..., 2:3] * _GRAY[2]


def _blend(img, other, factor):
  return jnp.clip(factor * img + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(img, factor):
  """``clip(factor * img)`` (blend with black)."""
  return jnp.clip(img * factor, 0.0, 1.0)


def adjust_contrast(img, factor):
  """Blend with the image's mean gray level (one scalar per image ``[H, W, 3]``)."""
  mean = jnp.mean(rgb_to_grayscale(img), axis=(-3, -2, -1), keepdims=True)
  return _blend(img, mean, factor)


def adjust_saturation(img, factor):
  """Blend with the image's grayscale version."""
  return _blend(img, rgb_to_grayscale(img), factor)


def rgb_to_hsv(img):
  """``[..., 3]`` RGB in ``[0, 1]`` -> ``(h, s, v)``, each ``[...]``, ``h`` in ``[0, 1)``."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  v = jnp.max(img, axis=-1)
  c = v - jnp.min(img, axis=-1)
  gray = c == 0
  s = c / jnp.where(gray, 1.0, v)
  safe_c = jnp.where(gray, 1.0, c)
  rc, gc, bc = (v - r) / safe_c, (v - g) / safe_c, (v - b) / safe_c
  h = jnp.where(v == r, bc - gc, jnp.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(gray, 0.0, h)
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  return h, s, v


def hsv_to_rgb(h, s, v):
  """Inverse of :func:`rgb_to_hsv`: ``[...]`` each -> ``[..., 3]``."""
  h6 = h * 6.0
  i = jnp.floor(h6)
  f = h6 - i
  i = jnp.mod(i, 6).astype(jnp.int32)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  # sector i: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(img, factor):
  """Rotate the hue by ``factor`` (a fraction of the colour circle, in ``[-0.5, 0.5]``)."""
  h, s, v = rgb_to_hsv(img)
  return hsv_to_rgb(jnp.mod(h + factor, 1.0), s, v)


def color_jitter(
  key,
  img,
  brightness: float = 0.3,
  contrast: float = 0.3,
  saturation: float = 0.3,
  hue: float = 0.3,
):
  """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on one float image
  ``[H, W, 3]`` in ``[0, 1]``: random factors, operations in a random order (module doc)."""
  k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  order = jax.random.permutation(k_order, 4)
  b = jax.random.uniform(k_b, (), minval=max(0.0, 1 - brightness), maxval=1 + brightness)
  c = jax.random.uniform(k_c, (), minval=max(0.0, 1 - contrast), maxval=1 + contrast)
  s = jax.random.uniform(k_s, (), minval=max(0.0, 1 - saturation), maxval=1 + saturation)
  h = jax.random.uniform(k_h, (), minval=-hue, maxval=hue)
  ops = (
    lambda x: adjust_brightness(x, b),
    lambda x: adjust_contrast(x, c),
    lambda x: adjust_saturation(x, s),
    lambda x: adjust_hue(x, h),
  )
  for k in range(4):
    img = jax.lax.switch(order[k], ops, img)
  return img


def random_grayscale(key, img, p: float = 0.1):
  """``RandomGrayscale(p)``: with probability ``p`` the 3-channel grayscale image."""
  gray = jnp.broadcast_to(rgb_to_grayscale(img), img.shape)
  return jnp.where(jax.random.bernoulli(key, p), gray, img)


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """``(img - mean) / std`` per channel (``transforms.Normalize``)."""
  return (img - jnp.asarray(mean, img.dtype)) / jnp.asarray(std, img.dtype)


def eval_preprocess(x, dtype=jnp.float32):
  """DomainBed's evaluation input from uint8 ``[..., H, W, 3]``: ``/255`` then normalise."""
  return normalize(x.astype(jnp.float32) / 255.0).astype(dtype)


def train_augment_image(key, x, grayscale_p: float = 0.1, jitter: float = 0.3, dtype=jnp.float32):
  """One uint8 ``[H, W, 3]`` image: ColorJitter, RandomGrayscale, normalise (DomainBed's
  order; crop and flip were done on the host)."""
  k_jitter, k_gray = jax.random.split(key)
  img = x.astype(jnp.float32) / 255.0
  img = color_jitter(k_jitter, img, jitter, jitter, jitter, jitter)
  img = random_grayscale(k_gray, img, grayscale_p)
  return normalize(img).astype(dtype)


def train_augment(key, x, grayscale_p: float = 0.1, jitter: float = 0.3, dtype=jnp.float32):
  """:func:`train_augment_image` over every image of uint8 ``x[..., H, W, 3]`` (e.g. the
  ``[D, B, H, W, 3]`` step batch), one independent key per image from ``key``."""
  lead = x.shape[:-3]
  flat = x.reshape((-1,) + x.shape[-3:])
  keys = jax.random.split(key, flat.shape[0])
  out = jax.vmap(lambda k, im: train_augment_image(k, im, grayscale_p, jitter, dtype))(keys, flat)
  return out.reshape(lead + out.shape[1:])
