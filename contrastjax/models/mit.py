"""Mix Transformer (MiT-B0..B5), the SegFormer encoder, in Flax linen (NHWC).

SegFormer (Xie et al., NeurIPS 2021) encodes an image with four stages; stage ``i``
is an overlapping patch embedding (a strided convolution, 7x7/4 then 3x3/2, followed by
LayerNorm), ``depths[i]`` transformer blocks and a final LayerNorm::

  block(x) = x + DropPath(EfficientSelfAttention(LN1(x)))
             then x + DropPath(MixFFN(LN2(x)))
  EfficientSelfAttention: q = Wq x;  k|v = Wkv LN(Conv_{sr x sr, stride sr}(x))  (no
      reduction when sr = 1); softmax(q k^T / sqrt(d_head)) v; output projection.
  MixFFN: fc1 (C -> 4C) -> 3x3 depthwise conv -> GELU (exact erf) -> fc2 (4C -> C).

The encoder returns the four stage maps at strides 4/8/16/32 (NHWC). LayerNorm epsilon
is 1e-6 and stochastic depth rises linearly from 0 to ``drop_path_rate`` over all
blocks (``torch.linspace(0, rate, sum(depths))``), as in the reference (SiamSeg's
``mmseg/models/backbones/mit.py``, the official SegFormer ``mix_transformer.py`` and
Hugging Face's ``SegformerModel`` all compute the same function).

Flax variable names follow the official SegFormer checkpoints (``mit_b*.pth``):
``patch_embed1/proj``, ``block1_0/attn/q``, ``attn/kv`` (k and v packed in that order),
``attn/sr``, ``attn/norm``, ``attn/proj``, ``mlp/fc1``, ``mlp/dwconv``, ``mlp/fc2``,
``norm1`` (stage norm). :func:`load` reads that naming, the Hugging Face naming (Hub
files ``segformer.encoder.block.0.0.attention.self.query...`` and the in-memory names of
transformers >= 5, ``stages.0.blocks.0.attention.q_proj...``) and the mmseg naming
(``layers.0.1.0.attn.attn.in_proj_weight``, produced by ``mit2mmseg.py`` and used by
SiamSeg/mmseg checkpoints).

Options for training large inputs: ``remat=True`` recomputes each transformer block in
the backward pass (same numerics, less memory); ``dtype=jnp.bfloat16`` computes in
bfloat16 with float32 parameters (LayerNorm statistics and softmax stay float32).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from contrastjax.models.nn import Conv2d
from contrastjax.models.torch_import import (
    CONV_NAMES, LINEAR_NAMES, TorchNames, load_state_dict, read_state_dict,
    to_state_dict)
from contrastjax.models.transformer import dense as _dense
from contrastjax.models.transformer import drop_path as _drop_path
from contrastjax.models.transformer import index_leaf as _index_leaf
from contrastjax.models.transformer import layer_norm as _layer_norm
from contrastjax.models.transformer import stack_leaves as _stack_leaves

logger = logging.getLogger(__name__)

Array = jax.Array
Dtype = Any
PyTree = Any

#: Conv init of the reference: ``normal(0, sqrt(2 / fan_out))`` with
#: ``fan_out = k * k * out_channels / groups``, bias zero.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_WIDE = (64, 128, 320, 512)
#: MiT variants (SegFormer Table 6): embedding widths and blocks per stage. All use
#: heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1), MLP ratio 4, patch sizes (7, 3, 3, 3).
CONFIGS: dict[str, dict[str, tuple[int, ...]]] = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": dict(embed_dims=_WIDE, depths=(2, 2, 2, 2)),
    "b2": dict(embed_dims=_WIDE, depths=(3, 4, 6, 3)),
    "b3": dict(embed_dims=_WIDE, depths=(3, 4, 18, 3)),
    "b4": dict(embed_dims=_WIDE, depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=_WIDE, depths=(3, 6, 40, 3)),
}


def _depthwise_taps(k: int, d: int, p: int, h: int, w: int, ho: int, wo: int
                    ) -> list[tuple[int, int]]:
  """The kernel taps ``(i, j)`` of a ``k x k`` depthwise convolution that see at least one
  input value (taps that only ever see the padding, e.g. large dilations on small maps,
  contribute nothing and are skipped)."""
  rows = [i for i in range(k) if not (i * d + ho <= p or i * d >= p + h)]
  cols = [j for j in range(k) if not (j * d + wo <= p or j * d >= p + w)]
  return [(i, j) for i in rows for j in cols]


def _shifted_sum(x: Array, kernel: Array, k: int, p: int, d: int) -> Array:
  """Depthwise convolution (stride 1, no bias) as the sum of shifted views of the padded
  input times the per-channel tap weights, accumulated and returned in at least float32."""
  _, h, w, c = x.shape
  ho, wo = h + 2 * p - d * (k - 1), w + 2 * p - d * (k - 1)
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
  out = jnp.zeros((x.shape[0], ho, wo, c), acc_dtype)
  for i, j in _depthwise_taps(k, d, p, h, w, ho, wo):
    view = lax.slice(xp, (0, i * d, j * d, 0), (xp.shape[0], i * d + ho, j * d + wo, c))
    out = out + view.astype(acc_dtype) * kernel[i, j, 0].astype(acc_dtype)
  return out


#: Bytes of one tap's view per row block in :func:`_shifted_sum_bwd`'s kernel gradient
#: (16 MiB: nine such views stay in cache-friendly, bounded temporaries).
DEPTHWISE_GRAD_BLOCK_BYTES = 1 << 24


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted_sum_low_memory(x: Array, kernel: Array, k: int, p: int, d: int) -> Array:
  """:func:`_shifted_sum` with a hand-written backward pass that keeps only ``x`` and
  the kernel (see :class:`DepthwiseConv2d`, ``impl='shifts'``)."""
  return _shifted_sum(x, kernel, k, p, d)


def _shifted_sum_fwd(x, kernel, k, p, d):
  return _shifted_sum(x, kernel, k, p, d), (x, kernel)


def _shifted_sum_bwd(k, p, d, residuals, g):
  """Input gradient: the sum of the output gradient times each tap weight, placed back
  at the tap's offset (``lax.pad`` with negative edges crops), one fused loop. Kernel
  gradient: per tap, the sum over batch and pixels of the tap's view times the output
  gradient, in blocks of rows (``lax.fori_loop``) so that XLA:CPU, which materialises
  each view for its reduction, never holds more than nine row blocks of views."""
  x, kernel = residuals
  b, h, w, c = x.shape
  ho, wo = g.shape[1], g.shape[2]
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  taps = _depthwise_taps(k, d, p, h, w, ho, wo)
  ga = g.astype(acc_dtype)
  zero = jnp.zeros((), acc_dtype)
  dx = zero
  for i, j in taps:
    top, left = i * d - p, j * d - p
    dx = dx + lax.pad(ga * kernel[i, j, 0].astype(acc_dtype), zero,
                      ((0, 0, 0), (top, h - top - ho, 0), (left, w - left - wo, 0),
                       (0, 0, 0)))
  rows = max(1, min(ho, DEPTHWISE_GRAD_BLOCK_BYTES
                    // (b * wo * c * jnp.dtype(acc_dtype).itemsize)))
  blocks = -(-ho // rows)
  xp = jnp.pad(x, ((0, 0), (p, p + blocks * rows - ho), (p, p), (0, 0)))

  def tap_sums(r0, g_rows):
    return jnp.stack([
        jnp.sum(lax.dynamic_slice(xp, (0, r0 + i * d, j * d, 0),
                                  (b, g_rows.shape[1], wo, c)).astype(acc_dtype) * g_rows,
                axis=(0, 1, 2)) for i, j in taps])

  if blocks == 1:
    sums = tap_sums(0, ga)
  else:
    gp = jnp.pad(ga, ((0, 0), (0, blocks * rows - ho), (0, 0), (0, 0)))  # zero rows add 0
    sums = lax.fori_loop(
        0, blocks,
        lambda r, total: total + tap_sums(r * rows, lax.dynamic_slice_in_dim(gp, r * rows,
                                                                            rows, 1)),
        jnp.zeros((len(taps), c), acc_dtype))
  dk = jnp.zeros(kernel.shape, acc_dtype)
  for t, (i, j) in enumerate(taps):
    dk = dk.at[i, j, 0].set(sums[t])
  return (dx.astype(x.dtype) if taps else jnp.zeros_like(x)), dk.astype(kernel.dtype)


_shifted_sum_low_memory.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)

#: ``DepthwiseConv2d.impl`` values.
DEPTHWISE_IMPLS = ("auto", "shifts", "shifts_autodiff", "conv")


class DepthwiseConv2d(nn.Module):
  """``nn.Conv2d(C, C, k, groups=C)`` (stride 1) in NHWC with an HWIO ``[k, k, 1, C]`` kernel.

  Implementations of the same function (``impl``):

  * ``'shifts'``: the sum of ``k * k`` shifted views of the zero-padded input times the
    per-channel tap weights (accumulated in at least float32), which XLA fuses into one
    elementwise loop, with a hand-written backward pass (``jax.custom_vjp``) that keeps
    only the input and computes the kernel gradient in row blocks. On XLA:CPU the
    grouped convolution is ~10x slower forward+backward (3.7 s against 0.35 s on a
    1x128x128x256 map). Taps that only ever see the padding (large dilations on small
    maps) are skipped.
  * ``'shifts_autodiff'``: the same forward with XLA's own gradient. XLA:CPU then
    materialises every tap's shifted view for the kernel-gradient reductions (nine
    input-sized copies per convolution): on DAFormer's three dilated 4x128x128x1024
    depthwise layers 7.6 GiB of temporaries and 6.3 s against 1.5 GiB and 2.5 s for
    ``'shifts'`` (BENCHMARKS.md). Same function, gradients equal up to float
    rounding; the SiamSeg demo config keeps it so that its README numbers stay bitwise.
  * ``'conv'``: ``lax.conv_general_dilated`` with ``feature_group_count = C`` (cuDNN's
    depthwise kernels on GPUs, the MXU path on TPUs); on an H200 the MiT-B5 SiamSeg step
    needs several times less memory this way (BENCHMARKS.md).
  * ``'auto'`` (default): ``'shifts'`` when JAX's default backend is the CPU, else
    ``'conv'``.

  Attributes:
    kernel_size: Square kernel size.
    padding: Symmetric zero padding.
    dilation: Kernel dilation.
    use_bias: Whether to add a bias.
    dtype: Compute dtype (``None``: promoted dtype of input and kernel).
    param_dtype: Parameter dtype.
    kernel_init: Kernel initialiser.
    precision: ``lax`` precision of the ``'conv'`` implementation.
    impl: One of :data:`DEPTHWISE_IMPLS` (see above).
  """
  kernel_size: int = 3
  padding: int = 1
  dilation: int = 1
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] = CONV_INIT
  precision: Any = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Filters each channel of ``[B, H, W, C]`` input separately."""
    if self.impl not in DEPTHWISE_IMPLS:
      raise ValueError(f"DepthwiseConv2d.impl must be one of {DEPTHWISE_IMPLS}, got "
                       f"{self.impl!r}")
    k, p, d, c = self.kernel_size, self.padding, self.dilation, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    _, h, w, _ = x.shape
    ho, wo = h + 2 * p - d * (k - 1), w + 2 * p - d * (k - 1)
    if ho <= 0 or wo <= 0:
      raise ValueError(f"depthwise {k}x{k} (dilation {d}, padding {p}) does not fit a "
                       f"{h}x{w} input")
    impl = self.impl
    if impl == "auto":
      impl = "shifts" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv":
      out = lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((p, p), (p, p)),
          rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=c, precision=self.precision)
      return out + bias if bias is not None else out
    shifted_sum = _shifted_sum_low_memory if impl == "shifts" else _shifted_sum
    out = shifted_sum(x, kernel, k, p, d)
    if bias is not None:
      out = out + bias.astype(out.dtype)
    return out.astype(x.dtype)


