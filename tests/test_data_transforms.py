"""Tests of the host-side transforms (contrastjax.data.transforms.medseg)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import ndimage

from contrastjax.data.transforms import medseg as T


def _example(h: int = 40, w: int = 52, seed: int = 0) -> dict:
  """An example whose image channel 0 equals the mask, and an asymmetric mask (an L shape)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((h, w), np.uint8)
  mask[5:30, 4:12] = 255
  mask[22:30, 4:40] = 255
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  image[..., 0] = mask
  return {'image': image, 'mask': mask, 'name': 'x', 'index': np.int32(3)}


# ------------------------------------------------------------------------------------------------
# rotate / resize vs independent computations.
# ------------------------------------------------------------------------------------------------


def test_rotate_right_angles_are_exact():
  a = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
  np.testing.assert_array_equal(T.rotate(a, 90, order=1), np.rot90(a, 1))   # counter-clockwise
  np.testing.assert_array_equal(T.rotate(a, -90, order=1), np.rot90(a, -1))
  np.testing.assert_array_equal(T.rotate(a[..., 0], 90, order=0), np.rot90(a[..., 0], 1))
  b = np.random.default_rng(1).integers(0, 256, (6, 11), dtype=np.uint8)   # non-square
  np.testing.assert_array_equal(T.rotate(b, 180, order=1), b[::-1, ::-1])
  np.testing.assert_array_equal(T.rotate(b, 0, order=0), b)


@pytest.mark.parametrize('angle', [17.0, -63.5, 88.0])
def test_rotate_matches_scipy_mirror(angle):
  """Bilinear + BORDER_REFLECT_101 == scipy.ndimage.affine_transform(order=1, mode='mirror')."""
  a = np.random.default_rng(2).random((23, 31, 2)).astype(np.float32)
  ours = T.rotate(a, angle, order=1)
  # Independent matrix: cv2.getRotationMatrix2D(centre=(W/2-.5, H/2-.5)) inverted by hand.
  t = np.deg2rad(angle)
  centre = np.array([23 / 2 - 0.5, 31 / 2 - 0.5])
  m = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
  for c in range(2):
    ref = ndimage.affine_transform(a[..., c].astype(np.float64), m, centre - m @ centre, order=1,
                                   mode='mirror')
    np.testing.assert_allclose(ours[..., c], ref, atol=2e-5)
  mask = (a[..., 0] > 0.5).astype(np.uint8) * 255
  ref = ndimage.affine_transform(mask, m, centre - m @ centre, order=0, mode='mirror')
  assert np.mean(T.rotate(mask, angle, order=0) != ref) < 0.01   # only rounding ties differ


