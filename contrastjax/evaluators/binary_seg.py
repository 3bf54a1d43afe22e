"""Binary (foreground/background) segmentation metrics, as ConDSeg's reference computes them.

Reference: github.com/Mengqi-Lei/ConDSeg @ e6a314b, ``utils/utils.py``
``calculate_metrics`` (l.75-95), ``utils/metrics.py`` (l.165-184) and ``test.py``
(l.52-102); docs/methods/condseg.md.

Per image, with ``ŷ = pred > 0.5`` and ``y = gt > 0.5`` flattened and ``TP = Σ y·ŷ``:

* Jaccard (IoU)  = ``(TP + 1e-15) / (|y| + |ŷ| - TP + 1e-15)``
* Dice (F1)      = ``(2 TP + 1e-15) / (|y| + |ŷ| + 1e-15)``
* Recall         = ``(TP + 1e-15) / (|y| + 1e-15)``
* Precision      = ``(TP + 1e-15) / (|ŷ| + 1e-15)``
* F2             = ``5 p r / (4 p + r + 1e-15)``
* Accuracy       = fraction of pixels where ``ŷ == y``

computed in float64. The 1e-15 smoothing sets the empty cases: an empty GT with an empty
prediction scores 1 on every metric; an empty GT with a non-empty prediction scores
Jaccard = Dice = Precision = F2 ≈ 0 but **Recall = 1** (``(0 + 1e-15)/(0 + 1e-15)``);
an empty prediction of a non-empty GT scores Precision = 1 and the rest ≈ 0.

The reported numbers are means over images (``mIoU`` = mean per-image foreground IoU,
not a class mean), as ``test.py`` reports them. The reference's *validation* loop
instead averages per batch, then over batches, which differs slightly when the last
batch is smaller; this module always uses the per-image mean.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from contrastjax.evaluators import counts_batch_loss
from contrastjax.evaluators import pictures as pictures_lib

_SMOOTH = 1e-15

#: Per-image metric keys of ``binary_metrics`` -> reported name suffix.
METRIC_NAMES = {
    "jaccard": "mIoU",
    "dice": "mDSC",
    "recall": "recall",
    "precision": "precision",
    "f2": "F2",
    "acc": "acc",
}


def _flatten_per_image(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 4:
    if x.shape[-1] != 1:
      raise ValueError(f"{name} must be [B, H, W] or [B, H, W, 1], got {x.shape}")
  elif x.ndim != 3:
    raise ValueError(f"{name} must be [B, H, W] or [B, H, W, 1], got {x.shape}")
  return x.reshape(x.shape[0], -1)


def binary_metrics(pred_prob: np.ndarray, gt: np.ndarray,
                   threshold: float = 0.5) -> dict[str, np.ndarray]:
  """Per-image reference metrics of a batch of binary predictions.

  Args:
    pred_prob: predicted foreground probabilities ``[B, H, W(, 1)]``.
    gt: ground-truth masks in [0, 1] (soft allowed), same shape.
    threshold: both ``pred_prob`` and ``gt`` are binarised with ``> threshold``.

  Returns:
    ``{'jaccard', 'dice', 'recall', 'precision', 'f2', 'acc'}``, each a float64 array
    ``[B]`` of per-image scores.
  """
  pred = _flatten_per_image(pred_prob, "pred_prob") > threshold
  true = _flatten_per_image(gt, "gt") > threshold
  if pred.shape != true.shape:
    raise ValueError(f"prediction {np.shape(pred_prob)} and ground truth "
                     f"{np.shape(gt)} differ in shape")
  tp = np.sum(pred & true, axis=1).astype(np.float64)
  n_pred = np.sum(pred, axis=1).astype(np.float64)
  n_true = np.sum(true, axis=1).astype(np.float64)
  precision = (tp + _SMOOTH) / (n_pred + _SMOOTH)
  recall = (tp + _SMOOTH) / (n_true + _SMOOTH)
  return {
      "jaccard": (tp + _SMOOTH) / (n_true + n_pred - tp + _SMOOTH),
      "dice": (2.0 * tp + _SMOOTH) / (n_true + n_pred + _SMOOTH),
      "recall": recall,
      "precision": precision,
      "f2": 5.0 * precision * recall / (4.0 * precision + recall + _SMOOTH),
      "acc": np.mean(pred == true, axis=1, dtype=np.float64),
  }


class _BinaryRenderer:
  def __init__(self, threshold: float):
    self.threshold = threshold

  def panel(self, image, gt, pred):
    from contrastjax import visualize  # pylint: disable=g-import-not-at-top
    return visualize.overlay(image, np.asarray(gt)[..., 0] > 0.5,
                             np.asarray(pred)[..., 0] > self.threshold)

  def mask(self, pred):
    return np.where(np.asarray(pred)[..., 0] > self.threshold, 255, 0).astype(np.uint8)


class BinarySegEvaluator:
  """Mean per-image binary segmentation metrics (and optionally the loss) of a dataset.

  ``run()`` yields ``<prefix>/mIoU``, ``<prefix>/mDSC``, ``<prefix>/recall``,
  ``<prefix>/precision``, ``<prefix>/F2``, ``<prefix>/acc``, ``<prefix>/loss`` (only
  with a ``loss_fn``) and ``<prefix>/num_images``; ``pictures()`` the overlays of the
  first ``samples`` examples (image | ground truth | prediction: true positives green,
  false positives red, false negatives blue).

  Batches are padded: each has a boolean ``valid`` ``[B]``; padded examples are never
  scored nor counted. Every valid example is scored (nothing is dropped).
  """

  #: ``run()`` hands the input pipeline's batches to ``predict_fn`` unchanged (the
  #: trainer compiles the evaluation step ahead from the first batch's shapes).
  pipeline_batches = True

  def __init__(self, predict_fn: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]],
               batches_fn: Callable[[], Iterable[Mapping[str, np.ndarray]]], *,
               prefix: str = "val", threshold: float = 0.5, output_key: str = "prob",
               loss_fn: Callable[[Mapping[str, np.ndarray]], float] | None = None,
               reduce_fn: Callable[[dict[str, float]], dict[str, float]] | None = None,
               on_batch: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
                                  None] | None = None,
               samples: int = 0, display: Callable[[np.ndarray], np.ndarray] | None = None,
               save_dir: str | None = None, save_overlays: int = 0,
               names: Sequence[str] | None = None, original_resolution: bool = False,
               source: Any = None):
    """Builds the evaluator.

    Args:
      predict_fn: ``batch -> {output_key: [B, H, W, 1], ...}`` host numpy outputs for
        the local (padded) batch.
      batches_fn: returns a fresh iterator over padded local batches, each with
        ``'mask'`` ``[B, H, W, 1]`` and ``'valid'`` ``[B]``.
      prefix: name prefix of the yielded metrics.
      threshold: binarisation threshold of predictions and ground truth.
      output_key: which output of ``predict_fn`` is scored (foreground probabilities).
      loss_fn: optional ``batch -> float`` (mean loss of the batch's valid examples);
        reported as the mean over batches, like the reference's validation loss. It is
        called on every batch (``predict_fn`` too), so multi-process collectives stay
        in lockstep, but a batch without a local valid example is not counted.
      reduce_fn: optional cross-process sum of a dict of float sums (identity if None).
      on_batch: optional ``(batch, outputs)`` callback, e.g. extra metrics; it
        receives the padded batch and outputs and must honour ``batch['valid']``.
      samples, display, save_dir, save_overlays, names: the picture options of
        :class:`contrastjax.evaluators.pictures.Pictures` (``display``: a model input
        as uint8 RGB, from the dataset's DataSpec).
      original_resolution: also score each prediction resized (bilinear, as cv2) to its
        image's original size against the original, un-resized mask of ``source``
        (``source[batch['index'][r]]['mask']``, 0/255): ``<prefix>/orig_res/<metric>``.
      source: the evaluation split's random-access source (for ``original_resolution``).
    """
    self.predict_fn = predict_fn
    self.batches_fn = batches_fn
    self.prefix = prefix
    self.threshold = threshold
    self.output_key = output_key
    self.loss_fn = loss_fn
    self.reduce_fn = reduce_fn if reduce_fn is not None else (lambda sums: sums)
    self.on_batch = on_batch
    self._pictures = pictures_lib.Pictures(
        _BinaryRenderer(threshold), samples=samples, display=display, save_dir=save_dir,
        save_overlays=save_overlays, names=names)
    if original_resolution and source is None:
      raise ValueError("original_resolution needs the evaluation split's source")
    self.original_resolution, self.source = bool(original_resolution), source

  def pictures(self) -> dict[str, np.ndarray]:
    """The sample overlays of the last ``run()`` (process 0; {} elsewhere)."""
    return self._pictures.grid()

  def _local_sums(self) -> dict[str, float]:
    sums = {key: 0.0 for key in METRIC_NAMES}
    sums.update({f"orig_{key}": 0.0 for key in METRIC_NAMES})
    sums.update(num_images=0.0, loss_sum=0.0, loss_batches=0.0)
    self._pictures.reset()
    for i, batch in enumerate(self.batches_fn()):
      if "valid" not in batch:
        raise KeyError(f"evaluation batch {i} has no 'valid' entry (keys: "
                       f"{sorted(batch)}); the input pipeline must pad and mark batches")
      valid = np.asarray(batch["valid"]).astype(bool).reshape(-1)
      outputs = self.predict_fn(batch)
      if self.output_key not in outputs:
        raise KeyError(f"predict_fn returned {sorted(outputs)}; expected the output_key "
                       f"{self.output_key!r}")
      prob = np.asarray(outputs[self.output_key])
      gt = np.asarray(batch["mask"])
      if prob.shape[0] != valid.shape[0] or gt.shape[0] != valid.shape[0]:
        raise ValueError(f"batch {i}: 'valid' has {valid.shape[0]} entries but the "
                         f"prediction is {prob.shape} and the mask {gt.shape}")
      # loss_fn runs on every batch, even one without a local valid example: under
      # multi-process jit it is a collective, and every process must call it.
      loss = float(self.loss_fn(batch)) if self.loss_fn is not None else 0.0
      if valid.any():
        scores = binary_metrics(prob[valid], gt[valid], self.threshold)
        for key in METRIC_NAMES:
          sums[key] += float(np.sum(scores[key]))
        sums["num_images"] += float(valid.sum())
        if self.original_resolution:
          self._add_original_resolution(sums, batch, prob, valid)
      if self.loss_fn is not None and counts_batch_loss(valid):
        sums["loss_sum"] += loss
        sums["loss_batches"] += 1.0
      self._pictures.add(batch, gt, prob, valid)
      if self.on_batch is not None:
        self.on_batch(batch, outputs)
    return sums

  def _add_original_resolution(self, sums, batch, prob, valid) -> None:
    from contrastjax.data.transforms import medseg as transforms  # pylint: disable=g-import-not-at-top
    for r in np.flatnonzero(valid):
      gt = np.asarray(self.source[int(batch["index"][r])]["mask"], np.float32) / 255.0
      p = transforms.resize_bilinear(prob[r][..., :1], gt.shape[:2])[..., 0]
      scores = binary_metrics(p[None], gt[None], self.threshold)
      for key in METRIC_NAMES:
        sums[f"orig_{key}"] += float(scores[key][0])

  def run(self) -> Iterator[tuple[str, float]]:
    """Evaluates the whole dataset; yields ``(name, value)`` pairs.

    Raises:
      ValueError: if the dataset has no valid example (on any process).
    """
    sums = self.reduce_fn(self._local_sums())
    n = float(sums["num_images"])
    if n <= 0:
      raise ValueError(f"{self.prefix}: the evaluation data has no valid example; "
                       "check the split file and the data directory")
    for key, name in METRIC_NAMES.items():
      yield f"{self.prefix}/{name}", float(sums[key]) / n
    if self.original_resolution:
      for key, name in METRIC_NAMES.items():
        yield f"{self.prefix}/orig_res/{name}", float(sums[f"orig_{key}"]) / n
    if self.loss_fn is not None:
      yield f"{self.prefix}/loss", float(sums["loss_sum"]) / max(
          float(sums["loss_batches"]), 1.0)
    yield f"{self.prefix}/num_images", n