class SpatialReduction(nn.Module):
  """``nn.Conv2d(C, C_out, kernel_size=r, stride=r)`` (non-overlapping patches) as a matmul.

  The input is cut into ``r x r`` patches (trailing rows/columns that do not fill a
  patch are dropped, as PyTorch does) and each patch is projected with the HWIO kernel
  flattened to ``[r * r * C, C_out]``: the same sums as the convolution, with a plain
  matmul gradient (XLA:CPU's strided-convolution gradients are slow to compile and run).

  Attributes:
    features: Output channels.
    ratio: Kernel size and stride ``r``.
    dtype: Compute dtype (``None``: promoted dtype of input and kernel).
    param_dtype: Parameter dtype.
    precision: ``lax`` precision.
  """
  features: int
  ratio: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, H, W, C]`` -> ``[B, H // r, W // r, features]``."""
    b, h, w, c = x.shape
    r = self.ratio
    kernel = self.param("kernel", CONV_INIT, (r, r, c, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    ho, wo = h // r, w // r
    if ho == 0 or wo == 0:
      raise ValueError(f"input {h}x{w} is smaller than the spatial-reduction ratio {r}")
    patches = x[:, :ho * r, :wo * r].reshape(b, ho, r, wo, r, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho, wo, r * r * c)
    y = jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(r * r * c, self.features),
                   precision=self.precision)
    return y + bias


class OverlapPatchEmbed(nn.Module):
  """Strided ``k x k`` convolution (padding ``k // 2``) followed by LayerNorm.

  Attributes:
    features: Embedding width.
    patch_size: Kernel size (7 for stage 1, 3 after).
    stride: Stride (4 for stage 1, 2 after).
    eps: LayerNorm epsilon.
    dtype: Compute dtype.
    precision: ``lax`` precision.
  """
  features: int
  patch_size: int
  stride: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, H, W, C_in]`` -> ``[B, H/stride, W/stride, features]``."""
    x = Conv2d(self.features, self.patch_size, self.stride, self.patch_size // 2,
               use_bias=True, dtype=self.dtype, kernel_init=CONV_INIT,
               bias_init=nn.initializers.zeros, precision=self.precision,
               name="proj")(x)
    return _layer_norm(self.eps, self.dtype, "norm")(x)


class EfficientSelfAttention(nn.Module):
  """SegFormer's efficient multi-head self-attention (reference ``Attention``).

  Keys and values come from the input shrunk by a ``sr x sr`` convolution with stride
  ``sr`` and a LayerNorm (sequence reduction; none when ``sr_ratio == 1``).

  Attributes:
    num_heads: Attention heads (the width must be divisible by it).
    sr_ratio: Spatial-reduction ratio.
    qkv_bias: Bias on the q and kv projections.
    eps: LayerNorm epsilon.
    dtype: Compute dtype; the softmax runs in float32.
    precision: ``lax`` precision.
  """
  num_heads: int
  sr_ratio: int = 1
  qkv_bias: bool = True
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Attends over the positions of ``[B, H, W, C]`` input; returns the same shape."""
    b, h, w, c = x.shape
    heads = self.num_heads
    if c % heads:
      raise ValueError(f"width {c} is not divisible by num_heads {heads}")
    head_dim = c // heads
    q = _dense(c, self.qkv_bias, self.dtype, self.precision, "q")(x)
    q = q.reshape(b, h * w, heads, head_dim)
    kv_in = x
    if self.sr_ratio > 1:
      kv_in = SpatialReduction(c, self.sr_ratio, dtype=self.dtype,
                               precision=self.precision, name="sr")(x)
      kv_in = _layer_norm(self.eps, self.dtype, "norm")(kv_in)
    n_kv = kv_in.shape[1] * kv_in.shape[2]
    kv = _dense(2 * c, self.qkv_bias, self.dtype, self.precision, "kv")(kv_in)
    kv = kv.reshape(b, n_kv, 2, heads, head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    logits = logits.astype(jnp.float32) * (head_dim ** -0.5)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v, precision=self.precision)
    out = out.reshape(b, h, w, c)
    return _dense(c, True, self.dtype, self.precision, "proj")(out)


@jax.custom_vjp
def gelu_saving_input(x: Array) -> Array:
  """``nn.gelu(x, approximate=False)`` (erf GELU) whose backward pass keeps only ``x``
  and computes ``gelu'(x) = Phi(x) + x phi(x)`` (in at least float32). XLA's gradient of
  the erf keeps several intermediates per element; in the scanned MiT stages each is
  written to its own stacked buffer per block (15% of the MiT-B5 forward + backward on
  XLA:CPU without remat, BENCHMARKS.md)."""
  return nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return nn.gelu(x, approximate=False), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  cdf = 0.5 * (1.0 + lax.erf(xf * (2 ** -0.5)))
  pdf = jnp.exp(-0.5 * xf * xf) * ((2 * np.pi) ** -0.5)
  return ((g.astype(xf.dtype) * (cdf + xf * pdf)).astype(x.dtype),)


gelu_saving_input.defvjp(_gelu_fwd, _gelu_bwd)

#: ``MixFFN.gelu_grad`` values: ``'input'`` (:func:`gelu_saving_input`) or
#: ``'autodiff'`` (XLA's gradient of the erf; the same function).
GELU_GRADS = ("input", "autodiff")


class MixFFN(nn.Module):
  """``fc1 -> 3x3 depthwise conv -> GELU (erf) -> fc2`` (reference ``Mlp``).

  Attributes:
    hidden_features: Width of the hidden layer (``mlp_ratio * C``).
    dtype: Compute dtype.
    precision: ``lax`` precision.
    depthwise: :class:`DepthwiseConv2d` ``impl``.
    gelu_grad: One of :data:`GELU_GRADS`: the GELU's backward pass.
  """
  hidden_features: int
  dtype: Dtype = jnp.float32
  precision: Any = None
  depthwise: str = "auto"
  gelu_grad: str = "input"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
    c = x.shape[-1]
    y = _dense(self.hidden_features, True, self.dtype, self.precision, "fc1")(x)
    y = DepthwiseConv2d(3, 1, dtype=self.dtype, precision=self.precision,
                        impl=self.depthwise, name="dwconv")(y)
    if self.gelu_grad not in GELU_GRADS:
      raise ValueError(f"gelu_grad must be one of {GELU_GRADS}, got {self.gelu_grad!r}")
    y = (gelu_saving_input(y) if self.gelu_grad == "input"
         else nn.gelu(y, approximate=False))
    return _dense(c, True, self.dtype, self.precision, "fc2")(y)


class Block(nn.Module):
  """Pre-norm transformer block with stochastic depth (reference ``Block``).

  Attributes:
    num_heads: Attention heads.
    sr_ratio: Spatial-reduction ratio of the attention.
    mlp_ratio: MixFFN hidden width / block width.
    drop_path: Stochastic-depth rate of this block (per-sample, rescaled by
      ``1 / (1 - rate)``; rng stream ``'dropout'``).
    qkv_bias: Bias on the q and kv projections.
    eps: LayerNorm epsilon.
    dtype: Compute dtype.
    precision: ``lax`` precision.
    depthwise: :class:`DepthwiseConv2d` ``impl`` of the MixFFN.
    gelu_grad: The MixFFN GELU's backward pass (:data:`GELU_GRADS`).
  """
  num_heads: int
  sr_ratio: int
  mlp_ratio: int = 4
  drop_path: float = 0.0
  qkv_bias: bool = True
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  precision: Any = None
  depthwise: str = "auto"
  gelu_grad: str = "input"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """Applies the block to ``[B, H, W, C]``; ``deterministic`` disables drop path."""
    return self._apply(x, deterministic, None)

  def _apply(self, x: Array, deterministic: bool, drop_rate: Array | None) -> Array:
    """The block; ``drop_rate`` (a traced scalar, from a scan over blocks) replaces the
    static ``drop_path`` when given."""
    c = x.shape[-1]
    if drop_rate is None:
      drop = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))(  # noqa: E731
          y, deterministic=deterministic)
    else:
      drop = lambda y: _drop_path(self, y, drop_rate, deterministic)  # noqa: E731
    y = _layer_norm(self.eps, self.dtype, "norm1")(x)
    y = EfficientSelfAttention(self.num_heads, self.sr_ratio, self.qkv_bias, self.eps,
                               self.dtype, self.precision, name="attn")(y)
    x = x + drop(y)
    y = _layer_norm(self.eps, self.dtype, "norm2")(x)
    y = MixFFN(self.mlp_ratio * c, self.dtype, self.precision, self.depthwise,
               self.gelu_grad, name="mlp")(y)
    return x + drop(y)


