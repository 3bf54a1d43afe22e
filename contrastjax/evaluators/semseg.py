"""Semantic-segmentation metrics as mmseg 0.21 computes them (SiamSeg's ``--eval mIoU mFscore``).

Reference: ``mmseg/core/evaluation/metrics.py`` (``intersect_and_union``,
``total_area_to_metrics``) and ``mmseg/datasets/custom.py`` (``evaluate``); docs/methods/siamseg.md.

Per image, pixels whose ground truth is ``ignore_index`` (255) are dropped; then per class ``c``
(histograms over ``0..C-1``; predictions outside that range count nowhere):

* ``intersect_c`` = pixels with ``pred == gt == c``; ``pred_c``, ``label_c`` = pixel counts;
  ``union_c = pred_c + label_c - intersect_c``.

The four histograms are SUMMED over the whole dataset, then:

* ``IoU_c = I_c / U_c``; ``Acc_c = I_c / label_c``; ``aAcc = sum(I) / sum(label)``;
* ``Precision_c = I_c / pred_c``, ``Recall_c = I_c / label_c``, ``F1_c = 2 P R / (P + R)``;
* ``mIoU``, ``mAcc``, ``mF1`` = ``nanmean`` over all classes.

Division by zero gives NaN, and NaN classes are left out of the means, exactly as mmseg: a class
absent from both the ground truth and the predictions has IoU NaN; **F1 is NaN as soon as the
class is never predicted or never present** (P or R is 0/0), so mmseg's mF1 skips such classes
(while mIoU counts a missed class as 0). ``f1_nan='dice'`` instead computes ``F1_c = 2 I /
(pred + label)`` (NaN only when both are 0), which equals the reference wherever the reference is
finite. Metrics are fractions in [0, 1] (mmseg prints percent).

The evaluator takes ``predict_fn(batch) -> {'pred': int [B, H, W]}`` (or ``'logits'`` /
``'prob'`` ``[B, H, W, C]``, argmax-ed here); build the prediction with the inference helpers of
:mod:`contrastjax.evaluators.seg_inference`. Pictures: :func:`colorize`, :func:`semseg_panel`,
:func:`save_semseg_png`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from contrastjax.evaluators import counts_batch_loss
from contrastjax.evaluators import pictures as pictures_lib

IGNORE_INDEX = 255
F1_NAN_RULES = ('mmseg', 'dice')
POSTPROCESS = ('none', 'crf')


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Histograms of one image or a batch: ``[4, C]`` float64 = (intersect, union, pred, label).

  Args:
    pred: Predicted class ids (any integer shape).
    label: Ground truth, same shape; ``ignore_index`` pixels are dropped.
    num_classes: ``C``.
    ignore_index: Ignored ground-truth value.

  Returns:
    ``np.stack([area_intersect, area_union, area_pred, area_label])``.
  """
  pred = np.asarray(pred).reshape(-1).astype(np.int64)
  label = np.asarray(label).reshape(-1).astype(np.int64)
  if pred.shape != label.shape:
    raise ValueError(f'prediction has {pred.size} pixels but the label {label.size}')
  keep = label != ignore_index
  pred, label = pred[keep], label[keep]

  def hist(x):
    x = x[(x >= 0) & (x < num_classes)]
    return np.bincount(x, minlength=num_classes)[:num_classes].astype(np.float64)

  area_i = hist(pred[pred == label])
  area_p = hist(pred)
  area_l = hist(label)
  return np.stack([area_i, area_p + area_l - area_i, area_p, area_l])


