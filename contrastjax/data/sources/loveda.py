"""LoveDA (Wang et al., NeurIPS 2021 D&B) in its official layout, as SiamSeg reads it.

The official zips ``Train.zip`` / ``Val.zip`` unpack to::

  <root>/
    Train/
      Rural/images_png/<id>.png   masks_png/<id>.png
      Urban/images_png/<id>.png   masks_png/<id>.png
    Val/
      Rural/...  Urban/...

Images are 1024x1024 RGB PNGs; masks are 8-bit single-channel PNGs with 0 = no-data and
1..7 = background, building, road, water, barren, forest, agricultural. Reading applies mmseg's
``reduce_zero_label=True`` (``mmseg/datasets/loveda.py``; docs/methods/siamseg.md): 0 -> 255 (ignored),
``k -> k - 1``, and 255 stays 255. SiamSeg's task is Rural -> Urban (source ``Train/Rural``,
target ``Train/Urban``, evaluation ``Val/Urban``); ``Test`` has no public masks.

Every bad input raises :class:`~contrastjax.data.errors.DatasetError` naming the file: a missing
or empty domain folder, an image without a mask (or the reverse), an unreadable file, image and
mask of different sizes, a colour (3-channel) mask, mask values outside ``{0..C, 255}``.
:func:`validate` reads everything and collects all problems.

:class:`LabelFolderSource` (image folder + label folder, one PNG each per basename) is shared with
the ISPRS reader.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from contrastjax.data.errors import DatasetError
from contrastjax.data.sources.medseg import ValidationReport, decode_image

CLASSES = ('background', 'building', 'road', 'water', 'barren', 'forest', 'agricultural')
#: mmseg ``LoveDADataset.PALETTE`` (RGB).
PALETTE = ((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183),
           (0, 255, 0), (255, 195, 128))
SPLITS = ('Train', 'Val')
DOMAINS = ('Rural', 'Urban')
IGNORE_INDEX = 255
_LABEL_EXTENSIONS = ('.png',)


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
  """mmseg's ``reduce_zero_label``: 0 -> 255, k -> k - 1, 255 stays 255 (uint8)."""
  out = raw.astype(np.int16) - 1
  out[(raw == 0) | (raw == 255)] = 255
  return out.astype(np.uint8)


def decode_label(path: str) -> np.ndarray:
  """Reads a single-channel 8-bit label PNG (``L``, ``P`` palette indices) as uint8 ``[H, W]``.

  Raises:
    DatasetError: Unreadable, 16/32-bit, or a colour image (the ISPRS colour labels must first
      go through ``python -m contrastjax.data.tools.isprs_tiles``).
  """
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode in ('L', 'P'):
        return np.asarray(im, dtype=np.uint8)
      if mode == '1':
        return np.asarray(im.convert('L'), dtype=np.uint8)
  except FileNotFoundError as e:
    raise DatasetError(f'label file {path} does not exist (it was there when the dataset was '
                       'indexed)', path=path, kind='missing_file') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(f'cannot decode label file {path} ({type(e).__name__}: {e}); expected a '
                       'complete 8-bit single-channel PNG', path=path, kind='unreadable') from e
  raise DatasetError(
      f'label file {path} has mode {mode}; expected an 8-bit single-channel (L or P) PNG of '
      'class indices (colour-coded ISPRS labels must be converted with '
      '`python -m contrastjax.data.tools.isprs_tiles`)', path=path, kind='bad_mask')


def _png_index(folder: str, role: str, exts: Sequence[str]) -> dict[str, str]:
  if not os.path.isdir(folder):
    raise DatasetError(f'{role} folder {folder} does not exist', path=folder,
                       kind='missing_folder')
  index: dict[str, list[str]] = collections.defaultdict(list)
  for name in os.listdir(folder):
    stem, ext = os.path.splitext(name)
    if ext.lower() in exts:
      index[stem].append(name)
  dups = sorted(f'{k} -> {sorted(v)}' for k, v in index.items() if len(v) > 1)
  if dups:
    raise DatasetError(f'{role} folder {folder} has {len(dups)} basename(s) with more than one '
                       f'file, expected exactly one: {dups[:10]}', path=folder,
                       kind='ambiguous_file')
  return {k: os.path.join(folder, v[0]) for k, v in index.items()}


