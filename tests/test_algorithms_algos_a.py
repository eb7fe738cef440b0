"""DANN, CDANN, MLDG, MTL, ARM, SagNet, Transfer against slow explicit references (ARM's:
tests/test_arm_trm_domainbed.py, with the ARM helpers here).

Each reference writes DomainBed's update out with loops over domains and examples on a tiny
MLP (6 inputs, 5 hidden units, 3 classes) in float64, and is compared with the method's step
built by :func:`dgjax.core.build_step`. Then every method runs 3 jitted steps of K = 2 vmapped
runs through :func:`dgjax.train.train_many`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgjax import core, methods
from dgjax import train as train_lib
from dgjax.algorithms import adversarial
from dgjax.conv import Conv
from dgjax.models import Classifier, mlp

NUM_CLASSES = 3
X64 = jax.enable_x64


# ----------------------------------------------------------------------------- helpers
def _batch(d=3, b=6, dim=6, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(d, b, dim)
  y = rng.randint(0, NUM_CLASSES, (d, b)).astype(np.int32)
  return {"x": jnp.asarray(x, jnp.float64), "y": jnp.asarray(y)}


def _jitted(step):
  """The method's step with ``update`` and ``predict`` jitted (eager dispatch compiles every
  primitive separately: slower than one compile)."""
  return step._replace(update=jax.jit(step.update), predict=jax.jit(step.predict))


def _setup(name, overrides, d=3, b=6, seed=0):
  """The method's step on a 6-5-3 MLP in float64, its initial params and state, a batch."""
  method = methods.get_method(name)
  hp = core.resolve_hparams(method, overrides={"batch_size": b, **overrides})
  model = mlp(NUM_CLASSES, hidden=(5,))
  params = model.init(jax.random.key(seed), jnp.zeros((1, 6)))["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  ctx = core.Context(model=model, hparams=hp, num_domains=d, per_domain_impl="vmap")
  step = _jitted(method.build(ctx))
  return step, hp, params, step.init(params, jax.random.key(0)), _batch(d, b, seed=seed + 1)


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
      params,
      m,
      v,
    )
    out.append(params)
  return out


