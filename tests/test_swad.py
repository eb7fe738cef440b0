"""SWAD (dgjax.swad): dense averaging, the loss-valley window against a plain transcription of
the reference's rules, BatchNorm statistics, and the engine's ``swad=True`` runs."""

import collections
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import core, methods, resnet, results, swad
from dgjax import train as train_lib
from dgjax.models import mlp


# ------------------------------------------------------------------ dense averaging
def test_average_equals_explicit_mean_of_the_sequence():
  rng = np.random.RandomState(0)
  seq = [
    {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    for _ in range(7)
  ]
  update = jax.jit(swad.average_update)
  state = swad.average_init(seq[0])
  assert int(state.count) == 0 and all(
    np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state.total)
  )
  for p in seq:
    state = update(state, p)
  assert int(state.count) == 7
  mean = swad.average_value(state)
  for name in ("w", "b"):
    np.testing.assert_allclose(
      mean[name], np.mean([p[name] for p in seq], axis=0), rtol=1e-6, atol=1e-7
    )
  # inside a scan, as the engine's jitted chunk does
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *seq)
  scanned, _ = jax.lax.scan(
    lambda s, p: (swad.average_update(s, p), None), swad.average_init(seq[0]), stacked
  )
  np.testing.assert_allclose(swad.average_value(scanned)["w"], mean["w"], rtol=1e-6)
  empty = swad.average_reset(scanned)
  assert int(empty.count) == 0 and not np.any(np.asarray(empty.total["w"]))


# ------------------------------------------------------------------ the reference's rules
class RefAveraged:
  """The reference's ``swa_utils.AveragedModel``, as a list of what it averages: created
  from a segment it holds that segment's weights with ``n_averaged = 0``, so its first
  ``update_parameters`` overwrites them; ``start_step`` is set by the first update."""

  def __init__(self, segment):
    self.members, self.n_averaged = [segment["id"]], 0
    self.start_step = self.end_step = -1

  def update_parameters(self, segment, start_step, end_step):
    self.members = [segment["id"]] if self.n_averaged == 0 else self.members + [segment["id"]]
    self.n_averaged += 1
    if self.n_averaged == 1:
      self.start_step = start_step
    self.end_step = end_step


class RefLossValley:
  """khanrc/swad ``domainbed/swad.py`` ``LossValley``, rule by rule (deques of segments)."""

  def __init__(self, n_converge, n_tolerance, tolerance_ratio):
    self.n_converge, self.n_tolerance, self.tolerance_ratio = (
      n_converge,
      n_tolerance,
      tolerance_ratio,
    )
    self.converge_Q = collections.deque(maxlen=n_converge)
    self.smooth_Q = collections.deque(maxlen=n_tolerance)
    self.final_model, self.converge_step, self.dead_valley, self.threshold = None, None, False, None

  def update_and_evaluate(self, seg):
    if self.dead_valley:
      return
    self.converge_Q.append(seg)
    self.smooth_Q.append(seg)
    if self.converge_step is None:
      if len(self.converge_Q) < self.n_converge:
        return
      min_idx = np.argmin([m["loss"] for m in self.converge_Q])
      if min_idx == 0:
        self.converge_step = self.converge_Q[0]["end"]
        self.final_model = RefAveraged(self.converge_Q[0])
        # float32 threshold: dgjax rounds it so that resumed runs decide identically
        self.threshold = np.float32(
          np.mean([m["loss"] for m in self.converge_Q]) * (1 + self.tolerance_ratio)
        )
        if self.n_tolerance < self.n_converge:
          for i in range(self.n_converge - self.n_tolerance):
            m = self.converge_Q[1 + i]
            self.final_model.update_parameters(m, m["start"], m["end"])
        elif self.n_tolerance > self.n_converge:
          q = list(self.smooth_Q)[: self.n_tolerance - self.n_converge + 1]
          start_idx = 0
          for i in reversed(range(len(q))):
            if q[i]["loss"] > self.threshold:
              start_idx = i + 1
              break
          for m in q[start_idx + 1 :]:
            self.final_model.update_parameters(m, m["start"], m["end"])
      return
    if self.smooth_Q[0]["end"] < self.converge_step:
      return
    if min(m["loss"] for m in self.smooth_Q) > self.threshold:
      self.dead_valley = True
      return
    m = self.smooth_Q[0]
    self.final_model.update_parameters(m, m["start"], m["end"])

  def get_final_model(self):
    if self.converge_step is None:
      return None
    if not self.dead_valley:
      self.smooth_Q.popleft()
      while self.smooth_Q:
        if min(m["loss"] for m in self.smooth_Q) > self.threshold:
          break
        m = self.smooth_Q.popleft()
        self.final_model.update_parameters(m, m["end"], m["end"])
    return self.final_model


