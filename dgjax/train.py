"""The engine: the one training loop of dgjax (DomainBed's ``train.py``, as a library).

:func:`train_many` trains K runs (K = 1 for one run) of any registered method on any task
(:mod:`dgjax.tasks`; the IRM-style benchmark is one too) as ONE jitted program with a leading
runs axis: the runs may differ in seeds and non-structural hparams, which enter the step as
traced values. One step: split the run's key, draw the batch from the task's device-resident
data (inside ``jit``), let the method's step (:func:`dgjax.core.build_step`) compute the
update, apply it. ``scan_steps > 1`` runs that many steps per jit call as a ``lax.scan``.

The task is a :class:`dgjax.task.Task`; the engine reads nothing else of it. The loop is a
few module-level functions over a :class:`Run` (the runs' static parts): :func:`_init_state`
(or :meth:`CheckpointHook.restore`), :func:`_run_chunks` up to the next evaluation step and
:func:`_evaluate` there (:func:`is_eval_step`: every ``checkpoint_freq``-th step and the last
one), which averages the interval's metrics, runs the task's evaluation and the method's
diagnostics and appends one record per run to ``<output_dir>/results.jsonl``. The NaN check
(:class:`NanCheck`, every chunk), SWAD (:class:`SwadHook`) and the checkpoints
(:class:`CheckpointHook`) are hooks that carry their own state. Small modules do the rest: :mod:`dgjax.results` (the lock and the records file),
:mod:`dgjax.checkpoints` (Orbax), :mod:`dgjax.progress` (bar or log lines),
:mod:`dgjax.sharding` (the device mesh).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgjax import checkpoints as checkpoints_lib
from dgjax import config as config_lib
from dgjax import conv as conv_lib
from dgjax import core
from dgjax import interrupts
from dgjax import methods
from dgjax import results as results_lib
from dgjax import sharding as sharding_lib
from dgjax import swad as swad_lib
from dgjax.checkpoints import CheckpointError, Checkpoints, key_from_data, key_to_data
from dgjax.config import DATA_SOURCES, PER_DOMAIN_IMPLS, TrainConfig  # noqa: F401
from dgjax.progress import Progress
from dgjax.task import Task, is_task
from dgjax.tasks import (
  DomainBedTask,
  Split,
  TrainData,
  make_accuracy_fn,
  make_train_data,
  per_example,
  sample_batch,
)  # noqa: F401
from dgjax.types import PyTree


class TrainState(NamedTuple):
  step: jax.Array
  params: PyTree
  opt_state: Any
  key: jax.Array
  average: Any = None  # SWAD: the current segment's dense sum of params (swad.AverageState)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped the runs; the message says what each output directory kept."""


class DiskFullError(OSError):
  """The disk filled up while the runs saved; the message says what each output directory
  kept."""


def _unrolled_on_cpu(impl: str) -> str:
  """``impl``, with ``"auto"`` resolved: ``"unrolled"`` (a trace-time loop) on CPU,
  ``"vmap"`` elsewhere."""
  if impl != "auto":
    return impl
  return "unrolled" if jax.default_backend() == "cpu" else "vmap"


def resolve_per_domain_impl(impl: str) -> str:
  """``"auto"``: the trace-time unrolled loop on CPU, where XLA lowers vmapped convolution
  weight-gradients to slow grouped convolutions (see ``bench/step_time.py``); the vmap
  definition elsewhere."""
  return _unrolled_on_cpu(impl)


def resolve_runs_impl(impl: str) -> str:
  """``"auto"``: a trace-time loop over the K runs of one program on CPU, where vmapping
  the runs batches every kernel and XLA:CPU's convolutions (or the batched-matmul lowering
  ``conv_impl="auto"`` picks for them) run slower than K copies of one run's step
  (``bench/step_time.py --runs``); ``jax.vmap`` elsewhere."""
  return _unrolled_on_cpu(impl)


def _step_body(
  method_step: core.MethodStep,
  batch_fn: Callable,
  batch_size: int,
  state: TrainState,
  data,
  mesh=None,
):
  key, sample_key, method_key = jax.random.split(state.key, 3)
  batch = batch_fn(data, sample_key, batch_size)
  if mesh is not None:  # domains over "domain", examples over "data"
    batch = jax.lax.with_sharding_constraint(batch, sharding_lib.batch_sharding(mesh))
  updates, opt_state, metrics = method_step.update(
    state.params, state.opt_state, batch, state.step, method_key
  )
  params = optax.apply_updates(state.params, updates)
  if mesh is not None:  # every process can read the metrics
    metrics = jax.lax.with_sharding_constraint(metrics, sharding_lib.replicated(mesh))
  average = None if state.average is None else swad_lib.average_update(state.average, params)
  return TrainState(state.step + 1, params, opt_state, key, average), metrics


