"""Methods that shape the featurizer's representation: IB-ERM, IB-IRM, RSC, SelfReg.

* IB-ERM / IB-IRM (Ahuja et al., "Invariance Principle Meets Information Bottleneck for OOD
  Generalization", NeurIPS 2021): the mean over domains of the per-feature variance of the
  featurizer output added to ERM's (IB-ERM) or IRMv1's (IB-IRM) objective, each weight on its
  own schedule, Adam re-created at each switch.
* RSC (Huang et al., "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020): mute
  the features with the largest gradient of the true-class logit, on the examples whose
  true-class probability drops most when muted, and train on the muted logits.
* SelfReg (Kim et al., "SelfReg: Self-supervised Contrastive Regularization for Domain
  Generalization", ICCV 2021): pull each example's logits and features towards those of
  random same-class examples (and of mixtures of two of them).

Semantics are DomainBed's (``domainbed/algorithms.py``, classes ``IB_ERM``, ``IB_IRM``,
``RSC``, ``SelfReg``); where DomainBed's code differs from the paper the docstring says so.
Single-logit (binary) models are handled as the two-class softmax model with logits
``[-s/2, s/2]`` wherever a method needs per-class probabilities or a true-class logit
(:func:`two_class_logits`): its cross-entropy equals the logistic loss used elsewhere.

Extra networks (SelfReg's projection) live in the gradient source's state; their initial
parameters are drawn from the run's key (:func:`dgjax.core.extra_net_key`), so runs with
different seeds get different extra networks, as in DomainBed where both come from the run's
torch seed. Earlier versions derived that key from the model's first parameter, so SelfReg's
initial projection differs from those versions' draws.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dgjax import penalties
from dgjax.core import (
  GradientSource,
  HParam,
  Method,
  Terms,
  annealed_weight,
  domain_features_and_logits,
  domainbed_adam,
  env_losses_of,
  extra_net_key,
  flatten_domains,
  penalized,
  reset_at_step,
  torch_adam,
)
from dgjax.losses import cross_entropy
from dgjax.models import TorchDense
from dgjax.types import PyTree


# ------------------------------------------------------------------------------ helpers
def two_class_logits(logits: jax.Array) -> jax.Array:
  """``[N, C]`` logits as they are for ``C >= 2``; a single logit column ``s`` (our binary
  models) as the equivalent two-class logits ``[-s/2, s/2]`` (``softmax = [1 - sigmoid(s),
  sigmoid(s)]``, so the cross-entropy is the logistic loss)."""
  if logits.shape[-1] == 1:
    return jnp.concatenate([-0.5 * logits, 0.5 * logits], axis=-1)
  return logits


def _anneal_iters(doc):
  return HParam(
    500, lambda r: int(10 ** r.uniform(0, 4)), doc, kind="int", role="anneal_iters", minimum=0
  )


def _lambda(doc):
  return HParam(1e2, lambda r: 10 ** r.uniform(-1, 5), doc, role="penalty_weight", minimum=0.0)


# ------------------------------------------------------------------------------ IB-ERM / IB-IRM
def ib_penalty(features: jax.Array) -> jax.Array:
  """The information-bottleneck penalty of DomainBed's ``IB_ERM``/``IB_IRM``: per domain, the
  mean over features of the unbiased (``B - 1``) variance over the batch, averaged over
  domains: ``(1/D) sum_d mean_f Var_b z[d, b, f]``. ``features``: ``[D, B, F]``."""
  return jnp.mean(jnp.var(features, axis=1, ddof=1))


def ib_erm_terms(ctx, params, batch, key, state) -> Terms:
  """Per-domain CE and :func:`ib_penalty` of the featurizer output, one pooled forward."""
  del key
  z, logits = domain_features_and_logits(ctx, params, batch["x"])
  return Terms(env_losses_of(logits, batch["y"]), ib_penalty(z), state=state)


def ib_irm_gradients() -> GradientSource:
  """IB-IRM as DomainBed's ``IB_IRM``: one pooled forward, then

      objective = mean_d CE_d + w_irm(step) * mean_d IRM_d + w_ib(step) * ib_penalty,
      w_irm = irm_lambda if step >= irm_penalty_anneal_iters else 1,
      w_ib  = ib_lambda  if step >= ib_penalty_anneal_iters  else 0,

  with ``IRM_d`` :func:`dgjax.penalties.irm_penalty` (DomainBed's split-batch IRMv1). One
  ``value_and_grad``. Logs ``irm_penalty``, ``ib_penalty``, their weights and ``objective``
  (DomainBed's ``loss``)."""

  def grads(ctx, params, state, batch, step, key):
    del key
    hp = ctx.hparams
    w_irm = annealed_weight(step, hp["irm_penalty_anneal_iters"], hp["irm_lambda"], 1.0)
    w_ib = annealed_weight(step, hp["ib_penalty_anneal_iters"], hp["ib_lambda"], 0.0)

    def objective(p):
      z, logits = domain_features_and_logits(ctx, p, batch["x"])
      env_losses = env_losses_of(logits, batch["y"])
      irm = jnp.mean(
        jax.vmap(lambda lg, y: penalties.irm_penalty(lg, y, cross_entropy))(logits, batch["y"])
      )
      ib = ib_penalty(z)
      return jnp.mean(env_losses) + w_irm * irm + w_ib * ib, (env_losses, irm, ib)

    (value, (env_losses, irm, ib)), g = jax.value_and_grad(objective, has_aux=True)(params)
    metrics = {
      "irm_penalty": irm,
      "ib_penalty": ib,
      "objective": value,
      "irm_penalty_weight": jnp.asarray(w_irm, jnp.float32),
      "ib_penalty_weight": jnp.asarray(w_ib, jnp.float32),
    }
    return g, Terms(env_losses, None, metrics, state)

  return GradientSource(grads)


def ib_irm_adam(ctx) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr, weight_decay)`` re-created when ``step`` equals either switch step
  (``irm_penalty_anneal_iters`` or ``ib_penalty_anneal_iters``), as DomainBed's ``IB_IRM``."""
  hp = ctx.hparams
  adam = reset_at_step(
    torch_adam(hp["lr"]), (hp["irm_penalty_anneal_iters"], hp["ib_penalty_anneal_iters"])
  )
  return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), adam)