def ref_window(losses, ends, n_converge=3, n_tolerance=6, ratio=0.3):
  """The reference's segments (steps ``ends[i-1] + 1 .. ends[i]``) fed with ``losses``:
  after each, ``(converged, dead, the ids averaged if training ended there, its model)``."""
  ref, out = RefLossValley(n_converge, n_tolerance, ratio), []
  for i, (loss, end) in enumerate(zip(losses, ends)):
    start = ends[i - 1] + 1 if i else 0
    ref.update_and_evaluate({"id": i, "loss": np.float32(loss), "start": start, "end": end})
    final = copy.deepcopy(ref).get_final_model()
    out.append(
      (
        ref.converge_step is not None,
        ref.dead_valley,
        None if final is None else sorted(set(final.members)),
        final,
      )
    )
  return out


# hand-written: descent, a valley, a rise that kills it; ties; early convergence; a dip.
LOSS_SEQUENCES = [
  [0.9, 0.7, 0.6, 0.5, 0.45, 0.44, 0.46, 0.47, 0.5, 0.52, 0.55, 0.7, 0.8, 0.9, 0.95, 1.0, 1.1],
  [1.0, 0.8, 0.6, 0.5, 0.5, 0.5, 0.55, 0.6, 0.5, 0.45, 0.7, 0.66, 0.64, 0.62, 0.61, 0.6],
  [0.3, 0.5, 0.6, 0.4, 0.35, 0.33, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.2],
  [0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.38, 0.36],  # never converges
  [0.9, 0.5, 1.2, 0.4, 0.41, 0.42, 0.61, 0.39, 0.52, 0.53, 0.6, 0.6, 0.6, 0.54, 0.5],
]


def _segments(losses, freq, dim):
  """Segment ``i``'s params sum ``count * e_i`` (so an average shows which segments it
  holds, and how often), fed to a :class:`swad.LossValley`."""
  segs = []
  for i, loss in enumerate(losses):
    end = i * freq
    count = end - max(end - freq + 1, 0) + 1
    total = {"w": np.eye(dim, dtype=np.float32)[i] * count}
    segs.append((swad.AverageState(total, np.int32(count)), loss, end, count))
  return segs


@pytest.mark.parametrize("n_converge,n_tolerance", [(3, 6), (3, 3), (4, 2), (2, 5)])
@pytest.mark.parametrize("seq", range(len(LOSS_SEQUENCES)))
def test_loss_valley_decides_as_the_reference(seq, n_converge, n_tolerance):
  losses, freq = LOSS_SEQUENCES[seq], 10
  expected = ref_window(losses, [i * freq for i in range(len(losses))], n_converge, n_tolerance)
  valley = swad.LossValley(n_converge, n_tolerance, 0.3)
  counts = {}
  for i, (segment, loss, end, count) in enumerate(_segments(losses, freq, len(losses))):
    counts[i] = count
    valley.update(segment, loss, end)
    converged, dead, members, _ = expected[i]
    assert (valley.converged, valley.dead) == (converged, dead), i
    window = valley.final()
    if members is None:
      assert window is None
      np.testing.assert_allclose(valley.final_params()["w"], np.eye(len(losses))[i])  # last segment
      continue
    # each chosen segment exactly once, with all its steps; nothing else
    want_total = np.zeros(len(losses), np.float32)
    want_total[members] = [counts[j] for j in members]
    np.testing.assert_array_equal(window.total["w"], want_total)
    assert window.count == sum(counts[j] for j in members) and window.segments == len(members)
    ends = [j * freq for j in members]
    assert (window.start_step, window.end_step) == (max(min(ends) - freq + 1, 0), max(ends))
    np.testing.assert_allclose(valley.final_params()["w"], want_total / window.count, rtol=1e-6)


def test_loss_valley_on_the_first_sequence_in_words():
  """Descent to 0.44 at segment 5; converged at segment 7 (5 is the lowest of 5, 6, 7);
  threshold 1.3 * mean(0.44, 0.46, 0.47) = 0.594: of the tolerance window 2..5, segment 2
  (0.6) is above it, so averaging starts after it, at 4 (the reference skips 3, the first
  segment it could start at); segments join up to 10; at 16 all of the last 6 exceed the
  threshold: the valley is dead."""
  losses = LOSS_SEQUENCES[0]
  valley = swad.LossValley()
  for i, (segment, loss, end, _) in enumerate(_segments(losses, 10, len(losses))):
    valley.update(segment, loss, end)
    assert valley.converged == (i >= 7) and valley.dead == (i >= 16)
  assert valley.converge_step == 50
  assert valley.threshold == np.float32(np.mean(np.float32([0.44, 0.46, 0.47])) * 1.3)
  window = valley.final()
  assert (window.start_step, window.end_step, window.segments, window.count) == (31, 100, 7, 70)


