"""CausIRL-CORAL/MMD, CAD, CondCAD, URM and ERM++ against slow explicit references written
here from DomainBed's code (loops over domains, examples and rows, float64), plus 3 jitted
steps of K = 2 vmapped runs of each through ``train_many``."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgjax import methods
from dgjax import train as train_lib
from dgjax.algorithms import causal, contrastive, erm_variants
from dgjax.core import Context
from dgjax.data import spirals
from dgjax.models import mlp

F64 = jnp.float64
#: Test-only: cheaper XLA:CPU codegen for the explicit references and steps (same programs).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
  """``jax.jit(fn)`` compiled with :data:`FAST_COMPILE`, once per argument signature."""
  compiled = {}

  def call(*args):
    sig = (
      jax.tree.structure(args),
      tuple((np.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(args)),
    )
    if sig not in compiled:
      compiled[sig] = jax.jit(fn).lower(*args).compile(FAST_COMPILE)
    return compiled[sig](*args)

  return call


def to64(tree):
  return jax.tree.map(lambda a: a.astype(F64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def problem(d=3, b=4, classes=3, seed=0, hidden=(5,), dtype=F64):
  """A tiny MLP (6 -> 5 -> classes) and a batch ``[d, b, 6]`` (float64: call inside
  enable_x64)."""
  model = mlp(classes, hidden=hidden)
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(d, b, 6), dtype)
  y = jnp.asarray(rng.randint(0, classes, (d, b)), jnp.int32)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 6), jnp.float32))["params"]
  params = to64(params) if dtype == F64 else params
  return model, params, {"x": x, "y": y}


def context(name, model, d, **overrides):
  return Context(model, methods.resolve_hparams(name, 0, overrides), d)


def domain_ce_loop(model, params, batch):
  """Per-domain mean CE by a loop over domains (``logsumexp(l) - l_y`` per example); also the
  per-domain features."""
  losses, feats = [], []
  for d in range(batch["x"].shape[0]):
    z = model.apply({"params": params}, batch["x"][d], method="features")
    logits = model.apply({"params": {"classifier": params["classifier"]}}, z, method="head")
    picked = jnp.take_along_axis(logits, batch["y"][d][:, None], axis=1)[:, 0]
    losses.append(jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked))
    feats.append(z)
  return jnp.stack(losses), feats


def torch_adam_steps(p, grads_seq, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-8, state=None):
  """torch.optim.Adam on one array over a sequence of gradients; returns (p, (m, v, t))."""
  m, v, t = state if state is not None else (jnp.zeros_like(p), jnp.zeros_like(p), 0)
  for g in grads_seq:
    t += 1
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = jnp.sqrt(v) / np.sqrt(1 - b2**t) + eps
    p = p - lr / (1 - b1**t) * m / denom
  return p, (m, v, t)


def close(a, b, rtol=1e-9, atol=1e-12):
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
    a,
    b,
  )


# ============================================================================== CausIRL
def coral_explicit(a, b):
  """DomainBed's ``mmd`` with ``kernel_type == "mean_cov"`` (jnp or numpy arrays)."""
  ma, mb = a.mean(0), b.mean(0)
  ca = (a - ma).T @ (a - ma) / (a.shape[0] - 1)
  cb = (b - mb).T @ (b - mb) / (b.shape[0] - 1)
  return jnp.mean((ma - mb) ** 2) + jnp.mean((ca - cb) ** 2)


def mmd_explicit(a, b, gammas=(0.001, 0.01, 0.1, 1, 10, 100, 1000)):
  """DomainBed's Gaussian ``mmd`` (jnp or numpy arrays)."""
  exp = np.exp if isinstance(a, np.ndarray) else jnp.exp

  def k(u, w):
    d = ((u[:, None, :] - w[None, :, :]) ** 2).sum(-1)
    return sum(exp(-g * d) for g in gammas)

  return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


