r"""Any registered dataset with any registered method (DomainBed's ``train.py``).

    python -m experiments.train --dataset=RotatedMNIST --method=fishr --data_dir=/path/to/mnist
    python -m experiments.train --dataset=Spirals --method=and          # synthetic, no data
    python -m experiments.train --dataset=ColoredFashionMNIST --method=irm --data_dir=/path/to/fashion

Writes ``<output_dir>/results.jsonl`` (one line per evaluation, DomainBed's keys) and prints
the accuracy of every environment under training-domain validation and oracle selection.
``python -m experiments.colored_mnist`` is the same run with ``--dataset=ColoredMNIST``.
The flags are the fields of :class:`dgjax.config.TrainConfig` (same names and help, read from
its one declaration), plus ``--test_env``, ``--resume``, ``--overwrite`` and
``--distributed``; they become one config, validated before the run's directory is locked and
any data is loaded; :mod:`dgjax.runs` does the rest.
"""

from __future__ import annotations

import sys

import jax
from absl import app
from absl import flags
from absl import logging

from dgjax import compilation_cache
from dgjax import config as config_lib
from dgjax import results as results_lib
from dgjax import runs
from dgjax import selection
from dgjax import sharding
from dgjax import train as train_lib
from dgjax.checkpoints import CheckpointError
from dgjax.data import DataError
from experiments import cli


FLAGS = flags.FLAGS
cli.define_flags(config_lib.TrainConfig)  # one flag per TrainConfig field (dgjax.config)
flags.DEFINE_integer("test_env", None, "one test environment (the same as --test_envs=i)")
flags.DEFINE_bool(
  "overwrite", False, "replace an existing run in output_dir (results.jsonl, checkpoints/, done)"
)
flags.DEFINE_bool(
  "resume",
  False,
  "continue the run in output_dir from its last checkpoint "
  "(refused if the checkpoint was trained with other data, model or numbers)",
)
flags.DEFINE_string("compilation_cache", None, compilation_cache.FLAG_HELP)
flags.DEFINE_bool(
  "distributed",
  None,
  "call jax.distributed.initialize() first (multi-host "
  "GPU/TPU; default: the DGJAX_DISTRIBUTED environment variable)",
)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config_from_flags() -> runs.TrainConfig:
  """The run's config from the flags; a ``ValueError`` names the bad flag or hparam."""
  if FLAGS.test_env is not None and FLAGS.test_envs:
    raise ValueError("pass --test_env or --test_envs, not both")
  fields = cli.flag_fields(config_lib.TrainConfig)
  if FLAGS.test_env is not None:
    fields["test_envs"] = (FLAGS.test_env,)
  return runs.make_config(**fields)  # resolves the names, once


def main(argv):
  """Trains one run. Every failure is one line on stderr and a non-zero exit: 2 for bad
  input (before any work, nothing in the output directory touched), 1 for a failed run
  (non-finite loss, full disk: what was kept is said), 130 for Ctrl-C."""
  try:
    _main(argv)
  except train_lib.RunInterrupted as e:
    print(f"\n{e}", file=sys.stderr)
    sys.exit(130)
  except KeyboardInterrupt:  # before training started: nothing of the run was changed
    print(
      "\ninterrupted (Ctrl-C) before training started; the output directory is as it was",
      file=sys.stderr,
    )
    sys.exit(130)
  except (train_lib.NonFiniteLossError, train_lib.DiskFullError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:  # before anything compiles: JAX opens the cache once
    compilation_cache.setup(FLAGS.compilation_cache)
  except compilation_cache.CompilationCacheError as e:
    fail(str(e))
  sharding.maybe_initialize_distributed(FLAGS.distributed)
  try:
    config = config_from_flags()
    mesh = runs.make_mesh(config)
    # the run's lock first: then the checks of what the directory holds, then the data
    lock = runs.open_output_dir(config, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
  except (
    ValueError,
    FileExistsError,
    PermissionError,
    results_lib.RunLockedError,
    CheckpointError,
  ) as e:
    fail(str(e))
  with lock:
    try:
      task, envs = runs.load(config)
    except (DataError, ValueError, NotImplementedError) as e:
      fail(str(e))
    print(f"dataset {config.dataset}: {config.resolved_dataset.description}")
    for i, env in enumerate(envs):
      print(
        f"env{i} {env.name}: {len(task.splits_in[i].y)} in / {len(task.splits_out[i].y)} out"
        f"{'  (test)' if i in config.test_envs else ''}"
      )
    print(f"method {config.method}, hparams {results_lib.dumps(config.resolved_hparams)}")
    results = lock.dir / "results.jsonl"
    print(f"results -> {results}")
    if mesh is not None:
      print(
        f"mesh: {dict(mesh.shape)} over {len(jax.devices())} {jax.default_backend()} "
        f"devices, {jax.process_count()} process(es)"
      )
    try:
      records = runs.run(config, resume=FLAGS.resume, mesh=mesh, task=task)
    except (CheckpointError, DataError) as e:
      fail(str(e))
  print()
  print(selection.format_selection_table(records, config.test_envs, [e.name for e in envs]))
  if config.swad:  # the averaged model of the last record (dgjax.swad)
    last = records[-1]
    if last["swad_active"]:
      test = sum(last[f"swad_env{e}_in_acc"] for e in config.test_envs) / len(config.test_envs)
      print(
        f"\nSWAD over steps {last['swad_start_step']}..{last['swad_end_step']} "
        f"({last['swad_segments']} segments{', valley closed' if last['swad_dead'] else ''}): "
        f"test accuracy {test:.4f}"
      )
    else:
      print("\nSWAD: the validation loss never converged; no averaged model")
  print(f"\nresults: {results}")


if __name__ == "__main__":
  app.run(main)
