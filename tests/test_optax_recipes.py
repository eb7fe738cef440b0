"""optax wrappers around dgjax's transforms (issue 11), and the README's "optax recipes".

One test per observation: masks fed gradients without a domain axis; masks inside
optax.MultiSteps / optax.apply_if_finite; gradient accumulation equal to the big batch; the
Hessian transforms inside optax.MultiSteps; CMA with a head whose leaves are not named
kernel/bias. The README snippets are executed from README.md itself.
"""

import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dgjax
from dgjax import hessian
from dgjax import methods
from dgjax.masks import accumulate_per_domain

try:  # jax >= 0.8 moved the context manager to the top level
  from jax import enable_x64
except ImportError:  # pragma: no cover
  from jax.experimental import enable_x64

README = Path(__file__).resolve().parent.parent / "README.md"
D, B, D_IN, K, C = 3, 4, 3, 4, 2


def readme_recipe(name: str) -> str:
  """The python block of README's "## optax recipes" section whose first line is ``# recipe: name``."""
  text = README.read_text()
  start = text.index("\n## optax recipes\n")
  end = text.index("\n## ", start + 1)
  blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
  found = [b for b in blocks if b.startswith(f"# recipe: {name}\n")]
  assert len(found) == 1, f"README optax recipes: no single snippet named {name!r}"
  return found[0]


def run_recipe(name: str, namespace: dict, edit=lambda code: code) -> dict:
  ns = {"jax": jax, "jnp": jnp, "optax": optax, "dgjax": dgjax, **namespace}
  exec(compile(edit(readme_recipe(name)), f"README:{name}", "exec"), ns)
  return ns


# ------------------------------------------------------------------ a tiny MLP, D domains
def tiny_params(key, dtype=jnp.float32):
  ks = jax.random.split(key, 4)
  return {
    "featurizer": {
      "w": jax.random.normal(ks[0], (D_IN, K), dtype),
      "b": 0.1 * jax.random.normal(ks[1], (K,), dtype),
    },
    "classifier": {
      "kernel": jax.random.normal(ks[2], (K, C), dtype),
      "bias": 0.1 * jax.random.normal(ks[3], (C,), dtype),
    },
  }


def tiny_batches(key, num, b=B, dtype=jnp.float32):
  """``num`` micro-batches with leaves [D, b, ...]."""
  out = []
  for k in jax.random.split(key, num):
    kx, ky = jax.random.split(k)
    out.append(
      {"x": jax.random.normal(kx, (D, b, D_IN), dtype), "y": jax.random.randint(ky, (D, b), 0, C)}
    )
  return out


