"""DACS machinery shared by the UDA methods, as pure, jit-able functions (explicit PRNG keys).

Reference: DAFormer's DACS loop as forked by github.com/woldier/SiamSeg (``mmseg/models/uda/
dacs.py``, ``teacher_model.py``, ``mmseg/models/utils/dacs_transform.py``); see
``docs/methods/siamseg.md``. The strong augmentation of the mixed images is
:func:`contrastjax.augment.views.strong_transform`.

* :func:`ema_update` / :func:`ema_alpha`, :class:`EMATeacher`: the mean teacher
  (``teacher_model.py``), ``alpha_t = min(1 - 1 / (iter + 1), alpha)`` over parameters only.
* :func:`pseudo_label_weight`: argmax pseudo-labels and ONE scalar confidence weight, the
  fraction of target pixels whose max softmax probability is >= the threshold.
* :func:`class_mix_masks`, :func:`class_mix`: ClassMix (``dacs_transform.get_class_masks``,
  ``one_mix``): per image, half (rounded up) of the classes present in the source label, chosen
  uniformly without replacement; jit-friendly as random scores over a fixed C-vector masked by
  presence.
* :func:`check_groups`: the ``stat_group_size`` check (per-group statistics, the reference's
  per-GPU batch).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from contrastjax.errors import ConfigError

PyTree = Any


# ----------------------------------------------------------------------------- EMA teacher
def ema_alpha(step: jax.Array, alpha: float) -> jax.Array:
  """The reference's ramp ``min(1 - 1 / (iter + 1), alpha)`` (0 at iter 0: a copy)."""
  it = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (it + 1.0), alpha)


def ema_update(teacher: PyTree, student: PyTree, step: jax.Array, alpha: float) -> PyTree:
  """``teacher <- a * teacher + (1 - a) * student`` with ``a = ema_alpha(step, alpha)``.

  ``step`` is the reference's ``local_iter`` at which the update happens: the number of
  optimizer steps already applied to ``student`` (the spine's ``post_update`` step).
  """
  a = ema_alpha(step, alpha)
  return jax.tree.map(lambda t, s: (a * t + (1.0 - a) * s).astype(t.dtype), teacher,
                      jax.lax.stop_gradient(student))


