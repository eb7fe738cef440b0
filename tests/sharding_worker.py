"""Subprocess side of tests/test_sharding.py (device counts are fixed at JAX start-up).

python tests/sharding_worker.py equal METHOD[,METHOD...]      # 8 CPU devices
python tests/sharding_worker.py process ID PORT OUTDIR        # 2 processes x 2 devices
python tests/sharding_worker.py eval TMPDIR                   # 8 CPU devices
python tests/sharding_worker.py update_bn                     # 8 CPU devices
"""

import contextlib
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
    outs.append(train_lib.Split(f"env{e}_out", x[n // 2 :], y[n // 2 :]))
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
  data = train_lib.make_train_data([(s.x, s.y) for s in ins[:2]])  # 2 training domains
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
    state0 = train_lib.init_state(ms, params, 1)
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
        if name == "arm":
          # ARM's CNN: a sharded convolution sums in another order, and Adam divides a
          # near-zero gradient entry by its own magnitude, so rounding there moves that entry
          # by up to a step's size (~lr per step; 3e-3 bounds 3 steps). A sharding error
          # would move many entries: all but 1 in 10^4 must agree as tightly as the others.
          np.testing.assert_allclose(a, b, rtol=0, atol=3 * hp["lr"], err_msg=f"{name} {label}")
          loose = ~np.isclose(a, b, rtol=2e-4, atol=2e-5)
          assert loose.mean() < 1e-4, f"{name} {label}: {loose.sum()} of {loose.size} differ"
        else:
          np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"{name} {label}")
      np.testing.assert_allclose(
        finals["single"][1], finals[label][1], rtol=1e-5, err_msg=f"{name} {label}"
      )
      worst[f"{name} {label}"] = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(finals["single"][0]), jax.tree.leaves(finals[label][0]))
      )
  print(json.dumps(worst))


def process(pid, port, outdir):
  """One of 2 processes of a jax.distributed run on loopback; a 1x4 global mesh."""
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
  )
  from dgjax import sharding
  from dgjax import train as train_lib
  from dgjax.models import mlp

  assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
  ins, outs = toy_splits()
  mesh = sharding.make_mesh((1, 4))
  cfg = train_lib.TrainConfig(
    method="sand", steps=6, checkpoint_freq=3, hparams={"batch_size": 8}, progress=False
  )
  records = train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=outdir, mesh=mesh)
  # evaluation over the 2-process mesh (each process feeds its half of every chunk) equals
  # this process's single-device evaluation: DomainBedTask and ImageTask
  model = mlp(2, (8,))
  task = train_lib.DomainBedTask(model, ins, outs, test_envs=[0], eval_batch_size=10)
  state = (task.init_params(jax.random.key(3)), ())
  predict = lambda ms, x: model.apply({"params": ms[0]}, x)
  assert task.evaluate(state, 0, predict, mesh=mesh) == task.evaluate(state, 0, predict)
  np.testing.assert_allclose(
    task.val_loss(state, predict, mesh=mesh), task.val_loss(state, predict), rtol=1e-6
  )
  image_dir = Path(outdir).parent / f"images{pid}"
  image_dir.mkdir(parents=True, exist_ok=True)
  itask, istate, ipredict = _tiny_image_task(image_dir)
  assert itask.evaluate(istate, 0, ipredict, mesh=mesh) == itask.evaluate(istate, 0, ipredict)
  print(json.dumps({"pid": pid, "final_loss": records[-1]["loss"]}))


def _tiny_conv_net():
  import flax.linen as nn

  class TinyConvNet(nn.Module):
    """A strided conv, ReLU, global mean, linear: a cheap stand-in for the ResNet."""

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
      return nn.Dense(2)(x.mean(axis=(-3, -2)))

  return TinyConvNet()


