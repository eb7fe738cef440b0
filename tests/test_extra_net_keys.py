"""Methods' own networks are drawn from the run's key: two trials (seeds) of ADRMX, CAD, URM
(and DANN) start them from different weights, the same seed from the same ones, whatever the model's
initial parameters; and the engine's vmapped init passes each run the key of its seed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import core, methods
from dgjax import train as train_lib
from dgjax.models import mlp

#: method -> (hparam overrides, the source state's fields holding its own networks (ExtraNet))
EXTRA_NETS = {
  "adrmx": (
    {"mlp_width": 4, "mlp_depth": 3, "domain_featurizer_init": "independent"},
    ("generator", "discriminator"),
  ),
  "cad": ({"is_project": True}, ("projection",)),
  "dann": ({"mlp_width": 4}, ("discriminator",)),
  "urm": ({}, ("discriminator",)),
}


def _extra_params(method):
  """``draw(seed, params_seed)``: the method's own networks' initial params as the engine
  draws them for a run of ``seed`` (key :func:`dgjax.train.method_key`) on a model initialised
  from ``params_seed``."""
  overrides, fields = EXTRA_NETS[method]
  model = mlp(2, hidden=(8,))
  ctx = core.Context(model, methods.resolve_hparams(method, overrides=overrides), 3)
  init = jax.jit(methods.get_method(method).build(ctx).init)

  def draw(seed, params_seed=0):
    params = model.init(jax.random.key(params_seed), jnp.zeros((1, 6)))["params"]
    source = init(params, train_lib.method_key(jax.random.key(seed))).source
    return {f: getattr(source, f).params for f in fields}

  return draw


def _drawn_leaves_differ(a, b):
  """Every randomly drawn leaf (not a constant such as a norm's scale) differs between the
  trees; there is at least one."""
  pairs = [
    (x, y)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    if np.unique(np.asarray(x)).size > 1
  ]
  return bool(pairs) and all(not np.allclose(x, y) for x, y in pairs)


@pytest.mark.parametrize("method", sorted(EXTRA_NETS))
def test_trials_of_different_seeds_start_the_extra_networks_from_different_weights(method):
  draw = _extra_params(method)
  first, second = draw(seed=0), draw(seed=1)
  again = draw(seed=0, params_seed=5)  # same seed, another model init
  for field in first:
    assert _drawn_leaves_differ(first[field], second[field]), (method, field)
    jax.tree.map(np.testing.assert_array_equal, first[field], again[field])


@pytest.mark.parametrize("runs_impl", ["vmap", "unrolled"])
def test_the_engines_init_of_two_runs_gives_each_run_its_seeds_method_key(monkeypatch, runs_impl):
  """train_many's init (two runs in one program, vmapped or looped) passes each run's method
  ``method_key(key(seed))`` (the key the draws above use, and
  :func:`dgjax.train.init_state`'s)."""
  seen = []
  real_build = core.build_step

  def spy_build(method, ctx):
    step = real_build(method, ctx)

    def init(params, key):
      # vmapped: one callback, called per run in order; looped: one per run, ordered so
      # that they run in the program's order
      jax.debug.callback(
        lambda k: seen.append(np.asarray(k)),
        jax.random.key_data(key),
        ordered=runs_impl == "unrolled",
      )
      return step.init(params, key)

    return step._replace(init=init)

  monkeypatch.setattr(core, "build_step", spy_build)
  rng = np.random.RandomState(0)
  ins = [
    train_lib.Split(
      f"env{e}", rng.randn(8, 6).astype(np.float32), rng.randint(0, 2, 8).astype(np.int32)
    )
    for e in range(3)
  ]
  cfgs = [
    train_lib.TrainConfig(
      method="erm",
      test_envs=(2,),
      steps=1,
      checkpoint_freq=1,
      seed=s,
      hparams={"batch_size": 4},
      runs_impl=runs_impl,
      progress=False,
    )
    for s in (4, 9)
  ]
  train_lib.train_many(
    cfgs, train_lib.DomainBedTask(mlp(2, hidden=(8,)), ins, ins, (2,)), checkpoint=False
  )
  want = [np.asarray(jax.random.key_data(train_lib.method_key(jax.random.key(s)))) for s in (4, 9)]
  assert len(seen) == 2
  np.testing.assert_array_equal(np.stack(seen), np.stack(want))
