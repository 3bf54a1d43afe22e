"""Pictures of segmentation results and training curves (host-side, numpy + Pillow + Agg).

* ``overlay(image, gt, pred)``: one ``uint8`` RGB panel ``[H, 3W, 3]`` with the image, the
  ground truth (green tint, white contour) and the prediction coloured by outcome
  (green = true positive, red = false positive, blue = false negative, with the
  ground-truth contour in white).
* ``save_mask_png`` / ``save_overlay_png``: write those as PNG files.
* ``plot_curves(metrics_jsonl_path, out_png)``: loss curves and validation metric curves
  from a run's ``metrics.jsonl``.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image

_GREEN = np.array([0, 200, 0], np.float32)
_RED = np.array([230, 0, 0], np.float32)
_BLUE = np.array([30, 90, 255], np.float32)
_WHITE = np.array([255, 255, 255], np.float32)
_ALPHA = 0.45

#: Metric names (after the ``<prefix>/``) drawn in the metric panel of ``plot_curves``.
_CURVE_METRICS = ("mIoU", "mDSC", "recall", "precision", "F2", "acc")


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype == np.uint8:
    return image
  image = np.asarray(image, np.float32)
  if image.size and image.max() > 1.0 + 1e-6:  # already on a 0..255 scale
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
  return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _to_bool_mask(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.shape != shape:
    raise ValueError(f"{name} has shape {mask.shape}; expected {shape} like the image")
  if mask.dtype == bool:
    return mask
  if mask.dtype == np.uint8 and mask.max(initial=0) > 1:
    return mask > 127
  return mask > 0.5


def _contour(mask: np.ndarray) -> np.ndarray:
  """Pixels of ``mask`` with at least one 4-neighbour outside it (image border counts)."""
  padded = np.pad(mask, 1, constant_values=False)
  interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
              & padded[1:-1, 2:] & mask)
  return mask & ~interior


def _tint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
  out = rgb.astype(np.float32)
  out[mask] = (1.0 - _ALPHA) * out[mask] + _ALPHA * colour
  return out


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """Side-by-side panel ``image | ground truth | prediction`` as ``uint8`` RGB.

  Args:
    image: ``[H, W, 3]`` (or grey) float in [0, 1] or uint8.
    gt: ground-truth mask ``[H, W(, 1)]``: bool, probability (> 0.5) or uint8 (> 127).
    pred: predicted mask or probability map, same conventions.

  Returns:
    ``uint8`` array ``[H, 3W, 3]``. Middle: the ground truth tinted green with a white
    contour. Right: true positives green, false positives red, false negatives blue,
    ground-truth contour white.
  """
  rgb = _to_uint8_rgb(image)
  shape = rgb.shape[:2]
  gt_b = _to_bool_mask(gt, shape, "gt")
  pred_b = _to_bool_mask(pred, shape, "pred")
  gt_contour = _contour(gt_b)

  gt_panel = _tint(rgb, gt_b, _GREEN)
  gt_panel[gt_contour] = _WHITE

  pred_panel = _tint(rgb, pred_b & gt_b, _GREEN)
  pred_panel = _tint(pred_panel, pred_b & ~gt_b, _RED)
  pred_panel = _tint(pred_panel, ~pred_b & gt_b, _BLUE)
  pred_panel[gt_contour] = _WHITE

  panel = np.concatenate([rgb.astype(np.float32), gt_panel, pred_panel], axis=1)
  return np.clip(np.rint(panel), 0, 255).astype(np.uint8)


def save_mask_png(path: str, mask_bool: np.ndarray) -> None:
  """Writes a binary mask as an 8-bit greyscale PNG (0 / 255); creates parent folders."""
  mask = np.asarray(mask_bool)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim != 2:
    raise ValueError(f"mask must be [H, W] or [H, W, 1], got {mask.shape}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8)).save(path)


def save_overlay_png(path: str, image: np.ndarray, gt: np.ndarray,
                     pred: np.ndarray) -> None:
  """Writes ``overlay(image, gt, pred)`` as an RGB PNG; creates parent folders."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(overlay(image, gt, pred)).save(path)


def _numeric(value: Any) -> float | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
    return float(value)
  return None


def plot_curves(metrics_jsonl_path: str, out_png: str
                ) -> dict[str, tuple[list[float], list[float]]]:
  """Plots loss curves and validation-metric curves of a run.

  Reads ``metrics.jsonl`` (one JSON object per logged step with a ``step`` key, as
  ``contrastjax.metric_writer.MetricWriter`` writes it). Left panel: every key whose last
  component contains ``loss`` (e.g. ``train/loss``, ``val/loss``), log-scaled when
  positive. Right panel: the binary-segmentation metrics (``*/mIoU``, ``*/mDSC``, ...).

  Args:
    metrics_jsonl_path: path of the JSONL file.
    out_png: where to write the figure (parent folders are created).

  Returns:
    The plotted series, ``{key: (steps, values)}`` (non-finite values left out).

  Raises:
    FileNotFoundError: if the JSONL file does not exist.
    ValueError: if it holds no plottable series.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from contrastjax import metric_writer  # pylint: disable=g-import-not-at-top
  series: dict[str, tuple[list[float], list[float]]] = {}
  for record in metric_writer.read_metrics(metrics_jsonl_path):
    step = _numeric(record["step"])
    for key, value in record.items():
      v = _numeric(value)
      if key == "step" or v is None or not math.isfinite(v):
        continue
      xs, ys = series.setdefault(key, ([], []))
      xs.append(step)
      ys.append(v)

  def leaf(key: str) -> str:
    return key.rsplit("/", 1)[-1]

  loss_keys = sorted(k for k in series if "loss" in leaf(k))
  metric_keys = sorted(k for k in series if leaf(k) in _CURVE_METRICS)
  if not loss_keys and not metric_keys:
    raise ValueError(f"{metrics_jsonl_path} has no loss or metric series "
                     f"(keys: {sorted(series)[:20]})")

  fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
  for key in loss_keys:
    xs, ys = series[key]
    ax_loss.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, markersize=3)
  if loss_keys and all(min(series[k][1]) > 0 for k in loss_keys):
    ax_loss.set_yscale("log")
  ax_loss.set_xlabel("step")
  ax_loss.set_title("losses")
  for key in metric_keys:
    xs, ys = series[key]
    ax_metric.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None, markersize=3)
  ax_metric.set_xlabel("step")
  ax_metric.set_title("metrics")
  for ax in (ax_loss, ax_metric):
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = epath.Path(out_png)  # local or gs://
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("wb") as f:
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)
  return {k: series[k] for k in loss_keys + metric_keys}
