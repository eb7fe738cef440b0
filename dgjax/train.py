"""The engine: the one training loop of dgjax (DomainBed's ``train.py``, as a library).

:func:`train_many` trains K runs (K = 1 for one run) of any registered method on any task
(:mod:`dgjax.tasks`; the IRM-style benchmark is one too) as ONE jitted program with a leading
runs axis: the runs may differ in seeds and non-structural hparams, which enter the step as
traced values. One step: split the run's key, draw the batch from the task's device-resident
data (inside ``jit``), let the method's step (:func:`dgjax.core.build_step`) compute the
update, apply it. ``scan_steps > 1`` runs that many steps per jit call as a ``lax.scan``.

The loop asks "is it time" to evaluate: at every ``checkpoint_freq``-th step and the last one
it averages the interval's metrics, runs the task's evaluation and the method's diagnostics,
appends one record per run to ``<output_dir>/results.jsonl`` and saves a checkpoint. Small
parts do the rest: :mod:`dgjax.results` (the lock and the records file),
:mod:`dgjax.checkpoints` (Orbax), :mod:`dgjax.progress` (bar or log lines),
:mod:`dgjax.sharding` (the device mesh).
"""

from __future__ import annotations

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
from dgjax import core
from dgjax import methods
from dgjax import results as results_lib
from dgjax import sharding as sharding_lib
from dgjax import swad as swad_lib
from dgjax.checkpoints import CheckpointError, Checkpoints, key_from_data, key_to_data
from dgjax.config import DATA_SOURCES, PER_DOMAIN_IMPLS, TrainConfig  # noqa: F401
from dgjax.progress import Progress
from dgjax.tasks import DomainBedTask, Split, TrainData, make_accuracy_fn, make_train_data, sample_batch  # noqa: F401
from dgjax.types import PyTree


class TrainState(NamedTuple):
  step: jax.Array
  params: PyTree
  opt_state: Any
  key: jax.Array
  average: Any = None   # SWAD: the current segment's dense sum of params (swad.AverageState)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C stopped the runs; the message says what each output directory kept."""


class DiskFullError(OSError):
  """The disk filled up while the runs saved; the message says what each output directory
  kept."""


def resolve_per_domain_impl(impl: str) -> str:
  """``"auto"``: the trace-time unrolled loop on CPU, where XLA lowers vmapped convolution
  weight-gradients to slow grouped convolutions (see ``bench/step_time.py``); the vmap
  definition elsewhere."""
  if impl != "auto":
    return impl
  return "unrolled" if jax.default_backend() == "cpu" else "vmap"


def _step_body(method_step: core.MethodStep, task, batch_size: int, state: TrainState, data,
               mesh=None):
  key, sample_key, method_key = jax.random.split(state.key, 3)
  batch = task.batch(data, sample_key, batch_size)
  if mesh is not None:  # domains over "domain", examples over "data"
    batch = jax.lax.with_sharding_constraint(batch, sharding_lib.batch_sharding(mesh))
  updates, opt_state, metrics = method_step.update(state.params, state.opt_state, batch,
                                                   state.step, method_key)
  params = optax.apply_updates(state.params, updates)
  if mesh is not None:  # every process can read the metrics
    metrics = jax.lax.with_sharding_constraint(metrics, sharding_lib.replicated(mesh))
  average = None if state.average is None else swad_lib.average_update(state.average, params)
  return TrainState(state.step + 1, params, opt_state, key, average), metrics


def _steps(method_step: core.MethodStep, task, batch_size: int, state: TrainState, data, n: int,
           mesh=None):
  """``n`` steps (a ``lax.scan`` when ``n > 1``); metrics gain a leading ``[n]`` axis."""
  if n == 1:
    state, metrics = _step_body(method_step, task, batch_size, state, data, mesh)
    return state, jax.tree.map(lambda m: m[None], metrics)
  return jax.lax.scan(lambda s, _: _step_body(method_step, task, batch_size, s, data, mesh),
                      state, None, length=n)