def _close(a, b, rtol=1e-9, atol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _splits(n_envs=3, n=24, seed=0, image=False):
  rng = np.random.RandomState(seed)
  out = []
  for e in range(n_envs):
    y = rng.randint(0, NUM_CLASSES, n).astype(np.int32)
    shape = (n, 5, 5, 2) if image else (n, 6)
    x = (rng.randn(*shape) + 0.5 * y.reshape((n,) + (1,) * (len(shape) - 1))).astype(np.float32)
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
  if conditional:  # class-balanced: weights 1 / (count[y] * (max y + 1))
    counts = np.bincount(all_y)
    width = max(all_y) + 1
    disc_loss = sum(ces[k] / (counts[all_y[k]] * width) for k in range(n))
  else:
    disc_loss = sum(ces) / n
  # input-gradient penalty: d/du_k of the summed CE, squared norm, mean over examples
  penalty = (
    sum(
      jnp.sum(jax.grad(lambda u, k=k: _ce(_disc_forward(disc, u), dlabels[k]))(inputs[k]) ** 2)
      for k in range(n)
    )
    / n
  )
  return cls_loss, disc_loss + hp["grad_penalty"] * penalty


@pytest.mark.parametrize("name,conditional", [("dann", False), ("cdann", True)])
def test_dann_generator_and_discriminator_steps_match_the_reference(name, conditional):
  with X64(True):
    step, hp, params, state, batch = _setup(
      name,
      {
        "lambda": 0.7,
        "grad_penalty": 0.3,
        "mlp_width": 4,
        "beta1": 0.5,
        "lr_g": 1e-2,
        "lr_d": 2e-2,
        "weight_decay_g": 0.1,
        "weight_decay_d": 0.05,
        "d_steps_per_g_step": 1,
      },
      d=2,
      b=4,
    )
    disc0 = state.source.discriminator.params
    key = jax.random.key(0)

    # step 0 is a generator step (DomainBed's update_count 1: 1 % 2 < 1 is false)
    updates, state1, metrics = step.update(params, state, batch, jnp.int32(0), key)

    def gen_loss(p):
      cls, dl = _dann_reference_losses(p, disc0, batch, hp, conditional)
      return cls - hp["lambda"] * dl

    g_ref = jax.grad(gen_loss)(params)
    (p_ref,) = _torch_adam_first_steps(
      [lambda p: g_ref], params, hp["lr_g"], hp["weight_decay_g"], hp["beta1"], 0.9
    )
    _close(optax_apply(params, updates), p_ref)
    _close(state1.source.discriminator, state.source.discriminator, rtol=0, atol=0)  # not moved
    np.testing.assert_allclose(metrics["gen_loss"], gen_loss(params), rtol=1e-10)
    assert float(metrics["disc_step"]) == 0.0

    # step 1 is a discriminator step: network frozen, its Adam count unchanged
    params1 = optax_apply(params, updates)
    updates2, state2, metrics2 = step.update(params1, state1, batch, jnp.int32(1), key)
    _close(updates2, jax.tree.map(jnp.zeros_like, updates2), rtol=0, atol=0)
    _close(_inner_state(state2.optimizer), _inner_state(state1.optimizer), rtol=0, atol=0)
    disc_grad = jax.grad(lambda dp: _dann_reference_losses(params1, dp, batch, hp, conditional)[1])(
      disc0
    )
    (disc_ref,) = _torch_adam_first_steps(
      [lambda p: disc_grad], disc0, hp["lr_d"], hp["weight_decay_d"], hp["beta1"], 0.9
    )
    _close(state2.source.discriminator.params, disc_ref)
    np.testing.assert_allclose(
      metrics2["disc_loss"],
      _dann_reference_losses(params1, disc0, batch, hp, conditional)[1],
      rtol=1e-10,
    )
    assert float(metrics2["disc_step"]) == 1.0


def optax_apply(params, updates):
  return jax.tree.map(lambda p, u: p + u, params, updates)


def test_dann_schedule_is_domainbeds():
  # update_count = step + 1; discriminator step iff update_count % (1 + d) < d
  for d in (0, 1, 2, 5):
    got = [bool(adversarial.dann_discriminator_step(jnp.int32(s), d)) for s in range(12)]
    assert got == [((s + 1) % (1 + d)) < d for s in range(12)]
  assert [bool(adversarial.dann_discriminator_step(jnp.int32(s), 2)) for s in range(6)] == [
    True,
    False,
    True,
    True,
    False,
    True,
  ]


def _inner_state(opt_state):
  """The step-gated optimizer's inner state (:func:`dgjax.core.on_steps`)."""
  ((_, inner),) = optax.tree_utils.tree_get_all_with_path(opt_state, "inner_state")
  return inner


def test_on_steps_skips_updates_and_freezes_the_inner_state():
  inner = optax.adam(0.1)
  tx = core.on_steps(inner, lambda step: step % 2 == 0)
  params = {"w": jnp.array([1.0, -2.0])}
  grads = [
    {"w": jnp.array([0.3, 0.1])},
    {"w": jnp.array([5.0, 5.0])},
    {"w": jnp.array([-0.2, 0.4])},
  ]
  s, s_ref = tx.init(params), inner.init(params)
  for step, g in enumerate(grads):
    before = _inner_state(s)
    u, s = tx.update(g, s, params, step=jnp.int32(step))
    if step % 2 == 0:
      u_ref, s_ref = inner.update(g, s_ref, params)
      _close(u, u_ref, rtol=1e-6)
    else:  # no update, and Adam's moments and count exactly as they were
      _close(u, {"w": jnp.zeros(2)}, rtol=0, atol=0)
      _close(_inner_state(s), before, rtol=0, atol=0)
  # (the inner update runs compiled inside lax.cond: float32 rounding may differ from eager)
  _close(_inner_state(s), s_ref, rtol=1e-6)
  assert int(_inner_state(s)[0].count) == 2


def test_on_steps_reads_the_engines_step_and_keeps_no_counter():
  """One clock: the gate reads the ``step`` it is given, whatever the calls so far, and the
  state is the inner optimizer's alone."""
  tx = core.on_steps(optax.sgd(1.0), lambda step: step >= 2)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  assert state == core.OnStepsState(optax.sgd(1.0).init(params))
  ones = {"w": jnp.ones(2)}
  u, state = tx.update(ones, state, params, step=jnp.int32(5))  # the first call, step 5: moves
  _close(u, {"w": -jnp.ones(2)}, rtol=0, atol=0)
  u, state = tx.update(ones, state, params, step=jnp.int32(0))  # the second call, step 0: not
  _close(u, {"w": jnp.zeros(2)}, rtol=0, atol=0)


def test_cdann_class_balance_uses_the_one_hot_width_of_the_batch():
  # labels {0, 1} in a 3-class problem: F.one_hot(all_y) has width 2, not 3
  y = jnp.array([0, 0, 1, 1, 1, 0])
  disc_out = jnp.asarray(np.random.RandomState(0).randn(6, 2), jnp.float32)
  labels = jnp.array([0, 0, 0, 1, 1, 1])
  got = adversarial.dann_disc_loss(disc_out, labels, y, 3, class_balance=True)
  ces = [float(_ce(disc_out[i], labels[i])) for i in range(6)]
  want = sum(c / (3 * 2) for c in ces)  # every class occurs 3 times, width 2
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- MLDG
def _domain_loss(params, x, y):
  """Mean CE over one domain's examples, one example at a time."""
  return sum(_ce(_net(params, x[k])[1], int(y[k])) for k in range(len(y))) / len(y)


@pytest.mark.parametrize("n_meta_test", [1, 2])
def test_mldg_step_matches_the_reference(n_meta_test):
  with X64(True):
    step, hp, params, state, batch = _setup(
      "mldg",
      {"mldg_beta": 0.6, "n_meta_test": n_meta_test, "lr": 1e-2, "weight_decay": 0.01},
      d=3,
      b=4,
    )
    key = jax.random.key(7)
    updates, _, metrics = step.update(params, state, batch, jnp.int32(0), key)
    d, n = 3, n_meta_test
    perm = [int(v) for v in np.asarray(jax.random.permutation(key, d))]
    meta_train, meta_test = perm[: d - n], perm[-n:]
    y = np.asarray(batch["y"])
    acc = jax.tree.map(jnp.zeros_like, params)
    objective = 0.0
    for k, i in enumerate(meta_train):
      j = meta_test[k % n]
      li, gi = jax.value_and_grad(_domain_loss)(params, batch["x"][i], y[i])
      (clone,) = _torch_adam_first_steps([lambda p: gi], params, hp["lr"], hp["weight_decay"])
      lj, gj = jax.value_and_grad(_domain_loss)(clone, batch["x"][j], y[j])
      acc = jax.tree.map(lambda a, u, v: a + (u + hp["mldg_beta"] * v) / d, acc, gi, gj)
      objective += float(li + hp["mldg_beta"] * lj) / d
    (p_ref,) = _torch_adam_first_steps([lambda p: acc], params, hp["lr"], hp["weight_decay"])
    _close(optax_apply(params, updates), p_ref)
    np.testing.assert_allclose(metrics["loss"], objective, rtol=1e-10)
    assert len(meta_train) == 3 - n_meta_test


def test_mldg_without_a_meta_train_domain_gives_a_zero_gradient():
  # DomainBed's default n_meta_test = 2 with two training domains: no pair, and DomainBed's
  # update runs no forward pass (its optimizer steps on zero gradients): no matmul here either
  with X64(True):
    step, hp, params, state, batch = _setup("mldg", {"weight_decay": 0.0}, d=2, b=4)
    updates, _, metrics = step.update(params, state, batch, jnp.int32(0), jax.random.key(0))
    _close(updates, jax.tree.map(jnp.zeros_like, updates), rtol=0, atol=0)
    assert float(metrics["loss"]) == 0.0 and np.all(np.asarray(metrics["env_losses"]) == 0.0)
    method = methods.get_method("mldg")
    ctx = core.Context(model=mlp(NUM_CLASSES, hidden=(5,)), hparams=hp, num_domains=2)
    jaxpr = jax.make_jaxpr(method.build(ctx).update)(
      params, state, batch, jnp.int32(0), jax.random.key(0)
    )
    assert "dot_general" not in str(jaxpr)


# ----------------------------------------------------------------------------- MTL
def _mtl_reference_loss(params, head_e, batch, embeddings_of):
  """DomainBed's MTL loss: SUM over domains of the mean CE of ``Linear(2F, C)`` on
  ``concat(z, e)``; ``embeddings_of(d, zs) -> list of e`` per example."""
  w = jnp.concatenate([params["classifier"]["kernel"], head_e], axis=0)
  d, b = batch["y"].shape
  y = np.asarray(batch["y"])
  total = 0.0
  for i in range(d):
    zs = [_net(params, batch["x"][i, k])[0] for k in range(b)]
    es = embeddings_of(i, zs)
    total = (
      total
      + sum(
        _ce(jnp.concatenate([zs[k], es[k]]) @ w + params["classifier"]["bias"], int(y[i, k]))
        for k in range(b)
      )
      / b
    )
  return total


@pytest.mark.parametrize("mode", ["noise", "mean"])
def test_mtl_step_matches_the_reference(mode):
  with X64(True):
    step, hp, params, state, batch = _setup(
      "mtl", {"mtl_embedding": mode, "mtl_ema": 0.7, "lr": 1e-2, "weight_decay": 0.01}, d=2, b=4
    )
    rng = np.random.RandomState(3)
    stored = jnp.asarray(rng.randn(2, 5))
    state = state._replace(source=state.source._replace(embeddings=stored))
    key = jax.random.key(5)
    updates, state1, metrics = step.update(params, state, batch, jnp.int32(0), key)
    head_e = state.source.embedding_head.params
    noise = np.asarray(jax.random.normal(key, (8, 5), jnp.float64))
    ema = hp["mtl_ema"]

    def embeddings_of(i, zs):
      if mode == "noise":  # DomainBed's .normal_() overwrites the embedding
        return [jnp.asarray(noise[i * 4 + k]) for k in range(4)]
      m = ema * sum(zs) / len(zs) + (1 - ema) * stored[i]
      return [m] * len(zs)

    loss, (g, g_e) = jax.value_and_grad(
      lambda p, h: _mtl_reference_loss(p, h, batch, embeddings_of), argnums=(0, 1)
    )(params, head_e)
    (p_ref,) = _torch_adam_first_steps([lambda p: g], params, hp["lr"], hp["weight_decay"])
    (h_ref,) = _torch_adam_first_steps([lambda p: g_e], head_e, hp["lr"], hp["weight_decay"])
    _close(optax_apply(params, updates), p_ref)
    _close(state1.source.embedding_head.params, h_ref)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-10)
    # the stored embeddings: ema * batch mean + (1 - ema) * old, per domain
    for i in range(2):
      zs = [_net(params, batch["x"][i, k])[0] for k in range(4)]
      np.testing.assert_allclose(
        state1.source.embeddings[i], ema * sum(zs) / 4 + (1 - ema) * stored[i], rtol=1e-10
      )
    if mode == "mean":  # prediction: the batch's own mean feature as the embedding
      x = batch["x"][0]
      zs = [_net(params, x[k])[0] for k in range(4)]
      w = jnp.concatenate([params["classifier"]["kernel"], head_e], axis=0)
      want = jnp.stack(
        [jnp.concatenate([z, sum(zs) / 4]) @ w + params["classifier"]["bias"] for z in zs]
      )
      _close(step.predict(params, state, x), want)