def _steps(
  method_step: core.MethodStep,
  batch_fn: Callable,
  batch_size: int,
  state: TrainState,
  data,
  n: int,
  mesh=None,
):
  """``n`` steps (a ``lax.scan`` when ``n > 1``); metrics gain a leading ``[n]`` axis."""
  if n == 1:
    state, metrics = _step_body(method_step, batch_fn, batch_size, state, data, mesh)
    return state, jax.tree.map(lambda m: m[None], metrics)
  return jax.lax.scan(
    lambda s, _: _step_body(method_step, batch_fn, batch_size, s, data, mesh), state, None, length=n
  )


def _minibatch(data, key, batch_size):
  """The batch rule of :func:`make_train_step` (per-domain sampling with replacement)."""
  return sample_batch(key, data, batch_size)


def make_task_step(
  method_step: core.MethodStep, task: Task, batch_size: int, steps_per_call: int = 1, mesh=None
) -> Callable:
  """``step(state, data) -> (state, metrics)`` of one run on ``task``: ``steps_per_call``
  engine steps per call (metrics ``[steps_per_call, ...]``), jitted, the state donated. The
  engine's own step, for benchmarks and tests."""
  return jax.jit(
    lambda state, data: _steps(
      method_step, task.batch, batch_size, state, data, steps_per_call, mesh
    ),
    donate_argnums=0,
  )


def make_train_step(method_step: core.MethodStep, batch_size: int, mesh=None) -> Callable:
  """``step(state, data) -> (state, metrics)`` of one run on :class:`TrainData` (DomainBed's
  per-domain minibatches), jitted, the state donated."""
  return jax.jit(
    lambda state, data: _step_body(method_step, _minibatch, batch_size, state, data, mesh),
    donate_argnums=0,
  )


#: Folded into ``key(seed)`` for the method's key (:func:`method_key`).
METHOD_KEY_TAG = 0x6D657468


def method_key(seed_key: jax.Array) -> jax.Array:
  """The key a run's method draws its own networks from (:class:`dgjax.core.ExtraNet`):
  ``fold_in(key(seed), METHOD_KEY_TAG)``, beside ``split(key(seed))``'s params and state keys
  (which it leaves as they were)."""
  return jax.random.fold_in(seed_key, METHOD_KEY_TAG)


def _method_step(
  method: core.Method, task: Task, hparams: Mapping[str, Any], impl: str
) -> core.MethodStep:
  """``method``'s step on ``task``'s model, domains and variables (the engine's one Context)."""
  return method.build(
    core.Context(
      model=task.model,
      hparams=hparams,
      num_domains=task.num_domains,
      per_domain_impl=impl,
      variables=task.variables,
    )
  )


def build_run(
  method: str,
  task: Task,
  hparams: Mapping[str, Any],
  seed: int = 0,
  per_domain_impl: str = "auto",
  steps_per_call: int = 1,
  mesh=None,
) -> tuple[Callable, TrainState]:
  """One run of ``method`` on ``task`` built as :func:`train_many` builds it (K = 1, no
  SWAD): ``(step, state)``, ``step(state, data) -> (state, metrics)`` the jitted engine step
  (:func:`make_task_step`: ``steps_per_call`` steps per call, the state donated) and
  ``state`` the run's initial :class:`TrainState` (params from ``task.init_params`` and the
  state key, both drawn from ``seed`` as the engine draws them). ``hparams``: the run's
  resolved hparams (:func:`dgjax.methods.resolve_hparams`); ``data``: the task's one-run
  data. For benchmarks (``bench/``) and tests."""
  method_step = _method_step(
    methods.get_method(method), task, dict(hparams), resolve_per_domain_impl(per_domain_impl)
  )
  init_key, _ = jax.random.split(jax.random.key(seed))
  state = init_state(method_step, task.init_params(init_key), seed)
  return make_task_step(method_step, task, int(hparams["batch_size"]), steps_per_call, mesh), state


def build_runs(configs: Sequence[TrainConfig], task: Task) -> tuple[Callable, TrainState]:
  """K runs trained as one program, built as :func:`train_many` builds them (no output, no
  checkpoints): ``(step, state)``, ``step(state, data) -> (state, metrics)`` one jitted step
  of every run (the state donated, metrics ``[K, 1, ...]``) and ``state`` their stacked
  initial :class:`TrainState`. ``configs`` must be able to share a program
  (:func:`dgjax.config.check_vmap_group`). For benchmarks (``bench/step_time.py --runs``) and
  tests."""
  _check_group(configs)
  run = _make_run(configs, task, [None] * len(configs), [{}] * len(configs), False, None, True)
  chunk = _chunk_fn(run)
  step = jax.jit(lambda state, data: chunk(state, run.traced_hp, data, 1), donate_argnums=0)
  return step, _init_state(run)