class _MinibatchTask:
  """The batch rule of :func:`make_train_step` (per-domain sampling with replacement)."""

  @staticmethod
  def batch(data, key, batch_size):
    return sample_batch(key, data, batch_size)


def make_task_step(method_step: core.MethodStep, task, batch_size: int, steps_per_call: int = 1,
                   mesh=None) -> Callable:
  """``step(state, data) -> (state, metrics)`` of one run on ``task``: ``steps_per_call``
  engine steps per call (metrics ``[steps_per_call, ...]``), jitted, the state donated. The
  engine's own step, for benchmarks and tests."""
  return jax.jit(lambda state, data: _steps(method_step, task, batch_size, state, data,
                                            steps_per_call, mesh), donate_argnums=0)


def make_train_step(method_step: core.MethodStep, batch_size: int, mesh=None) -> Callable:
  """``step(state, data) -> (state, metrics)`` of one run on :class:`TrainData` (DomainBed's
  per-domain minibatches), jitted, the state donated."""
  return jax.jit(lambda state, data: _step_body(method_step, _MinibatchTask, batch_size, state,
                                                data, mesh), donate_argnums=0)


#: Folded into ``key(seed)`` for the method's key (:func:`method_key`).
METHOD_KEY_TAG = 0x6D657468


def method_key(seed_key: jax.Array) -> jax.Array:
  """The key a run's method draws its own networks from (:class:`dgjax.core.ExtraNet`):
  ``fold_in(key(seed), METHOD_KEY_TAG)``, beside ``split(key(seed))``'s params and state keys
  (which it leaves as they were)."""
  return jax.random.fold_in(seed_key, METHOD_KEY_TAG)


def _method_step(method: core.Method, task, hparams: Mapping[str, Any], impl: str) -> core.MethodStep:
  """``method``'s step on ``task``'s model, domains and variables (the engine's one Context)."""
  return method.build(core.Context(model=task.model, hparams=hparams, num_domains=task.num_domains,
                                   per_domain_impl=impl, variables=getattr(task, "variables", {})))


def build_run(method: str, task, hparams: Mapping[str, Any], seed: int = 0,
              per_domain_impl: str = "auto", steps_per_call: int = 1,
              mesh=None) -> tuple[Callable, TrainState]:
  """One run of ``method`` on ``task`` built as :func:`train_many` builds it (K = 1, no
  SWAD): ``(step, state)``, ``step(state, data) -> (state, metrics)`` the jitted engine step
  (:func:`make_task_step`: ``steps_per_call`` steps per call, the state donated) and
  ``state`` the run's initial :class:`TrainState` (params from ``task.init_params`` and the
  state key, both drawn from ``seed`` as the engine draws them). ``hparams``: the run's
  resolved hparams (:func:`dgjax.methods.resolve_hparams`); ``data``: the task's one-run
  data. For benchmarks (``bench/``) and tests."""
  method_step = _method_step(methods.get_method(method), task, dict(hparams),
                             resolve_per_domain_impl(per_domain_impl))
  init_key, _ = jax.random.split(jax.random.key(seed))
  state = init_state(method_step, task.init_params(init_key), seed)
  return make_task_step(method_step, task, int(hparams["batch_size"]), steps_per_call, mesh), state


def init_state(method_step: core.MethodStep, params, seed: int) -> TrainState:
  """A run's initial state from its params and seed, as the engine makes it (the state key
  is the second half of ``split(key(seed))``; the first initialises the params; the method's
  networks come from :func:`method_key`)."""
  seed_key = jax.random.key(seed)
  _, state_key = jax.random.split(seed_key)
  # jitted: fresh buffers, so a method state holding the params themselves can be donated
  return TrainState(jnp.zeros((), jnp.int32), params,
                    jax.jit(method_step.init)(params, method_key(seed_key)), state_key)


