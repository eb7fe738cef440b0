"""ERM with a changed training recipe or an extra adversary: ERM++ and URM.

* ERM++ (Teterwak et al., "ERM++: An Improved Baseline for Domain Generalization", 2023;
  DomainBed's ``ERMPlusPlus``): pooled ERM with a linear-probing warm-up (only the classifier
  head trains, with its own optimizer and ``linear_lr``, for the first ``linear_steps + 1``
  steps), then a fresh optimizer over the whole network, and a simple moving average of the
  weights from step ``sma_start_iter`` on, which is what ``predict`` (evaluation) uses.
* URM (Krishnamachari, Ng & Foo, "Uniformly Distributed Feature Representations for Fair
  and Robust Learning", TMLR 2024; DomainBed's ``URM``): the featurizer's output goes through
  a bounded activation (``tanh`` by default) and an adversarial MLP discriminator tells those
  features from uniform noise; the network is trained to fool it. The discriminator (a
  :class:`dgjax.core.ExtraNet`) is drawn from the run's key (:func:`dgjax.core.extra_net_key`),
  so trials of different seeds start it from different weights; earlier versions drew it from
  the fixed ``fold_in(key(0), 235)``, the same discriminator in every trial.
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
  env_losses_of,
  extra_net_key,
  flatten_domains,
  log_uniform,
  penalized,
  pooled_erm_terms,
  torch_adam,
)
from dgjax.models import TorchDense
from dgjax.types import PyTree


# ============================================================================== ERM++
class LarsState(NamedTuple):
  momentum: PyTree


def torch_lars(
  lr, weight_decay=0.0, momentum: float = 0.9, trust_coefficient: float = 0.001
) -> optax.GradientTransformation:
  """DomainBed's ``LARS`` optimizer (``domainbed/lib/misc.py``; You, Gitman & Ginsburg, 2017)
  for parameters with more than one dimension, plain heavy-ball SGD for the others::

      d = g + weight_decay * p;  d *= trust * |p| / |d|   (only if p.ndim > 1; 1 if a norm is 0)
      mu <- momentum * mu + d;   p <- p - lr * mu
  """

  def init(params):
    return LarsState(jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    def scaled(g, p):
      if p.ndim <= 1:
        return g
      d = g + weight_decay * p
      pn, dn = jnp.linalg.norm(p), jnp.linalg.norm(d)
      q = jnp.where(pn > 0, jnp.where(dn > 0, trust_coefficient * pn / dn, 1.0), 1.0)
      return d * q

    d = jax.tree.map(scaled, grads, params)
    mu = jax.tree.map(lambda m, x: momentum * m + x, state.momentum, d)
    return jax.tree.map(lambda m: -lr * m, mu), LarsState(mu)

  return optax.GradientTransformation(init, update)


class LinearProbeState(NamedTuple):
  head: optax.OptState  # the head-only optimizer (linear probing)
  full: optax.OptState  # the whole-network optimizer, untouched until the switch


def linear_probe_then_full(
  head_tx: optax.GradientTransformation,
  full_tx: optax.GradientTransformation,
  linear_steps,
  head_key: str = "classifier",
) -> optax.GradientTransformationExtraArgs:
  """ERM++'s two optimizers as one transform (extra argument ``step``, 0-based):

  * ``step <= linear_steps``: ``head_tx`` updates ``params[head_key]`` only; every other
    parameter stays (update 0) and ``full_tx``'s state does not advance;
  * ``step > linear_steps``: ``full_tx`` updates everything, from its initial state at the
    first such step (DomainBed's ``global_iter > linear_steps``, ``global_iter`` counting the
    updates done before this one).

  ``linear_steps`` may be traced.
  """

  def init(params):
    return LinearProbeState(head_tx.init(params[head_key]), full_tx.init(params))

  def update(grads, state, params=None, *, step, **extra):
    del extra
    head_u, head_s = head_tx.update(grads[head_key], state.head, params[head_key])
    full_u, full_s = full_tx.update(grads, state.full, params)
    probe_u = {
      k: (head_u if k == head_key else jax.tree.map(jnp.zeros_like, v)) for k, v in full_u.items()
    }
    probing = step <= linear_steps
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(probing, x, y), a, b)
    return pick(probe_u, full_u), LinearProbeState(
      pick(head_s, state.head), pick(state.full, full_s)
    )

  return optax.GradientTransformationExtraArgs(init, update)


class WeightAverageState(NamedTuple):
  sma_params: PyTree  # the averaged parameters (DomainBed's ``network_sma``)


def simple_moving_average(start) -> optax.GradientTransformationExtraArgs:
  """DomainBed's ``ErmPlusPlusMovingAvg.update_sma`` as an identity transform that keeps the
  average of the parameters AFTER this step's ``updates`` (place it last in a chain)::

      t = step + 1                      (updates done, DomainBed's global_iter)
      t <  start:  avg = p_t
      t >= start:  c = t - start + 1;   avg = (c * avg + p_t) / (c + 1)

  so from ``t = start`` on, ``avg`` is the plain mean of ``p_{start-1}, ..., p_t``.
  ``init`` copies the initial parameters. ``start`` may be traced.
  """

  def init(params):
    return WeightAverageState(jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None, *, step, **extra):
    del extra
    t = step + 1
    c = (t - start + 1).astype(jnp.float32)
    averaging = t >= start

    def avg(a, p, u):
      new = p + u
      mean = (a * c.astype(a.dtype) + new) / (1.0 + c).astype(a.dtype)
      return jnp.where(averaging, mean, new)

    return updates, WeightAverageState(jax.tree.map(avg, state.sma_params, params, updates))

  return optax.GradientTransformationExtraArgs(init, update)


def erm_plus_plus_optimizer(ctx) -> optax.GradientTransformation:
  """Head-only probing with ``linear_lr``, then the whole network with ``lr`` (torch Adam with
  ``weight_decay``, or LARS with ``lars``), then the weight average."""
  hp = ctx.hparams

  def make(lr):
    if hp["lars"]:
      return torch_lars(lr, hp["weight_decay"])
    return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), torch_adam(lr))

  return optax.chain(
    linear_probe_then_full(make(hp["linear_lr"]), make(hp["lr"]), hp["linear_steps"]),
    simple_moving_average(hp["sma_start_iter"]),
  )


def averaged_predict(ctx, params, state, x):
  """The logits of the weight-averaged network (DomainBed's ``predict`` on ``network_sma``)."""
  del params
  return ctx.logits(optax.tree_utils.tree_get(state, "sma_params"), x)


ERM_PLUS_PLUS = Method(
  name="erm_plus_plus",
  description="ERM++: linear-probing warm-up, then full fine-tuning, evaluated on a simple "
  "moving average of the weights (Teterwak et al., 2023)",
  domainbed_name="ERMPlusPlus",
  hparams={
    "linear_lr": HParam(
      5e-5,
      lambda r: 10 ** r.uniform(-5, -3.5),
      "learning rate of the head-only warm-up",
      positive=True,
    ),
    "linear_steps": HParam(
      500,
      lambda r: 500,
      "warm-up steps training only the head (steps 0..linear_steps)",
      kind="int",
      minimum=0,
    ),
    "lars": HParam(
      False, lambda r: False, "LARS instead of Adam (both phases)", kind="bool", structural=True
    ),
    "sma_start_iter": HParam(
      600,
      lambda r: 600,
      "updates before the weight average starts (DomainBed's constant; ours as an hparam)",
      kind="int",
      minimum=1,
    ),
  },
  gradients=penalized(pooled_erm_terms),
  optimizer=erm_plus_plus_optimizer,
  predict=averaged_predict,
)


# ============================================================================== URM
#: URM's bounded feature activations and the interval of their uniform noise.
URM_OUTPUTS = {
  "tanh": (jnp.tanh, -1.0, 1.0),
  "relu": (jax.nn.relu, 0.0, 1.0),
  "sigmoid": (jax.nn.sigmoid, 0.0, 1.0),
}


class URMDiscriminator(nn.Module):
  """DomainBed's URM discriminator: ``Linear(F, 100) -> LeakyReLU``, ``hidden_layers`` x
  ``(Linear(100, 100) -> LeakyReLU)``, ``Linear(100, 1)`` (torch's default init and slope)."""

  hidden_layers: int = 1
  width: int = 100

  @nn.compact
  def __call__(self, z):
    z = nn.leaky_relu(TorchDense(self.width)(z), 0.01)
    for _ in range(self.hidden_layers):
      z = nn.leaky_relu(TorchDense(self.width)(z), 0.01)
    return TorchDense(1)(z)[..., 0]


class URMState(NamedTuple):
  discriminator: ExtraNet


def urm_features(ctx, params, x):
  """The featurizer's output through URM's activation (DomainBed replaces the featurizer's
  ``activation``, so ``predict`` uses it too)."""
  return URM_OUTPUTS[ctx.hparams["urm_generator_output"]][0](ctx.features(params, x))


def urm_predict(ctx, params, state, x):
  del state
  return ctx.head_logits(params["classifier"], urm_features(ctx, params, x))


def _urm_discriminator(ctx):
  return URMDiscriminator(int(ctx.hparams["urm_discriminator_hidden_layers"]))


def _urm_discriminator_optimizer(ctx) -> optax.GradientTransformation:
  hp = ctx.hparams
  if hp["urm_discriminator_optimizer"] == "sgd":  # torch SGD(lr, momentum=0.9, weight_decay)
    inner = optax.sgd(hp["urm_discriminator_lr"], momentum=0.9)
  else:
    inner = torch_adam(hp["urm_discriminator_lr"])
  return optax.chain(optax.add_decayed_weights(hp["weight_decay"]), inner)


def urm_noise_and_labels(key, ctx, shape):
  """URM's draws for a discriminator step: uniform noise on the activation's interval
  ``[a, b)`` of ``shape`` ``[N, F]``, and the discriminator's targets for noise and features,
  ``U[1 - s, 1]`` and ``U[0, s]`` with ``s = urm_discriminator_label_smoothing`` (exactly 1 and
  0 when ``s = 0``, DomainBed's hard labels)."""
  _, a, b = URM_OUTPUTS[ctx.hparams["urm_generator_output"]]
  s = ctx.hparams["urm_discriminator_label_smoothing"]
  k_noise, k_true, k_fake = jax.random.split(key, 3)
  noise = (b - a) * jax.random.uniform(k_noise, shape) + a
  true_y = s * jax.random.uniform(k_true, shape[:1]) + (1.0 - s)
  fake_y = s * jax.random.uniform(k_fake, shape[:1])
  return noise, true_y, fake_y


def urm_gradients() -> GradientSource:
  """URM (DomainBed's ``URM.update``) on the pooled batch, features ``h = act(f(x))``:

  1. network: the gradient of ``CE(c(h), y) + urm_adv_lambda * BCE(D(h), 1)`` (the
     discriminator held fixed; the engine's optimizer, torch Adam(lr, weight_decay), applies it);
  2. discriminator (its own optimizer, in this source's state), on ``h`` from step 1, detached:
     ``BCE(D(noise), true_y) + urm_adv_lambda * BCE(D(h), fake_y)``.

  ``loss`` is step 1's objective (as DomainBed); also logged: ``urm_adv_loss`` (the BCE of
  step 1) and ``discriminator_loss``. Randomness (noise, soft labels) from the step's key.
  """

  def init(ctx, params, key):
    f = params["classifier"]["kernel"].shape[0]
    disc = _urm_discriminator(ctx).init(
      extra_net_key(key, "discriminator"), jnp.zeros((1, f), jnp.float32)
    )["params"]
    return URMState(ExtraNet.create(disc, _urm_discriminator_optimizer(ctx)))

  def grads(ctx, params, state, batch, step, key):
    del step
    lam = ctx.hparams["urm_adv_lambda"]
    x, y = batch["x"], batch["y"]
    d, b = y.shape[:2]
    disc_net = _urm_discriminator(ctx)
    disc = state.discriminator.params
    bce = lambda logits, t: jnp.mean(optax.sigmoid_binary_cross_entropy(logits, t))

    def objective(p):
      h = urm_features(ctx, p, flatten_domains(x))
      logits = ctx.head_logits(p["classifier"], h)
      env_losses = env_losses_of(logits.reshape((d, b) + logits.shape[1:]), y)
      adv = bce(disc_net.apply({"params": disc}, h), jnp.ones((h.shape[0],), h.dtype))
      return jnp.mean(env_losses) + lam * adv, (env_losses, adv, h)

    (total, (env_losses, adv, h)), g = jax.value_and_grad(objective, has_aux=True)(params)

    h = jax.lax.stop_gradient(h)
    noise, true_y, fake_y = urm_noise_and_labels(key, ctx, h.shape)

    def disc_loss(dp):
      return bce(disc_net.apply({"params": dp}, noise), true_y) + lam * bce(
        disc_net.apply({"params": dp}, h), fake_y
      )

    d_loss, dg = jax.value_and_grad(disc_loss)(disc)
    new_state = URMState(state.discriminator.apply_gradients(dg, _urm_discriminator_optimizer(ctx)))
    metrics = {"loss": total, "urm_adv_loss": adv, "discriminator_loss": d_loss}
    return g, Terms(env_losses, None, metrics, new_state)

  return GradientSource(grads, init)


URM = Method(
  name="urm",
  description="URM: bounded features pushed towards a uniform distribution by an adversarial "
  "noise-vs-features discriminator (Krishnamachari et al., TMLR 2024)",
  domainbed_name="URM",
  hparams={
    "urm": HParam(
      "adversarial",
      lambda r: "adversarial",
      "URM variant (DomainBed has only 'adversarial')",
      kind="choice",
      choices=("adversarial",),
      structural=True,
    ),
    "urm_adv_lambda": HParam(
      0.1,
      lambda r: float(r.uniform(0, 0.2)),
      "weight of the adversarial term (network and discriminator)",
      minimum=0.0,
    ),
    "urm_discriminator_label_smoothing": HParam(
      0.0,
      lambda r: float(r.uniform(0, 0)),
      "soft discriminator targets U[1-s,1] / U[0,s]",
      minimum=0.0,
      maximum=1.0,
    ),
    "urm_discriminator_optimizer": HParam(
      "adam",
      lambda r: "adam",
      "discriminator optimizer (adam, or sgd with momentum 0.9)",
      kind="choice",
      choices=("adam", "sgd"),
      structural=True,
    ),
    "urm_discriminator_hidden_layers": HParam(
      1,
      lambda r: int(r.choice([1, 2, 3])),
      "100-wide hidden layers after the first",
      kind="int",
      structural=True,
      minimum=0,
    ),
    "urm_generator_output": HParam(
      "tanh",
      lambda r: str(r.choice(["tanh", "relu"])),
      "activation on the features (the noise is uniform on its range)",
      kind="choice",
      choices=("tanh", "relu", "sigmoid"),
      structural=True,
    ),
    "urm_discriminator_lr": HParam(
      1e-3,
      log_uniform(-5.5, -3.5),
      "discriminator learning rate",
      positive=True,
      large_default=5e-5,
      large_sample=log_uniform(-6, -4.5),
    ),
  },
  gradients=urm_gradients(),
  predict=urm_predict,
)