def init_state(method_step: core.MethodStep, params, seed: int) -> TrainState:
  """A run's initial state from its params and seed, as the engine makes it (the state key
  is the second half of ``split(key(seed))``; the first initialises the params; the method's
  networks come from :func:`method_key`)."""
  seed_key = jax.random.key(seed)
  _, state_key = jax.random.split(seed_key)
  # jitted: fresh buffers, so a method state holding the params themselves can be donated
  return TrainState(
    jnp.zeros((), jnp.int32),
    params,
    jax.jit(method_step.init)(params, method_key(seed_key)),
    state_key,
  )


def _next_training_inputs(task: Task, data, key, batch_size: int, start_step: int, n: int):
  """The inputs (domains concatenated, ``[D * B, ...]``) of the ``n`` training batches a run
  whose state key is ``key`` draws from step ``start_step`` on (a streaming task's stream,
  else ``data``): what SWAD's ``update_bn`` reads on from the training iterator."""
  draw = jax.jit(lambda d, k: core.flatten_domains(task.batch(d, k, batch_size)["x"]))
  batches = task.stream(start_step) if task.streams else None
  try:
    for _ in range(n):
      key, sample_key, _ = jax.random.split(key, 3)  # as the step splits its key
      yield draw(next(batches) if batches is not None else data, sample_key)
  finally:
    if batches is not None:
      batches.close()


#: The engine's rule for runs in one vmapped program (:func:`dgjax.config.check_vmap_group`).
_check_group = config_lib.check_vmap_group


def ensure_writable(output_dir: str | os.PathLike) -> Path:
  """Creates ``output_dir`` and checks that files can be written there; a clear error
  naming the directory otherwise."""
  d = Path(output_dir)
  try:
    d.mkdir(parents=True, exist_ok=True)
    probe = d / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"cannot write to the output directory {d}: {e.strerror or e}") from None
  return d


def train(
  config: TrainConfig,
  model,
  splits_in: Sequence[Split],
  splits_out: Sequence[Split],
  output_dir: str | Path | None = None,
  args: Mapping[str, Any] | None = None,
  resume: bool = False,
  checkpoint: bool = True,
  mesh=None,
) -> list[dict[str, Any]]:
  """One run of ``config`` on DomainBed's protocol: ``model`` on :class:`dgjax.tasks.DomainBedTask`
  of ``splits_in`` / ``splits_out``; see :func:`train_many`."""
  task = DomainBedTask(model, splits_in, splits_out, config.test_envs, config.eval_batch_size)
  return train_many(
    [config],
    task,
    None if output_dir is None else [output_dir],
    None if args is None else [args],
    resume=resume,
    checkpoint=checkpoint,
    mesh=mesh,
  )[0]


