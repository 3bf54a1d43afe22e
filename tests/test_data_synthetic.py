"""Tests of the synthetic polyp dataset (contrastjax.data.synthetic.polyps)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import ndimage

from contrastjax.data.sources.medseg import validate
from contrastjax.data.synthetic.polyps import SyntheticPolyps


def test_contract_and_determinism():
  ds = SyntheticPolyps(50, 40, seed=3)
  assert len(ds) == 50
  ex = ds[7]
  assert ex['image'].dtype == np.uint8 and ex['image'].shape == (40, 40, 3)
  assert ex['mask'].dtype == np.uint8 and ex['mask'].shape == (40, 40)
  assert set(np.unique(ex['mask'])) <= {0, 255} and ex['name'] == 'synthetic_000007'
  again = SyntheticPolyps(50, 40, seed=3)
  for i in (7, 0, 49, 7):                            # independent of call order
    np.testing.assert_array_equal(again[i]['image'], ds[i]['image'])
    np.testing.assert_array_equal(again[i]['mask'], ds[i]['mask'])
  np.testing.assert_array_equal(ds[-1]['image'], ds[49]['image'])
  other = SyntheticPolyps(50, 40, seed=4)
  assert not np.array_equal(other[7]['image'], ex['image'])
  assert not np.array_equal(ds[8]['mask'], ex['mask'])
  restored = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(restored[7]['image'], ex['image'])
  with pytest.raises(IndexError):
    ds[50]
  assert validate(SyntheticPolyps(10, 32, seed=0)).ok


def test_sizes_from_small_to_large():
  ds = SyntheticPolyps(300, 64, seed=0)
  frac = np.array([ds[i]['mask'].mean() / 255 for i in range(len(ds))])
  assert frac.min() > 0                               # every image has an object
  assert np.mean(frac < 0.02) > 0.1                   # small objects are common ...
  assert np.mean(frac > 0.2) > 0.1                    # ... and so are large ones
  assert 0.03 < np.median(frac) < 0.2
  counts = [ndimage.label(ds[i]['mask'] > 0)[1] for i in range(100)]
  assert max(counts) >= 2 and np.mean(np.array(counts) == 1) > 0.4


def _contrast(ds: SyntheticPolyps, n: int = 60) -> tuple[float, float]:
  """Object-vs-surround contrast: (mean |colour difference|, median contrast-to-noise ratio).

  The difference is between the mean colour of the object and of a ring just outside it, in
  [0, 1] units averaged over channels; the ratio divides it by the background's pixel std.
  """
  diffs, cnr = [], []
  for i in range(n):
    ex = ds[i]
    obj = ex['mask'] > 0
    ring = ndimage.binary_dilation(obj, iterations=4) & ~ndimage.binary_dilation(obj,
                                                                                 iterations=1)
    img = ex['image'].astype(np.float64) / 255
    if ring.sum() > 10:
      diffs.append(np.abs(img[obj].mean(0) - img[ring].mean(0)).mean())
      cnr.append(diffs[-1] / img[~obj].std(0).mean())
  return float(np.mean(diffs)), float(np.median(cnr))


def test_low_contrast_controlled_by_parameter():
  flat = [_contrast(SyntheticPolyps(60, 64, seed=1, contrast=c, illumination=0.0))[0]
          for c in (0.0, 0.5, 1.0)]
  assert flat[0] < 0.02                   # contrast=0: objects statistically invisible
  assert flat[0] < flat[1] < flat[2]
  assert 0.03 < flat[1] < 0.12            # default: ~20 grey levels
  # With the default illumination the object-vs-surround difference is below two standard
  # deviations of the background itself: low contrast.
  _, cnr = _contrast(SyntheticPolyps(60, 64, seed=1))
  assert 0.5 < cnr < 2.5
  # Uneven illumination: the background brightness varies across the image.
  ds = SyntheticPolyps(20, 64, seed=1)
  spread = []
  for i in range(20):
    ex = ds[i]
    gray = ex['image'].mean(-1)
    bg = gray[ex['mask'] == 0]
    spread.append(np.percentile(bg, 95) - np.percentile(bg, 5))
  assert np.median(spread) > 25
  flat_light = SyntheticPolyps(20, 64, seed=1, illumination=0.0)
  flat_spread = []
  for i in range(20):
    ex = flat_light[i]
    bg = ex['image'].mean(-1)[ex['mask'] == 0]
    flat_spread.append(np.percentile(bg, 95) - np.percentile(bg, 5))
  assert np.median(flat_spread) < np.median(spread)


def test_bad_arguments():
  with pytest.raises(ValueError, match='image_size'):
    SyntheticPolyps(4, 4)
  with pytest.raises(ValueError, match='radius'):
    SyntheticPolyps(4, 32, min_radius=0.5, max_radius=0.2)


def test_demo_config_passes_generator_settings_to_every_split():
  import ml_collections
  from contrastjax.data.tasks import binary_seg
  dcfg = ml_collections.ConfigDict(dict(
      name="synthetic_polyps", num_train=4, num_val=3, num_test=2, image_size=32,
      contrast=0.7, min_radius=0.3, max_radius=0.5, max_objects=2, noise=0.5,
      augment="none"))
  spec = binary_seg.synthetic_polyps(dcfg, seed=0)
  for split, n in (("train", 4), ("val", 3), ("test", 2)):
    src = spec.sources[split]
    assert len(src) == n
    assert (src.contrast, src.min_radius, src.max_radius, src.max_objects, src.noise) == (
        0.7, 0.3, 0.5, 2, 0.5), split
  # Larger smallest radius -> no object smaller than a disc of that radius (x aspect).
  areas = [float((spec.sources["train"][i]["mask"] > 0).mean()) for i in range(4)]
  assert min(areas) >= np.pi * (0.3 * 0.65) ** 2 / 4 * 0.8