# ------------------------------------------------------------------------------ RSC
def rsc_terms(ctx, params, batch, key, state) -> Terms:
  """RSC as DomainBed's ``RSC.update``, on the concatenated minibatch (``N = D * B``):

  1. ``g_n = d logit_{y_n}(z_n) / d z_n`` (features ``z = featurizer(x)``);
  2. ``mask_f[n, f] = g_nf < percentile_f(g_n, 100 (1 - rsc_f_drop_factor))`` (numpy's linear
     interpolation, per example over the features): the top features are muted;
  3. ``change_n = p_{y_n}(z_n) - p_{y_n}(z_n * mask_f)`` (softmax probabilities);
  4. ``mask_b[n] = change_n < percentile_n(change, 100 (1 - rsc_b_drop_factor))``: examples
     below the batch percentile keep all their features;
  5. loss ``= CE(head(z * (mask_f | mask_b)), y)`` (masks constant; gradient through ``z``
     and the head).

  ``env_losses[d]`` is domain ``d``'s part of that loss (their mean is DomainBed's ``loss``).
  Logs ``rsc_muted_fraction`` (the fraction of features set to zero). ``key`` unused:
  RSC is deterministic. Binary single-logit models use :func:`two_class_logits`.
  """
  del key
  x, y = batch["x"], batch["y"]
  d, b = y.shape[:2]
  hp = ctx.hparams
  head = params["classifier"]
  z = ctx.features(params, flatten_domains(x))
  labels = flatten_domains(y)
  z_const, head_const = jax.lax.stop_gradient(z), jax.lax.stop_gradient(head)

  def probs_and_true_logit(zz):
    logits = two_class_logits(ctx.head_logits(head_const, zz))
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jax.nn.softmax(logits, axis=-1), onehot, logits

  def true_logit_sum(zz):
    _, onehot, logits = probs_and_true_logit(zz)
    return jnp.sum(logits * onehot)

  g = jax.grad(true_logit_sum)(z_const)  # [N, F]
  threshold_f = jnp.percentile(g, (1.0 - hp["rsc_f_drop_factor"]) * 100.0, axis=1, keepdims=True)
  mask_f = g < threshold_f
  p, onehot, _ = probs_and_true_logit(z_const)
  p_muted, _, _ = probs_and_true_logit(z_const * mask_f.astype(z.dtype))
  changes = jnp.sum(p * onehot, axis=1) - jnp.sum(p_muted * onehot, axis=1)
  threshold_b = jnp.percentile(changes, (1.0 - hp["rsc_b_drop_factor"]) * 100.0)
  mask_b = changes < threshold_b
  mask = jax.lax.stop_gradient((mask_f | mask_b[:, None]).astype(z.dtype))
  logits = ctx.head_logits(head, z * mask)
  env_losses = env_losses_of(logits.reshape((d, b) + logits.shape[1:]), y)
  return Terms(env_losses, None, {"rsc_muted_fraction": 1.0 - jnp.mean(mask)}, state)