def train_many(
  configs: Sequence[TrainConfig],
  task: Task,
  output_dirs: Sequence[str | Path] | None = None,
  args: Sequence[Mapping[str, Any]] | None = None,
  resume: bool = False,
  checkpoint: bool = True,
  mesh=None,
) -> list[list[dict[str, Any]]]:
  """Trains K runs as ONE jitted program with a leading runs axis.

  Args:
    configs: one :class:`TrainConfig` per run; they may differ only in seeds and
      non-structural hparams.
    task: what they train on (:class:`dgjax.task.Task`: :class:`~dgjax.tasks.DomainBedTask`,
      :class:`~dgjax.image_task.ImageTask`, :class:`~dgjax.irm_benchmark.IRMTask`, ...).
    output_dirs: per run, where ``results.jsonl`` (one line per evaluation), the checkpoints
      and, at the end, ``done`` (DomainBed's marker) go; ``None``: records in memory only.
      Each directory is locked for the run's life (a second writer fails at once), unless
      this process holds its lock already (:func:`dgjax.runs.open_output_dir` takes it
      before anything there is read or deleted).
    args: per run, recorded verbatim under ``"args"`` in every record.
    resume: continue from the checkpoints in ``output_dirs`` (records after the restored
      checkpoint are dropped and recomputed; the numbers equal an uninterrupted run's,
      bitwise on CPU). Without any checkpoint yet, the runs start over.
    checkpoint: save checkpoints at each evaluation (needs ``output_dirs``).
    mesh: a ``("domain", "data")`` device mesh to shard one run's step over (K = 1).

  Returns:
    Per run, its evaluation records (as written to results.jsonl).

  Raises:
    NonFiniteLossError: a loss became NaN/inf (the message gives the run, step, per-domain
      losses and hparams); records written before stay on disk.
    RunInterrupted: Ctrl-C (a ``KeyboardInterrupt``); DiskFullError: ENOSPC while saving.
      Either message says what each directory kept (:func:`kept_summary`).
    CheckpointError: ``resume`` found only corrupt checkpoints, or those of another run.
    RunLockedError: another process is writing one of the output directories.
  """
  configs = list(configs)
  k_runs = len(configs)
  if k_runs < 1:
    raise ValueError("train_many needs at least one config")
  _check_group(configs)
  if mesh is not None and k_runs != 1:
    raise NotImplementedError("a device mesh shards single runs; K vmapped runs use one device")
  if not is_task(task):
    raise TypeError(
      f"train_many trains on a task (dgjax.task.Task), not a {type(task).__name__}: "
      "build one, e.g. dgjax.tasks.DomainBedTask(model, splits_in, splits_out, ...)"
    )
  dirs = [None if output_dirs is None else Path(d) for d in (output_dirs or [None] * k_runs)]
  if len(dirs) != k_runs:
    raise ValueError(f"{k_runs} configs but {len(dirs)} output directories")
  run_args = [dict(a) for a in args] if args is not None else [{} for _ in configs]
  writer = jax.process_index() == 0  # one results writer in multi-process runs
  run = _make_run(configs, task, dirs, run_args, checkpoint, mesh, writer)

  locks = []
  try:
    for d in dirs:
      if d is not None:
        ensure_writable(d)
        if writer and not results_lib.held_here(d):  # dgjax.runs takes it before any check
          locks.append(results_lib.RunLock(d).acquire())
    with interrupts.DeferredInterrupt() as interrupt:  # taken between steps, never lost
      return _train_locked(run, resume, interrupt)
  except KeyboardInterrupt:
    raise RunInterrupted(f"interrupted (Ctrl-C); {kept_summary(dirs)}") from None
  except Exception as e:
    if not is_disk_full(e):
      raise
    full = DiskFullError(
      f"the disk is full ({_disk_full_detail(e)}); {kept_summary(dirs)}; "
      "free some space, then --resume"
    )
    full.errno = errno.ENOSPC
    raise full from None
  finally:
    for lock in locks:
      lock.release()


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error`` or an error it came from is ENOSPC (Orbax and TensorStore wrap it)."""
  seen = set()
  stack = [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    stack.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])
  return False


def _disk_full_detail(error: BaseException) -> str:
  e = error
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return f"{e.strerror or 'No space left on device'}{f': {e.filename}' if e.filename else ''}"
    e = e.__cause__ or e.__context__
  return "No space left on device"


def kept_summary(dirs: Sequence[Path | None]) -> str:
  """What each output directory keeps, read from the disk: its records and its newest
  complete checkpoint (where ``--resume`` continues)."""
  parts = []
  for d in dirs:
    if d is None:
      continue
    try:
      recs = results_lib.read_jsonl(d / "results.jsonl") if (d / "results.jsonl").exists() else []
      step = checkpoints_lib.latest_good_step(d)
    except (OSError, ValueError) as e:
      parts.append(f"{d}: unreadable ({e})")
      continue
    ckpt = "no checkpoint" if step is None else f"the checkpoint of step {step}"
    last = f" (last step {recs[-1].get('step')})" if recs else ""
    parts.append(f"{d} keeps {len(recs)} records{last} and {ckpt}")
  if not parts:
    return "nothing was saved (no output directory)"
  return "; ".join(parts) + (
    "; --resume continues from the checkpoint"
    if any("the checkpoint of step" in p for p in parts)
    else ""
  )


# ------------------------------------------------------------------- the run and its loop
@dataclasses.dataclass(frozen=True)
class Run:
  """The static parts of K runs trained as one program (:func:`_make_run`): their configs,
  the task, the method, the hparams split into the shared (static) and the per-run (traced,
  ``[K]`` arrays) ones, where their records go; and the per-run evaluation functions, built
  once."""

  configs: tuple[TrainConfig, ...]
  task: Task
  method: core.Method
  hparams: tuple[dict[str, Any], ...]
  static_hp: dict[str, Any]
  traced_hp: dict[str, jax.Array]
  batch_size: int
  impl: str
  runs_impl: str
  mesh: Any
  dirs: tuple[Path | None, ...]
  run_args: tuple[dict[str, Any], ...]
  checkpoint: bool
  writer: bool
  predict_fns: dict[int, Callable] = dataclasses.field(default_factory=dict)
  diag_fns: dict[int, Callable | None] = dataclasses.field(default_factory=dict)

  @property
  def config(self) -> TrainConfig:
    return self.configs[0]

  @property
  def k_runs(self) -> int:
    return len(self.configs)

  @property
  def results_paths(self) -> list[Path | None]:
    return [None if d is None else d / "results.jsonl" for d in self.dirs]

  def method_step(self, hp_traced: Mapping[str, Any]) -> core.MethodStep:
    """The method's step with the shared hparams and ``hp_traced`` (one run's, or traced)."""
    return _method_step(self.method, self.task, {**self.static_hp, **hp_traced}, self.impl)

  def hparams_of(self, k: int) -> dict[str, jax.Array]:
    """Run ``k``'s traced hparams."""
    return {n: v[k] for n, v in self.traced_hp.items()}

  def take(self, tree, k: int):
    """Run ``k``'s slice as this process's copy: what evaluation reads."""
    out = _take_global(tree, k)
    return sharding_lib.local_copy(out) if self.mesh is not None else out

  def data_of(self, data, k: int):
    """Run ``k``'s training data (or the current streamed batch), this process's copy."""
    if self.task.per_run_data:
      return self.take(data, k)
    return data if self.mesh is None else sharding_lib.local_copy(data)


