"""IB-ERM, IB-IRM, RSC, SelfReg, EQRM, RDM and TRM against slow explicit references of
DomainBed's updates (loops over domains and examples, plain numpy / jnp formulas on a tiny MLP,
float64), their schedules and optimizers, and 3 jitted steps of K=2 vmapped runs each."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


from dgjax import core, methods
from dgjax import train as train_lib
from dgjax.algorithms import representation as rep
from dgjax.algorithms import risk_shaping as rs
from dgjax.data import spirals
from dgjax.models import mlp

D, B, IN, HID, C = 3, 6, 6, 5, 3


def setup(seed=0, classes=C, d=D, b=B):
  model = mlp(classes, hidden=(HID,))
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  x = jax.random.normal(k1, (d, b, IN), dtype)
  y = jax.random.randint(k2, (d, b), 0, max(classes, 2))
  params = model.init(k0, x[0])["params"]
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  return model, params, {"x": x, "y": y}


def source_fn(name, model, num_domains, overrides=None):
  """The method's jitted ``grads(params, state, batch, step, key)``, its hparams and init."""
  method = methods.get_method(name)
  hp = methods.resolve_hparams(name, 0, overrides or {})
  ctx = core.Context(model, hp, num_domains)
  fn = jax.jit(lambda p, s, b, st, k: method.gradients.grads(ctx, p, s, b, st, k))
  return fn, hp, lambda params: method.gradients.init(ctx, params, jax.random.key(0))


def source_grads(name, model, params, batch, step=0, key=None, overrides=None, state=None):
  fn, hp, init = source_fn(name, model, batch["y"].shape[0], overrides)
  state = init(params) if state is None else state
  key = jax.random.key(7) if key is None else key
  return fn(params, state, batch, jnp.int32(step), key), hp, state


# ------------------------------------------------------------------------------ reference pieces
def ref_features(p, x):  # one example [IN] -> [HID]
  w = p["featurizer"]["dense0"]
  return jnp.maximum(x @ w["kernel"] + w["bias"], 0.0)


def ref_logits(head, z):
  return z @ head["kernel"] + head["bias"]


def ref_ce(logits, label):  # one example
  return jax.nn.logsumexp(logits) - logits[label]


def ref_var(values):  # unbiased variance of a list of scalars
  n = len(values)
  mean = sum(values) / n
  return sum((v - mean) ** 2 for v in values) / (n - 1)


def assert_tree_close(a, b, rtol=1e-9, atol=1e-11):
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol),
    a,
    b,
  )


# ------------------------------------------------------------------------------ IB-ERM / IB-IRM
def ref_ib_objective(p, batch, w_ib, w_irm=None):
  x, y = batch["x"], batch["y"]
  nll, ib, irm = 0.0, 0.0, 0.0
  for d in range(D):
    zs = [ref_features(p, x[d, i]) for i in range(B)]
    logits = [ref_logits(p["classifier"], z) for z in zs]
    nll += sum(ref_ce(lg, y[d, i]) for i, lg in enumerate(logits)) / B
    ib += sum(ref_var([z[f] for z in zs]) for f in range(HID)) / HID
    # d/ds CE(s * logits) at s = 1 = sum_c (softmax_c - onehot_c) logit_c, per half-batch
    halves = []
    for start in (0, 1):
      idx = range(start, B, 2)
      halves.append(
        sum(jnp.dot(jax.nn.softmax(logits[i]) - jax.nn.one_hot(y[d, i], C), logits[i]) for i in idx)
        / len(idx)
      )
    irm += halves[0] * halves[1]
  total = nll / D + w_ib * ib / D
  if w_irm is not None:
    total = total + w_irm * irm / D
  return total


def test_ib_erm_matches_reference():
  with jax.enable_x64(True):
    model, params, batch = setup()
    fn, _, init = source_fn("ib_erm", model, D, {"ib_penalty_anneal_iters": 3, "ib_lambda": 7.0})
    ref = jax.jit(jax.value_and_grad(ref_ib_objective))
    for step in (2, 3):
      g, terms = fn(params, init(params), batch, jnp.int32(step), jax.random.key(0))
      ref_value, ref_g = ref(params, batch, 7.0 if step >= 3 else 0.0)
      assert_tree_close(g, ref_g)
      np.testing.assert_allclose(terms.metrics["objective"], ref_value, rtol=1e-10)


