"""The mmseg 0.21 semantic-segmentation train pipeline on the host (numpy), as SiamSeg uses it.

SiamSeg's train pipeline (``configs/_base_/datasets/uda_*_512x512.py``, identical for source and
target; docs/methods/siamseg.md)::

  LoadImageFromFile -> LoadAnnotations(reduce_zero_label=True)
  -> Resize(img_scale, ratio_range)          # keep ratio; LoveDA (1024, 1024), (0.5, 1.5)
                                             #             ISPRS  (512, 512),  (1.0, 2.0)
  -> RandomCrop(512, cat_max_ratio=0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion
  -> Normalize(ImageNet mean/std on 0..255) -> Pad(512, pad_val=0, seg_pad_val=255)

What each step does here (``mmseg/datasets/pipelines/transforms.py``, ``mmcv.imrescale``):

* **Resize**: ``ratio ~ U(lo, hi)``; target scale ``(int(S0 * ratio), int(S1 * ratio))``; keep
  ratio: ``factor = min(max(scale) / long_edge, min(scale) / short_edge)``, new size
  ``int(edge * factor + 0.5)``. Image cv2 ``INTER_LINEAR`` (half-pixel centres, no antialias;
  :func:`contrastjax.data.transforms.medseg.resize_bilinear`), label cv2 ``INTER_NEAREST``
  (``src = floor(dst * in / out)``).
* **RandomCrop** with ``cat_max_ratio``: a crop origin uniform in ``[0, max(H - c, 0)]``; up to 10
  times, if the crop's label has fewer than 2 non-ignored classes or its most frequent class
  covers ``>= cat_max_ratio`` of the non-ignored pixels, a new origin is drawn. After 10 failed
  checks the 11th origin is used unchecked (as mmseg). An image smaller than the crop is kept
  whole (then padded).
* **RandomFlip**: horizontal with probability 0.5.
* **PhotoMetricDistortion** on uint8: brightness ``+U(-32, 32)`` (p 0.5); contrast ``*U(0.5, 1.5)``
  (p 0.5; before saturation when the coin ``mode`` is 1, else after hue; note mmseg's code
  comment says the opposite of what the code does, the code is followed); saturation ``S *
  U(0.5, 1.5)`` in cv2's 8-bit HSV (p 0.5); hue ``(H + randint(-18, 18)) mod 180`` (numpy's
  exclusive upper bound: -18..17) (p 0.5). Every op computes in float32, clips to [0, 255] and
  truncates to uint8 (``astype``), as mmseg. The 8-bit HSV round trip follows cv2's formulas
  (RGB->HSV rounded, HSV->RGB truncated as OpenCV 4.5's vectorised path) in float arithmetic;
  about 1 % of pixels differ from cv2 by one level.
* **Normalize**: ``(x - mean) / std`` with ``mean = (123.675, 116.28, 103.53)``, ``std =
  (58.395, 57.12, 57.375)`` in RGB order (mmseg loads BGR and converts with ``to_rgb=True``;
  we decode RGB directly. For IRRG tiles the channels are the file's order, as in mmseg).
* **Pad** at the bottom/right to the crop size: image 0 (after normalisation), label 255.

All random draws come from one ``numpy.random.Generator`` per example (grain's ``RandomMap``
seeds it from the pipeline seed and the example's stream position), so a run is reproducible.
The reference draws from numpy's global state; its random streams are not reproduced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import grain
import numpy as np

from contrastjax.data.transforms.medseg import resize_bilinear

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class SegAugConfig:
  """Parameters of the mmseg train pipeline (defaults: SiamSeg's LoveDA pipeline).

  Attributes:
    img_scale: ``Resize.img_scale`` ``(S0, S1)``; the random scale is ``(int(S0 r), int(S1 r))``.
    ratio_range: ``Resize.ratio_range`` ``(lo, hi)``; ``None`` resizes to ``img_scale`` exactly
      (keep ratio), ``(1, 1)`` too.
    crop_size: ``RandomCrop.crop_size`` and ``Pad.size`` ``(h, w)``.
    cat_max_ratio: ``RandomCrop.cat_max_ratio`` (1.0 disables the check).
    flip_prob: ``RandomFlip.prob``.
    photometric: Apply ``PhotoMetricDistortion``.
    brightness_delta: Brightness delta (mmseg default 32).
    contrast_range: Contrast factor range (0.5, 1.5).
    saturation_range: Saturation factor range (0.5, 1.5).
    hue_delta: Hue delta in cv2 units (degrees / 2), default 18.
    mean: Normalisation mean (0..255 scale, RGB).
    std: Normalisation std.
    ignore_index: Label of ignored pixels (also the label padding value).
    max_crop_tries: Crop checks before the last drawn crop is taken unchecked (mmseg: 10).
  """

  img_scale: tuple[int, int] = (1024, 1024)
  ratio_range: tuple[float, float] | None = (0.5, 1.5)
  crop_size: tuple[int, int] = (512, 512)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True
  brightness_delta: float = 32.0
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  ignore_index: int = IGNORE_INDEX
  max_crop_tries: int = 10


#: The reference settings (docs/methods/siamseg.md).
LOVEDA_AUG = SegAugConfig(img_scale=(1024, 1024), ratio_range=(0.5, 1.5))
ISPRS_AUG = SegAugConfig(img_scale=(512, 512), ratio_range=(1.0, 2.0))


# ------------------------------------------------------------------------------------------------
# Resize.
# ------------------------------------------------------------------------------------------------


def rescale_size(shape: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
  """``mmcv.rescale_size`` for a tuple scale: the keep-ratio output ``(h, w)``.

  Args:
    shape: Input ``(h, w)``.
    scale: ``(S0, S1)``; the long edge goes to at most ``max(scale)``, the short edge to at most
      ``min(scale)``.

  Returns:
    ``(int(h f + 0.5), int(w f + 0.5))`` with ``f = min(max(scale) / max(h, w), min(scale) /
    min(h, w))``.
  """
  h, w = int(shape[0]), int(shape[1])
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def random_scale(img_scale: tuple[int, int], ratio_range: tuple[float, float] | None,
                 rng: np.random.Generator) -> tuple[int, int]:
  """``Resize.random_sample_ratio``: ``(int(S0 r), int(S1 r))`` with ``r ~ U(lo, hi)``."""
  if ratio_range is None:
    return int(img_scale[0]), int(img_scale[1])
  lo, hi = float(ratio_range[0]), float(ratio_range[1])
  if lo > hi:
    raise ValueError(f'ratio_range={ratio_range}; expected lo <= hi')
  ratio = rng.random() * (hi - lo) + lo
  return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """cv2 ``INTER_NEAREST``: output pixel ``d`` takes input ``floor(d * in / out)``.

  Args:
    array: ``[H, W]`` or ``[H, W, C]``.
    size: Output ``(height, width)``.

  Returns:
    The resized array (same dtype).
  """
  in_h, in_w = array.shape[:2]
  out_h, out_w = int(size[0]), int(size[1])
  rows = np.minimum(np.floor(np.arange(out_h) * (in_h / out_h)).astype(np.intp), in_h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * (in_w / out_w)).astype(np.intp), in_w - 1)
  return array[rows[:, None], cols[None, :]]


# ------------------------------------------------------------------------------------------------
# Crop, flip, pad.
# ------------------------------------------------------------------------------------------------


def _crop_origin(shape: tuple[int, int], crop: tuple[int, int],
                 rng: np.random.Generator) -> tuple[int, int]:
  margin_h = max(shape[0] - crop[0], 0)
  margin_w = max(shape[1] - crop[1], 0)
  return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def crop_is_acceptable(label: np.ndarray, cat_max_ratio: float,
                       ignore_index: int = IGNORE_INDEX) -> bool:
  """mmseg's ``cat_max_ratio`` test: >= 2 non-ignored classes and the largest < the ratio."""
  values, counts = np.unique(label, return_counts=True)
  counts = counts[values != ignore_index]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator, *,
                    cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                    max_tries: int = 10) -> tuple[int, int, int, int]:
  """``RandomCrop.__call__``'s box choice: ``(y0, y1, x0, x1)`` (clipped to the image).

  Args:
    label: Label map ``[H, W]`` (already resized).
    crop: ``(ch, cw)``.
    rng: Generator.
    cat_max_ratio: The ratio; ``>= 1`` accepts the first box.
    ignore_index: Label excluded from the class counts.
    max_tries: Number of checks (mmseg: 10); after that the last drawn box is used unchecked.

  Returns:
    The box; ``y1 - y0 = min(ch, H)``, ``x1 - x0 = min(cw, W)``.
  """
  h, w = label.shape[:2]
  y0, x0 = _crop_origin((h, w), crop, rng)
  if cat_max_ratio < 1.0:
    for _ in range(int(max_tries)):
      if crop_is_acceptable(label[y0:y0 + crop[0], x0:x0 + crop[1]], cat_max_ratio,
                            ignore_index):
        break
      y0, x0 = _crop_origin((h, w), crop, rng)
  return y0, min(y0 + crop[0], h), x0, min(x0 + crop[1], w)


