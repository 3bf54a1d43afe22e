"""Pixel-adaptive refinement (PAR) of ToCo, as pure, jit-able JAX functions.

Reference: github.com/rulixiang/ToCo @ e13514d, ``model/PAR.py`` (class ``PAR``) and
``utils/camutils.py`` (``refine_cams_with_bkg_v2``, ``_refine_cams``). APC (Wu et al.,
arXiv 2407.10649, no public code) refines its pseudo-labels in the ToCo way; which inputs
it refines is not public, so :func:`refine_cams_with_bkg` follows ToCo's interface.

PAR, for an image ``I`` ``[B, H, W, 3]`` and maps ``m`` ``[B, H, W, C]``:

* neighbours: for each dilation ``d`` of ``(1, 2, 4, 8, 12, 24)`` the 8 pixels at offsets
  ``d * (dy, dx)``, ``(dy, dx)`` in ToCo's kernel order (:data:`NEIGHBOR_OFFSETS`), with
  replicate padding (coordinates clamped to the image): ``K = 48`` neighbours ``n``;
* colour term: ``a_n = mean_rgb[-(|I_n - I| / (std_n(I_n) + 1e-8) / w1)^2]``, the std over
  the ``K`` neighbours per pixel and channel, *unbiased* (``torch.std``, ddof=1);
* position term: ``p_n = -(dist_n / (std_n(dist) + 1e-8) / w1)^2`` with ``dist_n = d`` for
  the 4 axial and ``sqrt(2) d`` for the 4 diagonal neighbours (std unbiased too);
* affinity ``A_n = softmax_n(a) + w2 * softmax_n(p)``, ``w1 = 0.3``, ``w2 = 0.01``;
* ``num_iter = 10`` times ``m <- sum_n A_n m_n`` (``m_n`` the maps at the neighbours).

Reference numerics (the default): ``A`` is not normalised; each pixel's weights sum to
``1 + w2 = 1.01`` and the maps grow by about ``1.01`` per iteration (``1.01**10 ~ 1.105``
after 10). The argmax that ToCo takes afterwards is unaffected. ``normalize=True``
divides ``A`` by its sum over the neighbours (weights summing to 1).

Everything runs under ``stop_gradient`` (PAR is a label-refinement step) with a
fixed-trip ``lax.fori_loop``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from contrastjax.models.resample import resize_bilinear_align_corners

Array = jax.Array

TOCO_DILATIONS = (1, 2, 4, 8, 12, 24)
TOCO_NUM_ITER = 10
TOCO_W1 = 0.3
TOCO_W2 = 0.01
#: ``(dy, dx)`` of the 8 taps of ToCo's ``get_kernel`` (3x3 kernel positions (0,0), (0,1),
#: (0,2), (1,0), (1,2), (2,0), (2,1), (2,2)), scaled by the dilation.
NEIGHBOR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_STD_EPS = 1e-8


def _check_dilations(dilations: Sequence[int]) -> tuple[int, ...]:
  dil = tuple(dilations)
  if not dil or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                        for d in dil):
    raise ValueError(f"dilations must be a non-empty sequence of ints >= 1, got {dilations!r}")
  return dil


def _check_nhwc(x: Array, name: str, channels: int | None = None) -> None:
  if x.ndim != 4 or (channels is not None and x.shape[-1] != channels):
    what = f"[B, H, W, {channels}]" if channels is not None else "[B, H, W, C]"
    raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")


def dilated_neighbors(x: Array, dilations: Sequence[int] = TOCO_DILATIONS) -> Array:
  """ToCo ``PAR.get_dilated_neighbors``: ``[B, H, W, C]`` -> ``[B, H, W, C, 8*len(d)]``.

  Entry ``k = 8 * index(d) + t`` is ``x[b, clip(i + d*dy_t), clip(j + d*dx_t), c]`` with
  ``(dy_t, dx_t) = NEIGHBOR_OFFSETS[t]`` (replicate padding = clamped coordinates).
  """
  _check_nhwc(x, "x")
  dil = _check_dilations(dilations)
  _, h, w, _ = x.shape
  out = []
  for d in dil:
    padded = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
    for dy, dx in NEIGHBOR_OFFSETS:
      out.append(padded[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w, :])
  return jnp.stack(out, axis=-1)


def neighbor_distances(dilations: Sequence[int] = TOCO_DILATIONS) -> np.ndarray:
  """ToCo ``PAR.get_pos``: ``[8*len(d)]`` float32 distances, ``d`` (axial) or
  ``sqrt(2) d`` (diagonal), in the order of :func:`dilated_neighbors`."""
  dil = _check_dilations(dilations)
  unit = np.array([math.sqrt(2.0) if dy and dx else 1.0 for dy, dx in NEIGHBOR_OFFSETS],
                  np.float32)
  return np.concatenate([unit * np.float32(d) for d in dil]).astype(np.float32)


def _unbiased_std(x: Array, axis: int) -> Array:
  n = x.shape[axis]
  mean = jnp.mean(x, axis=axis, keepdims=True)
  return jnp.sqrt(jnp.sum(jnp.square(x - mean), axis=axis, keepdims=True) / (n - 1))


def par_affinity(images: Array, *, dilations: Sequence[int] = TOCO_DILATIONS,
                 w1: float = TOCO_W1, w2: float = TOCO_W2,
                 normalize: bool = False) -> Array:
  """ToCo ``PAR.forward`` affinity ``A`` ``[B, H, W, 8*len(d)]`` (formula in the module
  docstring): ``softmax(colour term) + w2 * softmax(position term)`` over the neighbours.

  Sums to ``1 + w2`` per pixel (reference, default) or to 1 with ``normalize=True``.

  Args:
    images: ``[B, H, W, C]`` (RGB in ToCo; any scale, the colour term is scale-free up to
      the 1e-8 of the std).
  """
  _check_nhwc(images, "images")
  dil = _check_dilations(dilations)
  x = lax.stop_gradient(images).astype(jnp.float32)
  nbr = dilated_neighbors(x, dil)  # [B, H, W, C, K]
  diff = jnp.abs(nbr - x[..., None])
  std = _unbiased_std(nbr, axis=-1)
  colour = -jnp.square(diff / (std + _STD_EPS) / w1)
  colour = jnp.mean(colour, axis=3)  # mean over the image channels -> [B, H, W, K]
  dist = jnp.asarray(neighbor_distances(dil))
  pos = -jnp.square(dist / (_unbiased_std(dist, axis=0) + _STD_EPS) / w1)
  aff = jax.nn.softmax(colour, axis=-1) + w2 * jax.nn.softmax(pos, axis=-1)
  if normalize:
    aff = aff / jnp.sum(aff, axis=-1, keepdims=True)
  return aff


def _propagate(masks: Array, aff: Array, dilations: tuple[int, ...]) -> Array:
  """One PAR step ``sum_n A_n m_n`` without materialising the ``K`` neighbour maps."""
  _, h, w, _ = masks.shape
  out = jnp.zeros_like(masks)
  k = 0
  for d in dilations:
    padded = jnp.pad(masks, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
    for dy, dx in NEIGHBOR_OFFSETS:
      nbr = padded[:, d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w, :]
      out = out + nbr * aff[..., k:k + 1]
      k += 1
  return out


def par_refine(images: Array, masks: Array, *, dilations: Sequence[int] = TOCO_DILATIONS,
               num_iter: int = TOCO_NUM_ITER, w1: float = TOCO_W1, w2: float = TOCO_W2,
               normalize: bool = False) -> Array:
  """ToCo ``PAR.forward(imgs, masks)``.

  ``masks`` is first resized to the image size with bilinear ``align_corners=True``
  (:func:`contrastjax.models.resample.resize_bilinear_align_corners`, as the reference's
  ``F.interpolate``), then propagated ``num_iter`` times with :func:`par_affinity`.
  Under ``stop_gradient``.

  Args:
    images: ``[B, H, W, 3]``.
    masks: ``[B, h, w, C]``.
    num_iter: Static number of iterations ``>= 0``.

  Returns:
    ``[B, H, W, C]`` float32.
  """
  _check_nhwc(images, "images")
  _check_nhwc(masks, "masks")
  if masks.shape[0] != images.shape[0]:
    raise ValueError(f"masks must have the batch size of images ({images.shape[0]}), got "
                     f"{masks.shape[0]}")
  if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
    raise ValueError(f"num_iter must be an int >= 0, got {num_iter!r}")
  dil = _check_dilations(dilations)
  aff = par_affinity(images, dilations=dil, w1=w1, w2=w2, normalize=normalize)
  m = lax.stop_gradient(masks).astype(jnp.float32)
  m = resize_bilinear_align_corners(m, images.shape[1:3])
  return lax.fori_loop(0, num_iter, lambda _, mm: _propagate(mm, aff, dil), m)


def _resize_half_pixel(x: Array, size: tuple[int, int]) -> Array:
  """``F.interpolate(mode='bilinear', align_corners=False)`` (no antialias), NHWC."""
  return jax.image.resize(x, (x.shape[0],) + tuple(size) + x.shape[-1:], method="linear",
                          antialias=False)


def refine_cams_with_bkg(images: Array, cams: Array, cls_labels: Array, *,
                         high_thre: float, low_thre: float, ignore_index: int = 255,
                         img_box: Array | None = None, down_scale: int = 2,
                         dilations: Sequence[int] = TOCO_DILATIONS,
                         num_iter: int = TOCO_NUM_ITER, w1: float = TOCO_W1,
                         w2: float = TOCO_W2, normalize: bool = False) -> Array:
  """ToCo ``utils/camutils.py`` ``refine_cams_with_bkg_v2``: PAR-refined pseudo-labels with
  a two-threshold background.

  For ``t`` in ``(high_thre, low_thre)``: prepend a constant background map ``t`` to the
  CAMs, resize images and maps to ``(H//s, W//s)`` (bilinear, half-pixel, as the
  reference's ``align_corners=False``), softmax over the background and the *present*
  classes only (absent ones are 0: the reference's ``valid_key`` selection), PAR, resize
  back to ``(H, W)`` (half-pixel), argmax over the present classes -> ``label_t`` in
  ``[0, C]`` (0 = background, class ``c`` of ``cams`` -> ``c+1``). Pixels outside
  ``img_box`` are ``ignore_index``. Then ``label = label_high``; where ``label_high == 0``
  -> ``ignore_index``; where both are 0 -> 0 (confident background).

  Args:
    images: ``[B, H, W, 3]`` (ToCo passes the de-normalised image).
    cams: ``[B, H, W, C]`` foreground CAMs (ToCo's ``valid_cam``), no background channel.
    cls_labels: ``[B, C]`` foreground multi-hot (ToCo convention, no background).
    high_thre, low_thre: Background scores (ToCo defaults 0.7 and 0.25).
    ignore_index: Label of uncertain pixels and of pixels outside ``img_box``.
    img_box: Optional ``[B, 4]`` ints ``(y0, y1, x0, x1)``: the valid region
      ``[y0:y1, x0:x1]`` of each image; ``None`` = the whole image.
    down_scale: Static PAR resolution factor (ToCo 2).
    dilations, num_iter, w1, w2, normalize: :func:`par_refine`.

  Returns:
    ``[B, H, W]`` int32 in ``[0, C]`` or ``ignore_index``.
  """
  _check_nhwc(images, "images")
  _check_nhwc(cams, "cams")
  b, h, w, _ = images.shape
  c = cams.shape[-1]
  if cams.shape[:3] != (b, h, w):
    raise ValueError(f"cams must have shape [B, H, W, C] with [B, H, W]={(b, h, w)}, got "
                     f"{tuple(cams.shape)}")
  if tuple(cls_labels.shape) != (b, c):
    raise ValueError(f"cls_labels must be [B, C]={(b, c)} (no background), got "
                     f"{tuple(cls_labels.shape)}")
  if (isinstance(down_scale, bool) or not isinstance(down_scale, int) or down_scale < 1
      or h // down_scale < 1 or w // down_scale < 1):
    raise ValueError(f"down_scale must be an int in [1, min(H, W)], got {down_scale!r}")
  dil = _check_dilations(dilations)
  small = (h // down_scale, w // down_scale)

  images = lax.stop_gradient(images).astype(jnp.float32)
  cams = lax.stop_gradient(cams).astype(jnp.float32)
  present = jnp.concatenate(
      [jnp.ones((b, 1), bool), cls_labels.astype(jnp.float32) != 0], axis=-1)
  present_map = present[:, None, None, :]
  small_images = _resize_half_pixel(images, small)
  aff = par_affinity(small_images, dilations=dil, w1=w1, w2=w2, normalize=normalize)

  def label_for(threshold):
    bkg = jnp.full((b, h, w, 1), threshold, jnp.float32)
    maps = _resize_half_pixel(jnp.concatenate([bkg, cams], axis=-1), small)
    logits = jnp.where(present_map, maps, -jnp.inf)
    probs = jnp.where(present_map, jax.nn.softmax(logits, axis=-1), 0.0)
    refined = lax.fori_loop(0, num_iter, lambda _, m: _propagate(m, aff, dil), probs)
    refined = _resize_half_pixel(refined, (h, w))
    return jnp.argmax(jnp.where(present_map, refined, -jnp.inf), axis=-1).astype(jnp.int32)

  ignore = jnp.int32(ignore_index)
  label_h = label_for(high_thre)
  label_l = label_for(low_thre)
  if img_box is not None:
    box = jnp.asarray(img_box, jnp.int32)
    if box.shape != (b, 4):
      raise ValueError(f"img_box must be [B, 4] (y0, y1, x0, x1), got {tuple(box.shape)}")
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None]) &
              (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None]))
    label_h = jnp.where(inside, label_h, ignore)
    label_l = jnp.where(inside, label_l, ignore)
  label = jnp.where(label_h == 0, ignore, label_h)
  return jnp.where((label_h == 0) & (label_l == 0), jnp.int32(0), label)
