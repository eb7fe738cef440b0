r"""ResNet train-step cost at 224x224: ms/step, compile time, XLA temp memory, images/s.

    python bench/resnet_step.py                                  # ResNet-50, 3 domains x 32
    python bench/resnet_step.py --arch resnet18 --batch 8 --reps 2   # quick on CPU
    python bench/resnet_step.py --remat --dtype bfloat16         # memory / speed options

The step is a plain ERM step built here (DomainBed's ERM: one forward of the concatenated
``[D*B]`` batch, mean cross-entropy, Adam): uint8 ``x[D, B, 224, 224, 3]`` from the input
pipeline -> on-device colour augmentation (:func:`dgjax.augment.train_augment`) -> ResNet ->
loss -> grads -> ``optax.adam``. ``--freeze_bn`` (default on) keeps BN statistics fixed;
``--no-freeze_bn`` uses batch statistics and updates the running ones. Memory is XLA's
``memory_analysis()`` of the compiled step (temp = activations and scratch; args = params,
optimizer state and the batch). ``images/s`` = D * B / step time: what the input pipeline
must deliver to keep the step busy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgjax import augment, resnet  # noqa: E402


def build(arch, num_classes, freeze_bn, dtype, remat, lr=5e-5):
  model = resnet.resnet_classifier(arch, num_classes, dropout=0.0, freeze_bn=freeze_bn,
                                   dtype=dtype, remat=remat)
  opt = optax.adam(lr)

  def step(state, x, y, key):
    params, batch_stats, opt_state = state
    d, b = y.shape
    inputs = augment.train_augment(key, x, dtype=dtype).reshape((d * b,) + x.shape[2:])

    def loss_fn(p):
      if freeze_bn:
        logits, new_stats = model.apply({"params": p, "batch_stats": batch_stats}, inputs,
                                        train=True), batch_stats
      else:
        logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, inputs,
                                  train=True, mutable=["batch_stats"])
        new_stats = upd["batch_stats"]
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y.reshape(-1)).mean()
      return loss, new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  return model, opt, jax.jit(step, donate_argnums=0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="resnet50", choices=sorted(resnet.ARCHS))
  p.add_argument("--domains", type=int, default=3)
  p.add_argument("--batch", type=int, default=32, help="per domain")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--classes", type=int, default=7)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--freeze_bn", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--remat", action="store_true", help="jax.checkpoint every residual block")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--compile_only", action="store_true",
                 help="compile and report memory only (no timed steps)")
  p.add_argument("--json", help="append the result as one JSON line to this file")
  args = p.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  model, opt, step = build(args.arch, args.classes, args.freeze_bn, dtype, args.remat)
  variables = resnet.init_variables(model, jax.random.key(0), args.size)
  state = (variables["params"], variables["batch_stats"], opt.init(variables["params"]))
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.integers(0, 256, (args.domains, args.batch, args.size, args.size, 3),
                                  dtype=np.uint8))
  y = jax.device_put(rng.integers(0, args.classes, (args.domains, args.batch)).astype(np.int32))

  t0 = time.perf_counter()
  compiled = step.lower(state, x, y, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mb = lambda f: getattr(mem, f, float("nan")) / 2**20 if mem is not None else float("nan")  # noqa: E731
  times = [float("nan")]
  loss = float("nan")
  if not args.compile_only:
    state, loss = compiled(state, x, y, jax.random.key(1))  # warm-up
    jax.block_until_ready(loss)
    times = []
  for i in range(0 if args.compile_only else args.reps):
    t0 = time.perf_counter()
    state, loss = compiled(state, x, y, jax.random.key(2 + i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  ms = 1000 * (statistics.median(times) if times else float("nan"))
  n = args.domains * args.batch
  row = {"arch": args.arch, "device": jax.devices()[0].device_kind, "domains": args.domains,
         "batch": args.batch, "size": args.size, "freeze_bn": args.freeze_bn, "remat": args.remat,
         "dtype": args.dtype, "compile_s": round(compile_s, 2), "ms_per_step": round(ms, 1),
         "images_per_s": round(1000 * n / ms, 1), "temp_mb": round(mb("temp_size_in_bytes"), 1),
         "arg_mb": round(mb("argument_size_in_bytes"), 1),
         "reps": 0 if args.compile_only else args.reps,
         "loss": float(loss)}
  print(f"| arch | device | D x B | freeze_bn | remat | dtype | compile s | ms/step | images/s | "
        f"XLA temp MB | args MB |")
  print("| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
  print(f"| {row['arch']} | {row['device']} | {args.domains} x {args.batch} | {args.freeze_bn} | "
        f"{args.remat} | {args.dtype} | {row['compile_s']:.1f} | {row['ms_per_step']:.0f} | "
        f"{row['images_per_s']:.1f} | {row['temp_mb']:.0f} | {row['arg_mb']:.0f} |")
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
