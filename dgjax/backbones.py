"""Backbones: the featurizer under the linear head, by name (``--backbone``) or, as DomainBed
chooses it, from the input shape and the hparams.

=====================  ============================================  =====  ========  ==========
name                   network                                       input  features  weights
=====================  ============================================  =====  ========  ==========
``resnet18``           torchvision ResNet-18 (:mod:`dgjax.resnet`)   224    512       torchvision
``resnet50``           torchvision ResNet-50                         224    2048      torchvision
``resnet50_augmix``    ResNet-50, timm's ``resnet50.ram_in1k``       224    2048      timm
``wrn16_2``            Wide-ResNet-16-2 (:mod:`dgjax.wide_resnet`)   32     128       none
``dinov2_vitb14``      DINOv2 ViT-B/14, DomainBed's ``DinoV2``       224    3840      dinov2 hub
``clip_vitb16``        CLIP ViT-B/16 image tower (beyond DomainBed)  224    512       OpenAI
=====================  ============================================  =====  ========  ==========

DomainBed's choice (``networks.Featurizer`` and ``networks.ResNet``; :func:`select`): a
32x32 input gets the Wide-ResNet; a 224x224 input gets ``DinoV2`` if the hparams ``vit`` and
``dinov2`` are both true (``vit`` alone raises there), else a ResNet: timm's ResNet-50
weights when ``resnet50_augmix`` (its default, true), else torchvision's ResNet-18 or -50 by
``resnet18``. One deviation: DomainBed's ``ResNet`` builds ResNet-18 and then replaces it by
timm's ResNet-50 whenever ``resnet50_augmix`` is true, so ``resnet18=True`` has no effect
under the current defaults; here ``resnet18=True`` selects ResNet-18 (it is never drawn by the
random search, so only an explicit override meets the difference). ``resnet50`` and
``resnet50_augmix`` are one architecture; they differ in the weights file (and so in
:func:`dgjax.convert_weights.missing_weights_message`).

``--backbone NAME`` picks a backbone directly and writes DomainBed's selecting hparams into the
run's hparams (:func:`hparam_overrides`: e.g. ``vit=true, dinov2=true`` for
``dinov2_vitb14``), so the records say what DomainBed would have built; an explicit
``--hparams`` value that contradicts it is an error. ``clip_vitb16`` records ``vit=true,
dinov2=false`` (a combination DomainBed refuses). ``--backbone auto`` (default): image
datasets select by the hparams (DomainBed's datasets are 224x224 whatever ``--image_size``
resizes them to); the in-memory datasets keep their own network (``MNIST_CNN``, the MLP).

Hparams each backbone reads: ResNets ``resnet_dropout``, ``freeze_bn``; ViTs
``vit_dropout``, ``vit_attn_tune``; the Wide-ResNet none (DomainBed's takes none: dropout 0,
BatchNorm always in training mode). Missing hparams take DomainBed's defaults.

Known difference: DomainBed's URM replaces the featurizer's ``activation``, which its ResNet,
Wide-ResNet, MNIST CNN and MLP apply to their output and its ``DinoV2`` never does (it has
none); dgjax's URM applies its activation to every backbone's features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dgjax import resnet
from dgjax.models import BackboneClassifier

__all__ = [
  "BACKBONES",
  "Backbone",
  "BackboneClassifier",
  "DTYPES",
  "get_backbone",
  "hparam_overrides",
  "in_memory_model",
  "init_variables",
  "make_classifier",
  "select",
]

#: ``compute_dtype`` names
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One backbone: its family (how it is built and converted), the input size it is meant
  for, its feature width, DomainBed's hparams that select it and the weights it loads
  (a key of :data:`dgjax.convert_weights.SOURCES`, ``None``: none are published)."""

  name: str
  description: str
  family: str  # "resnet", "wrn", "dinov2", "clip"
  input_size: int
  num_features: int
  selected_by: Mapping[str, bool]
  weights: str | None
  arch: str  # the architecture (weights files record it); resnet50_augmix's is resnet50


BACKBONES: dict[str, Backbone] = {
  b.name: b
  for b in (
    Backbone(
      "resnet18",
      "torchvision ResNet-18 (DomainBed's resnet18=True)",
      "resnet",
      224,
      512,
      {"resnet18": True, "resnet50_augmix": False, "vit": False},
      "resnet18",
      "resnet18",
    ),
    Backbone(
      "resnet50",
      "torchvision ResNet-50 (DomainBed of the paper)",
      "resnet",
      224,
      2048,
      {"resnet18": False, "resnet50_augmix": False, "vit": False},
      "resnet50",
      "resnet50",
    ),
    Backbone(
      "resnet50_augmix",
      "ResNet-50 with timm's resnet50.ram_in1k weights (DomainBed's default)",
      "resnet",
      224,
      2048,
      {"resnet18": False, "resnet50_augmix": True, "vit": False},
      "resnet50_augmix",
      "resnet50",
    ),
    Backbone(
      "wrn16_2",
      "Wide-ResNet-16-2 (DomainBed's featurizer for 32x32 inputs)",
      "wrn",
      32,
      128,
      {},
      None,
      "wrn16_2",
    ),
    Backbone(
      "dinov2_vitb14",
      "DINOv2 ViT-B/14, DomainBed's DinoV2 (vit=True, dinov2=True)",
      "dinov2",
      224,
      3840,
      {"vit": True, "dinov2": True},
      "dinov2_vitb14",
      "dinov2_vitb14",
    ),
    Backbone(
      "clip_vitb16",
      "OpenAI CLIP ViT-B/16 image tower, 512-d image embedding (not in DomainBed)",
      "clip",
      224,
      512,
      {"vit": True, "dinov2": False},
      "clip_vitb16",
      "clip_vitb16",
    ),
  )
}


