"""Methods that adapt the prediction to the batch at test time: ARM (ARM-CML).

ARM's context network and the first layer's weights on the context channel live in the
gradient source's state, drawn from the run's key (:func:`dgjax.core.extra_net_key`; earlier
versions hashed the model's initial parameters into a key, so the initial draws differ from
those versions'); the context-channel kernel (and, with ``train_context_net``, the context
network) has its own ``Adam(lr, weight_decay)`` there (Adam is elementwise: the same as one
Adam over the union with the network). The context network's BatchNorm running statistics
live there too and are what prediction uses.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dgjax.algorithms.adversarial import like_params
from dgjax.conv import Conv, conv2d
from dgjax.core import (
  COMMON_HPARAMS,
  GradientSource,
  HParam,
  Method,
  Terms,
  domainbed_adam,
  env_losses_of,
  extra_net_key,
  flatten_domains,
)
from dgjax.types import PyTree


class TorchBatchNorm2d(nn.Module):
  """``torch.nn.BatchNorm2d`` on NHWC input: in training the batch's mean and biased variance
  over ``N, H, W`` normalise, and the running statistics (collection ``batch_stats``; mean 0,
  var 1 at init) move by ``momentum`` towards the batch mean and UNBIASED variance; in
  evaluation the running statistics normalise. Affine weight 1, bias 0 at init."""

  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), x.dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), x.dtype))
    if train:
      mean = jnp.mean(x, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
      n = x.shape[0] * x.shape[1] * x.shape[2]
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = jax.lax.stop_gradient((1 - m) * ra_mean.value + m * mean)
        ra_var.value = jax.lax.stop_gradient((1 - m) * ra_var.value + m * var * n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class ContextNet(nn.Module):
  """DomainBed's ``networks.ContextNet``: ``Conv5x5(64) -> BN -> ReLU -> Conv5x5(64) -> BN ->
  ReLU -> Conv5x5(1)``, padding 2 (same size), torch's init; NHWC in, ``[N, H, W, 1]`` out."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv(64, kernel_size=5, padding=2, name="conv0")(x)
    x = nn.relu(TorchBatchNorm2d(name="bn0")(x, train))
    x = Conv(64, kernel_size=5, padding=2, name="conv1")(x)
    x = nn.relu(TorchBatchNorm2d(name="bn1")(x, train))
    return Conv(1, kernel_size=5, padding=2, name="conv2")(x)


class ARMState(NamedTuple):
  extra: PyTree  # {"context_net": params, "context_kernel": [k, k, 1, F1]}
  batch_stats: PyTree  # the context net's BatchNorm running statistics
  extra_opt: optax.OptState


def first_conv(params) -> tuple[str, jax.Array]:
  """The featurizer's first layer (first in creation order, which flax keeps) and its kernel;
  ARM needs it to be a convolution (HWIO kernel)."""
  for name, sub in params["featurizer"].items():
    if isinstance(sub, dict) and "kernel" in sub:
      if sub["kernel"].ndim != 4:
        raise ValueError(
          f"ARM concatenates a context channel to image inputs: the featurizer's first layer "
          f"({name!r}) must be a convolution, got a kernel of shape {sub['kernel'].shape} "
          "(DomainBed's ARM, too, needs images)"
        )
      return name, sub["kernel"]
  raise ValueError("ARM: the featurizer has no layer with a 'kernel' parameter")


def _stride_and_padding(mod) -> tuple[int, int]:
  """Stride and symmetric padding of a :class:`dgjax.conv.Conv` or a ``flax.linen.Conv``
  (the ResNets' ``conv1``: ``strides=(s, s)``, ``padding=((p, p), (p, p))``)."""
  if hasattr(mod, "stride"):
    return mod.stride, mod.padding
  strides = mod.strides if isinstance(mod.strides, (tuple, list)) else (mod.strides or 1,)
  pads = (
    {p for pair in mod.padding for p in pair} if isinstance(mod.padding, (tuple, list)) else set()
  )
  if len(set(strides)) != 1 or len(pads) != 1:
    raise ValueError(
      f"ARM needs a first convolution with equal strides and symmetric integer "
      f"padding, got strides={mod.strides!r} padding={mod.padding!r}"
    )
  return strides[0], pads.pop()