# ------------------------------------------------------------------------------ SelfReg
class TrainModeBatchNorm(nn.Module):
  """``torch.nn.BatchNorm1d`` in training mode: normalised by the batch's mean and biased
  variance (eps 1e-5), then ``scale`` (init 1) and ``bias`` (init 0). The running statistics
  torch keeps are not needed: SelfReg's projection is only used in training."""

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    mean = jnp.mean(x, axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)
    return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class SelfRegProjection(nn.Module):
  """SelfReg's class-discriminative projection (DomainBed's ``SelfReg.cdpl``):
  ``Linear(F, h) - BN - ReLU - Linear(h, h) - BN - ReLU - Linear(h, F) - BN`` with
  ``h = F`` when ``F == 2048`` else ``2 F`` (torch's default Linear init)."""

  features: int

  @nn.compact
  def __call__(self, z):
    hidden = self.features if self.features == 2048 else 2 * self.features
    z = nn.relu(TrainModeBatchNorm()(TorchDense(hidden)(z)))
    z = nn.relu(TrainModeBatchNorm()(TorchDense(hidden)(z)))
    return TrainModeBatchNorm()(TorchDense(self.features)(z))


class SelfRegState(NamedTuple):
  projection: PyTree  # SelfRegProjection params (fixed: see selfreg_terms)


def _feature_dim(params) -> int:
  kernel = params["classifier"].get("kernel") if hasattr(params["classifier"], "get") else None
  if kernel is None or kernel.ndim != 2:
    raise ValueError(
      "SelfReg needs a linear head params['classifier']['kernel'] of shape "
      "[features, classes] to size its projection"
    )
  return kernel.shape[0]


def _selfreg_init(ctx, params, key):
  f = _feature_dim(params)
  net = SelfRegProjection(f)
  z0 = jnp.zeros((2, f), jnp.float32)
  return SelfRegState(net.init(extra_net_key(key, "projection"), z0)["params"])


def within_class_partners(key: jax.Array, labels: jax.Array) -> jax.Array:
  """For each example, the index of a same-class example: a uniformly random permutation
  within each class (DomainBed's per-class ``randperm`` over the label-sorted batch)."""
  u = jax.random.uniform(key, labels.shape)
  shuffled = jnp.lexsort((u, labels))  # by label, random within a class
  ordered = jnp.argsort(labels, stable=True)  # by label, by index within a class
  return jnp.zeros_like(ordered).at[ordered].set(shuffled)


