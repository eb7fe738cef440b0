"""AND-mask and SAND-mask against slow references written with explicit loops."""

import itertools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgjax

SHAPES = [(), (3,), (2, 3), (4, 1, 2)]
DOMAINS = [1, 2, 3, 5]


# ----------------------------------------------------------------------------- references
def ref_and_leaf(g, tau):
  """DomainBed ANDMask.mask_grads for one parameter, element by element."""
  g = np.asarray(g, np.float64)
  d = g.shape[0]
  mask = np.zeros(g.shape[1:])
  mean = np.zeros(g.shape[1:])
  for idx in itertools.product(*[range(s) for s in g.shape[1:]]):
    signs = [np.sign(g[(i,) + idx]) for i in range(d)]
    mask[idx] = float(abs(sum(signs) / d) >= tau)
    mean[idx] = sum(g[(i,) + idx] for i in range(d)) / d
  return mean * mask / (1e-10 + mask.sum() / mask.size)


def ref_sand_leaf(g, tau, k):
  """DomainBed SANDMask.mask_grads for one parameter, element by element, including its
  NaN patching (NaN variance -> 1e-17, NaN mask -> 1e-17)."""
  g = np.asarray(g, np.float64)
  d = g.shape[0]
  mask = np.zeros(g.shape[1:])
  mean = np.zeros(g.shape[1:])
  for idx in itertools.product(*[range(s) for s in g.shape[1:]]):
    vals = [g[(i,) + idx] for i in range(d)]
    m = sum(vals) / d
    var = sum((v - m) ** 2 for v in vals) / (d - 1) if d > 1 else float("nan")
    if np.isnan(var):
      var = 1e-17
    agreement = abs(sum(np.sign(v) for v in vals) / d)
    with np.errstate(divide="ignore", invalid="ignore"):
      lam = np.float64(1.0) / np.float64(var)
      value = np.tanh(k * lam * (agreement - tau))
    value = max(value, 0.0) if not np.isnan(value) else 1e-17
    mask[idx] = value
    mean[idx] = m
  return mean * mask / (1e-10 + mask.sum() / mask.size)


def random_grads(key, d, shapes, case):
  out = {}
  for j, shape in enumerate(shapes):
    k1, k2, key = jax.random.split(jax.random.fold_in(key, j), 3)
    base = jax.random.normal(k1, (d,) + shape)
    if case == "random":
      g = base
    elif case == "all_agree":  # same sign in every domain, different magnitudes
      g = jnp.abs(base) * jnp.sign(jax.random.normal(k2, shape))[None]
    elif case == "all_disagree":  # alternating signs across domains
      alt = jnp.where(jnp.arange(d) % 2 == 0, 1.0, -1.0).reshape((d,) + (1,) * len(shape))
      g = jnp.abs(base) * alt
    elif case == "zero_variance":  # every domain the same gradient (some entries zero)
      g = jnp.broadcast_to(base[:1] * (jnp.abs(base[:1]) > 0.3), (d,) + shape)
    else:
      raise ValueError(case)
    out[f"p{j}"] = g
  return out


CASES = ["random", "all_agree", "all_disagree", "zero_variance"]


def _masked(make):
  """``make(*args).update`` under one ``jax.jit`` with the mask's hparams traced: one compile
  per gradient shape serves every case and threshold."""
  return jax.jit(lambda grads, *args: make(*args).update(grads, None)[0])


@pytest.mark.parametrize("d", DOMAINS)
def test_and_mask_matches_reference(d):
  masked = _masked(lambda tau: dgjax.and_mask(tau=tau))
  for case in CASES:
    grads = random_grads(jax.random.key(d), d, SHAPES, case)
    for tau in (0.0, 0.5, 1.0):
      out = masked(grads, tau)
      expected = {k: ref_and_leaf(v, tau) for k, v in grads.items()}
      chex.assert_trees_all_close(out, jax.tree.map(np.float32, expected), rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_equal_shapes(out, jax.tree.map(lambda g: g[0], grads))


@pytest.mark.parametrize("d", DOMAINS)
def test_sand_mask_matches_reference(d):
  masked = _masked(lambda tau, k: dgjax.sand_mask(tau=tau, k=k))
  for case in CASES:
    grads = random_grads(jax.random.key(100 + d), d, SHAPES, case)
    for tau, k in ((0.0, 10.0), (0.3, 1.0), (0.5, 10.0), (0.7, 1e3)):
      out = masked(grads, tau, k)
      expected = {key: ref_sand_leaf(v, tau, k) for key, v in grads.items()}
      # DomainBed's 1e-17 (for NaN) is our exact 0: hence the absolute tolerance.
      chex.assert_trees_all_close(out, jax.tree.map(np.float32, expected), rtol=1e-4, atol=1e-6)
      for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(leaf))