def _tiny_image_task(tmpdir):
  """``(task, model_state, predict)``: an ImageTask on two splits of 13 and 7 synthetic JPEGs,
  eval_batch_size 6, a tiny conv net (the evaluation does not depend on the network; a
  ResNet-18 would compile for 10 s and more)."""
  from PIL import Image
  from dgjax import image_task
  from dgjax.data import image_folder

  rng = np.random.default_rng(2)
  paths, labels = [], []
  for i in range(20):
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    img[..., i % 3] = 40 * (i % 2)
    path = Path(tmpdir) / f"{i}.jpg"
    Image.fromarray(img).save(path, quality=85)
    paths.append(str(path))
    labels.append(i % 2)
  paths, labels = np.array(paths), np.array(labels, np.int32)
  a = image_folder.FileSplit("env0_in", paths[:13], labels[:13])
  b = image_folder.FileSplit("env1_in", paths[13:], labels[13:])
  model = _tiny_conv_net()
  task = image_task.ImageTask(
    model,
    None,
    [a, b],
    [b, a],
    test_envs=[1],
    batch_size=2,
    seed=0,
    augment=False,
    eval_batch_size=6,
    num_workers=0,
    image_size=32,
  )
  state = (task.init_params(jax.random.key(0)), ())
  predict = lambda ms, x: model.apply({"params": ms[0], **task.variables}, x)
  return task, state, predict


@contextlib.contextmanager
def _spy_put_eval_batch():
  """Within the block, :func:`dgjax.sharding.put_eval_batch` records each device batch it
  makes in the yielded list."""
  from dgjax import sharding

  put, seen = sharding.put_eval_batch, []

  def spy(local, mesh, size):
    out = put(local, mesh, size)
    seen.extend(jax.tree.leaves(out))
    return out

  sharding.put_eval_batch = spy
  try:
    yield seen
  finally:
    sharding.put_eval_batch = put


