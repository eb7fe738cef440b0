"""ADRMX (Demirel, Aptoula & Ozkan, "ADRMX: Additive Disentanglement of Domain Features with
Remix Loss", 2023, arXiv:2308.06624), as DomainBed's ``ADRMX``.

Networks: the model's featurizer is ``featurizer_label`` (``f_l``); this method adds
``featurizer_domain`` (``f_d``, same architecture), three non-linear classifiers
(DomainBed's ``Classifier(is_nonlinear=True)``: ``F -> F/2 -> F/4 -> out`` with ReLUs):
``classifier_label_1`` (``c_1``), ``classifier_label_2`` (``c_2``), ``classifier_domain``
(``c_d``), and a discriminator (DomainBed's ``MLP``: ``mlp_depth`` linear layers of width
``mlp_width``, dropout ``mlp_dropout``, ReLU) predicting the domain. On the pooled batch, with
``z_l = f_l(x)``, ``z_d = f_d(x)``, ``z = z_l - z_d`` and domain labels ``d``::

    disc_loss = CE(disc(z), d)
    gen_loss  = CE(c_1(z_l), y) + CE(c_2(z), y) + dclf_lambda CE(c_d(z_d), d)
              + rmxd_lambda remix + cnt_lambda (SupCon_l(z_l) + SupCon_l(z)) - disc_lambda disc_loss

``remix``: for each class with at least two examples, two random examples ``i, j``,
``CE(c_1(z[i] + z_d[j]), y_i)``, summed and divided by the number of classes. DomainBed means
``i, j`` to be of that class (from different domains, its comment says; nothing checks it) but
indexes the batch with positions in the class's index list, so ``i, j`` are random among the
first ``n_c`` examples of the pooled batch, of any class; ``remix_pairs = "domainbed"`` (the
default) reproduces that, ``"same_class"`` draws them from the class (:func:`remix_pairs`).
``SupCon_l``: DomainBed's ``SupConLossLambda(0.5, T=0.07)`` (:func:`supcon_lambda_loss`).

Steps alternate (DomainBed's ``update_count``, here ``step + 1``): when ``(step + 1) mod
(1 + d_steps_per_g_step) < d_steps_per_g_step`` only the discriminator takes an Adam step on
``disc_loss``; otherwise every other network takes one on ``gen_loss``, the discriminator
held. Both optimizers are ``Adam(lr, betas=(beta1, 0.9))`` without weight decay (the common
``weight_decay`` hparam is unused, as in DomainBed). The model's own parameters go through the
engine's optimizer, which skips the discriminator steps (:func:`dgjax.core.on_steps`: no
update and no Adam state change); the added networks and their Adam states are this method's
state (two :class:`dgjax.core.ExtraNet`).
``predict`` is ``c_1(f_l(x))`` (DomainBed's ``network``); the model's linear head is unused
(its gradient is 0, so Adam leaves it as it was).

Differences from DomainBed: randomness from the step's key; ``loss`` is ``gen_loss`` at every
step (DomainBed logs ``loss_total`` on generator steps and only ``loss_disc`` on
discriminator steps; both are logged here, with ``discriminator_step``); ``env_losses`` are the
per-domain ``CE(c_1(z_l), y)``. ``f_d`` starts as an independent draw of the featurizer's
torch-default initialisation (:func:`redraw_torch_init`, DomainBed's behaviour for randomly
initialised featurizers) or, with ``domain_featurizer_init = "copy"`` (the default on
large-image datasets, whose DomainBed featurizers both load the same pretrained weights), as a
copy of the model's featurizer.

Every added network is drawn from the run's key (:func:`dgjax.core.extra_net_key`, one stream
per network name), so trials of different seeds start them from different weights, as
DomainBed's (drawn from the run's torch seed). Earlier versions drew them from the fixed
``fold_in(key(0), 2308)``: the same networks in every trial; their initial draws differ from
those versions'.
"""

from __future__ import annotations

import math
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
  extra_net_key,
  flatten_domains,
  on_steps,
)
from dgjax.losses import cross_entropy
from dgjax.models import TorchDense
from dgjax.types import PyTree


