"""mmseg-style mIoU/mF1 (evaluators.semseg) and the inference helpers (evaluators.seg_inference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastjax import evaluators
from contrastjax.evaluators import seg_inference as SI
from contrastjax.evaluators import semseg

C = 5


def _confusion_metrics(preds, labels, num_classes, ignore=255):
  """Independent reference: a confusion matrix accumulated with np.add.at."""
  cm = np.zeros((num_classes, num_classes), np.int64)      # rows gt, cols pred
  for p, l in zip(preds, labels):
    keep = (l != ignore) & (p >= 0) & (p < num_classes)
    np.add.at(cm, (l[keep].astype(int), p[keep].astype(int)), 1)
  # mmseg drops ignored gt pixels but counts every prediction in 0..C-1 of the kept pixels.
  tp = np.diag(cm).astype(float)
  gt = cm.sum(1).astype(float)
  pr = cm.sum(0).astype(float)
  out = {}
  with np.errstate(all='ignore'):
    out['IoU'] = tp / (gt + pr - tp)
    prec, rec = tp / pr, tp / gt
    out['F1'] = 2 * prec * rec / (prec + rec)
    out['Acc'] = tp / gt
    out['aAcc'] = tp.sum() / gt.sum()
  return out


def _data(seed=0, n=3, h=6, w=7):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, (n, h, w))          # classes 3 and 4 never in the ground truth
  labels[rng.random((n, h, w)) < 0.2] = 255
  preds = np.where(rng.random((n, h, w)) < 0.6, labels, rng.integers(0, 4, (n, h, w)))
  preds[labels == 255] = rng.integers(0, C, (n, h, w))[labels == 255]
  preds = np.where(preds == 255, 0, preds)
  preds[preds == 1] = 0                            # class 1: in the gt, never predicted
  return preds, labels


def test_metrics_match_confusion_matrix_and_mmseg_nan_rules():
  preds, labels = _data()
  areas = sum(semseg.intersect_and_union(p, l, C) for p, l in zip(preds, labels))
  # Summing per-image histograms equals one histogram over the whole dataset.
  np.testing.assert_array_equal(areas, semseg.intersect_and_union(preds, labels, C))
  m = semseg.total_area_to_metrics(areas)
  ref = _confusion_metrics(preds, labels, C)
  for key in ('IoU', 'F1', 'Acc'):
    np.testing.assert_allclose(m[key], ref[key], equal_nan=True)
  assert m['aAcc'] == pytest.approx(ref['aAcc'])
  # Class 1: present, never predicted -> IoU 0 but F1 NaN (mmseg: precision 0/0).
  assert m['IoU'][1] == 0 and np.isnan(m['F1'][1])
  # Class 3: predicted, never present -> IoU 0, F1 NaN. Class 4: absent everywhere -> NaN.
  assert m['IoU'][3] == 0 and np.isnan(m['F1'][3]) and np.isnan(m['IoU'][4])
  assert m['mIoU'] == pytest.approx(np.mean(ref['IoU'][:4]))
  assert m['mF1'] == pytest.approx(np.mean(ref['F1'][[0, 2]]))
  # 'dice' F1 counts the missed class as 0 and agrees where mmseg's is finite.
  d = semseg.total_area_to_metrics(areas, f1_nan='dice')
  assert d['F1'][1] == 0 and d['F1'][3] == 0 and np.isnan(d['F1'][4])
  np.testing.assert_allclose(d['F1'][[0, 2]], m['F1'][[0, 2]])
  # A prediction outside 0..C-1 counts nowhere (mmseg's histc range).
  a = semseg.intersect_and_union(np.array([7, 0]), np.array([0, 0]), C)
  np.testing.assert_array_equal(a[:, 0], [1, 2, 1, 2])


def test_evaluator_accumulates_padded_batches_and_registers():
  preds, labels = _data(1, n=5)
  batches = []
  for start in (0, 2, 4):
    lab = labels[start:start + 2]
    pr = preds[start:start + 2]
    valid = np.ones(2, bool)
    if len(lab) < 2:                  # padded last batch: garbage that must not count
      lab = np.concatenate([lab, np.zeros_like(lab)])
      pr = np.concatenate([pr, np.ones_like(pr)])
      valid[1:] = False
    batches.append({'label': lab, 'pred_for_test': pr, 'valid': valid})
  logits_mode = {'n': 0}

  def predict_fn(batch):
    logits_mode['n'] += 1
    return {'logits': np.eye(C)[batch['pred_for_test']]}     # argmax = the prediction

  seen = []
  cfg = ml_collections.ConfigDict(dict(type='semseg', num_classes=C, output_key='logits',
                                       class_names=['a', 'b', 'c', 'd', 'e']))
  ev = evaluators.build(cfg, predict_fn=predict_fn, batches_fn=lambda: iter(batches),
                        prefix='val', reduce_fn=None)
  ev.on_batch = lambda b, o: seen.append(len(b['valid']))
  out = dict(ev.run())
  ref = _confusion_metrics(preds, labels, C)
  assert out['val/num_images'] == 5 and seen == [2, 2, 2] and logits_mode['n'] == 3
  assert out['val/mIoU'] == pytest.approx(np.nanmean(ref['IoU']))
  assert out['val/IoU/c'] == pytest.approx(ref['IoU'][2])
  assert np.isnan(out['val/F1/b'])
  assert out['val/aAcc'] == pytest.approx(ref['aAcc'])
  with pytest.raises(ValueError, match='differ'):
    bad = semseg.SemSegEvaluator(lambda b: {'pred': np.zeros((2, 3, 3), int)},
                                 lambda: iter(batches), num_classes=C)
    dict(bad.run())


# ------------------------------------------------------------------------------------------------
# Inference helpers.
# ------------------------------------------------------------------------------------------------

_W = jnp.asarray(np.random.default_rng(0).normal(size=(3, C)), jnp.float32)


def _pixelwise(x):
  """A translation-equivariant logits_fn (a 1x1 conv)."""
  return x @ _W


def test_slide_equals_whole_for_pixelwise_model_and_handles_borders():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 13, 3)), jnp.float32)
  whole = SI.whole_inference(_pixelwise, x)
  for crop, stride in (((5, 6), (3, 4)), ((11, 13), (4, 4)), ((20, 20), (7, 7)), ((4, 4), (4, 4))):
    slide = SI.slide_inference(_pixelwise, x, crop, stride)
    np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-5)
  # Windows: mmseg grid with the last window shifted inside; every pixel covered.
  wins = SI.slide_windows(11, 13, (5, 6), (3, 4))
  assert wins[0] == (0, 5, 0, 6) and wins[-1] == (6, 11, 7, 13)
  assert all(y2 - y1 == 5 and x2 - x1 == 6 for y1, y2, x1, x2 in wins)
  assert SI.slide_windows(4, 4, (8, 8), (5, 5)) == [(0, 4, 0, 4)]   # image smaller than crop

  # Count normalisation: a model whose output is its window's mean; each pixel gets the mean
  # over the windows covering it.
  def window_mean(x):
    return jnp.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape[:3] + (1,))

  got = np.asarray(SI.slide_inference(window_mean, x, (5, 6), (3, 4)))
  xn = np.asarray(x)
  num = np.zeros((2, 11, 13, 1))
  cnt = np.zeros((1, 11, 13, 1))
  for y1, y2, x1, x2 in wins:
    num[:, y1:y2, x1:x2] += xn[:, y1:y2, x1:x2].mean(axis=(1, 2, 3))[:, None, None, None]
    cnt[:, y1:y2, x1:x2] += 1
  np.testing.assert_allclose(got, num / cnt, rtol=1e-5, atol=1e-6)


def _np_resize(x, size):
  """torch F.interpolate(bilinear, align_corners=False) without antialias, in numpy."""
  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  r0, r1, fr = taps(x.shape[1], size[0])
  c0, c1, fc = taps(x.shape[2], size[1])
  x = x[:, r0] * (1 - fr)[None, :, None, None] + x[:, r1] * fr[None, :, None, None]
  return x[:, :, c0] * (1 - fc)[None, None, :, None] + x[:, :, c1] * fc[None, None, :, None]


def test_multiscale_flip_tta_matches_manual_average():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
  cols = np.arange(64, dtype=np.float32).reshape(1, 1, 64, 1)

  def model(img):
    # Not flip-equivariant (depends on the column) and at half resolution (like a decoder).
    feats = img @ _W + 0.05 * cols[:, :, :img.shape[2]]
    return feats[:, ::2, ::2]

  got = SI.multiscale_inference(model, jnp.asarray(x), ratios=(0.5, 1.0, 1.5), img_scale=(8, 8),
                                flip=True)
  probs = []
  for size in ((4, 4), (8, 8), (12, 12)):
    xs = _np_resize(x, size)
    for flip in (False, True):
      xi = xs[:, :, ::-1] if flip else xs
      logits = _np_resize(np.asarray(model(xi)), size)        # encode_decode: to input size
      logits = _np_resize(logits, (8, 8))                     # rescale to the original
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      probs.append(p[:, :, ::-1] if flip else p)
  np.testing.assert_allclose(got, np.mean(probs, axis=0), rtol=1e-4, atol=1e-5)
  assert SI.tta_sizes(1024, 1024, SI.LOVEDA_TTA_RATIOS, SI.LOVEDA_IMG_SCALE) == [
      (768, 768), (1024, 1024), (1280, 1280), (1536, 1536)]
  # One scale, no flip = softmax of whole inference; jit-able.
  one = jax.jit(lambda im: SI.multiscale_inference(model, im, ratios=(1.0,), img_scale=None))(
      jnp.asarray(x))
  np.testing.assert_allclose(one, jax.nn.softmax(SI.whole_inference(model, jnp.asarray(x))),
                             rtol=1e-5, atol=1e-6)


def test_toco_msf_is_max_over_scales_of_flip_sums():
  """ToCo's ``infer_seg_voc.py``: per scale the output plus its flipped-back flip, at the
  label size; the element-wise max over scales (here against numpy resizing)."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  cols = np.arange(64, dtype=np.float32).reshape(1, 1, 64, 1)

  def model(img):  # column-dependent (not flip-equivariant), half resolution
    return (img @ _W + 0.05 * cols[:, :, :img.shape[2]])[:, ::2, ::2]

  got = np.asarray(SI.toco_msf_inference(model, jnp.asarray(x), scales=(1.0, 1.5, 1.25)))
  outs = []
  for size in ((8, 8), (12, 12), (10, 10)):
    xs = _np_resize(x, size) if size != (8, 8) else x
    a = _np_resize(np.asarray(model(xs)), (8, 8))
    b = _np_resize(np.asarray(model(xs[:, :, ::-1])), (8, 8))[:, :, ::-1]
    outs.append(a + b)
  want = np.max(outs, axis=0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
  # the max, not the mean: differs from mmseg's average of softmax probabilities
  assert not np.allclose(got, np.mean(outs, axis=0), atol=1e-3)
  one = SI.toco_msf_inference(model, jnp.asarray(x), scales=(1.0,), flip=False)
  np.testing.assert_allclose(one, _np_resize(np.asarray(model(x)), (8, 8)), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match=r"scale 0.01 shrinks a 8x8 image"):
    SI.toco_msf_inference(model, jnp.asarray(x), scales=(0.01,))


def test_colour_overlays_png(tmp_path):
  from contrastjax.data.sources import loveda
  lab = np.array([[0, 1], [6, 255]])
  rgb = semseg.colorize(lab, loveda.PALETTE)
  np.testing.assert_array_equal(rgb[0, 1], loveda.PALETTE[1])
  np.testing.assert_array_equal(rgb[1, 1], (0, 0, 0))
  image = np.full((2, 2, 3), 100, np.uint8)
  path = tmp_path / 'x' / 'p.png'
  semseg.save_semseg_png(str(path), image, lab, np.array([[0, 0], [1, 1]]), loveda.PALETTE)
  panel = np.asarray(Image.open(path))
  assert panel.shape == (2, 6, 3)
  np.testing.assert_array_equal(panel[:, :2], image)
  np.testing.assert_array_equal(panel[0, 3], np.rint(0.5 * 100 + 0.5 * np.array((255, 0, 0))))
