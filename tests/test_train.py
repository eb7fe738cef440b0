"""Method registry, results files, model selection, the jitted train step and the loop."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgjax import methods, results, selection
from dgjax import train as train_lib
from dgjax.models import mlp


# ------------------------------------------------------------------------------ registry
def test_unknown_method_lists_valid_ones():
  with pytest.raises(ValueError) as err:
    methods.get_method("nope")
  assert (
    str(err.value) == f"unknown method 'nope'; valid methods: {', '.join(sorted(methods.METHODS))}"
  )
  assert {"erm", "and", "sand"} <= set(methods.METHODS)


def test_unknown_hparam_lists_valid_ones():
  with pytest.raises(
    ValueError, match=r"unknown hparam\(s\) 'tauu'.*valid hparams: batch_size, k, lr, tau"
  ):
    methods.resolve_hparams("sand", 0, {"tauu": 0.1})


def test_hparams_defaults_overrides_and_random_draws():
  assert methods.resolve_hparams("sand") == {
    "lr": 1e-3,
    "batch_size": 64,
    "weight_decay": 0.0,
    "tau": 0.5,
    "k": 10.0,
  }
  hp = methods.resolve_hparams("and", 0, {"tau": 0.7, "batch_size": 32.0})
  assert hp["tau"] == 0.7 and hp["batch_size"] == 32 and isinstance(hp["batch_size"], int)
  with pytest.raises(ValueError, match="integer"):
    methods.resolve_hparams("erm", 0, {"batch_size": 3.5})
  # DomainBed: hparams_seed != 0 draws with seed_hash(hparams_seed, trial_seed)
  from dgjax.seeding import seed_hash

  assert methods.resolve_hparams("sand", 3, trial_seed=1) == methods.random_hparams(
    "sand", seed_hash(3, 1)
  )
  assert methods.resolve_hparams("sand", 3, trial_seed=1) != methods.resolve_hparams(
    "sand", 3, trial_seed=2
  )
  assert methods.resolve_hparams("sand", 0, trial_seed=5) == methods.default_hparams("sand")
  a, b = methods.random_hparams("sand", 3), methods.random_hparams("sand", 3)
  assert a == b and a != methods.random_hparams("sand", 4)
  for seed in range(1, 20):
    hp = methods.random_hparams("sand", seed)
    assert 10**-4.5 <= hp["lr"] <= 10**-2.5 and 0 <= hp["tau"] <= 1 and 8 <= hp["batch_size"] < 512
    assert 1e-3 <= hp["k"] <= 1e5


# ------------------------------------------------------------------------------ results
def test_append_jsonl_writes_whole_strict_lines_with_the_usual_mode(tmp_path, monkeypatch):
  path = tmp_path / "results.jsonl"
  old_umask = os.umask(0o022)
  try:
    results.append_jsonl(path, {"step": 0, "acc": np.float32(0.5), "v": np.arange(2)})
  finally:
    os.umask(old_umask)
  assert (path.stat().st_mode & 0o777) == 0o644
  results.append_jsonl(path, {"step": 1, "w": float("inf"), "n": np.float32("nan")})
  assert path.read_text().splitlines()[1] == '{"n": null, "step": 1, "w": null}'  # strict JSON
  assert results.read_jsonl(path) == [
    {"acc": 0.5, "step": 0, "v": [0, 1]},
    {"n": None, "step": 1, "w": None},
  ]
  before = path.read_bytes()
  real_write = os.write
  monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
  with pytest.raises(OSError, match="whole record"):  # a short write (full disk) ...
    results.append_jsonl(path, {"step": 2, "long": "x" * 100})
  assert path.read_bytes() == before  # ... leaves no half line


def test_truncate_jsonl_keeps_records_up_to_a_step(tmp_path):
  path = tmp_path / "results.jsonl"
  for step in (0, 10, 20, 30):
    results.append_jsonl(path, {"step": step})
  assert [r["step"] for r in results.truncate_jsonl(path, 20)] == [0, 10, 20]
  assert [r["step"] for r in results.read_jsonl(path)] == [0, 10, 20]
  assert results.truncate_jsonl(path, None) == [] and not path.exists()


def test_read_jsonl_names_bad_line(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"step": 0}\n{"step": 1\n')
  with pytest.raises(ValueError, match=r"r.jsonl:2"):
    results.read_jsonl(path)


# ------------------------------------------------------------------------------ selection
def _rec(step, accs_in, accs_out):
  r = {"step": step}
  for i, (a, b) in enumerate(zip(accs_in, accs_out)):
    r[f"env{i}_in_acc"], r[f"env{i}_out_acc"] = a, b
  return r


def test_selection_methods_on_known_records():
  recs = [
    _rec(0, [0.5, 0.5, 0.5], [0.5, 0.5, 0.9]),
    _rec(100, [0.9, 0.8, 0.2], [0.9, 0.9, 0.1]),  # best train-domain validation
    _rec(200, [0.8, 0.7, 0.4], [0.8, 0.8, 0.5]),
  ]  # last: the oracle's single query
  assert selection.training_domain_validation(recs, [2])["step"] == 100
  assert selection.oracle(recs, [2])["step"] == 200
  assert selection.test_accuracy(recs[1], [2]) == 0.2
  # with env 0 as test env, validation uses envs 1 and 2 out-splits: step 0 (0.7) vs 100 (0.5)
  assert selection.training_domain_validation(recs, [0])["step"] == 0
  table = selection.format_selection_table(recs, [2], ["+90%", "+80%", "-90%"])
  assert "training-domain validation" in table and "-90%*" in table
  assert table.splitlines()[2].split()[-1] == "20.0"


# ------------------------------------------------------------------------------ train step
def toy_splits(n_envs=3, n=64, shape=(4, 4, 2), seed=0):
  rng = np.random.default_rng(seed)
  ins, outs = [], []
  for e in range(n_envs):
    x = rng.uniform(size=(n,) + shape).astype(np.float32)
    y = (x[:, 0, 0, 0] > 0.5).astype(np.int32)
    ins.append(train_lib.Split(f"env{e}_in", x[: n // 2], y[: n // 2]))
    outs.append(train_lib.Split(f"env{e}_out", x[n // 2 :], y[n // 2 :]))
  return ins, outs


def test_sample_batch_draws_from_each_environment():
  data = train_lib.make_train_data(
    [(np.full((5, 1), 1.0), np.zeros(5, np.int32)), (np.full((9, 1), 2.0), np.ones(9, np.int32))]
  )
  batch = train_lib.sample_batch(jax.random.key(0), data, 7)
  chex.assert_shape(batch["x"], (2, 7, 1))
  np.testing.assert_array_equal(batch["x"][0], 1.0)
  np.testing.assert_array_equal(batch["x"][1], 2.0)
  np.testing.assert_array_equal(batch["y"], [[0] * 7, [1] * 7])


@pytest.mark.parametrize("method", ["erm", "and", "sand"])
def test_train_is_deterministic_and_writes_results(method, tmp_path):
  ins, outs = toy_splits()
  cfg = train_lib.TrainConfig(
    method=method, steps=6, checkpoint_freq=3, hparams={"batch_size": 8}, progress=False
  )
  r1 = train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path / "a", args={"x": 1})
  r2 = train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path / "b")
  assert [r["step"] for r in r1] == [0, 3, 5]
  for a, b in zip(r1, r2):
    for key in ("loss", "env0_in_acc", "env2_out_acc"):
      assert a[key] == b[key]
  on_disk = results.read_jsonl(tmp_path / "a" / "results.jsonl")
  assert len(on_disk) == 3
  for key in ("step", "loss", "step_time", "hparams", "args", "env0_in_acc", "env2_out_acc"):
    assert key in on_disk[-1]
  assert on_disk[0]["args"] == {"x": 1} and on_disk[0]["hparams"]["batch_size"] == 8
  if method != "erm":
    assert 0.0 <= on_disk[-1]["kept_fraction"] <= 1.0


def test_per_domain_impls_train_identically():
  ins, outs = toy_splits()
  runs = {}
  for impl in ("vmap", "unrolled"):
    cfg = train_lib.TrainConfig(
      method="sand",
      steps=4,
      checkpoint_freq=100,
      hparams={"batch_size": 8},
      per_domain_impl=impl,
      progress=False,
    )
    runs[impl] = train_lib.train(cfg, mlp(2, (8,)), ins, outs)[-1]
  np.testing.assert_allclose(runs["vmap"]["loss"], runs["unrolled"]["loss"], rtol=1e-5)


def test_nan_loss_raises_with_step_and_keeps_results(tmp_path):
  ins, outs = toy_splits()
  cfg = train_lib.TrainConfig(
    method="erm", steps=50, checkpoint_freq=1, hparams={"lr": 1e38, "batch_size": 8}, progress=False
  )
  with pytest.raises(
    train_lib.NonFiniteLossError, match=r"loss became (nan|inf) at step \d+"
  ) as err:
    train_lib.train(cfg, mlp(2, (8,)), ins, outs, output_dir=tmp_path)
  assert str(tmp_path / "results.jsonl") in str(err.value)
  kept = results.read_jsonl(tmp_path / "results.jsonl")
  assert len(kept) >= 1 and all(np.isfinite(r["loss"]) for r in kept)


def test_bad_test_env():
  ins, outs = toy_splits()
  with pytest.raises(ValueError, match="out of range"):
    train_lib.train(
      train_lib.TrainConfig(test_envs=(3,), steps=1, progress=False), mlp(2, (4,)), ins, outs
    )
