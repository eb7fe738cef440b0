r"""Train-step cost of every backbone at its input size: ms/step, compile time, XLA temp memory.

    python bench/backbones.py                                   # all, 3 domains x 32, ERM
    python bench/backbones.py --domains 2 --batch 2 --reps 2    # quick on a CPU
    python bench/backbones.py --backbones dinov2_vitb14 --dtype bfloat16 --remat

For each backbone of :mod:`dgjax.backbones` (ResNets, DINOv2 and CLIP at 224, the Wide-ResNet
at 32) the engine's step (:func:`dgjax.train.build_run`) of ``--method`` (default ERM, with
DomainBed's large-image hparams, freeze_bn false) on the image task's on-device batch rule:
uint8 ``x[D, B, S, S, 3]`` -> ColorJitter / RandomGrayscale / ImageNet normalisation
(:func:`dgjax.augment.train_augment`) -> backbone -> head -> loss -> grads -> Adam. Fresh
weights (the numbers do not depend on them). Compile time is lower + compile of that step;
memory is XLA's ``memory_analysis()`` of it (temp: activations and scratch; args: params,
optimizer state, batch). Interleaved timing: one step of each backbone in turn, ``--reps``
rounds, median.
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

from dgjax import augment, backbones, methods  # noqa: E402
from dgjax import train as train_lib  # noqa: E402
from dgjax.task import TaskBase  # noqa: E402


class SyntheticImageTask(TaskBase):
  """The image task's model and batch rule on a fixed uint8 batch (no input pipeline)."""

  def __init__(self, model, domains, size, dtype):
    self.model, self.num_domains, self.dtype = model, domains, dtype
    variables = backbones.init_variables(model, jax.random.key(0), size)
    self._params = variables.pop("params")
    self.variables = variables

  def init_params(self, key):
    del key  # the one initialisation above (timing only)
    return self._params

  def batch(self, data, key, batch_size):
    return {"x": augment.train_augment(key, data["x"], dtype=self.dtype), "y": data["y"]}

  def evaluate(self, model_state, run, predict, *, step=0, mesh=None):
    raise NotImplementedError("timing only")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--backbones", default=",".join(backbones.BACKBONES), help="comma list")
  p.add_argument("--method", default="erm")
  p.add_argument("--domains", type=int, default=3)
  p.add_argument("--batch", type=int, default=32, help="per domain")
  p.add_argument("--classes", type=int, default=7)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--remat", action="store_true", help="jax.checkpoint every block")
  p.add_argument("--dtype", default="float32", choices=sorted(backbones.DTYPES))
  p.add_argument("--json", help="append the rows as JSON lines to this file")
  args = p.parse_args(argv)

  dtype = backbones.DTYPES[args.dtype]
  rng = np.random.default_rng(0)
  variants = []
  for name in args.backbones.split(","):
    b = backbones.get_backbone(name)
    data = {
      "x": jax.device_put(
        rng.integers(0, 256, (args.domains, args.batch, b.input_size, b.input_size, 3), np.uint8)
      ),
      "y": jax.device_put(rng.integers(0, args.classes, (args.domains, args.batch), np.int32)),
    }
    hp = methods.resolve_hparams(args.method, 0, {"batch_size": args.batch}, dataset="PACS")
    model = backbones.make_classifier(name, args.classes, hp, dtype=dtype, remat=args.remat)
    task = SyntheticImageTask(model, args.domains, b.input_size, dtype)
    step, state = train_lib.build_run(args.method, task, hp)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, data)  # warm-up
    jax.block_until_ready(metrics)
    n_params = sum(v.size for v in jax.tree.leaves(state.params["featurizer"]))
    variants.append(
      {"b": b, "step": compiled, "state": state, "data": data, "compile_s": compile_s,
       "mem": compiled.memory_analysis(), "params": n_params, "times": []}
    )  # fmt: skip
  for _ in range(args.reps):
    for v in variants:
      t0 = time.perf_counter()
      v["state"], metrics = v["step"](v["state"], v["data"])
      jax.block_until_ready(metrics)
      v["times"].append(time.perf_counter() - t0)
  device = jax.devices()[0].device_kind
  print(
    f"{args.method}, {args.domains} domains x {args.batch}, dtype {args.dtype}, remat "
    f"{args.remat}, {device}, median of {args.reps}\n"
  )
  print(
    "| backbone | input | params (M) | compile s | ms/step | images/s | XLA temp MB | args MB |"
  )
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  rows = []
  for v in variants:
    mem = v["mem"]
    mb = lambda f: getattr(mem, f, float("nan")) / 2**20 if mem is not None else float("nan")  # noqa: E731
    ms = 1000 * statistics.median(v["times"]) if v["times"] else float("nan")
    row = {
      "backbone": v["b"].name,
      "input": v["b"].input_size,
      "params_m": round(v["params"] / 1e6, 2),
      "device": device,
      "method": args.method,
      "domains": args.domains,
      "batch": args.batch,
      "dtype": args.dtype,
      "remat": args.remat,
      "compile_s": round(v["compile_s"], 2),
      "ms_per_step": round(ms, 1),
      "images_per_s": round(1000 * args.domains * args.batch / ms, 2),
      "temp_mb": round(mb("temp_size_in_bytes"), 1),
      "arg_mb": round(mb("argument_size_in_bytes"), 1),
      "reps": args.reps,
    }
    rows.append(row)
    print(
      f"| {row['backbone']} | {row['input']} | {row['params_m']:.1f} | {row['compile_s']:.1f} | "
      f"{row['ms_per_step']:.0f} | {row['images_per_s']:.2f} | {row['temp_mb']:.0f} | "
      f"{row['arg_mb']:.0f} |"
    )
  if args.json:
    with open(args.json, "a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  jnp.zeros(())  # initialise the backend before timing
  sys.exit(main())
