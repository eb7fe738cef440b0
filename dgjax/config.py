"""One declaration of a run's configuration: :class:`TrainConfig`, and the machinery every
other configuration dataclass of dgjax is declared with (the IRM-style benchmark's
:class:`dgjax.irm_benchmark.IRMConfig`, the sweep's :class:`dgjax.sweep.SweepConfig`: the
functions below take the class as ``cls``).

Every field says in its metadata what it is to the rest of dgjax, and everything that lists
fields is derived from that, so a new field is one declaration here:

* ``help``: every field (but ``resolved_hparams``) is a flag of ``python -m
  experiments.train`` with the field's name, this help and a kind read from the field's type
  (:func:`flag_specs`); :func:`to_argv` writes a config back as those flags and
  :func:`from_flag_values` reads them;
* ``identity``: it changes the data, the model or the numbers, so a checkpoint written
  under another value is not resumed (:meth:`TrainConfig.identity`);
* ``per_run``: the runs of one vmapped program may differ in it; they must agree on every
  other field and on every structural hparam (:func:`check_vmap_group`,
  :func:`vmap_group_key`);
* ``record``: how it appears in the ``args`` of every record (``dgjax.runs.record_args``):
  ``"domainbed"`` (a key of DomainBed's ``train.py``), ``"dgjax"`` (dgjax's own) or ``None``;
* ``sweep``: the sweep flag that sets it (``None``: ``--train_arg`` may); a flag of the
  field's own name (``"--steps"`` for ``steps``) gives every job the value as it is
  (:func:`sweep_passed_fields`: the sweep's command line has it, with this help);
* ``flag_default``: the flag's default where it is not the field's (``None``: the
  dataset's value, resolved by ``dgjax.runs.make_config``);
* ``flag``: ``False`` for a field its program sets, not a flag of its own;
* ``choices`` / ``minimum``: the valid values, checked on construction
  (:func:`check_fields`).

The names are resolved once, on construction: the method and dataset objects
(``resolved_method``, ``resolved_dataset``) and the hparams (``resolved_hparams``) are
carried by the config, so nothing downstream looks a name up again.

The command lines (``experiments/``) define one flag per field from :func:`flag_specs`; what
a command line has beyond its config's fields (``--resume``, a launcher's options, where a
report goes) is not run configuration.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import types
import typing
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from dgjax.backbones import BACKBONES, DTYPES

#: Where an image dataset is read from: DomainBed's folders, or a prepared TFDS copy.
DATA_SOURCES = ("folder", "tfds")
PER_DOMAIN_IMPLS = ("auto", "vmap", "unrolled")
#: How K runs trained as one program (the vmap launcher) are mapped: ``jax.vmap``, or a
#: trace-time loop (each run's operations as when it trains alone); ``auto`` picks per backend.
RUNS_IMPLS = ("auto", "vmap", "unrolled")
RECORD_KINDS = ("domainbed", "dgjax", None)
_UNSET = object()


def config_field(
  default=_UNSET,
  help: str | Callable[[], str] = "",
  *,
  identity: bool = False,
  per_run: bool = False,
  record: str | None = None,
  sweep: str | None = None,
  flag_default: Any = _UNSET,
  choices: Sequence[Any] | None = None,
  minimum: int | None = None,
  factory: Callable[[], Any] | None = None,
  flag: bool = True,
):
  """A config field: its default (or ``factory``) and its metadata (see the module
  docstring; ``flag=False``: set by the program, not a flag of its own)."""
  if record not in RECORD_KINDS:
    raise ValueError(f"record must be one of {RECORD_KINDS}, got {record!r}")
  metadata = {
    "help": help,
    "identity": identity,
    "per_run": per_run,
    "record": record,
    "sweep": sweep,
    "choices": None if choices is None else tuple(choices),
    "minimum": minimum,
    "flag": flag,
  }
  if flag_default is not _UNSET:
    metadata["flag_default"] = flag_default
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def _datasets_help() -> str:
  from dgjax import datasets

  return f"the benchmark, one of: {', '.join(sorted(datasets.DATASETS))}"


def _methods_help() -> str:
  from dgjax import methods

  return f"training method, one of: {', '.join(sorted(methods.METHODS))}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one run depends on (DomainBed's ``train.py`` arguments), validated on
  construction; ``resolved_hparams`` is the run's full hparams, resolved once here
  (defaults or DomainBed's draw for ``hparams_seed``, the method's ``preset``, then the
  ``hparams`` overrides). See the module docstring for what each field's metadata says.
  """

  method: str = config_field(
    "erm", _methods_help, identity=True, record="domainbed", sweep="--methods"
  )
  test_envs: tuple[int, ...] = config_field(
    (2,),
    "test environments, e.g. 0 or 0,1 (DomainBed's --test_envs; held-out pairs for "
    "leave-one-domain-out selection). Default: the dataset's",
    identity=True,
    record="domainbed",
    sweep="--test_envs (one job per held-out environment, or only these)",
    flag_default=None,
  )
  steps: int = config_field(
    5001,
    "training steps (default: the dataset's, 5001: hours on a CPU for the MNIST ones)",
    record="domainbed",
    sweep="--steps",
    flag_default=None,
    minimum=1,
  )
  checkpoint_freq: int = config_field(
    100,
    "evaluate and checkpoint every this many steps (default: the dataset's, 100 for the "
    "MNIST ones)",
    identity=True,
    record="domainbed",
    sweep="--checkpoint_freq",
    flag_default=None,
    minimum=1,
  )
  seed: int = config_field(
    0,
    "seed for initialisation and minibatch sampling",
    identity=True,
    per_run=True,
    record="domainbed",
    sweep="(derived from the others)",
  )
  trial_seed: int = config_field(
    0,
    "seed for the dataset construction and the in/out splits",
    identity=True,
    record="domainbed",
    sweep="--n_trials",
  )
  hparams_seed: int = config_field(
    0,
    "0: the default hparams; else DomainBed's random draw (seed_hash(hparams_seed, trial_seed))",
    identity=True,
    per_run=True,
    record="domainbed",
    sweep="--n_hparams",
  )
  hparams: Mapping[str, Any] = config_field(
    help="JSON object of hparam overrides, e.g. '{\"lr\": 1e-4}'; see the README's method "
    "table for each method's hparams",
    per_run=True,
    record="domainbed",
    sweep="--hparams",
    factory=dict,
  )
  preset: str | None = config_field(
    None,
    "a named set of the method's hparams, applied before --hparams (e.g. hgp's "
    "'irm_schedule'; see the README's method table)",
    per_run=True,
    record="dgjax",
  )
  holdout_fraction: float = config_field(
    0.2,
    "fraction of each environment held out (the out-split)",
    identity=True,
    record="domainbed",
    sweep="--holdout_fraction",
  )
  eval_batch_size: int = config_field(1000, "examples per evaluation chunk", minimum=1)
  per_domain_impl: str = config_field(
    "auto",
    "lowering of the per-domain gradients (the same numbers up to rounding; auto "
    "picks the fastest for the backend)",
    record="dgjax",
    choices=PER_DOMAIN_IMPLS,
  )
  runs_impl: str = config_field(
    "auto",
    "how K runs in one program (the vmap launcher) are mapped: vmap, or unrolled (a "
    "trace-time loop, each run's operations as when it trains alone); auto: unrolled on CPU "
    "(faster there), vmap elsewhere. The same numbers up to rounding",
    record="dgjax",
    choices=RUNS_IMPLS,
  )
  progress: bool = config_field(
    True,
    "show progress (a bar on a terminal, one line per evaluation otherwise); --noprogress: none",
    per_run=True,
  )
  keep_checkpoints: int = config_field(
    3,
    "checkpoints kept (a damaged or unreadable newest one falls back to the previous)",
    per_run=True,
    minimum=1,
  )
  scan_steps: int = config_field(
    1, "training steps per jit call (lax.scan)", record="dgjax", minimum=1
  )
  dataset: str | None = config_field(
    None,
    _datasets_help,
    identity=True,
    record="domainbed",
    sweep="--datasets",
    flag_default="ColoredMNIST",
  )
  data_dir: str | None = config_field(
    None,
    "where the dataset is read from: MNIST IDX files (Fashion-MNIST ones for "
    "ColoredFashionMNIST; default: TFDS), DomainBed's download.py folder for the image "
    "datasets (the wilds package's folders for WILDSCamelyon/WILDSFMoW, the one holding "
    "spawrious224/ for Spawrious), your <environment>/<class>/<image> tree for ImageFolder; "
    "Spirals, Debug28 and Debug224 need none",
    record="domainbed",
    sweep="--data_dir",
  )
  max_examples: int | None = config_field(
    None,
    "MNIST variants: use only the first N pooled images; Spirals: N examples per "
    "environment (quick runs)",
    identity=True,
    record="dgjax",
    minimum=1,
  )
  downsample: bool = config_field(
    False, "Colored datasets: subsample images to 14x14", identity=True, record="dgjax"
  )
  conv_impl: str = config_field("auto", "convolution lowering, see dgjax.conv", record="dgjax")
  mesh: str = config_field(
    "auto",
    "shard the step over a DOMAINSxDATA device mesh, e.g. 1x8 or 2x4; 'auto': every "
    "device on the data axis when there are several, else none; 'none': one device "
    "(vmapped runs always use one)",
    record="dgjax",
  )
  output_dir: str | None = config_field(
    None,
    "where results.jsonl, the checkpoints and done go (default "
    "runs/<dataset>/<method>_test<envs>_seed<seed>)",
    per_run=True,
    record="domainbed",
    sweep="(the job's directory)",
  )
  pretrained: str | None = config_field(
    None,
    "image datasets: ImageNet weights converted by `python -m "
    "experiments.convert_weights` (a .msgpack file), or 'none' to train the ResNet from "
    "scratch",
    record="dgjax",
  )
  image_size: int = config_field(
    224,
    "image datasets: input resolution (DomainBed: 224)",
    identity=True,
    record="dgjax",
    minimum=1,
  )
  backbone: str = config_field(
    "auto",
    "the featurizer: auto (image datasets: DomainBed's choice from the hparams resnet18 / "
    "resnet50_augmix / vit / dinov2; the in-memory datasets: their own network) or one of "
    + ", ".join(BACKBONES)
    + " (sets DomainBed's selecting hparams; see dgjax.backbones)",
    identity=True,
    record="dgjax",
    choices=("auto", *BACKBONES),
  )
  compute_dtype: str = config_field(
    "float32",
    "the backbone's compute dtype; bfloat16: mixed precision (parameters, BatchNorm "
    "statistics, features and the head stay float32)",
    identity=True,
    record="dgjax",
    choices=tuple(DTYPES),
  )
  remat: bool = config_field(
    False,
    "recompute each backbone block's activations in the backward pass (jax.checkpoint): "
    "less memory for about one more forward pass",
    record="dgjax",
  )
  data_workers: int = config_field(
    2,
    "image datasets: grain worker processes decoding the JPEGs (0: in this process; "
    "the numbers do not depend on it)",
    per_run=True,
    minimum=0,
  )
  data_source: str = config_field(
    "folder",
    "image datasets: 'folder' reads DomainBed's download.py layout under "
    "--data_dir; 'tfds' a TensorFlow Datasets copy prepared as array_record (DomainNet only; "
    "--data_dir = the TFDS data dir, default $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    identity=True,
    record="dgjax",
    choices=DATA_SOURCES,
  )
  swad: bool = config_field(
    False,
    "SWAD (Cha et al. 2021): also average the weights of every step over the "
    "validation-loss valley and write the averaged model's evaluation as swad_* keys (see "
    "dgjax.swad)",
    identity=True,
    record="dgjax",
  )
  swad_n_converge: int = config_field(
    3, "SWAD: convergence window, in evaluations", identity=True, record="dgjax"
  )
  swad_n_tolerance: int = config_field(
    6, "SWAD: loss-smoothing window, in evaluations", identity=True, record="dgjax"
  )
  swad_tolerance_ratio: float = config_field(
    0.3,
    "SWAD: how far above the converged validation loss the valley may rise",
    identity=True,
    record="dgjax",
  )
  resolved_method: Any = dataclasses.field(
    init=False,
    compare=False,
    repr=False,
    metadata={"identity": False, "per_run": True, "record": None},
  )
  resolved_dataset: Any = dataclasses.field(
    init=False,
    compare=False,
    repr=False,
    metadata={"identity": False, "per_run": True, "record": None},
  )
  resolved_hparams: Mapping[str, Any] = dataclasses.field(
    init=False,
    compare=False,
    repr=False,
    metadata={"identity": True, "per_run": True, "record": None},
  )

  def __post_init__(self):
    from dgjax import core, datasets  # lazily: the registries import this module's users

    # ``method`` / ``dataset`` may be given resolved (a ``Method`` / ``Dataset``): the field
    # keeps the name, the object is carried as ``resolved_method`` / ``resolved_dataset``
    method = self.method if isinstance(self.method, core.Method) else _get_method(self.method)
    dataset = self.dataset
    if dataset is not None and not isinstance(dataset, datasets.Dataset):
      dataset = datasets.get_dataset(dataset)
    object.__setattr__(self, "method", method.name)
    object.__setattr__(self, "dataset", None if dataset is None else dataset.name)
    object.__setattr__(self, "resolved_method", method)
    object.__setattr__(self, "resolved_dataset", dataset)
    object.__setattr__(self, "test_envs", tuple(int(e) for e in self.test_envs))
    object.__setattr__(self, "hparams", dict(self.hparams or {}))
    check_fields(self)
    if not 0.0 <= self.holdout_fraction < 1.0:
      raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}")
    if self.swad:
      from dgjax import swad as swad_lib

      swad_lib.LossValley(self.swad_n_converge, self.swad_n_tolerance, self.swad_tolerance_ratio)
      if self.holdout_fraction == 0:
        raise ValueError(
          "swad reads the training-domain validation loss: holdout_fraction must be > 0"
        )
    from dgjax.backbones import hparam_overrides

    # --backbone writes DomainBed's hparams that select it (those the dataset has); the
    # dataset gives small- or large-image values and its own hparams (e.g. resnet_dropout)
    overrides = hparam_overrides(self.backbone, self.hparams, core.hparam_specs(method, dataset))
    object.__setattr__(
      self,
      "resolved_hparams",
      core.resolve_hparams(
        method, self.hparams_seed, overrides, self.trial_seed, dataset, self.preset
      ),
    )
    if self.backbone == "auto" and "vit" in self.resolved_hparams:  # e.g. vit without dinov2
      from dgjax.backbones import select

      select(self.resolved_hparams)
    own_network = dataset is not None and dataset.make_task is None
    if self.backbone == "auto" and own_network and (self.compute_dtype != "float32" or self.remat):
      raise ValueError(
        f"--compute_dtype and --remat apply to the backbones; dataset {self.dataset} trains its "
        f"own network under --backbone auto (pass a --backbone to use them)"
      )

  def identity(self) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run: every ``identity`` field (the
    hparams as resolved), as JSON values (:func:`identity_of`; the engine adds the task's
    data fingerprint, :meth:`dgjax.task.Task.data_fingerprint`)."""
    return identity_of(self)


def _get_method(name: str):
  from dgjax import methods

  return methods.get_method(name)


def check_fields(config: Any) -> None:
  """Every field's ``minimum`` and ``choices`` (a ``ValueError`` naming the first bad one)."""
  for f in config_fields(type(config)):
    _check_value(f, getattr(config, f.name))


