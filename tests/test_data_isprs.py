"""ISPRS tiling tool (official zips -> 512 crops + split lists) and the tiled-dataset reader."""

from __future__ import annotations

import io
import math
import pathlib
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastjax.data import builder
from contrastjax.data.sources import isprs
from contrastjax.data.tools import isprs_tiles
from contrastjax.data.errors import DatasetError

H, W, CROP, STRIDE = 20, 24, 8, 4
COLOURS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0),
           (255, 0, 0)]


def _tif(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='TIFF')
  return buf.getvalue()


def _colour_label(seed: int, h: int = H, w: int = W) -> np.ndarray:
  """Colour-coded label: the six class colours in 4x4 blocks, black (boundary) stripes."""
  rng = np.random.default_rng(seed)
  idx = np.kron(rng.integers(0, 6, (h // 4 + 1, w // 4 + 1)), np.ones((4, 4), int))[:h, :w]
  rgb = np.asarray(COLOURS, np.uint8)[idx]
  rgb[::5] = 0
  return rgb


def _image(seed: int, h: int = H, w: int = W) -> np.ndarray:
  return np.random.default_rng(100 + seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _zip(path: pathlib.Path, members: dict[str, bytes]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in members.items():
      zf.writestr(name, data)


POTSDAM_TILES = ('2_10', '6_7', '2_13', '9_9')   # 2 train, 1 val, 1 in neither list


def make_potsdam(src: pathlib.Path, *, sizes: dict[str, tuple[int, int]] | None = None):
  """The official Potsdam zips with tiny tiles."""
  sizes = sizes or {}
  rgb, irrg, lab = {}, {}, {}
  for k, t in enumerate(POTSDAM_TILES):
    h, w = sizes.get(t, (H, W))
    img = _image(k, h, w)
    rgb[f'2_Ortho_RGB/top_potsdam_{t}_RGB.tif'] = _tif(img)
    irrg[f'3_Ortho_IRRG/top_potsdam_{t}_IRRG.tif'] = _tif(img[..., ::-1].copy())
    lab[f'top_potsdam_{t}_label_noBoundary.tif'] = _tif(_colour_label(k, h, w))
  _zip(src / '2_Ortho_RGB.zip', rgb)
  _zip(src / '3_Ortho_IRRG.zip', irrg)
  _zip(src / '5_Labels_all_noBoundary.zip', lab)
  return src


def make_vaihingen(src: pathlib.Path):
  """The official Vaihingen zips: images under top/ (with the participants' colour labels
  beside them, which must not be taken for images) and the eroded COMPLETE labels."""
  top, lab = {}, {}
  for k, area in enumerate((1, 2, 9)):
    top[f'top/top_mosaic_09cm_area{area}.tif'] = _tif(_image(k))
    top[f'gts_for_participants/top_mosaic_09cm_area{area}.tif'] = _tif(_colour_label(k))
    lab[f'top_mosaic_09cm_area{area}_noBoundary.tif'] = _tif(_colour_label(k))
  _zip(src / 'ISPRS_semantic_labeling_Vaihingen.zip', top)
  _zip(src / 'ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip', lab)
  return src


def _reference_boxes(h, w, cs, ss):
  """mmseg's clip_big_image box computation, transcribed independently (with duplicates)."""
  rows = math.ceil((h - cs) / ss)
  rows = rows if rows * ss + cs >= h else rows + 1
  cols = math.ceil((w - cs) / ss)
  cols = cols if cols * ss + cs >= w else cols + 1
  x, y = np.meshgrid(np.arange(cols + 1), np.arange(rows + 1))
  xmin, ymin = (x * cs).ravel(), (y * cs).ravel()
  xmin = xmin + np.where(xmin + cs > w, w - xmin - cs, 0)
  ymin = ymin + np.where(ymin + cs > h, h - ymin - cs, 0)
  return [tuple(int(v) for v in b) for b in
          np.stack([xmin, ymin, np.minimum(xmin + cs, w), np.minimum(ymin + cs, h)], 1)]


@pytest.mark.parametrize('h,w,cs,ss', [(20, 24, 8, 4), (6000, 6000, 512, 256),
                                       (2557, 1887, 512, 256), (512, 512, 512, 256)])
def test_crop_boxes_match_reference(h, w, cs, ss):
  ref = _reference_boxes(h, w, cs, ss)
  ours = isprs_tiles.crop_boxes(h, w, cs, ss)
  assert ours == list(dict.fromkeys(ref))              # same boxes, duplicates written once
  assert all(x1 - x0 == cs and y1 - y0 == cs for x0, y0, x1, y1 in ours)
  if (h, w) == (6000, 6000):
    assert len(ours) == 144                            # 12 x 12: stride 256 has no effect
  overlapping = isprs_tiles.crop_boxes(h, w, cs, ss, grid='stride')
  assert len(overlapping) >= len(ours)
  with pytest.raises(DatasetError, match=r'tile t\.tif is 7x9 \(WxH\), smaller than the 8x8'):
    isprs_tiles.crop_boxes(9, 7, 8, 4, tile='t.tif')


def test_colour_to_label_exact_and_counts_off_colours():
  rgb = np.array([[c for c in COLOURS] + [(0, 0, 0), (0, 170, 0)]], np.uint8)
  lab, off = isprs_tiles.colour_to_label(rgb)
  np.testing.assert_array_equal(lab, [[1, 2, 3, 4, 5, 6, 0, 0]])
  assert off == 1      # (0, 170, 0): the reference's 2B+3G+4R code would alias it to blue


@pytest.mark.parametrize('modality', ['irrg', 'rgb'])
def test_potsdam_tiling_end_to_end(tmp_path, modality):
  src = make_potsdam(tmp_path / 'raw')
  dst = tmp_path / f'Potsdam_{modality.upper()}_DA'
  logs = []
  rep = isprs_tiles.tile_dataset(str(src), str(dst), 'potsdam', modality=modality, crop=CROP,
                                 stride=STRIDE, log=logs.append)
  n = len(isprs_tiles.crop_boxes(H, W, CROP, STRIDE))
  assert rep.tiles == {'train': ['2_10', '6_7'], 'val': ['2_13']}
  assert rep.skipped_tiles == ['9_9'] and rep.crops == {'train': 2 * n, 'val': n}
  train = (dst / 'train.txt').read_text().split()
  assert len(train) == 2 * n and '2_10_0_0_8_8' in train and '6_7_16_12_24_20' in train
  # Crops hold the tile's pixels in the file's channel order, labels the class ids.
  img = np.asarray(Image.open(dst / 'img_dir' / 'train' / '2_10_8_8_16_16.png'))
  full = _image(0)
  np.testing.assert_array_equal(img, full[8:16, 8:16] if modality == 'rgb'
                                else full[8:16, 8:16, ::-1])
  lab = np.asarray(Image.open(dst / 'ann_dir' / 'train' / '2_10_8_8_16_16.png'))
  np.testing.assert_array_equal(lab, isprs_tiles.colour_to_label(_colour_label(0))[0][8:16, 8:16])
  # The reader: reduce_zero_label, split files.
  src_train = isprs.ISPRSSource(dst, 'train')
  assert len(src_train) == 2 * n
  ex = src_train[src_train.names.index('2_10_8_8_16_16')]
  np.testing.assert_array_equal(ex['label'], np.where(lab == 0, 255, lab.astype(int) - 1))


def test_vaihingen_tiling_and_isprs_maker(tmp_path):
  make_potsdam(tmp_path / 'raw_p')
  make_vaihingen(tmp_path / 'raw_v')
  data = tmp_path / 'data'
  assert isprs_tiles.main(['--dataset=potsdam', f'--src={tmp_path / "raw_p"}',
                           f'--dst={data / "Potsdam_IRRG_DA"}', f'--crop={CROP}',
                           f'--stride={STRIDE}']) == 0
  rep = isprs_tiles.tile_dataset(str(tmp_path / 'raw_v'), str(data / 'Vaihingen_IRRG_DA'),
                                 'vaihingen', crop=CROP, stride=STRIDE, log=lambda s: None)
  assert rep.tiles == {'train': ['area1'], 'val': ['area2']} and rep.skipped_tiles == ['area9']
  img = np.asarray(Image.open(data / 'Vaihingen_IRRG_DA' / 'img_dir' / 'val' /
                              'area2_0_0_8_8.png'))
  np.testing.assert_array_equal(img, _image(1)[:8, :8])     # from top/, not the colour labels
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(
      name='isprs', root=str(data), source='Potsdam_IRRG_DA', target='Vaihingen_IRRG_DA',
      img_scale=(CROP, CROP), crop_size=(CROP, CROP))))
  inputs = builder.build(cfg, local_batch_size=2, local_eval_batch_size=4)
  assert sorted(inputs.spec.sources) == ['source_val', 'train', 'val']
  assert inputs.spec.info == builder.dataset_info('isprs')
  assert inputs.spec.info.classes == isprs.CLASSES and inputs.spec.info.num_classes == 6
  n = len(isprs_tiles.crop_boxes(H, W, CROP, STRIDE))
  assert inputs.num_train == (2 * n) * n
  batch = next(iter(inputs.train))
  assert batch['source']['image'].shape == (2, CROP, CROP, 3)
  assert set(np.unique(batch['source']['label'])) <= set(range(6)) | {255}
  ev = next(iter(inputs.eval_batches('val')))
  assert ev['label'].shape == (4, CROP, CROP)
  with pytest.raises(DatasetError, match=r'config.data.target=.*Vaihingen_RGB_DA does not exist'):
    cfg.data.target = 'Vaihingen_RGB_DA'
    builder.make_spec(cfg)


def test_tiling_errors_name_the_tile(tmp_path, capsys):
  # A tile smaller than the crop.
  src = make_potsdam(tmp_path / 'small', sizes={'6_7': (6, 24)})
  with pytest.raises(DatasetError, match=r'top_potsdam_6_7_IRRG\.tif is 24x6 \(WxH\), smaller'):
    isprs_tiles.tile_dataset(str(src), str(tmp_path / 'o1'), 'potsdam', crop=CROP,
                             stride=STRIDE, log=lambda s: None)
  # Image and label of different sizes.
  src = make_potsdam(tmp_path / 'mismatch')
  lab = {f'top_potsdam_{t}_label_noBoundary.tif': _tif(_colour_label(0, H + 4 * (t == '2_13'), W))
         for t in POTSDAM_TILES}
  _zip(src / '5_Labels_all_noBoundary.zip', lab)
  with pytest.raises(DatasetError, match=r'label tile .*top_potsdam_2_13_label_noBoundary\.tif '
                                         r'is 24x24.*expected equal sizes'):
    isprs_tiles.tile_dataset(str(src), str(tmp_path / 'o2'), 'potsdam', crop=CROP,
                             stride=STRIDE, log=lambda s: None)
  # A tile without its label; no label zip at all; the CLI reports and returns 1.
  del lab['top_potsdam_6_7_label_noBoundary.tif']
  _zip(src / '5_Labels_all_noBoundary.zip', lab)
  with pytest.raises(DatasetError, match=r"\['6_7'\] have an image but no label .*"
                                         r'top_potsdam_6_7_IRRG\.tif'):
    isprs_tiles.find_tiles(str(src), 'potsdam')
  (src / '5_Labels_all_noBoundary.zip').unlink()
  assert isprs_tiles.main(['--dataset=potsdam', f'--src={src}', f'--dst={tmp_path / "o3"}']) == 1
  assert 'no potsdam label tile found' in capsys.readouterr().err
  with pytest.raises(DatasetError, match=r'5_Labels_all\.zip'):
    isprs_tiles.find_tiles(str(src), 'potsdam', labels='full')
  # Two copies of one tile (zip and unzipped).
  src = make_potsdam(tmp_path / 'dups')
  (src / 'x').mkdir()
  (src / 'x' / 'top_potsdam_2_10_IRRG.tif').write_bytes(_tif(_image(0)))
  with pytest.raises(DatasetError, match=r'more than one image file .*2_10'):
    isprs_tiles.find_tiles(str(src), 'potsdam')


def test_isprs_reader_errors(tmp_path):
  root = tmp_path / 'Potsdam_IRRG_DA'
  for split in ('train', 'val'):
    (root / 'img_dir' / split).mkdir(parents=True)
    (root / 'ann_dir' / split).mkdir(parents=True)
  Image.fromarray(_image(0, 8, 8)).save(root / 'img_dir' / 'train' / 'a.png')
  bad = np.full((8, 8), 7, np.uint8)
  Image.fromarray(bad).save(root / 'ann_dir' / 'train' / 'a.png')
  src = isprs.ISPRSSource(root, 'train')
  with pytest.raises(DatasetError, match=r'a\.png has values \[7\].*1\.\.6'):
    src[0]
  Image.fromarray(_colour_label(0, 8, 8)).save(root / 'ann_dir' / 'train' / 'a.png')
  with pytest.raises(DatasetError, match=r'a\.png has mode RGB.*isprs_tiles'):
    src[0]
  (root / 'train.txt').write_text('a\nb\n')
  with pytest.raises(DatasetError, match=r"1 name\(s\) of .*train\.txt have no image .*\['b'\]"):
    isprs.ISPRSSource(root, 'train')
  with pytest.raises(DatasetError, match=r'val\.txt does not exist'):
    isprs.ISPRSSource(root, 'val', use_split_file=True)
  with pytest.raises(DatasetError, match=r'img_dir/val holds no \.png image'):
    isprs.ISPRSSource(root, 'val')
