"""A run from its configuration: load the dataset, build the task, train, record DomainBed's args.

One :class:`dgjax.config.TrainConfig` describes a run completely. The command line builds it
from flags (``python -m experiments.train``, flags derived from the config's fields), a sweep
builds it directly, and either launches it in this process (:func:`run`, :func:`run_many`) or
as ``python -m experiments.train`` with the same values (:func:`command`, whose flags
``experiments.train.config_from_flags`` turns back into an equal config). A run first takes
its directory's lock (:func:`open_output_dir`), then reads, checks or deletes anything there.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import jax

from dgjax import checkpoints
from dgjax import config as config_lib
from dgjax import core
from dgjax import datasets
from dgjax import domainbed_format
from dgjax import methods
from dgjax import results as results_lib
from dgjax import sharding
from dgjax import train as train_lib

TrainConfig = config_lib.TrainConfig


def test_envs_of(
  dataset: datasets.Dataset, test_envs: Sequence[int] | None, data_dir=None
) -> tuple[int, ...]:
  """``test_envs`` (negative: from the end) as sorted indices, or ``dataset``'s default; an
  out-of-range index raises naming the dataset's environments."""
  names = dataset.environment_names(data_dir)
  n = len(names)
  envs = list(test_envs) if test_envs else [dataset.default_test_env]
  bad = [e for e in envs if not -n <= e < n]
  if bad:
    raise ValueError(
      f"test environment(s) {bad} out of range for {dataset.name}: 0..{n - 1} ({', '.join(names)})"
    )
  envs = sorted({e % n for e in envs})
  if len(envs) == n:
    raise ValueError("every environment is a test environment: nothing to train on")
  return tuple(envs)


def make_config(
  dataset: str | datasets.Dataset = "ColoredMNIST",
  test_envs: Sequence[int] | None = None,
  steps: int | None = None,
  checkpoint_freq: int | None = None,
  **fields: Any,
) -> TrainConfig:
  """A validated config for ``dataset``: test environments resolved (default: the dataset's),
  ``steps`` / ``checkpoint_freq`` defaulting to the dataset's (DomainBed's ``N_STEPS`` /
  ``CHECKPOINT_FREQ``), the default output directory
  ``runs/<dataset>/<method>_test<envs>_seed<seed>``. The names are resolved here, once
  (``dataset`` and ``method`` may be given resolved); the config carries the objects and
  resolves the hparams once."""
  ds = dataset if isinstance(dataset, datasets.Dataset) else datasets.get_dataset(dataset)
  method = fields.pop("method", config_lib.field_default("method"))
  method = method if isinstance(method, core.Method) else methods.get_method(method)
  if fields.get("downsample") and "downsample" not in ds.options:
    raise ValueError(f"--downsample does not apply to {ds.name}")
  envs = test_envs_of(ds, test_envs, fields.get("data_dir"))
  if fields.get("output_dir") is None:
    tag = "_".join(map(str, envs))
    fields["output_dir"] = (
      f"runs/{ds.name}/{method.name}_test{tag}_seed{fields.get('seed', config_lib.field_default('seed'))}"
    )
  return TrainConfig(
    dataset=ds,
    method=method,
    test_envs=envs,
    steps=ds.steps if steps is None else steps,
    checkpoint_freq=ds.checkpoint_freq if checkpoint_freq is None else checkpoint_freq,
    **fields,
  )


def command(
  config: TrainConfig,
  python: str = sys.executable,
  module: str = "experiments.train",
  extra: Sequence[str] = (),
) -> list[str]:
  """The argv that trains ``config`` as a process: ``python -m experiments.train`` with one
  ``--flag=value`` per set field (:func:`dgjax.config.to_argv`)."""
  return [python, "-m", module, *config_lib.to_argv(config), *extra]


def record_args(config: TrainConfig, **extra: Any) -> dict[str, Any]:
  """The ``args`` of every record: DomainBed's keys (``algorithm``, ``dataset``,
  ``test_envs``, ``hparams_seed``, ``trial_seed``, ...) and dgjax's settings (the fields
  whose ``record`` metadata says so, :func:`dgjax.config.record_fields`)."""
  args = domainbed_format.domainbed_args(
    **config_lib.record_fields(config, "domainbed"),
    algorithm=config.resolved_method.domainbed_name,
    env_names=list(config.resolved_dataset.environment_names(config.data_dir)),
    **config_lib.record_fields(config, "dgjax"),
    **extra,
  )
  if len(config.test_envs) == 1:
    args["test_env"] = config.test_envs[0]
  return args