def pad_to(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int], *,
           pad_val: float = 0.0, seg_pad_val: int = IGNORE_INDEX):
  """``Pad(size)``: pads at the bottom and right (``mmcv.impad``) to at least ``size``."""
  h, w = image.shape[:2]
  ph, pw = max(int(size[0]) - h, 0), max(int(size[1]) - w, 0)
  if ph or pw:
    image = np.pad(image, ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2),
                   constant_values=pad_val)
    if label is not None:
      label = np.pad(label, ((0, ph), (0, pw)), constant_values=seg_pad_val)
  return image, label


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """``(image - mean) / std`` in float32 (image on the 0..255 scale)."""
  return ((image.astype(np.float32) - np.asarray(mean, np.float32))
          / np.asarray(std, np.float32))


# ------------------------------------------------------------------------------------------------
# PhotoMetricDistortion.
# ------------------------------------------------------------------------------------------------


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
  """cv2 ``COLOR_RGB2HSV`` for uint8: H in [0, 180) (degrees / 2), S and V in [0, 255]."""
  x = rgb.astype(np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(axis=-1)
  diff = v - x.min(axis=-1)
  s = np.where(v > 0, 255.0 * diff / np.maximum(v, 1.0), 0.0)
  safe = np.where(diff > 0, diff, 1.0)
  h = np.where(v == r, 60.0 * (g - b) / safe,
               np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
  h = np.where(diff > 0, h, 0.0)
  h = np.where(h < 0, h + 360.0, h)
  hsv = np.stack([np.rint(h / 2.0) % 180.0, np.rint(s), v], axis=-1)
  return hsv.astype(np.uint8)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
  """cv2 ``COLOR_HSV2RGB`` for uint8 (H in [0, 180)): float32 maths, results TRUNCATED.

  OpenCV 4.5's vectorised ``HSV2RGB_b`` (what mmcv 1.5 runs) converts with ``v_trunc``, not
  rounding; checked against opencv-python-headless 5.0: equal on ~99 % of random pixels, off by
  one on the rest.
  """
  f32 = np.float32
  x = hsv.astype(f32)
  h = x[..., 0] * f32(6.0 / 180.0)
  s = x[..., 1] * f32(1.0 / 255.0)
  v = x[..., 2] * f32(1.0 / 255.0)
  floor = np.floor(h)
  f = (h - floor).astype(f32)
  sector = floor.astype(np.int32) % 6
  p = v * (f32(1) - s)
  q = v * (f32(1) - s * f)
  t = v * (f32(1) - s * (f32(1) - f))
  table = np.stack([np.stack(c, axis=-1) for c in
                    ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], axis=0)
  out = np.take_along_axis(table, sector[None, ..., None], axis=0)[0]
  return np.clip(np.floor(out * f32(255.0)), 0, 255).astype(np.uint8)


class PhotometricParams(NamedTuple):
  """The random choices of one ``PhotoMetricDistortion`` call (``None`` = op skipped).

  Attributes:
    beta: Brightness offset in ``[-delta, delta)``.
    contrast_first: mmseg's ``mode == 1``: contrast right after brightness, else last.
    alpha: Contrast factor.
    saturation: Saturation factor.
    hue: Hue shift (integer, cv2 units).
  """

  beta: float | None
  contrast_first: bool
  alpha: float | None
  saturation: float | None
  hue: int | None


def sample_photometric(rng: np.random.Generator, cfg: SegAugConfig = LOVEDA_AUG
                       ) -> PhotometricParams:
  """Draws the parameters in mmseg's order (coin, value; mode; contrast; saturation; hue)."""
  beta = (float(rng.uniform(-cfg.brightness_delta, cfg.brightness_delta))
          if rng.integers(2) else None)
  contrast_first = bool(rng.integers(2) == 1)

  def contrast():
    return float(rng.uniform(*cfg.contrast_range)) if rng.integers(2) else None

  alpha = contrast() if contrast_first else None
  saturation = float(rng.uniform(*cfg.saturation_range)) if rng.integers(2) else None
  hue = int(rng.integers(-cfg.hue_delta, cfg.hue_delta)) if rng.integers(2) else None
  if not contrast_first:
    alpha = contrast()
  return PhotometricParams(beta, contrast_first, alpha, saturation, hue)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0,
                 255).astype(np.uint8)


def apply_photometric(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
  """Applies ``PhotoMetricDistortion`` with fixed parameters to a uint8 RGB image."""
  img = image
  if params.beta is not None:
    img = _convert(img, beta=params.beta)
  if params.contrast_first and params.alpha is not None:
    img = _convert(img, alpha=params.alpha)
  if params.saturation is not None:
    hsv = rgb_to_hsv_u8(img)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=params.saturation)
    img = hsv_to_rgb_u8(hsv)
  if params.hue is not None:
    hsv = rgb_to_hsv_u8(img)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + params.hue) % 180
    img = hsv_to_rgb_u8(hsv)
  if not params.contrast_first and params.alpha is not None:
    img = _convert(img, alpha=params.alpha)
  return img


