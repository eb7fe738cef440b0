"""Colored MNIST environments, as built by DomainBed.

Colored MNIST was introduced by Arjovsky, Bottou, Gulrajani & Lopez-Paz,
"Invariant Risk Minimization", 2019. This module follows the variant of
DomainBed (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021; ``domainbed/datasets.py``: ``MultipleEnvironmentMNIST`` and
``ColoredMNIST.color_dataset``):

1. pool the MNIST train and test digits and shuffle them with a seeded
   permutation;
2. environment ``i`` of ``E`` takes every ``E``-th example starting at ``i``;
3. the binary label is ``digit < 5``, flipped with probability 0.25;
4. the colour is the label, flipped with probability ``e`` (the environment's
   parameter: 0.1, 0.2, 0.9 -> "+90%", "+80%", "-90%", i.e. how strongly the
   colour agrees with the label);
5. the image gets two channels, both copies of the digit, and channel
   ``1 - colour`` is zeroed: colour 0 keeps channel 0 ("red"), colour 1 keeps
   channel 1 ("green"); pixels are scaled to ``[0, 1]``.

Differences from DomainBed:

* Layout is NHWC (flax convention): ``x`` has shape ``[n, 28, 28, 2]``,
  DomainBed's ``(2, 28, 28)`` input in channels-last order.
* Randomness comes from numpy generators derived from ``seed`` (DomainBed
  uses the global torch RNG), so the exact draws differ; the distribution is
  the same.
* ``downsample=True`` subsamples the digits 2x to 14x14 (``[:, ::2, ::2]``)
  before colouring, as Arjovsky et al.'s IRM reference code does. DomainBed's
  ``color_dataset`` carries the same line (commented out in its current
  version, which builds 28x28 images matching its declared input shape
  ``(2, 28, 28)``). The default here is ``False`` (28x28).
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

from dgjax.data.idx import DataError
from dgjax.seeding import seed_hash

__all__ = [
  "Environment",
  "ENVIRONMENTS",
  "ENVIRONMENT_NAMES",
  "LABEL_NOISE",
  "colored_mnist",
  "color_digits",
  "environment_indices",
  "environment_name",
  "env_split_seed",
  "split_in_out",
]

#: DomainBed's colour-flip probabilities, one per environment.
ENVIRONMENTS = (0.1, 0.2, 0.9)
#: DomainBed's names for :data:`ENVIRONMENTS`.
ENVIRONMENT_NAMES = ("+90%", "+80%", "-90%")
#: Probability that the binary label disagrees with ``digit < 5``.
LABEL_NOISE = 0.25


class Environment(NamedTuple):
  """One Colored MNIST environment.

  Attributes:
    name: e.g. ``"+90%"`` (colour agrees with the label 90% of the time).
    x: ``float32 [n, H, W, 2]`` images in ``[0, 1]`` (NHWC; H = W = 28, or
      14 when downsampled). Channel ``color`` holds the digit, the other
      channel is zero.
    y: ``int32 [n]`` binary labels (noisy ``digit < 5``).
    color: ``int32 [n]`` colour of each image (0 = red/channel 0,
      1 = green/channel 1).
  """

  name: str
  x: np.ndarray
  y: np.ndarray
  color: np.ndarray


def environment_name(e: float) -> str:
  """DomainBed-style name of a colour-flip probability: 0.1 -> "+90%"."""
  return f"{'+' if e < 0.5 else '-'}{round(100 * max(e, 1 - e))}%"


def _seed_sequences(seed: int, num_environments: int) -> List[np.random.SeedSequence]:
  # Child 0 drives the shuffle, child i + 1 the draws of environment i.
  return np.random.SeedSequence(seed).spawn(num_environments + 1)


def environment_indices(n: int, num_environments: int, seed: int = 0) -> List[np.ndarray]:
  """Indices into the pooled dataset of each environment's examples.

  A seeded permutation of ``range(n)``, split by interleaving: environment
  ``i`` gets ``perm[i::num_environments]`` (DomainBed's
  ``MultipleEnvironmentMNIST``). Sizes differ by at most one.
  :func:`colored_mnist` uses exactly these indices for the same ``seed``.
  """
  if num_environments < 1:
    raise ValueError(f"num_environments must be >= 1, got {num_environments}")
  rng = np.random.default_rng(_seed_sequences(seed, num_environments)[0])
  perm = rng.permutation(n)
  return [perm[i::num_environments] for i in range(num_environments)]


def color_digits(
  images: np.ndarray,
  digits: np.ndarray,
  e: float,
  rng: np.random.Generator,
  label_noise: float = LABEL_NOISE,
):
  """Colours one environment's digits (DomainBed's ``color_dataset``).

  Args:
    images: ``[n, H, W]`` grey digits with values in 0..255.
    digits: ``[n]`` digit classes 0..9.
    e: probability of flipping the colour away from the label.
    rng: source of the label-noise and colour-flip draws (in that order).
    label_noise: probability of flipping the binary label.

  Returns:
    ``(x, y, color)``: ``float32 [n, H, W, 2]`` in ``[0, 1]``,
    ``int32 [n]``, ``int32 [n]``.
  """
  n = digits.shape[0]
  y = (digits < 5).astype(np.int32) ^ (rng.random(n) < label_noise).astype(np.int32)
  color = y ^ (rng.random(n) < e).astype(np.int32)
  grey = images.astype(np.float32) / np.float32(255.0)
  keep = (color[:, None] == np.arange(2)).astype(np.float32)  # [n, 2] one-hot
  x = grey[..., None] * keep[:, None, None, :]
  return x, y, color


def colored_mnist(
  images: np.ndarray,
  labels: np.ndarray,
  seed: int = 0,
  environments: Sequence[float] = ENVIRONMENTS,
  downsample: bool = False,
  label_noise: float = LABEL_NOISE,
) -> List[Environment]:
  """Builds the Colored MNIST environments from pooled MNIST digits.

  See the module docstring for the construction (DomainBed, Gulrajani &
  Lopez-Paz 2021; Arjovsky et al. 2019) and how it differs from DomainBed.

  Args:
    images: ``uint8 [N, 28, 28]`` digits (MNIST train + test pooled, as
      returned by :func:`dgjax.data.load_mnist`).
    labels: ``[N]`` digit classes 0..9.
    seed: all randomness (shuffle, label noise, colour flips) derives from
      it; the same seed gives identical arrays.
    environments: colour-flip probability of each environment.
    downsample: subsample the digits 2x to 14x14 first.
    label_noise: probability of flipping the binary label.

  Returns:
    One :class:`Environment` per entry of ``environments``; the indices of
    their examples in the input are ``environment_indices(N, len(environments),
    seed)``.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise DataError(
      "colored_mnist: expected images [N, H, W] and labels [N], found "
      f"images {images.shape} and labels {labels.shape}"
    )
  if downsample:
    images = images[:, ::2, ::2]
  num_envs = len(environments)
  seeds = _seed_sequences(seed, num_envs)
  envs = []
  for i, (idx, e) in enumerate(zip(environment_indices(len(labels), num_envs, seed), environments)):
    rng = np.random.default_rng(seeds[i + 1])
    x, y, color = color_digits(images[idx], labels[idx], e, rng, label_noise)
    envs.append(Environment(name=environment_name(e), x=x, y=y, color=color))
  return envs


