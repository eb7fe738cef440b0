"""Unfrozen BatchNorm through the engine (DomainBed's ``freeze_bn=False``).

* Every registered method sees the batch statistics of DomainBed's own forward passes: the
  pooled statistics where DomainBed runs the network on ``torch.cat`` of the minibatches, each
  domain's own where it runs it per minibatch (:attr:`dgjax.core.Method.forward_per_domain`).
  Shown without trusting the code's own claim: a per-domain constant shift of the inputs is
  removed exactly by per-domain statistics (the losses do not move) and not by pooled ones.
* The running statistics move by torch's rule, once per DomainBed forward, checked against an
  explicit loop; frozen BatchNorm never moves; evaluation reads the state's statistics.
* Per-domain forward passes draw independent dropout masks.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import core, methods
from dgjax.conv import Conv
from dgjax.models import TorchDense
from dgjax.resnet import TORCH_BN_MOMENTUM, BatchNorm

D, B = 3, 8


class BNFeaturizer(nn.Module):
  """Unpadded 3x3 convolution (a constant input shift is a constant output shift) -> BatchNorm ->
  ReLU -> mean pool; or, with ``conv=False``, flatten -> dense -> BatchNorm -> ReLU."""

  frozen: bool = False
  conv: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    if self.conv:
      h = Conv(6, kernel_size=3, padding=0, name="conv")(x)
    else:
      h = TorchDense(6, name="dense")(x.reshape(x.shape[0], -1))
    h = nn.relu(BatchNorm(frozen=self.frozen, name="bn")(h, train))
    z = jnp.mean(h, axis=(1, 2)) if self.conv else h
    return nn.Dropout(self.dropout, deterministic=not train)(z)


class BNNet(nn.Module):
  """The engine's model protocol with BatchNorm (as :class:`dgjax.resnet.ResNetClassifier`)."""

  featurizer: BNFeaturizer
  num_classes: int = 3
  takes_train = True

  @property
  def batch_norm_momentum(self):
    return None if self.featurizer.frozen else TORCH_BN_MOMENTUM

  def setup(self):
    self.classifier = TorchDense(self.num_classes)

  def features(self, x, train=False):
    return self.featurizer(x, train)

  def head(self, z):
    return self.classifier(z)

  def __call__(self, x, train=False):
    return self.classifier(self.featurizer(x, train))


def make(frozen=False, conv=True, dropout=0.0):
  model = BNNet(BNFeaturizer(frozen=frozen, conv=conv, dropout=dropout, name="featurizer"))
  x0 = jnp.zeros((1, 6, 6, 2), jnp.float32)
  variables = model.init(jax.random.key(0), x0)
  # non-trivial running statistics, so "unchanged" and "moved" are both visible
  stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
  return model, variables["params"], {"batch_stats": stats}


def domain_batch(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(D, B, 6, 6, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, (D, B)), jnp.int32)
  return x, y


def build(name, model, variables, **overrides):
  hp = methods.resolve_hparams(name, 0, {"batch_size": B, **overrides})
  return methods.get_method(name).build(core.Context(model, hp, D, variables=variables))


HPARAMS = {"hutchinson": {"hutchinson_samples": 2}}


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_each_method_sees_the_batch_statistics_of_its_domainbed_forward(name):
  model, params, variables = make()
  x, y = domain_batch()
  rng = np.random.default_rng(1)
  shift_each = jnp.asarray(rng.normal(size=(D, 1, 1, 1, 2)) * 3, jnp.float32)  # per domain
  step = build(name, model, variables, **HPARAMS.get(name, {}))
  state = step.init(params, jax.random.key(0))

  @jax.jit
  def losses(xs):
    return jax.vmap(
      lambda xx: step.update(params, state, {"x": xx, "y": y}, jnp.asarray(0), jax.random.key(2))[
        2
      ]["env_losses"]
    )(xs)

  base, per_domain, common = np.asarray(losses(jnp.stack([x, x + shift_each, x + shift_each[0]])))
  assert np.all(np.isfinite(base))
  scale = np.max(np.abs(base))
  # a shift common to every domain is removed by either rule (not for ARM: its context network,
  # zero-padded convolutions whose output enters the model's input, sees absolute values)
  if name != "arm":
    np.testing.assert_allclose(common, base, atol=2e-5 * scale)
  if methods.get_method(name).forward_per_domain:  # each domain's own statistics
    np.testing.assert_allclose(per_domain, base, atol=2e-5 * scale)
  else:  # the pooled statistics see the shifts
    assert np.max(np.abs(per_domain - base)) > 1e-3 * scale, (base, per_domain)


def torch_running_update(r_mean, r_var, h):
  """torch ``BatchNorm`` in ``train()``: ``r <- 0.9 r + 0.1 s`` with the unbiased variance."""
  h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  m = TORCH_BN_MOMENTUM
  return (1 - m) * r_mean + m * h.mean(0), (1 - m) * r_var + m * h.var(0, ddof=1)


