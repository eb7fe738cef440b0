"""The weights converter and dgjax's ResNet / BatchNorm against real torch.

A torch ResNet in torchvision's layout (module and state-dict names, "v1.5" bottleneck) is
built here from ``torch.nn`` layers, given random weights and random non-trivial BatchNorm
statistics and affine parameters, saved as ``.pth`` (``torch.save``) and ``.safetensors``,
converted through the CLI (``python -m experiments.convert_weights``) and loaded with
:func:`dgjax.convert_weights.load_pretrained`; the Flax model must then reproduce torch's
features and logits (eval mode), and with unfrozen BatchNorm torch's ``train()`` forward and
the running statistics that forward leaves behind.

The reference is built by hand so that the test needs only torch (the ``convert`` extra:
``pip install 'dgjax[convert]'``); where torchvision / timm import, the hand-built network
is checked against theirs (same state-dict keys and shapes, same outputs).

Tolerance: float32 on both sides, different convolution algorithms; errors are measured
relative to the largest reference value, ``max|flax - torch| <= RTOL * max|torch|``.
"""

import numpy as np
import jax
import pytest

torch = pytest.importorskip(
  "torch",
  reason="torch is not installed: pip install 'dgjax[convert]' to check the "
  "converter and BatchNorm against torch",
)
from torch import nn  # noqa: E402

from dgjax import convert_weights, resnet  # noqa: E402
from experiments import convert_weights as convert_cli  # noqa: E402

RTOL = 1e-5  # features / logits, relative to the largest reference value
STATS_RTOL = 1e-5  # running mean / var after one training forward
STAGES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


# --------------------------------------------------------------------------- torch reference
def _conv(i, o, k, stride=1):
  return nn.Conv2d(i, o, k, stride=stride, padding=(k - 1) // 2, bias=False)


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1, self.bn1 = _conv(inplanes, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
    self.downsample = (
      nn.Sequential(_conv(inplanes, planes, 1, stride), nn.BatchNorm2d(planes))
      if stride != 1 or inplanes != planes
      else None
    )

  def forward(self, x):
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
  """torchvision v1.5: the stride sits on the 3x3 convolution."""

  expansion = 4

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    out = planes * 4
    self.conv1, self.bn1 = _conv(inplanes, planes, 1), nn.BatchNorm2d(planes)
    self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = _conv(planes, out, 1), nn.BatchNorm2d(out)
    self.downsample = (
      nn.Sequential(_conv(inplanes, out, 1, stride), nn.BatchNorm2d(out))
      if stride != 1 or inplanes != out
      else None
    )

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision's ResNet: ``forward`` gives the pooled features, ``fc`` the logits."""

  def __init__(self, arch, num_classes):
    super().__init__()
    block, stages = STAGES[arch]
    block_cls = TorchBasicBlock if block == "basic" else TorchBottleneck
    self.conv1, self.bn1 = _conv(3, 64, 7, 2), nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for s, n in enumerate(stages):
      planes = 64 * 2**s
      blocks = []
      for i in range(n):
        blocks.append(block_cls(inplanes, planes, 2 if (s > 0 and i == 0) else 1))
        inplanes = planes * block_cls.expansion
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for s in range(4):
      x = getattr(self, f"layer{s + 1}")(x)
    return x.mean(dim=(2, 3))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Random weights everywhere, BN statistics and affine parameters included (so a wrong
  mapping of any of them changes the output); the last BN of each residual branch gets a
  smaller scale so activations stay O(1) through the depth."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, m in model.named_modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        last = "bn3" if hasattr(parent, "bn3") else "bn2"
        gain = 0.3 if parent_name.startswith("layer") and leaf == last else 1.0
        m.weight.copy_(gain * (0.5 + torch.rand(c, generator=g)))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Linear):
        bound = m.in_features**-0.5
        m.weight.copy_((2 * torch.rand(m.weight.shape, generator=g) - 1) * bound)
        m.bias.copy_((2 * torch.rand(m.bias.shape, generator=g) - 1) * bound)
  return model


def images(n, size, seed):
  """NCHW torch images and the same images NHWC for flax."""
  x = torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))
  return x, x.permute(0, 2, 3, 1).numpy().copy()


# --------------------------------------------------------------------------- helpers
def convert(tmp_path, arch, model, kind):
  """Save ``model.state_dict()`` as ``kind`` (pth / safetensors), convert with the CLI (head
  included), return the converted file's payload."""
  src = tmp_path / f"{arch}.{kind}"
  sd = model.state_dict()
  if kind == "pth":
    torch.save(sd, src)
  else:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
  out = tmp_path / f"{arch}-{kind}.msgpack"
  assert (
    convert_cli.main(["--arch", arch, "--input", str(src), "--output", str(out), "--include_head"])
    == 0
  )
  return out


def flax_model(arch, num_classes, out, image_size, freeze_bn=True):
  """The dgjax model with the converted featurizer (load_pretrained) and the converted head."""
  model = resnet.resnet_classifier(arch, num_classes, freeze_bn=freeze_bn)
  # shapes and dtypes suffice: every featurizer leaf comes from the file, the head below
  shapes = jax.eval_shape(lambda: resnet.init_variables(model, jax.random.key(0), image_size))
  variables = convert_weights.load_pretrained(out, shapes)
  head = convert_weights.read_weights(out)["params"]["classifier"]
  variables["params"]["classifier"] = jax.tree.map(np.asarray, head)
  return model, variables


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def assert_trees_equal(a, b):
  fa, fb = convert_weights._flatten(a), convert_weights._flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch,size,seed", [("resnet18", 64, 0), ("resnet50", 224, 1)])