def identity_of(config: Any) -> dict[str, Any]:
  """Every ``identity`` field of ``config``, as JSON values: what a stored result or
  checkpoint must match to stand for this configuration."""
  return json.loads(
    json.dumps(
      {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.metadata["identity"]
      },
      sort_keys=True,
    )
  )


def _check_value(f: dataclasses.Field, value: Any) -> None:
  """``f``'s ``minimum`` and ``choices``: a ``ValueError`` naming the field."""
  minimum, choices = f.metadata["minimum"], f.metadata["choices"]
  if minimum is not None:
    optional = f.default is None
    if value is None and optional:
      return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      if optional:
        raise ValueError(f"{f.name} must be >= {minimum} (an integer, or unset), got {value!r}")
      raise ValueError(f"{f.name} must be an integer >= {minimum}, got {value!r}")
  if choices is not None and value not in choices:
    raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")


def config_fields(cls: type = None) -> tuple[dataclasses.Field, ...]:
  """The fields a config (of ``cls``, default :class:`TrainConfig`) is built from (all but
  ``resolved_hparams``)."""
  return tuple(f for f in dataclasses.fields(cls or TrainConfig) if f.init)


def field_default(name: str, cls: type = None) -> Any:
  """Field ``name``'s default (of ``cls``, default :class:`TrainConfig`)."""
  return _default_of({f.name: f for f in config_fields(cls)}[name])


