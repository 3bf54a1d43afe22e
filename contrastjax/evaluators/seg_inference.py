"""Segmentation inference helpers as mmseg's ``EncoderDecoder`` (whole, slide, multi-scale/flip TTA).

Every helper is a pure function of a ``logits_fn(images [B, h, w, 3]) -> logits [B, h', w', C]``
(any output resolution, e.g. the decoder's ``h / 4``), so a method plugs its model in with
``functools.partial(model.apply, variables)``; all shapes are static, so the helpers jit (the
window and scale loops unroll at trace time). Images are NHWC, already normalised.

Reference (SiamSeg ``mmseg/models/segmentors/encoder_decoder.py``; docs/methods/siamseg.md):

* ``encode_decode``: logits bilinearly resized to the INPUT size (``align_corners=False``);
* ``whole_inference``: that, then (``rescale``) bilinearly resized to the original size;
* ``slide_inference``: windows of ``crop`` at ``stride``; ``h_grids = max(H - ch + sh - 1, 0) //
  sh + 1``; the last window is shifted back inside the image; an image smaller than the crop is one
  window of the image's size; per-pixel sums of window logits divided by the window count;
* ``inference``: softmax of those logits, flipped back if the input was flipped;
* ``aug_test`` (``MultiScaleFlipAug``): the mean of the softmax probabilities over scales (and
  flips), argmax. LoveDA: ``img_scale=(1024, 1024)``, ratios 0.75, 1.0, 1.25, 1.5, no flip;
  ISPRS: one scale (512, 512) on 512 crops, i.e. plain whole inference. The scaled image size is
  mmcv's keep-ratio ``rescale_size``.

Bilinear resizing is :func:`contrastjax.models.resample.resize_bilinear_half_pixel`
(``jax.image.resize(..., antialias=False)``), which samples at half-pixel centres like torch's
``align_corners=False`` and cv2's ``INTER_LINEAR`` also when shrinking (the reference resizes
the uint8 image before normalising; resizing after normalising is the same up to uint8
rounding, as both are affine per pixel).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from contrastjax.data.transforms.mmseg import rescale_size
from contrastjax.models.resample import resize_bilinear_half_pixel

LogitsFn = Callable[[jax.Array], jax.Array]

#: SiamSeg's LoveDA test-time scales (``img_ratios`` of ``uda_rural_2_urban_512x512.py``).
LOVEDA_TTA_RATIOS = (0.75, 1.0, 1.25, 1.5)
LOVEDA_IMG_SCALE = (1024, 1024)


def encode_decode(logits_fn: LogitsFn, images: jax.Array) -> jax.Array:
  """Logits resized to the input's size ``[B, H, W, C]``."""
  return resize_bilinear_half_pixel(logits_fn(images), images.shape[1:3])


def whole_inference(logits_fn: LogitsFn, images: jax.Array,
                    out_size: Sequence[int] | None = None) -> jax.Array:
  """mmseg ``whole_inference``: logits at the input size, then at ``out_size`` if given."""
  logits = encode_decode(logits_fn, images)
  return logits if out_size is None else resize_bilinear_half_pixel(logits, out_size)


def slide_windows(height: int, width: int, crop: Sequence[int],
                  stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg's sliding windows ``(y1, y2, x1, x2)`` over an ``height x width`` image."""
  ch, cw = int(crop[0]), int(crop[1])
  sh, sw = int(stride[0]), int(stride[1])
  if min(ch, cw, sh, sw) < 1:
    raise ValueError(f'crop={crop}, stride={stride}; expected positive sizes')
  h_grids = max(height - ch + sh - 1, 0) // sh + 1
  w_grids = max(width - cw + sw - 1, 0) // sw + 1
  windows = []
  for i in range(h_grids):
    for j in range(w_grids):
      y2 = min(i * sh + ch, height)
      x2 = min(j * sw + cw, width)
      windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
  return windows


def slide_inference(logits_fn: LogitsFn, images: jax.Array, crop: Sequence[int] = (512, 512),
                    stride: Sequence[int] = (341, 341),
                    out_size: Sequence[int] | None = None) -> jax.Array:
  """mmseg ``slide_inference``: count-normalised sum of window logits ``[B, H, W, C]``.

  Args:
    logits_fn: The model.
    images: ``[B, H, W, 3]``.
    crop: Window ``(h, w)``.
    stride: Step ``(h, w)``.
    out_size: Resize the result to this size (mmseg ``rescale``), default the input size.
  """
  b, h, w, _ = images.shape
  preds, count = None, jnp.zeros((1, h, w, 1), jnp.float32)
  for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
    logits = encode_decode(logits_fn, images[:, y1:y2, x1:x2])
    if preds is None:
      preds = jnp.zeros((b, h, w, logits.shape[-1]), logits.dtype)
    preds = preds.at[:, y1:y2, x1:x2].add(logits)
    count = count.at[:, y1:y2, x1:x2].add(1.0)
  preds = preds / count.astype(preds.dtype)
  return preds if out_size is None else resize_bilinear_half_pixel(preds, out_size)


def inference(logits_fn: LogitsFn, images: jax.Array, *, mode: str = 'whole',
              out_size: Sequence[int] | None = None, flip: str | None = None,
              crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341)) -> jax.Array:
  """mmseg ``inference``: softmax probabilities ``[B, H, W, C]``, un-flipped.

  Args:
    logits_fn: The model.
    images: ``[B, H, W, 3]`` (already flipped when ``flip`` is set).
    mode: ``'whole'`` or ``'slide'``.
    out_size: Output size (the original image size), default the input size.
    flip: None, ``'horizontal'`` or ``'vertical'``: the input was flipped that way; the
      probabilities are flipped back.
    crop: Slide window.
    stride: Slide stride.
  """
  if mode == 'whole':
    logits = whole_inference(logits_fn, images, out_size)
  elif mode == 'slide':
    logits = slide_inference(logits_fn, images, crop, stride, out_size)
  else:
    raise ValueError(f"mode={mode!r}; expected 'whole' or 'slide'")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if flip == 'horizontal':
    probs = probs[:, :, ::-1]
  elif flip == 'vertical':
    probs = probs[:, ::-1]
  elif flip is not None:
    raise ValueError(f"flip={flip!r}; expected None, 'horizontal' or 'vertical'")
  return probs