@pytest.mark.parametrize(
  "name,per_domain", [("erm", False), ("irm", False), ("sand", True), ("coral", True)]
)
def test_running_statistics_move_once_per_domainbed_forward(name, per_domain):
  model, params, variables = make(conv=False)
  x, y = domain_batch()
  step = build(name, model, variables)
  state = step.init(params, jax.random.key(0))
  assert methods.get_method(name).forward_per_domain == per_domain
  _, new_state, _ = jax.jit(step.update)(
    params, state, {"x": x, "y": y}, jnp.asarray(0), jax.random.key(2)
  )
  dense = params["featurizer"]["dense"]
  h = np.asarray(x, np.float64).reshape(D, B, -1) @ np.asarray(
    dense["kernel"], np.float64
  ) + np.asarray(dense["bias"], np.float64)  # the BN input [D, B, 6]
  r_mean = np.asarray(variables["batch_stats"]["featurizer"]["bn"]["mean"], np.float64)
  r_var = np.asarray(variables["batch_stats"]["featurizer"]["bn"]["var"], np.float64)
  if per_domain:  # DomainBed's loop: one forward, one update per domain, in order
    for d in range(D):
      r_mean, r_var = torch_running_update(r_mean, r_var, h[d])
  else:  # one forward of the concatenated batch
    r_mean, r_var = torch_running_update(r_mean, r_var, h)
  got = new_state.variables["batch_stats"]["featurizer"]["bn"]
  np.testing.assert_allclose(got["mean"], r_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["var"], r_var, rtol=1e-5, atol=1e-6)


