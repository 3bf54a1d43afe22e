"""PASCAL VOC 2012 (+SBD) and COCO 2014 WSSS sources, on fixtures in the official layouts."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from contrastjax.data.errors import DatasetError
from contrastjax.data.sources import voc

H, W = 24, 32                      # fixture image size (H x W)
TRAIN = ('2007_000032', '2007_000039', '2007_000063')
VAL = ('2008_000002', '2008_000003')
SBD_ONLY = ('2008_000008', '2011_003276')
TRAIN_AUG = TRAIN + SBD_ONLY
# Foreground classes per id (what the masks hold).
CLASSES = {'2007_000032': (1, 15), '2007_000039': (20,), '2007_000063': (8, 11, 12),
           '2008_000002': (15,), '2008_000003': (2, 7), '2008_000008': (13, 15),
           '2011_003276': (19,)}


def _mask(name: str) -> np.ndarray:
  """0 background, one rectangle per class with a 255 border, as VOC masks."""
  m = np.zeros((H, W), np.uint8)
  for k, cls in enumerate(CLASSES[name]):
    y0, x0 = 2 + 6 * k, 3 + 8 * k
    m[y0:y0 + 8, x0:x0 + 10] = 255
    m[y0 + 1:y0 + 7, x0 + 1:x0 + 9] = cls
  return m


def _image(name: str, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng([seed, int(name.replace('_', ''))])
  return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _save_palette(path: pathlib.Path, mask: np.ndarray) -> None:
  im = Image.fromarray(mask, 'L')
  im.putpalette(voc.VOC_PALETTE.tobytes())
  assert im.mode == 'P'
  im.save(path)


def _onehot(classes, num_foreground: int = 20) -> np.ndarray:
  v = np.zeros(num_foreground, np.float32)
  v[[c - 1 for c in classes]] = 1.0
  return v


def _png(path: pathlib.Path, array: np.ndarray, bitdepth: int, colortype: int) -> None:
  """Writes a PNG byte by byte (Pillow cannot write 16-bit RGB)."""
  h, w = array.shape[:2]
  dtype = '>u2' if bitdepth == 16 else 'u1'
  raw = b''.join(b'\x00' + array[y].astype(dtype).tobytes() for y in range(h))

  def chunk(tag, data):
    return (struct.pack('>I', len(data)) + tag + data
            + struct.pack('>I', zlib.crc32(tag + data) & 0xffffffff))

  ihdr = struct.pack('>IIBBBBB', w, h, bitdepth, colortype, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw))
                   + chunk(b'IEND', b''))


def make_voc(tmp: pathlib.Path) -> pathlib.Path:
  """``tmp/VOCdevkit/VOC2012`` in the official layout, with SBD masks, train_aug and ToCo's npy."""
  base = tmp / 'VOCdevkit' / 'VOC2012'
  for sub in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug', 'ImageSets/Segmentation',
              'Annotations', 'SegmentationObject'):
    (base / sub).mkdir(parents=True, exist_ok=True)
  for name in CLASSES:
    Image.fromarray(_image(name)).save(base / 'JPEGImages' / f'{name}.jpg', quality=95)
    Image.fromarray(_mask(name), 'L').save(base / 'SegmentationClassAug' / f'{name}.png')
    if name in TRAIN + VAL:
      _save_palette(base / 'SegmentationClass' / f'{name}.png', _mask(name))
  sets = base / 'ImageSets' / 'Segmentation'
  for split, ids in (('train', TRAIN), ('val', VAL), ('trainval', TRAIN + VAL),
                     ('train_aug', TRAIN_AUG)):
    (sets / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  # ToCo's datasets/voc/cls_labels_onehot.npy: np.save of {id: float32 [20]}.
  np.save(base / 'cls_labels_onehot.npy', {n: _onehot(c) for n, c in CLASSES.items()})
  return base


@pytest.fixture
def base(tmp_path):
  return make_voc(tmp_path)


def _expected_labels(name: str, num_classes: int = 21) -> np.ndarray:
  v = np.zeros(num_classes, np.float32)
  v[0] = 1.0
  v[list(CLASSES[name])] = 1.0
  return v


# ------------------------------------------------------------------------------------------------
# Classes, palette, reading.
# ------------------------------------------------------------------------------------------------


def test_classes_and_palette():
  assert len(voc.VOC_CLASSES) == 21 and voc.VOC_CLASSES[15] == 'person'
  pal = voc.color_map()
  assert pal.shape == (256, 3) and pal.dtype == np.uint8
  known = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 12: (64, 0, 128),
           15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
  for index, rgb in known.items():
    assert tuple(pal[index]) == rgb, (voc.VOC_CLASSES[index] if index < 21 else index)
  assert len({tuple(c) for c in pal[:21]}) == 21
  assert len(voc.COCO_CLASSES) == 81 and len(voc.COCO_CATEGORY_IDS) == 80
  assert voc.COCO_CATEGORY_IDS[-1] == 90 and 12 not in voc.COCO_CATEGORY_IDS


def test_training_source_has_image_level_labels_only(base, tmp_path):
  src = voc.VOCSource(base, 'train_aug')
  assert src.names == TRAIN_AUG and len(src) == 5
  assert src.cls_labels_path == str(base / 'cls_labels_onehot.npy')
  assert src.mask_paths is None
  for i, name in enumerate(TRAIN_AUG):
    ex = src[i]
    # No pixel labels at all: only the image, the label vector and the name.
    assert set(ex) == {'image', 'labels', 'name'}
    assert ex['name'] == name
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (H, W, 3)
    np.testing.assert_array_equal(
        ex['image'], np.asarray(Image.open(base / 'JPEGImages' / f'{name}.jpg').convert('RGB')))
    assert ex['labels'].dtype == np.float32 and ex['labels'].shape == (21,)
    np.testing.assert_array_equal(ex['labels'], _expected_labels(name))
  # Reading works without any mask folder.
  shutil.rmtree(base / 'SegmentationClassAug')
  shutil.rmtree(base / 'SegmentationClass')
  assert voc.VOCSource(base, 'train_aug')[4]['name'] == '2011_003276'
  # The root may be the folder above VOCdevkit, VOCdevkit, or VOC2012.
  for root in (tmp_path, tmp_path / 'VOCdevkit'):
    assert voc.VOCSource(root, 'train').base == str(base)


def test_evaluation_source_reads_palette_masks_exactly(base):
  src = voc.VOCSource(base, 'val', with_masks=True)
  assert src.mask_paths[0].endswith('VOC2012/SegmentationClass/2008_000002.png')
  assert Image.open(src.mask_paths[0]).mode == 'P'
  for i, name in enumerate(VAL):
    ex = src[i]
    assert set(ex) == {'image', 'labels', 'label', 'name'}
    assert ex['label'].dtype == np.uint8 and ex['label'].shape == (H, W)
    np.testing.assert_array_equal(ex['label'], _mask(name))
    np.testing.assert_array_equal(ex['labels'], _expected_labels(name))
  # train_aug masks come from SegmentationClassAug ('L').
  aug = voc.VOCSource(base, 'train_aug', with_masks=True)
  assert aug.mask_paths[3].endswith('SegmentationClassAug/2008_000008.png')
  np.testing.assert_array_equal(aug[3]['label'], _mask('2008_000008'))
  # Same values whichever mask folder is used for ids in both.
  seg = voc.VOCSource(base, 'train', with_masks=True)
  seg_aug = voc.VOCSource(base, 'train', with_masks=True, mask_dir='SegmentationClassAug')
  for i in range(3):
    np.testing.assert_array_equal(seg[i]['label'], seg_aug[i]['label'])
  report = voc.validate(src)
  assert report.ok and report.num_ok == 2 and not report.warnings


def test_labels_from_masks_equal_labels_from_npy(base, tmp_path):
  from_npy = voc.VOCSource(base, 'train_aug')
  from_masks = voc.VOCSource(base, 'train_aug', labels='masks')
  assert from_masks.cls_labels_path is None
  for i in range(len(from_npy)):
    a, b = from_npy[i], from_masks[i]
    np.testing.assert_array_equal(a['labels'], b['labels'])
    assert 'label' not in b                         # masks read for the labels, not returned
  # ToCo's rule on a raw mask: 0 and 255 are not classes.
  m = np.array([[0, 255, 3], [3, 20, 255]], np.uint8)
  np.testing.assert_array_equal(np.flatnonzero(voc.labels_from_mask(m, 21)), [0, 3, 20])
  # IRN's voc12/cls_labels.npy: the same vectors keyed by int('2007_000032'.replace('_', '')).
  irn = tmp_path / 'irn_cls_labels.npy'
  np.save(irn, {int(n.replace('_', '')): _onehot(c) for n, c in CLASSES.items()})
  # DeepLab's two-column list, kept outside the dataset.
  deeplab = tmp_path / 'train_aug.txt'
  deeplab.write_text(''.join(f'/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n'
                             for n in TRAIN_AUG))
  other = voc.VOCSource(base, 'train_aug', split_file=deeplab, cls_labels_path=irn)
  assert other.names == TRAIN_AUG
  for i in range(len(other)):
    np.testing.assert_array_equal(other[i]['labels'], from_npy[i]['labels'])
  # Consistency check of validate: the npy and the masks agree here.
  report = voc.validate(voc.VOCSource(base, 'train_aug', with_masks=True))
  assert report.ok and 'cls_label_mask_mismatch' not in report.warnings


# ------------------------------------------------------------------------------------------------
# Bad input: one DatasetError per problem, naming the file or key.
# ------------------------------------------------------------------------------------------------


def test_missing_root_folders_and_split_lists(base, tmp_path):
  with pytest.raises(DatasetError, match=r'VOC root .*nowhere does not exist') as e:
    voc.VOCSource(tmp_path / 'nowhere', 'train')
  assert e.value.kind == 'missing_folder'
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DatasetError, match=r'has no JPEGImages folder') as e:
    voc.VOCSource(tmp_path / 'empty', 'train')
  assert e.value.kind == 'missing_folder'
  sets = base / 'ImageSets' / 'Segmentation'
  with pytest.raises(DatasetError, match=r"test\.txt does not exist \(split='test'\); found "
                     r"\['train.txt', 'train_aug.txt', 'trainval.txt', 'val.txt'\]") as e:
    voc.VOCSource(base, 'test')
  assert e.value.kind == 'missing_split'
  (sets / 'train_aug.txt').unlink()
  with pytest.raises(DatasetError, match=r'train_aug\.txt is not part of the VOC tar'):
    voc.VOCSource(base, 'train_aug')
  (sets / 'empty.txt').write_text('\n  \n')
  with pytest.raises(DatasetError, match=r'empty\.txt lists no ids') as e:
    voc.VOCSource(base, 'empty')
  assert e.value.kind == 'empty_split'
  (sets / 'dup.txt').write_text('2007_000032\n2007_000039\n2007_000032\n')
  with pytest.raises(DatasetError, match=r"dup\.txt lists 1 id\(s\) more than once "
                     r"\(first: \['2007_000032'\]\)") as e:
    voc.VOCSource(base, 'dup')
  assert e.value.kind == 'duplicate_id'
  # The same id written as a plain id and as a DeepLab path is a duplicate too.
  (sets / 'dup2.txt').write_text('2007_000032\n/JPEGImages/2007_000032.jpg x.png\n')
  with pytest.raises(DatasetError, match=r'dup2\.txt lists 1 id'):
    voc.VOCSource(base, 'dup2')
  # The mask folder is needed only when masks are read.
  shutil.rmtree(base / 'SegmentationClassAug')
  with pytest.raises(DatasetError, match=r'SegmentationClassAug does not exist; .*'
                     r'SegmentationClassAug\.zip') as e:
    voc.VOCSource(base, 'trainval', labels='masks', mask_dir='SegmentationClassAug')
  assert e.value.kind == 'missing_folder'
  with pytest.raises(ValueError, match="labels='pixels'"):
    voc.VOCSource(base, 'train', labels='pixels')


