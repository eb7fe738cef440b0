"""Adversarial methods with their own networks and optimizers: DANN, CDANN, Transfer.

Each method's extra network (DANN's domain discriminator and CDANN's class embeddings, one
:class:`dgjax.core.ExtraNet` with their optimizer's state; Transfer's adversarial classifier)
lives in the gradient source's state; the source updates it itself, and returns the gradient
of the main network (featurizer + classifier) for the method's optimizer. Steps on which
DomainBed does not move the main network are skipped by :func:`dgjax.core.on_steps`
(``optax.conditionally_mask``), which also keeps the inner optimizer's state (Adam's moments
and step count) unchanged on those steps, as a torch optimizer that is not stepped.

Extra networks are drawn from the run's key (:func:`dgjax.core.extra_net_key`), so trials of
different seeds start them from different weights (as DomainBed's, drawn from the run's torch
seed). Before the engine passed a key to ``init`` they were drawn from a key hashed from the
main network's initial parameters: DANN's and CDANN's initial discriminators differ from
those earlier versions' draws.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dgjax.core import (
  ExtraNet,
  GradientSource,
  HParam,
  Method,
  Terms,
  domainbed_adam,
  env_losses_of,
  extra_net_key,
  flatten_domains,
  log_uniform,
  on_steps,
  over_domains,
)
from dgjax.losses import cross_entropy
from dgjax.models import TorchDense
from dgjax.types import PyTree


# ----------------------------------------------------------------------------- helpers
def head_shape(params: PyTree) -> tuple[int, int]:
  """``(features, classes)`` of the linear head ``params["classifier"]``."""
  kernel = params["classifier"]["kernel"]
  return int(kernel.shape[0]), int(kernel.shape[1])


def like_params(tree: PyTree, params: PyTree) -> PyTree:
  """``tree`` cast to the dtype of the main network's head kernel (extra networks train in
  the network's precision)."""
  dtype = params["classifier"]["kernel"].dtype
  return jax.tree.map(lambda a: a.astype(dtype), tree)


def torch_adam_betas(lr, weight_decay, b1, b2) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr, weight_decay, betas=(b1, b2))``: ``weight_decay * param`` added
  to the gradient, then Adam (eps 1e-8). Every argument may be traced."""
  return optax.chain(
    optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=b1, b2=b2, eps=1e-8)
  )


def select_tree(pred, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise ``jnp.where(pred, on_true, on_false)`` for a scalar (possibly traced) ``pred``."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def dropout(x, rate, key):
  """``torch.nn.Dropout(rate)`` in training mode, with a possibly traced ``rate``: each unit
  kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def scale_gradient(x, scale):
  """``x`` in the forward pass; its cotangent multiplied by ``scale`` in the backward pass
  (``scale = -lambda``: the gradient reversal layer of Ganin et al.)."""
  frozen = jax.lax.stop_gradient(x)
  return frozen + scale * (x - frozen)


# ----------------------------------------------------------------------------- networks
class DomainBedMLP(nn.Module):
  """DomainBed's ``networks.MLP``: ``Linear(in, width) -> Dropout -> ReLU``, then
  ``depth - 2`` times ``Linear(width, width) -> Dropout -> ReLU``, then ``Linear(width, out)``
  (torch's default init). ``dropout_rate`` may be traced; the masks use the ``"dropout"``
  rng."""

  width: int
  depth: int
  outputs: int

  @nn.compact
  def __call__(self, x, dropout_rate=0.0):
    x = TorchDense(self.width, name="input")(x)
    x = nn.relu(dropout(x, dropout_rate, self.make_rng("dropout")))
    for i in range(self.depth - 2):
      x = TorchDense(self.width, name=f"hidden{i}")(x)
      x = nn.relu(dropout(x, dropout_rate, self.make_rng("dropout")))
    return TorchDense(self.outputs, name="output")(x)


def _embedding_init(key, shape, dtype=jnp.float32):
  """``torch.nn.Embedding``'s init: N(0, 1)."""
  return jax.random.normal(key, shape, dtype)


# ----------------------------------------------------------------------------- DANN / CDANN
class DANNState(NamedTuple):
  discriminator: ExtraNet  # params {"mlp": the MLP's[, "embedding": [C, F] (CDANN)]}


