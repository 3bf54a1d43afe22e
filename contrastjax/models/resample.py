"""Bilinear resampling of NHWC maps with PyTorch's conventions.

* :func:`resize_bilinear_align_corners` / :func:`upsample`: ``F.interpolate(mode=
  'bilinear', align_corners=True)`` / ``nn.Upsample(..., align_corners=True)``, as
  separable static gathers with an exact gather-based adjoint (no scatter-add).
* :func:`resize_bilinear_half_pixel`: ``F.interpolate(mode='bilinear',
  align_corners=False)`` (torch's default), ``jax.image.resize`` without antialiasing.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class _InterpPlan:
  """Linear interpolation along one axis with ``align_corners=True`` (static indices).

  ``out[o] = x[i0[o]] * w0[o] + x[i1[o]] * w1[o]``; the adjoint reads, for each input
  position ``i``, the outputs ``t_idx[i, :]`` with weights ``t_wt[i, :]`` (zero-weight
  padding where fewer outputs read ``i``).
  """
  i0: np.ndarray
  i1: np.ndarray
  w0: np.ndarray
  w1: np.ndarray
  t_idx: np.ndarray
  t_wt: np.ndarray


@functools.lru_cache(maxsize=256)
def _align_corners_plan(n_in: int, n_out: int, double: bool = False) -> _InterpPlan:
  """The :class:`_InterpPlan` of resizing ``n_in`` samples to ``n_out``.

  Mirrors PyTorch: ``scale = (n_in - 1) / (n_out - 1)`` (0 when ``n_out == 1``) and
  ``src = scale * o``, both in float32 (float64 for double inputs, like PyTorch's
  ``opmath`` type); the neighbours ``floor(src)`` and ``min(floor(src) + 1, n_in - 1)``
  get weights ``1 - frac`` and ``frac``.
  """
  ftype = np.float64 if double else np.float32
  scale = ftype((n_in - 1) / (n_out - 1)) if n_out > 1 else ftype(0.0)
  src = np.arange(n_out, dtype=ftype) * scale
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0.astype(ftype)).astype(ftype)
  w0 = (ftype(1.0) - w1).astype(ftype)
  readers: list[list[tuple[int, float]]] = [[] for _ in range(n_in)]
  for o in range(n_out):
    readers[i0[o]].append((o, w0[o]))
    readers[i1[o]].append((o, w1[o]))
  width = max(len(r) for r in readers)
  t_idx = np.zeros((n_in, width), np.int32)
  t_wt = np.zeros((n_in, width), ftype)
  for i, pairs in enumerate(readers):
    for k, (o, wt) in enumerate(pairs):
      t_idx[i, k], t_wt[i, k] = o, wt
  return _InterpPlan(i0.astype(np.int32), i1.astype(np.int32), w0, w1, t_idx, t_wt)


def _along(v: np.ndarray, axis: int, ndim: int, dtype: Dtype) -> Array:
  """Per-position weights ``v`` shaped to broadcast along ``axis``."""
  shape = [1] * ndim
  shape[axis] = -1
  return jnp.asarray(v.reshape(shape), dtype)


@functools.lru_cache(maxsize=256)
def _interp_axis_fn(axis: int, n_in: int, n_out: int,
                    double: bool) -> Callable[[Array], Array]:
  """Align-corners linear interpolation along ``axis`` with its exact sparse adjoint."""
  plan = _align_corners_plan(n_in, n_out, double)

  def take(x: Array, idx: np.ndarray) -> Array:
    return jnp.take(x, idx, axis=axis, mode="clip")  # indices are in bounds

  @jax.custom_vjp
  def interp(x: Array) -> Array:
    return (take(x, plan.i0) * _along(plan.w0, axis, x.ndim, x.dtype)
            + take(x, plan.i1) * _along(plan.w1, axis, x.ndim, x.dtype))

  def interp_fwd(x: Array):
    return interp(x), None

  def interp_bwd(_, g: Array):
    # The transposed interpolation matrix, applied as gathers (no scatter-add).
    dx = None
    for k in range(plan.t_idx.shape[1]):
      term = take(g, plan.t_idx[:, k]) * _along(plan.t_wt[:, k], axis, g.ndim, g.dtype)
      dx = term if dx is None else dx + term
    return (dx,)

  interp.defvjp(interp_fwd, interp_bwd)
  return interp


def resize_bilinear_align_corners(x: Array, size: tuple[int, int],
                                  precision: Any = None) -> Array:
  """``F.interpolate(x, size, mode='bilinear', align_corners=True)`` for NHWC ``x``.

  Separable linear interpolation, first along the width then along the height (the
  order of PyTorch's kernel), each output reading its two neighbours with static
  gathers; the gradient applies the transposed interpolation the same way (gathers,
  no scatter-add). This equals multiplying by the per-axis interpolation matrices
  (what an einsum ``'oh,bhwc,pw->bopc'`` computes) up to float round-off, without their
  ``O(n_in)`` work per output: 5-20x faster on CPU for the x2 upsamplings of ConDSeg.
  ``jax.image.resize`` uses half-pixel centres and differs by up to ~1 from the
  align-corners result.

  Args:
    x: ``[B, H, W, C]`` input.
    size: Output ``(H_out, W_out)``.
    precision: Unused (the interpolation involves no matmul); kept for API
      compatibility.

  Returns:
    ``[B, H_out, W_out, C]`` in the dtype of ``x``.
  """
  del precision
  h_out, w_out = size
  _, h_in, w_in, _ = x.shape
  double = x.dtype == jnp.float64
  if w_in != w_out:
    x = _interp_axis_fn(2, w_in, w_out, double)(x)
  if h_in != h_out:
    x = _interp_axis_fn(1, h_in, h_out, double)(x)
  return x


def upsample(x: Array, scale: int, precision: Any = None) -> Array:
  """``nn.Upsample(scale_factor=scale, mode='bilinear', align_corners=True)``, NHWC."""
  _, h, w, _ = x.shape
  return resize_bilinear_align_corners(x, (h * scale, w * scale), precision)


def resize_bilinear_half_pixel(x: Array, size: Sequence[int]) -> Array:
  """``F.interpolate(x, size, mode='bilinear', align_corners=False)`` for NHWC ``x``.

  ``jax.image.resize(..., 'bilinear', antialias=False)``: half-pixel centres, equal to
  PyTorch for upsampling and downsampling (PyTorch clamps source positions below 0,
  which the renormalised triangle kernel of ``jax.image.resize`` reproduces) and to
  cv2's ``INTER_LINEAR`` also when shrinking. ``size = (H_out, W_out)`` (entries cast to
  ``int``); an input already of that size is returned as is.
  """
  size = (int(size[0]), int(size[1]))
  if tuple(x.shape[1:3]) == size:
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False)
