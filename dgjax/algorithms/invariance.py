"""Invariance penalties added to the mean risk: IRM, V-REx, CORAL, MMD, IGA, Fishr, SD.

Each is ``mean_d loss_d + w(step) * penalty`` (:func:`dgjax.core.penalized`): the penalty is a
pure function from :mod:`dgjax.penalties` of the per-domain outputs, losses, features or
gradients, computed from the same forward pass as the losses, and the whole objective is
differentiated once. IGA's penalty is on full-model gradients; its gradient is assembled from
per-domain gradients and Hessian-vector products instead (:func:`iga_gradients`).

Hyperparameter names, defaults and random-search distributions are DomainBed's
(``domainbed/hparams_registry.py``). Every penalty weight has the role ``penalty_weight`` and
every switch step the role ``anneal_iters`` (the IRM-style benchmark maps its schedule onto
them). CORAL, MMD, IGA and SD have no schedule in DomainBed; their ``penalty_anneal_iters``
(default 0: the weight from the first step, DomainBed's behaviour) is ours.

Two protocols, one method. DomainBed's forms are the defaults. IRM, V-REx and Fishr also carry
the IRM-style Colored MNIST scripts' forms (Arjovsky et al.'s ``colored_mnist/main.py``,
Fishr's ``coloredmnist/train_coloredmnist.py``, the Hessian paper's ``cmnist_HGP.py``), chosen
by ``penalty_form = "script"`` (the ``irm_cmnist`` preset, which the IRM-style task applies):

| method | DomainBed (``penalty_form="domainbed"``) | the scripts (``"script"``) |
|---|---|---|
| IRM | mean_d of (half-batch gradient x other half's) | mean_d of (whole-batch gradient)^2 |
| V-REx | variance of the risks, (R0 - R1)^2 / 4 | (R0 - R1)^2 (sum over pairs) |
| Fishr | EMA of the variances, mean over domains and entries, weight 0 before the switch | no EMA, sum over domains and entries, weight 1 before |

The scripts' schedule is the task's, through the hparams' roles: ``rescale_loss`` (divide the
objective, L2 included, by the weight once it exceeds 1; every method here has it) and
``reset_optimizer`` (IRM, V-REx, Fishr: DomainBed re-creates Adam at the switch, the scripts
keep one Adam for the run).
"""

from __future__ import annotations

from typing import NamedTuple

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
  domain_logits,
  domainbed_adam,
  env_losses_of,
  flatten_domains,
  penalized,
  penalty_form_hparam,
  rescale_loss_hparam,
  reset_optimizer_hparam,
)
from dgjax.losses import cross_entropy
from dgjax.per_domain import per_domain_value_and_grad
from dgjax.types import PyTree


def _anneal_iters(default, doc="steps before the penalty weight switches (weight 1 before)"):
  return HParam(
    default, lambda r: int(10 ** r.uniform(0, 4)), doc, kind="int", role="anneal_iters", minimum=0
  )


def _no_anneal():
  return HParam(
    0,
    lambda r: 0,
    "steps with weight 1 before the penalty weight applies (ours; 0 = DomainBed's behaviour)",
    kind="int",
    role="anneal_iters",
    minimum=0,
  )


# ------------------------------------------------------------------------------ IRM / V-REx
def _script_form(ctx) -> bool:
  return ctx.hparams["penalty_form"] == "script"


def irm_terms(ctx, params, batch, key, state) -> Terms:
  """Per-domain CE and the mean over domains of :func:`dgjax.penalties.irm_penalty`
  (the scripts' form: :func:`~dgjax.penalties.irm_penalty_full_batch`)."""
  del key
  logits = domain_logits(ctx, params, batch["x"])
  penalty = penalties.irm_penalty_full_batch if _script_form(ctx) else penalties.irm_penalty
  per_domain = jax.vmap(lambda lg, y: penalty(lg, y, cross_entropy))(logits, batch["y"])
  return Terms(env_losses_of(logits, batch["y"]), jnp.mean(per_domain), state=state)


def vrex_terms(ctx, params, batch, key, state) -> Terms:
  """Per-domain CE and their variance :func:`dgjax.penalties.vrex_penalty` (the scripts'
  form: :func:`~dgjax.penalties.risk_difference_penalty`)."""
  del key
  env_losses = env_losses_of(domain_logits(ctx, params, batch["x"]), batch["y"])
  penalty = penalties.risk_difference_penalty if _script_form(ctx) else penalties.vrex_penalty
  return Terms(env_losses, penalty(env_losses), state=state)