def _next_training_inputs(task, stream, data, key, batch_size: int, start_step: int, n: int):
  """The inputs (domains concatenated, ``[D * B, ...]``) of the ``n`` training batches a run
  whose state key is ``key`` draws from step ``start_step`` on (``stream``: the task's batch
  stream, else its ``data``): what SWAD's ``update_bn`` reads on from the training iterator."""
  draw = jax.jit(lambda d, k: core.flatten_domains(task.batch(d, k, batch_size)["x"]))
  batches = stream(start_step) if stream is not None else None
  try:
    for _ in range(n):
      key, sample_key, _ = jax.random.split(key, 3)   # as the step splits its key
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


def train(config: TrainConfig, model, splits_in: Sequence[Split], splits_out: Sequence[Split],
          output_dir: str | Path | None = None, args: Mapping[str, Any] | None = None,
          resume: bool = False, checkpoint: bool = True, mesh=None) -> list[dict[str, Any]]:
  """One run of ``config`` on DomainBed's protocol (:class:`dgjax.tasks.DomainBedTask`);
  see :func:`train_many` (this is ``train_many([config], ...)[0]``)."""
  return train_many([config], model, splits_in, splits_out,
                    None if output_dir is None else [output_dir],
                    None if args is None else [args], resume=resume, checkpoint=checkpoint,
                    mesh=mesh)[0]


