"""The engine calls a task only through :class:`dgjax.task.Task`: a task implementing exactly
the protocol (no base class; any other member read fails) trains, evaluates and runs SWAD;
every real task is a ``Task``; a bare model is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import irm_benchmark, tasks
from dgjax import train as train_lib
from dgjax.models import mlp
from dgjax.task import Task, TaskBase

MEMBERS = {
  "model",
  "num_domains",
  "variables",
  "per_run_data",
  "streams",
  "data",
  "has_val_loss",
  "init_params",
  "stream",
  "batch",
  "epoch",
  "evaluate",
  "val_loss",
  "progress_numbers",
  "data_fingerprint",
}


def test_the_protocol_is_these_members():
  declared = set(Task.__annotations__) | {
    n for n, v in vars(Task).items() if callable(v) and not n.startswith("_")
  }
  assert declared == MEMBERS


def _accuracy(data, model_state, predict):
  x, y = data["x"].reshape(-1, 3), data["y"].reshape(-1)
  return float(jnp.mean(jnp.argmax(predict(model_state, x), -1) == y))


class ExactTask:
  """Exactly the protocol's members; reading any other attribute fails the test."""

  def __init__(self, x, y):
    self.model = mlp(2, (4,))
    self.num_domains = 2
    self.variables = {}
    self.per_run_data = False
    self.streams = False
    self.has_val_loss = True
    self.data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}  # [D, N, ...]
    self.evaluated_at = []

  def __getattribute__(self, name):
    if not (name in MEMBERS or name in ("evaluated_at", "__class__", "__dict__")):
      raise AssertionError(f"the engine read {name!r}, not a member of dgjax.task.Task")
    return object.__getattribute__(self, name)

  def init_params(self, key):
    return self.model.init(key, self.data["x"][0, :1])["params"]

  def stream(self, start_step):
    raise AssertionError("streams is False: the engine must not call stream")

  def batch(self, data, key, batch_size):
    idx = jax.random.randint(key, (batch_size,), 0, data["y"].shape[1])
    return {"x": data["x"][:, idx], "y": data["y"][:, idx]}

  def epoch(self, step, batch_size):
    return float(step)

  def evaluate(self, model_state, run, predict, *, step=0, mesh=None):
    self.evaluated_at.append(step)
    return {"acc": _accuracy(self.data, model_state, predict)}

  def val_loss(self, model_state, predict, *, mesh=None):
    return 1.0 - _accuracy(self.data, model_state, predict)

  def progress_numbers(self, record):
    return {"acc": record["acc"]}

  def data_fingerprint(self):
    return "toy data"


def test_a_task_of_exactly_the_protocol_trains():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 3)).astype(np.float32)
  task = ExactTask(x, (x[..., 0] > 0).astype(np.int32))
  assert isinstance(task, Task) and not isinstance(task, TaskBase)
  cfgs = [
    train_lib.TrainConfig(
      method="erm",
      test_envs=(),
      steps=4,
      checkpoint_freq=2,
      seed=s,
      hparams={"batch_size": 4, "lr": lr},
      progress=False,
      swad=True,
    )
    for s, lr in ((0, 1e-3), (1, 1e-2))
  ]
  runs = train_lib.train_many(cfgs, task)
  for records in runs:
    assert [r["step"] for r in records] == [0, 2, 3]
    assert all(0.0 <= r["acc"] <= 1.0 and np.isfinite(r["loss"]) for r in records)
    assert all("val_loss" in r for r in records)
  # evaluate hears the engine's step (one clock): each run at each evaluation, and SWAD's
  # averaged model at the last one
  assert task.evaluated_at[:4] == [0, 0, 2, 2] and set(task.evaluated_at[4:]) == {3}
  assert any("swad_acc" in r for r in runs[0]) or task.evaluated_at[4:] == [3, 3]


def test_every_task_is_a_task():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(8, 4)).astype(np.float32)
  split = tasks.Split("e", x, (x[:, 0] > 0.5).astype(np.int32))
  assert isinstance(tasks.DomainBedTask(mlp(2, (4,)), [split] * 2, [split] * 2, (1,)), Task)
  run = {
    "train_x": np.zeros((2, 4, 392), np.float32),
    "train_y": np.zeros((2, 4), np.int32),
    "test_x": np.zeros((4, 392), np.float32),
    "test_y": np.zeros(4, np.int32),
    "gray_x": np.zeros((4, 392), np.float32),
    "gray_y": np.zeros(4, np.int32),
  }
  assert isinstance(irm_benchmark.IRMTask([run], 4), Task)
  # ImageTask: tests/test_image_training.py (it needs an image tree)


def test_a_bare_model_is_refused():
  with pytest.raises(TypeError, match="trains on a task"):
    train_lib.train_many([train_lib.TrainConfig(progress=False)], mlp(2, (4,)))
