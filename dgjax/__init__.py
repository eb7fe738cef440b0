"""dgjax: JAX-native domain generalization.

Per-domain gradients, gradient-agreement masks (AND-mask, SAND-mask) as optax transforms,
DomainBed models and datasets, and a jitted train step.
"""

from dgjax.masks import accumulate_per_domain
from dgjax.masks import and_mask
from dgjax.masks import and_mask_weights
from dgjax.masks import MaskState
from dgjax.masks import masked_mean
from dgjax.masks import mean_over_domains
from dgjax.masks import sand_mask
from dgjax.masks import sand_mask_weights
from dgjax.masks import sign_agreement
from dgjax.masks import check_per_domain_grads
from dgjax.per_domain import num_domains
from dgjax.per_domain import per_domain_grads
from dgjax.per_domain import per_domain_value_and_grad

__version__ = "0.1.0"

#: Submodules reachable as attributes of ``dgjax`` without an explicit import; loaded on first
#: use, so ``import dgjax`` stays light (no Orbax, TFDS or plotting until needed).
_LAZY_SUBMODULES = (
  "algorithms",
  "checkpoints",
  "collect",
  "conv",
  "core",
  "data",
  "datasets",
  "domainbed_format",
  "hessian",
  "irm_benchmark",
  "losses",
  "methods",
  "models",
  "penalties",
  "plots",
  "progress",
  "results",
  "runs",
  "selection",
  "sharding",
  "sweep",
  "tasks",
  "train",
  "types",
)


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    import importlib

    module = importlib.import_module(f"dgjax.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'dgjax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))
