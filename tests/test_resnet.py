"""ResNet-18/50 (dgjax.resnet) and the weights converter against a float64 numpy reference of
torchvision's ResNet fed by a random torchvision-layout state dict."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from safetensors.numpy import save_file

from dgjax import convert_weights, resnet
from experiments import convert_weights as convert_cli

EPS = 1e-5
STAGES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


# --------------------------------------------------------------------------- torch-layout weights
def random_state_dict(arch, num_classes, seed=0):
  """torchvision key names and layouts ([O, I, kh, kw] convs, [out, in] fc), random values."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, o, i, k):
    sd[name + ".weight"] = rng.normal(0, np.sqrt(2.0 / (i * k * k)), (o, i, k, k)).astype(
      np.float32
    )

  def bn(name, c, gain=1.0):
    sd[name + ".weight"] = (gain * rng.uniform(0.5, 1.5, c)).astype(np.float32)
    sd[name + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[name + ".running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
    sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[name + ".num_batches_tracked"] = np.array(7, np.int64)

  block, stages = STAGES[arch]
  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for s, n in enumerate(stages):
    planes = 64 * 2**s
    for i in range(n):
      stride = 2 if (s > 0 and i == 0) else 1
      p = f"layer{s + 1}.{i}"
      if block == "basic":
        conv(p + ".conv1", planes, inplanes, 3)
        bn(p + ".bn1", planes)
        conv(p + ".conv2", planes, planes, 3)
        bn(p + ".bn2", planes, 0.3)
        out = planes
      else:
        conv(p + ".conv1", planes, inplanes, 1)
        bn(p + ".bn1", planes)
        conv(p + ".conv2", planes, planes, 3)
        bn(p + ".bn2", planes)
        conv(p + ".conv3", planes * 4, planes, 1)
        bn(p + ".bn3", planes * 4, 0.3)
        out = planes * 4
      if stride != 1 or inplanes != out:
        conv(p + ".downsample.0", out, inplanes, 1)
        bn(p + ".downsample.1", out)
      inplanes = out
  bound = 1 / np.sqrt(inplanes)
  sd["fc.weight"] = rng.uniform(-bound, bound, (num_classes, inplanes)).astype(np.float32)
  sd["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
  return sd


# --------------------------------------------------------------------------- numpy reference
def np_conv(x, w, stride, pad):
  """NHWC float64 conv with a torch [O, I, kh, kw] kernel, by explicit im2col + matmul."""
  n, h, wd, c = x.shape
  o, i, kh, kw = w.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
  cols = np.concatenate(
    [
      xp[:, a : a + stride * ho : stride, b : b + stride * wo : stride, :]
      for a in range(kh)
      for b in range(kw)
    ],
    axis=-1,
  )
  kernel = w.astype(np.float64).transpose(2, 3, 1, 0).reshape(kh * kw * i, o)
  return (cols.reshape(-1, kh * kw * c) @ kernel).reshape(n, ho, wo, o)


def np_bn(x, sd, name, batch_stats):
  if batch_stats:
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  else:
    mean, var = sd[name + ".running_mean"], sd[name + ".running_var"]
  return (x - mean) / np.sqrt(var + EPS) * sd[name + ".weight"] + sd[name + ".bias"]


def np_maxpool(x):
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  return np.max(
    [xp[:, a : a + 2 * ho : 2, b : b + 2 * wo : 2, :] for a in range(3) for b in range(3)], axis=0
  )


def np_resnet(sd, arch, x, batch_stats=False):
  """torchvision ResNet forward (float64): returns (features, logits)."""
  relu = lambda v: np.maximum(v, 0)  # noqa: E731
  bn = lambda v, name: np_bn(v, sd, name, batch_stats)  # noqa: E731
  block, stages = STAGES[arch]
  x = relu(bn(np_conv(x.astype(np.float64), sd["conv1.weight"], 2, 3), "bn1"))
  x = np_maxpool(x)
  for s, n in enumerate(stages):
    for i in range(n):
      stride = 2 if (s > 0 and i == 0) else 1
      p = f"layer{s + 1}.{i}"
      if block == "basic":
        out = relu(bn(np_conv(x, sd[p + ".conv1.weight"], stride, 1), p + ".bn1"))
        out = bn(np_conv(out, sd[p + ".conv2.weight"], 1, 1), p + ".bn2")
      else:
        out = relu(bn(np_conv(x, sd[p + ".conv1.weight"], 1, 0), p + ".bn1"))
        out = relu(bn(np_conv(out, sd[p + ".conv2.weight"], stride, 1), p + ".bn2"))
        out = bn(np_conv(out, sd[p + ".conv3.weight"], 1, 0), p + ".bn3")
      if p + ".downsample.0.weight" in sd:
        x = bn(np_conv(x, sd[p + ".downsample.0.weight"], stride, 0), p + ".downsample.1")
      x = relu(out + x)
  z = x.mean(axis=(1, 2))
  return z, z @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]


def assert_close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < rtol, f"max error {err:.2e} of max |ref| {np.abs(want).max():.3g}"


def japply(model):
  """``model.apply`` jitted (one compile instead of op-by-op dispatch)."""
  return jax.jit(model.apply, static_argnames=("train", "method", "mutable"))


def tiny(num_classes, **kw):
  """A 1-block-per-stage ResNet (same code paths, much cheaper to compile)."""
  return resnet.ResNetClassifier(
    featurizer=resnet.ResNet(stage_sizes=(1, 1, 1, 1), block="basic", name="featurizer", **kw),
    num_classes=num_classes,
  )


def tiny_variables(num_classes, seed=0):
  """Variables of :func:`tiny` from a random ResNet-18 state dict (its ``layer*.0`` blocks),
  without compiling an init."""
  sd = random_state_dict("resnet18", num_classes, seed)
  sd = {k: v for k, v in sd.items() if not (k.startswith("layer") and k.split(".")[1] == "1")}
  return jax.tree.map(jnp.asarray, convert_weights.torch_to_flax(sd, include_head=True))


def converted_model(tmp_path, arch, num_classes, sd, **kw):
  src = tmp_path / "weights.safetensors"
  save_file(sd, str(src))
  out = tmp_path / f"{arch}.msgpack"
  convert_weights.convert_file(arch, src, out, include_head=True)
  payload = convert_weights.read_weights(out)
  model = resnet.resnet_classifier(arch, num_classes, **kw)
  return model, {"params": payload["params"], "batch_stats": payload["batch_stats"]}


# --------------------------------------------------------------------------- tests
def test_parameter_counts_are_torchvision_without_fc():
  for arch, expected in (("resnet18", 11_176_512), ("resnet50", 23_508_032)):
    model = resnet.resnet_classifier(arch, 10)
    shapes = jax.eval_shape(lambda m=model: resnet.init_variables(m, jax.random.key(0), 32))
    n_feat = sum(np.prod(v.shape) for v in jax.tree.leaves(shapes["params"]["featurizer"]))
    n_head = sum(np.prod(v.shape) for v in jax.tree.leaves(shapes["params"]["classifier"]))
    assert (n_feat, n_head) == (expected, ARCH_WIDTH[arch] * 10 + 10)
    assert set(shapes["params"]) == {"featurizer", "classifier"}
    assert set(shapes["batch_stats"]) == {"featurizer"}


ARCH_WIDTH = {"resnet18": 512, "resnet50": 2048}


def test_resnet18_conversion_matches_numpy_reference(tmp_path):
  sd = random_state_dict("resnet18", 5, seed=1)
  model, variables = converted_model(tmp_path, "resnet18", 5, sd)
  x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  want_z, want_logits = np_resnet(sd, "resnet18", x)
  z = japply(model)(variables, x, method="features")
  logits = japply(model)(variables, x)
  assert_close(z, want_z, 1e-5)
  assert_close(logits, want_logits, 1e-5)
  # head-level access with the classifier params only (what head-level methods use)
  head = japply(model)(
    {"params": {"classifier": variables["params"]["classifier"]}}, z, method="head"
  )
  assert_close(head, want_logits, 1e-5)


def test_resnet50_conversion_matches_numpy_reference_at_224(tmp_path):
  sd = random_state_dict("resnet50", 7, seed=2)
  model, variables = converted_model(tmp_path, "resnet50", 7, sd)
  x = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
  want_z, want_logits = np_resnet(sd, "resnet50", x)
  z, logits = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: (m.features(x), m(x))))(
    variables, x
  )
  assert_close(z, want_z, 1e-5)
  assert_close(logits, want_logits, 1e-5)


