"""Weakly supervised semantic segmentation inputs (APC): image-level labels for training,
pixel labels for evaluation only.

Makers (``config.data.name``):

* ``voc``: PASCAL VOC 2012 + SBD ``train_aug`` (``data/sources/voc.py:VOCSource``);
* ``coco_wsss``: COCO 2014 in the layout WSSS code uses (``COCOSegSource``);
* ``synthetic_scenes``: the procedural demo (``data/synthetic/scenes.py``).

Training examples: ``image`` float32 ``[S, S, 3]`` on the 0..255 scale (the method
normalises) and ``labels`` float32 ``[C+1]`` (background first, always 1); no pixel labels
(the ``supervised`` upper bound sets ``config.data.train_masks=True``). ToCo's train
pipeline (``datasets/voc.py``): random rescale of the image by ``scale_range`` (0.5, 2.0),
random crop of ``crop_size`` padded with 0 where the image is smaller, horizontal flip
with probability 0.5. ``train_resize='resize'`` is ViT-PCM's instead: resize to
``crop_size`` and flip.

Evaluation examples: ``image`` ``[P, P, 3]``, ``label`` uint8 ``[P, P]`` (255 = ignored),
``labels`` ``[C+1]``: the image at its original resolution padded at the bottom and right
to ``eval_size`` (image 0, label 255), so that predictions are scored against the
original-resolution masks (WSSS papers' protocol) with fixed batch shapes; images larger
than ``eval_size`` are an error naming the file. (The reference runs each image at its
own size with batch 1; padding is our deviation, the padded pixels are never scored.)
"""
from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np

from contrastjax.data import prepared
from contrastjax.data.builder import DatasetInfo, DataSpec
from contrastjax.data.errors import DatasetError
from contrastjax.errors import ConfigError
from contrastjax.data.sources import voc as voc_lib
from contrastjax.data.synthetic import scenes as scenes_lib
from contrastjax.data.transforms import medseg as medseg_transforms
from contrastjax.data.transforms import mmseg as mmseg_transforms

INFO = {
    "voc": DatasetInfo("voc", voc_lib.VOC_CLASSES,
                       tuple(tuple(int(v) for v in c)
                             for c in voc_lib.VOC_PALETTE[:len(voc_lib.VOC_CLASSES)])),
    "coco_wsss": DatasetInfo("coco_wsss", voc_lib.COCO_CLASSES,
                             tuple(tuple(int(v) for v in c) for c in
                                   voc_lib.color_map(len(voc_lib.COCO_CLASSES)))),
    "synthetic_scenes": DatasetInfo(
        "synthetic_scenes", scenes_lib.CLASSES,
        ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
         (245, 130, 48))),
}


#: ``config.data.train_resize``: ToCo's random rescale and crop, or ViT-PCM's resize.
TRAIN_RESIZE_MODES = ("crop", "resize")


def _check_train_resize(mode: str) -> str:
  if mode not in TRAIN_RESIZE_MODES:
    raise ConfigError(f"config.data.train_resize={mode!r}; expected one of "
                      f"{TRAIN_RESIZE_MODES}")
  return mode


def _float_image(image: np.ndarray) -> np.ndarray:
  return np.asarray(image, np.float32)