def concat(*batches):
  """One batch of the micro-batches' examples (along the per-domain example axis)."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *batches)


def features(params, x):
  return jnp.tanh(x @ params["featurizer"]["w"] + params["featurizer"]["b"])


def obj_fn(head, d):
  return methods.cross_entropy(d["z"] @ head["kernel"] + head["bias"], d["y"])


def head_inputs(params, batch):
  return {"z": features(params, batch["x"]), "y": batch["y"]}


def loss_fn(params, domain_batch):
  return obj_fn(params["classifier"], head_inputs(params, domain_batch))


# ------------------------------------------------------------------ masks: per-domain input
MASKS = {
  "and": lambda: dgjax.and_mask(0.5),
  "sand": lambda: dgjax.sand_mask(0.5, 10.0),
  "mean": dgjax.mean_over_domains,
}


@pytest.mark.parametrize("mask", MASKS)
def test_mask_fed_plain_grad_raises_naming_the_leaf(mask):
  """Observed: a mask fed ordinary jax.grad output trained silently (first axis taken as D)."""
  params = tiny_params(jax.random.key(0))
  batch = tiny_batches(jax.random.key(1), 1)[0]
  plain = jax.grad(lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)))(params)
  tx = MASKS[mask]()
  with pytest.raises(
    ValueError,
    match=r"leading domain axis.*\['classifier'\]\['bias'\]: "
    r"gradient \(2,\), param \(2,\).*jax\.grad",
  ):
    jax.jit(tx.update)(plain, tx.init(params), params)
  # one leaf with the wrong D, or a wrong trailing shape: named too
  good = dgjax.per_domain_grads(loss_fn, params, batch)
  bad_d = {**good, "classifier": {**good["classifier"], "bias": good["classifier"]["bias"][:2]}}
  with pytest.raises(ValueError, match=r"disagree on the number of domains.*\[2, 3\]"):
    tx.update(bad_d, tx.init(params), params)
  bad_shape = {**good, "featurizer": {**good["featurizer"], "w": good["featurizer"]["w"][:, :2]}}
  with pytest.raises(
    ValueError, match=r"\['featurizer'\]\['w'\]: gradient \(3, 2, 4\), param \(3, 4\)"
  ):
    tx.update(bad_shape, tx.init(params), params)
  # without params: the leaves must still share one leading axis
  with pytest.raises(ValueError, match=r"leading domain axis D shared by every leaf.*Pass params"):
    tx.update(plain, tx.init(params))
  # the right input passes, with and without params
  out, _ = tx.update(good, tx.init(params), params)
  chex.assert_trees_all_close(out, tx.update(good, tx.init(params))[0])


def test_readme_per_domain_gradients_recipe():
  params = tiny_params(jax.random.key(0))
  batch = tiny_batches(jax.random.key(1), 1)[0]
  ns = run_recipe("per-domain gradients", {"loss_fn": loss_fn, "params": params, "batch": batch})
  want = [jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[d], batch)) for d in range(D)]
  chex.assert_trees_all_close(
    ns["grads"], jax.tree.map(lambda *g: jnp.stack(g), *want), rtol=1e-5, atol=1e-6
  )
  chex.assert_tree_shape_prefix(ns["updates"], ())
  chex.assert_trees_all_equal_shapes(ns["updates"], params)


# ------------------------------------------------------------------ accumulation
def test_mask_inside_multisteps_raises_clearly():
  """Observed: MultiSteps(chain(sand_mask, adam)) failed with 'cond branches must have equal
  output types'."""
  params = tiny_params(jax.random.key(0))
  grads = dgjax.per_domain_grads(loss_fn, params, tiny_batches(jax.random.key(1), 1)[0])
  for mask in MASKS.values():
    tx = optax.MultiSteps(optax.chain(mask(), optax.adam(1e-3)), every_k_schedule=2)
    with pytest.raises(
      ValueError, match=r"cannot sit inside optax\.MultiSteps.*accumulate_per_domain"
    ):
      jax.jit(tx.update)(grads, tx.init(params), params)


@pytest.mark.parametrize("mask", MASKS)
def test_accumulated_per_domain_grads_give_the_big_batch_update(mask):
  """The mask of the accumulated per-domain gradients of 2 micro-batches of B equals the
  update of one batch of 2B (mean losses); SGD, so the update is the masked gradient itself."""
  with enable_x64():
    params = tiny_params(jax.random.key(0), jnp.float64)
    micro = tiny_batches(jax.random.key(1), 4, dtype=jnp.float64)
    acc = accumulate_per_domain(
      optax.chain(MASKS[mask](), optax.sgd(0.5)), 2, num_domains=D, accumulator_dtype=jnp.float64
    )
    big = optax.chain(MASKS[mask](), optax.sgd(0.5))
    acc_state, big_state = acc.init(params), big.init(params)
    update = jax.jit(acc.update)
    p_acc, p_big = params, params
    for i in range(2):
      first, acc_state = update(
        dgjax.per_domain_grads(loss_fn, p_acc, micro[2 * i]), acc_state, p_acc
      )
      chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, params))
      u_acc, acc_state = update(
        dgjax.per_domain_grads(loss_fn, p_acc, micro[2 * i + 1]), acc_state, p_acc
      )
      big_grads = dgjax.per_domain_grads(loss_fn, p_big, concat(micro[2 * i], micro[2 * i + 1]))
      u_big, big_state = big.update(big_grads, big_state, p_big)
      chex.assert_trees_all_close(u_acc, u_big, rtol=1e-10, atol=1e-13)
      assert float(optax.tree.norm(u_big)) > 0
      p_acc, p_big = optax.apply_updates(p_acc, u_acc), optax.apply_updates(p_big, u_big)
    assert int(acc_state.gradient_step) == 2 and int(acc_state.mini_step) == 0
    if mask == "sand":  # the wrong form (mean of masks) differs: the test can tell them apart
      naive = optax.chain(MASKS[mask](), optax.MultiSteps(optax.sgd(0.5), 2))
      s = naive.init(params)
      _, s = naive.update(dgjax.per_domain_grads(loss_fn, params, micro[0]), s, params)
      u_naive, _ = naive.update(dgjax.per_domain_grads(loss_fn, params, micro[1]), s, params)
      u_first = big.update(
        dgjax.per_domain_grads(loss_fn, params, concat(micro[0], micro[1])),
        big.init(params),
        params,
      )[0]
      assert float(optax.tree.norm(optax.tree.sub(u_naive, u_first))) > 1e-3


