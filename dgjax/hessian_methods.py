"""Registers the Hessian-alignment methods ``hgp``, ``hutchinson`` and ``cma``.

Each step: per-domain cross-entropies and their mean gradient (ERM), then the alignment
transform of :mod:`dgjax.hessian` adds ``w(step) * grad P`` (the penalty on the classifier
head, differentiated through the featurizer), then L2 weight decay, an optional rescale by
``1 / max(w, 1)`` and Adam::

    tx = chain(alignment(alpha, beta, weight=w), add_decayed_weights(wd),
               scale_by_schedule(1 / max(w, 1)) [rescale_loss], adam(lr))

``w(step)`` is 1.0 before ``penalty_anneal_iters`` and ``penalty_weight`` from then on
(DomainBed's IRM / V-REx schedule; Arjovsky et al.'s Colored MNIST). ``rescale_loss=1``
divides the whole objective by the weight when it exceeds 1, as the IRM / Fishr / Hessian-paper
Colored MNIST scripts do ("to keep gradients in a reasonable range"); ``reset_optimizer=1``
re-creates Adam at the switch, as DomainBed does.

Logged metrics: ``loss``, ``env_losses``, ``penalty`` (the weighted-by-alpha/beta penalty
before ``w``), ``hessian_term``, ``gradient_term`` (unweighted), ``penalty_weight``,
``objective`` (``loss + w * penalty``). With ``log_hessian_gap=1`` the step also offers the
diagnostic ``hessian_gap = max_{e,e'} ||H_e - H_e'||_2`` (power iteration on HVPs), computed by
the train loop at each evaluation through :attr:`dgjax.methods.MethodStep.diagnostics`.

Default hyperparameters are ours (the authors' DomainBed defaults were not available to us):
alpha = beta = 1 and DomainBed's IRM schedule (weight 100 after 500 steps). The Hessian paper's
Colored MNIST scripts use alpha = beta = 1 with the IRM weight 91257.18 switched on at step
190 and, for Hutchinson, 200 probes; :mod:`dgjax.irm_benchmark` sets those.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dgjax import hessian
from dgjax import methods
from dgjax.per_domain import per_domain_value_and_grad

HParam = methods.HParam

_SCHEDULE_HPARAMS = {
    "penalty_weight": HParam(1e2, lambda r: 10**r.uniform(-1, 5), "penalty weight after the switch"),
    "penalty_anneal_iters": HParam(500, lambda r: int(10**r.uniform(0, 4)),
                                   "step at which the weight switches from 1.0 to penalty_weight"),
    "rescale_loss": HParam(0, lambda r: 0, "1: divide the objective by the weight when > 1 (IRM CMNIST code)"),
    "reset_optimizer": HParam(1, lambda r: 1, "1: re-create Adam at the switch (DomainBed)"),
    "log_hessian_gap": HParam(0, lambda r: 0, "1: log max_{e,e'} ||H_e - H_e'||_2 at each evaluation"),
    "hessian_gap_iters": HParam(20, lambda r: 20, "power iterations for hessian_gap"),
}

_ALPHA_BETA = {
    "alpha": HParam(1.0, lambda r: 10**r.uniform(-2, 2), "weight of the Hessian term"),
    "beta": HParam(1.0, lambda r: 10**r.uniform(-2, 2), "weight of the gradient term"),
    "detach_target": HParam(1, lambda r: 1, "1: mean targets H g / diag(H) / g are constants (DomainBed code)"),
}


def weight_schedule(hparams):
  """``count -> w``: 1.0 before ``penalty_anneal_iters``, then ``penalty_weight``."""
  return lambda count: methods.annealed_weight(count, hparams["penalty_anneal_iters"],
                                               hparams["penalty_weight"], 1.0)


def head_inputs_fn(ctx: methods.Context, batch):
  """``params -> {"z": features [D, B, k], "y": [D, B]}``: one featurizer pass on the
  flattened domain batch (the head's inputs, as a function of all parameters)."""

  def inputs(params):
    x = batch["x"]
    d, b = x.shape[:2]
    z = ctx.features(params, x.reshape((d * b,) + x.shape[2:]))
    return {"z": z.reshape((d, b) + z.shape[1:]), "y": batch["y"]}

  return inputs


def head_objective(ctx: methods.Context):
  """``obj_fn(head, {"z", "y"})``: one domain's cross-entropy of the head on its features."""
  return lambda head, d: methods.cross_entropy(ctx.head_logits(head, d["z"]), d["y"])


def alignment_method(make_alignment):
  """A method whose step is ERM's mean gradient + an alignment transform + decay + Adam.

  ``make_alignment(hparams, weight) -> GradientTransformationExtraArgs``.
  """

  def build(ctx: methods.Context) -> methods.MethodStep:
    hp = ctx.hparams
    w = weight_schedule(hp)
    # rescale_loss / reset_optimizer may be traced (hparams vmapped by the train loop).
    rescale = lambda c: jnp.where(hp["rescale_loss"] > 0, 1.0 / jnp.maximum(w(c), 1.0), 1.0)
    opt = optax.adam(hp["lr"], b1=0.9, b2=0.999, eps=1e-8)
    tx = optax.chain(
        make_alignment(hp, w),
        optax.add_decayed_weights(hp["weight_decay"]),
        optax.scale_by_schedule(rescale),
        opt,
    )
    obj_fn = head_objective(ctx)

    def update(params, opt_state, batch, step, key):
      losses, grads = per_domain_value_and_grad(ctx.loss, params, batch, impl=ctx.per_domain_impl)
      mean_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
      # Hutchinson's probes come from this step's key, so that runs (and vmapped restarts) with
      # different seeds draw different probes.
      updates, opt_state = tx.update(mean_grads, opt_state, params, obj_fn=obj_fn,
                                     head_inputs=head_inputs_fn(ctx, batch), key=key)
      anneal = hp["penalty_anneal_iters"]
      switch = (step == anneal) & (anneal > 0) & (hp["reset_optimizer"] > 0)
      fresh = opt.init(params)
      adam_state = jax.tree.map(lambda f, o: jnp.where(switch, f, o), fresh, opt_state[-1])
      opt_state = opt_state[:-1] + (adam_state,)
      s = opt_state[0]
      loss = jnp.mean(losses)
      metrics = {"loss": loss, "env_losses": losses, "penalty": s.penalty,
                 "hessian_term": s.hessian_term, "gradient_term": s.gradient_term,
                 "penalty_weight": s.weight, "objective": loss + s.weight * s.penalty}
      return updates, opt_state, metrics

    diagnostics = None
    if hp.get("log_hessian_gap"):
      iters = int(hp["hessian_gap_iters"])

      def diagnostics(params, batch, key):
        inputs = head_inputs_fn(ctx, batch)(params)
        gap = hessian.hessian_difference_norm(obj_fn, params[hessian.DEFAULT_HEAD], inputs, key, iters)
        return {"hessian_gap": gap}

    return methods.MethodStep(tx.init, update, diagnostics)

  return build


def _hgp(hp, w):
  return hessian.hessian_gradient_product(alpha=hp["alpha"], beta=hp["beta"], weight=w,
                                          detach_target=bool(hp["detach_target"]))


def _hutchinson(hp, w):
  return hessian.hutchinson(alpha=hp["alpha"], beta=hp["beta"], weight=w,
                            num_samples=int(hp["hutchinson_samples"]),
                            detach_target=bool(hp["detach_target"]))


def _cma(hp, w):
  return hessian.moment_alignment(alpha=hp["alpha"], beta=hp["beta"], weight=w)


methods.register(methods.Method(
    name="hgp",
    description="Hessian-gradient-product alignment of the head: (1/E) sum_e alpha||H_e g_e - H g||^2 "
                "+ beta||g_e - g||^2 (Hemati et al., ICCV 2023)",
    hparams={**_ALPHA_BETA, **_SCHEDULE_HPARAMS},
    build=alignment_method(_hgp),
))

methods.register(methods.Method(
    name="hutchinson",
    description="Hutchinson Hessian-diagonal alignment of the head: (1/E) sum_e alpha||diag H_e - diag H||^2 "
                "+ beta||g_e - g||^2 (Hemati et al., ICCV 2023)",
    hparams={**_ALPHA_BETA, **_SCHEDULE_HPARAMS,
             "hutchinson_samples": HParam(100, lambda r: int(10**r.uniform(1, 2.5)),
                                          "Rademacher probes S per step")},
    build=alignment_method(_hutchinson),
))

methods.register(methods.Method(
    name="cma",
    description="Closed-form moment alignment of a linear head: alpha Var_e(grad) + beta Var_e(diag Hessian) "
                "(Chen, Si, Zhang & Zhao, UAI 2025)",
    hparams={
        "alpha": HParam(1.0, lambda r: 10**r.uniform(-2, 2), "weight of the gradient variance"),
        "beta": HParam(1.0, lambda r: 10**r.uniform(-2, 2), "weight of the Hessian-diagonal variance"),
        **_SCHEDULE_HPARAMS,
    },
    build=alignment_method(_cma),
))
