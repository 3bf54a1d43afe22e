"""``torch.nn.functional.conv2d`` in NHWC/HWIO with a faster kernel gradient on XLA:CPU.

:func:`conv2d` is XLA's convolution forward and for the input gradient. On the CPU
backend (``impl='auto'``), for convolutions with enough channels and work, it computes
the kernel gradient as one matmul per kernel tap instead of XLA:CPU's slow
weight-gradient convolution (BENCHMARKS.md); on other backends it is plain
``lax.conv_general_dilated`` with XLA's own gradient.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, kernel: Array, stride: int, padding: int, dilation: int,
          precision: Any) -> Array:
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((padding, padding),) * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSION_NUMBERS,
      precision=precision)


#: Kernel-gradient work (``2 B Ho Wo C_in C_out k^2`` FLOPs) from which :func:`conv2d`
#: computes a ``k > 1`` kernel gradient with per-tap matmuls; smaller ones keep XLA's
#: transposed convolution (as fast there, and 9 slices + matmuls per convolution add
#: XLA compile time for no gain). 1x1 convolutions always use the matmul.
TAP_KERNEL_GRAD_MIN_FLOPS = 2e8
#: Input channels below which XLA's kernel gradient is kept (the stem's 3 channels).
TAP_KERNEL_GRAD_MIN_FEATURES = 16


def _use_tap_kernel_grad(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                         stride: int, padding: int, dilation: int) -> bool:
  b, h, w, c = x_shape
  k, o = kernel_shape[0], kernel_shape[-1]
  if c < TAP_KERNEL_GRAD_MIN_FEATURES:
    return False
  if k == 1:
    return True
  ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  return 2 * b * ho * wo * c * o * k * k >= TAP_KERNEL_GRAD_MIN_FLOPS


#: The :func:`conv2d` implementations (``impl``).
IMPLS = ("auto", "taps", "conv")


def resolve_impl(impl: str) -> str:
  """``'taps'`` or ``'conv'``: ``'auto'`` is ``'taps'`` on the CPU backend, else ``'conv'``."""
  if impl not in IMPLS:
    raise ValueError(f"conv2d impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "taps" if jax.default_backend() == "cpu" else "conv"
  return impl


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, precision: Any = None, impl: str = "auto") -> Array:
  """NHWC/HWIO convolution with symmetric zero padding (``torch.nn.functional.conv2d``).

  Two implementations of the same function (``impl``), both with XLA's forward pass
  and input gradient:

  * ``'conv'``: ``lax.conv_general_dilated`` and its autodiff.
  * ``'taps'``: the kernel gradient of a convolution with at least
    :data:`TAP_KERNEL_GRAD_MIN_FEATURES` input channels (and, for ``k > 1``, at least
    :data:`TAP_KERNEL_GRAD_MIN_FLOPS` of work; smaller ones as ``'conv'``) is computed as
    one matmul per kernel tap,
    ``dK[ki, kj] = sum_{b,y,x} x_pad[b, y*s + ki*d, x*s + kj*d, :]^T dy[b, y, x, :]``,
    instead of XLA's transposed convolution: XLA:CPU runs that "weight-gradient
    convolution" (a window as large as the feature map) several times slower than the
    forward convolution (e.g. 4-7 s against 0.6-0.9 s for a 3x3 128->128 convolution on
    4x256x256 maps; BENCHMARKS.md). Same sums in a different order: the results agree to
    float32 round-off (and to 1e-13 in float64). Taps that only ever see the zero padding
    (large dilations on small maps) get an exact zero gradient without a matmul.
  * ``'auto'`` (default): ``'taps'`` when JAX's default backend is the CPU (where it was
    measured), else ``'conv'`` (XLA's own weight-gradient convolution, cuDNN's on GPUs).
  """
  if (resolve_impl(impl) == "conv"
      or not _use_tap_kernel_grad(x.shape, kernel.shape, stride, padding, dilation)):
    return _conv(x, kernel, stride, padding, dilation, precision)
  return _tap_grad_conv(stride, padding, dilation, precision)(x, kernel)


def _kernel_grad_by_taps(x: Array, dy: Array, kernel: Array, stride: int, padding: int,
                         dilation: int, precision: Any) -> Array:
  """``d conv / d kernel`` as one matmul per tap: ``[k, k, C_in, C_out]`` like
  ``kernel``.

  Each tap is a ``[N, C_in]^T [N, C_out]`` matmul with ``N = B*Ho*Wo`` over the tap's
  view of the padded input (XLA:CPU takes the transposed operand as is; a per-image
  batched form makes it insert transpose copies). The views are copies as large as the
  input, so the taps run one after the other, inside a ``scan`` (stride 1) or chained
  by optimisation barriers (strided), which keeps one view alive at a time: left free,
  XLA's scheduler starts all views of all convolutions early (2.5x the temporary
  memory of the whole train step).
  """
  b, h, w, c = x.shape
  _, ho, wo, o = dy.shape
  k, s, d, p = kernel.shape[0], stride, dilation, padding
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
  dy2 = dy.reshape(-1, o)

  def touches_data(offset: int, n_out: int, n_in: int) -> bool:
    # Padded rows offset, offset + s, ..., offset + (n_out - 1) * s vs data rows [p, p + n_in).
    first = max(0, -(-(p - offset) // s))
    return first <= n_out - 1 and offset + first * s < p + n_in

  # Under a mesh with explicit axes the contraction runs over the (data-sharded) batch,
  # so the output sharding must be named: that of the kernel (replicated in the spine).
  out_sharding = None
  if not jax.sharding.get_abstract_mesh().empty:
    spec = tuple(jax.typeof(kernel).sharding.spec) + (None,) * 4
    out_sharding = jax.sharding.PartitionSpec(spec[2], spec[3])

  def tap_matmul(view: Array) -> Array:
    return lax.dot_general(view.reshape(-1, c), dy2, (((0,), (0,)), ((), ())),
                           precision=precision, out_sharding=out_sharding)

  live = [(ki, kj) for ki in range(k) for kj in range(k)
          if touches_data(ki * d, ho, h) and touches_data(kj * d, wo, w)]
  if len(live) == 1 and (ho, wo) == xp.shape[1:3] and s == 1:
    parts = tap_matmul(xp)[None]  # 1x1 convolution (or a single live tap spanning xp)
  elif s == 1 and len(live) > 1:
    starts = jnp.asarray([(ki * d, kj * d) for ki, kj in live], jnp.int32)

    def body(carry, start):
      zero_index = jnp.zeros((), start.dtype)
      view = lax.dynamic_slice(xp, (zero_index, start[0], start[1], zero_index),
                               (b, ho, wo, c))
      return carry, tap_matmul(view)

    _, parts = lax.scan(body, 0, starts)
  else:
    outs, prev = [], None
    for ki, kj in live:
      src = xp if prev is None else lax.optimization_barrier((xp, prev))[0]
      view = lax.slice(src, (0, ki * d, kj * d, 0),
                       (b, ki * d + (ho - 1) * s + 1, kj * d + (wo - 1) * s + 1, c),
                       (1, s, s, 1))
      prev = tap_matmul(view)
      outs.append(prev)
    parts = jnp.stack(outs)
  index = {tap: n for n, tap in enumerate(live)}
  zero = jnp.zeros((c, o), parts.dtype)
  taps = [parts[index[(ki, kj)]] if (ki, kj) in index else zero
          for ki in range(k) for kj in range(k)]
  return jnp.stack(taps).reshape(k, k, c, o)


@functools.lru_cache(maxsize=None)
def _tap_grad_conv(stride: int, padding: int, dilation: int,
                   precision: Any) -> Callable[[Array, Array], Array]:
  """``(x, kernel) -> conv`` with the per-tap kernel gradient as its VJP."""

  def forward(x: Array, kernel: Array) -> Array:
    return _conv(x, kernel, stride, padding, dilation, precision)

  @jax.custom_vjp
  def conv(x: Array, kernel: Array) -> Array:
    return forward(x, kernel)

  def conv_fwd(x: Array, kernel: Array):
    return forward(x, kernel), (x, kernel)

  def conv_bwd(residuals, dy: Array):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda x_: forward(x_, kernel), x)(dy)
    dk = _kernel_grad_by_taps(x, dy, kernel, stride, padding, dilation, precision)
    return dx, dk.astype(kernel.dtype)

  conv.defvjp(conv_fwd, conv_bwd)
  return conv
