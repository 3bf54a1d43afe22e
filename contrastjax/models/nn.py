"""PyTorch-convention layers in Flax linen (NHWC).

The models under ``contrastjax.models`` are ports of PyTorch reference code. The layers
here reproduce the PyTorch numerics that matter for weight-level parity:

* :func:`torch_default_kernel_init` / :func:`torch_default_bias_init`: PyTorch's default
  ``Conv2d`` / ``Linear`` initialisation.
* :class:`Conv2d`: explicit symmetric padding (Flax ``'SAME'`` pads asymmetrically for
  stride 2), HWIO kernels, PyTorch's default initialisation; the convolution itself is
  :func:`contrastjax.models.conv_grad.conv2d`.
* :class:`BatchNorm`: ``BatchNorm2d`` semantics (eps 1e-5, torch momentum 0.1, biased
  variance for normalising, *unbiased* variance for the running estimate), optionally
  with per-group statistics.
* :class:`CBR`: Conv -> BatchNorm -> ReLU.
* :func:`max_pool`: ``MaxPool2d`` with ``-inf`` padding.

The PyTorch ``state_dict`` naming of these layers and its I/O are in
:mod:`contrastjax.models.torch_import`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from contrastjax.models.conv_grad import conv2d

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


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
    impl: Kernel-gradient implementation of :func:`~contrastjax.models.conv_grad.conv2d`
      (``'auto'``: per-tap matmuls on the CPU backend, XLA's elsewhere).
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
  impl: str = "auto"

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
               dilation=self.dilation, precision=self.precision, impl=self.impl)
    if bias is not None:
      y = y + bias
    return y


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
