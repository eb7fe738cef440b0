"""Hessian alignment (dgjax.hessian): HVPs, penalties, gradients, transforms, diagnostic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dgjax import hessian
from dgjax import methods

try:  # jax >= 0.8 moved the context manager to the top level
  from jax import enable_x64
except ImportError:  # pragma: no cover
  from jax.experimental import enable_x64


def tiny_problem(key, e=2, n=7, d_in=4, k=3, c=2, dtype=jnp.float64):
  """A 1-hidden-layer tanh MLP: params {"featurizer": W1, b1, "classifier": kernel, bias}."""
  ks = jax.random.split(key, 6)
  params = {
    "featurizer": {
      "w": jax.random.normal(ks[0], (d_in, k), dtype),
      "b": 0.1 * jax.random.normal(ks[1], (k,), dtype),
    },
    "classifier": {
      "kernel": jax.random.normal(ks[2], (k, c), dtype),
      "bias": 0.1 * jax.random.normal(ks[3], (c,), dtype),
    },
  }
  x = jax.random.normal(ks[4], (e, n, d_in), dtype)
  y = jax.random.randint(ks[5], (e, n), 0, max(c, 2))
  return params, x, y


def features(params, x):
  return jnp.tanh(x @ params["featurizer"]["w"] + params["featurizer"]["b"])


def head_logits(head, z):
  return z @ head["kernel"] + head["bias"]


def obj_fn(head, d):
  return methods.cross_entropy(head_logits(head, d["z"]), d["y"])


def inputs_of(params, x, y):
  return {"z": features(params, x), "y": y}


def dense_hessian(f, w):
  flat, unravel = ravel_pytree(w)
  return jax.hessian(lambda v: f(unravel(v)))(flat)


def test_hvp_matches_full_hessian():
  with enable_x64():
    params, x, y = tiny_problem(jax.random.key(0))
    f = lambda p: methods.cross_entropy(head_logits(p["classifier"], features(p, x[0])), y[0])
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape, a.dtype), params)
    got = ravel_pytree(hessian.hvp(f, params, v))[0]
    want = dense_hessian(f, params) @ ravel_pytree(v)[0]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def explicit_hgp(params, x, y, alpha, beta, detach):
  """HGP from materialised Hessians (tests only)."""
  inp = inputs_of(params, x, y)
  head = params["classifier"]
  flat, unravel = ravel_pytree(head)
  e = x.shape[0]
  fs = [lambda v, i=i: obj_fn(unravel(v), jax.tree.map(lambda a: a[i], inp)) for i in range(e)]
  gs = [jax.grad(f)(flat) for f in fs]
  hs = [jax.hessian(f)(flat) for f in fs]
  g, h = sum(gs) / e, sum(hs) / e
  hg = h @ g
  if detach:
    g, hg = jax.lax.stop_gradient((g, hg))
  return (
    sum(
      alpha * jnp.sum((hs[i] @ gs[i] - hg) ** 2) + beta * jnp.sum((gs[i] - g) ** 2)
      for i in range(e)
    )
    / e
  )


@pytest.mark.parametrize("detach", [True, False])
def test_hgp_penalty_and_gradient_match_explicit_hessians(detach):
  with enable_x64():
    params, x, y = tiny_problem(jax.random.key(2), e=3)
    alpha, beta = 2.0, 0.5

    def ours(p):
      return hessian.hgp_penalty(obj_fn, p["classifier"], inputs_of(p, x, y), alpha, beta, detach)

    want_v, want_g = jax.value_and_grad(lambda p: explicit_hgp(p, x, y, alpha, beta, detach))(
      params
    )
    got_v, got_g = jax.value_and_grad(ours)(params)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-10)
    # the gradient reaches the featurizer (third-order terms), and matches
    assert float(jnp.abs(got_g["featurizer"]["w"]).max()) > 0
    np.testing.assert_allclose(
      ravel_pytree(got_g)[0], ravel_pytree(want_g)[0], rtol=1e-8, atol=1e-12
    )


def test_hutchinson_converges_to_the_diagonal():
  with enable_x64():
    params, x, y = tiny_problem(jax.random.key(3), c=3, k=5)
    d = {"z": features(params, x[0]), "y": y[0]}
    f = lambda h: obj_fn(h, d)
    h = dense_hessian(f, params["classifier"])
    diag = np.diag(h)
    var = np.sum(h**2, axis=1) - diag**2  # per-probe variance of entry i
    errs = []
    for s in (10, 100, 3000):
      est = ravel_pytree(
        hessian.hutchinson_diagonal(f, params["classifier"], jax.random.key(s), s)
      )[0]
      err = np.abs(np.asarray(est) - diag)
      assert np.all(err <= 6 * np.sqrt(var / s) + 1e-12), (s, err, np.sqrt(var / s))
      errs.append(np.sqrt(np.mean(err**2)))
    assert errs[-1] < errs[0]
    assert errs[-1] <= 3 * np.sqrt(np.mean(var) / 3000)


@pytest.mark.parametrize("c", [1, 3])
def test_cma_closed_forms_match_autodiff(c):
  with enable_x64():
    params, x, y = tiny_problem(jax.random.key(5), c=c)
    y = y % 2 if c == 1 else y % c
    z = features(params, x[0])
    head = params["classifier"]
    grad, hdiag = hessian.linear_head_moments(head, z, y[0])
    f = lambda h: obj_fn(h, {"z": z, "y": y[0]})
    np.testing.assert_allclose(
      ravel_pytree(grad)[0], ravel_pytree(jax.grad(f)(head))[0], rtol=1e-10, atol=1e-14
    )
    np.testing.assert_allclose(
      ravel_pytree(hdiag)[0], np.diag(dense_hessian(f, head)), rtol=1e-10, atol=1e-14
    )


def test_hessian_difference_norm_matches_dense():
  with enable_x64():
    params, x, y = tiny_problem(jax.random.key(6), e=3)
    inp = inputs_of(params, x, y)
    head = params["classifier"]
    hs = [
      dense_hessian(lambda h: obj_fn(h, jax.tree.map(lambda a: a[i], inp)), head) for i in range(3)
    ]
    want = max(np.linalg.norm(hs[i] - hs[j], 2) for i in range(3) for j in range(i + 1, 3))
    got = hessian.hessian_difference_norm(obj_fn, head, inp, jax.random.key(0), num_iters=200)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_transforms_in_a_jitted_chain():
  params, x, y = tiny_problem(jax.random.key(7), dtype=jnp.float32)
  head_inputs = lambda p: inputs_of(p, x, y)
  loss = lambda p: jnp.mean(
    jax.vmap(lambda xx, yy: obj_fn(p["classifier"], {"z": features(p, xx), "y": yy}))(x, y)
  )
  w = 3.0
  cases = {
    "hgp": (
      hessian.hessian_gradient_product(alpha=2.0, beta=0.5, weight=w),
      lambda p: hessian.hgp_penalty(obj_fn, p["classifier"], head_inputs(p), 2.0, 0.5),
    ),
    "cma": (
      hessian.moment_alignment(alpha=2.0, beta=0.5, weight=w),
      lambda p: hessian.cma_penalty(p["classifier"], head_inputs(p), 2.0, 0.5),
    ),
  }
  for name, (tx, penalty) in cases.items():
    chain = optax.chain(tx, optax.sgd(0.1))
    state = chain.init(params)
    step = jax.jit(lambda g, s, p: chain.update(g, s, p, obj_fn=obj_fn, head_inputs=head_inputs))
    g = jax.grad(loss)(params)
    updates, state = step(g, state, params)
    want = jax.tree.map(lambda a, b: -0.1 * (a + w * b), g, jax.grad(penalty)(params))
    np.testing.assert_allclose(
      ravel_pytree(updates)[0], ravel_pytree(want)[0], rtol=2e-5, atol=1e-7
    )
    assert int(state[0].count) == 1 and np.isfinite(float(state[0].penalty)), name
    np.testing.assert_allclose(state[0].penalty, penalty(params), rtol=1e-5)
  # Hutchinson: keys advance in the state; a weight schedule is read from the count.
  tx = optax.chain(
    hessian.hutchinson(num_samples=8, weight=lambda c: jnp.where(c >= 1, 10.0, 0.0), random_seed=1),
    optax.sgd(0.1),
  )
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, obj_fn=obj_fn, head_inputs=head_inputs))
  zeros = jax.tree.map(jnp.zeros_like, params)
  u0, state = step(zeros, state, params)
  assert float(jnp.abs(ravel_pytree(u0)[0]).max()) == 0.0  # weight 0 at count 0
  p0 = state[0].penalty
  u1, state = step(zeros, state, params)
  assert float(jnp.abs(ravel_pytree(u1)[0]).max()) > 0.0
  assert float(state[0].penalty) != float(p0)  # fresh probes
  with pytest.raises(ValueError, match="head_inputs"):
    tx.update(zeros, tx.init(params), params, obj_fn=obj_fn)


def test_a_weight_schedule_reads_the_callers_step_when_given():
  """One clock: a schedule reads the ``step`` extra argument when the caller passes it (a train
  loop's step, e.g. the engine's), the transform's own call count otherwise (standalone)."""
  params, x, y = tiny_problem(jax.random.key(8), dtype=jnp.float32)
  head_inputs = lambda p: inputs_of(p, x, y)
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = hessian.moment_alignment(weight=lambda s: 2.0 * s)
  fixed = hessian.moment_alignment(weight=6.0)
  want, _ = fixed.update(zeros, fixed.init(params), params, head_inputs=head_inputs)
  # a fresh state (count 0) at the caller's step 3: weight 2 * 3
  got, s = tx.update(zeros, tx.init(params), params, head_inputs=head_inputs, step=jnp.int32(3))
  assert float(s.weight) == 6.0 and int(s.count) == 1
  np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(want)[0], rtol=1e-6)
  # no step: the calls so far (0, then 1), through optax.chain's forwarding as well
  chain = optax.chain(tx, optax.sgd(1.0))
  u0, state = chain.update(zeros, chain.init(params), params, head_inputs=head_inputs)
  _, state = chain.update(zeros, state, params, head_inputs=head_inputs)
  assert float(jnp.abs(ravel_pytree(u0)[0]).max()) == 0.0 and float(state[0].weight) == 2.0
  _, state = chain.update(zeros, state, params, head_inputs=head_inputs, step=jnp.int32(7))
  assert float(state[0].weight) == 14.0


