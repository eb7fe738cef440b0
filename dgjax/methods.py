"""The registry of training methods: ``--method`` name -> :class:`dgjax.core.Method`.

Each method is defined in its family's module under :mod:`dgjax.algorithms`; adding one is
that module's block plus one entry in :data:`ALL_METHODS`, the one list the registry is filled
from. Name-based helpers (hparam specs, defaults, DomainBed's random draws, override
resolution) look the method up and defer to :mod:`dgjax.core`.
"""

from __future__ import annotations

from typing import Any, Mapping

from dgjax import core
from dgjax.algorithms import adaptation as _adaptation
from dgjax.algorithms import adrmx as _adrmx
from dgjax.algorithms import adversarial as _adversarial
from dgjax.algorithms import causal as _causal
from dgjax.algorithms import contrastive as _contrastive
from dgjax.algorithms import erm_variants as _erm_variants
from dgjax.algorithms import feature_mixing as _feature_mixing
from dgjax.algorithms import gradient_combination as _combination
from dgjax.algorithms import hessian_alignment as _hessian
from dgjax.algorithms import invariance as _invariance
from dgjax.algorithms import meta_gradient as _meta_gradient
from dgjax.algorithms import meta_learning as _meta
from dgjax.algorithms import mixing as _mixing
from dgjax.algorithms import representation as _representation
from dgjax.algorithms import risk_shaping as _risk_shaping
from dgjax.core import Context, HParam, Method, MethodStep  # noqa: F401  (the protocol, for users)
from dgjax.losses import cross_entropy  # noqa: F401

#: Every training method, in the registry's (and the results tables') order.
ALL_METHODS: tuple[Method, ...] = (
  _combination.ERM,
  _combination.AND_MASK,
  _combination.SAND_MASK,
  _combination.GROUP_DRO,
  _invariance.IRM,
  _invariance.VREX,
  _invariance.CORAL,
  _invariance.MMD,
  _invariance.IGA,
  _invariance.FISHR,
  _invariance.SD,
  _mixing.MIXUP,
  _meta.FISH,
  _hessian.HGP,
  _hessian.HUTCHINSON,
  _hessian.CMA,
  _adversarial.DANN,
  _adversarial.CDANN,
  _meta_gradient.MLDG,
  _feature_mixing.MTL,
  _feature_mixing.SAGNET,
  _adaptation.ARM,
  _adversarial.TRANSFER,
  _representation.IB_ERM,
  _representation.IB_IRM,
  _representation.RSC,
  _representation.SELFREG,
  _risk_shaping.EQRM,
  _risk_shaping.RDM,
  _risk_shaping.TRM,
  _causal.CAUSIRL_CORAL,
  _causal.CAUSIRL_MMD,
  _contrastive.CAD,
  _contrastive.COND_CAD,
  _erm_variants.ERM_PLUS_PLUS,
  _erm_variants.URM,
  _adrmx.ADRMX,
)

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` under ``method.name``; a second method of the same name raises."""
  if method.name in METHODS:
    raise ValueError(f"method {method.name!r} is already registered")
  METHODS[method.name] = method
  return method


for _method in ALL_METHODS:
  register(_method)


def get_method(name: str) -> Method:
  """The registered method ``name``; an unknown name raises listing the valid ones."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(
      f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
    ) from None


def dataset_facts(dataset: str | core.DatasetFacts | None) -> core.DatasetFacts | None:
  """``dataset`` as the hparam rules read it: a registered dataset's name becomes its
  :class:`dgjax.datasets.Dataset` (an unknown name raises listing the valid ones)."""
  if not isinstance(dataset, str):
    return dataset
  from dgjax import datasets  # lazily: the dataset registry imports nothing of the methods

  return datasets.get_dataset(dataset)


def hparam_specs(method: str, dataset: str | core.DatasetFacts | None = None) -> dict[str, HParam]:
  return core.hparam_specs(get_method(method), dataset_facts(dataset))


def default_hparams(method: str, dataset: str | core.DatasetFacts | None = None) -> dict[str, Any]:
  return core.default_hparams(get_method(method), dataset_facts(dataset))


def random_hparams(
  method: str, seed: int, dataset: str | core.DatasetFacts | None = None
) -> dict[str, Any]:
  return core.random_hparams(get_method(method), seed, dataset_facts(dataset))


def resolve_hparams(
  method: str,
  hparams_seed: int = 0,
  overrides: Mapping[str, Any] | None = None,
  trial_seed: int = 0,
  dataset: str | core.DatasetFacts | None = None,
  preset: str | None = None,
) -> dict[str, Any]:
  """See :func:`dgjax.core.resolve_hparams`; ``dataset`` may be a registered dataset's name."""
  return core.resolve_hparams(
    get_method(method), hparams_seed, overrides, trial_seed, dataset_facts(dataset), preset
  )


def structural_hparams(method: str) -> list[str]:
  return core.structural_hparams(get_method(method))