def _take_global(tree, k: int):
  """Run ``k``'s slice, still a global (mesh-replicated) array: what checkpoints save."""
  return jax.tree.map(lambda x: x[k], tree)


def _make_run(configs, task: Task, dirs, run_args, checkpoint: bool, mesh, writer: bool) -> Run:
  hparams = [dict(c.resolved_hparams) for c in configs]
  varying = sorted(n for n in hparams[0] if any(h[n] != hparams[0][n] for h in hparams))
  return Run(
    configs=tuple(configs),
    task=task,
    method=configs[0].resolved_method,
    hparams=tuple(hparams),
    static_hp={n: v for n, v in hparams[0].items() if n not in varying},
    traced_hp={n: jnp.asarray([h[n] for h in hparams]) for n in varying},
    batch_size=int(hparams[0]["batch_size"]),
    impl=resolve_per_domain_impl(configs[0].per_domain_impl),
    runs_impl=resolve_runs_impl(configs[0].runs_impl),
    mesh=mesh,
    dirs=tuple(dirs),
    run_args=tuple(run_args),
    checkpoint=checkpoint,
    writer=writer,
  )


def _over_runs(fn: Callable, in_axes, k_runs: int, impl: str = "vmap") -> Callable:
  """``fn`` mapped over the leading runs axis (``in_axes``: 0 or ``None`` per argument).

  K = 1, or ``impl="unrolled"``: ``fn`` called on each run's slice in a trace-time loop and
  the outputs stacked, so each run's operations are those of the run alone (K = 1 compiles as
  it would alone). Otherwise ``jax.vmap``, traced inside :func:`dgjax.conv.vmapped_runs`
  (``conv_impl="auto"`` picks its lowering for that case)."""
  if k_runs > 1 and impl == "vmap":
    mapped = jax.vmap(fn, in_axes=in_axes)

    def runs(*xs):
      with conv_lib.vmapped_runs():
        return mapped(*xs)

    return runs

  def each(*xs):
    outs = [
      fn(*[x if ax is None else jax.tree.map(lambda a: a[k], x) for x, ax in zip(xs, in_axes)])
      for k in range(k_runs)
    ]
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)

  return each


def _init_state(run: Run) -> TrainState:
  """The runs' initial states, stacked: params from the first half of ``split(key(seed))``,
  the state key its second, the method's networks from :func:`method_key`."""

  def init_one(seed_key, hp_traced):
    init_key, state_key = jax.random.split(seed_key)
    params = run.task.init_params(init_key)
    return TrainState(
      jnp.zeros((), jnp.int32),
      params,
      run.method_step(hp_traced).init(params, method_key(seed_key)),
      state_key,
      swad_lib.average_init(params) if run.config.swad else None,
    )

  seed_keys = jnp.stack([jax.random.key(c.seed) for c in run.configs])
  return jax.jit(_over_runs(init_one, (0, 0), run.k_runs, run.runs_impl))(seed_keys, run.traced_hp)


def _chunk_fn(run: Run) -> Callable:
  """``chunk(state, traced_hp, data, n) -> (state, metrics [K, n, ...])``: ``n`` steps of
  every run, jitted (``n`` static), the state donated."""
  data_axis = 0 if run.task.per_run_data else None

  def chunk_one(state, hp_traced, data, n):
    return _steps(
      run.method_step(hp_traced), run.task.batch, run.batch_size, state, data, n, run.mesh
    )

  return jax.jit(
    lambda s, h, d, n: _over_runs(
      lambda a, b, c: chunk_one(a, b, c, n), (0, 0, data_axis), run.k_runs, run.runs_impl
    )(s, h, d),
    static_argnums=3,
    donate_argnums=0,
  )


def _predict_fn(run: Run, k: int) -> Callable:
  """``predict((params, method_state), x) -> logits`` of run ``k`` (one function per run,
  so the task compiles its evaluation once)."""
  slot = k if (run.method.predict is not None and run.traced_hp) else 0
  if slot not in run.predict_fns:
    step_k = run.method_step(run.hparams_of(k))
    predict = lambda model_state, x: step_k.predict(model_state[0], model_state[1], x)
    # the network alone treats examples independently; a method's own predict may adapt to
    # the evaluated batch (ARM, MTL), so only the former may be evaluated in sub-batches
    run.predict_fns[slot] = per_example(predict) if run.method.predict is None else predict
  return run.predict_fns[slot]


