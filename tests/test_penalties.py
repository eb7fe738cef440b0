"""Each penalty and statistic of dgjax.penalties / dgjax.baselines against a direct reference:
explicit Python loops over domains, pairs, examples and entries, in float64 numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgjax import core, methods, penalties
from dgjax.algorithms import gradient_combination, invariance, mixing
from dgjax.models import mlp

RNG = np.random.default_rng(0)


def softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


# ------------------------------------------------------------------------------ IRM
def irm_reference(logits, y):
  """d/dw mean CE(w * logits) at w = 1 by hand, on each half, multiplied."""

  def dscale(lg, yy):
    total = 0.0
    for l, t in zip(lg, yy):
      if len(l) == 1:  # logistic: d/dw BCE(w l) = (sigmoid(l) - y) l
        total += (sigmoid(l[0]) - t) * l[0]
      else:  # softmax: d/dw CE(w l) = sum_c p_c l_c - l_y
        total += softmax(l) @ l - l[t]
      continue
    return total / len(lg)

  return dscale(logits[0::2], y[0::2]) * dscale(logits[1::2], y[1::2])


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_irm_penalty_is_the_product_of_half_batch_scale_gradients(classes):
  logits = RNG.normal(size=(11, classes)) * 2
  y = RNG.integers(0, max(classes, 2), 11)
  got = penalties.irm_penalty(jnp.asarray(logits, jnp.float32), jnp.asarray(y))
  np.testing.assert_allclose(got, irm_reference(logits, y), rtol=1e-4, atol=1e-7)


def test_irm_terms_average_the_per_domain_penalties():
  model = mlp(3, (8,))
  x = RNG.normal(size=(3, 6, 4)).astype(np.float32)
  y = RNG.integers(0, 3, (3, 6))
  params = model.init(jax.random.key(0), x[0])["params"]
  ctx = methods.Context(model, methods.default_hparams("irm"), 3)
  t = jax.jit(lambda p, bt: invariance.irm_terms(ctx, p, bt, None, ()))(params, {"x": x, "y": y})
  logits = [np.asarray(model.apply({"params": params}, x[d]), np.float64) for d in range(3)]
  np.testing.assert_allclose(
    t.penalty, np.mean([irm_reference(logits[d], y[d]) for d in range(3)]), rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(
    t.env_losses, [methods.cross_entropy(jnp.asarray(logits[d]), y[d]) for d in range(3)], rtol=1e-5
  )


# ------------------------------------------------------------------------------ V-REx
def test_vrex_penalty_is_the_variance_of_the_risks():
  losses = RNG.uniform(0, 2, 5)
  mean = sum(losses) / 5
  ref = sum((l - mean) ** 2 for l in losses) / 5
  np.testing.assert_allclose(penalties.vrex_penalty(jnp.asarray(losses)), ref, rtol=1e-5)


# ------------------------------------------------------------------------------ CORAL / MMD
def coral_reference(x, y):
  n, f = x.shape
  mx = [sum(x[i, a] for i in range(n)) / n for a in range(f)]
  my = [sum(y[i, a] for i in range(n)) / n for a in range(f)]
  mean_diff = sum((mx[a] - my[a]) ** 2 for a in range(f)) / f
  cov_diff = 0.0
  for a, b in itertools.product(range(f), range(f)):
    cx = sum((x[i, a] - mx[a]) * (x[i, b] - mx[b]) for i in range(n)) / (n - 1)
    cy = sum((y[i, a] - my[a]) * (y[i, b] - my[b]) for i in range(n)) / (n - 1)
    cov_diff += (cx - cy) ** 2
  return mean_diff + cov_diff / f**2


def mmd_reference(x, y, gammas=penalties.MMD_GAMMAS):
  def k(a, b):
    return sum(np.exp(-g * np.sum((a - b) ** 2)) for g in gammas)

  def mean_k(a, b):
    return np.mean([k(ai, bj) for ai in a for bj in b])

  return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def pairs_reference(distance, features):
  d = len(features)
  return np.mean([distance(features[i], features[j]) for i in range(d) for j in range(i + 1, d)])


def test_coral_penalty_matches_explicit_means_and_covariances():
  feats = RNG.normal(size=(3, 7, 4)) + np.arange(3)[:, None, None]
  got = penalties.coral_penalty(jnp.asarray(feats, jnp.float32))
  np.testing.assert_allclose(got, pairs_reference(coral_reference, feats), rtol=1e-4)


def test_mmd_penalty_matches_explicit_kernel_sums():
  feats = RNG.normal(size=(3, 5, 2)) * 0.5 + np.arange(3)[:, None, None] * 0.3
  got = penalties.mmd_penalty(jnp.asarray(feats, jnp.float32))
  np.testing.assert_allclose(got, pairs_reference(mmd_reference, feats), rtol=1e-3, atol=1e-5)
  assert float(
    penalties.mmd_penalty(jnp.asarray(np.repeat(feats[:1], 3, 0), jnp.float32))
  ) == pytest.approx(0, abs=1e-4)
  assert (
    float(penalties.mmd_penalty(jnp.asarray(feats[:1], jnp.float32))) == 0.0
  )  # one domain: no pairs


def test_feature_alignment_penalties_are_differentiable_without_nan():
  feats = jnp.asarray(RNG.normal(size=(2, 4, 3)), jnp.float32)
  feats = feats.at[1].set(feats[0])  # identical points: zero distances (the clamp)
  for fn in (penalties.mmd_penalty, penalties.coral_penalty):
    g = jax.jit(jax.grad(fn))(feats)
    assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------ IGA
def test_iga_penalty_matches_a_loop_over_domains_and_entries():
  model = mlp(2, (5,))
  x = RNG.normal(size=(3, 4, 3)).astype(np.float32)
  y = RNG.integers(0, 2, (3, 4))
  params = model.init(jax.random.key(1), x[0])["params"]
  ctx = methods.Context(model, methods.default_hparams("iga"), 3)
  grads = []
  grad = jax.jit(jax.grad(ctx.loss))
  for d in range(3):  # explicit per-domain gradients, flattened
    g = grad(params, {"x": x[d], "y": y[d]})
    grads.append(np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)]).astype(np.float64))
  mean = [sum(grads[d][k] for d in range(3)) / 3 for k in range(len(grads[0]))]
  ref = sum((grads[d][k] - mean[k]) ** 2 for d in range(3) for k in range(len(mean)))
  _, g = jax.vmap(jax.value_and_grad(ctx.loss), in_axes=(None, 0))(params, {"x": x, "y": y})
  np.testing.assert_allclose(penalties.gradient_variance_penalty(g), ref, rtol=1e-4)
  # The method's gradient (per-domain gradients + HVPs, no reverse pass through gradients)
  # equals DomainBed's: grad of mean loss + w * penalty with the mean gradient detached,
  # differentiated through the per-domain gradients (create_graph=True).
  w = 7.0

  def domainbed_objective(p):
    losses, g = jax.vmap(jax.value_and_grad(ctx.loss), in_axes=(None, 0))(p, {"x": x, "y": y})
    pen = sum(jnp.sum((v - jax.lax.stop_gradient(v.mean(0))) ** 2) for v in jax.tree.leaves(g))
    return jnp.mean(losses) + w * pen

  for impl in ("vmap", "unrolled"):
    c = methods.Context(
      model, {**methods.default_hparams("iga"), "penalty": w}, 3, per_domain_impl=impl
    )
    g_ours, terms = jax.jit(
      lambda p: invariance.iga_gradients("penalty").grads(c, p, (), {"x": x, "y": y}, 0, None)
    )(params)
    np.testing.assert_allclose(terms.penalty, ref, rtol=1e-4)
    for a, b in zip(
      jax.tree.leaves(g_ours), jax.tree.leaves(jax.jit(jax.grad(domainbed_objective))(params))
    ):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ Fishr
@pytest.mark.parametrize("classes", [1, 3])
def test_fishr_statistics_match_an_explicit_loop_over_examples(classes):
  d, b = 3, 5
  model = mlp(classes, (4,))
  x = RNG.normal(size=(d, b, 3)).astype(np.float32)
  y = RNG.integers(0, max(classes, 2), (d, b))
  params = model.init(jax.random.key(2), x[0])["params"]
  ctx = methods.Context(model, methods.default_hparams("fishr"), d)
  env_losses, variances = jax.jit(lambda p, bt: invariance.head_gradient_variances(ctx, p, bt))(
    params, {"x": x, "y": y}
  )

  head = params["classifier"]
  ref_var = []
  for dom in range(d):
    z = np.asarray(model.apply({"params": params}, x[dom], method="features"), np.float64)
    per_example = []
    for i in range(b):  # the head's gradient by hand, one example at a time
      logit = z[i] @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
      if classes == 1:
        err = np.array([sigmoid(logit[0]) - y[dom, i]])
      else:
        err = softmax(logit) - np.eye(classes)[y[dom, i]]
      per_example.append({"kernel": np.outer(z[i], err), "bias": err})
    ref_var.append(
      {
        k: np.mean([(e[k] - np.mean([f[k] for f in per_example], 0)) ** 2 for e in per_example], 0)
        for k in ("kernel", "bias")
      }
    )
  for k in ("kernel", "bias"):
    np.testing.assert_allclose(
      variances[k], np.stack([r[k] for r in ref_var]), rtol=1e-4, atol=1e-7
    )

  # penalty: mean over domains of the mean squared distance to the domain-mean variance
  flat = [
    np.concatenate([ref_var[dom]["bias"].ravel(), ref_var[dom]["kernel"].ravel()])
    for dom in range(d)
  ]
  mean = np.mean(flat, 0)
  ref = np.mean([np.mean((flat[dom] - mean) ** 2) for dom in range(d)])
  np.testing.assert_allclose(penalties.fishr_penalty(variances), ref, rtol=1e-4, atol=1e-12)
  np.testing.assert_allclose(
    env_losses, [ctx.loss(params, {"x": x[i], "y": y[i]}) for i in range(d)], rtol=1e-5
  )


def test_per_example_grads_match_a_loop():
  w = jnp.asarray(RNG.normal(size=(3,)), jnp.float32)
  xs = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  loss = lambda w, x: jnp.sin(w @ x) ** 2
  got = penalties.per_example_grads(loss, w, xs)
  for i in range(4):
    np.testing.assert_allclose(got[i], jax.grad(loss)(w, xs[i]), rtol=1e-6)


def test_moving_average_follows_domainbed_and_passes_gradient_one():
  ema = 0.9
  tx = invariance.moving_average(ema)
  values = [RNG.normal(size=(2, 3)).astype(np.float32) for _ in range(4)]
  state = tx.init(jnp.zeros((2, 3)))
  prev = np.zeros((2, 3))
  for v in values:
    out, state = tx.update(jnp.asarray(v), state)
    cur = ema * prev + (1 - ema) * v
    np.testing.assert_allclose(out, cur / (1 - ema), rtol=1e-5)
    np.testing.assert_allclose(state.average, cur, rtol=1e-5)
    prev = cur
  # d out / d v = 1 with the correction: the penalty's scale does not depend on ema
  g = jax.grad(lambda v: jnp.sum(tx.update(v, state)[0]))(jnp.ones((2, 3)))
  np.testing.assert_allclose(g, np.ones((2, 3)), rtol=1e-6)


def test_fishr_ema_state_is_carried_in_the_method_state():
  model = mlp(2, (4,))
  x = RNG.normal(size=(2, 6, 3)).astype(np.float32)
  y = RNG.integers(0, 2, (2, 6))
  params = model.init(jax.random.key(3), x[0])["params"]
  hp = methods.resolve_hparams("fishr", 0, {"ema": 0.5, "penalty_anneal_iters": 0})
  ctx = methods.Context(model, hp, 2)
  ms = methods.get_method("fishr").build(ctx)
  state = ms.init(params, jax.random.key(0))
  batch = {"x": x, "y": y}
  update = jax.jit(ms.update)
  _, state1, m1 = update(params, state, batch, jnp.int32(0), jax.random.key(0))
  _, v = jax.jit(lambda p, bt: invariance.head_gradient_variances(ctx, p, bt))(params, batch)
  np.testing.assert_allclose(state1.source.average["bias"], 0.5 * v["bias"], rtol=1e-5)
  np.testing.assert_allclose(m1["penalty"], penalties.fishr_penalty(v), rtol=1e-5)
  _, state2, m2 = update(params, state1, batch, jnp.int32(1), jax.random.key(0))
  np.testing.assert_allclose(state2.source.average["bias"], 0.75 * v["bias"], rtol=1e-5)
  # same statistic twice: the EMA corrected by 1/(1 - ema) is 1.5 v, so the penalty is 2.25x
  np.testing.assert_allclose(m2["penalty"], 2.25 * penalties.fishr_penalty(v), rtol=1e-4)


# ------------------------------------------------------------------------------ GroupDRO
def test_group_dro_weights_follow_exponentiated_gradient():
  eta, d = 0.5, 3
  tx = gradient_combination.group_dro(eta, d)
  grads = {"w": jnp.asarray(RNG.normal(size=(d, 4)), jnp.float32)}
  state = tx.init(None)
  q = np.ones(d)  # DomainBed starts at ones, normalises after
  for _ in range(3):
    losses = RNG.uniform(0, 2, d)
    out, state = tx.update(grads, state, losses=jnp.asarray(losses, jnp.float32))
    for m in range(d):
      q[m] *= np.exp(eta * losses[m])
    q /= q.sum()
    np.testing.assert_allclose(state.q, q, rtol=1e-5)
    ref = sum(q[m] * np.asarray(grads["w"][m]) for m in range(d))
    np.testing.assert_allclose(out["w"], ref, rtol=1e-5, atol=1e-6)


def test_group_dro_chains_with_adam():
  tx = optax.chain(gradient_combination.group_dro(0.1, 2), optax.adam(1e-3))
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)
  upd, state = tx.update({"w": jnp.ones((2, 3))}, state, params, losses=jnp.array([1.0, 2.0]))
  assert upd["w"].shape == (3,) and float(state[0].q[1]) > float(state[0].q[0])


# ------------------------------------------------------------------------------ Mixup
def test_mixup_objective_matches_explicit_pairs():
  d, b = 3, 4
  model = mlp(2, (6,))
  x = RNG.normal(size=(d, b, 5)).astype(np.float32)
  y = RNG.integers(0, 2, (d, b))
  params = model.init(jax.random.key(4), x[0])["params"]
  ctx = methods.Context(model, methods.resolve_hparams("mixup", 0, {"mixup_alpha": 1.0}), d)
  key = jax.random.key(7)
  t = jax.jit(lambda p, bt, k: mixing.mixup_terms(ctx, p, bt, k, ()))(params, {"x": x, "y": y}, key)
  value, env_losses = jnp.mean(t.env_losses), t.env_losses
  k_perm, k_lam = jax.random.split(key)  # the same draws, as documented
  perm = np.asarray(jax.random.permutation(k_perm, d))
  lam = np.asarray(jax.random.beta(k_lam, 1.0, 1.0, (d,), jnp.float32))
  total, per = 0.0, {}
  for i in range(d):
    a, c = perm[i], perm[(i + 1) % d]  # DomainBed's random_pairs_of_minibatches
    xm = lam[i] * x[a] + (1 - lam[i]) * x[c]
    logits = model.apply({"params": params}, xm)
    li = lam[i] * methods.cross_entropy(logits, y[a]) + (1 - lam[i]) * methods.cross_entropy(
      logits, y[c]
    )
    total += li
    per[a] = li
  np.testing.assert_allclose(value, total / d, rtol=1e-5)
  np.testing.assert_allclose(env_losses, [per[i] for i in range(d)], rtol=1e-5)


def test_beta_draws_stay_finite_for_small_alpha():
  lam = jax.random.beta(jax.random.key(0), 0.1, 0.1, (20000,), jnp.float32)
  assert np.all(np.isfinite(lam)) and float(lam.min()) >= 0 and float(lam.max()) <= 1


# ------------------------------------------------------------------------------ Fish
def test_fish_matches_a_python_loop_of_inner_adam_steps():
  d, b = 3, 4
  model = mlp(2, (6,))
  x = RNG.normal(size=(d, b, 5)).astype(np.float32)
  y = RNG.integers(0, 2, (d, b))
  params = model.init(jax.random.key(5), x[0])["params"]
  hp = methods.resolve_hparams("fish", 0, {"meta_lr": 0.1, "lr": 1e-2})
  ctx = methods.Context(model, hp, d)
  ms = methods.get_method("fish").build(ctx)
  state = ms.init(params, jax.random.key(0))
  inner_tx = core.domainbed_adam()(ctx)
  ref_inner = inner_tx.init(params)
  ref_params = params
  update, vg = jax.jit(ms.update), jax.jit(jax.value_and_grad(ctx.loss))
  inner_update = jax.jit(inner_tx.update)
  for step in range(2):  # two outer steps: the inner Adam state carries over
    updates, state, metrics = update(params, state, {"x": x, "y": y}, jnp.int32(step), None)
    clone, losses = ref_params, []
    for dom in range(d):
      loss, g = vg(clone, {"x": x[dom], "y": y[dom]})
      u, ref_inner = inner_update(g, ref_inner, clone)
      clone = optax.apply_updates(clone, u)
      losses.append(loss)
    ref_params = jax.tree.map(lambda p, c: p + 0.1 * (c - p), ref_params, clone)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(metrics["env_losses"], losses, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ SD
def test_spectral_decoupling_step_matches_an_explicit_reference():
  """DomainBed's SD: CE of the concatenated minibatch + sd_reg * mean squared logit, one Adam
  step; the reference loops over examples and classes."""
  d, b, classes, sd_reg = 3, 4, 3, 0.37
  model = mlp(classes, (5,))
  x = RNG.normal(size=(d, b, 6)).astype(np.float32)
  y = RNG.integers(0, classes, (d, b))
  params = model.init(jax.random.key(6), x[0])["params"]
  hp = methods.resolve_hparams("sd", 0, {"sd_reg": sd_reg, "lr": 1e-2})
  ms = methods.get_method("sd").build(methods.Context(model, hp, d))
  updates, _, metrics = jax.jit(ms.update)(
    params, ms.init(params, jax.random.key(0)), {"x": x, "y": y}, 0, None
  )

  def reference(p):
    total, squares, n = 0.0, 0.0, 0
    for i in range(d):
      for j in range(b):
        logits = model.apply({"params": p}, x[i, j][None])[0]
        total = total - jax.nn.log_softmax(logits)[y[i, j]]
        squares = squares + sum(logits[c] ** 2 for c in range(classes))
        n += 1
    return total / n + sd_reg * squares / (n * classes)

  g = jax.grad(reference)(params)
  want = optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8).update(
    g, optax.adam(1e-2).init(params), params
  )[0]
  for a, c in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-7)
  assert float(metrics["penalty_weight"]) == pytest.approx(sd_reg)
  logits = np.asarray(model.apply({"params": params}, x.reshape(d * b, -1)))
  np.testing.assert_allclose(metrics["penalty"], np.mean(logits**2), rtol=1e-5)
