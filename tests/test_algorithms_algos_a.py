"""DANN, CDANN, MLDG, MTL, ARM, SagNet, Transfer against slow explicit references.

Each reference writes DomainBed's update out with loops over domains and examples on a tiny
MLP (6 inputs, 5 hidden units, 3 classes) in float64, and is compared with the method's step
built by :func:`dgjax.core.build_step`. Then every method runs 3 jitted steps of K = 2 vmapped
runs through :func:`dgjax.train.train_many`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import core, methods
from dgjax import train as train_lib
from dgjax.algorithms import adversarial
from dgjax.models import mlp

NUM_CLASSES = 3
X64 = jax.enable_x64


# ----------------------------------------------------------------------------- helpers
def _batch(d=3, b=6, dim=6, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(d, b, dim)
  y = rng.randint(0, NUM_CLASSES, (d, b)).astype(np.int32)
  return {"x": jnp.asarray(x, jnp.float64), "y": jnp.asarray(y)}


def _setup(name, overrides, d=3, b=6, seed=0):
  """The method's step on a 6-5-3 MLP in float64, its initial params and state, a batch."""
  method = methods.get_method(name)
  hp = core.resolve_hparams(method, overrides={"batch_size": b, **overrides})
  model = mlp(NUM_CLASSES, hidden=(5,))
  params = model.init(jax.random.key(seed), jnp.zeros((1, 6)))["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  ctx = core.Context(model=model, hparams=hp, num_domains=d, per_domain_impl="vmap")
  step = method.build(ctx)
  return step, hp, params, step.init(params), _batch(d, b, seed=seed + 1)


def _net(params, x):
  """The MLP written out: ``x -> relu(x W1 + b1) = z -> z W2 + b2``; returns ``(z, logits)``."""
  f = params["featurizer"]["dense0"]
  c = params["classifier"]
  z = jnp.maximum(x @ f["kernel"] + f["bias"], 0.0)
  return z, z @ c["kernel"] + c["bias"]


def _ce(logits, label):
  """Cross-entropy of one example."""
  return jax.nn.logsumexp(logits) - logits[label]


def _torch_adam_first_steps(grads_seq, params, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
  """``torch.optim.Adam`` written out for a sequence of gradient functions/values: returns
  the parameters after each step. ``grads_seq`` items are callables ``g(params)``."""
  m = jax.tree.map(jnp.zeros_like, params)
  v = jax.tree.map(jnp.zeros_like, params)
  out = []
  for t, g_fn in enumerate(grads_seq, start=1):
    g = jax.tree.map(lambda gi, p: gi + wd * p, g_fn(params), params)
    m = jax.tree.map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
    v = jax.tree.map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
    params = jax.tree.map(
        lambda p, mi, vi: p - lr / (1 - b1**t) * mi / (jnp.sqrt(vi) / jnp.sqrt(1 - b2**t) + eps),
        params, m, v)
    out.append(params)
  return out


def _close(a, b, rtol=1e-9, atol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _splits(n_envs=3, n=24, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for e in range(n_envs):
    y = rng.randint(0, NUM_CLASSES, n).astype(np.int32)
    x = (rng.randn(n, 6) + 0.5 * y[:, None]).astype(np.float32)
    out.append(train_lib.Split(f"env{e}_in", x, y))
  return out


# ----------------------------------------------------------------------------- DANN / CDANN
def _disc_forward(disc, u):
  """DomainBed's MLP discriminator (depth 3, no dropout) on one example."""
  m = disc["mlp"]
  h = jnp.maximum(u @ m["input"]["kernel"] + m["input"]["bias"], 0.0)
  h = jnp.maximum(h @ m["hidden0"]["kernel"] + m["hidden0"]["bias"], 0.0)
  return h @ m["output"]["kernel"] + m["output"]["bias"]


def _dann_reference_losses(params, disc, batch, hp, conditional):
  """``(classifier_loss, disc_loss)`` of DomainBed's ``AbstractDANN.update``, example by
  example."""
  d, b = batch["y"].shape
  y_np = np.asarray(batch["y"])
  all_y = [int(y_np[i, j]) for i in range(d) for j in range(b)]
  zs, logits, dlabels = [], [], []
  for i in range(d):
    for j in range(b):
      z, lg = _net(params, batch["x"][i, j])
      zs.append(z), logits.append(lg), dlabels.append(i)
  n = d * b
  cls_loss = sum(_ce(logits[k], all_y[k]) for k in range(n)) / n
  inputs = [zs[k] + (disc["embedding"][all_y[k]] if conditional else 0.0) for k in range(n)]
  ces = [_ce(_disc_forward(disc, inputs[k]), dlabels[k]) for k in range(n)]
  if conditional:   # class-balanced: weights 1 / (count[y] * (max y + 1))
    counts = np.bincount(all_y)
    width = max(all_y) + 1
    disc_loss = sum(ces[k] / (counts[all_y[k]] * width) for k in range(n))
  else:
    disc_loss = sum(ces) / n
  # input-gradient penalty: d/du_k of the summed CE, squared norm, mean over examples
  penalty = sum(jnp.sum(jax.grad(lambda u, k=k: _ce(_disc_forward(disc, u), dlabels[k]))(inputs[k])**2)
                for k in range(n)) / n
  return cls_loss, disc_loss + hp["grad_penalty"] * penalty


@pytest.mark.parametrize("name,conditional", [("dann", False), ("cdann", True)])
def test_dann_generator_and_discriminator_steps_match_the_reference(name, conditional):
  with X64(True):
    step, hp, params, state, batch = _setup(
        name, {"lambda": 0.7, "grad_penalty": 0.3, "mlp_width": 4, "beta1": 0.5,
               "lr_g": 1e-2, "lr_d": 2e-2, "weight_decay_g": 0.1, "weight_decay_d": 0.05,
               "d_steps_per_g_step": 1}, d=2, b=4)
    disc0 = state.source.disc
    key = jax.random.key(0)

    # step 0 is a generator step (DomainBed's update_count 1: 1 % 2 < 1 is false)
    updates, state1, metrics = step.update(params, state, batch, jnp.int32(0), key)

    def gen_loss(p):
      cls, dl = _dann_reference_losses(p, disc0, batch, hp, conditional)
      return cls - hp["lambda"] * dl

    g_ref = jax.grad(gen_loss)(params)
    (p_ref,) = _torch_adam_first_steps([lambda p: g_ref], params, hp["lr_g"],
                                       hp["weight_decay_g"], hp["beta1"], 0.9)
    _close(optax_apply(params, updates), p_ref)
    _close(state1.source.disc, disc0, rtol=0, atol=0)        # discriminator did not move
    np.testing.assert_allclose(metrics["gen_loss"], gen_loss(params), rtol=1e-10)
    assert float(metrics["disc_step"]) == 0.0

    # step 1 is a discriminator step: network frozen, its Adam count unchanged
    params1 = optax_apply(params, updates)
    updates2, state2, metrics2 = step.update(params1, state1, batch, jnp.int32(1), key)
    _close(updates2, jax.tree.map(jnp.zeros_like, updates2), rtol=0, atol=0)
    _close(state2.optimizer, state1.optimizer, rtol=0, atol=0)
    disc_grad = jax.grad(lambda dp: _dann_reference_losses(params1, dp, batch, hp, conditional)[1])(disc0)
    (disc_ref,) = _torch_adam_first_steps([lambda p: disc_grad], disc0, hp["lr_d"],
                                          hp["weight_decay_d"], hp["beta1"], 0.9)
    _close(state2.source.disc, disc_ref)
    np.testing.assert_allclose(
        metrics2["disc_loss"], _dann_reference_losses(params1, disc0, batch, hp, conditional)[1],
        rtol=1e-10)
    assert float(metrics2["disc_step"]) == 1.0


def optax_apply(params, updates):
  return jax.tree.map(lambda p, u: p + u, params, updates)


def test_dann_schedule_is_domainbeds():
  # update_count = step + 1; discriminator step iff update_count % (1 + d) < d
  for d in (0, 1, 2, 5):
    got = [bool(adversarial.dann_discriminator_step(jnp.int32(s), d)) for s in range(12)]
    assert got == [((s + 1) % (1 + d)) < d for s in range(12)]
  assert [bool(adversarial.dann_discriminator_step(jnp.int32(s), 2)) for s in range(6)] == [
      True, False, True, True, False, True]


def test_only_on_steps_skips_updates_and_freezes_the_inner_state():
  import optax
  inner = optax.adam(0.1)
  tx = adversarial.only_on_steps(inner, lambda step: step % 2 == 0)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = [{"w": jnp.array([0.3, 0.1])}, {"w": jnp.array([5.0, 5.0])}, {"w": jnp.array([-0.2, 0.4])}]
  s, s_ref = tx.init(params), inner.init(params)
  for step, g in enumerate(grads):
    u, s = tx.update(g, s, params, step=jnp.int32(step))
    if step % 2 == 0:
      u_ref, s_ref = inner.update(g, s_ref, params)
      _close(u, u_ref, rtol=1e-6)
    else:
      _close(u, {"w": jnp.zeros(2)}, rtol=0, atol=0)
  _close(s.inner, s_ref, rtol=0, atol=0)


def test_cdann_class_balance_uses_the_one_hot_width_of_the_batch():
  # labels {0, 1} in a 3-class problem: F.one_hot(all_y) has width 2, not 3
  y = jnp.array([0, 0, 1, 1, 1, 0])
  disc_out = jnp.asarray(np.random.RandomState(0).randn(6, 2), jnp.float32)
  labels = jnp.array([0, 0, 0, 1, 1, 1])
  got = adversarial.dann_disc_loss(disc_out, labels, y, 3, class_balance=True)
  ces = [float(_ce(disc_out[i], labels[i])) for i in range(6)]
  want = sum(c / (3 * 2) for c in ces)   # every class occurs 3 times, width 2
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- all methods
NEW_METHODS = ["dann", "cdann"]
#: Hparams that vary between the K = 2 runs, and small structural settings.
VARY = {"dann": ("lambda", 0.5, 2.0), "cdann": ("grad_penalty", 0.0, 0.5)}
SMALL = {"dann": {"mlp_width": 8}, "cdann": {"mlp_width": 8}}


@pytest.mark.parametrize("name", NEW_METHODS)
def test_three_jitted_steps_of_two_vmapped_runs_are_finite(name):
  splits = _splits()
  hp_name, a, b = VARY[name]
  cfgs = [train_lib.TrainConfig(method=name, test_envs=(2,), steps=3, checkpoint_freq=100,
                                seed=s, hparams={"batch_size": 4, hp_name: v, **SMALL.get(name, {})},
                                progress=False)
          for s, v in ((0, a), (1, b))]
  runs = train_lib.train_many(cfgs, mlp(NUM_CLASSES, (5,)), splits, splits, checkpoint=False)
  assert [r[-1]["hparams"][hp_name] for r in runs] == [a, b]
  for r in runs:
    assert all(np.isfinite(rec["loss"]) for rec in r)
    assert 0.0 <= r[-1]["env0_in_acc"] <= 1.0
  assert runs[0][-1]["loss"] != runs[1][-1]["loss"]