def train_many(configs: Sequence[TrainConfig], task, splits_in: Sequence[Split] | None = None,
               splits_out: Sequence[Split] | None = None,
               output_dirs: Sequence[str | Path] | None = None,
               args: Sequence[Mapping[str, Any]] | None = None, resume: bool = False,
               checkpoint: bool = True, mesh=None) -> list[list[dict[str, Any]]]:
  """Trains K runs as ONE jitted program with a leading runs axis.

  Args:
    configs: one :class:`TrainConfig` per run; they may differ only in seeds and
      non-structural hparams.
    task: a task (:mod:`dgjax.tasks`), or a flax model together with ``splits_in`` and
      ``splits_out`` (then the task is :class:`~dgjax.tasks.DomainBedTask`).
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
  config = configs[0]
  _check_group(configs)
  if mesh is not None and k_runs != 1:
    raise NotImplementedError("a device mesh shards single runs; K vmapped runs use one device")
  if not hasattr(task, "batch"):
    if splits_in is None or splits_out is None:
      raise ValueError("give a task, or a model with splits_in and splits_out")
    task = DomainBedTask(task, splits_in, splits_out, config.test_envs, config.eval_batch_size)
  hparams = [dict(c.resolved_hparams) for c in configs]
  method = methods.get_method(config.method)
  batch_size = int(hparams[0]["batch_size"])
  impl = resolve_per_domain_impl(config.per_domain_impl)
  dirs = [None if output_dirs is None else Path(d) for d in (output_dirs or [None] * k_runs)]
  if len(dirs) != k_runs:
    raise ValueError(f"{k_runs} configs but {len(dirs)} output directories")
  run_args = [dict(a) for a in args] if args is not None else [{} for _ in configs]
  writer = jax.process_index() == 0   # one results writer in multi-process runs

  locks = []
  try:
    for d in dirs:
      if d is not None:
        ensure_writable(d)
        if writer and not results_lib.held_here(d):   # dgjax.runs takes it before any check
          locks.append(results_lib.RunLock(d).acquire())
    return _train_locked(configs, task, method, hparams, batch_size, impl, dirs, run_args,
                         resume, checkpoint, mesh, writer)
  except KeyboardInterrupt:
    raise RunInterrupted(f"interrupted (Ctrl-C); {kept_summary(dirs)}") from None
  except Exception as e:
    if not is_disk_full(e):
      raise
    full = DiskFullError(f"the disk is full ({_disk_full_detail(e)}); {kept_summary(dirs)}; "
                         "free some space, then --resume")
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
  return "; ".join(parts) + ("; --resume continues from the checkpoint" if any(
      "the checkpoint of step" in p for p in parts) else "")


def _train_locked(configs, task, method, hparams, batch_size, impl, dirs, run_args, resume,
                  checkpoint, mesh, writer):
  config = configs[0]
  k_runs = len(configs)
  varying = sorted(n for n in hparams[0] if any(h[n] != hparams[0][n] for h in hparams))
  static_hp = {n: v for n, v in hparams[0].items() if n not in varying}
  traced_hp = {n: jnp.asarray([h[n] for h in hparams]) for n in varying}

  def build(hp_traced) -> core.MethodStep:
    return _method_step(method, task, {**static_hp, **hp_traced}, impl)

  data_axis = 0 if task.per_run_data else None

  def over_runs(fn, in_axes):
    """``fn`` mapped over the leading runs axis (a plain call on the squeezed axis when K = 1:
    no vmap of one, so one run compiles as it would alone)."""
    if k_runs > 1:
      return jax.vmap(fn, in_axes=in_axes)

    def one(*xs):
      squeezed = [x if ax is None else jax.tree.map(lambda a: a[0], x) for x, ax in zip(xs, in_axes)]
      return jax.tree.map(lambda a: a[None], fn(*squeezed))
    return one

  def init_one(seed_key, hp_traced):
    init_key, state_key = jax.random.split(seed_key)
    params = task.init_params(init_key)
    return TrainState(jnp.zeros((), jnp.int32), params,
                      build(hp_traced).init(params, method_key(seed_key)), state_key,
                      swad_lib.average_init(params) if config.swad else None)

  def chunk_one(state, hp_traced, data, n):
    return _steps(build(hp_traced), task, batch_size, state, data, n, mesh)

  seed_keys = jnp.stack([jax.random.key(c.seed) for c in configs])
  state = jax.jit(over_runs(init_one, (0, 0)))(seed_keys, traced_hp)
  chunk_fn = jax.jit(lambda s, h, d, n: over_runs(lambda a, b, c: chunk_one(a, b, c, n),
                                                  (0, 0, data_axis))(s, h, d),
                     static_argnums=3, donate_argnums=0)
  stream = getattr(task, "stream", None)   # a task that feeds a new batch every step
  if stream is not None and config.scan_steps != 1:
    raise ValueError(f"scan_steps must be 1 for a task that streams its batches ({type(task).__name__})")
  data = None if stream is not None else task.data
  if mesh is not None:
    state, data = sharding_lib.put_replicated((state, data), mesh)

  def take_global(tree, k):
    """Run ``k``'s slice, still a global (mesh-replicated) array: what checkpoints save."""
    return jax.tree.map(lambda x: x[k], tree)

  def take(tree, k):
    """Run ``k``'s slice as this process's copy: what evaluation reads."""
    out = take_global(tree, k)
    return sharding_lib.local_copy(out) if mesh is not None else out

  swad = None
  if config.swad:   # SWAD: one loss valley per run, fed at each evaluation (dgjax.swad)
    if not hasattr(task, "val_loss"):
      raise ValueError(f"swad needs a training-domain validation loss: {type(task).__name__} "
                       "has no val_loss")
    swad = swad_lib.SwadTracker(k_runs, config.swad_n_converge, config.swad_n_tolerance,
                                config.swad_tolerance_ratio)

  def saveable(s: TrainState, k: int):
    tree = {"step": s.step, "params": s.params, "opt_state": s.opt_state, "key": key_to_data(s.key)}
    if swad is not None:
      tree["swad"] = {"segment": s.average._asdict(), "valley": swad.state_dict(k, s.params)}
    return tree

  results_paths = [None if d is None else d / "results.jsonl" for d in dirs]
  ckpts = [Checkpoints(d, c.identity(), c.keep_checkpoints) if (d is not None and checkpoint) else None
           for c, d in zip(configs, dirs)]
  records: list[list[dict[str, Any]]] = [[] for _ in configs]
  start = 0
  if resume:
    if any(c is None for c in ckpts):
      raise ValueError("resume needs output directories and checkpoint=True")
    for c in ckpts:
      c.check_identity()
    found = [c.latest_step() for c in ckpts]
    if any(s is not None for s in found):
      restored = [c.restore(saveable(take_global(state, k), k)) for k, c in enumerate(ckpts)]
      steps = {s for s, _ in restored}
      if len(steps) != 1:
        raise CheckpointError(f"runs in one program were checkpointed at different steps "
                              f"{[s for s, _ in restored]}: resume them separately")
      trees = [t for _, t in restored]
      stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)
      state = TrainState(stacked["step"], stacked["params"], stacked["opt_state"],
                         key_from_data(stacked["key"]),
                         None if swad is None else swad_lib.AverageState(**stacked["swad"]["segment"]))
      for k, tree in enumerate(trees if swad is not None else []):
        swad.load_state_dict(k, tree["swad"]["valley"])
      if mesh is not None:
        state = sharding_lib.put_replicated(state, mesh)
      start = steps.pop() + 1
    for k, path in enumerate(results_paths):   # keep the records up to the checkpoint, if any
      if writer:
        records[k] = results_lib.truncate_jsonl(path, start - 1 if start else None)
  else:
    for path, c in zip(results_paths, ckpts):
      if c is not None and c.latest_step() is not None:
        raise CheckpointError(f"{c.dir} already holds a checkpoint: resume it, or use another "
                              "output directory")
      if path is not None and path.exists() and writer:
        path.unlink()

  eval_steps = [s for s in range(config.steps) if s % config.checkpoint_freq == 0 or s == config.steps - 1]
  interval: list[dict[str, np.ndarray]] = []   # host metrics [K, n, ...] since the last evaluation
  step_times: list[float] = []

  def check(first_step, metrics):
    host = jax.device_get(metrics)
    losses = np.asarray(host["loss"], np.float64)         # [K, n]
    bad = np.argwhere(~np.isfinite(losses))
    if bad.size:
      k, i = (int(v) for v in bad[0])
      where = (f" Results up to the last evaluation are in {results_paths[k]}."
               if results_paths[k] else "")
      env_losses = np.asarray(host["env_losses"][k, i]).tolist()
      raise NonFiniteLossError(
          f"training loss became {losses[k, i]} at step {first_step + i} (method {config.method!r}"
          f"{f', run {k} of {k_runs}' if k_runs > 1 else ''}, per-domain losses {env_losses}, "
          f"hparams {hparams[k]}).{where}")
    interval.append(host)

  diag_fns: dict[int, Any] = {}
  predict_fns: dict[int, Any] = {}

  def predict_fn(k):
    """``predict((params, method_state), x) -> logits`` of run ``k`` (one function per run,
    so the task compiles its evaluation once)."""
    slot = k if (method.predict is not None and traced_hp) else 0
    if slot not in predict_fns:
      step_k = build({n: v[k] for n, v in traced_hp.items()})
      predict_fns[slot] = lambda model_state, x: step_k.predict(model_state[0], model_state[1], x)
    return predict_fns[slot]

  def diagnostics(k, params_k, method_state_k, step):
    """The method's optional diagnostics on a freshly drawn training batch."""
    if k not in diag_fns:
      fn = build({n: v[k] for n, v in traced_hp.items()}).diagnostics
      diag_fns[k] = None if fn is None else jax.jit(
          lambda p, s, d, key: fn(p, s, task.batch(d, jax.random.fold_in(key, 1), batch_size), key))
    if diag_fns[k] is None:
      return {}
    key = jax.random.fold_in(jax.random.key(configs[k].seed), step)
    return {n: float(v) for n, v in
            jax.device_get(diag_fns[k](params_k, method_state_k, data_of(k), key)).items()}

  def data_of(k):
    return take(data, k) if task.per_run_data else (
        data if mesh is None else sharding_lib.local_copy(data))

  def swad_bn_batches(k, step):
    """At the last step, run ``k``'s next training inputs (SWAD's final ``update_bn``)."""
    if step != config.steps - 1:
      return None
    key_k, data_k = take(state.key, k), None if stream is not None else data_of(k)
    return lambda: _next_training_inputs(task, stream, data_k, key_k, batch_size, config.steps,
                                         swad_lib.BN_UPDATE_BATCHES)

  def evaluate(step):
    nonlocal state
    step_time = float(np.mean(step_times)) / k_runs
    swad_records = [{} for _ in range(k_runs)]
    if swad is not None:   # SWAD: close each run's segment before its record and checkpoint
      swad_records = [swad.evaluate(k, step, take(state.average, k), (take(state.params, k),
                                    take(state.opt_state, k)), task, predict_fn(k), mesh,
                                    swad_bn_batches(k, step))
                      for k in range(k_runs)]
      average = swad_lib.average_reset(state.average)
      state = state._replace(average=average if mesh is None else
                             sharding_lib.put_replicated(average, mesh))
    for k in range(k_runs):
      t_eval = time.perf_counter()
      params_k = take(state.params, k)
      record = {"step": step, "epoch": task.epoch(step, batch_size)}
      for name in interval[0]:
        values = np.concatenate([np.asarray(m[name][k]) for m in interval], axis=0)
        record[name] = np.mean(values, axis=0)
      record["step_time"] = step_time
      method_state_k = take(state.opt_state, k)
      record.update(task.evaluate((params_k, method_state_k), k, predict_fn(k),
                                  **sharding_lib.mesh_kwarg(task.evaluate, mesh)))
      record.update(diagnostics(k, params_k, method_state_k, step))
      record.update(swad_records[k])
      record["eval_time"] = time.perf_counter() - t_eval
      record["hparams"] = hparams[k]
      record["args"] = run_args[k]
      record = {key: (v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v)
                for key, v in record.items()}
      records[k].append(record)
      if results_paths[k] is not None and writer:
        results_lib.append_jsonl(results_paths[k], record)   # the record first, then the checkpoint
      if ckpts[k] is not None:
        ckpts[k].save(step, saveable(take_global(state, k), k))
    interval.clear()
    step_times.clear()
    progress.evaluated(step, task.progress_numbers(records[0][-1]), step_time)

  label = config.method if k_runs == 1 else f"{config.method} x{k_runs}"
  progress = Progress(label, config.steps, start, enabled=config.progress and writer)
  step = start
  batches = stream(start) if stream is not None else None   # resumes at the same batch
  pending = None                               # (first step, device metrics) of the chunk in flight
  t_last = time.perf_counter()
  try:
    for target in eval_steps:
      if target < step:
        continue
      while step <= target:
        n = min(config.scan_steps, target - step + 1)
        if batches is not None:
          data = next(batches)
        state, metrics = chunk_fn(state, traced_hp, data, n)
        if pending is not None:   # fetch the previous chunk's metrics: one chunk stays in flight
          check(*pending)
        pending = (step, metrics)
        step += n
        now = time.perf_counter()
        step_times.extend([(now - t_last) / n] * n)
        t_last = now
        progress.advance(n)
      check(*pending)
      pending = None
      evaluate(target)
      t_last = time.perf_counter()   # evaluation time is not step time
  finally:
    progress.close()
    close = getattr(batches, "close", None)   # a streaming task's prefetch thread and workers
    if close is not None:
      close()
  for d in dirs:
    if d is not None and writer:
      (d / "done").write_text("done\n")  # DomainBed's marker: the run finished
  return records