def causirl_reference(model, params, batch, points, distance, gamma):
  """DomainBed's AbstractCausIRL.update: concatenate heads ``z_d[:s_d]`` and tails."""
  losses, feats = domain_ce_loop(model, params, batch)
  first = jnp.concatenate([z[: int(s)] for z, s in zip(feats, points)])
  second = jnp.concatenate([z[int(s) :] for z, s in zip(feats, points)])
  penalty = distance(first, second) if len(first) > 1 and len(second) > 1 else 0.0
  return jnp.mean(losses) + gamma * penalty, (losses, penalty)


@pytest.mark.parametrize(
  "name,distance", [("causirl_coral", coral_explicit), ("causirl_mmd", mmd_explicit)]
)
def test_causirl_gradient_matches_explicit_reference(name, distance):
  with jax.enable_x64(True):
    model, params, batch = problem()
    ctx = context(name, model, 3, mmd_gamma=0.7)
    source = methods.get_method(name).gradients
    key = jax.random.key(1)
    points = tuple(int(v) for v in causal.split_points(key, 3, 4))
    assert sum(points) > 1, points  # both halves non-trivial
    g, terms = fast_jit(lambda p, k: source.grads(ctx, p, (), batch, 0, k))(params, key)
    (_, (losses, pen)), g_ref = fast_jit(
      jax.value_and_grad(
        lambda p: causirl_reference(model, p, batch, points, distance, 0.7), has_aux=True
      )
    )(params)
    assert float(pen) > 0
    close(terms.env_losses, losses)
    close(terms.penalty, pen, rtol=1e-8)
    close(g, g_ref, rtol=1e-7, atol=1e-12)


def test_causirl_penalty_cut_points_and_degenerate_halves():
  with jax.enable_x64(True):
    z = jnp.asarray(np.random.RandomState(3).randn(3, 4, 5), F64)
    for masked, explicit in (
      (causal.masked_coral_distance, coral_explicit),
      (causal.masked_mmd_distance, mmd_explicit),
    ):
      penalty = fast_jit(
        jax.value_and_grad(lambda zz, pts: causal.causirl_penalty(zz, pts, masked))
      )
      zn = np.asarray(z)
      for points in ([0, 0, 0], [1, 0, 0], [0, 2, 3], [3, 3, 3], [1, 1, 0]):
        first = np.concatenate([zn[d, :p] for d, p in enumerate(points)])
        second = np.concatenate([zn[d, p:] for d, p in enumerate(points)])
        got, grad = penalty(z, jnp.asarray(points))
        want = explicit(first, second) if len(first) > 1 and len(second) > 1 else 0.0
        close(got, want, rtol=1e-9)
        assert np.all(np.isfinite(np.asarray(grad)))
    # the cut points are uniform on {0, ..., B-1}
  pts = np.asarray(causal.split_points(jax.random.key(0), 300, 4))
  assert set(np.unique(pts)) == {0, 1, 2, 3}


# ============================================================================== CAD
def cad_reference(z, y, dom, temperature, conditional, flipped, normalized):
  """DomainBed's AbstractCAD.bn_loss, one row at a time (rows that DomainBed drops or whose
  value is infinite are skipped: their sets are empty)."""
  n = z.shape[0]
  if normalized:
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  s = (z @ z.T) / temperature * (1.0 - jnp.eye(n))
  s = s - jax.lax.stop_gradient(jnp.max(s, axis=1, keepdims=True))
  rows = []
  for i in range(n):
    others = [j for j in range(n) if j != i]
    same_y = [j for j in others if y[j] == y[i]]
    if not conditional:
      if not same_y:
        continue
      target = [j for j in range(n) if (dom[j] != dom[i]) == flipped]
      denom = jax.nn.logsumexp(s[i, jnp.asarray(others)])
    else:
      target = [j for j in same_y if (dom[j] != dom[i]) == flipped]
      if not target:
        continue
      denom = jax.nn.logsumexp(s[i, jnp.asarray(same_y)])
    if not target:
      continue
    value = jax.nn.logsumexp(s[i, jnp.asarray(target)] - denom)
    rows.append((-1.0 if flipped else 1.0) * temperature / 0.07 * value)
  return sum(rows) / len(rows) if rows else jnp.zeros(())


