"""Tests of the reference-layout reader (contrastjax.data.sources.medseg) on fixtures built here."""

from __future__ import annotations

import io
import os
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastjax.data import builder
from contrastjax.data.sources import medseg
from contrastjax.data.errors import DatasetError
from contrastjax.data.sources.medseg import DATASETS, MedSegSource, binarize_mask, read_split, validate

H, W = 24, 32


def _disc(h: int = H, w: int = W, cy: float = 12, cx: float = 14, r: float = 7) -> np.ndarray:
  yy, xx = np.mgrid[:h, :w]
  return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _glas_labels() -> np.ndarray:
  """An instance-labelled mask (0 = background, 1..3 = glands), as GlaS ships them."""
  lab = np.zeros((H, W), np.uint8)
  lab[2:8, 2:10] = 1
  lab[10:20, 4:12] = 2
  lab[5:15, 18:30] = 3
  return lab


def make_dataset(tmp_path: pathlib.Path) -> pathlib.Path:
  """Official layout: jpg (Kvasir-like 3-channel JPEG mask), png, bmp (GlaS-like labels)."""
  root = tmp_path / 'Kvasir-SEG'
  disc = np.where(_disc(), 255, 0).astype(np.uint8)
  _save(root / 'images' / 'a.jpg', _rgb(0), quality=90)
  _save(root / 'masks' / 'a.jpg', np.repeat(disc[..., None], 3, -1), quality=75)
  _save(root / 'images' / 'b.png', _rgb(1))
  _save(root / 'masks' / 'b.png', disc)
  _save(root / 'images' / 'c.bmp', _rgb(2))
  _save(root / 'masks' / 'c.bmp', _glas_labels())
  # Blank line, surrounding whitespace, and NO trailing newline after the last id.
  (root / 'train.txt').write_text('a\n\n  b  \nc')
  (root / 'val.txt').write_text('b\n')
  return root


@pytest.fixture
def dataset(tmp_path: pathlib.Path) -> pathlib.Path:
  return make_dataset(tmp_path)


def test_reads_all_formats_and_keeps_last_line(dataset):
  src = MedSegSource(dataset, 'train')
  assert len(src) == 3
  assert src.names == ('a', 'b', 'c')
  for i in range(3):
    ex = src[i]
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (H, W, 3)
    assert ex['mask'].dtype == np.uint8 and ex['mask'].shape == (H, W)
    assert set(np.unique(ex['mask'])) <= {0, 255}
    assert ex['name'] == src.names[i]
  np.testing.assert_array_equal(src[1]['image'], _rgb(1))          # lossless png
  np.testing.assert_array_equal(src[2]['image'], _rgb(2))          # lossless bmp
  np.testing.assert_array_equal(src[1]['mask'] > 0, _disc())
  assert src[-1]['name'] == 'c'
  with pytest.raises(IndexError):
    src[3]


def test_jpeg_mask_threshold_close_to_truth(dataset):
  mask = MedSegSource(dataset, 'train')[0]['mask']
  assert np.mean((mask > 0) == _disc()) > 0.98


def test_glas_instance_labels_binarise_to_nonzero(dataset):
  mask = MedSegSource(dataset, 'train')[2]['mask']
  np.testing.assert_array_equal(mask > 0, _glas_labels() > 0)
  # The reference's behaviour (threshold a 0..K label mask) loses every gland (issue #18):
  # here that is an error naming the file and the rule, never an empty mask.
  with pytest.raises(DatasetError, match=r"c\.bmp.*'threshold'.*binarize='nonzero'") as e:
    MedSegSource(dataset, 'train', binarize='threshold')[2]
  assert e.value.kind == 'label_mask_under_threshold_rule'


def test_binarize_rules():
  labels = np.array([[0, 1, 2], [3, 0, 0]], np.uint8)
  noisy = np.array([[0, 3, 120], [130, 250, 255]], np.uint8)
  np.testing.assert_array_equal(binarize_mask(labels, 'auto'), (labels > 0) * 255)
  np.testing.assert_array_equal(binarize_mask(noisy, 'auto'), (noisy > 127) * 255)
  np.testing.assert_array_equal(binarize_mask(noisy, 'nonzero'), (noisy > 0) * 255)
  np.testing.assert_array_equal(binarize_mask(labels, 'threshold'), np.zeros_like(labels))
  assert binarize_mask(np.zeros((2, 2), np.uint8)).max() == 0
  with pytest.raises(ValueError, match='binarize'):
    binarize_mask(labels, 'otsu')
  with pytest.raises(ValueError, match='binarize'):
    MedSegSource('/nonexistent', 'train', binarize='otsu')


