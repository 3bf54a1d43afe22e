"""PASCAL VOC 2012 (+ SBD augmentation) and COCO 2014 for weakly supervised semantic segmentation.

Weakly supervised semantic segmentation (WSSS, e.g. APC) trains from image-level class labels only
and is evaluated on pixel masks. The sources here give, per image, a multi-hot label vector and,
only for evaluation sources, the pixel mask.

PASCAL VOC 2012, official layout (``VOCtrainval_11-May-2012.tar``) plus the SBD masks::

  VOCdevkit/VOC2012/
    JPEGImages/<id>.jpg                    # 17,125 RGB JPEGs
    SegmentationClass/<id>.png             # palette ('P') PNGs: indices 0..20, 255 = object border
    SegmentationClassAug/<id>.png          # SBD-augmented masks, single-channel ('L'), 0..20, 255
    ImageSets/Segmentation/train.txt       # 1,464 ids, one per line
    ImageSets/Segmentation/val.txt         # 1,449
    ImageSets/Segmentation/trainval.txt    # 2,913
    ImageSets/Segmentation/train_aug.txt   # 10,582 (not in the tar, see below)

``SegmentationClassAug`` and ``train_aug`` come from the Semantic Boundaries Dataset (SBD,
Hariharan et al., ICCV 2011) as converted by DeepLab (Chen et al.): the SBD train+val masks
(11,355) joined with VOC 2012 ``train`` (1,464), minus every image of VOC 2012 ``val`` (1,449),
gives the 10,582 ids of ``train_aug``. The masks are distributed as ``SegmentationClassAug.zip``
(linked from the ToCo README, github.com/rulixiang/ToCo; unzip into ``VOCdevkit/VOC2012``). The
list ships with the WSSS code bases rather than with the data: ToCo ``datasets/voc/train_aug.txt``
and IRN ``voc12/train_aug.txt`` (one id per line), DeepLab ``list/train_aug.txt`` (two columns,
``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``). Put it in ``ImageSets/Segmentation/``
or pass ``split_file=``; both formats are read. For the ids they share, ``SegmentationClass``
(palette indices) and ``SegmentationClassAug`` hold the same label values; ToCo evaluates ``val``
on ``SegmentationClassAug``, the default here is the official ``SegmentationClass`` for every
split but ``train_aug`` (``mask_dir=`` overrides).

Classes (:data:`VOC_CLASSES`): 0 background, 1 aeroplane ... 20 tvmonitor, 255 ignored. The colour
palette (:func:`color_map`) is the devkit's ``VOClabelcolormap.m`` bit-interleaving formula.

COCO 2014 for WSSS, in the VOC-style layout of ToCo (``datasets/coco.py`` at e13514d)::

  MSCOCO/
    JPEGImages/train2014/<id>.jpg          # ids as COCO_train2014_000000000009
    JPEGImages/val2014/<id>.jpg
    SegmentationClass/train2014/<id>.png   # 'L' PNGs, 0 background, 1..80 contiguous classes, 255
    SegmentationClass/val2014/<id>.png
    annotations/instances_{train,val}2014.json   # only for labels='instances'

The ToCo README names the folders ``train``/``val``; both spellings are found. Classes 1..80 are
the COCO categories in increasing category id (:data:`COCO_CATEGORY_IDS`). The masks are made
with coco2voc (github.com/alicranck/coco2voc) or downloaded from the ToCo README; ToCo's lists
(``datasets/coco/train.txt`` 82,081 ids, ``val.txt`` 40,137) are read from
``<root>/ImageSets/Segmentation/<split>.txt`` or ``<root>/<split>.txt`` (or ``split_file=``).

Image-level labels (``labels=``):

* ``'cls_labels'``: a NumPy file holding a pickled dict ``id -> multi-hot over the foreground
  classes`` (20 for VOC, 80 for COCO; index ``k - 1`` is class ``k``), as ToCo's
  ``datasets/{voc,coco}/cls_labels_onehot.npy`` (str keys, float32 ``[20]``; 12,031 VOC ids =
  ``train_aug`` + ``val``) and IRN/AffinityNet ``voc12/cls_labels.npy`` (the same vectors keyed by
  ``int('2007_000032'.replace('_', ''))``; COCO variants keyed by the int image id). Both key kinds
  are looked up. Searched by default as ``cls_labels.npy`` / ``cls_labels_onehot.npy`` in the
  dataset root and in ``ImageSets/Segmentation``. ``np.load(allow_pickle=True)`` runs pickle: load
  only files you trust.
* ``'masks'``: derived from the masks: the values present, 0 and 255 excluded (ToCo's
  ``_to_onehot``, which produced its npy files from ``SegmentationClassAug``).
* ``'instances'`` (COCO only, needs ``pycocotools``): the categories of the image's instance
  annotations (crowd included); with ``with_masks=True`` the masks are rendered from the
  annotations as coco2voc does (smaller instances win where instances overlap, crowd included,
  no 255), with contiguous class ids.

Every example is ``{'image': uint8 [H, W, 3], 'labels': float32 [C + 1], 'name': str}`` with
``labels[0] = 1`` (background is always present) and, only when ``with_masks=True``, ``'label':
uint8 [H, W]`` in ``0..C`` and 255. A training source (``with_masks=False``) carries no pixel
labels at all.

Images: 8-bit RGB is read as is; grayscale (``L``, ``1``, ``LA``), palette, CMYK and RGBA images are
converted to RGB (alpha is dropped, not composited: VOC and COCO hold no RGBA image, and about 1 %
of the COCO images are grayscale, as ToCo's ``robust_read_image`` expands them) and
:func:`validate` lists them as warnings; 16-bit images (Pillow would silently keep the high byte
of 16-bit RGB PNGs) are rejected.

Every bad input raises :class:`~contrastjax.data.errors.DatasetError` naming the file or key, with
``kind``: ``missing_folder``, ``missing_split``, ``empty_split``, ``duplicate_id``,
``missing_file`` (an id without image or mask), ``missing_label`` (an id absent from the
cls-label file or the instance annotations), ``bad_cls_labels``, ``bad_annotations``,
``unreadable`` (corrupt or truncated), ``bad_image`` (16-bit), ``bad_mask`` (colour/16-bit mask,
values outside the class set), ``size_mismatch``, ``no_foreground`` (an image without any
foreground class; ``allow_empty=True`` accepts it). :func:`validate` reads every example and
reports all problems at once, counted per kind.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import io
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from contrastjax.data.errors import DatasetError
from contrastjax.data.sources.loveda import decode_label
from contrastjax.data.sources.medseg import ValidationReport, decode_image, read_split

IGNORE_INDEX = 255

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')

#: ToCo ``datasets/coco.py`` ``class_list`` (the COCO category names by increasing id).
COCO_CLASSES = (
    'background', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck',
    'boat', 'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')

#: The 80 COCO category ids (1..90 with gaps); class ``k`` of :data:`COCO_CLASSES` is id ``[k-1]``.
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91))

LABEL_MODES = ('cls_labels', 'masks')
COCO_LABEL_MODES = ('cls_labels', 'masks', 'instances')
CLS_LABEL_FILES = ('cls_labels.npy', 'cls_labels_onehot.npy')

_16BIT_MODES = frozenset({'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'})
_GRAY_MODES = frozenset({'L', '1', 'LA', 'La'})
_ALPHA_MODES = frozenset({'RGBA', 'RGBa', 'LA', 'La', 'PA'})
_ID_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def color_map(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour palette, uint8 ``[n, 3]`` (devkit ``VOClabelcolormap.m``).

  Bits 0, 1, 2 of the class index go to the most significant bit of R, G, B; bits 3, 4, 5 to the
  next one; and so on: 1 aeroplane = (128, 0, 0), 15 person = (192, 128, 128), 255 border =
  (224, 224, 192).
  """
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= (c & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


VOC_PALETTE = color_map(256)


# ------------------------------------------------------------------------------------------------
# Id lists, cls-label files, image and mask decoding.
# ------------------------------------------------------------------------------------------------


def read_id_list(path: str | os.PathLike[str]) -> list[str]:
  """Reads a split list: one id per line, or DeepLab's ``/JPEGImages/<id>.jpg /Seg.../<id>.png``.

  A line's first column is the id; a path or a file name with an image extension is reduced to
  its basename without extension. Blank lines are skipped
  (:func:`~contrastjax.data.sources.medseg.read_split`).

  Raises:
    DatasetError: The file is missing or unreadable (``missing_split``/``unreadable``), lists no
      id (``empty_split``) or an id twice (``duplicate_id``).
  """
  path = os.fspath(path)
  ids = []
  for line in read_split(path):
    token = line.split()[0]
    if '/' in token or os.path.splitext(token)[1].lower() in _ID_EXTENSIONS:
      token = os.path.splitext(os.path.basename(token))[0]
    ids.append(token)
  counts = collections.Counter(ids)
  dups = sorted(i for i, c in counts.items() if c > 1)
  if dups:
    raise DatasetError(f'split file {path} lists {len(dups)} id(s) more than once (first: '
                       f'{dups[:5]}); expected each id once', path=path, kind='duplicate_id')
  return ids


def voc_int_key(name: str) -> int | None:
  """IRN's integer key of a VOC id: ``'2007_000032'`` -> ``2007000032`` (``None`` otherwise)."""
  m = re.fullmatch(r'(\d{4})_(\d{6})', name)
  return int(m.group(1) + m.group(2)) if m else None


def coco_int_key(name: str) -> int | None:
  """The COCO image id of a file stem: ``'COCO_train2014_000000000009'`` -> ``9``."""
  m = re.search(r'(\d{6,12})$', name)
  return int(m.group(1)) if m else None


def load_cls_labels(path: str | os.PathLike[str], names: Sequence[str], num_foreground: int, *,
                    int_key: Callable[[str], int | None] | None = None,
                    where: str = 'the split list') -> np.ndarray:
  """Reads image-level labels for ``names`` from a cls-label npy file.

  Args:
    path: ``np.save``-d dict ``id -> [num_foreground]`` multi-hot (a 0-d object array), or an
      ``.npz`` with one array per id.
    names: Ids to look up (str keys first, then ``int_key(name)``).
    num_foreground: ``C``: 20 for VOC, 80 for COCO.
    int_key: Maps an id to the integer key of IRN-style files.
    where: Where ``names`` came from, for messages.

  Returns:
    float32 ``[len(names), C + 1]``, column 0 (background) all ones.

  Raises:
    DatasetError: Missing or unreadable file (``missing_file``/``unreadable``), not a dict or a
      vector of the wrong length or with values other than 0/1 (``bad_cls_labels``), ids absent
      from the file (``missing_label``).
  """
  path = os.fspath(path)
  expect = (f'expected a NumPy file with a pickled dict image id -> {num_foreground}-dim '
            'multi-hot over the foreground classes (as ToCo cls_labels_onehot.npy)')
  if not os.path.isfile(path):
    raise DatasetError(f'cls-label file {path} does not exist; {expect}', path=path,
                       kind='missing_file')
  try:
    obj = np.load(path, allow_pickle=True)
    if isinstance(obj, np.lib.npyio.NpzFile):
      with obj:
        obj = {k: obj[k] for k in obj.files}
  except (OSError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
          AttributeError, ImportError) as e:
    raise DatasetError(f'cannot read cls-label file {path} ({type(e).__name__}: {e}); {expect}',
                       path=path, kind='unreadable') from e
  if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
    obj = obj.item()
  if not isinstance(obj, collections.abc.Mapping):
    desc = (f'an array {obj.dtype} {obj.shape}' if isinstance(obj, np.ndarray)
            else type(obj).__name__)
    raise DatasetError(f'cls-label file {path} holds {desc}; {expect}', path=path,
                       kind='bad_cls_labels')
  rows = np.zeros((len(names), num_foreground + 1), np.float32)
  rows[:, 0] = 1.0
  missing, bad = [], []
  for i, name in enumerate(names):
    value = obj.get(name)
    if value is None and int_key is not None:
      k = int_key(name)
      value = obj.get(k) if k is not None else None
    if value is None:
      missing.append(name)
      continue
    try:
      vec = np.asarray(value, np.float64).reshape(-1) if np.ndim(value) <= 1 else None
    except (TypeError, ValueError):
      vec = None
    if vec is None or vec.shape != (num_foreground,) or not np.isin(vec, (0.0, 1.0)).all():
      arr = np.asarray(value, dtype=object)
      bad.append(f'{name!r}: shape {arr.shape} values {np.unique(arr.astype(str))[:6].tolist()}')
      continue
    rows[i, 1:] = vec
  if missing:
    raise DatasetError(
        f'cls-label file {path} lacks {len(missing)} of the {len(names)} ids of {where} (first: '
        f'{missing[:10]}); expected a label vector for every listed id', path=path,
        kind='missing_label')
  if bad:
    raise DatasetError(
        f'cls-label file {path} has {len(bad)} malformed label vector(s) (first: {bad[:5]}); '
        f'expected {num_foreground} values in {{0, 1}} per id (foreground classes only, class k '
        'at index k - 1)', path=path, kind='bad_cls_labels')
  return rows


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """The image-level label of a mask: float32 ``[num_classes]``, 1 for every class present.

  Background (index 0) is always 1; 255 (ignored) and values ``>= num_classes`` are not classes.
  """
  present = np.bincount(mask.ravel(), minlength=256)[:num_classes] > 0
  out = present.astype(np.float32)
  out[0] = 1.0
  return out


def _peek(path: str) -> tuple[str | None, str]:
  """``(mode, rawmode)`` from the header only; ``(None, '')`` if Pillow cannot identify it."""
  try:
    with Image.open(path) as im:
      raw = ''
      if im.tile:
        args = im.tile[0].args
        if isinstance(args, str):
          raw = args
        elif isinstance(args, tuple) and args and isinstance(args[0], str):
          raw = args[0]
      return im.mode, raw
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
    return None, ''


def read_rgb(path: str) -> tuple[np.ndarray, tuple[str, ...]]:
  """Reads an image as uint8 RGB ``[H, W, 3]`` and names the conversions it needed.

  Returns:
    ``(image, notes)`` with notes among ``'grayscale_to_rgb'``, ``'alpha_dropped'`` and
    ``'<mode>_to_rgb'`` (palette, CMYK, ...); empty for an 8-bit RGB file.

  Raises:
    DatasetError: Unreadable or truncated (``unreadable``), 16-bit (``bad_image``).
  """
  mode, raw = _peek(path)
  if mode in _16BIT_MODES or ';16' in raw:
    raise DatasetError(
        f'image file {path} has 16 bits per channel (mode {mode}, raw {raw or mode}); expected an '
        '8-bit RGB or grayscale image (convert it, e.g. with Pillow, keeping the high byte)',
        path=path, kind='bad_image')
  image = decode_image(path)
  notes: list[str] = []
  if mode is not None and mode != 'RGB':
    if mode in _GRAY_MODES:
      notes.append('grayscale_to_rgb')
    if mode in _ALPHA_MODES:
      notes.append('alpha_dropped')
    if not notes:
      notes.append(f'{mode.lower()}_to_rgb')
  return image, tuple(notes)


def read_class_mask(path: str, num_classes: int, image_shape: Sequence[int], *,
                    image_path: str = 'the image') -> np.ndarray:
  """Reads a class-index mask and checks it against the class set and the image size.

  Args:
    path: 8-bit single-channel PNG: ``L`` (SegmentationClassAug, COCO) or ``P`` palette
      (SegmentationClass, whose indices are the classes).
    num_classes: ``C + 1``; values must be in ``0..C`` or 255.
    image_shape: Shape of the decoded image.
    image_path: For messages.

  Raises:
    DatasetError: ``unreadable``, ``bad_mask`` (not 8-bit single-channel, or values outside the
      class set), ``size_mismatch``.
  """
  try:
    raw = decode_label(path)
  except DatasetError as e:
    if e.kind != 'bad_mask':
      raise
    mode, _ = _peek(path)
    raise DatasetError(
        f'mask file {path} has mode {mode}; expected an 8-bit single-channel PNG of class indices '
        '(L as SegmentationClassAug, or P palette as SegmentationClass); a colour-rendered mask '
        'must be mapped back to indices with the palette of color_map()', path=path,
        kind='bad_mask') from e
  if raw.shape != tuple(image_shape[:2]):
    raise DatasetError(
        f'image {image_path} is {image_shape[1]}x{image_shape[0]} (WxH) but mask {path} is '
        f'{raw.shape[1]}x{raw.shape[0]}; expected equal sizes', path=path, kind='size_mismatch')
  bad = (raw >= num_classes) & (raw != IGNORE_INDEX)
  if bad.any():
    values = np.unique(raw[bad])
    raise DatasetError(
        f'mask file {path} has values {values[:10].tolist()} ({int(bad.sum())} pixels) outside '
        f'the class set; expected 0..{num_classes - 1} or {IGNORE_INDEX} (ignored)', path=path,
        kind='bad_mask')
  return raw


def _file_index(folder: str, ext: str) -> set[str]:
  """The basenames of the ``ext`` files in ``folder`` (exact, case-sensitive extension)."""
  return {name[:-len(ext)] for name in os.listdir(folder) if name.endswith(ext)}


def _require_folder(folder: str, role: str, hint: str) -> None:
  if not os.path.isdir(folder):
    raise DatasetError(f'{role} folder {folder} does not exist; {hint}', path=folder,
                       kind='missing_folder')


def _check_files(names: Sequence[str], folder: str, ext: str, role: str, where: str) -> int:
  """Checks that every id has its file; logs (info) the files the list leaves out.

  Unlisted files are normal in the official layouts: VOC's ``JPEGImages`` holds 17,125
  images for the 10,582 + 1,449 of ``train_aug`` and ``val``, ToCo's COCO lists leave out
  the images without a labelled object. So they are an info line naming the count and the
  first few (a warning would appear on every correct run), not an error. Returns their
  number.
  """
  present = _file_index(folder, ext)
  missing = [n for n in names if n not in present]
  if missing:
    raise DatasetError(
        f'{len(missing)} id(s) of {where} have no {role} file {folder}/<id>{ext} (first: '
        f'{missing[:10]}); expected one per listed id', path=where, kind='missing_file')
  unlisted = sorted(present - set(names))
  if unlisted:
    logging.info('%s: %d %s file(s) of %s are not listed and are not read (normal for the '
                    'official layout, whose folders hold more files than one split); first: %s',
                    where, len(unlisted), role, folder, [f'{n}{ext}' for n in unlisted[:5]])
  return len(unlisted)


# ------------------------------------------------------------------------------------------------
# The sources.
# ------------------------------------------------------------------------------------------------


class WSSSSource:
  """Random-access image-level-label source (base of :class:`VOCSource`, :class:`COCOSegSource`).

  ``source[i]`` returns ``{'image': uint8 [H, W, 3], 'labels': float32 [C + 1], 'name': str}``
  plus ``'label': uint8 [H, W]`` when ``with_masks``. The object holds paths and the label table
  only (cheap to pickle into grain workers).

  Attributes:
    class_names: The ``C + 1`` class names, background first.
    names: Image ids in split-list order.
    image_paths, mask_paths: Per id (``mask_paths`` is ``None`` when masks are not read).
    labels: ``'cls_labels'``, ``'masks'`` or ``'instances'``.
    with_masks: Whether examples carry ``'label'``.
  """

  dataset = 'dataset'
  class_names: tuple[str, ...] = ()
  on_disk = True  # start-up validation reads such sources in full (contrastjax.data.validation)

  def _init_common(self, labels: str, modes: Sequence[str], with_masks: bool,
                   allow_empty: bool) -> None:
    if labels not in modes:
      raise ValueError(f'labels={labels!r}; expected one of {tuple(modes)}')
    self.labels = labels
    self.with_masks = bool(with_masks)
    self.allow_empty = bool(allow_empty)
    self.cls_labels_path: str | None = None
    self.mask_paths: tuple[str, ...] | None = None
    self._cls: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    """``C + 1`` (background included)."""
    return len(self.class_names)

  @property
  def needs_masks(self) -> bool:
    """Whether reading an example reads its mask file."""
    return self.with_masks or self.labels == 'masks'

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.root!r}, {self.split!r}, labels={self.labels!r}, '
            f'with_masks={self.with_masks}, n={len(self)})')

  def _find_cls_labels(self, path: str | os.PathLike[str] | None,
                       folders: Sequence[str]) -> str:
    if path is not None:
      return os.fspath(path)
    tried = [os.path.join(f, n) for f in folders for n in CLS_LABEL_FILES]
    for p in tried:
      if os.path.isfile(p):
        return p
    raise DatasetError(
        f"labels='cls_labels' but no cls-label file was found (looked for {tried}); pass "
        'cls_labels_path= (ToCo ships datasets/voc/cls_labels_onehot.npy and '
        "datasets/coco/cls_labels_onehot.npy) or use labels='masks'", path=tried[0],
        kind='missing_file')

  def read_mask(self, index: int, image: np.ndarray) -> np.ndarray:
    """The checked mask of example ``index`` (``image`` gives the expected size)."""
    assert self.mask_paths is not None
    return read_class_mask(self.mask_paths[index], self.num_classes, image.shape,
                           image_path=self.image_paths[index])

  def read_example(self, index: int) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Reads example ``index``: ``(example, notes)``, notes naming conversions (for validate).

    Raises:
      IndexError: Index out of range.
      DatasetError: Any problem of the image, the mask or the label.
    """
    n = len(self.names)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    index = int(index) % n
    name = self.names[index]
    image, notes = read_rgb(self.image_paths[index])
    mask = self.read_mask(index, image) if self.needs_masks else None
    if self.labels == 'masks':
      labels = labels_from_mask(mask, self.num_classes)
      origin = f'mask file {self.mask_paths[index]} holds only background/ignored pixels'
    else:
      labels = self._cls[index].copy()
      origin = (f'{self.cls_labels_path} has no instance annotation for it'
                if self.labels == 'instances' else
                f'the label vector of {name!r} in {self.cls_labels_path} has no class set')
    if not self.allow_empty and not labels[1:].any():
      raise DatasetError(
          f'{self.dataset} image {name} has no foreground class ({origin}); a WSSS training '
          f'image needs at least one of the {self.num_classes - 1} classes: remove it from '
          f'{self.split_file} or pass allow_empty=True',
          path=self.mask_paths[index] if self.labels == 'masks' else self.cls_labels_path,
          kind='no_foreground')
    ex: dict[str, Any] = {'image': image, 'labels': labels}
    if self.with_masks:
      ex['label'] = mask
    ex['name'] = name
    return ex, notes

  def encoded_files(self, index: int) -> dict[str, str]:
    """The file behind each image key of example ``index``: a preparation
    (``contrastjax.data.prepared``) stores it as it is when it decodes to the same array."""
    return {'image': self.image_paths[int(index) % len(self.image_paths)]}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.read_example(index)[0]


class VOCSource(WSSSSource):
  """One split of PASCAL VOC 2012 (optionally SBD-augmented) for WSSS.

  ``VOCSource(root, 'train_aug')`` is the usual training source (image-level labels from the
  cls-label file, no masks); ``VOCSource(root, 'val', with_masks=True)`` the evaluation source.
  """

  dataset = 'VOC'
  class_names = VOC_CLASSES

  def __init__(self, root: str | os.PathLike[str], split: str = 'train_aug', *,
               labels: str = 'cls_labels', with_masks: bool = False,
               split_file: str | os.PathLike[str] | None = None,
               cls_labels_path: str | os.PathLike[str] | None = None,
               mask_dir: str | None = None, allow_empty: bool = False):
    """Indexes one split.

    Args:
      root: ``VOCdevkit/VOC2012``, or a folder holding ``VOCdevkit/VOC2012`` or ``VOC2012``.
      split: List name, read from ``ImageSets/Segmentation/<split>.txt``: ``'train'``, ``'val'``,
        ``'trainval'``, ``'train_aug'``.
      labels: ``'cls_labels'`` (npy file) or ``'masks'`` (derived from the masks).
      with_masks: Whether examples carry the pixel mask ``'label'`` (evaluation).
      split_file: Explicit list file (e.g. a ``train_aug.txt`` kept elsewhere).
      cls_labels_path: Explicit cls-label npy; default: ``cls_labels.npy`` or
        ``cls_labels_onehot.npy`` in ``VOC2012/`` or ``VOC2012/ImageSets/Segmentation/``.
      mask_dir: Mask folder under ``VOC2012``; default ``SegmentationClassAug`` for
        ``train_aug``, ``SegmentationClass`` otherwise.
      allow_empty: Accept images without a foreground class (else ``no_foreground`` on read).

    Raises:
      DatasetError: See the module docstring.
      ValueError: Unknown ``labels`` mode.
    """
    self._init_common(labels, LABEL_MODES, with_masks, allow_empty)
    self.root = os.fspath(root)
    self.split = split
    layout = ('expected the official layout VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,'
              'SegmentationClassAug,ImageSets/Segmentation}')
    if not os.path.isdir(self.root):
      raise DatasetError(f'VOC root {self.root} does not exist; {layout}', path=self.root,
                         kind='missing_folder')
    candidates = [self.root, os.path.join(self.root, 'VOC2012'),
                  os.path.join(self.root, 'VOCdevkit', 'VOC2012')]
    base = next((c for c in candidates if os.path.isdir(os.path.join(c, 'JPEGImages'))), None)
    if base is None:
      raise DatasetError(
          f'VOC root {self.root} has no JPEGImages folder (looked in {candidates}); {layout}',
          path=os.path.join(self.root, 'JPEGImages'), kind='missing_folder')
    self.base = base
    sets = os.path.join(base, 'ImageSets', 'Segmentation')
    if split_file is None:
      split_file = os.path.join(sets, f'{split}.txt')
      if not os.path.isfile(split_file):
        present = sorted(f for f in os.listdir(sets) if f.endswith('.txt')) if os.path.isdir(
            sets) else []
        hint = (' train_aug.txt is not part of the VOC tar: take it from ToCo '
                '(datasets/voc/train_aug.txt), IRN (voc12/train_aug.txt) or DeepLab '
                '(list/train_aug.txt) and put it there, or pass split_file=' if split ==
                'train_aug' else '')
        raise DatasetError(f'split file {split_file} does not exist (split={split!r}); found '
                           f'{present}.{hint}', path=split_file, kind='missing_split')
    self.split_file = os.fspath(split_file)
    self.names: tuple[str, ...] = tuple(read_id_list(self.split_file))

    image_dir = os.path.join(base, 'JPEGImages')
    _check_files(self.names, image_dir, '.jpg', 'image', self.split_file)
    self.image_paths: tuple[str, ...] = tuple(os.path.join(image_dir, f'{n}.jpg')
                                              for n in self.names)
    if self.needs_masks:
      self.mask_dir = mask_dir or ('SegmentationClassAug' if split == 'train_aug'
                                   else 'SegmentationClass')
      folder = os.path.join(base, self.mask_dir)
      _require_folder(folder, 'VOC mask', (
          'SegmentationClassAug (SBD masks, 0..20 and 255) comes as SegmentationClassAug.zip '
          '(see the ToCo README): unzip it into VOCdevkit/VOC2012' if
          self.mask_dir == 'SegmentationClassAug' else layout))
      _check_files(self.names, folder, '.png', 'mask', self.split_file)
      self.mask_paths = tuple(os.path.join(folder, f'{n}.png') for n in self.names)
    if labels == 'cls_labels':
      self.cls_labels_path = self._find_cls_labels(cls_labels_path, (base, sets))
      self._cls = load_cls_labels(self.cls_labels_path, self.names, len(VOC_CLASSES) - 1,
                                  int_key=voc_int_key, where=self.split_file)


def _import_pycocotools():
  try:
    from pycocotools import coco as coco_api  # pylint: disable=g-import-not-at-top
    from pycocotools import mask as mask_api  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "COCOSegSource(labels='instances') reads the COCO instance annotations with pycocotools, "
        'which is not installed: `pip install pycocotools` (an optional dependency; '
        "labels='cls_labels' or 'masks' need nothing extra)") from e
  return coco_api, mask_api


def render_instance_mask(height: int, width: int,
                         annotations: Sequence[tuple[int, float, Any]]) -> np.ndarray:
  """Class mask uint8 ``[H, W]`` from ``(class, area, segmentation)`` instances (coco2voc rule).

  Instances are painted from the smallest area up and a pixel keeps the first class it gets, so a
  small object is not hidden by a larger overlapping one (coco2voc ``annotations_to_seg``).
  Polygons, uncompressed and compressed RLE are decoded with pycocotools.
  """
  _, mask_api = _import_pycocotools()
  out = np.zeros((height, width), np.uint8)
  for cls, _, segm in sorted(annotations, key=lambda a: a[1]):
    if isinstance(segm, list):
      polys = [p for p in segm if len(p) >= 6]
      if not polys:
        continue
      rle = mask_api.merge(mask_api.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and isinstance(segm.get('counts'), list):
      rle = mask_api.frPyObjects(segm, height, width)
    else:
      rle = segm
    m = mask_api.decode(rle).astype(bool)
    out[m & (out == 0)] = cls
  return out


class COCOSegSource(WSSSSource):
  """One split of COCO 2014 for WSSS (ToCo's VOC-style layout), same contract as VOCSource."""

  dataset = 'COCO'
  class_names = COCO_CLASSES

  def __init__(self, root: str | os.PathLike[str], split: str = 'train', *,
               labels: str = 'cls_labels', with_masks: bool = False,
               image_set: str | None = None,
               split_file: str | os.PathLike[str] | None = None,
               cls_labels_path: str | os.PathLike[str] | None = None,
               instances_json: str | os.PathLike[str] | None = None,
               allow_empty: bool = False):
    """Indexes one split.

    Args:
      root: The ``MSCOCO`` folder.
      split: List name (``'train'``, ``'val'``, ``'val_part'`` as ToCo).
      labels: ``'cls_labels'``, ``'masks'`` or ``'instances'`` (pycocotools).
      with_masks: Whether examples carry the pixel mask ``'label'``.
      image_set: Sub-folder of ``JPEGImages``/``SegmentationClass``; default ``train2014`` for
        splits starting with ``train``, ``val2014`` for ``val``.
      split_file: Explicit list file; default ``<root>/ImageSets/Segmentation/<split>.txt`` or
        ``<root>/<split>.txt``.
      cls_labels_path: Explicit cls-label npy; default ``cls_labels.npy`` or
        ``cls_labels_onehot.npy`` in the root.
      instances_json: For ``labels='instances'``; default
        ``<root>/annotations/instances_<image_set>.json``.
      allow_empty: Accept images without a foreground class.

    Raises:
      DatasetError: See the module docstring.
      ImportError: ``labels='instances'`` without pycocotools.
      ValueError: Unknown ``labels`` mode or an ``image_set`` that cannot be derived.
    """
    self._init_common(labels, COCO_LABEL_MODES, with_masks, allow_empty)
    self.root = os.fspath(root)
    self.split = split
    layout = ('expected ToCo\'s layout MSCOCO/{JPEGImages,SegmentationClass}/{train2014,val2014}/ '
              'with <root>/<split>.txt')
    if not os.path.isdir(self.root):
      raise DatasetError(f'COCO root {self.root} does not exist; {layout}', path=self.root,
                         kind='missing_folder')
    if image_set is None:
      if split.startswith('train'):
        image_set = 'train2014'
      elif split.startswith('val'):
        image_set = 'val2014'
      else:
        raise ValueError(f'cannot tell the image folder of split {split!r}; pass '
                         "image_set='train2014' or 'val2014'")
    image_dir = os.path.join(self.root, 'JPEGImages', image_set)
    short = image_set[:-4] if image_set.endswith('2014') else None
    if not os.path.isdir(image_dir) and short and os.path.isdir(
        os.path.join(self.root, 'JPEGImages', short)):
      image_set = short                               # the ToCo README's spelling
      image_dir = os.path.join(self.root, 'JPEGImages', image_set)
    _require_folder(image_dir, 'COCO image', layout)
    self.image_set = image_set

    if split_file is None:
      tried = [os.path.join(self.root, 'ImageSets', 'Segmentation', f'{split}.txt'),
               os.path.join(self.root, f'{split}.txt')]
      split_file = next((p for p in tried if os.path.isfile(p)), None)
      if split_file is None:
        raise DatasetError(
            f'no split file for split={split!r} (looked for {tried}); ToCo ships '
            'datasets/coco/{train,val}.txt: copy them to the root or pass split_file=',
            path=tried[-1], kind='missing_split')
    self.split_file = os.fspath(split_file)
    self.names = tuple(read_id_list(self.split_file))
    _check_files(self.names, image_dir, '.jpg', 'image', self.split_file)
    self.image_paths = tuple(os.path.join(image_dir, f'{n}.jpg') for n in self.names)

    self._instances: tuple[tuple[int, int, tuple[tuple[int, float, Any], ...]], ...] | None = None
    if labels == 'instances':
      json_set = image_set if image_set.endswith('2014') else f'{image_set}2014'
      json_path = os.fspath(instances_json or os.path.join(
          self.root, 'annotations', f'instances_{json_set}.json'))
      self.cls_labels_path = json_path
      self._cls, self._instances = self._load_instances(json_path)
    elif labels == 'cls_labels':
      self.cls_labels_path = self._find_cls_labels(cls_labels_path, (self.root,))
      self._cls = load_cls_labels(self.cls_labels_path, self.names, len(COCO_CLASSES) - 1,
                                  int_key=coco_int_key, where=self.split_file)
    if self.needs_masks and labels != 'instances':
      folder = os.path.join(self.root, 'SegmentationClass', image_set)
      _require_folder(folder, 'COCO mask', layout + ' (masks: coco2voc or the ToCo README)')
      _check_files(self.names, folder, '.png', 'mask', self.split_file)
      self.mask_paths = tuple(os.path.join(folder, f'{n}.png') for n in self.names)

  def _load_instances(self, path: str):
    coco_api, _ = _import_pycocotools()
    if not os.path.isfile(path):
      raise DatasetError(f'instance annotation file {path} does not exist; expected the official '
                         'annotations_trainval2014.zip unpacked into <root>/annotations/',
                         path=path, kind='missing_file')
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_api.COCO(path)
      cat_ids = sorted(coco.getCatIds())
      cat_names = [coco.cats[c]['name'] for c in cat_ids]
    except (OSError, ValueError, AssertionError, KeyError, TypeError) as e:
      raise DatasetError(f'cannot read instance annotations {path} ({type(e).__name__}: {e}); '
                         'expected an official COCO instances_*.json', path=path,
                         kind='unreadable') from e
    if tuple(cat_ids) != COCO_CATEGORY_IDS or tuple(cat_names) != COCO_CLASSES[1:]:
      diff = [(c, n) for c, n in zip(cat_ids, cat_names)
              if c not in COCO_CATEGORY_IDS or COCO_CLASSES[COCO_CATEGORY_IDS.index(c) + 1] != n]
      raise DatasetError(
          f'instance annotations {path} have {len(cat_ids)} categories (first unexpected: '
          f'{diff[:5]}); expected the 80 COCO categories', path=path, kind='bad_annotations')
    to_class = {c: k + 1 for k, c in enumerate(cat_ids)}
    by_stem = {os.path.splitext(img['file_name'])[0]: img for img in coco.imgs.values()}
    missing = [n for n in self.names if n not in by_stem]
    if missing:
      raise DatasetError(
          f'instance annotations {path} lack {len(missing)} of the {len(self.names)} ids of '
          f'{self.split_file} (first: {missing[:10]}); expected an image entry (file_name '
          '<id>.jpg) for every listed id', path=path, kind='missing_label')
    rows = np.zeros((len(self.names), len(COCO_CLASSES)), np.float32)
    rows[:, 0] = 1.0
    records = []
    for i, name in enumerate(self.names):
      img = by_stem[name]
      anns = tuple((to_class[a['category_id']], float(a.get('area', 0.0)), a['segmentation'])
                   for a in coco.imgToAnns.get(img['id'], ()))
      for cls, _, _ in anns:
        rows[i, cls] = 1.0
      records.append((int(img['height']), int(img['width']), anns))
    return rows, tuple(records)

  def read_mask(self, index: int, image: np.ndarray) -> np.ndarray:
    if self._instances is None:
      return super().read_mask(index, image)
    h, w, anns = self._instances[index]
    if (h, w) != image.shape[:2]:
      raise DatasetError(
          f'image {self.image_paths[index]} is {image.shape[1]}x{image.shape[0]} (WxH) but '
          f'{self.cls_labels_path} gives {w}x{h} for {self.names[index]}; expected equal sizes',
          path=self.image_paths[index], kind='size_mismatch')
    return render_instance_mask(h, w, anns)


# ------------------------------------------------------------------------------------------------
# Whole-dataset validation.
# ------------------------------------------------------------------------------------------------


def validate(source: Any) -> ValidationReport:
  """Reads every example and reports all problems at once, counted per kind.

  Works for :class:`WSSSSource` and for any source with the same contract (the synthetic scenes):
  besides the reader's own checks it verifies dtypes, shapes, ``labels[0] = 1``, 0/1 values and
  mask values. Warnings (readable, but worth knowing): image conversions (``grayscale_to_rgb``,
  ``alpha_dropped``, ``<mode>_to_rgb``) and ``cls_label_mask_mismatch`` (an example whose label
  vector differs from the classes present in its mask).

  Returns:
    A :class:`~contrastjax.data.sources.medseg.ValidationReport`; ``report.counts`` and
    ``report.summary()`` give the counts per kind.
  """
  report = ValidationReport(source=repr(source), num_examples=len(source))
  warnings: dict[str, list[str]] = collections.defaultdict(list)
  names = getattr(source, 'names', None)
  names = list(names) if names is not None else [str(i) for i in range(len(source))]
  num_classes = len(getattr(source, 'class_names', ())) or None
  for i in range(len(source)):
    name = str(names[i])
    where = f'example {i} ({name})'
    try:
      if hasattr(source, 'read_example'):
        ex, notes = source.read_example(i)
      else:
        ex, notes = source[i], ()
      for note in notes:
        warnings[note].append(name)
      image, labels = ex['image'], ex['labels']
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DatasetError(f'{where}: image is {image.dtype} {image.shape}; expected uint8 '
                           '[H, W, 3]', kind='bad_image')
      c = num_classes or labels.shape[-1]
      if (labels.dtype != np.float32 or labels.shape != (c,) or labels[0] != 1.0
          or not np.isin(labels, (0.0, 1.0)).all()):
        raise DatasetError(f'{where}: labels are {labels.dtype} {labels.shape} {labels.tolist()}; '
                           f'expected float32 [{c}] of 0/1 with background (index 0) = 1',
                           kind='bad_labels')
      if 'label' in ex:
        mask = ex['label']
        if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
          raise DatasetError(f'{where}: mask is {mask.dtype} {mask.shape}; expected uint8 '
                             f'{image.shape[:2]}', kind='bad_mask')
        if ((mask >= c) & (mask != IGNORE_INDEX)).any():
          raise DatasetError(f'{where}: mask has values {np.unique(mask)[:10].tolist()}; '
                             f'expected 0..{c - 1} or {IGNORE_INDEX}', kind='bad_mask')
        if not np.array_equal(labels_from_mask(mask, c), labels):
          warnings['cls_label_mask_mismatch'].append(name)
    except DatasetError as e:
      report.problems.append((i, name, e.kind, str(e)))
  report.warnings = dict(warnings)
  return report
