"""Methods that shape the distribution of risks across domains: EQRM, RDM, TRM.

* EQRM (Eastwood et al., "Probable Domain Generalization via Quantile Risk Minimization",
  NeurIPS 2022): minimise a quantile of the per-domain risks under a Gaussian KDE.
* RDM (Nguyen et al., "Domain Generalisation via Risk Distribution Matching", WACV 2024):
  match the distribution of per-example risks of the worst domain to that of all domains
  (MMD), plus their variances.
* TRM (Chen et al., "Learning Representations that Support Robust Transfer of Predictors",
  2021): per-domain heads; penalise how well each domain's head transfers to the others.

Semantics are DomainBed's (``domainbed/algorithms.py``, classes ``EQRM``, ``RDM``, ``TRM``),
including its schedule quirks, documented per method. EQRM and RDM switch to a second
learning rate at their switch step (:func:`switched_adam`). TRM's per-domain heads are drawn
from the run's key (:func:`dgjax.core.extra_net_key`), so trials of different seeds start them
from different weights; earlier versions drew them from a key derived from the model's first
parameter, so their initial draws differ from those versions'.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import ndtr, ndtri

from dgjax.core import (
  COMMON_HPARAMS,
  GradientSource,
  HParam,
  Method,
  Terms,
  domain_logits,
  domainbed_adam,
  env_losses_of,
  extra_net_key,
  flatten_domains,
  penalized,
  reset_at_step,
)
from dgjax.losses import cross_entropy
from dgjax.types import PyTree


# ------------------------------------------------------------------------------ optimizer
def scale_by_switched_lr(lr: Any, lr_after: Any, at: Any) -> optax.GradientTransformationExtraArgs:
  """``-lr * update`` before the switch and ``-lr_after * update`` from step ``at`` on (extra
  argument ``step``), where DomainBed re-creates Adam with a new learning rate at
  ``update_count == at``: the switch happens only if ``at`` is an integer (a float ``at``
  never equals the step counter, so DomainBed keeps the first learning rate)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, step, **extra):
    del params, extra
    switched = (jnp.floor(at) == at) & (step >= at)
    rate = jnp.where(switched, lr_after, lr)
    return jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def switched_adam(lr_after: str, at: str):
  """DomainBed's EQRM/RDM optimizer: ``torch.optim.Adam(lr, weight_decay)``, re-created as
  ``Adam(hparams[lr_after], weight_decay)`` when the step counter equals ``hparams[at]``
  (:func:`dgjax.core.reset_at_step` for the moments and count, :func:`scale_by_switched_lr`
  for the rate)."""

  def make(ctx) -> optax.GradientTransformation:
    hp = ctx.hparams
    return optax.chain(
      optax.add_decayed_weights(hp["weight_decay"]),
      reset_at_step(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), hp[at]),
      scale_by_switched_lr(hp["lr"], hp[lr_after], hp[at]),
    )

  return make