def test_readme_accumulation_recipe_matches_big_batches_with_adam():
  with enable_x64():
    params = tiny_params(jax.random.key(2), jnp.float64)
    micro = tiny_batches(jax.random.key(3), 4, dtype=jnp.float64)
    ns = run_recipe(
      "accumulate micro-batches",
      {"loss_fn": loss_fn, "params": params, "micro_batches": micro, "D": D},
    )
    tx = optax.chain(dgjax.sand_mask(tau=0.5, k=10.0), optax.adam(1e-3))
    state, p = tx.init(params), params
    for i in range(2):
      u, state = tx.update(
        dgjax.per_domain_grads(loss_fn, p, concat(*micro[2 * i : 2 * i + 2])), state, p
      )
      p = optax.apply_updates(p, u)
    chex.assert_trees_all_close(ns["params"], p, rtol=1e-6, atol=1e-9)  # float32 accumulator
    assert float(optax.tree.norm(optax.tree.sub(p, params))) > 1e-4


def test_accumulate_per_domain_checks_its_input():
  params = tiny_params(jax.random.key(0))
  grads = dgjax.per_domain_grads(loss_fn, params, tiny_batches(jax.random.key(1), 1)[0])
  tx = accumulate_per_domain(optax.chain(dgjax.sand_mask(), optax.adam(1e-3)), 2, num_domains=D)
  with pytest.raises(ValueError, match="built for num_domains=3; the gradients have D = 2"):
    tx.update(jax.tree.map(lambda g: g[:2], grads), tx.init(params), params)
  with pytest.raises(ValueError, match="jax.grad"):
    tx.update(jax.tree.map(lambda g: g[0], grads), tx.init(params), params)
  with pytest.raises(ValueError, match="pass params"):
    tx.update(grads, tx.init(params))
  with pytest.raises(ValueError, match="every_k_schedule must be a positive int"):
    accumulate_per_domain(optax.sgd(1.0), 0, num_domains=D)
  with pytest.raises(ValueError, match="num_domains must be a positive int"):
    accumulate_per_domain(optax.sgd(1.0), 2, num_domains=0)
  # a schedule: 1 micro-batch for the first update, then 3
  tx = accumulate_per_domain(
    optax.chain(dgjax.mean_over_domains(), optax.sgd(1.0)),
    lambda step: jnp.where(step == 0, 1, 3),
    num_domains=D,
  )
  state = tx.init(params)
  emitted = []
  for _ in range(4):
    u, state = jax.jit(tx.update)(grads, state, params)
    emitted.append(float(optax.tree.norm(u)) > 0)
  assert emitted == [True, False, False, True]