def test_gray_and_rgba_images_become_rgb(dataset):
  gray = np.random.default_rng(3).integers(0, 256, (H, W), dtype=np.uint8)
  _save(dataset / 'images' / 'g.png', gray)
  rgba = np.concatenate([_rgb(4), np.full((H, W, 1), 7, np.uint8)], -1)
  _save(dataset / 'images' / 'h.png', rgba)
  for name in ('g', 'h'):
    _save(dataset / 'masks' / f'{name}.png', np.zeros((H, W), np.uint8))
  (dataset / 'gh.txt').write_text('g\nh\n')
  src = MedSegSource(dataset, 'gh')
  np.testing.assert_array_equal(src[0]['image'], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(src[1]['image'], rgba[..., :3])


def test_mask_suffix(dataset):
  _save(dataset / 'images' / 'testA_1.bmp', _rgb(5))
  _save(dataset / 'masks' / 'testA_1_anno.bmp', _glas_labels())
  (dataset / 'glas.txt').write_text('testA_1')
  src = MedSegSource(dataset, 'glas', mask_suffix='_anno')
  np.testing.assert_array_equal(src[0]['mask'] > 0, _glas_labels() > 0)


def test_read_split(tmp_path):
  p = tmp_path / 's.txt'
  p.write_text('\ufeffx\r\ny \n\n z')
  assert read_split(p) == ['x', 'y', 'z']


# ------------------------------------------------------------------------------------------------
# Construction-time errors.
# ------------------------------------------------------------------------------------------------


def test_missing_split_file(dataset):
  with pytest.raises(DatasetError, match='test.txt') as e:
    MedSegSource(dataset, 'test')
  assert e.value.kind == 'missing_split'
  assert 'train.txt' in str(e.value)  # lists what is there


def test_missing_root(tmp_path):
  with pytest.raises(DatasetError, match='nowhere'):
    MedSegSource(tmp_path / 'nowhere', 'train')


def test_missing_images_folder(dataset):
  (dataset / 'images').rename(dataset / 'imgs')
  with pytest.raises(DatasetError, match='images') as e:
    MedSegSource(dataset, 'train')
  assert e.value.kind == 'missing_folder'


def test_empty_split(dataset):
  (dataset / 'empty.txt').write_text('\n  \n\n')
  with pytest.raises(DatasetError, match='empty.txt') as e:
    MedSegSource(dataset, 'empty')
  assert e.value.kind == 'empty_split'


def test_duplicate_id(dataset):
  (dataset / 'dup.txt').write_text('a\nb\na\n')
  with pytest.raises(DatasetError, match='dup.txt') as e:
    MedSegSource(dataset, 'dup')
  assert "'a'" in str(e.value)


def test_id_without_image_or_mask(dataset):
  (dataset / 'bad.txt').write_text('a\nzzz_missing\n')
  with pytest.raises(DatasetError, match='zzz_missing') as e:
    MedSegSource(dataset, 'bad')
  assert 'image' in str(e.value) and 'bad.txt' in str(e.value)
  os.remove(dataset / 'masks' / 'b.png')
  with pytest.raises(DatasetError, match='no mask file') as e:
    MedSegSource(dataset, 'train')
  assert "'b'" in str(e.value)


def test_id_with_extension_gets_hint(dataset):
  (dataset / 'ext.txt').write_text('a.jpg\n')
  with pytest.raises(DatasetError, match='must not carry an extension'):
    MedSegSource(dataset, 'ext')


def test_ambiguous_basename(dataset):
  _save(dataset / 'images' / 'a.png', _rgb(0))
  with pytest.raises(DatasetError, match='a.png') as e:
    MedSegSource(dataset, 'train')
  assert 'a.jpg' in str(e.value) and e.value.kind == 'ambiguous_file'


# ------------------------------------------------------------------------------------------------
# Read-time errors.
# ------------------------------------------------------------------------------------------------


def _single(dataset: pathlib.Path, name: str, image: bytes | np.ndarray,
            mask: bytes | np.ndarray, ext: str = '.png') -> MedSegSource:
  for folder, content in (('images', image), ('masks', mask)):
    path = dataset / folder / f'{name}{ext}'
    if isinstance(content, bytes):
      path.write_bytes(content)
    else:
      _save(path, content)
  (dataset / f'{name}.txt').write_text(name)
  return MedSegSource(dataset, name)


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def test_truncated_image(dataset):
  data = _png_bytes(_rgb(9, 64, 64))
  src = _single(dataset, 'trunc', data[:len(data) // 2], np.zeros((64, 64), np.uint8))
  with pytest.raises(DatasetError, match='trunc.png') as e:
    src[0]
  assert e.value.kind == 'unreadable' and 'image' in str(e.value)


def test_not_an_image(dataset):
  src = _single(dataset, 'garbage', _rgb(1), b'this is not an image', ext='.jpg')
  with pytest.raises(DatasetError, match='garbage.jpg') as e:
    src[0]
  assert 'mask' in str(e.value)


def test_size_mismatch(dataset):
  src = _single(dataset, 'mism', _rgb(1), np.zeros((H + 1, W), np.uint8))
  with pytest.raises(DatasetError, match='mism.png') as e:
    src[0]
  assert e.value.kind == 'size_mismatch'
  assert f'{W}x{H}' in str(e.value) and f'{W}x{H + 1}' in str(e.value)


def test_colour_mask_rejected(dataset):
  src = _single(dataset, 'colour', _rgb(1), _rgb(2))
  with pytest.raises(DatasetError, match='colour.png') as e:
    src[0]
  assert 'grayscale' in str(e.value) and e.value.kind == 'bad_mask'


def test_gray_rgb_mask_accepted(dataset):
  disc = np.where(_disc(), 255, 0).astype(np.uint8)
  src = _single(dataset, 'grayrgb', _rgb(1), np.repeat(disc[..., None], 3, -1))
  np.testing.assert_array_equal(src[0]['mask'], disc)


def test_photo_as_mask_rejected(dataset):
  photo = np.random.default_rng(6).integers(0, 256, (H, W), dtype=np.uint8)
  src = _single(dataset, 'photo', _rgb(1), photo)
  with pytest.raises(DatasetError, match='photo.png') as e:
    src[0]
  assert e.value.kind == 'bad_mask'
  nonzero = MedSegSource(dataset, 'photo', binarize='nonzero')   # explicit rule: accepted
  np.testing.assert_array_equal(nonzero[0]['mask'] > 0, photo > 0)


def test_16bit_mask_rejected(dataset):
  src = _single(dataset, 'deep', _rgb(1), (_disc() * 65535).astype(np.uint16))
  with pytest.raises(DatasetError, match='deep.png') as e:
    src[0]
  assert '16' in str(e.value) and e.value.kind == 'bad_mask'


# ------------------------------------------------------------------------------------------------
# validate() and metadata.
# ------------------------------------------------------------------------------------------------


def test_validate_reports_every_problem_with_counts(dataset):
  data = _png_bytes(_rgb(9, H, W))
  (dataset / 'images' / 'trunc.png').write_bytes(data[:len(data) // 3])
  _save(dataset / 'masks' / 'trunc.png', np.zeros((H, W), np.uint8))
  _save(dataset / 'images' / 'mism.png', _rgb(1))
  _save(dataset / 'masks' / 'mism.png', np.zeros((H, W + 2), np.uint8))
  _save(dataset / 'images' / 'empty.png', _rgb(1))
  _save(dataset / 'masks' / 'empty.png', np.zeros((H, W), np.uint8))
  (dataset / 'all.txt').write_text('a\ntrunc\nb\nmism\nc\nempty')
  report = validate(MedSegSource(dataset, 'all', binarize='threshold'))
  assert report.num_examples == 6 and report.num_ok == 3 and not report.ok
  # c: a label mask whose foreground the 'threshold' rule would silently empty
  assert report.counts == {'unreadable': 1, 'size_mismatch': 1,
                           'label_mask_under_threshold_rule': 1}
  assert report.warnings['empty_mask'] == ['empty']
  text = report.summary()
  assert 'trunc.png' in text and 'mism.png' in text and '3/6' in text
  assert "binarize='nonzero'" in text and 'c.png' in text
  assert validate(MedSegSource(dataset, 'train')).ok


def test_datasets_metadata():
  assert set(DATASETS) == {'kvasir_seg', 'kvasir_sessile', 'glas', 'isic2016', 'isic2017'}
  for key, info in DATASETS.items():
    assert info.name == key
    assert sum(info.splits.values()) == info.num_examples, key
    for split in (info.train_split, info.val_split, info.test_split):
      assert split in info.splits
    assert info.binarize in medseg.BINARIZE_RULES
    assert 0 < info.paper['miou'] < info.paper['dice'] < 100
  assert DATASETS['kvasir_seg'].splits == {'train': 880, 'val': 120}
  assert DATASETS['isic2017'].splits == {'train': 2000, 'val': 150, 'test': 600}
  assert DATASETS['glas'].binarize == 'nonzero'
  assert DATASETS['kvasir_seg'].paper['miou'] == 84.6


def test_medseg_maker_fills_spec_info(dataset):
  spec = builder.make_spec(ml_collections.ConfigDict(dict(seed=0, data=dict(
      name='medseg', root=str(dataset), image_size=32))))
  assert spec.info == builder.dataset_info('medseg')
  assert spec.info.classes == ('background', 'foreground') and spec.info.ignore_index is None