# ------------------------------------------------------------------------------ EQRM
def kde_quantile(risks: jax.Array, q: Any, bisection_steps: int = 32) -> jax.Array:
  """The ``q``-quantile of a Gaussian KDE of ``risks`` ``[n]``, as DomainBed's
  ``Nonparametric.icdf`` (``misc.py``), value and gradient:

      bw = 1.06 std(risks, unbiased) n^(-1/5)              ("Gauss-optimal" bandwidth)
      lo = min(risks) + bw Phi^-1(q),  hi = max(risks) + bw Phi^-1(q)
      bisection on cdf(k) = mean_i Phi((k - r_i) / bw) for cdf(k) = q (``bisection_steps``
      halvings, stopping early when the midpoint stops changing)

  DomainBed's bisection keeps the tensors ``lo``/``hi`` in its interval, so its result is
  ``a lo + b hi`` with constant weights fixed by the comparisons, and the gradient flows
  through ``min``, ``max`` and ``bw`` with those weights (not the implicit-function gradient
  of the KDE quantile). Here the same: the bisection runs on values, and the result carries
  ``a d(lo) + b d(hi)``.
  """
  data = jnp.sort(risks)
  n = data.shape[0]
  bw = 1.06 * jnp.std(data, ddof=1) * n ** (-0.2)
  zq = ndtri(jnp.asarray(q, data.dtype))
  lo, hi = data[0] + bw * zq, data[-1] + bw * zq
  data_c, bw_c = jax.lax.stop_gradient(data), jax.lax.stop_gradient(bw)
  target = jnp.asarray(q, data.dtype)

  def cdf(k):
    return jnp.mean(ndtr((k - data_c) / bw_c))

  one, zero = jnp.ones((), data.dtype), jnp.zeros((), data.dtype)

  def body(_, carry):
    (lo_v, lo_a, lo_b), (hi_v, hi_a, hi_b), (k_v, k_a, k_b), done = carry
    above = cdf(k_v) > target
    new_lo = jax.tree.map(lambda l, k: jnp.where(above, l, k), (lo_v, lo_a, lo_b), (k_v, k_a, k_b))
    new_hi = jax.tree.map(lambda h, k: jnp.where(above, k, h), (hi_v, hi_a, hi_b), (k_v, k_a, k_b))
    nxt = tuple(0.5 * (l + h) for l, h in zip(new_lo, new_hi))
    stop = nxt[0] == k_v
    keep = lambda old, new: jax.tree.map(lambda o, w: jnp.where(done, o, w), old, new)
    k_new = keep(
      (k_v, k_a, k_b), jax.tree.map(lambda k, w: jnp.where(stop, k, w), (k_v, k_a, k_b), nxt)
    )
    return (keep((lo_v, lo_a, lo_b), new_lo), keep((hi_v, hi_a, hi_b), new_hi), k_new, done | stop)

  lo_v, hi_v = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
  init = (
    (lo_v, one, zero),
    (hi_v, zero, one),
    (0.5 * (lo_v + hi_v), 0.5 * one, 0.5 * one),
    jnp.zeros((), bool),
  )
  _, _, (k_v, a, b), _ = jax.lax.fori_loop(0, bisection_steps, body, init)
  return k_v + a * (lo - lo_v) + b * (hi - hi_v)


def eqrm_gradients() -> GradientSource:
  """EQRM as DomainBed's ``EQRM.update``: per-domain risks ``R_d`` (CE of each domain's
  batch), then

      objective = mean_d R_d                      for step < eqrm_burnin_iters
                = kde_quantile(R, eqrm_quantile)  after (:func:`kde_quantile`)

  The optimizer (:func:`switched_adam`) is re-created with ``eqrm_lr`` at
  ``step == eqrm_burnin_iters``. DomainBed's random search draws ``eqrm_burnin_iters`` as a
  float ``10^U(2.5, 3.5)``: the objective then switches at its ceiling but the Adam re-creation
  (and ``eqrm_lr``) never happens; kept (the hparam is a float for that reason). ``objective``
  is DomainBed's ``loss``. Needs at least 2 training domains (the KDE bandwidth)."""

  def grads(ctx, params, state, batch, step, key):
    del key
    if ctx.num_domains < 2:
      raise ValueError(
        f"EQRM needs at least 2 training domains (its KDE bandwidth is a "
        f"standard deviation over domains); got {ctx.num_domains}"
      )
    hp = ctx.hparams
    burnin = step < hp["eqrm_burnin_iters"]

    def objective(p):
      env_losses = env_losses_of(domain_logits(ctx, p, batch["x"]), batch["y"])
      value = jax.lax.cond(
        burnin, jnp.mean, lambda r: kde_quantile(r, hp["eqrm_quantile"]), env_losses
      )
      return value, env_losses

    (value, env_losses), g = jax.value_and_grad(objective, has_aux=True)(params)
    return g, Terms(env_losses, None, {"objective": value}, state)

  return GradientSource(grads)


