"""Cuts the official ISPRS Potsdam / Vaihingen tiles into the 512x512 crops SiamSeg trains on.

Usage::

  python -m contrastjax.data.tools.isprs_tiles --dataset=potsdam --modality=irrg \\
      --src=/data/raw/potsdam --dst=data/Potsdam_IRRG_DA
  python -m contrastjax.data.tools.isprs_tiles --dataset=potsdam --modality=rgb \\
      --src=/data/raw/potsdam --dst=data/Potsdam_RGB_DA
  python -m contrastjax.data.tools.isprs_tiles --dataset=vaihingen \\
      --src=/data/raw/vaihingen --dst=data/Vaihingen_IRRG_DA

``--src`` holds the official downloads, zipped or unzipped (searched recursively):

* Potsdam: ``2_Ortho_RGB.zip`` (``top_potsdam_<i>_<j>_RGB.tif``) or ``3_Ortho_IRRG.zip``
  (``..._IRRG.tif``), and ``5_Labels_all_noBoundary.zip`` (``..._label_noBoundary.tif``, the
  reference's choice, ``--labels=noboundary``) or ``5_Labels_all.zip`` (``..._label.tif``,
  ``--labels=full``).
* Vaihingen (IRRG only): ``ISPRS_semantic_labeling_Vaihingen.zip`` (images
  ``top/top_mosaic_09cm_area<n>.tif``) and
  ``ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip``
  (``top_mosaic_09cm_area<n>_noBoundary.tif``, the reference's choice) or
  ``..._ground_truth_COMPLETE.zip`` (``top_mosaic_09cm_area<n>.tif``, ``--labels=full``).

``--dst`` receives the layout of :mod:`contrastjax.data.sources.isprs` (``img_dir/{train,val}``,
``ann_dir/{train,val}``) plus the ``train.txt`` / ``val.txt`` split lists the SiamSeg configs
expect and the stock converters do not write.

What is reproduced from mmseg's ``tools/convert_datasets/{potsdam,vaihingen}.py`` (docs/methods/siamseg.md):

* Splits: Potsdam train tiles 2_10..2_12, 3_10..3_12, 4_10..4_12, 5_10..5_12, 6_7..6_12,
  7_7..7_12 (24), val 2_13, 2_14, 3_13, 3_14, 4_13, 4_14, 4_15, 5_13, 5_14, 5_15, 6_13, 6_14,
  6_15, 7_13 (14); Vaihingen train areas 1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32,
  34, 37, val 2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38. (The reference
  puts any other tile into val, which is why it deletes area 9 by hand; here tiles in neither
  list are skipped and counted.)
* Crop boxes (``clip_big_image``), clip 512, stride 256 by default: the grid size comes from the
  stride, but the origins are ``k * clip`` (not ``k * stride``), and boxes past the border are
  shifted back inside. The effective result is non-overlapping 512 crops plus border-aligned last
  ones (duplicates overwrite one file in the reference, so each box is written once here).
  ``--grid=stride`` uses ``k * stride`` origins instead (truly overlapping crops).
* File names ``<i>_<j>_<x0>_<y0>_<x1>_<y1>.png`` (Potsdam), ``area<n>_<x0>_<y0>_<x1>_<y1>.png``
  (Vaihingen).
* Colours -> labels: (255, 255, 255) impervious surfaces 1, (0, 0, 255) building 2,
  (0, 255, 255) low vegetation 3, (0, 255, 0) tree 4, (255, 255, 0) car 5, (255, 0, 0) clutter
  6, anything else (black boundary of the eroded labels, off colours) 0 = ignored. The reference
  matches colours through ``2B + 3G + 4R``, so some off colours alias onto a class (e.g.
  (0, 170, 0) reads as blue); here colours match exactly, and off-colour pixels are counted and
  reported.
* Image channels are written in the file's order (RGB, or IR-R-G for IRRG), as the reference's
  ``mmcv.imread`` / ``imwrite`` round trip does.

A tile smaller than the crop is an error naming the tile (the reference would write crops with
negative offsets).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import math
import os
import re
import sys
import zipfile
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from contrastjax.data.errors import DatasetError

POTSDAM_SPLITS = {
    'train': ('2_10', '2_11', '2_12', '3_10', '3_11', '3_12', '4_10', '4_11', '4_12', '5_10',
              '5_11', '5_12', '6_10', '6_11', '6_12', '6_7', '6_8', '6_9', '7_10', '7_11',
              '7_12', '7_7', '7_8', '7_9'),
    'val': ('5_15', '6_15', '6_13', '3_13', '4_14', '6_14', '5_14', '2_13', '4_15', '2_14',
            '5_13', '4_13', '3_14', '7_13'),
}
VAIHINGEN_SPLITS = {
    'train': ('area1', 'area11', 'area13', 'area15', 'area17', 'area21', 'area23', 'area26',
              'area28', 'area3', 'area30', 'area32', 'area34', 'area37', 'area5', 'area7'),
    'val': ('area6', 'area24', 'area35', 'area16', 'area14', 'area22', 'area10', 'area4',
            'area2', 'area20', 'area8', 'area31', 'area33', 'area27', 'area38', 'area12',
            'area29'),
}
#: Official label colour (RGB) -> label written to ann_dir (0 = ignored after reduce_zero_label).
COLOUR_TO_LABEL = {
    (255, 255, 255): 1,  # impervious surfaces
    (0, 0, 255): 2,      # building
    (0, 255, 255): 3,    # low vegetation
    (0, 255, 0): 4,      # tree
    (255, 255, 0): 5,    # car
    (255, 0, 0): 6,      # clutter / background
}
DEFAULT_CROP = 512
DEFAULT_STRIDE = 256


# ------------------------------------------------------------------------------------------------
# Pure helpers.
# ------------------------------------------------------------------------------------------------


def crop_boxes(height: int, width: int, crop: int = DEFAULT_CROP, stride: int = DEFAULT_STRIDE,
               *, grid: str = 'reference', tile: str = 'tile') -> list[tuple[int, int, int, int]]:
  """The crop boxes ``(x0, y0, x1, y1)`` of a tile, as mmseg's ``clip_big_image``.

  Args:
    height: Tile height.
    width: Tile width.
    crop: Crop side.
    stride: Stride (sets the number of grid points).
    grid: ``'reference'`` (origins ``k * crop``, the converters' behaviour) or ``'stride'``
      (origins ``k * stride``).
    tile: Tile name for error messages.

  Returns:
    Distinct boxes in the reference's order (rows outer, columns inner), each ``crop x crop``.

  Raises:
    DatasetError: The tile is smaller than the crop.
    ValueError: Bad ``crop``, ``stride`` or ``grid``.
  """
  if crop < 1 or stride < 1:
    raise ValueError(f'crop={crop}, stride={stride}; expected positive integers')
  if grid not in ('reference', 'stride'):
    raise ValueError(f"grid={grid!r}; expected 'reference' or 'stride'")
  if height < crop or width < crop:
    raise DatasetError(f'tile {tile} is {width}x{height} (WxH), smaller than the {crop}x{crop} '
                       'crop; expected every tile to be at least the crop size', path=tile,
                       kind='size_mismatch')

  def count(n: int) -> int:
    k = math.ceil((n - crop) / stride)
    return k if k * stride + crop >= n else k + 1

  step = crop if grid == 'reference' else stride
  boxes, seen = [], set()
  for r in range(count(height) + 1):
    for c in range(count(width) + 1):
      x0, y0 = c * step, r * step
      x0 = x0 if x0 + crop <= width else width - crop
      y0 = y0 if y0 + crop <= height else height - crop
      box = (x0, y0, min(x0 + crop, width), min(y0 + crop, height))
      if box not in seen:
        seen.add(box)
        boxes.append(box)
  return boxes


def colour_to_label(rgb: np.ndarray) -> tuple[np.ndarray, int]:
  """Official colour label ``[H, W, 3]`` -> uint8 labels 0..6 and the number of off-colour pixels.

  Black (the eroded boundary) and any colour not in :data:`COLOUR_TO_LABEL` become 0.
  """
  rgb = np.asarray(rgb)[..., :3].astype(np.int32)
  code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
  out = np.zeros(code.shape, np.uint8)
  known = code == 0
  for (r, g, b), label in COLOUR_TO_LABEL.items():
    hit = code == ((r << 16) | (g << 8) | b)
    out[hit] = label
    known |= hit
  return out, int((~known).sum())


# ------------------------------------------------------------------------------------------------
# Finding the tiles in zips or folders.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Member:
  """A file inside a zip (``container`` = the zip) or on disk (``container`` = '')."""
  container: str
  path: str

  @property
  def where(self) -> str:
    return f'{self.container}:{self.path}' if self.container else self.path

  def read(self) -> bytes:
    if self.container:
      with zipfile.ZipFile(self.container) as zf:
        return zf.read(self.path)
    with open(self.path, 'rb') as f:
      return f.read()


def _members(src: str) -> list[_Member]:
  """Every file under ``src`` and inside every zip under ``src``."""
  if not os.path.isdir(src):
    raise DatasetError(f'--src={src} does not exist or is not a folder; expected the folder with '
                       'the official ISPRS zips or their unzipped tiles', path=src,
                       kind='missing_folder')
  out = []
  for dirpath, _, files in sorted(os.walk(src)):
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      if name.lower().endswith('.zip'):
        try:
          with zipfile.ZipFile(path) as zf:
            out.extend(_Member(path, m) for m in zf.namelist() if not m.endswith('/'))
        except zipfile.BadZipFile as e:
          raise DatasetError(f'{path} is not a readable zip ({e}); re-download it', path=path,
                             kind='unreadable') from e
      else:
        out.append(_Member('', path))
  return out


_POTSDAM_IMAGE = {'rgb': re.compile(r'top_potsdam_(\d+)_(\d+)_RGB\.tif$', re.I),
                  'irrg': re.compile(r'top_potsdam_(\d+)_(\d+)_IRRG\.tif$', re.I)}
_POTSDAM_LABEL = {'noboundary': re.compile(r'top_potsdam_(\d+)_(\d+)_label_noBoundary\.tif$', re.I),
                  'full': re.compile(r'top_potsdam_(\d+)_(\d+)_label\.tif$', re.I)}
_VAIHINGEN_TOP = re.compile(r'top_mosaic_09cm_area(\d+)\.tif$', re.I)
_VAIHINGEN_ERODED = re.compile(r'top_mosaic_09cm_area(\d+)_noBoundary\.tif$', re.I)


def _parent(member: _Member) -> str:
  return os.path.basename(os.path.dirname(member.path.replace('\\', '/'))).lower()


def find_tiles(src: str, dataset: str, modality: str = 'irrg', labels: str = 'noboundary'
               ) -> dict[str, tuple[_Member, _Member]]:
  """Tile id (``'2_10'``, ``'area1'``) -> (image member, label member).

  Raises:
    DatasetError: No image or no label tile found, a tile with an image but no label (or the
      reverse, within the split lists), or two candidates for one tile.
  """
  members = _members(src)
  images: dict[str, list[_Member]] = collections.defaultdict(list)
  labs: dict[str, list[_Member]] = collections.defaultdict(list)
  if dataset == 'potsdam':
    img_re, lab_re = _POTSDAM_IMAGE[modality], _POTSDAM_LABEL[labels]
    for m in members:
      base = os.path.basename(m.path)
      if (hit := img_re.search(base)):
        images[f'{hit.group(1)}_{hit.group(2)}'].append(m)
      elif (hit := lab_re.search(base)):
        labs[f'{hit.group(1)}_{hit.group(2)}'].append(m)
    expect = (f'top_potsdam_<i>_<j>_{modality.upper()}.tif (in '
              f'{"2_Ortho_RGB.zip" if modality == "rgb" else "3_Ortho_IRRG.zip"})',
              f'top_potsdam_<i>_<j>_label{"_noBoundary" if labels == "noboundary" else ""}.tif '
              f'(in 5_Labels_all{"_noBoundary" if labels == "noboundary" else ""}.zip)')
  else:
    for m in members:
      base = os.path.basename(m.path)
      parent = _parent(m)
      if (hit := _VAIHINGEN_TOP.search(base)):
        if parent == 'top':
          images[f'area{hit.group(1)}'].append(m)
        elif labels == 'full' and parent not in ('dsm', 'ndsm'):
          labs[f'area{hit.group(1)}'].append(m)
      elif labels == 'noboundary' and (hit := _VAIHINGEN_ERODED.search(base)):
        labs[f'area{hit.group(1)}'].append(m)
    if labels == 'full':   # the COMPLETE zip wins over the 16 gts_for_participants tiles
      for key, lst in labs.items():
        complete = [m for m in lst if 'complete' in m.where.lower()]
        if complete and len(lst) > 1:
          labs[key] = complete
    expect = ('top/top_mosaic_09cm_area<n>.tif (in ISPRS_semantic_labeling_Vaihingen.zip)',
              'top_mosaic_09cm_area<n>'
              f'{"_noBoundary" if labels == "noboundary" else ""}.tif (in ISPRS_semantic_'
              f'labeling_Vaihingen_ground_truth{"_eroded" if labels == "noboundary" else ""}'
              '_COMPLETE.zip)')
  if not images:
    raise DatasetError(f'no {dataset} image tile found under {src}; expected {expect[0]}',
                       path=src, kind='missing_file')
  if not labs:
    raise DatasetError(f'no {dataset} label tile found under {src}; expected {expect[1]}',
                       path=src, kind='missing_file')
  for kind, index in (('image', images), ('label', labs)):
    dups = {k: [m.where for m in v] for k, v in index.items() if len(v) > 1}
    if dups:
      key = sorted(dups)[0]
      raise DatasetError(f'{len(dups)} {dataset} tile(s) have more than one {kind} file under '
                         f'{src}, e.g. {key}: {dups[key]}; keep one copy', path=src,
                         kind='ambiguous_file')
  splits = POTSDAM_SPLITS if dataset == 'potsdam' else VAIHINGEN_SPLITS
  wanted = set(splits['train']) | set(splits['val'])
  no_label = sorted(k for k in images if k in wanted and k not in labs)
  no_image = sorted(k for k in labs if k in wanted and k not in images)
  if no_label or no_image:
    parts = []
    if no_label:
      parts.append(f'tile(s) {no_label} have an image but no label '
                   f'(first: {images[no_label[0]][0].where}); expected {expect[1]}')
    if no_image:
      parts.append(f'tile(s) {no_image} have a label but no image '
                   f'(first: {labs[no_image[0]][0].where}); expected {expect[0]}')
    raise DatasetError('; '.join(parts), path=src, kind='missing_file')
  return {k: (images[k][0], labs[k][0]) for k in sorted(images) if k in labs}


def _decode(member: _Member, role: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(member.read())) as im:
      im.load()
      if im.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
        raise DatasetError(f'{role} tile {member.where} has {im.mode} pixels; expected 8-bit '
                           '3-channel', path=member.where, kind='bad_image')
      return np.asarray(im.convert('RGB'), dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    if isinstance(e, DatasetError):
      raise
    raise DatasetError(f'cannot decode {role} tile {member.where} ({type(e).__name__}: {e}); '
                       'expected an 8-bit TIFF', path=member.where, kind='unreadable') from e


# ------------------------------------------------------------------------------------------------
# The conversion.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TilingReport:
  """What :func:`tile_dataset` wrote."""
  crops: dict[str, int]              # split -> number of crops
  tiles: dict[str, list[str]]        # split -> tile ids
  skipped_tiles: list[str]           # tiles in neither split list
  off_colour_pixels: dict[str, int]  # tile -> pixels whose colour is not an official class


def tile_dataset(src: str, dst: str, dataset: str, *, modality: str = 'irrg',
                 labels: str = 'noboundary', crop: int = DEFAULT_CROP,
                 stride: int = DEFAULT_STRIDE, grid: str = 'reference',
                 log: Callable[[str], None] = print) -> TilingReport:
  """Finds the tiles, cuts them and writes ``dst/{img_dir,ann_dir}/{train,val}`` + split lists.

  Args:
    src: Folder with the official zips or tiles.
    dst: Output dataset folder (e.g. ``data/Potsdam_IRRG_DA``).
    dataset: ``'potsdam'`` or ``'vaihingen'``.
    modality: ``'irrg'`` or ``'rgb'`` (Potsdam only; Vaihingen is IRRG).
    labels: ``'noboundary'`` (eroded, the reference) or ``'full'``.
    crop: Crop side (reference 512).
    stride: Stride (reference 256; see :func:`crop_boxes`).
    grid: ``'reference'`` or ``'stride'``.
    log: Progress printer.

  Returns:
    A :class:`TilingReport`.

  Raises:
    DatasetError: Missing/ambiguous tiles, unreadable tiles, image and label of different
      sizes, a tile smaller than the crop.
  """
  if dataset not in ('potsdam', 'vaihingen'):
    raise ValueError(f"--dataset={dataset!r}; expected 'potsdam' or 'vaihingen'")
  if modality not in ('irrg', 'rgb'):
    raise ValueError(f"--modality={modality!r}; expected 'irrg' or 'rgb'")
  if dataset == 'vaihingen' and modality != 'irrg':
    raise ValueError('Vaihingen has IRRG tiles only; use --modality=irrg')
  if labels not in ('noboundary', 'full'):
    raise ValueError(f"--labels={labels!r}; expected 'noboundary' or 'full'")
  tiles = find_tiles(src, dataset, modality, labels)
  splits = POTSDAM_SPLITS if dataset == 'potsdam' else VAIHINGEN_SPLITS
  report = TilingReport(crops={'train': 0, 'val': 0}, tiles={'train': [], 'val': []},
                        skipped_tiles=[], off_colour_pixels={})
  names: dict[str, list[str]] = {'train': [], 'val': []}
  for split in ('train', 'val'):
    os.makedirs(os.path.join(dst, 'img_dir', split), exist_ok=True)
    os.makedirs(os.path.join(dst, 'ann_dir', split), exist_ok=True)
  for tile_id, (img_m, lab_m) in tiles.items():
    split = next((s for s in ('train', 'val') if tile_id in splits[s]), None)
    if split is None:
      report.skipped_tiles.append(tile_id)
      log(f'skipping tile {tile_id} ({img_m.where}): in neither split list')
      continue
    image = _decode(img_m, 'image')
    label, off = colour_to_label(_decode(lab_m, 'label'))
    if image.shape[:2] != label.shape:
      raise DatasetError(f'image tile {img_m.where} is {image.shape[1]}x{image.shape[0]} but '
                         f'label tile {lab_m.where} is {label.shape[1]}x{label.shape[0]} (WxH); '
                         'expected equal sizes', path=lab_m.where, kind='size_mismatch')
    if off:
      report.off_colour_pixels[tile_id] = off
      log(f'tile {tile_id}: {off} label pixels with a non-official colour -> 0 (ignored)')
    boxes = crop_boxes(image.shape[0], image.shape[1], crop, stride, grid=grid,
                       tile=img_m.where)
    for x0, y0, x1, y1 in boxes:
      name = f'{tile_id}_{x0}_{y0}_{x1}_{y1}'
      Image.fromarray(image[y0:y1, x0:x1]).save(
          os.path.join(dst, 'img_dir', split, name + '.png'))
      Image.fromarray(label[y0:y1, x0:x1], mode='L').save(
          os.path.join(dst, 'ann_dir', split, name + '.png'))
      names[split].append(name)
    report.crops[split] += len(boxes)
    report.tiles[split].append(tile_id)
    log(f'{split}: tile {tile_id} -> {len(boxes)} crops')
  for split in ('train', 'val'):
    with open(os.path.join(dst, f'{split}.txt'), 'w', encoding='utf-8') as f:
      f.write(''.join(n + '\n' for n in sorted(names[split])))
  missing = {s: sorted(set(splits[s]) - set(report.tiles[s])) for s in ('train', 'val')}
  for s, lst in missing.items():
    if lst:
      log(f'note: {len(lst)} {s} tile(s) of the reference split were not found: {lst}')
  log(f'wrote {report.crops["train"]} train and {report.crops["val"]} val crops to {dst}')
  return report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m contrastjax.data.tools.isprs_tiles',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', required=True, choices=('potsdam', 'vaihingen'))
  parser.add_argument('--src', required=True, help='folder with the official zips or tiles')
  parser.add_argument('--dst', required=True, help='output folder, e.g. data/Potsdam_IRRG_DA')
  parser.add_argument('--modality', default='irrg', choices=('irrg', 'rgb'))
  parser.add_argument('--labels', default='noboundary', choices=('noboundary', 'full'))
  parser.add_argument('--crop', type=int, default=DEFAULT_CROP)
  parser.add_argument('--stride', type=int, default=DEFAULT_STRIDE)
  parser.add_argument('--grid', default='reference', choices=('reference', 'stride'))
  args = parser.parse_args(argv)
  try:
    tile_dataset(args.src, args.dst, args.dataset, modality=args.modality, labels=args.labels,
                 crop=args.crop, stride=args.stride, grid=args.grid)
  except (DatasetError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