def test_loss_valley_state_round_trip_and_errors():
  losses = LOSS_SEQUENCES[1]
  segs = _segments(losses, 10, len(losses))
  a, b = swad.LossValley(), swad.LossValley()
  for segment, loss, end, _ in segs[:9]:
    a.update(segment, loss, end)
  assert a.converged and not a.dead
  b.load_state_dict(
    jax.tree.map(jnp.asarray, a.state_dict({"w": np.zeros(len(losses), np.float32)}))
  )
  for segment, loss, end, _ in segs[9:]:
    a.update(segment, loss, end)
    b.update(segment, loss, end)
    wa, wb = a.final(), b.final()
    assert wa[1:] == wb[1:] and (a.converged, a.dead) == (b.converged, b.dead)
    np.testing.assert_array_equal(wa.total["w"], wb.total["w"])
  fresh = swad.LossValley()
  fresh.load_state_dict(fresh.state_dict({"w": np.zeros(3)}))
  assert not fresh.converged and fresh.final() is None
  with pytest.raises(ValueError, match="n_converge must be an integer >= 1"):
    swad.LossValley(n_converge=0)
  with pytest.raises(ValueError, match="tolerance_ratio"):
    swad.LossValley(tolerance_ratio=-1)
  with pytest.raises(ValueError, match="overlaps the previous one"):
    a.update(segs[3][0], 0.5, 20)
  with pytest.raises(ValueError, match="holds no params"):
    fresh.update(swad.average_init({"w": np.zeros(3)}), 0.5, 5)
  with pytest.raises(ValueError, match="has seen no segment"):
    fresh.final_params()


# ------------------------------------------------------------------ BatchNorm
class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(
      nn.Dense(3, name="dense")(x)
    )


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = Block(name="block")(x, train)
    h = nn.BatchNorm(use_running_average=not train, name="bn_top")(nn.relu(h))  # momentum 0.99
    return nn.Dense(2, name="head")(h)


def test_update_bn_averages_batch_statistics():
  model = BNNet()
  rng = np.random.RandomState(0)
  batches = [rng.normal(size=(16, 4)).astype(np.float32) * (i + 1) for i in range(3)]
  variables = jax.jit(model.init)(jax.random.key(0), batches[0])  # one compile, not many
  new = swad.update_bn(model, variables, batches, train=True)
  p = variables["params"]
  means, vars_, means_top, vars_top = [], [], [], []
  for x in batches:  # by hand: each BatchNorm's input, its batch mean and biased variance
    h = x @ np.asarray(p["block"]["dense"]["kernel"]) + np.asarray(p["block"]["dense"]["bias"])
    means.append(h.mean(0))
    vars_.append(h.var(0))
    bn = p["block"]["bn"]
    z = np.maximum(
      (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["bias"]),
      0,
    )
    means_top.append(z.mean(0))
    vars_top.append(z.var(0))
  stats = new["batch_stats"]
  np.testing.assert_allclose(stats["block"]["bn"]["mean"], np.mean(means, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["block"]["bn"]["var"], np.mean(vars_, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn_top"]["mean"], np.mean(means_top, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn_top"]["var"], np.mean(vars_top, 0), rtol=1e-5, atol=1e-6)
  assert new["params"] is variables["params"]
  # no batch_stats (dgjax's GroupNorm MNIST networks, frozen-BN ResNets): a no-op
  net = mlp(2, (4,))
  plain = net.init(jax.random.key(0), batches[0])
  assert swad.update_bn(net, plain, batches) == dict(plain)
  with pytest.raises(ValueError, match="training mode"):
    swad.update_bn(model, variables, batches, train=False)


class TinyResNet(nn.Module):
  """conv -> BatchNorm -> ReLU -> one dgjax ``BasicBlock`` (conv, BN, ReLU, conv, BN, + input,
  ReLU) -> mean pool, with dgjax's torch-style BatchNorm as in the ResNets."""

  frozen: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv")(x)
    h = nn.relu(resnet.BatchNorm(frozen=self.frozen, name="bn")(h, train))
    h = resnet.BasicBlock(4, 1, freeze_bn=self.frozen, name="block")(h, train)
    return jnp.mean(h, axis=(1, 2))


def conv3x3(x, kernel):
  """A 3x3 convolution with padding 1 (NHWC, HWIO), by its nine shifted matmuls."""
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i : i + h, j : j + w] @ kernel[i, j] for i in range(3) for j in range(3))