# ------------------------------------------------------------------------------ CORAL / MMD
def feature_alignment_terms(penalty):
  """Terms whose penalty is ``penalty(features [D, B, F])`` on the featurizer's output."""

  def terms(ctx, params, batch, key, state) -> Terms:
    del key
    z, logits = domain_features_and_logits(ctx, params, batch["x"])
    return Terms(env_losses_of(logits, batch["y"]), penalty(z), state=state)

  return terms


# ------------------------------------------------------------------------------ SD
def spectral_decoupling_terms(ctx, params, batch, key, state) -> Terms:
  """SD (Pezeshki et al., "Gradient Starvation", NeurIPS 2021, eq. 25; DomainBed's ``SD``):
  the penalty is the mean squared logit over the concatenated minibatch,
  ``mean_{i,c} f_c(x_i)^2``."""
  del key
  logits = domain_logits(ctx, params, batch["x"])
  return Terms(env_losses_of(logits, batch["y"]), jnp.mean(jnp.square(logits)), state=state)


# ------------------------------------------------------------------------------ IGA
def iga_gradients(weight: str, anneal_iters: str | None = None) -> GradientSource:
  """IGA (Koyama & Yamaguchi, 2020; DomainBed's ``IGA``): the gradient of
  ``mean_d L_d + w * P`` with ``P = sum_d ||g_d - g||^2`` (:func:`dgjax.penalties.gradient_variance_penalty`),
  assembled without differentiating through gradients::

      grad = g + w * 2 sum_d H_d (g_d - g),      g_d = grad L_d,  g = mean_d g_d

  (the mean's own Hessian term vanishes because ``sum_d (g_d - g) = 0``). ``H_d v`` is a
  forward-over-reverse Hessian-vector product, ``jax.jvp(jax.grad(L_d), (theta,), (v,))``:
  per-domain gradients, then one HVP per domain, instead of a reverse pass through the
  per-domain backward passes (DomainBed's ``create_graph=True``). Same numbers.
  """

  def grads(ctx, params, state, batch, step, key):
    del key
    w = ctx.hparams[weight]
    if anneal_iters:
      w = annealed_weight(step, ctx.hparams[anneal_iters], w, 1.0)
    losses, g = per_domain_value_and_grad(ctx.loss, params, batch, impl=ctx.per_domain_impl)
    g_mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)
    deviation = jax.tree.map(lambda x, m: x - m[None], g, g_mean)
    penalty = penalties.gradient_variance_penalty(g)

    def domain_hvp(domain_batch, v):
      return jax.jvp(jax.grad(lambda p: ctx.loss(p, domain_batch)), (params,), (v,))[1]

    if ctx.per_domain_impl == "unrolled":
      d = losses.shape[0]
      hv = [
        domain_hvp(
          jax.tree.map(lambda x, i=i: x[i], batch), jax.tree.map(lambda x, i=i: x[i], deviation)
        )
        for i in range(d)
      ]
      hv_sum = jax.tree.map(lambda *xs: sum(xs), *hv)
    else:
      hv_sum = jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(domain_hvp)(batch, deviation))
    total = jax.tree.map(lambda m, h: m + (2.0 * w) * h, g_mean, hv_sum)
    objective = jnp.mean(losses) + w * penalty
    return total, Terms(
      losses,
      penalty,
      {"penalty": penalty, "objective": objective, "penalty_weight": jnp.asarray(w, jnp.float32)},
      state,
    )

  return GradientSource(grads)


# ------------------------------------------------------------------------------ Fishr
class MovingAverageState(NamedTuple):
  average: PyTree  # the (uncorrected) exponential moving average, no gradient


def moving_average(decay: float, correct: bool = True) -> optax.GradientTransformation:
  """DomainBed's ``MovingAverage(ema, oneminusema_correction=True)`` as an optax transform.

      a_t = decay * a_{t-1} + (1 - decay) * v_t         (a_0 = 0, stored without gradient)
      out = a_t / (1 - decay)                            (``correct``; else ``a_t``)

  ``out`` is differentiable in the current ``v_t`` only (with slope 1 when ``correct``, so
  the penalty's gradient does not depend on ``decay``); past values enter as constants.
  """

  def init(values):
    return MovingAverageState(jax.tree.map(jnp.zeros_like, values))

  def update(values, state, params=None):
    del params
    avg = jax.tree.map(lambda a, v: decay * a + (1.0 - decay) * v, state.average, values)
    out = jax.tree.map(lambda a: a / (1.0 - decay), avg) if correct else avg
    return out, MovingAverageState(jax.lax.stop_gradient(avg))

  return optax.GradientTransformation(init, update)