def test_missing_image_mask_and_label_entries(base, tmp_path):
  (base / 'JPEGImages' / '2007_000039.jpg').unlink()
  with pytest.raises(DatasetError, match=r"1 id\(s\) of .*train\.txt have no image file "
                     r".*JPEGImages/<id>\.jpg \(first: \['2007_000039'\]\)") as e:
    voc.VOCSource(base, 'train')
  assert e.value.kind == 'missing_file'
  Image.fromarray(_image('2007_000039')).save(base / 'JPEGImages' / '2007_000039.jpg')
  (base / 'SegmentationClass' / '2008_000003.png').unlink()
  voc.VOCSource(base, 'val')                      # no masks needed
  with pytest.raises(DatasetError, match=r"have no mask file .*SegmentationClass/<id>\.png "
                     r"\(first: \['2008_000003'\]\)"):
    voc.VOCSource(base, 'val', with_masks=True)
  # cls-label file: absent, lacking an id, malformed.
  npy = base / 'cls_labels_onehot.npy'
  labels = {n: _onehot(c) for n, c in CLASSES.items()}
  del labels['2011_003276']
  np.save(npy, labels)
  with pytest.raises(DatasetError, match=r"cls-label file .*cls_labels_onehot\.npy lacks 1 of "
                     r"the 5 ids of .*train_aug\.txt \(first: \['2011_003276'\]\)") as e:
    voc.VOCSource(base, 'train_aug')
  assert e.value.kind == 'missing_label'
  labels['2011_003276'] = np.ones(21, np.float32)          # background included: wrong length
  np.save(npy, labels)
  with pytest.raises(DatasetError, match=r"1 malformed label vector\(s\) \(first: "
                     r"\[\"'2011_003276': shape \(21,\)") as e:
    voc.VOCSource(base, 'train_aug')
  assert e.value.kind == 'bad_cls_labels'
  labels['2011_003276'] = _onehot((19,)) * 2
  np.save(npy, labels)
  with pytest.raises(DatasetError, match=r"expected 20 values in \{0, 1\}"):
    voc.VOCSource(base, 'train_aug')
  np.save(npy, np.zeros((5, 20)))
  with pytest.raises(DatasetError, match=r'holds an array float64 \(5, 20\); expected a NumPy '
                     r'file with a pickled dict') as e:
    voc.VOCSource(base, 'train_aug')
  assert e.value.kind == 'bad_cls_labels'
  npy.write_bytes(b'not a npy file')
  with pytest.raises(DatasetError, match=r'cannot read cls-label file') as e:
    voc.VOCSource(base, 'train_aug')
  assert e.value.kind == 'unreadable'
  npy.unlink()
  with pytest.raises(DatasetError, match=r"no cls-label file was found .*cls_labels\.npy") as e:
    voc.VOCSource(base, 'train_aug')
  assert e.value.kind == 'missing_file'
  assert voc.VOCSource(base, 'train_aug', labels='masks')[0]['labels'][15] == 1.0


