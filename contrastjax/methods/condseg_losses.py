"""ConDSeg losses (Lei et al., AAAI 2025) as pure, jit-able ``jnp`` functions.

Reference: github.com/Mengqi-Lei/ConDSeg @ e6a314b, ``utils/metrics.py`` (``DiceBCELoss``),
``utils/run_engine.py`` (stage-2 loss, ``complementary_loss``) and
``utils/run_engine_stage1.py`` (``BinaryConsistencyLoss``); see docs/methods/condseg.md.

Every loss takes an optional per-example ``weights`` vector ``[B]`` (typically the
``valid`` mask of a padded evaluation batch). With 0/1 weights the result equals the
reference loss computed on the weighted-in examples only; padded examples contribute
nothing, not even to the normalisers.

Two semantics of ``DiceBCELoss`` are offered (docs/methods/condseg.md):

* **paper** (``double_sigmoid=True``): the reference applies ``torch.sigmoid`` to the
  model's outputs, which already end in a sigmoid, so the loss sees
  ``s = sigmoid(sigmoid(z))`` in [0.5, 0.731]. The BCE can never go below 0.693 (target 0)
  or 0.313 (target 1). This is what produced the paper's numbers.
* **corrected** (``double_sigmoid=False``, the project default; upstream PR #19): one
  sigmoid. We feed logits and use the numerically stable BCE-with-logits, Dice on
  ``sigmoid(logits)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

#: ``torch.nn.functional.binary_cross_entropy`` clamps each log term at this value.
_LOG_CLAMP = -100.0
#: ``torch``'s BCE backward divides by ``max(p(1-p), _TORCH_BCE_EPS)``.
_TORCH_BCE_EPS = 1e-12
#: The reference's additive constant in the denominator of the beta weights.
_BETA_EPS = 1e-15


# --------------------------------------------------------------------------- helpers
def _f32(x: Array) -> Array:
  return jnp.asarray(x, jnp.float32)


def _example_weights(weights: Array | None, x: Array) -> Array:
  """Per-example weights broadcastable against ``x`` (``[B, ...]``); ones if None."""
  if weights is None:
    return jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
  w = _f32(weights)
  if w.shape != (x.shape[0],):
    raise ValueError(
        f"weights must have shape [B]=({x.shape[0]},), got {tuple(w.shape)}")
  return w.reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _weighted_mean(values: Array, weights: Array | None) -> Array:
  """Mean over all elements of the weighted-in examples (0 if no weight at all)."""
  w = _example_weights(weights, values)
  denominator = jnp.sum(w) * (values.size // values.shape[0])
  return jnp.sum(values * w) / jnp.maximum(denominator, 1e-12)


def _clamped_log(x: Array) -> Array:
  return jnp.maximum(jnp.log(x), _LOG_CLAMP)


# --------------------------------------------------------------------------- BCE
@jax.custom_vjp
def _torch_bce_elementwise(prob: Array, target: Array) -> Array:
  """Element-wise ``F.binary_cross_entropy`` (no reduction), forward and backward."""
  return -(target * _clamped_log(prob) + (1.0 - target) * _clamped_log(1.0 - prob))


def _torch_bce_fwd(prob, target):
  return _torch_bce_elementwise(prob, target), (prob, target)


def _torch_bce_bwd(res, g):
  prob, target = res
  # Exactly torch's ``binary_cross_entropy_backward``: finite even where the forward
  # value is clamped (prob in {0, 1}); autodiff of the clamped forward would give 0/NaN.
  d_prob = g * (prob - target) / jnp.maximum(prob * (1.0 - prob), _TORCH_BCE_EPS)
  d_target = g * (_clamped_log(1.0 - prob) - _clamped_log(prob))
  return d_prob, d_target


_torch_bce_elementwise.defvjp(_torch_bce_fwd, _torch_bce_bwd)


def binary_cross_entropy(prob: Array, target: Array,
                         weights: Array | None = None) -> Array:
  """``torch.nn.functional.binary_cross_entropy(prob, target, reduction='mean')``.

  Each log term is clamped at -100 as torch does, and the gradient is torch's
  ``(p - t) / max(p (1 - p), 1e-12)``.

  Args:
    prob: probabilities in [0, 1], ``[B, ...]``.
    target: targets in [0, 1] (soft targets allowed), same shape.
    weights: optional per-example weights ``[B]``; the mean runs over the elements of
      the weighted-in examples.

  Returns:
    Scalar float32 loss.
  """
  prob, target = _f32(prob), _f32(target)
  return _weighted_mean(_torch_bce_elementwise(prob, target), weights)


def bce_with_logits(logits: Array, target: Array,
                    weights: Array | None = None) -> Array:
  """Numerically stable mean BCE on logits (``F.binary_cross_entropy_with_logits``).

  Args:
    logits: pre-sigmoid scores ``[B, ...]``.
    target: targets in [0, 1], same shape.
    weights: optional per-example weights ``[B]``.

  Returns:
    Scalar float32 loss.
  """
  logits, target = _f32(logits), _f32(target)
  values = (jnp.maximum(logits, 0.0) - logits * target
            + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  return _weighted_mean(values, weights)


# --------------------------------------------------------------------------- Dice
def dice_loss(prob: Array, target: Array, weights: Array | None = None,
              smooth: float = 1.0) -> Array:
  """Reference soft Dice loss over the whole flattened batch.

  ``1 - (2 Σ s·t + smooth) / (Σ s + Σ t + smooth)``, the sums running over every pixel of
  every (weighted-in) example at once, not per image.

  Args:
    prob: probabilities ``[B, ...]``.
    target: targets, same shape.
    weights: optional per-example weights ``[B]`` multiplying each example's sums.
    smooth: additive smoothing (the reference uses 1).

  Returns:
    Scalar float32 loss.
  """
  prob, target = _f32(prob), _f32(target)
  w = _example_weights(weights, prob)
  intersection = jnp.sum(prob * target * w)
  total = jnp.sum(prob * w) + jnp.sum(target * w)
  return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def dice_bce_terms(pred: Array, target: Array, *, from_logits: bool,
                   double_sigmoid: bool, weights: Array | None = None
                   ) -> tuple[Array, Array]:
  """The two parts ``(bce, dice)`` of the reference ``DiceBCELoss``.

  Same arguments and semantics as ``dice_bce``, which returns their sum.

  Returns:
    ``(bce, dice)`` scalar float32 losses.
  """
  pred = _f32(pred)
  prob = jax.nn.sigmoid(pred) if from_logits else pred
  if double_sigmoid:
    s = jax.nn.sigmoid(prob)
    bce = binary_cross_entropy(s, target, weights)
  elif from_logits:
    s = prob
    bce = bce_with_logits(pred, target, weights)
  else:
    s = prob
    bce = binary_cross_entropy(s, target, weights)
  return bce, dice_loss(s, target, weights)


def dice_bce(pred: Array, target: Array, *, from_logits: bool, double_sigmoid: bool,
             weights: Array | None = None) -> Array:
  """The reference ``DiceBCELoss`` = BCE + Dice, in paper or corrected semantics.

  ``pred`` is first turned into a probability ``p`` (``sigmoid(pred)`` if
  ``from_logits`` else ``pred``). Then:

  * ``double_sigmoid=True`` (paper, reference ``utils/metrics.py`` l.128-143): the loss
    applies one more sigmoid, ``s = sigmoid(p)``, then torch-BCE(s, t) + Dice(s, t).
    Call it with the model's sigmoid output and ``from_logits=False`` to reproduce the
    reference exactly.
  * ``double_sigmoid=False`` (corrected, upstream PR #19): ``s = p``. With
    ``from_logits=True`` the BCE is the stable BCE-with-logits on ``pred`` (the project
    default); with ``from_logits=False`` it is torch-BCE on the probabilities.

  Dice runs over the whole flattened (weighted-in) batch with smooth 1.

  Args:
    pred: logits or probabilities ``[B, H, W, 1]`` (any ``[B, ...]`` shape works).
    target: soft targets in [0, 1], same shape.
    from_logits: whether ``pred`` holds logits.
    double_sigmoid: reproduce the reference's extra sigmoid.
    weights: optional per-example weights ``[B]`` (e.g. ``batch['valid']``).

  Returns:
    Scalar float32 loss.
  """
  bce, dice = dice_bce_terms(pred, target, from_logits=from_logits,
                             double_sigmoid=double_sigmoid, weights=weights)
  return bce + dice


# --------------------------------------------------------------------------- stage 1
def binary_consistency_loss(pred: Array, pred_aug: Array, *, from_logits: bool = False,
                            weights: Array | None = None) -> Array:
  """Reference ``BinaryConsistencyLoss`` (``utils/run_engine_stage1.py`` l.91-105).

  ``BCE(p, 1[p' > 0.5]) + BCE(p', 1[p > 0.5])`` with the binarised targets treated as
  constants (``stop_gradient``), so gradients reach both predictions.

  The reference applies **no** extra sigmoid here (unlike ``DiceBCELoss``): it feeds the
  model's sigmoid outputs straight into ``F.binary_cross_entropy``. So there is no
  double-sigmoid variant of this loss; paper and corrected modes differ only in the
  input (``from_logits=False``: probabilities and torch-BCE, the exact reference;
  ``from_logits=True``: logits and the stable BCE, the same function without clamping).

  Args:
    pred: clean-view prediction (logits or probabilities), ``[B, ...]``.
    pred_aug: augmented-view prediction, same shape and kind.
    from_logits: whether the inputs are logits (default: probabilities, as the
      reference).
    weights: optional per-example weights ``[B]``.

  Returns:
    Scalar float32 loss.
  """
  pred, pred_aug = _f32(pred), _f32(pred_aug)
  prob = jax.nn.sigmoid(pred) if from_logits else pred
  prob_aug = jax.nn.sigmoid(pred_aug) if from_logits else pred_aug
  # The reference thresholds the probabilities; we do the same in both modes.
  target = jax.lax.stop_gradient((prob > 0.5).astype(jnp.float32))
  target_aug = jax.lax.stop_gradient((prob_aug > 0.5).astype(jnp.float32))
  bce = bce_with_logits if from_logits else binary_cross_entropy
  return bce(pred, target_aug, weights) + bce(pred_aug, target, weights)


# --------------------------------------------------------------------------- stage 2
def beta_weight(mask_map: Array, weights: Array | None = None, *,
                per_image_mean: bool = False) -> Array:
  """Size-adaptive weight ``β = 1 / (tanh(A) + 1e-15)`` of the auxiliary DiceBCE terms.

  Reference (``utils/run_engine.py`` l.115-131): ``A = Σ_{b,h,w} m / (H·W)``, i.e. the
  sum over the **batch** of each image's predicted area fraction; β is **not** detached
  (gradients flow into ``m`` through β). That ``A`` grows with the batch size: with the
  reference batch of 12, β ≈ 1 unless the predicted areas are tiny. ``per_image_mean=False``
  (default) reproduces it exactly.

  ``per_image_mean=True`` (deviation, opt-in) uses the mean area fraction per image,
  ``A = mean_b Σ_{h,w} m / (H·W)``, which is what a per-image reading of the paper's
  formula gives and does not change with the (global) batch size. It equals the
  reference for a batch of one.

  Args:
    mask_map: predicted probability map ``[B, H, W, 1]`` (or ``[B, H, W]``).
    weights: optional per-example weights ``[B]``; excluded examples add no area (and,
      with ``per_image_mean``, do not count in the mean).
    per_image_mean: see above.

  Returns:
    Scalar float32 β.
  """
  m = _f32(mask_map)
  h, w = m.shape[1], m.shape[2]
  ew = _example_weights(weights, m)
  area = jnp.sum(m * ew) / (h * w)
  if per_image_mean:
    n = m.shape[0] if weights is None else jnp.sum(_f32(weights))
    area = area / jnp.maximum(n, 1e-12)
  return 1.0 / (jnp.tanh(area) + _BETA_EPS)


def complementary_loss(fg: Array, bg: Array, uc: Array,
                       weights: Array | None = None) -> Array:
  """Reference complementary loss between the three decoupled maps.

  ``P = softmax_k(stack[fg, bg, uc])`` over the three **sigmoid** maps (as the reference:
  softmax of probabilities, not of logits), then
  ``(Σ P_fg P_bg + Σ P_fg P_uc + Σ P_bg P_uc) / (B·H·W)``.

  Args:
    fg: foreground probability map ``[B, H, W, 1]``.
    bg: background probability map, same shape.
    uc: uncertainty probability map, same shape.
    weights: optional per-example weights ``[B]``; ``B`` in the normaliser becomes their
      sum.

  Returns:
    Scalar float32 loss.
  """
  stacked = jnp.stack([_f32(fg), _f32(bg), _f32(uc)], axis=0)
  p_fg, p_bg, p_uc = jax.nn.softmax(stacked, axis=0)
  products = p_fg * p_bg + p_fg * p_uc + p_bg * p_uc
  ew = _example_weights(weights, products)
  num_examples = products.shape[0] if weights is None else jnp.sum(_f32(weights))
  num_pixels = num_examples * products.shape[1] * products.shape[2]
  return jnp.sum(products * ew) / jnp.maximum(num_pixels, 1e-12)


def condseg_stage2_loss(outputs: Mapping[str, Array], batch: Mapping[str, Array],
                        cfg: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
  """Stage-2 ConDSeg loss (``utils/run_engine.py`` l.115-131).

  ``L = DiceBCE(mask, y) + β1·DiceBCE(fg, y) + β2·DiceBCE(bg, background) + L_compl``
  with ``β1 = beta_weight(fg)``, ``β2 = beta_weight(bg)`` (not detached) and
  ``L_compl = complementary_loss(fg, bg, uc)`` on the sigmoid maps.

  Args:
    outputs: the model's aux dict plus ``'mask'``: probabilities ``'mask'``, ``'fg'``,
      ``'bg'``, ``'uc'`` and logits ``'mask_logits'``, ``'fg_logits'``, ``'bg_logits'``
      (each ``[B, H, W, 1]``).
    batch: ``'mask'`` and ``'background'`` targets ``[B, H, W, 1]``; if it has
      ``'valid'`` (padded evaluation batch), invalid examples are excluded everywhere.
    cfg: mapping read with ``.get``: ``double_sigmoid`` (default False; True reproduces
      the reference's double sigmoid, DiceBCE then runs on the probability maps) and
      ``beta_per_image`` (default False = reference batch-summed β; see
      ``beta_weight``).

  Returns:
    ``(loss, metrics)`` with metrics ``loss``, ``loss_mask``, ``loss_fg``, ``loss_bg``,
    ``loss_compl``, ``beta1``, ``beta2`` (and the BCE/Dice parts of the mask term).
  """
  double_sigmoid = bool(cfg.get("double_sigmoid", False))
  beta_per_image = bool(cfg.get("beta_per_image", False))
  weights = batch.get("valid")
  y, y_bg = batch["mask"], batch["background"]

  def term(name):
    # Paper: the reference's DiceBCE on the sigmoid outputs (double sigmoid).
    # Corrected: stable BCE on the logits.
    pred = outputs[name] if double_sigmoid else outputs[f"{name}_logits"]
    return dice_bce_terms(pred, y_bg if name == "bg" else y,
                          from_logits=not double_sigmoid,
                          double_sigmoid=double_sigmoid, weights=weights)

  bce_mask, dice_mask = term("mask")
  bce_fg, dice_fg = term("fg")
  bce_bg, dice_bg = term("bg")
  loss_mask = bce_mask + dice_mask
  loss_fg = bce_fg + dice_fg
  loss_bg = bce_bg + dice_bg
  beta1 = beta_weight(outputs["fg"], weights, per_image_mean=beta_per_image)
  beta2 = beta_weight(outputs["bg"], weights, per_image_mean=beta_per_image)
  loss_compl = complementary_loss(outputs["fg"], outputs["bg"], outputs["uc"], weights)
  loss = loss_mask + beta1 * loss_fg + beta2 * loss_bg + loss_compl
  metrics = {
      "loss": loss,
      "loss_mask": loss_mask,
      "loss_mask_bce": bce_mask,
      "loss_mask_dice": dice_mask,
      "loss_fg": loss_fg,
      "loss_bg": loss_bg,
      "loss_compl": loss_compl,
      "beta1": beta1,
      "beta2": beta2,
  }
  return loss, metrics