def test_frozen_batch_norm_never_moves_and_trains_on_the_running_statistics():
  model, params, variables = make(frozen=True)
  x, y = domain_batch()
  step = build("sand", model, variables)
  state = step.init(params, jax.random.key(0))
  _, new_state, metrics = jax.jit(step.update)(
    params, state, {"x": x, "y": y}, jnp.asarray(0), jax.random.key(2)
  )
  for a, b in zip(jax.tree.leaves(new_state.variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # training normalised with the running statistics: the losses are evaluation's
  logits = jax.vmap(lambda xd: step.predict(params, new_state, xd))(x)
  want = core.env_losses_of(logits, y)
  np.testing.assert_allclose(metrics["env_losses"], want, rtol=1e-6)


def test_evaluation_reads_the_running_statistics_of_the_state():
  model, params, variables = make()
  x, y = domain_batch()
  step = build("erm", model, variables)
  state = step.init(params, jax.random.key(0))
  _, new_state, _ = jax.jit(step.update)(
    params, state, {"x": x, "y": y}, jnp.asarray(0), jax.random.key(2)
  )
  got = step.predict(params, new_state, x[0])
  want = model.apply({"params": params, **new_state.variables}, x[0])  # train=False
  np.testing.assert_allclose(got, want, rtol=1e-6)
  before = model.apply({"params": params, **variables}, x[0])
  assert np.max(np.abs(np.asarray(got) - np.asarray(before))) > 1e-4  # the statistics moved


def test_per_domain_forward_passes_draw_independent_dropout_masks():
  model, params, variables = make(dropout=0.5)
  x, y = domain_batch()
  same = {"x": jnp.broadcast_to(x[:1], x.shape), "y": jnp.broadcast_to(y[:1], y.shape)}
  ctx = dataclasses.replace(
    core.Context(model, {}, D, variables=variables), train=True, rng=jax.random.key(3)
  )
  _, terms = core.per_domain_gradients().grads(ctx, params, (), same, 0, None)
  assert len(set(np.round(np.asarray(terms.env_losses), 6))) == D  # identical data, new masks
  z = core.over_domains(ctx, lambda c, xd: c.features(params, xd), same["x"])
  assert not np.allclose(z[0], z[1])
  no_dropout = dataclasses.replace(ctx, train=False)
  _, terms = core.per_domain_gradients().grads(no_dropout, params, (), same, 0, None)
  np.testing.assert_allclose(terms.env_losses, terms.env_losses[0], rtol=1e-6)


def test_arm_context_channel_on_a_flax_convolution_as_domainbeds_resnet():
  """ARM on a ResNet-style first layer (``flax.linen.Conv``, strides 2, padding 1): the context
  channel's kernel starts as a copy of image channel 0 (DomainBed's ResNet ``conv1`` adaptation)
  and the network sees ``concat(x, context)`` through one ``C + 1``-channel convolution."""
  from dgjax.algorithms import adaptation

  class FlaxConvFeaturizer(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Conv(
        4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, name="conv1"
      )(x)
      return jnp.mean(nn.relu(h), axis=(1, 2))

  class ResNetLike(BNNet):
    copies_input_kernels = True

  model = ResNetLike(FlaxConvFeaturizer(name="featurizer"))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 6, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  hp = methods.resolve_hparams("arm", 0, {"batch_size": 5})
  ctx = core.Context(model, hp, 1)
  state = methods.get_method("arm").gradients.init(ctx, params, jax.random.key(0))
  kernel = params["featurizer"]["conv1"]["kernel"]  # [3, 3, 3, 4]
  np.testing.assert_array_equal(state.extra["context_kernel"], kernel[:, :, :1])
  context = jnp.asarray(np.random.default_rng(1).normal(size=(5, 6, 6, 1)), jnp.float32)
  got = adaptation.logits_with_context(ctx, params, x, context, state.extra["context_kernel"])
  wide = jax.lax.conv_general_dilated(  # the reference: one 4-channel convolution
    jnp.concatenate([x, context], -1),
    jnp.concatenate([kernel, kernel[:, :, :1]], 2),
    (2, 2),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  z = jnp.mean(nn.relu(wide), axis=(1, 2))
  want = model.apply({"params": params}, z, method="head")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_swad_recomputes_the_averaged_models_batch_norm_before_its_final_evaluation(monkeypatch):
  """``--swad`` with unfrozen BatchNorm through the engine: before the last step the averaged
  model is not scored (its running statistics are not its own); at the last step its
  statistics are recomputed, as SWAD's ``update_bn``, from the BatchNorm inputs of the
  averaged weights over the training batches the run would draw next (an explicit key chain
  here), and the recorded scores are those of that model."""
  from dgjax import swad
  from dgjax import train as train_lib

  n_bn = 4  # SWAD's update_bn reads 500 batches; fewer here
  monkeypatch.setattr(swad, "BN_UPDATE_BATCHES", n_bn)
  model, _, variables = make(conv=False)  # flatten -> dense -> BatchNorm -> ReLU
  rng = np.random.default_rng(0)
  ins, outs = [], []
  for e in range(3):
    x = rng.normal(size=(40, 6, 6, 2)).astype(np.float32) * (1 + e) + e  # per-domain statistics
    y = rng.integers(0, 3, 40).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[:32], y[:32]))
    outs.append(train_lib.Split(f"env{e}_out", x[32:], y[32:]))
  task = train_lib.DomainBedTask(model, ins, outs, test_envs=(2,))
  task.variables = variables  # the model's running statistics
  steps = 7
  cfg = train_lib.TrainConfig(
    method="erm",
    steps=steps,
    checkpoint_freq=2,
    progress=False,
    hparams={"batch_size": B, "lr": 1e-2},
    swad=True,
    swad_n_converge=1,
    swad_n_tolerance=2,
    swad_tolerance_ratio=10.0,
  )
  records = train_lib.train_many([cfg], task)[0]
  assert [r["step"] for r in records] == [0, 2, 4, 6] and all(r["swad_active"] for r in records)
  for r in records[:-1]:  # window recorded, average not scored
    assert "swad_start_step" in r and "swad_val_loss" not in r and "swad_env0_in_acc" not in r
  last = records[-1]

  # the engine's trajectory, step by step, with its final state key
  train_step, state = train_lib.build_run("erm", task, cfg.resolved_hparams, cfg.seed)
  per_step = []
  for _ in range(steps):
    state, _ = train_step(state, task.data)
    per_step.append(jax.device_get(state.params))
  window = per_step[last["swad_start_step"] : last["swad_end_step"] + 1]
  mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *window)

  dense = jax.tree.map(lambda a: np.asarray(a, np.float64), mean["featurizer"]["dense"])
  draw = jax.jit(train_lib.sample_batch, static_argnums=2)
  key, means, variances = state.key, [], []
  for _ in range(n_bn):  # the next training batches: the step's key split, domains pooled
    key, sample_key, _ = jax.random.split(key, 3)
    x = np.asarray(draw(sample_key, task.data, B)["x"], np.float64).reshape(
      task.num_domains * B, -1
    )
    h = x @ dense["kernel"] + dense["bias"]  # the BatchNorm's input
    means.append(h.mean(0))
    variances.append(h.var(0, ddof=1))
  stats = {
    "featurizer": {
      "bn": {
        "mean": np.mean(means, 0).astype(np.float32),
        "var": np.mean(variances, 0).astype(np.float32),
      }
    }
  }
  averaged = (mean, state.opt_state._replace(variables={"batch_stats": stats}))

  def predict(model_state, x):  # ERM's: the network with the state's statistics, evaluation mode
    return model.apply({"params": model_state[0], **model_state[1].variables}, x)

  np.testing.assert_allclose(last["swad_val_loss"], task.val_loss(averaged, predict), rtol=1e-4)
  for name, value in task.evaluate(averaged, 0, predict).items():
    assert abs(last[f"swad_{name}"] - value) <= 1 / 8 + 1e-9, name  # at most one example off
  # the last step's running statistics would have scored it otherwise
  stale = task.val_loss((mean, state.opt_state), predict)
  assert abs(stale - last["swad_val_loss"]) > 1e-3