def _default_of(f: dataclasses.Field) -> Any:
  return f.default_factory() if f.default is dataclasses.MISSING else f.default


def help_text(f: dataclasses.Field) -> str:
  h = f.metadata["help"]
  return h() if callable(h) else h


# ------------------------------------------------------------------------- command line
class FlagSpec(NamedTuple):
  """How a field is a command-line flag: ``kind`` is ``"string"``, ``"integer"``,
  ``"float"``, ``"bool"``, ``"enum"`` (``choices``), ``"list"`` (comma-separated integers),
  ``"strings"`` (comma-separated names) or ``"json"`` (a JSON object)."""

  name: str
  kind: str
  default: Any
  help: str
  choices: tuple[Any, ...] | None = None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def value_type(name: str, cls: type = None) -> tuple[type, bool]:
  """``(type, optional)`` of field ``name``: ``int``, ``float``, ``bool``, ``str``,
  ``tuple`` or ``Mapping``; ``optional`` when ``None`` is a valid value."""
  tp = _field_types(cls or TrainConfig)[name]
  optional = False
  if typing.get_origin(tp) in (types.UnionType, typing.Union):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional, tp = True, args[0]
  origin = typing.get_origin(tp) or tp
  if origin is tuple:
    return tuple, optional
  if origin is collections.abc.Mapping or origin is dict:
    return Mapping, optional
  return origin, optional


