"""A small training run for the kill-and-resume test: ``python tests/resume_worker.py DIR [--resume]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from dgjax import train as train_lib  # noqa: E402
from dgjax.models import mlp  # noqa: E402

STEPS, FREQ = 600, 50


def splits():
  rng = np.random.default_rng(0)
  ins, outs = [], []
  for e in range(3):
    x = rng.uniform(size=(256, 6, 6, 2)).astype(np.float32)
    y = (x[:, 0, 0, 0] + 0.2 * e > 0.6).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[:200], y[:200]))
    outs.append(train_lib.Split(f"env{e}_out", x[200:], y[200:]))
  return ins, outs


def run(output_dir, resume=False):
  ins, outs = splits()
  cfg = train_lib.TrainConfig(
    method="sand", steps=STEPS, checkpoint_freq=FREQ, hparams={"batch_size": 16}, progress=False
  )
  return train_lib.train(cfg, mlp(2, (32, 32)), ins, outs, output_dir=output_dir, resume=resume)


if __name__ == "__main__":
  run(sys.argv[1], resume="--resume" in sys.argv)
