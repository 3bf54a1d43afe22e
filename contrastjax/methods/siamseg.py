"""SiamSeg / DACS building blocks as pure, jit-able functions (explicit PRNG keys).

Reference: github.com/woldier/SiamSeg (mmseg 0.21 fork with DAFormer's DACS loop), summarised
in ``shared/specs/siamseg.md`` §2.3-§3. Images are NHWC, normalised with ImageNet mean/std on
0..255 values (``(x - mean) / std``) as the data pipeline emits them; labels are int32 with 255 =
ignored.

* :func:`ema_update` / :func:`ema_alpha`: the EMA teacher (``teacher_model.py``),
  ``alpha_t = min(1 - 1 / (iter + 1), alpha)`` over parameters only.
* :func:`pseudo_label_weight`: argmax pseudo-labels and ONE scalar confidence weight, the
  fraction of target pixels whose max softmax probability is >= the threshold.
* :func:`class_mix_masks`, :func:`class_mix`: ClassMix (``dacs_transform.get_class_masks``,
  ``one_mix``): per image, half (rounded up) of the classes present in the source label, chosen
  uniformly without replacement; jit-friendly as random scores over a fixed C-vector masked by
  presence.
* :func:`strong_transform`: colour jitter and Gaussian blur on the mixed images: the two
  on/off draws are made once per batch (``random.uniform`` in ``_prepare_strong_transform_param``),
  the jitter factors, jitter order and blur sigma per image (the reference calls kornia once per
  image; kornia samples factors per call, numpy draws sigma per call).
* :func:`siamseg_views`: the two SimSiam views of each target image (``sim_aug_transform.py``),
  every draw per image.
* :func:`seg_cross_entropy`: mmseg 0.21 ``CrossEntropyLoss`` with class weights, ignore 255 and a
  per-pixel weight, averaged over ALL pixels (ignored ones count as 0 in the numerator and 1 in
  the denominator), not normalised by the class weights (no ``avg_non_ignore``).
* :func:`simsiam_loss`: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, batch means.

Colour jitter follows torchvision's semantics, which kornia's ``ColorJitter`` follows since
kornia 0.6.7 (the reference does not pin kornia; older kornia's ``ColorJitter`` is today's
``ColorJiggle``): multiplicative brightness, contrast blended with the grey mean, saturation
blended with grey, hue rotated in HSV, each clamped to [0, 1], in a random order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastjax import parallel

from contrastjax.augment import photometric
from contrastjax.errors import ConfigError
from contrastjax.evaluators import seg_inference
from contrastjax.methods import options
from contrastjax.methods.base import Method, Metrics, module_kwargs, plain_config
from contrastjax.models import mit

PyTree = Any
IGNORE_INDEX = 255
#: ImageNet mean/std on 0..255 (mmseg ``img_norm_cfg``).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


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


# ----------------------------------------------------------------------------- pseudo-labels
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
  _check_groups(b, group_size)
  per_group = jnp.mean(confident.reshape(b // group_size, -1), axis=1)
  return label, jnp.repeat(per_group, group_size)


def _check_groups(batch: int, group_size: int) -> None:
  if group_size < 0 or (group_size and batch % group_size):
    raise ConfigError(f"config.siamseg.stat_group_size={group_size} must divide the global "
                     f"batch of {batch} images (config.batch_size); 0 = whole-batch "
                     "statistics")


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
    _check_groups(b, group_size)
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


# ----------------------------------------------------------------------------- photometric
def denormalize(x: jax.Array, mean=MEAN, std=STD) -> jax.Array:
  """Normalised -> [0, 1] (``denorm_``: ``(x * std + mean) / 255``)."""
  return (x * jnp.asarray(std, x.dtype) + jnp.asarray(mean, x.dtype)) / 255.0


def renormalize(x: jax.Array, mean=MEAN, std=STD) -> jax.Array:
  """[0, 1] -> normalised (``renorm_``)."""
  return (x * 255.0 - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def blur_kernel_size(size: int) -> int:
  """DACS's kernel size for a side of ``size`` px: about ``0.1 * size``, odd (51 at 512)."""
  c = math.ceil(0.1 * size)
  return int(math.floor(c - 0.5 + c % 2))


