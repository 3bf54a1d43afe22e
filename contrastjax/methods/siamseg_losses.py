"""SiamSeg's losses: the mmseg 0.21 segmentation cross-entropy and the SimSiam loss.

Reference: github.com/woldier/SiamSeg (``mmseg/models/losses/cross_entropy_loss.py``,
``mmseg/models/uda/simsiam.py``); see ``docs/methods/siamseg.md``.

* :func:`seg_cross_entropy`: mmseg 0.21 ``CrossEntropyLoss`` with class weights, ignore 255 and
  a per-pixel weight, averaged over ALL pixels (ignored ones count as 0 in the numerator and 1
  in the denominator), not normalised by the class weights (no ``avg_non_ignore``).
* :func:`simsiam_loss`: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, batch means, with
  :func:`cosine_similarity` as the reference's torch 1.10.2 computes it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def seg_cross_entropy(logits: jax.Array, labels: jax.Array,
                      class_weight: Sequence[float] | jax.Array | None = None,
                      pixel_weight: jax.Array | None = None,
                      ignore_index: int = IGNORE_INDEX,
                      avg_non_ignore: bool = False) -> jax.Array:
  """mmseg 0.21 ``CrossEntropyLoss`` (``use_sigmoid=False``, ``reduction='mean'``).

  ``l_i = -w[y_i] log softmax(x_i)[y_i]`` (0 where ``y_i == ignore_index``), times
  ``pixel_weight_i``, then the mean over ALL pixels. ``avg_non_ignore=True`` (mmseg >= 0.24
  option, not the reference) divides by the number of non-ignored pixels instead.

  Args:
    logits: ``[B, H, W, C]`` at the label resolution.
    labels: ``[B, H, W]`` int.
    class_weight: ``[C]`` or None.
    pixel_weight: ``[B, H, W]`` (or broadcastable), or None.
    ignore_index: Ignored label.
    avg_non_ignore: See above.
  """
  c = logits.shape[-1]
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  if class_weight is not None:
    w = jnp.asarray(class_weight, jnp.float32)
    if w.shape != (c,):
      raise ValueError(f"class_weight has shape {w.shape}; expected ({c},)")
    nll = nll * w[safe]
  nll = jnp.where(valid, nll, 0.0)
  if pixel_weight is not None:
    nll = nll * pixel_weight
  if avg_non_ignore:
    return jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1)
  return jnp.mean(nll)


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``torch.nn.CosineSimilarity(dim=-1, eps)`` as in the reference's torch 1.10.2.

  ``a.b / sqrt(max(|a|^2 |b|^2, eps^2))`` in float32: ATen's ``cosine_similarity`` in torch
  1.1-1.11 (``w12 / sqrt(clamp_min(w1 * w2, eps * eps))`` with squared norms, so, like it, 0
  once ``|a|^2 |b|^2`` overflows float32). Mathematically that is the documented
  ``a.b / max(|a| |b|, eps)``. torch >= 1.12 clamps each norm separately instead,
  ``(a / max(|a|, eps)) . (b / max(|b|, eps))``, which differs when ``|a|`` or ``|b|`` is
  below ``eps`` (and by float32 rounding otherwise).
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
  return dot * jax.lax.rsqrt(jnp.maximum(norms, eps * eps))


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array) -> jax.Array:
  """Symmetric negative cosine with stop-gradient on ``z``:
  ``-(cos(p1, sg(z2)).mean() + cos(p2, sg(z1)).mean()) / 2`` (:func:`cosine_similarity`)."""
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  return -0.5 * (jnp.mean(cosine_similarity(p1, z2)) + jnp.mean(cosine_similarity(p2, z1)))
