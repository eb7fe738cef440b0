"""IRM-style Colored MNIST benchmark: full-batch training of any registered method, n restarts.

Arjovsky et al.'s protocol (``code/colored_mnist/main.py`` and ``reproduce_paper_results.sh``
of facebookresearch/InvariantRiskMinimization; reused unchanged by Fishr and by the Hessian-
alignment paper): MLP 392-390-390-1 (Xavier-uniform weights, zero biases, binary logit),
full-batch Adam (lr 0.0004898536566546834), 501 steps, ``l2 * sum ||w||^2`` added to the loss
(l2 = 0.00110794568, every parameter), penalty weight 1.0 before step 190 and 91257.18613115903
from then on, and the whole objective divided by the weight when it exceeds 1. Reported: the
final train accuracy (mean over the two training environments), test accuracy and gray-test
accuracy, mean +- std over restarts (each restart draws new data and a new initialisation).

Any method of :mod:`dgjax.methods` runs here: its :class:`~dgjax.methods.MethodStep` gets the
whole training set as its "batch" (leaves ``[2, n, ...]``) and these hparams where the method
has them: ``lr``, ``weight_decay = 2 * l2`` (the gradient of ``l2 ||w||^2``), ``batch_size``,
``penalty_weight``, ``penalty_anneal_iters``, ``rescale_loss = 1`` and ``reset_optimizer = 0``
(the IRM code keeps Adam's state at the switch). Methods that name their weight differently
map it in :data:`HPARAM_ALIASES`. Per-run overrides win over all of these.

Restarts run as one ``jax.vmap``-ed program over their seeds (``restarts_impl="vmap"``) or one
after another (``"sequential"``). With label shift the two environments differ in size; both
are truncated to the smaller one so that the per-domain batch is rectangular.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dgjax import hessian
from dgjax import methods
from dgjax.data import irm_cmnist
from dgjax.models import mlp
from dgjax.seeding import seed_hash

#: Published values (Arjovsky et al.'s reproduce_paper_results.sh).
LR = 0.0004898536566546834
L2_WEIGHT = 0.00110794568
PENALTY_WEIGHT = 91257.18613115903
PENALTY_ANNEAL_ITERS = 190
STEPS = 501
HIDDEN = 390

#: Method-specific names for the penalty weight / switch step (DomainBed's spellings).
HPARAM_ALIASES: dict[str, dict[str, str]] = {
    "irm": {"penalty_weight": "irm_lambda", "penalty_anneal_iters": "irm_penalty_anneal_iters"},
    "vrex": {"penalty_weight": "vrex_lambda", "penalty_anneal_iters": "vrex_penalty_anneal_iters"},
    "fishr": {"penalty_weight": "lambda", "penalty_anneal_iters": "penalty_anneal_iters"},
}

#: Published full-MNIST results (Fishr, Rame et al. ICML 2022, Table 2: train / test / gray test).
PUBLISHED = {"erm": (86.4, 14.0, 71.0), "fishr": (71.0, 69.5, 70.2)}


@dataclasses.dataclass
class IRMConfig:
  method: str = "erm"
  steps: int = STEPS
  n_restarts: int = 10
  seed: int = 0
  lr: float = LR
  l2_weight: float = L2_WEIGHT
  penalty_weight: float = PENALTY_WEIGHT
  penalty_anneal_iters: int = PENALTY_ANNEAL_ITERS
  hidden: int = HIDDEN
  label_shift: Optional[float] = None
  hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_every: int = 100
  hessian_gap: bool = False          # log max_{e,e'} ||H_e - H_e'||_2 at each evaluation
  hessian_gap_iters: int = 20
  restarts_impl: str = "vmap"        # "vmap" | "sequential"


def benchmark_hparams(method: str, cfg: IRMConfig, n_train: int) -> dict[str, Any]:
  """The method's hparams for this benchmark (see the module docstring)."""
  spec = methods.hparam_specs(method)
  alias = HPARAM_ALIASES.get(method, {})
  wanted = {"lr": cfg.lr, "weight_decay": 2.0 * cfg.l2_weight, "batch_size": n_train,
            "penalty_weight": cfg.penalty_weight, "penalty_anneal_iters": cfg.penalty_anneal_iters,
            "rescale_loss": 1, "reset_optimizer": 0}
  overrides = {}
  for name, value in wanted.items():
    target = alias.get(name, name)
    if target in spec:
      overrides[target] = value
  overrides.update(cfg.hparams)
  return methods.resolve_hparams(method, 0, overrides)


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