def _jitter_one(x01: jax.Array, params: photometric.StrongAugmentParams) -> jax.Array:
  branches = (
      lambda x: photometric.adjust_brightness(x, params.brightness),
      lambda x: photometric.adjust_contrast(x, params.contrast),
      lambda x: photometric.adjust_saturation(x, params.saturation),
      lambda x: photometric.adjust_hue(x, params.hue),
  )
  return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(params.order[i], branches, x),
                           x01)


def color_jitter(rng: jax.Array, images: jax.Array, strength: float,
                 apply: jax.Array, mean=MEAN, std=STD) -> jax.Array:
  """kornia ``ColorJitter(s, s, s, s)`` per image on de-normalised images, re-normalised.

  Args:
    rng: PRNG key (factors and order drawn per image).
    images: Normalised ``[B, H, W, 3]``.
    strength: ``s`` (brightness/contrast/saturation factors in ``[1 - s, 1 + s]``, hue shift
      in ``[-s, s]``).
    apply: bool, scalar (one draw for the batch) or ``[B]``: where False the image is returned
      unchanged (not even clamped).
  """
  params = photometric.sample_strong_augment_params(
      rng, brightness=strength, contrast=strength, saturation=strength, hue=strength,
      grayscale_p=0.0, batch_shape=(images.shape[0],))
  out = jax.vmap(_jitter_one)(denormalize(images, mean, std), params)
  out = renormalize(out, mean, std)
  apply = jnp.broadcast_to(jnp.asarray(apply), (images.shape[0],))
  return jnp.where(apply[:, None, None, None], out, images).astype(images.dtype)


def gaussian_blur(rng: jax.Array, images: jax.Array, apply: jax.Array,
                  sigma_range: tuple[float, float] = (0.15, 1.15)) -> jax.Array:
  """DACS ``gaussian_blur``: kornia ``GaussianBlur2d`` (reflect border), kernel
  :func:`blur_kernel_size` of the image's height/width, sigma ~ U(0.15, 1.15) per image."""
  b, h, w = images.shape[:3]
  sigma = jax.random.uniform(rng, (b,), minval=sigma_range[0], maxval=sigma_range[1])
  kernel = (blur_kernel_size(h), blur_kernel_size(w))
  out = jax.vmap(lambda x, s: photometric.gaussian_blur(x, s, kernel))(images, sigma)
  apply = jnp.broadcast_to(jnp.asarray(apply), (b,))
  return jnp.where(apply[:, None, None, None], out, images).astype(images.dtype)


def strong_transform(rng: jax.Array, images: jax.Array, *, color_jitter_strength: float = 0.2,
                     color_jitter_probability: float = 0.2, blur: bool = True,
                     mean=MEAN, std=STD) -> jax.Array:
  """DACS's strong augmentation of the mixed images (after ``one_mix``).

  Jitter is applied to the whole batch when one ``U(0, 1) > color_jitter_probability`` (the
  reference's ``color_jitter > p``, i.e. with probability 0.8), blur when one ``U(0, 1) > 0.5``;
  factors, order and sigma are per image.
  """
  k_flag_j, k_flag_b, k_j, k_b = jax.random.split(rng, 4)
  do_jitter = jax.random.uniform(k_flag_j) > color_jitter_probability
  do_blur = (jax.random.uniform(k_flag_b) > 0.5) & blur
  x = color_jitter(k_j, images, color_jitter_strength, do_jitter, mean, std)
  return gaussian_blur(k_b, x, do_blur)


def random_resized_crop(rng: jax.Array, images: jax.Array,
                        scale: tuple[float, float] = (0.6, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """kornia ``RandomResizedCrop(size=(H, W), scale, ratio)`` per image, bilinear.

  Area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio); the box is clipped to the image
  (kornia retries up to 10 times and falls back to a centre crop instead) and placed uniformly.
  Resampling uses half-pixel centres (kornia's default is ``align_corners=True``; a sub-pixel
  difference).
  """
  b, h, w, _ = images.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1]) * (h * w)
  log_r = jax.random.uniform(k_ratio, (b,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  r = jnp.exp(log_r)
  cw = jnp.clip(jnp.round(jnp.sqrt(area * r)), 1.0, float(w))
  ch = jnp.clip(jnp.round(jnp.sqrt(area / r)), 1.0, float(h))
  y0 = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - ch + 1.0))
  x0 = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - cw + 1.0))

  def one(img, y0, x0, ch, cw):
    sy, sx = h / ch, w / cw
    return jax.image.scale_and_translate(
        img, (h, w, img.shape[-1]), (0, 1), jnp.stack([sy, sx]),
        jnp.stack([-y0 * sy, -x0 * sx]), method="linear", antialias=False)

  return jax.vmap(one)(images, y0, x0, ch, cw).astype(images.dtype)