def _item_type(name: str, cls: type = None) -> type:
  """The item type of a tuple field ``name`` (``tuple[int, ...]``: ``int``)."""
  tp = _field_types(cls or TrainConfig)[name]
  if typing.get_origin(tp) in (types.UnionType, typing.Union):
    tp = next(a for a in typing.get_args(tp) if a is not type(None))
  return typing.get_args(tp)[0]


_KINDS = {
  int: "integer",
  float: "float",
  bool: "bool",
  str: "string",
  tuple: "list",
  Mapping: "json",
}


def flag_specs(cls: type = None) -> list[FlagSpec]:
  """Every field (of ``cls``, default :class:`TrainConfig`) as a flag of ``python -m
  experiments.train``."""
  specs = []
  for f in config_fields(cls):
    if not f.metadata.get("flag", True):
      continue
    default = f.metadata.get("flag_default", _UNSET)
    if default is _UNSET:
      default = _default_of(f)
    kind = _KINDS[value_type(f.name, cls)[0]]
    if kind == "list" and _item_type(f.name, cls) is str:
      kind = "strings"
    if f.metadata["choices"] is not None:
      kind = "enum"
    if kind in ("list", "strings") and default is not None:
      default = ",".join(map(str, default))
    if kind == "json":
      default = json.dumps(default) if default else None
    specs.append(FlagSpec(f.name, kind, default, help_text(f), f.metadata["choices"]))
  return specs


