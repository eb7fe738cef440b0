"""Pretrained backbone weights (torchvision / timm / DINOv2 / CLIP state dicts) -> a Flax
variables file, and back into a model for training.

Sources (what DomainBed's ``networks.ResNet`` and ``networks.DinoV2`` load, and CLIP):

==================  =================================================================  =====
``--arch``          file                                                               origin
==================  =================================================================  =====
``resnet18``        ``resnet18-f37072fd.pth``                                          torchvision ``ResNet18_Weights.IMAGENET1K_V1`` (``pretrained=True``)
``resnet50``        ``resnet50-0676ba61.pth``                                          torchvision ``ResNet50_Weights.IMAGENET1K_V1`` (``pretrained=True``)
``resnet50_augmix`` ``model.safetensors`` of ``timm/resnet50.ram_in1k``                 timm (DomainBed hparam ``resnet50_augmix``, its current default)
``dinov2_vitb14``   ``dinov2_vitb14_pretrain.pth``                                     ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')`` (DomainBed's ``DinoV2``)
``clip_vitb16``     ``ViT-B-16.pt``                                                    OpenAI CLIP ``clip.load('ViT-B/16')`` (a TorchScript archive; image tower only)
==================  =================================================================  =====

The ViT key mappings are in :mod:`dgjax.convert_backbones`; the Wide-ResNet (no published
weights) converts from DomainBed's layout with ``--arch wrn16_2``.

A ``.safetensors`` file is read with safetensors' numpy API (no torch); a ``.pth`` / ``.pt`` /
``.bin`` (pickled torch) file needs torch (``pip install 'dgjax[convert]'``). Training never
needs torch: it reads the converted file (flax msgpack) with :func:`load_pretrained`.

Mapping (torch -> flax; torch conv weights ``[O, I, kh, kw]`` -> ``[kh, kw, I, O]``, linear
``[out, in]`` -> ``[in, out]``)::

    conv1.weight                    params/featurizer/conv1/kernel
    bn1.{weight,bias}               params/featurizer/bn1/{scale,bias}
    bn1.{running_mean,running_var}  batch_stats/featurizer/bn1/{mean,var}
    layer{s}.{i}.conv{k} / bn{k}    .../featurizer/layer{s}_{i}/conv{k} / bn{k}
    layer{s}.{i}.downsample.0 / .1  .../featurizer/layer{s}_{i}/downsample_conv / downsample_bn
    fc.{weight,bias}                params/classifier/{kernel,bias}  (only with include_head;
                                    DomainBed drops ``fc``)

``num_batches_tracked`` is dropped. A leading ``module.`` (DataParallel) is stripped and a
checkpoint wrapping the weights in ``state_dict`` / ``model`` is unwrapped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
  "SOURCES",
  "WeightsError",
  "convert_file",
  "load_pretrained",
  "missing_weights_message",
  "read_state_dict",
  "read_weights",
  "save_weights",
  "torch_to_flax",
]

FORMAT = "dgjax-resnet-weights-v1"  # the name predates the ViTs; the layout is unchanged

#: backbone (:data:`dgjax.backbones.BACKBONES`) -> (model arch, file name, where to download it)
SOURCES = {
  "resnet18": (
    "resnet18",
    "resnet18-f37072fd.pth",
    "https://download.pytorch.org/models/resnet18-f37072fd.pth "
    "(torchvision ResNet18_Weights.IMAGENET1K_V1)",
  ),
  "resnet50": (
    "resnet50",
    "resnet50-0676ba61.pth",
    "https://download.pytorch.org/models/resnet50-0676ba61.pth "
    "(torchvision ResNet50_Weights.IMAGENET1K_V1, DomainBed's pretrained=True)",
  ),
  "resnet50_augmix": (
    "resnet50",
    "model.safetensors",
    "https://huggingface.co/timm/resnet50.ram_in1k/resolve/main/"
    "model.safetensors (timm hub name 'resnet50.ram_in1k', DomainBed's "
    "resnet50_augmix)",
  ),
  "dinov2_vitb14": (
    "dinov2_vitb14",
    "dinov2_vitb14_pretrain.pth",
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth "
    "(torch.hub facebookresearch/dinov2 'dinov2_vitb14', DomainBed's DinoV2)",
  ),
  "clip_vitb16": (
    "clip_vitb16",
    "ViT-B-16.pt",
    "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e"
    "6937f9e85e4ecb61988df416f/ViT-B-16.pt (OpenAI CLIP 'ViT-B/16')",
  ),
}


class WeightsError(ValueError):
  """A weights file is missing, unreadable, or does not fit the model; says which keys."""


def missing_weights_message(arch: str) -> str:
  """What to download and run when no converted weights file is given for ``arch``."""
  from dgjax import backbones

  if arch in backbones.BACKBONES and arch not in SOURCES:
    return (
      f"{arch} has no published pretrained weights (DomainBed trains it from scratch): pass "
      f"--pretrained=none, or a file converted with python -m experiments.convert_weights "
      f"--arch {arch}"
    )
  if arch not in SOURCES:
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(SOURCES)}")
  model_arch, fname, url = SOURCES[arch]
  return (
    f"{arch} needs ImageNet weights converted for dgjax. Download {fname} from {url}, "
    f"convert it once:\n  python -m experiments.convert_weights --arch {arch} "
    f"--input {fname} --output {arch}.msgpack\nthen pass --pretrained={arch}.msgpack "
    f"(or --pretrained=none to train from scratch)."
  )


# --------------------------------------------------------------------------- reading
def read_state_dict(path) -> dict[str, np.ndarray]:
  """A torch-layout state dict as numpy arrays from ``.safetensors`` or ``.pth/.pt/.bin``."""
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"weights file {path} does not exist")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file

    try:
      sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- re-raised naming the file
      raise WeightsError(f"cannot read {path} as safetensors: {e}") from None
  elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
    try:
      import torch
    except ImportError:
      raise WeightsError(
        f"reading {path} ({suffix}, a pickled torch file) needs torch: "
        f"pip install 'dgjax[convert]', or give the .safetensors file"
      ) from None
    try:
      obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
      try:  # OpenAI's CLIP files are TorchScript archives
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()
      except Exception:  # noqa: BLE001
        raise WeightsError(f"cannot read {path} with torch.load: {e}") from None
    for wrapper in ("state_dict", "model"):
      if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
        obj = obj[wrapper]
    sd = {
      k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
      for k, v in obj.items()
      if hasattr(v, "numpy")
    }
  else:
    raise WeightsError(
      f"{path}: unknown weights format {suffix!r} (expected .safetensors, .pth, .pt or .bin)"
    )
  return {
    k[len("module.") :] if k.startswith("module.") else k: np.asarray(v) for k, v in sd.items()
  }


_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")  # the ResNets' mapping
_BN_FIELDS = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def _target(key: str, include_head: bool):
  """torch key -> (collection, path tuple, kind) or None to drop; raises on unknown keys."""
  if key.endswith("num_batches_tracked"):
    return None
  if key.startswith("fc."):
    if not include_head:
      return None
    field = key[3:]
    return ("params", ("classifier", "kernel" if field == "weight" else field), "linear")
  prefix: tuple[str, ...] = ("featurizer",)
  m = _BLOCK.match(key)
  if m:
    prefix += (f"layer{m.group(1)}_{m.group(2)}",)
    key = (
      m.group(3)
      .replace("downsample.0.", "downsample_conv.")
      .replace("downsample.1.", "downsample_bn.")
    )
  layer, _, field = key.rpartition(".")
  if layer.startswith("conv") or layer == "downsample_conv":
    if field != "weight":
      raise KeyError(key)
    return ("params", prefix + (layer, "kernel"), "conv")
  if layer.startswith("bn") or layer == "downsample_bn":
    if field not in _BN_FIELDS:
      raise KeyError(key)
    collection, name = _BN_FIELDS[field]
    return (collection, prefix + (layer, name), "vector")
  raise KeyError(key)


#: weights family -> the network its keys name (for error messages)
_FAMILY_NAMES = {
  "resnet": "torchvision ResNet",
  "wrn": "DomainBed Wide_ResNet",
  "dinov2": "DINOv2 ViT",
  "clip": "OpenAI CLIP ViT",
}


def torch_to_flax(
  state_dict: Mapping[str, np.ndarray], include_head: bool = False, family: str = "resnet"
) -> dict:
  """A ``family`` (``resnet``: torchvision/timm; ``wrn``, ``dinov2``, ``clip``:
  :mod:`dgjax.convert_backbones`) state dict -> ``{"params": ..., "batch_stats": ...}``
  (numpy, float32) in dgjax's layout (module docstring); unknown keys raise.
  ``include_head``: the ResNets' ``fc`` too."""
  from dgjax.convert_backbones import FAMILY_TARGETS

  if family == "resnet":
    target_of = lambda key: _target(key, include_head)  # noqa: E731
  elif family in FAMILY_TARGETS:
    if include_head:
      raise WeightsError(f"{family} weights have no classification head to convert")
    target_of = FAMILY_TARGETS[family](state_dict)
  else:
    raise ValueError(f"unknown weights family {family!r}; valid: {', '.join(_FAMILY_NAMES)}")
  out: dict[str, dict] = {"params": {}, "batch_stats": {}}
  unknown = []
  for key, value in state_dict.items():
    try:
      target = target_of(key)
    except KeyError:
      unknown.append(key)
      continue
    if target is None:
      continue
    collection, path, kind = target
    value = np.asarray(value, dtype=np.float32)
    if kind == "conv" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif kind == "linear" and value.ndim == 2:
      value = value.T
    node = out[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)
  if unknown:
    raise WeightsError(
      f"{len(unknown)} state-dict key(s) that are not part of a {_FAMILY_NAMES[family]}: "
      f"{', '.join(unknown[:10])}"
    )
  return out


