"""Wide-ResNet-16-2: DomainBed's featurizer for 32x32 inputs (``networks.Featurizer`` picks it
when the input is ``C x 32 x 32``).

DomainBed's ``lib/wide_resnet.py`` (after meliketoy/wide-resnet.pytorch; Zagoruyko & Komodakis,
"Wide Residual Networks", BMVC 2016), built as ``Wide_ResNet(input_shape, 16, 2, 0.)``:

* ``conv1``: 3x3 convolution, ``C -> 16``, padding 1, with bias;
* three stages of ``n = (depth - 4) / 6`` pre-activation blocks (``wide_basic``), widths
  ``16k, 32k, 64k`` (``k = widen_factor``), the first block of stages 2 and 3 with stride 2::

      out = conv1(relu(bn1(x)))          # 3x3, stride 1, bias
      out = dropout(out)                 # rate 0 in DomainBed
      out = conv2(relu(bn2(out)))        # 3x3, the block's stride, bias
      out = out + shortcut(x)            # 1x1 conv (stride, bias) when the shape changes

  (the shortcut takes the block's raw input, not ``relu(bn1(x))``);
* ``bn1`` (``BatchNorm2d(64k, momentum=0.9)``), ReLU, ``F.avg_pool2d(out, 8)`` and the
  ``[0, 0]`` output: the mean of the top-left 8x8 window, which for a 32x32 input is the whole
  8x8 map: ``64k`` features (128 for WRN-16-2).

Quirks kept: the final ``bn1`` has torch momentum 0.9 (its running statistics move 90% of the
way to each batch's), the others torch's default 0.1; every BatchNorm normalises with batch
statistics in training (DomainBed's ``Wide_ResNet`` takes no hparams: ``freeze_bn`` does not
apply to it); the ``conv_init`` function of DomainBed's file is never called, so the
convolutions have torch's default init (``U(+-1/sqrt(fan_in))`` for kernel and bias, as
:class:`dgjax.conv.Conv`). Inputs whose last map is larger than 8x8 get the top-left window's
mean as in torch; a last map smaller than 8x8 (input below 32x32) raises (torch's
``avg_pool2d`` fails there too).

Parameter names follow the torch state dict (``conv1``, ``layer{s}_{i}/{bn1,conv1,bn2,conv2,
shortcut}``, ``bn1``): :func:`dgjax.convert_backbones.wrn_to_flax` maps one onto the other.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dgjax.conv import Conv
from dgjax.resnet import TORCH_BN_MOMENTUM, BatchNorm

__all__ = ["FINAL_BN_MOMENTUM", "WideBasic", "WideResNet", "stage_widths"]

#: ``nn.BatchNorm2d(nStages[3], momentum=0.9)``: the final BatchNorm's torch momentum.
FINAL_BN_MOMENTUM = 0.9


def stage_widths(widen_factor: int) -> tuple[int, int, int, int]:
  """``nStages``: the stem's width and the three stages'."""
  return (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)


class WideBasic(nn.Module):
  """DomainBed's ``wide_basic`` (pre-activation; module docstring)."""

  planes: int
  stride: int = 1
  dropout: float = 0.0
  conv_impl: str = "xla"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: BatchNorm(frozen=False, dtype=self.dtype, name=name)  # noqa: E731
    out = Conv(self.planes, 3, 1, 1, self.conv_impl, name="conv1")(nn.relu(bn("bn1")(x, train)))
    out = nn.Dropout(self.dropout, deterministic=not train)(out)
    out = Conv(self.planes, 3, self.stride, 1, self.conv_impl, name="conv2")(
      nn.relu(bn("bn2")(out, train))
    )
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = Conv(self.planes, 1, self.stride, 0, self.conv_impl, name="shortcut")(x)
    return out + x


class WideResNet(nn.Module):
  """DomainBed's ``Wide_ResNet(input_shape, depth, widen_factor, dropout_rate)`` featurizer
  (module docstring), NHWC input. ``dtype``: compute dtype (parameters and BatchNorm
  statistics stay float32, features come back float32); ``remat``: each block under
  ``jax.checkpoint``."""

  depth: int = 16
  widen_factor: int = 2
  dropout: float = 0.0
  conv_impl: str = "xla"
  dtype: Any = jnp.float32
  remat: bool = False

  #: the engine moves BatchNorm running statistics by this torch momentum (per layer: the
  #: final ``bn1`` has its own, :data:`FINAL_BN_MOMENTUM`)
  @property
  def batch_norm_momentum(self):
    return lambda path: FINAL_BN_MOMENTUM if _is_final_bn(path) else TORCH_BN_MOMENTUM

  @property
  def num_features(self) -> int:
    return stage_widths(self.widen_factor)[3]

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"Wide-ResNet depth must be 6n+4, got {self.depth}")
    if x.shape[1] < 32 or x.shape[2] < 32:
      raise ValueError(
        f"Wide-ResNet takes inputs of at least 32x32 (DomainBed's avg_pool2d(8) of its last "
        f"map, 1/4 of the input), got {x.shape[1]}x{x.shape[2]}"
      )
    n = (self.depth - 4) // 6
    widths = stage_widths(self.widen_factor)
    block = nn.remat(WideBasic, static_argnums=(2,)) if self.remat else WideBasic
    x = Conv(widths[0], 3, 1, 1, self.conv_impl, name="conv1")(x.astype(self.dtype))
    for stage in range(3):
      for i in range(n):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = block(
          widths[stage + 1],
          stride,
          self.dropout,
          self.conv_impl,
          self.dtype,
          name=f"layer{stage + 1}_{i}",
        )(x, train)
    x = BatchNorm(frozen=False, momentum=FINAL_BN_MOMENTUM, dtype=self.dtype, name="bn1")(x, train)
    x = nn.relu(x)
    return jnp.mean(x[:, :8, :8, :].astype(jnp.float32), axis=(1, 2))


def _is_final_bn(path) -> bool:
  """Whether a ``batch_stats`` leaf path (``(..., "featurizer", "bn1", "mean")``) is the final
  BatchNorm's (``bn1`` directly under the featurizer, not a block's ``bn1``)."""
  names = [getattr(k, "key", k) for k in path]
  return len(names) >= 2 and names[-2] == "bn1" and (len(names) < 3 or names[-3] == "featurizer")
