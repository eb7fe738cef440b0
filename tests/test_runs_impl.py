"""K runs in one program: the trace-time loop over runs (``runs_impl="unrolled"``, CPU's
default) against ``jax.vmap`` over them and against each run built alone."""

import sys
from pathlib import Path

import jax
import numpy as np

from dgjax import train as train_lib
from dgjax.models import mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resume_worker  # noqa: E402

STEPS = 4


def configs(runs_impl):
  """Two sand runs that share a program: other seeds, lr and tau (traced hparams)."""
  return [
    train_lib.TrainConfig(
      method="sand",
      seed=seed,
      hparams={"batch_size": 8, "lr": lr, "tau": tau},
      runs_impl=runs_impl,
      progress=False,
    )
    for seed, lr, tau in ((0, 1e-3, 0.5), (1, 1e-2, 0.2))
  ]


def steps(step, state, data):
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, data)
    losses.append(np.asarray(metrics["loss"]))
  return state, np.stack(losses, axis=-1)


def test_unrolled_runs_equal_vmapped_runs_and_runs_alone():
  ins, outs = resume_worker.splits()
  task = train_lib.DomainBedTask(mlp(2, (16,)), ins, outs, test_envs=(2,))
  assert train_lib.resolve_runs_impl("auto") == (
    "unrolled" if jax.default_backend() == "cpu" else "vmap"
  )
  assert train_lib.resolve_runs_impl("vmap") == "vmap"

  out = {}
  for impl in ("vmap", "unrolled"):
    step, state = train_lib.build_runs(configs(impl), task)
    out[impl] = steps(step, state, task.data)
  (vmap_state, vmap_loss), (loop_state, loop_loss) = out["vmap"], out["unrolled"]
  assert loop_loss.shape == (2, 1, STEPS)
  # the runs really differ (seeds and hparams), and both mappings train each the same
  assert np.ptp(loop_loss[:, 0, -1]) > 1e-3
  np.testing.assert_allclose(loop_loss, vmap_loss, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(loop_state.params), jax.tree.leaves(vmap_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  # each unrolled run is the run built alone (build_run: K = 1, its own program), bit for bit
  for k, cfg in enumerate(configs("unrolled")):
    step, state = train_lib.build_run("sand", task, cfg.resolved_hparams, cfg.seed)
    alone_state, alone_loss = steps(step, state, task.data)
    np.testing.assert_array_equal(loop_loss[k, 0], alone_loss[0])
    loop_k = jax.tree.map(lambda a: np.asarray(a[k]), loop_state.params)
    for a, b in zip(jax.tree.leaves(loop_k), jax.tree.leaves(alone_state.params)):
      np.testing.assert_array_equal(a, np.asarray(b))
