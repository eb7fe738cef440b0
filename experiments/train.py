r"""Any registered dataset with any registered method (DomainBed's ``train.py``).

    python -m experiments.train --dataset=RotatedMNIST --method=fishr --data_dir=/path/to/mnist
    python -m experiments.train --dataset=Spirals --method=and          # synthetic, no data
    python -m experiments.train --dataset=ColoredFashionMNIST --method=irm --data_dir=/path/to/fashion

Writes ``<output_dir>/results.jsonl`` (one line per evaluation, DomainBed's keys) and prints
the accuracy of every environment under training-domain validation and oracle selection.
``python -m experiments.colored_mnist`` is the same run with ``--dataset=ColoredMNIST``.
Flags become one :class:`dgjax.train.TrainConfig` (validated before any data is loaded);
:mod:`dgjax.runs` does the rest.
"""

from __future__ import annotations

import sys

import jax
from absl import app
from absl import flags
from absl import logging

from dgjax import datasets
from dgjax import methods
from dgjax import results as results_lib
from dgjax import runs
from dgjax import selection
from dgjax import sharding
from dgjax import train as train_lib
from dgjax.checkpoints import CheckpointError
from dgjax.data import DataError


def _method_help() -> str:
  return "training method, one of: " + ", ".join(sorted(methods.METHODS))


FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "ColoredMNIST", f"one of: {', '.join(sorted(datasets.DATASETS))}")
flags.DEFINE_string("method", "erm", _method_help())
flags.DEFINE_integer("test_env", None, "index of the test environment (default: the dataset's, "
                     "ColoredMNIST 2 = -90%, RotatedMNIST 0 = 0 degrees, Spirals the last = test)")
flags.DEFINE_list("test_envs", None, "several test environments, e.g. 0,1 (DomainBed's "
                  "--test_envs; held-out pairs for leave-one-domain-out selection)")
flags.DEFINE_integer("steps", None, "training steps (default: the dataset's, 5001 for MNIST ones)")
flags.DEFINE_integer("checkpoint_freq", None, "evaluate and checkpoint every this many steps "
                     "(default: the dataset's, 100 for MNIST ones)")
flags.DEFINE_integer("seed", 0, "seed for initialisation and minibatch sampling")
flags.DEFINE_integer("trial_seed", 0, "seed for the dataset construction and in/out splits")
flags.DEFINE_integer("hparams_seed", 0, "0: default hparams; else DomainBed's random draw "
                     "(seed_hash(hparams_seed, trial_seed))")
flags.DEFINE_string("hparams", None, 'JSON object of hparam overrides, e.g. \'{"lr": 1e-4}\'; '
                    "see the README's method table for each method's hparams")
flags.DEFINE_string("preset", None, "a named set of the method's hparams, applied before "
                    "--hparams (e.g. hgp's 'irm_schedule'; see the README's method table)")
flags.DEFINE_string("data_dir", None, "directory with the dataset's IDX files (MNIST, or "
                    "Fashion-MNIST for ColoredFashionMNIST; train-* required, t10k-* used when "
                    "present). Default: TFDS. Spirals needs none")
flags.DEFINE_string("pretrained", None, "image datasets: ImageNet weights converted by "
                    "`python -m experiments.convert_weights` (a .msgpack file), or 'none' to train "
                    "the ResNet from scratch")
flags.DEFINE_integer("image_size", 224, "image datasets: input resolution (DomainBed: 224)")
flags.DEFINE_integer("data_workers", 2, "image datasets: grain worker processes decoding JPEGs "
                     "(0: in this process)")
