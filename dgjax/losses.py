"""Classification losses shared by every method (the bottom layer: no dgjax imports)."""

from __future__ import annotations

import jax
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (``F.cross_entropy``); a single logit column is a binary
  logistic loss (``F.binary_cross_entropy_with_logits``)."""
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype)).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
