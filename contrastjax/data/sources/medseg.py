"""Binary medical-segmentation datasets in the ConDSeg reference layout.

The layout (ConDSeg README, `utils/run_engine.py` ``load_names``)::

  <root>/
    images/<id>.<ext>      # RGB images
    masks/<id>.<ext>       # grayscale masks, same basename as the image
    train.txt              # one id per line, no extension
    val.txt
    test.txt               # optional (Kvasir-Sessile, ISIC-2017)

Differences from the reference reader, all deliberate:

* The last line of a split file is kept even without a trailing newline (the reference's
  ``split("\\n")[:-1]`` silently drops it). Blank lines are skipped, whitespace is stripped.
* Images and masks may be ``.jpg/.jpeg/.png/.bmp/.tif/.tiff`` (found by basename, case-insensitive
  extension); the reference hard-codes ``.jpg``. Two files with the same basename in one folder
  are an error (ambiguous), not a silent pick.
* Masks are binarised to {0, 255} when read (see :func:`binarize_mask`); the reference keeps the
  raw JPEG values, which breaks instance-labelled GlaS masks (ConDSeg issue #18).
* Every bad input raises :class:`~contrastjax.data.errors.DatasetError` naming the file.
  Image or mask files that no split file of the root lists are named in a logged warning.

Images are decoded with Pillow; EXIF orientation is applied (as ``cv2.imread`` does).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageOps

from contrastjax.data.errors import DatasetError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
BINARIZE_RULES = ('auto', 'threshold', 'nonzero')
# A colour (3-channel) mask is accepted as gray when at most this fraction of its pixels has a
# channel spread (max - min over R, G, B) above _GRAY_SPREAD. JPEG chroma noise stays far below.
_GRAY_SPREAD = 48
_GRAY_OUTLIER_FRACTION = 0.001
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # cv2 / ITU-R BT.601 weights.
# A 0/255 mask has intermediate values only along object edges (JPEG ringing, antialiasing).
# More than this fraction of pixels in [32, 223] means the file is a photo, not a mask.
_MAX_MIDTONE_FRACTION = 0.25


# ------------------------------------------------------------------------------------------------
# Dataset metadata.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MedSegInfo:
  """Facts about one dataset (ConDSeg README; docs/methods/condseg.md).

  Attributes:
    name: Key in :data:`DATASETS`.
    folder: Folder name under the data root in the reference layout.
    modality: Imaging modality.
    target: What is segmented.
    num_examples: Total number of labelled images.
    splits: Split name -> number of ids in ``<split>.txt``.
    train_split: Split used for training.
    val_split: Split used for model selection (the reference evaluates ``val.txt``).
    test_split: Split used for the reported numbers.
    image_ext: Image extension of the official download.
    mask_ext: Mask extension of the official download.
    binarize: Mask binarisation rule for :class:`MedSegSource`.
    paper: Paper numbers in percent (``miou``, ``dice``, ``recall``, ``precision``; ``None``
      where the paper gives none).
    notes: Provenance and caveats.
  """

  name: str
  folder: str
  modality: str
  target: str
  num_examples: int
  splits: Mapping[str, int]
  train_split: str
  val_split: str
  test_split: str
  image_ext: str
  mask_ext: str
  binarize: str
  paper: Mapping[str, float | None]
  notes: str = ''


DATASETS: dict[str, MedSegInfo] = {
    'kvasir_seg': MedSegInfo(
        name='kvasir_seg', folder='Kvasir-SEG', modality='endoscopy', target='polyp',
        num_examples=1000, splits={'train': 880, 'val': 120}, train_split='train',
        val_split='val', test_split='val', image_ext='.jpg', mask_ext='.jpg',
        binarize='threshold',
        paper={'miou': 84.6, 'dice': 90.5, 'recall': 92.3, 'precision': 91.7},
        notes=('ColonSegNet/TGANet train.txt/val.txt; val doubles as test. Masks are JPEG '
               '(3-channel, near-gray, noisy edges).')),
    'kvasir_sessile': MedSegInfo(
        name='kvasir_sessile', folder='Kvasir-Sessile', modality='endoscopy', target='polyp',
        num_examples=196, splits={'train': 156, 'val': 20, 'test': 20}, train_split='train',
        val_split='val', test_split='test', image_ext='.jpg', mask_ext='.jpg',
        binarize='threshold',
        paper={'miou': 81.2, 'dice': 89.1, 'recall': 90.1, 'precision': 90.0},
        notes=('Random 156/20/20 split as in TGANet; the authors did not release it '
               '(issues #12, #20), so numbers on another split differ.')),
    'glas': MedSegInfo(
        name='glas', folder='GlaS', modality='histology (WSI)', target='gland',
        num_examples=165, splits={'train': 85, 'val': 80}, train_split='train',
        val_split='val', test_split='val', image_ext='.bmp', mask_ext='.bmp',
        binarize='nonzero',
        paper={'miou': 85.1, 'dice': 91.6, 'recall': 93.5, 'precision': 90.5},
        notes=('Official 85/80 split (testA+testB as val). Masks are instance labels 0..K '
               '(official names <id>_anno.bmp: pass mask_suffix="_anno" or rename); foreground '
               'is label > 0 (issue #18).')),
    'isic2016': MedSegInfo(
        name='isic2016', folder='ISIC2016', modality='dermoscopy', target='skin lesion',
        num_examples=1279, splits={'train': 900, 'val': 379}, train_split='train',
        val_split='val', test_split='val', image_ext='.jpg', mask_ext='.png',
        binarize='threshold',
        paper={'miou': 86.8, 'dice': 92.5, 'recall': None, 'precision': None},
        notes=('Official 900/379 split. Official masks are <id>_Segmentation.png: pass '
               'mask_suffix="_Segmentation" or rename.')),
    'isic2017': MedSegInfo(
        name='isic2017', folder='ISIC2017', modality='dermoscopy', target='skin lesion',
        num_examples=2750, splits={'train': 2000, 'val': 150, 'test': 600},
        train_split='train', val_split='val', test_split='test', image_ext='.jpg',
        mask_ext='.png', binarize='threshold',
        paper={'miou': 80.9, 'dice': 88.3, 'recall': None, 'precision': None},
        notes=('Official 2000/150/600 split. How the authors combined val and test is not '
               'visible in their code (issue #12). Masks are <id>_Segmentation.png.')),
}


# ------------------------------------------------------------------------------------------------
# Split files and file lookup.
# ------------------------------------------------------------------------------------------------


def read_split(path: str | os.PathLike[str]) -> list[str]:
  """Reads a split file: one id per line, blank lines skipped, whitespace stripped.

  The last line is kept whether or not the file ends with a newline.

  Args:
    path: The split file, e.g. ``<root>/train.txt``.

  Returns:
    The ids in file order.

  Raises:
    DatasetError: The file is missing, unreadable, empty, or lists an id twice.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DatasetError(f'split file {path} does not exist; expected a text file with one image '
                       'id (basename without extension) per line', path=path, kind='missing_split')
  try:
    with open(path, encoding='utf-8-sig') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f'cannot read split file {path} ({e}); expected UTF-8 text with one id '
                       'per line', path=path, kind='unreadable') from e
  ids = [line.strip() for line in text.splitlines()]
  ids = [i for i in ids if i]
  if not ids:
    raise DatasetError(f'split file {path} lists no ids; expected one image id per line',
                       path=path, kind='empty_split')
  counts = collections.Counter(ids)
  dups = sorted(i for i, c in counts.items() if c > 1)
  if dups:
    raise DatasetError(f'split file {path} lists {len(dups)} id(s) more than once '
                       f'(first: {dups[:5]}); expected each id once', path=path,
                       kind='duplicate_id')
  return ids