def test_registered_methods_step_under_jit():
  from dgjax import models, train as T

  rng = np.random.default_rng(0)
  data = T.make_train_data(
    [
      (rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 2, 40).astype(np.int32))
      for _ in range(2)
    ]
  )
  # (hutchinson and cma train in tests/test_irm_cmnist.py)
  for name in ("hgp",):
    hp = methods.resolve_hparams(name, 0, {"penalty_anneal_iters": 1, "log_hessian_gap": 1})
    model = models.mlp(2, hidden=(8,))
    ms = methods.get_method(name).build(methods.Context(model, hp, 2))
    params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
    state = T.init_state(ms, params, 1)
    step = T.make_train_step(ms, 8)
    for _ in range(3):
      state, m = step(state, data)
    for k in ("loss", "penalty", "hessian_term", "gradient_term", "penalty_weight", "objective"):
      assert np.isfinite(float(m[k])), (name, k)
    assert float(m["penalty_weight"]) == hp["penalty_weight"]
    gap = jax.jit(ms.diagnostics)(
      state.params, state.opt_state, T.sample_batch(jax.random.key(2), data, 8), jax.random.key(3)
    )
    assert np.isfinite(float(gap["hessian_gap"])) and float(gap["hessian_gap"]) >= 0


def test_hutchinson_method_draws_probes_from_the_step_key():
  """The registered method seeds the probes from the train loop's per-step key, so runs (and
  vmapped restarts) with different seeds do not share one probe sequence; same key, same step."""
  from dgjax import models
  from dgjax.algorithms import hessian_alignment
  from dgjax.core import domain_features_and_logits

  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(2, 16, 6)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 2, (2, 16)), jnp.int32),
  }
  hp = methods.resolve_hparams(
    "hutchinson",
    0,
    {"hutchinson_samples": 1, "penalty_anneal_iters": 0, "independent_probes": False},
  )
  model = models.mlp(2, hidden=(8,))
  ctx = methods.Context(model, hp, 2)
  ms = methods.get_method("hutchinson").build(ctx)
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  update = jax.jit(ms.update)
  state0 = ms.init(params, jax.random.key(2))
  _, _, m_a = update(params, state0, batch, 0, jax.random.key(11))
  _, _, m_b = update(params, state0, batch, 0, jax.random.key(11))
  _, _, m_c = update(params, state0, batch, 0, jax.random.key(12))
  assert float(m_a["hessian_term"]) == float(m_b["hessian_term"])
  assert float(m_a["hessian_term"]) != float(m_c["hessian_term"])
  # ... and equals the transform seeded with that key, applied by hand.
  z, _ = domain_features_and_logits(ctx, params, batch["x"])
  inputs = {"z": z, "y": batch["y"]}
  _, probe_key = jax.random.split(jax.random.key(11))
  want = hessian.hutchinson_terms(
    hessian_alignment.head_objective(ctx), params["classifier"], inputs, probe_key, 1, True
  )
  np.testing.assert_allclose(m_a["hessian_term"], want.hessian, rtol=1e-5)