def test_unfrozen_bn_uses_batch_statistics_and_updates_running_stats_as_torch(tmp_path):
  sd = random_state_dict("resnet18", 3, seed=3)
  model, variables = converted_model(tmp_path, "resnet18", 3, sd, freeze_bn=False)
  x = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
  want_z, want_logits = np_resnet(sd, "resnet18", x, batch_stats=True)
  logits, updated = japply(model)(variables, x, train=True, mutable="batch_stats")
  assert_close(logits, want_logits, 1e-4)
  # torch: running <- 0.9 running + 0.1 batch, unbiased variance
  h = np_conv(x.astype(np.float64), sd["conv1.weight"], 2, 3)
  n = h.shape[0] * h.shape[1] * h.shape[2]
  bn1 = updated["batch_stats"]["featurizer"]["bn1"]
  np.testing.assert_allclose(
    bn1["mean"], 0.9 * sd["bn1.running_mean"] + 0.1 * h.mean((0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    bn1["var"],
    0.9 * sd["bn1.running_var"] + 0.1 * h.var((0, 1, 2)) * n / (n - 1),
    rtol=1e-5,
    atol=1e-6,
  )
  # not mutable: same batch-statistics forward, running stats untouched (no error)
  assert_close(japply(model)(variables, x, train=True), want_logits, 1e-4)
  # evaluation uses the running statistics
  assert_close(japply(model)(variables, x), np_resnet(sd, "resnet18", x)[1], 1e-5)


def test_frozen_bn_trains_with_running_statistics_and_never_changes_them(tmp_path):
  sd = random_state_dict("resnet18", 3, seed=4)
  model, variables = converted_model(tmp_path, "resnet18", 3, sd, freeze_bn=True)
  x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  logits, updated = japply(model)(variables, x, train=True, mutable="batch_stats")
  assert_close(logits, np_resnet(sd, "resnet18", x)[1], 1e-5)
  for a, b in zip(
    jax.tree.leaves(updated["batch_stats"]), jax.tree.leaves(variables["batch_stats"])
  ):
    np.testing.assert_array_equal(a, b)
  # BN affine parameters still get gradients
  small = tiny(3, freeze_bn=True)
  small_vars = tiny_variables(3)
  grads = jax.jit(
    jax.grad(
      lambda p: small.apply(
        {"params": p, "batch_stats": small_vars["batch_stats"]}, x, train=True
      ).sum()
    )
  )(small_vars["params"])
  bn1 = grads["featurizer"]["bn1"]
  assert np.abs(bn1["scale"]).max() > 0 and np.abs(bn1["bias"]).max() > 0


def test_unfrozen_bn_statistics_follow_the_batch_the_forward_sees():
  """Pooled call = statistics of the concatenated batch (ERM); vmap over domains = each
  domain's own statistics (methods DomainBed runs per domain)."""
  model = tiny(4, freeze_bn=False)
  variables = tiny_variables(4)
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(2, 3, 32, 32, 3)) + np.array([0.0, 2.0])[:, None, None, None, None]).astype(
    np.float32
  )
  fwd = jax.jit(lambda xb: model.apply(variables, xb, train=True))
  per_domain = jax.jit(jax.vmap(fwd))(x)
  for d in range(2):
    np.testing.assert_allclose(per_domain[d], fwd(x[d]), rtol=1e-4, atol=1e-5)
  pooled = fwd(x.reshape(6, 32, 32, 3)).reshape(2, 3, 4)
  assert np.abs(np.asarray(pooled) - np.asarray(per_domain)).max() > 1e-3