def test_ib_irm_matches_reference():
  with jax.enable_x64(True):
    model, params, batch = setup(1)
    fn, _, init = source_fn(
      "ib_irm",
      model,
      D,
      {
        "irm_penalty_anneal_iters": 2,
        "irm_lambda": 30.0,
        "ib_penalty_anneal_iters": 4,
        "ib_lambda": 5.0,
      },
    )
    ref = jax.jit(jax.value_and_grad(ref_ib_objective))
    for step in (1, 2, 4):
      g, terms = fn(params, init(params), batch, jnp.int32(step), jax.random.key(0))
      w_irm, w_ib = (30.0 if step >= 2 else 1.0), (5.0 if step >= 4 else 0.0)
      ref_value, ref_g = ref(params, batch, w_ib, w_irm)
      assert_tree_close(g, ref_g)
      np.testing.assert_allclose(terms.metrics["objective"], ref_value, rtol=1e-10)
      assert (
        float(terms.metrics["irm_penalty_weight"]),
        float(terms.metrics["ib_penalty_weight"]),
      ) == (w_irm, w_ib)


def test_ib_irm_recreates_adam_at_both_switches():
  model, params, _ = setup()
  hp = methods.resolve_hparams(
    "ib_irm", 0, {"irm_penalty_anneal_iters": 2, "ib_penalty_anneal_iters": 4}
  )
  tx = rep.ib_irm_adam(core.Context(model, hp, D))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, step=st))
  counts = []
  for step in range(6):
    _, state = update(grads, state, params, jnp.int32(step))
    ((_, count),) = optax.tree_utils.tree_get_all_with_path(state, "count")
    counts.append(int(count))
  assert counts == [1, 2, 1, 2, 1, 2]


# ------------------------------------------------------------------------------ RSC
def test_rsc_matches_reference():
  with jax.enable_x64(True):
    model, params, batch = setup(2)
    f_drop, b_drop = 0.4, 0.3
    (g, terms), _, _ = source_grads(
      "rsc",
      model,
      params,
      batch,
      overrides={"rsc_f_drop_factor": f_drop, "rsc_b_drop_factor": b_drop},
    )
    x = np.asarray(batch["x"]).reshape(D * B, IN)
    y = np.asarray(batch["y"]).reshape(D * B)
    w = np.asarray(params["classifier"]["kernel"])
    bias = np.asarray(params["classifier"]["bias"])
    z = np.stack([np.asarray(ref_features(params, xi)) for xi in x])
    softmax = lambda lg: np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    mask = np.ones_like(z)
    changes = []
    masks_f = []
    for n in range(D * B):
      grad_true_logit = w[:, y[n]]  # d (z W + b)_y / dz
      thr = np.percentile(grad_true_logit, (1 - f_drop) * 100)
      mask_f = (grad_true_logit < thr).astype(float)
      masks_f.append(mask_f)
      changes.append(softmax(z[n] @ w + bias)[y[n]] - softmax((z[n] * mask_f) @ w + bias)[y[n]])
    thr_b = np.percentile(np.array(changes), (1 - b_drop) * 100)
    for n in range(D * B):
      if not changes[n] < thr_b:
        mask[n] = masks_f[n]
    assert 0 < (mask == 0).sum() < mask.size

    def ref_loss(p):
      return sum(
        ref_ce(ref_logits(p["classifier"], ref_features(p, x[n]) * mask[n]), y[n])
        for n in range(D * B)
      ) / (D * B)

    value, ref_g = jax.jit(jax.value_and_grad(ref_loss))(params)
    assert_tree_close(g, ref_g)
    np.testing.assert_allclose(jnp.mean(terms.env_losses), value, rtol=1e-10)
    np.testing.assert_allclose(terms.metrics["rsc_muted_fraction"], (mask == 0).mean(), rtol=1e-10)


def test_two_class_logits_give_the_logistic_loss():
  s = jnp.array([[0.3], [-1.2]])
  two = rep.two_class_logits(s)
  ce = jax.vmap(ref_ce)(two, jnp.array([1, 0]))
  np.testing.assert_allclose(ce, [jnp.log1p(jnp.exp(-0.3)), jnp.log1p(jnp.exp(-1.2))], rtol=1e-6)