def test_inject_hyperparams_wraps_a_mask():
  """Wrappers that keep the chain's structure work around a mask as is (README)."""
  params = tiny_params(jax.random.key(0))
  grads = dgjax.per_domain_grads(loss_fn, params, tiny_batches(jax.random.key(1), 1)[0])
  tx = optax.chain(optax.inject_hyperparams(dgjax.sand_mask)(tau=0.3, k=5.0), optax.adam(1e-3))
  ref = optax.chain(dgjax.sand_mask(tau=0.3, k=5.0), optax.adam(1e-3))
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_close(u, ref.update(grads, ref.init(params), params)[0], rtol=1e-6)
  assert float(state[0].hyperparams["tau"]) == pytest.approx(0.3)


# ------------------------------------------------------------------ apply_if_finite
def test_mask_inside_apply_if_finite_raises_clearly():
  """Observed: apply_if_finite(chain(sand_mask, adam)) failed with 'cond branches must have
  equal output types'."""
  params = tiny_params(jax.random.key(0))
  grads = dgjax.per_domain_grads(loss_fn, params, tiny_batches(jax.random.key(1), 1)[0])
  tx = optax.apply_if_finite(optax.chain(dgjax.sand_mask(), optax.adam(1e-3)), 3)
  with pytest.raises(ValueError, match=r"inside optax\.apply_if_finite.*after the mask"):
    jax.jit(tx.update)(grads, tx.init(params), params)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_readme_apply_if_finite_recipe_skips_a_non_finite_step(bad):
  params = tiny_params(jax.random.key(0))
  g1, g2, g3 = (
    dgjax.per_domain_grads(loss_fn, params, b) for b in tiny_batches(jax.random.key(1), 3)
  )
  # one entry of one domain's gradient is non-finite
  g2 = {**g2, "featurizer": {**g2["featurizer"], "w": g2["featurizer"]["w"].at[1, 0, 2].set(bad)}}
  tx = run_recipe("apply_if_finite", {})["tx"]
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(g1, state, params)
  u2, state2 = update(g2, state, params)
  chex.assert_trees_all_equal(u2, jax.tree.map(jnp.zeros_like, params))  # skipped
  chex.assert_trees_all_equal(state2[1].inner_state, state[1].inner_state)  # Adam kept
  assert int(state2[1].notfinite_count) == 1 and int(state2[1].total_notfinite) == 1
  u3, _ = update(g3, state2, params)
  # as if the bad step had never happened
  ref = optax.chain(dgjax.sand_mask(tau=0.5, k=10.0), optax.adam(1e-3))
  ref_state = ref.update(g1, ref.init(params), params)[1]
  chex.assert_trees_all_close(u3, ref.update(g3, ref_state, params)[0], rtol=1e-6)


# ------------------------------------------------------------------ Hessian transforms
ALIGNMENT = {
  "hgp": lambda: hessian.hessian_gradient_product(alpha=1.0, beta=1.0),
  "hutchinson": lambda: hessian.hutchinson(num_samples=2),
  "cma": lambda: hessian.moment_alignment(),
}


@pytest.mark.parametrize("name", ALIGNMENT)
def test_hessian_transform_inside_multisteps_raises_clearly(name):
  """Observed: MultiSteps(chain(hessian_gradient_product, ...)) ran, taking the penalty gradient
  from the last micro-batch only."""
  params = tiny_params(jax.random.key(0))
  batch = tiny_batches(jax.random.key(1), 1)[0]
  mean_grads = jax.tree.map(
    lambda g: jnp.mean(g, 0), dgjax.per_domain_grads(loss_fn, params, batch)
  )
  extra = dict(obj_fn=obj_fn, head_inputs=lambda p: head_inputs(p, batch))
  tx = optax.MultiSteps(optax.chain(ALIGNMENT[name](), optax.adam(1e-3)), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"cannot sit inside optax\.MultiSteps.*last micro-batch"):
    tx.update(mean_grads, tx.init(params), params, **extra)
  if name == "hgp":  # behind a mask in dgjax's accumulator: refused too
    grads = dgjax.per_domain_grads(loss_fn, params, batch)
    tx = accumulate_per_domain(
      optax.chain(dgjax.mean_over_domains(), ALIGNMENT[name](), optax.adam(1e-3)), 2, num_domains=D
    )
    with pytest.raises(ValueError, match=r"inside dgjax\.masks\.accumulate_per_domain"):
      tx.update(grads, tx.init(params), params, **extra)
    # apply_if_finite keeps the updates' shape, so it wraps these transforms as is
    tx = optax.apply_if_finite(optax.chain(ALIGNMENT[name](), optax.sgd(1.0)), 2)
    plain = optax.chain(ALIGNMENT[name](), optax.sgd(1.0))
    chex.assert_trees_all_close(
      tx.update(mean_grads, tx.init(params), params, **extra)[0],
      plain.update(mean_grads, plain.init(params), params, **extra)[0],
      rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["hgp", "cma"])
