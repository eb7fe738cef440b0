r"""The performance suite: every section, one command, a JSON and a Markdown table.

    python bench/suite.py                                  # all sections, 5 reps -> bench/results-<backend>.{json,md}
    python bench/suite.py --reps 3 --out bench/results-cpu
    python bench/suite.py --quick --reps 1                 # smoke check (a few minutes on CPU)
    python bench/suite.py --sections domains,hutchinson_mlp

Sections:
1. ``methods_cnn``: every registered method on DomainBed's Colored MNIST CNN, 2 domains x 64
   images (28x28x2), the :mod:`dgjax.train` step (sampling included), plus pooled ERM (one
   gradient of the mean loss, no per-domain split) as the lower bound.
2. ``methods_mlp``: every registered method on IRM-style Colored MNIST, MLP 392-390-390-1,
   full batch of 2 environments x 4166 examples (2x14x14 flattened: the ``mnist-first10k``
   split's shapes), the :mod:`dgjax.irm_benchmark` hparams.
3. ``domains``: erm, sand and hgp on the CNN with 2, 3, 5 and 8 training domains x 64.
4. ``hutchinson_cnn`` / ``hutchinson_mlp``: Hutchinson with S = 1, 10, 100, 300 probe
   vectors, next to ERM, on the CNN and on the MLP.

Every row: ms/step (median of ``--reps`` rounds, variants of a section timed interleaved:
A, B, C, A, B, C, ...), the ratio to the section's ERM row, compile time (lower + compile),
GFLOP from XLA's cost analysis of the compiled step, achieved GFLOP/s, the multiple of the
matmul floor (FLOPs / the float32 rate of a 2048^3 matmul measured in this run, best of
before and after the sections) and XLA's temp buffer size. Data are random arrays of the
real shapes (timing only). Benchmarks are scripts, not tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hessian_step_time  # noqa: E402
import step_time  # noqa: E402
from common import compile_stats, load_average, matmul_rate, time_interleaved, warm_up  # noqa: E402

from dgjax import methods  # noqa: E402
from dgjax import train as train_lib  # noqa: E402

DOMAINS = (2, 3, 5, 8)
DOMAIN_METHODS = ("erm", "sand", "hgp")
SAMPLES = (1, 10, 100, 300)
QUICK_METHODS = ("erm", "sand", "hgp")
QUICK_DOMAINS = (2, 5)
LOOP_NOTE = (
  "XLA's cost analysis counts a loop body once: fish's inner steps are a `lax.scan` "
  "over the domains, so its GFLOP are one domain's and its GFLOP/s and floor multiple "
  "are understated (by about the number of domains)."
)


def cnn_variant(label, method, d=2, pooled=False, ref="erm"):
  """A CNN variant: the :func:`step_time.build` step, default hparams, ``auto`` lowerings."""
  pd = train_lib.resolve_per_domain_impl("auto")
  kw = dict(method=method, per_domain_impl=pd, conv_impl="auto", pooled=pooled, d=d)
  return {
    "label": label,
    "method": method,
    "domains": d,
    "ref": ref,
    "build": lambda: step_time.build(**kw),
  }


def hessian_variant(setting, label, method, overrides=None, ref="erm"):
  """A :mod:`hessian_step_time` variant (``setting`` "cnn" or "irm") with hparam overrides;
  the CNN with the trainer's ``auto`` conv lowering, as in the other CNN sections."""
  if setting == "cnn":
    build = lambda: hessian_step_time.build_cnn(method, dict(overrides or {}), conv_impl="auto")
  else:
    build = lambda: hessian_step_time.build_irm(method, dict(overrides or {}))
  return {"label": label, "method": method, "domains": 2, "ref": ref, "build": build}


def sections(quick: bool):
  """``(key, title, note, variants)`` of every section (``quick``: a subset of 1 and 3)."""
  names = list(QUICK_METHODS) if quick else sorted(methods.METHODS)
  domains = QUICK_DOMAINS if quick else DOMAINS
  out = [
    (
      "methods_cnn",
      "1. Every method, DomainBed Colored MNIST CNN, 2 domains x 64",
      "`erm pooled`: one gradient of the mean loss over all 128 images (no per-domain split). "
      + LOOP_NOTE,
      [cnn_variant(m, m) for m in names] + [cnn_variant("erm pooled", "erm", pooled=True)],
    )
  ]
  if not quick:
    out.append(
      (
        "methods_mlp",
        "2. Every method, IRM-style Colored MNIST MLP, full batch 2 x 4166",
        "MLP 392-390-390-1 on 2 environments x 4166 examples (2x14x14, the mnist-first10k "
        "split's shapes; random data), IRM benchmark hparams. " + LOOP_NOTE,
        [hessian_variant("irm", m, m) for m in names],
      )
    )
  out.append(
    (
      "domains",
      "3. Number of training domains, CNN, 64 images per domain",
      "`x ERM` is against ERM with the same number of domains.",
      [
        cnn_variant(f"{m} D={d}", m, d=d, ref=f"erm D={d}") for d in domains for m in DOMAIN_METHODS
      ],
    )
  )
  if not quick:
    for setting, key, title in (
      ("cnn", "hutchinson_cnn", "4a. Hutchinson samples S, CNN 2 x 64"),
      ("irm", "hutchinson_mlp", "4b. Hutchinson samples S, IRM MLP full batch"),
    ):
      out.append(
        (
          key,
          title,
          "S probe vectors per step (`hutchinson_samples`); other hparams default.",
          [hessian_variant(setting, "erm", "erm")]
          + [
            hessian_variant(setting, f"hutchinson S={s}", "hutchinson", {"hutchinson_samples": s})
            for s in SAMPLES
          ],
        )
      )
  return out


