"""The IRM-style Colored MNIST scripts' protocol against a slow reference written from them.

The reference follows Fishr's ``coloredmnist/train_coloredmnist.py`` and the Hessian paper's
``cmnist/cmnist_HGP.py`` (both grown from Arjovsky et al.'s ``colored_mnist/main.py``) line by
line on a tiny MLP in float64: per environment ``mean_nll``, ``compute_irm_penalty`` (the
squared dummy-scale gradient of the WHOLE environment), ``compute_grads_variance`` (per-example
head gradients from a loop over examples, centred, squared, averaged over examples), then
``loss = train_nll + l2 * sum ||w||^2 + w * penalty``, ``loss /= w`` when ``w > 1``, one
``torch.optim.Adam`` for the whole run (never re-created). Penalties: irm the mean over the two
environments, rex ``(nll_0 - nll_1)^2``, fishr the summed squared differences of the two
variances from their mean, hgp (``cmnist_HGP.py``'s ``sad``) ``sum_e ||H_e g_e - H g||^2 +
sum_e ||g_e - g||^2`` on the head (explicit Hessians here), with ``w = 1`` before the switch for
every method; hutchinson (``cmnist_Hutchinson.py``'s ``sad``, random probes) in expectation. The steps cross
the switch. dgjax's side is each method's step with the benchmark's hparams
(:func:`dgjax.irm_benchmark.benchmark_hparams`: its roles and the ``irm_cmnist`` preset).
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgjax import core, irm_benchmark, methods, penalties
from dgjax.data import irm_cmnist
from dgjax.models import mlp

X64 = jax.enable_x64
N, F, HIDDEN = 8, 6, 5
LR, L2, WEIGHT, ANNEAL, STEPS = 0.01, 0.003, 50.0, 2, 4


def _data(seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(2, N, F))
  y = jnp.asarray((rng.rand(2, N) < 0.5).astype(np.int32))
  return {"x": x, "y": y}


def _net(p, x):
  """The MLP written out: ``x -> relu(x W1 + b1) = z -> z w + b`` (one logit)."""
  f, c = p["featurizer"]["dense0"], p["classifier"]
  z = jnp.maximum(x @ f["kernel"] + f["bias"], 0.0)
  return z, z @ c["kernel"] + c["bias"]


def _bce(logits, y):  # nn.functional.binary_cross_entropy_with_logits, mean
  return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def _script_loss(method, p, data, weight):
  envs = []
  for e in range(2):
    x, y = data["x"][e], data["y"][e].astype(jnp.float64)[:, None]
    z, logits = _net(p, x)
    nll = _bce(logits, y)
    # compute_irm_penalty: grad of mean_nll(logits * scale) at scale = 1, squared
    scale_grad = jax.grad(lambda s: _bce(logits * s, y))(1.0)
    # compute_grads_variance: per-example head gradients (BackPACK's BatchGrad x batch size)
    per_example = [
      jax.grad(lambda head: _bce(z[i : i + 1] @ head["kernel"] + head["bias"], y[i : i + 1]))(
        p["classifier"]
      )
      for i in range(N)
    ]
    variance = {}
    for name in ("kernel", "bias"):
      g = jnp.stack([pe[name].reshape(-1) for pe in per_example])
      g = g - g.mean(axis=0, keepdims=True)
      variance[name] = (g**2).mean(axis=0)
    envs.append({"nll": nll, "irm": scale_grad**2, "var": variance, "z": z, "y": y})
  train_nll = (envs[0]["nll"] + envs[1]["nll"]) / 2
  weight_norm = sum(jnp.sum(w**2) for w in jax.tree.leaves(p))
  loss = train_nll + L2 * weight_norm
  if method == "erm":
    return loss
  if method == "irm":
    penalty = (envs[0]["irm"] + envs[1]["irm"]) / 2
  elif method == "vrex":
    penalty = (envs[0]["nll"] - envs[1]["nll"]) ** 2
  elif method == "hgp":
    penalty = _script_hgp_penalty(p["classifier"], envs)
  else:
    mean_var = {k: (envs[0]["var"][k] + envs[1]["var"][k]) / 2 for k in ("bias", "kernel")}
    penalty = sum(
      jnp.sum((envs[e]["var"][k] - mean_var[k]) ** 2) for e in range(2) for k in ("bias", "kernel")
    )
  loss = loss + weight * penalty
  return jnp.where(weight > 1.0, loss / weight, loss)  # if penalty_weight > 1.0: loss /= ...


def _head_losses(head, envs):
  """The head's parameters flattened, ``nll(e, w)`` (environment ``e``'s loss at flat head
  ``w``, features ``envs[e]["z"]`` fixed) and their mean over the two environments."""
  flat, unravel = jax.flatten_util.ravel_pytree(head)

  def nll(e, w):
    h = unravel(w)
    return _bce(envs[e]["z"] @ h["kernel"] + h["bias"], envs[e]["y"])

  return flat, nll, lambda w: (nll(0, w) + nll(1, w)) / 2


def _script_hgp_penalty(head, envs):
  """cmnist_HGP.py's ``sad_penalty`` with explicit head Hessians (``jax.hessian``):
  ``sum_e ||H_e g_e - H g||^2 + sum_e ||g_e - g||^2``, ``g_e`` / ``H_e`` the gradient and
  Hessian of environment ``e``'s nll in the head's parameters, ``g`` / ``H`` those of their
  mean (the script's ``Hg_e = ||g_e|| grad ||g_e||`` is ``H_e g_e``)."""
  flat, nll, mean = _head_losses(head, envs)
  g, hg = jax.grad(mean)(flat), jax.hessian(mean)(flat) @ jax.grad(mean)(flat)
  penalty = 0.0
  for e in range(2):
    g_e = jax.grad(lambda w: nll(e, w))(flat)
    h_e = jax.hessian(lambda w: nll(e, w))(flat)
    penalty = penalty + jnp.sum((h_e @ g_e - hg) ** 2) + jnp.sum((g_e - g) ** 2)
  return penalty


def _script_run(method, params, data):
  """``STEPS`` iterations of the script's loop: one Adam (torch's formula), never reset."""
  m = jax.tree.map(jnp.zeros_like, params)
  v = jax.tree.map(jnp.zeros_like, params)
  p = params
  grad = jax.jit(jax.grad(lambda q, w: _script_loss(method, q, data, w)))
  for step in range(STEPS):
    g = grad(p, WEIGHT if step >= ANNEAL else 1.0)
    t = step + 1
    m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
    v = jax.tree.map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
    p = jax.tree.map(
      lambda w, a, b: w - LR * (a / (1 - 0.9**t)) / (jnp.sqrt(b / (1 - 0.999**t)) + 1e-8), p, m, v
    )
  return p


_REFERENCE: dict = {}


def _reference(method, params, data):
  """:func:`_script_run` on the tests' fixed data and params, once per method (both tests
  use the same inputs; the reference is the slow part)."""
  if method not in _REFERENCE:
    _REFERENCE[method] = _script_run(method, params, data)
  return _REFERENCE[method]


def _dgjax_run(method, params, data):
  cfg = irm_benchmark.IRMConfig(
    method=method, lr=LR, l2_weight=L2, penalty_weight=WEIGHT, penalty_anneal_iters=ANNEAL
  )
  hp = irm_benchmark.benchmark_hparams(method, cfg, N)
  ctx = core.Context(model=mlp(1, hidden=(HIDDEN,)), hparams=hp, num_domains=2)
  step = methods.get_method(method).build(ctx)
  update = jax.jit(step.update)
  state, p = step.init(params, jax.random.key(0)), params
  for s in range(STEPS):
    updates, state, metrics = update(p, state, data, jnp.asarray(s), jax.random.key(s))
    p = optax.apply_updates(p, updates)
  return p, hp


@pytest.mark.parametrize("method", ["erm", "irm", "vrex", "fishr", "hgp"])
def test_benchmark_step_is_the_scripts(method):
  with X64(True):
    data = _data()
    params = mlp(1, hidden=(HIDDEN,)).init(jax.random.key(1), jnp.zeros((1, F)))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.1, params)  # biases not 0
    ours, hp = _dgjax_run(method, params, data)
    ref = _reference(method, params, data)
    if method in ("irm", "vrex", "fishr"):
      assert hp["penalty_form"] == "script"
    if method != "erm":
      assert hp["rescale_loss"] and not hp["reset_optimizer"]
    moved = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params))
    )
    assert moved > 2 * LR  # several real Adam steps (each moves at most ~LR)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_each_protocol_difference_matters():
  """Every piece of the scripts' protocol changes the numbers: with DomainBed's form, or Adam
  re-created at the switch, or no rescale, the steps differ from the scripts'."""
  with X64(True):
    data = _data()
    params = mlp(1, hidden=(HIDDEN,)).init(jax.random.key(1), jnp.zeros((1, F)))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.1, params)
    for method, changes in (
      ("irm", ({"penalty_form": "domainbed"}, {"reset_optimizer": True}, {"rescale_loss": False})),
      ("vrex", ({"penalty_form": "domainbed"},)),
      ("fishr", ({"penalty_form": "domainbed"},)),
    ):
      ref = _reference(method, params, data)
      for change in changes:
        cfg = irm_benchmark.IRMConfig(
          method=method,
          lr=LR,
          l2_weight=L2,
          penalty_weight=WEIGHT,
          penalty_anneal_iters=ANNEAL,
          hparams=change,
        )
        hp = irm_benchmark.benchmark_hparams(method, cfg, N)
        step = methods.get_method(method).build(core.Context(mlp(1, hidden=(HIDDEN,)), hp, 2))
        state, p, update = step.init(params, jax.random.key(0)), params, jax.jit(step.update)
        for s in range(STEPS):
          u, state, _ = update(p, state, data, jnp.asarray(s), jax.random.key(s))
          p = optax.apply_updates(p, u)
        diff = max(
          float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref))
        )
        assert diff > 1e-6, (method, change)


