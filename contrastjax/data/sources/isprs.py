"""ISPRS Potsdam / Vaihingen 512x512 crops in the layout SiamSeg's configs read.

The layout (``configs/_base_/datasets/uda_*_512x512.py``; docs/methods/siamseg.md), written by
``python -m contrastjax.data.tools.isprs_tiles``::

  <data>/Potsdam_IRRG_DA/            (or Potsdam_RGB_DA, Vaihingen_IRRG_DA)
    img_dir/{train,val}/<crop>.png   # 512x512 RGB or IRRG (file channel order)
    ann_dir/{train,val}/<crop>.png   # 8-bit class indices 0..6 (0 = boundary/unknown)
    train.txt, val.txt               # crop basenames, no extension (optional here)

Labels are those of mmseg's converters: 0 = black/boundary/any other colour, 1 impervious
surfaces, 2 building, 3 low vegetation, 4 tree, 5 car, 6 clutter; reading applies
``reduce_zero_label=True`` (0 -> 255 ignored, k -> k - 1), so the 6 classes are 0..5 and clutter
is evaluated like every other class (mmseg ``ISPRSDataset``/``PotsdamDataset``).

Without a split file every crop of ``img_dir/<split>`` is used (what mmseg does without
``split=``); with one, exactly the listed crops. Problems raise
:class:`~contrastjax.data.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import os

from contrastjax.data.errors import DatasetError
from contrastjax.data.sources.loveda import LabelFolderSource
from contrastjax.data.sources.medseg import read_split

CLASSES = ('impervious_surface', 'building', 'low_vegetation', 'tree', 'car', 'clutter')
#: mmseg ``ISPRSDataset.PALETTE`` (RGB): the official label colours.
PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0),
           (255, 0, 0))
#: Folder names the SiamSeg configs use under ``data/``.
FOLDERS = {
    ('potsdam', 'irrg'): 'Potsdam_IRRG_DA',
    ('potsdam', 'rgb'): 'Potsdam_RGB_DA',
    ('vaihingen', 'irrg'): 'Vaihingen_IRRG_DA',
}


class ISPRSSource(LabelFolderSource):
  """One split of a tiled ISPRS dataset: ``ISPRSSource('<data>/Potsdam_IRRG_DA', 'train')``."""

  def __init__(self, root: str | os.PathLike[str], split: str = 'train', *,
               use_split_file: bool | None = None):
    """Indexes ``<root>/{img_dir,ann_dir}/<split>``.

    Args:
      root: The dataset folder.
      split: ``'train'`` or ``'val'``.
      use_split_file: True: ``<root>/<split>.txt`` must exist and is used; False: every crop in
        the folder; None (default): the split file if it exists.

    Raises:
      DatasetError: Missing folder or split file, unmatched crops, listed crops without files.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise DatasetError(f'ISPRS dataset folder {root} does not exist; expected '
                         '<root>/{img_dir,ann_dir}/{train,val}/ (make it with `python -m '
                         'contrastjax.data.tools.isprs_tiles`)', path=root, kind='missing_folder')
    self.root, self.split = root, split
    split_file = os.path.join(root, f'{split}.txt')
    if use_split_file is None:
      use_split_file = os.path.isfile(split_file)
    names = read_split(split_file) if use_split_file else None
    super().__init__(os.path.join(root, 'img_dir', split), os.path.join(root, 'ann_dir', split),
                     num_classes=len(CLASSES), names=names,
                     names_file=split_file if use_split_file else None,
                     what=f'ISPRS {os.path.basename(os.path.normpath(root))} {split}')

  def __repr__(self) -> str:
    return f'ISPRSSource({self.root!r}, {self.split!r}, n={len(self)})'