class _ScannedBlock(Block):
  """:class:`Block` as the body of ``nn.scan`` over a stage's blocks: carry ``x``,
  scanned input the block's stochastic-depth rate."""
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, drop_rate: Array) -> tuple[Array, None]:
    return self._apply(x, self.deterministic, drop_rate).astype(x.dtype), None


#: ``MixVisionTransformer.remat_policy`` values and their ``jax.checkpoint`` policies.
REMAT_POLICIES: dict[str, Any] = {
    "nothing": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "all_dots": jax.checkpoint_policies.checkpoint_dots,
}


class MixVisionTransformer(nn.Module):
  """The MiT encoder (defaults: MiT-B5 as used by SiamSeg/DAFormer).

  Attributes:
    embed_dims: Width of each stage.
    depths: Transformer blocks per stage.
    num_heads: Attention heads per stage.
    sr_ratios: Spatial-reduction ratio per stage.
    patch_sizes: Patch-embedding kernel per stage (padding ``k // 2``).
    strides: Patch-embedding stride per stage.
    mlp_ratio: MixFFN hidden width / stage width.
    qkv_bias: Bias on the q and kv projections.
    drop_path_rate: Stochastic depth of the last block; block ``i`` of ``n`` uses
      ``rate * i / (n - 1)``.
    eps: LayerNorm epsilon (1e-6 in the reference).
    remat: Rematerialise each block in the backward pass (``nn.remat``).
    remat_policy: What a rematerialised block keeps from its forward pass, one of
      :data:`REMAT_POLICIES`: ``'nothing'`` (recompute the whole block), ``'dots'``
      (keep the outputs of the matmuls without batch dimensions, i.e. the linear
      layers: ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``), ``'all_dots'``
      (also the attention products: ``checkpoint_dots``). Same numbers; more memory,
      less recomputation.
    scan_blocks: Run each stage's blocks as one ``nn.scan`` over stacked parameters
      (``block{i}/...`` with a leading block axis instead of ``block{i}_{j}/...``): the
      same function, compiled once per stage instead of once per block (MiT-B5's 52
      blocks), so XLA compiles several times faster. Stochastic depth draws differ from
      the unrolled model's (another rng split); :func:`stack_blocks` /
      :func:`unstack_blocks` convert parameters between the two layouts, and
      :func:`load` / :func:`to_torch_state_dict` accept both.
    dtype: Compute dtype (e.g. ``jnp.bfloat16``); parameters stay ``param``-float32.
    precision: ``lax`` precision of matmuls and convolutions.
    depthwise: The MixFFN depthwise convolutions' implementation, one of
      :data:`DEPTHWISE_IMPLS` (see :class:`DepthwiseConv2d`; the same function).
    gelu_grad: The MixFFN GELUs' backward pass, one of :data:`GELU_GRADS`
      (:func:`gelu_saving_input`; the same function).
  """
  embed_dims: Sequence[int] = _WIDE
  depths: Sequence[int] = (3, 6, 40, 3)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  patch_sizes: Sequence[int] = (7, 3, 3, 3)
  strides: Sequence[int] = (4, 2, 2, 2)
  mlp_ratio: int = 4
  qkv_bias: bool = True
  drop_path_rate: float = 0.1
  eps: float = 1e-6
  remat: bool = False
  remat_policy: str = "nothing"
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32
  precision: Any = None
  depthwise: str = "auto"
  gelu_grad: str = "input"

  def drop_path_rates(self) -> list[float]:
    """Per-block stochastic-depth rates, ``linspace(0, drop_path_rate, sum(depths))``."""
    n = sum(self.depths)
    return [self.drop_path_rate * i / max(n - 1, 1) for i in range(n)]

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               deterministic: bool | None = None) -> tuple[Array, Array, Array, Array]:
    """Encodes images.

    Args:
      x: ``[B, H, W, C]`` images.
      train: Training mode; enables stochastic depth (needs the ``'dropout'`` rng).
      deterministic: Overrides ``not train`` for stochastic depth (e.g. a teacher
        forward in training mode without drop path).

    Returns:
      The four stage maps ``[B, H/4, W/4, embed_dims[0]]`` ... ``[B, H/32, W/32,
      embed_dims[3]]`` (for H, W multiples of 32; otherwise each stride-s convolution
      rounds as PyTorch does) in ``dtype``.
    """
    n_stages = len(self.depths)
    sizes = {len(getattr(self, f)) for f in ("embed_dims", "num_heads", "sr_ratios",
                                             "patch_sizes", "strides")}
    if sizes != {n_stages}:
      raise ValueError(f"embed_dims, depths, num_heads, sr_ratios, patch_sizes and "
                       f"strides must have the same length, got {self}")
    if x.ndim != 4:
      raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
    det = (not train) if deterministic is None else deterministic
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}, got "
                       f"{self.remat_policy!r}")
    policy = REMAT_POLICIES[self.remat_policy]
    block_cls = (nn.remat(Block, static_argnums=(2,), policy=policy) if self.remat
                 else Block)
    rates = self.drop_path_rates()
    x = x.astype(self.dtype)
    outs = []
    cur = 0
    for i in range(n_stages):
      x = OverlapPatchEmbed(self.embed_dims[i], self.patch_sizes[i], self.strides[i],
                            self.eps, self.dtype, self.precision,
                            name=f"patch_embed{i + 1}")(x)
      if self.scan_blocks and self.depths[i] > 0:
        cell = (nn.remat(_ScannedBlock, prevent_cse=False, policy=policy) if self.remat
                else _ScannedBlock)
        stage_rates = rates[cur:cur + self.depths[i]]
        # Stochastic depth only where it can drop something (as nn.Dropout(0.0), which
        # needs no 'dropout' rng).
        drops = not det and any(r > 0 for r in stage_rates)
        stage = nn.scan(cell, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": drops},
                        in_axes=0, length=self.depths[i])
        x, _ = stage(self.num_heads[i], self.sr_ratios[i], self.mlp_ratio, 0.0,
                     self.qkv_bias, self.eps, self.dtype, self.precision,
                     self.depthwise, self.gelu_grad, deterministic=not drops,
                     name=f"block{i + 1}")(
                         x, jnp.asarray(stage_rates, jnp.float32))
      else:
        for j in range(self.depths[i]):
          x = block_cls(self.num_heads[i], self.sr_ratios[i], self.mlp_ratio,
                        rates[cur + j], self.qkv_bias, self.eps, self.dtype,
                        self.precision, self.depthwise, self.gelu_grad,
                        name=f"block{i + 1}_{j}")(x, det)
      cur += self.depths[i]
      x = _layer_norm(self.eps, self.dtype, f"norm{i + 1}")(x)
      outs.append(x)
    return tuple(outs)


