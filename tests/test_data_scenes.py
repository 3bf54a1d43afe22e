"""The procedural WSSS scenes: determinism, labels vs visibility, balance, class signal, cost."""

from __future__ import annotations

import ast
import inspect
import sys
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from contrastjax.data.synthetic import scenes as sc
from contrastjax.data.sources import voc

C = len(sc.CLASSES)


def test_deterministic_and_well_formed():
  a = sc.SyntheticScenes(6, 64, seed=3)
  b = sc.SyntheticScenes(6, 64, seed=3)
  for i in range(6):
    for key in ('image', 'labels'):
      np.testing.assert_array_equal(a[i][key], b[i][key])
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  assert not np.array_equal(a[0]['image'], sc.SyntheticScenes(6, 64, seed=4)[0]['image'])
  # Training examples carry no pixel labels at all; evaluation ones add the mask.
  ex = a[-1]
  assert set(ex) == {'image', 'labels', 'name'} and ex['name'] == 'scene_000005'
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (64, 64, 3)
  assert ex['labels'].dtype == np.float32 and ex['labels'].shape == (C,)
  assert ex['labels'][0] == 1.0 and ex['labels'][1:].sum() >= 1
  ev = sc.SyntheticScenes(6, 48, seed=3, with_masks=True)[2]
  assert set(ev) == {'image', 'labels', 'label', 'name'}
  assert ev['label'].dtype == np.uint8 and ev['label'].shape == (48, 48)
  assert ev['label'].max() < C
  # The same source contract as the VOC reader: validate finds nothing wrong.
  report = voc.validate(sc.SyntheticScenes(40, 64, seed=1, with_masks=True))
  assert report.ok and not report.warnings, report.summary()
  with pytest.raises(IndexError):
    a[6]
  for kwargs, msg in ((dict(image_size=8), 'image_size'), (dict(max_objects=0), 'max_objects'),
                      (dict(size_range=(0.5, 0.2)), 'size_range'),
                      (dict(distractors=(2, 1)), 'distractors'),
                      (dict(overlap_prob=1.5), 'overlap_prob'),
                      (dict(min_visible_fraction=1.0), 'min_visible_fraction')):
    with pytest.raises(ValueError, match=msg):
      sc.SyntheticScenes(2, **kwargs)


def test_labels_are_the_visible_classes_after_occlusion():
  ds = sc.SyntheticScenes(1000, 64, seed=0, with_masks=True)
  fully_hidden = partly_hidden = occluded = 0
  for i in range(len(ds)):
    scene = ds.generate(i, keep_masks=True)
    ex = ds[i]
    np.testing.assert_array_equal(ex['label'], scene.label)
    # The label vector is exactly the set of classes present in the mask.
    present = set(np.unique(ex['label']).tolist()) - {0}
    assert present, i                                  # every image has a visible object
    assert set(np.flatnonzero(ex['labels']).tolist()) == present | {0}
    # Occlusion recomputed from the drawn shapes: the top-most (latest) object owns a pixel.
    top = np.zeros((64, 64), np.uint8)
    for k, drawn in enumerate(scene.drawn):
      assert drawn.sum() == scene.areas[k]
      top[drawn] = k + 1
    np.testing.assert_array_equal(scene.instances, top)
    visible_classes = set()
    for k, cls in enumerate(scene.classes):
      seen = int((top == k + 1).sum())
      assert seen == scene.visible_pixels[k]
      occluded += seen < scene.areas[k]
      if seen == 0:
        fully_hidden += 1
      is_visible = seen >= max(1, ds.min_visible_fraction * scene.areas[k])
      assert scene.visible[k] == is_visible
      if is_visible:
        visible_classes.add(cls)
        # A visible object is labelled exactly where it is on top.
        np.testing.assert_array_equal(ex['label'][top == k + 1], cls)
      else:
        partly_hidden += seen > 0
        # A hidden object is background where its fragments show.
        assert not ex['label'][top == k + 1].any()
    assert visible_classes == present
    # The last object is never occluded.
    assert scene.visible_pixels[-1] == scene.areas[-1]
  # The checks above covered the interesting cases.
  assert fully_hidden >= 1 and partly_hidden >= 1 and occluded >= 100, (fully_hidden,
                                                                        partly_hidden, occluded)


def test_fully_occluded_object_is_not_in_the_label():
  ds = sc.SyntheticScenes(1000, 64, seed=0, with_masks=True)
  cases = 0
  for i in range(len(ds)):
    scene = ds.generate(i)
    for k, cls in enumerate(scene.classes):
      others = {c for j, c in enumerate(scene.classes) if j != k and scene.visible[j]}
      if scene.visible_pixels[k] == 0 and cls not in others:
        assert ds[i]['labels'][cls] == 0.0
        cases += 1
  assert cases >= 1