def _diagnostics(run: Run, k: int, params_k, method_state_k, data_k, step: int) -> dict[str, float]:
  """The method's optional diagnostics of run ``k`` on a freshly drawn training batch."""
  if k not in run.diag_fns:
    fn = run.method_step(run.hparams_of(k)).diagnostics
    run.diag_fns[k] = (
      None
      if fn is None
      else jax.jit(
        lambda p, s, d, key: fn(
          p, s, run.task.batch(d, jax.random.fold_in(key, 1), run.batch_size), key
        )
      )
    )
  if run.diag_fns[k] is None:
    return {}
  key = jax.random.fold_in(jax.random.key(run.configs[k].seed), step)
  return {
    n: float(v)
    for n, v in jax.device_get(run.diag_fns[k](params_k, method_state_k, data_k, key)).items()
  }


def is_eval_step(config: TrainConfig, step: int) -> bool:
  """Every ``checkpoint_freq``-th step and the last one: where the engine evaluates."""
  return step % config.checkpoint_freq == 0 or step == config.steps - 1


# ------------------------------------------------------------------- periodic hooks
class NanCheck:
  """Every chunk: fetches the previous chunk's metrics (one chunk stays in flight, so the
  host never waits on the device), raises :class:`NonFiniteLossError` at a NaN or infinite
  loss, and keeps the host metrics ``[K, n, ...]`` of the evaluation interval."""

  def __init__(self, run: Run):
    self.run = run
    self.pending = None  # (first step, device metrics) of the chunk in flight
    self.interval: list[dict[str, np.ndarray]] = []

  def __call__(self, first_step: int, metrics) -> None:
    if self.pending is not None:
      self._check(*self.pending)
    self.pending = (first_step, metrics)

  def flush(self) -> list[dict[str, np.ndarray]]:
    """At an evaluation: checks the chunk in flight; the interval's metrics, then cleared."""
    if self.pending is not None:
      self._check(*self.pending)
      self.pending = None
    interval, self.interval = self.interval, []
    return interval

  def _check(self, first_step: int, metrics) -> None:
    run = self.run
    host = jax.device_get(metrics)
    losses = np.asarray(host["loss"], np.float64)  # [K, n]
    bad = np.argwhere(~np.isfinite(losses))
    if bad.size:
      k, i = (int(v) for v in bad[0])
      path = run.results_paths[k]
      where = f" Results up to the last evaluation are in {path}." if path else ""
      env_losses = np.asarray(host["env_losses"][k, i]).tolist()
      raise NonFiniteLossError(
        f"training loss became {losses[k, i]} at step {first_step + i} (method "
        f"{run.config.method!r}{f', run {k} of {run.k_runs}' if run.k_runs > 1 else ''}, "
        f"per-domain losses {env_losses}, hparams {run.hparams[k]}).{where}"
      )
    self.interval.append(host)


class StepTimer:
  """Seconds per step since the last evaluation (evaluation time is not step time)."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.times: list[float] = []
    self.last = time.perf_counter()

  def tick(self, n: int) -> None:
    now = time.perf_counter()
    self.times.extend([(now - self.last) / n] * n)
    self.last = now

  def mean(self) -> float:
    return float(np.mean(self.times))


class SwadHook:
  """SWAD at every evaluation step: closes each run's segment (the dense sum the step
  accumulated), feeds its loss valley (:class:`dgjax.swad.SwadTracker`, the hook's state,
  saved with each checkpoint) and gives each run's SWAD record keys."""

  def __init__(self, run: Run):
    if not run.task.has_val_loss:
      raise ValueError(
        f"swad needs a training-domain validation loss: {type(run.task).__name__} has no val_loss"
      )
    c = run.config
    self.run = run
    self.tracker = swad_lib.SwadTracker(
      run.k_runs, c.swad_n_converge, c.swad_n_tolerance, c.swad_tolerance_ratio
    )

  def is_time(self, step: int) -> bool:
    return is_eval_step(self.run.config, step)

  def __call__(self, step: int, state: TrainState, data) -> tuple[TrainState, list[dict]]:
    """``(state with fresh segments, per run its SWAD record keys)``."""
    run = self.run
    records = [
      self.tracker.evaluate(
        k,
        step,
        run.take(state.average, k),
        (run.take(state.params, k), run.take(state.opt_state, k)),
        run.task,
        _predict_fn(run, k),
        run.mesh,
        self._bn_batches(state, data, k, step),
      )
      for k in range(run.k_runs)
    ]
    average = swad_lib.average_reset(state.average)
    if run.mesh is not None:
      average = sharding_lib.put_replicated(average, run.mesh)
    return state._replace(average=average), records

  def _bn_batches(self, state: TrainState, data, k: int, step: int):
    """At the last step, run ``k``'s next training inputs (SWAD's final ``update_bn``)."""
    run = self.run
    if step != run.config.steps - 1:
      return None
    key_k = run.take(state.key, k)
    data_k = None if run.task.streams else run.data_of(data, k)
    return lambda: _next_training_inputs(
      run.task, data_k, key_k, run.batch_size, run.config.steps, swad_lib.BN_UPDATE_BATCHES
    )

  def state_dict(self, state_k: TrainState, k: int) -> dict[str, Any]:
    return {
      "segment": state_k.average._asdict(),
      "valley": self.tracker.state_dict(k, state_k.params),
    }

  def load_state_dict(self, k: int, tree: Mapping[str, Any]) -> None:
    self.tracker.load_state_dict(k, tree["valley"])


