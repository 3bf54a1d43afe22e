"""LoveDA reader, the mmseg train pipeline (transforms.mmseg) and the UDA pair makers."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastjax.data import builder
from contrastjax.data.sources import loveda
from contrastjax.data.transforms import mmseg as ST
from contrastjax.data.errors import DatasetError

S = 32  # fixture tile size (the official tiles are 1024)


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _mask(seed: int) -> np.ndarray:
  """Raw LoveDA mask: 0 = no-data, 1..7 classes, in blocks."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 8, (4, 4)).astype(np.uint8)
  return np.kron(blocks, np.ones((S // 4, S // 4), np.uint8))


def make_loveda(root: pathlib.Path, n: int = 3) -> pathlib.Path:
  """A LoveDA tree in the official layout: Train|Val / Rural|Urban / images_png|masks_png."""
  k = 0
  for split in ('Train', 'Val'):
    for domain in ('Rural', 'Urban'):
      for i in range(n):
        name = f'{k + 100}.png'
        k += 1
        rng = np.random.default_rng(k)
        _save(root / split / domain / 'images_png' / name,
              rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
        _save(root / split / domain / 'masks_png' / name, _mask(k))
  return root


@pytest.fixture
def root(tmp_path):
  return make_loveda(tmp_path / 'LoveDA')


def test_reads_official_layout_and_reduces_zero_label(root):
  src = loveda.LoveDASource(root, 'Train', 'Rural')
  assert len(src) == 3 and src.names == ('100', '101', '102')
  ex = src[0]
  assert ex['image'].shape == (S, S, 3) and ex['image'].dtype == np.uint8
  raw = np.asarray(Image.open(root / 'Train' / 'Rural' / 'masks_png' / '100.png'))
  expect = np.where(raw == 0, 255, raw.astype(np.int16) - 1)
  np.testing.assert_array_equal(ex['label'], expect)
  assert set(np.unique(ex['label'])) <= set(range(7)) | {255}
  assert loveda.validate(src).ok


def test_errors_name_the_file(root, tmp_path):
  with pytest.raises(DatasetError, match=r'LoveDA root .*nothing does not exist'):
    loveda.LoveDASource(tmp_path / 'nothing', 'Val', 'Rural')
  with pytest.raises(DatasetError, match="domain 'Suburb'"):
    loveda.LoveDASource(root, 'Train', 'Suburb')
  # Missing mask.
  (root / 'Train' / 'Urban' / 'masks_png' / '104.png').unlink()
  with pytest.raises(DatasetError, match=r'have no label .*104\.png'):
    loveda.LoveDASource(root, 'Train', 'Urban')
  # Mask without image.
  _save(root / 'Val' / 'Urban' / 'masks_png' / '999.png', _mask(0))
  with pytest.raises(DatasetError, match=r'have no image .*999\.png'):
    loveda.LoveDASource(root, 'Val', 'Urban')
  # Empty domain folder.
  for p in (root / 'Val' / 'Rural' / 'images_png').iterdir():
    p.unlink()
  for p in (root / 'Val' / 'Rural' / 'masks_png').iterdir():
    p.unlink()
  with pytest.raises(DatasetError, match='images_png holds no .png image'):
    loveda.LoveDASource(root, 'Val', 'Rural')
  # Missing domain folder.
  import shutil
  shutil.rmtree(root / 'Val' / 'Rural')
  with pytest.raises(DatasetError, match=r'Val/Rural does not exist'):
    loveda.LoveDASource(root, 'Val', 'Rural')


def test_bad_values_sizes_and_colour_masks(root):
  masks = root / 'Train' / 'Rural' / 'masks_png'
  bad = _mask(1)
  bad[0, 0] = 9
  _save(masks / '100.png', bad)
  _save(masks / '101.png', np.zeros((S, S + 1), np.uint8))
  _save(masks / '102.png', np.zeros((S, S, 3), np.uint8))
  src = loveda.LoveDASource(root, 'Train', 'Rural')
  with pytest.raises(DatasetError, match=r'100\.png has values \[9\].*outside the class set'):
    src[0]
  with pytest.raises(DatasetError, match=r'101\.png is 33x32.*expected equal sizes'):
    src[1]
  with pytest.raises(DatasetError, match=r'102\.png has mode RGB; expected an 8-bit single'):
    src[2]
  report = loveda.validate(src)
  assert report.counts == {'bad_mask': 2, 'size_mismatch': 1}
  assert '100.png' in report.summary()


# ------------------------------------------------------------------------------------------------
# The mmseg pipeline.
# ------------------------------------------------------------------------------------------------


def test_rescale_and_nearest_resize_match_mmcv_rules():
  assert ST.rescale_size((1024, 1024), (768, 768)) == (768, 768)
  assert ST.rescale_size((512, 1024), (600, 600)) == (300, 600)     # long edge bound
  assert ST.rescale_size((1000, 2000), (512, 1024)) == (512, 1024)
  lab = np.arange(16, dtype=np.uint8).reshape(4, 4)
  np.testing.assert_array_equal(ST.resize_nearest(lab, (8, 8))[::2, ::2], lab)
  np.testing.assert_array_equal(ST.resize_nearest(lab, (2, 2)), lab[::2, ::2])


def test_cat_max_ratio_crop_property():
  # A label dominated by class 0 with a small patch of class 1 in the top-left corner: most
  # crops are pure class 0 and must be rejected when a valid crop exists.
  label = np.zeros((64, 64), np.uint8)
  label[:20, :20] = 1
  label[40:, 40:] = 255
  accepted = 0
  for seed in range(40):
    rng = np.random.default_rng(seed)
    y0, y1, x0, x1 = ST.random_crop_box(label, (24, 24), rng, cat_max_ratio=0.75)
    assert (y1 - y0, x1 - x0) == (24, 24)
    accepted += ST.crop_is_acceptable(label[y0:y1, x0:x1], 0.75)
  # Acceptable origins are a small fraction of all; with 10 retries most crops pass.
  frac_ok = np.mean([ST.crop_is_acceptable(label[y:y + 24, x:x + 24], 0.75)
                     for y in range(41) for x in range(41)])
  assert frac_ok < 0.3
  assert accepted / 40 > 1 - (1 - frac_ok) ** 11 - 0.15
  # Ignored pixels do not count; a single class is never acceptable; after 10 failures the
  # 11th box is returned unchecked (consumes 11 draws of 2 integers).
  assert not ST.crop_is_acceptable(np.full((4, 4), 3), 0.75)
  assert ST.crop_is_acceptable(np.array([[0, 1], [255, 255]]), 0.75)
  rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
  box = ST.random_crop_box(np.zeros((64, 64), np.uint8), (24, 24), rng_a)
  for _ in range(11):
    origin = (int(rng_b.integers(0, 41)), int(rng_b.integers(0, 41)))
  assert box[::2] == origin
  # cat_max_ratio = 1 accepts the first box; smaller images are kept whole.
  assert ST.random_crop_box(label, (100, 100), np.random.default_rng(0)) == (0, 64, 0, 64)


def test_photometric_distortion_ranges_and_ops():
  cfg = ST.LOVEDA_AUG
  draws = [ST.sample_photometric(np.random.default_rng(s), cfg) for s in range(400)]
  betas = [d.beta for d in draws if d.beta is not None]
  alphas = [d.alpha for d in draws if d.alpha is not None]
  sats = [d.saturation for d in draws if d.saturation is not None]
  hues = [d.hue for d in draws if d.hue is not None]
  for values in (betas, alphas, sats, hues):
    assert 0.4 < len(values) / 400 < 0.6          # each op with probability 0.5
  assert -32 <= min(betas) and max(betas) < 32 and min(betas) < -25 and max(betas) > 25
  assert 0.5 <= min(alphas) and max(alphas) < 1.5
  assert 0.5 <= min(sats) and max(sats) < 1.5
  assert set(hues) <= set(range(-18, 18)) and min(hues) == -18 and max(hues) == 17
  assert 0.4 < np.mean([d.contrast_first for d in draws]) < 0.6
  img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  none = ST.PhotometricParams(None, True, None, None, None)
  np.testing.assert_array_equal(ST.apply_photometric(img, none), img)
  # Brightness: float add, clip, truncate.
  out = ST.apply_photometric(img, none._replace(beta=10.7))
  np.testing.assert_array_equal(out, np.clip(img + 10.7, 0, 255).astype(np.uint8))
  # Contrast position: before vs after the hue shift differs in general.
  a = ST.apply_photometric(img, none._replace(alpha=1.3, hue=5, contrast_first=True))
  b = ST.apply_photometric(img, none._replace(alpha=1.3, hue=5, contrast_first=False))
  assert not np.array_equal(a, b)
  # Saturation 0 -> grey (R = G = B); hue 0 -> HSV round trip only (quantisation error).
  grey = ST.apply_photometric(img, none._replace(saturation=1e-6))
  assert np.abs(grey.astype(int) - grey[..., :1]).max() <= 1
  assert np.abs(ST.apply_photometric(img, none._replace(hue=0)).astype(int) - img).max() <= 5
  # A pure red shifted by +30 (60 degrees) becomes yellow.
  red = np.zeros((1, 1, 3), np.uint8)
  red[..., 0] = 255
  np.testing.assert_array_equal(ST.apply_photometric(red, none._replace(hue=30)),
                                [[[255, 255, 0]]])


def test_train_example_shapes_normalise_and_pad():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  label = np.kron(rng.integers(0, 7, (4, 4)), np.ones((10, 10), int)).astype(np.uint8)
  cfg = ST.SegAugConfig(img_scale=(40, 40), ratio_range=(0.5, 0.5), crop_size=(32, 32),
                        photometric=False, flip_prob=0.0)
  img, lab = ST.train_example(image, label, np.random.default_rng(1), cfg)
  assert img.shape == (32, 32, 3) and img.dtype == np.float32
  assert lab.shape == (32, 32) and lab.dtype == np.int32
  # Scaled to 20x20 (< crop): the whole image, padded with 0 (image) and 255 (label).
  assert (lab[20:] == 255).all() and (lab[:, 20:] == 255).all() and (img[20:] == 0).all()
  np.testing.assert_array_equal(lab[:20, :20], ST.resize_nearest(label, (20, 20)))
  expect = ST.normalize(ST.resize_bilinear(image, (20, 20)))
  np.testing.assert_allclose(img[:20, :20], expect, atol=1e-5)


def test_loveda_maker_pairs_and_eval(root):
  cfg = ml_collections.ConfigDict(dict(seed=3, data=dict(
      name='loveda', root=str(root), img_scale=(S, S), crop_size=(16, 16),
      carry_target_label=True)))
  spec = builder.make_spec(cfg)
  train = spec.sources['train']
  assert len(train) == 9 and sorted(spec.sources) == ['source_val', 'train', 'val']
  ex = train[5]      # (source 5 // 3 = 1, target 5 % 3 = 2)
  assert ex['source']['name'] == '101' and ex['target']['name'] == '105'
  inputs = builder.build(cfg, local_batch_size=4, local_eval_batch_size=2)
  batch = next(iter(inputs.train))
  assert batch['source']['image'].shape == (4, 16, 16, 3)
  assert batch['source']['label'].shape == (4, 16, 16)
  assert batch['source']['label'].dtype == np.int32
  assert batch['target']['label'].shape == (4, 16, 16)
  assert set(batch) == {'source', 'target', 'index'}
  assert set(batch['source']) == set(batch['target']) == {'image', 'label', 'index'}
  np.testing.assert_array_equal(batch['source']['index'] * 3 + batch['target']['index'],
                                batch['index'])
  evals = list(inputs.eval_batches('val'))
  assert [b['valid'].tolist() for b in evals] == [[True, True], [True, False]]
  assert evals[0]['image'].shape == (2, S, S, 3) and evals[0]['label'].dtype == np.int32
  # Without carry_target_label the target label is not in the batch (reference behaviour).
  cfg.data.carry_target_label = False
  batch = next(iter(builder.build(cfg, local_batch_size=2, local_eval_batch_size=2).train))
  assert set(batch['target']) == {'image', 'index'}
  with pytest.raises(DatasetError, match='config.data.root'):
    builder.make_spec(ml_collections.ConfigDict(dict(seed=0, data=dict(name='loveda'))))


def test_resize_and_hsv_agree_with_cv2_when_available():
  """Parity with OpenCV (what mmcv runs); skipped where cv2 is not installed."""
  cv2 = pytest.importorskip('cv2')
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)
  lab = rng.integers(0, 7, (60, 70), dtype=np.uint8)
  for size in ((37, 51), (96, 100), (60, 70)):
    ref = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.abs(ST.resize_bilinear(img, size).astype(int) - ref).max() <= 1
    np.testing.assert_array_equal(ST.resize_nearest(lab, size),
                                  cv2.resize(lab, size[::-1], interpolation=cv2.INTER_NEAREST))
  hsv = ST.rgb_to_hsv_u8(img)
  d = np.abs(hsv.astype(int) - cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
  d[..., 0] = np.minimum(d[..., 0], 180 - d[..., 0])
  assert d.max() <= 1 and (d > 0).mean() < 0.03
  ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(int)
  d = np.abs(ST.hsv_to_rgb_u8(hsv).astype(int) - ref)
  assert d.max() <= 1 and (d > 0).mean() < 0.03


def test_loveda_maker_fills_spec_info(root):
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(name='loveda', root=str(root))))
  info = builder.make_spec(cfg).info
  assert info == builder.dataset_info('loveda')
  assert (info.classes, info.palette, info.ignore_index) == (loveda.CLASSES, loveda.PALETTE, 255)