def test_cad_bottleneck_loss_matches_explicit_rows():
  with jax.enable_x64(True):
    rng = np.random.RandomState(0)
    z = jnp.asarray(rng.randn(12, 5), F64)
    y = np.array([0, 1, 0, 1, 1, 0, 0, 1, 2, 0, 1, 1])  # label 2 appears once
    dom = np.repeat(np.arange(3), 4)
    for conditional, flipped in itertools.product((False, True), repeat=2):
      normalized = conditional != flipped
      fn = fast_jit(
        jax.value_and_grad(
          lambda zz: contrastive.cad_bottleneck_loss(
            zz, jnp.asarray(y), jnp.asarray(dom), 0.1, conditional, flipped, normalized
          )
        )
      )
      ref = fast_jit(
        jax.value_and_grad(
          lambda zz: cad_reference(zz, y, dom, 0.1, conditional, flipped, normalized)
        )
      )
      (v, g), (v_ref, g_ref) = fn(z), ref(z)
      close(v, v_ref, rtol=1e-10)
      close(g, g_ref, rtol=1e-8, atol=1e-12)
    # one domain: no row has another domain, CAD (flipped) has no finite row -> 0, grad 0
    loss, g = jax.value_and_grad(
      lambda zz: contrastive.cad_bottleneck_loss(
        zz, jnp.asarray(y), jnp.zeros(12, jnp.int32), 0.1, False, True
      )
    )(z)
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)


def projection_explicit(head, z):
  (w1, b1), (w2, b2) = [(head[k]["kernel"], head[k]["bias"]) for k in ("dense0", "dense1")]
  return jax.nn.relu(z @ w1 + b1) @ w2 + b2


@pytest.mark.parametrize(
  "name,conditional,project", [("cad", False, False), ("condcad", True, True)]
)
def test_cad_method_gradients_and_projection_step(name, conditional, project):
  with jax.enable_x64(True):
    model, params, batch = problem(classes=2, seed=4)
    ctx = context(
      name, model, 3, lmbda=0.5, temperature=0.05, is_project=project, weight_decay=0.01, lr=0.01
    )
    source = methods.get_method(name).gradients
    state = to64(source.init(ctx, params, jax.random.key(0)))
    g, terms = fast_jit(lambda p, st: source.grads(ctx, p, st, batch, 0, jax.random.key(0)))(
      params, state
    )
    y = np.asarray(batch["y"]).reshape(-1)
    dom = np.repeat(np.arange(3), 4)

    def reference(p, head):
      losses, feats = domain_ce_loop(model, p, batch)
      z = jnp.concatenate(feats)
      if project:
        z = projection_explicit(head, z)
      bn = cad_reference(z, y, dom, 0.05, conditional, True, False)
      return jnp.mean(losses) + 0.5 * bn, (losses, bn)

    head = state.projection.params if project else {}
    (total, (losses, bn)), (g_ref, g_head) = fast_jit(
      jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)
    )(params, head)
    close(terms.env_losses, losses)
    close(terms.penalty, bn, rtol=1e-9)
    close(terms.metrics["objective"], total, rtol=1e-10)
    close(g, g_ref, rtol=1e-7, atol=1e-12)
    if project:  # the head took one torch-Adam(lr, weight_decay) step on its gradient
      want = jax.tree.map(lambda p_, g_: torch_adam_steps(p_, [g_], 0.01, 0.01)[0], head, g_head)
      close(terms.state.projection.params, want, rtol=1e-9)


# ============================================================================== URM
def disc_explicit(dp, h):
  layers = [dp[k] for k in sorted(dp, key=lambda k: int(k.split("_")[1]))]
  for layer in layers[:-1]:
    a = h @ layer["kernel"] + layer["bias"]
    h = jnp.where(a > 0, a, 0.01 * a)
  return (h @ layers[-1]["kernel"] + layers[-1]["bias"])[:, 0]