def test_script_penalties_written_out():
  """The scripts' penalty functions against their formulas on random inputs."""
  rng = np.random.RandomState(0)
  logits, y = jnp.asarray(rng.randn(7, 1)), jnp.asarray(rng.rand(7) < 0.5)
  p = jax.nn.sigmoid(logits[:, 0])
  # d/ds mean BCE(s l, y) at s = 1 is mean((sigmoid(l) - y) l)
  expected = np.mean((np.asarray(p) - np.asarray(y)) * np.asarray(logits[:, 0])) ** 2
  np.testing.assert_allclose(penalties.irm_penalty_full_batch(logits, y), expected, rtol=1e-5)
  assert float(penalties.irm_penalty_full_batch(logits, y)) >= 0
  r = jnp.asarray([0.3, 0.9, 0.4])
  pairs = (0.3 - 0.9) ** 2 + (0.3 - 0.4) ** 2 + (0.9 - 0.4) ** 2
  np.testing.assert_allclose(penalties.risk_difference_penalty(r), pairs, rtol=1e-6)
  np.testing.assert_allclose(
    penalties.risk_difference_penalty(r[:2]), 4 * penalties.vrex_penalty(r[:2]), rtol=1e-6
  )
  v = {"a": jnp.asarray(rng.rand(2, 3)), "b": jnp.asarray(rng.rand(2, 1))}
  total = sum(np.sum((np.asarray(x) - np.asarray(x).mean(0)) ** 2) for x in v.values())
  np.testing.assert_allclose(penalties.fishr_penalty(v, "sum"), total, rtol=1e-6)
  np.testing.assert_allclose(penalties.fishr_penalty(v), total / (2 * 4), rtol=1e-6)