# ------------------------------------------------------------------------------ RDM
#: DomainBed's RDM kernel bandwidths: ``k(x, y) = sum_g exp(-g |x - y|^2)``.
RDM_GAMMAS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def rdm_mmd(x: jax.Array, y: jax.Array) -> jax.Array:
  """DomainBed's ``RDM.mmd`` of 1-D samples ``x [n]``, ``y [m]``: ``mean K(x, x) + mean
  K(y, y) - 2 mean K(x, y)`` with :data:`RDM_GAMMAS` and squared distances
  ``|a|^2 + |b|^2 - 2 a b`` clamped below at 1e-30 (``my_cdist``)."""

  def kernel(a, b):
    d2 = jnp.square(a)[:, None] + jnp.square(b)[None, :] - 2.0 * a[:, None] * b[None, :]
    d2 = jnp.where(d2 >= 1e-30, d2, 1e-30)
    return sum(jnp.exp(-g * d2) for g in RDM_GAMMAS)

  return jnp.mean(kernel(x, x)) + jnp.mean(kernel(y, y)) - 2.0 * jnp.mean(kernel(x, y))


def rdm_terms(ctx, params, batch, key, state) -> Terms:
  """RDM as DomainBed's ``RDM.update``: one pooled forward, per-example CE ``r [D, B]``,
  worst domain ``w = argmax_d mean_b r[d]`` (a constant index), and

      penalty = rdm_lambda * MMD(r[w], r.flatten()) + variance_weight * (Var(r) + Var(r[w]))

  (:func:`rdm_mmd`; unbiased variances). The penalty enters with weight 0 before
  ``rdm_penalty_anneal_iters`` and 1 after (:func:`dgjax.core.penalized`), as DomainBed's two
  weights. Logs ``matching_penalty``, ``variance_penalty`` and ``worst_domain``.
  """
  del key
  hp = ctx.hparams
  logits = domain_logits(ctx, params, batch["x"])
  per_example = jax.vmap(jax.vmap(lambda lg, y: cross_entropy(lg[None], y[None])))(
    logits, batch["y"]
  )  # [D, B]
  env_losses = jnp.mean(per_example, axis=1)
  worst = jnp.argmax(jax.lax.stop_gradient(env_losses))
  worst_risks = per_example[worst]
  everything = per_example.reshape(-1)
  matching = rdm_mmd(worst_risks, everything)
  variance = jnp.var(everything, ddof=1) + jnp.var(worst_risks, ddof=1)
  penalty = hp["rdm_lambda"] * matching + hp["variance_weight"] * variance
  return Terms(
    env_losses,
    penalty,
    {
      "matching_penalty": matching,
      "variance_penalty": variance,
      "worst_domain": worst.astype(jnp.float32),
    },
    state,
  )


# ------------------------------------------------------------------------------ TRM
class TRMState(NamedTuple):
  heads: PyTree  # one linear head per training domain (leaves [D, ...]), trained by SGD
  alpha: jax.Array  # [D, D] transfer weights (unnormalised, zero diagonal)


TRM_HEAD_SGD_STEPS = 30  # DomainBed: 30 SGD steps on the per-domain heads per step
TRM_HEAD_LR = 0.1  # DomainBed: torch.optim.SGD(lr=1e-1)
TRM_NEUMANN_STEPS = 10  # DomainBed: 10 Neumann terms, stopped when max |h| > 10


def _head_kernel(head):
  if not hasattr(head, "get") or head.get("kernel") is None or head["kernel"].ndim != 2:
    raise ValueError(
      "TRM needs a linear head params['classifier'] with a 'kernel' of shape "
      "[features, classes] (and a 'bias')"
    )
  return head["kernel"]


