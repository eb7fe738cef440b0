"""Every registered method's first training steps, pinned to the numbers of the code before the
engine rewrite (commit 24ccfbc), so that refactors that must not change numbers cannot.

The pinned values live in ``pinned_steps.json`` beside this file, written by running this file
as a script (``python tests/test_pinned_steps.py --write``) on the reference code. A method
added later has no pin (it is tested against its own explicit reference); a pinned method whose
numbers change on purpose is re-pinned in the same commit that documents why.

Each run: 3 training environments of Gaussian inputs with a label-dependent shift, a 6-8-2
MLP, 6 steps, an evaluation (record) after every step, hparams set so that every penalty,
schedule switch and Adam reset happens inside the 6 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

PIN_FILE = Path(__file__).with_name("pinned_steps.json")
STEPS = 6

#: Overrides per method: small batches, penalties on from the start, switches at step 2.
OVERRIDES = {
  "irm": {"irm_lambda": 10.0, "irm_penalty_anneal_iters": 2},
  "vrex": {"vrex_lambda": 10.0, "vrex_penalty_anneal_iters": 2},
  "fishr": {"lambda": 10.0, "penalty_anneal_iters": 2},
  # hgp / hutchinson: their defaults before the authors' values became the defaults
  # (alpha = beta = 1, Adam reset, shared probes), so the pins still hold.
  "hgp": {
    "penalty_weight": 10.0,
    "penalty_anneal_iters": 2,
    "alpha": 1.0,
    "beta": 1.0,
    "reset_optimizer": True,
  },
  "hutchinson": {
    "penalty_weight": 10.0,
    "penalty_anneal_iters": 2,
    "hutchinson_samples": 7,
    "alpha": 1.0,
    "beta": 1.0,
    "reset_optimizer": True,
    "independent_probes": False,
  },
  "cma": {"penalty_weight": 10.0, "penalty_anneal_iters": 2},
  "iga": {"penalty": 10.0},
}
#: Metrics compared at every step (when the method logs them).
KEYS = (
  "loss",
  "env_losses",
  "penalty",
  "objective",
  "kept_fraction",
  "robust_loss",
  "env0_in_acc",
  "env1_in_acc",
  "env2_out_acc",
)
#: Relative tolerance per method (default 2e-5). MMD's Gaussian kernels (bandwidths up to 1000)
#: amplify float32 rounding differences between two compiled programs to ~5e-5 after 2 steps.
RTOL = {"mmd": 2e-4}
PINNED_METHODS = (
  "erm",
  "and",
  "sand",
  "irm",
  "vrex",
  "coral",
  "mmd",
  "groupdro",
  "mixup",
  "fish",
  "iga",
  "fishr",
  "hgp",
  "hutchinson",
  "cma",
)


def _splits():
  from dgjax import train as train_lib

  rng = np.random.RandomState(0)
  splits_in, splits_out = [], []
  for e in range(4):
    y = rng.randint(0, 2, 40).astype(np.int32)
    x = (rng.randn(40, 6) + (1.0 + 0.3 * e) * (2 * y[:, None] - 1) * np.linspace(1, -1, 6)).astype(
      np.float32
    )
    splits_in.append(train_lib.Split(f"env{e}_in", x[:32], y[:32]))
    splits_out.append(train_lib.Split(f"env{e}_out", x[32:], y[32:]))
  return splits_in, splits_out


def run_pinned(method: str) -> list[dict]:
  """The first ``STEPS`` records of ``method`` on the tiny problem (test env 3)."""
  from dgjax import train as train_lib
  from dgjax.models import mlp

  splits_in, splits_out = _splits()
  config = train_lib.TrainConfig(
    method=method,
    test_envs=(3,),
    steps=STEPS,
    checkpoint_freq=1,
    seed=3,
    hparams={"batch_size": 8, "lr": 1e-2, **OVERRIDES.get(method, {})},
    per_domain_impl="vmap",
    progress=False,
  )
  records = train_lib.train(config, mlp(2, hidden=(8,)), splits_in, splits_out, checkpoint=False)
  return [{k: r[k] for k in KEYS if k in r} for r in records]


def _load():
  return json.loads(PIN_FILE.read_text())


@pytest.mark.parametrize("method", PINNED_METHODS)
def test_first_steps_equal_the_pinned_ones(method):
  pinned = _load()[method]
  got = run_pinned(method)
  assert len(got) == len(pinned) == STEPS
  for step, (g, p) in enumerate(zip(got, pinned)):
    assert set(g) == set(p), f"{method} step {step}: logged keys {sorted(g)} vs pinned {sorted(p)}"
    for k in p:
      np.testing.assert_allclose(
        np.asarray(g[k], np.float64),
        np.asarray(p[k], np.float64),
        rtol=RTOL.get(method, 2e-5),
        atol=2e-6,
        err_msg=f"{method} step {step} {k}",
      )


if __name__ == "__main__":
  if sys.argv[1:] != ["--write"]:
    sys.exit("usage: python tests/test_pinned_steps.py --write   (re-pins every method)")
  import jax

  jax.config.update("jax_platforms", "cpu")
  out = {m: run_pinned(m) for m in PINNED_METHODS}
  PIN_FILE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
  print(f"wrote {PIN_FILE} ({len(out)} methods)")