class WSSSTrainAugment(grain.transforms.RandomMap):
  """ToCo's crop pipeline (or ViT-PCM's resize) on an image-level example; keeps
  ``labels`` (and ``label`` when training on masks)."""

  def __init__(self, crop_size: int, mode: str = "crop",
               scale_range: tuple[float, float] = (0.5, 2.0), flip_prob: float = 0.5):
    self.crop, self.mode = int(crop_size), _check_train_resize(mode)
    self.scale_range, self.flip_prob = tuple(scale_range), float(flip_prob)

  def random_map(self, x: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = _float_image(x["image"])
    label = x.get("label")
    s = self.crop
    if self.mode == "resize":
      image = medseg_transforms.resize_bilinear(image, (s, s))
      if label is not None:
        label = mmseg_transforms.resize_nearest(label, (s, s))
    else:
      lo, hi = self.scale_range
      r = rng.random() * (hi - lo) + lo
      h, w = image.shape[:2]
      size = (max(int(h * r + 0.5), 1), max(int(w * r + 0.5), 1))
      image = medseg_transforms.resize_bilinear(image, size)
      if label is not None:
        label = mmseg_transforms.resize_nearest(label, size)
      image, label = mmseg_transforms.pad_to(image, label, (s, s), pad_val=0.0)
      y0 = int(rng.integers(0, image.shape[0] - s + 1))
      x0 = int(rng.integers(0, image.shape[1] - s + 1))
      image = image[y0:y0 + s, x0:x0 + s]
      if label is not None:
        label = label[y0:y0 + s, x0:x0 + s]
    if rng.random() < self.flip_prob:
      image = image[:, ::-1]
      if label is not None:
        label = label[:, ::-1]
    out = {"image": np.ascontiguousarray(image, np.float32),
           "labels": np.asarray(x["labels"], np.float32)}
    if label is not None:
      out["label"] = np.ascontiguousarray(label, np.uint8)
    return out


class WSSSEvalPad(grain.transforms.Map):
  """Pads image (0) and label (255) to ``size`` at the bottom and right."""

  def __init__(self, size: int):
    self.size = int(size)

  def map(self, x: dict[str, Any]) -> dict[str, Any]:
    image, label = _float_image(x["image"]), x["label"]
    h, w = image.shape[:2]
    if h > self.size or w > self.size:
      raise DatasetError(f"evaluation image {x.get('name', '?')} is {w}x{h}; larger than "
                         f"config.data.eval_size={self.size}", kind="too_large")
    image, label = mmseg_transforms.pad_to(image, label, (self.size, self.size),
                                           pad_val=0.0)
    return {"image": image, "label": np.asarray(label, np.uint8),
            "labels": np.asarray(x["labels"], np.float32)}


def _spec(sources: dict[str, Any], dcfg, info: DatasetInfo,
          content: dict[str, Any]) -> DataSpec:
  train = WSSSTrainAugment(int(dcfg.crop_size), str(dcfg.get("train_resize", "crop")),
                           tuple(dcfg.get("scale_range", (0.5, 2.0))))
  return DataSpec(sources=sources, train_transforms=[train],
                  eval_transforms=[WSSSEvalPad(int(dcfg.eval_size))], info=info,
                  content=content)


def _root(dcfg, what: str) -> str:
  """``config.data.root`` expanded; also checks ``train_resize`` first, so that a typo
  there is named before the dataset is indexed."""
  _check_train_resize(str(dcfg.get("train_resize", "crop")))
  root = os.path.expandvars(os.path.expanduser(str(dcfg.get("root", ""))))
  if not root or "$" in root:
    raise DatasetError(f"config.data.root={dcfg.get('root')!r}: set it to the {what} folder, "
                       f"e.g. --config.data.root=/data/{what}")
  return root


def voc(dcfg, seed: int) -> DataSpec:
  """VOC 2012: ``train_split`` (``train_aug``) with image labels only; ``train`` (1,464,
  the pseudo-label split) and ``val`` (1,449) with masks."""
  del seed
  _check_train_resize(str(dcfg.get("train_resize", "crop")))

  def folders():
    root = _root(dcfg, "VOCdevkit")
    masks = bool(dcfg.get("train_masks", False))
    labels = str(dcfg.get("labels", "cls_labels"))
    sources = {"train_aug": voc_lib.VOCSource(root, dcfg.get("train_split", "train_aug"),
                                              labels=labels, with_masks=masks)}
    for split in dcfg.get("eval_splits", ("train", "val")):
      sources[split] = voc_lib.VOCSource(root, split, labels=labels, with_masks=True)
    return sources

  content = _wsss_content(dcfg, "train_aug", ("train", "val"))
  sources = prepared.split_sources(dcfg, "voc", folders, content)
  return _spec(sources, dcfg, INFO["voc"], content)


def _wsss_content(dcfg, train_split: str, eval_splits: tuple[str, ...]) -> dict[str, Any]:
  """What decides the VOC/COCO sources' examples."""
  return {"train_split": str(dcfg.get("train_split", train_split)),
          "train_masks": bool(dcfg.get("train_masks", False)),
          "labels": str(dcfg.get("labels", "cls_labels")),
          "eval_splits": list(dcfg.get("eval_splits", eval_splits))}


def coco_wsss(dcfg, seed: int) -> DataSpec:
  """COCO 2014 (80 + 1 classes): ``train`` image labels only; ``val`` with masks."""
  del seed
  _check_train_resize(str(dcfg.get("train_resize", "crop")))

  def folders():
    root = _root(dcfg, "MSCOCO")
    labels = str(dcfg.get("labels", "cls_labels"))
    sources = {"train_wsss": voc_lib.COCOSegSource(
        root, "train", labels=labels, with_masks=bool(dcfg.get("train_masks", False)))}
    for split in dcfg.get("eval_splits", ("val",)):
      sources[split] = voc_lib.COCOSegSource(root, split, labels=labels, with_masks=True)
    return sources

  content = _wsss_content(dcfg, "train", ("val",))
  sources = prepared.split_sources(dcfg, "coco_wsss", folders, content)
  return _spec(sources, dcfg, INFO["coco_wsss"], content)


def synthetic_scenes(dcfg, seed: int) -> DataSpec:
  """The demo: ``train`` image labels only (masks with ``train_masks``), ``train_eval``
  (the first training images with masks: pseudo-label quality) and ``val``."""
  size = int(dcfg.get("image_size", 64))
  data_seed = int(dcfg.get("data_seed", seed))
  n = int(dcfg.get("num_train", 2048))
  kw = dict(image_size=size, max_objects=int(dcfg.get("max_objects", 3)))
  scene = dcfg.get("scene", None)  # further SyntheticScenes arguments (difficulty)
  kw.update({k: tuple(v) if isinstance(v, (list, tuple)) else v
             for k, v in (scene.to_dict() if hasattr(scene, "to_dict") else scene or {}).items()})
  content = dict(kw, data_seed=data_seed, num_train=n,
                 train_masks=bool(dcfg.get("train_masks", False)),
                 num_train_eval=min(n, int(dcfg.get("num_train_eval", 256))),
                 num_val=int(dcfg.get("num_val", 256)))
  sources = prepared.split_sources(dcfg, "synthetic_scenes", lambda: {
      "train": scenes_lib.SyntheticScenes(n, seed=data_seed,
                                          with_masks=bool(dcfg.get("train_masks", False)),
                                          **kw),
      "train_eval": scenes_lib.SyntheticScenes(min(n, int(dcfg.get("num_train_eval", 256))),
                                               seed=data_seed, with_masks=True, **kw),
      "val": scenes_lib.SyntheticScenes(int(dcfg.get("num_val", 256)), seed=data_seed + 1,
                                        with_masks=True, **kw),
  }, content)
  return _spec(sources, dcfg, INFO["synthetic_scenes"], content)


def synthetic_batch(dcfg, batch_size: int, seed: int = 0) -> tuple[dict[str, Any], int]:
  """A training batch of ``config.data`` without reading data (benchmarks): images of
  ``crop_size`` on the 0..255 scale, multi-hot ``labels`` with background set and one or
  more foreground classes, and ``label`` masks (consistent with ``labels``) when the
  config trains on masks (``train_masks``: the ``supervised`` variant)."""
  size = int(dcfg.get("crop_size", None) or dcfg.get("image_size", 64))
  num_classes = INFO[dcfg.name].num_classes
  rng = np.random.default_rng(seed)
  image = rng.uniform(0, 255, (batch_size, size, size, 3)).astype(np.float32)
  labels = np.zeros((batch_size, num_classes), np.float32)
  labels[:, 0] = 1.0
  label = np.zeros((batch_size, size, size), np.int32)
  for i in range(batch_size):
    present = rng.choice(np.arange(1, num_classes), size=int(rng.integers(1, 4)),
                         replace=False)
    labels[i, present] = 1.0
    for j, c in enumerate(present):  # a band per present class
      lo, hi = sorted(rng.integers(0, size, 2))
      label[i, lo:hi + 1, j::len(present)] = c
  batch = {"image": image, "labels": labels}
  if dcfg.get("train_masks", False):
    batch["label"] = label
  return batch, size


#: Maker name -> synthetic training batch (see ``data.builder.synthetic_batch``).
SYNTHETIC = {"voc": synthetic_batch, "coco_wsss": synthetic_batch,
             "synthetic_scenes": synthetic_batch}
