"""The backbones beyond the ResNets (Wide-ResNet-16-2, DINOv2 ViT-B/14, CLIP ViT-B/16), their
converters and options, against float64 numpy references written here from the reference
code (DomainBed's ``lib/wide_resnet.py`` and ``networks.DinoV2``, facebookresearch/dinov2's
``vision_transformer.py``, openai/CLIP's ``model.py``), fed by random state dicts in the
reference's key names and layouts made here. Tiny sizes (width 16, 16x16 images) run the same
code paths as the real ones; the real ones are checked for their state-dict names and shapes.
With torch installed, torch's own bicubic resize is compared too (skipped otherwise)."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from dgjax import backbones, config as config_lib, convert_weights, core, methods, vit
from dgjax.image_task import make_model
from experiments import convert_weights as convert_cli
from test_resnet import np_conv

TINY = {
  "dinov2_vitb14": {"patch": 4, "width": 16, "depth": 5, "heads": 2, "pos_grid": 3},
  "clip_vitb16": {"patch": 4, "width": 16, "depth": 2, "heads": 2, "output_dim": 8, "grid": 4},
  "wrn16_2": {"depth": 10, "widen_factor": 1},
}
FULL = {
  "dinov2_vitb14": {"patch": 14, "width": 768, "depth": 12, "heads": 12, "pos_grid": 37},
  "clip_vitb16": {
    "patch": 16,
    "width": 768,
    "depth": 12,
    "heads": 12,
    "output_dim": 512,
    "grid": 14,
  },
}
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


# --------------------------------------------------------------------------- state dicts
def random_array(rng, dtype=np.float32):
  def make(shape, scale=1.0, shift=0.0):
    return np.asarray(shift + scale * rng.normal(size=shape), dtype)

  return make


def zeros_like_shapes(shape, scale=1.0, shift=0.0):
  """Shapes only (a full-size state dict without its memory)."""
  return np.broadcast_to(np.float32(0), shape)


def dinov2_state_dict(make, patch, width, depth, heads, pos_grid, channels=3):
  """facebookresearch/dinov2's ``DinoVisionTransformer`` keys (``block_chunks=0``,
  LayerScale, no registers) with ``make(shape, scale, shift)`` values."""
  d = width
  sd = {
    "cls_token": make((1, 1, d)),
    "pos_embed": make((1, 1 + pos_grid**2, d), 0.5),
    "mask_token": make((1, d)),
    "patch_embed.proj.weight": make((d, channels, patch, patch), (channels * patch**2) ** -0.5),
    "patch_embed.proj.bias": make((d,), 0.1),
  }
  for i in range(depth):
    p = f"blocks.{i}."
    sd |= {
      p + "norm1.weight": make((d,), 0.1, 1.0),
      p + "norm1.bias": make((d,), 0.1),
      p + "attn.qkv.weight": make((3 * d, d), d**-0.5),
      p + "attn.qkv.bias": make((3 * d,), 0.1),
      p + "attn.proj.weight": make((d, d), d**-0.5),
      p + "attn.proj.bias": make((d,), 0.1),
      p + "ls1.gamma": make((d,), 0.2, 0.5),
      p + "norm2.weight": make((d,), 0.1, 1.0),
      p + "norm2.bias": make((d,), 0.1),
      p + "mlp.fc1.weight": make((4 * d, d), d**-0.5),
      p + "mlp.fc1.bias": make((4 * d,), 0.1),
      p + "mlp.fc2.weight": make((d, 4 * d), (4 * d) ** -0.5),
      p + "mlp.fc2.bias": make((d,), 0.1),
      p + "ls2.gamma": make((d,), 0.2, 0.5),
    }
  sd |= {"norm.weight": make((d,), 0.1, 1.0), "norm.bias": make((d,), 0.1)}
  return sd


def clip_state_dict(make, patch, width, depth, heads, output_dim, grid):
  """openai/CLIP's ``CLIP`` keys: the image tower (``visual.*``) and some of the text tower's
  (dropped by the converter)."""
  d, v = width, "visual."
  sd = {
    v + "class_embedding": make((d,), d**-0.5),
    v + "positional_embedding": make((1 + grid**2, d), d**-0.5),
    v + "proj": make((d, output_dim), d**-0.5),
    v + "conv1.weight": make((d, 3, patch, patch), (3 * patch**2) ** -0.5),
    v + "ln_pre.weight": make((d,), 0.1, 1.0),
    v + "ln_pre.bias": make((d,), 0.1),
    v + "ln_post.weight": make((d,), 0.1, 1.0),
    v + "ln_post.bias": make((d,), 0.1),
    "logit_scale": make(()),
    "token_embedding.weight": make((11, d)),
    "transformer.resblocks.0.ln_1.weight": make((d,)),  # the text tower's, same names
  }
  for i in range(depth):
    p = f"{v}transformer.resblocks.{i}."
    sd |= {
      p + "attn.in_proj_weight": make((3 * d, d), d**-0.5),
      p + "attn.in_proj_bias": make((3 * d,), 0.1),
      p + "attn.out_proj.weight": make((d, d), d**-0.5),
      p + "attn.out_proj.bias": make((d,), 0.1),
      p + "ln_1.weight": make((d,), 0.1, 1.0),
      p + "ln_1.bias": make((d,), 0.1),
      p + "mlp.c_fc.weight": make((4 * d, d), d**-0.5),
      p + "mlp.c_fc.bias": make((4 * d,), 0.1),
      p + "mlp.c_proj.weight": make((d, 4 * d), (4 * d) ** -0.5),
      p + "mlp.c_proj.bias": make((d,), 0.1),
      p + "ln_2.weight": make((d,), 0.1, 1.0),
      p + "ln_2.bias": make((d,), 0.1),
    }
  return sd


def wrn_state_dict(rng, depth, widen_factor, channels=3):
  """DomainBed's ``Wide_ResNet`` keys, random values and BatchNorm statistics."""
  sd = {}

  def conv(name, o, i, k):
    sd[name + ".weight"] = rng.normal(0, np.sqrt(2.0 / (i * k * k)), (o, i, k, k)).astype(
      np.float32
    )
    sd[name + ".bias"] = rng.normal(0, 0.1, o).astype(np.float32)

  def bn(name, c):
    sd[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[name + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[name + ".running_mean"] = rng.normal(0, 0.2, c).astype(np.float32)
    sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[name + ".num_batches_tracked"] = np.array(3, np.int64)

  widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
  conv("conv1", 16, channels, 3)
  inplanes = 16
  for s in range(3):
    for i in range((depth - 4) // 6):
      p, planes = f"layer{s + 1}.{i}", widths[s + 1]
      bn(p + ".bn1", inplanes)
      conv(p + ".conv1", planes, inplanes, 3)
      bn(p + ".bn2", planes)
      conv(p + ".conv2", planes, planes, 3)
      if (s > 0 and i == 0) or inplanes != planes:
        conv(p + ".shortcut.0", planes, inplanes, 1)
      inplanes = planes
  bn("bn1", inplanes)
  return sd


# --------------------------------------------------------------------------- numpy references
def np_layer_norm(x, w, b, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w + b


def np_attention(x, w_qkv, b_qkv, w_proj, b_proj, heads):
  """torch: ``qkv(x).reshape(B, N, 3, heads, hd)``, softmax(q k^T / sqrt(hd)) v per head."""
  n, t, d = x.shape
  hd = d // heads
  qkv = x @ w_qkv.T + b_qkv
  out = np.zeros_like(x)
  for h in range(heads):
    q, k, v = (qkv[..., j * d + h * hd : j * d + (h + 1) * hd] for j in range(3))
    s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    s = np.exp(s - s.max(-1, keepdims=True))
    out[..., h * hd : (h + 1) * hd] = (s / s.sum(-1, keepdims=True)) @ v
  return out @ w_proj.T + b_proj


def np_patches(x, w, b, patch):
  """``Conv2d(k=stride=patch)`` then ``flatten(2).transpose(1, 2)``: row-major tokens."""
  n, hh, ww, c = x.shape
  gh, gw = hh // patch, ww // patch
  p = x.reshape(n, gh, patch, gw, patch, c)
  y = np.einsum("nhawbc,dcab->nhwd", p, w)
  return y.reshape(n, gh * gw, -1) + (0 if b is None else b)


def np_bicubic(pos, out_h, out_w, scale_h, scale_w):
  """torch ``F.interpolate(mode="bicubic", scale_factor=(scale_h, scale_w),
  align_corners=False)`` of ``pos [M, M, D]``, pixel by pixel: the source coordinate
  ``(i + 0.5) / scale - 0.5``, the 4x4 taps around it clamped to the border, Keys' cubic
  kernel with ``A = -0.75`` on the tap distance."""
  a = -0.75

  def kernel(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  m = pos.shape[0]
  out = np.zeros((out_h, out_w, pos.shape[-1]))
  for i in range(out_h):
    ry = (i + 0.5) / scale_h - 0.5
    for j in range(out_w):
      rx = (j + 0.5) / scale_w - 0.5
      y0, x0 = math.floor(ry), math.floor(rx)
      for dy in range(-1, 3):
        for dx in range(-1, 3):
          yy, xx = min(max(y0 + dy, 0), m - 1), min(max(x0 + dx, 0), m - 1)
          out[i, j] += kernel(ry - (y0 + dy)) * kernel(rx - (x0 + dx)) * pos[yy, xx]
  return out


def np_dinov2_features(sd, x, patch, depth, heads, pos_grid, offset=0.1, **_):
  """DomainBed's ``DinoV2.forward``: ``get_intermediate_layers(x, n=4,
  return_class_token=True)`` (normed) -> 4 class tokens + the last block's mean patch token."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
  tokens = np_patches(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], patch)
  n, d = x.shape[0], tokens.shape[-1]
  gh, gw = x.shape[1] // patch, x.shape[2] // patch
  tokens = np.concatenate([np.broadcast_to(sd["cls_token"], (n, 1, d)), tokens], 1)
  pos = sd["pos_embed"][0]
  if (gh, gw) != (pos_grid, pos_grid):  # interpolate_pos_encoding
    patch_pos = np_bicubic(
      pos[1:].reshape(pos_grid, pos_grid, d),
      gh,
      gw,
      (gh + offset) / pos_grid,
      (gw + offset) / pos_grid,
    )
    pos = np.concatenate([pos[:1], patch_pos.reshape(gh * gw, d)])
  h = tokens + pos
  outs = []
  for i in range(depth):
    p = f"blocks.{i}."
    y = np_layer_norm(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
    y = np_attention(
      y,
      sd[p + "attn.qkv.weight"],
      sd[p + "attn.qkv.bias"],
      sd[p + "attn.proj.weight"],
      sd[p + "attn.proj.bias"],
      heads,
    )
    h = h + y * sd[p + "ls1.gamma"]
    y = np_layer_norm(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
    y = gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    h = h + (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]) * sd[p + "ls2.gamma"]
    if i >= depth - 4:  # blocks_to_take = range(depth - 4, depth)
      outs.append(np_layer_norm(h, sd["norm.weight"], sd["norm.bias"], 1e-6))
  return np.concatenate(
    [outs[0][:, 0], outs[1][:, 0], outs[2][:, 0], outs[3][:, 0]] + [outs[3][:, 1:].mean(1)], axis=1
  )


def np_clip_features(sd, x, patch, depth, heads, **_):
  """openai/CLIP's ``VisionTransformer.forward`` on the pixels of ImageNet-normalised ``x``
  normalised CLIP's way."""
  sd = {k[len("visual.") :]: np.asarray(v, np.float64) for k, v in sd.items() if "visual." in k}
  x = ((x * IMAGENET_STD + IMAGENET_MEAN) - CLIP_MEAN) / CLIP_STD
  tokens = np_patches(x, sd["conv1.weight"], None, patch)
  n, d = x.shape[0], tokens.shape[-1]
  tokens = np.concatenate([np.broadcast_to(sd["class_embedding"], (n, 1, d)), tokens], 1)
  h = np_layer_norm(
    tokens + sd["positional_embedding"], sd["ln_pre.weight"], sd["ln_pre.bias"], 1e-5
  )
  for i in range(depth):
    p = f"transformer.resblocks.{i}."
    y = np_layer_norm(h, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
    h = h + np_attention(
      y,
      sd[p + "attn.in_proj_weight"],
      sd[p + "attn.in_proj_bias"],
      sd[p + "attn.out_proj.weight"],
      sd[p + "attn.out_proj.bias"],
      heads,
    )
    y = np_layer_norm(h, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
    y = y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    y = y * (1 / (1 + np.exp(-1.702 * y)))  # QuickGELU
    h = h + y @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
  return np_layer_norm(h[:, 0], sd["ln_post.weight"], sd["ln_post.bias"], 1e-5) @ sd["proj"]


def np_wrn(sd, x, depth, widen_factor, train=False):
  """DomainBed's ``Wide_ResNet.forward`` (``wide_basic``: the shortcut takes the raw input);
  with ``train``, batch statistics and the running statistics torch's ``train()`` leaves
  (momentum 0.1, the final ``bn1`` 0.9, unbiased variance)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  stats = {}

  def bn(h, name, momentum=0.1):
    if train:
      mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
      m = h.shape[0] * h.shape[1] * h.shape[2]
      stats[name] = (
        (1 - momentum) * sd[name + ".running_mean"] + momentum * mean,
        (1 - momentum) * sd[name + ".running_var"] + momentum * h.var((0, 1, 2)) * m / (m - 1),
      )
    else:
      mean, var = sd[name + ".running_mean"], sd[name + ".running_var"]
    return (h - mean) / np.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

  def conv(h, name, stride, pad):
    return np_conv(h, sd[name + ".weight"], stride, pad) + sd[name + ".bias"]

  relu = lambda v: np.maximum(v, 0)  # noqa: E731
  h = conv(x.astype(np.float64), "conv1", 1, 1)
  for s in range(3):
    for i in range((depth - 4) // 6):
      p, stride = f"layer{s + 1}.{i}", 2 if (s > 0 and i == 0) else 1
      out = conv(relu(bn(h, p + ".bn1")), p + ".conv1", 1, 1)
      out = conv(relu(bn(out, p + ".bn2")), p + ".conv2", stride, 1)
      short = conv(h, p + ".shortcut.0", stride, 0) if p + ".shortcut.0.weight" in sd else h
      h = out + short
  h = relu(bn(h, "bn1", momentum=0.9))
  return h[:, :8, :8].mean((1, 2)), stats  # F.avg_pool2d(out, 8)[:, :, 0, 0]


# --------------------------------------------------------------------------- helpers
def converted(tmp_path, arch, sd):
  """``sd`` saved as safetensors, converted by ``convert_file`` (tiny sizes), loaded into the
  tiny model with ``load_pretrained``: ``(model, variables)``."""
  src, out = tmp_path / f"{arch}.safetensors", tmp_path / f"{arch}.msgpack"
  save_file(dict(sd), str(src))
  convert_weights.convert_file(arch, src, out, sizes=TINY[arch])
  model = backbones.make_classifier(arch, 3, **TINY[arch])
  size = 16 if arch != "wrn16_2" else 32
  like = jax.eval_shape(lambda: backbones.init_variables(model, jax.random.key(0), size))
  like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like)  # no device work
  return model, convert_weights.load_pretrained(out, like)


#: Test-only: cheaper XLA:CPU codegen (as tests/test_baselines.py)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(fn, *args):
  """``fn`` jitted and compiled for ``args`` with :data:`FAST_COMPILE`."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def features_fn(model):
  def run(variables, x):
    return compiled(lambda v, x: model.apply(v, x, method="features"), variables, x)(variables, x)

  return run


# --------------------------------------------------------------------------- tests
def test_dinov2_converts_and_computes_domainbeds_features(tmp_path):
  """A random DINOv2 state dict (dinov2's names) through the converter: the features equal
  DomainBed's ``DinoV2.forward`` in float64, at the stored position grid (no interpolation)
  and at a larger one (torch's bicubic resize with the 0.1 offset)."""
  sd = dinov2_state_dict(random_array(np.random.default_rng(0)), **TINY["dinov2_vitb14"])
  model, variables = converted(tmp_path, "dinov2_vitb14", sd)
  assert "mask_token" not in str(jax.tree_util.tree_structure(variables))
  feats = features_fn(model)
  rng = np.random.default_rng(1)
  for size in (12, 16):  # 3x3 = the stored grid; 4x4 = interpolated
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    want = np_dinov2_features(sd, x, **TINY["dinov2_vitb14"])
    z = feats(variables, x)
    assert z.shape == (2, 5 * 16) and z.dtype == jnp.float32
    assert rel_err(z, want) < 1e-5, (size, rel_err(z, want))


def test_clip_converts_and_computes_the_image_embedding(tmp_path):
  """A random CLIP state dict (float16 values, as OpenAI's file; text-tower keys dropped):
  the tower's output equals ``VisionTransformer.forward`` on CLIP-normalised pixels."""
  rng = np.random.default_rng(2)
  sd = clip_state_dict(random_array(rng, np.float16), **TINY["clip_vitb16"])
  model, variables = converted(tmp_path, "clip_vitb16", sd)
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  z = features_fn(model)(variables, x)
  assert rel_err(z, np_clip_features(sd, x, **TINY["clip_vitb16"])) < 1e-5
  with pytest.raises(ValueError, match="position grid"):  # no interpolation in CLIP
    features_fn(model)(variables, x[:, :12, :12])


def test_wide_resnet_converts_and_matches_domainbed_in_eval_and_train(tmp_path):
  """WRN (depth 10, width 1: every code path of WRN-16-2) against DomainBed's forward: eval
  with the running statistics at 32x32; train mode at 40x40 (avg_pool2d(8)'s top-left
  window) with batch statistics, and the running statistics it leaves (final bn1: momentum
  0.9). The ``remat`` and ``bfloat16`` variants build and compute the same (bfloat16: close)."""
  rng = np.random.default_rng(3)
  sd = wrn_state_dict(rng, **TINY["wrn16_2"])
  model, variables = converted(tmp_path, "wrn16_2", sd)
  remat, bf16 = (
    backbones.make_classifier("wrn16_2", 3, **TINY["wrn16_2"], **o)
    for o in ({"remat": True}, {"dtype": jnp.bfloat16})
  )
  x32 = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  x40 = rng.normal(size=(3, 40, 40, 3)).astype(np.float32)

  def run(v, x32, x40):
    feats = lambda m, x: m.apply(v, x, method="features")  # noqa: E731
    train = model.apply(v, x40, True, method="features", mutable=["batch_stats"])
    return feats(model, x32), train, feats(remat, x32), feats(bf16, x32)

  z, (z_train, new), z_remat, z_bf16 = compiled(run, variables, x32, x40)(variables, x32, x40)
  assert rel_err(z, np_wrn(sd, x32, **TINY["wrn16_2"])[0]) < 1e-5
  np.testing.assert_allclose(z_remat, z, rtol=1e-6, atol=1e-7)
  assert z_bf16.dtype == jnp.float32 and rel_err(z_bf16, z) < 0.05
  want, stats = np_wrn(sd, x40, **TINY["wrn16_2"], train=True)
  assert rel_err(z_train, want) < 1e-5
  got = new["batch_stats"]["featurizer"]
  assert len(stats) == 7  # 3 blocks x 2 + the final bn1
  for name, (mean, var) in stats.items():
    parts = name.split(".")  # layer{s}.{i}.bn{k} -> layer{s}_{i}/bn{k}
    leaf = got[f"{parts[0]}_{parts[1]}"][parts[2]] if len(parts) == 3 else got[name]
    assert rel_err(leaf["mean"], mean) < 1e-5 and rel_err(leaf["var"], var) < 1e-5, name
  with pytest.raises(ValueError, match="at least 32x32"):
    jax.eval_shape(lambda x: model.apply(variables, x, method="features"), x40[:, :28, :28])


def test_wide_resnet_per_domain_running_statistics_use_each_layers_momentum():
  """With per-domain forwards (DomainBed runs such methods once per minibatch) the engine
  folds D updates in closed form (:meth:`dgjax.core.Context.updated_variables`); with the
  WRN's two momenta (0.1, final 0.9) it equals D sequential torch-style updates."""
  model, params, variables = tiny_backbone("wrn16_2", 2)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 2, 32, 32, 3)), jnp.float32)
  ctx = core.Context(model, {}, 3, variables=variables, train=True, forward_per_domain=True)

  def both(params, x):
    sequential = variables
    for d in range(3):  # torch: one train() forward per domain, in order
      _, sequential = model.apply(
        {"params": params, **sequential}, x[d], True, method="features", mutable=["batch_stats"]
      )
    return ctx.updated_variables(params, x)["batch_stats"], sequential["batch_stats"]

  folded, sequential = compiled(both, params, x)(params, x)
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(sequential)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  before = variables["batch_stats"]["featurizer"]["bn1"]["mean"]
  assert np.abs(np.asarray(folded["featurizer"]["bn1"]["mean"]) - np.asarray(before)).max() > 0.1


# --------------------------------------------------------------------------- tiny models
#: the smallest backbones that run every code path the methods touch (tests/test_baselines.py)
CONTRACT = {
  "dinov2_vitb14": {
    "patch": 4,
    "width": 8,
    "depth": 1,
    "heads": 2,
    "pos_grid": 4,
    "last_layers": 1,
  },
  "wrn16_2": {"depth": 10, "widen_factor": 1},
}
CONTRACT_INPUT = {"dinov2_vitb14": 16, "wrn16_2": 32}


def tiny_backbone(name, num_classes, hparams=None, seed=0, **options):
  """``(model, params, variables)`` of backbone ``name`` at :data:`CONTRACT` sizes, the values
  from a random state dict through the converter (no init compile; the head random too)."""
  rng = np.random.default_rng(seed)
  sizes = CONTRACT[name]
  if name == "wrn16_2":
    sd, family = wrn_state_dict(rng, **sizes), "wrn"
  else:
    kw = {k: v for k, v in sizes.items() if k != "last_layers"}
    sd, family = dinov2_state_dict(random_array(rng), **kw), "dinov2"
  tree = convert_weights.torch_to_flax(sd, family=family)
  model = backbones.make_classifier(name, num_classes, hparams, **sizes, **options)
  width = 64 * sizes["widen_factor"] if name == "wrn16_2" else 2 * sizes["width"]
  bound = width**-0.5
  tree["params"]["classifier"] = {
    "kernel": rng.uniform(-bound, bound, (width, num_classes)).astype(np.float32),
    "bias": rng.uniform(-bound, bound, num_classes).astype(np.float32),
  }
  variables = {k: v for k, v in tree.items() if k != "params" and v}
  return model, jax.tree.map(jnp.asarray, tree["params"]), jax.tree.map(jnp.asarray, variables)


# --------------------------------------------------------------------------- more tests
@pytest.mark.parametrize("m,grid", [(37, 16), (3, 4), (5, 3)])
def test_position_embeddings_resize_as_torchs_bicubic(m, grid):
  """:func:`dgjax.vit.interpolate_positions` = the pixel-by-pixel bicubic reference (and
  torch's ``F.interpolate`` where torch imports); ViT-B/14 at 224: 37x37 -> 16x16."""
  rng = np.random.default_rng(m)
  pos = rng.normal(size=(1 + m * m, 2)).astype(np.float32)
  got = np.asarray(vit.interpolate_positions(jnp.asarray(pos), (grid, grid)))
  want = np_bicubic(pos[1:].reshape(m, m, 2), grid, grid, (grid + 0.1) / m, (grid + 0.1) / m)
  np.testing.assert_array_equal(got[0], pos[0])
  assert rel_err(got[1:], want.reshape(-1, 2)) < 1e-6
  np.testing.assert_array_equal(vit.interpolate_positions(jnp.asarray(pos), (m, m)), pos)
  try:
    import torch
  except ImportError:
    return
  t = torch.nn.functional.interpolate(
    torch.from_numpy(pos[1:].reshape(1, m, m, 2)).permute(0, 3, 1, 2),
    scale_factor=((grid + 0.1) / m, (grid + 0.1) / m),
    mode="bicubic",
    antialias=False,
  )
  assert rel_err(got[1:], t.permute(0, 2, 3, 1).reshape(-1, 2).numpy()) < 1e-6


def test_full_size_state_dicts_fit_the_models():
  """The real checkpoints' key names and shapes (dinov2_vitb14_pretrain.pth, CLIP's
  ViT-B-16.pt, as their source code builds them) convert onto the full-size models with no
  key missing, left over or mis-shaped; parameter counts and feature widths."""
  for name, family, make_sd in (
    ("dinov2_vitb14", "dinov2", dinov2_state_dict),
    ("clip_vitb16", "clip", clip_state_dict),
  ):
    sd = make_sd(zeros_like_shapes, **FULL[name])
    tree = convert_weights.torch_to_flax(sd, family=family)
    model = backbones.make_classifier(name, 5)
    b = backbones.get_backbone(name)
    shapes = jax.eval_shape(lambda: backbones.init_variables(model, jax.random.key(0), 224))
    convert_weights._check(tree, shapes, name, head=False)  # raises on any misfit
    count = sum(math.prod(v.shape) for v in jax.tree.leaves(tree["params"]))
    assert count == {"dinov2_vitb14": 86_579_712, "clip_vitb16": 86_192_640}[name]
    z = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((1, 224, 224, 3)), method="features"), shapes
    )
    assert z.shape == (1, b.num_features)
  wrn = backbones.make_classifier("wrn16_2", 10)
  shapes = jax.eval_shape(lambda: backbones.init_variables(wrn, jax.random.key(0), 32))
  tree = convert_weights.torch_to_flax(
    wrn_state_dict(np.random.default_rng(0), 16, 2), family="wrn"
  )
  convert_weights._check(tree, shapes, "wrn16_2", head=False)
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(tree["params"])) == 691_520
  bad = dict(sd, **{"visual.attnpool.c_proj.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(convert_weights.WeightsError, match="attnpool"):
    convert_weights.torch_to_flax(bad, family="clip")
  with pytest.raises(convert_weights.WeightsError, match="register"):
    convert_weights.torch_to_flax({"register_tokens": np.zeros((1, 4, 8))}, family="dinov2")


def test_vit_attn_tune_trains_only_attention_and_the_head():
  """``vit_attn_tune`` is DomainBed's rule (a parameter trains iff its torch name contains
  ``attn``) on the converted names; through a method's step (ERM, weight decay on) no
  gradient reaches the frozen parameters and they get zero updates, while the attention
  parameters and the head get exactly the gradients of full fine-tuning, and move."""
  tuned = backbones.make_classifier(
    "dinov2_vitb14", 3, {"vit_attn_tune": True}, **TINY["dinov2_vitb14"]
  )
  frozen = tuned.frozen_params
  assert (
    backbones.make_classifier("dinov2_vitb14", 3, **TINY["dinov2_vitb14"]).frozen_params is None
  )
  from dgjax.convert_backbones import clip_target, dinov2_target

  sd = dinov2_state_dict(zeros_like_shapes, **TINY["dinov2_vitb14"])
  targets = {k: dinov2_target(k) for k in sd}
  assert all(frozen(t[1]) == ("attn" not in k) for k, t in targets.items() if t is not None)
  clip = backbones.make_classifier("clip_vitb16", 3, {"vit_attn_tune": True}).frozen_params
  for k in clip_state_dict(zeros_like_shapes, **TINY["clip_vitb16"]):
    t = clip_target(k)
    assert t is None or clip(t[1]) == ("attn" not in k), k
  assert not frozen(("classifier", "kernel"))

  model, params, _ = tiny_backbone("dinov2_vitb14", 3, {"vit_attn_tune": True})
  full, _, _ = tiny_backbone("dinov2_vitb14", 3)
  hp = methods.resolve_hparams("erm", 0, {"batch_size": 4, "weight_decay": 0.1})
  rng = np.random.default_rng(4)
  batch = {
    "x": jnp.asarray(rng.normal(size=(2, 4, 16, 16, 3)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 3, (2, 4))),
  }

  def step(p):
    ms = methods.get_method("erm").build(core.Context(model, hp, 2))
    updates, _, _ = ms.update(
      p, ms.init(p, jax.random.key(0)), batch, jnp.asarray(0), jax.random.key(1)
    )
    one = {"x": batch["x"][0], "y": batch["y"][0]}
    grads = [jax.grad(lambda q: core.Context(m, hp, 2).loss(q, one))(p) for m in (model, full)]
    return updates, grads

  u_t, (g_t, g_f) = compiled(step, params)(params)
  flat = lambda t: {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t)
  }  # noqa: E731
  u_t, g_t, g_f = map(flat, (u_t, g_t, g_f))
  n_frozen = 0
  for name in u_t:
    if "attn" in name or "classifier" in name:
      np.testing.assert_array_equal(g_t[name], g_f[name], err_msg=name)
      assert np.abs(u_t[name]).max() > 0, name
    else:  # weight decay 0.1 would move them if the optimizer saw them
      n_frozen += 1
      assert not np.any(u_t[name]) and not np.any(g_t[name]) and np.any(g_f[name]), name
  assert n_frozen == len(u_t) - 4 - 2  # qkv, proj (kernel, bias) and the head train


def test_vit_remat_and_bfloat16_options():
  """``remat`` (jax.checkpoint per block) leaves the ViT's gradients as they are; ``bfloat16``
  compute stays close to float32 and returns float32 features (the WRN's: in its test)."""
  _, params, _ = tiny_backbone("dinov2_vitb14", 3)
  base, remat, bf16 = (
    backbones.make_classifier("dinov2_vitb14", 3, **CONTRACT["dinov2_vitb14"], **o)
    for o in ({}, {"remat": True}, {"dtype": jnp.bfloat16})
  )
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 16, 3)), jnp.float32)

  def run(p):
    loss = lambda m, p: jnp.sum(m.apply({"params": p}, x, True) ** 2)  # noqa: E731
    feats = lambda m: m.apply({"params": p}, x, method="features")  # noqa: E731
    return (
      jax.grad(lambda q: loss(base, q))(p),
      jax.grad(lambda q: loss(remat, q))(p),
      feats(base),
      feats(bf16),
    )

  g, g_remat, z32, z16 = compiled(run, params)(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
  assert z16.dtype == jnp.float32 and rel_err(z16, z32) < 0.05, rel_err(z16, z32)


def test_domainbeds_choice_and_the_backbone_flag():
  """:func:`dgjax.backbones.select` is DomainBed's ``Featurizer`` / ``ResNet`` choice;
  ``--backbone`` writes the selecting hparams into the run's hparams (so the records say what
  DomainBed builds) and refuses contradicting ones; DomainBed's ViT hparams and their ranges."""
  hp = methods.default_hparams("erm", "PACS")
  assert (hp["resnet50_augmix"], hp["vit"], hp["dinov2"], hp["vit_attn_tune"]) == (
    True,
    False,
    False,
    False,
  )
  assert hp["vit_dropout"] == 0.0 and hp["resnet18"] is False
  assert {methods.random_hparams("erm", s, "PACS")["vit_dropout"] for s in range(1, 30)} == {
    0.0,
    0.1,
    0.5,
  }
  select = backbones.select
  assert select(hp) == "resnet50_augmix"
  assert select({**hp, "resnet50_augmix": False}) == "resnet50"
  assert select({**hp, "resnet18": True}) == "resnet18"  # ours: resnet18 wins (docstring)
  assert select({**hp, "vit": True, "dinov2": True}) == "dinov2_vitb14"
  assert select({**hp, "vit": True, "dinov2": True}, (32, 32, 3)) == "wrn16_2"
  with pytest.raises(ValueError, match="dinov2=true"):
    select({**hp, "vit": True})

  def config(**kw):
    return config_lib.TrainConfig(dataset="PACS", test_envs=(0,), **kw)

  assert config().resolved_hparams == {**hp}
  for name, b in backbones.BACKBONES.items():
    resolved = config(backbone=name).resolved_hparams
    assert {k: resolved[k] for k in b.selected_by} == dict(b.selected_by)
    from dgjax.image_task import backbone_of

    assert backbone_of(config(backbone=name)) == name
    if name not in ("wrn16_2", "clip_vitb16"):  # WRN: by shape; CLIP: not DomainBed's
      assert select(resolved) == name
  assert (
    type(make_model(4, config(backbone="clip_vitb16").resolved_hparams, "clip_vitb16").featurizer)
    is vit.CLIPVisionTower
  )
  assert (
    make_model(
      4, config(hparams={"vit": True, "dinov2": True}).resolved_hparams
    ).featurizer.num_features
    == 3840
  )
  with pytest.raises(ValueError, match="--backbone resnet18 means .*resnet18=False"):
    config(backbone="resnet18", hparams={"resnet18": False})
  with pytest.raises(ValueError, match="dinov2=true"):  # before any work
    config(hparams={"vit": True})
  with pytest.raises(ValueError, match="backbone must be one of"):
    config(backbone="vit_huge")
  # the in-memory datasets keep their network under auto; a backbone must fit their inputs
  with pytest.raises(ValueError, match="own network"):
    config_lib.TrainConfig(dataset="Spirals", remat=True)
  spirals = config_lib.TrainConfig(dataset="Spirals", backbone="wrn16_2", remat=True)
  assert "vit" not in spirals.resolved_hparams  # only the hparams the dataset has
  with pytest.raises(ValueError, match=r"needs image inputs \[H, W, C\]"):
    backbones.in_memory_model(spirals, None, (10,))
  with pytest.raises(ValueError, match="at least 32x32"):
    backbones.in_memory_model(spirals, types.SimpleNamespace(num_classes=2), (28, 28, 2))
  # where the weights come from
  assert "dinov2_vitb14_pretrain.pth" in convert_weights.missing_weights_message("dinov2_vitb14")
  assert "ViT-B-16.pt" in convert_weights.missing_weights_message("clip_vitb16")
  assert "--pretrained=none" in convert_weights.missing_weights_message("wrn16_2")
  assert convert_cli.main(["--arch", "clip_vitb16", "--where"]) == 0