def _cv2_linear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Scalar-loop transcription of cv2 INTER_LINEAR (half-pixel, clamped), float64."""
  in_h, in_w = img.shape[:2]
  out = np.zeros((out_h, out_w) + img.shape[2:])

  def taps(d, n_in, n_out):
    f = (d + 0.5) * n_in / n_out - 0.5
    s = int(np.floor(f))
    f -= s
    if s < 0:
      s, f = 0, 0.0
    if s >= n_in - 1:
      s, f = n_in - 1, 0.0
    return s, min(s + 1, n_in - 1), f

  for dy in range(out_h):
    y0, y1, fy = taps(dy, in_h, out_h)
    for dx in range(out_w):
      x0, x1, fx = taps(dx, in_w, out_w)
      out[dy, dx] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                     + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
  return out


@pytest.mark.parametrize('size', [(7, 5), (30, 41), (9, 40), (16, 20)])
def test_resize_matches_cv2_formula_and_jax(size):
  import jax  # pylint: disable=g-import-not-at-top
  a = np.random.default_rng(3).random((16, 20, 3)).astype(np.float32)
  ours = T.resize_bilinear(a, size)
  np.testing.assert_allclose(ours, _cv2_linear_reference(a, *size), atol=1e-5)
  ref = jax.image.resize(a, (*size, 3), 'linear', antialias=False)
  np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5)


def test_resize_no_antialias_and_uint8_rounding():
  a = np.random.default_rng(4).integers(0, 256, (32, 24), dtype=np.uint8)
  out = T.resize_bilinear(a, (16, 12))
  assert out.dtype == np.uint8
  # Exact 2x downscale of cv2 INTER_LINEAR = mean of 2x2 blocks (taps at half-pixel centres).
  blocks = a.reshape(16, 2, 12, 2).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_array_equal(out, np.clip(np.rint(blocks), 0, 255))
  # 4x downscale: only 2 of every 4 source pixels per axis contribute (no antialiasing).
  out4 = T.resize_bilinear(a.astype(np.float32), (8, 6))
  ref4 = a.astype(np.float32).reshape(8, 4, 6, 4)[:, 1:3, :, 1:3].mean(axis=(1, 3))
  np.testing.assert_allclose(out4, ref4, atol=1e-4)


def test_resize_transform_makes_soft_masks():
  x = T.AddBackground().map(_example())
  y = T.Resize((13, 17)).map(x)
  assert y['image'].shape == (13, 17, 3) and y['mask'].shape == (13, 17)
  assert y['background'].shape == (13, 17) and y['image'].dtype == np.uint8
  assert len(np.unique(y['mask'])) > 2         # bilinear on the mask: soft edges
  np.testing.assert_array_equal(y['mask'].astype(int) + y['background'], 255)
  assert T.Resize(8).size == (8, 8)


# ------------------------------------------------------------------------------------------------
# Geometric augmentation.
# ------------------------------------------------------------------------------------------------


def test_flips_apply_to_image_and_mask_only():
  x = T.AddBackground().map(_example())
  rng = np.random.default_rng(0)
  h = T.HorizontalFlip(1.0).random_map(x, rng)
  np.testing.assert_array_equal(h['image'], x['image'][:, ::-1])
  np.testing.assert_array_equal(h['mask'], x['mask'][:, ::-1])
  assert h['background'] is x['background'] and h['name'] == 'x'
  v = T.VerticalFlip(1.0).random_map(x, rng)
  np.testing.assert_array_equal(v['image'], x['image'][::-1])
  np.testing.assert_array_equal(v['mask'], x['mask'][::-1])
  assert T.HorizontalFlip(0.0).random_map(x, rng) is x
  assert T.VerticalFlip(0.0).random_map(x, rng) is x


def test_rotate_transform_consistent_on_image_and_mask():
  x = _example(60, 60)
  rng = np.random.default_rng(1)
  for _ in range(5):
    y = T.Rotate(90, 1.0).random_map(x, rng)
    assert not np.array_equal(y['mask'], x['mask'])
    assert y['image'].shape == x['image'].shape and y['mask'].dtype == np.uint8
    assert set(np.unique(y['mask'])) <= {0, 255}          # nearest keeps the mask binary
    agree = np.mean((y['image'][..., 0] > 127) == (y['mask'] > 127))
    assert agree > 0.97                                   # image and mask rotated together
  assert T.Rotate(90, 0.0).random_map(x, rng) is x


def test_rotate_angle_distribution():
  x = {'image': np.zeros((4, 4, 3), np.uint8), 'mask': np.zeros((4, 4), np.uint8)}
  rng = np.random.default_rng(2)
  hits = sum(T.Rotate(35, 0.3).random_map(x, rng) is not x for _ in range(2000))
  assert 0.26 < hits / 2000 < 0.34


def test_coarse_dropout_holes():
  t = T.CoarseDropout(p=1.0, max_holes=10, max_height=32, max_width=32)
  assert (t.min_holes, t.min_height, t.min_width) == (10, 32, 32)   # albumentations 1.x
  x = {'image': np.full((100, 120, 3), 200, np.uint8), 'mask': np.full((100, 120), 255, np.uint8)}
  y = t.random_map(x, np.random.default_rng(7))
  rng = np.random.default_rng(7)
  rng.random()                                           # the p draw
  holes = t.sample_holes((100, 120), rng)
  assert len(holes) == 10
  expected = np.zeros((100, 120), bool)
  for top, left, hh, ww in holes:
    assert (hh, ww) == (32, 32) and 0 <= top <= 100 - 32 and 0 <= left <= 120 - 32
    expected[top:top + hh, left:left + ww] = True
  np.testing.assert_array_equal(y['image'] == 0, np.repeat(expected[..., None], 3, -1))
  assert y['mask'] is x['mask'] and (x['image'] == 200).all()     # mask and input untouched
  small = t.sample_holes((20, 10), np.random.default_rng(0))       # holes clipped to the image
  assert all((hh, ww) == (20, 10) for _, _, hh, ww in small)
  with pytest.raises(ValueError, match='CoarseDropout'):
    T.CoarseDropout(max_holes=2, min_holes=3)


@pytest.mark.parametrize('augment_background', [True, False])
def test_background_switch(augment_background):
  ops = T.geometric_augment('stage1', augment_background=augment_background)
  assert isinstance(ops[-1 if augment_background else 0], T.AddBackground)
  x = _example()
  rng = np.random.default_rng(3)
  changed = 0
  for _ in range(20):
    y = x
    for op in ops:
      y = op.random_map(y, rng) if isinstance(op, T.grain.transforms.RandomMap) else op.map(y)
    changed += not np.array_equal(y['mask'], x['mask'])
    if augment_background:                   # the fix: background follows the augmented mask
      np.testing.assert_array_equal(y['background'].astype(int) + y['mask'], 255)
    else:                                    # the reference: background of the ORIGINAL mask
      np.testing.assert_array_equal(y['background'].astype(int) + x['mask'], 255)
  assert changed > 10


def test_presets():
  s1 = T.geometric_augment('stage1')
  assert [type(t).__name__ for t in s1] == ['Rotate', 'HorizontalFlip', 'VerticalFlip',
                                            'CoarseDropout', 'AddBackground']
  assert (s1[0].limit, s1[0].p, s1[1].p, s1[2].p, s1[3].p) == (90, 0.5, 0.5, 0.5, 0.3)
  s2 = T.geometric_augment('stage2')
  assert (s2[0].limit, s2[0].p, s2[1].p, s2[2].p, s2[3].p) == (35, 0.3, 0.3, 0.3, 0.3)
  assert [type(t).__name__ for t in T.geometric_augment('none')] == ['AddBackground']
  with pytest.raises(ValueError, match='stage3'):
    T.geometric_augment('stage3')


def test_to_float_and_full_chain():
  x = T.AddBackground().map(_example())
  y = T.ToFloat('rgb').map(x)
  assert y['image'].dtype == np.float32 and y['image'].shape == (40, 52, 3)
  np.testing.assert_allclose(y['image'], x['image'] / 255.0, atol=1e-7)
  assert y['mask'].shape == (40, 52, 1) and y['background'].shape == (40, 52, 1)
  np.testing.assert_allclose(y['mask'] + y['background'], 1.0, atol=1e-6)
  z = T.ToFloat('bgr').map(x)
  np.testing.assert_array_equal(z['image'], y['image'][..., ::-1])
  with pytest.raises(ValueError, match='channel_order'):
    T.ToFloat('hsv')
  chain = T.train_transforms(16, 'stage2')
  rng = np.random.default_rng(0)
  for op in chain:
    x = op.random_map(x, rng) if isinstance(op, T.grain.transforms.RandomMap) else op.map(x)
  assert x['image'].shape == (16, 16, 3) and x['mask'].shape == (16, 16, 1)
  assert 0.0 <= x['mask'].min() and x['mask'].max() <= 1.0


def test_transforms_pickle():
  ops = T.train_transforms(32, 'stage1', augment_background=False, channel_order='bgr')
  ops += T.eval_transforms((24, 32))
  back = pickle.loads(pickle.dumps(ops))
  assert [type(o) for o in back] == [type(o) for o in ops]
  assert back[-2].size == (24, 32) and back[-1].channel_order == "rgb"