def get_backbone(name: str) -> Backbone:
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None


def select(hparams: Mapping[str, Any], input_shape=None) -> str:
  """DomainBed's featurizer choice (module docstring) for an NHWC ``input_shape`` (``None``:
  a 224x224 image) and ``hparams``."""
  if input_shape is not None and tuple(input_shape[:2]) == (32, 32) and len(input_shape) == 3:
    return "wrn16_2"
  if hparams.get("vit", False):
    if hparams.get("dinov2", False):
      return "dinov2_vitb14"
    raise ValueError(
      "vit=true needs dinov2=true (DomainBed's only ViT is DinoV2; it raises "
      "NotImplementedError otherwise); for CLIP's ViT pass --backbone clip_vitb16"
    )
  if hparams.get("resnet18", False):
    return "resnet18"
  return "resnet50_augmix" if hparams.get("resnet50_augmix", True) else "resnet50"


def hparam_overrides(
  backbone: str, overrides: Mapping[str, Any], valid: Any = None
) -> dict[str, Any]:
  """``overrides`` with ``backbone``'s selecting hparams added (those in ``valid``, the
  run's hparam names; ``None``: all); ``"auto"`` adds nothing. An override that contradicts
  the backbone raises naming both."""
  if backbone == "auto":
    return dict(overrides)
  implied = {
    k: v for k, v in get_backbone(backbone).selected_by.items() if valid is None or k in valid
  }
  clash = sorted(k for k, v in implied.items() if k in overrides and bool(overrides[k]) != v)
  if clash:
    raise ValueError(
      f"--backbone {backbone} means "
      + ", ".join(f"{k}={str(v).lower()}" for k, v in implied.items())
      + "; --hparams sets "
      + ", ".join(f"{k}={overrides[k]!r}" for k in clash)
    )
  return {**implied, **overrides}


def featurizer(
  name: str,
  hparams: Mapping[str, Any] | None = None,
  *,
  dtype: Any = jnp.float32,
  remat: bool = False,
  conv_impl: str = "xla",
  **sizes: Any,
) -> nn.Module:
  """Backbone ``name``'s featurizer (named ``"featurizer"``) with ``hparams``' dropout /
  BatchNorm / attention-tuning settings; ``sizes`` override the module's architecture fields
  (tests build tiny ones: ``width``, ``depth``, ``patch``...)."""
  from dgjax import vit, wide_resnet

  b = get_backbone(name)
  hp = dict(hparams or {})
  common = {"dtype": dtype, "remat": remat, "name": "featurizer"}
  if b.family == "resnet":
    block, stages, _ = resnet.ARCHS[b.arch]
    kw = {"stage_sizes": stages, "block": block, **sizes}
    return resnet.ResNet(
      dropout=float(hp.get("resnet_dropout", 0.0)),
      freeze_bn=bool(hp.get("freeze_bn", False)),
      **kw,
      **common,
    )
  if b.family == "wrn":
    kw = {"depth": 16, "widen_factor": 2, **sizes}
    return wide_resnet.WideResNet(conv_impl=conv_impl, **kw, **common)
  vit_kw = {
    "dropout": float(hp.get("vit_dropout", 0.0)),
    "attn_tune": bool(hp.get("vit_attn_tune", False)),
  }
  module = vit.DinoV2 if b.family == "dinov2" else vit.CLIPVisionTower
  return module(**vit_kw, **sizes, **common)


def make_classifier(
  name: str,
  num_classes: int,
  hparams: Mapping[str, Any] | None = None,
  **options: Any,
):
  """Backbone ``name`` + a ``num_classes`` linear head; ``options`` as :func:`featurizer`.
  A :class:`dgjax.models.BackboneClassifier` (the ResNets as
  :class:`dgjax.resnet.ResNetClassifier`)."""
  feat = featurizer(name, hparams, **options)
  if get_backbone(name).family == "resnet":
    return resnet.ResNetClassifier(featurizer=feat, num_classes=num_classes)
  return BackboneClassifier(
    featurizer=feat,
    num_classes=num_classes,
    copies_input_kernels=get_backbone(name).family in ("dinov2", "clip"),
  )


def in_memory_model(config, base_model, input_shape):
  """The network of an in-memory dataset's run: ``base_model`` (the dataset's own) under
  ``--backbone auto``, else backbone ``config.backbone`` with the same number of classes,
  freshly initialised (no weights are loaded for these datasets). Its fit to the dataset's
  NHWC ``input_shape`` is checked here (an abstract init), before any compiling."""
  if config.backbone == "auto":
    return base_model
  if len(input_shape) != 3:
    raise ValueError(
      f"--backbone {config.backbone} needs image inputs [H, W, C]; dataset {config.dataset} has "
      f"inputs of shape {tuple(input_shape)}"
    )
  model = make_classifier(
    config.backbone,
    base_model.num_classes,
    config.resolved_hparams,
    dtype=DTYPES[config.compute_dtype],
    remat=config.remat,
    conv_impl=config.conv_impl,
  )
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  except ValueError as e:
    raise ValueError(f"--backbone {config.backbone} on dataset {config.dataset}: {e}") from None
  return model


def init_variables(model: nn.Module, key, image_size: int = 224, channels: int = 3):
  """``model``'s variables (``params``, and ``batch_stats`` where it has BatchNorm) for
  ``image_size`` inputs, initialised in one jitted call."""
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return jax.jit(lambda k: model.init({"params": k}, x))(key)
