r"""Seconds to a first result: start-up of the command line, cold and warm compilation cache.

    python bench/time_to_first.py                        # both scenarios, cold then warm cache
    python bench/time_to_first.py --scenarios cmnist --modes off,cold,warm
    python bench/time_to_first.py --data_dir /path/to/mnist --steps 11

Each measurement is a fresh ``python`` process (this script with ``--child``) that runs the
real entry point in-process (``experiments.colored_mnist`` / ``experiments.train``'s
``main``, so its own compilation-cache setup) with ``DGJAX_COMPILATION_CACHE`` set to a
temporary directory: ``cold`` is its first run (empty cache; it fills it), ``warm`` the
second, ``off`` runs without the cache. Scenarios:

* ``cmnist``: the README's main command, ``python -m experiments.colored_mnist
  --method=erm --data_dir=DIR`` (``--data_dir``: default ``$DGJAX_DATA_DIR/mnist-first10k``)
  with ``--steps`` (default 6).
* ``pacs``: ``python -m experiments.train --dataset=PACS`` on a synthetic PACS tree written
  here (4 domains x 7 classes x 2 JPEGs, as ``tests/test_image_training.py``), ResNet-18 from
  scratch at 32x32, 2 images per domain, no data workers.

Columns (seconds unless said): ``import`` from the process start (interpreter included) to
the entry point imported; ``data`` loading the dataset and building the task (the image
task compiles the ResNet's init there); ``compile step`` trace + lowering + XLA compile (or
cache read) outside evaluation: the step, the init and the small start-up programs;
``compile eval`` the same inside the first evaluation; ``eval`` the first evaluation's wall
time (its compile included), ``eval CPU s`` its CPU time; ``first record`` from the process
start to the first line of ``results.jsonl``, ``its CPU s`` the CPU time the process spent
until then, all threads (on a shared machine the wall times stretch with the other load,
the CPU times much less); ``ms/step`` the steady step time the last record reports (the
engine's timer, steps after the first evaluation). Evaluations after the first return the
first one's numbers (their records are not real results; this measures start-up, and spares
the second full evaluation). ``hits/misses``: persistent cache lookups. Benchmarks are
scripts, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
COLUMNS = (
  ("import", "import_s"),
  ("data", "data_s"),
  ("compile step", "compile_step_s"),
  ("compile eval", "compile_eval_s"),
  ("eval", "eval_s"),
  ("eval CPU s", "eval_cpu_s"),
  ("first record", "first_record_s"),
  ("its CPU s", "first_record_cpu_s"),
  ("ms/step", "step_ms"),
  ("total", "total_s"),
)


def write_synthetic_pacs(root: Path, per_class: int = 2, seed: int = 0) -> Path:
  """A DomainBed PACS tree of small random JPEGs under ``root / "PACS"`` (as the image tests
  write it); returns ``root``."""
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(seed)
  for e, env in enumerate(PACS):
    for c, cls in enumerate(PACS_CLASSES):
      d = root / "PACS" / env / cls
      d.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        img[..., c % 3] = (40 * e + 30 * c) % 256
        Image.fromarray(img).save(d / f"{i}.jpg", quality=85)
  return root


def scenario_argv(
  scenario: str, data_dir: str, out: str, steps: int, extra: list[str] | None = None
) -> list[str]:
  """The entry point's command line (after ``python -m ...``) of ``scenario``."""
  common = [f"--steps={steps}", f"--output_dir={out}", "--overwrite", "--noprogress"]
  common += extra or []
  if scenario == "cmnist":
    return ["--method=erm", f"--data_dir={data_dir}", *common]
  if scenario == "pacs":
    return [
      "--dataset=PACS",
      "--method=erm",
      f"--data_dir={data_dir}",
      "--pretrained=none",
      "--image_size=32",
      "--data_workers=0",
      "--test_envs=3",
      '--hparams={"batch_size": 2, "resnet18": true}',
      *common,
    ]
  raise ValueError(f"unknown scenario {scenario!r}; valid: cmnist, pacs")


