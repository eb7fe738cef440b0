"""The one declaration of a run's configuration (dgjax.config): the command line, DomainBed's
``args`` record, the resume identity, the vmap-group rule and the sweep's job arguments are all
read from the fields' metadata, so a new field is one declaration and the rules cannot drift
apart."""

import dataclasses
import inspect
import json
import re

import pytest
from absl import flags

from dgjax import checkpoints
from dgjax import config as C
from dgjax import domainbed_format
from dgjax import runs
from dgjax import sweep
from dgjax import train as train_lib

METADATA = {"help", "identity", "per_run", "record", "sweep", "choices", "minimum"}
BASE = dict(method="hgp", dataset="PACS", test_envs=(3,))  # a backbone dataset: every field applies
SPECIAL = {
  "method": "sand",
  "dataset": "ColoredMNIST",
  "test_envs": (0, 1),
  "hparams": {"lr": 0.5},
  "preset": "irm_schedule",
  "mesh": "none",
}


def other_value(f, value):
  """A valid value of field ``f`` other than ``value``."""
  if f.name in SPECIAL:
    return SPECIAL[f.name]
  if f.metadata["choices"]:
    return next(c for c in f.metadata["choices"] if c != value)
  tp, _ = C.value_type(f.name)
  return {
    bool: lambda: not value,
    int: lambda: (value or 0) + 2,
    float: lambda: value + 0.1,
    str: lambda: "elsewhere",
  }[tp]()


def pairs():
  base = C.TrainConfig(**BASE)
  for f in C.config_fields():
    yield f, base, dataclasses.replace(base, **{f.name: other_value(f, getattr(base, f.name))})


def test_every_field_says_what_it_is():
  for f in C.config_fields():
    assert METADATA <= set(f.metadata), f.name
    assert C.help_text(f), f.name
    assert f.metadata["record"] in C.RECORD_KINDS, f.name


def test_the_command_line_is_the_fields():
  from experiments import train as train_cli  # noqa: F401  (defines its flags)

  defined = {f.name for f in flags.FLAGS.get_flags_for_module("experiments.train")}
  assert defined == {f.name for f in C.config_fields()} | {
    "test_env",
    "overwrite",
    "resume",
    "distributed",
    "compilation_cache",
  }
  for spec in C.flag_specs():
    assert flags.FLAGS[spec.name].help.endswith(spec.help)  # enums: "<a|b>: " first
  # a config goes to flags and back unchanged (the sweep's process launcher relies on it)
  config = runs.make_config(
    "Spirals",
    test_envs=[-1, 3],
    steps=3,
    max_examples=8,
    swad=True,
    hparams={"lr": 0.01},
    preset=None,
    progress=False,
  )
  argv = C.to_argv(config)
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["train", *argv])
    values = {s.name: flags.FLAGS[s.name].value for s in C.flag_specs()}
  finally:
    flags.FLAGS.unparse_flags()
  assert runs.make_config(**C.from_flag_values(values)) == config


def test_domainbed_args_are_the_domainbed_fields():
  params = inspect.signature(domainbed_format.domainbed_args).parameters
  recorded = {f.name for f in C.config_fields() if f.metadata["record"] == "domainbed"}
  assert recorded == set(params) - {"algorithm", "env_names", "extra"}
  config = runs.make_config("Spirals", steps=3, max_examples=8, output_dir="/r")
  args = runs.record_args(config)
  dgjax_keys = {f.name for f in C.config_fields() if f.metadata["record"] == "dgjax"}
  assert dgjax_keys <= set(args) and recorded <= set(args)
  unrecorded = {f.name for f in C.config_fields() if f.metadata["record"] is None}
  assert unrecorded == {"eval_batch_size", "progress", "keep_checkpoints", "data_workers"}
  assert not unrecorded & set(args)
  assert args["hparams"] is None and args["algorithm"] == "ERM" and args["max_examples"] == 8


def test_one_rule_for_runs_in_one_vmapped_program():
  assert train_lib._check_group is C.check_vmap_group
  for f, a, b in pairs():
    same = C.vmap_group_key(a) == C.vmap_group_key(b)
    assert sweep.vmap_group_key(b) == C.vmap_group_key(b)
    if not f.metadata["per_run"]:
      assert not same, f.name
    try:
      C.check_vmap_group([a, b])
      refused = False
    except ValueError as e:
      refused = True
      assert "must share" in str(e), f.name
    assert refused == (not same), f.name