def _index_folder(folder: str, role: str) -> dict[str, list[str]]:
  """Maps basename -> file names with an accepted extension in ``folder``."""
  if not os.path.isdir(folder):
    raise DatasetError(f'{role} folder {folder} does not exist; expected the layout '
                       '<root>/{images,masks}/<id>.<ext> with <root>/<split>.txt',
                       path=folder, kind='missing_folder')
  index: dict[str, list[str]] = collections.defaultdict(list)
  for name in os.listdir(folder):
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS:
      index[stem].append(name)
  return index


def _listed_ids(root: str) -> set[str]:
  """Every id of every ``<root>/*.txt`` split file (read leniently: a broken split file is
  reported when that split is read, not here)."""
  ids: set[str] = set()
  for name in os.listdir(root):
    if name.endswith('.txt'):
      try:
        with open(os.path.join(root, name), encoding='utf-8-sig') as f:
          ids.update(line.strip() for line in f)
      except (OSError, UnicodeDecodeError):
        continue
  return ids


def _warn_unlisted(root: str, image_index: Mapping[str, list[str]],
                   mask_index: Mapping[str, list[str]], mask_suffix: str,
                   folders: tuple[str, str] = ('images', 'masks')) -> int:
  """Logs a warning naming the image and mask files that no split file of ``root`` lists.

  Such files are read by no split. The reference layouts list every file (e.g. Kvasir-SEG's
  880 + 120 = 1000), but the official ISIC downloads also hold ``<id>_superpixels.png`` next
  to the images, so an unlisted file is a warning, not an error. Returns their number.
  """
  listed = _listed_ids(root)
  extra = sorted(f'{folders[0]}/{f}' for stem, files in image_index.items()
                 if stem not in listed for f in files)
  extra += sorted(f'{folders[1]}/{f}' for stem, files in mask_index.items()
                  if (stem[:-len(mask_suffix)] if mask_suffix and stem.endswith(mask_suffix)
                      else stem) not in listed for f in files)
  if extra:
    logging.warning('%s: %d image/mask file(s) are listed in no split file (%s/*.txt) and are '
                    'read by no split; first: %s', root, len(extra), root, extra[:5])
  return len(extra)