class EMATeacher:
  """The DACS mean teacher (reference ``teacher_model.EMATeacher``), as pure functions.

  Its parameters live in the train state's ``extra['teacher']`` (a copy of the student's
  segmentor parameters at initialisation, the reference's iter-0 copy); BatchNorm running
  statistics are never averaged (the reference's EMA loops over ``parameters()`` only) and the
  teacher's BatchNorms normalise with the statistics of the target batch (the reference teacher
  is put in training mode by the runner every iteration); dropout and drop path are off.

  Attributes:
    alpha: Final EMA coefficient (0.999).
    pseudo_threshold: Confidence threshold of the pseudo-label weight (0.968).
    group_size: 0 (whole-batch pseudo-label weight) or the group size (see
      :func:`pseudo_label_weight`).
  """

  def __init__(self, alpha: float = 0.999, pseudo_threshold: float | None = 0.968,
               group_size: int = 0):
    if not 0.0 <= alpha < 1.0:
      raise ConfigError(f"config.siamseg.alpha={alpha}; expected 0 <= alpha < 1")
    if pseudo_threshold is not None and not 0.0 < pseudo_threshold <= 1.0:
      raise ConfigError(f"config.siamseg.pseudo_threshold={pseudo_threshold}; expected in (0, 1]")
    self.alpha, self.pseudo_threshold = float(alpha), pseudo_threshold
    self.group_size = int(group_size)

  def update(self, teacher: PyTree, student: PyTree, step: jax.Array) -> PyTree:
    """:func:`ema_update` at ``step`` (optimizer steps applied to ``student``)."""
    return ema_update(teacher, student, step, self.alpha)

  def pseudo_label(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`pseudo_label_weight` of teacher logits at the label resolution."""
    return pseudo_label_weight(logits, self.pseudo_threshold, self.group_size)


# ----------------------------------------------------------------------------- pseudo-labels
def check_groups(batch: int, group_size: int) -> None:
  """Raises a ConfigError unless ``group_size`` is 0 or a positive divisor of ``batch``."""
  if group_size < 0 or (group_size and batch % group_size):
    raise ConfigError(f"config.siamseg.stat_group_size={group_size} must divide the global "
                     f"batch of {batch} images (config.batch_size); 0 = whole-batch "
                     "statistics")


def pseudo_label_weight(logits: jax.Array, threshold: float | None, group_size: int = 0
                        ) -> tuple[jax.Array, jax.Array]:
  """Pseudo-labels and the scalar confidence weight of a batch of teacher logits.

  Args:
    logits: ``[B, H, W, C]`` teacher logits (at the label resolution).
    threshold: Confidence threshold (0.968); ``None``: weight 1.
    group_size: 0: one weight for the whole batch; ``N``: one weight per group of ``N``
      consecutive images (the reference computes it per GPU batch).

  Returns:
    ``(label int32 [B, H, W], weight float32)``: the fraction of pixels of the whole
    batch (a scalar), or of each image's group (``[B]``), with max softmax probability
    >= ``threshold``.
  """
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  label = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  b = logits.shape[0]
  if threshold is None:
    return label, jnp.ones((b,) if group_size else (), jnp.float32)
  confident = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  if not group_size:
    return label, jnp.mean(confident)
  check_groups(b, group_size)
  per_group = jnp.mean(confident.reshape(b // group_size, -1), axis=1)
  return label, jnp.repeat(per_group, group_size)


# ----------------------------------------------------------------------------- ClassMix
def classes_present(labels: jax.Array, num_classes: int) -> jax.Array:
  """``[..., C]`` bool: which of ``0..C-1`` occur in each label map ``[..., H, W]``."""
  onehot = labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)
  return jnp.any(onehot, axis=(-3, -2))


def choose_half(rng: jax.Array, present: jax.Array) -> jax.Array:
  """Chooses ``ceil(n / 2)`` of the ``n`` present classes uniformly without replacement.

  Args:
    rng: PRNG key.
    present: ``[C]`` bool.

  Returns:
    ``[C]`` bool, a subset of ``present``.
  """
  n = jnp.sum(present.astype(jnp.int32))
  k = (n + 1) // 2
  scores = jnp.where(present, jax.random.uniform(rng, present.shape), -1.0)
  rank = jnp.argsort(jnp.argsort(-scores))   # 0 = highest score
  return present & (rank < k)


def class_mix_masks(rng: jax.Array, labels: jax.Array, num_classes: int,
                    scope: str = "image", group_size: int = 0) -> jax.Array:
  """ClassMix masks ``[B, H, W]`` (1 = take the source pixel).

  Args:
    rng: PRNG key (one sub-key per image).
    labels: Source labels ``[B, H, W]`` (255 never chosen).
    num_classes: ``C``.
    scope: ``'image'`` (reference after PR #5, per-image ``torch.unique(label)``) or
      ``'batch'`` (before the fix, the paper's runs: the class set of the whole batch, still
      one choice per image).
    group_size: with ``'batch'``: 0 = the whole batch's class set; ``N`` = the set of each
      image's group of ``N`` consecutive images (the reference's per-GPU batch).
  """
  present = classes_present(labels, num_classes)              # [B, C]
  if scope == "batch" and group_size:
    b = labels.shape[0]
    check_groups(b, group_size)
    grouped = jnp.any(present.reshape(b // group_size, group_size, -1), axis=1)
    present = jnp.repeat(grouped, group_size, axis=0)
  elif scope == "batch":
    present = jnp.broadcast_to(jnp.any(present, axis=0, keepdims=True), present.shape)
  elif scope != "image":
    raise ValueError(f"class_mix scope={scope!r}; expected 'image' or 'batch'")
  keys = jax.random.split(rng, labels.shape[0])
  chosen = jax.vmap(choose_half)(keys, present)               # [B, C]
  safe = jnp.clip(labels, 0, num_classes - 1)
  picked = jnp.take_along_axis(chosen, safe.reshape(labels.shape[0], -1), axis=1)
  valid = (labels >= 0) & (labels < num_classes)
  return (picked.reshape(labels.shape) & valid).astype(jnp.float32)


def class_mix(mask: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
  """``one_mix``: ``m * source + (1 - m) * target`` with ``mask [B, H, W]`` broadcast."""
  m = mask.reshape(mask.shape + (1,) * (source.ndim - mask.ndim)).astype(source.dtype)
  return m * source + (1 - m) * target