def to_argv(config: TrainConfig) -> list[str]:
  """``config`` as ``--flag=value`` arguments of :func:`flag_specs` (unset ones left out),
  which :func:`from_flag_values` turns back into the same fields."""
  argv = []
  for spec in flag_specs(type(config)):
    value = getattr(config, spec.name)
    if value is None:
      continue
    if spec.kind == "bool":
      argv.append(f"--{spec.name}" if value else f"--no{spec.name}")
    elif spec.kind in ("list", "strings"):
      argv.append(f"--{spec.name}=" + ",".join(map(str, value)))
    elif spec.kind == "json":
      if value:
        argv.append(f"--{spec.name}=" + json.dumps(dict(value), sort_keys=True))
    else:
      argv.append(f"--{spec.name}={value}")
  return argv


def parse_json_object(name: str, value: str | None) -> dict[str, Any]:
  """Flag ``name``'s JSON object (``None`` or empty: ``{}``), or a ``ValueError`` saying what
  is wrong."""
  if not value:
    return {}
  try:
    out = json.loads(value)
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} is not valid JSON: {e}") from None
  if not isinstance(out, Mapping):
    raise ValueError(f"--{name} must be a JSON object, got {value!r}")
  return dict(out)


def from_flag_values(values: Mapping[str, Any], cls: type = None) -> dict[str, Any]:
  """Config fields (of ``cls``, default :class:`TrainConfig`) from flag values (as absl or
  argparse hold them: a comma-separated string or a list of strings for ``list`` and
  ``strings`` flags, the JSON text for ``json`` ones); a ``ValueError`` names a bad flag."""
  out = {}
  for spec in flag_specs(cls):
    if spec.name not in values:
      continue
    value = values[spec.name]
    if spec.kind in ("list", "strings") and value is not None:
      items = [
        v for part in ([value] if isinstance(value, str) else value) for v in part.split(",")
      ]
    if spec.kind == "list" and value is not None:
      try:
        value = tuple(int(v) for v in items) or None
      except ValueError:
        raise ValueError(
          f"--{spec.name} must be integers (got {','.join(map(str, items))})"
        ) from None
    elif spec.kind == "strings" and value is not None:
      value = tuple(v.strip() for v in items if v.strip()) or None
    elif spec.kind == "json":
      value = parse_json_object(spec.name, value)
    out[spec.name] = value
  return out


