"""The baselines in the registry: DomainBed's hparams, anneal switches and Adam resets at the
configured step, and every registered method training 20 jitted steps on every dataset."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dgjax import datasets, methods
from dgjax import train as train_lib
from dgjax.data import spirals
from dgjax.models import mlp, mnist_cnn

#: Methods that need a network starting with a convolution (no Spirals for them).
CONV_ONLY = {"arm"}

# ours: the IRM-style scripts' switches, DomainBed's behaviour by default (tests/test_irm_protocol.py)
SCRIPT = {"penalty_form": "domainbed", "rescale_loss": False, "reset_optimizer": True}
RESCALE = {"rescale_loss": False}
BASELINES = {  # name -> DomainBed's hparams (name: default)
  "irm": {"irm_lambda": 1e2, "irm_penalty_anneal_iters": 500, **SCRIPT},
  "vrex": {"vrex_lambda": 1e1, "vrex_penalty_anneal_iters": 500, **SCRIPT},
  "coral": {"mmd_gamma": 1.0, "penalty_anneal_iters": 0, **RESCALE},  # ours: no schedule by default
  "mmd": {"mmd_gamma": 1.0, "penalty_anneal_iters": 0, **RESCALE},
  "groupdro": {"groupdro_eta": 1e-2},
  "mixup": {"mixup_alpha": 0.2},
  "fish": {"meta_lr": 0.5},
  "iga": {"penalty": 1000, "penalty_anneal_iters": 0, **RESCALE},
  "fishr": {"lambda": 1000.0, "penalty_anneal_iters": 1500, "ema": 0.95, **SCRIPT},
}
ANNEAL = {
  "irm": ("irm_penalty_anneal_iters", 1.0, "irm_lambda"),
  "vrex": ("vrex_penalty_anneal_iters", 1.0, "vrex_lambda"),
  "fishr": ("penalty_anneal_iters", 0.0, "lambda"),
}
SWITCH = 5  # anneal step used in the runs below


def test_every_baseline_is_registered_with_domainbed_hparams():
  for name, hp in BASELINES.items():
    assert methods.default_hparams(name) == {
      "lr": 1e-3,
      "batch_size": 64,
      "weight_decay": 0.0,
      **hp,
    }
    assert methods.get_method(name).description
  ranges = {
    "irm_lambda": (1e-1, 1e5),
    "vrex_lambda": (1e-1, 1e5),
    "mmd_gamma": (1e-1, 1e1),
    "groupdro_eta": (1e-3, 1e-1),
    "mixup_alpha": (1e-1, 1e1),
    "penalty": (1e1, 1e5),
    "lambda": (1e1, 1e4),
    "ema": (0.9, 0.99),
    "penalty_anneal_iters": (0, 5000),
    "irm_penalty_anneal_iters": (1, 1e4),
    "vrex_penalty_anneal_iters": (1, 1e4),
  }
  for name in BASELINES:
    for seed in range(1, 12):
      hp = methods.random_hparams(name, seed)
      for key, (lo, hi) in ranges.items():
        if key in hp:
          assert lo <= hp[key] <= hi, (name, key, hp[key])
      if "meta_lr" in hp:
        assert hp["meta_lr"] in (0.05, 0.1, 0.5)
      for key in ("irm_penalty_anneal_iters", "vrex_penalty_anneal_iters", "penalty_anneal_iters"):
        if key in hp:
          assert isinstance(hp[key], int)


# ------------------------------------------------------------------------------ 20 steps
def small_envs(name, data_dir):
  """Small environments of each dataset (a few hundred images, or 3 + 1 spiral environments)."""
  if name == "Spirals":
    return spirals(num_train_envs=3, examples_per_env=64, num_test=64, n_dims=4, seed=0)
  if data_dir is None:
    pytest.skip("needs $DGJAX_DATA_DIR")
  sub = "fashion-mnist" if name == "ColoredFashionMNIST" else "mnist-first10k"
  if not (data_dir / sub).is_dir():
    pytest.fail(f"$DGJAX_DATA_DIR has no {sub}/")
  return datasets.load_environments(
    name, data_dir / sub, max_examples=360 if name == "RotatedMNIST" else 240
  )


_STEPS = {}
# Test-only: cheaper XLA:CPU codegen (same program, ~2x faster to compile; 45 compilations here).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_steps(method, envs, test_env, num_classes, steps=20, batch_size=8, overrides=None):
  """``steps`` jitted train steps of ``method`` with a small MLP; returns per-step metrics and
  the optimizer states after each step. Compiled steps are cached by shape: datasets with the
  same shapes (the two colored ones) share one compilation."""
  overrides = overrides or {}
  train_envs = [e for i, e in enumerate(envs) if i != test_env]
  key = (
    method,
    len(train_envs),
    num_classes,
    train_envs[0].x.shape[1:],
    batch_size,
    tuple(sorted(overrides.items())),
  )
  hp = methods.resolve_hparams(method, 0, {"batch_size": batch_size, **overrides})
  # ARM adapts a convolutional featurizer's input (DomainBed's ARM is for images)
  model = (
    mnist_cnn(num_classes, conv_impl="xla") if method in CONV_ONLY else mlp(num_classes, (16,))
  )
  ms = methods.get_method(method).build(
    methods.Context(model, hp, len(train_envs), per_domain_impl="vmap")
  )
  data = train_lib.make_train_data([(e.x, e.y) for e in train_envs])
  if key not in _STEPS:
    x0 = jnp.zeros((1,) + train_envs[0].x.shape[1:], train_envs[0].x.dtype)

    def initial_state():
      params = model.init(jax.random.key(0), x0)["params"]
      return train_lib.init_state(ms, params, 1)

    init = jax.jit(initial_state).lower().compile(FAST_COMPILE)
    step = train_lib.make_train_step(ms, batch_size).lower(init(), data).compile(FAST_COMPILE)
    _STEPS[key] = init, step
  init, step = _STEPS[key]
  state = init()
  history, opt_states = [], []
  for _ in range(steps):
    state, metrics = step(state, data)
    history.append(jax.device_get(metrics))
    opt_states.append(jax.device_get(state.opt_state))
  return history, opt_states, state


def adam_count(opt_state, method):
  del method
  ((_, count),) = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
  return int(count)


def check_finite(history, method, dataset, num_domains):
  for i, m in enumerate(history):
    for key, value in m.items():
      assert np.all(np.isfinite(value)), (method, dataset, i, key, value)
    assert np.shape(m["env_losses"]) == (num_domains,)
    assert np.ndim(m["loss"]) == 0


@pytest.fixture(scope="module")
def real_data_dir(request):
  try:
    return request.getfixturevalue("data_dir")
  except pytest.skip.Exception:
    return None


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_runs_20_jitted_steps_on_every_dataset(method, real_data_dir):
  overrides = {ANNEAL[method][0]: SWITCH} if method in ANNEAL else {}
  # Spirals (synthetic, always run): also checks the anneal switch and the Adam reset.
  envs = small_envs("Spirals", None)
  if method not in CONV_ONLY:
    history, opt_states, _ = run_steps(method, envs, len(envs) - 1, 1, overrides=overrides)
    check_finite(history, method, "Spirals", len(envs) - 1)
  if method in ANNEAL:
    key, before, weight = ANNEAL[method]
    w = [float(m["penalty_weight"]) for m in history]
    after = methods.default_hparams(method)[weight]
    assert w == [before] * SWITCH + [after] * (20 - SWITCH), w  # switches at exactly step 5
    counts = [adam_count(s, method) for s in opt_states]
    # Adam is re-created at step 5 and then takes that step: its count restarts at 1
    assert counts == list(range(1, SWITCH + 1)) + list(range(1, 20 - SWITCH + 1)), counts
  if real_data_dir is None:
    pytest.skip("MNIST variants need $DGJAX_DATA_DIR (Spirals ran)")
  # ColoredMNIST and ColoredFashionMNIST share shapes: one compiled step serves both.
  for name, classes, test_env in (
    ("ColoredMNIST", 2, 2),
    ("ColoredFashionMNIST", 2, 2),
    ("RotatedMNIST", 10, 0),
  ):
    envs = small_envs(name, real_data_dir)
    history, _, _ = run_steps(method, envs, test_env, classes, overrides=overrides)
    check_finite(history, method, name, len(envs) - 1)


def test_group_dro_upweights_the_worst_domain():
  envs = spirals(num_train_envs=2, examples_per_env=64, num_test=8, n_dims=2, seed=1)
  # make domain 1 hard: random labels
  noisy = envs[1]._replace(y=np.random.default_rng(0).integers(0, 2, 64).astype(np.int32))
  history, opt_states, _ = run_steps(
    "groupdro", [envs[0], noisy, envs[2]], 2, 1, overrides={"groupdro_eta": 1.0, "lr": 1e-2}
  )
  q = history[-1]["groupdro_q"]
  assert q[1] > q[0] and abs(q.sum() - 1) < 1e-5


def test_baselines_take_traced_hparams_in_vmapped_sweeps():
  """``train_many`` vmaps runs that differ in float hparams: every baseline's hparams may be
  traced values (no Python control flow on them)."""
  # one method per way an hparam enters the step (irm / coral / mmd / iga weights enter
  # dgjax.core.penalized exactly as vrex's does)
  vary = {
    "vrex": ("vrex_penalty_anneal_iters", 2, 3),
    "groupdro": ("groupdro_eta", 0.01, 0.1),
    "mixup": ("mixup_alpha", 0.2, 2.0),
    "fish": ("meta_lr", 0.1, 0.5),
    "fishr": ("ema", 0.9, 0.95),
  }
  envs = spirals(num_train_envs=2, examples_per_env=16, num_test=8, n_dims=2, seed=0)
  ins = [train_lib.Split(f"env{i}_in", e.x, e.y) for i, e in enumerate(envs)]
  for method, (name, a, b) in vary.items():
    extra = {"penalty_anneal_iters": 2} if method == "fishr" else {}
    cfgs = [
      train_lib.TrainConfig(
        method=method,
        test_envs=(2,),
        steps=3,
        checkpoint_freq=100,
        seed=s,
        hparams={"batch_size": 4, name: v, **extra},
        progress=False,
        runs_impl="vmap",  # what these check: the runs vmapped
      )
      for s, v in ((0, a), (1, b))
    ]
    runs = train_lib.train_many(
      cfgs, train_lib.DomainBedTask(mlp(1, (4,)), ins, ins, (2,)), checkpoint=False
    )
    assert [r[-1]["hparams"][name] for r in runs] == [a, b]
    assert all(np.isfinite(r[-1]["loss"]) for r in runs), method


# ------------------------------------------------------------------------------ backbones
#: Methods run on each tiny backbone in CI (every registered method runs on both with
#: DGJAX_BACKBONE_METHODS=all): ARM (its context channel enters the backbone's first layer:
#: the ViT's patch embedding, the WRN's conv1), CORAL (per-domain forwards: the WRN's two
#: BatchNorm momenta folded over domains), Fish (an inner loop on the model's parameters) on
#: the ViT with vit_attn_tune.
BACKBONE_METHODS = {"dinov2_vitb14": ("arm", "fish"), "wrn16_2": ("coral",)}
if os.environ.get("DGJAX_BACKBONE_METHODS") == "all":
  BACKBONE_METHODS = {b: tuple(sorted(methods.METHODS)) for b in BACKBONE_METHODS}
MODEL_HPARAMS = {("fish", "dinov2_vitb14"): {"vit_attn_tune": True}}


def run_backbone_steps(method, backbone, model_hparams=None, steps=3, batch_size=4, domains=2):
  """``steps`` jitted train steps of ``method`` on a tiny ``backbone`` (tests/test_backbones.py,
  ``model_hparams``: its dropout / attention-tuning hparams) and random images of its input
  size, 3 classes; returns the metrics, the initial params and the final state."""
  from test_backbones import CONTRACT_INPUT, tiny_backbone

  hp = methods.resolve_hparams(method, 0, {"batch_size": batch_size})
  model, params, variables = tiny_backbone(backbone, 3, model_hparams)
  size = CONTRACT_INPUT[backbone]
  rng = np.random.default_rng(0)
  data = train_lib.make_train_data(
    [
      (rng.normal(size=(8, size, size, 3)).astype(np.float32), rng.integers(0, 3, 8))
      for _ in range(domains)
    ]
  )
  ms = methods.get_method(method).build(
    methods.Context(model, hp, domains, per_domain_impl="vmap", variables=variables)
  )
  init = jax.jit(lambda p: train_lib.init_state(ms, p, 1)).lower(params).compile(FAST_COMPILE)
  state = init(params)
  step = train_lib.make_train_step(ms, batch_size).lower(state, data).compile(FAST_COMPILE)
  history = []
  for _ in range(steps):
    state, metrics = step(state, data)
    history.append(jax.device_get(metrics))
  return history, params, state


@pytest.mark.parametrize(
  "method,backbone", [(m, b) for b, ms in BACKBONE_METHODS.items() for m in ms]
)
def test_methods_train_on_the_backbones(method, backbone):
  """The methods' steps take the backbones (a tiny DINOv2 ViT, a tiny Wide-ResNet; the methods
  of :data:`BACKBONE_METHODS`): 3 finite steps that move the parameters; with
  ``vit_attn_tune`` only the attention parameters and the head move."""
  model_hparams = MODEL_HPARAMS.get((method, backbone), {})
  history, params, state = run_backbone_steps(method, backbone, model_hparams)
  check_finite(history, method, backbone, 2)
  moved = jax.tree_util.tree_map_with_path(
    lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(np.asarray(a) != np.asarray(b)))),
    params,
    state.params,
  )
  moved = dict(jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
  if model_hparams.get("vit_attn_tune"):
    for name, m in moved.items():
      assert m == ("attn" in name or "classifier" in name), name
  else:  # (MLDG on 2 domains with its default n_meta_test=2 has no pair: zero gradient)
    assert any(moved.values()) or method == "mldg", method