def bce_explicit(logits, targets):
  p = jax.nn.sigmoid(logits)
  return jnp.mean(-(targets * jnp.log(p) + (1 - targets) * jnp.log(1 - p)))


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    {
      "urm_generator_output": "relu",
      "urm_discriminator_optimizer": "sgd",
      "urm_discriminator_hidden_layers": 2,
      "urm_discriminator_label_smoothing": 0.2,
      "weight_decay": 0.01,
    },
  ],
)
def test_urm_network_gradient_and_discriminator_step(overrides):
  with jax.enable_x64(True):
    model, params, batch = problem(classes=3, seed=5)
    ctx = context("urm", model, 3, urm_adv_lambda=0.3, urm_discriminator_lr=0.05, **overrides)
    hp = ctx.hparams
    act = jnp.tanh if hp["urm_generator_output"] == "tanh" else jax.nn.relu
    source = methods.get_method("urm").gradients
    state = to64(source.init(ctx, params, jax.random.key(0)))
    disc = state.discriminator.params
    assert len(disc) == hp["urm_discriminator_hidden_layers"] + 2
    key = jax.random.key(7)
    g, terms = fast_jit(lambda p, st, k: source.grads(ctx, p, st, batch, 0, k))(params, state, key)

    def reference(p):  # pooled CE + lambda * BCE(D(h), 1), domain by domain
      hs, ces = [], []
      for d in range(3):
        h = act(model.apply({"params": p}, batch["x"][d], method="features"))
        logits = model.apply({"params": {"classifier": p["classifier"]}}, h, method="head")
        ces.append(
          jnp.sum(
            jax.nn.logsumexp(logits, axis=1)
            - jnp.take_along_axis(logits, batch["y"][d][:, None], axis=1)[:, 0]
          )
        )
        hs.append(h)
      h = jnp.concatenate(hs)
      adv = bce_explicit(disc_explicit(disc, h), jnp.ones(12))
      return sum(ces) / 12 + 0.3 * adv, (adv, h)

    (total, (adv, h)), g_ref = fast_jit(jax.value_and_grad(reference, has_aux=True))(params)
    close(terms.metrics["loss"], total, rtol=1e-10)
    close(terms.metrics["urm_adv_loss"], adv, rtol=1e-10)
    close(g, g_ref, rtol=1e-8, atol=1e-12)

    noise, true_y, fake_y = fast_jit(lambda k: erm_variants.urm_noise_and_labels(k, ctx, h.shape))(
      key
    )
    lo, hi = (-1, 1) if hp["urm_generator_output"] == "tanh" else (0, 1)
    assert float(noise.min()) >= lo and float(noise.max()) < hi
    s = hp["urm_discriminator_label_smoothing"]
    if s == 0:
      assert np.all(np.asarray(true_y) == 1) and np.all(np.asarray(fake_y) == 0)
    else:
      assert np.all((np.asarray(true_y) >= 1 - s) & (np.asarray(fake_y) <= s))
    h = jax.lax.stop_gradient(h)
    d_loss = lambda dp: (
      bce_explicit(disc_explicit(dp, noise), true_y)
      + 0.3 * bce_explicit(disc_explicit(dp, h), fake_y)
    )
    dl, dg = fast_jit(jax.value_and_grad(d_loss))(disc)
    close(terms.metrics["discriminator_loss"], dl, rtol=1e-10)
    wd, lr = hp["weight_decay"], 0.05
    if hp["urm_discriminator_optimizer"] == "sgd":  # torch SGD, first step: p - lr (g + wd p)
      want = jax.tree.map(lambda p_, g_: p_ - lr * (g_ + wd * p_), disc, dg)
    else:
      want = jax.tree.map(lambda p_, g_: torch_adam_steps(p_, [g_], lr, wd)[0], disc, dg)
    close(terms.state.discriminator.params, want, rtol=1e-9)
    # predict = classifier(act(featurizer(x)))
    step = methods.get_method("urm").build(ctx)
    x = batch["x"][0]
    close(
      step.predict(params, None, x),
      model.apply(
        {"params": {"classifier": params["classifier"]}},
        act(model.apply({"params": params}, x, method="features")),
        method="head",
      ),
    )