# ------------------------------------------------------------------------------------------------
# The whole pipeline.
# ------------------------------------------------------------------------------------------------


def train_example(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                  cfg: SegAugConfig = LOVEDA_AUG) -> tuple[np.ndarray, np.ndarray]:
  """One example through Resize -> RandomCrop -> RandomFlip -> PhotoMetric -> Normalize -> Pad.

  Args:
    image: uint8 ``[H, W, 3]``.
    label: uint8/int ``[H, W]``, classes ``0..C-1`` and ``ignore_index``.
    rng: The example's generator.
    cfg: Pipeline parameters.

  Returns:
    ``(image float32 [ch, cw, 3] normalised, label int32 [ch, cw])``.
  """
  if image.shape[:2] != label.shape[:2]:
    raise ValueError(f'image {image.shape} and label {label.shape} differ in size')
  size = rescale_size(image.shape[:2], random_scale(cfg.img_scale, cfg.ratio_range, rng))
  if size != image.shape[:2]:
    image = resize_bilinear(image, size)
    label = resize_nearest(label, size)
  y0, y1, x0, x1 = random_crop_box(label, cfg.crop_size, rng, cat_max_ratio=cfg.cat_max_ratio,
                                   ignore_index=cfg.ignore_index, max_tries=cfg.max_crop_tries)
  image, label = image[y0:y1, x0:x1], label[y0:y1, x0:x1]
  if rng.random() < cfg.flip_prob:
    image, label = image[:, ::-1], label[:, ::-1]
  if cfg.photometric:
    image = apply_photometric(np.ascontiguousarray(image), sample_photometric(rng, cfg))
  out, lab = pad_to(normalize(image, cfg.mean, cfg.std), label.astype(np.int32), cfg.crop_size,
                    seg_pad_val=cfg.ignore_index)
  return np.ascontiguousarray(out), np.ascontiguousarray(lab)


Example = dict[str, Any]


class SegTrainAugment(grain.transforms.RandomMap):
  """The train pipeline on a single-domain example ``{'image', 'label'}``."""

  def __init__(self, cfg: SegAugConfig = LOVEDA_AUG):
    self.cfg = cfg

  def random_map(self, x: Example, rng: np.random.Generator) -> Example:
    image, label = train_example(x['image'], x['label'], rng, self.cfg)
    out = {k: v for k, v in x.items() if k not in ('image', 'label')}
    out.update(image=image, label=label)
    return out


class SegEvalNormalize(grain.transforms.Map):
  """Evaluation: the image normalised (float32, full size) and the label as int32."""

  def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)

  def map(self, x: Example) -> Example:
    out = dict(x)
    out['image'] = normalize(x['image'], self.mean, self.std)
    if 'label' in x:
      out['label'] = np.asarray(x['label'], np.int32)
    return out


def denormalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """Inverse of :func:`normalize`, as uint8 (for pictures)."""
  x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)
