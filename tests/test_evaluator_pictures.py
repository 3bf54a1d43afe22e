"""Prediction pictures as an evaluator option (training samples and evaluate's saved
predictions share it), output keys, and the dataset context given to evaluators."""
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from contrastjax import evaluators

H = W = 6


def _binary_batches():
  image = np.full((3, H, W, 3), 0.5, np.float32)
  mask = np.zeros((3, H, W, 1), np.float32)
  mask[:, :3] = 1.0                                    # top half is foreground
  prob = np.zeros((3, H, W, 1), np.float32)
  prob[:, :3, :3] = 0.9                                # TP: top-left quarter
  prob[:, 3:, :3] = 0.9                                # FP: bottom-left quarter
  return [{"image": image[:2], "mask": mask[:2], "valid": np.array([True, True]),
           "index": np.array([0, 1]), "scores": prob[:2]},
          {"image": image[2:], "mask": mask[2:], "valid": np.array([True]),
           "index": np.array([2]), "scores": prob[2:]}]


def test_binary_samples_grid_colours_and_output_key():
  batches = _binary_batches()
  cfg = ml_collections.ConfigDict(dict(type="binary_seg", output_key="scores"))
  ev = evaluators.build(cfg, predict_fn=lambda b: {"scores": b["scores"]},
                        batches_fn=lambda: iter(batches), prefix="val", samples=2)
  metrics = dict(ev.run())
  # per image: TP 9, FP 9, FN 9 -> IoU 1/3, exactly the scored output_key's
  np.testing.assert_allclose(metrics["val/mIoU"], 9 / 27, rtol=1e-9)
  grid = ev.pictures()["samples"]
  assert grid.shape == (2 * H, 3 * W, 3) and grid.dtype == np.uint8
  pred_panel = grid[:H, 2 * W:].astype(int)
  tp, fp, fn, tn = (pred_panel[1, 1], pred_panel[4, 1], pred_panel[1, 4],
                    pred_panel[4, 4])
  assert tp[1] > tp[0] + 50 and tp[1] > tp[2] + 50         # green
  assert fp[0] > fp[1] + 50 and fp[0] > fp[2] + 50         # red
  assert fn[2] > fn[0] + 50 and fn[2] > fn[1]              # blue
  np.testing.assert_array_equal(tn, [128, 128, 128])       # untouched image (0.5 grey)
  # A second run starts a new grid (no pictures carried over).
  list(ev.run())
  assert ev.pictures()["samples"].shape == (2 * H, 3 * W, 3)


def test_binary_save_dir_writes_every_mask_and_the_first_overlays(tmp_path):
  batches = _binary_batches()
  ev = evaluators.build(ml_collections.ConfigDict(dict(type="binary_seg", output_key="scores")),
                        predict_fn=lambda b: {"scores": b["scores"]},
                        batches_fn=lambda: iter(batches), prefix="test",
                        save_dir=str(tmp_path), save_overlays=2, names=["a", "b", "c"])
  list(ev.run())
  assert sorted(os.listdir(tmp_path / "masks")) == ["a.png", "b.png", "c.png"]
  assert sorted(os.listdir(tmp_path / "overlays")) == ["a.png", "b.png"]
  saved = np.asarray(Image.open(tmp_path / "masks" / "c.png"))
  np.testing.assert_array_equal(saved, np.where(batches[1]["scores"][0, ..., 0] > 0.5, 255, 0))
  assert ev.pictures() == {}  # samples=0: no grid


def test_semseg_pictures_use_the_dataset_palette_and_context():
  label = np.array([[[0, 1], [2, 255]]], np.uint8)
  batch = {"image": np.zeros((1, 2, 2, 3), np.uint8), "label": label,
           "valid": np.array([True]), "pred": np.array([[[0, 1], [1, 2]]])}
  palette = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]
  cfg = ml_collections.ConfigDict(dict(type="semseg", num_classes=3))
  ev = evaluators.build(cfg, predict_fn=lambda b: {"pred": b["pred"]},
                        batches_fn=lambda: iter([batch]), prefix="val", samples=1,
                        palette=palette, class_names=["bg", "red", "green"],
                        display=lambda im: np.full(im.shape, 100, np.uint8))
  out = dict(ev.run())
  assert "val/IoU/red" in out and "val/IoU/green" in out   # names from the context
  grid = ev.pictures()["samples"]
  assert grid.shape == (2, 6, 3)
  np.testing.assert_array_equal(grid[:, :2], 100)           # the display function's image
  # prediction panel: 0.5 * image + 0.5 * class colour
  np.testing.assert_array_equal(grid[0, 5], np.rint(0.5 * 100 + 0.5 * np.array(palette[1])))
  # a config value wins over the context
  cfg2 = ml_collections.ConfigDict(dict(type="semseg", num_classes=3,
                                        class_names=["x", "y", "z"]))
  ev2 = evaluators.build(cfg2, predict_fn=lambda b: {"pred": b["pred"]},
                         batches_fn=lambda: iter([batch]), prefix="val",
                         class_names=["bg", "red", "green"])
  assert "val/IoU/y" in dict(ev2.run())