def _trm_init(ctx, params, key):
  """``D`` fresh heads shaped like ``params['classifier']`` with torch's Linear init
  (``U(+-1/sqrt(fan_in))`` for kernel and bias), drawn from the run's ``key``; alpha
  ``= 1 - I``."""
  head = params["classifier"]
  fan_in = _head_kernel(head).shape[0]
  bound = 1.0 / np.sqrt(fan_in)
  leaves, treedef = jax.tree.flatten(head)
  keys = jax.random.split(extra_net_key(key, "heads"), len(leaves))
  d = ctx.num_domains
  heads = treedef.unflatten(
    [
      jax.random.uniform(k, (d,) + leaf.shape, leaf.dtype, -bound, bound)
      for k, leaf in zip(keys, leaves)
    ]
  )
  dtype = _head_kernel(head).dtype  # the network's precision (float64 under jax_enable_x64)
  return TRMState(heads, jnp.ones((d, d), dtype) - jnp.eye(d, dtype=dtype))


def neumann_inverse_hvp(
  hvp,
  v0: jax.Array,
  steps: int = TRM_NEUMANN_STEPS,
  bound: float = 10.0,
  alias_first_term: bool = True,
) -> jax.Array:
  """DomainBed's ``TRM.neum``: the Neumann series ``H^-1 v0 ~ sum_j (I - H)^j v0``, with
  ``v_j = (I - H) v_{j-1}`` and the running sum ``h``; it stops after the step where
  ``max |h| > bound`` (that ``h`` is returned).

  ``alias_first_term`` (TRM's hparam of that name; may be traced): DomainBed's code
  (``TRM.neum``, ``h_estimate = v`` then ``v -= hv``) starts the sum as the SAME tensor as
  ``v`` and then updates ``v`` in place, so its first step gives ``h = 2 v_1`` instead of
  ``v_0 + v_1``: ``h = 2 v_1 + v_2 + ... + v_k``. True (DomainBed's numbers) by default;
  False gives the series as written in the paper."""

  def body(i, carry):
    v, h, done = carry
    v_new = v - hvp(v)
    first = (i == 0) & alias_first_term
    h_new = jnp.where(first, v_new + v_new, h + v_new)
    stop = jnp.max(jnp.abs(h_new)) > bound
    return (jnp.where(done, v, v_new), jnp.where(done, h, h_new), done | stop)

  _, h, _ = jax.lax.fori_loop(0, steps, body, (v0, v0, jnp.zeros((), bool)))
  return h