# ------------------------------------------------------------------------------ SelfReg
def test_within_class_partners_permute_within_classes():
  labels = jnp.array([2, 0, 1, 0, 2, 2, 1, 0, 0])
  seen = set()
  for s in range(30):
    pi = np.asarray(rep.within_class_partners(jax.random.key(s), labels))
    assert sorted(pi) == list(range(len(labels)))  # a permutation
    assert np.all(np.asarray(labels)[pi] == np.asarray(labels))  # within classes
    seen.add(tuple(pi))
  assert len(seen) > 10  # random


def test_selfreg_matches_reference():
  with jax.enable_x64(True):
    b = 4
    model, params, batch = setup(3, b=b)
    key = jax.random.key(11)
    (g, terms), _, state = source_grads("selfreg", model, params, batch, key=key)
    # the method's random draws (documented: split(key, 3) -> lam, pi1, pi2)
    k_lam, k1, k2 = jax.random.split(key, 3)
    labels = batch["y"].reshape(-1)
    lam = float(jax.random.beta(k_lam, 0.5, 0.5, dtype=jnp.float32))
    pi1 = np.asarray(rep.within_class_partners(k1, labels))
    pi2 = np.asarray(rep.within_class_partners(k2, labels))
    x = batch["x"].reshape(D * b, IN)
    y = np.asarray(labels)
    n = D * b
    proj = state.projection

    def ref_projection(h):  # [n, F]: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN (batch stats)
      for i in range(3):
        lin, bn = proj[f"TorchDense_{i}"], proj[f"TrainModeBatchNorm_{i}"]
        h = h @ lin["kernel"] + lin["bias"]
        mean = jnp.sum(h, axis=0) / n
        var = jnp.sum((h - mean) ** 2, axis=0) / n
        h = (h - mean) / jnp.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
        if i < 2:
          h = jnp.maximum(h, 0.0)
      return h

    def ref_loss(p):
      zs = [ref_features(p, x[i]) for i in range(n)]
      qs = ref_projection(jnp.stack(zs))
      os_ = [ref_logits(p["classifier"], z) for z in zs]
      ce = sum(ref_ce(os_[i], y[i]) for i in range(n)) / n
      mse = lambda pairs, dim: sum(jnp.sum((a - c) ** 2) for a, c in pairs) / (n * dim)
      l_ind_logit = mse([(os_[i], os_[pi1[i]]) for i in range(n)], C)
      l_hdl_logit = mse(
        [(os_[i], lam * os_[pi1[i]] + (1 - lam) * os_[pi2[i]]) for i in range(n)], C
      )
      l_ind_feat = 0.3 * mse([(zs[i], qs[pi1[i]]) for i in range(n)], HID)
      l_hdl_feat = 0.3 * mse(
        [(zs[i], lam * qs[pi1[i]] + (1 - lam) * qs[pi2[i]]) for i in range(n)], HID
      )
      scale = jnp.minimum(jax.lax.stop_gradient(ce), 1.0)
      return ce + scale * (
        lam * (l_ind_logit + l_ind_feat) + (1 - lam) * (l_hdl_logit + l_hdl_feat)
      )

    value, ref_g = jax.jit(jax.value_and_grad(ref_loss))(params)
    assert_tree_close(g, ref_g, rtol=1e-6, atol=1e-9)  # lam is drawn in float32
    np.testing.assert_allclose(terms.metrics["objective"], value, rtol=1e-6)
    # the projection is fixed (DomainBed never optimises it); it is drawn from the run's key
    # alone: another key, another projection; the same key, the same one
    assert_tree_close(terms.state, state)
    _, params2, _ = setup(4)
    init = lambda p, k: methods.get_method("selfreg").gradients.init(
      core.Context(model, methods.resolve_hparams("selfreg"), D), p, k
    )
    assert proj["TorchDense_0"]["kernel"].shape == (HID, 2 * HID)
    other = init(params, jax.random.key(1)).projection
    assert not np.allclose(proj["TorchDense_0"]["kernel"], other["TorchDense_0"]["kernel"])
    assert_tree_close(init(params2, jax.random.key(0)).projection, proj, rtol=0, atol=0)