# ============================================================================== ERM++
def test_erm_plus_plus_probe_switch_and_weight_average_match_reference():
  """6 steps with linear_steps = 2 and sma_start_iter = 4 against DomainBed's loop written out:
  a head-only Adam(linear_lr) while global_iter <= linear_steps, then a fresh Adam(lr) over all
  parameters; update_sma after every step."""
  with jax.enable_x64(True):
    model, params, _ = problem(classes=2, seed=6)
    hp = dict(linear_lr=0.03, lr=0.01, weight_decay=0.02, linear_steps=2, sma_start_iter=4)
    ctx = context("erm_plus_plus", model, 3, **hp)
    step = methods.get_method("erm_plus_plus").build(ctx)
    state = to64(step.init(params, jax.random.key(0)))
    batches = [problem(classes=2, seed=10 + t)[2] for t in range(6)]

    def pooled_ce(p, batch):
      losses, _ = domain_ce_loop(model, p, batch)
      return jnp.mean(losses)

    update = fast_jit(step.update)
    ce_grad = fast_jit(jax.grad(pooled_ce))
    p_ref, sma = params, params
    head_state, full_state = {}, {}
    global_iter, sma_count = 0, 0
    p = params
    for t in range(6):
      g = ce_grad(p_ref, batches[t])
      flat_p, flat_g = (
        dict(jax.tree_util.tree_leaves_with_path(p_ref)),
        dict(jax.tree_util.tree_leaves_with_path(g)),
      )
      new = {}
      for path, leaf in flat_p.items():
        if global_iter > hp["linear_steps"]:
          new[path], full_state[path] = torch_adam_steps(
            leaf, [flat_g[path]], hp["lr"], hp["weight_decay"], state=full_state.get(path)
          )
        elif path[0].key == "classifier":
          new[path], head_state[path] = torch_adam_steps(
            leaf, [flat_g[path]], hp["linear_lr"], hp["weight_decay"], state=head_state.get(path)
          )
        else:
          new[path] = leaf
      p_ref = jax.tree_util.tree_map_with_path(lambda path, _: new[path], p_ref)
      global_iter += 1  # update_sma
      if global_iter >= hp["sma_start_iter"]:
        sma_count += 1
        sma = jax.tree.map(lambda a, b: (a * sma_count + b) / (1.0 + sma_count), sma, p_ref)
      else:
        sma = p_ref

      updates, state, metrics = update(p, state, batches[t], jnp.asarray(t), jax.random.key(t))
      p = optax.apply_updates(p, updates)
      close(p, p_ref, rtol=1e-9, atol=1e-12)
      close(optax.tree_utils.tree_get(state, "sma_params"), sma, rtol=1e-9, atol=1e-12)
      if t <= hp["linear_steps"]:
        close(p["featurizer"], params["featurizer"], rtol=0, atol=0)
    assert sma_count == 3
    x = batches[0]["x"][0]
    close(step.predict(p, state, x), model.apply({"params": sma}, x))


def test_torch_lars_matches_explicit_formula():
  with jax.enable_x64(True):
    rng = np.random.RandomState(0)
    p = {
      "k": jnp.asarray(rng.randn(3, 4), F64),
      "b": jnp.asarray(rng.randn(4), F64),
      "z": jnp.zeros((2, 2), F64),
    }
    grads = [jax.tree.map(lambda a: jnp.asarray(rng.randn(*a.shape), F64), p) for _ in range(3)]
    tx = erm_variants.torch_lars(0.1, weight_decay=0.05)
    s = tx.init(p)
    ref, mu = p, jax.tree.map(jnp.zeros_like, p)
    cur = p
    for g in grads:
      u, s = tx.update(g, s, cur)
      cur = optax.apply_updates(cur, u)
      new_ref, new_mu = {}, {}
      for name in ref:
        d = g[name]
        if ref[name].ndim > 1:
          d = d + 0.05 * ref[name]
          pn, dn = float(jnp.linalg.norm(ref[name])), float(jnp.linalg.norm(d))
          d = d * (0.001 * pn / dn if pn > 0 and dn > 0 else 1.0)
        new_mu[name] = 0.9 * mu[name] + d
        new_ref[name] = ref[name] - 0.1 * new_mu[name]
      ref, mu = new_ref, new_mu
      close(cur, ref, rtol=1e-12)