def total_area_to_metrics(areas: np.ndarray, *, f1_nan: str = 'mmseg') -> dict[str, Any]:
  """Per-class and mean metrics from summed ``[4, C]`` histograms.

  Returns:
    ``{'aAcc': float, 'IoU': [C], 'Acc': [C], 'F1': [C], 'Precision': [C], 'Recall': [C],
    'mIoU': float, 'mAcc': float, 'mF1': float}`` (NaN where undefined, see the module doc).
  """
  if f1_nan not in F1_NAN_RULES:
    raise ValueError(f'f1_nan={f1_nan!r}; expected one of {F1_NAN_RULES}')
  inter, union, pred, label = (np.asarray(a, np.float64) for a in areas)
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = inter / union
    acc = inter / label
    precision = inter / pred
    recall = inter / label
    if f1_nan == 'mmseg':
      f1 = 2.0 * precision * recall / (precision + recall)
    else:
      f1 = 2.0 * inter / (pred + label)
    all_acc = inter.sum() / label.sum()

  def nanmean(x):
    return float(np.nanmean(x)) if np.isfinite(x).any() else float('nan')

  return {'aAcc': float(all_acc), 'IoU': iou, 'Acc': acc, 'F1': f1, 'Precision': precision,
          'Recall': recall, 'mIoU': nanmean(iou), 'mAcc': nanmean(acc), 'mF1': nanmean(f1)}


def predictions_from_outputs(outputs: Mapping[str, Any], key: str = 'pred') -> np.ndarray:
  """Class ids ``[B, H, W]`` from ``outputs[key]``: class ids ``[B, H, W]`` as they are,
  scores ``[B, H, W, C]`` (logits or probabilities) by their argmax."""
  if key not in outputs:
    raise KeyError(f"predict_fn returned {sorted(outputs)}; expected the output_key {key!r} "
                   "(class ids [B, H, W] or scores [B, H, W, C])")
  x = np.asarray(outputs[key])
  return np.argmax(x, axis=-1) if x.ndim == 4 else x


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
  """Fixed class colours for a dataset without a palette of its own."""
  rng = np.random.default_rng(0)
  return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]


class _ClassMapRenderer:
  def __init__(self, palette):
    self.palette = palette

  def panel(self, image, gt, pred):
    return semseg_panel(image, gt, pred, self.palette)

  def mask(self, pred):
    return colorize(pred, self.palette)


