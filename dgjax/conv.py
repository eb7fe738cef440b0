"""3x3 convolution layer with PyTorch padding semantics and selectable lowering.

Lowerings (``impl``), all NHWC input, HWIO kernel, symmetric zero padding, and all numerically
the same function (tested against ``"xla"`` in float32 and float64):

``"xla"``
  ``lax.conv_general_dilated``. On GPU/TPU this is cuDNN / the TPU convolution emitter and is
  what you want. On XLA:CPU the convolution runs ~2x below the CPU's matmul rate, and under
  ``jax.vmap`` over domains its weight gradient becomes a *grouped* convolution that is
  slower still (see ``bench/conv_lowering.py``).

``"im2col"``
  Tap-major im2col: the ``kh*kw`` shifted (strided) slices of the padded input are
  concatenated along channels, ``[N, Ho, Wo, kh*kw*Cin]``, and multiplied by the kernel
  reshaped to ``[kh*kw*Cin, Cout]``: one matmul. Backward: the weight gradient is one
  matmul ``patches^T @ dy`` (a batched matmul under vmap, not a grouped convolution), the
  input gradient is one matmul followed by the transpose of the slices (pads + adds, fused).
  Any stride and padding.

``"shift_matmul"`` (stride 1 only)
  One matmul of the *unpadded* input with all taps at once, ``x[N*H*W, Cin] @
  W[Cin, kh*kw*Cout]``, then the output is the sum of ``kh*kw`` shifted slices of the
  (padded) result, ``y[i, j] = sum_ab z[i + a - p, j + b - p, a, b]``. Strided layers raise
  ``ValueError`` (computing all input positions would waste ``stride**2`` in FLOPs). Kept for
  reference: on XLA:CPU the 5-D pad/slice/sum and its transpose fuse badly (whole MNIST_CNN
  step ~6x slower than ``"im2col"``, with im2col for the strided layer).

``"xla_mmdw"``
  ``"xla"`` for the forward pass and the input gradient, but the *weight* gradient as one
  matmul ``dy^T[Cout, M] @ patches[M, kh*kw*Cin]`` (a ``jax.custom_jvp`` whose tangent in the
  kernel is written as that matmul, so JAX's transpose of it is the matmul; still
  differentiable to any order). XLA:CPU's convolution weight-gradient runs at ~1/4 of the
  matmul rate (~1/12 under ``vmap``, where it becomes a grouped convolution); this is
  ``"xla"`` with that fixed.

``"auto"``
  ``"xla"`` on GPU/TPU, the fastest measured CPU lowering (:data:`CPU_DEFAULT`) on CPU;
  inside :func:`vmapped_runs` (the engine's step of K > 1 runs in one vmapped program, where
  kernel and input are both batched and XLA:CPU lowers ``"xla"``'s forward, input and weight
  gradients to grouped convolutions) :data:`CPU_VMAPPED_RUNS_DEFAULT` on CPU. The choice is
  made at trace time from ``jax.default_backend()``. (On CPU the engine maps K runs with a
  trace-time loop by default, ``runs_impl="auto"``, faster still: each run's convolutions are
  then one run's, and :func:`vmapped_runs` applies only with ``runs_impl="vmap"``.)

Measured (``bench/conv_lowering.py``; 2-core Sapphire Rapids VM shared with other jobs, so
compare ratios; ``x floor(cpu)`` = CPU time / (55.95 GFLOP / in-process 2048^3 matmul rate)),
value_and_grad of MNIST_CNN on 2 domains x 64 images:

  ================  ======  ========  =====
  impl              pooled  unrolled  vmap
  ================  ======  ========  =====
  ``xla_mmdw``      2.57x   2.53x     2.72x
  ``xla``           2.89x   2.66x     5.77x
  ``im2col``        2.95x   2.90x     3.11x
  ================  ======  ========  =====

(s2d for the strided layer 3.3x, channel-major im2col 3.9x, a row-hybrid shift 4.2x, pooled;
``shift_matmul`` ~15x.) No XLA:CPU flag (oneDNN, XNNPACK/YNNPACK fusion types, XNN graph
fusion, no-XNNPACK, 512-bit vectors) moved these ratios by more than the noise.
``CPU_DEFAULT`` is ``"xla_mmdw"``: the fastest in every placement, and the only one that makes
``vmap`` over domains as cheap as the unrolled loop.

Runs vmapped (jax 0.10.2, one thread, CPU time, MNIST_CNN, K = 2 runs x 128 images, each
run its own params; ``bench/RESULTS.md``, "CPU parity"): value_and_grad ``"im2col"`` 2778 ms,
``"xla_mmdw"`` 4879, ``"xla"`` 9301 (one run pooled: 1590 / 1224 / 1258); forward only,
K = 2 x 256: ``"im2col"`` 1985, ``"xla_mmdw"`` 3850, ``"xla"`` 3815. Hence
``CPU_VMAPPED_RUNS_DEFAULT = "im2col"``: batched matmuls where the others become grouped
convolutions. The loop over runs beats it (``bench/step_time.py --runs 4``, one thread, 4
ERM runs of 2 x 64: 4308 ms unrolled with ``"xla_mmdw"`` against 5159 vmapped with
``"im2col"``). Accuracy note: in float32 on MNIST_CNN,
``"xla"`` and ``"xla_mmdw"`` per-domain grads are ~3.5e-3 (relative to each leaf's max) from
the float64 result, ``"im2col"`` ~2e-6 -- the difference comes from XLA's stride-2 convolution
inside the whole graph (single-layer tests agree to 1e-6); use ``"im2col"`` if that matters.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Dict, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

ConvFn = Callable[[jax.Array, jax.Array, int, int], jax.Array]

# The CPU lowerings picked by impl="auto" (see the module docstring for the measurements):
# one run, and a step traced inside vmapped_runs().
CPU_DEFAULT = "xla_mmdw"
CPU_VMAPPED_RUNS_DEFAULT = "im2col"

_VMAPPED_RUNS = contextvars.ContextVar("dgjax_conv_vmapped_runs", default=False)


@contextlib.contextmanager
def vmapped_runs() -> Iterator[None]:
  """Within this context (at trace time), ``impl="auto"`` resolves as for a step mapped over
  K > 1 runs, each with its own kernels (:data:`CPU_VMAPPED_RUNS_DEFAULT` on CPU). The
  engine traces its K-run step inside it (:func:`dgjax.train.train_many`)."""
  token = _VMAPPED_RUNS.set(True)
  try:
    yield
  finally:
    _VMAPPED_RUNS.reset(token)


def _out_size(n: int, k: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - k) // stride + 1


def _check(x, kernel, stride, padding):
  if x.ndim != 4:
    raise ValueError(f"conv2d expects NHWC input of rank 4, got shape {x.shape}")
  if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"kernel must be HWIO with I={x.shape[3]}, got shape {kernel.shape}")
  if stride < 1 or padding < 0:
    raise ValueError(f"need stride >= 1 and padding >= 0, got stride={stride}, padding={padding}")
  kh, kw = kernel.shape[:2]
  ho = _out_size(x.shape[1], kh, stride, padding)
  wo = _out_size(x.shape[2], kw, stride, padding)
  if ho < 1 or wo < 1:
    raise ValueError(
      f"empty output for input {x.shape}, kernel {kernel.shape}, stride {stride}, padding {padding}"
    )
  return kh, kw, ho, wo


def _pad_hw(x, padding):
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _taps(x, kh, kw, ho, wo, stride, padding):
  """The ``kh*kw`` (strided) windows of the padded input, each ``[N, Ho, Wo, C]``."""
  xp = _pad_hw(x, padding)
  return [
    xp[:, a : a + stride * (ho - 1) + 1 : stride, b : b + stride * (wo - 1) + 1 : stride, :]
    for a in range(kh)
    for b in range(kw)
  ]


def _matmul_last(x, w):
  """``x[..., K] @ w[K, M]`` as one dot_general (XLA treats the leading dims as rows)."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _patches(x, kh, kw, ho, wo, stride, padding):
  """Tap-major im2col patches ``[N, Ho, Wo, kh*kw*Cin]``."""
  return jnp.concatenate(_taps(x, kh, kw, ho, wo, stride, padding), axis=-1)