# ============================================================================== engine
@pytest.mark.parametrize(
  "method,name,a,b,extra",
  [
    ("causirl_coral", "mmd_gamma", 0.5, 2.0, {}),
    ("causirl_mmd", "mmd_gamma", 0.5, 2.0, {}),
    ("cad", "lmbda", 0.1, 1.0, {}),
    ("condcad", "lmbda", 0.1, 1.0, {"is_project": True}),
    ("urm", "urm_adv_lambda", 0.05, 0.2, {}),
    ("erm_plus_plus", "linear_lr", 1e-4, 1e-3, {"linear_steps": 1, "sma_start_iter": 2}),
    ("adrmx", "disc_lambda", 0.5, 0.75, {"mlp_width": 8, "mlp_depth": 3, "d_steps_per_g_step": 1}),
  ],
)
def test_three_jitted_steps_of_two_vmapped_runs(method, name, a, b, extra):
  envs = spirals(num_train_envs=2, examples_per_env=16, num_test=8, n_dims=2, seed=0)
  ins = [train_lib.Split(f"env{i}_in", e.x, e.y) for i, e in enumerate(envs)]
  cfgs = [
    train_lib.TrainConfig(
      method=method,
      test_envs=(2,),
      steps=3,
      checkpoint_freq=100,
      seed=s,
      hparams={"batch_size": 4, name: v, **extra},
      progress=False,
      runs_impl="vmap",  # what these check: the runs vmapped
    )
    for s, v in ((0, a), (1, b))
  ]
  runs = train_lib.train_many(
    cfgs,
    train_lib.DomainBedTask(mlp(1, (4 if method != "adrmx" else 8,)), ins, ins, cfgs[0].test_envs),
    checkpoint=False,
  )
  assert [r[-1]["hparams"][name] for r in runs] == [a, b]
  for r in runs:
    assert r[-1]["step"] == 2 and np.isfinite(r[-1]["loss"])
    assert 0.0 <= r[-1]["env2_in_acc"] <= 1.0