class LabelFolderSource:
  """Random-access source over an image folder and a label folder with matching basenames.

  ``source[i]`` returns ``{'image': uint8 [H, W, 3], 'label': uint8 [H, W] in {0..C-1, 255},
  'name': str}``; raw label values are checked against ``{0..C} ∪ {255}`` (``reduce_zero_label``)
  and reduced. Holds only paths (cheap to pickle into grain workers).
  """

  on_disk = True  # read in full at start-up by contrastjax.data.validation

  def __init__(self, image_dir: str, label_dir: str, *, num_classes: int,
               names: Sequence[str] | None = None, names_file: str | None = None,
               what: str = 'dataset', image_exts: Sequence[str] = ('.png',)):
    """Indexes the folders.

    Args:
      image_dir: Folder of images.
      label_dir: Folder of label PNGs (same basenames).
      num_classes: ``C``; raw labels must be in ``0..C`` or 255.
      names: Basenames to use (from a split file); default: every image in ``image_dir``.
      names_file: Where ``names`` came from (for messages).
      what: Dataset description for messages.
      image_exts: Accepted image extensions.

    Raises:
      DatasetError: Missing or empty folder, an image without a label (or a label without an
        image when the whole folder is used), a listed name without files.
    """
    self.image_dir, self.label_dir = os.fspath(image_dir), os.fspath(label_dir)
    self.num_classes = int(num_classes)
    self.what = what
    images = _png_index(self.image_dir, f'{what} image', tuple(image_exts))
    labels = _png_index(self.label_dir, f'{what} label', _LABEL_EXTENSIONS)
    if names is None:
      if not images:
        raise DatasetError(f'{what} image folder {self.image_dir} holds no '
                           f'{"/".join(image_exts)} image; expected one file per tile',
                           path=self.image_dir, kind='empty_split')
      no_label = sorted(set(images) - set(labels))
      no_image = sorted(set(labels) - set(images))
      problems = []
      if no_label:
        problems.append(f'{len(no_label)} image(s) in {self.image_dir} have no label '
                        f'{self.label_dir}/<name>.png; first: '
                        f'{[os.path.basename(images[n]) for n in no_label[:10]]}')
      if no_image:
        problems.append(f'{len(no_image)} label(s) in {self.label_dir} have no image in '
                        f'{self.image_dir}; first: '
                        f'{[os.path.basename(labels[n]) for n in no_image[:10]]}')
      if problems:
        raise DatasetError('; '.join(problems) + '; expected one image and one label per name',
                           path=self.label_dir if no_label else self.image_dir,
                           kind='missing_file')
      names = sorted(images)
    else:
      names = list(names)
      where = names_file or 'the split list'
      miss_i = [n for n in names if n not in images]
      miss_l = [n for n in names if n not in labels]
      if miss_i or miss_l:
        parts = []
        if miss_i:
          parts.append(f'{len(miss_i)} name(s) of {where} have no image in {self.image_dir}; '
                       f'first: {miss_i[:10]}')
        if miss_l:
          parts.append(f'{len(miss_l)} name(s) of {where} have no label in {self.label_dir}; '
                       f'first: {miss_l[:10]}')
        raise DatasetError('; '.join(parts), path=names_file, kind='missing_file')
    self.names: tuple[str, ...] = tuple(names)
    self.image_paths: tuple[str, ...] = tuple(images[n] for n in names)
    self.label_paths: tuple[str, ...] = tuple(labels[n] for n in names)

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.image_dir!r}, n={len(self)})'

  def read_raw_label(self, index: int) -> np.ndarray:
    """The label of example ``index`` as stored (before ``reduce_zero_label``)."""
    return decode_label(self.label_paths[index])

  def encoded_files(self, index: int) -> dict[str, str]:
    """The file behind each image key of example ``index``: a preparation
    (``contrastjax.data.prepared``) stores it as it is when it decodes to the same array."""
    return {'image': self.image_paths[int(index) % len(self.image_paths)]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self.names)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    index = int(index) % n
    image_path, label_path = self.image_paths[index], self.label_paths[index]
    image = decode_image(image_path)
    raw = decode_label(label_path)
    if image.shape[:2] != raw.shape:
      raise DatasetError(
          f'image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but label {label_path} '
          f'is {raw.shape[1]}x{raw.shape[0]}; expected equal sizes', path=label_path,
          kind='size_mismatch')
    bad = (raw > self.num_classes) & (raw != 255)
    if bad.any():
      values = np.unique(raw[bad])
      raise DatasetError(
          f'label file {label_path} has values {values[:10].tolist()} ({int(bad.sum())} '
          f'pixels) outside the class set; expected 0 (no-data/ignored), 1..{self.num_classes} '
          f'({self.what} classes) or 255', path=label_path, kind='bad_mask')
    return {'image': image, 'label': reduce_zero_label(raw), 'name': self.names[index]}