def trm_gradients() -> GradientSource:
  """TRM as DomainBed's ``TRM.update``. Before step ``iters``: ERM on the concatenated
  minibatch. From ``iters`` on, with ``z = featurizer(x)`` (one pooled forward):

  1. (``class_balanced``) every domain head's kernel is set to the main head's;
  2. alpha's rows are normalised to sum 1;
  3. each domain head ``c_j`` takes 30 SGD steps (lr 0.1) on ``CE(c_j(sg z_j), y_j)``;
  4. for each domain ``Q``: ``P_Q = sum_{i != Q} alpha[Q, i] CE(c_Q(z_i), y_i)``,
     ``g_Q = d CE(c_Q(z_Q), y_Q) / d W_Q`` (the kernel; differentiable in ``z``),
     ``h_Q = neumann(H_Q, d P_Q / d W_Q)`` (constant; :func:`neumann_inverse_hvp` with
     ``H_Q`` the kernel Hessian of ``CE(c_Q(sg z_Q), y_Q)``),
     ``swap_Q = P_Q - cos_lambda * h_Q . g_Q``, and
     ``alpha[Q, i] <- alpha[Q, i] exp(groupdro_eta * alpha[Q, i] CE(c_Q(z_i), y_i))`` (the
     weighted loss, as DomainBed);
  5. objective ``= CE(head(z), y) + (1/D) sum_Q swap_Q``; the heads ``c_Q`` are constants in
     it (DomainBed's backward reaches them but their gradients are discarded).

  DomainBed's two aliasing quirks, each an hparam (true: DomainBed's numbers, the default;
  false: the paper's formula; preset ``paper`` sets both false):

  * ``alias_alpha_weight``: DomainBed (``domainbed/algorithms.py``, commit b93c22a) weights
    ``loss_P`` by ``self.alpha[Q, i].data.detach()`` (line 1821), a view that shares storage
    with ``alpha`` (and, through ``.data``, not its version counter, so autograd does not
    complain), then updates ``alpha[Q, i]`` in place (line 1831) before
    ``loss_swap.backward()`` (line 1851). The multiplication's backward reads the weight
    then: the VALUE of ``P_Q`` (logged ``trm_loss``, and the ``alpha`` update itself) uses
    the step's normalised ``alpha``, but the GRADIENT of ``P_Q`` reaching the featurizer is
    weighted by the UPDATED ``alpha[Q, i]`` (step 4's new value). ``d P_Q / d W_Q`` for the
    Neumann term is taken before the update and uses the old weights either way. False:
    the old weights for value and gradient (DomainBed with ``.clone()``).
  * ``alias_first_term``: the Neumann sum's first term (:func:`neumann_inverse_hvp`).

  The main network is trained by Adam (DomainBed's two Adams over featurizer and head equal
  one). DomainBed keeps ``D + 1`` heads; the last is never used and is omitted here. ``alpha``
  has the network's dtype (DomainBed's is float32; here float64 runs stay float64). Logs
  ``nll`` and ``trm_loss`` (DomainBed's keys; ``objective = nll + trm_loss``).
  """

  def grads(ctx, params, state, batch, step, key):
    del key
    hp = ctx.hparams
    x, y = batch["x"], batch["y"]
    d, b = y.shape[:2]
    _head_kernel(params["classifier"])
    head_logits = lambda head, z: ctx.head_logits(head, z)
    ce = lambda head, z, yy: cross_entropy(head_logits(head, z), yy)
    alias_alpha = jnp.asarray(hp["alias_alpha_weight"], bool)
    alias_first_term = jnp.asarray(hp["alias_first_term"], bool)

    def erm_branch(operand):
      p, st = operand

      def objective(pp):
        logits = domain_logits(ctx, pp, x)
        env_losses = env_losses_of(logits, y)
        return jnp.mean(env_losses), env_losses

      (value, env_losses), g = jax.value_and_grad(objective, has_aux=True)(p)
      return g, env_losses, jnp.zeros((), value.dtype), st

    def trm_branch(operand):
      p, st = operand
      z_flat, features_vjp = jax.vjp(lambda pp: ctx.features(pp, flatten_domains(x)), p)
      z = z_flat.reshape((d, b) + z_flat.shape[1:])
      z_const = jax.lax.stop_gradient(z)
      heads = st.heads
      main_kernel = p["classifier"]["kernel"]
      balanced = jnp.asarray(hp["class_balanced"], bool)
      heads = dict(
        heads,
        kernel=jnp.where(
          balanced, jnp.broadcast_to(main_kernel, heads["kernel"].shape), heads["kernel"]
        ),
      )
      alpha = st.alpha / jnp.sum(st.alpha, axis=1, keepdims=True)

      def sgd_step(hs, _):
        g = jax.vmap(jax.grad(ce))(hs, z_const, y)
        return jax.tree.map(lambda h, gg: h - TRM_HEAD_LR * gg, hs, g), None

      heads, _ = jax.lax.scan(sgd_step, heads, None, length=TRM_HEAD_SGD_STEPS)
      heads = jax.lax.stop_gradient(heads)
      eye = jnp.eye(d, dtype=bool)

      def kernel_grad(head, zz, yy):
        return jax.grad(lambda k: ce(dict(head, kernel=k), zz, yy))(head["kernel"])

      def objective(head_main, zz):
        logits = head_logits(head_main, zz.reshape((d * b,) + zz.shape[2:]))
        env_losses = env_losses_of(logits.reshape((d, b) + logits.shape[1:]), y)
        swaps, new_rows = [], []
        for q in range(d):
          head_q = jax.tree.map(lambda h: h[q], heads)
          cross = jax.vmap(lambda zi, yi: ce(head_q, zi, yi))(zz, y)  # [D]
          w_q = jnp.where(eye[q], 0.0, alpha[q])
          weighted = jax.lax.stop_gradient(w_q * cross)
          new_row = jnp.where(eye[q], alpha[q], alpha[q] * jnp.exp(hp["groupdro_eta"] * weighted))
          # the value with this step's weights; the gradient with the updated ones if aliased
          w_grad = jnp.where(eye[q], 0.0, jnp.where(alias_alpha, new_row, w_q))
          cross_const = jax.lax.stop_gradient(cross)
          loss_p = jnp.sum(
            jnp.where(eye[q], 0.0, w_q * cross_const + w_grad * (cross - cross_const))
          )
          grad_p = jax.grad(
            lambda k: jnp.sum(
              jnp.where(
                eye[q],
                0.0,
                w_q * jax.vmap(lambda zi, yi: ce(dict(head_q, kernel=k), zi, yi))(z_const, y),
              )
            )
          )(head_q["kernel"])
          hvp = lambda v: jax.jvp(
            lambda k: kernel_grad(dict(head_q, kernel=k), z_const[q], y[q]),
            (head_q["kernel"],),
            (v,),
          )[1]
          h_q = jax.lax.stop_gradient(
            neumann_inverse_hvp(
              hvp, jax.lax.stop_gradient(grad_p), alias_first_term=alias_first_term
            )
          )
          g_q = kernel_grad(head_q, zz[q], y[q])
          swaps.append(loss_p - hp["cos_lambda"] * jnp.vdot(h_q, g_q))
          new_rows.append(new_row)
        swap = sum(swaps) / d
        nll = jnp.mean(env_losses)
        return nll + swap, (env_losses, swap, jnp.stack(new_rows))

      (_, (env_losses, swap, new_alpha)), (g_head, g_z) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True
      )(p["classifier"], z)
      g = features_vjp(g_z.reshape(z_flat.shape))[0]
      g = dict(g, classifier=jax.tree.map(jnp.add, g["classifier"], g_head))
      return (
        g,
        env_losses,
        swap.astype(env_losses.dtype),
        TRMState(heads, new_alpha.astype(st.alpha.dtype)),
      )

    g, env_losses, swap, new_state = jax.lax.cond(
      step >= hp["iters"], trm_branch, erm_branch, (params, state)
    )
    nll = jnp.mean(env_losses)
    return g, Terms(
      env_losses, None, {"nll": nll, "trm_loss": swap, "objective": nll + swap}, new_state
    )

  return GradientSource(grads, _trm_init)


