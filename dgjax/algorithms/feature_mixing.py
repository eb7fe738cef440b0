"""Methods that mix extra information into the features: MTL (a domain embedding concatenated
to the features) and SagNet (style and content randomisation of the features).

Their extra networks (MTL's embedding half of the classifier, SagNet's style classifier),
each a :class:`dgjax.core.ExtraNet` with its Adam state, live in the gradient source's state,
drawn from the run's key (:func:`dgjax.core.extra_net_key`), so trials of different seeds start
them from different weights. Before the engine passed a key to ``init`` they were drawn from a
key hashed from the main network's initial parameters: their initial draws differ from those
earlier versions'.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dgjax.algorithms.adversarial import head_shape, like_params
from dgjax.core import (
  ExtraNet,
  GradientSource,
  HParam,
  Method,
  Terms,
  domainbed_adam,
  env_losses_of,
  domain_features,
  extra_net_key,
  flatten_domains,
)
from dgjax.losses import cross_entropy


def torch_linear_init(key, fan_in: int, outputs: int, dtype=jnp.float32) -> dict:
  """``torch.nn.Linear(fan_in, outputs)``'s init as a ``{"kernel", "bias"}`` dict (the layout
  of :class:`dgjax.models.TorchDense`): both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  k_w, k_b = jax.random.split(key)
  bound = 1.0 / float(fan_in) ** 0.5
  return {
    "kernel": jax.random.uniform(k_w, (fan_in, outputs), dtype, -bound, bound),
    "bias": jax.random.uniform(k_b, (outputs,), dtype, -bound, bound),
  }


def _adam(ctx):
  return domainbed_adam()(ctx)


# ----------------------------------------------------------------------------- MTL
class MTLState(NamedTuple):
  embedding_head: ExtraNet  # [F, C]: the classifier's weights on the embedding half, its Adam
  embeddings: jax.Array  # [D, F]: the stored per-domain embeddings (DomainBed's buffer)


MTL_EMBEDDINGS = ("noise", "mean")
_PREDICT_NOISE_TAG = 3


def mtl_logits(ctx, params, head_e, z, e):
  """The classifier on ``concat(z, e)``: ``[z, e] @ [W_z; W_e] + b = head(z) + e @ W_e``."""
  return ctx.head_logits(params["classifier"], z) + e @ head_e.astype(z.dtype)


def mtl_gradients() -> GradientSource:
  """MTL (Blanchard et al., "Domain Generalization by Marginal Transfer Learning", JMLR 2021),
  the neural version of DomainBed's ``MTL``.

  The classifier sees ``concat(z, e)``: the features ``z = f(x)`` and a domain embedding
  ``e``. DomainBed's network is one ``Linear(2F, C)``; here it is the model's head on ``z``
  (``W_z``, ``b``) plus ``W_e`` ``[F, C]`` on ``e`` (:func:`mtl_logits`), with ``W_e`` and its
  ``Adam(lr, weight_decay)`` in this source's state (Adam is elementwise: the same as one Adam
  over both). ``W_e`` is initialised as torch's ``Linear(2F, C)`` (``U(+-1/sqrt(2F))``);
  ``W_z`` and ``b`` keep the model head's init (``U(+-1/sqrt(F))``), a difference in init only.

  Per domain ``d`` DomainBed computes ``m_d = ema * mean_b f(x_db) + (1 - ema) * E_d``, stores
  ``E_d <- m_d`` (no gradient) and then, in ``update_embeddings_(...).normal_()``, overwrites
  the repeated embedding IN PLACE with standard normal noise: its classifier sees
  ``concat(z, N(0, I))`` in training and at test, and no gradient reaches ``f`` through the
  embedding. ``mtl_embedding = "noise"`` (default) is that behaviour (noise from ``key``);
  ``"mean"`` is the paper's marginal embedding, ``e = m_d`` with the gradient through the
  batch mean, and at prediction ``e`` = the mean feature of the predicted batch.

  The objective is DomainBed's SUM over domains of the per-domain cross-entropies (logged as
  ``loss``, as DomainBed reports it); ``env_losses`` are the per-domain terms.
  """

  def init(ctx, params, key):
    feats, classes = head_shape(params)
    linear = torch_linear_init(extra_net_key(key, "embedding_head"), 2 * feats, classes)
    head_e = like_params(linear["kernel"][:feats], params)
    return MTLState(
      ExtraNet.create(head_e, _adam(ctx)), jnp.zeros((ctx.num_domains, feats), head_e.dtype)
    )

  def grads(ctx, params, state, batch, step, key):
    del step
    hp = ctx.hparams
    ema = hp["mtl_ema"]
    d, b = batch["y"].shape
    mode = hp["mtl_embedding"]

    def objective(p, head_e):
      zd = domain_features(ctx, p, batch["x"])  # one featurizer call per domain (DomainBed)
      z = flatten_domains(zd)
      stored = ema * jnp.mean(zd, axis=1) + (1.0 - ema) * state.embeddings  # [D, F]
      if mode == "noise":
        e = jax.random.normal(key, z.shape, z.dtype)
      else:
        e = flatten_domains(jnp.broadcast_to(stored[:, None], zd.shape))
      logits = mtl_logits(ctx, p, head_e, z, e).reshape(d, b, -1)
      env_losses = env_losses_of(logits, batch["y"])
      return jnp.sum(env_losses), (env_losses, jax.lax.stop_gradient(stored))

    (total, (env_losses, embeddings)), (g, g_e) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True
    )(params, state.embedding_head.params)
    new_state = MTLState(state.embedding_head.apply_gradients(g_e, _adam(ctx)), embeddings)
    return g, Terms(env_losses, None, {"loss": total}, new_state)

  return GradientSource(grads, init)