# ============================================================================== ADRMX
def supcon_reference(features, labels, domains, lamda=0.5, temperature=0.07):
  """DomainBed's SupConLossLambda.forward, row by row (sets from concrete labels)."""
  n = features.shape[0]
  f = features / jnp.maximum(jnp.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  s = f @ f.T / temperature
  loss, nans = 0.0, 0
  for i in range(n):
    sets = {}
    for j in range(n):
      if j == i:
        continue
      kind = ("pos" if labels[j] == labels[i] else "neg") + (
        "_in" if domains[j] == domains[i] else "_out"
      )
      sets.setdefault(kind, []).append(j)
    w = lambda kind: lamda if kind.endswith("_in") else 1 - lamda
    terms = {k: w(k) * jnp.exp(s[i, jnp.asarray(v)]) for k, v in sets.items()}
    den = sum(jnp.sum(t) for t in terms.values()) + 1e-5
    pos = [terms[k] for k in ("pos_in", "pos_out") if k in terms]
    if not pos:
      nans += 1
      continue
    num_pos = sum(len(sets[k]) for k in ("pos_in", "pos_out") if k in sets)
    loss = loss - sum(jnp.sum(jnp.log(t / den + 1e-5)) for t in pos) / num_pos
  return loss / (n - nans + 1)


def test_adrmx_supcon_loss_and_remix_pairs():
  from dgjax.algorithms import adrmx

  with jax.enable_x64(True):
    rng = np.random.RandomState(1)
    z = jnp.asarray(rng.randn(12, 5), F64)
    y = np.array([0, 1, 0, 1, 1, 0, 0, 1, 2, 0, 1, 1], np.int32)  # label 2 alone: a NaN row
    dom = np.repeat(np.arange(3), 4)
    fn = fast_jit(
      jax.value_and_grad(lambda zz: adrmx.supcon_lambda_loss(zz, jnp.asarray(y), jnp.asarray(dom)))
    )
    ref = fast_jit(jax.value_and_grad(lambda zz: supcon_reference(zz, y, dom)))
    (v, g), (v_ref, g_ref) = fn(z), ref(z)
    close(v, v_ref, rtol=1e-10)
    close(g, g_ref, rtol=1e-8, atol=1e-12)
  counts = {c: int(np.sum(y == c)) for c in range(4)}
  for same_class in (False, True):
    first, second, valid = (
      np.asarray(a) for a in adrmx.remix_pairs(jax.random.key(3), jnp.asarray(y), 4, same_class)
    )
    assert list(valid) == [counts[c] >= 2 for c in range(4)]
    for c in range(4):
      if valid[c]:
        assert first[c] != second[c]
        if same_class:
          assert y[first[c]] == c and y[second[c]] == c
        else:  # DomainBed's: positions in the class's index list, used as batch indices
          assert first[c] < counts[c] and second[c] < counts[c]


def nonlinear_explicit(p, z):
  for name in ("dense0", "dense1"):
    z = jax.nn.relu(z @ p[name]["kernel"] + p[name]["bias"])
  return z @ p["dense2"]["kernel"] + p["dense2"]["bias"]


def mlp_explicit(p, z):
  names = sorted(p, key=lambda k: int(k[5:]))
  for name in names[:-1]:
    z = jax.nn.relu(z @ p[name]["kernel"] + p[name]["bias"])
  return z @ p[names[-1]]["kernel"] + p[names[-1]]["bias"]


def ce_rows(logits, labels):
  return jnp.mean(
    jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  )


def test_adrmx_alternating_steps_match_reference():
  """DomainBed's ADRMX.update written out (networks applied from their parameters; the
  SupCon terms by the vectorised loss tested above); with d_steps_per_g_step = 2, step 0 is a
  discriminator step (the model and its Adam state stay) and step 1 a generator step."""
  from dgjax.algorithms import adrmx

  assert [bool(adrmx.is_discriminator_step(t, 2)) for t in range(6)] == [
    True,
    False,
    True,
    True,
    False,
    True,
  ]  # DomainBed's update_count % 3 < 2
  with jax.enable_x64(True):
    model, params, batch = problem(classes=2, seed=8, hidden=(8,))
    ctx = context(
      "adrmx",
      model,
      3,
      mlp_width=7,
      mlp_depth=3,
      dclf_lambda=0.7,
      rmxd_lambda=1.3,
      cnt_lambda=0.4,
      disc_lambda=0.75,
      lr=0.01,
      beta1=0.5,
    )
    step = methods.get_method("adrmx").build(ctx)
    state = to64(step.init(params, jax.random.key(0)))
    gen, disc = state.source.generator.params, state.source.discriminator.params
    y = batch["y"].reshape(-1)
    dom = jnp.repeat(jnp.arange(3), 4)
    key = jax.random.key(11)
    first, second, valid = (
      np.asarray(a) for a in adrmx.remix_pairs(jax.random.split(key)[0], y, 2)
    )

    def losses(p, gp, dp):
      feat = lambda fp: jnp.concatenate(
        [
          model.apply({"params": {**p, "featurizer": fp}}, batch["x"][d], method="features")
          for d in range(3)
        ]
      )
      z_l, z_d = feat(p["featurizer"]), feat(gp["featurizer_domain"])
      z = z_l - z_d
      disc_loss = ce_rows(mlp_explicit(dp, z), dom)
      remix = (
        sum(
          ce_rows(
            nonlinear_explicit(gp["classifier_label_1"], (z[first[c]] + z_d[second[c]])[None]),
            y[first[c]][None],
          )
          for c in range(2)
          if valid[c]
        )
        / 2
      )
      supcon = lambda f: adrmx.supcon_lambda_loss(f, y, dom)
      gen_loss = (
        ce_rows(nonlinear_explicit(gp["classifier_label_1"], z_l), y)
        + ce_rows(nonlinear_explicit(gp["classifier_label_2"], z), y)
        + 0.7 * ce_rows(nonlinear_explicit(gp["classifier_domain"], z_d), dom)
        + 1.3 * remix
        + 0.4 * (supcon(z_l) + supcon(z))
        - 0.75 * disc_loss
      )
      return gen_loss, disc_loss

    @fast_jit
    def reference(p, gp, dp):
      (gen_loss, disc_loss) = losses(p, gp, dp)
      g_disc = jax.grad(lambda d_: losses(p, gp, d_)[1])(dp)
      g_ref, g_gen = jax.grad(lambda p_, g_: losses(p_, g_, dp)[0], argnums=(0, 1))(p, gp)
      return gen_loss, disc_loss, g_disc, g_ref, g_gen

    gen_loss, disc_loss, g_disc, g_ref, g_gen = reference(params, gen, disc)
    adam = lambda p_, g_: p_ - 0.01 * g_ / (jnp.abs(g_) + 1e-8)  # Adam's first step, any betas
    update = fast_jit(step.update)
    count = lambda st: int(optax.tree_utils.tree_get_all_with_path(st.optimizer, "count")[0][1])

    # step 0: discriminator
    updates, new, metrics = update(params, state, batch, jnp.asarray(0), key)
    assert float(metrics["discriminator_step"]) == 1.0 and count(new) == 0
    close(metrics["loss_disc"], disc_loss, rtol=1e-10)
    close(metrics["loss"], gen_loss, rtol=1e-10)
    close(updates, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)
    close(new.source.generator.params, gen, rtol=0, atol=0)
    close(new.source.discriminator.params, jax.tree.map(adam, disc, g_disc), rtol=1e-8)

    # step 1: generator (from the same state)
    updates, new, metrics = update(params, state, batch, jnp.asarray(1), key)
    assert float(metrics["discriminator_step"]) == 0.0 and count(new) == 1
    close(jax.tree.map(jnp.add, params, updates), jax.tree.map(adam, params, g_ref), rtol=1e-8)
    assert np.all(np.asarray(g_ref["classifier"]["kernel"]) == 0)  # the model's head is unused
    close(new.source.generator.params, jax.tree.map(adam, gen, g_gen), rtol=1e-8)
    close(new.source.discriminator.params, disc, rtol=0, atol=0)
    # predict = classifier_label_1(featurizer(x))
    x = batch["x"][0]
    c1 = new.source.generator.params["classifier_label_1"]
    close(
      step.predict(params, new, x),
      nonlinear_explicit(c1, model.apply({"params": params}, x, method="features")),
    )


def test_adrmx_domain_featurizer_redraw_keeps_shapes_and_norm_leaves():
  from dgjax.algorithms import adrmx

  p = {
    "conv1": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)},
    "bn0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    "dense0": {"kernel": jnp.zeros((16, 5)), "bias": jnp.zeros(5)},
  }
  q = adrmx.redraw_torch_init(p, jax.random.key(1))
  assert jax.tree.structure(p) == jax.tree.structure(q)
  for name in p:
    for leaf in p[name]:
      a, b = np.asarray(p[name][leaf]), np.asarray(q[name][leaf])
      assert a.shape == b.shape
      if name == "bn0":
        assert np.array_equal(a, b)  # GroupNorm scale / bias kept
      else:
        bound = 1 / np.sqrt(np.prod(p[name]["kernel"].shape[:-1]))
        assert np.all(b != 0) and np.abs(b).max() <= bound and np.abs(b).max() > bound / 2
