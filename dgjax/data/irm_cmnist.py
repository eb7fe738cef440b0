"""IRM-style Colored MNIST (Arjovsky et al., "Invariant Risk Minimization", 2019).

The "severe correlation shift" benchmark of IRM's ``code/colored_mnist/main.py``, reused by
Fishr (Rame et al., ICML 2022) and by the Hessian-alignment paper (Hemati et al., ICCV 2023):

1. take the MNIST *training* digits (60,000); the first 5/6 (50,000) are shuffled with a
   seeded permutation and split by interleaving into two training environments
   (``perm[0::2]``, ``perm[1::2]``); the last 1/6 (10,000) form the test environment;
2. images are subsampled 2x to 14x14;
3. the binary label is ``digit < 5``, flipped with probability 0.25;
4. the colour is the label, flipped with probability 0.2 (env 0), 0.1 (env 1), 0.9 (test);
5. the image has two channels, both copies of the digit; channel ``1 - colour`` is zeroed
   (input ``2 x 14 x 14``, flattened channel-major to 392 values in ``[0, 1]``);
6. the *gray* test set is the test digits with colour removed (both channels kept) and their
   own label noise: the scripts that report it (Fishr's, the Hessian paper's) build it by a
   second ``make_environment`` call on the same digits, which draws the label flips again.

With fewer digits than 60,000 (e.g. the 10,000 of ``mnist-first10k``) the proportions are kept:
the first ``round(5/6 N)`` digits train, the rest test.

Label-shift variant (``label_shift=p``, the Hessian paper's imbalanced Colored MNIST): env 0
gets a fraction ``p`` of the (shuffled) training digits ``< 5`` and ``1 - p`` of the others,
env 1 the rest. The published script indexes by the length of its boolean mask instead of the
count of selected digits, which puts *all* digits < 5 in env 0; we implement the stated
proportions.

Differences from the reference: randomness comes from numpy generators seeded by ``seed``
(the reference uses the global numpy/torch RNGs, drawing new data for every restart; so do we,
with one seed per restart).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from dgjax.data.idx import DataError

#: Colour-flip probabilities of the two training environments and of the test environment.
TRAIN_FLIPS = (0.2, 0.1)
TEST_FLIP = 0.9
LABEL_NOISE = 0.25
#: MNIST's training-set size and the part used for training (50,000 of 60,000).
MNIST_TRAIN_SIZE = 60000
TRAIN_FRACTION = 5 / 6


class IRMEnvironment(NamedTuple):
  """One environment: indices into :attr:`IRMColoredMNIST.images`, labels and colours."""

  name: str
  index: np.ndarray  # int32 [n]
  y: np.ndarray  # int32 [n], noisy (digit < 5)
  color: np.ndarray  # int32 [n], 0 keeps channel 0, 1 keeps channel 1
  digit: np.ndarray  # int32 [n], the MNIST class


class IRMColoredMNIST(NamedTuple):
  images: np.ndarray  # float32 [N, 196]: 14x14 grey digits in [0, 1]
  train: list[IRMEnvironment]
  test: IRMEnvironment
  gray: IRMEnvironment  # the test digits, own label noise, shown without colour
  num_digits: int  # N, digits used (<= 60,000)
  num_train_digits: int  # round(5/6 N)
  note: str  # human-readable description of the split


def downsample_images(images: np.ndarray) -> np.ndarray:
  """``uint8 [N, 28, 28]`` -> ``float32 [N, 196]``: 2x subsampling (``[:, ::2, ::2]``), / 255."""
  return (images[:, ::2, ::2].astype(np.float32) / np.float32(255.0)).reshape(len(images), -1)


def colorize(images: np.ndarray, env: IRMEnvironment, grayscale: bool = False) -> np.ndarray:
  """``float32 [n, 392]``: channel-major ``2 x 14 x 14``; channel ``color`` keeps the digit,
  the other is zero (both kept when ``grayscale``)."""
  grey = images[env.index]
  if grayscale:
    keep = np.ones((len(env.index), 2), np.float32)
  else:
    keep = (env.color[:, None] == np.arange(2)).astype(np.float32)
  return (keep[:, :, None] * grey[:, None, :]).reshape(len(env.index), -1)


def _environment(name, index, digits, flip, rng, label_noise) -> IRMEnvironment:
  n = len(index)
  d = digits[index].astype(np.int32)
  y = (d < 5).astype(np.int32) ^ (rng.random(n) < label_noise).astype(np.int32)
  color = y ^ (rng.random(n) < flip).astype(np.int32)
  return IRMEnvironment(name, index.astype(np.int32), y, color, d)


def irm_colored_mnist(
  images: np.ndarray,
  labels: np.ndarray,
  seed: int = 0,
  label_shift: Optional[float] = None,
  train_flips: Sequence[float] = TRAIN_FLIPS,
  test_flip: float = TEST_FLIP,
  label_noise: float = LABEL_NOISE,
) -> IRMColoredMNIST:
  """Builds the IRM-style Colored MNIST environments (see the module docstring).

  Args:
    images: ``uint8 [N, 28, 28]`` digits, MNIST's training digits first (as
      :func:`dgjax.data.load_mnist` returns them); only the first 60,000 are used.
    labels: ``[N]`` digit classes.
    seed: the permutation, label noise and colour flips all derive from it.
    label_shift: ``None`` (interleaved halves) or ``p`` in (0, 1): env 0 gets ``p`` of the
      digits < 5 and ``1 - p`` of the others.
    train_flips, test_flip, label_noise: the colour-flip and label-noise probabilities.

  Raises:
    DataError: fewer than 12 digits, or mismatched arrays.
  """
  if len(images) != len(labels):
    raise DataError(f"{len(images)} images but {len(labels)} labels")
  n = min(len(labels), MNIST_TRAIN_SIZE)
  if n < 12:
    raise DataError(f"IRM-style Colored MNIST needs at least 12 digits, got {n}")
  if len(train_flips) != 2:
    raise ValueError(f"two training environments expected, got flips {tuple(train_flips)}")
  if label_shift is not None and not 0.0 < label_shift < 1.0:
    raise ValueError(f"label_shift must be in (0, 1), got {label_shift}")
  digits = np.asarray(labels[:n])
  n_train = int(round(n * TRAIN_FRACTION))
  seq = np.random.SeedSequence(seed).spawn(5)
  perm = np.random.default_rng(seq[0]).permutation(n_train)
  if label_shift is None:
    parts = [perm[0::2], perm[1::2]]
  else:
    low, high = perm[digits[perm] < 5], perm[digits[perm] >= 5]
    k_low, k_high = int(round(label_shift * len(low))), int(round((1 - label_shift) * len(high)))
    parts = [
      np.concatenate([low[:k_low], high[:k_high]]),
      np.concatenate([low[k_low:], high[k_high:]]),
    ]
  train = [
    _environment(
      f"train{i} (flip {f})", idx, digits, f, np.random.default_rng(seq[i + 1]), label_noise
    )
    for i, (idx, f) in enumerate(zip(parts, train_flips))
  ]
  test = _environment(
    f"test (flip {test_flip})",
    np.arange(n_train, n),
    digits,
    test_flip,
    np.random.default_rng(seq[3]),
    label_noise,
  )
  gray = _environment(
    f"gray test (flip {test_flip}, colour removed)",
    np.arange(n_train, n),
    digits,
    test_flip,
    np.random.default_rng(seq[4]),
    label_noise,
  )
  if n == MNIST_TRAIN_SIZE:
    note = f"full MNIST training set: {n_train} train / {n - n_train} test digits"
  else:
    note = (
      f"{n} digits (fewer than MNIST's {MNIST_TRAIN_SIZE}): proportions kept, first 5/6 = "
      f"{n_train} train / last 1/6 = {n - n_train} test (the published setup: 50000 / 10000)"
    )
  if label_shift is not None:
    note += f"; label shift {label_shift}: env sizes {len(parts[0])} / {len(parts[1])}"
  return IRMColoredMNIST(
    downsample_images(np.asarray(images[:n])), train, test, gray, n, n_train, note
  )