class SemSegEvaluator:
  """mmseg-style mIoU / mF1 over a dataset (registered as ``type='semseg'``).

  ``run()`` yields ``<prefix>/mIoU``, ``/mF1``, ``/mAcc``, ``/aAcc``, per class
  ``<prefix>/IoU/<class>`` and ``<prefix>/F1/<class>``, ``<prefix>/loss`` (with a ``loss_fn``)
  and ``<prefix>/num_images``; ``pictures()`` the ``image | ground truth | prediction``
  panels of the first ``samples`` examples in the dataset's class colours. Padded rows
  (``batch['valid'] == False``) are never counted.

  Class names, palette and ignore index default to the dataset's (``DataSpec.info``, passed
  by the trainer); a config may override them.
  """

  #: ``run()`` hands the input pipeline's batches to ``predict_fn`` unchanged.
  pipeline_batches = True

  def __init__(self, predict_fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]],
               batches_fn: Callable[[], Iterable[Mapping[str, np.ndarray]]], *,
               num_classes: int, class_names: Sequence[str] | None = None,
               prefix: str = 'val', ignore_index: int = IGNORE_INDEX, f1_nan: str = 'mmseg',
               label_key: str = 'label', output_key: str = 'pred',
               loss_fn: Callable[[Mapping[str, np.ndarray]], float] | None = None,
               reduce_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
               on_batch: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], None]
               | None = None,
               palette: Sequence[Sequence[int]] | None = None, samples: int = 0,
               display: Callable[[np.ndarray], np.ndarray] | None = None,
               save_dir: str | None = None, save_overlays: int = 0,
               names: Sequence[str] | None = None, postprocess: str = 'none',
               crf_params: Mapping[str, float] | None = None):
    """Builds the evaluator.

    Args:
      predict_fn: ``batch -> {output_key: [B, H, W] class ids or [B, H, W, C] scores}``
        host outputs for the local padded batch, at the label's resolution.
      batches_fn: Fresh iterator over padded local batches with ``label`` ``[B, H, W]`` and
        ``valid`` ``[B]``.
      num_classes: ``C``.
      class_names: Names for the per-class metrics (default ``class_<c>``).
      prefix: Metric name prefix.
      ignore_index: Ignored label value.
      f1_nan: ``'mmseg'`` (reference NaN rule) or ``'dice'``; see the module doc.
      label_key: Batch key of the ground truth.
      loss_fn: Optional ``batch -> float``, averaged over batches with a valid example.
      reduce_fn: Optional cross-process sum of a dict of numpy sums.
      on_batch: Optional ``(batch, outputs)`` callback (e.g. extra metrics).
      output_key: Which output of ``predict_fn`` is scored.
      palette: Class colours of the pictures (default: fixed random colours).
      samples, display, save_dir, save_overlays, names: the picture options of
        :class:`contrastjax.evaluators.pictures.Pictures`.
      postprocess: ``'none'`` or ``'crf'`` (the dense CRF on ``outputs[output_key]``,
        probabilities ``[B, H, W, C]``, and the batch's ``image``).
      crf_params: Overrides of :data:`contrastjax.evaluators.crf.TOCO_PARAMS`.
    """
    if postprocess not in POSTPROCESS:
      raise ValueError(f'postprocess={postprocess!r}; expected one of {POSTPROCESS}')
    self.postprocess = postprocess
    if postprocess == 'crf':
      from contrastjax.evaluators import crf as crf_lib  # pylint: disable=import-outside-toplevel
      self.crf_params = crf_lib.check_params(crf_params)
      crf_lib._backend()  # pylint: disable=protected-access  (fail at build, not at step N)
    self.predict_fn, self.batches_fn = predict_fn, batches_fn
    self.num_classes = int(num_classes)
    classes = list(class_names) if class_names is not None else [
        f'class_{c}' for c in range(self.num_classes)]
    if len(classes) != self.num_classes:
      raise ValueError(f'{len(classes)} class_names for num_classes={self.num_classes}')
    self.class_names = classes
    self.prefix, self.ignore_index, self.f1_nan = prefix, int(ignore_index), f1_nan
    if f1_nan not in F1_NAN_RULES:
      raise ValueError(f'f1_nan={f1_nan!r}; expected one of {F1_NAN_RULES}')
    self.label_key, self.output_key = label_key, output_key
    self.loss_fn = loss_fn
    self.reduce_fn = reduce_fn if reduce_fn is not None else (lambda sums: sums)
    self.on_batch = on_batch
    self.palette = list(palette) if palette is not None else default_palette(self.num_classes)
    self._pictures = pictures_lib.Pictures(
        _ClassMapRenderer(self.palette), samples=samples, display=display,
        save_dir=save_dir, save_overlays=save_overlays, names=names)

  def pictures(self) -> dict[str, np.ndarray]:
    """The sample panels of the last ``run()`` (process 0; {} elsewhere)."""
    return self._pictures.grid()

  def local_sums(self) -> dict[str, Any]:
    """This process's histograms ``areas [4, C]``, image count and loss sums."""
    sums = {'areas': np.zeros((4, self.num_classes), np.float64), 'num_images': 0.0,
            'loss_sum': 0.0, 'loss_batches': 0.0}
    self._pictures.reset()
    for i, batch in enumerate(self.batches_fn()):
      if 'valid' not in batch or self.label_key not in batch:
        raise KeyError(f"evaluation batch {i} has keys {sorted(batch)}; expected 'valid' and "
                       f"{self.label_key!r}")
      valid = np.asarray(batch['valid']).astype(bool).reshape(-1)
      outputs = self.predict_fn(batch)
      if self.postprocess == 'crf':
        pred = self._crf(batch, outputs, i)
      else:
        pred = predictions_from_outputs(outputs, self.output_key)
      label = np.asarray(batch[self.label_key])
      if label.ndim == 4 and label.shape[-1] == 1:
        label = label[..., 0]
      if pred.shape != label.shape:
        raise ValueError(f'batch {i}: prediction {pred.shape} and label {label.shape} differ; '
                         'predict_fn must return predictions at the label resolution')
      loss = float(self.loss_fn(batch)) if self.loss_fn is not None else 0.0
      if valid.any():
        sums['areas'] += intersect_and_union(pred[valid], label[valid], self.num_classes,
                                             self.ignore_index)
        sums['num_images'] += float(valid.sum())
      if self.loss_fn is not None and counts_batch_loss(valid):
        sums['loss_sum'] += loss
        sums['loss_batches'] += 1.0
      self._pictures.add(batch, label, pred, valid)
      if self.on_batch is not None:
        self.on_batch(batch, outputs)
    return sums

  def _crf(self, batch, outputs, i: int) -> np.ndarray:
    from contrastjax.evaluators import crf as crf_lib  # pylint: disable=import-outside-toplevel
    if self.output_key not in outputs or np.ndim(outputs[self.output_key]) != 4:
      raise ValueError(f"postprocess='crf' needs probabilities [B, H, W, C] under the "
                       f"output_key {self.output_key!r}; predict_fn returned "
                       f"{ {k: np.shape(v) for k, v in outputs.items()} }")
    if 'image' not in batch:
      raise KeyError(f"postprocess='crf' needs the batch's 'image'; evaluation batch {i} has "
                     f"{sorted(batch)}")
    return crf_lib.crf_predictions(np.asarray(batch['image']),
                                   np.asarray(outputs[self.output_key]), self.crf_params)

  def run(self) -> Iterator[tuple[str, float]]:
    """Evaluates the dataset; yields ``(name, value)`` pairs.

    Raises:
      ValueError: No valid example on any process.
    """
    sums = self.reduce_fn(self.local_sums())
    n = float(sums['num_images'])
    if n <= 0:
      raise ValueError(f'{self.prefix}: the evaluation data has no valid example')
    m = total_area_to_metrics(np.asarray(sums['areas']), f1_nan=self.f1_nan)
    p = self.prefix
    for key in ('mIoU', 'mF1', 'mAcc', 'aAcc'):
      yield f'{p}/{key}', m[key]
    for c, name in enumerate(self.class_names):
      yield f'{p}/IoU/{name}', float(m['IoU'][c])
      yield f'{p}/F1/{name}', float(m['F1'][c])
    if self.loss_fn is not None:
      yield f'{p}/loss', float(sums['loss_sum']) / max(float(sums['loss_batches']), 1.0)
    yield f'{p}/num_images', n


