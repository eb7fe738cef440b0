"""DomainBedTask evaluates every split with one compiled program: one chunk size for all
splits (dgjax.tasks.eval_chunk_size), the tails padded to it and masked; the accuracies and
the validation loss are those of one unchunked pass per split."""

import jax
import jax.numpy as jnp
import numpy as np

from dgjax import tasks
from dgjax.models import mlp


def padded_rows(sizes, c):
  total = 0
  for n in sizes:
    chunks = 0
    while chunks * c < n:
      chunks += 1
    total += chunks * c
  return total


def test_chunk_size_pads_least_among_the_allowed_sizes():
  # DomainBed's Colored MNIST on the 10,000-digit subset: in/out splits of each environment
  cmnist = [2668, 2667, 2667, 666, 666, 666]
  assert tasks.eval_chunk_size(cmnist, 1000) == 672
  assert padded_rows(cmnist, 672) == 10080  # 0.8% padding; 1000 + 128-rounded tails: 10608
  for sizes, b in [
    (cmnist, 1000),
    ([18667, 18666, 18667, 4667, 4667, 4666], 1000),
    ([37, 150, 301, 5, 64, 1], 200),
    ([37, 150, 301, 5, 64, 1], 50),
    ([10, 3], 1000),
  ]:
    c = tasks.eval_chunk_size(sizes, b)
    step = 8 if b >= 64 else 1
    top = min(b, max(sizes))
    allowed = [k for k in range(1, b + 1) if k % step == 0 and 2 * k >= min(b, 2 * top)] + [
      min(b, -(-max(sizes) // step) * step)
    ]
    assert c in allowed, (sizes, b, c)
    assert padded_rows(sizes, c) == min(padded_rows(sizes, k) for k in allowed), (sizes, b, c)
  # evaluated in sub-batches (CPU), chunks may go down to the sub-batch: the first 2,000
  # digits' splits pad 2% at 136 where the default floor (500) forces 536, 61%
  small = [534, 533, 533, 133, 134, 133]
  assert tasks.eval_chunk_size(small, 1000) == 536 and padded_rows(small, 536) == 3216
  assert tasks.eval_chunk_size(small, 1000, smallest=64) == 136
  assert padded_rows(small, 136) == 2040
  assert padded_rows(small, 136) == min(padded_rows(small, k) for k in range(64, 1001, 8))
  assert tasks.eval_chunk_size(cmnist, 1000, smallest=64) == 672  # ties: the largest


def random_splits(sizes, seed):
  """In and out splits of 6 random features and 3 classes, ``(n_in, n_out)`` per env."""
  rng = np.random.default_rng(seed)
  ins, outs = [], []
  for e, (n_in, n_out) in enumerate(sizes):
    x = rng.normal(size=(n_in + n_out, 6)).astype(np.float32)
    y = rng.integers(0, 3, n_in + n_out).astype(np.int32)
    ins.append(tasks.Split(f"env{e}_in", x[:n_in], y[:n_in]))
    outs.append(tasks.Split(f"env{e}_out", x[n_in:], y[n_in:]))
  return ins, outs


def test_one_program_evaluates_every_split_and_equals_an_unchunked_pass():
  ins, outs = random_splits([(37, 150), (301, 5), (64, 1)], seed=0)
  model = mlp(3, (8,))
  # 200: the former chunking compiled 200 and 128 (the tails); now one size for all
  task = tasks.DomainBedTask(model, ins, outs, test_envs=[2], eval_batch_size=200)
  state = (task.init_params(jax.random.key(0)), ())
  predict = lambda ms, x: model.apply({"params": ms[0]}, x)  # noqa: E731
  acc = task.evaluate(state, 0, predict)
  loss = task.val_loss(state, predict)
  assert task._accuracy_fn(predict).correct._cache_size() == 1
  assert task._loss[predict, None].loss_sum._cache_size() == 1
  splits = [s for e in range(3) for s in (ins[e], outs[e])]  # one unchunked pass, sliced
  every = np.asarray(predict(state, jnp.asarray(np.concatenate([s.x for s in splits]))))
  ends = np.cumsum([len(s.y) for s in splits])
  logits_of = {
    s.name: every[end - len(s.y) : end].astype(np.float64) for s, end in zip(splits, ends)
  }
  losses = []
  for e in range(3):
    for split, key in ((ins[e], f"env{e}_in_acc"), (outs[e], f"env{e}_out_acc")):
      logits = logits_of[split.name]
      assert acc[key] == np.mean(np.argmax(logits, -1) == split.y), key
      if split is outs[e] and e in task.train_envs:
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        losses.append(-np.mean(logp[np.arange(len(split.y)), split.y]))
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)


def test_per_example_predict_is_evaluated_in_sub_batches_with_the_same_results():
  """On CPU a :func:`tasks.per_example` predict runs in sub-batches of CPU_EVAL_SUB_BATCH
  inside each chunk (lax.map, a partial last sub-batch too): the same accuracies and loss as
  the unmarked predict, which runs whole chunks. The engine marks only the network's own
  prediction, not a method's (ARM and MTL adapt to the evaluated batch)."""
  from dgjax import methods
  from dgjax import train as train_lib

  ins, outs = random_splits([(301, 77), (150, 150), (90, 5)], seed=1)
  model = mlp(3, (8,))
  task = tasks.DomainBedTask(model, ins, outs, test_envs=[2], eval_batch_size=200)
  chunk = task._chunk_size(sub_batched=True)
  assert chunk > tasks.CPU_EVAL_SUB_BATCH and chunk % tasks.CPU_EVAL_SUB_BATCH, chunk
  state = (task.init_params(jax.random.key(0)), ())
  whole = lambda ms, x: model.apply({"params": ms[0]}, x)  # noqa: E731
  marked = tasks.per_example(lambda ms, x: model.apply({"params": ms[0]}, x))
  sub = tasks._cpu_sub_batched(marked)
  assert (sub is not marked) == (jax.default_backend() == "cpu")
  assert tasks._cpu_sub_batched(whole) is whole
  assert tasks._cpu_sub_batched(marked, mesh=object()) is marked  # a sharded chunk: whole
  x = jnp.asarray(ins[0].x[:chunk])
  np.testing.assert_allclose(sub(state, x), whole(state, x), rtol=1e-5, atol=1e-6)
  assert task.evaluate(state, 0, marked) == task.evaluate(state, 0, whole)
  np.testing.assert_allclose(task.val_loss(state, marked), task.val_loss(state, whole), rtol=1e-6)

  # the engine marks the network's prediction (erm) and not a method's own (arm, mtl)
  for name, marked_by_engine in (("erm", True), ("arm", False), ("mtl", False)):
    cfg = train_lib.TrainConfig(method=name, test_envs=(2,), progress=False)
    run = train_lib._make_run([cfg], task, [None], [{}], False, None, True)
    predict = train_lib._predict_fn(run, 0)
    assert getattr(predict, "per_example", False) == marked_by_engine, name
    assert (methods.get_method(name).predict is None) == marked_by_engine