def simsiam_view(rng: jax.Array, images: jax.Array, *, color_jitter_strength: float = 0.25,
                 color_jitter_p: float = 0.4, grayscale_p: float = 0.1, blur_p: float = 0.5,
                 flip_p: float = 0.5, crop_scale: tuple[float, float] = (0.6, 1.0),
                 mean=MEAN, std=STD) -> jax.Array:
  """One SimSiam view per image (``sim_aug_transform.augment_transform``), draws per image.

  RandomResizedCrop(scale 0.6-1.0) -> colour jitter (s=0.25, p 0.4, on [0, 1]) -> grayscale
  (p 0.1; the reference converts the NORMALISED image, luma 0.299/0.587/0.114) -> Gaussian blur
  (p 0.5) -> horizontal flip (p 0.5) -> vertical flip (p 0.5).
  """
  b = images.shape[0]
  keys = jax.random.split(rng, 7)
  x = random_resized_crop(keys[0], images, scale=crop_scale)
  x = color_jitter(keys[1], x, color_jitter_strength,
                   jax.random.uniform(keys[2], (b,)) < color_jitter_p, mean, std)
  gray = jax.random.uniform(keys[3], (b,)) < grayscale_p
  x = jnp.where(gray[:, None, None, None], photometric.grayscale(x), x)
  x = gaussian_blur(keys[4], x, jax.random.uniform(keys[5], (b,)) < blur_p)
  flips = jax.random.uniform(keys[6], (2, b)) < flip_p
  x = jnp.where(flips[0][:, None, None, None], x[:, :, ::-1], x)
  x = jnp.where(flips[1][:, None, None, None], x[:, ::-1], x)
  return x.astype(images.dtype)