class NonlinearClassifier(nn.Module):
  """DomainBed's ``Classifier(F, out, is_nonlinear=True)``: ``F -> F//2 -> F//4 -> out``."""

  in_features: int
  out: int

  @nn.compact
  def __call__(self, z):
    z = nn.relu(TorchDense(self.in_features // 2, name="dense0")(z))
    z = nn.relu(TorchDense(self.in_features // 4, name="dense1")(z))
    return TorchDense(self.out, name="dense2")(z)


class DomainMLP(nn.Module):
  """DomainBed's ``networks.MLP(F, out, hparams)``: input layer, ``depth - 2`` hidden layers
  and an output layer; dropout then ReLU after each but the last."""

  width: int
  depth: int
  out: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, z, key=None):
    for i in range(self.depth - 1):
      z = TorchDense(self.width, name=f"dense{i}")(z)
      if self.dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - self.dropout, z.shape)
        z = jnp.where(keep, z / (1.0 - self.dropout), 0.0)
      z = nn.relu(z)
    return TorchDense(self.out, name=f"dense{self.depth - 1}")(z)


def redraw_torch_init(params: PyTree, key: jax.Array) -> PyTree:
  """A fresh draw of torch's default initialisation for the same parameter shapes: in every
  layer with a ``kernel`` (last axis = outputs), kernel and bias ~ ``U(-1/sqrt(fan_in), +)``,
  ``fan_in`` = the product of the kernel's other axes (what :class:`dgjax.models.TorchDense`
  and :class:`dgjax.conv.Conv` draw); other leaves (GroupNorm scales and shifts, which start
  at 1 and 0) are kept."""
  counter = [0]

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: walk(v) for k, v in tree.items()}
    if "kernel" in tree and not isinstance(tree["kernel"], dict):
      kernel = tree["kernel"]
      bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
      counter[0] += 1
      k_w, k_b = jax.random.split(jax.random.fold_in(key, counter[0]))
      out["kernel"] = jax.random.uniform(k_w, kernel.shape, kernel.dtype, -bound, bound)
      if "bias" in tree:
        out["bias"] = jax.random.uniform(k_b, tree["bias"].shape, tree["bias"].dtype, -bound, bound)
    return out

  return walk(dict(params))


def supcon_lambda_loss(
  features: jax.Array,
  labels: jax.Array,
  domains: jax.Array,
  lamda: float = 0.5,
  temperature: float = 0.07,
) -> jax.Array:
  """DomainBed's ``SupConLossLambda`` (``domainbed/lib/misc.py``), vectorised over rows.

  With unit-normalised features, ``s_ij = f_i.f_j / T`` and ``w_ij = lamda`` for ``j`` in
  ``i``'s domain, ``1 - lamda`` otherwise, for each ``i`` (``j != i`` throughout)::

      den_i  = sum_j w_ij exp(s_ij) + 1e-5
      l_i    = (1 / |P_i|) sum_{j in P_i} log(w_ij exp(s_ij) / den_i + 1e-5)     (P_i: same label)
      loss   = -sum_{i: |P_i| > 0} l_i / (N - #{i: |P_i| = 0} + 1)

  (rows without positives are DomainBed's NaN rows, skipped; the ``+ 1`` is DomainBed's).
  """
  n = features.shape[0]
  f = features / jnp.maximum(jnp.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  s = f @ f.T / temperature
  same_d = domains[:, None] == domains[None, :]
  not_self = ~jnp.eye(n, dtype=bool)
  pos = (labels[:, None] == labels[None, :]) & not_self
  weighted = jnp.where(same_d, lamda, 1.0 - lamda) * jnp.exp(s)
  den = jnp.sum(jnp.where(not_self, weighted, 0.0), axis=1, keepdims=True) + 1e-5
  log_fraction = jnp.log(weighted / den + 1e-5)
  num_pos = jnp.sum(pos, axis=1)
  valid = num_pos > 0
  rows = jnp.sum(jnp.where(pos, log_fraction, 0.0), axis=1) / jnp.maximum(num_pos, 1)
  return -jnp.sum(jnp.where(valid, rows, 0.0)) / (n - jnp.sum(~valid) + 1)


def remix_pairs(key: jax.Array, labels: jax.Array, num_classes: int, same_class: bool = False):
  """Per class ``c`` with ``n_c >= 2`` examples, the two pooled-batch indices DomainBed's remix
  uses: ``perm[:2]`` of a uniform random permutation of ``range(n_c)``, used directly as batch
  indices (DomainBed indexes the batch with them, not the class's index list: so they are two
  distinct random examples among the FIRST ``n_c`` of the batch, of any class; the target is
  the first one's label). ``same_class``: instead two distinct random examples of class ``c``
  (the paper's intent). Returns ``(first, second, valid)``, each ``[num_classes]``,
  ``valid = n_c >= 2``."""
  n = labels.shape[0]
  order = jax.random.uniform(key, labels.shape)

  def pick(c):
    count = jnp.sum(labels == c)
    eligible = (labels == c) if same_class else (jnp.arange(n) < count)
    idx = jnp.argsort(jnp.where(eligible, order, jnp.inf))[:2]
    return idx[0], idx[1], count >= 2

  return jax.vmap(pick)(jnp.arange(num_classes))


def adrmx_adam(ctx) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr, betas=(beta1, 0.9))``, no weight decay."""
  return optax.adam(ctx.hparams["lr"], b1=ctx.hparams["beta1"], b2=0.9, eps=1e-8)


def is_discriminator_step(step, d_steps_per_g_step):
  """DomainBed's ``update_count % (1 + d) < d`` with ``update_count = step + 1``."""
  return (step + 1) % (1 + d_steps_per_g_step) < d_steps_per_g_step


class ADRMXState(NamedTuple):
  generator: ExtraNet  # featurizer_domain, classifier_label_1/2, classifier_domain
  discriminator: ExtraNet


def _sizes(ctx, params):
  f, out = params["classifier"]["kernel"].shape
  if f < 4:
    raise ValueError(
      f"ADRMX's non-linear classifiers need at least 4 features (F -> F/2 -> "
      f"F/4), the model's featurizer gives {f}"
    )
  return f, out


def _networks(ctx, f, out):
  hp = ctx.hparams
  return {
    "classifier_label_1": NonlinearClassifier(f, out),
    "classifier_label_2": NonlinearClassifier(f, out),
    "classifier_domain": NonlinearClassifier(f, ctx.num_domains),
    "discriminator": DomainMLP(
      int(hp["mlp_width"]), int(hp["mlp_depth"]), ctx.num_domains, float(hp["mlp_dropout"])
    ),
  }


def adrmx_losses(ctx, params, generator, discriminator, batch, key):
  """Every ADRMX loss term on the pooled batch (see the module docs), as a dict, and the
  per-domain ``CE(c_1(z_l), y)``."""
  f, out = _sizes(ctx, params)
  nets = _networks(ctx, f, out)
  x, y = flatten_domains(batch["x"]), flatten_domains(batch["y"])
  d, b = batch["y"].shape[:2]
  domains = jnp.repeat(jnp.arange(d), b)
  k_remix, k_drop = jax.random.split(key)
  run = lambda name, p, z: nets[name].apply({"params": p}, z)

  z_l = ctx.features(params, x)
  z_d = ctx.features({**params, "featurizer": generator["featurizer_domain"]}, x)
  z = z_l - z_d
  disc_loss = cross_entropy(
    nets["discriminator"].apply({"params": discriminator}, z, k_drop), domains
  )
  int_logits = run("classifier_label_1", generator["classifier_label_1"], z_l)
  env_losses = jax.vmap(cross_entropy)(int_logits.reshape((d, b, -1)), batch["y"])
  num_classes = max(out, 2)
  first, second, valid = remix_pairs(
    k_remix, y, num_classes, ctx.hparams["remix_pairs"] == "same_class"
  )
  remixed = run("classifier_label_1", generator["classifier_label_1"], z[first] + z_d[second])
  remix_terms = jax.vmap(lambda lg, t: cross_entropy(lg[None], t[None]))(remixed, y[first])
  terms = {
    "loss_disc": disc_loss,
    "loss_clf_int": jnp.mean(env_losses),
    "loss_clf_fin": cross_entropy(run("classifier_label_2", generator["classifier_label_2"], z), y),
    "loss_dmn": cross_entropy(
      run("classifier_domain", generator["classifier_domain"], z_d), domains
    ),
    "loss_cnt_int": supcon_lambda_loss(z_l, y, domains),
    "loss_cnt_final": supcon_lambda_loss(z, y, domains),
    "loss_remixed": jnp.sum(jnp.where(valid, remix_terms, 0.0)) / num_classes,
  }
  hp = ctx.hparams
  terms["loss_total"] = (
    terms["loss_clf_int"]
    + terms["loss_clf_fin"]
    + hp["dclf_lambda"] * terms["loss_dmn"]
    + hp["rmxd_lambda"] * terms["loss_remixed"]
    + hp["cnt_lambda"] * (terms["loss_cnt_int"] + terms["loss_cnt_final"])
    - hp["disc_lambda"] * disc_loss
  )
  return terms, env_losses


def adrmx_gradients() -> GradientSource:
  """Discriminator steps update the discriminator inside this source (model gradient 0, which
  the engine's optimizer skips anyway, :func:`adrmx_optimizer`); generator steps return the
  model's gradient of ``gen_loss`` and update the added networks here."""

  def init(ctx, params, key):
    f, out = _sizes(ctx, params)
    nets = _networks(ctx, f, out)
    z = jnp.zeros((1, f), jnp.float32)
    extra = {name: net.init(extra_net_key(key, name), z)["params"] for name, net in nets.items()}
    if ctx.hparams["domain_featurizer_init"] == "copy":
      extra["featurizer_domain"] = jax.tree.map(jnp.asarray, params["featurizer"])
    else:
      extra["featurizer_domain"] = redraw_torch_init(
        params["featurizer"], extra_net_key(key, "featurizer_domain")
      )
    disc = extra.pop("discriminator")
    tx = adrmx_adam(ctx)
    return ADRMXState(ExtraNet.create(extra, tx), ExtraNet.create(disc, tx))

  def grads(ctx, params, state, batch, step, key):
    tx = adrmx_adam(ctx)
    gen, disc = state.generator, state.discriminator

    def discriminator_step(_):
      (_, (terms, env_losses)), g_disc = jax.value_and_grad(
        lambda dp: (lambda t: (t[0]["loss_disc"], t))(
          adrmx_losses(ctx, params, gen.params, dp, batch, key)
        ),
        has_aux=True,
      )(disc.params)
      zeros = jax.tree.map(jnp.zeros_like, params)
      return zeros, gen, disc.apply_gradients(g_disc, tx), terms, env_losses

    def generator_step(_):
      (_, (terms, env_losses)), (g, g_gen) = jax.value_and_grad(
        lambda p, gp: (lambda t: (t[0]["loss_total"], t))(
          adrmx_losses(ctx, p, gp, disc.params, batch, key)
        ),
        argnums=(0, 1),
        has_aux=True,
      )(params, gen.params)
      return g, gen.apply_gradients(g_gen, tx), disc, terms, env_losses

    disc_turn = is_discriminator_step(step, ctx.hparams["d_steps_per_g_step"])
    g, new_gen, new_disc, terms, env_losses = jax.lax.cond(
      disc_turn, discriminator_step, generator_step, None
    )
    metrics = {
      "loss": terms["loss_total"],
      **terms,
      "discriminator_step": disc_turn.astype(jnp.float32),
    }
    return g, Terms(env_losses, None, metrics, ADRMXState(new_gen, new_disc))

  return GradientSource(grads, init)


def adrmx_optimizer(ctx) -> optax.GradientTransformation:
  """The model's ``Adam(lr, betas=(beta1, 0.9))`` on generator steps only (discriminator steps:
  no update, Adam's state unchanged)."""
  d_steps = ctx.hparams["d_steps_per_g_step"]
  return on_steps(
    adrmx_adam(ctx), lambda step: jnp.logical_not(is_discriminator_step(step, d_steps))
  )


def adrmx_predict(ctx, params, state, x):
  """``c_1(f_l(x))`` (DomainBed's ``ADRMX.network``)."""
  f, out = _sizes(ctx, params)
  c1 = optax.tree_utils.tree_get(state, "generator").params["classifier_label_1"]
  return NonlinearClassifier(f, out).apply({"params": c1}, ctx.features(params, x))


def _fixed(value, doc, **kw):
  return HParam(value, lambda r: value, doc, **kw)


ADRMX = Method(
  name="adrmx",
  description="ADRMX: label and domain featurizers combined additively, a domain adversary on "
  "their difference, SupCon and remix losses (Demirel et al., 2023)",
  domainbed_name="ADRMX",
  hparams={
    "lr": HParam(
      3e-3,
      lambda r: float(r.choice([5e-4, 1e-3, 2e-3, 3e-3])),
      "Adam learning rate (both optimizers)",
      role="lr",
      positive=True,
      large_default=3e-5,
      large_sample=lambda r: float(r.choice([2e-5, 3e-5, 4e-5, 5e-5])),
    ),
    "cnt_lambda": _fixed(1.0, "weight of the two SupCon losses", minimum=0.0),
    "dclf_lambda": _fixed(1.0, "weight of the domain classifier's CE", minimum=0.0),
    "disc_lambda": _fixed(
      0.75, "weight of the adversarial (negated) discriminator loss", minimum=0.0
    ),
    "rmxd_lambda": _fixed(1.0, "weight of the remix loss", minimum=0.0),
    "d_steps_per_g_step": _fixed(
      2, "discriminator steps per generator step", kind="int", minimum=0
    ),
    "beta1": _fixed(0.5, "Adam beta1 (beta2 is 0.9)", minimum=0.0, maximum=1.0),
    "mlp_width": _fixed(256, "discriminator width", kind="int", structural=True, minimum=1),
    "mlp_depth": HParam(
      9,
      lambda r: int(r.choice([8, 9, 10])),
      "discriminator linear layers",
      kind="int",
      structural=True,
      minimum=2,
    ),
    "mlp_dropout": _fixed(0.0, "discriminator dropout", structural=True, minimum=0.0, maximum=0.99),
    "remix_pairs": HParam(
      "domainbed",
      lambda r: "domainbed",
      "remix pairs as DomainBed's code draws them, or from the same class",
      kind="choice",
      choices=("domainbed", "same_class"),
      structural=True,
    ),
    "domain_featurizer_init": HParam(
      "independent",
      lambda r: "independent",
      "featurizer_domain's start: an independent draw, or a copy (pretrained backbones)",
      kind="choice",
      choices=("independent", "copy"),
      structural=True,
      large_default="copy",
      large_sample=lambda r: "copy",
    ),
  },
  gradients=adrmx_gradients(),
  optimizer=adrmx_optimizer,
  predict=adrmx_predict,
)