def conv_xla(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def conv_im2col(x, kernel, stride, padding):
  kh, kw, ho, wo = _check(x, kernel, stride, padding)
  patches = _patches(x, kh, kw, ho, wo, stride, padding)
  return _matmul_last(patches, kernel.reshape(kh * kw * kernel.shape[2], kernel.shape[3]))


def conv_shift_matmul(x, kernel, stride, padding):
  kh, kw, ho, wo = _check(x, kernel, stride, padding)
  if stride != 1:
    raise ValueError(
      f"impl='shift_matmul' supports stride 1 only (got stride {stride}); use "
      "'im2col' or 'xla_mmdw' for strided layers"
    )
  n, h, w, cin = x.shape
  cout = kernel.shape[3]
  wk = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  z = _matmul_last(x, wk).reshape(n, h, w, kh * kw, cout)
  zp = jnp.pad(z, ((0, 0), (padding, padding), (padding, padding), (0, 0), (0, 0)))
  y = None
  for a in range(kh):
    for b in range(kw):
      t = zp[:, a : a + ho, b : b + wo, a * kw + b, :]
      y = t if y is None else y + t
  return y


def _weight_grad_tangent(x, tw, stride, padding, form):
  """``conv(x, tw)`` written as a matmul whose *transpose* (the weight gradient) is a
  well-shaped matmul on XLA:CPU: ``g^T[Cout, M] @ patches[M, K]`` (``form="gtp"``) or
  ``patches^T[K, M] @ g[M, Cout]`` (``form="ptg"``)."""
  kh, kw, cin, cout = tw.shape
  ho, wo = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
  p = _patches(x, kh, kw, ho, wo, stride, padding)
  if form == "ptg":
    return _matmul_last(p, tw.reshape(kh * kw * cin, cout))
  # [Cout, K] x [N, Ho, Wo, K] -> [Cout, N, Ho, Wo] -> NHWC
  wt = tw.reshape(kh * kw * cin, cout).T
  t = jax.lax.dot_general(wt, p, (((1,), (3,)), ((), ())))
  return jnp.transpose(t, (1, 2, 3, 0))


def _make_xla_mmdw(form):
  @functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
  def f(x, kernel, stride, padding):
    return conv_xla(x, kernel, stride, padding)

  @f.defjvp
  def f_jvp(stride, padding, primals, tangents):
    x, kernel = primals
    tx, tw = tangents
    y = f(x, kernel, stride, padding)
    ty = conv_xla(tx, kernel, stride, padding) + _weight_grad_tangent(x, tw, stride, padding, form)
    return y, ty

  def conv(x, kernel, stride, padding):
    _check(x, kernel, stride, padding)
    return f(x, kernel, stride, padding)

  return conv


conv_xla_mmdw = _make_xla_mmdw("gtp")


CONV_IMPLS: Dict[str, ConvFn] = {
  "xla": conv_xla,
  "im2col": conv_im2col,
  "shift_matmul": conv_shift_matmul,
  "xla_mmdw": conv_xla_mmdw,
}


def resolve_impl(impl: str) -> str:
  """``"auto"`` -> ``"xla"`` on GPU/TPU, :data:`CPU_DEFAULT` on CPU
  (:data:`CPU_VMAPPED_RUNS_DEFAULT` inside :func:`vmapped_runs`); others unchanged."""
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    return CPU_VMAPPED_RUNS_DEFAULT if _VMAPPED_RUNS.get() else CPU_DEFAULT
  return impl


def conv2d(
  x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 1, impl: str = "xla"
) -> jax.Array:
  """NHWC convolution, HWIO kernel, symmetric zero padding ``padding`` (as torch.nn.Conv2d).

  ``impl`` selects the lowering (module docstring); all are the same function, differentiable
  to any order and usable under ``jit`` / ``vmap``.
  """
  name = resolve_impl(impl)
  try:
    fn = CONV_IMPLS[name]
  except KeyError:
    raise ValueError(
      f"unknown conv impl {impl!r}; expected one of {sorted(CONV_IMPLS) + ['auto']}"
    ) from None
  _check(x, kernel, stride, padding)
  return fn(x, kernel, stride, padding)


class Conv(nn.Module):
  """``torch.nn.Conv2d(c_in, features, kernel_size, stride, padding)`` in NHWC.

  Parameters are named like ``flax.linen.Conv`` (``kernel`` HWIO, ``bias``), initialised as
  PyTorch does (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
  both kernel and bias). ``impl`` is passed to :func:`conv2d`.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    fan_in = c_in * self.kernel_size * self.kernel_size
    bound = 1.0 / jnp.sqrt(fan_in)
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound
    )
    kernel = self.param("kernel", init, (self.kernel_size, self.kernel_size, c_in, self.features))
    bias = self.param("bias", init, (self.features,))
    y = conv2d(x, kernel.astype(x.dtype), self.stride, self.padding, self.impl)
    return y + bias.astype(x.dtype)
