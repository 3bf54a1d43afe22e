"""PyTorch-convention building blocks in Flax linen (NHWC), and PyTorch weight import.

The models under ``contrastjax.models`` are ports of PyTorch reference code. The layers
here reproduce the PyTorch numerics that matter for weight-level parity:

* :class:`Conv2d`: explicit symmetric padding (Flax ``'SAME'`` pads asymmetrically for
  stride 2), HWIO kernels, PyTorch's default initialisation.
* :class:`BatchNorm`: ``BatchNorm2d`` semantics (eps 1e-5, torch momentum 0.1, biased
  variance for normalising, *unbiased* variance for the running estimate).
* :func:`max_pool`: ``MaxPool2d`` with ``-inf`` padding.

The PyTorch ``state_dict`` naming of the models and its I/O are in
:mod:`contrastjax.models.torch_import`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------- inits
def torch_default_kernel_init() -> Initializer:
  """PyTorch's default ``Conv2d``/``Linear`` weight init, ``kaiming_uniform_(a=sqrt(5))``.

  That is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, i.e. variance ``1/(3 fan_in)``.
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


TORCH_DEFAULT_KERNEL_INIT = torch_default_kernel_init()


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# ----------------------------------------------------------------------------- layers
class Conv2d(nn.Module):
  """``torch.nn.Conv2d`` in NHWC with an HWIO kernel and symmetric explicit padding.

  Attributes:
    features: Output channels.
    kernel_size: Square kernel size.
    stride: Stride in both spatial dimensions.
    padding: Zero padding ``p`` applied as ``((p, p), (p, p))``.
    dilation: Kernel dilation.
    use_bias: Whether to add a bias (PyTorch's default is ``True``; most convolutions in
      these models are followed by BatchNorm and pass ``False``).
    dtype: Compute dtype (``None``: the promoted dtype of input and kernel).
    param_dtype: Parameter dtype.
    kernel_init: Kernel initialiser (default: PyTorch's default).
    bias_init: Bias initialiser (default: PyTorch's default, from the fan-in).
    precision: ``lax`` precision of the convolution.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = TORCH_DEFAULT_KERNEL_INIT
  bias_init: Initializer | None = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the convolution to ``x`` of shape ``[B, H, W, C_in]``."""
    k = self.kernel_size
    in_features = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, in_features, self.features),
                        self.param_dtype)
    bias = None
    if self.use_bias:
      bias_init = self.bias_init or torch_default_bias_init(k * k * in_features)
      bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, stride=self.stride, padding=self.padding,
               dilation=self.dilation, precision=self.precision)
    if bias is not None:
      y = y + bias
    return y


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


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, precision: Any = None) -> Array:
  """NHWC/HWIO convolution with symmetric zero padding (``torch.nn.functional.conv2d``).

  The forward pass and the input gradient are XLA's. The kernel gradient of a
  convolution with at least :data:`TAP_KERNEL_GRAD_MIN_FEATURES` input channels (and,
  for ``k > 1``, at least :data:`TAP_KERNEL_GRAD_MIN_FLOPS` of work) is computed as one
  matmul per kernel tap,
  ``dK[ki, kj] = sum_{b,y,x} x_pad[b, y*s + ki*d, x*s + kj*d, :]^T dy[b, y, x, :]``,
  instead of XLA's transposed convolution: XLA:CPU runs that "weight-gradient
  convolution" (a window as large as the feature map) several times slower than the
  forward convolution (e.g. 4-7 s against 0.6-0.9 s for a 3x3 128->128 convolution on
  4x256x256 maps; BENCHMARKS.md). Same sums in a different order: the results agree to
  float32 round-off (and to 1e-13 in float64). Taps that only ever see the zero padding
  (large dilations on small maps) get an exact zero gradient without a matmul.
  """
  if not _use_tap_kernel_grad(x.shape, kernel.shape, stride, padding, dilation):
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