def test_hessian_presets_are_the_scripts():
  """hgp / hutchinson under the benchmark: the scripts' sum over two environments (alpha =
  beta = 2 on our mean), targets not detached; Hutchinson's 150 independent probes."""
  cfg = irm_benchmark.IRMConfig()
  hgp = irm_benchmark.benchmark_hparams("hgp", cfg, 10)
  assert (hgp["alpha"], hgp["beta"], hgp["detach_target"]) == (2.0, 2.0, False)
  assert hgp["rescale_loss"] and not hgp["reset_optimizer"]
  hut = irm_benchmark.benchmark_hparams("hutchinson", cfg, 10)
  assert (hut["hutchinson_samples"], hut["independent_probes"], hut["detach_target"]) == (
    150,
    True,
    False,
  )


def test_gray_environment_draws_its_own_label_noise():
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (1200, 28, 28), dtype=np.uint8), rng.integers(0, 10, 1200)
  d = irm_cmnist.irm_colored_mnist(images, labels, seed=3)
  np.testing.assert_array_equal(d.gray.index, d.test.index)
  np.testing.assert_array_equal(d.gray.digit, d.test.digit)
  assert not np.array_equal(d.gray.y, d.test.y)  # an independent draw
  assert abs(np.mean(d.gray.y != (d.gray.digit < 5)) - 0.25) < 0.08
  run = irm_benchmark.restart_data(d, 100)
  np.testing.assert_array_equal(run["gray_y"], d.gray.y)


