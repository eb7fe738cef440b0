"""State-dict names of the non-ResNet backbones -> dgjax's Flax parameter paths (numpy only).

Each ``*_target(key)`` maps one torch state-dict key to ``(collection, path, kind)``
(``kind``: ``"conv"`` ``[O, I, kh, kw] -> [kh, kw, I, O]``, ``"linear"`` ``[out, in] -> [in,
out]``, ``"copy"`` as is), returns ``None`` for a key the featurizer does not use, and raises
``KeyError`` for a key it does not know; :func:`dgjax.convert_weights.torch_to_flax` runs them.

DINOv2 (``dinov2_vitb14_pretrain.pth``, facebookresearch/dinov2's names; a chunked checkpoint's
``blocks.{chunk}.{i}`` is read as ``blocks.{i}``)::

    patch_embed.proj.{weight,bias}      featurizer/patch_embed/{kernel,bias}
    cls_token, pos_embed                featurizer/cls_token, featurizer/pos_embed
    blocks.{i}.norm{1,2}.{weight,bias}  featurizer/blocks_{i}/norm{1,2}/{scale,bias}
    blocks.{i}.attn.qkv / .attn.proj    featurizer/blocks_{i}/attn/qkv / attn/proj
    blocks.{i}.ls{1,2}.gamma            featurizer/blocks_{i}/ls{1,2}
    blocks.{i}.mlp.fc{1,2}              featurizer/blocks_{i}/fc{1,2}
    norm.{weight,bias}                  featurizer/norm/{scale,bias}
    mask_token                          dropped (masked-image pretraining only)

OpenAI CLIP (``ViT-B-16.pt``; the image tower's ``visual.*`` keys, the text tower and
``logit_scale`` dropped; a state dict of the tower alone, without ``visual.``, is read too)::

    visual.conv1.weight                             featurizer/conv1/kernel
    visual.class_embedding / positional_embedding   featurizer/class_embedding / ...
    visual.ln_pre / ln_post                         featurizer/ln_pre / ln_post
    visual.transformer.resblocks.{i}.ln_{1,2}       featurizer/blocks_{i}/norm{1,2}
    ...resblocks.{i}.attn.in_proj_{weight,bias}     featurizer/blocks_{i}/attn/qkv/{kernel,bias}
    ...resblocks.{i}.attn.out_proj                  featurizer/blocks_{i}/attn/proj
    ...resblocks.{i}.mlp.c_fc / c_proj              featurizer/blocks_{i}/fc1 / fc2
    visual.proj                                     featurizer/proj  ([768, 512], as is)

Wide-ResNet (DomainBed's ``lib/wide_resnet.py`` names; no published weights, the mapping
serves checkpoints and the tests)::

    conv1.{weight,bias}                          featurizer/conv1/{kernel,bias}
    layer{s}.{i}.conv{1,2} / shortcut.0          featurizer/layer{s}_{i}/conv{1,2} / shortcut
    layer{s}.{i}.bn{1,2}, bn1                    BatchNorm as the ResNets' (params + batch_stats)
"""

from __future__ import annotations

import re

__all__ = ["FAMILY_TARGETS", "clip_target", "dinov2_target", "wrn_target"]

_BN_FIELDS = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}
_LN_FIELDS = {"weight": "scale", "bias": "bias"}
_LINEAR_FIELDS = {"weight": ("kernel", "linear"), "bias": ("bias", "copy")}
F = "featurizer"


def _linear(prefix: tuple, field: str):
  name, kind = _LINEAR_FIELDS[field]
  return ("params", prefix + (name,), kind)


def _layer_norm(prefix: tuple, field: str):
  return ("params", prefix + (_LN_FIELDS[field],), "copy")


# ----------------------------------------------------------------------------- DINOv2
_DINO_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")