def test_bad_masks_sizes_and_empty_images(base):
  aug = base / 'SegmentationClassAug'
  bad = _mask('2007_000032')
  bad[0, 0] = 21
  Image.fromarray(bad, 'L').save(aug / '2007_000032.png')
  Image.fromarray(np.zeros((H, W - 1), np.uint8), 'L').save(aug / '2007_000039.png')
  Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(aug / '2007_000063.png')
  empty = np.zeros((H, W), np.uint8)
  empty[:3] = 255
  Image.fromarray(empty, 'L').save(aug / '2008_000008.png')
  _png(aug / '2011_003276.png', np.full((H, W), 3, np.uint16), 16, 0)
  src = voc.VOCSource(base, 'train_aug', labels='masks')
  with pytest.raises(DatasetError, match=r'2007_000032\.png has values \[21\] \(1 pixels\) '
                     r'outside the class set; expected 0\.\.20 or 255') as e:
    src[0]
  assert e.value.kind == 'bad_mask'
  with pytest.raises(DatasetError, match=r'2007_000039\.jpg is 32x24 \(WxH\) but mask '
                     r'.*2007_000039\.png is 31x24; expected equal sizes') as e:
    src[1]
  assert e.value.kind == 'size_mismatch'
  with pytest.raises(DatasetError, match=r'2007_000063\.png has mode RGB; expected an 8-bit '
                     r'single-channel PNG of class indices'):
    src[2]
  with pytest.raises(DatasetError, match=r'VOC image 2008_000008 has no foreground class '
                     r'\(mask file .*2008_000008\.png holds only background/ignored pixels\)'
                     r'.*pass allow_empty=True') as e:
    src[3]
  assert e.value.kind == 'no_foreground'
  with pytest.raises(DatasetError, match=r'2011_003276\.png has mode I;16'):
    src[4]
  lenient = voc.VOCSource(base, 'train_aug', labels='masks', allow_empty=True)
  np.testing.assert_array_equal(lenient[3]['labels'], np.eye(21, dtype=np.float32)[0])
  # From the npy: an all-zero vector.
  labels = {n: _onehot(c) for n, c in CLASSES.items()}
  labels['2007_000039'] = np.zeros(20, np.float32)
  np.save(base / 'cls_labels_onehot.npy', labels)
  with pytest.raises(DatasetError, match=r"has no foreground class \(the label vector of "
                     r"'2007_000039' in .*cls_labels_onehot\.npy has no class set\)"):
    voc.VOCSource(base, 'train')[1]
  assert voc.VOCSource(base, 'train', allow_empty=True)[1]['labels'].sum() == 1.0
  report = voc.validate(src)
  assert report.counts == {'bad_mask': 3, 'size_mismatch': 1, 'no_foreground': 1}
  summary = report.summary()
  assert '0/5 examples OK, 5 with problems' in summary and 'error bad_mask: 3' in summary