def open_output_dir(
  config: TrainConfig, resume: bool = False, overwrite: bool = False
) -> results_lib.RunLock:
  """Takes the run lock of ``config.output_dir`` and returns it held (a context manager that
  releases it). The lock comes first, before anything in the directory is read or deleted,
  so a second writer touches nothing and is told who holds the run. Holding it, checks that
  an existing run there is only continued with ``resume`` (and only by the same run: its
  checkpoint's identity, :func:`dgjax.checkpoints.check_identity`) or replaced with
  ``overwrite`` (:func:`clear_run`). All of this before any data is loaded."""
  if resume and overwrite:
    raise ValueError("pass --overwrite or --resume, not both")
  out = Path(config.output_dir)
  train_lib.ensure_writable(out)
  writer = jax.process_index() == 0  # multi-process: process 0 locks and writes
  lock = results_lib.RunLock(out).acquire() if writer else _NoLock(out)
  try:
    existing = [p for p in ("results.jsonl", "checkpoints", "done") if (out / p).exists()]
    if existing and not (resume or overwrite):
      raise FileExistsError(
        f"{out} already holds a run ({', '.join(existing)}); pass "
        "--overwrite to replace it, --resume to continue it, or choose "
        "another --output_dir"
      )
    if resume:
      checkpoints.check_identity(out, config.identity())
    if overwrite and writer:
      clear_run(out)
  except BaseException:
    lock.release()
    raise
  return lock


class _NoLock:
  """What a process other than process 0 holds: nothing (process 0 holds the lock)."""

  def __init__(self, output_dir: Path):
    self.dir = output_dir

  def release(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def clear_run(output_dir: str | Path) -> None:
  """Deletes a run's records, checkpoints, identity and ``done`` (hold its lock)."""
  out = Path(output_dir)
  for name in ("results.jsonl", "done", checkpoints.META_NAME):
    (out / name).unlink(missing_ok=True)
  shutil.rmtree(out / "checkpoints", ignore_errors=True)


def make_mesh(config: TrainConfig):
  """The device mesh ``config.mesh`` asks for (:func:`dgjax.sharding.parse_mesh_shape`), or
  ``None`` for one device ("none", or "auto" with a single device)."""
  spec = (config.mesh or "none").lower()
  if spec == "none" or (spec == "auto" and jax.device_count() == 1):
    return None
  num_train = len(config.resolved_dataset.environment_names(config.data_dir)) - len(
    config.test_envs
  )
  return sharding.make_mesh(sharding.parse_mesh_shape(spec, num_train))


def load(config: TrainConfig):
  """``(task, environments)`` of ``config``'s dataset (:meth:`dgjax.datasets.Dataset.task`)."""
  return config.resolved_dataset.task(config)


def _locked(
  stack: contextlib.ExitStack, config: TrainConfig, resume: bool, overwrite: bool = False
) -> None:
  """Holds ``config.output_dir``'s run lock in ``stack`` unless this process holds it."""
  if not results_lib.held_here(config.output_dir):
    stack.enter_context(open_output_dir(config, resume=resume, overwrite=overwrite))


def run(
  config: TrainConfig,
  resume: bool = False,
  mesh=None,
  task=None,
  overwrite: bool = False,
  **extra_args: Any,
) -> list[dict[str, Any]]:
  """Trains ``config`` into ``config.output_dir`` (:func:`open_output_dir` first, unless this
  process holds the directory already), its data loaded unless ``task`` is given, on
  ``mesh`` (default: :func:`make_mesh`); returns its records."""
  with contextlib.ExitStack() as stack:
    _locked(stack, config, resume, overwrite)
    if task is None:
      task, _ = load(config)
    mesh = make_mesh(config) if mesh is None else mesh
    return train_lib.train_many(
      [config],
      task,
      output_dirs=[config.output_dir],
      args=[record_args(config, **extra_args)],
      resume=resume,
      mesh=mesh,
    )[0]


def run_many(
  configs: Sequence[TrainConfig], resume: bool = False, **extra_args: Any
) -> list[list[dict[str, Any]]]:
  """Trains runs that share their data and program (seeds and non-structural hparams may
  differ: :func:`dgjax.config.check_vmap_group`) as ONE program in this process, on one
  device (vmapped, or a loop over the runs: ``runs_impl``); each writes its own output
  directory, as if run alone."""
  config_lib.check_vmap_group(configs)
  with contextlib.ExitStack() as stack:
    for c in configs:
      _locked(stack, c, resume)
    task, _ = load(configs[0])
    return train_lib.train_many(
      configs,
      task,
      output_dirs=[c.output_dir for c in configs],
      args=[record_args(c, **extra_args) for c in configs],
      resume=resume,
    )