@pytest.mark.parametrize("name", ["hgp", "hutchinson", "cma"])
def test_alignment_methods_run_the_featurizer_once_per_step(name):
  """One forward (and so one backward) pass through the featurizer per step: the loss and the
  penalty share it. Counted while tracing: every featurizer application goes through the
  model's ``featurizer`` submodule. The forward is per domain (the fork's loop over the
  minibatches), one ``vmap``-ed call: traced once with one domain's shape."""
  from dgjax import models

  calls = []

  class CountingMLP(models.MLP):
    def __call__(self, x):
      calls.append(x.shape)
      return super().__call__(x)

  model = models.Classifier(featurizer=CountingMLP(hidden=(8,), name="featurizer"), num_classes=2)
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(3, 16, 6)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 2, (3, 16)), jnp.int32),
  }
  hp = methods.resolve_hparams(name, 0, {"hutchinson_samples": 2} if name == "hutchinson" else {})
  ms = methods.get_method(name).build(methods.Context(model, hp, 3))
  params = model.init(jax.random.key(0), jnp.zeros((1, 6)))["params"]
  state = ms.init(params, jax.random.key(2))
  calls.clear()
  jax.jit(ms.update).lower(params, state, batch, 0, jax.random.key(1))
  assert calls == [(16, 6)], calls  # one domain's batch, vmapped over the 3 domains, once