def head_gradient_variances(ctx, params, batch):
  """Per-domain CE ``[D]`` and the per-domain variances of the per-example gradients of the
  classifier head (leaves ``[D, ...]`` like ``params["classifier"]``): Fishr's statistic."""
  x, y = batch["x"], batch["y"]
  d, b = y.shape[:2]
  z, logits = domain_features_and_logits(ctx, params, x)

  def example_loss(head, zi, yi):  # CrossEntropyLoss(reduction="none") of one example
    return cross_entropy(ctx.head_logits(head, zi[None]), yi[None])

  grads = penalties.per_example_grads(
    example_loss, params["classifier"], flatten_domains(z), flatten_domains(y)
  )
  grads = jax.tree.map(lambda g: g.reshape((d, b) + g.shape[1:]), grads)
  return env_losses_of(logits, y), penalties.domain_gradient_variances(grads)


def _fishr_init(ctx, params, key):
  del key
  like = jax.tree.map(
    lambda p: jnp.zeros((ctx.num_domains,) + p.shape, p.dtype), params["classifier"]
  )
  return moving_average(ctx.hparams["ema"]).init(like)


def fishr_terms(ctx, params, batch, key, state) -> Terms:
  """Fishr (Rame et al., ICML 2022) as DomainBed's ``Fishr``: the variance across domains of
  the EMA-smoothed per-domain head-gradient variances; ``state`` is the EMA. The scripts'
  form: the variances themselves (no EMA; ``state`` passes through), summed
  (``fishr_penalty(..., reduction="sum")``)."""
  del key
  env_losses, variances = head_gradient_variances(ctx, params, batch)
  if _script_form(ctx):
    return Terms(env_losses, penalties.fishr_penalty(variances, "sum"), state=state)
  smoothed, ema_state = moving_average(ctx.hparams["ema"]).update(variances, state)
  return Terms(env_losses, penalties.fishr_penalty(smoothed), state=ema_state)


# ------------------------------------------------------------------------------ methods
#: The ``irm_cmnist`` preset of the methods that have a script form.
SCRIPT_FORM = {"penalty_form": "script"}


def _script_switches():
  """``penalty_form``, ``rescale_loss`` and ``reset_optimizer`` (DomainBed's values by default)."""
  return {
    "penalty_form": penalty_form_hparam(),
    "rescale_loss": rescale_loss_hparam(),
    "reset_optimizer": reset_optimizer_hparam(True),
  }


IRM = Method(
  name="irm",
  description="IRMv1: mean CE + lambda * squared gradient of each domain's risk w.r.t. a dummy "
  "scale (Arjovsky et al., 2019)",
  domainbed_name="IRM",
  hparams={
    "irm_lambda": HParam(
      1e2,
      lambda r: 10 ** r.uniform(-1, 5),
      "penalty weight after the anneal",
      role="penalty_weight",
      minimum=0.0,
    ),
    "irm_penalty_anneal_iters": _anneal_iters(500),
    **_script_switches(),
  },
  gradients=penalized(irm_terms, weight="irm_lambda", anneal_iters="irm_penalty_anneal_iters"),
  optimizer=domainbed_adam(
    reset_at="irm_penalty_anneal_iters", rescale_by=("irm_lambda", "irm_penalty_anneal_iters")
  ),
  presets={"irm_cmnist": SCRIPT_FORM},
)

VREX = Method(
  name="vrex",
  description="V-REx: mean CE + lambda * variance of the per-domain risks (Krueger et al., ICML 2021)",
  domainbed_name="VREx",
  hparams={
    "vrex_lambda": HParam(
      1e1,
      lambda r: 10 ** r.uniform(-1, 5),
      "penalty weight after the anneal",
      role="penalty_weight",
      minimum=0.0,
    ),
    "vrex_penalty_anneal_iters": _anneal_iters(500),
    **_script_switches(),
  },
  gradients=penalized(vrex_terms, weight="vrex_lambda", anneal_iters="vrex_penalty_anneal_iters"),
  optimizer=domainbed_adam(
    reset_at="vrex_penalty_anneal_iters", rescale_by=("vrex_lambda", "vrex_penalty_anneal_iters")
  ),
  presets={"irm_cmnist": SCRIPT_FORM},
)


def _mmd_gamma():
  return HParam(
    1.0, lambda r: 10 ** r.uniform(-1, 1), "penalty weight", role="penalty_weight", minimum=0.0
  )