# ----------------------------------------------------------------------------- SagNet
def _randomize_reference(zs, alpha, perm, what, eps=1e-5):
  """DomainBed's ``SagNet.randomize`` on a list of flat feature vectors, example by example."""
  n, f = len(zs), zs[0].shape[0]
  means = [sum(z[k] for k in range(f)) / f for z in zs]
  vars_ = [sum((z[k] - m) ** 2 for k in range(f)) / (f - 1) for z, m in zip(zs, means)]
  normed = [(z - m) / jnp.sqrt(v + eps) for z, m, v in zip(zs, means, vars_)]
  out = []
  for i in range(n):
    if what == "style":
      m = alpha[i] * means[i] + (1 - alpha[i]) * means[perm[i]]
      v = alpha[i] * vars_[i] + (1 - alpha[i]) * vars_[perm[i]]
      out.append(normed[i] * jnp.sqrt(v + eps) + m)
    else:
      out.append(jax.lax.stop_gradient(normed[perm[i]]) * jnp.sqrt(vars_[i] + eps) + means[i])
  return out


def _draws(key, n):
  k_alpha, k_perm = jax.random.split(key)
  return (
    np.asarray(jax.random.uniform(k_alpha, (n, 1), jnp.float64))[:, 0],
    [int(v) for v in np.asarray(jax.random.permutation(k_perm, n))],
  )