def torch_update_bn_reference(params, batches):
  """torch's ``update_bn`` by hand, in float64: each BatchNorm reset, then per batch a
  training-mode forward (normalised with the batch's mean and biased variance) and the
  ``momentum=None`` update ``r <- r + (s - r) / k`` with the batch mean and UNBIASED variance."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  layers = {"bn": p["bn"], "block/bn1": p["block"]["bn1"], "block/bn2": p["block"]["bn2"]}
  running = {n: {"mean": np.zeros(4), "var": np.ones(4)} for n in layers}

  def bn(h, name, k):
    mean, biased, unbiased = h.mean((0, 1, 2)), h.var((0, 1, 2)), h.var((0, 1, 2), ddof=1)
    running[name]["mean"] += (mean - running[name]["mean"]) / k
    running[name]["var"] += (unbiased - running[name]["var"]) / k
    return (h - mean) / np.sqrt(biased + 1e-5) * layers[name]["scale"] + layers[name]["bias"]

  for k, x in enumerate(batches, start=1):
    h = np.maximum(bn(conv3x3(np.asarray(x, np.float64), p["conv"]["kernel"]), "bn", k), 0)
    out = np.maximum(bn(conv3x3(h, p["block"]["conv1"]["kernel"]), "block/bn1", k), 0)
    bn(conv3x3(out, p["block"]["conv2"]["kernel"]), "block/bn2", k)  # (+ h, ReLU: no BN after)
  return running


def test_update_bn_on_dgjax_batch_norm_is_torchs_cumulative_update():
  rng = np.random.RandomState(0)
  batches = [
    rng.normal(size=(b, 5, 5, 3)).astype(np.float32) * (i + 1) + i for i, b in enumerate((6, 6, 4))
  ]  # unequal sizes: the unbiased factor differs
  model = TinyResNet()
  shapes = jax.eval_shape(model.init, jax.random.key(0), batches[0])  # traced, not compiled
  # random weights, affine parameters and running statistics (the reset must discard these)
  params, stale = (
    jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), shapes[c])
    for c in ("params", "batch_stats")
  )
  new = swad.update_bn(model, {"params": params, "batch_stats": stale}, batches, train=True)
  want = torch_update_bn_reference(params, batches)
  got = {
    "bn": new["batch_stats"]["bn"],
    "block/bn1": new["batch_stats"]["block"]["bn1"],
    "block/bn2": new["batch_stats"]["block"]["bn2"],
  }
  for name in want:
    for stat in ("mean", "var"):
      np.testing.assert_allclose(
        got[name][stat], want[name][stat], rtol=2e-5, atol=2e-6, err_msg=f"{name} {stat}"
      )
  assert new["params"] is params
  with pytest.raises(ValueError, match="training mode"):  # evaluation mode: nothing to average
    swad.update_bn(model, {"params": params, "batch_stats": stale}, batches, train=False)
  frozen = TinyResNet(frozen=True)
  with pytest.raises(ValueError, match="training mode"):  # frozen BatchNorm: its own statistics
    swad.update_bn(frozen, {"params": params, "batch_stats": stale}, batches, train=True)


# ------------------------------------------------------------------ the engine
def toy_splits(n_envs=3, n=64):
  rng = np.random.RandomState(0)
  ins, outs = [], []
  for e in range(n_envs):
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[:48], y[:48]))
    outs.append(train_lib.Split(f"env{e}_out", x[48:], y[48:]))
  return ins, outs


STEPS, FREQ = 56, 3  # evaluations at 0, 3, ..., 54 and 55 (a one-step last segment)
CONFIG = dict(
  method="erm",
  checkpoint_freq=FREQ,
  hparams={"batch_size": 8, "lr": 3e-2},
  progress=False,
  swad=True,
)


def strip_timing(records):
  return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in records]


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
  ins, outs = toy_splits()
  out = tmp_path_factory.mktemp("swad_run")
  cfg = train_lib.TrainConfig(steps=STEPS, keep_checkpoints=STEPS, **CONFIG)
  task = train_lib.DomainBedTask(mlp(2, (16,)), ins, outs, cfg.test_envs)
  records = train_lib.train_many([cfg], task, output_dirs=[out])[0]
  return cfg, task, records, out


def test_engine_writes_swad_keys_and_averages_the_chosen_steps(engine_run):
  cfg, task, records, _ = engine_run
  ends = [r["step"] for r in records]
  assert ends == list(range(0, STEPS, FREQ)) + [STEPS - 1]
  active = [r["swad_active"] for r in records]
  assert not active[0] and active[-1] and active == sorted(active)  # averaging starts, stays
  for r in records:
    assert ("swad_env2_in_acc" in r) == r["swad_active"]
  last = records[-1]
  for key in (
    "swad_env0_in_acc",
    "swad_env2_out_acc",
    "swad_val_loss",
    "swad_segments",
    "swad_start_step",
    "swad_end_step",
    "swad_dead",
    "val_loss",
  ):
    assert key in last
  # the window is the reference's rule on the recorded validation losses
  for r, (converged, dead, members, _) in zip(
    records, ref_window([r["val_loss"] for r in records], ends)
  ):
    assert (r["swad_active"], r["swad_dead"]) == (converged, dead)
    if members:
      assert (r["swad_start_step"], r["swad_end_step"]) == (
        ends[min(members) - 1] + 1,
        ends[max(members)],
      )
      assert r["swad_segments"] == len(members)

  # a reference loop with the engine's step: record every step's params
  method = methods.get_method(cfg.method)
  ctx = core.Context(
    model=task.model,
    hparams=dict(cfg.resolved_hparams),
    num_domains=task.num_domains,
    per_domain_impl=train_lib.resolve_per_domain_impl("auto"),
  )
  step_fn = method.build(ctx)
  init_key, _ = jax.random.split(jax.random.key(cfg.seed))
  state = train_lib.init_state(step_fn, task.init_params(init_key), cfg.seed)
  train_step = train_lib.make_train_step(step_fn, cfg.resolved_hparams["batch_size"])
  per_step, method_states = [], []
  for _ in range(STEPS):
    state, _ = train_step(state, task.data)
    per_step.append(jax.device_get(state.params))
    method_states.append(state.opt_state)
  predict = lambda model_state, x: step_fn.predict(model_state[0], model_state[1], x)  # noqa: E731
  for r in records:  # the same trajectory
    np.testing.assert_allclose(
      task.val_loss((per_step[r["step"]], method_states[r["step"]]), predict),
      r["val_loss"],
      rtol=1e-5,
    )
  checked = 0
  for r in records:
    if not r["swad_active"]:
      continue
    window = per_step[r["swad_start_step"] : r["swad_end_step"] + 1]
    mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *window)
    averaged = (mean, method_states[r["step"]])
    np.testing.assert_allclose(task.val_loss(averaged, predict), r["swad_val_loss"], rtol=1e-5)
    accs = task.evaluate(averaged, 0, predict)
    for name, value in accs.items():
      assert abs(r[f"swad_{name}"] - value) <= 1 / 16 + 1e-9, name  # at most one example off
    checked += 1
  assert checked >= 3


def test_engine_resume_with_swad_equals_uninterrupted(engine_run, tmp_path):
  """The run as if killed after the checkpoint of a step where averaging had started (its
  later checkpoints removed), resumed: the same records, bitwise."""
  cfg, task, records, out = engine_run
  first = next(i for i, r in enumerate(records) if r["swad_active"])
  stop = records[first + 2]["step"]
  run_dir = tmp_path / "run"
  shutil.copytree(out, run_dir)
  for ckpt in (run_dir / "checkpoints").iterdir():
    if ckpt.name.isdigit() and int(ckpt.name) > stop:
      shutil.rmtree(ckpt)
  (run_dir / "done").unlink()
  resumed = train_lib.train_many([cfg], task, output_dirs=[run_dir], resume=True)[0]
  assert [r["step"] for r in resumed] == [r["step"] for r in records]
  assert strip_timing(resumed) == strip_timing(records)
  assert strip_timing(results.read_jsonl(run_dir / "results.jsonl")) == json.loads(
    json.dumps(strip_timing(records))
  )


def test_engine_refuses_swad_without_validation_data():
  with pytest.raises(ValueError, match="holdout_fraction must be > 0"):
    train_lib.TrainConfig(swad=True, holdout_fraction=0.0)
  with pytest.raises(ValueError, match="n_tolerance must be an integer"):
    train_lib.TrainConfig(swad=True, swad_n_tolerance=0)


def test_update_bn_on_a_multi_device_mesh():
  """``update_bn`` with the statistics replicated over an 8-device mesh and the batches
  replicated or split over it (as the engine holds them with a mesh) is torch's cumulative
  update; in a subprocess, as the device count is fixed when JAX starts."""
  worker = Path(__file__).resolve().parent / "sharding_worker.py"
  proc = subprocess.run(
    [sys.executable, str(worker), "update_bn"], capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  worst = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(worst) == {"replicated", "split"} and max(worst.values()) < 1e-4
