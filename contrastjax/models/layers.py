"""PyTorch-convention building blocks in Flax linen (NHWC), and PyTorch weight import.

The models under ``contrastjax.models`` are ports of PyTorch reference code. The layers
here reproduce the PyTorch numerics that matter for weight-level parity:

* :class:`Conv2d`: explicit symmetric padding (Flax ``'SAME'`` pads asymmetrically for
  stride 2), HWIO kernels, PyTorch's default initialisation.
* :class:`BatchNorm`: ``BatchNorm2d`` semantics (eps 1e-5, torch momentum 0.1, biased
  variance for normalising, *unbiased* variance for the running estimate).
* :func:`resize_bilinear_align_corners` / :func:`upsample`: ``F.interpolate(mode=
  'bilinear', align_corners=True)``; ``jax.image.resize`` uses half-pixel centres instead.
* :func:`unfold` / :func:`fold`: ``nn.Unfold`` / ``F.fold`` with PyTorch's channel-major
  ``(c, ki, kj)`` patch layout.
* :func:`max_pool`: ``MaxPool2d`` with ``-inf`` padding.

The second half of the module maps Flax variable trees to PyTorch ``state_dict`` keys
(:class:`TorchNames`) and reads ``.pth`` / ``.npz`` / ``.safetensors`` files, so each model
file only declares its naming and calls :func:`load_state_dict` /
:func:`to_state_dict`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

logger = logging.getLogger(__name__)

Array = jax.Array
Dtype = Any
PyTree = Any
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


#: Input-channel count from which :func:`conv2d` computes kernel gradients with
#: per-tap matmuls (below it, XLA's transposed convolution is as fast or faster).
TAP_KERNEL_GRAD_MIN_FEATURES = 16


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, precision: Any = None) -> Array:
  """NHWC/HWIO convolution with symmetric zero padding (``torch.nn.functional.conv2d``).

  The forward pass and the input gradient are XLA's. The kernel gradient of a
  convolution with at least :data:`TAP_KERNEL_GRAD_MIN_FEATURES` input channels is
  computed as one matmul per kernel tap,
  ``dK[ki, kj] = sum_{b,y,x} x_pad[b, y*s + ki*d, x*s + kj*d, :]^T dy[b, y, x, :]``,
  instead of XLA's transposed convolution: XLA:CPU runs that "weight-gradient
  convolution" (a window as large as the feature map) several times slower than the
  forward convolution (e.g. 4-7 s against 0.6 s for a 3x3 128->128 convolution on
  4x256x256 maps; BENCHMARKS.md). Same sums in a different order: the results agree to
  float32 round-off (the matmul form is, if anything, closer to a float64 reference).
  Taps that only ever see the zero padding (large dilations on small maps) get an exact
  zero gradient without a matmul.
  """
  if x.shape[-1] < TAP_KERNEL_GRAD_MIN_FEATURES:
    return _conv(x, kernel, stride, padding, dilation, precision)
  return _tap_grad_conv(stride, padding, dilation, precision)(x, kernel)


def _kernel_grad_by_taps(x: Array, dy: Array, kernel: Array, stride: int, padding: int,
                         dilation: int, precision: Any) -> Array:
  """``d conv / d kernel`` as one matmul per tap: ``[k, k, C_in, C_out]`` like
  ``kernel``."""
  b, h, w, c = x.shape
  _, ho, wo, o = dy.shape
  k, s, d, p = kernel.shape[0], stride, dilation, padding
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x

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
  taps = []
  for ki in range(k):
    for kj in range(k):
      if not (touches_data(ki * d, ho, h) and touches_data(kj * d, wo, w)):
        taps.append(jnp.zeros((c, o), dy.dtype))
        continue
      start = (0, ki * d, kj * d, 0)
      limit = (b, ki * d + (ho - 1) * s + 1, kj * d + (wo - 1) * s + 1, c)
      xs = lax.slice(xp, start, limit, (1, s, s, 1))
      # One [N, C_in]^T [N, C_out] matmul with N = B*Ho*Wo (XLA:CPU takes the
      # transposed operand as is; a per-image batched form makes it transpose copies).
      taps.append(lax.dot_general(xs.reshape(-1, c), dy.reshape(-1, o),
                                  (((0,), (0,)), ((), ())), precision=precision,
                                  out_sharding=out_sharding))
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
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

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


class ChannelAttention(nn.Module):
  """CBAM channel attention as in the reference ``channel_attention``.

  The hidden width is hard-coded to ``C // 16`` (the reference ignores its ``ratio``
  argument); one bias-free 1x1 MLP is shared by the global average and max paths.
  ``out = x * sigmoid(mlp(avgpool(x)) + mlp(maxpool(x)))``.

  Attributes:
    dtype: Compute dtype.
  """
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Reweights the channels of ``[B, H, W, C]`` input."""
    channels = x.shape[-1]
    if channels < 16:
      raise ValueError(f"ChannelAttention needs at least 16 channels (hidden width "
                       f"C // 16), got {channels}")
    fc1 = Conv2d(channels // 16, 1, dtype=self.dtype, name="fc1")
    fc2 = Conv2d(channels, 1, dtype=self.dtype, name="fc2")
    avg = jnp.mean(x, axis=(1, 2), keepdims=True)
    mx = jnp.max(x, axis=(1, 2), keepdims=True)
    out = fc2(nn.relu(fc1(avg))) + fc2(nn.relu(fc1(mx)))
    return x * nn.sigmoid(out)


class SpatialAttention(nn.Module):
  """CBAM spatial attention: ``x * sigmoid(conv7x7(cat[mean_c(x), max_c(x)]))``.

  Attributes:
    dtype: Compute dtype.
  """
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Reweights the positions of ``[B, H, W, C]`` input."""
    pooled = jnp.concatenate(
        [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    att = Conv2d(1, 7, padding=3, dtype=self.dtype, name="conv1")(pooled)
    return x * nn.sigmoid(att)


def max_pool(x: Array, window: int = 3, stride: int = 2, padding: int = 1) -> Array:
  """``nn.MaxPool2d(window, stride, padding)`` on NHWC input, padding with ``-inf``."""
  return lax.reduce_window(
      x, -jnp.inf, lax.max, (1, window, window, 1),
      (1, stride, stride, 1), ((0, 0), (padding, padding), (padding, padding), (0, 0)))


# ----------------------------------------------------------------------------- resampling
@functools.lru_cache(maxsize=256)
def _align_corners_matrix(n_in: int, n_out: int, double: bool = False) -> np.ndarray:
  """``[n_out, n_in]`` linear-interpolation matrix with ``align_corners=True``.

  Mirrors PyTorch: ``scale = (n_in - 1) / (n_out - 1)`` (0 when ``n_out == 1``) and
  ``src = scale * i``, both in float32 (float64 for double inputs, like PyTorch's
  ``opmath`` type); the two neighbours ``floor(src)`` and ``min(floor(src) + 1,
  n_in - 1)`` get weights ``1 - frac`` and ``frac``.
  """
  ftype = np.float64 if double else np.float32
  scale = ftype((n_in - 1) / (n_out - 1)) if n_out > 1 else ftype(0.0)
  src = np.arange(n_out, dtype=ftype) * scale
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0.astype(ftype)
  mat = np.zeros((n_out, n_in), ftype)
  rows = np.arange(n_out)
  np.add.at(mat, (rows, i0), 1.0 - frac)
  np.add.at(mat, (rows, i1), frac)
  return mat


def resize_bilinear_align_corners(x: Array, size: tuple[int, int],
                                  precision: Any = None) -> Array:
  """``F.interpolate(x, size, mode='bilinear', align_corners=True)`` for NHWC ``x``.

  Implemented as two per-axis interpolation matrices applied with one einsum (dense
  matmuls, which suit accelerators; ``jax.image.resize`` uses half-pixel centres and
  differs by up to ~1 from the align-corners result).

  Args:
    x: ``[B, H, W, C]`` input.
    size: Output ``(H_out, W_out)``.
    precision: ``lax`` precision of the einsum.

  Returns:
    ``[B, H_out, W_out, C]`` in the dtype of ``x``.
  """
  h_out, w_out = size
  _, h_in, w_in, _ = x.shape
  if (h_in, w_in) == (h_out, w_out):
    return x
  double = x.dtype == jnp.float64
  mh = jnp.asarray(_align_corners_matrix(h_in, h_out, double), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(w_in, w_out, double), x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=precision)


def upsample(x: Array, scale: int, precision: Any = None) -> Array:
  """``nn.Upsample(scale_factor=scale, mode='bilinear', align_corners=True)``, NHWC."""
  _, h, w, _ = x.shape
  return resize_bilinear_align_corners(x, (h * scale, w * scale), precision)


def unfold(x: Array, kernel_size: int, padding: int) -> Array:
  """``nn.Unfold(kernel_size, padding=padding, stride=1)`` for NHWC input.

  Args:
    x: ``[B, H, W, C]``.
    kernel_size: Square window size ``k``.
    padding: Symmetric zero padding.

  Returns:
    ``[B, H', W', C*k*k]`` patches with PyTorch's channel-major ordering: channel
    ``c*k*k + ki*k + kj`` holds ``x[b, i + ki - padding, j + kj - padding, c]``.
    ``H' = H + 2*padding - k + 1`` (likewise ``W'``).
  """
  # Pure data movement: k*k shifted views of the padded map, stacked as the last
  # axis, so channel c*k*k + ki*k + kj comes out in PyTorch's order. (The identity
  # convolution of ``lax.conv_general_dilated_patches`` computes the same values with
  # C*C*k^4 multiply-adds per pixel: ~50x slower on CPU for the CDFA maps.)
  b, h, w, c = x.shape
  k = kernel_size
  ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  views = [xp[:, ki:ki + ho, kj:kj + wo, :] for ki in range(k) for kj in range(k)]
  return jnp.stack(views, axis=-1).reshape(b, ho, wo, c * k * k)


def fold(cols: Array, output_size: tuple[int, int], kernel_size: int,
         padding: int) -> Array:
  """``F.fold(cols, output_size, kernel_size, padding=padding, stride=1)`` in NHWC.

  The exact adjoint of :func:`unfold`: overlapping window entries are summed, without
  normalisation.

  Args:
    cols: ``[B, H', W', C*k*k]`` in :func:`unfold`'s channel ordering.
    output_size: ``(H, W)`` of the folded map.
    kernel_size: Square window size ``k``.
    padding: Symmetric padding used by the matching :func:`unfold`.

  Returns:
    ``[B, H, W, C]``.
  """
  k = kernel_size
  k2 = k * k
  if cols.shape[-1] % k2:
    raise ValueError(f"fold: channel count {cols.shape[-1]} is not a multiple of k*k={k2}")
  b, ho, wo, ck = cols.shape
  h, w = output_size
  if (ho, wo) != (h + 2 * padding - k + 1, w + 2 * padding - k + 1):
    raise ValueError(f"fold: {ho}x{wo} windows do not tile an {h}x{w} map with "
                     f"kernel {k} and padding {padding}")
  cols = cols.reshape(b, ho, wo, ck // k2, k2)
  # Sum of the k*k window entries, each padded back to its offset (pads and adds
  # fuse into one loop; scatter-adds do not).
  out = sum(jnp.pad(cols[..., ki * k + kj],
                    ((0, 0), (ki, k - 1 - ki), (kj, k - 1 - kj), (0, 0)))
            for ki in range(k) for kj in range(k))
  return out[:, padding:padding + h, padding:padding + w, :]


# ----------------------------------------------------------------------------- torch names
@dataclasses.dataclass(frozen=True)
class TorchNames:
  """How a Flax module's variables are named in a PyTorch ``state_dict``.

  Attributes:
    leaves: ``(collection, flax leaf name) -> (torch leaf name, transform)``, where
      transform is ``'conv'`` (HWIO <-> OIHW), ``'linear'`` ((in, out) <-> (out, in)) or
      ``'none'``.
    children: ``flax child name -> (torch segment, TorchNames of the child)``. The torch
      segment may contain dots (``'conv.0'``) or be empty (child flattened into parent).
  """
  leaves: Mapping[tuple[str, str], tuple[str, str]] = dataclasses.field(default_factory=dict)
  children: Mapping[str, tuple[str, TorchNames]] = dataclasses.field(default_factory=dict)


CONV_NAMES = TorchNames(leaves={("params", "kernel"): ("weight", "conv"),
                                ("params", "bias"): ("bias", "none")})
LINEAR_NAMES = TorchNames(leaves={("params", "kernel"): ("weight", "linear"),
                                  ("params", "bias"): ("bias", "none")})
BN_NAMES = TorchNames(leaves={("params", "scale"): ("weight", "none"),
                              ("params", "bias"): ("bias", "none"),
                              ("batch_stats", "mean"): ("running_mean", "none"),
                              ("batch_stats", "var"): ("running_var", "none")})
CBR_NAMES = TorchNames(children={"conv": ("conv.0", CONV_NAMES), "bn": ("conv.1", BN_NAMES)})
CHANNEL_ATTENTION_NAMES = TorchNames(children={"fc1": ("fc1", CONV_NAMES),
                                               "fc2": ("fc2", CONV_NAMES)})
SPATIAL_ATTENTION_NAMES = TorchNames(children={"conv1": ("conv1", CONV_NAMES)})


@dataclasses.dataclass(frozen=True)
class TorchLeaf:
  """Where one PyTorch tensor lives in a Flax variable tree."""
  collection: str
  path: tuple[str, ...]
  transform: str


def torch_mapping(variables: Mapping[str, PyTree], names: TorchNames,
                  collections: Iterable[str] = ("params", "batch_stats")
                  ) -> dict[str, TorchLeaf]:
  """Maps every leaf of ``variables`` to its PyTorch ``state_dict`` key.

  Args:
    variables: Flax variables (``{'params': ..., 'batch_stats': ...}``).
    names: Naming of the root module.
    collections: Collections to map (absent ones are skipped).

  Returns:
    ``{torch key: TorchLeaf}`` in a deterministic order.

  Raises:
    KeyError: A Flax variable has no declared PyTorch name (a naming bug).
  """
  mapping: dict[str, TorchLeaf] = {}
  for collection in collections:
    if collection not in variables:
      continue
    flat = traverse_util.flatten_dict(_to_dict(variables[collection]))
    for path in flat:
      node, segments = names, []
      for name in path[:-1]:
        if name not in node.children:
          raise KeyError(f"no PyTorch name declared for Flax module "
                         f"{collection}/{'/'.join(path[:-1])} (child {name!r})")
        segment, node = node.children[name]
        if segment:
          segments.append(segment)
      if (collection, path[-1]) not in node.leaves:
        raise KeyError(f"no PyTorch name declared for Flax variable "
                       f"{collection}/{'/'.join(path)}")
      leaf, transform = node.leaves[(collection, path[-1])]
      key = ".".join(segments + [leaf])
      if key in mapping:
        raise KeyError(f"PyTorch key {key!r} mapped twice")
      mapping[key] = TorchLeaf(collection, tuple(path), transform)
  return mapping


def _to_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  if transform == "linear":
    return np.transpose(value, (1, 0))
  return value


def _from_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if transform == "linear":
    return np.transpose(value, (1, 0))
  return value


def _torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  if transform == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == "linear":
    return (shape[1], shape[0])
  return tuple(shape)


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """Converts a torch tensor / jax array / array-like to a NumPy array."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      tensor = tensor.float()
    return tensor.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pragma: no cover - message path only
    raise TypeError(f"state dict entry {key!r} is not an array: {type(value)}") from e


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict into ``{key: np.ndarray}``.

  Args:
    source: A ``.pth``/``.pt``/``.bin``/``.ckpt`` file (read with ``torch.load``,
      ``weights_only=True``; needs torch), an ``.npz`` or ``.safetensors`` file, or an
      in-memory mapping of arrays/tensors. A checkpoint that wraps the state dict as
      ``{'state_dict': ...}`` or ``{'model': ...}`` is unwrapped; a ``'module.'`` prefix
      on every key (``DataParallel``) is removed.

  Returns:
    The state dict with NumPy values.

  Raises:
    FileNotFoundError: The file does not exist.
    ValueError: Unknown file suffix.
    ImportError: A ``.pth`` file without torch installed.
  """
  if isinstance(source, Mapping):
    raw: Mapping[str, Any] = source
  else:
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(f"weights file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
      try:
        import torch  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ImportError(f"reading {path} needs torch; install it or convert the file to "
                          f".npz/.safetensors") from e
      raw = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".npz":
      with np.load(path) as data:
        raw = {k: data[k] for k in data.files}
    elif suffix == ".safetensors":
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      raw = load_file(path)
    else:
      raise ValueError(f"unknown weights format {suffix!r} for {path}; expected .pth, .pt, "
                       f".bin, .ckpt, .npz or .safetensors")
  for wrapper in ("state_dict", "model"):
    if isinstance(raw, Mapping) and set(raw) == {wrapper} and isinstance(raw[wrapper], Mapping):
      raw = raw[wrapper]
  if not isinstance(raw, Mapping):
    raise ValueError(f"expected a state dict (mapping of name to tensor), got {type(raw)}")
  state = {str(k): _to_numpy(v, str(k)) for k, v in raw.items()}
  if state and all(k.startswith("module.") for k in state):
    logger.info("stripping the 'module.' prefix from %d state-dict keys", len(state))
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def _place_like(value: np.ndarray, like: Any) -> Any:
  """``value`` with the dtype (and, for jax arrays, the sharding) of ``like``."""
  dtype = getattr(like, "dtype", value.dtype)
  sharding = getattr(like, "sharding", None)
  if sharding is not None:
    return jax.device_put(np.asarray(value, dtype), sharding)
  return jnp.asarray(value, dtype)


def load_state_dict(variables: Mapping[str, PyTree], state_dict: Mapping[str, np.ndarray],
                    names: TorchNames, *, ignore: Callable[[str], bool] = lambda k: False,
                    what: str = "model") -> tuple[dict[str, PyTree], list[str]]:
  """Copies a PyTorch state dict into a Flax variable tree.

  Every Flax leaf covered by ``names`` must be present in ``state_dict`` with the right
  shape. ``num_batches_tracked`` buffers are skipped; other state-dict keys without a
  Flax leaf are an error unless ``ignore(key)`` is true, in which case they are logged
  and returned. If ``variables`` has no ``batch_stats`` collection, BatchNorm running
  statistics are ignored (and reported) as well.

  Args:
    variables: Flax variables; leaves may be arrays or ``jax.ShapeDtypeStruct`` (from
      ``jax.eval_shape``), only shape, dtype and sharding are used.
    state_dict: ``{torch key: array}`` (see :func:`read_state_dict`).
    names: Naming of the root module of ``variables``.
    ignore: Predicate for state-dict keys that may be left unused.
    what: Description of the source used in messages.

  Returns:
    ``(new_variables, ignored_keys)``: a copy of ``variables`` with every mapped leaf
    replaced (dtype and sharding of the old leaf kept), and the sorted list of ignored
    state-dict keys (excluding ``num_batches_tracked``).

  Raises:
    KeyError: A key the model needs is missing, or the state dict has keys that are
      neither used nor ignorable (the message names them).
    ValueError: A tensor has the wrong shape (the message names the key, the expected
      and the found PyTorch shape).
  """
  mapping = torch_mapping(variables, names)
  has_stats = "batch_stats" in variables
  state = dict(state_dict)
  tracked = [k for k in state if k.endswith("num_batches_tracked")]
  for k in tracked:
    del state[k]

  missing = sorted(k for k in mapping if k not in state)
  if missing:
    more = f" (and {len(missing) - 1} more: {missing[1:6]}...)" if len(missing) > 1 else ""
    hint = ""
    if len(missing) > len(mapping) // 2:
      hint = (f"; {len(missing)} of the model's {len(mapping)} keys are missing (wrong "
              f"source or naming? the state dict starts with {sorted(state)[:3]})")
    raise KeyError(f"{what}: missing key {missing[0]!r} in the state dict{more}{hint}")

  def ignorable(key: str) -> bool:
    if ignore(key):
      return True
    return not has_stats and key.endswith(("running_mean", "running_var"))

  unused = sorted(k for k in state if k not in mapping)
  unexpected = [k for k in unused if not ignorable(k)]
  if unexpected:
    raise KeyError(f"{what}: unexpected key {unexpected[0]!r} in the state dict "
                   f"({len(unexpected)} unexpected: {unexpected[:6]}...); the model has no "
                   f"such variable")

  flat = {c: traverse_util.flatten_dict(_to_dict(variables[c])) for c in variables}
  for key, leaf in mapping.items():
    value = np.asarray(state[key])
    target = flat[leaf.collection][leaf.path]
    expected = _torch_shape(tuple(target.shape), leaf.transform)
    if tuple(value.shape) != expected:
      raise ValueError(f"{what}: shape mismatch for {key!r}: expected {expected}, got "
                       f"{tuple(value.shape)}")
    flat[leaf.collection][leaf.path] = _place_like(
        _from_torch_layout(value, leaf.transform), target)

  if unused:
    groups: dict[str, int] = {}
    for key in unused:
      prefix = key.split(".", 1)[0]
      groups[prefix] = groups.get(prefix, 0) + 1
    summary = ", ".join(f"{p}.* ({n})" for p, n in groups.items())
    logger.warning("%s: ignored %d state-dict keys not used by the model: %s", what,
                   len(unused), summary)
    logger.debug("%s: ignored keys: %s", what, unused)
  if tracked:
    logger.info("%s: skipped %d num_batches_tracked buffers", what, len(tracked))
  logger.info("%s: loaded %d tensors", what, len(mapping))
  new_variables = {c: traverse_util.unflatten_dict(f) for c, f in flat.items()}
  return new_variables, unused


def to_state_dict(variables: Mapping[str, PyTree], names: TorchNames
                  ) -> dict[str, np.ndarray]:
  """Inverse of :func:`load_state_dict`: Flax variables to a PyTorch-layout state dict.

  A ``num_batches_tracked`` (int64 zero) is emitted next to each BatchNorm's running
  mean so that ``torch.nn.Module.load_state_dict(strict=True)`` accepts the result.

  Args:
    variables: Flax variables with concrete array leaves.
    names: Naming of the root module of ``variables``.

  Returns:
    ``{torch key: np.ndarray}``.
  """
  mapping = torch_mapping(variables, names)
  flat = {c: traverse_util.flatten_dict(_to_dict(variables[c])) for c in variables}
  state: dict[str, np.ndarray] = {}
  for key, leaf in mapping.items():
    value = np.asarray(jax.device_get(flat[leaf.collection][leaf.path]))
    state[key] = np.array(_to_torch_layout(value, leaf.transform), order="C")  # writable
    if leaf.collection == "batch_stats" and key.endswith("running_mean"):
      state[key[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  return state