def test_resume_identity_is_the_identity_fields(tmp_path):
  for f, a, b in pairs():
    old, new = a.identity(), b.identity()
    assert set(old) == {g.name for g in dataclasses.fields(C.TrainConfig) if g.metadata["identity"]}
    changed = {k for k in old if old[k] != new[k]}
    expected = {f.name} if f.metadata["identity"] else set()
    assert changed - {"resolved_hparams"} == expected, f.name
    (tmp_path / checkpoints.META_NAME).write_text(json.dumps(old))
    if not changed:
      checkpoints.check_identity(tmp_path, new)
      continue
    with pytest.raises(checkpoints.CheckpointError) as err:
      checkpoints.check_identity(tmp_path, new)
    message = str(err.value)
    assert "\n" not in message
    for name in changed:
      assert re.search(rf"[(; ]{name}[:.]", message), (name, message)
  # a checkpoint from before a field was part of the identity is refused, naming it
  (tmp_path / checkpoints.META_NAME).write_text(json.dumps({"seed": 0}))
  with pytest.raises(checkpoints.CheckpointError, match="dataset: not recorded in the checkpoint"):
    checkpoints.check_identity(tmp_path, C.TrainConfig(**BASE).identity())


def test_the_sweep_sets_the_fields_its_metadata_names():
  assert sweep.SWEEP_FIELDS == {
    f.name: f.metadata["sweep"] for f in C.config_fields() if f.metadata["sweep"]
  }
  assert set(sweep.train_arg_fields()) == {f.name for f in C.config_fields()} - set(
    sweep.SWEEP_FIELDS
  )
  (a,) = sweep.make_args_list(
    ["Spirals"],
    ["erm"],
    n_trials=1,
    n_hparams=1,
    test_envs=[-1],
    extra_args={"image_size": 32, "max_examples": None},
  )
  assert set(a) <= {f.name for f in C.config_fields()}  # a job's arguments are config fields
  assert sweep.Job.create(a, "/s").config().image_size == 32
  for name, value, message in [
    ("max_examples", "8", "max_examples must be int or null"),
    ("swad_tolerance_ratio", True, "must be float"),
    ("mesh", 2, "mesh must be str"),
  ]:
    with pytest.raises(ValueError, match=message):
      sweep.check_train_arg(name, value)
  sweep.check_train_arg("swad_tolerance_ratio", 1)  # a JSON integer is a number


def test_a_new_field_reaches_every_derived_place():
  @dataclasses.dataclass(frozen=True)
  class Extended(C.TrainConfig):
    crop: int = C.config_field(7, "pixels cropped", identity=True, record="dgjax", minimum=1)

  a, b = Extended(), Extended(crop=8)
  assert {s.name: s for s in C.flag_specs(Extended)}["crop"] == C.FlagSpec(
    "crop", "integer", 7, "pixels cropped"
  )
  assert "--crop=8" in C.to_argv(b)
  assert C.from_flag_values({"crop": 8}, Extended) == {"crop": 8}
  assert (a.identity()["crop"], b.identity()["crop"]) == (7, 8)
  assert C.record_fields(b, "dgjax")["crop"] == 8
  assert C.vmap_group_key(a) != C.vmap_group_key(b)
  with pytest.raises(ValueError, match="must share 'crop': 7 vs 8"):
    C.check_vmap_group([a, b])
  with pytest.raises(ValueError, match="crop must be an integer >= 1, got 0"):
    Extended(crop=0)
  with pytest.raises(ValueError, match="crop must be int"):
    C.check_field_value("crop", "8", cls=Extended)
  assert "crop" not in C.sweep_fields(Extended)


def test_the_other_entry_points_take_their_configs_fields():
  """The sweep's and the reproduction's options are their dataclasses' fields (and the
  TrainConfig fields the sweep passes to every job), read back into the same configs."""
  from dgjax import irm_benchmark
  from experiments import cli
  from experiments import reproduce as reproduce_cli
  from experiments import sweep as sweep_cli

  args = sweep_cli.parse_args(["status", "--output_dir", "/s", "--steps", "3", "--n_trials", "1"])
  passed = {s.name for s in C.sweep_passed_fields()}
  assert passed == {"steps", "checkpoint_freq", "hparams", "holdout_fraction", "data_dir"}
  assert {s.name for s in C.flag_specs(sweep.SweepConfig)} | passed <= set(vars(args))
  config = sweep_cli.sweep_config(args)
  assert config == sweep.SweepConfig(
    n_trials=1, job_args={"steps": 3, "holdout_fraction": 0.2}, train_args={}
  )
  assert config.args_list()[0]["steps"] == 3 and "checkpoint_freq" not in config.args_list()[0]
  args = reproduce_cli.parse_args(["irm_cmnist", "--n_restarts", "2", "--nohessian_gap"])
  irm_fields = {f.name for f in C.config_fields(irm_benchmark.IRMConfig)} - {"method"}
  assert irm_fields <= set(vars(args))
  fields = cli.argument_fields(args, irm_benchmark.IRMConfig, skip=("method",))
  assert irm_benchmark.IRMConfig(**fields) == irm_benchmark.IRMConfig(
    n_restarts=2, restarts_impl="auto"
  )
  args = reproduce_cli.parse_args(["domainbed", "--output_dir", "/s"])
  assert (args.datasets, args.launcher) == (["ColoredMNIST", "RotatedMNIST"], "vmap")
  assert set(vars(sweep_cli.parse_args(["status", "--output_dir", "/s"]))) <= set(vars(args))