Model = MixVisionTransformer


def mit(variant: str = "b5", **overrides: Any) -> MixVisionTransformer:
  """A :class:`MixVisionTransformer` of a named size (``'b0'`` .. ``'b5'``).

  Args:
    variant: Key of :data:`CONFIGS` (a leading ``'mit_'``/``'mit-'`` is accepted).
    **overrides: Other attributes (``remat``, ``dtype``, ``drop_path_rate``, ...).
  """
  key = variant.lower().replace("mit_", "").replace("mit-", "")
  if key not in CONFIGS:
    raise ValueError(f"unknown MiT variant {variant!r}; expected one of {sorted(CONFIGS)}")
  return MixVisionTransformer(**{**CONFIGS[key], **overrides})


# ----------------------------------------------------------------------------- torch names
LN_NAMES = TorchNames(leaves={("params", "scale"): ("weight", "none"),
                              ("params", "bias"): ("bias", "none")})
_ATTN_NAMES = TorchNames(children={
    "q": ("q", LINEAR_NAMES), "kv": ("kv", LINEAR_NAMES),
    "proj": ("proj", LINEAR_NAMES), "sr": ("sr", CONV_NAMES),
    "norm": ("norm", LN_NAMES)})
_MLP_NAMES = TorchNames(children={
    "fc1": ("fc1", LINEAR_NAMES), "dwconv": ("dwconv.dwconv", CONV_NAMES),
    "fc2": ("fc2", LINEAR_NAMES)})
