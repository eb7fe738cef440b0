"""Synthetic Spirals: the AND-mask paper's memorisation benchmark (no download).

Parascandolo, Neitz, Orvieto, Gresele & Schölkopf, "Learning explanations that are hard to
vary", ICLR 2021, Section 4.1 (reference code: ``and_mask/datasets/synthetic``). Every
example has ``2 + n_dims`` inputs:

* the **mechanism** (shared by all environments): a point on one of two interleaved spirals,
  radius ``r ~ U(0.08, 1)``, angle ``2 pi n_revolutions r + pi y`` for the binary label
  ``y ~ U{0, 1}``, radius jittered by ``U(-0.02, 0.02)``, the two coordinates scaled to unit
  standard deviation;
* the **signature** (the shortcut): training environment ``e`` draws a fixed vector
  ``s_e ~ N(0, I_n_dims)`` and every example carries ``(2y - 1) s_e``, which predicts the
  label perfectly and linearly *within* the environment but differs between environments;
  the test environment's signatures are pure noise ``N(0, I)``.

A model that memorises the per-environment signatures fails on the test environment; one
that learns the spirals generalises. The reference draws each environment with
``np.random.RandomState(seed + e)``; here environment ``e`` (and the test environment) get
independent numpy generators spawned from ``seed`` (same distribution, different draws).
"""

from __future__ import annotations

from typing import List

import numpy as np

from dgjax.data.rotated_mnist import LabeledEnvironment

__all__ = ["spirals", "spiral_environment"]


def spiral_environment(
  rng: np.random.Generator, n: int, n_dims: int, n_revolutions: float, signature: np.ndarray | None
):
  """``(x [n, 2 + n_dims] float32, y [n] int32)``; ``signature=None`` gives noise signatures."""
  radius = rng.uniform(0.08, 1.0, n)
  y = rng.integers(0, 2, n)
  angle = 2 * np.pi * n_revolutions * radius + np.pi * y
  radius = radius + rng.uniform(-0.02, 0.02, n)
  mechanism = np.stack([np.cos(angle) * radius, np.sin(angle) * radius], axis=1)
  mechanism /= mechanism.std(axis=0)
  if signature is None:
    sig = rng.standard_normal((n, n_dims))
  else:
    sig = (2 * y - 1)[:, None] * signature[None, :]
  return np.hstack([mechanism, sig]).astype(np.float32), y.astype(np.int32)


def spirals(
  num_train_envs: int = 16,
  examples_per_env: int = 1024,
  num_test: int = 2000,
  n_dims: int = 8,
  n_revolutions: float = 3,
  seed: int = 0,
) -> List[LabeledEnvironment]:
  """The Spirals environments: ``num_train_envs`` training environments named ``"train0"``
  ... and a last one named ``"test"`` (noise signatures).

  Defaults are the reference ``run_synthetic.py``'s (16 environments of 1024 examples, 2000
  test examples, 8 signature dimensions, 3 revolutions). ``x`` is float32
  ``[n, 2 + n_dims]``, ``y`` int32 binary labels.
  """
  if num_train_envs < 1 or examples_per_env < 2 or num_test < 2 or n_dims < 0:
    raise ValueError(
      "spirals: need num_train_envs >= 1, examples_per_env >= 2, num_test >= 2, "
      f"n_dims >= 0 (got {num_train_envs}, {examples_per_env}, {num_test}, {n_dims})"
    )
  seqs = np.random.SeedSequence(seed).spawn(num_train_envs + 1)
  envs = []
  for e in range(num_train_envs):
    rng = np.random.default_rng(seqs[e])
    signature = rng.standard_normal(n_dims)
    x, y = spiral_environment(rng, examples_per_env, n_dims, n_revolutions, signature)
    envs.append(LabeledEnvironment(f"train{e}", x, y))
  x, y = spiral_environment(np.random.default_rng(seqs[-1]), num_test, n_dims, n_revolutions, None)
  envs.append(LabeledEnvironment("test", x, y))
  return envs