# ------------------------------------------------------------------- sweeps and records
def sweep_fields(cls: type = None) -> dict[str, str]:
  """The fields a sweep sets for every job, each with the sweep flag that sets it."""
  return {f.name: f.metadata["sweep"] for f in config_fields(cls) if f.metadata["sweep"]}


def sweep_passed_fields(cls: type = None) -> list[FlagSpec]:
  """The fields a sweep passes to every job as they are, by a flag of the field's own name
  (``sweep`` metadata ``"--<name>"``), as flags (the sweep's default is the flag's)."""
  passed = {f.name for f in config_fields(cls) if f.metadata["sweep"] == f"--{f.name}"}
  return [spec for spec in flag_specs(cls) if spec.name in passed]


def check_field_value(name: str, value: Any, what: str = "", cls: type = None) -> None:
  """A ``ValueError`` unless ``value`` (a JSON value) has field ``name``'s type; ``what``
  prefixes the message (e.g. ``"--train_arg "``)."""
  tp, optional = value_type(name, cls)
  if value is None and optional:
    return
  if tp is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif tp is tuple:
    item = _item_type(name, cls)
    ok = isinstance(value, (list, tuple)) and all(
      isinstance(v, item) and not isinstance(v, bool) for v in value
    )
  elif tp is Mapping:
    ok = isinstance(value, Mapping)
  else:
    ok = isinstance(value, tp) and isinstance(value, bool) == (tp is bool)
  if not ok:
    f = {f.name: f for f in config_fields(cls)}[name]
    default = _default_of(f)
    kind = {Mapping: "a JSON object"}.get(tp, tp.__name__)
    if tp is tuple:
      kind = f"a list of {'integers' if _item_type(name, cls) is int else 'strings'}"
    raise ValueError(
      f"{what}{name} must be {kind}{' or null' if optional else ''} (its default "
      f"is {json.dumps(default)}), got {value!r}"
    )


def record_fields(config: TrainConfig, kind: str) -> dict[str, Any]:
  """The fields recorded in a record's ``args`` as ``kind`` (``"domainbed"``: DomainBed's
  keys; ``"dgjax"``: dgjax's own), as JSON values (an empty mapping is ``None``, as
  DomainBed records no ``--hparams``)."""
  out = {}
  for f in config_fields(type(config)):
    if f.metadata["record"] == kind:
      value = getattr(config, f.name)
      if isinstance(value, Mapping):
        value = dict(value) or None
      elif isinstance(value, tuple):
        value = list(value)
      out[f.name] = value
  return out


# -------------------------------------------------------------- K runs in one program
def shared_values(config: TrainConfig) -> dict[str, Any]:
  """What the runs of one vmapped program share: every field but the ``per_run`` ones, and
  the value of every structural hparam (``batch_size``, Hutchinson's ``hutchinson_samples``,
  ...: they set shapes or Python control flow)."""
  from dgjax import core

  out = {
    f.name: getattr(config, f.name) for f in dataclasses.fields(config) if not f.metadata["per_run"]
  }
  out.update(
    {
      f"hparam {n}": config.resolved_hparams[n]
      for n in core.structural_hparams(config.resolved_method)
    }
  )
  return out


def vmap_group_key(config: TrainConfig) -> str:
  """Equal for configs that may train as one vmapped program (:func:`shared_values`)."""
  return json.dumps(shared_values(config), sort_keys=True, default=str)


def check_vmap_group(configs: Sequence[TrainConfig]) -> None:
  """A ``ValueError`` naming the first field or structural hparam the configs disagree on."""
  first = shared_values(configs[0])
  for c in configs[1:]:
    values = shared_values(c)
    for name, value in first.items():
      if values.get(name) != value:
        if name.startswith("hparam "):
          got = sorted({shared_values(x)[name] for x in configs}, key=str)
          raise ValueError(
            f"runs in one vmapped program must share the structural hparam "
            f"{name[len('hparam ') :]!r} (got {got}); group them into separate "
            "programs"
          )
        raise ValueError(
          f"runs in one vmapped program must share {name!r}: {value!r} vs {values.get(name)!r}"
        )
