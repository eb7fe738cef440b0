"""Vision Transformers as featurizers: DINOv2 ViT-B/14 (DomainBed's ``DinoV2``) and CLIP's
ViT-B/16 image tower (OpenAI's ``VisionTransformer``; beyond DomainBed).

Both are pre-norm transformers on ``[CLS] + patches`` tokens (Dosovitskiy et al., ICLR 2021),
with one :class:`Block` (``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, multi-head
softmax attention with a fused ``qkv`` projection, scale ``head_dim**-0.5``). They differ in:

================  ==============================  ======================================
                  DINOv2 (``dinov2_vitb14``)       CLIP (``clip_vitb16``)
================  ==============================  ======================================
patch embedding   conv 14x14/14 with bias          conv 16x16/16 without bias (``conv1``)
LayerNorm eps     1e-6                             1e-5, plus ``ln_pre`` after the embedding
MLP activation    GELU (erf)                       QuickGELU ``x * sigmoid(1.702 x)``
LayerScale        ``ls1``/``ls2`` (``gamma``)      none
positions         37x37 grid (trained at 518px),   14x14 grid (224px), used as is: other
                  bicubic-resized to the input's   input sizes raise
                  grid (below)
output            DomainBed's 5 x 768 (below)      ``ln_post(x[:, 0]) @ proj``: 512
================  ==============================  ======================================

**DINOv2** (Oquab et al., 2023; facebookresearch/dinov2 ``models/vision_transformer.py``, the
hub's ``dinov2_vitb14``: ``img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp",
block_chunks=0, num_register_tokens=0, interpolate_antialias=False,
interpolate_offset=0.1``). DomainBed's ``networks.DinoV2.forward`` calls
``get_intermediate_layers(x, n=4, return_class_token=True)`` (``norm=True``): the outputs of
the last 4 blocks, each through the final LayerNorm ``norm``; features =
``cat[cls_9, cls_10, cls_11, cls_12, mean over patches of block 12's tokens]`` (dim 1), 3840
wide, then ``Dropout(vit_dropout)``. Position embeddings (``interpolate_pos_encoding``): when
the input's patch grid is not the stored 37x37, the patch positions are resized with
``F.interpolate(mode="bicubic", scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37),
align_corners=False, antialias=False)``: torch's bicubic (``A = -0.75``, border taps clamped)
with source coordinate ``(dst + 0.5) * 37 / (h0 + 0.1) - 0.5`` -- the scale factor, offset
included, not ``37 / h0`` (:func:`bicubic_resize_matrix`). A 224x224 input has a 16x16 grid.
The class token's position is kept. ``mask_token`` (masked-image training only) is not part
of this featurizer.

**CLIP** (Radford et al., ICML 2021; openai/CLIP ``clip/model.py``): ``conv1`` -> tokens,
``class_embedding`` prepended, ``positional_embedding`` added, ``ln_pre``, 12
``ResidualAttentionBlock`` (``nn.MultiheadAttention``: ``in_proj`` is the fused ``qkv``,
``out_proj`` the projection), ``ln_post`` on the class token, ``@ proj`` (768 -> 512): CLIP's
image embedding (``encode_image``), then ``Dropout(vit_dropout)``. CLIP normalises pixels with
its own mean/std; dgjax's image pipeline gives ImageNet-normalised inputs, so the tower first
maps them to CLIP's normalisation (an exact per-channel affine map of the same pixels;
``renormalize=False`` skips it for inputs already in CLIP's; inputs without 3 channels are
never remapped).

``attn_tune`` (DomainBed's ``vit_attn_tune``, for both): only parameters whose name contains
``attn`` train (:meth:`DinoV2.trainable`; DomainBed sets ``requires_grad=False`` on the rest
of the network); the head always trains.

``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``): parameters stay float32, LayerNorm
statistics and the attention softmax are computed in float32, features come back float32.
``remat`` wraps each block in ``nn.remat`` (``jax.checkpoint``): its activations are recomputed
in the backward pass. Fresh initialisation (training from scratch, tests) is DINOv2's timm
rule for both (linear weights ``N(0, 0.02)``, biases 0, positions ``N(0, 0.02)``, class token
``N(0, 1e-6)``, LayerScale 1, patch convolution torch's default); it is not CLIP's, which is
meant to be loaded (:mod:`dgjax.convert_backbones`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dgjax.augment import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
  "CLIP_MEAN",
  "CLIP_STD",
  "Attention",
  "Block",
  "CLIPVisionTower",
  "DinoV2",
  "LayerNorm",
  "Linear",
  "attn_only",
  "bicubic_resize_matrix",
]

#: CLIP's ``Normalize`` (``clip/clip.py``'s ``_transform``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_normal002 = nn.initializers.normal(0.02)


def _torch_conv_init(key, shape, dtype=jnp.float32):
  """``torch.nn.Conv2d``'s default: ``U(+-1/sqrt(fan_in))`` (HWIO kernel)."""
  bound = 1.0 / math.sqrt(shape[0] * shape[1] * shape[2])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """``torch.nn.Linear`` (``kernel`` = weight transposed), computed in ``dtype``."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _normal002, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class LayerNorm(nn.Module):
  """``torch.nn.LayerNorm`` over the last axis (``scale`` = weight), statistics in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention: ``qkv`` (``[3, heads, head_dim]`` output layout, as DINOv2's
  ``qkv`` and torch ``MultiheadAttention``'s ``in_proj``), softmax in float32, ``proj``."""

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    qkv = Linear(3 * d, self.dtype, name="qkv")(x).reshape(n, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, H, hd]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (d // self.heads) ** -0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, d)
    return Linear(d, self.dtype, name="proj")(out)


def quick_gelu(x):
  """CLIP's ``QuickGELU``."""
  return x * jax.nn.sigmoid(1.702 * x)


class Block(nn.Module):
  """Pre-norm transformer block; ``layer_scale``: DINOv2's ``ls1``/``ls2`` (``gamma``)."""

  heads: int
  mlp_ratio: int = 4
  epsilon: float = 1e-6
  activation: str = "gelu"  # "gelu" (erf) or "quick_gelu"
  layer_scale: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    act = (
      quick_gelu
      if self.activation == "quick_gelu"
      else functools.partial(jax.nn.gelu, approximate=False)
    )

    def scaled(name, h):
      if not self.layer_scale:
        return h
      gamma = self.param(name, nn.initializers.ones, (d,), jnp.float32)
      return h * gamma.astype(h.dtype)

    h = Attention(self.heads, self.dtype, name="attn")(
      LayerNorm(self.epsilon, self.dtype, name="norm1")(x)
    )
    x = x + scaled("ls1", h)
    h = LayerNorm(self.epsilon, self.dtype, name="norm2")(x)
    h = Linear(self.mlp_ratio * d, self.dtype, name="fc1")(h)
    h = Linear(d, self.dtype, name="fc2")(act(h))
    return x + scaled("ls2", h)


def _blocks(module, x, n: int, keep_last: int = 0, **kw):
  """``n`` :class:`Block` s named ``blocks_{i}`` (each under ``nn.remat`` if ``module.remat``);
  returns the last output and the outputs of the last ``keep_last`` blocks."""
  block = nn.remat(Block) if module.remat else Block
  kept = []
  for i in range(n):
    x = block(dtype=module.dtype, name=f"blocks_{i}", **kw)(x)
    if i >= n - keep_last:
      kept.append(x)
  return x, kept


def _patches(module, x, width: int, patch: int, use_bias: bool, name: str):
  """The patch embedding (a ``patch x patch`` stride-``patch`` convolution, the featurizer's
  first layer, so ARM can add its context channel to it) and the ``[N, gh * gw, D]`` tokens."""
  h, w = x.shape[1], x.shape[2]
  if h % patch or w % patch:
    raise ValueError(f"{type(module).__name__}: input {h}x{w} is not a multiple of patch {patch}")
  y = nn.Conv(
    width,
    (patch, patch),
    strides=(patch, patch),
    padding=((0, 0), (0, 0)),
    use_bias=use_bias,
    kernel_init=_torch_conv_init,
    bias_init=_torch_bias_init(patch * patch * x.shape[-1]),
    dtype=module.dtype,
    name=name,
  )(x.astype(module.dtype))
  return y.reshape(y.shape[0], -1, width), (h // patch, w // patch)


def attn_only(path) -> bool:
  """DomainBed's ``vit_attn_tune`` rule on a parameter path: its name contains ``attn``."""
  return any("attn" in str(getattr(k, "key", k)) for k in path)


# ----------------------------------------------------------------------------- DINOv2
def bicubic_resize_matrix(in_size: int, out_size: int, inv_scale: float) -> np.ndarray:
  """``[out_size, in_size]`` float64 weights of torch's 1-D bicubic resize (``align_corners=
  False``, no antialias, ``A = -0.75``): output ``i`` reads source coordinate
  ``(i + 0.5) * inv_scale - 0.5`` (``inv_scale`` = 1 / the scale factor), taps at
  ``floor - 1 .. floor + 2`` clamped to the border (``upsample_bicubic2d``'s
  ``guard_index_and_lambda`` and ``get_cubic_upsample_coefficients``)."""
  a = -0.75

  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    real = (i + 0.5) * inv_scale - 0.5
    base = min(int(math.floor(real)), in_size - 1)
    t = min(max(real - base, 0.0), 1.0)
    for tap, c in zip(range(-1, 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      m[i, min(max(base + tap, 0), in_size - 1)] += c
  return m


def interpolate_positions(pos, grid: tuple[int, int], offset: float = 0.1):
  """DINOv2's ``interpolate_pos_encoding``: ``pos`` ``[1 + M*M, D]`` (class token first) for an
  input patch grid ``(gh, gw)``; unchanged when the grid is ``M x M`` already."""
  m = math.isqrt(pos.shape[0] - 1)
  gh, gw = grid
  if gh == m and gw == m:
    return pos
  wh = jnp.asarray(bicubic_resize_matrix(m, gh, m / (gh + offset)), jnp.float32)
  ww = jnp.asarray(bicubic_resize_matrix(m, gw, m / (gw + offset)), jnp.float32)
  patch = pos[1:].astype(jnp.float32).reshape(m, m, -1)
  resized = jnp.einsum("hi,wj,ijd->hwd", wh, ww, patch, precision="highest")
  return jnp.concatenate([pos[:1], resized.reshape(gh * gw, -1).astype(pos.dtype)])


class DinoV2(nn.Module):
  """DomainBed's ``DinoV2`` featurizer: a DINOv2 ViT and its 5-token feature (module
  docstring). Defaults are ViT-B/14 (``dinov2_vitb14``); the test uses tiny ones."""

  patch: int = 14
  width: int = 768
  depth: int = 12
  heads: int = 12
  pos_grid: int = 37  # 518 / 14: the stored position grid
  interpolate_offset: float = 0.1
  last_layers: int = 4
  dropout: float = 0.0
  attn_tune: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def num_features(self) -> int:
    return (self.last_layers + 1) * self.width

  def trainable(self, path) -> bool:
    """Whether the featurizer parameter at ``path`` trains (``vit_attn_tune``)."""
    return attn_only(path) if self.attn_tune else True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not 1 <= self.last_layers <= self.depth:
      raise ValueError(
        f"DinoV2: last_layers must be in 1..depth={self.depth}, got {self.last_layers}"
      )
    tokens, grid = _patches(self, x, self.width, self.patch, True, "patch_embed")
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), jnp.float32)
    pos = self.param("pos_embed", _normal002, (1, 1 + self.pos_grid**2, self.width), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
    tokens = jnp.concatenate([cls, tokens], axis=1)
    tokens = tokens + interpolate_positions(pos[0], grid, self.interpolate_offset).astype(
      tokens.dtype
    )
    _, kept = _blocks(self, tokens, self.depth, self.last_layers, heads=self.heads)
    norm = LayerNorm(1e-6, jnp.float32, name="norm")
    kept = [norm(t) for t in kept]
    z = jnp.concatenate([t[:, 0] for t in kept] + [jnp.mean(kept[-1][:, 1:], axis=1)], axis=-1)
    return nn.Dropout(self.dropout, deterministic=not train)(z)


# ----------------------------------------------------------------------------- CLIP
class CLIPVisionTower(nn.Module):
  """OpenAI CLIP's ``VisionTransformer`` (module docstring); defaults are ViT-B/16."""

  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  output_dim: int = 512
  grid: int = 14  # 224 / 16
  dropout: float = 0.0
  attn_tune: bool = False
  renormalize: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def num_features(self) -> int:
    return self.output_dim

  def trainable(self, path) -> bool:
    return attn_only(path) if self.attn_tune else True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.renormalize and x.shape[-1] == 3:  # ImageNet- -> CLIP-normalised, same pixels
      mean_in, std_in = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
      mean_clip, std_clip = jnp.asarray(CLIP_MEAN), jnp.asarray(CLIP_STD)
      x = (x.astype(jnp.float32) * std_in + (mean_in - mean_clip)) / std_clip
    tokens, grid = _patches(self, x, self.width, self.patch, False, "conv1")
    if grid != (self.grid, self.grid):
      raise ValueError(
        f"CLIP's ViT has a {self.grid}x{self.grid} position grid (inputs of "
        f"{self.grid * self.patch}x{self.grid * self.patch}); got an input of "
        f"{x.shape[1]}x{x.shape[2]} ({grid[0]}x{grid[1]} patches)"
      )
    cls = self.param("class_embedding", _normal002, (self.width,), jnp.float32)
    pos = self.param("positional_embedding", _normal002, (1 + self.grid**2, self.width))
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
    tokens = jnp.concatenate([cls, tokens], axis=1) + pos.astype(tokens.dtype)
    tokens = LayerNorm(1e-5, self.dtype, name="ln_pre")(tokens)
    out, _ = _blocks(
      self,
      tokens,
      self.depth,
      heads=self.heads,
      epsilon=1e-5,
      activation="quick_gelu",
      layer_scale=False,
    )
    z = LayerNorm(1e-5, jnp.float32, name="ln_post")(out[:, 0])
    proj = self.param("proj", _normal002, (self.width, self.output_dim), jnp.float32)
    z = z @ proj
    return nn.Dropout(self.dropout, deterministic=not train)(z)