class BatchNorm(nn.Module):
  """``torch.nn.BatchNorm2d`` over the last (channel) axis.

  In training mode the input is normalised with the batch mean and the *biased* batch
  variance, and the running estimates are updated as PyTorch does:
  ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* batch
  variance ``var * n / (n - 1)`` for ``running_var``. Statistics are reduced over every
  axis but the last; under ``jit`` with a batch sharded over devices they are therefore
  global-batch statistics (SyncBatchNorm) without any ``axis_name``. Running statistics
  are not updated while the module is being initialised.

  Attributes:
    momentum: PyTorch-convention momentum (weight of the new batch statistic).
    epsilon: Added to the variance.
    dtype: Output dtype (``None``: the input dtype). Statistics are computed in at
      least float32.
    param_dtype: Dtype of ``scale`` and ``bias``.
    group_size: 0: statistics over the whole (global) batch. ``N``: training statistics
      per group of ``N`` consecutive entries of the leading axis, as unsynchronised
      ``BatchNorm`` on GPUs that hold ``N`` samples each; the running estimates then move
      by the mean over groups of the group statistics (in PyTorch each GPU keeps its own
      and rank 0's are saved).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  group_size: int = 0

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Normalises ``x``; ``train`` selects batch (True) or running (False) statistics."""
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean",
                                 lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var",
                                lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    dtype = self.dtype or x.dtype
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if train and self.group_size:
      return self._grouped(x, running_mean, running_var, scale, bias, dtype, stats_dtype)
    if train:
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(
            f"BatchNorm in training mode needs more than 1 value per channel, got input "
            f"shape {x.shape} (PyTorch raises here too).")
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(stats_dtype)
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = (1.0 - m) * running_mean.value + m * mean
        running_var.value = (1.0 - m) * running_var.value + m * var * (n / (n - 1))
    else:
      mean, var = running_mean.value, running_var.value
    mul = lax.rsqrt(var + self.epsilon) * scale.astype(stats_dtype)
    y = (x.astype(stats_dtype) - mean) * mul + bias.astype(stats_dtype)
    return y.astype(dtype)

  def _grouped(self, x, running_mean, running_var, scale, bias, dtype, stats_dtype):
    b, g = x.shape[0], int(self.group_size)
    if b % g:
      raise ValueError(f"BatchNorm group_size={g} does not divide the batch of {b} "
                       f"(input shape {x.shape}); set a group size that divides the batch")
    xg = x.astype(stats_dtype).reshape((b // g, g) + x.shape[1:])
    n = math.prod(xg.shape[1:-1])
    if n < 2:
      raise ValueError(
          f"BatchNorm in training mode needs more than 1 value per channel and group, got "
          f"input shape {x.shape} in groups of {g} (PyTorch raises here too).")
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    if not self.is_initializing():
      m = self.momentum
      flat = lambda v: v.reshape(-1, v.shape[-1]).mean(axis=0)  # noqa: E731
      running_mean.value = (1.0 - m) * running_mean.value + m * flat(mean)
      running_var.value = (1.0 - m) * running_var.value + m * flat(var) * (n / (n - 1))
    mul = lax.rsqrt(var + self.epsilon) * scale.astype(stats_dtype)
    y = (xg - mean) * mul + bias.astype(stats_dtype)
    return y.reshape(x.shape).astype(dtype)


class CBR(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional ReLU (the reference ``CBR``).

  Attributes:
    features: Output channels.
    kernel_size: Square kernel size.
    padding: Symmetric zero padding.
    dilation: Kernel dilation.
    stride: Stride.
    act: Whether to apply ReLU.
    dtype: Compute dtype.
  """
  features: int
  kernel_size: int = 3
  padding: int = 1
  dilation: int = 1
  stride: int = 1
  act: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies conv, BN and (optionally) ReLU to ``[B, H, W, C]`` input."""
    x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, self.dilation,
               use_bias=False, dtype=self.dtype, name="conv")(x)
    x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x) if self.act else x


def max_pool(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
  """``nn.MaxPool2d(window, stride, padding)`` on NHWC input, padding with ``-inf``."""
  return lax.reduce_window(
      x, -jnp.inf, lax.max, (1, window, window, 1),
      (1, stride, stride, 1), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
