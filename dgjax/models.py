"""Flax models with a visible featurizer / classifier split.

Every model here is ``Classifier(featurizer, head)``: its params tree is
``{"featurizer": ..., "classifier": ...}``, so transforms that act on head-only quantities
(Hessian alignment, Fishr) can select ``params["classifier"]``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgjax.conv import Conv


def _torch_uniform(fan_in: int):
  """PyTorch's default init for Linear/Conv weights and biases: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchDense(nn.Module):
  """``torch.nn.Linear(in, features)`` (same init)."""

  features: int

  @nn.compact
  def __call__(self, x):
    init = _torch_uniform(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features))
    bias = self.param("bias", init, (self.features,))
    return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class MNISTCNN(nn.Module):
  """DomainBed's ``MNIST_CNN`` featurizer (Gulrajani & Lopez-Paz, ICLR 2021).

  conv(64) -> conv(128, stride 2) -> conv(128) -> conv(128), all 3x3 with padding 1, each
  followed by ReLU then GroupNorm(8 groups, eps 1e-5), then global average pooling: 128
  features. Input NHWC (DomainBed's ``2x28x28`` is ``28x28x2`` here).
  """

  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    for i, (features, stride) in enumerate(((64, 1), (128, 2), (128, 1), (128, 1))):
      x = Conv(features, stride=stride, impl=self.conv_impl, name=f"conv{i + 1}")(x)
      x = nn.relu(x)
      x = nn.GroupNorm(num_groups=8, epsilon=1e-5, name=f"bn{i}")(x)
    return jnp.mean(x, axis=(1, 2))


class MLP(nn.Module):
  """Fully connected featurizer on the flattened input: ``Linear -> ReLU`` per hidden width.

  ``MLP((390, 390))`` is the hidden part of Arjovsky et al.'s IRM Colored MNIST network
  (392-390-390-1 with the head).
  """

  hidden: Sequence[int] = (390, 390)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(TorchDense(width, name=f"dense{i}")(x))
    return x


class Classifier(nn.Module):
  """``featurizer`` followed by a linear ``classifier`` head (DomainBed's ERM network)."""

  featurizer: nn.Module
  num_classes: int

  def setup(self):
    self.classifier = TorchDense(self.num_classes)

  def features(self, x):
    return self.featurizer(x)

  def head(self, z):
    return self.classifier(z)

  def __call__(self, x):
    return self.classifier(self.featurizer(x))


class BackboneClassifier(nn.Module):
  """An image backbone ``featurizer`` + linear ``classifier`` head (``torch.nn.Linear`` init):
  :class:`Classifier`'s interface with ``train`` on ``features(x, train)`` /
  ``__call__(x, train)``; parameters ``{"featurizer", "classifier"}``. Every backbone of
  :mod:`dgjax.backbones` (the ResNets as :class:`dgjax.resnet.ResNetClassifier`) is one.

  The engine reads (:class:`dgjax.core.Context`): ``takes_train`` (training steps call it
  with ``train=True`` and a dropout key); ``batch_norm_momentum``: the featurizer's (torch's
  momentum when its BatchNorm trains, a number or ``path -> number``), else ``None``;
  ``frozen_params``: ``None`` (everything trains) or ``path -> bool`` for parameters that must
  not train (the ViTs' ``vit_attn_tune``: :func:`dgjax.core.build_step` stops their gradients
  and masks them out of the optimizer); ``copies_input_kernels``: ARM's extra input channel
  starts as a copy of the first layer's kernel on image channel ``i mod 3``, as DomainBed's
  ``ResNet`` adapts ``conv1`` (the ResNets and the pretrained ViTs; DomainBed's DinoV2 refuses
  a 4th channel).
  """

  featurizer: nn.Module
  num_classes: int
  copies_input_kernels: bool = False

  takes_train = True

  @property
  def batch_norm_momentum(self):
    return getattr(self.featurizer, "batch_norm_momentum", None)

  @property
  def frozen_params(self) -> Callable | None:
    if not getattr(self.featurizer, "attn_tune", False):
      return None
    trainable = self.featurizer.trainable

    def frozen(path) -> bool:
      return getattr(path[0], "key", path[0]) == "featurizer" and not trainable(path[1:])

    return frozen

  def setup(self):
    self.classifier = TorchDense(self.num_classes)

  def features(self, x, train: bool = False):
    return self.featurizer(x, train)

  def head(self, z):
    return self.classifier(z)

  def __call__(self, x, train: bool = False):
    return self.classifier(self.featurizer(x, train))


def mnist_cnn(num_classes: int = 2, conv_impl: str = "xla") -> Classifier:
  """DomainBed's MNIST network: ``MNISTCNN`` featurizer + linear head."""
  return Classifier(
    featurizer=MNISTCNN(conv_impl=conv_impl, name="featurizer"), num_classes=num_classes
  )


def mlp(num_classes: int, hidden: Sequence[int] = (390, 390)) -> Classifier:
  """An ``MLP`` featurizer + linear head."""
  return Classifier(
    featurizer=MLP(hidden=tuple(hidden), name="featurizer"), num_classes=num_classes
  )