def test_bad_images_and_conversions(base):
  jpg = base / 'JPEGImages'
  data = (jpg / '2007_000032.jpg').read_bytes()
  (jpg / '2007_000032.jpg').write_bytes(data[:len(data) // 2])            # truncated
  (jpg / '2007_000039.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  _png(jpg / '2007_000063.jpg', np.full((H, W, 3), 1000, np.uint16), 16, 2)   # 16-bit RGB
  gray = _image('2008_000002')[..., 0]
  Image.fromarray(gray, 'L').save(jpg / '2008_000002.jpg', quality=95)
  rgba = np.concatenate([_image('2008_000003'), np.full((H, W, 1), 7, np.uint8)], -1)
  Image.fromarray(rgba, 'RGBA').save(jpg / '2008_000003.jpg', format='PNG')  # PNG bytes in .jpg
  train = voc.VOCSource(base, 'train')
  with pytest.raises(DatasetError, match=r'cannot decode image file .*2007_000032\.jpg '
                     r'\(OSError: image file is truncated') as e:
    train[0]
  assert e.value.kind == 'unreadable'
  with pytest.raises(DatasetError, match=r'cannot decode image file .*2007_000039\.jpg'):
    train[1]
  with pytest.raises(DatasetError, match=r'2007_000063\.jpg has 16 bits per channel \(mode RGB, '
                     r'raw RGB;16B\); expected an 8-bit') as e:
    train[2]
  assert e.value.kind == 'bad_image'
  val = voc.VOCSource(base, 'val', with_masks=True)
  ex = val[0]
  assert ex['image'].shape == (H, W, 3)
  ref = np.asarray(Image.open(jpg / '2008_000002.jpg'))
  for c in range(3):
    np.testing.assert_array_equal(ex['image'][..., c], ref)
  np.testing.assert_array_equal(val[1]['image'], _image('2008_000003'))   # alpha dropped
  report = voc.validate(val)
  assert report.ok
  assert report.warnings == {'grayscale_to_rgb': ['2008_000002'],
                             'alpha_dropped': ['2008_000003']}
  assert voc.validate(train).counts == {'unreadable': 2, 'bad_image': 1}


def test_validate_counts_and_mask_label_mismatch(base):
  labels = {n: _onehot(c) for n, c in CLASSES.items()}
  labels['2008_000002'] = _onehot((15, 9))           # a chair the mask does not show
  np.save(base / 'cls_labels_onehot.npy', labels)
  report = voc.validate(voc.VOCSource(base, 'val', with_masks=True))
  assert report.ok and report.warnings == {'cls_label_mask_mismatch': ['2008_000002']}
  assert 'warning cls_label_mask_mismatch: 1' in report.summary()


# ------------------------------------------------------------------------------------------------
# COCO 2014 (ToCo layout).
# ------------------------------------------------------------------------------------------------

COCO_TRAIN = {'COCO_train2014_000000000009': (1, 80), 'COCO_train2014_000000000025': (25,),
              'COCO_train2014_000000000030': (3, 45, 64)}
COCO_VAL = {'COCO_val2014_000000000042': (17,), 'COCO_val2014_000000000073': (4, 80)}


def make_coco(tmp: pathlib.Path, image_set_names=('train2014', 'val2014')) -> pathlib.Path:
  root = tmp / 'MSCOCO'
  all_labels = {}
  for folder, items in zip(image_set_names, (COCO_TRAIN, COCO_VAL)):
    (root / 'JPEGImages' / folder).mkdir(parents=True)
    (root / 'SegmentationClass' / folder).mkdir(parents=True)
    for k, (name, classes) in enumerate(items.items()):
      rgb = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
      Image.fromarray(rgb).save(root / 'JPEGImages' / folder / f'{name}.jpg')
      m = np.zeros((H, W), np.uint8)
      for j, c in enumerate(classes):
        m[j * 6:j * 6 + 5, j * 7:j * 7 + 9] = c
      m[-1, :] = 255
      Image.fromarray(m, 'L').save(root / 'SegmentationClass' / folder / f'{name}.png')
      all_labels[name] = _onehot(classes, 80)
  (root / 'train.txt').write_text('\n'.join(COCO_TRAIN))
  (root / 'val.txt').write_text('\n'.join(COCO_VAL))
  np.save(root / 'cls_labels_onehot.npy', all_labels)
  return root


def test_coco_reads_toco_layout(tmp_path):
  root = make_coco(tmp_path)
  train = voc.COCOSegSource(root, 'train')
  assert train.names == tuple(COCO_TRAIN) and train.image_set == 'train2014'
  masks = voc.COCOSegSource(root, 'train', labels='masks')
  for i, (name, classes) in enumerate(COCO_TRAIN.items()):
    ex = train[i]
    assert set(ex) == {'image', 'labels', 'name'} and ex['labels'].shape == (81,)
    expect = np.zeros(81, np.float32)
    expect[[0, *classes]] = 1.0
    np.testing.assert_array_equal(ex['labels'], expect)
    np.testing.assert_array_equal(masks[i]['labels'], expect)
  val = voc.COCOSegSource(root, 'val', with_masks=True)
  ex = val[1]
  assert ex['label'].dtype == np.uint8 and set(np.unique(ex['label'])) == {0, 4, 80, 255}
  assert voc.validate(val).ok and voc.validate(train).ok
  # IRN-style keys: the integer image id.
  np.save(tmp_path / 'irn.npy', {voc.coco_int_key(n): _onehot(c, 80)
                                 for n, c in {**COCO_TRAIN, **COCO_VAL}.items()})
  irn = voc.COCOSegSource(root, 'val', cls_labels_path=tmp_path / 'irn.npy')
  np.testing.assert_array_equal(irn[1]['labels'], ex['labels'])
  # Bad inputs.
  m = np.zeros((H, W), np.uint8)
  m[0, 0] = 81
  Image.fromarray(m, 'L').save(root / 'SegmentationClass' / 'val2014' /
                               'COCO_val2014_000000000042.png')
  with pytest.raises(DatasetError, match=r'has values \[81\] .*expected 0\.\.80 or 255'):
    val[0]
  with pytest.raises(DatasetError, match=r"no split file for split='val_part'"):
    voc.COCOSegSource(root, 'val_part')
  with pytest.raises(ValueError, match="pass image_set="):
    voc.COCOSegSource(root, 'test')
  shutil.rmtree(root / 'SegmentationClass' / 'train2014')
  with pytest.raises(DatasetError, match=r'COCO mask folder .*SegmentationClass/train2014 does '
                     'not exist'):
    voc.COCOSegSource(root, 'train', with_masks=True)
  with pytest.raises(DatasetError, match=r'COCO root .*nowhere does not exist'):
    voc.COCOSegSource(tmp_path / 'nowhere', 'train')


def test_coco_readme_folder_names(tmp_path):
  root = make_coco(tmp_path, image_set_names=('train', 'val'))
  src = voc.COCOSegSource(root, 'val', with_masks=True)
  assert src.image_set == 'val' and src.mask_paths[0].endswith('SegmentationClass/val/'
                                                               'COCO_val2014_000000000042.png')
  assert src[0]['labels'][17] == 1.0


def _uncompressed_rle(m: np.ndarray) -> dict:
  """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
  flat = m.T.ravel().astype(np.uint8)
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  return {'size': list(m.shape), 'counts': counts}


def _instances_json(path: pathlib.Path, mask_api=None) -> dict[str, np.ndarray]:
  """instances_val2014.json for COCO_VAL; returns the expected class masks."""
  cats = [{'id': c, 'name': n, 'supercategory': 'x'}
          for c, n in zip(voc.COCO_CATEGORY_IDS, voc.COCO_CLASSES[1:])]
  images, anns, expected = [], [], {}
  big = np.zeros((H, W), np.uint8)
  big[2:20, 2:30] = 1
  small = np.zeros((H, W), np.uint8)
  small[5:10, 5:12] = 1
  # 42: one crowd-free person (category 18 = class 17 'dog') as uncompressed RLE.
  images.append({'id': 42, 'file_name': 'COCO_val2014_000000000042.jpg', 'height': H, 'width': W})
  anns.append({'id': 1, 'image_id': 42, 'category_id': 18, 'iscrowd': 0,
               'area': float(small.sum()), 'segmentation': _uncompressed_rle(small),
               'bbox': [0, 0, 1, 1]})
  expected['COCO_val2014_000000000042'] = small * 17
  # ... and a second dog as a polygon (x, y pairs) covering columns 20..30, rows 12..22.
  anns.append({'id': 4, 'image_id': 42, 'category_id': 18, 'iscrowd': 0, 'area': 100.0,
               'segmentation': [[20, 12, 30, 12, 30, 22, 20, 22]], 'bbox': [20, 12, 10, 10]})
  # 73: a big car (category 4 = class 4 'motorcycle') listed first, a small toothbrush (90 ->
  # class 80) overlapping it, compressed RLE; the smaller instance wins where they overlap.
  images.append({'id': 73, 'file_name': 'COCO_val2014_000000000073.jpg', 'height': H, 'width': W})
  rle = mask_api.encode(np.asfortranarray(small))
  rle['counts'] = rle['counts'].decode('ascii')
  anns.append({'id': 2, 'image_id': 73, 'category_id': 4, 'iscrowd': 0,
               'area': float(big.sum()), 'segmentation': _uncompressed_rle(big),
               'bbox': [0, 0, 1, 1]})
  anns.append({'id': 3, 'image_id': 73, 'category_id': 90, 'iscrowd': 1,
               'area': float(small.sum()), 'segmentation': rle, 'bbox': [0, 0, 1, 1]})
  expected['COCO_val2014_000000000073'] = np.where(small == 1, 80, big * 4).astype(np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
  return expected


def test_coco_instances_need_pycocotools(tmp_path, monkeypatch):
  root = make_coco(tmp_path)
  monkeypatch.setitem(sys.modules, 'pycocotools', None)       # import fails
  with pytest.raises(ImportError, match=r'pip install pycocotools'):
    voc.COCOSegSource(root, 'val', labels='instances')


def test_coco_instances_labels_and_rendered_masks(tmp_path):
  mask_api = pytest.importorskip('pycocotools.mask')
  root = make_coco(tmp_path)
  expected = _instances_json(root / 'annotations' / 'instances_val2014.json', mask_api)
  src = voc.COCOSegSource(root, 'val', labels='instances', with_masks=True)
  png = voc.COCOSegSource(root, 'val')
  polygon = np.zeros((H, W), bool)
  polygon[11:24, 19:32] = True                       # the polygon and a 1-pixel margin
  for i, name in enumerate(COCO_VAL):
    ex = src[i]
    if i == 0:
      assert (ex['label'][13:21, 21:29] == 17).all() and 80 <= (ex['label'] * polygon).sum() / 17
      np.testing.assert_array_equal(ex['label'][~polygon], expected[name][~polygon])
    else:
      np.testing.assert_array_equal(ex['label'], expected[name])
    np.testing.assert_array_equal(ex['labels'], png[i]['labels'])   # same classes as the npy
  assert voc.validate(src).ok
  (root / 'val.txt').write_text('COCO_val2014_000000000042\nCOCO_val2014_000000000099\n')
  Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
      root / 'JPEGImages' / 'val2014' / 'COCO_val2014_000000000099.jpg')
  with pytest.raises(DatasetError, match=r"instance annotations .*instances_val2014\.json lack 1 "
                     r"of the 2 ids .*\['COCO_val2014_000000000099'\]") as e:
    voc.COCOSegSource(root, 'val', labels='instances')
  assert e.value.kind == 'missing_label'