def _assert_split_over(arrays, mesh):
  """Every array is split along its first axis over all of ``mesh``'s devices."""
  from dgjax import sharding

  n = mesh.devices.size
  assert arrays
  for a in arrays:
    assert a.sharding.is_equivalent_to(sharding.eval_batch_sharding(mesh), a.ndim), a.sharding
    assert len(a.addressable_shards) == n and a.shape[0] % n == 0
    assert {s.data.shape[0] for s in a.addressable_shards} == {a.shape[0] // n}
    assert {s.device for s in a.addressable_shards} == set(mesh.devices.flat)


def eval_equal(tmpdir):
  """Sharded evaluation equals single-device evaluation: DomainBedTask.evaluate and val_loss
  over a 2x4 mesh and a 1x3 mesh (eval_batch_size 50 rounded up to 51), ImageTask.evaluate
  (a tiny conv net on a few JPEGs) over a 2x2 mesh of 4 devices (eval_batch_size 6 -> 8), both
  against an unchunked reference; the device batches really are split over the mesh."""
  import jax.numpy as jnp
  from dgjax import image_task, sharding, tasks
  from dgjax.data import image_pipeline
  from dgjax.models import mlp

  assert len(jax.devices()) == 8, jax.devices()
  out = {}
  # --- DomainBedTask: split sizes giving full chunks and padded tails
  rng = np.random.default_rng(1)
  ins, outs = [], []
  for e, (n_in, n_out) in enumerate([(37, 150), (301, 5), (64, 1)]):
    x = rng.normal(size=(n_in + n_out, 4, 4, 2)).astype(np.float32)
    y = rng.integers(0, 3, n_in + n_out).astype(np.int32)
    ins.append(tasks.Split(f"env{e}_in", x[:n_in], y[:n_in]))
    outs.append(tasks.Split(f"env{e}_out", x[n_in:], y[n_in:]))
  model = mlp(3, (8,))
  task = tasks.DomainBedTask(model, ins, outs, test_envs=[2], eval_batch_size=50)
  state = (task.init_params(jax.random.key(0)), ())
  predict = lambda ms, x: model.apply({"params": ms[0]}, x)
  single, single_loss = task.evaluate(state, 0, predict), task.val_loss(state, predict)
  for e in range(3):  # reference: one unchunked forward pass per split, numpy argmax / CE
    for split, key in ((ins[e], f"env{e}_in_acc"), (outs[e], f"env{e}_out_acc")):
      logits = np.asarray(predict(state, jnp.asarray(split.x)), np.float64)
      assert single[key] == np.mean(np.argmax(logits, -1) == split.y), key
  ref_losses = []
  for e in task.train_envs:
    logits = np.asarray(predict(state, jnp.asarray(outs[e].x)), np.float64)
    logp = (
      logits
      - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
      - logits.max(-1, keepdims=True)
    )
    ref_losses.append(-np.mean(logp[np.arange(len(outs[e].y)), outs[e].y]))
  np.testing.assert_allclose(single_loss, np.mean(ref_losses), rtol=1e-5)
  meshes = {
    "2x4": sharding.make_mesh((2, 4)),
    "1x3": sharding.make_mesh((1, 3), devices=jax.devices()[:3]),
  }
  for label, mesh in meshes.items():
    with _spy_put_eval_batch() as seen:
      sharded = task.evaluate(state, 0, predict, mesh=mesh)
      sharded_loss = task.val_loss(state, predict, mesh=mesh)
    assert sharded == single, (label, sharded, single)  # counts: exact
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-6, err_msg=label)
    _assert_split_over(seen, mesh)
    # chunks: one size for every split (tails padded to it), a multiple of the devices
    size = task._chunk_size(mesh)
    assert {a.shape[0] for a in seen} == {size} and size % mesh.devices.size == 0, (label, size)
    assert 25 <= size <= sharding.round_up_to_devices(50, mesh), (label, size)
    # the jitted chunk function compiles with the batch split over the mesh
    correct = task._accuracy_fn(predict, mesh).correct
    args = (
      sharding.on_mesh(state, mesh),
      np.zeros((size, 4, 4, 2), np.float32),
      np.zeros(size, np.int32),
      np.ones(size, bool),
    )
    in_shardings = correct.lower(*args).compile().input_shardings[0]
    for s, a in zip(in_shardings[-3:], args[1:]):
      assert s.is_equivalent_to(sharding.eval_batch_sharding(mesh), a.ndim), s
    out[f"domainbed {label}"] = {"acc": sharded, "val_loss": [sharded_loss, single_loss]}

  # --- the engine passes its mesh to task.evaluate: a sharded run's records, sharded batches
  from dgjax import train as train_lib

  tins, touts = toy_splits()
  cfg = train_lib.TrainConfig(
    method="erm", steps=2, checkpoint_freq=1, hparams={"batch_size": 8}, progress=False
  )
  single_run = train_lib.train(cfg, mlp(2, (8,)), tins, touts, checkpoint=False)
  with _spy_put_eval_batch() as seen:
    sharded_run = train_lib.train(
      cfg, mlp(2, (8,)), tins, touts, checkpoint=False, mesh=meshes["2x4"]
    )
  _assert_split_over(seen, meshes["2x4"])
  keys = [f"env{e}_{s}_acc" for e in range(3) for s in ("in", "out")]
  assert [[r[k] for k in keys] for r in sharded_run] == [[r[k] for k in keys] for r in single_run]
  # SWAD's validation losses and averaged-model evaluations run on the mesh too
  import dataclasses

  swad_cfg = dataclasses.replace(cfg, steps=4, swad=True, swad_n_converge=1, swad_n_tolerance=1)
  single_swad = train_lib.train(swad_cfg, mlp(2, (8,)), tins, touts, checkpoint=False)
  with _spy_put_eval_batch() as seen:
    sharded_swad = train_lib.train(
      swad_cfg, mlp(2, (8,)), tins, touts, checkpoint=False, mesh=meshes["2x4"]
    )
  _assert_split_over(seen, meshes["2x4"])
  assert any("swad_val_loss" in r for r in single_swad)
  for r1, r8 in zip(single_swad, sharded_swad):
    assert sorted(r1) == sorted(r8)
    for k, v in r1.items():
      if k.startswith("swad_") and k.endswith("_acc"):
        assert r8[k] == v, k
      elif k in ("val_loss", "swad_val_loss"):
        np.testing.assert_allclose(r8[k], v, rtol=1e-5, err_msg=k)

  # --- ImageTask: 13 + 7 JPEGs, a tiny conv net at 32x32
  itask, state, predict = _tiny_image_task(tmpdir)
  a, b = itask.splits_in
  single = itask.evaluate(state, 0, predict)
  margins = []
  for split, key in ((a, "env0_in_acc"), (b, "env1_in_acc")):  # reference: all at once
    x = np.stack([image_pipeline.decode_eval(p, 32) for p in split.x])
    logits = np.asarray(
      jax.jit(lambda s, x: predict(s, image_task.augment.eval_preprocess(x)))(state, x)
    )
    margins.append(float(np.min(np.abs(logits[:, 0] - logits[:, 1]))))
    assert single[key] == np.mean(np.argmax(logits, -1) == split.y), key
  mesh = sharding.make_mesh((2, 2), devices=jax.devices()[:4])
  with _spy_put_eval_batch() as seen:
    sharded = itask.evaluate(state, 0, predict, mesh=mesh)
  assert sharded == single, (sharded, single)
  _assert_split_over(seen, mesh)
  assert {a.shape[0] for a in seen} == {8}  # 6 rounded up to 4 devices
  in_shardings = (
    itask._accuracy_fn(predict, mesh)
    .lower(
      sharding.on_mesh(state, mesh),
      np.zeros((8, 32, 32, 3), np.uint8),
      np.zeros(8, np.int32),
      np.ones(8, bool),
    )
    .compile()
    .input_shardings[0]
  )
  for s, ndim in zip(in_shardings[1:], (4, 1, 1)):
    assert s.is_equivalent_to(sharding.eval_batch_sharding(mesh), ndim), s

  # multi-host row logic, simulated: 2 processes of 2 devices each feed their rows; the rows
  # they decode reassemble the single-process batches and masks
  size, local_batches = 8, {}
  real_rows = sharding.process_rows
  try:
    for pid in range(2):
      sharding.process_rows = lambda mesh, size, pid=pid: np.arange(
        pid * size // 2, (pid + 1) * size // 2
      )
      sharding.put_eval_batch, put = (lambda local, mesh, size: local), sharding.put_eval_batch
      try:
        local_batches[pid] = list(itask._process_eval_batches(a, mesh))
      finally:
        sharding.put_eval_batch = put
  finally:
    sharding.process_rows = real_rows
  whole = list(image_pipeline.eval_batches(a, size, size=32, num_workers=0))
  assert len(local_batches[0]) == len(local_batches[1]) == len(whole) == 2
  for i, w in enumerate(whole):
    for k in ("x", "y", "mask"):
      glued = np.concatenate([local_batches[0][i][k], local_batches[1][i][k]])
      if k == "x":  # padding rows may hold any image; real rows must match
        glued, ref = glued[w["mask"]], np.asarray(w[k])[w["mask"]]
      else:
        ref = np.asarray(w[k])
      np.testing.assert_array_equal(glued, ref, err_msg=f"batch {i} {k}")
  out["image"] = {"acc": sharded, "min_logit_margin": min(margins)}
  print(json.dumps(out))