def _lookup(index: Mapping[str, list[str]], folder: str, key: str, missing: list[str],
            ambiguous: list[str]) -> str | None:
  files = index.get(key, [])
  if not files:
    missing.append(key)
    return None
  if len(files) > 1:
    ambiguous.append(f'{key} -> {sorted(files)}')
    return None
  return os.path.join(folder, files[0])


# ------------------------------------------------------------------------------------------------
# Decoding and mask binarisation.
# ------------------------------------------------------------------------------------------------


def _open(path: str, role: str) -> Image.Image:
  """Decodes a file fully (so truncation is detected now) and applies EXIF orientation."""
  try:
    with Image.open(path) as im:
      im.load()
      im = ImageOps.exif_transpose(im)
  except FileNotFoundError as e:
    raise DatasetError(f'{role} file {path} does not exist (it was there when the dataset was '
                       'indexed)', path=path, kind='missing_file') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(f'cannot decode {role} file {path} ({type(e).__name__}: {e}); expected a '
                       f'complete {"/".join(IMAGE_EXTENSIONS)} image', path=path,
                       kind='unreadable') from e
  return im


#: Pillow modes of 16/32-bit single-channel images.
WIDE_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')


def wide_pixels(im: Image.Image) -> str | None:
  """The mode (or raw mode) of an image of more than 8 bits per channel, else None: a
  16/32-bit mode, or a 16-bit-per-channel RGB(A) PNG, which Pillow opens as 8-bit ``RGB``
  (raw mode ``RGB;16B``) and ``convert`` would clip without a word."""
  tile = getattr(im, 'tile', None)  # ImageFile only; images made in memory have none
  args = tile[0].args if tile else None
  raw = args if isinstance(args, str) else (
      args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else '')
  if im.mode in WIDE_MODES:
    return im.mode
  return raw if ';16' in raw else None