# ------------------------------------------------------------------------------ EQRM
def ref_kde_quantile_with_grad(risks, q):
  """DomainBed's Nonparametric.icdf in explicit dual numbers (value, d/d risks): the bisection
  keeps the interval ends as they are, so the result is linear in lo and hi."""
  r = np.asarray(risks, np.float64)
  n = len(r)
  mean = r.mean()
  std = np.sqrt(((r - mean) ** 2).sum() / (n - 1))
  bw = 1.06 * std * n**-0.2
  dbw = 1.06 * n**-0.2 * (r - mean) / ((n - 1) * std)
  from math import erf, sqrt
  from scipy.special import ndtri as sp_ndtri  # noqa: F401 (scipy ships with jax)

  zq = float(sp_ndtri(q))
  e_min, e_max = np.eye(n)[r.argmin()], np.eye(n)[r.argmax()]
  lo = (r.min() + bw * zq, e_min + zq * dbw)
  hi = (r.max() + bw * zq, e_max + zq * dbw)
  cdf = lambda k: np.mean([0.5 * (1 + erf((k - ri) / bw / sqrt(2))) for ri in r])
  val_range = [lo, hi]
  k = (0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]))
  for _ in range(32):
    val_range[int(cdf(k[0]) > q)] = k
    nxt = (0.5 * (val_range[0][0] + val_range[1][0]), 0.5 * (val_range[0][1] + val_range[1][1]))
    if nxt[0] == k[0]:
      break
    k = nxt
  return k


def test_eqrm_matches_reference():
  with jax.enable_x64(True):
    model, params, batch = setup(5)
    q = 0.8
    fn, _, init = source_fn("eqrm", model, D, {"eqrm_burnin_iters": 2, "eqrm_quantile": q})

    def env_risks(p):
      return jnp.stack(
        [
          sum(
            ref_ce(ref_logits(p["classifier"], ref_features(p, batch["x"][d, i])), batch["y"][d, i])
            for i in range(B)
          )
          / B
          for d in range(D)
        ]
      )

    risks, vjp = jax.vjp(jax.jit(env_risks), params)
    for step in (1, 3):
      g, terms = fn(params, init(params), batch, jnp.int32(step), jax.random.key(0))
      if step < 2:
        value, dvalue = float(jnp.mean(risks)), np.full(D, 1.0 / D)
      else:
        value, dvalue = ref_kde_quantile_with_grad(risks, q)
        assert np.min(risks) < value  # a quantile above the smallest risk
      (ref_g,) = vjp(jnp.asarray(dvalue))
      assert_tree_close(g, ref_g, rtol=1e-8, atol=1e-10)
      np.testing.assert_allclose(terms.metrics["objective"], value, rtol=1e-9)


def test_kde_quantile_solves_the_kde_cdf():
  with jax.enable_x64(True):
    risks = jnp.array([0.3, 0.9, 0.5, 1.4])
    k = rs.kde_quantile(risks, 0.75)
    bw = 1.06 * np.std(np.asarray(risks), ddof=1) * 4**-0.2
    cdf = np.mean(jax.scipy.stats.norm.cdf((float(k) - np.asarray(risks)) / bw))
    np.testing.assert_allclose(cdf, 0.75, atol=1e-8)


@pytest.mark.parametrize(
  "method,after,at",
  [("eqrm", "eqrm_lr", "eqrm_burnin_iters"), ("rdm", "rdm_lr", "rdm_penalty_anneal_iters")],
)
def test_switched_adam_recreates_adam_with_the_second_rate(method, after, at):
  model, params, _ = setup()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  def run(switch_at):
    hp = methods.resolve_hparams(method, 0, {at: switch_at, "lr": 1e-2, after: 1e-4})
    tx = methods.get_method(method).optimizer(core.Context(model, hp, D))
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, step=st))
    steps = []
    for step in range(5):
      u, state = update(grads, state, params, jnp.int32(step))
      steps.append(float(u["classifier"]["bias"][0]))
    return steps

  # Adam's first step is -lr * sign(g) (bias-corrected): -lr before, and a fresh Adam at step 2
  np.testing.assert_allclose(run(2), [-1e-2, -1e-2, -1e-4, -1e-4, -1e-4], rtol=1e-4)
  if method == "eqrm":  # a float switch step never equals the counter: no re-creation
    np.testing.assert_allclose(run(2.5), [-1e-2] * 5, rtol=1e-4)


