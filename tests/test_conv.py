"""Every conv2d lowering is the same function as impl="xla" (values, gradients, under jit and
vmap, second order), and the whole MNIST_CNN gives the same outputs and per-domain grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


from dgjax import conv as dconv
from dgjax.conv import Conv, conv2d
from dgjax.models import mnist_cnn
from dgjax.per_domain import per_domain_value_and_grad

IMPLS = [i for i in dconv.CONV_IMPLS if i != "xla"] + ["auto"]
STRIDE1_ONLY = {"shift_matmul"}

# (H, W, Cin, Cout, stride): odd and even sizes, several channel counts.
SHAPES = [
  (8, 8, 2, 4, 1),
  (7, 9, 3, 5, 1),
  (8, 8, 4, 6, 2),
  (9, 7, 5, 3, 2),
  (5, 6, 8, 16, 2),
]


def _supported(impl, stride):
  return not (impl in STRIDE1_ONLY and stride != 1)


def _rand(shape, seed, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _loss(impl, stride):
  # A nonlinear scalar of the output, so that gradients are not trivially structured.
  return lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, stride, 1, impl)))


def _close(a, b, rtol):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(float(np.max(np.abs(b))), 1e-30)
  np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=rtol)


@functools.lru_cache(maxsize=None)
def _value_grad_hvp(impl, stride):
  """One jitted function: conv output, grads of a nonlinear scalar w.r.t. (x, kernel), and
  forward-over-reverse Hessian-vector products (as Hessian methods need)."""
  loss = _loss(impl, stride)
  grad = jax.grad(loss, argnums=(0, 1))

  def f(x, k, tx, tk):
    return conv2d(x, k, stride, 1, impl), grad(x, k), jax.jvp(grad, (x, k), (tx, tk))[1]

  return jax.jit(f)


def _compare(impl, dtype, shapes, tol_y, tol_g):
  for i, (h, w, cin, cout, s) in enumerate(shapes):
    if not _supported(impl, s):
      continue
    x, k = _rand((2, h, w, cin), i, dtype), _rand((3, 3, cin, cout), 100 + i, dtype)
    tx, tk = _rand(x.shape, 7, dtype), _rand(k.shape, 8, dtype)
    y, g, hvp = _value_grad_hvp(impl, s)(x, k, tx, tk)
    y_r, g_r, hvp_r = _value_grad_hvp("xla", s)(x, k, tx, tk)
    assert y.dtype == dtype and y.shape == y_r.shape
    _close(y, y_r, tol_y)
    for a, r in zip(g + hvp, g_r + hvp_r):
      assert a.dtype == dtype
      _close(a, r, tol_g)


@pytest.mark.parametrize("impl", IMPLS)
def test_values_grads_hvp_float32(impl):
  _compare(impl, jnp.float32, SHAPES, 1e-5, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_values_grads_hvp_float64(impl):
  with jax.enable_x64(True):
    _compare(impl, jnp.float64, SHAPES[1:4:2], 1e-12, 1e-10)  # odd sizes, stride 1 and 2


@functools.lru_cache(maxsize=None)
def _vmapped(impl, stride):
  """Under vmap: a domain axis on x with a shared kernel (per-domain kernel grads, as in
  per_domain_value_and_grad), and per-example kernels."""

  def f(x, k, ks):
    y = jax.vmap(lambda x: conv2d(x, k, stride, 1, impl))(x)
    gk = jax.vmap(jax.grad(_loss(impl, stride), argnums=1), in_axes=(0, None))(x, k)
    yk = jax.vmap(lambda x, k: conv2d(x, k, stride, 1, impl))(x, ks)
    return y, gk, yk

  return jax.jit(f)


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap(impl):
  x, k, ks = _rand((2, 3, 7, 8, 3), 0), _rand((3, 3, 3, 4), 1), _rand((2, 3, 3, 3, 4), 2)
  for s in (1, 2):
    if not _supported(impl, s):
      continue
    out, ref = _vmapped(impl, s)(x, k, ks), _vmapped("xla", s)(x, k, ks)
    for a, r in zip(out, ref):
      _close(a, r, 1e-4)


def test_unsupported_raise():
  x, k = _rand((1, 8, 8, 2), 0), _rand((3, 3, 2, 4), 1)
  with pytest.raises(ValueError, match="stride 1 only"):
    conv2d(x, k, 2, 1, "shift_matmul")
  with pytest.raises(ValueError, match="unknown conv impl"):
    conv2d(x, k, 1, 1, "nope")
  with pytest.raises(ValueError, match="HWIO"):
    conv2d(x, _rand((3, 3, 3, 4), 1), 1, 1, "im2col")
  with pytest.raises(ValueError, match="rank 4"):
    conv2d(x[0], k, 1, 1, "im2col")


def test_auto_resolves():
  assert dconv.resolve_impl("auto") == (
    dconv.CPU_DEFAULT if jax.default_backend() == "cpu" else "xla"
  )
  assert dconv.resolve_impl("im2col") == "im2col"
  assert Conv(4, impl="auto").impl == "auto"
  with dconv.vmapped_runs():
    assert dconv.resolve_impl("auto") == (
      dconv.CPU_VMAPPED_RUNS_DEFAULT if jax.default_backend() == "cpu" else "xla"
    )
    assert dconv.resolve_impl("xla") == "xla"
  assert dconv.resolve_impl("auto") == dconv.resolve_impl("auto")  # the context is left


def test_the_engine_traces_k_runs_inside_vmapped_runs():
  from dgjax import train as train_lib

  seen = []

  def fn(x):
    seen.append(dconv.resolve_impl("auto"))
    return x

  train_lib._over_runs(fn, (0,), 2)(jnp.zeros((2, 3)))
  train_lib._over_runs(fn, (0,), 1)(jnp.zeros((1, 3)))
  with dconv.vmapped_runs():
    k_runs_impl = dconv.resolve_impl("auto")
  assert seen == [k_runs_impl, dconv.resolve_impl("auto")]


# The CNN has a stride-2 layer (no shift_matmul); "auto" is one of the others.
MODEL_IMPLS = ["xla"] + [i for i in IMPLS if i not in ("shift_matmul", "auto")]


def _cnn_data():
  # Drawn once in float32 mode (random draws differ under x64), as numpy.
  d, b = 2, 4
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = np.asarray(jax.random.normal(kx, (d, b, 28, 28, 2), jnp.float32))
  y = np.asarray(jax.random.randint(ky, (d, b), 0, 2), np.int32)
  params = jax.tree.map(np.asarray, mnist_cnn(2).init(kp, jnp.asarray(x[0]))["params"])
  return x, y, params


_CNN_DATA = _cnn_data()


def _cnn_grads(impl, dtype):
  x, y, params = _CNN_DATA
  x = jnp.asarray(x, dtype)
  y = jnp.asarray(y)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  model = mnist_cnn(2, conv_impl=impl)

  def loss_fn(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, xb), yb
    ).mean()

  logits = model.apply({"params": params}, x[0])
  losses, g = jax.jit(lambda p, bt: per_domain_value_and_grad(loss_fn, p, bt))(params, (x, y))
  return logits, losses, g


@pytest.fixture(scope="module")
def cnn_reference():
  with jax.enable_x64(True):
    return jax.tree.map(np.asarray, _cnn_grads("xla", jnp.float64))


@pytest.mark.parametrize("impl", MODEL_IMPLS)
def test_mnist_cnn_matches_xla(cnn_reference, impl):
  logits_r, losses_r, g_r = cnn_reference
  # float64: the same function as impl="xla" to rounding.
  with jax.enable_x64(True):
    logits, losses, g = _cnn_grads(impl, jnp.float64)
    _close(logits, logits_r, 1e-12)
    _close(losses, losses_r, 1e-12)
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
      _close(a, r, 1e-10)
  # float32 against the float64 truth, per leaf relative to the leaf's largest entry. (The
  # conv biases feed ReLU + GroupNorm, whose gradients are sums with heavy cancellation; with
  # impl="xla" XLA:CPU is ~1e-3 off here, the matmul lowerings ~1e-5.)
  logits, losses, g = _cnn_grads(impl, jnp.float32)
  _close(logits, logits_r, 1e-5)
  _close(losses, losses_r, 1e-5)
  for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
    assert a.shape == r.shape and a.dtype == jnp.float32
    _close(a, r, 1e-2)