def dinov2_target(key: str):
  if key == "mask_token":
    return None
  if key in ("cls_token", "pos_embed"):
    return ("params", (F, key), "copy")
  if key.startswith("register_tokens"):
    raise KeyError(f"{key} (register tokens: dgjax's DinoV2 is dinov2_vitb14, without them)")
  if key.startswith("patch_embed.proj."):
    field = key.rsplit(".", 1)[1]
    return ("params", (F, "patch_embed", "kernel" if field == "weight" else "bias"), "conv")
  if key.startswith("norm."):
    return _layer_norm((F, "norm"), key[len("norm.") :])
  m = _DINO_BLOCK.match(key)
  if not m:
    raise KeyError(key)
  block, rest = (F, f"blocks_{m.group(1)}"), m.group(2)
  layer, _, field = rest.rpartition(".")
  if layer in ("norm1", "norm2"):
    return _layer_norm(block + (layer,), field)
  if layer in ("attn.qkv", "attn.proj"):
    return _linear(block + tuple(layer.split(".")), field)
  if layer in ("mlp.fc1", "mlp.fc2"):
    return _linear(block + (layer.split(".")[1],), field)
  if layer in ("ls1", "ls2") and field == "gamma":
    return ("params", block + (layer,), "copy")
  raise KeyError(key)


# ----------------------------------------------------------------------------- CLIP
_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_CLIP_LAYERS = {
  "ln_1": ("norm1",),
  "ln_2": ("norm2",),
  "attn.out_proj": ("attn", "proj"),
  "mlp.c_fc": ("fc1",),
  "mlp.c_proj": ("fc2",),
}


def clip_target(key: str, has_prefix: bool = True):
  if has_prefix:
    if not key.startswith("visual."):
      return None  # the text tower, logit_scale, input_resolution, ...
    key = key[len("visual.") :]
  if key in ("class_embedding", "positional_embedding", "proj"):
    return ("params", (F, key), "copy")
  if key == "conv1.weight":
    return ("params", (F, "conv1", "kernel"), "conv")
  if key.startswith(("ln_pre.", "ln_post.")):
    layer, field = key.split(".")
    return _layer_norm((F, layer), field)
  m = _CLIP_BLOCK.match(key)
  if not m:
    raise KeyError(key)
  block, rest = (F, f"blocks_{m.group(1)}"), m.group(2)
  if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
    return _linear(block + ("attn", "qkv"), rest.rsplit("_", 1)[1])
  layer, _, field = rest.rpartition(".")
  if layer not in _CLIP_LAYERS:
    raise KeyError(key)
  path = block + _CLIP_LAYERS[layer]
  return _layer_norm(path, field) if layer.startswith("ln_") else _linear(path, field)


# ----------------------------------------------------------------------------- Wide-ResNet
_WRN_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")


def wrn_target(key: str):
  if key.endswith("num_batches_tracked"):
    return None
  prefix: tuple = (F,)
  m = _WRN_BLOCK.match(key)
  if m:
    prefix += (f"layer{m.group(1)}_{m.group(2)}",)
    key = m.group(3).replace("shortcut.0.", "shortcut.")
  layer, _, field = key.rpartition(".")
  if layer in ("conv1", "conv2", "shortcut") and field in ("weight", "bias"):
    return ("params", prefix + (layer, "kernel" if field == "weight" else "bias"), "conv")
  if layer in ("bn1", "bn2") and field in _BN_FIELDS:
    collection, name = _BN_FIELDS[field]
    return (collection, prefix + (layer, name), "copy")
  raise KeyError(key)


def _clip_targets(state_dict):
  """CLIP's mapper for ``state_dict``: the whole model's (``visual.*`` kept) or the tower's."""
  has_prefix = any(k.startswith("visual.") for k in state_dict)
  return lambda key: clip_target(key, has_prefix)


#: weights family -> ``state_dict -> key mapper`` (the ResNets' is in
#: :func:`dgjax.convert_weights.torch_to_flax`)
FAMILY_TARGETS = {
  "dinov2": lambda state_dict: dinov2_target,
  "clip": _clip_targets,
  "wrn": lambda state_dict: wrn_target,
}