def split_in_out(
  n: int, holdout_fraction: float = 0.2, seed: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
  """Splits ``range(n)`` into in-split and out-split (held-out) indices.

  DomainBed's ``misc.split_dataset``: a permutation of ``range(n)`` drawn
  with ``np.random.RandomState(seed)`` (the same draws as DomainBed's
  ``RandomState(seed).shuffle``); the first ``int(n * holdout_fraction)``
  indices form the out-split (validation / held-out evaluation) and the rest
  the in-split (training).

  Returns:
    ``(in_idx, out_idx)``, disjoint ``int64`` arrays covering ``range(n)``.
  """
  if not 0.0 <= holdout_fraction <= 1.0:
    raise ValueError(f"holdout_fraction must be in [0, 1], got {holdout_fraction}")
  perm = np.random.RandomState(seed).permutation(n).astype(np.int64)
  n_out = int(n * holdout_fraction)
  return perm[n_out:], perm[:n_out]


def env_split_seed(trial_seed: int, env_index: int) -> int:
  """Seed of environment ``env_index``'s in/out split for a trial.

  DomainBed's ``misc.seed_hash(trial_seed, env_i)``: the md5 of
  ``str((trial_seed, env_index))`` reduced modulo ``2**31``; stable across
  runs, machines and Python versions (unlike ``hash``).
  """
  return seed_hash(int(trial_seed), int(env_index))