def test_pth_and_safetensors_convert_to_torchs_eval_forward(tmp_path, arch, size, seed):
  """Both file kinds give the same converted variables; with them the Flax features and
  logits equal torch's eval-mode (running-statistics) forward."""
  num_classes = 7
  model = randomize_(TorchResNet(arch, num_classes), seed).eval()
  x_t, x = images(2, size, seed + 10)
  with torch.no_grad():
    want_z = model(x_t)
    want_logits = model.fc(want_z)

  from_pth = convert(tmp_path, arch, model, "pth")
  from_st = convert(tmp_path, arch, model, "safetensors")
  pth, st = convert_weights.read_weights(from_pth), convert_weights.read_weights(from_st)
  for collection in ("params", "batch_stats"):
    assert_trees_equal(pth[collection], st[collection])

  fmodel, variables = flax_model(arch, num_classes, from_pth, size)
  z, logits = jax.jit(
    lambda v, x: fmodel.apply(v, x, method=lambda m, x: (z := m.features(x), m.head(z)))
  )(variables, x)
  err_z, err_logits = rel_err(z, want_z.numpy()), rel_err(logits, want_logits.numpy())
  print(f"{arch} {size}x{size} eval: features rel err {err_z:.2e}, logits {err_logits:.2e}")
  assert err_z <= RTOL and err_logits <= RTOL
  assert np.abs(want_z.numpy()).max() > 0.1  # not a vacuous comparison of zeros


def test_unfrozen_bn_train_forward_and_running_stats_match_torch(tmp_path):
  """``freeze_bn=False``, ``train=True``, ``mutable=["batch_stats"]`` = torch ``train()``:
  batch statistics in the forward, and afterwards every running mean / var equals torch's
  buffer (``r <- 0.9 r + 0.1 s``, unbiased variance)."""
  arch, num_classes, size = "resnet18", 5, 64
  model = randomize_(TorchResNet(arch, num_classes), 2)
  out = convert(tmp_path, arch, model, "pth")
  fmodel, variables = flax_model(arch, num_classes, out, size, freeze_bn=False)

  x_t, x = images(4, size, 12)
  model.train()
  with torch.no_grad():
    want_z = model(x_t)
    want_logits = model.fc(want_z)
  z, updated = jax.jit(
    lambda v, x: fmodel.apply(v, x, train=True, method="features", mutable=["batch_stats"])
  )(variables, x)
  logits = fmodel.apply(variables, z, method="head")
  err_z, err_logits = rel_err(z, want_z.numpy()), rel_err(logits, want_logits.numpy())

  got = convert_weights._flatten(updated["batch_stats"]["featurizer"])
  want = convert_weights._flatten(
    convert_weights.torch_to_flax({k: v.numpy() for k, v in model.state_dict().items()})[
      "batch_stats"
    ]["featurizer"]
  )
  assert got.keys() == want.keys() and len(got) == 2 * 20  # 20 BN layers in resnet18
  before = convert_weights._flatten(variables["batch_stats"]["featurizer"])
  err_stats = max(rel_err(got[k], want[k]) for k in want)
  moved = min(np.abs(np.asarray(got[k]) - np.asarray(before[k])).max() for k in want)
  print(
    f"{arch} train(): features rel err {err_z:.2e}, logits {err_logits:.2e}, "
    f"running stats {err_stats:.2e}"
  )
  assert err_z <= RTOL and err_logits <= RTOL
  assert err_stats <= STATS_RTOL
  assert moved > 1e-3  # every running statistic did change in this forward


def _import_or_skip(name):
  try:
    return __import__(name)
  except Exception as e:  # noqa: BLE001 -- a broken install is a skip here, with its reason
    pytest.skip(f"{name} does not import ({type(e).__name__}: {e}); optional cross-check")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_reference_network_is_torchvisions(arch):
  """The hand-built torch reference above has torchvision's state-dict keys and shapes and,
  with the same weights, computes torchvision's outputs (train and eval mode)."""
  torchvision = _import_or_skip("torchvision")
  ours = randomize_(TorchResNet(arch, 7), 3)
  theirs = getattr(torchvision.models, arch)(num_classes=7)
  ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
  assert list(ours_sd) == list(theirs_sd)
  assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
  theirs.load_state_dict(ours_sd)
  theirs.fc = nn.Identity()
  x, _ = images(2, 64, 4)
  with torch.no_grad():
    for train in (False, True):
      ours.train(train), theirs.train(train)
      torch.testing.assert_close(ours(x), theirs(x))


def test_timm_resnet50_state_dict_converts(tmp_path):
  """timm's ``resnet50`` (the architecture of DomainBed's ``resnet50_augmix`` weights) has
  torchvision's names: its state dict loads strictly into the reference, which then computes
  timm's features, and converts with ``--arch resnet50_augmix`` (.safetensors, as on the hub)."""
  timm = _import_or_skip("timm")
  theirs = timm.create_model("resnet50", pretrained=False, num_classes=7)
  randomize_(theirs, 5).eval()
  ours = TorchResNet("resnet50", 7).eval()
  ours.load_state_dict(theirs.state_dict(), strict=True)
  x, _ = images(2, 64, 6)
  with torch.no_grad():
    torch.testing.assert_close(
      ours(x), theirs.forward_head(theirs.forward_features(x), pre_logits=True)
    )
  from safetensors.torch import save_file

  src = tmp_path / "model.safetensors"
  save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(src))
  out = tmp_path / "augmix.msgpack"
  assert (
    convert_cli.main(["--arch", "resnet50_augmix", "--input", str(src), "--output", str(out)]) == 0
  )
  payload = convert_weights.read_weights(out)
  assert payload["arch"] == "resnet50"
  want = convert_weights.torch_to_flax({k: v.numpy() for k, v in ours.state_dict().items()})
  for collection in ("params", "batch_stats"):
    assert_trees_equal(payload[collection], want[collection])