def mtl_predict(ctx, params, state, x):
  """DomainBed's ``MTL.predict(x)`` (no domain): ``e`` is standard normal noise
  (``"noise"``; a fixed draw per batch shape, as no key reaches prediction) or the mean
  feature of the batch ``x`` (``"mean"``)."""
  z = ctx.features(params, x)
  if ctx.hparams["mtl_embedding"] == "noise":
    e = jax.random.normal(
      jax.random.fold_in(jax.random.key(0), _PREDICT_NOISE_TAG), z.shape, z.dtype
    )
  else:
    e = jnp.broadcast_to(jnp.mean(z, axis=0, keepdims=True), z.shape)
  return mtl_logits(ctx, params, state.source.embedding_head.params, z, e)


MTL = Method(
  name="mtl",
  description="Marginal transfer learning: the classifier also sees a domain embedding "
  "(DomainBed's code: standard normal noise) (Blanchard et al., JMLR 2021)",
  domainbed_name="MTL",
  hparams={
    "mtl_ema": HParam(
      0.99,
      lambda r: float(r.choice([0.5, 0.9, 0.99, 1.0])),
      "weight of the current batch mean in the embedding moving average",
      minimum=0.0,
      maximum=1.0,
    ),
    "mtl_embedding": HParam(
      "noise",
      lambda r: "noise",
      "'noise': DomainBed's code (embedding overwritten by N(0, 1)); "
      "'mean': the paper's mean-feature embedding (ours)",
      kind="choice",
      choices=MTL_EMBEDDINGS,
      structural=True,
    ),
  },
  gradients=mtl_gradients(),
  predict=mtl_predict,
  forward_per_domain=True,
)


# ----------------------------------------------------------------------------- SagNet
class SagNetState(NamedTuple):
  style_head: ExtraNet  # the style network: a linear head {"kernel", "bias"}, its Adam
  featurizer_opt: optax.OptState
  content_opt: optax.OptState


def randomize(z, key, what: str, eps: float = 1e-5):
  """SagNet's randomisation of features ``z`` ``[N, F]`` (DomainBed's ``SagNet.randomize`` on
  its flat features): per example, the mean ``mu`` and UNBIASED variance ``s2`` over the
  feature axis, ``n = (z - mu) / sqrt(s2 + eps)``, ``alpha ~ U[0, 1)`` per example and a random
  permutation ``pi`` of the examples, then

      "style":   n * sqrt(s2' + eps) + mu',   mu' = alpha mu + (1 - alpha) mu[pi]  (s2' alike)
      "content": stop_gradient(n[pi]) * sqrt(s2 + eps) + mu
  """
  if z.ndim != 2:
    raise ValueError(f"SagNet randomises flat features [N, F]; got shape {z.shape}")
  k_alpha, k_perm = jax.random.split(key)
  n = z.shape[0]
  alpha = jax.random.uniform(k_alpha, (n, 1), z.dtype)
  mean = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.var(z, axis=-1, keepdims=True, ddof=1)
  normed = (z - mean) / jnp.sqrt(var + eps)
  idx = jax.random.permutation(k_perm, n)
  if what == "style":
    mean = alpha * mean + (1 - alpha) * mean[idx]
    var = alpha * var + (1 - alpha) * var[idx]
  elif what == "content":
    normed = jax.lax.stop_gradient(normed[idx])
  else:
    raise ValueError(f"randomize what must be 'style' or 'content', got {what!r}")
  return normed * jnp.sqrt(var + eps) + mean


def _linear(head, z):
  return z @ head["kernel"].astype(z.dtype) + head["bias"].astype(z.dtype)


