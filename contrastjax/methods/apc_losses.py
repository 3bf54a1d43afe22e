"""APC numerical building blocks (Wu et al., arXiv 2407.10649) as pure, jit-able functions.

APC ("Adaptive Patch Contrast for weakly supervised semantic segmentation") has no public
code. It builds on ViT-PCM (github.com/deepplants/ViT-PCM @ 1fea66f, TensorFlow/Keras:
``model.py``, ``utils.py``) and its closest public single-stage relative is ToCo
(github.com/rulixiang/ToCo @ e13514d, PyTorch: ``model/losses.py``,
``utils/camutils.py``). Each function below names the reference file/function it follows
and says what is a *reconstruction* (a choice of ours where APC's rule is unknown).

Conventions (all arrays NHWC, class axis last):

* ``probs``: patch probabilities ``P`` of shape ``[B, h, w, C+1]`` (softmax over the
  ``C+1`` classes of each patch, background = class 0).
* ``labels``: multi-hot image labels ``[B, C+1]`` *including* the background (always 1 on
  VOC), as ViT-PCM's ``class_labels``.
* Patch ``i`` runs over the ``N = h*w`` grid positions in row-major order (the order of
  ``torch.reshape(b, c, h*w)`` in ToCo).

Contents:

* pooling of ``P`` to image scores: :func:`gmp_pool` (ViT-PCM), :func:`topk_pool` (TKP),
  :func:`adaptive_k` / :func:`akp_pool` (APC's adaptive-K pooling, three candidate rules;
  reconstruction) and the switch :func:`pool_patch_scores`;
* the classification loss: :func:`keras_binary_crossentropy` and :func:`l2_kernel_penalty`
  (ViT-PCM ``compute_mce_loss`` / ``compute_reg_loss``);
* CAM-free pseudo-labels: :func:`merge_class_labels`, :func:`confident_labels`,
  :func:`merged_pseudo_labels` (ViT-PCM ``merge_class_labels`` / ``compute_metrics``);
* the segmentation loss :func:`seg_loss` (ToCo ``get_seg_loss``);
* patch contrast: :func:`patch_affinity_mask` (ToCo ``label_to_aff_mask``),
  :func:`masked_ptc_loss` (ToCo ``get_masked_ptc_loss``), :func:`supcon_patch_loss`
  (Khosla et al. SupCon over the patches of each image) and the switch
  :func:`patch_contrast_loss`;
* ViT-PCM's equivariant-mosaic (ET) loss at patch level (optional component): the index
  bookkeeping :func:`apply_flips`, :func:`revert_flips`, :func:`crop_resize_patches`,
  :func:`mosaic_2x2`, :func:`unmosaic_2x2`, the Keras
  :func:`keras_categorical_crossentropy` and :func:`equivariance_loss`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from contrastjax.models.resample import resize_bilinear_align_corners

Array = jax.Array

#: Keras' ``backend.epsilon()`` (clip bound and log offset of the Keras cross-entropies).
KERAS_EPSILON = 1e-7
#: ViT-PCM's classifier ``kernel_regularizer=L2(0.01)``.
VITPCM_L2_WEIGHT = 0.01
#: ``F.normalize(..., eps=1e-8)`` in ToCo's ``get_masked_ptc_loss``.
PTC_NORM_EPS = 1e-8

POOLING_MODES = ("gmp", "topk", "akp")
#: Candidate rules of adaptive-K pooling (APC's rule is not public):
#: H1 ``ratio_to_max``, H2 ``consecutive_ratio``, H3 ``argmax_share``.
AKP_RULES = ("ratio_to_max", "consecutive_ratio", "argmax_share")
PATCH_CONTRAST_FORMS = ("ptc", "supcon")


# --------------------------------------------------------------------------- helpers
def _check_probs(probs: Array, name: str = "probs") -> None:
  if probs.ndim != 4:
    raise ValueError(
        f"{name} must have shape [B, h, w, C+1], got {tuple(probs.shape)}")


def _check_labels(labels: Array, probs: Array, name: str = "labels") -> None:
  expected = (probs.shape[0], probs.shape[-1])
  if tuple(labels.shape) != expected:
    raise ValueError(
        f"{name} must be multi-hot [B, C+1]={expected}, got {tuple(labels.shape)}")


def _check_int(value, name: str, lo: int, hi: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be a Python int in [{lo}, {hi}], got {value!r}")
  if not lo <= value <= hi:
    raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
  return value


def _check_float(value, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a Python float, got {value!r}")
  value = float(value)
  ok = (lo < value if lo_open else lo <= value) and value <= hi
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
    raise ValueError(f"{name} must be in {interval}, got {value}")
  return value


def _divide_no_nan(x: Array, y: Array) -> Array:
  """``tf.math.divide_no_nan``: ``x / y`` with 0 where ``y == 0`` (NaN-free gradient)."""
  zero = y == 0
  return jnp.where(zero, jnp.zeros_like(x), x / jnp.where(zero, jnp.ones_like(y), y))


def _patches_by_class(probs: Array) -> Array:
  """``[B, h, w, C]`` -> ``[B, C, N]`` with ``N = h*w`` in row-major order."""
  b, h, w, c = probs.shape
  return jnp.swapaxes(probs.reshape(b, h * w, c), 1, 2)


def _flatten_tokens(x: Array, name: str, trailing: int) -> Array:
  """``[B, h, w, *rest]`` or ``[B, N, *rest]`` -> ``[B, N, *rest]`` (``trailing`` = len(rest))."""
  if x.ndim == 3 + trailing:
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])
  if x.ndim == 2 + trailing:
    return x
  extra = "".join(", D" for _ in range(trailing))
  raise ValueError(
      f"{name} must have shape [B, N{extra}] or [B, h, w{extra}], got {tuple(x.shape)}")


# --------------------------------------------------------------------------- pooling
def gmp_pool(probs: Array) -> Array:
  """Global max pooling of patch probabilities (ViT-PCM ``PC.pool``,
  ``GlobalMaxPooling2D``): ``y_c = max_i P_{i,c}``.

  Args:
    probs: ``[B, h, w, C+1]``.

  Returns:
    ``[B, C+1]`` image scores.
  """
  _check_probs(probs)
  return jnp.max(probs, axis=(1, 2))


def topk_pool(probs: Array, k: int) -> Array:
  """Top-K pooling (TKP): ``y_c = (1/K) sum_{k<=K} S_(k),c`` with ``S`` the scores of class
  ``c`` sorted in descending order over the ``N = h*w`` patches and a fixed ``K``.

  ``lax.top_k`` selects the entries, so the gradient reaches exactly the ``K`` selected
  patches of each class (``1/K`` each). ``K = 1`` is :func:`gmp_pool`.

  Args:
    probs: ``[B, h, w, C+1]``.
    k: Static ``K`` in ``[1, h*w]``.

  Returns:
    ``[B, C+1]``.
  """
  _check_probs(probs)
  n = probs.shape[1] * probs.shape[2]
  k = _check_int(k, "k", 1, n)
  values, _ = lax.top_k(_patches_by_class(probs), k)
  return jnp.mean(values, axis=-1)


def _resolve_k_max(k_max: int | None, n: int) -> int:
  return n if k_max is None else _check_int(k_max, "k_max", 1, n)


def _adaptive_k_from_sorted(sorted_top: Array, probs: Array, rule: str, tau: float | None,
                            rho: float | None, k_max: int) -> Array:
  """``K`` per (image, class) from the top ``k_max`` sorted scores ``[B, C, k_max]``."""
  if rule == "ratio_to_max":
    tau = _check_float(tau, "tau", 0.0, 1.0, lo_open=True)
    flat = _patches_by_class(probs)
    threshold = tau * sorted_top[..., :1]
    count = jnp.sum(flat >= threshold, axis=-1)
  elif rule == "consecutive_ratio":
    tau = _check_float(tau, "tau", 0.0, 1.0, lo_open=True)
    # drop[k-1] is True when S_(k+1) < tau * S_(k), k = 1..k_max-1 (the multiplication
    # form of S_(k+1)/S_(k) < tau: no 0/0 when the scores are 0; then no stop).
    drop = sorted_top[..., 1:] < tau * sorted_top[..., :-1]
    k_index = jnp.arange(1, k_max, dtype=jnp.int32)
    count = jnp.min(jnp.where(drop, k_index, k_max), axis=-1, initial=k_max)
  elif rule == "argmax_share":
    rho = _check_float(rho, "rho", 0.0, math.inf, lo_open=True)
    num_classes = probs.shape[-1]
    winners = jnp.argmax(probs, axis=-1)  # [B, h, w]; ties -> lowest class index
    n_c = jnp.sum(jax.nn.one_hot(winners, num_classes, dtype=jnp.int32), axis=(1, 2))
    count = jnp.ceil(jnp.float32(rho) * n_c.astype(jnp.float32)).astype(jnp.int32)
  else:
    raise ValueError(f"rule must be one of {AKP_RULES}, got {rule!r}")
  return jnp.clip(count, 1, k_max).astype(jnp.int32)


def adaptive_k(probs: Array, *, rule: str, tau: float | None = None,
               rho: float | None = None, k_max: int | None = None) -> Array:
  """Per-class ``K`` of adaptive-K pooling (APC, *reconstruction*: the paper's rule is not
  public; three candidates). With ``S`` the scores of class ``c`` sorted descending over
  the ``N`` patches:

  * ``ratio_to_max`` (H1): ``K_c = #{i : P_{i,c} >= tau * max_j P_{j,c}}``;
  * ``consecutive_ratio`` (H2): ``K_c = min{k : S_(k+1),c < tau * S_(k),c}`` (the score
    drops sharply after the ``k``-th; ``= S_(k+1)/S_(k) < tau`` for positive scores), and
    ``K_max`` when there is no such ``k < K_max``;
  * ``argmax_share`` (H3): ``K_c = max(1, ceil(rho * n_c))`` with
    ``n_c = #{i : argmax_{c'} P_{i,c'} = c}`` (ties to the lowest class; ``rho * n_c`` is
    evaluated in float32).

  All are clipped to ``[1, K_max]``. ``K`` is an integer function of ``P``: it carries no
  gradient (computed under ``stop_gradient``).

  Args:
    probs: ``[B, h, w, C+1]``.
    rule: One of :data:`AKP_RULES`.
    tau: Ratio in ``(0, 1]`` for H1/H2.
    rho: Share ``> 0`` for H3.
    k_max: Static ``K_max`` in ``[1, h*w]``; ``None`` = ``h*w``.

  Returns:
    ``[B, C+1]`` int32.
  """
  _check_probs(probs)
  k_max = _resolve_k_max(k_max, probs.shape[1] * probs.shape[2])
  p = lax.stop_gradient(probs)
  sorted_top, _ = lax.top_k(_patches_by_class(p), k_max)
  return _adaptive_k_from_sorted(sorted_top, p, rule, tau, rho, k_max)


def akp_pool(probs: Array, *, rule: str, tau: float | None = None,
             rho: float | None = None, k_max: int | None = None) -> Array:
  """Adaptive-K pooling (APC, *reconstruction*): ``y_c = (1/K_c) sum_{k<=K_c} S_(k),c`` with
  ``K_c`` from :func:`adaptive_k`.

  Static shapes: the top ``K_max`` scores are selected with ``lax.top_k`` (sorted
  descending), the first ``K_c`` are kept by a mask, no dynamic slicing. The gradient
  flows only into the ``K_c`` selected scores of each class (``1/K_c`` each); ``K`` is
  under ``stop_gradient``. Where ``K_c = 1`` the score equals :func:`gmp_pool` bit for bit.

  Args / Returns: as :func:`adaptive_k`; returns ``[B, C+1]`` scores.
  """
  _check_probs(probs)
  k_max = _resolve_k_max(k_max, probs.shape[1] * probs.shape[2])
  sorted_top, _ = lax.top_k(_patches_by_class(probs), k_max)
  k = _adaptive_k_from_sorted(lax.stop_gradient(sorted_top), lax.stop_gradient(probs),
                              rule, tau, rho, k_max)
  keep = jnp.arange(k_max, dtype=jnp.int32) < k[..., None]
  total = jnp.sum(jnp.where(keep, sorted_top, jnp.zeros_like(sorted_top)), axis=-1)
  return total / k.astype(sorted_top.dtype)


def pool_patch_scores(probs: Array, *, mode: str, k: int | None = None,
                      rule: str | None = None, tau: float | None = None,
                      rho: float | None = None, k_max: int | None = None) -> Array:
  """The pooling switch: ``mode`` ``'gmp'`` (:func:`gmp_pool`), ``'topk'``
  (:func:`topk_pool` with ``k``) or ``'akp'`` (:func:`akp_pool` with ``rule``, ``tau``,
  ``rho``, ``k_max``). Returns ``[B, C+1]``."""
  if mode == "gmp":
    return gmp_pool(probs)
  if mode == "topk":
    return topk_pool(probs, k)
  if mode == "akp":
    return akp_pool(probs, rule=rule, tau=tau, rho=rho, k_max=k_max)
  raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")


# --------------------------------------------------------------------------- classification
def keras_binary_crossentropy(scores: Array, labels: Array,
                              epsilon: float = KERAS_EPSILON) -> Array:
  """ViT-PCM's multi-label classification loss (``model.py`` ``compute_mce_loss``:
  ``BinaryCrossentropy(reduction=NONE)`` then ``reduce_mean``), on probabilities.

  Keras 2.9 ``backend.binary_crossentropy`` (TF 2.9.1, the version ViT-PCM was tested
  with): ``p = clip(y_hat, eps, 1-eps)``,
  ``l = -[y log(p + eps) + (1-y) log(1 - p + eps)]`` (eps both as clip bound and inside the
  log); the loss is the mean of ``l`` over classes and batch. The input is never treated
  as logits (ViT-PCM's pooled scores come from a max, not a sigmoid).

  Args:
    scores: ``[B, C+1]`` pooled probabilities.
    labels: ``[B, C+1]`` multi-hot (soft targets allowed).
    epsilon: Keras' ``epsilon()``.

  Returns:
    Scalar.
  """
  if scores.ndim != 2 or tuple(labels.shape) != tuple(scores.shape):
    raise ValueError(
        f"scores and labels must both be [B, C+1]; got {tuple(scores.shape)} and "
        f"{tuple(labels.shape)}")
  p = jnp.clip(scores, epsilon, 1.0 - epsilon)
  y = labels.astype(p.dtype)
  bce = -(y * jnp.log(p + epsilon) + (1.0 - y) * jnp.log(1.0 - p + epsilon))
  return jnp.mean(bce)


def l2_kernel_penalty(kernel: Array, weight: float = VITPCM_L2_WEIGHT) -> Array:
  """Keras ``regularizers.L2(weight)`` of the patch classifier's kernel:
  ``weight * sum(w^2)`` (no 1/2). ViT-PCM ``compute_reg_loss`` takes the mean of the
  classifier layer's loss list, which holds this one term."""
  return weight * jnp.sum(jnp.square(kernel))


# --------------------------------------------------------------------------- pseudo-labels
def merge_class_labels(probs: Array, labels: Array) -> Array:
  """ViT-PCM ``model.py`` ``merge_class_labels``: CAM-free patch pseudo-probabilities.

  ``M = P * y`` (absent classes 0); ``M_c <- M_c / max_{h,w} M_c`` (every present class
  peaks at 1; ``divide_no_nan``: a class map that is all 0 stays 0); ``M <- M / sum_c M``
  (``divide_no_nan``: a patch with no mass stays 0). Works at any spatial size.

  Args:
    probs: ``[B, h, w, C+1]``.
    labels: ``[B, C+1]`` multi-hot.

  Returns:
    ``[B, h, w, C+1]``.
  """
  _check_probs(probs)
  _check_labels(labels, probs)
  m = probs * labels.astype(probs.dtype)[:, None, None, :]
  m = _divide_no_nan(m, jnp.max(m, axis=(1, 2), keepdims=True))
  return _divide_no_nan(m, jnp.sum(m, axis=-1, keepdims=True))


def confident_labels(merged: Array, *, threshold: float | None = None,
                     ignore_index: int = 255) -> Array:
  """``argmax`` over the class axis (last), with the high/low-confidence split: entries
  whose maximum probability is ``< threshold`` get ``ignore_index`` (APC's high/low
  confidence patches; the threshold rule is a *reconstruction*). ``threshold=None``: no
  ignore. Ties go to the lowest class index (``tf.argmax`` / ``jnp.argmax``).

  Args:
    merged: ``[..., C+1]`` (e.g. :func:`merge_class_labels` output).

  Returns:
    ``merged.shape[:-1]`` int32.
  """
  label = jnp.argmax(merged, axis=-1).astype(jnp.int32)
  if threshold is None:
    return label
  threshold = _check_float(threshold, "threshold", -math.inf, math.inf)
  confident = jnp.max(merged, axis=-1) >= threshold
  return jnp.where(confident, label, jnp.int32(ignore_index))


def merged_pseudo_labels(probs: Array, labels: Array, *,
                         out_size: tuple[int, int] | None = None,
                         align_corners: bool = True, threshold: float | None = None,
                         ignore_index: int = 255) -> Array:
  """CAM-free pseudo-labels: :func:`merge_class_labels`, upsample, :func:`confident_labels`.

  ViT-PCM (``model.py`` ``compute_metrics`` -> ``utils.py`` ``resize``) upsamples the
  *merged probabilities* with ``tf.compat.v1.image.resize(..., BILINEAR,
  align_corners=True)`` and then takes the argmax; that is the default here
  (:func:`contrastjax.models.resample.resize_bilinear_align_corners`). ``align_corners=False``
  uses half-pixel centres without antialiasing (``jax.image.resize(..., 'linear',
  antialias=False)``, = ``F.interpolate(align_corners=False)``). The confidence threshold is
  applied to the upsampled merged probabilities.

  Args:
    probs: ``[B, h, w, C+1]``.
    labels: ``[B, C+1]``.
    out_size: ``(H, W)``; ``None`` keeps the patch grid.
    align_corners: The interpolation convention (see above).
    threshold: Optional confidence threshold (pixels below -> ``ignore_index``).
    ignore_index: Label of ignored pixels.

  Returns:
    ``[B, H, W]`` int32.
  """
  merged = merge_class_labels(probs, labels)
  if out_size is not None:
    if len(out_size) != 2 or not all(isinstance(s, int) and s > 0 for s in out_size):
      raise ValueError(f"out_size must be two positive ints (H, W), got {out_size!r}")
    out_size = tuple(out_size)
    if align_corners:
      merged = resize_bilinear_align_corners(merged, out_size)
    else:
      merged = jax.image.resize(merged, (merged.shape[0],) + out_size + merged.shape[-1:],
                                method="linear", antialias=False)
  return confident_labels(merged, threshold=threshold, ignore_index=ignore_index)


# --------------------------------------------------------------------------- segmentation
def seg_loss(logits: Array, labels: Array, *, ignore_index: int = 255,
             nan_on_empty: bool = False) -> Array:
  """ToCo ``model/losses.py`` ``get_seg_loss``: ``0.5 * (CE_bg + CE_fg)``.

  ``CE_bg`` is ``F.cross_entropy(reduction='mean', ignore_index)`` over the pixels labelled
  0, ``CE_fg`` over the pixels with a label other than 0 and ``ignore_index``: each is the
  sum of the per-pixel ``-log softmax(z)_y`` over its pixels of the *whole batch* divided
  by their number (not a mean of per-image means).

  An empty set gives ``0/0``. The reference then returns NaN (e.g. a batch with no
  foreground pixel); ``nan_on_empty=True`` reproduces that. Default: an empty term is 0
  (so the loss is ``0.5 * CE_bg`` without foreground), with a NaN-free gradient.

  Args:
    logits: ``[B, H, W, K]`` (class axis last).
    labels: ``[B, H, W]`` ints in ``[0, K)`` or ``ignore_index`` (other values are not
      checked: they count as foreground with a zero target, unlike torch which errors).
    ignore_index: Ignored label; must not be a class index in ``[0, K)``.
    nan_on_empty: Reference behaviour for empty sets.

  Returns:
    Scalar.
  """
  if logits.ndim != 4 or tuple(labels.shape) != tuple(logits.shape[:3]):
    raise ValueError(
        f"logits must be [B, H, W, K] and labels [B, H, W]; got {tuple(logits.shape)} and "
        f"{tuple(labels.shape)}")
  num_classes = logits.shape[-1]
  if 0 <= ignore_index < num_classes:
    raise ValueError(
        f"ignore_index must not be a class index in [0, {num_classes}), got {ignore_index}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = jnp.clip(labels, 0, num_classes - 1).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  bg = labels == 0
  fg = (labels != 0) & (labels != ignore_index)

  def masked_mean(mask):
    total = jnp.sum(jnp.where(mask, nll, 0.0))
    count = jnp.sum(mask).astype(jnp.float32)
    if nan_on_empty:
      return total / count
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

  return 0.5 * (masked_mean(bg) + masked_mean(fg))


# --------------------------------------------------------------------------- patch contrast
def patch_affinity_mask(token_labels: Array, ignore_index: int = 255) -> Array:
  """ToCo ``utils/camutils.py`` ``label_to_aff_mask``: ``A_ij = 1[y_i = y_j]``, set to
  ``ignore_index`` where ``y_i`` or ``y_j`` is ``ignore_index`` and on the diagonal.

  Args:
    token_labels: ``[B, N]`` or ``[B, h, w]`` ints (flattened row-major).
    ignore_index: Ignore label (must not be 0 or 1: those are the mask's values).

  Returns:
    ``[B, N, N]`` int32 in ``{0, 1, ignore_index}``.
  """
  if ignore_index in (0, 1):
    raise ValueError(f"ignore_index must not be 0 or 1 (mask values), got {ignore_index}")
  y = _flatten_tokens(token_labels, "token_labels", 0)
  same = (y[:, :, None] == y[:, None, :]).astype(jnp.int32)
  invalid = y == ignore_index
  n = y.shape[1]
  ignored = invalid[:, :, None] | invalid[:, None, :] | jnp.eye(n, dtype=bool)[None]
  return jnp.where(ignored, jnp.int32(ignore_index), same)


def _l2_normalize(x: Array, eps: float) -> Array:
  """``F.normalize(x, dim=-1, eps)``: ``x / max(||x||, eps)`` (NaN-free gradient at 0)."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  big = sq >= eps * eps
  norm = jnp.where(big, jnp.sqrt(jnp.where(big, sq, 1.0)), eps)
  return x / norm


def masked_ptc_loss(features: Array, aff_mask: Array, *, eps: float = PTC_NORM_EPS) -> Array:
  """ToCo ``model/losses.py`` ``get_masked_ptc_loss`` (patch token contrast).

  ``f_i <- f_i / max(||f_i||, eps)``, ``S_ij = |f_i . f_j|`` per image;
  ``L = 0.5 * (1 - sum_{A=1} S / (|A=1| + 1)) + 0.5 * sum_{A=0} S / (|A=0| + 1)`` where
  the sums and the counts run over all pairs of *all images of the batch together*
  (one global normalisation, as the reference's ``pos_mask.sum()``), and entries of
  ``aff_mask`` other than 0/1 (ignored labels, the diagonal) take no part.

  Args:
    features: ``[B, N, D]`` or ``[B, h, w, D]``.
    aff_mask: ``[B, N, N]`` from :func:`patch_affinity_mask`.
    eps: Normalisation epsilon.

  Returns:
    Scalar.
  """
  f = _flatten_tokens(features, "features", 1)
  b, n, _ = f.shape
  if tuple(aff_mask.shape) != (b, n, n):
    raise ValueError(f"aff_mask must have shape [B, N, N]={(b, n, n)}, got "
                     f"{tuple(aff_mask.shape)}")
  f = _l2_normalize(f.astype(jnp.float32), eps)
  sim = jnp.abs(jnp.einsum("bid,bjd->bij", f, f, precision=lax.Precision.HIGHEST))
  pos = aff_mask == 1
  neg = aff_mask == 0
  pos_term = jnp.sum(jnp.where(pos, sim, 0.0)) / (jnp.sum(pos) + 1).astype(jnp.float32)
  neg_term = jnp.sum(jnp.where(neg, sim, 0.0)) / (jnp.sum(neg) + 1).astype(jnp.float32)
  return 0.5 * (1.0 - pos_term) + 0.5 * neg_term


def supcon_patch_loss(features: Array, token_labels: Array, *, temperature: float = 0.07,
                      base_temperature: float | None = None, ignore_index: int = 255,
                      eps: float = PTC_NORM_EPS) -> Array:
  """Supervised contrastive loss (Khosla et al. 2020, ``SupConLoss``) over the patches of
  each image; the second patch-contrast form of APC (*reconstruction*).

  With ``z_i = f_i / max(||f_i||, eps)`` and, within one image, ``V`` the patches whose
  label is not ``ignore_index``: for an anchor ``i in V``, ``A(i) = V \\ {i}``,
  ``P(i) = {p in A(i) : y_p = y_i}``,
  ``l_i = -(T / T_base) * (1/|P(i)|) sum_{p in P(i)} log[exp(z_i.z_p/T) /
  sum_{a in A(i)} exp(z_i.z_a/T)]``. The loss is the mean of ``l_i`` over the anchors of
  the whole batch that have ``|P(i)| >= 1`` (0 if there is none; Khosla's code gives NaN
  for an anchor without positives). Patches of different images never interact.

  Args:
    features: ``[B, N, D]`` or ``[B, h, w, D]``.
    token_labels: ``[B, N]`` or ``[B, h, w]`` ints.
    temperature: ``T > 0`` (Khosla's default 0.07).
    base_temperature: ``T_base``; ``None`` = ``T`` (factor 1).
    ignore_index: Label of excluded patches.
    eps: Normalisation epsilon.

  Returns:
    Scalar.
  """
  temperature = _check_float(temperature, "temperature", 0.0, math.inf, lo_open=True)
  base = temperature if base_temperature is None else _check_float(
      base_temperature, "base_temperature", 0.0, math.inf, lo_open=True)
  f = _flatten_tokens(features, "features", 1)
  y = _flatten_tokens(token_labels, "token_labels", 0)
  if tuple(y.shape) != tuple(f.shape[:2]):
    raise ValueError(f"token_labels must have shape [B, N]={tuple(f.shape[:2])}, got "
                     f"{tuple(y.shape)}")
  n = f.shape[1]
  z = _l2_normalize(f.astype(jnp.float32), eps)
  logits = jnp.einsum("bid,bjd->bij", z, z, precision=lax.Precision.HIGHEST) / temperature
  valid = y != ignore_index
  contrast = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
  positive = contrast & (y[:, :, None] == y[:, None, :])
  row_max = lax.stop_gradient(
      jnp.max(jnp.where(contrast, logits, -jnp.inf), axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  shifted = logits - row_max
  denom = jnp.sum(jnp.where(contrast, jnp.exp(jnp.where(contrast, shifted, 0.0)), 0.0),
                  axis=-1, keepdims=True)
  log_denom = jnp.log(jnp.where(denom > 0, denom, 1.0))
  log_prob = shifted - log_denom
  n_pos = jnp.sum(positive, axis=-1).astype(jnp.float32)
  sum_pos = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=-1)
  has_pos = n_pos > 0
  mean_log_prob_pos = jnp.where(has_pos, sum_pos / jnp.maximum(n_pos, 1.0), 0.0)
  n_anchor = jnp.sum(has_pos).astype(jnp.float32)
  total = -(temperature / base) * jnp.sum(mean_log_prob_pos)
  return jnp.where(n_anchor > 0, total / jnp.maximum(n_anchor, 1.0), 0.0)


def patch_contrast_loss(features: Array, token_labels: Array, *, form: str = "ptc",
                        temperature: float = 0.07, base_temperature: float | None = None,
                        ignore_index: int = 255, eps: float = PTC_NORM_EPS) -> Array:
  """The patch-contrast switch: ``form='ptc'`` (default) =
  ``masked_ptc_loss(features, patch_affinity_mask(token_labels))``; ``form='supcon'`` =
  :func:`supcon_patch_loss` (``temperature``/``base_temperature`` used only there)."""
  if form == "ptc":
    return masked_ptc_loss(features, patch_affinity_mask(token_labels, ignore_index),
                           eps=eps)
  if form == "supcon":
    return supcon_patch_loss(features, token_labels, temperature=temperature,
                             base_temperature=base_temperature, ignore_index=ignore_index,
                             eps=eps)
  raise ValueError(f"form must be one of {PATCH_CONTRAST_FORMS}, got {form!r}")


# --------------------------------------------------------------------------- ET (ViT-PCM)
def _flip_flags(flips: Array, batch: int, name: str) -> tuple[Array, Array, Array]:
  flips = jnp.asarray(flips)
  if flips.shape != (batch, 3):
    raise ValueError(
        f"{name} must be [B, 3]=({batch}, 3) flags (fliplr, flipud, transpose), got "
        f"{tuple(flips.shape)}")
  on = flips != 0
  return on[:, 0, None, None, None], on[:, 1, None, None, None], on[:, 2, None, None, None]


def _check_square_grid(x: Array, name: str) -> None:
  _check_probs(x, name)
  if x.shape[1] != x.shape[2]:
    raise ValueError(f"{name} must be a square grid (transpose), got {tuple(x.shape)}")


def apply_flips(x: Array, flips: Array) -> Array:
  """ViT-PCM ``utils.py`` ``apply_affine_transform_invertible`` per image: flip left-right,
  then up-down, then transpose (rows <-> columns), each where its flag is non-zero.

  Args:
    x: ``[B, g, g, C]`` (square: the transpose keeps the shape).
    flips: ``[B, 3]`` flags ``(fliplr, flipud, transpose)`` (ViT-PCM's ``affine[..., :3]``).
  """
  _check_square_grid(x, "x")
  lr, ud, tr = _flip_flags(flips, x.shape[0], "flips")
  x = jnp.where(lr, x[:, :, ::-1], x)
  x = jnp.where(ud, x[:, ::-1], x)
  return jnp.where(tr, jnp.swapaxes(x, 1, 2), x)


def revert_flips(x: Array, flips: Array) -> Array:
  """Inverse of :func:`apply_flips` (ViT-PCM ``revert_affine_transform``, which inverts by
  a gradient trick): transpose, then up-down, then left-right."""
  _check_square_grid(x, "x")
  lr, ud, tr = _flip_flags(flips, x.shape[0], "flips")
  x = jnp.where(tr, jnp.swapaxes(x, 1, 2), x)
  x = jnp.where(ud, x[:, ::-1], x)
  return jnp.where(lr, x[:, :, ::-1], x)


def crop_resize_patches(x: Array, *, out_size: int, crop_size: int | None = None,
                        crop_offsets: Array | None = None,
                        crop_mask: Array | None = None) -> Array:
  """ViT-PCM ``apply_affine_transform`` crop + resize at patch level (``affine_patch_level``:
  pixel boxes and sizes divided by the patch size).

  Images with ``crop_mask`` set are cropped to ``x[off_y:off_y+s, off_x:off_x+s]``
  (``s = crop_size``, static; the offsets are ``bbox[0:2] // patch`` of ViT-PCM's affine)
  and all are resized to ``out_size x out_size`` with bilinear ``align_corners=True``
  (ViT-PCM's ``resize``; identity when the size already matches). Offsets are clamped
  to the grid as ``lax.dynamic_slice`` does.

  Args:
    x: ``[B, g, g, C]``.
    out_size: Static output grid size (ViT-PCM ``SCALE // PATCH_SIZE``).
    crop_size: Static crop size in patches, or ``None`` (no crop).
    crop_offsets: ``[B, 2]`` ints ``(row, col)``; required with ``crop_size``.
    crop_mask: ``[B]`` bools (which images are cropped); ``None`` = all.

  Returns:
    ``[B, out_size, out_size, C]``.
  """
  _check_square_grid(x, "x")
  b, g, _, c = x.shape
  out_size = _check_int(out_size, "out_size", 1, 1 << 30)
  full = resize_bilinear_align_corners(x, (out_size, out_size))
  if crop_size is None:
    return full
  crop_size = _check_int(crop_size, "crop_size", 1, g)
  if crop_offsets is None:
    raise ValueError("crop_offsets ([B, 2] ints) is required with crop_size")
  offsets = jnp.asarray(crop_offsets, jnp.int32)
  if offsets.shape != (b, 2):
    raise ValueError(f"crop_offsets must be [B, 2]=({b}, 2), got {tuple(offsets.shape)}")
  crops = jax.vmap(lambda xi, off: lax.dynamic_slice(
      xi, (off[0], off[1], 0), (crop_size, crop_size, c)))(x, offsets)
  cropped = resize_bilinear_align_corners(crops, (out_size, out_size))
  if crop_mask is None:
    return cropped
  mask = jnp.asarray(crop_mask)
  if mask.shape != (b,):
    raise ValueError(f"crop_mask must be [B]=({b},), got {tuple(mask.shape)}")
  return jnp.where(mask[:, None, None, None] != 0, cropped, full)


def mosaic_2x2(x: Array) -> Array:
  """ViT-PCM ``VITPCM.merged_step`` tiling: images ``4m + 2r + q`` of ``[4M, h, w, C]``
  become the block ``(row r, column q)`` of mosaic ``m`` -> ``[M, 2h, 2w, C]`` (the layout
  of ``extract_nonoverlapping_patches_inverse``)."""
  if x.ndim != 4 or x.shape[0] % 4:
    raise ValueError(f"x must be [4M, h, w, C] (batch divisible by 4), got {tuple(x.shape)}")
  n, h, w, c = x.shape
  tiles = x.reshape(n // 4, 2, 2, h, w, c)
  return jnp.transpose(tiles, (0, 1, 3, 2, 4, 5)).reshape(n // 4, 2 * h, 2 * w, c)


def unmosaic_2x2(x: Array) -> Array:
  """Inverse of :func:`mosaic_2x2` (ViT-PCM ``extract_nonoverlapping_patches`` of the
  mosaic's output): ``[M, 2h, 2w, C]`` -> ``[4M, h, w, C]``."""
  if x.ndim != 4 or x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f"x must be [M, 2h, 2w, C] (even grid), got {tuple(x.shape)}")
  m, hh, ww, c = x.shape
  tiles = x.reshape(m, 2, hh // 2, 2, ww // 2, c)
  return jnp.transpose(tiles, (0, 1, 3, 2, 4, 5)).reshape(4 * m, hh // 2, ww // 2, c)


def keras_categorical_crossentropy(y_true: Array, y_pred: Array,
                                   epsilon: float = KERAS_EPSILON) -> Array:
  """Keras 2.9 ``backend.categorical_crossentropy`` on probabilities, no reduction:
  ``p = clip(y_pred / sum_c y_pred, eps, 1-eps)``, ``-sum_c y_true log p`` over the last
  axis. Returns ``y_true.shape[:-1]``."""
  if tuple(y_true.shape) != tuple(y_pred.shape):
    raise ValueError(f"y_true and y_pred must have the same shape, got "
                     f"{tuple(y_true.shape)} and {tuple(y_pred.shape)}")
  p = y_pred / jnp.sum(y_pred, axis=-1, keepdims=True)
  p = jnp.clip(p, epsilon, 1.0 - epsilon)
  return -jnp.sum(y_true * jnp.log(p), axis=-1)


def equivariance_loss(teacher_probs: Array, student_mosaic_probs: Array, labels: Array, *,
                      teacher_flips: Array, student_flips: Array,
                      crop_size: int | None = None, crop_offsets: Array | None = None,
                      crop_mask: Array | None = None) -> Array:
  """ViT-PCM ``model.py`` ``compute_cce_loss`` (equivariant mosaic loss) at patch level.

  Teacher (view 1, evaluated without gradient in ViT-PCM): undo its flips
  (:func:`revert_flips`), apply view 2's crop + resize to the student's grid
  (:func:`crop_resize_patches`) and flips (:func:`apply_flips`), then
  :func:`merge_class_labels` with the image labels, under ``stop_gradient``. Student:
  the 4 views tiled in one mosaic (:func:`mosaic_2x2` on the images), split back with
  :func:`unmosaic_2x2`. Loss: the mean over images and patches of
  :func:`keras_categorical_crossentropy` (target = teacher).

  Args:
    teacher_probs: ``[B, g, g, C+1]`` view-1 patch probabilities.
    student_mosaic_probs: ``[B/4, 2s, 2s, C+1]`` patch probabilities of the mosaics.
    labels: ``[B, C+1]`` multi-hot.
    teacher_flips, student_flips: ``[B, 3]`` flags (fliplr, flipud, transpose) of the
      two views.
    crop_size, crop_offsets, crop_mask: View 2's crop in patch units
      (:func:`crop_resize_patches`); ``None`` = no crop.

  Returns:
    Scalar.
  """
  _check_square_grid(teacher_probs, "teacher_probs")
  student = unmosaic_2x2(student_mosaic_probs)
  if student.shape[0] != teacher_probs.shape[0] or student.shape[-1] != teacher_probs.shape[-1]:
    raise ValueError(
        f"student_mosaic_probs must hold B/4 mosaics of the teacher's classes: teacher "
        f"{tuple(teacher_probs.shape)}, mosaics {tuple(student_mosaic_probs.shape)}")
  _check_labels(labels, teacher_probs)
  target = revert_flips(teacher_probs, teacher_flips)
  target = crop_resize_patches(target, out_size=student.shape[1], crop_size=crop_size,
                               crop_offsets=crop_offsets, crop_mask=crop_mask)
  target = apply_flips(target, student_flips)
  target = lax.stop_gradient(merge_class_labels(target, labels))
  return jnp.mean(keras_categorical_crossentropy(target, student))