def selfreg_terms(ctx, params, batch, key, state) -> Terms:
  """SelfReg as DomainBed's ``SelfReg.update``, on the concatenated minibatch:

      lam ~ Beta(0.5, 0.5);   z = featurizer(x),  q = projection(z),  o = head(z)
      pi1, pi2: random permutations within each class
      o2 = o[pi1], q2 = q[pi1];   o3 = lam o[pi1] + (1 - lam) o[pi2],  q3 likewise
      reg = lam (MSE(o, o2) + 0.3 MSE(z, q2)) + (1 - lam) (MSE(o, o3) + 0.3 MSE(z, q3))
      objective = CE(o, y) + min(CE(o, y), 1) * reg     (the min is a constant)

  (MSE: mean over all elements; gradients through both sides.) Differences from the paper,
  kept because they are DomainBed's: the feature terms compare the raw features ``z`` with
  the projections of the partners (not projection with projection), and the projection is
  never trained (DomainBed builds it after the optimizer, over the network's parameters only):
  it stays at its random initialisation, with BatchNorm in training mode. ``key`` draws
  ``lam`` and the permutations. ``objective`` is DomainBed's ``loss``.
  """
  x, y = batch["x"], batch["y"]
  d, b = y.shape[:2]
  k_lam, k1, k2 = jax.random.split(key, 3)
  labels = flatten_domains(y)
  z = ctx.features(params, flatten_domains(x))
  o = ctx.head_logits(params["classifier"], z)
  q = SelfRegProjection(z.shape[-1]).apply({"params": state.projection}, z)
  lam = jax.random.beta(k_lam, 0.5, 0.5, dtype=jnp.float32).astype(z.dtype)
  pi1, pi2 = within_class_partners(k1, labels), within_class_partners(k2, labels)
  o2, q2 = o[pi1], q[pi1]
  o3, q3 = lam * o[pi1] + (1 - lam) * o[pi2], lam * q[pi1] + (1 - lam) * q[pi2]
  mse = lambda a, c: jnp.mean(jnp.square(a - c))
  reg = lam * (mse(o, o2) + 0.3 * mse(z, q2)) + (1 - lam) * (mse(o, o3) + 0.3 * mse(z, q3))
  env_losses = env_losses_of(o.reshape((d, b) + o.shape[1:]), y)
  scale = jax.lax.stop_gradient(jnp.minimum(jnp.mean(env_losses), 1.0))
  return Terms(env_losses, scale * reg, {"selfreg_lambda": lam}, state)


# ------------------------------------------------------------------------------ methods
IB_ERM = Method(
  name="ib_erm",
  description="IB-ERM: mean CE + ib_lambda * mean per-feature variance of the featurizer "
  "output (Ahuja et al., NeurIPS 2021)",
  domainbed_name="IB_ERM",
  hparams={
    "ib_lambda": _lambda("IB penalty weight after the anneal (0 before)"),
    "ib_penalty_anneal_iters": _anneal_iters(
      "steps with IB weight 0; Adam is re-created at this step"
    ),
  },
  gradients=penalized(
    ib_erm_terms, weight="ib_lambda", anneal_iters="ib_penalty_anneal_iters", before=0.0
  ),
  optimizer=domainbed_adam(reset_at="ib_penalty_anneal_iters"),
)

IB_IRM = Method(
  name="ib_irm",
  description="IB-IRM: IRMv1 + ib_lambda * mean per-feature variance of the featurizer output "
  "(Ahuja et al., NeurIPS 2021)",
  domainbed_name="IB_IRM",
  hparams={
    "irm_lambda": _lambda("IRM penalty weight after its anneal (1 before)"),
    "irm_penalty_anneal_iters": _anneal_iters(
      "steps with IRM weight 1; Adam is re-created at this step"
    ),
    # no role: a benchmark's penalty weight is IRM's, not the bottleneck's
    "ib_lambda": HParam(
      1e2,
      lambda r: 10 ** r.uniform(-1, 5),
      "IB penalty weight after its anneal (0 before)",
      minimum=0.0,
    ),
    "ib_penalty_anneal_iters": _anneal_iters(
      "steps with IB weight 0; Adam is re-created at this step"
    ),
  },
  gradients=ib_irm_gradients(),
  optimizer=ib_irm_adam,
)

RSC = Method(
  name="rsc",
  description="RSC: train on logits with the top-gradient features muted on the examples "
  "they matter most for (Huang et al., ECCV 2020)",
  domainbed_name="RSC",
  hparams={
    "rsc_f_drop_factor": HParam(
      1 / 3,
      lambda r: r.uniform(0, 0.5),
      "fraction of features muted per example",
      minimum=0.0,
      maximum=1.0,
    ),
    "rsc_b_drop_factor": HParam(
      1 / 3,
      lambda r: r.uniform(0, 0.5),
      "fraction of examples whose features are muted",
      minimum=0.0,
      maximum=1.0,
    ),
  },
  gradients=penalized(rsc_terms),
)

SELFREG = Method(
  name="selfreg",
  description="SelfReg: CE + logit/feature regression towards random same-class examples "
  "and their mixtures (Kim et al., ICCV 2021)",
  domainbed_name="SelfReg",
  hparams={},
  gradients=penalized(selfreg_terms, init=_selfreg_init),
)
