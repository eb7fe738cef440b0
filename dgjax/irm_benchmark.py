"""IRM-style Colored MNIST benchmark: full-batch training of any registered method, n restarts.

The scripts' protocol, for every method they have: Arjovsky et al.'s
``code/colored_mnist/main.py`` and ``reproduce_paper_results.sh`` (facebookresearch/
InvariantRiskMinimization: irm), Fishr's ``coloredmnist/train_coloredmnist.py`` (alexrame/fishr:
erm, irm, rex, fishr, and the gray test set) and the Hessian paper's ``cmnist/cmnist_HGP.py`` /
``cmnist_Hutchinson.py`` (huawei-noah/Federated-Learning ``HessianAlignment/``: the same script
with "sad" = hgp / hutchinson). MLP 392-390-390-1 (Xavier-uniform weights, zero biases, binary
logit), full-batch Adam (lr 0.0004898536566546834) kept for the whole run (never re-created),
``l2 * sum ||w||^2`` added to the loss (l2 = 0.00110794568, every parameter), penalty weight 1.0
before step 190 and 91257.18613115903 from then on, and the whole objective divided by the
weight when it exceeds 1. The penalties are the scripts' forms (the methods' ``irm_cmnist``
preset; see :mod:`dgjax.algorithms.invariance` for the table of differences from DomainBed's):

* irm: mean over the two environments of the squared dummy-scale gradient of the whole
  environment; vrex ("rex"): ``(R0 - R1)^2``; fishr: the two environments' per-example
  head-gradient variances, no EMA, summed squared differences from their mean, weight 1 (not
  0) before the switch;
* hgp / hutchinson ("sad"): summed (not averaged) over the two environments (alpha = beta = 2
  on our per-environment mean), mean targets not detached; Hutchinson with 150 independent
  Rademacher probes per environment and for the mean (``calc_hessian_diag(..., repeat=150)``).

Reported, as the scripts do: the accuracies of the forward pass of their last loop iteration
(step 500 of ``range(501)``), which runs before that iteration's update, i.e. the model after
500 updates; so the engine trains ``steps - 1`` updates and evaluates. Train accuracy is the
mean over the two training environments; the test environment has colour flip 0.9; the gray
test set is the test digits without colour and with their own label noise
(:mod:`dgjax.data.irm_cmnist`). Mean and std (and standard error) over restarts; each restart
draws new data and a new initialisation.

Methods the scripts do not have run under the same schedule with their DomainBed form:
their hparams with the roles below get the benchmark's values; only methods with a
``rescale_loss`` hparam (irm, vrex, fishr, coral, mmd, iga, sd, hgp, hutchinson, cma) divide
the objective by the weight, the others (e.g. ib_erm, rdm) see the raw weight after the switch.

It is a task of the engine (:class:`IRMTask` for :func:`dgjax.train.train_many`): the batch is
the whole training set of the run (leaves ``[2, n, ...]``; each restart has its own data, so
the data carries the runs axis), and its evaluation scores train, test and gray test. The
benchmark's settings reach each method through the roles of its hparams
(:attr:`dgjax.core.HParam.role`): ``lr``, ``weight_decay = 2 * l2`` (the gradient of
``l2 ||w||^2``), ``batch_size`` (the environment size), ``penalty_weight``, ``anneal_iters``,
``rescale_loss = True`` and ``reset_optimizer = False`` (the IRM code keeps Adam's state at
the switch), wherever the method has an hparam of that role, over the method's ``irm_cmnist``
preset where it has one (the scripts' penalty forms, above). Per-run overrides win.

Restarts run as one vmapped program (``restarts_impl="vmap"``), one after another
(``"sequential"``) or as :func:`resolve_restarts_impl` picks for the backend (``"auto"``,
the command lines' default). With label shift the two environments differ in size; both are truncated
to the smaller one so that the per-domain batch is rectangular.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dgjax import config as config_lib
from dgjax import hessian
from dgjax import methods
from dgjax import train as train_lib
from dgjax.config import config_field
from dgjax.data import irm_cmnist
from dgjax.losses import cross_entropy
from dgjax.models import mlp
from dgjax.seeding import seed_hash
from dgjax.task import TaskBase

#: Published values (Arjovsky et al.'s reproduce_paper_results.sh).
LR = 0.0004898536566546834
L2_WEIGHT = 0.00110794568
PENALTY_WEIGHT = 91257.18613115903
PENALTY_ANNEAL_ITERS = 190
STEPS = 501
HIDDEN = 390

#: Published full-MNIST results, ``{method: ((train, std), (test, std), (gray, std))}`` in %,
#: mean and std over 10 restarts: Rame, Dancette & Cord, "Fishr", ICML 2022, Table 2, as
#: transcribed in the README of alexrame/fishr ("Main results (Table 2 in Section 6.A)").
PUBLISHED = {
  "erm": ((86.4, 0.2), (14.0, 0.7), (71.0, 0.7)),
  "irm": ((71.0, 0.5), (65.6, 1.8), (66.1, 0.2)),
  "vrex": ((71.7, 1.5), (67.2, 1.5), (68.6, 2.2)),
  "fishr": ((71.0, 0.9), (69.5, 1.0), (70.2, 1.1)),
}
PUBLISHED_SOURCE = (
  "Fishr (Rame et al., ICML 2022), Table 2, full MNIST (50,000 train / "
  "10,000 test digits), 10 restarts, mean ± std"
)
PUBLISHED_RESTARTS = 10


#: How the restarts run: one vmapped program, one after another, or ``"auto"``
#: (:func:`resolve_restarts_impl`).
RESTARTS_IMPLS = ("auto", "vmap", "sequential")


def _method_help() -> str:
  return (
    "the method (the command line takes a comma-separated list, one benchmark each), one of: "
    + ", ".join(sorted(methods.METHODS))
  )


@dataclasses.dataclass(frozen=True)
class IRMConfig:
  """One benchmark: a method, ``n_restarts`` times, under the scripts' protocol; declared with
  :func:`dgjax.config.config_field`, so ``python -m experiments.colored_mnist_irm`` and
  ``experiments.reproduce irm_cmnist`` have one flag per field, and a stored result stands
  for a config when its ``identity`` fields (those that change the numbers) agree
  (:func:`dgjax.config.identity_of`). Every field but ``hparams`` (whose resolution is
  recorded instead) is written into the result (``record``)."""

  method: str = config_field("erm", _method_help, identity=True, record="dgjax")
  steps: int = config_field(
    STEPS,
    "the scripts' loop length: steps - 1 full-batch updates, then the report (their last "
    "iteration's forward pass)",
    identity=True,
    record="dgjax",
    minimum=2,
  )
  n_restarts: int = config_field(
    10, "restarts (new data draw and initialisation each)", identity=True, record="dgjax", minimum=1
  )
  seed: int = config_field(0, "base seed of the restarts", identity=True, record="dgjax")
  lr: float = config_field(LR, "Adam learning rate", identity=True, record="dgjax")
  l2_weight: float = config_field(
    L2_WEIGHT, "weight of sum ||w||^2 in the loss", identity=True, record="dgjax"
  )
  penalty_weight: float = config_field(
    PENALTY_WEIGHT, "penalty weight after the switch", identity=True, record="dgjax"
  )
  penalty_anneal_iters: int = config_field(
    PENALTY_ANNEAL_ITERS, "switch step", identity=True, record="dgjax", minimum=0
  )
  hidden: int = config_field(
    HIDDEN, "width of the MLP's two hidden layers", identity=True, record="dgjax", minimum=1
  )
  label_shift: Optional[float] = config_field(
    None,
    "label-shift variant: env 0 gets this fraction of the digits < 5 and 1 - it of the "
    "others (the Hessian paper uses 0.97)",
    identity=True,
    record="dgjax",
  )
  hparams: Mapping[str, Any] = config_field(
    help='JSON object of hparam overrides, e.g. \'{"alpha": 0.1}\' (the command line gives '
    "each method those of its hparams)",
    identity=True,
    factory=dict,
  )
  eval_every: int = config_field(
    100, "evaluate every this many steps", identity=True, record="dgjax", minimum=1
  )
  hessian_gap: bool = config_field(
    False,
    "log max_{e,e'} ||H_e - H_e'||_2 of the head at each evaluation",
    identity=True,
    record="dgjax",
  )
  hessian_gap_iters: int = config_field(
    20, "power iterations of the Hessian gap", identity=True, record="dgjax", minimum=1
  )
  restarts_impl: str = config_field(
    "vmap",
    "restarts as one vmapped program or one after another (auto: sequential on CPU)",
    record="dgjax",
    flag_default="auto",
    choices=RESTARTS_IMPLS,
  )
  scan_steps: int = config_field(
    100, "steps per jit call (full-batch MLP steps are short)", record="dgjax", minimum=1
  )
  data_dir: Optional[str] = config_field(
    None,
    "directory with the MNIST IDX files (training digits first). Default: TFDS 'mnist'",
    record="dgjax",
  )

  def __post_init__(self):
    object.__setattr__(self, "hparams", dict(self.hparams or {}))
    methods.get_method(self.method)
    config_lib.check_fields(self)
    if self.label_shift is not None and not 0 < self.label_shift < 1:
      raise ValueError(f"label_shift must be in (0, 1), got {self.label_shift}")

  def identity(self) -> dict[str, Any]:
    """What a stored result must match to stand for this config (:func:`stored_result`)."""
    return config_lib.identity_of(self)


def method_configs(method_names: Sequence[str], **fields: Any) -> list[IRMConfig]:
  """One :class:`IRMConfig` per method from the same ``fields`` (every field but ``method``),
  each given those of the ``hparams`` overrides its method has (one ``--hparams`` for a
  command line's several methods)."""
  overrides = dict(fields.pop("hparams", None) or {})
  return [
    IRMConfig(
      method=m,
      hparams={k: v for k, v in overrides.items() if k in methods.hparam_specs(m)},
      **fields,
    )
    for m in method_names
  ]


def benchmark_overrides(method: str, cfg: IRMConfig, n_train: int) -> dict[str, Any]:
  """The benchmark's settings as hparam overrides of ``method``, by role, then ``cfg.hparams``."""
  by_role = {
    "lr": cfg.lr,
    "weight_decay": 2.0 * cfg.l2_weight,
    "batch_size": n_train,
    "penalty_weight": cfg.penalty_weight,
    "anneal_iters": cfg.penalty_anneal_iters,
    "rescale_loss": True,
    "reset_optimizer": False,
  }
  spec = methods.hparam_specs(method)
  overrides = {name: by_role[s.role] for name, s in spec.items() if s.role in by_role}
  overrides.update(cfg.hparams)
  return overrides


#: The preset a method may define for this benchmark (e.g. alpha = beta = 1 for hgp).
PRESET = "irm_cmnist"


def benchmark_preset(method: str) -> str | None:
  return PRESET if PRESET in methods.get_method(method).presets else None


def benchmark_hparams(method: str, cfg: IRMConfig, n_train: int) -> dict[str, Any]:
  """The method's resolved hparams for this benchmark: its ``irm_cmnist`` preset if it has
  one, the benchmark's settings by role, then ``cfg.hparams``."""
  return methods.resolve_hparams(
    method, 0, benchmark_overrides(method, cfg, n_train), preset=benchmark_preset(method)
  )


def xavier_init(params, key):
  """Xavier-uniform kernels ``U(+-sqrt(6 / (fan_in + fan_out)))`` and zero biases
  (``nn.init.xavier_uniform_`` / ``zeros_`` of the IRM code)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, x), k in zip(leaves, keys):
    if getattr(path[-1], "key", None) == "kernel":
      bound = math.sqrt(6.0 / (x.shape[0] + x.shape[1]))
      out.append(jax.random.uniform(k, x.shape, x.dtype, -bound, bound))
    else:
      out.append(jnp.zeros_like(x))
  return jax.tree.unflatten(treedef, out)


def restart_data(data: irm_cmnist.IRMColoredMNIST, n_env: int) -> dict[str, np.ndarray]:
  """One restart's arrays: the two training environments (truncated to ``n_env``), the test
  environment in colour and in gray."""
  train = [irm_cmnist.colorize(data.images, e)[:n_env] for e in data.train]
  return {
    "train_x": np.stack(train),
    "train_y": np.stack([e.y[:n_env] for e in data.train]),
    "test_x": irm_cmnist.colorize(data.images, data.test),
    "gray_x": irm_cmnist.colorize(data.images, data.gray, grayscale=True),
    "test_y": data.test.y,
    "gray_y": data.gray.y,
  }


class IRMTask(TaskBase):
  """Arjovsky et al.'s full-batch protocol as an engine task; run ``k`` trains on
  ``runs[k]`` (from :func:`restart_data`).

  ``hessian_gap``: each evaluation also logs ``max_{e,e'} ||H_e - H_e'||_2`` of the head,
  estimated with random probes keyed by ``fold_in(key(gap_seeds[k]), step)``, the engine's
  step (a logged diagnostic; it does not touch training)."""

  per_run_data = True
  num_domains = 2

  def __init__(
    self,
    runs: list[dict[str, np.ndarray]],
    hidden: int,
    hessian_gap: bool = False,
    hessian_gap_iters: int = 20,
    gap_seeds: list[int] | None = None,
  ):
    self.model = mlp(1, hidden=(hidden, hidden))
    self.runs = runs
    self.data = jax.tree.map(
      lambda *xs: jnp.asarray(np.stack(xs)), *[{"x": r["train_x"], "y": r["train_y"]} for r in runs]
    )
    self.hessian_gap, self.hessian_gap_iters = hessian_gap, hessian_gap_iters
    self.gap_seeds = gap_seeds or list(range(len(runs)))
    model = self.model

    @functools.partial(jax.jit, static_argnums=0)
    def accuracy(predict, model_state, x, y):
      logits = predict(model_state, x)[..., 0]
      return jnp.mean(((logits > 0).astype(jnp.int32) == y).astype(jnp.float32))

    @jax.jit
    def gap(params, x, y, key):
      d, b = x.shape[:2]
      z = model.apply({"params": params}, x.reshape(d * b, -1), method="features")
      obj = lambda head, inp: cross_entropy(
        model.apply({"params": {"classifier": head}}, inp["z"], method="head"), inp["y"]
      )
      return hessian.hessian_difference_norm(
        obj, params["classifier"], {"z": z.reshape(d, b, -1), "y": y}, key, hessian_gap_iters
      )

    self._accuracy, self._gap = accuracy, gap

  def init_params(self, key):
    params = self.model.init(key, jnp.zeros((1, 392), jnp.float32))["params"]
    return xavier_init(params, jax.random.fold_in(key, 1))

  def batch(self, data, key, batch_size):
    del key, batch_size
    return {"x": data["x"], "y": data["y"]}

  def evaluate(
    self, model_state, run: int, predict, *, step: int = 0, mesh=None
  ) -> dict[str, float]:
    """Run ``run``'s training, test and gray-test accuracies (and the Hessian gap) at engine
    step ``step``; on this process's copy of the small full-batch arrays, ``mesh`` or not."""
    del mesh
    r = self.runs[run]
    acc = lambda x, y: float(self._accuracy(predict, model_state, x, y))
    train = np.mean([acc(r["train_x"][e], r["train_y"][e]) for e in range(2)])
    out = {
      "train_acc": float(train),
      "test_acc": acc(r["test_x"], r["test_y"]),
      "gray_acc": acc(r["gray_x"], r["gray_y"]),
    }
    params = model_state[0]
    if self.hessian_gap:
      key = jax.random.fold_in(jax.random.key(self.gap_seeds[run]), step)
      out["hessian_gap"] = float(self._gap(params, r["train_x"], r["train_y"], key))
    return out

  def progress_numbers(self, record):
    return {
      "loss": record["loss"],
      "train_acc": record["train_acc"],
      "test_acc": record["test_acc"],
    }


def data_split(cfg: IRMConfig, images: np.ndarray, labels: np.ndarray) -> tuple[str, int]:
  """``(note, n_env)``: the data split's description and the per-environment size the runs
  train on (the training environments truncated to the smaller), known before training."""
  datasets = [
    irm_cmnist.irm_colored_mnist(
      images, labels, seed=seed_hash(cfg.seed, r), label_shift=cfg.label_shift
    )
    for r in range(cfg.n_restarts)
  ]
  return datasets[0].note, min(len(e.index) for d in datasets for e in d.train)


def resolve_restarts_impl(impl: str) -> str:
  """``"auto"``: restarts one after another on CPU (measured faster there), one vmapped
  program elsewhere; ``"vmap"`` and ``"sequential"`` as given."""
  if impl != "auto":
    return impl
  return "sequential" if jax.default_backend() == "cpu" else "vmap"


def updates(cfg: IRMConfig) -> int:
  """The engine's steps: the scripts report the forward pass of their last loop iteration,
  which precedes its update, so ``range(steps)`` is ``steps - 1`` updates, then evaluation."""
  return cfg.steps - 1


def restart_history(per_run: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
  """The restarts' engine records side by side: one entry per evaluation, its ``step`` and
  each metric as a list over the restarts."""
  keys = [k for k in per_run[0][0] if k not in ("hparams", "args", "epoch", "step")]
  return [
    {"step": recs[0]["step"], **{k: [rec[k] for rec in recs] for k in keys}}
    for recs in zip(*per_run)
  ]


def history_line(h: Mapping[str, Any]) -> str:
  """One evaluation of :func:`restart_history`, averaged over the restarts, as a log line."""
  return (
    f"step {h['step']:4d}  loss {np.mean(h['loss']):.4f}  train {100 * np.mean(h['train_acc']):.1f}  "
    f"test {100 * np.mean(h['test_acc']):.1f}  gray {100 * np.mean(h['gray_acc']):.1f}"
    + (f"  penalty {np.mean(h['penalty']):.3g}" if "penalty" in h else "")
    + (f"  hessian_gap {np.mean(h['hessian_gap']):.3g}" if "hessian_gap" in h else "")
  )


def run(
  cfg: IRMConfig, images: np.ndarray, labels: np.ndarray, log: Callable[[str], None] = print
) -> dict[str, Any]:
  """Trains ``cfg.method`` ``cfg.n_restarts`` times on the engine; returns finals, summary and
  history (``cfg.data_dir`` is not read: ``images`` and ``labels`` are the digits).

  Returns a dict with the config's recorded fields (``method``, ``n_restarts``, ...) and
  its ``identity``, ``final`` (per-restart ``train_acc``, ``test_acc``, ``gray_acc``),
  ``summary`` (mean, std and standard error of each, in %), ``history`` (one record per evaluation: step and
  per-restart metrics, averaged over the steps since the previous evaluation, and
  accuracies), ``note`` (the data split), ``hparams`` and timings.
  """
  cfg = dataclasses.replace(cfg, restarts_impl=resolve_restarts_impl(cfg.restarts_impl))
  datasets = [
    irm_cmnist.irm_colored_mnist(
      images, labels, seed=seed_hash(cfg.seed, r), label_shift=cfg.label_shift
    )
    for r in range(cfg.n_restarts)
  ]
  n_env = min(len(e.index) for d in datasets for e in d.train)
  runs = [restart_data(d, n_env) for d in datasets]
  overrides = benchmark_overrides(cfg.method, cfg, n_env)
  seeds = [seed_hash(cfg.seed, r, "init") for r in range(cfg.n_restarts)]
  method, preset = methods.get_method(cfg.method), benchmark_preset(cfg.method)  # once
  configs = [
    train_lib.TrainConfig(
      method=method,
      test_envs=(),
      steps=updates(cfg),
      checkpoint_freq=cfg.eval_every,
      seed=s,
      hparams=overrides,
      preset=preset,
      per_domain_impl="vmap",
      progress=False,
      scan_steps=cfg.scan_steps,
    )
    for s in seeds
  ]
  groups = (
    [list(range(cfg.n_restarts))]
    if cfg.restarts_impl == "vmap"
    else [[r] for r in range(cfg.n_restarts)]
  )
  t0 = time.perf_counter()
  per_run: list[list[dict]] = [None] * cfg.n_restarts  # type: ignore[list-item]
  for g in groups:
    task = IRMTask(
      [runs[r] for r in g],
      cfg.hidden,
      cfg.hessian_gap,
      cfg.hessian_gap_iters,
      [seeds[r] for r in g],
    )
    for r, recs in zip(g, train_lib.train_many([configs[r] for r in g], task)):
      per_run[r] = recs
  history = restart_history(per_run)
  for h in history:
    log(history_line(h))
  final = {k: np.asarray(history[-1][k]) for k in ("train_acc", "test_acc", "gray_acc")}
  summary = {
    k: (100 * float(np.mean(v)), 100 * float(np.std(v)), 100 * float(np.std(v)) / math.sqrt(len(v)))
    for k, v in final.items()
  }
  return {
    **config_lib.record_fields(cfg, "dgjax"),
    "final": {k: v.tolist() for k, v in final.items()},
    "summary": summary,
    "history": history,
    "note": datasets[0].note,
    "hparams": dict(configs[0].resolved_hparams),
    "identity": cfg.identity(),
    "train_seconds": time.perf_counter() - t0,
    "env_size": int(n_env),
  }


def stored_result(results: Sequence[Mapping[str, Any]], cfg: IRMConfig) -> dict | None:
  """The last of ``results`` (:func:`run`'s, e.g. read back from JSON lines) that stands for
  ``cfg`` (the same :meth:`IRMConfig.identity`), or ``None``."""
  same = [r for r in results if r.get("identity") == cfg.identity()]
  return dict(same[-1]) if same else None


METRICS = ("train_acc", "test_acc", "gray_acc")


def gap_in_standard_errors(
  ours: tuple[float, float, float],
  published: tuple[float, float],
  published_restarts: int = PUBLISHED_RESTARTS,
) -> float:
  """``(ours - published) / sqrt(se_ours^2 + se_published^2)``: ``ours`` is ``(mean, std,
  se)``, ``published`` ``(mean, std)`` over ``published_restarts`` (population std, as the
  scripts' ``np.std``)."""
  se_pub = published[1] / math.sqrt(published_restarts)
  scale = math.hypot(ours[2], se_pub)
  return (ours[0] - published[0]) / scale if scale > 0 else float("nan")


def format_summary(
  results: list[dict[str, Any]], published: Mapping[str, tuple] = PUBLISHED
) -> str:
  """Markdown table: each method's train / test / gray-test accuracy, mean ± standard error
  over its restarts, beside the published row (mean ± std) and the gap in standard errors."""
  lines = [
    "| method | restarts | train acc | test acc | gray test acc | published train / test / gray "
    "| gap (SE) train / test / gray |",
    "|---|---:|---:|---:|---:|---|---|",
  ]
  for r in results:
    s = r["summary"]
    cells = [f"{s[k][0]:.1f} ± {s[k][2]:.1f}" for k in METRICS]
    pub = published.get(r["method"])
    if pub:
      pub_s = " / ".join(f"{m:.1f} ± {sd:.1f}" for m, sd in pub)
      gaps = " / ".join(f"{gap_in_standard_errors(s[k], p):+.1f}" for k, p in zip(METRICS, pub))
    else:
      pub_s, gaps = "not published", ""
    lines.append(
      f"| {r['method']} | {r['n_restarts']} | " + " | ".join(cells) + f" | {pub_s} | {gaps} |"
    )
  return "\n".join(lines)
