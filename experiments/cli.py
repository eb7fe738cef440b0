"""Command-line flags from a configuration dataclass (:mod:`dgjax.config`): one flag per field,
with the field's name, help and kind (:func:`dgjax.config.flag_specs`), for absl
(``experiments.train``, ``experiments.colored_mnist_irm``) and for argparse
(``experiments.sweep``, ``experiments.reproduce``). No entry point lists a config's fields
by hand; what an entry point adds beyond them (``--resume``, a launcher's options, where a
report goes) is not run configuration.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Collection, Mapping, Sequence

from absl import flags

from dgjax import config as config_lib

_ABSL = {
  "string": flags.DEFINE_string,
  "integer": flags.DEFINE_integer,
  "float": flags.DEFINE_float,
  "bool": flags.DEFINE_bool,
  "list": flags.DEFINE_list,
  "strings": flags.DEFINE_list,
  "json": flags.DEFINE_string,
}


def define_flags(cls: type, *, help_prefix: Mapping[str, str] | None = None) -> None:
  """One absl flag per field of ``cls``, as flags of the calling module (its ``--help``
  lists them); ``help_prefix`` adds words before a field's help (how that entry point reads
  it)."""
  module = sys._getframe(1).f_globals["__name__"]
  if module == "__main__":  # as absl names a program's own module
    module = sys.argv[0]
  for spec in config_lib.flag_specs(cls):
    text = (help_prefix or {}).get(spec.name, "") + spec.help
    if spec.kind == "enum":
      choices = [str(c) for c in spec.choices]
      flags.DEFINE_enum(spec.name, spec.default, choices, text, module_name=module)
    else:
      _ABSL[spec.kind](spec.name, spec.default, text, module_name=module)


def flag_fields(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """``cls``'s fields from the parsed absl flags (:func:`dgjax.config.from_flag_values`)."""
  values = {s.name: flag_values[s.name].value for s in config_lib.flag_specs(cls)}
  return config_lib.from_flag_values(values, cls)


def add_arguments(
  parser: argparse.ArgumentParser,
  specs: Sequence[config_lib.FlagSpec],
  skip: Collection[str] = (),
) -> None:
  """One argparse option per flag spec (but ``skip``): ``--name VALUE``; lists take several
  values (``--test_envs 0 1``) or one comma-separated; booleans are ``--name`` /
  ``--noname``."""
  for spec in specs:
    if spec.name in skip:
      continue
    flag = f"--{spec.name}"
    if spec.kind == "bool":
      group = parser.add_mutually_exclusive_group()
      group.add_argument(flag, dest=spec.name, action="store_true", help=spec.help)
      group.add_argument(f"--no{spec.name}", dest=spec.name, action="store_false")
      parser.set_defaults(**{spec.name: spec.default})
      continue
    kwargs: dict[str, Any] = {"default": spec.default, "help": spec.help}
    if spec.kind in ("list", "strings"):
      kwargs["nargs"] = "+"
      if spec.default is not None:
        kwargs["default"] = spec.default.split(",")
    elif spec.kind == "enum":
      kwargs["choices"] = list(spec.choices)
    else:
      kwargs["type"] = {"integer": int, "float": float}.get(spec.kind, str)
    parser.add_argument(flag, **kwargs)


def argument_fields(
  namespace: argparse.Namespace, cls: type, skip: Collection[str] = ()
) -> dict[str, Any]:
  """``cls``'s fields (but ``skip``) from parsed argparse options (:func:`add_arguments`)."""
  values = {
    s.name: getattr(namespace, s.name) for s in config_lib.flag_specs(cls) if s.name not in skip
  }
  return config_lib.from_flag_values(values, cls)