# --------------------------------------------------------------------------- files
def save_weights(path, variables: Mapping[str, Any], arch: str, source: str = "") -> None:
  """Write converted ``variables`` (``params`` / ``batch_stats``) as flax msgpack."""
  from flax import serialization

  payload = {
    "format": FORMAT,
    "arch": arch,
    "source": source,
    "params": variables["params"],
    "batch_stats": variables.get("batch_stats", {}),
  }
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)


def read_weights(path) -> dict:
  """``{"format", "arch", "source", "params", "batch_stats"}`` from a converted file."""
  from flax import serialization

  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"weights file {path} does not exist")
  try:
    payload = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # noqa: BLE001
    raise WeightsError(
      f"cannot read {path} as a dgjax weights file (flax msgpack): {e}; "
      f"convert torch/timm files with python -m experiments.convert_weights"
    ) from None
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise WeightsError(
      f"{path} is not a dgjax weights file (format {FORMAT!r}); convert "
      f"torch/timm files with python -m experiments.convert_weights"
    )
  return payload


def convert_file(
  arch: str, input_path, output_path, include_head: bool = False, sizes: Mapping | None = None
) -> dict:
  """Read ``input_path``, convert, check every shape against backbone ``arch``'s model
  (:mod:`dgjax.backbones`; ``sizes``: its architecture fields overridden, e.g. the tests'
  tiny ViTs), write ``output_path``; returns the converted variables."""
  import jax
  from dgjax import backbones

  if arch not in SOURCES and arch not in backbones.BACKBONES:
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(backbones.BACKBONES)}")
  backbone = backbones.get_backbone(arch)
  model_arch = backbone.arch
  converted = torch_to_flax(
    read_state_dict(input_path), include_head=include_head, family=backbone.family
  )
  num_classes = (
    converted["params"]["classifier"]["bias"].shape[0]
    if include_head and "classifier" in converted["params"]
    else 1
  )
  model = backbones.make_classifier(arch, num_classes, **(sizes or {}))
  size = 64 if backbone.family in ("resnet", "wrn") else backbone.input_size
  if sizes and "grid" in sizes:  # CLIP's input must fit its position grid
    size = sizes["grid"] * sizes.get("patch", 16)
  shapes = jax.eval_shape(lambda: backbones.init_variables(model, jax.random.key(0), size))
  _check(converted, shapes, str(input_path), head=include_head)
  save_weights(output_path, converted, model_arch, source=f"{arch}:{Path(input_path).name}")
  return converted


