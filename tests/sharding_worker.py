"""Subprocess side of tests/test_sharding.py (device counts are fixed at JAX start-up).

    python tests/sharding_worker.py equal METHOD[,METHOD...]      # 8 CPU devices
    python tests/sharding_worker.py process ID PORT OUTDIR        # 2 processes x 2 devices
"""

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def toy_splits(n_envs=3, n=48, shape=(4, 4, 2)):
  from dgjax import train as train_lib
  rng = np.random.default_rng(0)
  ins, outs = [], []
  for e in range(n_envs):
    x = rng.uniform(size=(n,) + shape).astype(np.float32)
    y = (x[:, 0, 0, 0] + 0.1 * e > 0.5).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[: n // 2], y[: n // 2]))
    outs.append(train_lib.Split(f"env{e}_out", x[n // 2:], y[n // 2:]))
  return ins, outs


def equal(method_names):
  """For each method: 3 steps on one device vs sharded over a 2x4 mesh (and, for erm and sand,
  a 1x8 mesh: all devices on the batch axis)."""
  import jax.numpy as jnp
  from dgjax import methods, sharding
  from dgjax import train as train_lib
  from dgjax.models import mlp

  assert len(jax.devices()) == 8, jax.devices()
  ins, outs = toy_splits(n_envs=3)
  data = train_lib.make_train_data([(s.x, s.y) for s in ins[:2]])   # 2 training domains
  model = mlp(2, (8,))
  names = sorted(methods.METHODS) if method_names == "all" else method_names.split(",")
  worst = {}
  from dgjax.models import mnist_cnn
  for name in names:
    # ARM adapts a convolutional featurizer's input: it needs a network that starts with a conv
    model = mnist_cnn(2, conv_impl="xla") if name == "arm" else mlp(2, (8,))
    hp = methods.resolve_hparams(name, 0, {"batch_size": 8})
    ctx = methods.Context(model=model, hparams=hp, num_domains=2, per_domain_impl="vmap")
    ms = methods.get_method(name).build(ctx)
    params = model.init(jax.random.key(0), jnp.asarray(ins[0].x[:1]))["params"]
    state0 = train_lib.TrainState(jnp.zeros((), jnp.int32), params, ms.init(params), jax.random.key(1))
    finals = {}
    meshes = (("2x4", (2, 4)), ("1x8", (1, 8))) if name in ("erm", "sand") else (("2x4", (2, 4)),)
    for label, shape in (("single", None),) + meshes:
      mesh = None if shape is None else sharding.make_mesh(shape)
      state = jax.tree.map(jnp.copy, state0)
      d = data
      if mesh is not None:
        state, d = sharding.put_replicated((state, d), mesh)
      step = train_lib.make_train_step(ms, 8, mesh)
      for _ in range(3):
        state, metrics = step(state, d)
      finals[label] = (jax.device_get(sharding.local_copy(state.params)), float(metrics["loss"]))
    for label, _ in meshes:
      for a, b in zip(jax.tree.leaves(finals["single"][0]), jax.tree.leaves(finals[label][0])):
        # ARM's CNN: a sharded convolution sums in another order; Adam turns that rounding on
        # near-zero gradient entries into update differences of up to ~1e-4 after 3 steps.
        atol = 2e-4 if name == "arm" else 2e-5
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=atol, err_msg=f"{name} {label}")
      np.testing.assert_allclose(finals["single"][1], finals[label][1], rtol=1e-5, err_msg=f"{name} {label}")
      worst[f"{name} {label}"] = max(float(np.max(np.abs(a - b))) for a, b in
                                     zip(jax.tree.leaves(finals["single"][0]), jax.tree.leaves(finals[label][0])))
  print(json.dumps(worst))


def process(pid, port, outdir):
  """One of 2 processes of a jax.distributed run on loopback; a 1x4 global mesh."""
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from dgjax import sharding
  from dgjax import train as train_lib
  from dgjax.models import mlp
  assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
  ins, outs = toy_splits()
  mesh = sharding.make_mesh((1, 4))
  cfg = train_lib.TrainConfig(method="sand", steps=6, checkpoint_freq=3, hparams={"batch_size": 8},
                              progress=False)
  records = train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=outdir, mesh=mesh)
  print(json.dumps({"pid": pid, "final_loss": records[-1]["loss"]}))


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "equal":
    jax.config.update("jax_num_cpu_devices", 8)
    equal(sys.argv[2])
  elif mode == "process":
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
