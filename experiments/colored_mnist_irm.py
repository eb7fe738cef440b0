r"""IRM-style Colored MNIST (Arjovsky et al.'s setup, as in Fishr and the Hessian-alignment paper).

    python -m experiments.colored_mnist_irm --method=erm,hgp,hutchinson,cma --data_dir=/path/to/mnist
    python -m experiments.colored_mnist_irm --method=hgp --label_shift=0.97    # label-shift variant

Two training environments (colour flip 0.2 and 0.1) from the MNIST training digits, test
environment with flip 0.9, full-batch Adam for the scripts' 501 steps with the published IRM
hparams and the scripts' penalty forms and schedule (see :mod:`dgjax.irm_benchmark`); prints
train / test / gray-test accuracy (mean +- standard error over ``--n_restarts``) per method,
next to the published full-MNIST figures. ``python -m experiments.reproduce irm_cmnist`` runs
the published set of methods and writes the report. ``--output`` writes every method's result (per-restart
finals and the evaluation history, penalty values included) as JSON lines. See
:mod:`dgjax.irm_benchmark`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

from dgjax import compilation_cache
from dgjax import irm_benchmark
from dgjax import methods
from dgjax.data import DataError, load_mnist

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "method", "erm", "comma-separated methods, from: " + ", ".join(sorted(methods.METHODS))
)
flags.DEFINE_integer(
  "steps",
  irm_benchmark.STEPS,
  "the scripts' loop length: steps - 1 full-batch "
  "updates, then the report (their last iteration's forward pass)",
)
flags.DEFINE_integer("n_restarts", 10, "restarts (new data draw and initialisation each)")
flags.DEFINE_integer("seed", 0, "base seed of the restarts")
flags.DEFINE_float(
  "label_shift",
  None,
  "label-shift variant: env 0 gets this fraction of the digits < 5 "
  "and 1 - it of the others (the Hessian paper uses 0.97)",
)
flags.DEFINE_float(
  "penalty_weight", irm_benchmark.PENALTY_WEIGHT, "penalty weight after the switch"
)
flags.DEFINE_integer("penalty_anneal_iters", irm_benchmark.PENALTY_ANNEAL_ITERS, "switch step")
flags.DEFINE_float("lr", irm_benchmark.LR, "Adam learning rate")
flags.DEFINE_float("l2_weight", irm_benchmark.L2_WEIGHT, "weight of sum ||w||^2 in the loss")
flags.DEFINE_string("hparams", None, 'JSON object of hparam overrides, e.g. \'{"alpha": 0.1}\'')
flags.DEFINE_string(
  "data_dir",
  None,
  "directory with the MNIST IDX files (training digits first). Default: TFDS 'mnist'",
)
flags.DEFINE_integer("eval_every", 100, "evaluate every this many steps")
flags.DEFINE_bool(
  "hessian_gap", False, "log max_{e,e'} ||H_e - H_e'||_2 of the head at each evaluation"
)
flags.DEFINE_enum(
  "restarts_impl",
  "auto",
  ["auto", "vmap", "sequential"],
  "restarts as one vmapped program or one after another (auto: sequential on CPU)",
)
flags.DEFINE_string("output", None, "append each method's result as one JSON line to this file")
flags.DEFINE_string("compilation_cache", None, compilation_cache.FLAG_HELP)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:  # before anything compiles: JAX opens the cache once
    compilation_cache.setup(FLAGS.compilation_cache)
  except compilation_cache.CompilationCacheError as e:
    fail(str(e))
  names = [m.strip() for m in FLAGS.method.split(",") if m.strip()]
  try:
    for m in names:
      methods.get_method(m)
    overrides = json.loads(FLAGS.hparams) if FLAGS.hparams else {}
    if not isinstance(overrides, dict):
      raise ValueError("--hparams must be a JSON object")
  except json.JSONDecodeError as e:
    fail(f"--hparams is not valid JSON: {e}")
  except ValueError as e:
    fail(str(e))
  if FLAGS.n_restarts < 1 or FLAGS.steps < 2:
    fail("--n_restarts must be >= 1 and --steps >= 2")
  if FLAGS.label_shift is not None and not 0 < FLAGS.label_shift < 1:
    fail(f"--label_shift must be in (0, 1), got {FLAGS.label_shift}")
  try:
    mnist = load_mnist(FLAGS.data_dir)
  except DataError as e:
    fail(str(e))
  impl = irm_benchmark.resolve_restarts_impl(FLAGS.restarts_impl)
  print(f"data: {mnist.source}")
  note, n_env = None, None
  results = []
  for m in names:
    cfg = irm_benchmark.IRMConfig(
      method=m,
      steps=FLAGS.steps,
      n_restarts=FLAGS.n_restarts,
      seed=FLAGS.seed,
      lr=FLAGS.lr,
      l2_weight=FLAGS.l2_weight,
      penalty_weight=FLAGS.penalty_weight,
      penalty_anneal_iters=FLAGS.penalty_anneal_iters,
      label_shift=FLAGS.label_shift,
      hparams={k: v for k, v in overrides.items() if k in methods.hparam_specs(m)},
      eval_every=FLAGS.eval_every,
      hessian_gap=FLAGS.hessian_gap,
      restarts_impl=impl,
    )
    if note is None:
      note, n_env = irm_benchmark.data_split(cfg, mnist.images, mnist.labels)
      print(f"data split: {note}; full batch of {n_env} examples per environment")
    try:
      cfg_hp = irm_benchmark.benchmark_hparams(m, cfg, n_env)
    except ValueError as e:
      fail(str(e))
    print(
      f"\n== {m}: {FLAGS.n_restarts} restarts ({impl}), hparams {json.dumps(cfg_hp, sort_keys=True)}"
      f"\n   (weight_decay = 2 x --l2_weight: the gradient of l2 ||w||^2; batch_size = the full "
      "environment)"
    )
    try:
      r = irm_benchmark.run(cfg, mnist.images, mnist.labels)
    except FloatingPointError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    results.append(r)
    if FLAGS.output:
      Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
      with open(FLAGS.output, "a") as f:
        f.write(json.dumps(r) + "\n")
  print()
  print(
    f"IRM-style Colored MNIST, {results[0]['note']}"
    + (f", label shift {FLAGS.label_shift}" if FLAGS.label_shift else "")
  )
  print(irm_benchmark.format_summary(results))


if __name__ == "__main__":
  app.run(main)
