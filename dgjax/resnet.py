"""ResNet-18 / ResNet-50 in Flax as DomainBed's image featurizer, plus the linear head.

Architecture: torchvision's ``resnet18`` / ``resnet50`` (He et al., "Deep Residual Learning
for Image Recognition", CVPR 2016; torchvision's "v1.5": in the Bottleneck the stride sits
on the 3x3 convolution), with ``fc`` removed, exactly as DomainBed's ``networks.ResNet``
(Gulrajani & Lopez-Paz, ICLR 2021): 7x7/2 conv, BN, ReLU, 3x3/2 max-pool, four stages
(BasicBlock x [2, 2, 2, 2] or Bottleneck x [3, 4, 6, 3]), global average pooling -> 512 /
2048 features, then ``Dropout(resnet_dropout)`` on the features. timm's ``resnet50`` (the
``resnet50.ram_in1k`` weights DomainBed now defaults to, hparam ``resnet50_augmix``) has the
same layers and parameter names. Input: NHWC float images normalised with the ImageNet
mean/std (:mod:`dgjax.augment`).

:class:`ResNetClassifier` has the interface of :class:`dgjax.models.Classifier`: methods
``features(x)``, ``head(z)``, ``__call__(x)``, parameters ``{"featurizer": ...,
"classifier": ...}`` (head = ``torch.nn.Linear`` init), so every head-level method applies.
The variables also hold ``batch_stats`` (BatchNorm running statistics, featurizer only), and
``features`` / ``__call__`` take ``train`` (dropout on, and unfrozen BN uses batch
statistics); with ``train=True`` and ``resnet_dropout > 0`` pass ``rngs={"dropout": key}``.

BatchNorm rule (parameter names as torchvision: ``scale`` = weight, ``bias``; statistics
``mean`` / ``var`` = running_mean / running_var; eps 1e-5):

* ``freeze_bn=True`` (default here): every BN layer normalises with the running statistics
  of ``batch_stats`` in training and evaluation, and never changes them; its affine
  ``scale``/``bias`` are still trained. This is DomainBed's ``ResNet.freeze_bn()``: in the
  DomainBed of the paper it was always on (``train()`` re-applies it); the current DomainBed
  has a ``freeze_bn`` hparam whose default is ``False`` (added with ERM++, 2024), alongside
  the default switch to ``resnet50_augmix`` weights.
* ``freeze_bn=False``: with ``train=True`` each BN layer normalises with the mean and
  (biased) variance of the batch this forward call sees, over all axes but channels (so
  calling the model on the concatenated ``[D*B]`` batch gives ERM's pooled statistics and
  calling it per domain, e.g. under ``jax.vmap`` over ``D``, gives each domain its own);
  if ``batch_stats`` is mutable (``apply(..., mutable=["batch_stats"])``) the running
  statistics are updated as torch does: ``r <- 0.9 r + 0.1 s`` with the *unbiased*
  variance for ``var``; if it is not mutable they are left alone. ``train=False`` uses the
  running statistics.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgjax.models import BackboneClassifier

__all__ = [
  "ARCHS",
  "BatchNorm",
  "BasicBlock",
  "Bottleneck",
  "ResNet",
  "ResNetClassifier",
  "init_variables",
  "resnet18_classifier",
  "resnet50_classifier",
  "resnet_classifier",
]

#: arch -> (block, blocks per stage, feature width)
ARCHS = {
  "resnet18": ("basic", (2, 2, 2, 2), 512),
  "resnet50": ("bottleneck", (3, 4, 6, 3), 2048),
}

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, stride, name, dtype):
  pad = (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=_conv_init,
    dtype=dtype,
    name=name,
  )


#: ``torch.nn.BatchNorm2d``'s default momentum (weight of the new batch's statistics).
TORCH_BN_MOMENTUM = 0.1


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` over NHWC with DomainBed's freeze rule (module docstring)."""

  frozen: bool = True
  momentum: float = TORCH_BN_MOMENTUM
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.frozen or not train:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)).astype(self.dtype)


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: 3x3(stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

  planes: int
  stride: int = 1
  freeze_bn: bool = True
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: BatchNorm(frozen=self.freeze_bn, dtype=self.dtype, name=name)  # noqa: E731
    out = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, "conv1", self.dtype)(x), train))
    out = bn("bn2")(_conv(self.planes, 3, 1, "conv2", self.dtype)(out), train)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = bn("downsample_bn")(
        _conv(self.planes, 1, self.stride, "downsample_conv", self.dtype)(x), train
      )
    return nn.relu(out + x)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5): 1x1 -> 3x3(stride) -> 1x1 (x4), BN after each."""

  planes: int
  stride: int = 1
  freeze_bn: bool = True
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: BatchNorm(frozen=self.freeze_bn, dtype=self.dtype, name=name)  # noqa: E731
    out = nn.relu(bn("bn1")(_conv(self.planes, 1, 1, "conv1", self.dtype)(x), train))
    out = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, "conv2", self.dtype)(out), train))
    out = bn("bn3")(_conv(self.planes * 4, 1, 1, "conv3", self.dtype)(out), train)
    if self.stride != 1 or x.shape[-1] != self.planes * 4:
      x = bn("downsample_bn")(
        _conv(self.planes * 4, 1, self.stride, "downsample_conv", self.dtype)(x), train
      )
    return nn.relu(out + x)


class ResNet(nn.Module):
  """DomainBed's ResNet featurizer: torchvision ResNet without ``fc``, dropout on features.

  ``remat=True`` wraps every residual block in ``nn.remat`` (``jax.checkpoint``): the
  block's activations are recomputed in the backward pass instead of stored (less memory,
  ~1 extra forward of compute). ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``);
  parameters and BN statistics stay float32, features are returned in float32.
  """

  stage_sizes: Sequence[int]
  block: str = "bottleneck"
  dropout: float = 0.0
  freeze_bn: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def batch_norm_momentum(self):
    """torch's momentum when BatchNorm trains (``freeze_bn=False``), else ``None``."""
    return None if self.freeze_bn else TORCH_BN_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    x = x.astype(self.dtype)
    x = _conv(64, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(BatchNorm(frozen=self.freeze_bn, dtype=self.dtype, name="bn1")(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = 64 * 2**stage
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = block_cls(planes, stride, self.freeze_bn, self.dtype, name=f"layer{stage + 1}_{i}")(
          x, train
        )
    z = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dropout(self.dropout, deterministic=not train)(z)


class ResNetClassifier(BackboneClassifier):
  """ResNet ``featurizer`` + linear ``classifier`` head (:class:`dgjax.models.BackboneClassifier`):
  ``batch_norm_momentum`` is torch's 0.1 when BatchNorm is unfrozen (the engine then updates
  the running statistics each step), ``None`` when frozen; an extra input channel (ARM's
  context) starts as a copy of ``conv1``'s kernel on image channel ``i mod 3``, as DomainBed's
  ``ResNet`` adapts it."""

  featurizer: ResNet
  num_classes: int
  copies_input_kernels: bool = True


def resnet_classifier(
  arch: str,
  num_classes: int,
  dropout: float = 0.0,
  freeze_bn: bool = True,
  dtype: Any = jnp.float32,
  remat: bool = False,
) -> ResNetClassifier:
  """``arch`` in :data:`ARCHS` (``"resnet18"``, ``"resnet50"``) + a ``num_classes`` head."""
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
  block, stages, _ = ARCHS[arch]
  featurizer = ResNet(
    stage_sizes=stages,
    block=block,
    dropout=dropout,
    freeze_bn=freeze_bn,
    dtype=dtype,
    remat=remat,
    name="featurizer",
  )
  return ResNetClassifier(featurizer=featurizer, num_classes=num_classes)


def resnet18_classifier(
  num_classes: int, dropout: float = 0.0, freeze_bn: bool = True, **kw
) -> ResNetClassifier:
  """DomainBed's ``resnet18=True`` network: ResNet-18 featurizer (512) + linear head."""
  return resnet_classifier("resnet18", num_classes, dropout, freeze_bn, **kw)


def resnet50_classifier(
  num_classes: int, dropout: float = 0.0, freeze_bn: bool = True, **kw
) -> ResNetClassifier:
  """DomainBed's default network: ResNet-50 featurizer (2048) + linear head."""
  return resnet_classifier("resnet50", num_classes, dropout, freeze_bn, **kw)


def init_variables(model: nn.Module, key, image_size: int = 224):
  """``{"params": ..., "batch_stats": ...}`` of ``model`` for ``image_size`` inputs (jitted
  init; fresh torchvision-style initialisation: conv kaiming-normal fan_out, BN 1/0,
  running mean 0 / var 1, head ``torch.nn.Linear``'s)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda k: model.init({"params": k}, x))(key)
