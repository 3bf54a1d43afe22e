"""Dense-CRF post-processing of segmentation probabilities, as WSSS papers report it.

Krähenbühl & Koltun's fully connected CRF (mean-field inference with a Gaussian and a
bilateral kernel) through ``pydensecrf2`` (the maintained fork of ``pydensecrf``; optional:
``pip install "contrastjax[crf]"``, a C++ build). The call is the ``DenseCRF`` class that
ToCo (``tools/infer_seg_voc.py: crf_proc``) and ViT-PCM use:

* unary ``-log(p)`` of the softmax probabilities (``pydensecrf.utils.unary_from_softmax``);
* ``addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)``;
* ``addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)`` on
  the uint8 RGB image;
* ``inference(iter_max)``; the prediction is the argmax of the returned marginals.

ToCo's parameters (:data:`TOCO_PARAMS`, the default): 10 iterations, Gaussian sxy 1 /
weight 1, bilateral sxy 121 / srgb 5 / weight 4; ViT-PCM's (:data:`VITPCM_PARAMS`):
Gaussian weight 3, bilateral sxy 67 / srgb 3 / weight 4. It runs on the host, one image
at a time.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

#: ToCo ``tools/infer_seg_voc.py`` ``DenseCRF(iter_max=10, pos_xy_std=1, pos_w=1,
#: bi_xy_std=121, bi_rgb_std=5, bi_w=4)``.
TOCO_PARAMS = dict(iter_max=10, pos_w=1.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=121.0,
                   bi_rgb_std=5.0)
#: ViT-PCM ``configs/voc12.yaml`` ``CRF``: ITER_MAX 10, POS_W 3, POS_XY_STD 1, BI_W 4,
#: BI_XY_STD 67, BI_RGB_STD 3 (pass as ``crf_params``).
VITPCM_PARAMS = dict(iter_max=10, pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0,
                     bi_rgb_std=3.0)
INSTALL_HINT = ('the dense CRF needs pydensecrf2: pip install "contrastjax[crf]" '
                '(or pip install pydensecrf2; it compiles C++)')


def _backend():
  try:
    import pydensecrf.densecrf as dcrf  # pylint: disable=import-outside-toplevel
    import pydensecrf.utils as dcrf_utils  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(INSTALL_HINT) from e
  return dcrf, dcrf_utils


def check_params(params: Mapping[str, Any] | None) -> dict[str, float]:
  """ToCo's parameters updated by ``params``; unknown keys or non-positive values raise."""
  out = dict(TOCO_PARAMS)
  for k, v in dict(params or {}).items():
    if k not in TOCO_PARAMS:
      raise ValueError(f"dense CRF parameter {k!r} is not known; expected some of "
                       f"{sorted(TOCO_PARAMS)}")
    if not float(v) > 0:
      raise ValueError(f"dense CRF parameter {k}={v!r}: expected > 0")
    out[k] = float(v)
  return out


def dense_crf(image: np.ndarray, probs: np.ndarray, **params: float) -> np.ndarray:
  """Mean-field marginals ``[H, W, C]`` (float32) of the dense CRF.

  Args:
    image: ``[H, W, 3]`` RGB, 0..255 (rounded and clipped to uint8).
    probs: ``[H, W, C]`` class probabilities (each pixel sums to 1).
    **params: Overrides of :data:`TOCO_PARAMS`.
  """
  p = check_params(params)
  image = np.asarray(image)
  probs = np.asarray(probs, np.float32)
  if image.ndim != 3 or image.shape[-1] != 3 or probs.ndim != 3 or (
      probs.shape[:2] != image.shape[:2]):
    raise ValueError(f"dense_crf needs image [H, W, 3] and probs [H, W, C] of the same H, W; "
                     f"got {image.shape} and {probs.shape}")
  dcrf, dcrf_utils = _backend()
  h, w, c = probs.shape
  unary = np.ascontiguousarray(dcrf_utils.unary_from_softmax(probs.transpose(2, 0, 1)))
  rgb = np.ascontiguousarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))
  d = dcrf.DenseCRF2D(w, h, c)
  d.setUnaryEnergy(unary)
  d.addPairwiseGaussian(sxy=p["pos_xy_std"], compat=p["pos_w"])
  d.addPairwiseBilateral(sxy=p["bi_xy_std"], srgb=p["bi_rgb_std"], rgbim=rgb,
                         compat=p["bi_w"])
  q = np.array(d.inference(int(p["iter_max"]))).reshape(c, h, w)
  return q.transpose(1, 2, 0).astype(np.float32)


def crf_predictions(images: np.ndarray, probs: np.ndarray,
                    params: Mapping[str, Any] | None = None) -> np.ndarray:
  """``argmax`` of :func:`dense_crf` per image: ``[B, H, W]`` int32."""
  p = check_params(params)
  images, probs = np.asarray(images), np.asarray(probs)
  if probs.ndim != 4 or images.shape[:3] != probs.shape[:3]:
    raise ValueError(f"crf_predictions needs images [B, H, W, 3] and probabilities "
                     f"[B, H, W, C] of the same B, H, W; got {images.shape} and {probs.shape}")
  return np.stack([dense_crf(images[i], probs[i], **p).argmax(-1)
                   for i in range(len(probs))]).astype(np.int32)