def test_engine_trains_steps_minus_one_updates():
  """The scripts report the forward pass of their last iteration, before its update."""
  assert irm_benchmark.updates(irm_benchmark.IRMConfig(steps=501)) == 500
  with pytest.raises(ValueError, match="steps"):
    irm_benchmark.run(
      irm_benchmark.IRMConfig(steps=1), np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10
    )


def test_hutchinson_penalty_is_the_scripts_in_expectation():
  """cmnist_Hutchinson.py's ``sad_penalty``: ``sum_e ||g_e - g||^2 + sum_e ||D_e - D||^2``, ``D``
  the Hutchinson estimate ``mean_s z_s * (H z_s)`` of the head Hessian's diagonal, independent
  Rademacher probes per environment and for the mean. Its probes are random, so the benchmark's
  hutchinson is checked against the exact diagonals (explicit head Hessians) with many probes:
  the gradient term exactly, the Hessian term and the penalty within Monte Carlo error."""
  with X64(True):
    data = _data()
    params = mlp(1, hidden=(HIDDEN,)).init(jax.random.key(1), jnp.zeros((1, F)))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.1, params)
    cfg = irm_benchmark.IRMConfig(
      method="hutchinson", lr=LR, l2_weight=L2, penalty_weight=WEIGHT, penalty_anneal_iters=ANNEAL
    )
    hp = irm_benchmark.benchmark_hparams("hutchinson", cfg, N)
    assert hp["independent_probes"] and hp["rescale_loss"] and not hp["reset_optimizer"]
    ctx = core.Context(
      model=mlp(1, hidden=(HIDDEN,)),
      hparams={**hp, "hutchinson_samples": 20000},
      num_domains=2,
    )
    step = methods.get_method("hutchinson").build(ctx)
    _, _, metrics = jax.jit(step.update)(
      params, step.init(params, jax.random.key(0)), data, jnp.asarray(0), jax.random.key(3)
    )

    envs = []
    for e in range(2):
      z, _ = _net(params, data["x"][e])
      envs.append({"z": z, "y": data["y"][e].astype(jnp.float64)[:, None]})
    flat, nll, mean = _head_losses(params["classifier"], envs)
    g, d = jax.grad(mean)(flat), jnp.diag(jax.hessian(mean)(flat))
    grad_term = sum(jnp.sum((jax.grad(lambda w: nll(e, w))(flat) - g) ** 2) for e in range(2))
    hess_term = sum(
      jnp.sum((jnp.diag(jax.hessian(lambda w: nll(e, w))(flat)) - d) ** 2) for e in range(2)
    )
    assert float(hess_term) > 0.05 * float(grad_term)  # the Hessian term counts here
    # the terms are reported as means over the two environments (the script sums: alpha = beta = 2)
    np.testing.assert_allclose(2 * float(metrics["gradient_term"]), float(grad_term), rtol=1e-9)
    np.testing.assert_allclose(2 * float(metrics["hessian_term"]), float(hess_term), rtol=5e-2)
    np.testing.assert_allclose(float(metrics["penalty"]), float(grad_term + hess_term), rtol=1e-2)