def dann_discriminator_step(step, d_steps_per_g_step):
  """DomainBed's schedule: its ``update_count`` is ``step + 1`` when the check runs, and the
  step is a discriminator step iff ``update_count % (1 + d) < d``. With ``d = 1``: generator,
  discriminator, generator, ...; ``d = 0``: every step a generator step."""
  return (step + 1) % (1 + d_steps_per_g_step) < d_steps_per_g_step


def dann_generator_step(ctx):
  return lambda step: jnp.logical_not(
    dann_discriminator_step(step, ctx.hparams["d_steps_per_g_step"])
  )


def _dann_mlp(ctx, params):
  feats, _ = head_shape(params)
  hp = ctx.hparams
  return DomainBedMLP(int(hp["mlp_width"]), int(hp["mlp_depth"]), ctx.num_domains), feats


def _dann_disc_tx(ctx):
  hp = ctx.hparams
  return torch_adam_betas(hp["lr_d"], hp["weight_decay_d"], hp["beta1"], 0.9)


def dann_disc_loss(disc_out, disc_labels, y, num_classes, class_balance):
  """DomainBed's discriminator cross-entropy: the mean over the concatenated batch, or with
  ``class_balance`` (CDANN) ``sum_i CE_i / (count[y_i] * K)`` where ``count`` counts labels
  in the batch and ``K = max(y) + 1`` (``F.one_hot(all_y)``'s width: the number of classes
  only when the largest label occurs in the batch)."""
  per_example = -jnp.take_along_axis(jax.nn.log_softmax(disc_out), disc_labels[:, None], 1)[:, 0]
  if not class_balance:
    return jnp.mean(per_example)
  counts = jnp.sum(jax.nn.one_hot(y, num_classes, dtype=per_example.dtype), axis=0)
  width = (jnp.max(y) + 1).astype(per_example.dtype)
  weights = 1.0 / (counts[y] * width)
  return jnp.sum(weights * per_example)


def dann_gradients(conditional: bool, class_balance: bool) -> GradientSource:
  """DANN (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016) and
  CDANN (Li et al., "Deep Domain Generalization via Conditional Invariant Adversarial
  Networks", ECCV 2018), as DomainBed's ``AbstractDANN``.

  One forward of the featurizer on the concatenated batch: ``z = f(x)``, discriminator input
  ``u = z`` (DANN) or ``u = z + E[y]`` (CDANN, ``E`` a learned class embedding), domain
  logits ``h(u)`` (:class:`DomainBedMLP`, dropout in training mode)::

      disc_loss = CE(h(u), domain)   [class-balanced for CDANN, :func:`dann_disc_loss`]
                  + grad_penalty * mean_i || d/du_i sum_j CE(h(u_j), domain_j) ||^2
      gen_loss  = CE(classifier(z), y) - lambda * disc_loss

  On discriminator steps (:func:`dann_discriminator_step`) ``h`` and ``E`` take one
  ``Adam(lr_d, weight_decay_d, betas=(beta1, 0.9))`` step on ``disc_loss`` and the network
  does not move; on generator steps the featurizer and classifier take one
  ``Adam(lr_g, weight_decay_g, betas=(beta1, 0.9))`` step on ``gen_loss`` (the method's
  optimizer, skipped on discriminator steps by :func:`dgjax.core.on_steps`) and the discriminator
  does not move. Both gradients come from ONE backward pass: ``u`` is built from ``z``
  through :func:`scale_gradient` with scale ``-lambda``, so differentiating
  ``CE(classifier(z), y) + disc_loss`` gives ``d disc_loss`` for the discriminator and
  ``d gen_loss`` for the network (the gradient-penalty term included, differentiated
  through the input gradient as DomainBed's ``create_graph=True``).

  Logs ``disc_loss``, ``gen_loss``, ``grad_penalty`` and ``disc_step`` (1 on discriminator
  steps) every step; ``env_losses`` are the per-domain classification losses. DomainBed
  returns only ``disc_loss`` on discriminator steps and only ``gen_loss`` on generator steps
  (no ``loss``), so its records average each over the steps that returned it; ours average
  both over every step.
  """

  def init(ctx, params, key):
    mlp, feats = _dann_mlp(ctx, params)
    _, classes = head_shape(params)
    k_mlp = extra_net_key(key, "discriminator")
    disc = {"mlp": mlp.init({"params": k_mlp, "dropout": k_mlp}, jnp.zeros((1, feats)))["params"]}
    if conditional:
      disc["embedding"] = _embedding_init(extra_net_key(key, "class_embedding"), (classes, feats))
    disc = like_params(disc, params)
    return DANNState(ExtraNet.create(disc, _dann_disc_tx(ctx)))

  def grads(ctx, params, state, batch, step, key):
    hp = ctx.hparams
    mlp, _ = _dann_mlp(ctx, params)
    _, classes = head_shape(params)
    d, b = batch["y"].shape
    y = batch["y"].reshape(-1)
    disc_labels = jnp.repeat(jnp.arange(d), b)

    def total(p, disc):
      z = ctx.features(p, flatten_domains(batch["x"]))
      logits = ctx.head_logits(p["classifier"], z)
      u = scale_gradient(z, -hp["lambda"])
      if conditional:
        u = u + disc["embedding"][y]
      disc_fn = lambda v: mlp.apply(
        {"params": disc["mlp"]}, v, hp["mlp_dropout"], rngs={"dropout": key}
      )
      disc_out, disc_vjp = jax.vjp(disc_fn, u)
      probs = jax.nn.softmax(disc_out)
      # d/du of the summed (unweighted) CE: (softmax - onehot) pulled back through h
      (input_grad,) = disc_vjp(probs - jax.nn.one_hot(disc_labels, d, dtype=probs.dtype))
      penalty = jnp.mean(jnp.sum(jnp.square(input_grad), axis=1))
      disc_loss = (
        dann_disc_loss(disc_out, disc_labels, y, classes, class_balance)
        + hp["grad_penalty"] * penalty
      )
      env_losses = env_losses_of(logits.reshape(d, b, -1), batch["y"])
      cls_loss = cross_entropy(logits, y)
      return cls_loss + disc_loss, (env_losses, cls_loss, disc_loss, penalty)

    disc = state.discriminator
    (_, (env_losses, cls_loss, disc_loss, penalty)), (g_net, g_disc) = jax.value_and_grad(
      total, argnums=(0, 1), has_aux=True
    )(params, disc.params)

    is_disc = dann_discriminator_step(step, hp["d_steps_per_g_step"])
    new_state = DANNState(
      select_tree(is_disc, disc.apply_gradients(g_disc, _dann_disc_tx(ctx)), disc)
    )
    gen_loss = cls_loss - hp["lambda"] * disc_loss
    metrics = {
      "disc_loss": disc_loss,
      "gen_loss": gen_loss,
      "grad_penalty": penalty,
      "disc_step": is_disc.astype(jnp.float32),
    }
    return g_net, Terms(env_losses, None, metrics, new_state)

  return GradientSource(grads, init)