# --------------------------------------------------------------------------- child process
def child(scenario: str, argv: list[str], spawn_time: float) -> dict:
  """Runs the entry point in this process, timing its phases (see the module docstring)."""
  t0 = time.time()
  sys.path.insert(0, str(ROOT))
  import jax
  from absl import flags

  from dgjax import image_task, runs, tasks
  from dgjax import results as results_lib
  from experiments import colored_mnist
  from experiments import train as train_cli

  out = {"import_s": time.time() - spawn_time, "interpreter_s": t0 - spawn_time}
  compile_s = {"step": 0.0, "eval": 0.0}
  phase = ["step"]
  cache = {"hits": 0, "misses": 0}
  events = {
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  }

  detail = {}  # (phase, event, function) -> seconds, for --detail

  def on_duration(event, secs, **kw):
    if event in events:
      compile_s[phase[0]] += secs
      key = f"{phase[0]} {event.rsplit('/', 1)[-1]} {kw.get('fun_name')}"
      detail[key] = detail.get(key, 0.0) + secs

  def on_event(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
      cache["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
      cache["misses"] += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)

  load = runs.load

  def timed_load(config):
    t = time.time()
    try:
      return load(config)
    finally:
      out["data_s"] = time.time() - t

  runs.load = timed_load

  for cls in (tasks.DomainBedTask, image_task.ImageTask):
    evaluate = cls.evaluate

    def first_only(self, *a, _evaluate=evaluate, **kw):
      if hasattr(self, "_bench_first"):  # later evaluations: the first one's numbers
        return self._bench_first
      phase[0] = "eval"
      t, c = time.time(), time.process_time()
      try:
        self._bench_first = _evaluate(self, *a, **kw)
      finally:
        phase[0] = "step"
        out["eval_s"] = time.time() - t
        out["eval_cpu_s"] = time.process_time() - c
        out["compile_step_s"] = compile_s["step"]  # up to the first record
      return self._bench_first

    cls.evaluate = first_only

  append = results_lib.append_jsonl

  def stamped_append(path, record):
    append(path, record)
    if "first_record_s" not in out:
      out["first_record_s"] = time.time() - spawn_time
      out["first_record_cpu_s"] = time.process_time()  # every thread, since the start

  results_lib.append_jsonl = stamped_append

  flags.FLAGS(["entry", *argv])
  main = colored_mnist.main if scenario == "cmnist" else train_cli.main
  records = []
  run = runs.run

  def keep_records(*a, **kw):
    records.extend(run(*a, **kw))
    return records

  runs.run = keep_records
  import contextlib
  import io

  with contextlib.redirect_stdout(io.StringIO()):
    main(["entry"])
  out["compile_eval_s"] = compile_s["eval"]
  out["step_ms"] = 1e3 * records[-1]["step_time"] if len(records) > 1 else float("nan")
  out["steps"] = records[-1]["step"] + 1
  out.update(cache_hits=cache["hits"], cache_misses=cache["misses"])
  out["total_s"] = time.time() - spawn_time
  out["detail"] = sorted(detail.items(), key=lambda kv: -kv[1])[:12]
  return out


# --------------------------------------------------------------------------- parent process
def measure(scenario: str, argv: list[str], cache_dir: str | None) -> dict:
  """One fresh process of ``scenario``; ``cache_dir`` None: cache off."""
  env = dict(os.environ, DGJAX_COMPILATION_CACHE=cache_dir or "off")
  with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
    cmd = [sys.executable, __file__, "--child", scenario, "--child_out", f.name, "--", *argv]
    spawn = time.time()
    proc = subprocess.run(
      cmd,
      cwd=ROOT,
      env={**env, "DGJAX_BENCH_SPAWN": repr(spawn)},
      capture_output=True,
      text=True,
    )
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(Path(f.name).read_text())


def cache_size(cache_dir: str | None) -> tuple[int, float]:
  if not cache_dir:
    return 0, 0.0
  files = [p for p in Path(cache_dir).rglob("*") if p.is_file()]
  return len(files), sum(p.stat().st_size for p in files) / 2**20


def format_table(rows: list[dict]) -> str:
  head = ["scenario", "cache", *(c for c, _ in COLUMNS), "hits/misses", "cache files (MB)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
  for r in rows:
    cells = [r["scenario"], r["mode"]]
    for _, key in COLUMNS:
      v = r.get(key, float("nan"))
      cells.append(f"{v:.0f}" if key == "step_ms" else f"{v:.1f}")
    cells.append(f"{r['cache_hits']}/{r['cache_misses']}")
    cells.append(f"{r['cache_files']} ({r['cache_mb']:.1f})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_all(
  scenarios, modes, data_dir: str | None, steps: int, extra=None, detail=False, log=print
) -> list[dict]:
  """Every scenario in every mode (``off``, ``cold``, ``warm``: cold fills a fresh cache
  directory that warm then reads); the rows of :func:`format_table`."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="dgjax-ttf-") as tmp:
    tmp = Path(tmp)
    for scenario in scenarios:
      if scenario == "pacs":
        scenario_data = str(write_synthetic_pacs(tmp / "images"))
      else:
        scenario_data = data_dir
      cache_dir = str(tmp / f"cache-{scenario}")
      for mode in modes:
        if mode == "cold" and Path(cache_dir).exists():
          raise ValueError("'cold' must come before 'warm' (and once)")
        out = str(tmp / f"run-{scenario}-{mode}")
        argv = scenario_argv(scenario, scenario_data, out, steps, extra)
        r = measure(scenario, argv, None if mode == "off" else cache_dir)
        files, mb = cache_size(None if mode == "off" else cache_dir)
        rows.append({"scenario": scenario, "mode": mode, "cache_files": files, "cache_mb": mb, **r})
        log(
          f"{scenario} {mode}: first record {r['first_record_s']:.1f} s "
          f"(import {r['import_s']:.1f}, data {r['data_s']:.1f}, compile step "
          f"{r['compile_step_s']:.1f}, eval {r['eval_s']:.1f} of which compile "
          f"{r['compile_eval_s']:.1f}), {r['step_ms']:.0f} ms/step",
          flush=True,
        )
        if detail:
          for key, secs in r["detail"]:
            log(f"    {secs:6.2f} s  {key}")
  return rows


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--child" in argv:  # internal: one measurement; the entry point's flags after "--"
    split = argv.index("--")
    own, entry_argv = argv[:split], argv[split + 1 :]
    scenario = own[own.index("--child") + 1]
    target = own[own.index("--child_out") + 1]
    result = child(scenario, entry_argv, float(os.environ["DGJAX_BENCH_SPAWN"]))
    Path(target).write_text(json.dumps(result))
    return 0
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--scenarios", default="cmnist,pacs", help="comma-separated: cmnist, pacs")
  p.add_argument("--modes", default="cold,warm", help="comma-separated: off, cold, warm")
  p.add_argument(
    "--data_dir",
    default=None,
    help="MNIST IDX files for cmnist (default $DGJAX_DATA_DIR/mnist-first10k)",
  )
  p.add_argument("--steps", type=int, default=6, help="training steps per run")
  p.add_argument(
    "--entry_arg",
    action="append",
    default=[],
    help="another flag for the entry point, e.g. --entry_arg=--max_examples=2000",
  )
  p.add_argument(
    "--detail", action="store_true", help="print the costliest trace / lower / compile events"
  )
  args = p.parse_args(argv)
  scenarios = [s for s in args.scenarios.split(",") if s]
  modes = [m for m in args.modes.split(",") if m]
  data_dir = args.data_dir
  if data_dir is None and "cmnist" in scenarios:
    if not os.environ.get("DGJAX_DATA_DIR"):
      p.error("cmnist needs --data_dir or DGJAX_DATA_DIR")
    data_dir = str(Path(os.environ["DGJAX_DATA_DIR"]) / "mnist-first10k")
  load = os.getloadavg()
  rows = run_all(scenarios, modes, data_dir, args.steps, args.entry_arg, args.detail)
  print()
  print(format_table(rows))
  print(
    f"\n{os.cpu_count()} CPUs, load average {load[0]:.1f} before the runs; "
    f"cmnist data {data_dir}; {args.steps} steps per run"
    + (f"; entry point flags {' '.join(args.entry_arg)}" if args.entry_arg else "")
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