def test_class_balance():
  ds = sc.SyntheticScenes(1000, 64, seed=7)
  labels = np.stack([ds[i]['labels'] for i in range(len(ds))])
  assert (labels[:, 0] == 1).all() and (labels[:, 1:].sum(1) >= 1).all()
  freq = labels[:, 1:].mean(0)
  # Each class is present with probability 1 - E[(4/5)^K] = 0.349 for K uniform in 1..3, less
  # the rare hidden objects; +-0.05 is more than 3 binomial standard deviations.
  assert np.all(np.abs(freq - 0.349) < 0.05), freq
  assert freq.max() / freq.min() < 1.3, freq
  counts = np.bincount([len(ds.generate(i).classes) for i in range(300)], minlength=4)[1:]
  assert counts.min() > 70, counts                      # object count uniform in 1..3


def _object_features(ds, n):
  """Per visible object (>= 30 px): mean RGB and a brightness-normalised texture statistic
  (mean absolute difference of neighbouring gray values inside the object)."""
  colours, textures, classes = [], [], []
  for i in range(n):
    scene = ds.generate(i)
    img = scene.image.astype(np.float32) / 255.0
    gray = img.mean(-1)
    for k, cls in enumerate(scene.classes):
      m = scene.instances == k + 1
      if m.sum() < 30:
        continue
      mh, mv = m[:, 1:] & m[:, :-1], m[1:] & m[:-1]
      diffs = np.concatenate([np.abs(gray[:, 1:] - gray[:, :-1])[mh],
                              np.abs(gray[1:] - gray[:-1])[mv]])
      colours.append(img[m].mean(0))
      textures.append([diffs.mean() / gray[m].mean()])
      classes.append(cls)
  return np.array(colours), np.array(textures), np.array(classes)


def _nearest_class_mean_accuracy(features, classes):
  half = len(classes) // 2
  means = np.stack([features[:half][classes[:half] == c].mean(0) for c in range(1, C)])
  pred = ((features[half:, None, :] - means) ** 2).sum(-1).argmin(1) + 1
  return float((pred == classes[half:]).mean())


def test_shape_and_texture_not_colour_are_the_class_signal():
  colours, textures, classes = _object_features(sc.SyntheticScenes(600, 64, seed=0), 600)
  assert len(classes) > 800 and np.bincount(classes, minlength=C)[1:].min() > 150
  # Mean colour per class: statistically indistinguishable (one-way ANOVA per channel), and a
  # nearest-class-mean classifier on it is at chance (1/5).
  for ch in range(3):
    p = stats.f_oneway(*[colours[classes == c, ch] for c in range(1, C)]).pvalue
    assert p > 0.01, (ch, p)
  assert _nearest_class_mean_accuracy(colours, classes) < 0.3
  # The texture statistic differs strongly between classes and predicts them well.
  assert float(stats.f_oneway(*[textures[classes == c, 0] for c in range(1, C)]).pvalue) < 1e-100
  assert _nearest_class_mean_accuracy(textures, classes) > 0.6
  per_class = {sc.CLASSES[c]: float(textures[classes == c].mean()) for c in range(1, C)}
  assert per_class['ring'] < 0.3 * min(v for k, v in per_class.items() if k != 'ring')  # solid
  assert max(per_class, key=per_class.get) == 'cross'                                 # noise
  # Texture alone does not make an object: distractors and background patches carry the class
  # textures with non-class shapes, and they are background in the mask.
  assert not set(sc.DISTRACTOR_SHAPES) & set(sc.CLASSES)
  assert set(sc.CLASS_TEXTURES.values()) == set(sc.TEXTURES)


def test_numpy_only_and_bounded_work():
  """Cost without timing: the module needs numpy only, and one example allocates O(S^2) memory
  (every object is drawn in its window; no per-object full-frame or larger intermediates)."""
  tree = ast.parse(inspect.getsource(sc))
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name.split('.')[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module.split('.')[0])
  assert imported <= {'numpy', '__future__'} | set(sys.stdlib_module_names), imported

  def peak(size, n=20):
    ds = sc.SyntheticScenes(n, size, seed=0, max_objects=3)
    ds[0]                                   # warm the caches
    worst = 0
    for i in range(n):
      tracemalloc.start()
      ds[i]
      worst = max(worst, tracemalloc.get_traced_memory()[1])
      tracemalloc.stop()
    return worst

  p64, p128 = peak(64), peak(128)
  # A 64x64 float32 RGB frame is 48 KiB; the whole example stays within a few frames.
  assert p64 < 16 * 64 * 64 * 3 * 4, p64
  assert p128 < 5 * p64, (p64, p128)        # grows with the pixel count, not faster