def group_context(context, support_size: int):
  """DomainBed's grouping: ``N`` examples in groups of ``support_size`` when it divides
  ``N``, else one group of ``N``; each example gets its group's mean context."""
  n = context.shape[0]
  size = support_size if n % support_size == 0 else n
  grouped = context.reshape((n // size, size) + context.shape[1:])
  mean = jnp.mean(grouped, axis=1, keepdims=True)
  return jnp.broadcast_to(mean, grouped.shape).reshape(context.shape)


def logits_with_context(ctx, params, x, context, context_kernel):
  """The network on ``concat(x, context)`` along channels, computed as the model on ``x``
  with ``conv(context, context_kernel)`` (same stride and padding, no bias) added to its first
  convolution's output: a convolution is linear in its input channels, so this is DomainBed's
  ``Conv(C + 1 -> F1)`` with the kernel split into the model's ``[k, k, C, F1]`` and
  ``context_kernel`` ``[k, k, 1, F1]``."""
  target, _ = first_conv(params)
  path = ("featurizer", target)

  def interceptor(next_fun, args, kwargs, context_):
    out = next_fun(*args, **kwargs)
    mod = context_.module
    if context_.method_name == "__call__" and mod.path == path:
      stride, padding = _stride_and_padding(mod)
      out = out + conv2d(
        context.astype(out.dtype),
        context_kernel.astype(out.dtype),
        stride,
        padding,
        getattr(mod, "impl", "xla"),
      )
    return out

  with nn.intercept_methods(interceptor):
    return ctx.logits(params, x)


def _support_size(ctx):
  return int(ctx.hparams["batch_size"])


def _trained_extra(ctx) -> tuple[str, ...]:
  """The parts of ARM's extra parameters that its Adam trains: the context-channel kernel
  always (it is part of DomainBed's network), the context network only with the
  ``train_context_net`` hparam (the paper's form; DomainBed's code never trains it)."""
  if bool(ctx.hparams["train_context_net"]):
    return ("context_kernel", "context_net")
  return ("context_kernel",)


def arm_gradients() -> GradientSource:
  """ARM (Zhang et al., "Adaptive Risk Minimization: Learning to Adapt to Domain Shift",
  NeurIPS 2021), the contextual (ARM-CML) variant DomainBed implements as ``ARM``.

  A context network ``h`` (:class:`ContextNet`) maps each image to a one-channel map; its
  mean over a support set (in training: one domain's minibatch, DomainBed's
  ``support_size = batch_size``) is concatenated to each image of the set as an extra input
  channel of the classifier network (:func:`logits_with_context`). The loss is ERM's (mean
  cross-entropy on the concatenated batch).

  What trains, as DomainBed's code (``domainbed/algorithms.py``, commit b93c22a): ``ARM``
  subclasses ``ERM`` and calls ``super().__init__`` (line 457) with the ``C + 1``-channel
  input shape, and ERM's ``__init__`` builds ``torch.optim.Adam(self.network.parameters(),
  lr, weight_decay)`` (lines 107-111) before ARM creates ``self.context_net`` (line 459). So
  DomainBed's one Adam holds the network only, the context channel's first-layer kernel
  included (it is part of the network's ``C + 1``-channel first convolution), with
  ``weight_decay`` added to its gradient; ``h`` is never updated by any optimizer (its
  parameters keep their init, though the loss's backward reaches them), and only ``h``'s
  BatchNorm running statistics move, in its training-mode forward of every step. That is the
  default here. The paper trains ``h`` jointly with the network (its ARM-CML: ``h`` and the
  model are meta-learned together); the hparam ``train_context_net`` (default false, never
  drawn by the search) adds ``h`` to the same ``Adam(lr, weight_decay)``, weight decay
  included: the update DomainBed gives if ``h``'s parameters are added to its Adam.

  The context channel's kernel starts as DomainBed's: on a ResNet (a model that sets
  ``copies_input_kernels``), a copy of the first convolution's kernel on image channel 0
  (DomainBed's ``ResNet`` fills a new input channel ``i`` with the pretrained channel
  ``i mod 3``); otherwise ``U(+-1/sqrt(k^2 (C + 1)))``, the init of DomainBed's ``C + 1``
  channel layer. Differences from DomainBed: on non-ResNet models the network's first-layer
  kernel on the image channels keeps the model's init (``U(+-1/sqrt(k^2 C))``); the model must
  start with a convolution (DomainBed's ARM also needs images). ``h``'s BatchNorm normalises
  with the whole batch's statistics in training (DomainBed runs ``h`` on the concatenated
  batch too) and with its running statistics at prediction (:func:`arm_predict`).
  """

  def init(ctx, params, key):
    _, kernel = first_conv(params)
    k, _, c, f1 = kernel.shape
    key_net, key_kernel = extra_net_key(key, "context_net"), extra_net_key(key, "context_kernel")
    variables = ContextNet().init(key_net, jnp.zeros((1, 8, 8, c), kernel.dtype), True)
    if getattr(ctx.model, "copies_input_kernels", False):
      context_kernel = kernel[:, :, :1, :].astype(jnp.float32)
    else:
      bound = 1.0 / float(k * k * (c + 1)) ** 0.5
      context_kernel = jax.random.uniform(key_kernel, (k, k, 1, f1), jnp.float32, -bound, bound)
    extra = like_params(
      {"context_net": variables["params"], "context_kernel": context_kernel}, params
    )
    stats = like_params(variables["batch_stats"], params)
    trained = {name: extra[name] for name in _trained_extra(ctx)}
    return ARMState(extra, stats, domainbed_adam()(ctx).init(trained))

  def grads(ctx, params, state, batch, step, key):
    del step, key
    d, b = batch["y"].shape
    x = flatten_domains(batch["x"])
    trained = {name: state.extra[name] for name in _trained_extra(ctx)}

    def objective(p, trained_extra):
      extra = {**state.extra, **trained_extra}
      context, new_vars = ContextNet().apply(
        {"params": extra["context_net"], "batch_stats": state.batch_stats},
        x,
        True,
        mutable=["batch_stats"],
      )
      context = group_context(context, b)
      logits = logits_with_context(ctx, p, x, context, extra["context_kernel"])
      env_losses = env_losses_of(logits.reshape(d, b, -1), batch["y"])
      return jnp.mean(env_losses), (env_losses, new_vars["batch_stats"])

    (_, (env_losses, stats)), (g, g_extra) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True
    )(params, trained)
    tx = domainbed_adam()(ctx)
    updates, extra_opt = tx.update(g_extra, state.extra_opt, trained)
    extra = {**state.extra, **optax.apply_updates(trained, updates)}
    return g, Terms(env_losses, None, {}, ARMState(extra, stats, extra_opt))

  return GradientSource(grads, init)


def arm_predict(ctx, params, state, x):
  """DomainBed's ``ARM.predict``: context from the running-statistics context net, averaged
  over groups of ``batch_size`` examples when that divides ``len(x)``, else over all of
  ``x``. The adaptation set is the evaluated batch: DomainBed evaluates in batches of 64."""
  source = state.source
  context = ContextNet().apply(
    {"params": source.extra["context_net"], "batch_stats": source.batch_stats}, x, False
  )
  context = group_context(context, _support_size(ctx))
  return logits_with_context(ctx, params, x, context, source.extra["context_kernel"])


def _arm_hparams():
  """DomainBed's ARM has no hparams of its own and fixes its batch size to 8 on large images;
  ``train_context_net`` is ours (the paper's form, see :func:`arm_gradients`)."""
  return {
    "batch_size": dataclasses.replace(
      COMMON_HPARAMS["batch_size"],
      large_default=8,
      large_sample=lambda r: 8,
      doc="examples per domain per step (also ARM's support-set size)",
    ),
    "train_context_net": HParam(
      False,
      lambda r: False,
      "train the context network with the network's Adam (the "
      "paper); false: DomainBed's code, whose Adam never holds it",
      kind="bool",
      structural=True,
    ),
  }


ARM = Method(
  name="arm",
  description="ARM-CML: a context network's mean over the batch is an extra input channel, "
  "adapting predictions to each test batch (Zhang et al., NeurIPS 2021)",
  domainbed_name="ARM",
  hparams=_arm_hparams(),
  presets={"paper": {"train_context_net": True}},
  gradients=arm_gradients(),
  predict=arm_predict,
)
