r"""IRM-style Colored MNIST (Arjovsky et al.'s setup, as in Fishr and the Hessian-alignment paper).

    python -m experiments.colored_mnist_irm --method=erm,hgp,hutchinson,cma --data_dir=/path/to/mnist
    python -m experiments.colored_mnist_irm --method=hgp --label_shift=0.97    # label-shift variant

Two training environments (colour flip 0.2 and 0.1) from the MNIST training digits, test
environment with flip 0.9, full-batch Adam for the scripts' 501 steps with the published IRM
hparams and the scripts' penalty forms and schedule (see :mod:`dgjax.irm_benchmark`); prints
train / test / gray-test accuracy (mean +- standard error over ``--n_restarts``) per method,
next to the published full-MNIST figures. ``python -m experiments.reproduce irm_cmnist`` runs
the published set of methods and writes the report. ``--output`` writes every method's result (per-restart
finals and the evaluation history, penalty values included) as JSON lines. The flags are
the fields of :class:`dgjax.irm_benchmark.IRMConfig` (read from its one declaration), plus
``--output``. See :mod:`dgjax.irm_benchmark`.
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
from dgjax.data import DataError, load_mnist
from experiments import cli

FLAGS = flags.FLAGS
cli.define_flags(irm_benchmark.IRMConfig)  # one flag per IRMConfig field (dgjax.config)
flags.DEFINE_string("output", None, "append each method's result as one JSON line to this file")
flags.DEFINE_string("compilation_cache", None, compilation_cache.FLAG_HELP)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def configs_from_flags() -> list[irm_benchmark.IRMConfig]:
  """One config per method of ``--method`` (comma-separated); a ``ValueError`` names the bad
  flag or method."""
  fields = cli.flag_fields(irm_benchmark.IRMConfig)
  names = [m.strip() for m in fields.pop("method").split(",") if m.strip()]
  return irm_benchmark.method_configs(names, **fields)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:  # before anything compiles: JAX opens the cache once
    compilation_cache.setup(FLAGS.compilation_cache)
  except compilation_cache.CompilationCacheError as e:
    fail(str(e))
  try:
    configs = configs_from_flags()
  except ValueError as e:
    fail(str(e))
  try:
    mnist = load_mnist(FLAGS.data_dir)
  except DataError as e:
    fail(str(e))
  print(f"data: {mnist.source}")
  note, n_env = irm_benchmark.data_split(configs[0], mnist.images, mnist.labels)
  print(f"data split: {note}; full batch of {n_env} examples per environment")
  results = []
  for cfg in configs:
    impl = irm_benchmark.resolve_restarts_impl(cfg.restarts_impl)
    try:
      cfg_hp = irm_benchmark.benchmark_hparams(cfg.method, cfg, n_env)
    except ValueError as e:
      fail(str(e))
    print(
      f"\n== {cfg.method}: {cfg.n_restarts} restarts ({impl}), hparams "
      f"{json.dumps(cfg_hp, sort_keys=True)}"
      "\n   (weight_decay = 2 x --l2_weight: the gradient of l2 ||w||^2; batch_size = the full "
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