def update_bn_on_mesh():
  """SWAD's ``update_bn`` with the averaged model's variables and the batches on an 8-device
  mesh (as the engine holds them with a mesh: statistics replicated, params uncommitted,
  inputs replicated or split over every device) equals torch's cumulative update by hand."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from dgjax import sharding, swad
  from test_swad import TinyResNet, torch_update_bn_reference

  assert len(jax.devices()) == 8, jax.devices()
  rng = np.random.RandomState(0)
  batches = [rng.normal(size=(8, 5, 5, 3)).astype(np.float32) * (i + 1) + i for i in range(3)]
  model = TinyResNet()
  shapes = jax.eval_shape(model.init, jax.random.key(0), batches[0])
  params, stale = (
    jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), shapes[c])
    for c in ("params", "batch_stats")
  )
  want = torch_update_bn_reference(params, batches)
  mesh = sharding.make_mesh((2, 4))
  split = NamedSharding(mesh, P(sharding.AXES))  # the batch over all 8 devices
  out = {}
  for label, put in (
    ("replicated", lambda x: sharding.put_replicated(x, mesh)),
    ("split", lambda x: jax.device_put(x, split)),
  ):
    variables = {
      "params": jax.tree.map(jnp.asarray, params),
      "batch_stats": sharding.put_replicated(stale, mesh),
    }
    inputs = [put(x) for x in batches]
    assert len(inputs[0].sharding.device_set) == 8
    new = swad.update_bn(model, variables, inputs, train=True)
    stats = new["batch_stats"]
    got = {
      "bn": stats["bn"],
      "block/bn1": stats["block"]["bn1"],
      "block/bn2": stats["block"]["bn2"],
    }
    worst = 0.0
    for name in want:
      for stat in ("mean", "var"):
        g = np.asarray(got[name][stat])
        np.testing.assert_allclose(g, want[name][stat], rtol=2e-5, atol=2e-6, err_msg=label)
        worst = max(worst, float(np.max(np.abs(g - want[name][stat]))))
    out[label] = worst
  print(json.dumps(out))


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "equal":
    jax.config.update("jax_num_cpu_devices", 8)
    equal(sys.argv[2])
  elif mode == "process":
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif mode == "eval":
    jax.config.update("jax_num_cpu_devices", 8)
    eval_equal(sys.argv[2])
  elif mode == "update_bn":
    jax.config.update("jax_num_cpu_devices", 8)
    update_bn_on_mesh()
