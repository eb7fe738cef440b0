"""Run arguments in DomainBed's record format, so DomainBed's own tools read dgjax's results.

DomainBed's ``scripts/train.py`` (Gulrajani & Lopez-Paz, ICLR 2021) writes one JSON line per
evaluation to ``<output_dir>/results.jsonl``: the metrics (``step``, ``env{i}_in_acc``,
``env{i}_out_acc``, ...), the run's full ``hparams`` and ``args``, its command-line arguments
(``vars(args)``). Its ``lib/reporting.py``, ``model_selection.py`` and
``scripts/collect_results.py`` read

- ``args.algorithm``, ``args.dataset``, ``args.trial_seed`` (grouping),
- ``args.test_envs`` (a list: one test environment, or two for leave-one-domain-out),
- ``args.hparams_seed`` (the hyperparameter search),
- ``step``, ``env{i}_in_acc`` and ``env{i}_out_acc`` of every environment ``i``.

:func:`domainbed_args` builds that ``args`` dict with every key of DomainBed's ``train.py``
(the keys above plus ``data_dir``, ``task``, ``hparams`` (the JSON string of overrides),
``seed``, ``steps``, ``checkpoint_freq``, ``output_dir``, ``holdout_fraction``,
``uda_holdout_fraction``, ``skip_model_save``, ``save_model_every_checkpoint``), DomainBed's
spelling of the algorithm (``ERM``, ``SANDMask``, ...) next to dgjax's ``method`` name, the
environments' names (``env_names``, for table headers and plot legends; DomainBed ignores
keys it does not know) and any further dgjax arguments.

:func:`record_method` / :func:`record_test_envs` / :func:`environment_names` read records in
this format and the older dgjax one (``args.method`` only, ``args.test_env``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

Record = dict[str, Any]


def _registered_datasets():
  """The dataset registry (:data:`dgjax.datasets.DATASETS`: each dataset's environment names,
  in DomainBed's order then dgjax's own), imported lazily: it pulls in jax."""
  from dgjax import datasets

  return datasets.DATASETS


#: Where the method name comes from, in order of preference, when reading a record.
METHOD_KEYS = ("method", "algorithm")


def _check_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"domainbed_args: {name} must be an int, got {value!r}")
  return value


def _check_optional_int(name: str, value: Any, minimum: int) -> int | None:
  if value is None:
    return None
  _check_int(name, value)
  if value < minimum:
    raise ValueError(f"domainbed_args: {name} must be >= {minimum}, got {value}")
  return value


def _algorithm_of(method: str) -> str:
  """The registered method's ``domainbed_name`` (imported lazily: the registry pulls in jax)."""
  from dgjax import methods

  name = getattr(methods.get_method(method), "domainbed_name", None)
  if not name:
    raise ValueError(f"domainbed_args: method {method!r} has no domainbed_name; pass algorithm=")
  return name