def test_masks_outside_jit_equal_the_jitted_masks():
  """The transforms also run eagerly (concrete hparams, Python-level checks)."""
  grads = random_grads(jax.random.key(3), 3, SHAPES, "random")
  for tx in (dgjax.and_mask(0.5), dgjax.sand_mask(0.3, 10.0)):
    eager, _ = tx.update(grads, tx.init(None))
    jitted, _ = jax.jit(tx.update)(grads, tx.init(None))
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_sand_mask_weights_in_unit_interval_and_limits():
  g = jnp.array([[1.0, 1.0, -2.0, 0.5], [1.0, 3.0, 1.0, 0.5]])  # [D=2, 4]
  m = dgjax.sand_mask_weights(g, tau=0.5, k=10.0)
  # entry 0: identical grads (var 0), agree -> 1; entry 1: agree, var 2 -> tanh(10*0.5/2)
  # entry 2: disagree -> 0; entry 3: identical -> 1.
  np.testing.assert_allclose(m, [1.0, np.tanh(2.5), 0.0, 1.0], rtol=1e-6)


def test_sand_approaches_and_as_k_grows():
  grads = random_grads(jax.random.key(7), 5, [(6, 7), (11,)], "random")
  tau = 0.5  # with D=5, |mean sign| is in {0.2, 0.6, 1}: never equal to tau
  and_m = dgjax.and_mask_weights(grads, tau)
  dists = []
  for k in (1e-3, 1e-1, 1e1, 1e3, 1e6, 1e12):
    sand_m = dgjax.sand_mask_weights(grads, tau, k)
    dists.append(
      sum(
        float(jnp.sum(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(sand_m), jax.tree.leaves(and_m))
      )
    )
  assert all(b <= a + 1e-6 for a, b in zip(dists, dists[1:])), dists
  assert dists[-1] < 1e-6, dists
  chex.assert_trees_all_close(dgjax.sand_mask_weights(grads, tau, 1e12), and_m, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: dgjax.and_mask(0.8), lambda: dgjax.sand_mask(0.4, 5.0)])
def test_chain_with_adam_equals_hand_applied_mask(make):
  key = jax.random.key(3)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  tx = optax.chain(make(), optax.adam(1e-2))
  state = tx.init(params)
  adam = optax.adam(1e-2)
  adam_state = adam.init(params)
  mask_tx = make()
  for i in range(3):
    grads = random_grads(jax.random.fold_in(key, i), 3, [(4, 3), (3,)], "random")
    grads = {"w": grads["p0"], "b": grads["p1"]}
    upd, state = jax.jit(tx.update)(grads, state, params)
    masked, _ = mask_tx.update(grads, mask_tx.init(params), params)
    upd_ref, adam_state = adam.update(masked, adam_state, params)
    chex.assert_trees_all_close(upd, upd_ref, rtol=1e-6, atol=1e-8)
    params = optax.apply_updates(params, upd)


def test_kept_fraction_state():
  g = {"a": jnp.array([[1.0, -1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 3.0]])}
  _, state = dgjax.and_mask(1.0).update(g, dgjax.and_mask(1.0).init(None))
  assert float(state.kept_fraction) == pytest.approx(0.75)


def test_masks_keep_dtype_bfloat16():
  g = jax.random.normal(jax.random.key(0), (3, 8, 8)).astype(jnp.bfloat16)
  for tx in (dgjax.and_mask(0.5), dgjax.sand_mask(0.5, 10.0)):
    out, _ = jax.jit(tx.update)({"g": g}, tx.init(None))
    assert out["g"].dtype == jnp.bfloat16
    ref = tx.update({"g": g.astype(jnp.float32)}, tx.init(None))[0]["g"]
    np.testing.assert_allclose(np.float32(out["g"]), ref, rtol=2e-2, atol=1e-2)


def test_masks_that_mask_everything_warn():
  with pytest.warns(UserWarning, match="will not train"):
    dgjax.sand_mask(tau=1.0)
  with pytest.warns(UserWarning, match="will not train"):
    dgjax.and_mask(tau=1.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dgjax.sand_mask()  # defaults train: no warning
    dgjax.and_mask()
  # and indeed DomainBed's SAND default tau=1.0 zeroes every update
  g = random_grads(jax.random.key(1), 3, [(5, 5)], "random")
  with pytest.warns(UserWarning):
    out, _ = dgjax.sand_mask(tau=1.0).update(g, None)
  assert float(jnp.abs(out["p0"]).max()) == 0.0
  out, _ = dgjax.sand_mask().update(g, None)
  assert float(jnp.abs(out["p0"]).max()) > 0.0


def test_mean_over_domains():
  g = {"a": jnp.arange(6.0).reshape(3, 2)}
  out, _ = dgjax.mean_over_domains().update(g, optax.EmptyState())
  np.testing.assert_allclose(out["a"], [2.0, 3.0])
