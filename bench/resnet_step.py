r"""ResNet train-step cost at 224x224: ms/step, compile time, XLA temp memory, images/s.

    python bench/resnet_step.py                                  # ResNet-50, 3 domains x 32
    python bench/resnet_step.py --arch resnet18 --batch 8 --reps 2   # quick on CPU
    python bench/resnet_step.py --remat --dtype bfloat16         # memory / speed options

The step is the engine's (``dgjax.train.build_run``) for each of ``--methods`` with the
image task's on-device augmentation (for ERM, DomainBed's: one forward of the concatenated
``[D*B]`` batch, mean cross-entropy, Adam): uint8 ``x[D, B, 224, 224, 3]`` from the input
pipeline -> on-device colour augmentation (:func:`dgjax.augment.train_augment`) -> ResNet ->
loss -> grads -> ``optax.adam``. ``--bn`` times frozen BatchNorm (running statistics, the
paper's DomainBed), unfrozen (batch statistics + the running-statistics update of
:meth:`dgjax.core.Context.updated_variables`, current DomainBed's default) or both, each
method under each setting timed interleaved in one process. Memory is XLA's
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgjax import augment, methods, resnet  # noqa: E402
from dgjax import train as train_lib  # noqa: E402
from dgjax.task import TaskBase  # noqa: E402


class AugmentTask(TaskBase):
  """The image task (``dgjax.image_task.ImageTask``) without its input pipeline: ``model``
  with the running statistics of one fresh initialisation, ``domains`` training domains,
  and its batch rule on a fixed uint8 batch (on-device ColorJitter / RandomGrayscale /
  normalisation with the step's key)."""

  def __init__(self, model, domains, size, dtype, augment=True, variables=None):
    self.model, self.num_domains, self.dtype = model, domains, dtype
    self.augment = augment  # False: the evaluation preprocessing only (a cheaper compile)
    if variables is None:  # (variants of one architecture can share them: float32 params)
      variables = resnet.init_variables(model, jax.random.key(0), size)
    self._params, self.variables = variables["params"], {"batch_stats": variables["batch_stats"]}

  def init_params(self, key):
    del key  # the one initialisation above (timing only)
    return self._params

  def batch(self, data, key, batch_size):
    if not self.augment:
      return {"x": augment.eval_preprocess(data["x"]).astype(self.dtype), "y": data["y"]}
    return {"x": augment.train_augment(key, data["x"], dtype=self.dtype), "y": data["y"]}

  def evaluate(self, model_state, run, predict, *, step=0, mesh=None):
    raise NotImplementedError("AugmentTask times the step only; it has no evaluation data")


def build(method, arch, num_classes, domains, batch, size, freeze_bn, dtype, remat):
  """The engine's step (:func:`dgjax.train.build_run`) of ``method`` on a ResNet with
  DomainBed's large-image hparams; returns ``(step, state)``."""
  model = resnet.resnet_classifier(
    arch, num_classes, dropout=0.0, freeze_bn=freeze_bn, dtype=dtype, remat=remat
  )
  return build_with_model(method, model, domains, batch, size, dtype)


def build_with_model(method, model, domains, batch, size, dtype, augment=True, variables=None):
  """:func:`build`'s step on any image classifier ``model`` (e.g. a smaller ResNet);
  ``augment=False``: without the colour augmentation (its compile alone is seconds on CPU);
  ``variables``: the model's initial variables (default: a fresh initialisation)."""
  hp = methods.resolve_hparams(method, 0, {"batch_size": batch}, dataset="PACS")
  task = AugmentTask(model, domains, size, dtype, augment, variables)
  return train_lib.build_run(method, task, hp)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--methods", default="erm,sand,hgp", help="comma list of registered methods")
  p.add_argument("--arch", default="resnet50", choices=sorted(resnet.ARCHS))
  p.add_argument("--domains", type=int, default=3)
  p.add_argument("--batch", type=int, default=32, help="per domain")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--classes", type=int, default=7)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument(
    "--bn",
    default="both",
    choices=["frozen", "unfrozen", "both"],
    help="BatchNorm setting(s) to time (DomainBed's freeze_bn true / false)",
  )
  p.add_argument("--remat", action="store_true", help="jax.checkpoint every residual block")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument(
    "--compile_only", action="store_true", help="compile and report memory only (no timed steps)"
  )
  p.add_argument("--json", help="append the result as one JSON line to this file")
  args = p.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  data = {
    "x": jax.device_put(
      rng.integers(0, 256, (args.domains, args.batch, args.size, args.size, 3), dtype=np.uint8)
    ),
    "y": jax.device_put(rng.integers(0, args.classes, (args.domains, args.batch)).astype(np.int32)),
  }
  settings = {"frozen": [True], "unfrozen": [False], "both": [True, False]}[args.bn]
  variants = []  # (method, freeze_bn, compiled step, state, compile s, memory)
  for method in args.methods.split(","):
    for freeze_bn in settings:
      step, state = build(
        method,
        args.arch,
        args.classes,
        args.domains,
        args.batch,
        args.size,
        freeze_bn,
        dtype,
        args.remat,
      )
      t0 = time.perf_counter()
      compiled = step.lower(state, data).compile()
      compile_s = time.perf_counter() - t0
      if not args.compile_only:
        state, metrics = compiled(state, data)  # warm-up
        jax.block_until_ready(metrics)
      variants.append([method, freeze_bn, compiled, state, compile_s, compiled.memory_analysis()])
  times = [[] for _ in variants]
  for _ in range(0 if args.compile_only else args.reps):  # interleaved: one rep of each in turn
    for i, v in enumerate(variants):
      t0 = time.perf_counter()
      v[3], metrics = v[2](v[3], data)
      jax.block_until_ready(metrics)
      times[i].append(time.perf_counter() - t0)
  rows = []
  for (method, freeze_bn, _, _, compile_s, mem), ts in zip(variants, times):
    mb = lambda f: getattr(mem, f, float("nan")) / 2**20 if mem is not None else float("nan")  # noqa: E731
    ms = 1000 * (statistics.median(ts) if ts else float("nan"))
    n = args.domains * args.batch
    rows.append(
      {
        "method": method,
        "freeze_bn": freeze_bn,
        "arch": args.arch,
        "device": jax.devices()[0].device_kind,
        "domains": args.domains,
        "batch": args.batch,
        "size": args.size,
        "remat": args.remat,
        "dtype": args.dtype,
        "compile_s": round(compile_s, 2),
        "ms_per_step": round(ms, 1),
        "images_per_s": round(1000 * n / ms, 1),
        "temp_mb": round(mb("temp_size_in_bytes"), 1),
        "arg_mb": round(mb("argument_size_in_bytes"), 1),
        "reps": 0 if args.compile_only else args.reps,
      }
    )
  print(
    "| method | BatchNorm | arch | device | D x B | remat | dtype | compile s | ms/step | "
    "x first | images/s | XLA temp MB | args MB |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    bn = "frozen" if row["freeze_bn"] else "unfrozen"
    print(
      f"| {row['method']} | {bn} | {row['arch']} | {row['device']} | {args.domains} x {args.batch} | "
      f"{args.remat} | {args.dtype} | {row['compile_s']:.1f} | {row['ms_per_step']:.0f} | "
      f"{row['ms_per_step'] / rows[0]['ms_per_step']:.2f} | {row['images_per_s']:.1f} | "
      f"{row['temp_mb']:.0f} | {row['arg_mb']:.0f} |"
    )
  if args.json:
    with open(args.json, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