def _generator_optimizer(ctx):
  hp = ctx.hparams
  return on_steps(
    torch_adam_betas(hp["lr_g"], hp["weight_decay_g"], hp["beta1"], 0.9), dann_generator_step(ctx)
  )


def _dann_hparams() -> dict[str, HParam]:
  """DomainBed's ``DANN``/``CDANN`` hparams (``hparams_registry.py``)."""
  return {
    "lambda": HParam(
      1.0,
      log_uniform(-2, 2),
      "weight of the adversarial (domain) loss in the generator loss",
      minimum=0.0,
    ),
    "weight_decay_d": HParam(
      0.0, log_uniform(-6, -2), "discriminator Adam weight decay", minimum=0.0
    ),
    "d_steps_per_g_step": HParam(
      1,
      lambda r: int(2 ** r.uniform(0, 3)),
      "discriminator steps per generator step",
      kind="int",
      minimum=0,
    ),
    "grad_penalty": HParam(
      0.0, log_uniform(-2, 1), "weight of the discriminator's input-gradient penalty", minimum=0.0
    ),
    "beta1": HParam(
      0.5,
      lambda r: float(r.choice([0.0, 0.5])),
      "Adam beta1 of both optimizers (beta2 is 0.9)",
      minimum=0.0,
      maximum=0.999,
    ),
    "mlp_width": HParam(
      256,
      lambda r: int(2 ** r.uniform(6, 10)),
      "discriminator width",
      kind="int",
      structural=True,
      minimum=1,
    ),
    "mlp_depth": HParam(
      3,
      lambda r: int(r.choice([3, 4, 5])),
      "discriminator depth (linear layers)",
      kind="int",
      structural=True,
      minimum=2,
    ),
    "mlp_dropout": HParam(
      0.0,
      lambda r: float(r.choice([0.0, 0.1, 0.5])),
      "discriminator dropout rate",
      minimum=0.0,
      maximum=0.99,
    ),
    "lr_g": HParam(
      1e-3,
      log_uniform(-4.5, -2.5),
      "generator (featurizer + classifier) Adam learning rate",
      positive=True,
      large_default=5e-5,
      large_sample=log_uniform(-5, -3.5),
    ),
    "lr_d": HParam(
      1e-3,
      log_uniform(-4.5, -2.5),
      "discriminator Adam learning rate",
      positive=True,
      large_default=5e-5,
      large_sample=log_uniform(-5, -3.5),
    ),
    "weight_decay_g": HParam(
      0.0,
      lambda r: 0.0,
      "generator Adam weight decay",
      minimum=0.0,
      large_default=0.0,
      large_sample=log_uniform(-6, -2),
    ),
  }