CORAL = Method(
  name="coral",
  description="Deep CORAL: mean CE + gamma * feature mean/covariance mismatch between domains "
  "(Sun & Saenko, 2016)",
  domainbed_name="CORAL",
  hparams={
    "mmd_gamma": _mmd_gamma(),
    "penalty_anneal_iters": _no_anneal(),
    "rescale_loss": rescale_loss_hparam(),
  },
  gradients=penalized(
    feature_alignment_terms(penalties.coral_penalty),
    weight="mmd_gamma",
    anneal_iters="penalty_anneal_iters",
  ),
  optimizer=domainbed_adam(rescale_by=("mmd_gamma", "penalty_anneal_iters")),
  forward_per_domain=True,
)

MMD = Method(
  name="mmd",
  description="MMD: mean CE + gamma * Gaussian-kernel MMD between domains' features "
  "(Li et al., CVPR 2018)",
  domainbed_name="MMD",
  hparams={
    "mmd_gamma": _mmd_gamma(),
    "penalty_anneal_iters": _no_anneal(),
    "rescale_loss": rescale_loss_hparam(),
  },
  gradients=penalized(
    feature_alignment_terms(penalties.mmd_penalty),
    weight="mmd_gamma",
    anneal_iters="penalty_anneal_iters",
  ),
  optimizer=domainbed_adam(rescale_by=("mmd_gamma", "penalty_anneal_iters")),
  forward_per_domain=True,
)

IGA = Method(
  name="iga",
  description="IGA: mean CE + penalty * summed squared deviation of per-domain gradients from "
  "their mean (Koyama & Yamaguchi, 2020)",
  domainbed_name="IGA",
  hparams={
    "penalty": HParam(
      1000.0, lambda r: 10 ** r.uniform(1, 5), "penalty weight", role="penalty_weight", minimum=0.0
    ),
    "penalty_anneal_iters": _no_anneal(),
    "rescale_loss": rescale_loss_hparam(),
  },
  gradients=iga_gradients(weight="penalty", anneal_iters="penalty_anneal_iters"),
  optimizer=domainbed_adam(rescale_by=("penalty", "penalty_anneal_iters")),
  forward_per_domain=True,
)

FISHR = Method(
  name="fishr",
  description="Fishr: mean CE + lambda * variance across domains of the per-example "
  "head-gradient variances, EMA-smoothed (Rame et al., ICML 2022)",
  domainbed_name="Fishr",
  hparams={
    "lambda": HParam(
      1000.0,
      lambda r: 10 ** r.uniform(1.0, 4.0),
      "penalty weight after the anneal",
      role="penalty_weight",
      minimum=0.0,
    ),
    "penalty_anneal_iters": HParam(
      1500,
      lambda r: int(r.uniform(0.0, 5000.0)),
      "steps with weight 0 (script form: 1) before the penalty weight",
      kind="int",
      role="anneal_iters",
      minimum=0,
    ),
    "ema": HParam(
      0.95,
      lambda r: r.uniform(0.90, 0.99),
      "EMA decay of the gradient variances (DomainBed's form only)",
      minimum=0.0,
      maximum=1.0,
    ),
    **_script_switches(),
  },
  gradients=penalized(
    fishr_terms,
    weight="lambda",
    anneal_iters="penalty_anneal_iters",
    before=lambda hp: 1.0 if hp["penalty_form"] == "script" else 0.0,
    init=_fishr_init,
  ),
  optimizer=domainbed_adam(
    reset_at="penalty_anneal_iters", rescale_by=("lambda", "penalty_anneal_iters")
  ),
  presets={"irm_cmnist": SCRIPT_FORM},
)

SD = Method(
  name="sd",
  description="Spectral decoupling: mean CE + sd_reg * mean squared logit "
  "(Pezeshki et al., NeurIPS 2021)",
  domainbed_name="SD",
  hparams={
    "sd_reg": HParam(
      0.1,
      lambda r: 10 ** r.uniform(-5, -1),
      "weight of the squared logits",
      role="penalty_weight",
      minimum=0.0,
    ),
    "penalty_anneal_iters": _no_anneal(),
    "rescale_loss": rescale_loss_hparam(),
  },
  gradients=penalized(
    spectral_decoupling_terms, weight="sd_reg", anneal_iters="penalty_anneal_iters"
  ),
  optimizer=domainbed_adam(rescale_by=("sd_reg", "penalty_anneal_iters")),
)