_BLOCK_NAMES = TorchNames(children={
    "norm1": ("norm1", LN_NAMES), "attn": ("attn", _ATTN_NAMES),
    "norm2": ("norm2", LN_NAMES), "mlp": ("mlp", _MLP_NAMES)})
_PATCH_EMBED_NAMES = TorchNames(children={
    "proj": ("proj", CONV_NAMES), "norm": ("norm", LN_NAMES)})
_BLOCK_RE = re.compile(r"^block(\d+)_(\d+)$")


def torch_names(params: Mapping[str, Any]) -> TorchNames:
  """Official SegFormer naming (``mit_b*.pth``) of a :class:`MixVisionTransformer`.

  Args:
    params: The encoder's ``params`` (only the top-level names are read).
  """
  children: dict[str, tuple[str, TorchNames]] = {}
  for name in params:
    match = _BLOCK_RE.match(name)
    if match:
      children[name] = (f"block{match.group(1)}.{match.group(2)}", _BLOCK_NAMES)
    elif name.startswith("patch_embed"):
      children[name] = (name, _PATCH_EMBED_NAMES)
    elif name.startswith("norm"):
      children[name] = (name, LN_NAMES)
  return TorchNames(children=children)


_STACKED_RE = re.compile(r"^block(\d+)$")


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether encoder ``params`` use the ``scan_blocks`` layout (``block{i}`` entries)."""
  return any(_STACKED_RE.match(name) for name in params)


def unstack_blocks(params: Mapping[str, PyTree]) -> dict[str, PyTree]:
  """``scan_blocks`` parameters (``block{i}/...`` with a leading block axis) in the
  unrolled layout (``block{i}_{j}/...``); other entries unchanged. Works on arrays and
  ``jax.ShapeDtypeStruct`` leaves."""
  out: dict[str, PyTree] = {}
  for name, tree in params.items():
    match = _STACKED_RE.match(name)
    if not match:
      out[name] = tree
      continue
    depths = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(tree)}
    if len(depths) != 1:
      raise ValueError(f"stacked MiT blocks {name!r}: leaves disagree on the block axis "
                       f"(leading sizes {sorted(depths)})")
    for j in range(depths.pop()):
      out[f"{name}_{j}"] = jax.tree_util.tree_map(lambda leaf, j=j: _index_leaf(leaf, j),
                                                  tree)
  return out


def stack_blocks(params: Mapping[str, PyTree]) -> dict[str, PyTree]:
  """Unrolled encoder parameters (``block{i}_{j}``) in the ``scan_blocks`` layout
  (``block{i}`` with the blocks stacked along a new leading axis, in order of ``j``)."""
  out: dict[str, PyTree] = {}
  stages: dict[str, dict[int, PyTree]] = {}
  for name, tree in params.items():
    match = _BLOCK_RE.match(name)
    if match:
      stages.setdefault(f"block{match.group(1)}", {})[int(match.group(2))] = tree
    else:
      out[name] = tree
  for name, blocks in stages.items():
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"MiT blocks {name}_*: expected indices 0..{len(blocks) - 1}, got "
                       f"{sorted(blocks)}")
    out[name] = jax.tree_util.tree_map(_stack_leaves,
                                       *[blocks[j] for j in range(len(blocks))])
  return out


# Each naming style: an anchor that detects it (the text before the anchor is the
# prefix, e.g. 'segformer.' or 'backbone.'), and rules key -> official key.
_STYLES: dict[str, re.Pattern[str]] = {
    "official": re.compile(r"^(.*?)patch_embed1\.proj\.weight$"),
    "hf": re.compile(r"^(.*?)encoder\.patch_embeddings\.0\.proj\.weight$"),
    "hf_v5": re.compile(r"^(.*?)stages\.0\.patch_embeddings\.proj\.weight$"),
    "mmseg": re.compile(r"^(.*?)layers\.0\.0\.projection\.weight$"),
}


def _renamer(rules: Sequence[tuple[str, Any]]) -> Callable[[str], str]:
  compiled = [(re.compile(p), r) for p, r in rules]

  def rename(key: str) -> str:
    for pattern, repl in compiled:
      key = pattern.sub(repl, key)
    return key

  return rename


_HF_RULES = _renamer([
    (r"^encoder\.patch_embeddings\.(\d+)\.", lambda m: f"patch_embed{int(m.group(1)) + 1}."),
    (r"^(patch_embed\d+\.)layer_norm\.", r"\1norm."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}."),
    (r"^encoder\.layer_norm\.(\d+)\.", lambda m: f"norm{int(m.group(1)) + 1}."),
    (r"\.layer_norm_1\.", ".norm1."), (r"\.layer_norm_2\.", ".norm2."),
    (r"\.attention\.self\.query\.", ".attn.q."), (r"\.attention\.self\.key\.", ".attn.k."),
    (r"\.attention\.self\.value\.", ".attn.v."), (r"\.attention\.self\.sr\.", ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."), (r"\.mlp\.dense2\.", ".mlp.fc2."),
])
_HF_V5_RULES = _renamer([
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.",
     lambda m: f"patch_embed{int(m.group(1)) + 1}.norm."),
    (r"^stages\.(\d+)\.patch_embeddings\.", lambda m: f"patch_embed{int(m.group(1)) + 1}."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}."),
    (r"^stages\.(\d+)\.layer_norm\.", lambda m: f"norm{int(m.group(1)) + 1}."),
    (r"\.layernorm_before\.", ".norm1."), (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.q_proj\.", ".attn.q."), (r"\.attention\.k_proj\.", ".attn.k."),
    (r"\.attention\.v_proj\.", ".attn.v."), (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.norm."),
])
_MMSEG_RULES = _renamer([
    (r"^layers\.(\d+)\.0\.projection\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.proj."),
    (r"^layers\.(\d+)\.0\.norm\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.norm."),
    (r"^layers\.(\d+)\.1\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}."),
    (r"^layers\.(\d+)\.2\.", lambda m: f"norm{int(m.group(1)) + 1}."),
    (r"\.attn\.attn\.in_proj_", ".attn.in_proj."),
    (r"\.attn\.attn\.out_proj\.", ".attn.proj."),
    (r"\.ffn\.layers\.0\.", ".mlp.fc1."), (r"\.ffn\.layers\.1\.", ".mlp.dwconv.dwconv."),
    (r"\.ffn\.layers\.4\.", ".mlp.fc2."),
])
_RULES = {"official": lambda k: k, "hf": _HF_RULES, "hf_v5": _HF_V5_RULES,
          "mmseg": _MMSEG_RULES}


def detect_style(state: Mapping[str, Any], prefix: str | None = None) -> tuple[str, str]:
  """Finds the naming style and key prefix of a MiT state dict.

  Args:
    state: The state dict.
    prefix: Expected prefix (e.g. ``'model.backbone.'``); ``None`` detects it.

  Returns:
    ``(style, prefix)`` with style in ``'official'``, ``'hf'`` (Hub files),
    ``'hf_v5'`` (transformers >= 5 module names) or ``'mmseg'``.

  Raises:
    KeyError: No MiT found, or several MiT encoders (e.g. a UDA checkpoint holding
      student and teacher) and no ``prefix`` to choose.
  """
  found = []
  for key in state:
    for style, pattern in _STYLES.items():
      match = pattern.match(key)
      if match and (prefix is None or match.group(1) == prefix):
        found.append((style, match.group(1)))
  if not found:
    where = f" under prefix {prefix!r}" if prefix is not None else ""
    raise KeyError(f"no MiT encoder found{where}: expected a key like 'patch_embed1.proj."
                   f"weight' (official), 'encoder.patch_embeddings.0.proj.weight' (Hugging "
                   f"Face), 'stages.0.patch_embeddings.proj.weight' (transformers >= 5) or "
                   f"'layers.0.0.projection.weight' (mmseg); the state dict starts with "
                   f"{sorted(state)[:3]}")
  if len(found) > 1:
    raise KeyError(f"several MiT encoders in the state dict (style, prefix): {found}; pass "
                   f"prefix= to choose one")
  return found[0]


def to_official_state_dict(state: Mapping[str, np.ndarray], prefix: str | None = None
                           ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str], str]:
  """Renames a MiT state dict of any supported style to the official SegFormer naming.

  Hugging Face's separate key/value projections are packed into ``attn.kv`` (k rows
  first); mmseg's packed ``in_proj`` (q|k|v rows) is split into ``attn.q`` and
  ``attn.kv``; mmseg's 1x1-convolution MixFFN weights become Linear weights.

  Args:
    state: ``{key: array}``.
    prefix: Key prefix of the encoder (``None``: detected, see :func:`detect_style`).

  Returns:
    ``(official_state, origin, outside, style)``: the renamed tensors, the source key(s)
    of every renamed key, the keys outside the encoder's prefix (not converted), and
    the detected style.

  Raises:
    KeyError: As :func:`detect_style`, or half of a pair to merge is missing.
    ValueError: Tensors to merge or split have incompatible shapes (keys named).
  """
  style, prefix = detect_style(state, prefix)
  rename = _RULES[style]
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  outside: list[str] = []
  pending: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  for key, value in state.items():
    if not key.startswith(prefix):
      outside.append(key)
      continue
    new = rename(key[len(prefix):])
    value = np.asarray(value)
    match = re.match(r"^(.*\.attn\.)(k|v)\.(weight|bias)$", new)
    if match:  # Hugging Face key/value -> packed kv
      pending.setdefault(match.group(1) + "kv." + match.group(3), {})[match.group(2)] = (
          key, value)
      continue
    match = re.match(r"^(.*\.attn\.)in_proj\.(weight|bias)$", new)
    if match:  # mmseg q|k|v -> q, kv
      if value.shape[0] % 3:
        raise ValueError(f"MiT ({style}): {key!r} has {value.shape[0]} rows, expected "
                         f"3 x width (packed q|k|v)")
      width = value.shape[0] // 3
      for part, rows in (("q", value[:width]), ("kv", value[width:])):
        name = f"{match.group(1)}{part}.{match.group(2)}"
        out[name], origin[name] = rows, key
      continue
    if style == "mmseg" and re.search(r"\.mlp\.fc[12]\.weight$", new) and value.ndim == 4:
      if value.shape[2:] != (1, 1):
        raise ValueError(f"MiT ({style}): {key!r} should be a 1x1 convolution, got shape "
                         f"{value.shape}")
      value = value[:, :, 0, 0]
    out[new], origin[new] = value, key
  for name, parts in pending.items():
    if set(parts) != {"k", "v"}:
      have = next(iter(parts.values()))[0]
      need = "value" if "k" in parts else "key"
      raise KeyError(f"MiT ({style}): {have!r} has no matching {need} tensor")
    (k_key, k), (v_key, v) = parts["k"], parts["v"]
    if k.shape != v.shape:
      raise ValueError(f"MiT ({style}): shape mismatch between {k_key!r} {k.shape} and "
                       f"{v_key!r} {v.shape}")
    out[name] = np.concatenate([k, v], axis=0)
    origin[name] = f"{k_key} + {v_key}"
  return out, origin, outside, style


def _with_origin(message: str, origin: Mapping[str, str]) -> str:
  def annotate(m: re.Match[str]) -> str:
    key = m.group(1)
    src = origin.get(key)
    return f"'{key}'" if src is None or src == key else f"'{src}' (as '{key}')"
  return re.sub(r"'([^']+)'", annotate, message)


def load(variables: Mapping[str, PyTree],
         path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
         prefix: str | None = None) -> tuple[dict[str, PyTree], list[str]]:
  """Imports SegFormer / Hugging Face / mmseg MiT weights into encoder variables.

  Supported namings (detected from the keys, see :func:`detect_style`): the official
  ``mit_b*.pth`` (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``,
  ``attn.kv``, ``attn.sr``, ``attn.norm``, ``mlp.fc1``, ``mlp.dwconv.dwconv``,
  ``norm1``; the ImageNet classifier ``head.*`` is ignored), Hugging Face Hub files
  (``[segformer.]encoder.patch_embeddings.0.proj.weight``,
  ``encoder.block.0.0.attention.self.query.weight``, separate key/value), the module
  names of transformers >= 5 (``stages.0.blocks.0.attention.q_proj.weight``), and
  mmseg (``[backbone.]layers.0.1.0.attn.attn.in_proj_weight``). Keys outside the
  encoder (decode heads, classifiers, other prefixes) are ignored and returned.

  Args:
    variables: ``{'params': ...}`` of a :class:`MixVisionTransformer` (arrays or
      ``jax.eval_shape`` structs; either block layout, see ``scan_blocks``).
    path_or_state_dict: ``.pth``/``.pt``/``.bin`` (needs torch), ``.npz`` or
      ``.safetensors`` file, or a mapping of arrays/tensors.
    prefix: Key prefix of the encoder, e.g. ``'model.backbone.'`` in a SiamSeg UDA
      checkpoint that also holds the EMA teacher (``None``: detected).

  Returns:
    ``(new_variables, ignored_keys)`` (ignored keys under their source names).

  Raises:
    KeyError: Missing or unexpected key (named in the message, with its source name).
    ValueError: Shape mismatch (source key, expected and found shape).
  """
  scanned = is_scanned(variables["params"])
  if scanned:
    variables = {**variables, "params": unstack_blocks(variables["params"])}
  state = read_state_dict(path_or_state_dict)
  official, origin, outside, style = to_official_state_dict(state, prefix)
  names = torch_names(variables["params"])
  what = f"MiT state dict ({style} naming)"
  try:
    new_variables, ignored = load_state_dict(
        variables, official, names, ignore=lambda key: key.startswith("head."), what=what)
  except (KeyError, ValueError) as e:
    raise type(e)(_with_origin(str(e.args[0]) if e.args else str(e), origin)) from e
  ignored_source = sorted({origin.get(k, k) for k in ignored} | set(outside))
  if outside:
    logger.warning("%s: ignored %d keys outside the encoder (prefix %r)", what,
                   len(outside), detect_style(state, prefix)[1])
  if scanned:
    new_variables = {**new_variables, "params": stack_blocks(new_variables["params"])}
  return new_variables, ignored_source


_TO_MMSEG = _renamer([
    (r"^patch_embed(\d+)\.proj\.", lambda m: f"layers.{int(m.group(1)) - 1}.0.projection."),
    (r"^patch_embed(\d+)\.norm\.", lambda m: f"layers.{int(m.group(1)) - 1}.0.norm."),
    (r"^block(\d+)\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) - 1}.1.{m.group(2)}."),
    (r"^norm(\d+)\.", lambda m: f"layers.{int(m.group(1)) - 1}.2."),
    (r"\.attn\.proj\.", ".attn.attn.out_proj."),
    (r"\.mlp\.fc1\.", ".ffn.layers.0."), (r"\.mlp\.dwconv\.dwconv\.", ".ffn.layers.1."),
    (r"\.mlp\.fc2\.", ".ffn.layers.4."),
])


def to_torch_state_dict(variables: Mapping[str, PyTree], style: str = "official"
                        ) -> dict[str, np.ndarray]:
  """Encoder variables as a PyTorch state dict (NumPy, torch layout).

  Args:
    variables: ``{'params': ...}`` of a :class:`MixVisionTransformer`.
    style: ``'official'`` (SegFormer ``mit_b*.pth`` names) or ``'mmseg'`` (mmseg /
      SiamSeg names: packed ``attn.attn.in_proj_weight`` = q|k|v rows, MixFFN weights
      as 1x1 convolutions).
  """
  if is_scanned(variables["params"]):
    variables = {**variables, "params": unstack_blocks(variables["params"])}
  official = to_state_dict(variables, torch_names(variables["params"]))
  if style == "official":
    return official
  if style != "mmseg":
    raise ValueError(f"unknown style {style!r}; expected 'official' or 'mmseg'")
  out: dict[str, np.ndarray] = {}
  for key, value in official.items():
    match = re.match(r"^(.*\.attn\.)(q|kv)\.(weight|bias)$", key)
    if match:
      if match.group(2) == "q":
        kv = official[f"{match.group(1)}kv.{match.group(3)}"]
        out[_TO_MMSEG(f"{match.group(1)}in_proj_{match.group(3)}").replace(
            ".attn.in_proj_", ".attn.attn.in_proj_")] = np.concatenate([value, kv], axis=0)
      continue
    new = _TO_MMSEG(key)
    if re.search(r"\.ffn\.layers\.[04]\.weight$", new):
      value = value[:, :, None, None]
    out[new] = value
  return out