# ------------------------------------------------------------------------------ methods
EQRM = Method(
  name="eqrm",
  description="EQRM: minimise the eqrm_quantile-quantile of a KDE of the per-domain risks "
  "after an ERM burn-in (Eastwood et al., NeurIPS 2022)",
  domainbed_name="EQRM",
  hparams={
    "eqrm_quantile": HParam(
      0.75,
      lambda r: r.uniform(0.5, 0.99),
      "quantile of the risk distribution minimised (0 < q < 1)",
      positive=True,
      maximum=0.999999,
    ),
    "eqrm_burnin_iters": HParam(
      2500.0,
      lambda r: 10 ** r.uniform(2.5, 3.5),
      "ERM steps before the quantile objective; Adam is re-created "
      "with eqrm_lr at this step if it is an integer (DomainBed)",
      role="anneal_iters",
      minimum=0.0,
    ),
    "eqrm_lr": HParam(
      1e-6, lambda r: 10 ** r.uniform(-7, -5), "Adam learning rate after the burn-in", positive=True
    ),
  },
  gradients=eqrm_gradients(),
  optimizer=switched_adam(lr_after="eqrm_lr", at="eqrm_burnin_iters"),
  forward_per_domain=True,
)

RDM = Method(
  name="rdm",
  description="RDM: mean CE + MMD between the worst domain's and all per-example risks + their "
  "variances (Nguyen et al., WACV 2024)",
  domainbed_name="RDM",
  hparams={
    "rdm_lambda": HParam(
      5.0,
      lambda r: r.uniform(0.1, 10.0),
      "weight of the risk-distribution MMD after the anneal (0 before)",
      role="penalty_weight",
      minimum=0.0,
      per_dataset={
        "DomainNet": (0.5, lambda r: r.uniform(0.1, 1.0)),
        "PACS": (5.0, lambda r: r.uniform(1.0, 10.0)),
        "TerraIncognita": (5.0, lambda r: r.uniform(1.0, 10.0)),
      },
    ),
    "rdm_penalty_anneal_iters": HParam(
      1500,
      lambda r: int(r.uniform(800, 2700)),
      "steps with penalty weights 0; Adam is re-created with rdm_lr at this step",
      kind="int",
      role="anneal_iters",
      minimum=0,
      per_dataset={"DomainNet": (2400, lambda r: int(r.uniform(1500, 3000)))},
    ),
    "variance_weight": HParam(
      0.004,
      lambda r: r.uniform(0.001, 0.007),
      "weight of the risk variances after the anneal (0 before)",
      minimum=0.0,
      per_dataset={d: (0.0, lambda r: 0.0) for d in ("TerraIncognita", "OfficeHome", "DomainNet")},
    ),
    "rdm_lr": HParam(
      1.5e-5, lambda r: r.uniform(8e-6, 2e-5), "Adam learning rate after the anneal", positive=True
    ),
    "batch_size": HParam(
      64,
      COMMON_HPARAMS["batch_size"].sample,
      "examples per domain per step",
      kind="int",
      structural=True,
      role="batch_size",
      minimum=1,
      large_default=88,
      large_sample=lambda r: int(r.uniform(70, 100)),
      per_dataset={
        d: (40, lambda r: int(r.uniform(30, 60))) for d in ("DomainNet", "TerraIncognita")
      },
    ),
  },
  gradients=penalized(rdm_terms, anneal_iters="rdm_penalty_anneal_iters", before=0.0),
  optimizer=switched_adam(lr_after="rdm_lr", at="rdm_penalty_anneal_iters"),
)