def test_sagnet_step_matches_the_reference():
  with X64(True):
    step, hp, params, state, batch = _setup(
      "sagnet", {"sag_w_adv": 0.4, "lr": 1e-2, "weight_decay": 0.01}, d=2, b=3
    )
    key = jax.random.key(11)
    updates, state1, metrics = step.update(params, state, batch, jnp.int32(0), key)
    k_c, k_s, k_adv = jax.random.split(key, 3)
    xs = [batch["x"][i, k] for i in range(2) for k in range(3)]
    ys = [int(v) for v in np.asarray(batch["y"]).reshape(-1)]
    n = len(ys)
    lr, wd = hp["lr"], hp["weight_decay"]
    lin = lambda h, z: z @ h["kernel"] + h["bias"]

    def feats(f):
      return [_net({"featurizer": f, "classifier": params["classifier"]}, x)[0] for x in xs]

    def loss_c(f, c, draws=_draws(k_c, n)):
      zs = _randomize_reference(feats(f), *draws, "style")
      return sum(_ce(lin(c, zs[i]), ys[i]) for i in range(n)) / n

    g_f, g_c = jax.grad(loss_c, argnums=(0, 1))(params["featurizer"], params["classifier"])
    (f1,) = _torch_adam_first_steps([lambda p: g_f], params["featurizer"], lr, wd)
    (c1,) = _torch_adam_first_steps([lambda p: g_c], params["classifier"], lr, wd)

    def loss_s(s, draws=_draws(k_s, n)):
      zs = _randomize_reference(feats(f1), *draws, "content")
      return sum(_ce(lin(s, zs[i]), ys[i]) for i in range(n)) / n

    s0 = state.source.style_head.params
    g_s = jax.grad(loss_s)(s0)
    (s1,) = _torch_adam_first_steps([lambda p: g_s], s0, lr, wd)

    def loss_adv(f, draws=_draws(k_adv, n)):
      zs = _randomize_reference(feats(f), *draws, "content")
      return -hp["sag_w_adv"] * sum(jnp.mean(jax.nn.log_softmax(lin(s1, z))) for z in zs) / n

    # the featurizer's Adam: its second step, on the adversarial gradient at f1
    f2 = _torch_adam_first_steps(
      [lambda p: g_f, lambda p: jax.grad(loss_adv)(p)], params["featurizer"], lr, wd
    )[1]

    new = optax_apply(params, updates)
    _close(new["featurizer"], f2, rtol=1e-9, atol=1e-12)
    _close(new["classifier"], c1, rtol=1e-9, atol=1e-12)
    _close(state1.source.style_head.params, s1)
    np.testing.assert_allclose(
      metrics["loss_c"], loss_c(params["featurizer"], params["classifier"]), rtol=1e-10
    )
    np.testing.assert_allclose(metrics["loss_adv"], loss_adv(f1), rtol=1e-10)


