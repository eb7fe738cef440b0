"""A run from its configuration: load the dataset, build the task, train, record DomainBed's args.

One :class:`dgjax.train.TrainConfig` describes a run completely. The command line builds it
from flags (``python -m experiments.train``), a sweep builds it directly, and either launches
it in this process (:func:`run`, :func:`run_many`) or as ``python -m experiments.train`` with
the same values (:func:`command`, whose flags :func:`config_from_flags` turns back into an equal
config).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from dgjax import datasets
from dgjax import domainbed_format
from dgjax import methods
from dgjax import results as results_lib
from dgjax import train as train_lib
from dgjax.tasks import DomainBedTask

TrainConfig = train_lib.TrainConfig

#: The config fields that are flags of ``experiments.train`` (same names).
FLAG_FIELDS = ("dataset", "method", "preset", "steps", "checkpoint_freq", "seed", "trial_seed",
               "hparams_seed", "holdout_fraction", "data_dir", "max_examples", "downsample",
               "per_domain_impl", "conv_impl", "mesh", "output_dir", "keep_checkpoints",
               "scan_steps", "eval_batch_size", "pretrained", "image_size", "data_workers", "data_source", "swad", "swad_n_converge", "swad_n_tolerance",
               "swad_tolerance_ratio")


def test_envs_of(dataset: str, test_envs: Sequence[int] | None, data_dir=None) -> tuple[int, ...]:
  """``test_envs`` (negative: from the end) as sorted indices, or the dataset's default; an
  out-of-range index raises naming the dataset's environments."""
  ds = datasets.get_dataset(dataset)
  names = ds.environment_names(data_dir)
  n = len(names)
  envs = list(test_envs) if test_envs else [ds.default_test_env]
  bad = [e for e in envs if not -n <= e < n]
  if bad:
    raise ValueError(f"test environment(s) {bad} out of range for {dataset}: 0..{n - 1} "
                     f"({', '.join(names)})")
  envs = sorted({e % n for e in envs})
  if len(envs) == n:
    raise ValueError("every environment is a test environment: nothing to train on")
  return tuple(envs)


def make_config(dataset: str = "ColoredMNIST", test_envs: Sequence[int] | None = None,
                steps: int | None = None, checkpoint_freq: int | None = None,
                **fields: Any) -> TrainConfig:
  """A validated config for ``dataset``: test environments resolved (default: the dataset's),
  ``steps`` / ``checkpoint_freq`` defaulting to the dataset's (DomainBed's ``N_STEPS`` /
  ``CHECKPOINT_FREQ``), the default output directory
  ``runs/<dataset>/<method>_test<envs>_seed<seed>``."""
  ds = datasets.get_dataset(dataset)
  envs = test_envs_of(dataset, test_envs, fields.get("data_dir"))
  config = TrainConfig(dataset=dataset, test_envs=envs,
                       steps=ds.steps if steps is None else steps,
                       checkpoint_freq=ds.checkpoint_freq if checkpoint_freq is None else checkpoint_freq,
                       **fields)
  if config.output_dir is None:
    tag = "_".join(map(str, envs))
    config = dataclasses.replace(
        config, output_dir=f"runs/{dataset}/{config.method}_test{tag}_seed{config.seed}")
  if config.downsample and "downsample" not in ds.options:
    raise ValueError(f"--downsample does not apply to {dataset}")
  return config


def command(config: TrainConfig, python: str = sys.executable, module: str = "experiments.train",
            extra: Sequence[str] = ()) -> list[str]:
  """The argv that trains ``config`` as a process: ``python -m experiments.train`` with one
  ``--flag=value`` per set field (hparams as the JSON of the overrides)."""
  argv = [python, "-m", module]
  for name in FLAG_FIELDS:
    value = getattr(config, name)
    if value is None:
      continue
    if isinstance(value, bool):
      argv.append(f"--{name}" if value else f"--no{name}")
    else:
      argv.append(f"--{name}={value}")
  argv.append("--test_envs=" + ",".join(map(str, config.test_envs)))
  if config.hparams:
    argv.append("--hparams=" + json.dumps(dict(config.hparams), sort_keys=True))
  if not config.progress:
    argv.append("--noprogress")
  return argv + list(extra)


