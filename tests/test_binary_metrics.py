"""Binary segmentation metrics, the padded-batch evaluator and the result pictures."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
import pytest

from contrastjax import visualize
from contrastjax.evaluators.binary_seg import BinarySegEvaluator, binary_metrics

EPS = 1e-15


def _loop_metrics(pred_prob, gt):
  """Independent per-image computation from confusion counts, pixel by pixel."""
  out = {k: [] for k in ("jaccard", "dice", "recall", "precision", "f2", "acc")}
  for p_img, g_img in zip(pred_prob, gt):
    tp = fp = fn = tn = 0
    for p, g in zip(np.ravel(p_img), np.ravel(g_img)):
      yp, yt = bool(p > 0.5), bool(g > 0.5)
      tp += yp and yt
      fp += yp and not yt
      fn += yt and not yp
      tn += not yp and not yt
    prec = (tp + EPS) / (tp + fp + EPS)
    rec = (tp + EPS) / (tp + fn + EPS)
    out["jaccard"].append((tp + EPS) / (tp + fp + fn + EPS))
    out["dice"].append((2 * tp + EPS) / (2 * tp + fp + fn + EPS))
    out["recall"].append(rec)
    out["precision"].append(prec)
    out["f2"].append(5 * prec * rec / (4 * prec + rec + EPS))
    out["acc"].append((tp + tn) / (tp + fp + fn + tn))
  return {k: np.array(v) for k, v in out.items()}


def test_binary_metrics_match_confusion_count_loops():
  rng = np.random.default_rng(0)
  pred = rng.uniform(0, 1, (5, 9, 7, 1)).astype(np.float32)
  gt = (rng.uniform(0, 1, (5, 9, 7, 1)) > 0.6).astype(np.float32)
  got = binary_metrics(pred, gt)
  want = _loop_metrics(pred, gt)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)
    assert got[k].shape == (5,) and got[k].dtype == np.float64


def test_hand_example():
  pred = np.array([[[0.9, 0.9], [0.2, 0.0]]])  # predicts the top row
  gt = np.array([[[1.0, 0.0], [1.0, 0.0]]])  # left column
  m = {k: float(v[0]) for k, v in binary_metrics(pred, gt).items()}
  # TP 1, FP 1, FN 1, TN 1.
  assert m["jaccard"] == pytest.approx(1 / 3)
  assert m["dice"] == pytest.approx(0.5)
  assert m["recall"] == pytest.approx(0.5)
  assert m["precision"] == pytest.approx(0.5)
  assert m["f2"] == pytest.approx(0.5)
  assert m["acc"] == pytest.approx(0.5)


def test_empty_mask_conventions():
  empty = np.zeros((1, 4, 4, 1))
  some = np.zeros((1, 4, 4, 1))
  some[0, :2, :2] = 1.0
  both_empty = binary_metrics(empty, empty)
  for k, v in both_empty.items():
    assert v[0] == pytest.approx(1.0), k
  # Empty GT, non-empty prediction: IoU/Dice/precision/F2 ~ 0, but recall = 1.
  fp_only = binary_metrics(some, empty)
  for k in ("jaccard", "dice", "precision", "f2"):
    assert fp_only[k][0] < 1e-12, k
  assert fp_only["recall"][0] == pytest.approx(1.0)
  assert fp_only["acc"][0] == pytest.approx(12 / 16)
  # Empty prediction of a non-empty GT: precision = 1, the rest ~ 0.
  fn_only = binary_metrics(empty, some)
  assert fn_only["precision"][0] == pytest.approx(1.0)
  for k in ("jaccard", "dice", "recall", "f2"):
    assert fn_only[k][0] < 1e-12, k


def test_threshold_is_strict_and_soft_gt_is_binarised():
  pred = np.array([[[0.5, 0.51]]])
  gt = np.array([[[0.5, 0.7]]])  # 0.5 is background (strict >)
  m = binary_metrics(pred, gt)
  assert m["jaccard"][0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="shape"):
    binary_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))


def _padded_batches(pred_all, gt_all, batch_size):
  """Splits into padded batches; padded slots get garbage predictions and masks."""
  n = len(gt_all)
  batches = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    prob = pred_all[idx].copy()
    mask = gt_all[idx].copy()
    prob[~valid] = 1.0 - prob[~valid]
    mask[~valid] = 1.0
    batches.append({"mask": mask, "valid": valid, "prob": prob,
                    "index": np.where(valid, idx, -1)})
  return batches


def test_evaluator_padding_loss_reduce_and_callback():
  rng = np.random.default_rng(1)
  n = 7
  pred = rng.uniform(0, 1, (n, 6, 6, 1)).astype(np.float32)
  gt = (rng.uniform(0, 1, (n, 6, 6, 1)) > 0.5).astype(np.float32)
  batches = _padded_batches(pred, gt, 3)  # 3 + 3 + 1 valid
  seen = []

  evaluator = BinarySegEvaluator(
      predict_fn=lambda b: {"prob": b["prob"]},
      batches_fn=lambda: iter(batches),
      prefix="test",
      loss_fn=lambda b: float(b["valid"].sum()),
      on_batch=lambda b, o: seen.append(int(b["valid"].sum())))
  results = dict(evaluator.run())
  want = {k: v.mean() for k, v in _loop_metrics(pred, gt).items()}
  assert list(results) == ["test/mIoU", "test/mDSC", "test/recall", "test/precision",
                           "test/F2", "test/acc", "test/loss", "test/num_images"]
  assert results["test/mIoU"] == pytest.approx(want["jaccard"], rel=1e-12)
  assert results["test/mDSC"] == pytest.approx(want["dice"], rel=1e-12)
  assert results["test/recall"] == pytest.approx(want["recall"], rel=1e-12)
  assert results["test/precision"] == pytest.approx(want["precision"], rel=1e-12)
  assert results["test/F2"] == pytest.approx(want["f2"], rel=1e-12)
  assert results["test/acc"] == pytest.approx(want["acc"], rel=1e-12)
  assert results["test/num_images"] == n
  assert results["test/loss"] == pytest.approx((3 + 3 + 1) / 3)  # mean over batches
  assert seen == [3, 3, 1]

  # A cross-process sum over two identical processes keeps the means.
  doubled = BinarySegEvaluator(
      predict_fn=lambda b: {"prob": b["prob"]}, batches_fn=lambda: iter(batches),
      reduce_fn=lambda sums: {k: 2 * v for k, v in sums.items()})
  results2 = dict(doubled.run())
  assert "val/loss" not in results2
  assert results2["val/mIoU"] == pytest.approx(results["test/mIoU"], rel=1e-12)
  assert results2["val/num_images"] == 2 * n


def test_evaluator_errors():
  batch = {"mask": np.zeros((2, 4, 4, 1)), "valid": np.zeros(2, bool)}
  ev = BinarySegEvaluator(lambda b: {"prob": np.zeros((2, 4, 4, 1))}, lambda: iter([batch]))
  with pytest.raises(ValueError, match="no valid example"):
    dict(ev.run())
  no_valid_key = {"mask": np.zeros((2, 4, 4, 1))}
  ev = BinarySegEvaluator(lambda b: {"prob": b["mask"]}, lambda: iter([no_valid_key]))
  with pytest.raises(KeyError, match="valid"):
    dict(ev.run())
  batch = {"mask": np.zeros((2, 4, 4, 1)), "valid": np.ones(2, bool)}
  ev = BinarySegEvaluator(lambda b: {"mask": b["mask"]}, lambda: iter([batch]))
  with pytest.raises(KeyError, match="prob"):
    dict(ev.run())


# --------------------------------------------------------------------------- pictures
def test_overlay_colours_and_pngs(tmp_path):
  image = np.full((6, 6, 3), 0.5, np.float32)
  gt = np.zeros((6, 6), bool)
  gt[1:4, 1:4] = True
  pred = np.zeros((6, 6, 1), np.float32)
  pred[2:5, 2:5] = 0.9
  panel = visualize.overlay(image, gt, pred)
  assert panel.shape == (6, 18, 3) and panel.dtype == np.uint8
  np.testing.assert_array_equal(panel[:, :6], np.full((6, 6, 3), 128, np.uint8))
  right = panel[:, 12:].astype(int)
  assert right[4, 4, 0] > right[4, 4, 1]  # false positive: red
  assert right[1, 3].tolist() == [255, 255, 255]  # GT contour
  assert right[3, 1].tolist() == [255, 255, 255]
  assert right[0, 0].tolist() == [128, 128, 128]  # true negative untouched
  assert panel[2, 6 + 2, 1] > panel[2, 6 + 2, 0]  # GT interior tinted green

  mask_path = tmp_path / "masks" / "a.png"
  visualize.save_mask_png(str(mask_path), pred[..., 0] > 0.5)
  back = np.asarray(Image.open(mask_path))
  assert back.dtype == np.uint8 and set(np.unique(back)) == {0, 255}
  np.testing.assert_array_equal(back > 127, pred[..., 0] > 0.5)
  over_path = tmp_path / "over" / "a.png"
  visualize.save_overlay_png(str(over_path), image, gt, pred)
  np.testing.assert_array_equal(np.asarray(Image.open(over_path)), panel)
  with pytest.raises(ValueError, match="shape"):
    visualize.overlay(image, gt[:5], pred)


def test_plot_curves(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as f:
    for step in range(1, 6):
      f.write(json.dumps({"step": step, "train/loss": 1.0 / step,
                          "train/grad_norm": 2.0}) + "\n")
    f.write(json.dumps({"step": 5, "val/loss": 0.5, "val/mIoU": 0.6, "val/mDSC": 0.7,
                        "val/num_images": 10}) + "\n")
    f.write(json.dumps({"step": 6, "train/loss": "nan"}) + "\n")
  out = tmp_path / "plots" / "curves.png"
  plotted = visualize.plot_curves(str(path), str(out))
  img = Image.open(out)
  assert img.size[0] > 400 and img.size[1] > 200
  # losses and the metrics, not counts or gradient norms; the NaN loss at step 6 is left
  # out of the line instead of breaking it
  assert sorted(plotted) == ["train/loss", "val/loss", "val/mDSC", "val/mIoU"]
  assert plotted["train/loss"] == ([1, 2, 3, 4, 5], [1.0, 0.5, 1 / 3, 0.25, 0.2])
  assert plotted["val/mIoU"] == ([5], [0.6])
  empty = tmp_path / "empty.jsonl"
  empty.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
  with pytest.raises(ValueError, match="no loss or metric"):
    visualize.plot_curves(str(empty), str(tmp_path / "x.png"))
