"""The dense CRF post-process (``evaluators/crf.py``, pydensecrf2 as ToCo calls it) and its
place in the semantic-segmentation evaluator and the APC configs."""
import numpy as np
import pytest

from contrastjax.configs import apc as apc_configs
from contrastjax.evaluators import crf as crf_lib
from contrastjax.evaluators import semseg

pytest.importorskip("pydensecrf.densecrf")


def _two_colour_scene(shift=4, size=24, edge=12, confidence=0.65):
  """A dark left half and a bright right half (the true edge at ``edge``); class 1 is the
  right half, but the probabilities put the boundary ``shift`` pixels too far left and are
  only ``confidence`` sure."""
  image = np.zeros((size, size, 3), np.float32)
  image[:, :edge] = (40, 60, 50)
  image[:, edge:] = (220, 200, 180)
  image += np.random.default_rng(0).normal(0, 3, image.shape)
  truth = np.zeros((size, size), np.int32)
  truth[:, edge:] = 1
  probs = np.empty((size, size, 2), np.float32)
  probs[..., 1] = np.where(np.arange(size)[None, :] >= edge - shift, confidence,
                           1 - confidence)
  probs[..., 0] = 1 - probs[..., 1]
  return image, probs, truth


def test_crf_snaps_a_misplaced_boundary_to_the_colour_edge():
  image, probs, truth = _two_colour_scene()
  before = probs.argmax(-1)
  assert (before != truth).sum() == 4 * 24
  q = crf_lib.dense_crf(image, probs)
  assert q.shape == probs.shape and q.dtype == np.float32
  np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-4)  # marginals
  after = q.argmax(-1)
  assert (after != truth).mean() < 0.02, (after != truth).sum()
  # With (almost) no pairwise weight the CRF keeps the unary argmax.
  weak = crf_lib.dense_crf(image, probs, pos_w=1e-6, bi_w=1e-6).argmax(-1)
  np.testing.assert_array_equal(weak, before)
  # ViT-PCM's parameters snap it too.
  vitpcm = crf_lib.dense_crf(image, probs, **crf_lib.VITPCM_PARAMS).argmax(-1)
  assert (vitpcm != truth).mean() < 0.02
  # More iterations do not undo the snap; params are checked.
  assert (crf_lib.dense_crf(image, probs, iter_max=20).argmax(-1) == truth).mean() > 0.98
  with pytest.raises(ValueError, match=r"parameter 'sigma' is not known"):
    crf_lib.dense_crf(image, probs, sigma=3)
  with pytest.raises(ValueError, match=r"bi_w=0: expected > 0"):
    crf_lib.dense_crf(image, probs, bi_w=0)
  with pytest.raises(ValueError, match=r"same H, W"):
    crf_lib.dense_crf(image[:10], probs)


def test_semseg_evaluator_scores_crf_refined_predictions():
  image, probs, truth = _two_colour_scene()
  batch = {"image": np.stack([image, image[:, ::-1]]),
           "label": np.stack([truth, truth[:, ::-1]]).astype(np.uint8),
           "valid": np.array([1, 1])}
  outputs = {"seg_prob": np.stack([probs, probs[:, ::-1]])}

  def metrics(**kw):
    ev = semseg.SemSegEvaluator(lambda b: outputs, lambda: [batch], num_classes=2,
                                output_key="seg_prob", **kw)
    return dict(ev.run())
  plain, refined = metrics(), metrics(postprocess="crf")
  assert plain["val/mIoU"] < 0.75 and refined["val/mIoU"] > 0.95
  want = crf_lib.crf_predictions(batch["image"], outputs["seg_prob"])
  areas = semseg.intersect_and_union(want, batch["label"], 2, 255)
  np.testing.assert_allclose(refined["val/mIoU"],
                             semseg.total_area_to_metrics(areas)["mIoU"], rtol=1e-12)
  with pytest.raises(ValueError, match=r"postprocess='crf' needs probabilities"):
    semseg.SemSegEvaluator(lambda b: {"pred": truth[None]}, lambda: [batch], num_classes=2,
                           postprocess="crf").local_sums()
  with pytest.raises(ValueError, match=r"postprocess='blur'"):
    semseg.SemSegEvaluator(lambda b: outputs, lambda: [batch], num_classes=2,
                           postprocess="blur")


def test_crf_config_argument_and_missing_backend(monkeypatch):
  c = apc_configs.get_config("voc", "demo,crf")
  assert c.evals.val_crf.postprocess == "crf" and c.evals.val_crf.output_key == "seg_prob"
  assert c.evals.val_crf.split == "val"
  with pytest.raises(ValueError, match=r"crf refines the decoder's probabilities"):
    apc_configs.get_config("voc", "gmp,crf")
  import sys
  monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
  with pytest.raises(ImportError, match=r"pip install \"contrastjax\[crf\]\""):
    semseg.SemSegEvaluator(lambda b: {}, lambda: [], num_classes=2, postprocess="crf")


@pytest.mark.slow
def test_apc_demo_trains_and_evaluates_with_the_crf(tmp_path):
  """The ``crf`` config argument through the trainer: ``val_crf`` scores the CRF-refined
  decoder probabilities (``seg_prob``), which the plain evaluation does not transfer."""
  import json
  from contrastjax import train as train_lib
  from contrastjax.methods import apc as apc_lib
  c = apc_configs.get_config("voc", "demo,crf")
  c.model.backbone_overrides = dict(patch_size=8, depth=1, embed_dim=32, num_heads=2)
  c.model.decoder_channels = 16
  c.data.num_train, c.data.num_train_eval, c.data.num_val = 32, 16, 16
  c.batch_size = c.eval_batch_size = 8
  c.total_steps, c.eval_every_steps, c.ckpt_every_steps, c.log_every_steps = 2, 2, 2, 1
  c.progress_bar = c.plot_curves = False
  result = train_lib.train_and_evaluate(c, str(tmp_path))
  assert 0.0 <= result["val_crf/mIoU"] <= 1.0 and "val_crf/IoU/ring" in result
  assert apc_lib.APCMethod(c).seg_prob_output
  assert not apc_lib.APCMethod(apc_configs.get_config("voc", "demo")).seg_prob_output
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("val_crf/mIoU" in r for r in rows)
