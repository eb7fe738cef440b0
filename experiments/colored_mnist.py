r"""Colored MNIST (DomainBed construction) with any registered method.

    python -m experiments.colored_mnist --method=sand --data_dir=/path/to/mnist_idx

The same program as ``python -m experiments.train --dataset=ColoredMNIST`` (every flag of
``experiments.train`` works here): writes ``<output_dir>/results.jsonl`` (one line per
evaluation, DomainBed's keys) and prints the accuracy of every environment under
training-domain validation and oracle selection.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from experiments import train

flags.adopt_module_key_flags(train)  # --help lists experiments.train's flags


def main(argv):
  if train.FLAGS.dataset != "ColoredMNIST":
    print(
      "error: experiments.colored_mnist trains ColoredMNIST; use "
      "`python -m experiments.train --dataset=...` for other datasets",
      file=sys.stderr,
    )
    sys.exit(2)
  train.main(argv)


if __name__ == "__main__":
  app.run(main)