flags.DEFINE_enum("data_source", "folder", ["folder", "tfds"], "image datasets: 'folder' reads "
                  "DomainBed's download.py layout under --data_dir; 'tfds' a TensorFlow Datasets "
                  "copy prepared as array_record (DomainNet only; --data_dir = the TFDS data "
                  "dir, default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
flags.DEFINE_integer("max_examples", None, "MNIST variants: use only the first N pooled images; "
                     "Spirals: N examples per environment (quick runs)")
flags.DEFINE_string("output_dir", None, "where results.jsonl goes "
                    "(default runs/<dataset>/<method>_test<env>_seed<seed>)")
flags.DEFINE_float("holdout_fraction", 0.2, "fraction of each environment held out (out-split)")
flags.DEFINE_bool("downsample", False, "Colored datasets: subsample images to 14x14")
flags.DEFINE_bool("overwrite", False, "replace an existing run in output_dir (results.jsonl, "
                  "checkpoints/, done)")
flags.DEFINE_bool("resume", False, "continue the run in output_dir from its last checkpoint")
flags.DEFINE_bool("progress", True, "show progress (a bar on a terminal, one line per "
                  "evaluation otherwise); --noprogress: none")
flags.DEFINE_integer("keep_checkpoints", 3, "checkpoints kept (an unreadable newest one falls "
                     "back to the previous)")
flags.DEFINE_integer("scan_steps", 1, "training steps per jit call (lax.scan)")
flags.DEFINE_integer("eval_batch_size", 1000, "examples per evaluation chunk")
flags.DEFINE_bool("swad", False, "SWAD (Cha et al. 2021): also average the weights of every "
                  "step over the validation-loss valley and write the averaged model's evaluation "
                  "as swad_* keys (see dgjax.swad)")
flags.DEFINE_integer("swad_n_converge", 3, "SWAD: convergence window, in evaluations")
flags.DEFINE_integer("swad_n_tolerance", 6, "SWAD: loss-smoothing window, in evaluations")
flags.DEFINE_float("swad_tolerance_ratio", 0.3, "SWAD: how far above the converged validation "
                   "loss the valley may rise")
flags.DEFINE_enum("per_domain_impl", "auto", ["auto", "vmap", "unrolled"],
                  "lowering of the per-domain gradients (same numbers; auto picks the fastest)")
flags.DEFINE_string("conv_impl", "auto", "convolution lowering, see dgjax.conv")
flags.DEFINE_string("mesh", "auto", "shard the step over a DOMAINSxDATA device mesh, e.g. 1x8 or "
                    "2x4; 'auto': every device on the data axis when there are several, else "
                    "none; 'none': one device")
flags.DEFINE_bool("distributed", None, "call jax.distributed.initialize() first (multi-host "
                  "GPU/TPU; default: the DGJAX_DISTRIBUTED environment variable)")


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config_from_flags() -> runs.TrainConfig:
  """The run's config from the flags; a ``ValueError`` names the bad flag or hparam."""
  if FLAGS.test_env is not None and FLAGS.test_envs:
    raise ValueError("pass --test_env or --test_envs, not both")
  try:
    test_envs = ([int(e) for e in FLAGS.test_envs] if FLAGS.test_envs else
                 None if FLAGS.test_env is None else [FLAGS.test_env])
  except ValueError:
    raise ValueError(f"--test_envs must be integers (got {','.join(FLAGS.test_envs)})") from None
  methods.get_method(FLAGS.method)
  fields = {name: FLAGS[name].value for name in runs.FLAG_FIELDS
            if name not in ("dataset", "steps", "checkpoint_freq")}
  return runs.make_config(
      FLAGS.dataset, test_envs, steps=FLAGS.steps, checkpoint_freq=FLAGS.checkpoint_freq,
      hparams=runs.hparams_json(FLAGS.hparams), progress=FLAGS.progress, **fields)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed(FLAGS.distributed)
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = config_from_flags()
    output_dir = runs.prepare_output_dir(config, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    num_train = (len(datasets.get_dataset(config.dataset).environment_names(config.data_dir))
                 - len(config.test_envs))
    spec = (FLAGS.mesh or "none").lower()
    if spec == "none" or (spec == "auto" and jax.device_count() == 1):
      mesh = None
    else:
      mesh = sharding.make_mesh(sharding.parse_mesh_shape(spec, num_train))
  except (ValueError, FileExistsError, PermissionError, results_lib.RunLockedError) as e:
    fail(str(e))

  try:
    task, envs = runs.load(config)
  except (DataError, ValueError, NotImplementedError) as e:
    fail(str(e))
  print(f"dataset {config.dataset}: {datasets.get_dataset(config.dataset).description}")
  for i, env in enumerate(envs):
    print(f"env{i} {env.name}: {len(task.splits_in[i].y)} in / {len(task.splits_out[i].y)} out"
          f"{'  (test)' if i in config.test_envs else ''}")
  print(f"method {config.method}, hparams {runs.results_lib.dumps(config.resolved_hparams)}")
  results = output_dir / "results.jsonl"
  print(f"results -> {results}")
  if mesh is not None:
    print(f"mesh: {dict(mesh.shape)} over {len(jax.devices())} {jax.default_backend()} devices, "
          f"{jax.process_count()} process(es)")
  try:
    records = runs.run(config, resume=FLAGS.resume, mesh=mesh, task=task)
  except train_lib.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (CheckpointError, results_lib.RunLockedError) as e:
    fail(str(e))
  print()
  print(selection.format_selection_table(records, config.test_envs, [e.name for e in envs]))
  if config.swad:   # the averaged model of the last record (dgjax.swad)
    last = records[-1]
    if last["swad_active"]:
      test = sum(last[f"swad_env{e}_in_acc"] for e in config.test_envs) / len(config.test_envs)
      print(f"\nSWAD over steps {last['swad_start_step']}..{last['swad_end_step']} "
            f"({last['swad_segments']} segments{', valley closed' if last['swad_dead'] else ''}): "
            f"test accuracy {test:.4f}")
    else:
      print("\nSWAD: the validation loss never converged; no averaged model")
  print(f"\nresults: {results}")


if __name__ == "__main__":
  app.run(main)