def run_section(variants, reps):
  """Builds, compiles and warms every variant, then times them interleaved; returns rows."""
  live = []
  for v in variants:
    step, state, data = v["build"]()
    stats = compile_stats(step, state, data)
    state = warm_up(stats["compiled"], state, data)
    live.append({**v, **stats, "step": stats["compiled"], "state": state, "data": data})
    print(f"  compiled {v['label']} ({stats['compile_s']:.1f} s)", file=sys.stderr, flush=True)
  time_interleaved(live, reps)
  rows = [
    {
      k: v[k]
      for k in (
        "label",
        "method",
        "domains",
        "ref",
        "ms",
        "compile_s",
        "flops",
        "temp_mb",
        "arg_mb",
        "out_mb",
        "alias_mb",
      )
    }
    | {"times_ms": [1e3 * t for t in v["times"]]}
    for v in live
  ]
  return rows


def add_ratios(rows, rate):
  """Adds ``x_ref`` (ms over the reference row's), achieved FLOP/s and ``x_floor``."""
  ms = {r["label"]: r["ms"] for r in rows}
  for r in rows:
    r["x_ref"] = r["ms"] / ms[r["ref"]] if r["ref"] in ms else float("nan")
    r["gflop_per_s"] = r["flops"] / r["ms"] / 1e6
    r["floor_ms"] = 1e3 * r["flops"] / rate
    r["x_floor"] = r["ms"] / r["floor_ms"] if r["floor_ms"] > 0 else float("nan")
  return rows


def cpu_model():
  """The CPU model name (Linux ``/proc/cpuinfo``), else :func:`platform.processor`."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def header(reps, quick):
  """Run metadata (the matmul rates are added after the sections)."""
  dev = jax.devices()[0]
  return {
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "backend": jax.default_backend(),
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "reps": reps,
    "quick": quick,
    "load_average_start": load_average(),
  }


def fmt(x, spec):
  """``format(x, spec)``, or ``-`` for NaN."""
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(result):
  """The Markdown report: a header, then one table per section."""
  h = result["header"]
  la = lambda t: ", ".join(f"{x:.2f}" for x in t)
  lines = [
    f"# dgjax performance suite ({h['backend']})",
    "",
    f"- device: {h['device_kind']} x {h['device_count']} ({h['cpu']}, {h['cpu_count']} CPU cores visible)",
    f"- backend {h['backend']}, jax {h['jax']}; {h['date']}",
    f"- float32 matmul rate (2048^3): {h['matmul_gflops_before']:.0f} GFLOP/s before, "
    f"{h['matmul_gflops_after']:.0f} after; the floor uses the best, {h['matmul_gflops']:.0f}",
    f"- load average (1, 5, 15 min) at start: {la(h['load_average_start'])}; "
    f"at end: {la(h['load_average_end'])}",
    f"- {h['reps']} timed steps per variant, median, variants of a section interleaved; "
    f"total wall time {h['wall_s'] / 60:.1f} min" + (" (--quick)" if h["quick"] else ""),
    "",
  ]
  for s in result["sections"]:
    lines += [
      f"## {s['title']}",
      "",
      s["note"],
      "",
      "| variant | ms/step | x ERM | compile s | GFLOP | GFLOP/s | x matmul floor | XLA temp MB |",
      "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
      lines.append(
        f"| {r['label']} | {fmt(r['ms'], '.1f')} | {fmt(r['x_ref'], '.2f')} | "
        f"{fmt(r['compile_s'], '.1f')} | {fmt(r['flops'] / 1e9, '.2f')} | "
        f"{fmt(r['gflop_per_s'], '.1f')} | {fmt(r['x_floor'], '.1f')} | {fmt(r['temp_mb'], '.1f')} |"
      )
    lines.append("")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--quick", action="store_true", help="sections 1 and 3 only, erm/sand/hgp, D = 2, 5"
  )
  p.add_argument("--reps", type=int, default=5, help="timed steps per variant")
  p.add_argument(
    "--out",
    help="output prefix (writes <out>.json and <out>.md); default bench/results-<backend>[-quick]",
  )
  p.add_argument("--sections", help="comma list of section keys to run (default: all)")
  args = p.parse_args()
  plan = sections(args.quick)
  if args.sections:
    keep = args.sections.split(",")
    unknown = set(keep) - {s[0] for s in plan}
    if unknown:
      p.error(f"unknown sections {sorted(unknown)}; valid: {[s[0] for s in plan]}")
    plan = [s for s in plan if s[0] in keep]
  out = Path(
    args.out
    or Path(__file__).parent / f"results-{jax.default_backend()}{'-quick' if args.quick else ''}"
  )

  t0 = time.perf_counter()
  head = header(args.reps, args.quick)
  before = matmul_rate()
  result = {"header": head, "sections": []}
  for key, title, note, variants in plan:
    print(f"[{key}] {len(variants)} variants", file=sys.stderr, flush=True)
    ts = time.perf_counter()
    rows = run_section(variants, args.reps)
    result["sections"].append(
      {"key": key, "title": title, "note": note, "rows": rows, "wall_s": time.perf_counter() - ts}
    )
  after = matmul_rate()
  rate = max(before, after)
  head.update(
    matmul_gflops_before=before / 1e9,
    matmul_gflops_after=after / 1e9,
    matmul_gflops=rate / 1e9,
    load_average_end=load_average(),
    wall_s=time.perf_counter() - t0,
  )
  for s in result["sections"]:
    add_ratios(s["rows"], rate)
  text = markdown(result)
  out.parent.mkdir(parents=True, exist_ok=True)
  json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
  json_path.write_text(json.dumps(result, indent=1))
  md_path.write_text(text)
  print(text)
  print(f"wrote {json_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
  main()