def siamseg_views(rng: jax.Array, images: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
  """The two independent views ``(q, k)`` of ``images`` (``tow_transform``)."""
  k1, k2 = jax.random.split(rng)
  return simsiam_view(k1, images, **kwargs), simsiam_view(k2, images, **kwargs)


# ----------------------------------------------------------------------------- losses
def resize_logits(logits: jax.Array, size: Sequence[int]) -> jax.Array:
  """``resize(..., mode='bilinear', align_corners=False)`` of ``[B, h, w, C]`` to ``size``."""
  size = (int(size[0]), int(size[1]))
  if tuple(logits.shape[1:3]) == size:
    return logits
  return jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]),
                          method="bilinear", antialias=False)


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
  """``torch.nn.CosineSimilarity(dim=-1, eps)``: ``a.b / max(|a| |b|, eps)``."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def simsiam_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array) -> jax.Array:
  """Symmetric negative cosine with stop-gradient on ``z``: ``-(D(p1, z2) + D(p2, z1)) / 2``."""
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  return -0.5 * (jnp.mean(cosine_similarity(p1, z2)) + jnp.mean(cosine_similarity(p2, z1)))


def _zero_after(tree: PyTree) -> jax.Array:
  """A float32 zero that XLA can compute only once every leaf of ``tree`` exists.

  Added to the next pass's input images it orders that pass after the previous gradient,
  so the previous pass's activations are dead before the next pass's are made. (An
  ``optimization_barrier`` does not survive to XLA's scheduler on every backend: XLA:CPU
  removes it before scheduling.) NaN or Inf in ``tree`` make it NaN: such a step diverged
  anyway and the spine rejects it.
  """
  total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree))
  return jax.lax.stop_gradient(total * 0.0)


# ============================================================================= EMA teacher
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


# ============================================================================= the method
VARIANTS = ("siamseg", "dacs", "source_only")
BACKWARD_MODES = ("per_loss", "joint")
INFERENCE_MODES = ("whole", "slide", "tta")


@dataclasses.dataclass(frozen=True)
class SiamSegOptions:
  """``config.siamseg`` (sources in ``contrastjax/configs/siamseg.py``; the class
  docstring of :class:`SiamSegMethod` explains each)."""
  variant: str = options.choice("siamseg", VARIANTS)
  num_classes: int = 0                 # required (> 0)
  class_weight: tuple[float, ...] | None = None
  alpha: float = 0.999                 # EMA teacher
  pseudo_threshold: float = 0.968
  classmix_scope: str = options.choice("image", ("image", "batch"))
  color_jitter_strength: float = 0.2
  color_jitter_probability: float = 0.2
  blur: bool = True
  contrastive_weight: float = 1.0
  contrastive_domain: str = options.choice("target", ("target", "source", "all"))
  views: dict = dataclasses.field(default_factory=dict)
  backward: str = options.choice("per_loss", BACKWARD_MODES)
  stat_group_size: int = 0
  avg_non_ignore: bool = False
  inference: str = options.choice("whole", INFERENCE_MODES)
  slide_crop: tuple[int, ...] = (512, 512)
  slide_stride: tuple[int, ...] = (341, 341)
  tta_ratios: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
  tta_img_scale: tuple[int, ...] | None = (1024, 1024)
  tta_flip: bool = False
  pretrained: str = ""
  pretrained_kind: str = options.choice("mit", ("mit", "siamseg"))
  pretrained_prefix: str | None = None
  init_from: str = ""
  init_from_which: str | int = "latest"

  def check(self, where: str) -> None:
    if self.num_classes <= 0:
      raise ConfigError(f"{where}.num_classes must be set (> 0)")
    if self.class_weight is not None and len(self.class_weight) != self.num_classes:
      raise ConfigError(f"{where}.class_weight has {len(self.class_weight)} entries for "
                        f"num_classes={self.num_classes}")
    if self.stat_group_size < 0:
      raise ConfigError(f"{where}.stat_group_size={self.stat_group_size}; expected 0 "
                        "(whole-batch statistics) or a positive group size")
    import inspect  # pylint: disable=g-import-not-at-top
    accepted = set(inspect.signature(simsiam_view).parameters) - {"rng", "images", "mean",
                                                                  "std"}
    bad = sorted(set(self.views) - accepted)
    if bad:
      raise ConfigError(f"{where}.views has unknown key(s) {bad}; accepted: "
                        f"{sorted(accepted)}")


#: The segmentor's parameter subtrees (what the EMA teacher averages and evaluation uses).
SEGMENTOR = ("backbone", "decode_head")  # "contrast": the SimSiam projector/predictor


def _explicit_mesh() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return (not mesh.empty) and any(t == jax.sharding.AxisType.Explicit
                                  for t in mesh.axis_types)


def _auto(fn, out_spec):
  """``fn`` traced with GSPMD sharding propagation (``jax.sharding.auto_axes``) when called
  under an explicit-axes mesh (the spine's); unchanged otherwise. The models reshape
  batch-sharded activations in ways explicit sharding cannot type (e.g. MiT's attention
  heads); the numbers are the same."""
  def wrapped(*args):
    if not _explicit_mesh():
      return fn(*args)
    return jax.sharding.auto_axes(fn, out_sharding=out_spec)(*args)
  return wrapped


def build_net(net_cls: type, model_cfg: Any, num_classes: int, stat_group_size: int = 0):
  """The SiamSeg network (``models.daformer.SiamSegNet``) from ``config.model``.

  Keys: the network's fields (``variant``, ``drop_path_rate``, ``remat``, ``fusion``,
  ``embed_dims``, ``channels``, ``dropout_ratio``, ``simsiam_dim``, ``dtype``) and
  ``backbone`` (a dict of extra :class:`~contrastjax.models.mit.MixVisionTransformer` fields,
  e.g. smaller ``embed_dims``/``depths`` for a demo). ``num_classes`` and the SimSiam
  BatchNorm group size (``stat_group_size``) come from ``config.siamseg``.
  """
  cfg = dict(plain_config(model_cfg) or {})
  backbone = dict(plain_config(cfg.pop("backbone", {})) or {})
  kwargs = module_kwargs(net_cls, cfg, "config.model",
                         skip=("num_classes", "backbone_overrides", "simsiam_bn_group_size"))
  mit_fields = module_kwargs(mit.MixVisionTransformer, backbone, "config.model.backbone")
  overrides = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                           for k, v in mit_fields.items()))
  return net_cls(num_classes=num_classes, backbone_overrides=overrides,
                 simsiam_bn_group_size=int(stat_group_size), **kwargs)


class SiamSegMethod(Method):
  """SiamSeg / DACS / source-only UDA training (``config.method = 'siamseg'``).

  One training step (reference ``SiamSeg.forward_train``; the reference back-propagates each
  loss at once, which sums the gradients; here ``backward='per_loss'`` (default) does the
  same, one gradient per term, and ``'joint'`` takes one gradient of the summed loss):

  1. source CE: student on the source crops, class-weighted CE against the labels;
  2. (dacs, siamseg) teacher logits of the target crops -> pseudo-labels and the scalar
     confidence weight; ClassMix of source and target (image, label, weight 1 vs pseudo
     weight); strong colour jitter + blur; weighted CE of the student on the mixed images;
  3. (siamseg) two views of each target crop through the student BACKBONE (shared),
     stage-4 average pool -> projector -> predictor; ``contrastive_weight * simsiam_loss``.

  The student's BatchNorm statistics (decode head, SimSiam) are threaded through the passes
  in that order. After the optimizer update, ``post_update`` moves the EMA teacher.

  Config: ``config.model`` (fields of ``models.daformer.SiamSegNet`` plus ``backbone``, extra
  MiT fields; see :func:`build_net`) and ``config.siamseg`` (keys of ``_SIAMSEG_KEYS``; unknown
  keys are an error):

  * ``variant``: ``'siamseg'`` | ``'dacs'`` (no SimSiam) | ``'source_only'``;
  * ``num_classes``, ``class_weight`` (CE class weights), ``avg_non_ignore`` (False = mmseg 0.21);
  * ``backward``: ``'per_loss'`` (each term's gradient before the next term's forward pass,
    as the reference; XLA then holds one student pass's activations at a time) or
    ``'joint'`` (one gradient of the sum; all passes' activations live at once);
  * ``alpha`` (0.999), ``pseudo_threshold`` (0.968): the EMA teacher;
  * ``stat_group_size``: 0 (global batch) or ``N``: pseudo-label weight, SimSiam BatchNorm
    statistics and ``batch``-scope ClassMix class set per group of ``N`` images (see below);
  * ``classmix_scope``: ``'image'`` (reference code) or ``'batch'`` (paper runs, pre PR #5);
  * ``color_jitter_strength`` (0.2), ``color_jitter_probability`` (0.2), ``blur`` (True);
  * ``contrastive_weight`` (1), ``contrastive_domain`` (``'target'``), ``views`` (keyword
    arguments of :func:`simsiam_view`);
  * ``inference``: ``'whole'`` | ``'slide'`` (``slide_crop``, ``slide_stride``) | ``'tta'``
    (``tta_ratios``, ``tta_img_scale``, ``tta_flip``);
  * ``pretrained`` (file), ``pretrained_kind`` (``'mit'`` ImageNet MiT weights in official /
    Hugging Face / mmseg naming, or ``'siamseg'`` a reference UDA checkpoint),
    ``pretrained_prefix``, ``init_from`` (a contrastjax workdir), ``init_from_which``.

  Deviations from the reference (global-batch semantics, so that 8 devices equal 1): by
  default (``stat_group_size=0``) the pseudo-label weight, the SimSiam BatchNorm statistics
  and ``batch``-scope ClassMix's class set are computed over the global batch; the reference
  computes each per GPU (6 images). ``stat_group_size=N`` (the ``paper`` variant: 6) computes
  them per group of ``N`` consecutive images of the global batch instead, the reference's
  per-GPU statistics on any number of devices. Not reproduced: the reference's contrastive
  gradients are not all-reduced across GPUs (its replicas' parameters drift apart); here
  every gradient is the global batch's.
  """

  name = "siamseg"

  def __init__(self, config, run=None):
    super().__init__(config, run)
    self.options = o = options.parse(SiamSegOptions, config.siamseg, "config.siamseg")
    self.variant, self.num_classes = o.variant, o.num_classes
    self.class_weight = o.class_weight
    self.stat_group_size = o.stat_group_size
    self.teacher = EMATeacher(o.alpha, o.pseudo_threshold, self.stat_group_size)
    self.classmix_scope = o.classmix_scope
    self.strong = dict(color_jitter_strength=o.color_jitter_strength,
                       color_jitter_probability=o.color_jitter_probability, blur=o.blur)
    self.contrastive_weight = o.contrastive_weight
    self.contrastive_domain = o.contrastive_domain
    self.views = {k: plain_config(v) for k, v in o.views.items()}
    self.avg_non_ignore, self.backward = o.avg_non_ignore, o.backward
    self.inference = o.inference
    self.slide_crop, self.slide_stride = o.slide_crop, o.slide_stride
    self.tta_ratios, self.tta_img_scale, self.tta_flip = o.tta_ratios, o.tta_img_scale, o.tta_flip
    self.pretrained, self.pretrained_kind = o.pretrained, o.pretrained_kind
    self.pretrained_prefix = o.pretrained_prefix
    self.init_from, self.init_from_which = o.init_from, o.init_from_which

    from contrastjax.models import daformer  # pylint: disable=g-import-not-at-top
    self.net = build_net(daformer.SiamSegNet, config.model, self.num_classes,
                         self.stat_group_size)

  # ------------------------------------------------------------------ networks
  @staticmethod
  def _stats(model_state):
    return {"batch_stats": model_state["batch_stats"]} if model_state.get("batch_stats") else {}

  def _segment(self, params, model_state, x, *, train: bool, rng=None,
               deterministic: bool | None = None):
    """``(logits [B, H/4, W/4, C], new model_state)`` of the segmentor."""
    variables = {"params": params, **self._stats(model_state)}
    if not train:
      logits, _ = self.net.apply(variables, x, train=False)
      return logits, model_state
    det = (not train) if deterministic is None else deterministic
    rngs = {} if det else {"dropout": rng}
    (logits, _), new = self.net.apply(variables, x, train=True, deterministic=det, rngs=rngs,
                                      mutable=["batch_stats"])
    return logits, {**model_state, **new}

  def _simsiam(self, params, model_state, q, k, rng):
    """``(p1, p2, z1, z2, new model_state)``: both views through the shared backbone."""
    variables = {"params": params, **self._stats(model_state)}
    out, new = self.net.apply(variables, q, k, train=True, method="simsiam",
                              rngs={"dropout": rng}, mutable=["batch_stats"])
    return (*out, {**model_state, **new})

  # ------------------------------------------------------------------ set-up
  def _images(self, batch):
    if "source" in batch:
      return batch["source"]["image"]
    return batch["image"]

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    """Student parameters (backbone, decode_head[, simsiam]), BN statistics and the teacher."""
    return _auto(self._init, P())(rng, batch)

  def _init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    variables = self.net.init({"params": rng}, self._images(batch), train=False)
    params = dict(variables["params"])
    model_state = {"batch_stats": dict(variables.get("batch_stats", {}))}
    if self.variant != "siamseg":   # no SimSiam branch: no parameters for it
      params.pop("contrast", None)
      model_state["batch_stats"].pop("contrast", None)
    extra = {}
    if self.variant != "source_only":
      extra["teacher"] = jax.tree.map(jnp.copy, {k: params[k] for k in SEGMENTOR})
    return params, model_state, extra

  def load_pretrained(self, params: PyTree, model_state: PyTree, extra: PyTree
                      ) -> tuple[PyTree, PyTree, PyTree]:
    """Imports MiT weights (``pretrained``) and/or another run's parameters (``init_from``)
    into the student, then re-copies the teacher (the reference's iter-0 copy).

    Raises:
      FileNotFoundError: a path or workdir that does not exist.
      KeyError / ValueError: weights that do not fit the model (names the tensor).
    """
    params = dict(params)
    changed = False
    if self.pretrained and self.pretrained_kind == "mit":
      new, ignored = mit.load({"params": params["backbone"]}, self.pretrained,
                              prefix=self.pretrained_prefix)
      params["backbone"] = new["params"]
      logging.info("loaded MiT weights from %s (%d keys ignored)", self.pretrained,
                   len(ignored))
      changed = True
    elif self.pretrained:   # a reference SiamSeg (mmseg UDA) checkpoint: student + SimSiam
      from contrastjax.models import daformer  # pylint: disable=g-import-not-at-top
      variables = {"params": params, **model_state}
      kwargs = {} if self.pretrained_prefix is None else {"prefix": self.pretrained_prefix}
      if "contrast" not in params:
        kwargs["contrast_prefix"] = None
      new, ignored = daformer.load(variables, self.pretrained, **kwargs)
      params = dict(new["params"])
      model_state = {k: v for k, v in new.items() if k != "params"}
      logging.info("loaded a SiamSeg checkpoint from %s (%d keys ignored)", self.pretrained,
                   len(ignored))
      changed = True
    if self.init_from:
      from contrastjax import checkpoint  # pylint: disable=g-import-not-at-top
      params, model_state, step = checkpoint.import_subtrees(
          params, model_state, self.init_from, self.init_from_which)
      logging.info("initialised %s from %s (step %s)", sorted(params), self.init_from, step)
      changed = True
    if changed and "teacher" in extra:
      extra = dict(extra, teacher={k: jax.tree.map(jnp.copy, params[k]) for k in SEGMENTOR})
    return params, model_state, extra

  # ------------------------------------------------------------------ training
  def _ce(self, logits, labels, pixel_weight=None):
    up = resize_logits(logits, labels.shape[1:3])
    return seg_cross_entropy(up, labels, self.class_weight, pixel_weight,
                             avg_non_ignore=self.avg_non_ignore)

  def loss_fn(self, params: PyTree, model_state: PyTree, extra: PyTree, batch: PyTree,
              rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Source CE (+ ClassMix CE with pseudo-labels) (+ SimSiam); see the class docstring."""
    del step
    return _auto(self._loss, P())(params, model_state, extra, batch, rng)

  def value_and_grad(self, params: PyTree, model_state: PyTree, extra: PyTree,
                     batch: PyTree, rng: jax.Array, step: jax.Array,
                     frozen: PyTree | None = None):
    """The loss and its gradient; with ``config.siamseg.backward='per_loss'`` (the
    reference's order: each loss back-propagated before the next forward pass) one
    ``value_and_grad`` per term, summed, so that only one student pass's activations are
    live at a time. The same numbers as ``'joint'`` (one gradient of the sum)."""
    if self.backward == "joint":
      return super().value_and_grad(params, model_state, extra, batch, rng, step, frozen)
    if frozen is not None:
      raise ConfigError("frozen optimizer groups need config.siamseg.backward='joint' (the "
                        "per-loss backward differentiates every parameter)")
    return _auto(self._per_loss_value_and_grad, P())(params, model_state, extra, batch, rng)

  def _terms(self, extra, batch, rng):
    """The step's loss terms, in the reference's order.

    Returns a list of functions ``term(params, model_state, after) -> (value, model_state,
    metrics)``: the step's loss is the sum of the values, the BatchNorm statistics thread
    through the terms in order. ``after`` is a float32 scalar zero that is added to every
    image a term reads (teacher input and SimSiam views included): a data dependence that
    :meth:`_per_loss_value_and_grad` uses to run each term after the previous gradient, as
    the reference does (its teacher pass follows the source backward).
    """
    xs, ys = batch["source"]["image"], batch["source"]["label"].astype(jnp.int32)
    xt = batch["target"]["image"]
    _check_groups(xs.shape[0], self.stat_group_size)
    keys = jax.random.split(rng, 8)

    # 1. source
    def source(params, state, after):
      logits, state = self._segment(params, state, xs + after, train=True, rng=keys[0])
      loss_src = self._ce(logits, ys)
      return loss_src, state, {"loss_src": loss_src}

    terms = [source]
    if self.variant == "source_only":
      return terms

    # 2. pseudo-labels from the EMA teacher (BN batch statistics, no dropout/drop path),
    # ClassMix + strong augmentation, CE of the student on the mixed images
    def mix(params, state, after):
      t_logits, _ = self._segment(extra["teacher"], state, xt + after, train=True,
                                  deterministic=True)
      t_logits = jax.lax.stop_gradient(resize_logits(t_logits, xt.shape[1:3]))
      pseudo, weight = self.teacher.pseudo_label(t_logits)
      mask = class_mix_masks(keys[1], ys, self.num_classes, self.classmix_scope,
                             self.stat_group_size)
      mixed = strong_transform(keys[2], class_mix(mask, xs + after, xt + after), **self.strong)
      mixed_label = jnp.where(mask > 0, ys, pseudo)
      per_pixel = jnp.broadcast_to(weight.reshape(weight.shape + (1, 1)), mask.shape)
      mixed_weight = class_mix(mask, jnp.ones_like(mask), per_pixel)
      logits, state = self._segment(params, state, mixed, train=True, rng=keys[3])
      loss_mix = self._ce(logits, mixed_label, mixed_weight)
      return loss_mix, state, {"loss_mix": loss_mix, "pseudo_weight": jnp.mean(weight),
                               "mix_fraction": jnp.mean(mask)}

    terms.append(mix)
    if self.variant != "siamseg":
      return terms

    # 3. SimSiam on two views of each (target) image, through the student backbone
    groups = {"target": [xt], "source": [xs], "all": [xt, xs]}[self.contrastive_domain]

    def contrast(params, state, after):
      outs = []
      for g, x in enumerate(groups):   # 'all': one branch call per domain, as the reference
        q, k = siamseg_views(jax.random.fold_in(keys[4], g), x + after, **self.views)
        *pz, state = self._simsiam(params, state, q, k, jax.random.fold_in(keys[5], g))
        outs.append(pz)
      p1, p2, z1, z2 = (jnp.concatenate([o[i] for o in outs]) for i in range(4))
      loss_con = simsiam_loss(p1, p2, z1, z2)
      return self.contrastive_weight * loss_con, state, {"loss_contrastive": loss_con}

    terms.append(contrast)
    return terms

  def _loss(self, params, model_state, extra, batch, rng):
    state, loss, metrics = model_state, 0.0, {}
    for term in self._terms(extra, batch, rng):
      value, state, m = term(params, state, jnp.zeros((), jnp.float32))
      loss = loss + value
      metrics.update(m)
    return loss, (state, metrics)

  def _per_loss_value_and_grad(self, params, model_state, extra, batch, rng):
    state, loss, metrics, grads = model_state, 0.0, {}, None
    after = jnp.zeros((), jnp.float32)
    for term in self._terms(extra, batch, rng):
      if grads is not None:
        after = _zero_after(grads)

      def f(p, state=state, term=term, after=after):
        value, new_state, m = term(p, state, after)
        return value, (new_state, m)

      (value, (state, m)), g = jax.value_and_grad(f, has_aux=True)(params)
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      loss = loss + value
      metrics.update(m)
    return (loss, (state, metrics)), grads

  def post_update(self, step: jax.Array, params: PyTree, extra: PyTree) -> PyTree:
    """EMA teacher update with the new student (``step`` = updates applied so far)."""
    if "teacher" not in extra:
      return extra
    student = {k: params[k] for k in SEGMENTOR}
    return dict(extra, teacher=self.teacher.update(extra["teacher"], student, step))

  # ------------------------------------------------------------------ evaluation
  def logits_fn(self, params: PyTree, model_state: PyTree):
    """``images -> logits [B, H/4, W/4, C]`` of the student in eval mode (for inference)."""
    def fn(images):
      logits, _ = self._segment(params, model_state, images, train=False)
      return logits.astype(jnp.float32)
    return fn

  def predict(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree) -> dict[str, jax.Array]:
    """The STUDENT's class map ``{'pred': int32 [B, H, W]}`` (the reference evaluates the
    student), by whole-image, sliding-window or multi-scale inference."""
    del extra
    return _auto(self._predict, P(parallel.DATA_AXIS))(params, model_state, batch["image"])

  def _predict(self, params, model_state, images):
    fn = self.logits_fn(params, model_state)
    if self.inference == "whole":
      scores = seg_inference.whole_inference(fn, images)
    elif self.inference == "slide":
      scores = seg_inference.slide_inference(fn, images, self.slide_crop, self.slide_stride)
    else:
      scores = seg_inference.multiscale_inference(
          fn, images, ratios=self.tta_ratios, img_scale=self.tta_img_scale,
          flip=self.tta_flip)
    return {"pred": seg_inference.predict_classes(scores)}

  def eval_loss(self, params: PyTree, model_state: PyTree, extra: PyTree,
                batch: PyTree) -> jax.Array:
    """Whole-image CE of the student over the valid examples of a padded batch."""
    del extra
    return _auto(self._eval_loss, P())(params, model_state, batch)

  def _eval_loss(self, params, model_state, batch):
    logits = resize_logits(self.logits_fn(params, model_state)(batch["image"]),
                           batch["label"].shape[1:3])
    labels = batch["label"].astype(jnp.int32)
    valid = batch["valid"].astype(jnp.float32)
    pixel_weight = jnp.broadcast_to(valid[:, None, None], labels.shape)
    per = seg_cross_entropy(logits, labels, self.class_weight, pixel_weight,
                            avg_non_ignore=self.avg_non_ignore)
    return per * labels.shape[0] / jnp.maximum(valid.sum(), 1.0)