def record_args(config: TrainConfig, **extra: Any) -> dict[str, Any]:
  """The ``args`` of every record: DomainBed's keys (``algorithm``, ``dataset``,
  ``test_envs``, ``hparams_seed``, ``trial_seed``, ...) and dgjax's settings."""
  ds = datasets.get_dataset(config.dataset)
  method = methods.get_method(config.method)
  dgjax_fields = {n: getattr(config, n) for n in ("preset", "max_examples", "downsample",
                                                  "per_domain_impl", "conv_impl", "mesh",
                                                  "scan_steps", "swad", "swad_n_converge",
                                                  "swad_n_tolerance", "swad_tolerance_ratio")}
  args = domainbed_format.domainbed_args(
      method=config.method, algorithm=method.domainbed_name, dataset=config.dataset,
      test_envs=list(config.test_envs), hparams_seed=config.hparams_seed,
      trial_seed=config.trial_seed, seed=config.seed, output_dir=config.output_dir,
      holdout_fraction=config.holdout_fraction, steps=config.steps,
      checkpoint_freq=config.checkpoint_freq, data_dir=config.data_dir,
      hparams=dict(config.hparams) or None, env_names=list(ds.environment_names(config.data_dir)),
      **dgjax_fields, **extra)
  if len(config.test_envs) == 1:
    args["test_env"] = config.test_envs[0]
  return args


def prepare_output_dir(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> Path:
  """Checks, before any data is loaded, that the run may write its output directory: it is
  writable, no live process holds it, and an existing run there is only continued with
  ``resume`` or replaced with ``overwrite`` (which deletes its records, checkpoints and
  ``done``)."""
  if resume and overwrite:
    raise ValueError("pass --overwrite or --resume, not both")
  out = Path(config.output_dir)
  train_lib.ensure_writable(out)
  if results_lib.is_locked(out):
    raise results_lib.RunLockedError(
        f"{out} is being written by another running process; wait for it, stop it, or "
        "choose another --output_dir")
  existing = [p for p in ("results.jsonl", "checkpoints", "done") if (out / p).exists()]
  if existing and not (resume or overwrite):
    raise FileExistsError(f"{out} already holds a run ({', '.join(existing)}); pass --overwrite "
                          "to replace it, --resume to continue it, or choose another --output_dir")
  if overwrite:
    for name in ("results.jsonl", "done", "checkpoint_meta.json"):
      (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
  return out


def load(config: TrainConfig):
  """``(task, environments)`` of ``config``'s dataset (DomainBed's in/out splits)."""
  ds = datasets.get_dataset(config.dataset)
  if ds.make_task is not None:
    return ds.make_task(config)
  options = {"downsample": True} if config.downsample else {}
  envs = datasets.load_environments(config.dataset, config.data_dir, config.trial_seed,
                                    max_examples=config.max_examples, **options)
  splits_in, splits_out = datasets.make_splits(envs, config.holdout_fraction, config.trial_seed)
  task = DomainBedTask(ds.model(config.conv_impl), splits_in, splits_out, config.test_envs,
                       config.eval_batch_size)
  return task, envs


def run(config: TrainConfig, resume: bool = False, mesh=None, task=None,
        **extra_args: Any) -> list[dict[str, Any]]:
  """Trains ``config`` (its data loaded unless ``task`` is given) into ``config.output_dir``;
  returns its records."""
  if task is None:
    task, _ = load(config)
  return train_lib.train_many([config], task, output_dirs=[config.output_dir],
                              args=[record_args(config, **extra_args)], resume=resume, mesh=mesh)[0]


def run_many(configs: Sequence[TrainConfig], resume: bool = False,
             **extra_args: Any) -> list[list[dict[str, Any]]]:
  """Trains runs that share their data and program (seeds and non-structural hparams may
  differ) as ONE vmapped program in this process; each writes its own output directory, as
  if run alone."""
  task, _ = load(configs[0])
  return train_lib.train_many(configs, task, output_dirs=[c.output_dir for c in configs],
                              args=[record_args(c, **extra_args) for c in configs], resume=resume)


def hparams_json(value: str | None) -> dict[str, Any]:
  """``--hparams``'s JSON object, or a ``ValueError`` saying what is wrong."""
  if not value:
    return {}
  try:
    out = json.loads(value)
  except json.JSONDecodeError as e:
    raise ValueError(f"--hparams is not valid JSON: {e}") from None
  if not isinstance(out, Mapping):
    raise ValueError(f"--hparams must be a JSON object, got {value!r}")
  return dict(out)