class LoveDASource(LabelFolderSource):
  """One split and domain of LoveDA, e.g. ``LoveDASource(root, 'Train', 'Rural')``."""

  def __init__(self, root: str | os.PathLike[str], split: str = 'Train', domain: str = 'Rural'):
    """Indexes ``<root>/<split>/<domain>/{images_png,masks_png}``.

    Raises:
      DatasetError: Unknown split/domain, a missing or empty folder, unmatched images/masks.
    """
    root = os.fspath(root)
    if split not in SPLITS:
      raise DatasetError(f'LoveDA split {split!r} is not one of {SPLITS} (Test has no public '
                         'masks)', kind='invalid')
    if domain not in DOMAINS:
      raise DatasetError(f'LoveDA domain {domain!r} is not one of {DOMAINS}', kind='invalid')
    if not os.path.isdir(root):
      raise DatasetError(f'LoveDA root {root} does not exist; expected <root>/{{Train,Val}}/'
                         '{Rural,Urban}/{images_png,masks_png}/', path=root,
                         kind='missing_folder')
    folder = os.path.join(root, split, domain)
    if not os.path.isdir(folder):
      raise DatasetError(f'LoveDA domain folder {folder} does not exist; expected '
                         f'<root>/{split}/{domain}/{{images_png,masks_png}}/ (unzip {split}.zip '
                         'into the root)', path=folder, kind='missing_folder')
    self.root, self.split, self.domain = root, split, domain
    super().__init__(os.path.join(folder, 'images_png'), os.path.join(folder, 'masks_png'),
                     num_classes=len(CLASSES), what=f'LoveDA {split}/{domain}')

  def __repr__(self) -> str:
    return f'LoveDASource({self.root!r}, {self.split!r}, {self.domain!r}, n={len(self)})'


def validate(source: Any) -> ValidationReport:
  """Reads every example and collects all problems (any :class:`LabelFolderSource`).

  Warnings: labels with no valid (non-ignored) pixel.

  Returns:
    A :class:`~contrastjax.data.sources.medseg.ValidationReport`.
  """
  report = ValidationReport(source=repr(source), num_examples=len(source))
  warnings: dict[str, list[str]] = collections.defaultdict(list)
  for i in range(len(source)):
    name = str(source.names[i])
    try:
      ex = source[i]
      if ex['image'].dtype != np.uint8 or ex['image'].shape[-1] != 3:
        raise DatasetError(f'{source.image_paths[i]}: image is {ex["image"].dtype} '
                           f'{ex["image"].shape}; expected uint8 [H, W, 3]', kind='bad_image')
      if (ex['label'] == IGNORE_INDEX).all():
        warnings['all_ignored'].append(name)
    except DatasetError as e:
      report.problems.append((i, name, e.kind, str(e)))
  report.warnings = dict(warnings)
  return report