def test_semseg_save_dir_names_masks_by_example_not_by_class(tmp_path):
  """``names`` (example names) and ``class_names`` are separate options."""
  label = np.zeros((3, 2, 2), np.uint8)
  batch = {"image": np.zeros((3, 2, 2, 3), np.uint8), "label": label,
           "valid": np.array([True, True, True]), "index": np.array([0, 1, 2]),
           "pred": np.zeros((3, 2, 2), np.int32)}
  ev = evaluators.build(ml_collections.ConfigDict(dict(type="semseg", num_classes=2)),
                        predict_fn=lambda b: {"pred": b["pred"]},
                        batches_fn=lambda: iter([batch]), prefix="val",
                        class_names=["bg", "fg"], save_dir=str(tmp_path), save_overlays=1,
                        names=["a", "b", "c"])
  assert "val/IoU/bg" in dict(ev.run())
  assert sorted(os.listdir(tmp_path / "masks")) == ["a.png", "b.png", "c.png"]
  assert sorted(os.listdir(tmp_path / "overlays")) == ["a.png"]


def test_pipeline_batches_is_declared_by_the_evaluator_class():
  assert evaluators.pipeline_batches({"type": "binary_seg"})
  assert evaluators.pipeline_batches({"type": "semseg"})
  assert not evaluators.pipeline_batches({"type": "retrieval"})
  with pytest.raises(ValueError, match="evaluator type 'nope' is not known"):
    evaluators.pipeline_batches({"type": "nope"})


def test_binary_original_resolution_scores_against_the_source_masks():
  """Predictions at 4x4 scored against the 8x8 masks of the source: the bilinear upsampling
  (cv2 convention) of the prediction, thresholded, against the original mask."""
  from contrastjax.data.transforms import medseg as T  # pylint: disable=g-import-not-at-top
  from contrastjax.evaluators import binary_seg  # pylint: disable=g-import-not-at-top
  big = np.zeros((8, 8), np.uint8)
  big[1:5, 2:7] = 255
  source = [{"mask": big}, {"mask": np.zeros((8, 8), np.uint8)}]
  prob = np.zeros((2, 4, 4, 1), np.float32)
  prob[0, 0:2, 1:3] = 0.9
  batch = {"valid": np.array([True, True]), "index": np.array([0, 1]),
           "mask": (prob > 0.5).astype(np.float32), "scores": prob}
  cfg = ml_collections.ConfigDict(dict(type="binary_seg", output_key="scores"))
  ev = evaluators.build(cfg, predict_fn=lambda b: {"scores": b["scores"]},
                        batches_fn=lambda: iter([batch]), prefix="test",
                        original_resolution=True, source=source)
  out = dict(ev.run())
  ious = []
  for r in range(2):
    up = T.resize_bilinear(prob[r], (8, 8))[..., 0]
    m = binary_seg.binary_metrics(up[None], (source[r]["mask"] / 255.0)[None])
    ious.append(float(m["jaccard"][0]))
  np.testing.assert_allclose(out["test/orig_res/mIoU"], np.mean(ious), rtol=1e-12)
  assert out["test/mIoU"] == 1.0 and out["test/orig_res/mIoU"] < 1.0
  with pytest.raises(ValueError, match="needs the evaluation split's source"):
    evaluators.build(cfg, predict_fn=None, batches_fn=None, original_resolution=True)
  assert evaluators.accepts({"type": "binary_seg"}, "original_resolution")
  assert not evaluators.accepts({"type": "semseg"}, "original_resolution")
