"""The step protocol: what a method is, and the one way its train step is built.

Layers (no module imports one above it): maths (:mod:`dgjax.losses`, :mod:`dgjax.per_domain`,
:mod:`dgjax.masks`, :mod:`dgjax.penalties`, :mod:`dgjax.hessian`) -> this module -> one module
per algorithm family (:mod:`dgjax.algorithms`) -> the registry (:mod:`dgjax.methods`) -> the
engine (:mod:`dgjax.train`).

A :class:`Method` is three parts, and :func:`build_step` is the only code that assembles them:

* ``gradients`` (a :class:`GradientSource`): how the step gets its gradients and the terms it
  logs. :func:`per_domain_gradients` gives per-domain gradients (leaves ``[D, ...]``) for a
  ``combine`` transform; :func:`penalized` gives the gradient of ``mean_d loss_d + w(step) *
  penalty`` from ONE ``value_and_grad`` (one forward and one backward through the network);
  a family may define its own (Fish's inner loop returns a pseudo-gradient). A source may
  carry state (Fishr's moving averages, Fish's inner optimizer), and networks of its own
  beside the model, each an :class:`ExtraNet` (parameters and their own optimizer's state)
  drawn at ``init`` from the run's key (:func:`extra_net_key`), so trials of different seeds
  start them from different weights.
* ``combine`` (optional): an optax transform from per-domain gradients to one gradient (the
  masks, GroupDRO). It receives the extra arguments ``losses`` ``[D]`` and ``step``.
* ``optimizer``: an optax transform, by default DomainBed's ``torch.optim.Adam(lr,
  weight_decay)`` (:func:`domainbed_adam`), with the Adam reset at a penalty switch as a
  transform that owns its inner state (:func:`reset_at_step`), and optimizers that move only on
  some steps as :func:`on_steps` (``optax.conditionally_mask``'s rule, read from the engine's
  ``step``).

Every schedule reads one clock, the train state's ``step``, passed to the transforms as the
extra argument ``step``. Metrics come back from the step; state that must be logged is read by
name (:attr:`Method.logged_state`, ``optax.tree_utils.tree_get``).

Hyperparameters follow DomainBed's ``hparams_registry``: each :class:`HParam` has a default
(``hparams_seed == 0``), a random-search distribution, a kind, whether it is structural
(changes the compiled program) and an optional role (how a benchmark maps onto it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgjax.losses import cross_entropy
from dgjax.per_domain import map_over_leading, per_domain_value_and_grad
from dgjax.seeding import seed_hash
from dgjax.types import PyTree

Sampler = Callable[[np.random.RandomState], Any]


class DatasetFacts(Protocol):
  """What the hparam rules read of a dataset (:class:`dgjax.datasets.Dataset` declares them)."""

  name: str  # per-dataset values (:attr:`HParam.per_dataset`) are keyed by it
  small_images: bool  # DomainBed's ``SMALL_IMAGES``: the MNIST-sized common hparams
  hparams: Mapping[str, Any]  # the dataset's own model and data hparams (name -> HParam)


#: Roles a benchmark may map onto (see :attr:`HParam.role`).
ROLES = (
  "lr",
  "batch_size",
  "weight_decay",
  "penalty_weight",
  "anneal_iters",
  "rescale_loss",
  "reset_optimizer",
)

_KINDS = ("float", "int", "bool", "choice")


# ----------------------------------------------------------------------------- hparams
@dataclasses.dataclass(frozen=True)
class HParam:
  """One hyperparameter.

  Attributes:
    default: the value when ``hparams_seed == 0`` (small-image datasets).
    sample: ``sample(np.random.RandomState) -> value``, the random-search distribution.
    doc: one line for ``--help`` and the README.
    kind: ``"float"``, ``"int"``, ``"bool"`` or ``"choice"`` (one of ``choices``).
    structural: changes the compiled program (shapes, loop lengths, which code runs): runs
      that differ in it cannot share one vmapped program.
    role: what the value means to a benchmark that maps its own settings onto methods
      (one of :data:`ROLES`), e.g. ``"penalty_weight"`` for IRM's ``irm_lambda``.
    minimum, maximum: allowed range (inclusive; ``positive`` excludes 0).
    large_default, large_sample: the values for DomainBed's large-image datasets (a
      dataset whose ``small_images`` is false), where they differ.
    per_dataset: ``{dataset: (default, sample)}`` for single datasets where DomainBed's
      registry singles them out (over the small/large values).
  """

  default: Any
  sample: Sampler
  doc: str = ""
  kind: str = "float"
  structural: bool = False
  role: str | None = None
  minimum: float | None = None
  maximum: float | None = None
  positive: bool = False
  choices: tuple = ()
  large_default: Any = None
  large_sample: Sampler | None = None
  per_dataset: Mapping[str, tuple[Any, Sampler]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"HParam kind must be one of {_KINDS}, got {self.kind!r}")
    if self.role is not None and self.role not in ROLES:
      raise ValueError(f"HParam role must be one of {ROLES}, got {self.role!r}")

  def for_dataset(self, dataset: DatasetFacts | None) -> "HParam":
    """This hparam with the default and distribution of ``dataset`` (DomainBed's rule: its
    :attr:`per_dataset` values if it names the dataset, else the small-image values for a
    dataset with ``small_images`` and for ``None``, else the large ones)."""
    if dataset is not None and dataset.name in self.per_dataset:
      default, sample = self.per_dataset[dataset.name]
      return dataclasses.replace(self, default=default, sample=sample)
    if dataset is None or dataset.small_images:
      return self
    return dataclasses.replace(
      self,
      default=self.default if self.large_default is None else self.large_default,
      sample=self.sample if self.large_sample is None else self.large_sample,
    )

  def coerce(self, name: str, value: Any) -> Any:
    """``value`` as this hparam's kind, or a ``ValueError`` naming ``name`` and the rule."""
    if self.kind == "bool":
      if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
      raise ValueError(f"hparam {name!r} must be true or false (or 0/1), got {value!r}")
    if self.kind == "choice":
      if value not in self.choices:
        raise ValueError(f"hparam {name!r} must be one of {list(self.choices)}, got {value!r}")
      return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
      raise ValueError(f"hparam {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
      raise ValueError(f"hparam {name!r} must be finite, got {value!r}")
    if self.kind == "int":
      if not value.is_integer():
        raise ValueError(f"hparam {name!r} must be an integer, got {value!r}")
      value = int(value)
    if self.positive and value <= 0:
      raise ValueError(f"hparam {name!r} must be > 0, got {value!r}")
    if self.minimum is not None and value < self.minimum:
      raise ValueError(f"hparam {name!r} must be >= {self.minimum}, got {value!r}")
    if self.maximum is not None and value > self.maximum:
      raise ValueError(f"hparam {name!r} must be <= {self.maximum}, got {value!r}")
    return value


def log_uniform(lo, hi) -> Sampler:
  """DomainBed's ``10 ** r.uniform(lo, hi)``: a log-uniform draw on ``[10^lo, 10^hi)``."""
  return lambda r: float(10 ** r.uniform(lo, hi))


#: DomainBed's hparams shared by every method (small-image values; large-image ones beside).
COMMON_HPARAMS: dict[str, HParam] = {
  "lr": HParam(
    1e-3,
    log_uniform(-4.5, -2.5),
    "Adam learning rate",
    role="lr",
    positive=True,
    large_default=5e-5,
    large_sample=log_uniform(-5, -3.5),
  ),
  "batch_size": HParam(
    64,
    lambda r: int(2 ** r.uniform(3, 9)),
    "examples per domain per step",
    kind="int",
    structural=True,
    role="batch_size",
    minimum=1,
    large_default=32,
    large_sample=lambda r: int(2 ** r.uniform(3, 5.5)),
  ),
  "weight_decay": HParam(
    0.0,
    lambda r: 0.0,
    "L2 weight decay added to the gradient (torch Adam)",
    role="weight_decay",
    minimum=0.0,
    large_default=0.0,
    large_sample=log_uniform(-6, -2),
  ),
}


#: The penalty forms a method may offer (its ``penalty_form`` hparam): DomainBed's, or the
#: IRM-style Colored MNIST scripts' (Arjovsky et al.'s ``colored_mnist/main.py``, Fishr's
#: ``train_coloredmnist.py``, the Hessian paper's ``cmnist_*.py``).
PENALTY_FORMS = ("domainbed", "script")


def penalty_form_hparam() -> HParam:
  return HParam(
    "domainbed",
    lambda r: "domainbed",
    "the penalty's form: DomainBed's, or the IRM-style Colored MNIST scripts' (preset irm_cmnist)",
    kind="choice",
    choices=PENALTY_FORMS,
    structural=True,
  )


def rescale_loss_hparam() -> HParam:
  return HParam(
    False,
    lambda r: False,
    "divide the objective by the penalty weight once it "
    "exceeds 1 (the Colored MNIST scripts; DomainBed never does)",
    kind="bool",
    role="rescale_loss",
  )


def reset_optimizer_hparam(
  default: bool,
  doc: str = "re-create Adam at the penalty switch "
  "(DomainBed; the Colored MNIST scripts keep one Adam)",
) -> HParam:
  return HParam(default, lambda r: default, doc, kind="bool", role="reset_optimizer")


# ----------------------------------------------------------------------------- context
def batch_norm_momentum(model) -> float | None:
  """The momentum of ``model``'s BatchNorm statistics when they train (torch's rule
  ``r <- (1 - m) r + m s``), ``None`` when frozen or absent: the model protocol's optional
  ``batch_norm_momentum`` (:class:`dgjax.resnet.ResNetClassifier`), read here for the step
  and for SWAD. A task's members are never probed (:class:`dgjax.task.Task`); a model's
  optional ones (``takes_train``, this) are, as any flax model may serve."""
  return getattr(model, "batch_norm_momentum", None)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's step may use: the model, its hparams and the run's shape.

  ``variables`` are the model's non-trainable collections (BatchNorm's ``batch_stats``),
  applied with the params and never differentiated; in a training step they are the train
  state's (:attr:`StepState.variables`). Inside a training step the context has
  ``train=True`` and ``rng`` (the step's dropout key): a model whose class sets
  ``takes_train = True`` (the ResNets) then gets ``train=True`` and ``rngs={"dropout": rng}``
  (dropout on; unfrozen BatchNorm normalises with the statistics of the batch the call sees).

  ``forward_per_domain`` is the method's :attr:`Method.forward_per_domain`: whether
  :func:`domain_logits` and :func:`domain_features_and_logits` run the network once on the
  concatenated ``[D * B]`` batch or once per domain (DomainBed's method calls it per
  minibatch), which decides unfrozen BatchNorm's statistics.

  A model whose ``frozen_params`` is a predicate on parameter paths (the ViTs under
  ``vit_attn_tune``, :class:`dgjax.models.BackboneClassifier`) has those parameters behind
  ``jax.lax.stop_gradient`` in every forward here (torch's ``requires_grad=False``), and
  :func:`build_step` keeps them out of the optimizer (:func:`trainable_only`). Its
  ``batch_norm_momentum`` may be one number or ``path -> number`` (per BatchNorm layer).
  """

  model: Any  # a flax module with ``features`` and ``head`` methods
  hparams: Mapping[str, Any]
  num_domains: int
  per_domain_impl: str = "vmap"
  variables: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  train: bool = False
  rng: Any = None
  forward_per_domain: bool = False

  def apply(self, params, x, method=None):
    frozen = getattr(self.model, "frozen_params", None)
    if frozen is not None and method != "head":  # no gradient reaches frozen parameters
      params = stop_frozen_gradients(params, frozen)
    kwargs = {}
    if self.train and getattr(self.model, "takes_train", False) and method != "head":
      kwargs["train"] = True
      if self.rng is not None:
        kwargs["rngs"] = {"dropout": self.rng}
    return self.model.apply({"params": params, **self.variables}, x, method=method, **kwargs)

  def for_domain(self, d):
    """This context for domain ``d``'s own forward pass: its dropout key gets ``d`` folded
    in, so the domains' dropout masks are independent (as D separate torch calls)."""
    if self.rng is None:
      return self
    return dataclasses.replace(self, rng=jax.random.fold_in(self.rng, d))

  def updated_variables(self, params, x):
    """``variables`` after this step's training forward on the domain batch ``x [D, B, ...]``:
    BatchNorm's running statistics updated as torch does, once per forward DomainBed's
    method makes (``r <- (1 - m) r + m s``, ``m`` = the model's ``batch_norm_momentum``,
    ``s`` the batch mean and unbiased variance). One forward of the concatenated batch, or
    with ``forward_per_domain`` D forwards in domain order, folded in closed form from the
    D one-step updates of the same start (``r_D = a^D r + sum_d a^(D-1-d) (u_d - a r)``,
    ``a = 1 - m``). Unchanged when the model's BatchNorm is frozen (``batch_norm_momentum``
    is ``None``) or it has no running statistics.

    The statistics come from the step's params and raw domain batches (the gradient's own
    forward computes the same ones; XLA may share them). Methods whose DomainBed forwards
    are other batches (Mixup's mixed pairs, Fish's inner clone, MLDG's clones) get their
    rule's update of the raw batches: see each method's docstring.
    """
    momentum = batch_norm_momentum(self.model)
    if momentum is None or "batch_stats" not in self.variables:
      return self.variables

    def one_update(ctx, xb):
      kwargs = {"rngs": {"dropout": ctx.rng}} if ctx.rng is not None else {}
      _, new = self.model.apply(
        {"params": params, **self.variables},
        xb,
        method="features",
        train=True,
        mutable=["batch_stats"],
        **kwargs,
      )
      return new["batch_stats"]

    old = self.variables["batch_stats"]
    if not self.forward_per_domain:
      new = one_update(self, flatten_domains(x))
    else:
      d = x.shape[0]
      # lowered as the gradient's per-domain passes, so XLA can share the forward
      stacked = map_over_leading(
        lambda xi: one_update(self.for_domain(xi[1]), xi[0]),
        (x, jnp.arange(d)),
        self.per_domain_impl,
      )

      def fold(path, r, u):  # momentum: one number, or per BatchNorm layer (path -> number)
        a = 1.0 - (momentum(path) if callable(momentum) else momentum)
        weights = a ** jnp.arange(d - 1, -1, -1, dtype=jnp.float32)
        return a**d * r + jnp.tensordot(weights, u - a * r[None], axes=1)

      new = jax.tree_util.tree_map_with_path(fold, old, stacked)
    return {**self.variables, "batch_stats": new}

  def logits(self, params, x):
    return self.apply(params, x)

  def features(self, params, x):
    """The featurizer's output ``z`` (the head's input)."""
    return self.apply(params, x, method="features")

  def head_logits(self, head_params, z):
    """The linear head on features ``z``, with ``head_params = params["classifier"]``."""
    return self.model.apply({"params": {"classifier": head_params}}, z, method="head")

  def loss(self, params, batch):
    """Mean cross-entropy on one domain's batch (``F.cross_entropy``)."""
    return cross_entropy(self.logits(params, batch["x"]), batch["y"])


def stop_frozen_gradients(params, frozen):
  """``params`` with ``jax.lax.stop_gradient`` on every leaf whose path ``frozen(path)`` says
  must not train (a model's ``frozen_params``: torch's ``requires_grad=False``)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: jax.lax.stop_gradient(v) if frozen(path) else v, params
  )


def trainable_only(tx: optax.GradientTransformation, frozen) -> optax.GradientTransformation:
  """``tx`` on the parameters that train, zero updates (no weight decay, no Adam state) for
  those ``frozen(path)`` names: torch's optimizers skip a parameter whose ``grad`` is None."""
  labels = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
    lambda path, _: "frozen" if frozen(path) else "train", tree
  )
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def flatten_domains(x):
  """``[D, B, ...] -> [D * B, ...]``."""
  return x.reshape((-1,) + x.shape[2:])


def over_domains(ctx: Context, fn, x):
  """``fn(domain_ctx, x_d)`` for each domain's batch ``x_d`` (``jax.vmap`` over the leading
  axis, the domain's index folded into the dropout key), outputs stacked ``[D, ...]``."""
  return jax.vmap(lambda xd, d: fn(ctx.for_domain(d), xd))(x, jnp.arange(x.shape[0]))


def domain_logits(ctx: Context, params, x):
  """Logits of every domain's batch: ``x [D, B, ...] -> [D, B, C]``. One forward pass of the
  concatenated ``[D * B]`` batch (DomainBed's ``torch.cat`` of the minibatches), or one per
  domain when ``ctx.forward_per_domain``."""
  if ctx.forward_per_domain:
    return over_domains(ctx, lambda c, xd: c.logits(params, xd), x)
  logits = ctx.logits(params, flatten_domains(x))
  return logits.reshape(x.shape[:2] + logits.shape[1:])


def domain_features(ctx: Context, params, x):
  """Featurizer output ``[D, B, F]`` (forward passes as :func:`domain_logits`)."""
  if ctx.forward_per_domain:
    return over_domains(ctx, lambda c, xd: c.features(params, xd), x)
  z = ctx.features(params, flatten_domains(x))
  return z.reshape(x.shape[:2] + z.shape[1:])


def domain_features_and_logits(ctx: Context, params, x):
  """Featurizer output ``[D, B, F]`` and logits ``[D, B, C]`` (forward passes as
  :func:`domain_logits`)."""
  z = domain_features(ctx, params, x)
  return z, ctx.head_logits(params["classifier"], z)


def env_losses_of(logits, labels):
  """Per-domain mean cross-entropy ``[D]`` from logits ``[D, B, C]`` and labels ``[D, B]``."""
  return jax.vmap(cross_entropy)(logits, labels)


# ----------------------------------------------------------------------------- gradients
class Terms(NamedTuple):
  """What a gradient source reports besides the gradient.

  ``env_losses`` ``[D]``: per-domain cross-entropy (logged as ``env_losses``, their mean as
  ``loss`` unless ``metrics`` has its own ``loss``); ``penalty``: the scalar penalty, or
  ``None`` for methods without one; ``metrics``: more scalars to log; ``state``: the
  source's new state.
  """

  env_losses: jax.Array
  penalty: jax.Array | None = None
  metrics: Mapping[str, Any] = {}
  state: Any = ()


def _no_state(ctx, params, key):
  del ctx, params, key
  return ()


class GradientSource(NamedTuple):
  """``grads(ctx, params, state, batch, step, key) -> (gradients, Terms)`` and
  ``init(ctx, params, key) -> state`` (the source's own state; ``()`` when it has none).
  ``key`` is the run's key for the source's own networks: each is drawn from
  :func:`extra_net_key` of it and the network's name."""

  grads: Callable[..., tuple[PyTree, Terms]]
  init: Callable[[Context, PyTree, jax.Array], Any] = _no_state


def extra_net_key(key: jax.Array, name: str) -> jax.Array:
  """The key of a method's own network ``name`` (its initial draw): ``fold_in(key,
  seed_hash(name))`` of the run's method key, so every network has its own stream and adding
  a network changes no other's draw."""
  return jax.random.fold_in(key, seed_hash(name))


class ExtraNet(NamedTuple):
  """A network a method trains beside the model (DANN's discriminator, CAD's projection head,
  URM's discriminator, ADRMX's networks, ...): its parameters and its own optimizer's state,
  kept in the gradient source's state. The optimizer is a transform of the hparams (which may
  be traced), so the method builds it where it is used and passes it in."""

  params: PyTree
  opt_state: optax.OptState

  @classmethod
  def create(cls, params: PyTree, tx: optax.GradientTransformation) -> "ExtraNet":
    """``params`` with ``tx``'s initial state."""
    return cls(params, tx.init(params))

  def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation) -> "ExtraNet":
    """One step of ``tx`` on ``grads``: the new parameters and optimizer state."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return ExtraNet(optax.apply_updates(self.params, updates), opt_state)


def per_domain_gradients() -> GradientSource:
  """Per-domain losses ``[D]`` and gradients (leaves ``[D, ...]``), for a ``combine``
  transform: :func:`dgjax.per_domain_value_and_grad` of ``ctx.loss``."""

  def grads(ctx, params, state, batch, step, key):
    del step, key
    losses, g = per_domain_value_and_grad(
      lambda p, b: ctx.for_domain(b["domain"]).loss(p, b["batch"]),
      params,
      {"batch": batch, "domain": jnp.arange(ctx.num_domains)},
      impl=ctx.per_domain_impl,
    )
    return g, Terms(losses, state=state)

  return GradientSource(grads)


def annealed_weight(step, anneal_iters, weight, before=1.0):
  """Penalty weight ``before`` for ``step < anneal_iters``, then ``weight`` (DomainBed's IRM,
  V-REx and Fishr schedules; ``before`` is 1.0 for IRM/V-REx and 0.0 for Fishr)."""
  return jnp.where(step >= anneal_iters, weight, before)


TermsFn = Callable[..., Terms]  # terms(ctx, params, batch, key, state) -> Terms


def penalized(
  terms: TermsFn,
  weight: str | None = None,
  anneal_iters: str | None = None,
  before: float | Callable[[Mapping[str, Any]], float] = 1.0,
  init: Callable[[Context, PyTree, jax.Array], Any] | None = None,
) -> GradientSource:
  """The gradient of ``objective = mean_d loss_d + w(step) * penalty`` from ONE
  ``jax.value_and_grad`` (so one forward and one backward pass through the featurizer).

  Args:
    terms: ``terms(ctx, params, batch, key, state) -> Terms`` on the whole domain batch
      (leaves ``[D, B, ...]``); ``Terms.penalty is None`` means no penalty.
    weight: name of the hparam holding the penalty weight (``None``: weight 1).
    anneal_iters: name of the hparam holding the switch step (``None``: no schedule).
    before: the weight before the switch, or ``before(hparams) -> weight`` where it depends
      on a structural hparam (Fishr: 0 in DomainBed's form, 1 in the scripts').
    init: ``init(ctx, params, key)``, the initial ``state`` passed to ``terms`` (e.g.
      Fishr's moving averages, SelfReg's projection drawn from ``key``).

  Logs ``penalty``, ``penalty_weight`` and ``objective`` when there is a penalty.
  """

  def grads(ctx, params, state, batch, step, key):
    w = ctx.hparams[weight] if weight else 1.0
    if anneal_iters:
      w = annealed_weight(
        step, ctx.hparams[anneal_iters], w, before(ctx.hparams) if callable(before) else before
      )

    def objective(p):
      t = terms(ctx, p, batch, key, state)
      value = jnp.mean(t.env_losses)
      if t.penalty is not None:
        value = value + w * t.penalty
      return value, t

    (value, t), g = jax.value_and_grad(objective, has_aux=True)(params)
    metrics = dict(t.metrics)
    if t.penalty is not None:
      metrics.update(penalty=t.penalty, penalty_weight=jnp.asarray(w, jnp.float32), objective=value)
    return g, t._replace(metrics=metrics)

  return GradientSource(grads, init or _no_state)


def pooled_erm_terms(ctx, params, batch, key, state) -> Terms:
  """Per-domain CE of one forward pass of the concatenated batch (their mean is DomainBed's
  ERM loss, ``F.cross_entropy`` of the concatenated minibatches); no penalty."""
  del key
  return Terms(env_losses_of(domain_logits(ctx, params, batch["x"]), batch["y"]), state=state)


# ----------------------------------------------------------------------------- optimizers
class ResetState(NamedTuple):
  inner: optax.OptState


def reset_at_step(
  inner: optax.GradientTransformation, at: Any, enabled: Any = True
) -> optax.GradientTransformationExtraArgs:
  """``inner``, re-initialised at ``step == at`` (extra argument ``step``) when ``at > 0``
  and ``enabled``: DomainBed re-creates Adam at a penalty switch "because it may not like
  the sharp jump in gradient magnitudes". ``at`` may be a tuple of switch steps (IB-IRM
  re-creates Adam at each of its two); ``at`` and ``enabled`` may be traced."""
  switch_steps = at if isinstance(at, (tuple, list)) else (at,)

  def init(params):
    return ResetState(inner.init(params))

  def update(updates, state, params=None, *, step, **extra):
    del extra
    switch = jnp.zeros((), bool)
    for a in switch_steps:
      switch = switch | ((step == a) & (a > 0))
    switch = switch & enabled
    fresh = inner.init(params)
    inner_state = jax.tree.map(lambda f, o: jnp.where(switch, f, o), fresh, state.inner)
    updates, inner_state = inner.update(updates, inner_state, params)
    return updates, ResetState(inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def rescale_by_penalty_weight(
  weight: Any, anneal_iters: Any, enabled: Any = True, before: float = 1.0
) -> optax.GradientTransformationExtraArgs:
  """Divides the updates by ``max(w(step), 1)`` when ``enabled`` (extra argument ``step``;
  ``w`` as :func:`annealed_weight`): the Colored MNIST scripts' ``if penalty_weight > 1.0:
  loss /= penalty_weight`` (Arjovsky et al.'s ``colored_mnist/main.py``, kept by Fishr and the
  Hessian paper) "to keep gradients in a reasonable range". Placed after the weight decay, it
  rescales the L2 term too, as the scripts' division of the whole loss does. All arguments may
  be traced."""

  def update(updates, state, params=None, *, step, **extra):
    del params, extra
    w = annealed_weight(step, anneal_iters, weight, before)
    factor = jnp.where(enabled, 1.0 / jnp.maximum(w, 1.0), 1.0)
    return jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


class OnStepsState(NamedTuple):
  """:func:`on_steps`'s state: the inner transform's, and no counter of its own (the engine's
  ``step`` is the clock)."""

  inner_state: Any


def on_steps(
  inner: optax.GradientTransformation, active: Callable[[jax.Array], jax.Array]
) -> optax.GradientTransformationExtraArgs:
  """``inner`` on the steps where ``active(step)`` is true (``step``: the engine's extra
  argument, required); on the others a zero update and ``inner``'s state unchanged, as a torch
  optimizer whose ``step()`` is not called (Adam's moments and bias-correction count do not
  advance). ``optax.conditionally_mask``'s rule (the same ``lax.cond``, the same numbers)
  without its call counter: the engine's ``step`` is the one clock. The adversarial methods'
  generator optimizers (DANN, CDANN, ADRMX) skip the discriminator's steps this way."""
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return OnStepsState(inner.init(params))

  def update(updates, state, params=None, *, step, **extra_args):
    def run(_):
      return inner.update(updates, state.inner_state, params, step=step, **extra_args)

    def skip(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner_state

    updates, inner_state = jax.lax.cond(active(step), run, skip, None)
    return updates, OnStepsState(inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def torch_adam(lr) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr)``'s update (betas 0.9/0.999, eps 1e-8)."""
  return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def domainbed_adam(
  reset_at: str | None = None, rescale_by: tuple[str, str] | None = None
) -> Callable[[Context], optax.GradientTransformation]:
  """DomainBed's optimizer, ``torch.optim.Adam(lr, weight_decay)``: ``weight_decay * param``
  added to the gradient, then Adam.

  Args:
    reset_at: an hparam name: Adam is re-created at that step (:func:`reset_at_step`), unless
      the method's hparam ``reset_optimizer`` is false (the Colored MNIST scripts keep one
      Adam for the whole run).
    rescale_by: ``(weight, anneal_iters)`` hparam names: when the method's hparam
      ``rescale_loss`` is true, the gradient (weight decay included) is divided by the
      penalty weight once it exceeds 1 (:func:`rescale_by_penalty_weight`).
  """

  def make(ctx: Context) -> optax.GradientTransformation:
    hp = ctx.hparams
    adam = torch_adam(hp["lr"])
    if reset_at is not None:
      adam = reset_at_step(adam, hp[reset_at], enabled=hp.get("reset_optimizer", True))
    parts = [optax.add_decayed_weights(hp["weight_decay"])]
    if rescale_by is not None:
      weight, anneal_iters = rescale_by
      parts.append(rescale_by_penalty_weight(hp[weight], hp[anneal_iters], hp["rescale_loss"]))
    return optax.chain(*parts, adam)

  return make


# ----------------------------------------------------------------------------- the step
class MethodStep(NamedTuple):
  """A method's part of the train step, pure and jittable.

  ``init(params, key) -> state``, ``key`` the run's key for the method's own networks (the
  engine derives it from the run's seed: :func:`dgjax.train.method_key`);
  ``update(params, state, batch, step, key) -> (updates, state, metrics)`` where ``batch``
  leaves are ``[D, B, ...]`` and ``metrics`` has at least ``loss`` and ``env_losses`` ``[D]``.
  The engine applies ``updates`` with ``optax.apply_updates``.

  ``diagnostics`` (optional): ``diagnostics(params, state, batch, key) -> dict of scalars``,
  run by the engine at each evaluation on a freshly drawn batch and logged with the record.

  ``predict(params, state, x) -> logits``: what evaluation scores (DomainBed's
  ``algorithm.predict``); the network's logits unless the method says otherwise.
  """

  init: Callable[[PyTree, jax.Array], Any]
  update: Callable[..., tuple[Any, Any, dict[str, Any]]]
  diagnostics: Callable[..., dict[str, Any]] | None = None
  predict: Callable[..., Any] | None = None


class StepState(NamedTuple):
  """A method's state: its gradient source's, its transforms' (read by name) and the model's
  non-trainable variables (BatchNorm's running statistics, updated by each training step
  when BatchNorm is not frozen; what evaluation normalises with)."""

  source: Any
  optimizer: optax.OptState
  variables: Mapping[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered training method (see the module docstring for the three parts).

  Attributes:
    name: the ``--method`` name.
    description: one line: what it does and the paper.
    hparams: its own hparams (the common ones are added by :func:`hparam_specs`).
    gradients: how the step gets its gradients.
    combine: ``combine(ctx)``, a transform from per-domain gradients to one (with
      :func:`per_domain_gradients`), or ``None``.
    optimizer: ``optimizer(ctx)``, the update rule.
    domainbed_name: the class name in DomainBed's ``algorithms.py`` (written to records as
      ``args.algorithm``, so DomainBed's tools read them).
    logged_state: metric name -> state field name, read by name from the step's state after
      each update (e.g. the masks' ``kept_fraction``).
    diagnostics: ``diagnostics(ctx) -> fn or None`` (see :class:`MethodStep`).
    presets: named sets of hparam values (``--preset NAME``), applied over the defaults or
      the random draw and under explicit overrides.
    predict: ``predict(ctx, params, state, x) -> logits`` where evaluation must not use the
      plain network (DomainBed's methods that override ``predict``, e.g. ARM's adaptation);
      ``state`` is the method's :class:`StepState`. ``None``: ``ctx.logits(params, x)``.
    forward_per_domain: DomainBed's method runs the network once per domain's minibatch
      (``for x, y in minibatches: self.network(x)``) instead of once on their concatenation
      (``self.network(torch.cat(...))``). With unfrozen BatchNorm this decides the batch
      statistics the method sees (each domain's own, or the pooled ones) and how often the
      running statistics move per step (:meth:`Context.updated_variables`). The method's
      forward passes follow it through :func:`domain_logits` / :func:`domain_features`;
      per-domain gradients (:func:`per_domain_gradients`) are per domain by construction.
  """

  name: str
  description: str
  hparams: Mapping[str, HParam]
  gradients: GradientSource
  combine: Callable[[Context], optax.GradientTransformation] | None = None
  optimizer: Callable[[Context], optax.GradientTransformation] = domainbed_adam()
  domainbed_name: str = ""
  logged_state: Mapping[str, str] = dataclasses.field(default_factory=dict)
  diagnostics: Callable[[Context], Callable | None] | None = None
  predict: Callable[..., Any] | None = None
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  forward_per_domain: bool = False

  def build(self, ctx: Context) -> MethodStep:
    return build_step(self, ctx)


def build_step(method: Method, ctx: Context) -> MethodStep:
  """The one assembly of a method's step: gradients, then ``combine``, then ``optimizer``
  (on the parameters that train: :func:`trainable_only` when the model has ``frozen_params``);
  then the model's running statistics (:meth:`Context.updated_variables`)."""
  ctx = dataclasses.replace(ctx, forward_per_domain=method.forward_per_domain)
  optimizer = method.optimizer(ctx)
  frozen = getattr(ctx.model, "frozen_params", None)
  if frozen is not None:  # e.g. the ViTs' vit_attn_tune: only attention parameters train
    optimizer = trainable_only(optimizer, frozen)
  parts = ([method.combine(ctx)] if method.combine is not None else []) + [optimizer]
  tx = optax.chain(*parts)
  source = method.gradients

  def init(params, key):
    return StepState(source.init(ctx, params, key), tx.init(params), dict(ctx.variables))

  def update(params, state, batch, step, key):
    step_ctx = dataclasses.replace(
      ctx,
      variables=state.variables,
      train=True,
      rng=None if key is None else jax.random.fold_in(key, 0x64726F70),
    )
    grads, terms = source.grads(step_ctx, params, state.source, batch, step, key)
    updates, opt_state = tx.update(
      grads, state.optimizer, params, losses=terms.env_losses, step=step
    )
    metrics = {"loss": jnp.mean(terms.env_losses), "env_losses": terms.env_losses, **terms.metrics}
    new_state = StepState(terms.state, opt_state, step_ctx.updated_variables(params, batch["x"]))
    for metric, field in method.logged_state.items():
      metrics[metric] = optax.tree_utils.tree_get(new_state, field)
    return updates, new_state, metrics

  def eval_ctx(state):  # the model's variables as the state has them (None: the initial ones)
    return ctx if state is None else dataclasses.replace(ctx, variables=state.variables)

  diagnose = method.diagnostics(ctx) if method.diagnostics is not None else None
  diagnostics = (
    None
    if diagnose is None
    else (lambda params, state, batch, key: method.diagnostics(eval_ctx(state))(params, batch, key))
  )
  if method.predict is None:
    predict = lambda params, state, x: eval_ctx(state).logits(params, x)
  else:
    predict = lambda params, state, x: method.predict(eval_ctx(state), params, state, x)
  return MethodStep(init, update, diagnostics, predict)


# ----------------------------------------------------------------------------- hparam specs
def hparam_specs(method: Method, dataset: DatasetFacts | None = None) -> dict[str, HParam]:
  """The common hparams, the dataset's own (its model's and data's, e.g. the ResNets'
  ``resnet_dropout``) and the method's, with ``dataset``'s defaults and ranges
  (:meth:`HParam.for_dataset`; ``None``: the small-image values)."""
  specs = {**COMMON_HPARAMS, **(dataset.hparams if dataset is not None else {}), **method.hparams}
  return {name: spec.for_dataset(dataset) for name, spec in specs.items()}


def default_hparams(method: Method, dataset: DatasetFacts | None = None) -> dict[str, Any]:
  return {name: spec.default for name, spec in hparam_specs(method, dataset).items()}


def random_hparams(
  method: Method, seed: int, dataset: DatasetFacts | None = None
) -> dict[str, Any]:
  """DomainBed's rule: seed 0 gives the defaults, any other seed draws every hparam from its
  distribution with a generator seeded by ``seed_hash(seed, name)``."""
  if seed == 0:
    return default_hparams(method, dataset)
  return {
    name: spec.sample(np.random.RandomState(seed_hash(seed, name)))
    for name, spec in hparam_specs(method, dataset).items()
  }


def resolve_hparams(
  method: Method,
  hparams_seed: int = 0,
  overrides: Mapping[str, Any] | None = None,
  trial_seed: int = 0,
  dataset: DatasetFacts | None = None,
  preset: str | None = None,
) -> dict[str, Any]:
  """Defaults (``hparams_seed == 0``) or DomainBed's random draw, then the method's
  ``preset`` (by name), then ``overrides``; ``dataset`` (a :class:`DatasetFacts`, e.g. a
  :class:`dgjax.datasets.Dataset`) chooses the small- or large-image values and adds its own
  hparams.

  As DomainBed's ``train.py``, a non-zero ``hparams_seed`` draws from
  ``random_hparams(method, seed_hash(hparams_seed, trial_seed))``, so every trial gets its own
  draw. An override naming no hparam of the method raises, listing the valid names; a value
  of the wrong kind or out of range raises naming the hparam.
  """
  specs = hparam_specs(method, dataset)
  hp = (
    default_hparams(method, dataset)
    if hparams_seed == 0
    else random_hparams(method, seed_hash(hparams_seed, trial_seed), dataset)
  )
  unknown = sorted(set(overrides or {}) - set(hp))
  if unknown:
    raise ValueError(
      f"unknown hparam(s) {', '.join(map(repr, unknown))} for method {method.name!r}; "
      f"valid hparams: {', '.join(sorted(hp))}"
    )
  if preset is not None:
    if preset not in method.presets:
      raise ValueError(
        f"method {method.name!r} has no preset {preset!r}; its presets: "
        f"{', '.join(sorted(method.presets)) or 'none'}"
      )
    for name, value in method.presets[preset].items():
      hp[name] = specs[name].coerce(name, value)
  for name, value in (overrides or {}).items():
    hp[name] = specs[name].coerce(name, value)
  return hp


def hparams_with_role(method: Method, role: str) -> list[str]:
  """The names of the method's hparams (common ones included) that play ``role``."""
  return [n for n, s in hparam_specs(method).items() if s.role == role]


def structural_hparams(method: Method) -> list[str]:
  """The hparams that change the compiled program (see :attr:`HParam.structural`)."""
  return sorted(n for n, s in hparam_specs(method).items() if s.structural)