def tta_sizes(height: int, width: int, ratios: Sequence[float],
              img_scale: Sequence[int] | None = None) -> list[tuple[int, int]]:
  """Input sizes of ``MultiScaleFlipAug`` + ``Resize(keep_ratio=True)``.

  With ``img_scale``: scale ``(int(S0 r), int(S1 r))``, then mmcv's keep-ratio rescale of the
  image; without: ``(int(H r + 0.5), int(W r + 0.5))``.
  """
  sizes = []
  for r in ratios:
    if img_scale is None:
      sizes.append((int(height * r + 0.5), int(width * r + 0.5)))
    else:
      sizes.append(rescale_size((height, width),
                                (int(img_scale[0] * r), int(img_scale[1] * r))))
  return sizes


def multiscale_inference(logits_fn: LogitsFn, images: jax.Array, *,
                         ratios: Sequence[float] = LOVEDA_TTA_RATIOS,
                         img_scale: Sequence[int] | None = LOVEDA_IMG_SCALE,
                         flip: bool = False, flip_direction: str = 'horizontal',
                         mode: str = 'whole', crop: Sequence[int] = (512, 512),
                         stride: Sequence[int] = (341, 341)) -> jax.Array:
  """mmseg ``aug_test``: mean softmax probabilities over scales (and flips) ``[B, H, W, C]``.

  Args:
    logits_fn: The model.
    images: ``[B, H, W, 3]`` at the original size.
    ratios: Scale ratios (LoveDA: 0.75, 1.0, 1.25, 1.5).
    img_scale: Base scale (LoveDA: (1024, 1024)); None: ratios of the image's own size.
    flip: Also run each scale flipped (``MultiScaleFlipAug(flip=True)``).
    flip_direction: ``'horizontal'`` or ``'vertical'``.
    mode: ``'whole'`` or ``'slide'`` per scale.
    crop: Slide window.
    stride: Slide stride.

  Returns:
    Probabilities at the original size; ``argmax(-1)`` is the prediction.
  """
  h, w = images.shape[1:3]
  total, n = None, 0
  for size in tta_sizes(h, w, ratios, img_scale):
    scaled = resize_bilinear_half_pixel(images, size)
    for direction in ([None, flip_direction] if flip else [None]):
      x = scaled
      if direction == 'horizontal':
        x = x[:, :, ::-1]
      elif direction == 'vertical':
        x = x[:, ::-1]
      probs = inference(logits_fn, x, mode=mode, out_size=(h, w), flip=direction, crop=crop,
                        stride=stride)
      total = probs if total is None else total + probs
      n += 1
  return total / n


#: ToCo's multi-scale test scales (``tools/infer_seg_voc.py``, ``--scales``).
TOCO_MSF_SCALES = (1.0, 1.5, 1.25)


def toco_msf_inference(score_fn: LogitsFn, images: jax.Array, *,
                       scales: Sequence[float] = TOCO_MSF_SCALES,
                       flip: bool = True) -> jax.Array:
  """ToCo's multi-scale + flip test (``tools/infer_seg_voc.py: _validate``), ``[B, H, W, C]``.

  Per scale ``s``: the image bilinearly resized to ``(int(H s), int(W s))``
  (``align_corners=False``), run with its horizontal flip, each output bilinearly resized
  to ``(H, W)`` and the flipped one flipped back, the two summed (``flip=False``: the
  unflipped output alone); then the element-wise MAXIMUM over scales (not the mean of
  softmax probabilities as mmseg's :func:`multiscale_inference`). ``argmax(-1)`` is the
  prediction. Shapes are static; the scale loop unrolls at trace time.
  """
  h, w = images.shape[1:3]
  best = None
  for s in scales:
    size = (int(h * s), int(w * s))
    if min(size) < 1:
      raise ValueError(f"scale {s} shrinks a {h}x{w} image to {size}; expected >= 1 pixel")
    x = images if size == (h, w) else resize_bilinear_half_pixel(images, size)
    out = resize_bilinear_half_pixel(score_fn(x).astype(jnp.float32), (h, w))
    if flip:
      out = out + resize_bilinear_half_pixel(
          score_fn(x[:, :, ::-1]).astype(jnp.float32), (h, w))[:, :, ::-1]
    best = out if best is None else jnp.maximum(best, out)
  return best


def predict_classes(probs_or_logits: jax.Array) -> jax.Array:
  """``argmax`` over the class axis, int32 ``[B, H, W]``."""
  return jnp.argmax(probs_or_logits, axis=-1).astype(jnp.int32)