def test_readme_one_pass_penalty_accumulation_equals_the_transform(name):
  """The README's one-pass form (grad of loss + w * penalty per micro-batch, plain MultiSteps)
  equals Adam fed the mean over the micro-batches of the transform's output on each."""
  w = 3.0
  with enable_x64():
    params = tiny_params(jax.random.key(4), jnp.float64)
    micro = tiny_batches(jax.random.key(5), 4, dtype=jnp.float64)
    edit = (lambda code: code) if name == "hgp" else (lambda code: code.replace("# CMA: ", ""))
    ns = run_recipe(
      "accumulate a Hessian-alignment penalty",
      {
        "obj_fn": obj_fn,
        "head_inputs": head_inputs,
        "w": w,
        "params": params,
        "micro_batches": micro,
      },
      edit,
    )
    make = {
      "hgp": lambda: hessian.hessian_gradient_product(alpha=1.0, beta=1.0, weight=w),
      "cma": lambda: hessian.moment_alignment(alpha=1.0, beta=1.0, weight=w),
    }[name]
    transform, adam = make(), optax.adam(1e-3)
    adam_state, p = adam.init(params), params
    for i in range(2):
      outs = []
      for b in micro[2 * i : 2 * i + 2]:
        mean_grads = jax.tree.map(lambda g: jnp.mean(g, 0), dgjax.per_domain_grads(loss_fn, p, b))
        out, _ = transform.update(
          mean_grads,
          transform.init(p),
          p,
          obj_fn=obj_fn,
          head_inputs=lambda q, b=b: head_inputs(q, b),
        )
        outs.append(out)
      u, adam_state = adam.update(jax.tree.map(lambda a, b: (a + b) / 2, *outs), adam_state, p)
      p = optax.apply_updates(p, u)
    chex.assert_trees_all_close(ns["params"], p, rtol=1e-9, atol=1e-12)
    # and the penalty mattered
    assert float(optax.tree.norm(optax.tree.sub(ns["params"], params))) > 1e-4


# ------------------------------------------------------------------ CMA with any linear head
def renamed(head, kernel="w", bias="b"):
  return {kernel: head["kernel"], bias: head["bias"]}


