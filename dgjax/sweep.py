"""Hyperparameter sweeps as DomainBed runs them (``scripts/sweep.py`` and
``command_launchers.py``; Gulrajani & Lopez-Paz, ICLR 2021).

A sweep is every combination of trial seed x dataset x method x test environments x
hyperparameter seed, as one :class:`SweepConfig` declares it (:meth:`SweepConfig.args_list`,
:func:`make_args_list`; its fields, and the config fields it passes to every job, are the
sweep's command-line options). Each combination is a :class:`Job`: DomainBed's
argument dict (its keys are config fields), an output directory named by the md5 of that
dict, and ONE :class:`dgjax.config.TrainConfig` (:meth:`Job.config`, built by
:func:`dgjax.runs.make_config`).
The config draws the job's hparams itself, as DomainBed's ``train.py``: ``hparams_seed == 0``
gives the method's defaults, any other seed ``random_hparams(method, seed_hash(hparams_seed,
trial_seed))``, so one hparams seed gives other values in other trials; ``seed =
seed_hash(dataset, method, test_envs, hparams_seed, trial_seed)`` seeds init and minibatches.

A job's state comes from its directory (:attr:`Job.state`):

* *Done*: it holds the ``done`` file the engine writes after the last record;
* *Running*: a live process holds the run's lock (:func:`dgjax.results.is_locked`) or a
  launcher has claimed the job (its ``.launch.lock``, held from just before the job's process
  starts until it ends);
* *Incomplete*: it exists otherwise (a run that stopped or failed);
* *Not launched*: it does not exist.

A launch never touches done or running jobs: each job is claimed (a non-blocking exclusive
lock) and its state read again under the claim right before it starts, so two launches of
one sweep at once run every job once. Incomplete jobs are resumed (``--resume``), restarted
(``--overwrite``) or skipped (:data:`INCOMPLETE_POLICIES`).

Launchers: :func:`launch_local` (processes ``python -m experiments.train``, at most
``max_parallel`` at once), :func:`launch_vmap` (jobs that differ only in seeds and
non-structural hparams trained in this process as ONE program, :func:`dgjax.runs.run_many`:
the runs vmapped, or on CPU by default a trace-time loop over them, ``runs_impl``),
:func:`launch_submitit` (Slurm, or submitit's local executor) and :func:`dry_run_commands`
(the shell commands, for any other scheduler). A process and the one program train the same
config to the same records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dgjax import config as config_lib
from dgjax import datasets
from dgjax import methods
from dgjax import results as results_lib
from dgjax import runs
from dgjax.config import config_field
from dgjax.seeding import seed_hash

NOT_LAUNCHED = "Not launched"
INCOMPLETE = "Incomplete"
RUNNING = "Running"
DONE = "Done"
STATES = (DONE, RUNNING, INCOMPLETE, NOT_LAUNCHED)

#: The file a launcher locks while it starts and waits for a job (see :meth:`Job.claim`).
CLAIM_NAME = ".launch.lock"
CLAIM_WAIT_S = 0.5

#: Job arguments the sweep sets itself, each with its flag (the fields whose ``sweep``
#: metadata says so, :func:`dgjax.config.sweep_fields`); ``--train_arg`` may set any other
#: :class:`~dgjax.config.TrainConfig` field (:func:`train_arg_fields`).
SWEEP_FIELDS = config_lib.sweep_fields()

#: How an incomplete job is launched again: flags added to its command, or ``None`` to skip it.
#: ``restart`` trains from scratch (``--overwrite``); ``resume`` continues from the last
#: checkpoint (``--resume``; from scratch when there is none).
INCOMPLETE_POLICIES: dict[str, tuple[str, ...] | None] = {
  "restart": ("--overwrite",),
  "resume": ("--resume",),
  "skip": None,
}


def train_arg_fields() -> list[str]:
  """The :class:`~dgjax.config.TrainConfig` fields ``--train_arg`` may set."""
  return sorted(f.name for f in config_lib.config_fields() if f.name not in SWEEP_FIELDS)


def check_train_arg(name: str, value: Any) -> None:
  """A ``ValueError`` naming ``name`` unless it is a field ``--train_arg`` may set, with a
  value of its type (:func:`dgjax.config.check_field_value`)."""
  if name in SWEEP_FIELDS:
    raise ValueError(f"--train_arg may not set {name!r}: the sweep sets it ({SWEEP_FIELDS[name]})")
  if name not in train_arg_fields():
    raise ValueError(
      f"--train_arg {name!r} is not a training config field; valid: {', '.join(train_arg_fields())}"
    )
  config_lib.check_field_value(name, value, "--train_arg ")


# ---------------------------------------------------------------------------- enumeration
def single_test_envs(n: int) -> list[list[int]]:
  """One job per test environment: ``[[0], [1], ..., [n - 1]]``."""
  return [[i] for i in range(n)]


def all_test_env_combinations(n: int) -> list[list[int]]:
  """DomainBed's ``all_test_env_combinations``: for each ``i``, ``[i]`` then every pair
  ``[i, j]`` with ``j > i``. The pairs are what leave-one-domain-out selection needs."""
  if n < 3:
    raise ValueError(f"held-out pairs need at least 3 environments, got {n}")
  out = []
  for i in range(n):
    out.append([i])
    out.extend([i, j] for j in range(i + 1, n))
  return out


def test_env_sets(
  n: int, holdout_pairs: bool = False, test_envs: Sequence[int] | None = None
) -> list[list[int]]:
  """The test-environment lists of one dataset with ``n`` environments: one per environment
  (DomainBed's ``--single_test_envs``), or :func:`all_test_env_combinations` with
  ``holdout_pairs``.

  ``test_envs`` (negative: from the end) keeps the lists that hold out one of them: ``[i]``
  and, with ``holdout_pairs``, every pair containing ``i`` (``[0, 2]`` and ``[1, 2]`` for
  ``i = 2`` of 3), which are exactly the runs leave-one-domain-out selection reads for test
  environment ``i``.
  """
  sets = all_test_env_combinations(n) if holdout_pairs else single_test_envs(n)
  if test_envs is None:
    return sets
  bad = [e for e in test_envs if not -n <= e < n]
  if bad:
    raise ValueError(f"test envs {bad} out of range for {n} environments")
  keep = {e % n for e in test_envs}
  return [s for s in sets if keep & set(s)]


def _datasets_help() -> str:
  return f"datasets swept, from: {', '.join(sorted(datasets.DATASETS))}"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """Which jobs a sweep holds (DomainBed's ``sweep.py`` arguments), declared with
  :func:`dgjax.config.config_field`: ``python -m experiments.sweep`` (and
  ``experiments.reproduce domainbed``) has one flag per field, and one per
  :class:`~dgjax.config.TrainConfig` field the sweep passes to every job as it is
  (:func:`dgjax.config.sweep_passed_fields`: ``--steps``, ``--hparams``, ...).

  ``job_args`` holds those (as their flags give them: ``hparams`` as its JSON text; unset ones
  left out, so they change the job hash only when given) and ``train_args`` any other config
  field for every job (``--train_arg``, :func:`train_arg_fields`). The names are resolved
  once, here (``resolved_datasets``, ``resolved_methods``), and carried by the jobs
  (:meth:`jobs`) into their configs.
  """

  datasets: tuple[str, ...] = config_field(("ColoredMNIST",), _datasets_help)
  methods: tuple[str, ...] = config_field(
    help="methods swept (default: every registered one)",
    factory=lambda: tuple(sorted(methods.METHODS)),
  )
  n_hparams_from: int = config_field(0, "first hparams seed (0 = defaults)", minimum=0)
  n_hparams: int = config_field(20, "hparams seeds are range(n_hparams_from, n_hparams)")
  n_trials: int = config_field(3, "trial seeds are range(n_trials)")
  test_envs: tuple[int, ...] | None = config_field(
    None,
    "only the jobs holding out one of these (negative: from the end, e.g. -1 for Spirals); "
    "with --holdout_pairs also every pair containing one; default all",
  )
  holdout_pairs: bool = config_field(
    False, "also run every pair of test envs (needed by leave-one-domain-out selection)"
  )
  job_args: Mapping[str, Any] = config_field(factory=dict, flag=False)
  train_args: Mapping[str, Any] = config_field(factory=dict, flag=False)
  resolved_datasets: tuple[Any, ...] = dataclasses.field(init=False, compare=False, repr=False)
  resolved_methods: tuple[Any, ...] = dataclasses.field(init=False, compare=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "datasets", tuple(self.datasets))
    object.__setattr__(self, "methods", tuple(self.methods))
    config_lib.check_fields(self)
    for name, value in self.train_args.items():
      check_train_arg(name, value)
    passed = {spec.name: spec for spec in config_lib.sweep_passed_fields()}
    unknown = sorted(set(self.job_args) - set(passed))
    if unknown:
      raise ValueError(f"job_args may only hold {sorted(passed)}, got {unknown}")
    job_args = {n: spec.default for n, spec in passed.items() if spec.default is not None}
    job_args.update({k: v for k, v in self.job_args.items() if v is not None})
    for name, value in job_args.items():
      if passed[name].kind == "json":  # kept as given: it is part of the job hash
        config_lib.parse_json_object(name, value)
      else:
        config_lib.check_field_value(name, value, f"--{name} ")
    object.__setattr__(self, "job_args", job_args)
    object.__setattr__(self, "resolved_methods", tuple(methods.get_method(m) for m in self.methods))
    object.__setattr__(
      self, "resolved_datasets", tuple(datasets.get_dataset(d) for d in self.datasets)
    )

  def args_list(self) -> list[dict[str, Any]]:
    """Every job's arguments, in DomainBed's order (``make_args_list``): trial seed, dataset,
    method, test environments (:func:`test_env_sets`), hparams seed
    (``range(n_hparams_from, n_hparams)``); then ``job_args`` and ``train_args``."""
    out = []
    for trial_seed in range(self.n_trials):
      for dataset in self.resolved_datasets:
        n = dataset.num_environments
        for method in self.methods:
          for envs in test_env_sets(n, self.holdout_pairs, self.test_envs):
            for hparams_seed in range(self.n_hparams_from, self.n_hparams):
              seed = seed_hash(dataset.name, method, list(envs), hparams_seed, trial_seed)
              out.append(
                {
                  "dataset": dataset.name,
                  "method": method,
                  "test_envs": list(envs),
                  "hparams_seed": hparams_seed,
                  "trial_seed": trial_seed,
                  "seed": seed,
                  **self.job_args,
                  **self.train_args,
                }
              )
    return out

  def jobs(self, sweep_dir: str | os.PathLike) -> list["Job"]:
    """Every job (:meth:`args_list`) in ``sweep_dir``, carrying its resolved dataset and
    method."""
    ds = {d.name: d for d in self.resolved_datasets}
    ms = {m.name: m for m in self.resolved_methods}
    return [
      Job.create(a, sweep_dir, dataset=ds[a["dataset"]], method=ms[a["method"]])
      for a in self.args_list()
    ]


def make_args_list(
  dataset_names: Sequence[str],
  method_names: Sequence[str],
  *,
  extra_args: Mapping[str, Any] | None = None,
  **fields: Any,
) -> list[dict[str, Any]]:
  """Every job's arguments (:meth:`SweepConfig.args_list`): ``fields`` are
  :class:`SweepConfig` fields (``n_trials``, ``n_hparams``, ``test_envs``, ...) and the
  config fields the sweep passes to every job (``steps``, ``checkpoint_freq``,
  ``holdout_fraction``, ``data_dir``, ``hparams`` as a JSON string: recorded only when
  given, so they change the job hash only then); ``extra_args`` are more config fields for
  every job (e.g. ``{"max_examples": 2000}``; see :func:`train_arg_fields`), recorded and
  hashed the same way."""
  passed = {spec.name for spec in config_lib.sweep_passed_fields()}
  job_args = {k: fields.pop(k) for k in list(fields) if k in passed}
  config = SweepConfig(
    datasets=tuple(dataset_names),
    methods=tuple(method_names),
    job_args=job_args,
    train_args=dict(extra_args or {}),
    **fields,
  )
  return config.args_list()


def args_hash(args: Mapping[str, Any]) -> str:
  """DomainBed's job directory name: ``md5(json.dumps(args, sort_keys=True))``."""
  return hashlib.md5(json.dumps(dict(args), sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------- jobs
def _lock_held(path: Path) -> bool:
  """Whether a live process holds the ``filelock`` at ``path`` (never creates it)."""
  from filelock import FileLock, Timeout

  if not path.exists():
    return False
  lock = FileLock(str(path), is_singleton=False)
  try:
    lock.acquire(timeout=0)
  except Timeout:
    return True
  lock.release()
  return False


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a sweep: DomainBed's ``Job`` (its args and directory) and its config
  (``dataset`` / ``method``: the resolved objects, when the sweep has them)."""

  args: dict[str, Any]
  output_dir: Path
  dataset: Any = dataclasses.field(default=None, compare=False, repr=False)
  method: Any = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def create(
    cls, args: Mapping[str, Any], sweep_dir: str | os.PathLike, dataset=None, method=None
  ) -> "Job":
    return cls(dict(args), Path(sweep_dir) / args_hash(args), dataset, method)

  def config(self) -> runs.TrainConfig:
    """The job's one :class:`~dgjax.config.TrainConfig` (validated; it resolves the hparams
    from ``hparams_seed``, ``trial_seed`` and the ``hparams`` overrides), built once: the
    job's arguments are config fields by name."""
    if "_config" not in self.__dict__:  # frozen: cached beside the fields
      fields = {
        **self.args,
        "hparams": config_lib.parse_json_object("hparams", self.args.get("hparams")),
        "output_dir": str(self.output_dir),
      }
      if self.dataset is not None:
        fields["dataset"] = self.dataset
      if self.method is not None:
        fields["method"] = self.method
      self.__dict__["_config"] = runs.make_config(**fields)
    return self.__dict__["_config"]

  def command(
    self, extra: Sequence[str] = (), python: str = sys.executable, module: str = "experiments.train"
  ) -> list[str]:
    """The argv that trains this job as a process (:func:`dgjax.runs.command`)."""
    return runs.command(self.config(), python=python, module=module, extra=extra)

  @property
  def running(self) -> bool:
    """A live process writes the run, or a launcher has claimed it."""
    # the claim first: while a launcher holds it, the run's own lock is never probed (a probe
    # holds a lock for an instant, and the run takes its lock without waiting)
    return _lock_held(self.output_dir / CLAIM_NAME) or results_lib.is_locked(self.output_dir)

  @property
  def state(self) -> str:
    if (self.output_dir / "done").exists():
      return DONE
    if not self.output_dir.exists():
      return NOT_LAUNCHED
    return RUNNING if self.running else INCOMPLETE

  def claim(self):
    """Claims the job for a launch: a held ``filelock`` on ``<output_dir>/.launch.lock``
    (released with ``.release()``), or ``None`` when the job is done, running, or claimed by
    another launcher. The operating system drops the claim if the launcher dies."""
    from filelock import FileLock, Timeout

    if (self.output_dir / "done").exists():
      return None
    self.output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(self.output_dir / CLAIM_NAME), is_singleton=False)
    try:  # a short wait: a state probe (``status``) holds the lock for an instant
      lock.acquire(timeout=CLAIM_WAIT_S)
    except Timeout:
      return None
    if (self.output_dir / "done").exists() or results_lib.is_locked(self.output_dir):
      lock.release()
      return None
    return lock

  def describe(self) -> str:
    a = self.args
    return (
      f"{self.state}: {self.output_dir} ({a['dataset']}, {a['method']}, "
      f"test_envs={a['test_envs']}, hparams_seed={a['hparams_seed']}, "
      f"trial_seed={a['trial_seed']})"
    )


def make_jobs(args_list: Iterable[Mapping[str, Any]], sweep_dir: str | os.PathLike) -> list[Job]:
  return [Job.create(a, sweep_dir) for a in args_list]


def check_configs(jobs: Sequence[Job]) -> None:
  """Builds every job's config (validating its fields and hparams) before any work; a bad
  one raises a ``ValueError`` naming the job."""
  for job in jobs:
    try:
      job.config()
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"job {job.output_dir.name} ({job.args['dataset']}, {job.args['method']}, "
        f"hparams_seed={job.args['hparams_seed']}): {e}"
      ) from None


def count_states(jobs: Sequence[Job]) -> dict[str, int]:
  states = [j.state for j in jobs]
  return {s: states.count(s) for s in STATES}


def summary_line(jobs: Sequence[Job]) -> str:
  c = count_states(jobs)
  return (
    f"{len(jobs)} jobs: {c[DONE]} done, {c[RUNNING]} running, {c[INCOMPLETE]} incomplete, "
    f"{c[NOT_LAUNCHED]} not launched."
  )


def _check_policy(incomplete: str) -> None:
  if incomplete not in INCOMPLETE_POLICIES:
    raise ValueError(f"incomplete must be one of {sorted(INCOMPLETE_POLICIES)}, got {incomplete!r}")


def launch_flags(state: str, incomplete: str = "resume") -> tuple[str, ...] | None:
  """The flags a job in ``state`` is launched with, or ``None`` when it is not launched:
  ``()`` when not launched yet, the policy's flags when incomplete; never done or running."""
  _check_policy(incomplete)
  if state == NOT_LAUNCHED:
    return ()
  if state == INCOMPLETE:
    return INCOMPLETE_POLICIES[incomplete]
  return None


def jobs_to_launch(
  jobs: Sequence[Job], incomplete: str = "resume"
) -> list[tuple[Job, tuple[str, ...]]]:
  """The jobs a launch would run now, with each one's flags (:func:`launch_flags`). The
  launchers decide again under each job's claim, right before it starts."""
  out = []
  for job in jobs:
    flags = launch_flags(job.state, incomplete)
    if flags is not None:
      out.append((job, flags))
  return out


def claim_for_launch(job: Job, incomplete: str = "resume"):
  """``(claim, flags)`` when ``job`` is to run now, else ``None`` (done, running, claimed by
  another launcher, or incomplete under ``skip``). The state is read again under the claim;
  release the claim when the job has ended."""
  before = job.state
  flags = launch_flags(before, incomplete)
  if flags is None:
    return None
  claim = job.claim()
  if claim is None:
    return None
  if flags == () and any((job.output_dir / p).exists() for p in ("results.jsonl", "checkpoints")):
    flags = INCOMPLETE_POLICIES[incomplete]  # another launch started and stopped it meanwhile
    if flags is None:
      claim.release()
      return None
  return claim, flags


def dry_run_commands(
  jobs: Sequence[Job],
  incomplete: str = "resume",
  python: str = sys.executable,
  module: str = "experiments.train",
) -> list[str]:
  """The shell command line of every job a launch would run (DomainBed's ``dummy_launcher``),
  for any scheduler: e.g. ``xargs -P``, a Slurm array file, a cluster's own tool. Creates
  nothing."""
  return [
    shlex.join(job.command(flags, python, module))
    for job, flags in jobs_to_launch(jobs, incomplete)
  ]


def delete_incomplete(jobs: Sequence[Job]) -> list[Job]:
  """Removes the directory of every incomplete job (DomainBed's ``delete_incomplete``;
  running jobs are left alone); returns those jobs."""
  doomed = [j for j in jobs if j.state == INCOMPLETE]
  for job in doomed:
    shutil.rmtree(job.output_dir)
  return doomed


# ----------------------------------------------------------------------------- launchers
def run_job(
  job: Job,
  incomplete: str = "resume",
  python: str = sys.executable,
  module: str = "experiments.train",
  cwd: str | os.PathLike | None = None,
) -> str:
  """Claims ``job`` and runs its command, appending stdout and stderr to ``out.txt`` and
  ``err.txt`` in its directory (what a submitit job runs). Returns ``"done"``, or
  ``"skipped (<state>)"`` when it is not to run; raises ``subprocess.CalledProcessError`` on
  failure (so submitit marks the job failed)."""
  claimed = claim_for_launch(job, incomplete)
  if claimed is None:
    return f"skipped ({job.state})"
  claim, flags = claimed
  try:
    argv = job.command(flags, python, module)
    with (
      open(job.output_dir / "out.txt", "ab") as out,
      open(job.output_dir / "err.txt", "ab") as err,
    ):
      code = subprocess.call(argv, stdout=out, stderr=err, cwd=cwd)
  finally:
    claim.release()
  if code:
    raise subprocess.CalledProcessError(code, argv)
  return "done"


def launch_local(
  jobs: Sequence[Job],
  incomplete: str = "resume",
  max_parallel: int = 1,
  python: str = sys.executable,
  module: str = "experiments.train",
  cwd: str | os.PathLike | None = None,
  poll_s: float = 0.2,
  log: Callable[[str], None] = print,
) -> dict[Path, int]:
  """Runs the jobs to launch as local processes, at most ``max_parallel`` at once (DomainBed's
  ``local_launcher`` runs them one by one). Each job is claimed right before it starts and
  skipped if it is done or running by then; output goes to ``out.txt`` / ``err.txt`` in its
  directory. Returns the exit code of each job started, by output directory."""
  _check_policy(incomplete)
  if max_parallel < 1:
    raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
  pending = [job for job, _ in jobs_to_launch(jobs, incomplete)]
  total = len(pending)
  running: list[tuple[subprocess.Popen, Job, Any, list]] = []
  codes: dict[Path, int] = {}
  seen = 0

  def reap(block: bool) -> None:
    nonlocal seen
    while True:
      for item in list(running):
        proc, job, claim, files = item
        if proc.poll() is not None:
          for f in files:
            f.close()
          claim.release()
          running.remove(item)
          codes[job.output_dir] = proc.returncode
          seen += 1
          status = (
            "done"
            if proc.returncode == 0
            else f"FAILED (exit {proc.returncode}; see {job.output_dir / 'err.txt'})"
          )
          log(f"[{seen}/{total}] {job.output_dir.name}: {status}")
      if not block or len(running) < max_parallel:
        return
      time.sleep(poll_s)

  try:
    for job in pending:
      reap(block=True)
      claimed = claim_for_launch(job, incomplete)
      if claimed is None:
        seen += 1
        log(f"[{seen}/{total}] {job.output_dir.name}: skipped ({job.state}: another launch has it)")
        continue
      claim, flags = claimed
      try:
        argv = job.command(flags, python, module)
        files = [open(job.output_dir / "out.txt", "ab"), open(job.output_dir / "err.txt", "ab")]
        proc = subprocess.Popen(argv, stdout=files[0], stderr=files[1], cwd=cwd)
      except BaseException:
        claim.release()
        raise
      running.append((proc, job, claim, files))
    while running:
      reap(block=False)
      if running:
        time.sleep(poll_s)
  except BaseException:
    for proc, *_ in running:  # interrupted: stop the jobs this launcher started
      proc.terminate()
    for proc, _, claim, _ in running:
      proc.wait()
      claim.release()
    raise
  return codes


def make_submitit_executor(
  folder: str | os.PathLike,
  cluster: str | None = None,
  max_parallel: int | None = None,
  **parameters: Any,
):
  """A ``submitit.AutoExecutor`` writing its logs under ``folder``. ``cluster``: ``"slurm"``,
  ``"local"`` (processes on this machine, for tests), ``"debug"`` (in-process) or ``None``
  (Slurm when available, else local). ``parameters`` go to ``update_parameters`` (e.g.
  ``timeout_min``, ``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``);
  ``max_parallel`` bounds a Slurm job array (``slurm_array_parallelism``)."""
  import submitit

  executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
  if max_parallel is not None:
    parameters.setdefault("slurm_array_parallelism", max_parallel)
  if parameters:
    executor.update_parameters(**parameters)
  return executor


def launch_submitit(
  jobs: Sequence[Job],
  executor,
  incomplete: str = "resume",
  python: str = sys.executable,
  module: str = "experiments.train",
  cwd: str | os.PathLike | None = None,
) -> list[tuple[Job, Any]]:
  """Submits the jobs to launch as one job array through a submitit executor (see
  :func:`make_submitit_executor`); each runs :func:`run_job` (which claims it and reads its
  state again when it starts). Returns ``(job, submitit job)`` pairs (``.result()`` waits and
  raises if the job failed)."""
  todo = [job for job, _ in jobs_to_launch(jobs, incomplete)]
  if not todo:
    return []
  cwd = str(cwd or os.getcwd())
  n = len(todo)
  submitted = executor.map_array(
    run_job, todo, [incomplete] * n, [python] * n, [module] * n, [cwd] * n
  )
  return list(zip(todo, submitted))


# ------------------------------------------------------------------ K runs in one program
def vmap_group_key(config: runs.TrainConfig) -> str:
  """What runs in one vmapped program share: the engine's rule,
  :func:`dgjax.config.vmap_group_key` (every field but the ``per_run`` ones, and the value of
  every structural hparam, e.g. ``batch_size``, Hutchinson's ``hutchinson_samples``)."""
  return config_lib.vmap_group_key(config)


def vmap_groups(jobs: Sequence[Job]) -> list[list[Job]]:
  """Jobs that can train as one vmapped program (:func:`vmap_group_key`), in order of first
  appearance."""
  groups: dict[str, list[Job]] = {}
  for job in jobs:
    groups.setdefault(vmap_group_key(job.config()), []).append(job)
  return list(groups.values())


class _Tee(io.TextIOBase):
  """A text stream writing to several streams (the console and every job's log)."""

  def __init__(self, *streams):
    self.streams = streams

  def write(self, s):
    for stream in self.streams:
      if not stream.closed:  # a logging handler made meanwhile may keep this stream
        stream.write(s)
    return len(s)

  def flush(self):
    for stream in self.streams:
      if not stream.closed:
        stream.flush()

  def isatty(self):
    return False


def _train_group(group: Sequence[Job], flags: tuple[str, ...], log) -> None:
  """Trains ``group`` (claimed) as one vmapped program; restarts it when its checkpoints
  cannot be resumed together."""
  from dgjax.checkpoints import CheckpointError

  configs = [job.config() for job in group]
  resume = flags == ("--resume",)
  with contextlib.ExitStack() as locks:  # every run's lock first, then its checks
    for config in configs:
      locks.enter_context(runs.open_output_dir(config, resume=resume, overwrite=not resume))
    try:
      runs.run_many(configs, resume=resume)
    except CheckpointError as e:
      if not resume:
        raise
      log(f"cannot resume this group ({e}); restarting it")
      for config in configs:
        runs.clear_run(config.output_dir)
      runs.run_many(configs, resume=False)


def launch_vmap(
  jobs: Sequence[Job], incomplete: str = "resume", log: Callable[[str], None] = print
) -> dict[Path, int]:
  """Trains the jobs to launch in this process, each :func:`vmap_groups` group as ONE
  ``jax.vmap``-ed program (:func:`dgjax.runs.run_many`); each job still gets its own
  ``results.jsonl``, checkpoints and ``done``, as if launched alone, and its ``out.txt`` /
  ``err.txt`` hold what its group printed (and its error). Jobs are claimed before their
  group starts (done or running ones are dropped). A failing group is reported and the next
  one runs. Returns each job's status (0 finished, 1 failed) by output directory."""
  plan = jobs_to_launch(jobs, incomplete)
  keyed: dict[str, list[Job]] = {}
  group_flags: dict[str, tuple[str, ...]] = {}
  for job, flags in plan:
    key = json.dumps([flags, vmap_group_key(job.config())])
    keyed.setdefault(key, []).append(job)
    group_flags[key] = flags
  log(
    f"Launching {len(plan)} jobs as {len(keyed)} vmapped programs"
    f"{' (' + ', '.join(str(len(g)) for g in keyed.values()) + ' runs each)' if keyed else ''}."
  )
  codes: dict[Path, int] = {}
  for key, candidates in keyed.items():
    claims, group = [], []
    for job in candidates:
      claimed = claim_for_launch(job, incomplete)
      if claimed is None:
        log(f"{job.output_dir.name}: skipped ({job.state}: another launch has it)")
        continue
      if claimed[1] != group_flags[key]:  # another launch ran it meanwhile: not this program
        claimed[0].release()
        log(f"{job.output_dir.name}: skipped (another launch ran it meanwhile; launch again)")
        continue
      claims.append(claimed[0])
      group.append(job)
    if not group:
      continue
    method = group[0].args["method"]
    start = time.time()
    with contextlib.ExitStack() as stack:
      outs, errs = (
        [stack.enter_context(open(j.output_dir / name, "a", encoding="utf-8")) for j in group]
        for name in ("out.txt", "err.txt")
      )
      for job, out in zip(group, outs):
        config = job.config()
        out.write(
          f"sweep job {job.output_dir.name}: run {group.index(job) + 1} of a vmapped "
          f"program of {len(group)} ({config.dataset}, {config.method}, test_envs="
          f"{list(config.test_envs)}, seed {config.seed}); hparams "
          f"{results_lib.dumps(config.resolved_hparams)}\n"
        )
      try:
        with (
          contextlib.redirect_stdout(_Tee(sys.stdout, *outs)),
          contextlib.redirect_stderr(_Tee(sys.stderr, *errs)),
        ):
          _train_group(group, group_flags[key], log)
        ok = True
      except Exception as e:  # noqa: BLE001  (reported per group; the next group runs)
        ok = False
        trace = traceback.format_exc()
        for err in errs:
          err.write(trace)
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
      finally:
        for claim in claims:
          claim.release()
    for job in group:
      codes[job.output_dir] = 0 if ok else 1
    if ok:
      log(f"done: {len(group)} runs of {method} in {time.time() - start:.1f} s")
    else:
      log(
        f"FAILED group of {len(group)} ({method}): {error} "
        f"(traceback in {group[0].output_dir / 'err.txt'} and its group's)"
      )
  return codes
