"""ARM and TRM over several steps against DomainBed's ``update`` written out line by line,
quirks included, in float64 (issue 17, item 2).

* ARM: DomainBed's one Adam is built by ``ERM.__init__`` over ``self.network`` (the
  ``C + 1``-channel first convolution included) before ``ARM.__init__`` creates
  ``self.context_net``, so the context net never trains; only its BatchNorm running statistics
  move. ``train_context_net`` (the paper) adds it to the Adam.
* TRM: ``loss_P`` is weighted by ``self.alpha[Q, i].data.detach()``, which shares storage with
  ``alpha``; ``alpha`` is updated in place before ``loss_swap.backward()``, so the value uses
  this step's alpha and the gradient the updated one (``alias_alpha_weight``; false: the
  paper, DomainBed with ``.clone()``). TRM runs in float64 (its ``alpha`` follows the params'
  dtype).

The references keep DomainBed's objects as plain state (network, context net, running
statistics, heads, alpha, Adam) and mutate them in DomainBed's order. Helpers come from the
single-step tests of these methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import core, methods
from dgjax.models import mlp
from test_algorithms_algos_a import (
  NUM_CLASSES,
  _close,
  _context_reference,
  _conv,
  _jitted,
  _tiny_conv_model,
  _torch_adam_first_steps,
  optax_apply,
)
from test_algorithms_algos_b import ref_features, ref_head_grad, ref_head_hvp

STEPS = 2  # the second step sees Adam's moments, moved statistics, alpha and heads


def _f_cross_entropy(logits, y, xp=jnp):
  """``F.cross_entropy``: the minibatch mean of ``logsumexp - logit[y]`` (``xp``: jnp or np)."""
  top = logits.max(axis=-1, keepdims=True)
  logsumexp = xp.log(xp.exp(logits - top).sum(axis=-1)) + top[:, 0]
  return xp.mean(logsumexp - logits[xp.arange(len(y)), y])


def _jitted_init(model, x):
  """The model's params in float64, initialised in one compiled program (eager flax init
  compiles every initializer separately)."""
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  return jax.tree.map(lambda p: p.astype(jnp.float64), params)


# ----------------------------------------------------------------------------- ARM
def _domainbed_arm_predict(network, context_net, stats, x, support_size, train):
  """DomainBed's ``ARM.predict`` on NHWC ``x``: the context net (training mode: batch
  statistics, running statistics updated), its mean per support set, ``torch.cat`` as an
  extra channel, then ``self.network`` with ONE ``C + 1``-channel first convolution.
  Returns ``(logits, new running statistics)``."""
  n = x.shape[0]
  if n % support_size == 0:
    meta_batch_size, support = n // support_size, support_size
  else:
    meta_batch_size, support = 1, n
  context, new_stats = _context_reference(context_net, stats, x, train)
  context = context.reshape((meta_batch_size, support) + context.shape[1:]).mean(axis=1)
  context = jnp.repeat(context, support, axis=0)  # torch.repeat_interleave
  conv1 = network["featurizer"]["conv1"]
  h = _conv(jnp.concatenate([x, context], axis=-1), conv1["kernel"], conv1["bias"])
  z = jnp.mean(jnp.maximum(h, 0.0), axis=(1, 2))
  return z @ network["classifier"]["kernel"] + network["classifier"]["bias"], new_stats


def _as_domainbed_network(params, extra):
  """dgjax's network + context-channel kernel as DomainBed's one ``C + 1``-channel network."""
  conv1 = params["featurizer"]["conv1"]
  kernel = jnp.concatenate([conv1["kernel"], extra["context_kernel"]], axis=2)
  return {
    "featurizer": {"conv1": {"kernel": kernel, "bias": conv1["bias"]}},
    "classifier": params["classifier"],
  }


@pytest.mark.parametrize("train_context_net", [False, True])
def test_arm_steps_match_domainbeds_update(train_context_net):
  d, b = 2, 3
  with jax.enable_x64(True):
    method = methods.get_method("arm")
    hp = core.resolve_hparams(
      method,
      overrides={
        "batch_size": b,
        "lr": 1e-2,
        "weight_decay": 0.01,
        "train_context_net": train_context_net,
      },
    )
    model = _tiny_conv_model()
    params = _jitted_init(model, jnp.zeros((1, 5, 5, 2)))
    step = _jitted(method.build(core.Context(model=model, hparams=hp, num_domains=d)))
    state = jax.jit(step.init)(params, jax.random.key(0))
    rng = np.random.RandomState(1)
    batches = [
      {
        "x": jnp.asarray(rng.randn(d, b, 5, 5, 2)),
        "y": jnp.asarray(rng.randint(0, NUM_CLASSES, (d, b)).astype(np.int32)),
      }
      for _ in range(STEPS)
    ]

    # DomainBed: ERM.__init__ builds network and Adam(network); then ARM builds context_net
    context_net0 = state.source.extra["context_net"]
    ref = {"stats": state.source.batch_stats, "losses": [], "stats_after": []}
    adam_holds = {"network": _as_domainbed_network(params, state.source.extra)}
    if train_context_net:  # the paper: the context net in the same Adam
      adam_holds["context_net"] = context_net0

    def loss_fn(held, stats, x, y):
      context_net = held.get("context_net", context_net0)
      logits, new_stats = _domainbed_arm_predict(
        held["network"], context_net, stats, x, b, train=True
      )
      return _f_cross_entropy(logits, y), new_stats

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def domainbed_update(batch):  # ERM.update: cat minibatches, CE(predict(x)), backward
      def grads(held):
        all_x = batch["x"].reshape((d * b,) + batch["x"].shape[2:])
        all_y = batch["y"].reshape(d * b)
        (loss, new_stats), g = value_and_grad(held, ref["stats"], all_x, all_y)
        ref["stats"] = new_stats  # the training-mode forward moved them
        ref["losses"].append(loss)
        ref["stats_after"].append(new_stats)
        return g

      return grads

    held_after = _torch_adam_first_steps(
      [domainbed_update(bt) for bt in batches], adam_holds, hp["lr"], hp["weight_decay"]
    )

    for t, batch in enumerate(batches):
      updates, state, metrics = step.update(params, state, batch, jnp.int32(t), jax.random.key(t))
      params = optax_apply(params, updates)
      _close(
        _as_domainbed_network(params, state.source.extra),
        held_after[t]["network"],
        rtol=1e-9,
        atol=1e-12,
      )
      context_net = held_after[t].get("context_net", context_net0)
      _close(state.source.extra["context_net"], context_net, rtol=1e-9, atol=1e-12)
      _close(state.source.batch_stats, ref["stats_after"][t], rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(metrics["loss"], ref["losses"][t], rtol=1e-10)
    moved = max(
      float(jnp.max(jnp.abs(u - v)))
      for u, v in zip(
        jax.tree.leaves(state.source.extra["context_net"]), jax.tree.leaves(context_net0)
      )
    )
    assert (moved > 1e-3) if train_context_net else (moved == 0.0), moved

    # prediction: the running statistics; groups of batch_size when they divide len(x), else one
    for n in (2 * b, 2 * b - 1):
      x = jnp.asarray(rng.randn(n, 5, 5, 2))
      want, _ = _domainbed_arm_predict(
        held_after[-1]["network"], context_net, ref["stats"], x, b, train=False
      )
      _close(step.predict(params, state, x), want, rtol=1e-9, atol=1e-12)


def test_arm_paper_preset_trains_the_context_net():
  method = methods.get_method("arm")
  assert core.resolve_hparams(method)["train_context_net"] is False
  assert core.resolve_hparams(method, preset="paper")["train_context_net"] is True
  assert "train_context_net" in core.structural_hparams(method)


# ----------------------------------------------------------------------------- TRM
D, B = 3, 4
COS_LAMBDA, ETA = 0.3, 0.5  # iters = 0: every step is a TRM step (ERM's: test_algos_b)


def _features(p, x):  # the featurizer on a minibatch [N, IN] -> [N, HID]
  return jax.vmap(lambda xi: ref_features(p, xi))(x)


_features_jit = jax.jit(_features)


def _trm_objective(p, w, heads, hs, x, y):
  """``loss + loss_swap`` of one ``TRM.update`` as a function of the network: ``w`` the
  weights that multiply ``loss_P`` (``alpha[Q, i].data``); ``heads`` (``clist``) and ``hs``
  (``vec_grad_P``) are constants. Returns ``(loss + loss_swap, (loss, loss_swap))``."""
  feature_split = [_features(p, x[e]) for e in range(D)]
  linear = lambda head, f: f @ head["kernel"] + head["bias"]
  loss = _f_cross_entropy(linear(p["classifier"], jnp.concatenate(feature_split)), y.reshape(-1))
  loss_swap = 0.0
  for q in range(D):
    sample_list = [i for i in range(D) if i != q]
    # grad_Q = autograd.grad(loss_Q, W_Q, create_graph=True): differentiable in feature_Q
    grad_q = jax.grad(
      lambda k: _f_cross_entropy(linear(dict(heads[q], kernel=k), feature_split[q]), y[q])
    )(heads[q]["kernel"])
    loss_p = [
      _f_cross_entropy(linear(heads[q], feature_split[i]), y[i]) * w[q, i] for i in sample_list
    ]
    loss_swap = loss_swap + sum(loss_p) - COS_LAMBDA * jnp.sum(hs[q] * grad_q)
  loss_swap = loss_swap / D
  return loss + loss_swap, (loss, loss_swap)


_trm_value_and_grad = jax.jit(jax.value_and_grad(_trm_objective, has_aux=True))


class _DomainBedTRM:
  """DomainBed's ``TRM`` object from ``update_count >= iters`` on: ``grads(batch)(params)``
  follows ``TRM.update`` statement by statement, mutating heads and alpha, and returns the
  gradient its ``loss_swap.backward()`` gives the featurizer/classifier Adams (Adam itself:
  :func:`_torch_adam_first_steps`). ``clone_alpha`` is the paper's form
  (``alpha[Q, i].data.clone()``); ``neum_clone`` the Neumann sum without the aliased first
  term."""

  def __init__(self, heads, alpha, clone_alpha, neum_clone):
    self.clist = heads  # [D] dicts of numpy kernel [F, C], bias [C]
    self.alpha = np.array(alpha)  # ones - eye
    self.clone_alpha, self.neum_clone = clone_alpha, neum_clone
    self.log = []

  def neum(self, v, head, zs):
    v = v.copy()  # v = v.detach()
    h_estimate = v.copy() if self.neum_clone else v  # DomainBed: the same tensor
    for _ in range(10):
      hv = ref_head_hvp(head["kernel"], head["bias"], zs, v)
      v -= hv  # in place: also h_estimate on the first pass
      h_estimate = v + h_estimate
      if np.max(np.abs(h_estimate)) > 10:
        break
    return h_estimate

  def grads(self, batch):
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])

    def update(p):  # update_count >= iters
      self.alpha /= self.alpha.sum(1, keepdims=True)
      feature_split = [np.asarray(_features_jit(p, x[e])) for e in range(D)]  # detached
      for _ in range(30):  # loss_erm.backward(); every olist[j].step()
        g_heads = [
          ref_head_grad(h["kernel"], h["bias"], feature_split[j], y[j])
          for j, h in enumerate(self.clist)
        ]
        for h, (gk, gb) in zip(self.clist, g_heads):
          h["kernel"] = h["kernel"] - 0.1 * gk
          h["bias"] = h["bias"] - 0.1 * gb
      w_forward = self.alpha.copy()  # the weights' values at loss_P's forward
      hs = []
      for q in range(D):
        sample_list = [i for i in range(D) if i != q]
        head = self.clist[q]
        loss_p = {
          i: _f_cross_entropy(feature_split[i] @ head["kernel"] + head["bias"], y[i], np)
          * self.alpha[q, i]
          for i in sample_list
        }
        grad_p = sum(
          self.alpha[q, i] * ref_head_grad(head["kernel"], head["bias"], feature_split[i], y[i])[0]
          for i in sample_list
        )
        hs.append(self.neum(grad_p, head, feature_split[q]))
        for i in sample_list:  # alpha[Q, i] *= exp(eta * loss_P[i].data)
          self.alpha[q, i] *= np.exp(ETA * loss_p[i])
      # loss_swap.backward(): the multiplication reads alpha[Q, i] now (aliased) or the clone
      w_backward = w_forward if self.clone_alpha else self.alpha.copy()
      assert self.clone_alpha or np.max(np.abs(w_backward - w_forward)) > 1e-2
      heads = [{k: jnp.asarray(v) for k, v in h.items()} for h in self.clist]
      hs = [jnp.asarray(h) for h in hs]
      (_, (nll, swap)), _ = _trm_value_and_grad(p, jnp.asarray(w_forward), heads, hs, x, y)
      _, g = _trm_value_and_grad(p, jnp.asarray(w_backward), heads, hs, x, y)
      self.log.append(
        {
          "nll": nll,
          "trm_loss": swap,
          "alpha": self.alpha.copy(),
          "heads": [dict(h) for h in self.clist],
        }
      )
      return g

    return update


@pytest.mark.parametrize("form", ["domainbed", "unaliased_alpha", "paper_preset"])
def test_trm_steps_match_domainbeds_update_in_float64(form):
  with jax.enable_x64(True):
    model = mlp(NUM_CLASSES, hidden=(5,))  # ref_features' network
    params = _jitted_init(model, jnp.zeros((1, 6)))
    rng = np.random.RandomState(9)
    batches = [
      {
        "x": jnp.asarray(rng.randn(D, B, 6)),
        "y": jnp.asarray(rng.randint(0, NUM_CLASSES, (D, B)).astype(np.int32)),
      }
      for _ in range(STEPS)
    ]
    assert params["classifier"]["kernel"].dtype == jnp.float64
    method = methods.get_method("trm")
    overrides = {
      "batch_size": B,
      "iters": 0,
      "cos_lambda": COS_LAMBDA,
      "groupdro_eta": ETA,
      "lr": 1e-2,
      "weight_decay": 0.01,
    }
    if form == "unaliased_alpha":
      overrides["alias_alpha_weight"] = False
    hp = core.resolve_hparams(
      method, overrides=overrides, preset="paper" if form == "paper_preset" else None
    )
    assert hp["alias_alpha_weight"] is (form == "domainbed")
    assert hp["alias_first_term"] is (form != "paper_preset")
    step = _jitted(method.build(core.Context(model=model, hparams=hp, num_domains=D)))
    state = jax.jit(step.init)(params, jax.random.key(0))
    assert state.source.alpha.dtype == jnp.float64

    ref = _DomainBedTRM(
      [{k: np.array(v[e]) for k, v in state.source.heads.items()} for e in range(D)],
      state.source.alpha,
      clone_alpha=not hp["alias_alpha_weight"],
      neum_clone=not hp["alias_first_term"],
    )
    net_after = _torch_adam_first_steps(
      [ref.grads(bt) for bt in batches], params, hp["lr"], hp["weight_decay"]
    )

    for t, batch in enumerate(batches):
      updates, state, metrics = step.update(params, state, batch, jnp.int32(t), jax.random.key(t))
      params = optax_apply(params, updates)
      _close(params, net_after[t], rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(metrics["nll"], ref.log[t]["nll"], rtol=1e-10)
      np.testing.assert_allclose(metrics["trm_loss"], ref.log[t]["trm_loss"], rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(state.source.alpha, ref.log[t]["alpha"], rtol=1e-10)
      for e in range(D):
        for k in ("kernel", "bias"):
          np.testing.assert_allclose(
            state.source.heads[k][e], ref.log[t]["heads"][e][k], rtol=1e-9, atol=1e-12
          )
      assert jax.tree.leaves(params)[0].dtype == jnp.float64