def test_cma_takes_any_linear_head():
  """Observed: moment_alignment needed leaves named kernel/bias (bare KeyError otherwise)."""
  with enable_x64():
    params = tiny_params(jax.random.key(6), jnp.float64)
    batch = tiny_batches(jax.random.key(7), 1, dtype=jnp.float64)[0]
    inputs = head_inputs(params, batch)
    head = params["classifier"]
    want = hessian.cma_terms(head, inputs)
    for other in (renamed(head), {"dense": {"weights": head["kernel"], "offset": head["bias"]}}):
      chex.assert_trees_all_close(hessian.cma_terms(other, inputs), want, rtol=1e-12)
    grad, hdiag = hessian.linear_head_moments(renamed(head), inputs["z"][0], inputs["y"][0])
    assert set(grad) == set(hdiag) == {"w", "b"}
    # no bias: moments of logits = z @ W, checked against autodiff
    f = lambda wk: methods.cross_entropy(inputs["z"][0] @ wk, inputs["y"][0])
    grad, hdiag = hessian.linear_head_moments({"W": head["kernel"]}, inputs["z"][0], inputs["y"][0])
    np.testing.assert_allclose(grad["W"], jax.grad(f)(head["kernel"]), rtol=1e-10)
    dense = jax.hessian(f)(head["kernel"]).reshape(K * C, K * C)
    np.testing.assert_allclose(hdiag["W"].ravel(), jnp.diag(dense), rtol=1e-10)

    # the README recipe: the same update as the kernel/bias head, by name and by function
    ns = run_recipe("CMA with any linear head", {"hessian": hessian})
    base = optax.chain(hessian.moment_alignment(alpha=1.0, beta=1.0), optax.adam(1e-3))
    mean_grads = jax.tree.map(
      lambda g: jnp.mean(g, 0), dgjax.per_domain_grads(loss_fn, params, batch)
    )
    want_u = base.update(
      mean_grads, base.init(params), params, head_inputs=lambda p: head_inputs(p, batch)
    )[0]
    to_fc = lambda t: {"featurizer": t["featurizer"], "fc": renamed(t["classifier"])}
    to_fc_t = lambda t: {
      "featurizer": t["featurizer"],
      "fc_t": {"weight": t["classifier"]["kernel"].T, "bias": t["classifier"]["bias"]},
    }
    for tx, convert in ((ns["tx"], to_fc), (ns["tx_transposed"], to_fc_t)):
      p = convert(params)
      u = tx.update(
        convert(mean_grads), tx.init(p), p, head_inputs=lambda q: head_inputs(q, batch)
      )[0]
      chex.assert_trees_all_close(u, convert(want_u), rtol=1e-9, atol=1e-12)


def test_cma_rejects_a_head_that_is_not_linear():
  params = tiny_params(jax.random.key(0))
  inputs = head_inputs(params, tiny_batches(jax.random.key(1), 1)[0])
  head = params["classifier"]
  mlp_head = {"hidden": {"w": jnp.ones((K, K))}, "out": renamed(head)}
  with pytest.raises(
    ValueError, match=r"need a linear head.*\['hidden'\]\['w'\]: \(4, 4\).*not linear"
  ):
    hessian.cma_terms(mlp_head, inputs)
  with pytest.raises(ValueError, match="need a linear head"):
    hessian.cma_terms({"k": head["kernel"][None]}, inputs)  # a 3-D leaf
  with pytest.raises(ValueError, match=r"bias \['b'\] has shape \(3,\).*needs \[C\] = \(2,\)"):
    hessian.cma_terms({"w": head["kernel"], "b": jnp.zeros(3)}, inputs)
  with pytest.raises(ValueError, match=r"do not match the kernel \(2, 4\).*transposed"):
    hessian.cma_terms({"w": head["kernel"].T}, inputs)
  tx = hessian.moment_alignment(head="featurizer")  # a layer not fed z
  with pytest.raises(ValueError, match="do not match the kernel"):
    tx.update(params, tx.init(params), params, head_inputs=inputs)


def test_readme_first_snippet_runs_as_written():
  """README's "In your own JAX code" block is self-contained: it defines its model, params and
  loss, and one masked step runs and moves the params."""
  text = README.read_text()
  start = text.index("\n## In your own JAX code\n")
  code = re.findall(r"```python\n(.*?)```", text[start:], flags=re.S)[0]
  ns: dict = {}
  exec(compile(code, "README:In your own JAX code", "exec"), ns)
  assert ns["losses"].shape == (3,) and bool(jnp.all(jnp.isfinite(ns["losses"])))
  assert 0.0 < float(ns["opt_state"][0].kept_fraction) <= 1.0


def test_head_selector_names_a_missing_head():
  """moment_alignment & co. given model.init's {'params': ...} say so instead of a bare KeyError."""
  wrapped = {"params": tiny_params(jax.random.key(0))}
  with pytest.raises(
    KeyError, match=r"no key 'classifier' .*found \['params'\].*pass its \['params'\]"
  ):
    hessian.head_selector()(wrapped)