def decode_image(path: str) -> np.ndarray:
  """Reads an 8-bit image as uint8 RGB ``[H, W, 3]`` (gray/palette are expanded, alpha dropped).

  Args:
    path: Image file.

  Returns:
    The image.

  Raises:
    DatasetError: The file cannot be decoded or is not 8-bit.
  """
  im = _open(path, 'image')
  wide = wide_pixels(im)
  if wide:
    raise DatasetError(f'image file {path} has {wide} pixels (16/32-bit); expected an 8-bit '
                       'RGB or grayscale image', path=path, kind='bad_image')
  if im.mode != 'RGB':
    im = im.convert('RGB')
  return np.asarray(im, dtype=np.uint8)


def decode_mask(path: str) -> np.ndarray:
  """Reads a mask as uint8 ``[H, W]`` raw values (not yet binarised).

  8-bit grayscale is read as is; 1-bit masks become {0, 255}; palette masks give their palette
  indices (label masks); a 3/4-channel mask is accepted only when it is gray (R = G = B up to JPEG
  noise) and is then converted with the ITU-R BT.601 luma weights, as ``cv2.IMREAD_GRAYSCALE``.

  Args:
    path: Mask file.

  Returns:
    The raw mask values.

  Raises:
    DatasetError: The file cannot be decoded, is 16/32-bit, or is a colour (non-gray) image.
  """
  im = _open(path, 'mask')
  mode = im.mode
  if mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
    raise DatasetError(f'mask file {path} has {mode} pixels (16/32-bit); expected an 8-bit '
                       'grayscale mask (0/255, or instance labels 0..K)', path=path,
                       kind='bad_mask')
  if mode == 'L' or mode == 'P':
    return np.asarray(im, dtype=np.uint8)
  if mode == '1':
    return np.asarray(im.convert('L'), dtype=np.uint8)
  if mode == 'LA':
    return np.asarray(im.getchannel('L'), dtype=np.uint8)
  if mode not in ('RGB', 'RGBA'):
    im = im.convert('RGB')
  rgb = np.asarray(im, dtype=np.uint8)[..., :3]
  spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
  outliers = float(np.mean(spread > _GRAY_SPREAD))
  if outliers > _GRAY_OUTLIER_FRACTION:
    raise DatasetError(
        f'mask file {path} is a colour image ({mode}, {outliers:.1%} of pixels have channel '
        f'spread > {_GRAY_SPREAD}); expected a grayscale mask (0/255, or instance labels 0..K)',
        path=path, kind='bad_mask')
  gray = rgb.astype(np.float32) @ _LUMA
  return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def binarize_mask(mask: np.ndarray, rule: str = 'auto') -> np.ndarray:
  """Binarises raw mask values to uint8 {0, 255}.

  Rules:

  * ``'threshold'``: foreground = value > 127. For 0/255 masks, including JPEG masks whose
    edges and flat areas carry compression noise (Kvasir, converted ISIC).
  * ``'nonzero'``: foreground = value > 0. For label masks (GlaS instance labels 0..K, 0/1
    masks, palette indices).
  * ``'auto'`` (per file): ``'threshold'`` if the mask's maximum is > 127, else ``'nonzero'``. A
    0/255 mask always contains 255-ish foreground unless it is empty, and an empty mask is
    exactly 0 even after JPEG compression (flat blocks are coded exactly), so it stays empty;
    a label mask has values << 128 (GlaS has at most a few dozen glands per image). The rule
    fails only for a mask with more than 127 instance labels or a 0/255 mask whose foreground is
    so tiny that JPEG pulled its peak below 128; use an explicit rule for such data.

  Args:
    mask: Raw uint8 mask ``[H, W]``.
    rule: One of :data:`BINARIZE_RULES`.

  Returns:
    uint8 ``[H, W]`` with values in {0, 255}.

  Raises:
    ValueError: Unknown rule.
  """
  if rule == 'auto':
    rule = 'threshold' if int(mask.max(initial=0)) > 127 else 'nonzero'
  if rule == 'threshold':
    fg = mask > 127
  elif rule == 'nonzero':
    fg = mask > 0
  else:
    raise ValueError(f'binarize={rule!r}; expected one of {BINARIZE_RULES}')
  return np.where(fg, np.uint8(255), np.uint8(0))