def _restart_arrays(data: irm_cmnist.IRMColoredMNIST):
  """Per-restart index/label/colour arrays (envs truncated to a common size)."""
  n = min(len(e.index) for e in data.train)
  return {"train_index": np.stack([e.index[:n] for e in data.train]),
          "train_y": np.stack([e.y[:n] for e in data.train]),
          "train_color": np.stack([e.color[:n] for e in data.train]),
          "test_index": data.test.index, "test_y": data.test.y, "test_color": data.test.color}


def _colorize(images, index, color, grayscale=False):
  grey = images[index]                                   # [..., 196]
  if grayscale:
    keep = jnp.ones(color.shape + (2,), grey.dtype)
  else:
    keep = (color[..., None] == jnp.arange(2)).astype(grey.dtype)
  return (keep[..., :, None] * grey[..., None, :]).reshape(index.shape + (-1,))


def run(cfg: IRMConfig, images: np.ndarray, labels: np.ndarray,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains ``cfg.method`` ``cfg.n_restarts`` times; returns finals, summary and history.

  Returns a dict with ``final`` (per-restart ``train_acc``, ``test_acc``, ``gray_acc``),
  ``summary`` (mean and std of each, in %), ``history`` (one record per evaluation: step and
  per-restart accuracies and metrics), ``note`` (the data split), ``hparams`` and timings.
  """
  datasets = [irm_cmnist.irm_colored_mnist(images, labels, seed=seed_hash(cfg.seed, r),
                                           label_shift=cfg.label_shift)
              for r in range(cfg.n_restarts)]
  note = datasets[0].note
  grey = jnp.asarray(datasets[0].images)
  arrays = [_restart_arrays(d) for d in datasets]
  n_env = min(a["train_y"].shape[1] for a in arrays)
  arrays = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)),
                        *[{k: (v[:, :n_env] if k.startswith("train") else v) for k, v in a.items()}
                          for a in arrays])
  hp = benchmark_hparams(cfg.method, cfg, n_env)
  model = mlp(1, hidden=(cfg.hidden, cfg.hidden))
  ctx = methods.Context(model=model, hparams=hp, num_domains=2, per_domain_impl="vmap")
  step_impl = methods.get_method(cfg.method).build(ctx)
  obj_fn = lambda head, d: methods.cross_entropy(ctx.head_logits(head, d["z"]), d["y"])

  def init(key):
    params = model.init(key, jnp.zeros((1, 392), jnp.float32))["params"]
    params = xavier_init(params, jax.random.fold_in(key, 1))
    return params, step_impl.init(params)

  def batch_of(a):
    return {"x": _colorize(grey, a["train_index"], a["train_color"]), "y": a["train_y"]}

  def train_chunk(params, opt_state, a, key, start, length):
    batch = batch_of(a)

    def body(carry, step):
      params, opt_state = carry
      # The method's randomness (Mixup's pairs, Hutchinson's probes): one key per restart and step.
      step_key = jax.random.fold_in(jax.random.fold_in(key, 2), step)
      updates, opt_state, metrics = step_impl.update(params, opt_state, batch, step, step_key)
      metrics = {k: v for k, v in metrics.items() if jnp.ndim(v) <= 1}
      return (optax.apply_updates(params, updates), opt_state), metrics

    (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state),
                                                start + jnp.arange(length))
    return params, opt_state, jax.tree.map(lambda m: m[-1], metrics)

  def accuracy(params, x, y):
    logits = model.apply({"params": params}, x)[..., 0]
    return jnp.mean(((logits > 0).astype(jnp.int32) == y).astype(jnp.float32))

  def evaluate(params, a, key):
    batch = batch_of(a)
    train_acc = jnp.mean(jax.vmap(lambda x, y: accuracy(params, x, y))(batch["x"], batch["y"]))
    test_acc = accuracy(params, _colorize(grey, a["test_index"], a["test_color"]), a["test_y"])
    gray_acc = accuracy(params, _colorize(grey, a["test_index"], a["test_color"], True), a["test_y"])
    out = {"train_acc": train_acc, "test_acc": test_acc, "gray_acc": gray_acc}
    if cfg.hessian_gap:
      d, b = batch["x"].shape[:2]
      z = model.apply({"params": params}, batch["x"].reshape(d * b, -1), method="features")
      inputs = {"z": z.reshape(d, b, -1), "y": batch["y"]}
      out["hessian_gap"] = hessian.hessian_difference_norm(obj_fn, params["classifier"], inputs, key,
                                                           cfg.hessian_gap_iters)
    return out

  keys = jnp.stack([jax.random.key(seed_hash(cfg.seed, r, "init")) for r in range(cfg.n_restarts)])
  if cfg.restarts_impl == "vmap":
    v_init = jax.jit(jax.vmap(init))
    v_chunk = jax.jit(jax.vmap(train_chunk, in_axes=(0, 0, 0, 0, None, None)), static_argnums=5)
    v_eval = jax.jit(jax.vmap(evaluate))
    params, opt_state = v_init(keys)

    def run_chunk(start, length):
      nonlocal params, opt_state
      params, opt_state, m = v_chunk(params, opt_state, arrays, keys, start, length)
      return m

    def run_eval(step):
      return v_eval(params, arrays, jax.vmap(lambda k: jax.random.fold_in(k, step))(keys))
  elif cfg.restarts_impl == "sequential":
    s_chunk = jax.jit(train_chunk, static_argnums=5)
    s_eval = jax.jit(evaluate)
    states = [jax.jit(init)(k) for k in keys]

    def run_chunk(start, length):
      ms = []
      for r in range(cfg.n_restarts):
        a = jax.tree.map(lambda x: x[r], arrays)
        p, o, m = s_chunk(*states[r], a, keys[r], start, length)
        states[r] = (p, o)
        ms.append(m)
      return jax.tree.map(lambda *xs: jnp.stack(xs), *ms)

    def run_eval(step):
      outs = [s_eval(states[r][0], jax.tree.map(lambda x: x[r], arrays), jax.random.fold_in(keys[r], step))
              for r in range(cfg.n_restarts)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  else:
    raise ValueError(f"restarts_impl must be 'vmap' or 'sequential', got {cfg.restarts_impl!r}")

  # Evaluate after step 0 and every eval_every steps (0, 100, ..., 500 for 501 steps).
  bounds = sorted({0, *range(cfg.eval_every, cfg.steps, cfg.eval_every), cfg.steps - 1})
  history = []
  done = 0
  t0 = time.perf_counter()
  for b in bounds:
    m = run_chunk(done, b + 1 - done)
    done = b + 1
    ev = jax.device_get(run_eval(b))
    m = jax.device_get(m)
    rec = {"step": b, **{k: np.asarray(v).tolist() for k, v in {**m, **ev}.items()}}
    if not np.all(np.isfinite(np.asarray(m["loss"]))):
      raise FloatingPointError(f"{cfg.method}: non-finite loss at step {b}: {np.asarray(m['loss']).tolist()}")
    history.append(rec)
    log(f"step {b:4d}  loss {np.mean(m['loss']):.4f}  train {100 * np.mean(ev['train_acc']):.1f}  "
        f"test {100 * np.mean(ev['test_acc']):.1f}  gray {100 * np.mean(ev['gray_acc']):.1f}"
        + (f"  penalty {np.mean(m['penalty']):.3g}" if "penalty" in m else "")
        + (f"  hessian_gap {np.mean(ev['hessian_gap']):.3g}" if "hessian_gap" in ev else "")
        + f"  ({time.perf_counter() - t0:.0f}s)")
  final = {k: np.asarray(history[-1][k]) for k in ("train_acc", "test_acc", "gray_acc")}
  summary = {k: (100 * float(np.mean(v)), 100 * float(np.std(v))) for k, v in final.items()}
  return {"method": cfg.method, "final": {k: v.tolist() for k, v in final.items()},
          "summary": summary, "history": history, "note": note, "hparams": hp,
          "n_restarts": cfg.n_restarts, "train_seconds": time.perf_counter() - t0,
          "env_size": int(n_env), "label_shift": cfg.label_shift}


def format_summary(results: list[dict[str, Any]], published: Mapping[str, tuple] = PUBLISHED) -> str:
  """Markdown table: method, train / test / gray-test mean +- std, the published figures."""
  lines = ["| method | restarts | train acc | test acc | gray test acc | published (full MNIST) |",
           "|---|---|---|---|---|---|"]
  for r in results:
    s = r["summary"]
    pub = published.get(r["method"])
    pub_s = " / ".join(f"{v:.1f}" for v in pub) if pub else ""
    lines.append(f"| {r['method']} | {r['n_restarts']} | {s['train_acc'][0]:.1f} ± {s['train_acc'][1]:.1f} | "
                 f"{s['test_acc'][0]:.1f} ± {s['test_acc'][1]:.1f} | "
                 f"{s['gray_acc'][0]:.1f} ± {s['gray_acc'][1]:.1f} | {pub_s} |")
  return "\n".join(lines)
