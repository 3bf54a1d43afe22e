"""ConDSeg-only building blocks: CBAM attention and CDFA's window attention.

* :class:`ChannelAttention` / :class:`SpatialAttention`: the reference's
  ``channel_attention`` / ``spatial_attention`` (CBAM) and their PyTorch names.
* :func:`unfold` / :func:`fold`: ``nn.Unfold`` / ``F.fold`` (stride 1) with PyTorch's
  channel-major ``(c, ki, kj)`` patch layout.
* :func:`outlook_aggregate`: VOLO outlook attention folded back onto the map, the core
  of Contrast-Driven Feature Aggregation, as a sum over relative window offsets (no
  unfolded copy).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from contrastjax.models.nn import Conv2d
from contrastjax.models.torch_import import CONV_NAMES, TorchNames

Array = jax.Array
Dtype = Any


# ----------------------------------------------------------------------------- CBAM attention
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


CHANNEL_ATTENTION_NAMES = TorchNames(children={"fc1": ("fc1", CONV_NAMES),
                                               "fc2": ("fc2", CONV_NAMES)})
SPATIAL_ATTENTION_NAMES = TorchNames(children={"conv1": ("conv1", CONV_NAMES)})


# ----------------------------------------------------------------------------- window attention
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


def _window_offsets(kernel_size: int) -> tuple[list[tuple[int, int]],
                                                list[tuple[int, int]],
                                                list[list[tuple[int, int]]]]:
  """Window positions ``o_i``, relative offsets ``r = o_j - o_i`` and, per relative
  offset, the ``(i, j)`` pairs that have it (row-major window order)."""
  k = kernel_size
  offsets = [(ki, kj) for ki in range(k) for kj in range(k)]
  rels = [(dr, dc) for dr in range(1 - k, k) for dc in range(1 - k, k)]
  index = {r: n for n, r in enumerate(rels)}
  pairs: list[list[tuple[int, int]]] = [[] for _ in rels]
  for i, (ir, ic) in enumerate(offsets):
    for j, (jr, jc) in enumerate(offsets):
      pairs[index[(jr - ir, jc - ic)]].append((i, j))
  return offsets, rels, pairs


def _shifted(x: Array, dr: int, dc: int, size: tuple[int, int]) -> Array:
  """``x[:, dr:dr + H, dc:dc + W]`` (static offsets into a padded map)."""
  start = (0, dr, dc) + (0,) * (x.ndim - 3)
  limit = (x.shape[0], dr + size[0], dc + size[1]) + x.shape[3:]
  return lax.slice(x, start, limit)


def _pad_hw(x: Array, p: int) -> Array:
  return jnp.pad(x, ((0, 0), (p, p), (p, p)) + ((0, 0),) * (x.ndim - 3))


@functools.lru_cache(maxsize=None)
def _offset_sum_matrix(kernel_size: int) -> np.ndarray:
  """``[k*k, k*k, (2k-1)**2]`` 0/1 matrix: entry ``(i, j)`` goes to offset ``o_j - o_i``."""
  offsets, rels, _ = _window_offsets(kernel_size)
  index = {r: n for n, r in enumerate(rels)}
  mat = np.zeros((len(offsets), len(offsets), len(rels)), np.float32)
  for i, (ir, ic) in enumerate(offsets):
    for j, (jr, jc) in enumerate(offsets):
      mat[i, j, index[(jr - ir, jc - ic)]] = 1.0
  return mat


def _offset_sums(attn: Array, kernel_size: int, padding: int) -> Array:
  """``attn [B, H, W, h, k*k, k*k] -> S [B, H, W, h, (2k-1)**2]`` with
  ``S[p, r] = sum_{(i, j): o_j - o_i = r} attn[p - o_i + padding, i, j]`` (attention
  outside the map counts as zero).

  Row ``i`` of every window is shifted by its position ``o_i`` (one shifted view per
  row), then a 0/1 matrix adds each entry into its relative-offset slot: one small
  matmul, exact apart from the order of the additions, and few HLO ops to compile.
  """
  offsets, _, _ = _window_offsets(kernel_size)
  p = padding
  size = attn.shape[1:3]
  ap = _pad_hw(attn, p)
  rows = jnp.stack([_shifted(ap[..., i, :], 2 * p - ir, 2 * p - ic, size)
                    for i, (ir, ic) in enumerate(offsets)], axis=-2)
  mat = jnp.asarray(_offset_sum_matrix(kernel_size), attn.dtype)
  return jnp.einsum("...ij,ijr->...r", rows, mat, precision=lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=None)
def _shift_sum_fn(kernel_size: int) -> Callable[[Array, Array], Array]:
  """``(S [B, H, W, h, R], v [B, H, W, h, d]) -> sum_r S[..., r, None] * v[p + rel_r]``
  (``v`` zero outside the map), accumulated in at least float32, with its VJP."""
  _, rels, _ = _window_offsets(kernel_size)
  big = kernel_size - 1  # largest |relative offset|

  def shift_sum(sums: Array, v: Array) -> Array:
    acc_dtype = jnp.promote_types(v.dtype, jnp.float32)
    size = v.shape[1:3]
    vp = _pad_hw(v, big).astype(acc_dtype)
    sums = sums.astype(acc_dtype)
    out = None
    for n, (dr, dc) in enumerate(rels):
      term = sums[..., n, None] * _shifted(vp, big + dr, big + dc, size)
      out = term if out is None else out + term
    return out.astype(v.dtype)

  @jax.custom_vjp
  def fn(sums: Array, v: Array) -> Array:
    return shift_sum(sums, v)

  def fn_fwd(sums: Array, v: Array):
    return shift_sum(sums, v), (sums, v)

  def fn_bwd(residuals, g: Array):
    sums, v = residuals
    acc_dtype = jnp.promote_types(v.dtype, jnp.float32)
    size = v.shape[1:3]
    gf = g.astype(acc_dtype)
    vp = _pad_hw(v, big).astype(acc_dtype)
    # d S[p, r] = <g[p], v[p + r]> over the head's channels.
    d_sums = jnp.stack([jnp.sum(gf * _shifted(vp, big + dr, big + dc, size), axis=-1)
                        for dr, dc in rels], axis=-1)
    # d v[m] = sum_r S[m - r, r] g[m - r]: the same shifted sum, run backwards.
    sp, gp = _pad_hw(sums.astype(acc_dtype), big), _pad_hw(gf, big)
    dv = None
    for n, (dr, dc) in enumerate(rels):
      term = (_shifted(sp[..., n:n + 1], big - dr, big - dc, size)
              * _shifted(gp, big - dr, big - dc, size))
      dv = term if dv is None else dv + term
    return d_sums.astype(sums.dtype), dv.astype(v.dtype)

  fn.defvjp(fn_fwd, fn_bwd)
  return fn


def outlook_aggregate(values: Array, attn: Array, kernel_size: int,
                      padding: int) -> Array:
  """Window attention folded back onto the map (VOLO outlook attention, CDFA).

  Computes ``fold(einsum('bxyhij,bxyhdj->bxyhdi', attn, unfold(values)))``: every
  window ``q`` mixes its ``k*k`` value vectors with the weights ``attn[q, :, i, j]``
  (output position ``i``, source position ``j``) and the overlapping windows are summed
  back (``F.fold``). Channels are split into heads, ``values[..., c]`` with
  ``c = head * head_dim + d``.

  Since window entry ``(i, j)`` of the window at ``q`` moves the value at
  ``q + o_j - padding`` to ``q + o_i - padding``, the result is a sum over the
  ``(2k-1)**2`` relative offsets ``r = o_j - o_i``:
  ``out[p] = sum_r S[p, r] * values[p + r]`` with
  ``S[p, r] = sum_{(i, j): o_j - o_i = r} attn[p - o_i + padding, i, j]``. That is the
  same arithmetic regrouped (equal to float round-off), but runs as fused elementwise
  loops over shifted views: no ``k*k``-fold unfolded copy, no batched 9x9 matmuls, and
  25 instead of 81 multiply-adds per output for ``k = 3`` (about 3x faster with its
  gradient on CPU for the largest ConDSeg map; BENCHMARKS.md).

  Args:
    values: ``[B, H, W, heads * head_dim]``.
    attn: ``[B, H, W, heads, k*k, k*k]``.
    kernel_size: Window size ``k``; windows must tile the map (``k = 2*padding + 1``).
    padding: Window padding.

  Returns:
    ``[B, H, W, heads * head_dim]`` in the dtype of ``values``.
  """
  k = kernel_size
  if k != 2 * padding + 1:
    raise ValueError(f"outlook_aggregate needs same-size windows (kernel_size = "
                     f"2 * padding + 1), got kernel_size={k}, padding={padding}")
  b, h, w, c = values.shape
  heads = attn.shape[3]
  if attn.shape != (b, h, w, heads, k * k, k * k) or c % heads:
    raise ValueError(f"outlook_aggregate: attention {attn.shape} does not match values "
                     f"{values.shape} and a {k}x{k} window")
  sums = _offset_sums(attn.astype(jnp.promote_types(attn.dtype, jnp.float32)), k, padding)
  out = _shift_sum_fn(k)(sums, values.reshape(b, h, w, heads, c // heads))
  return out.reshape(b, h, w, c)