DANN = Method(
  name="dann",
  description="DANN: a domain discriminator on the features, trained adversarially with "
  "alternating Adam steps (Ganin et al., JMLR 2016)",
  domainbed_name="DANN",
  hparams=_dann_hparams(),
  gradients=dann_gradients(conditional=False, class_balance=False),
  optimizer=_generator_optimizer,
)

CDANN = Method(
  name="cdann",
  description="Conditional DANN: the discriminator sees features plus a class embedding, "
  "class-balanced loss (Li et al., ECCV 2018)",
  domainbed_name="CDANN",
  hparams=_dann_hparams(),
  gradients=dann_gradients(conditional=True, class_balance=True),
  optimizer=_generator_optimizer,
)


# ----------------------------------------------------------------------------- Transfer
class TransferState(NamedTuple):
  adv_head: PyTree  # the adversarial classifier (same shape as the head)
  featurizer_opt: optax.OptState
  classifier_opt: optax.OptState


def loss_gap(ctx, featurizer, head, batch):
  """DomainBed's ``Transfer.loss_gap``: ``max_d L_d - min_d L_d`` of the per-domain
  cross-entropies of ``head`` on the featurizer's features, one featurizer forward per
  domain as DomainBed's loop (unfrozen BatchNorm: each domain's own statistics)."""
  z = over_domains(ctx, lambda c, xd: c.features({"featurizer": featurizer}, xd), batch["x"])
  losses = env_losses_of(ctx.head_logits(head, z), batch["y"])
  return jnp.max(losses) - jnp.min(losses)


def project_to_ball(tree, center, radius):
  """DomainBed's ``proj``: ``tree`` unchanged within Euclidean distance ``radius`` of
  ``center`` (all leaves as one vector), else moved onto the ball's surface."""
  dist = optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, tree, center))
  ratio = jnp.where(dist <= radius, 1.0, radius / jnp.maximum(dist, 1e-30))
  return jax.tree.map(lambda t, c: c + ratio * (t - c), tree, center)