# ------------------------------------------------------------------------------ RDM
def test_rdm_matches_reference():
  with jax.enable_x64(True):
    model, params, batch = setup(6)
    over = {"rdm_penalty_anneal_iters": 2, "rdm_lambda": 2.0, "variance_weight": 0.5}
    fn, _, init = source_fn("rdm", model, D, over)
    g, terms = fn(params, init(params), batch, jnp.int32(3), jax.random.key(0))
    g0, terms0 = fn(params, init(params), batch, jnp.int32(1), jax.random.key(0))
    assert (
      float(terms0.metrics["penalty_weight"]) == 0.0
      and float(terms.metrics["penalty_weight"]) == 1.0
    )
    gammas = [1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100, 1000]

    def kernel_mean(a, c):  # mean over all pairs of sum_g exp(-g (a_i - c_j)^2)
      sq = jnp.maximum((jnp.stack(a)[:, None] - jnp.stack(c)[None, :]) ** 2, 1e-30)
      return jnp.mean(sum(jnp.exp(-gm * sq) for gm in gammas))

    def env_risks(p):
      return [
        [
          ref_ce(ref_logits(p["classifier"], ref_features(p, batch["x"][d, i])), batch["y"][d, i])
          for i in range(B)
        ]
        for d in range(D)
      ]

    worst = int(np.argmax([sum(float(v) for v in r) for r in env_risks(params)]))

    def ref_objective(p):
      risks = env_risks(p)
      env = [sum(r) / B for r in risks]
      everything = [v for r in risks for v in r]
      mmd = (
        kernel_mean(risks[worst], risks[worst])
        + kernel_mean(everything, everything)
        - 2 * kernel_mean(risks[worst], everything)
      )
      var = ref_var(everything) + ref_var(risks[worst])
      return sum(env) / D + 2.0 * mmd + 0.5 * var

    value, ref_g = jax.jit(jax.value_and_grad(ref_objective))(params)
    # the clamp at 1e-30 on the expanded squared distance differs from (a - c)^2 by rounding
    assert_tree_close(g, ref_g, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(terms.metrics["objective"], value, rtol=1e-8)


# ------------------------------------------------------------------------------ TRM
def test_neumann_series_with_domainbeds_aliasing():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  h_mat = 0.3 * a @ a.T / 4
  v0 = rng.normal(size=4)
  # DomainBed's loop, with numpy's in-place `-=` aliasing the sum's first term as torch does
  v = v0.copy()
  h = v
  for _ in range(10):
    hv = h_mat @ v
    v -= hv
    h = v + h
    if np.max(np.abs(h)) > 10:
      break
  with jax.enable_x64(True):
    ours = rs.neumann_inverse_hvp(lambda u: jnp.asarray(h_mat) @ u, jnp.asarray(v0))
    paper = rs.neumann_inverse_hvp(
      lambda u: jnp.asarray(h_mat) @ u, jnp.asarray(v0), alias_first_term=False
    )
  np.testing.assert_allclose(ours, h, rtol=1e-12)
  series = sum(np.linalg.matrix_power(np.eye(4) - h_mat, j) @ v0 for j in range(11))
  np.testing.assert_allclose(paper, series, rtol=1e-10)


def ref_head_grad(kernel, bias, zs, ys):  # d mean CE / d (kernel, bias), explicit softmax formula
  gk, gb = np.zeros_like(kernel), np.zeros_like(bias)
  for z, yy in zip(zs, ys):
    lg = z @ kernel + bias
    p = np.exp(lg - lg.max())
    p /= p.sum()
    p[yy] -= 1
    gk += np.outer(z, p)
    gb += p
  return gk / len(zs), gb / len(zs)


def ref_head_hvp(kernel, bias, zs, v):  # kernel Hessian of mean CE times v [F, C]
  out = np.zeros_like(kernel)
  for z in zs:
    lg = z @ kernel + bias
    p = np.exp(lg - lg.max())
    p /= p.sum()
    u = v.T @ z
    out += np.outer(z, p * u - p * (p @ u))
  return out / len(zs)


# class_balanced false, several steps, float64 from init and the paper's forms:
# tests/test_arm_trm_domainbed.py
@pytest.mark.parametrize("class_balanced", [True])
def test_trm_matches_reference(class_balanced):
  with jax.enable_x64(True):
    model, params, batch = setup(8)
    over = {"iters": 1, "cos_lambda": 0.3, "groupdro_eta": 0.5, "class_balanced": class_balanced}
    method = methods.get_method("trm")
    hp = methods.resolve_hparams("trm", 0, over)
    ctx = core.Context(model, hp, D)
    state = method.gradients.init(ctx, params, jax.random.key(0))
    state = state._replace(
      alpha=state.alpha * jnp.array([[1.0, 2.0, 3.0], [1.0, 1.0, 4.0], [2.0, 1.0, 1.0]])
    )
    grads = jax.jit(
      lambda st: method.gradients.grads(ctx, params, state, batch, st, jax.random.key(0))
    )
    # step 0 < iters: ERM, state unchanged
    g0, t0 = grads(jnp.int32(0))
    assert_tree_close(t0.state, state)
    assert float(t0.metrics["trm_loss"]) == 0.0
    g, terms = grads(jnp.int32(1))

    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    zs = [[np.asarray(ref_features(params, x[d, i])) for i in range(B)] for d in range(D)]
    heads = [{k: np.array(v[d]) for k, v in state.heads.items()} for d in range(D)]
    if class_balanced:
      for h in heads:
        h["kernel"] = np.array(params["classifier"]["kernel"])
    alpha = np.array(state.alpha)
    alpha /= alpha.sum(1, keepdims=True)
    for _ in range(30):
      for d in range(D):
        gk, gb = ref_head_grad(heads[d]["kernel"], heads[d]["bias"], zs[d], y[d])
        heads[d]["kernel"] -= 0.1 * gk
        heads[d]["bias"] -= 0.1 * gb
    ce_np = lambda h, zz, yy: np.mean(
      [
        -np.log(np.exp(z @ h["kernel"] + h["bias"])[t] / np.exp(z @ h["kernel"] + h["bias"]).sum())
        for z, t in zip(zz, yy)
      ]
    )
    hs, new_alpha = [], alpha.copy()
    for q in range(D):
      gp = sum(
        alpha[q, i] * ref_head_grad(heads[q]["kernel"], heads[q]["bias"], zs[i], y[i])[0]
        for i in range(D)
        if i != q
      )
      v = gp.copy()
      h = v
      for _ in range(10):
        v -= ref_head_hvp(heads[q]["kernel"], heads[q]["bias"], zs[q], v)
        h = v + h
        if np.max(np.abs(h)) > 10:
          break
      hs.append(h)
      for i in range(D):
        if i != q:
          new_alpha[q, i] *= np.exp(0.5 * alpha[q, i] * ce_np(heads[q], zs[i], y[i]))

    def ref_objective(p, w):  # w: the weights of loss_P (DomainBed's alpha[Q, i].data)
      z = [[ref_features(p, x[d, i]) for i in range(B)] for d in range(D)]
      nll = sum(
        ref_ce(ref_logits(p["classifier"], z[d][i]), y[d, i]) for d in range(D) for i in range(B)
      ) / (D * B)
      swap = 0.0
      for q in range(D):
        head = {k: jnp.asarray(v) for k, v in heads[q].items()}
        loss_p = sum(
          w[q, i] * sum(ref_ce(ref_logits(head, z[i][j]), y[i, j]) for j in range(B)) / B
          for i in range(D)
          if i != q
        )
        g_q = (
          sum(
            jnp.outer(
              z[q][j], jax.nn.softmax(ref_logits(head, z[q][j])) - jax.nn.one_hot(y[q, j], C)
            )
            for j in range(B)
          )
          / B
        )
        swap = swap + loss_p - 0.3 * jnp.sum(jnp.asarray(hs[q]) * g_q)
      return nll + swap / D, (nll, swap / D)

    # DomainBed's aliasing (alias_alpha_weight): the forward multiplies by this step's alpha,
    # the backward reads alpha after its in-place update
    value_and_grad = jax.jit(jax.value_and_grad(ref_objective, has_aux=True))
    (_, (nll, swap)), _ = value_and_grad(params, jnp.asarray(alpha))
    _, ref_g = value_and_grad(params, jnp.asarray(new_alpha))
    assert_tree_close(g, ref_g, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(terms.metrics["nll"], nll, rtol=1e-10)
    np.testing.assert_allclose(terms.metrics["trm_loss"], swap, rtol=1e-8)
    np.testing.assert_allclose(terms.state.alpha, new_alpha, rtol=1e-8)
    for d in range(D):
      for k in ("kernel", "bias"):
        np.testing.assert_allclose(terms.state.heads[k][d], heads[d][k], rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------ hparams, K runs
OURS = ("ib_erm", "ib_irm", "rsc", "selfreg", "eqrm", "rdm", "trm")


def test_domainbed_hparams():
  assert methods.default_hparams("ib_irm") == {
    "lr": 1e-3,
    "batch_size": 64,
    "weight_decay": 0.0,
    "irm_lambda": 1e2,
    "irm_penalty_anneal_iters": 500,
    "ib_lambda": 1e2,
    "ib_penalty_anneal_iters": 500,
  }
  assert methods.default_hparams("rsc")["rsc_f_drop_factor"] == 1 / 3
  assert methods.default_hparams("eqrm")["eqrm_burnin_iters"] == 2500
  assert methods.default_hparams("rdm", "PACS")["batch_size"] == 88
  assert methods.default_hparams("rdm", "ColoredMNIST")["batch_size"] == 64
  assert methods.default_hparams("trm")["iters"] == 200
  for name in OURS:
    assert methods.get_method(name).domainbed_name
    for seed in range(1, 6):
      hp = methods.random_hparams(name, seed)
      for key, value in hp.items():
        methods.hparam_specs(name)[key].coerce(key, value)  # draws are valid values
  hp = methods.random_hparams("eqrm", 3)
  assert 10**2.5 <= hp["eqrm_burnin_iters"] <= 10**3.5 and 1e-7 <= hp["eqrm_lr"] <= 1e-5


VARY = {
  "ib_erm": ("ib_lambda", 10.0, 100.0),
  "ib_irm": ("irm_lambda", 10.0, 100.0),
  "rsc": ("rsc_f_drop_factor", 0.2, 0.4),
  "selfreg": None,
  "eqrm": ("eqrm_burnin_iters", 1.0, 1.5),
  "rdm": ("rdm_lambda", 1.0, 5.0),
  "trm": ("class_balanced", False, True),
}


@pytest.mark.parametrize("name", OURS)
def test_three_jitted_steps_of_two_vmapped_runs(name):
  """K=2 runs of different seeds (and, where the method has one, a different traced hparam)."""
  envs = spirals(num_train_envs=2, examples_per_env=16, num_test=8, n_dims=2, seed=0)
  ins = [train_lib.Split(f"env{i}_in", e.x, e.y) for i, e in enumerate(envs)]
  switch = {
    "ib_erm": {"ib_penalty_anneal_iters": 1},
    "ib_irm": {"ib_penalty_anneal_iters": 1},
    "eqrm": {},
    "rdm": {"rdm_penalty_anneal_iters": 1},
    "trm": {"iters": 1},
  }.get(name, {})
  vary = VARY[name]
  cfgs = [
    train_lib.TrainConfig(
      method=name,
      test_envs=(2,),
      steps=3,
      checkpoint_freq=100,
      seed=s,
      hparams={"batch_size": 4, **switch, **({vary[0]: vary[1 + s]} if vary else {})},
      progress=False,
      runs_impl="vmap",  # what these check: the runs vmapped
    )
    for s in (0, 1)
  ]
  runs = train_lib.train_many(
    cfgs, train_lib.DomainBedTask(mlp(1, (4,)), ins, ins, cfgs[0].test_envs), checkpoint=False
  )
  losses = [r[-1]["loss"] for r in runs]
  assert all(np.isfinite(losses)) and losses[0] != losses[1], losses
  if vary:
    assert [r[-1]["hparams"][vary[0]] for r in runs] == list(vary[1:])