# --------------------------------------------------------------------------- loading
def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _check(found: Mapping, expected: Mapping, where: str, head: bool) -> None:
  problems = []
  for collection in ("params", "batch_stats"):
    exp = {
      k: v
      for k, v in _flatten(expected.get(collection, {})).items()
      if head or k[0] == "featurizer"
    }
    got = _flatten(found.get(collection, {}))
    missing = sorted("/".join((collection,) + k) for k in exp.keys() - got.keys())
    unexpected = sorted("/".join((collection,) + k) for k in got.keys() - exp.keys())
    wrong = sorted(
      f"{'/'.join((collection,) + k)}: file {tuple(np.shape(got[k]))}, model {tuple(exp[k].shape)}"
      for k in exp.keys() & got.keys()
      if tuple(np.shape(got[k])) != tuple(exp[k].shape)
    )
    if missing:
      problems.append(
        f"missing {len(missing)} key(s): {', '.join(missing[:8])}"
        + (" ..." if len(missing) > 8 else "")
      )
    if unexpected:
      problems.append(
        f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}"
        + (" ..." if len(unexpected) > 8 else "")
      )
    if wrong:
      problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:8])}")
  if problems:
    raise WeightsError(f"{where} does not fit the model: " + " | ".join(problems))


def load_pretrained(path, model_variables: Mapping[str, Any]) -> dict:
  """``model_variables`` with the featurizer's ``params`` and ``batch_stats`` replaced by the
  converted file at ``path``; the ``classifier`` head keeps its fresh initialisation
  (DomainBed: new ``Linear`` on the pretrained featurizer). Every featurizer key and shape
  is checked; a mismatch raises :class:`WeightsError` naming the missing / unexpected keys."""
  import jax.numpy as jnp

  payload = read_weights(path)
  found = {
    c: {"featurizer": (payload.get(c) or {}).get("featurizer", {})}
    for c in ("params", "batch_stats")
  }
  _check(found, model_variables, f"weights file {path} (arch {payload.get('arch')})", head=False)
  out = {k: dict(v) for k, v in model_variables.items()}
  for collection in ("params", "batch_stats"):
    if "featurizer" not in model_variables.get(collection, {}):
      continue  # no BatchNorm (the ViTs): _check saw the file has none either
    dtypes = {k: v.dtype for k, v in _flatten(model_variables[collection]["featurizer"]).items()}
    flat = {
      k: jnp.asarray(v, dtypes[k]) for k, v in _flatten(found[collection]["featurizer"]).items()
    }
    out[collection]["featurizer"] = _unflatten(flat)
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = v
  return out