def test_dropout_on_features_only_in_training():
  model = tiny(2, dropout=0.5)
  variables = tiny_variables(2)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  clean = japply(model)(variables, x, method="features")
  np.testing.assert_array_equal(japply(model)(variables, x, train=False, method="features"), clean)
  dropped = japply(model)(
    variables, x, train=True, method="features", rngs={"dropout": jax.random.key(2)}
  )
  kept = np.asarray(dropped) != 0
  assert 0.4 < kept[np.asarray(clean) != 0].mean() < 0.6
  np.testing.assert_allclose(np.asarray(dropped)[kept], 2 * np.asarray(clean)[kept], rtol=1e-5)


def test_load_pretrained_replaces_featurizer_keeps_head_and_checks_keys(tmp_path):
  sd = random_state_dict("resnet18", 5, seed=6)
  src = tmp_path / "r18.safetensors"
  save_file(sd, str(src))
  out = tmp_path / "r18.msgpack"
  assert convert_cli.main(["--arch", "resnet18", "--input", str(src), "--output", str(out)]) == 0
  model = resnet.resnet18_classifier(9)
  shapes = jax.eval_shape(lambda: resnet.init_variables(model, jax.random.key(0), 32))
  fresh = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)  # no init compile
  loaded = convert_weights.load_pretrained(out, fresh)
  np.testing.assert_array_equal(
    loaded["params"]["featurizer"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    loaded["batch_stats"]["featurizer"]["layer2_0"]["downsample_bn"]["var"],
    sd["layer2.0.downsample.1.running_var"],
  )
  np.testing.assert_array_equal(
    loaded["params"]["classifier"]["kernel"], fresh["params"]["classifier"]["kernel"]
  )
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  assert_close(japply(model)(loaded, x, method="features"), np_resnet(sd, "resnet18", x)[0], 1e-5)
  # a resnet18 file into a resnet50 model: names what is missing / unexpected / mis-shaped
  r50 = jax.eval_shape(
    lambda: resnet.init_variables(resnet.resnet50_classifier(9), jax.random.key(0), 32)
  )
  with pytest.raises(convert_weights.WeightsError) as e:
    convert_weights.load_pretrained(out, r50)
  msg = str(e.value)
  assert str(out) in msg and "missing" in msg and "layer1_0/conv3" in msg
  assert "shape mismatch" in msg
  # unknown torch keys are rejected by name
  bad = dict(sd, **{"layer1.0.se.fc1.weight": np.zeros((4, 4), np.float32)})
  save_file(bad, str(tmp_path / "bad.safetensors"))
  with pytest.raises(convert_weights.WeightsError, match=r"layer1\.0\.se\.fc1\.weight"):
    convert_weights.convert_file("resnet18", tmp_path / "bad.safetensors", tmp_path / "bad.msgpack")
  # a missing torch key is named at conversion
  partial = {k: v for k, v in sd.items() if not k.startswith("layer4.1.bn2")}
  save_file(partial, str(tmp_path / "partial.safetensors"))
  with pytest.raises(convert_weights.WeightsError, match="layer4_1/bn2"):
    convert_weights.convert_file(
      "resnet18", tmp_path / "partial.safetensors", tmp_path / "p.msgpack"
    )


def test_missing_weights_message_names_files_urls_and_flag(tmp_path, capsys):
  msg = convert_weights.missing_weights_message("resnet50")
  assert "resnet50-0676ba61.pth" in msg and "https://download.pytorch.org/models/" in msg
  assert "--pretrained=" in msg and "experiments.convert_weights" in msg and "none" in msg
  assert "resnet50.ram_in1k" in convert_weights.missing_weights_message("resnet50_augmix")
  assert "resnet18-f37072fd.pth" in convert_weights.missing_weights_message("resnet18")
  assert convert_cli.main(["--arch", "resnet18", "--where"]) == 0
  assert "resnet18-f37072fd.pth" in capsys.readouterr().out
  with pytest.raises(convert_weights.WeightsError, match="does not exist"):
    convert_weights.load_pretrained(tmp_path / "nope.msgpack", {})
  (tmp_path / "x.pth").write_bytes(b"junk")
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(convert_weights.WeightsError, match=r"dgjax\[convert\]"):
      convert_weights.read_state_dict(tmp_path / "x.pth")


def test_remat_and_bfloat16_options():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  base = tiny(3, freeze_bn=False)
  variables = tiny_variables(3)
  loss = lambda m: (
    lambda p: m.apply(
      {"params": p, "batch_stats": variables["batch_stats"]},  # noqa: E731
      x,
      train=True,
    ).sum()
  )
  g0 = jax.jit(jax.grad(loss(base)))(variables["params"])
  g1 = jax.jit(jax.grad(loss(tiny(3, freeze_bn=False, remat=True))))(variables["params"])
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  bf16 = tiny(3, dtype=jnp.bfloat16)
  y16 = jax.jit(bf16.apply)(variables, x)
  y32 = jax.jit(base.apply)(variables, x)
  assert y16.dtype == jnp.float32
  assert (
    np.abs(np.asarray(y16) - np.asarray(y32)).max() < 0.1 * np.abs(np.asarray(y32)).max() + 1e-2
  )