TRM = Method(
  name="trm",
  description="TRM: ERM + transfer risk of per-domain heads across domains, with a "
  "Neumann-series gradient alignment (Chen et al., 2021)",
  domainbed_name="TRM",
  hparams={
    "cos_lambda": HParam(
      1e-4, lambda r: 10 ** r.uniform(-5, 0), "weight of the gradient-alignment term", minimum=0.0
    ),
    "iters": HParam(
      200,
      lambda r: int(10 ** r.uniform(0, 4)),
      "ERM steps before TRM starts",
      kind="int",
      role="anneal_iters",
      minimum=0,
    ),
    "groupdro_eta": HParam(
      1e-2,
      lambda r: 10 ** r.uniform(-3, -1),
      "exponentiated-gradient step of the transfer weights alpha",
      minimum=0.0,
    ),
    "class_balanced": HParam(
      False,
      lambda r: False,
      "copy the main head's kernel into every domain head each step (DomainBed's common hparam)",
      kind="bool",
    ),
    "alias_alpha_weight": HParam(
      True,
      lambda r: True,
      "the transfer risk's gradient weighted "
      "by alpha after this step's update, as DomainBed's in-place "
      "aliasing; false: this step's alpha (the paper)",
      kind="bool",
    ),
    "alias_first_term": HParam(
      True,
      lambda r: True,
      "the Neumann sum's first term aliased as DomainBed's code (2 v1); false: v0 + v1 (the paper)",
      kind="bool",
    ),
  },
  presets={"paper": {"alias_alpha_weight": False, "alias_first_term": False}},
  gradients=trm_gradients(),
  optimizer=domainbed_adam(),
)