def transfer_gradients() -> GradientSource:
  """Transfer (Zhang et al., "Quantifying and Improving Transferability in Domain
  Generalization", NeurIPS 2021, Algorithm 1) as DomainBed's ``Transfer.update``.

  Featurizer ``f``, classifier ``c`` (the model's head) and an adversarial classifier ``a``
  (this source's state; a copy of ``c`` at init). With ``L_d(h, f)`` the per-domain
  cross-entropy and ``gap(h, f) = max_d L_d - min_d L_d`` (:func:`loss_gap`):

      1. f, c <- Adam(lr, weight_decay) on CE of c o f on the concatenated batch
      2. f    <- Adam on t_lambda * gap(a, f)       (c has no gradient: its Adam is not stepped)
      3. a    <- c;  then d_steps_per_g times:
                 a <- proj_{B(c, delta)}(a + lr_d * t_lambda * grad_a gap(a, f))   (SGD ascent)

  so ``f``'s Adam steps twice per step and ``c``'s once (separate states, as torch's
  per-parameter Adam steps). The source makes the updates itself and returns the
  pseudo-gradient ``theta - theta_new``; the method's optimizer is ``sgd(1)``. ``gap`` logs
  DomainBed's returned value ``t_lambda * gap`` before the last ascent step.

  ``gda = True`` follows DomainBed's code, whose ``self.optimizer`` is then
  ``SGD(adv_classifier.parameters(), lr)``: steps 1 and 2 move only ``a`` (which step 3
  overwrites), so the featurizer and classifier never change (DomainBed's random search always
  draws ``gda = True``). ``weight_decay_d`` and ``beta1`` are registered by DomainBed for
  Transfer but not used by its code (nor here).

  Unfrozen BatchNorm: step 1 sees the concatenated batch's statistics, the gap passes each
  domain's own (as DomainBed's calls). The running statistics move once per step, by the
  concatenated batch at the step's params; DomainBed's also move in each of its ``1 + (1 +
  d_steps_per_g) D`` training-mode featurizer calls.
  """

  def init(ctx, params, key):
    del key  # the adversarial classifier starts as a copy of the classifier
    tx = domainbed_adam()(ctx)
    return TransferState(
      params["classifier"], tx.init(params["featurizer"]), tx.init(params["classifier"])
    )

  def grads(ctx, params, state, batch, step, key):
    del step, key
    hp = ctx.hparams
    tx = domainbed_adam()(ctx)
    t_lambda = hp["t_lambda"]
    f0, c0 = params["featurizer"], params["classifier"]

    def ce(f, c):
      d, b = batch["y"].shape
      logits = ctx.head_logits(c, ctx.features({"featurizer": f}, flatten_domains(batch["x"])))
      env_losses = env_losses_of(logits.reshape(d, b, -1), batch["y"])
      return jnp.mean(env_losses), env_losses

    (_, env_losses), (g_f, g_c) = jax.value_and_grad(ce, argnums=(0, 1), has_aux=True)(f0, c0)
    if hp["gda"]:
      f2, c1, f_opt, c_opt = f0, c0, state.featurizer_opt, state.classifier_opt
    else:
      u_f, f_opt = tx.update(g_f, state.featurizer_opt, f0)
      u_c, c_opt = tx.update(g_c, state.classifier_opt, c0)
      f1, c1 = optax.apply_updates(f0, u_f), optax.apply_updates(c0, u_c)
      g_gap = jax.grad(lambda f: t_lambda * loss_gap(ctx, f, state.adv_head, batch))(f1)
      u_f, f_opt = tx.update(g_gap, f_opt, f1)
      f2 = optax.apply_updates(f1, u_f)

    def ascent(_, carry):
      adv, _ = carry
      gap, g_adv = jax.value_and_grad(lambda a: t_lambda * loss_gap(ctx, f2, a, batch))(adv)
      adv = jax.tree.map(lambda a, g: a + hp["lr_d"] * g, adv, g_adv)
      return project_to_ball(adv, c1, hp["delta"]), gap

    adv, gap = jax.lax.fori_loop(
      0, hp["d_steps_per_g"], ascent, (c1, jnp.zeros((), env_losses.dtype))
    )
    new = {**params, "featurizer": f2, "classifier": c1}
    pseudo = jax.tree.map(lambda p, q: p - q, params, new)
    return pseudo, Terms(env_losses, None, {"gap": gap}, TransferState(adv, f_opt, c_opt))

  return GradientSource(grads, init)


TRANSFER = Method(
  name="transfer",
  description="Transfer: the featurizer minimises the worst-case loss gap of an adversarial "
  "classifier kept near the classifier (Zhang et al., NeurIPS 2021)",
  domainbed_name="Transfer",
  hparams={
    "t_lambda": HParam(1.0, log_uniform(-2, 1), "weight of the loss gap", minimum=0.0),
    "delta": HParam(
      2.0,
      lambda r: float(r.uniform(0.1, 3.0)),
      "radius of the ball around the classifier that holds the adversarial classifier",
      minimum=0.0,
    ),
    "d_steps_per_g": HParam(
      10,
      lambda r: int(r.choice([1, 2, 5])),
      "adversarial SGD ascent steps per step",
      kind="int",
      minimum=0,
    ),
    "weight_decay_d": HParam(
      0.0,
      log_uniform(-6, -2),
      "registered by DomainBed, unused by its Transfer (and ours)",
      minimum=0.0,
    ),
    "gda": HParam(
      False,
      lambda r: True,
      "DomainBed's gda branch: its optimizer then holds "
      "only the adversarial classifier, so the network never trains",
      kind="bool",
      structural=True,
    ),
    "beta1": HParam(
      0.5,
      lambda r: float(r.choice([0.0, 0.5])),
      "registered by DomainBed, unused by its Transfer (and ours)",
      minimum=0.0,
      maximum=0.999,
    ),
    "lr_d": HParam(
      1e-3, log_uniform(-4.5, -2.5), "adversarial classifier SGD step size", positive=True
    ),
  },
  gradients=transfer_gradients(),
  optimizer=lambda ctx: optax.sgd(1.0),
)