# ----------------------------------------------------------------------------- ARM
class _TinyConv(nn.Module):
  """Conv3x3(2 -> 4) -> ReLU -> global mean: a featurizer that starts with a convolution."""

  @nn.compact
  def __call__(self, x):
    return jnp.mean(nn.relu(Conv(4, name="conv1")(x)), axis=(1, 2))


def _tiny_conv_model():
  return Classifier(featurizer=_TinyConv(name="featurizer"), num_classes=NUM_CLASSES)


def _conv(x, w, b=None, pad=1):
  out = jax.lax.conv_general_dilated(
    x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return out if b is None else out + b


def _context_reference(net, stats, x, train):
  """DomainBed's ContextNet written out; returns ``(context, new running stats)``."""
  new_stats = {}
  h = x
  for i in range(2):
    h = _conv(h, net[f"conv{i}"]["kernel"], net[f"conv{i}"]["bias"], pad=2)
    bn = net[f"bn{i}"]
    if train:
      n = h.shape[0] * h.shape[1] * h.shape[2]
      mean = h.sum(axis=(0, 1, 2)) / n
      var = ((h - mean) ** 2).sum(axis=(0, 1, 2)) / n
      new_stats[f"bn{i}"] = {
        "mean": 0.9 * stats[f"bn{i}"]["mean"] + 0.1 * mean,
        "var": 0.9 * stats[f"bn{i}"]["var"] + 0.1 * var * n / (n - 1),
      }
    else:
      mean, var = stats[f"bn{i}"]["mean"], stats[f"bn{i}"]["var"]
    h = jnp.maximum((h - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"], 0.0)
  return _conv(h, net["conv2"]["kernel"], net["conv2"]["bias"], pad=2), new_stats


# ARM's steps (several, both train_context_net settings) and predictions against DomainBed's
# update: tests/test_arm_trm_domainbed.py, with the helpers above.


def test_arm_refuses_a_featurizer_without_a_first_convolution():
  from dgjax.algorithms import adaptation

  params = mlp(2, hidden=(4,)).init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  with pytest.raises(ValueError, match="must be a convolution"):
    adaptation.first_conv(params)


# ----------------------------------------------------------------------------- Transfer
def _head_loss(f, head, x, y):
  """Mean CE of ``head`` on the featurizer ``f``'s features of one domain, example by example."""
  return _domain_loss({"featurizer": f, "classifier": head}, x, y)


@pytest.mark.parametrize("gda", [False, True])
def test_transfer_step_matches_the_reference(gda):
  with X64(True):
    step, hp, params, state, batch = _setup(
      "transfer",
      {
        "t_lambda": 0.8,
        "delta": 0.05,
        "d_steps_per_g": 2,
        "lr_d": 0.5,
        "lr": 1e-2,
        "weight_decay": 0.01,
        "gda": gda,
      },
      d=3,
      b=3,
    )
    adv0 = jax.tree.map(lambda a: a + 0.01, state.source.adv_head)  # as after earlier steps
    state = state._replace(source=state.source._replace(adv_head=adv0))
    updates, state1, metrics = step.update(params, state, batch, jnp.int32(0), jax.random.key(0))
    y = np.asarray(batch["y"])
    lr, wd, t = hp["lr"], hp["weight_decay"], hp["t_lambda"]

    def gap(f, head):
      losses = jnp.stack([_head_loss(f, head, batch["x"][i], y[i]) for i in range(3)])
      return jnp.max(losses) - jnp.min(losses)

    def ce(f, c):
      return sum(_head_loss(f, c, batch["x"][i], y[i]) for i in range(3)) / 3

    f0, c0 = params["featurizer"], params["classifier"]
    if gda:  # DomainBed's gda branch: the network does not move
      f2, c1 = f0, c0
    else:
      g_f, g_c = jax.grad(ce, argnums=(0, 1))(f0, c0)
      (c1,) = _torch_adam_first_steps([lambda p: g_c], c0, lr, wd)
      f1 = _torch_adam_first_steps([lambda p: g_f], f0, lr, wd)[0]
      f2 = _torch_adam_first_steps(
        [lambda p: g_f, lambda p: jax.grad(lambda f: t * gap(f, adv0))(f1)], f0, lr, wd
      )[1]
    adv = c1
    for _ in range(2):  # SGD ascent on the gap, then projection onto the ball around c1
      g_adv = jax.grad(lambda a: t * gap(f2, a))(adv)
      adv = jax.tree.map(lambda a, g: a + hp["lr_d"] * g, adv, g_adv)
      diff = jax.tree.map(lambda a, c: a - c, adv, c1)
      dist = float(jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(diff))))
      if dist > hp["delta"]:
        adv = jax.tree.map(lambda a, c: c + hp["delta"] / dist * (a - c), adv, c1)
    new = optax_apply(params, updates)
    _close(new["featurizer"], f2, rtol=1e-9, atol=1e-12)
    _close(new["classifier"], c1, rtol=1e-9, atol=1e-12)
    _close(state1.source.adv_head, adv)
    dist = jnp.sqrt(
      sum(jnp.sum((a - c) ** 2) for a, c in zip(jax.tree.leaves(adv), jax.tree.leaves(c1)))
    )
    np.testing.assert_allclose(dist, hp["delta"], rtol=1e-9)  # the projection was active


# ----------------------------------------------------------------------------- all methods
NEW_METHODS = ["dann", "cdann", "mldg", "mtl", "sagnet", "arm", "transfer"]
#: Hparams that vary between the K = 2 runs, and small structural settings.
VARY = {
  "dann": ("lambda", 0.5, 2.0),
  "cdann": ("grad_penalty", 0.0, 0.5),
  "mldg": ("mldg_beta", 0.5, 2.0),
  "mtl": ("mtl_ema", 0.5, 0.99),
  "sagnet": ("sag_w_adv", 0.1, 1.0),
  "arm": ("lr", 1e-3, 1e-2),
  "transfer": ("d_steps_per_g", 1, 3),
}
SMALL = {"dann": {"mlp_width": 8}, "cdann": {"mlp_width": 8}, "mldg": {"n_meta_test": 1}}


@pytest.mark.parametrize("name", NEW_METHODS)
def test_three_jitted_steps_of_two_vmapped_runs_are_finite(name):
  splits = _splits(image=name == "arm")
  hp_name, a, b = VARY[name]
  cfgs = [
    train_lib.TrainConfig(
      method=name,
      test_envs=(2,),
      steps=3,
      checkpoint_freq=100,
      seed=s,
      hparams={"batch_size": 4, hp_name: v, **SMALL.get(name, {})},
      progress=False,
      runs_impl="vmap",  # what these check: the runs vmapped
    )
    for s, v in ((0, a), (1, b))
  ]
  model = _tiny_conv_model() if name == "arm" else mlp(NUM_CLASSES, (5,))
  runs = train_lib.train_many(
    cfgs, train_lib.DomainBedTask(model, splits, splits, cfgs[0].test_envs), checkpoint=False
  )
  assert [r[-1]["hparams"][hp_name] for r in runs] == [a, b]
  for r in runs:
    assert all(np.isfinite(rec["loss"]) for rec in r)
    assert 0.0 <= r[-1]["env0_in_acc"] <= 1.0
  assert runs[0][-1]["loss"] != runs[1][-1]["loss"]