class CheckpointHook:
  """Each run's checkpoint (:class:`dgjax.checkpoints.Checkpoints`: its state and, with SWAD,
  the hook's valley) at every evaluation step, after its record; restores them on resume."""

  def __init__(self, run: Run, swad: SwadHook | None):
    self.run, self.swad = run, swad
    writes = [d is not None and run.checkpoint for d in run.dirs]
    # the identity: the config's, and the data's content (moved data resumes, other data not)
    data = run.task.data_fingerprint() if any(writes) else None
    self.ckpts = [
      Checkpoints(d, {**c.identity(), "data": data}, c.keep_checkpoints) if w else None
      for c, d, w in zip(run.configs, run.dirs, writes)
    ]

  def is_time(self, step: int) -> bool:
    return is_eval_step(self.run.config, step)

  def __call__(self, step: int, state: TrainState) -> None:
    for k, c in enumerate(self.ckpts):
      if c is not None:
        c.save(step, self._saveable(_take_global(state, k), k))

  def _saveable(self, s: TrainState, k: int) -> dict[str, Any]:
    tree = {"step": s.step, "params": s.params, "opt_state": s.opt_state, "key": key_to_data(s.key)}
    if self.swad is not None:
      tree["swad"] = self.swad.state_dict(s, k)
    return tree

  def check_fresh(self) -> None:
    """A new run: no directory may hold a checkpoint already."""
    for c in self.ckpts:
      if c is not None and c.latest_step() is not None:
        raise CheckpointError(
          f"{c.dir} already holds a checkpoint: resume it, or use another output directory"
        )

  def restore(self, state: TrainState) -> tuple[TrainState, int]:
    """``(state, first step)`` from every run's newest good checkpoint (``(state, 0)``
    without any)."""
    run = self.run
    if any(c is None for c in self.ckpts):
      raise ValueError("resume needs output directories and checkpoint=True")
    for c in self.ckpts:
      c.check_identity()
    if all(c.latest_step() is None for c in self.ckpts):
      return state, 0
    restored = [
      c.restore(self._saveable(_take_global(state, k), k)) for k, c in enumerate(self.ckpts)
    ]
    steps = {s for s, _ in restored}
    if len(steps) != 1:
      raise CheckpointError(
        f"runs in one program were checkpointed at different steps "
        f"{[s for s, _ in restored]}: resume them separately"
      )
    trees = [t for _, t in restored]
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)
    state = TrainState(
      stacked["step"],
      stacked["params"],
      stacked["opt_state"],
      key_from_data(stacked["key"]),
      None if self.swad is None else swad_lib.AverageState(**stacked["swad"]["segment"]),
    )
    for k, tree in enumerate(trees if self.swad is not None else []):
      self.swad.load_state_dict(k, tree["swad"])
    if run.mesh is not None:
      state = sharding_lib.put_replicated(state, run.mesh)
    return state, steps.pop() + 1


# ------------------------------------------------------------------- records
def _open_records(run: Run, ckpt: CheckpointHook, resume: bool, start: int) -> list[list[dict]]:
  """Each run's records so far: on resume those up to the restored checkpoint (the rest
  dropped from ``results.jsonl``), else none (an old ``results.jsonl`` deleted)."""
  records: list[list[dict[str, Any]]] = [[] for _ in run.configs]
  if not run.writer:
    if not resume:
      ckpt.check_fresh()
    return records
  if resume:
    for k, path in enumerate(run.results_paths):
      records[k] = results_lib.truncate_jsonl(path, start - 1 if start else None)
    return records
  ckpt.check_fresh()
  for path in run.results_paths:
    if path is not None and path.exists():
      path.unlink()
  return records


