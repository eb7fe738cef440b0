"""Which lowering of the per-domain MNIST_CNN step is fastest on XLA:CPU?

Measures ``value_and_grad`` of the cross-entropy loss of DomainBed's MNIST_CNN on
2 domains x 64 images (28x28x2), per domain (``vmap`` over domains or ``unrolled``) and pooled
(one gradient over all 128 images), for every convolution lowering in ``dgjax.conv`` plus a
few experimental ones defined here. Timings are interleaved (A, B, C, A, B, C, ...) in one
process and the median is reported, next to the in-process float32 matmul rate (2048^3,
median) and the step's FLOP count from XLA's cost analysis; ``x floor`` is
ms/step / (FLOPs / matmul rate).

    python bench/conv_lowering.py                # all variants, default XLA flags
    python bench/conv_lowering.py --flags        # also XLA:CPU flag sweep (one subprocess each)
    python bench/conv_lowering.py --only im2col  # variants whose name contains "im2col"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dgjax import conv as dconv  # noqa: E402
from dgjax.models import mnist_cnn  # noqa: E402
from dgjax.per_domain import per_domain_value_and_grad  # noqa: E402

D, B, HW, CIN = 2, 64, 28, 2


# ---------------------------------------------------------------- experimental lowerings
def _conv_s2d(x, kernel, stride, padding):
  """Stride-2 layers by space-to-depth: pad, fold 2x2 blocks into channels, then a stride-1
  2x2 'valid' im2col conv with the 3x3 kernel placed in a zero 4x4 (16/9 the FLOPs)."""
  if stride != 2:
    return dconv.conv_im2col(x, kernel, stride, padding)
  kh, kw, ho, wo = dconv._check(x, kernel, stride, padding)
  n, h, w, c = x.shape
  kb = (kh + 1) // 2  # taps per axis after folding
  hp, wp = 2 * (ho + kb - 1), 2 * (wo + kb - 1)
  xp = jnp.pad(x, ((0, 0), (padding, hp - h - padding), (padding, wp - w - padding), (0, 0)))
  xs = xp.reshape(n, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(n, hp // 2, wp // 2, 4 * c)
  kp = jnp.pad(kernel, ((0, 2 * kb - kh), (0, 2 * kb - kw), (0, 0), (0, 0)))
  kp = kp.reshape(kb, 2, kb, 2, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(kb, kb, 4 * c, -1)
  return dconv.conv_im2col(xs, kp, 1, 0)


def _conv_shift3(x, kernel, stride, padding):
  """Row hybrid (stride 1): concat the kw horizontal taps (K = kw*Cin), one matmul to
  kh*Cout, then sum kh vertically shifted slices."""
  if stride != 1:
    return dconv.conv_im2col(x, kernel, stride, padding)
  kh, kw, ho, wo = dconv._check(x, kernel, stride, padding)
  n, h, w, cin = x.shape
  cout = kernel.shape[3]
  xp = jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (0, 0)))
  rows = jnp.concatenate([xp[:, :, b : b + wo, :] for b in range(kw)], axis=-1)  # [n,h,wo,kw*cin]
  wk = jnp.transpose(kernel, (1, 2, 0, 3)).reshape(kw * cin, kh * cout)
  z = dconv._matmul_last(rows, wk).reshape(n, h, wo, kh, cout)
  zp = jnp.pad(z, ((0, 0), (padding, padding), (0, 0), (0, 0), (0, 0)))
  return sum(zp[:, a : a + ho, :, a, :] for a in range(kh))


def _conv_xla_nchw(x, kernel, stride, padding):
  y = jax.lax.conv_general_dilated(
    jnp.transpose(x, (0, 3, 1, 2)),
    jnp.transpose(kernel, (3, 2, 0, 1)),
    (stride, stride),
    ((padding, padding), (padding, padding)),
    dimension_numbers=("NCHW", "OIHW", "NCHW"),
  )
  return jnp.transpose(y, (0, 2, 3, 1))


def _conv_im2col_small(x, kernel, stride, padding):
  """im2col for conv1 (Cin < 8) and strided layers, XLA convolution otherwise."""
  if stride != 1 or x.shape[-1] < 8:
    return dconv.conv_im2col(x, kernel, stride, padding)
  return dconv.conv_xla(x, kernel, stride, padding)


def _conv_shift_s2d(x, kernel, stride, padding):
  if stride == 2:
    return _conv_s2d(x, kernel, stride, padding)
  return _conv_shift_matmul_mixed(x, kernel, stride, padding)


def _conv_im2col_cmajor(x, kernel, stride, padding):
  """im2col with a channel-major patch layout [..., Cin, kh*kw]."""
  kh, kw, ho, wo = dconv._check(x, kernel, stride, padding)
  n, _, _, cin = x.shape
  patches = jnp.stack(dconv._taps(x, kh, kw, ho, wo, stride, padding), axis=-1)
  patches = patches.reshape(n, ho, wo, cin * kh * kw)
  w = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, kernel.shape[3])
  return dconv._matmul_last(patches, w)


def _conv_shift_matmul_mixed(x, kernel, stride, padding):
  """shift_matmul for stride-1 layers with Cin >= Cout, im2col otherwise."""
  if stride == 1 and x.shape[-1] >= kernel.shape[-1]:
    return dconv.conv_shift_matmul(x, kernel, stride, padding)
  return dconv.conv_im2col(x, kernel, stride, padding)


EXPERIMENTAL = {
  "im2col_cmajor": _conv_im2col_cmajor,
  "shift_matmul_mixed": _conv_shift_matmul_mixed,
  "xla_mmdw_ptg": dconv._make_xla_mmdw("ptg"),
  "x:s2d": _conv_s2d,
  "x:shift3": _conv_shift3,
  "x:xla_nchw": _conv_xla_nchw,
  "x:im2col_small+xla": _conv_im2col_small,
  "x:shift+s2d": _conv_shift_s2d,
}
dconv.CONV_IMPLS.update({k: v for k, v in EXPERIMENTAL.items() if k not in dconv.CONV_IMPLS})

IMPLS = ["xla", "im2col", "xla_mmdw"] + list(EXPERIMENTAL)
MODES = ["pooled", "vmap", "unrolled"]


# ---------------------------------------------------------------- the step
def make_step(impl: str, mode: str):
  model = mnist_cnn(num_classes=2, conv_impl=impl)

  def loss_fn(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  if mode == "pooled":

    def step(params, batch):
      x, y = batch
      return jax.value_and_grad(loss_fn)(params, (x.reshape(D * B, *x.shape[2:]), y.reshape(-1)))
  else:

    def step(params, batch):
      return per_domain_value_and_grad(loss_fn, params, batch, impl=mode)

  return model, jax.jit(step)


def inputs():
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (D, B, HW, HW, CIN), jnp.float32)
  y = jax.random.randint(ky, (D, B), 0, 2)
  params = mnist_cnn(2).init(kp, x[0])["params"]
  return params, (x, y)


def matmul_rate(reps: int = 7, n: int = 2048):
  """(wall-clock FLOP/s, FLOP/s per CPU-second of this process) of an n^3 f32 matmul."""
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  ts, cs = [], []
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    f(a, a).block_until_ready()
    ts.append(time.perf_counter() - t)
    cs.append(time.process_time() - c)
  return 2 * n**3 / statistics.median(ts), 2 * n**3 / statistics.median(cs)


def run(variants, reps: int, check: bool = True):
  params, batch = inputs()
  compiled, res = {}, {}
  ref = None
  for v in variants:
    impl, mode = v.rsplit("/", 1)
    _, step = make_step(impl, mode)
    t = time.perf_counter()
    c = step.lower(params, batch).compile()
    out = jax.block_until_ready(c(params, batch))
    comp = time.perf_counter() - t
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    compiled[v] = c
    res[v] = {"compile_s": comp, "flops": float(ca.get("flops", float("nan"))), "ts": [], "cpu": []}
    if check and mode != "pooled":
      g = jax.tree.leaves(out[1])
      if ref is None:
        ref = g
      else:
        err = max(
          float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(g, ref)
        )
        res[v]["rel_err"] = err
  rates, cpu_rates = [], []
  for r in range(reps):
    if r % 2 == 0:
      rate, cpu_rate = matmul_rate(reps=3)
      rates.append(rate)
      cpu_rates.append(cpu_rate)
    for v in variants:
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(compiled[v](params, batch))
      res[v]["ts"].append(time.perf_counter() - t)
      res[v]["cpu"].append(time.process_time() - c)
  for v in variants:
    res[v]["ms"] = 1e3 * statistics.median(res[v]["ts"])
    res[v]["cpu_ms"] = 1e3 * statistics.median(res[v]["cpu"])
  return (statistics.median(rates), statistics.median(cpu_rates)), res


def exact_flops() -> dict:
  """FLOPs of the convolutions + head (multiply-add = 2), forward and backward, 128 images."""
  n = D * B
  layers, h, c = [], HW, CIN
  for cout, s in ((64, 1), (128, 2), (128, 1), (128, 1)):
    ho = (h + 2 - 3) // s + 1
    layers.append((ho * ho, 9 * c, cout))
    h, c = ho, cout
  fwd = sum(2 * n * hw * k * co for hw, k, co in layers)
  bwd_w = fwd
  bwd_x = sum(2 * n * hw * k * co for hw, k, co in layers[1:])  # no dx for the input layer
  return {"conv_fwd": fwd, "conv_fwd_bwd": fwd + bwd_w + bwd_x}


def print_table(rates, res, flops_ref, title=""):
  rate, cpu_rate = rates
  floor_ms = 1e3 * flops_ref / rate
  cpu_floor_ms = 1e3 * flops_ref / cpu_rate
  if title:
    print(f"\n== {title}")
  print(
    f"matmul rate {rate / 1e9:.1f} GFLOP/s wall-clock, {cpu_rate / 1e9:.1f} GFLOP per "
    f"CPU-second (2048^3 f32, median); step {flops_ref / 1e9:.2f} GFLOP -> floor "
    f"{floor_ms:.0f} ms; target 1.2x = {1.2 * floor_ms:.0f} ms"
  )
  print(
    "x floor = ms/step / floor (wall-clock); x floor(cpu) = the same in CPU time of this "
    "process, which is less sensitive to other load on the machine"
  )
  print(
    f"{'variant':30s} {'ms/step':>8s} {'compile s':>9s} {'x floor':>8s} {'x floor(cpu)':>12s}"
    f" {'XLA GFLOP':>9s} {'rel err':>8s}"
  )
  for v, r in sorted(res.items(), key=lambda kv: kv[1]["ms"]):
    err = f"{r['rel_err']:.1e}" if "rel_err" in r else ""
    print(
      f"{v:30s} {r['ms']:8.0f} {r['compile_s']:9.1f} {r['ms'] / floor_ms:8.2f} "
      f"{r['cpu_ms'] / cpu_floor_ms:12.2f} {r['flops'] / 1e9:9.2f} {err:>8s}"
    )


FLAG_SETS = {
  "default": "",
  "onednn": "--xla_cpu_use_onednn=true",
  "no_xnnpack": "--xla_cpu_use_xnnpack=false",
  "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
  "ynn_dot_conv_elt": "--xla_cpu_experimental_ynn_fusion_type="
  "dot,individual_convolution,eltwise,reduce",
  "vec512": "--xla_cpu_prefer_vector_width=512",
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--only", default="", help="substring filter on variant names")
  ap.add_argument("--flags", action="store_true", help="XLA:CPU flag sweep in subprocesses")
  ap.add_argument("--flag-variants", default="xla/unrolled,xla_mmdw/unrolled,im2col/pooled")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--variants", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()

  fl = exact_flops()
  if args.worker:
    rate, res = run(args.variants.split(","), args.reps, check=False)
    for r in res.values():
      r.pop("ts")
      r.pop("cpu")
    print("JSON" + json.dumps({"rate": rate, "res": res}))
    return

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(
    f"exact conv FLOPs: forward {fl['conv_fwd'] / 1e9:.2f} G, forward+backward "
    f"{fl['conv_fwd_bwd'] / 1e9:.2f} G (128 images)"
  )
  if args.flags:
    variants = args.flag_variants
    out = {k: [] for k in FLAG_SETS}
    for rnd in range(2):  # interleave the flag sets over two rounds
      for name, flags in FLAG_SETS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        p = subprocess.run(
          [sys.executable, __file__, "--worker", "--reps", str(args.reps), "--variants", variants],
          env=env,
          capture_output=True,
          text=True,
        )
        line = [l for l in p.stdout.splitlines() if l.startswith("JSON")]
        if not line:
          print(f"{name}: failed\n{p.stderr[-2000:]}")
          continue
        out[name].append(json.loads(line[0][4:]))
    print(
      f"\nXLA:CPU flag sweep (ms/step, median of per-process medians; each process "
      f"{args.reps} reps)"
    )
    vs = variants.split(",")
    print("cells: ms/step (x floor of the default-flags matmul rate, wall-clock | CPU-time)")
    print(f"{'flags':18s} {'matmul GF/s':>11s} " + " ".join(f"{v:>24s}" for v in vs))
    base_cpu = statistics.median(o["rate"][1] for o in out["default"])
    base_rate = statistics.median(o["rate"][0] for o in out["default"])
    floor_ms = 1e3 * fl["conv_fwd_bwd"] / base_rate
    cpu_floor_ms = 1e3 * fl["conv_fwd_bwd"] / base_cpu
    for name, runs in out.items():
      if not runs:
        continue
      rate = statistics.median(o["rate"][0] for o in runs)
      cells = []
      for v in vs:
        ms = statistics.median(o["res"][v]["ms"] for o in runs)
        cms = statistics.median(o["res"][v]["cpu_ms"] for o in runs)
        cells.append(f"{ms:6.0f} ({ms / floor_ms:4.2f}x|{cms / cpu_floor_ms:4.2f}x)")
      print(f"{name:18s} {rate / 1e9:11.0f} " + " ".join(f"{c:>24s}" for c in cells))
    return

  variants = [
    f"{i}/{m}" for i in IMPLS for m in MODES if any(o in f"{i}/{m}" for o in args.only.split(","))
  ]
  rate, res = run(variants, args.reps)
  print_table(
    rate,
    res,
    fl["conv_fwd_bwd"],
    "per-domain value_and_grad, D=2 x B=64 (pooled: "
    "one grad over 128); rel err = max |g - g_first| / max |g_first| per leaf",
  )


if __name__ == "__main__":
  main()
