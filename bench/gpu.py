r"""The GPU run, prepared: one command, under 10 minutes on one GPU, rows for bench/RESULTS.md.

    bash bench/gpu.sh                                # = python bench/gpu.py: every section
    bash bench/gpu.sh --results $OUT/gpu-results.md  # on a lent machine: rows come back in $OUT
    python bench/gpu.py --sections methods,resnet --budget_s 300
    python bench/gpu.py --toy                        # CPU, tiny sizes, seconds (tests/test_bench_gpu.py)

Sections (in this order; one that would start after ``--budget_s`` seconds is skipped, and
says so):

``methods``
  Every registered method's engine step on DomainBed's Colored MNIST CNN, 2 domains x 64
  (``suite.cnn_variant``: the step of ``bench/step_time.py``, ``auto`` lowerings), timed
  interleaved: ms/step, x ERM, compile s, XLA temp MB.
``resnet``
  ResNet-50 at 224, 3 domains x 32 (DomainBed's image batch), erm / sand / hgp, float32 and
  bfloat16, remat off and on, unfrozen BatchNorm (current DomainBed's default), the step of
  ``bench/resnet_step.py`` (on-device augmentation included): ms/step, images/s, compile s,
  and the compiled step's peak memory as XLA plans it (temp + arguments + outputs - aliased).
``input``
  The image input pipeline (``bench/input_pipeline.py``): 300x300 JPEGs, grain with every CPU
  core as a worker (and in-process), decode rates, the on-device colour augmentation.
``sweep``
  20 runs of erm (seeds 0..19) on Colored MNIST-shaped data, 200 steps with evaluations at
  0, 100 and 199: as ONE vmapped program (``dgjax.train.train_many`` with 20 configs) vs
  20 runs one after another (``train_many`` with one config each, as 20 jobs of a local
  sweep would run them; the compilation cache of this run serves runs 2..20): wall times.
``cmnist5001``
  One 5001-step erm run with DomainBed's schedule (an evaluation of all six splits every 100
  steps and at the last, checkpoints as the command line writes them): wall time, time in
  evaluations, steady ms/step.

Data are random arrays of the real shapes (Colored MNIST: 3 environments x 23,333 digits
28x28x2, each split 80/20 into in/out; timing only, no download needed). The run turns
JAX's persistent compilation cache on in a temporary directory (``--compilation_cache``:
another directory, or ``off``), as the command lines do by default. Each finished section
appends its table to ``--results`` (default ``bench/RESULTS.md``; ``--toy``: none unless
given), so a run cut short keeps what it measured. ``--toy``: every section on the CPU at
tiny sizes (one method, a one-block ResNet at 16x16, 2 runs, a few steps), to keep this
script working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("methods", "resnet", "input", "sweep", "cmnist5001")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


class Sizes:
  """Every size the sections use: the GPU run's, or ``toy``'s (CPU, seconds)."""

  def __init__(self, toy: bool):
    self.toy = toy
    self.threads = min(8, os.cpu_count() or 1)  # programs compiled at once
    self.methods = ["erm"] if toy else None  # None: every registered method
    self.image = 2 if toy else 28  # Colored MNIST's 28x28x2 digits (toy: 2x2x2)
    self.cnn_batch = 2 if toy else 64
    self.cnn_reps = 1 if toy else 20
    self.resnet_arch = "toy" if toy else "resnet50"
    self.resnet_methods = ["erm"] if toy else ["erm", "sand", "hgp"]
    self.resnet_settings = (
      [("bfloat16", True)]  # both options in one compile
      if toy
      else [(d, r) for d in ("float32", "bfloat16") for r in (False, True)]
    )
    self.resnet_domains, self.resnet_batch = (2, 2) if toy else (3, 32)
    self.resnet_size = 16 if toy else 224
    self.resnet_reps = 1 if toy else 10
    self.augment = not toy  # the colour augmentation's compile alone is 4 CPU-seconds
    self.input = (
      dict(
        sizes=[(24, 24)],
        per_class=2,
        domains=2,
        batch=2,
        workers=[0],
        steps=1,
        image_size=16,
        device_aug=False,  # its compile alone is 4 CPU-seconds
      )
      if toy
      else dict(
        sizes=[(300, 300)],
        per_class=64,
        domains=3,
        batch=32,
        workers=[0, os.cpu_count() or 1],
        steps=20,
        image_size=224,
      )
    )
    self.model_name = "toy MLP" if toy else "Colored MNIST CNN"
    self.env_size = 20 if toy else 23333  # Colored MNIST: 70,000 digits in 3 environments
    self.sweep_runs = 2 if toy else 20
    self.sweep_steps, self.sweep_freq = (3, 2) if toy else (200, 100)
    self.long_steps, self.long_freq = (5, 2) if toy else (5001, 100)


# --------------------------------------------------------------------------- sections
def compile_all(programs, threads: int):
  """``[(compiled, compile_s, xla_mb)]`` of ``programs`` (``(jitted, *args)``): lowered one
  by one (tracing holds the GIL), compiled in ``threads`` threads at once (XLA's compiler
  does not), so 37 method steps or 12 ResNet-50 variants compile in the time of a few.
  ``xla_mb``: the compiled program's temp (activations, scratch) and its peak as XLA plans
  it (temp + arguments + outputs - aliased), MB."""
  from concurrent.futures import ThreadPoolExecutor

  lowered = [fn.lower(*args) for fn, *args in programs]

  def compile_one(low):
    t0 = time.perf_counter()
    compiled = low.compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is None:
      return compiled, seconds, (float("nan"), float("nan"))
    peak = (
      mem.temp_size_in_bytes
      + mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
    )
    return compiled, seconds, (mem.temp_size_in_bytes / 2**20, peak / 2**20)

  with ThreadPoolExecutor(max(1, threads)) as pool:
    return list(pool.map(compile_one, lowered))


def section_methods(sz: Sizes):
  """Every method's engine step (:func:`dgjax.train.build_run`, as ``bench/step_time.py``)
  on the CNN, compiled (in parallel), warmed, then timed interleaved."""
  from common import time_interleaved, warm_up

  from dgjax import methods
  from dgjax import train as train_lib

  per_domain = train_lib.resolve_per_domain_impl("auto")
  task = cmnist_task(sz, env_size=max(10, 4 * sz.cnn_batch))  # 2 training domains
  names = sz.methods or sorted(methods.METHODS)
  built = []
  for m in names:
    hp = methods.resolve_hparams(m, 0, {"batch_size": sz.cnn_batch})
    built.append(train_lib.build_run(m, task, hp, 0, per_domain))
  compiled = compile_all([(step, state, task.data) for step, state in built], sz.threads)
  live = []
  for m, (_, state), (step, compile_s, (temp_mb, _)) in zip(names, built, compiled):
    state = warm_up(step, state, task.data)
    live.append(
      {"label": m, "step": step, "state": state, "data": task.data, "compile_s": compile_s}
      | {"temp_mb": temp_mb}
    )
  time_interleaved(live, sz.cnn_reps)
  erm = next((v["ms"] for v in live if v["label"] == "erm"), float("nan"))
  rows = [
    [
      v["label"],
      f"{v['ms']:.2f}",
      f"{v['ms'] / erm:.2f}",
      f"{v['compile_s']:.1f}",
      _mb(v["temp_mb"]),
    ]
    for v in live
  ]
  return (
    f"Every method, {sz.model_name}, {task.num_domains} domains x {sz.cnn_batch}, "
    f"{sz.cnn_reps} timed steps each (median, interleaved; per-domain passes: {per_domain}; "
    f"compiled {sz.threads} at a time)",
    ["method", "ms/step", "x ERM", "compile s", "XLA temp MB"],
    rows,
  )


def _resnet_model(arch, dtype, remat):
  """``arch`` of :data:`dgjax.resnet.ARCHS` (unfrozen BatchNorm), or ``"toy"``: one basic
  block (the toy run's)."""
  from dgjax import resnet

  if arch != "toy":
    return resnet.resnet_classifier(arch, 7, freeze_bn=False, dtype=dtype, remat=remat)
  featurizer = resnet.ResNet(
    stage_sizes=(1,), block="basic", freeze_bn=False, dtype=dtype, remat=remat, name="featurizer"
  )
  return resnet.ResNetClassifier(featurizer=featurizer, num_classes=7)


def section_resnet(sz: Sizes):
  """ResNet steps (``bench/resnet_step.py``'s), every method x dtype x remat, interleaved."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import resnet_step
  from common import time_interleaved, warm_up

  rng = np.random.default_rng(0)
  d, b, size = sz.resnet_domains, sz.resnet_batch, sz.resnet_size
  data = {
    "x": jax.device_put(rng.integers(0, 256, (d, b, size, size, 3), dtype=np.uint8)),
    "y": jax.device_put(rng.integers(0, 7, (d, b)).astype(np.int32)),
  }
  from dgjax import resnet

  # one initialisation for every variant (float32 params whatever the compute dtype or remat)
  variables = resnet.init_variables(
    _resnet_model(sz.resnet_arch, jnp.float32, False), jax.random.key(0), size
  )
  variants, programs = [], []
  for method in sz.resnet_methods:
    for dtype, remat in sz.resnet_settings:
      model = _resnet_model(sz.resnet_arch, jnp.dtype(dtype), remat)
      step, state = resnet_step.build_with_model(
        method, model, d, b, size, jnp.dtype(dtype), sz.augment, variables
      )
      variants.append((f"{method} {dtype}{' remat' if remat else ''}", state))
      programs.append((step, state, data))
  live = []
  for (label, state), (step, compile_s, (_, peak)) in zip(
    variants, compile_all(programs, sz.threads)
  ):
    state = warm_up(step, state, data)
    live.append(
      {"label": label, "step": step, "state": state, "data": data, "compile_s": compile_s}
      | {"peak_mb": peak}
    )
  time_interleaved(live, sz.resnet_reps)
  rows = [
    [
      v["label"],
      f"{v['ms']:.1f}",
      f"{1000 * d * b / v['ms']:.1f}",
      f"{v['compile_s']:.1f}",
      _mb(v["peak_mb"]),
    ]
    for v in live
  ]
  stats = jax.devices()[0].memory_stats() or {}
  peak_all = stats.get("peak_bytes_in_use")
  arch = "one-block toy ResNet" if sz.resnet_arch == "toy" else sz.resnet_arch
  return (
    f"{arch} at {size}x{size}, {d} domains x {b}, unfrozen BatchNorm, "
    f"{'on-device augmentation' if sz.augment else 'no augmentation'}, {sz.resnet_reps} "
    f"timed steps (median, interleaved; compiled {sz.threads} at a time)"
    + (f"; device peak over the section {peak_all / 2**20:.0f} MB" if peak_all else ""),
    ["variant", "ms/step", "images/s", "compile s", "peak MB (XLA plan)"],
    rows,
  )


def section_input(sz: Sizes):
  """The input pipeline stages (``bench/input_pipeline.py``'s ``measure``)."""
  import input_pipeline

  rows, mean_kb, n_domains = input_pipeline.measure(**sz.input)
  w, h = sz.input["sizes"][0]
  return (
    f"Image input pipeline: {w}x{h} JPEGs (mean {mean_kb:.0f} KiB) -> "
    f"{sz.input['image_size']}, {n_domains} domains x {sz.input['batch']}, "
    f"{os.cpu_count()} CPU cores",
    ["stage", "images/s", "note"],
    [[name, f"{r:.1f}", note] for name, r, note in rows],
  )


def cmnist_task(sz: Sizes, env_size: int, seed: int = 0):
  """Colored MNIST's shapes on random data: 3 environments of ``env_size`` digits (28x28x2;
  toy 2x2x2), each split 80/20 into in / out (DomainBed's holdout); DomainBed's CNN with the
  ``auto`` lowering (toy: a 4-unit MLP); environment 2 the test one. Timing only."""
  import numpy as np

  from dgjax import tasks
  from dgjax.models import mlp, mnist_cnn

  rng = np.random.default_rng(seed)
  ins, outs = [], []
  for e in range(3):
    x = rng.uniform(size=(env_size, sz.image, sz.image, 2)).astype(np.float32)
    y = rng.integers(0, 2, env_size).astype(np.int32)
    cut = env_size - env_size // 5
    ins.append(tasks.Split(f"env{e}_in", x[:cut], y[:cut]))
    outs.append(tasks.Split(f"env{e}_out", x[cut:], y[cut:]))
  model = mlp(2, (4,)) if sz.toy else mnist_cnn(2, conv_impl="auto")
  return tasks.DomainBedTask(model, ins, outs, test_envs=[2])


def _config(steps, freq, seed=0, out=None):
  from dgjax import runs

  return runs.make_config(
    "ColoredMNIST",
    method="erm",
    test_envs=[2],
    steps=steps,
    checkpoint_freq=freq,
    seed=seed,
    output_dir=out or "unused",
    progress=False,
  )


def section_sweep(sz: Sizes):
  """K runs as one vmapped program vs one after another."""
  from dgjax import train as train_lib

  task = cmnist_task(sz, sz.env_size)
  configs = [_config(sz.sweep_steps, sz.sweep_freq, seed=k) for k in range(sz.sweep_runs)]
  t0 = time.perf_counter()
  vmapped = train_lib.train_many(configs, task, checkpoint=False)
  vmap_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  sequential = [train_lib.train_many([c], task, checkpoint=False)[0] for c in configs]
  seq_s = time.perf_counter() - t0
  assert len(vmapped) == len(sequential) == sz.sweep_runs
  k = sz.sweep_runs
  rows = [
    [f"{k} runs, one vmapped program", f"{vmap_s:.1f}", f"{vmap_s / k:.2f}", "1.00"],
    [f"{k} runs, one after another", f"{seq_s:.1f}", f"{seq_s / k:.2f}", f"{seq_s / vmap_s:.2f}"],
  ]
  return (
    f"Sweep: {k} erm runs (seeds), {sz.sweep_steps} steps, evaluations every {sz.sweep_freq} "
    f"steps and at the last, {sz.model_name} on Colored MNIST shapes ({3 * sz.env_size} random "
    "digits)",
    ["launch", "wall s", "s per run", "x vmapped"],
    rows,
  )


def section_cmnist5001(sz: Sizes):
  """One DomainBed-schedule run, checkpoints and records written as the command line does."""
  from dgjax import train as train_lib

  task = cmnist_task(sz, sz.env_size)
  with tempfile.TemporaryDirectory() as out:
    config = _config(sz.long_steps, sz.long_freq, out=out)
    t0 = time.perf_counter()
    records = train_lib.train_many([config], task, output_dirs=[out])[0]
    wall = time.perf_counter() - t0
  eval_s = sum(r["eval_time"] for r in records)
  steady = statistics.median(r["step_time"] for r in records[1:]) if len(records) > 1 else 0.0
  rows = [
    [
      f"{sz.long_steps}",
      f"{len(records)}",
      f"{wall:.1f}",
      f"{eval_s:.1f}",
      f"{1000 * steady:.2f}",
    ]
  ]
  return (
    f"Colored MNIST erm ({sz.model_name}), DomainBed's schedule (evaluate every "
    f"{sz.long_freq} steps and at the last, all six splits of {3 * sz.env_size} random "
    "digits; checkpoints on)",
    ["steps", "evaluations", "wall s", "in evaluations s", "ms/step (median)"],
    rows,
  )


RUNNERS = {
  "methods": section_methods,
  "resnet": section_resnet,
  "input": section_input,
  "sweep": section_sweep,
  "cmnist5001": section_cmnist5001,
}


# --------------------------------------------------------------------------- output
def _mb(x):
  return "-" if math.isnan(x) else f"{x:.0f}"


def table(title, head, rows) -> str:
  lines = [f"### {title}", "", "| " + " | ".join(head) + " |"]
  lines.append("|---|" + "---:|" * (len(head) - 1))
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def run_header(args, jax) -> str:
  dev = jax.devices()[0]
  return (
    f"\n## GPU run (`bench/gpu.py{' --toy' if args.toy else ''}`): {dev.device_kind} "
    f"({jax.default_backend()}), jax {jax.__version__}, {os.cpu_count()} CPU cores, "
    f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
  )


@contextlib.contextmanager
def _jax_cache_restored():
  """JAX's cache settings as they were, afterwards (the temporary directory goes away; and
  the toy test runs :func:`main` inside pytest)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as jax_cache

  keys = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  saved = {k: getattr(jax.config, k) for k in keys}
  try:
    yield
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
    jax_cache.reset_cache()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--toy", action="store_true", help="tiny sizes on any backend (a smoke test)")
  p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections")
  p.add_argument("--budget_s", type=float, default=540.0, help="start no section after this")
  p.add_argument(
    "--results", default=None, help="append the tables here (default bench/RESULTS.md; toy: none)"
  )
  p.add_argument(
    "--compilation_cache",
    default=None,
    help="JAX's persistent compilation cache directory, or 'off' (default: a temporary one)",
  )
  args = p.parse_args(argv)
  chosen = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(chosen) - set(SECTIONS))
  if unknown:
    p.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
  results = Path(args.results) if args.results else (None if args.toy else RESULTS)

  from dgjax import compilation_cache

  with _jax_cache_restored(), tempfile.TemporaryDirectory(prefix="dgjax-gpu-") as tmp_cache:
    cache = compilation_cache.setup(
      tmp_cache if args.compilation_cache is None else args.compilation_cache, {}
    )
    import jax

    sz = Sizes(args.toy)
    t_start = time.perf_counter()
    header = run_header(args, jax) + (
      f"\nCompilation cache: {'on, fresh' if args.compilation_cache is None else cache or 'off'}."
      f" Sections: {', '.join(chosen)}.\n"
    )
    print(header, flush=True)
    if results is not None:
      with open(results, "a") as f:
        f.write(header + "\n")
    failed = []
    for name in chosen:
      elapsed = time.perf_counter() - t_start
      if elapsed > args.budget_s:
        text = f"### {name}: skipped ({elapsed:.0f} s spent, budget {args.budget_s:.0f} s)\n"
      else:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
          title, head, rows = RUNNERS[name](sz)
          spent = f"{time.perf_counter() - t0:.0f} s, {time.process_time() - c0:.0f} CPU-s"
          text = table(f"{title} ({spent})", head, rows)
        except Exception as e:  # noqa: BLE001  (the other sections still run)
          failed.append(name)
          text = f"### {name}: failed after {time.perf_counter() - t0:.0f} s: {e!r}\n"
          traceback.print_exc()
      print(text, flush=True)
      if results is not None:
        with open(results, "a") as f:
          f.write(text + "\n")
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
  if failed:
    print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