def _record(
  run: Run,
  state: TrainState,
  data,
  k: int,
  step: int,
  interval,
  step_time: float,
  swad_record: Mapping[str, Any],
) -> dict[str, Any]:
  """Run ``k``'s record at ``step``: the interval's mean metrics, the task's evaluation, the
  method's diagnostics, SWAD's keys, times, hparams and args (JSON-ready)."""
  t_eval = time.perf_counter()
  params_k = run.take(state.params, k)
  record = {"step": step, "epoch": run.task.epoch(step, run.batch_size)}
  for name in interval[0]:
    values = np.concatenate([np.asarray(m[name][k]) for m in interval], axis=0)
    record[name] = np.mean(values, axis=0)
  record["step_time"] = step_time
  method_state_k = run.take(state.opt_state, k)
  record.update(
    run.task.evaluate((params_k, method_state_k), k, _predict_fn(run, k), step=step, mesh=run.mesh)
  )
  record.update(_diagnostics(run, k, params_k, method_state_k, run.data_of(data, k), step))
  record.update(swad_record)
  record["eval_time"] = time.perf_counter() - t_eval
  record["hparams"] = run.hparams[k]
  record["args"] = run.run_args[k]
  return {
    key: (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v) for key, v in record.items()
  }


class _Loop(NamedTuple):
  """What the loop carries besides the state: the jitted chunk, the hooks, the records."""

  chunk: Callable
  nan_check: NanCheck
  timer: StepTimer
  swad: SwadHook | None
  ckpt: CheckpointHook
  progress: Progress
  records: list[list[dict[str, Any]]]
  interrupt: interrupts.DeferredInterrupt


def _evaluate(run: Run, loop: _Loop, state: TrainState, data, step: int) -> TrainState:
  """At evaluation step ``step``: SWAD's hook, one record per run (written to its
  ``results.jsonl``), then the checkpoint hook; returns the state (SWAD's fresh segments)."""
  interval = loop.nan_check.flush()
  step_time = loop.timer.mean() / run.k_runs
  swad_records = [{} for _ in range(run.k_runs)]
  if loop.swad is not None and loop.swad.is_time(step):  # before the records and checkpoints
    state, swad_records = loop.swad(step, state, data)
  for k in range(run.k_runs):
    record = _record(run, state, data, k, step, interval, step_time, swad_records[k])
    loop.records[k].append(record)
    if run.results_paths[k] is not None and run.writer:
      results_lib.append_jsonl(
        run.results_paths[k], record
      )  # the record first, then the checkpoint
  if loop.ckpt.is_time(step):
    loop.ckpt(step, state)
  loop.progress.evaluated(step, run.task.progress_numbers(loop.records[0][-1]), step_time)
  return state


def _run_chunks(run: Run, loop: _Loop, state: TrainState, data, batches, step: int, target: int):
  """Steps ``step .. target`` in chunks of up to ``scan_steps``; ``(state, data, step)``."""
  while step <= target:
    loop.interrupt.check()  # Ctrl-C: here, between steps
    n = min(run.config.scan_steps, target - step + 1)
    if batches is not None:
      data = next(batches)
    state, metrics = loop.chunk(state, run.traced_hp, data, n)
    loop.nan_check(step, metrics)
    step += n
    loop.timer.tick(n)
    loop.progress.advance(n)
  return state, data, step


def _train_locked(
  run: Run, resume: bool, interrupt: interrupts.DeferredInterrupt
) -> list[list[dict[str, Any]]]:
  """The loop over the locked output directories: init or restore, then chunks of steps up
  to each evaluation step, evaluate (and save) there; ``done`` at the end. Ctrl-C is taken
  before a chunk (``interrupt``)."""
  config, task = run.config, run.task
  if task.streams and config.scan_steps != 1:
    raise ValueError(
      f"scan_steps must be 1 for a task that streams its batches ({type(task).__name__})"
    )
  swad = SwadHook(run) if config.swad else None  # one loss valley per run (dgjax.swad)
  state = _init_state(run)
  data = None if task.streams else task.data
  if run.mesh is not None:
    state, data = sharding_lib.put_replicated((state, data), run.mesh)
  ckpt = CheckpointHook(run, swad)
  state, start = ckpt.restore(state) if resume else (state, 0)
  records = _open_records(run, ckpt, resume, start)
  label = config.method if run.k_runs == 1 else f"{config.method} x{run.k_runs}"
  progress = Progress(label, config.steps, start, enabled=config.progress and run.writer)
  batches = task.stream(start) if task.streams else None  # resumes at the same batch
  loop = _Loop(_chunk_fn(run), NanCheck(run), StepTimer(), swad, ckpt, progress, records, interrupt)
  step = start
  try:
    for target in (s for s in range(start, config.steps) if is_eval_step(config, s)):
      state, data, step = _run_chunks(run, loop, state, data, batches, step, target)
      state = _evaluate(run, loop, state, data, target)
      loop.timer.restart()  # evaluation time is not step time
  finally:
    progress.close()
    if batches is not None:  # a streaming task's prefetch thread and workers
      batches.close()
  for d in run.dirs:
    if d is not None and run.writer:
      (d / "done").write_text("done\n")  # DomainBed's marker: the run finished
  return records