# ------------------------------------------------------------------------------------------------
# Pictures.
# ------------------------------------------------------------------------------------------------


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]],
             ignore_colour: Sequence[int] = (0, 0, 0)) -> np.ndarray:
  """Class ids ``[H, W]`` -> uint8 RGB ``[H, W, 3]``; ids outside the palette get ``ignore_colour``."""
  label = np.asarray(label)
  if label.ndim == 3 and label.shape[-1] == 1:
    label = label[..., 0]
  lut = np.zeros((256, 3), np.uint8)
  lut[:] = np.asarray(ignore_colour, np.uint8)
  lut[:len(palette)] = np.asarray(palette, np.uint8)
  return lut[np.clip(label.astype(np.int64), 0, 255)]


def semseg_panel(image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray,
                 palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
  """``image | ground truth overlay | prediction overlay`` as uint8 ``[H, kW, 3]``.

  Args:
    image: uint8 RGB ``[H, W, 3]`` (de-normalise first, e.g.
      :func:`contrastjax.data.transforms.mmseg.denormalize`).
    gt: Ground-truth ids ``[H, W]`` (255 drawn black), or None to omit the panel.
    pred: Predicted ids ``[H, W]``.
    palette: Class colours.
    alpha: Colour weight of the overlays.
  """
  rgb = np.asarray(image)
  if rgb.dtype != np.uint8:
    raise ValueError(f'image must be uint8 RGB, got {rgb.dtype}; de-normalise it first')
  panels = [rgb]
  for lab in ([gt] if gt is not None else []) + [pred]:
    colour = colorize(lab, palette).astype(np.float32)
    panels.append(np.clip(np.rint((1 - alpha) * rgb + alpha * colour), 0, 255).astype(np.uint8))
  return np.concatenate(panels, axis=1)


def save_semseg_png(path: str, image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray,
                    palette: Sequence[Sequence[int]]) -> None:
  """Writes :func:`semseg_panel` as a PNG (parent folders created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(semseg_panel(image, gt, pred, palette)).save(path)