# ------------------------------------------------------------------------------------------------
# The source.
# ------------------------------------------------------------------------------------------------


class MedSegSource:
  """Random-access source over one split of a dataset in the reference layout.

  ``source[i]`` returns ``{'image': uint8 [H, W, 3] RGB, 'mask': uint8 [H, W] in {0, 255},
  'name': str}``. Construction checks (cheaply) that the folders and split file exist, that the
  split is non-empty without duplicates, and that every id has exactly one image and one mask.
  Reading checks decodability, bit depth, that masks are gray and mask-like (not a photo), and
  that image and mask sizes agree. All
  problems raise :class:`DatasetError` naming the file.

  The object holds only paths, so it pickles cheaply into grain worker processes.
  """

  on_disk = True  # read in full at start-up by contrastjax.data.validation

  def __init__(self, root: str | os.PathLike[str], split: str = 'train', *,
               binarize: str = 'auto', mask_suffix: str = '', images_dir: str = 'images',
               masks_dir: str = 'masks'):
    """Indexes one split.

    Args:
      root: Dataset folder holding ``images/``, ``masks/`` and ``<split>.txt``.
      split: Split name; the ids are read from ``<root>/<split>.txt`` (e.g. ``'train'``,
        ``'val'``, ``'test'``, or ``'val_<name>'`` as the reference's ``val_name``).
      binarize: Mask binarisation rule, see :func:`binarize_mask`.
      mask_suffix: Appended to the id to find the mask (``'_anno'`` for raw GlaS,
        ``'_Segmentation'`` for raw ISIC); ``''`` for the reference layout.
      images_dir: Image folder name under ``root``.
      masks_dir: Mask folder name under ``root``.

    Raises:
      DatasetError: Missing folder or split file, empty split, duplicate id, or an id without
        (or with more than one) image or mask file.
      ValueError: Unknown ``binarize`` rule.
    """
    if binarize not in BINARIZE_RULES:
      raise ValueError(f'binarize={binarize!r}; expected one of {BINARIZE_RULES}')
    self.root = os.fspath(root)
    self.split = split
    self.binarize = binarize
    self.mask_suffix = mask_suffix
    if not os.path.isdir(self.root):
      raise DatasetError(f'dataset folder {self.root} does not exist; expected <root>/images/, '
                         '<root>/masks/ and <root>/<split>.txt', path=self.root,
                         kind='missing_folder')
    self.split_file = os.path.join(self.root, f'{split}.txt')
    if not os.path.isfile(self.split_file):
      present = sorted(f for f in os.listdir(self.root) if f.endswith('.txt'))
      raise DatasetError(f'split file {self.split_file} does not exist (split={split!r}); found '
                         f'split files {present}', path=self.split_file, kind='missing_split')
    ids = read_split(self.split_file)
    image_dir = os.path.join(self.root, images_dir)
    mask_dir = os.path.join(self.root, masks_dir)
    image_index = _index_folder(image_dir, 'image')
    mask_index = _index_folder(mask_dir, 'mask')

    missing_img: list[str] = []
    missing_mask: list[str] = []
    ambiguous: list[str] = []
    images, masks = [], []
    for i in ids:
      images.append(_lookup(image_index, image_dir, i, missing_img, ambiguous))
      masks.append(_lookup(mask_index, mask_dir, i + mask_suffix, missing_mask, ambiguous))
    problems = []
    for what, folder, lst in (('image', image_dir, missing_img), ('mask', mask_dir, missing_mask)):
      if lst:
        hint = ''
        if any(os.path.splitext(m)[1].lower() in IMAGE_EXTENSIONS for m in lst):
          hint = ' (ids in split files must not carry an extension)'
        problems.append(f'{len(lst)} id(s) of {self.split_file} have no {what} file '
                        f'{folder}/<id>{mask_suffix if what == "mask" else ""}'
                        f'{{{",".join(IMAGE_EXTENSIONS)}}}{hint}; first: {lst[:10]}')
    if ambiguous:
      problems.append(f'{len(ambiguous)} basename(s) match more than one file, expected exactly '
                      f'one per id: {ambiguous[:10]}')
    if problems:
      kind = 'ambiguous_file' if ambiguous and not (missing_img or missing_mask) else 'missing_file'
      raise DatasetError('; '.join(problems), path=self.split_file, kind=kind)
    self.names: tuple[str, ...] = tuple(ids)
    self.image_paths: tuple[str, ...] = tuple(images)
    self.mask_paths: tuple[str, ...] = tuple(masks)
    self.unlisted = _warn_unlisted(self.root, image_index, mask_index, mask_suffix,
                                   (images_dir, masks_dir))

  def __len__(self) -> int:
    return len(self.names)

  def __repr__(self) -> str:
    return (f'MedSegSource(root={self.root!r}, split={self.split!r}, n={len(self)}, '
            f'binarize={self.binarize!r})')

  def _check_mask_values(self, raw: np.ndarray, path: str) -> None:
    """Rejects masks the binarisation rule cannot read: a grayscale photo in place of a
    0/255 mask (rules 'auto'/'threshold'), and under 'threshold' a label mask (e.g. 0/1)
    whose foreground would silently become empty (ConDSeg issue #18)."""
    peak = int(raw.max(initial=0))
    if self.binarize == 'threshold' and 0 < peak <= 127:
      raise DatasetError(
          f'mask file {path} has values {np.unique(raw)[:8].tolist()} (maximum {peak}), but '
          "the binarisation rule is 'threshold' (foreground = value > 127): its foreground "
          "would become empty. For label masks (0/1, 0..K) set config.data.binarize='nonzero' "
          "(or 'auto', which picks the rule per file)", path=path,
          kind='label_mask_under_threshold_rule')
    if self.binarize == 'nonzero' or peak <= 127:
      return
    midtones = float(np.mean((raw >= 32) & (raw <= 223)))
    if midtones > _MAX_MIDTONE_FRACTION:
      raise DatasetError(
          f'mask file {path} has {midtones:.0%} of its pixels in [32, 223]; expected a binary '
          '0/255 mask (intermediate values only along edges) or instance labels 0..K: is it an '
          'image copied into the masks folder?', path=path, kind='bad_mask')

  def encoded_files(self, index: int) -> dict[str, str]:
    """The file behind each image key of example ``index``: a preparation
    (``contrastjax.data.prepared``) stores it as it is when it decodes to the same array."""
    return {'image': self.image_paths[int(index) % len(self.image_paths)]}

  def read_raw_mask(self, index: int) -> np.ndarray:
    """The mask of example ``index`` before binarisation (uint8 ``[H, W]``)."""
    return decode_mask(self.mask_paths[index])

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Reads example ``index``.

    Args:
      index: In ``[0, len(self))``; negative indices count from the end.

    Returns:
      ``{'image': uint8 [H, W, 3], 'mask': uint8 [H, W] in {0, 255}, 'name': str}``.

    Raises:
      IndexError: Index out of range.
      DatasetError: The image or mask is unreadable or malformed, or their sizes differ.
    """
    n = len(self.names)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    index = int(index) % n
    image_path, mask_path = self.image_paths[index], self.mask_paths[index]
    image = decode_image(image_path)
    raw = decode_mask(mask_path)
    if image.shape[:2] != raw.shape:
      raise DatasetError(
          f'image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but mask {mask_path} '
          f'is {raw.shape[1]}x{raw.shape[0]}; expected equal sizes', path=mask_path,
          kind='size_mismatch')
    self._check_mask_values(raw, mask_path)
    return {'image': image, 'mask': binarize_mask(raw, self.binarize),
            'name': self.names[index]}


# ------------------------------------------------------------------------------------------------
# Whole-dataset validation.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ValidationReport:
  """Result of :func:`validate`.

  Attributes:
    source: ``repr`` of the validated source.
    num_examples: Number of examples checked.
    problems: ``(index, name, kind, message)`` for every example that failed.
    warnings: Warning kind -> names of the examples concerned (readable but suspicious).
  """

  source: str
  num_examples: int
  problems: list[tuple[int, str, str, str]] = dataclasses.field(default_factory=list)
  warnings: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  @property
  def ok(self) -> bool:
    """True when no example failed (warnings allowed)."""
    return not self.problems

  @property
  def num_ok(self) -> int:
    """Number of examples that read cleanly."""
    return self.num_examples - len(self.problems)

  @property
  def counts(self) -> dict[str, int]:
    """Problem kind -> number of examples."""
    return dict(collections.Counter(kind for _, _, kind, _ in self.problems))

  def summary(self, max_per_kind: int = 5) -> str:
    """A human-readable multi-line summary with counts and the first messages per kind."""
    lines = [f'{self.source}: {self.num_ok}/{self.num_examples} examples OK, '
             f'{len(self.problems)} with problems']
    by_kind: dict[str, list[str]] = collections.defaultdict(list)
    for _, _, kind, msg in self.problems:
      by_kind[kind].append(msg)
    for kind, msgs in sorted(by_kind.items()):
      lines.append(f'  error {kind}: {len(msgs)}')
      lines.extend(f'    {m}' for m in msgs[:max_per_kind])
    for kind, names in sorted(self.warnings.items()):
      lines.append(f'  warning {kind}: {len(names)} (first: {names[:max_per_kind]})')
    return '\n'.join(lines)


def validate(source: Sequence[Any]) -> ValidationReport:
  """Reads every example of ``source`` and collects all problems instead of stopping at one.

  Works for any source following the contract of :class:`MedSegSource` (also the synthetic one):
  besides the reader's own checks it verifies the output dtypes, shapes and mask values.
  Warnings (not errors): empty masks. (Label masks, maximum in 1..127, under
  ``binarize='threshold'`` are errors of the reader itself: they would become empty.)

  Args:
    source: A random-access source.

  Returns:
    The report; ``report.summary()`` prints counts per problem kind.
  """
  report = ValidationReport(source=repr(source), num_examples=len(source))
  warnings: dict[str, list[str]] = collections.defaultdict(list)
  names = getattr(source, 'names', None)
  names = list(names) if names is not None else [str(i) for i in range(len(source))]
  for i in range(len(source)):
    name = str(names[i])
    try:
      ex = source[i]
      image, mask = ex['image'], ex['mask']
      where = getattr(source, 'image_paths', None)
      where = where[i] if where is not None else f'example {i} ({name})'
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise DatasetError(f'{where}: image is {image.dtype} {image.shape}; expected uint8 '
                           '[H, W, 3]', kind='bad_image')
      if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
        raise DatasetError(f'{where}: mask is {mask.dtype} {mask.shape}; expected uint8 '
                           f'{image.shape[:2]}', kind='bad_mask')
      if not np.isin(mask, (0, 255)).all():
        raise DatasetError(f'{where}: mask has values {np.unique(mask)[:10]}; expected {{0, 255}}',
                           kind='bad_mask')
      if not mask.any():
        warnings['empty_mask'].append(name)
    except DatasetError as e:
      report.problems.append((i, name, e.kind, str(e)))
  report.warnings = dict(warnings)
  return report