def domainbed_args(
  *,
  method: str,
  dataset: str,
  test_envs: Sequence[int],
  hparams_seed: int = 0,
  trial_seed: int = 0,
  seed: int = 0,
  output_dir: str | None = None,
  holdout_fraction: float = 0.2,
  steps: int | None = None,
  checkpoint_freq: int | None = None,
  data_dir: str | None = None,
  hparams: str | Mapping[str, Any] | None = None,
  algorithm: str | None = None,
  env_names: Sequence[str] | None = None,
  **extra: Any,
) -> dict[str, Any]:
  """A run's ``args`` in DomainBed's format (what ``vars(args)`` of its ``train.py`` holds).

  Args:
    method: dgjax's method name (``"sand"``), recorded as ``method``.
    dataset: the dataset's name (``"ColoredMNIST"``), DomainBed's spelling.
    test_envs: the test environments' indices, in the order given (one, or two for
      leave-one-domain-out). Negative indices count from the end and need ``env_names``.
    hparams_seed, trial_seed, seed, holdout_fraction, steps, checkpoint_freq, data_dir,
      output_dir: as DomainBed's flags of the same names (``None`` where not set).
    hparams: the hyperparameter overrides, a mapping or a JSON string; recorded as DomainBed
      does, a JSON string (keys sorted) or ``None``. The run's full hyperparameters belong
      in the record's top-level ``hparams``.
    algorithm: DomainBed's class name for the method (``"SANDMask"``); by default the
      registered method's ``domainbed_name``.
    env_names: the environments' names (``("+90%", "+80%", "-90%")``), recorded as
      ``env_names`` for tables and plots.
    **extra: more dgjax arguments (``max_examples``, ``per_domain_impl``, ...), recorded
      as given; each must be JSON-serialisable.

  Returns:
    A new dict: DomainBed's keys (``algorithm``, ``checkpoint_freq``, ``data_dir``,
    ``dataset``, ``holdout_fraction``, ``hparams``, ``hparams_seed``, ``output_dir``,
    ``save_model_every_checkpoint``, ``seed``, ``skip_model_save``, ``steps``, ``task``,
    ``test_envs``, ``trial_seed``, ``uda_holdout_fraction``), then ``method``, ``env_names``
    (when given) and ``extra``. Strict JSON (no ``NaN``/``Infinity``).

  Raises:
    TypeError / ValueError naming the argument, before building anything.
  """
  for name, value in (("method", method), ("dataset", dataset)):
    if not isinstance(value, str) or not value:
      raise ValueError(f"domainbed_args: {name} must be a non-empty string, got {value!r}")
  if algorithm is None:
    algorithm = _algorithm_of(method)
  if not isinstance(algorithm, str) or not algorithm.isidentifier():
    raise ValueError(
      f"domainbed_args: algorithm must be a class name such as 'ERM', got {algorithm!r}"
    )
  for name, value in (("hparams_seed", hparams_seed), ("trial_seed", trial_seed), ("seed", seed)):
    _check_int(name, value)
  if hparams_seed < 0 or trial_seed < 0:
    raise ValueError(
      f"domainbed_args: hparams_seed and trial_seed must be >= 0, got {hparams_seed}, {trial_seed}"
    )
  steps = _check_optional_int("steps", steps, 1)
  checkpoint_freq = _check_optional_int("checkpoint_freq", checkpoint_freq, 1)
  if (
    isinstance(holdout_fraction, bool)
    or not isinstance(holdout_fraction, (int, float))
    or not 0 <= holdout_fraction < 1
  ):
    raise ValueError(
      f"domainbed_args: holdout_fraction must be a number in [0, 1), got {holdout_fraction!r}"
    )
  if env_names is not None:
    env_names = [str(n) for n in env_names]
    if not env_names:
      raise ValueError("domainbed_args: env_names is empty")
  envs = _resolve_test_envs(test_envs, None if env_names is None else len(env_names))
  if isinstance(hparams, Mapping):
    hparams = json.dumps(dict(hparams), sort_keys=True, allow_nan=False)
  elif hparams is not None and not isinstance(hparams, str):
    raise TypeError(
      f"domainbed_args: hparams must be a mapping, a JSON string or None, "
      f"got {type(hparams).__name__}"
    )
  args = {
    "algorithm": algorithm,
    "checkpoint_freq": checkpoint_freq,
    "data_dir": None if data_dir is None else str(data_dir),
    "dataset": dataset,
    "holdout_fraction": float(holdout_fraction),
    "hparams": hparams,
    "hparams_seed": hparams_seed,
    "output_dir": None if output_dir is None else str(output_dir),
    "save_model_every_checkpoint": False,
    "seed": seed,
    "skip_model_save": False,
    "steps": steps,
    "task": "domain_generalization",
    "test_envs": envs,
    "trial_seed": trial_seed,
    "uda_holdout_fraction": 0,
    "method": method,
  }
  if env_names is not None:
    args["env_names"] = env_names
  clash = sorted(set(extra) & set(args))
  if clash:
    raise ValueError(f"domainbed_args: extra arguments may not redefine {', '.join(clash)}")
  for key, value in extra.items():
    try:
      json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"domainbed_args: argument {key}={value!r} is not strict JSON ({e})"
      ) from None
    args[key] = value
  return args


def _resolve_test_envs(test_envs: Sequence[int], n: int | None) -> list[int]:
  if isinstance(test_envs, (str, bytes)) or not isinstance(test_envs, Sequence) or not test_envs:
    raise ValueError(
      f"domainbed_args: test_envs must be a non-empty list of ints, got {test_envs!r}"
    )
  out = []
  for e in test_envs:
    if isinstance(e, bool) or not isinstance(e, int):
      raise TypeError(f"domainbed_args: test_envs must hold ints, got {e!r}")
    if n is not None:
      if not -n <= e < n:
        raise ValueError(f"domainbed_args: test environment {e} out of range for {n} environments")
      e %= n
    elif e < 0:
      raise ValueError(f"domainbed_args: negative test environment {e} needs env_names to resolve")
    out.append(e)
  if len(set(out)) != len(out):
    raise ValueError(f"domainbed_args: test_envs has a repeated environment: {list(test_envs)}")
  return out


# ------------------------------------------------------------------------- reading records
def record_method(record: Record) -> str:
  """The record's method: ``args.method`` (dgjax) or else ``args.algorithm`` (DomainBed)."""
  args = record.get("args", {})
  for key in METHOD_KEYS:
    if key in args:
      return str(args[key])
  raise KeyError("record has neither args.method nor args.algorithm")


def record_test_envs(record: Record) -> tuple[int, ...]:
  """The record's test environments: ``args.test_envs`` or else ``[args.test_env]`` (older
  dgjax records)."""
  args = record.get("args", {})
  if "test_envs" in args:
    return tuple(int(e) for e in args["test_envs"])
  if "test_env" in args:
    return (int(args["test_env"]),)
  raise KeyError("record has neither args.test_envs nor args.test_env")


def num_envs(record: Record) -> int:
  """The number of environments a record has accuracies for (``env0_in_acc`` ...)."""
  n = 0
  while f"env{n}_in_acc" in record:
    n += 1
  return n


def environment_names(record: Record, n: int | None = None) -> list[str]:
  """Names for a record's ``n`` environments (default: :func:`num_envs`): ``args.env_names``,
  else those its registered dataset declares (DomainBed's ``ENVIRONMENTS``), else ``env{i}``;
  a source whose length is not ``n`` is skipped."""
  n = num_envs(record) if n is None else n
  args = record.get("args", {})
  registered = _registered_datasets().get(str(args.get("dataset")))
  for names in (args.get("env_names"), registered.env_names if registered else None):
    if names is not None and len(names) == n:
      return [str(x) for x in names]
  return [f"env{i}" for i in range(n)]


def dataset_order(names) -> list[str]:
  """Datasets in the registry's order (DomainBed's, then dgjax's own), then the others sorted."""
  names, registered = set(names), list(_registered_datasets())
  return [d for d in registered if d in names] + sorted(names - set(registered))