def sagnet_gradients() -> GradientSource:
  """SagNet (Nam et al., "Reducing Domain Gap by Reducing Style Bias", CVPR 2021, Algorithm 1)
  as DomainBed's ``SagNet``: featurizer ``f``, content network ``c`` (the model's head) and
  style network ``s`` (a second linear head, in this source's state), each with its own
  ``Adam(lr, weight_decay)``, three sequential updates per step on the concatenated batch:

      1. f, c <- Adam on  L_c = CE(c(randomize(f(x), "style")), y)
      2. s    <- Adam on  L_s = CE(s(randomize(f(x), "content")), y)            (new f)
      3. f    <- Adam on  L_adv = -w_adv mean_i mean_k log_softmax(s(randomize(f(x), "content")))_k
                                                                                (new f, new s)

  so ``f``'s Adam steps twice per step. Each :func:`randomize` draws its own mixing weights
  and permutation from ``key``. DomainBed splits a ResNet between the featurizer and the two
  networks only in commented-out code; its running code (and ours) randomises the flat
  features and uses linear heads. The source makes all updates itself and returns the
  pseudo-gradient ``theta - theta_new``; the method's optimizer is ``sgd(1)``.
  ``env_losses`` are the per-domain terms of ``L_c`` (``loss`` = ``L_c``); ``loss_c``,
  ``loss_s`` and ``loss_adv`` are logged as DomainBed returns them.
  """

  def init(ctx, params, key):
    feats, classes = head_shape(params)
    style = like_params(torch_linear_init(extra_net_key(key, "style_head"), feats, classes), params)
    tx = _adam(ctx)
    return SagNetState(
      ExtraNet.create(style, tx), tx.init(params["featurizer"]), tx.init(params["classifier"])
    )

  def grads(ctx, params, state, batch, step, key):
    del step
    w_adv = ctx.hparams["sag_w_adv"]
    tx = _adam(ctx)
    d, b = batch["y"].shape
    x = flatten_domains(batch["x"])
    y = batch["y"].reshape(-1)
    k_c, k_s, k_adv = jax.random.split(key, 3)

    def features(f):
      return ctx.features({**params, "featurizer": f}, x)

    def step_tree(tree, grads_, opt):
      updates, opt = tx.update(grads_, opt, tree)
      return optax.apply_updates(tree, updates), opt

    # 1. content: featurizer and content head on style-randomised features
    def content_loss(f, c):
      logits = ctx.head_logits(c, randomize(features(f), k_c, "style"))
      return cross_entropy(logits, y), env_losses_of(logits.reshape(d, b, -1), batch["y"])

    (loss_c, env_losses), (g_f, g_c) = jax.value_and_grad(
      content_loss, argnums=(0, 1), has_aux=True
    )(params["featurizer"], params["classifier"])
    f1, f_opt = step_tree(params["featurizer"], g_f, state.featurizer_opt)
    c1, c_opt = step_tree(params["classifier"], g_c, state.content_opt)

    # 2. style head on content-randomised features of the updated featurizer
    z1 = jax.lax.stop_gradient(features(f1))
    loss_s, g_s = jax.value_and_grad(
      lambda s: cross_entropy(_linear(s, randomize(z1, k_s, "content")), y)
    )(state.style_head.params)
    style = state.style_head.apply_gradients(g_s, tx)
    s1 = style.params

    # 3. adversarial: featurizer makes the style head uniform
    def adv_loss(f):
      logp = jax.nn.log_softmax(_linear(s1, randomize(features(f), k_adv, "content")))
      return -w_adv * jnp.mean(jnp.mean(logp, axis=1))

    loss_adv, g_f2 = jax.value_and_grad(adv_loss)(f1)
    f2, f_opt = step_tree(f1, g_f2, f_opt)

    new = {**params, "featurizer": f2, "classifier": c1}
    pseudo = jax.tree.map(lambda p, q: p - q, params, new)
    metrics = {"loss_c": loss_c, "loss_s": loss_s, "loss_adv": loss_adv}
    return pseudo, Terms(env_losses, None, metrics, SagNetState(style, f_opt, c_opt))

  return GradientSource(grads, init)


SAGNET = Method(
  name="sagnet",
  description="SagNet: content head on style-randomised features, style head on "
  "content-randomised ones, featurizer adversarial to the style head "
  "(Nam et al., CVPR 2021)",
  domainbed_name="SagNet",
  hparams={
    "sag_w_adv": HParam(
      0.1,
      lambda r: float(10 ** r.uniform(-2, 1)),
      "weight of the adversarial (style-confusion) loss",
      minimum=0.0,
    )
  },
  gradients=sagnet_gradients(),
  optimizer=lambda ctx: optax.sgd(1.0),
)
