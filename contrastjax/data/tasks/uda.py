"""Dataset makers for unsupervised domain adaptation (SiamSeg): LoveDA, ISPRS, synthetic aerial.

Every maker returns a :class:`~contrastjax.data.builder.DataSpec` whose ``train`` source pairs a
labelled source-domain example with an unlabelled target-domain example, as mmseg's
``UDADataset`` with ``data_strategy='total'`` (SiamSeg ``mmseg/datasets/uda_dataset.py``, spec
§4.2): the pair source has ``|S| * |T|`` entries and entry ``i`` is ``(S[i // |T|], T[i % |T|])``;
the shuffled training stream therefore draws independent uniform source and target indices.
Both examples go through the same mmseg train pipeline (:mod:`contrastjax.data.transforms.mmseg`)
with independent random draws. Evaluation splits are on the target domain (``val``), plus the
source domain's validation data (``source_val``) for diagnostics. ``DataSpec.info`` holds the
dataset's classes and palette (:data:`INFO`).

Training batches are nested, one dict per domain (``B`` = batch size, ``c`` = crop size;
leading axis ``B``)::

  {'source': {'image': float32 [B, c, c, 3],   normalised (ImageNet mean/std on 0..255)
              'label': int32   [B, c, c],      0..C-1, 255 = ignored / padding
              'index': int32   [B]},           index into the source-domain source
   'target': {'image': float32 [B, c, c, 3],
              'label': int32   [B, c, c],      only with data.carry_target_label=True
                                               (diagnostics; the reference never loads
                                               target labels for training)
              'index': int32   [B]},           index into the target-domain source
   'index':   int32   [B]}                     index of the pair

Evaluation batches: ``'image'`` float32 ``[B, H, W, 3]`` (normalised, full size: LoveDA 1024,
ISPRS 512), ``'label'`` int32 ``[B, H, W]``, ``'index'``, ``'valid'``.

``config.data`` keys (all makers):

* ``name``: ``'loveda'``, ``'isprs'`` or ``'synthetic_aerial'``;
* pipeline overrides (defaults: the reference's values for the dataset): ``img_scale``,
  ``ratio_range``, ``crop_size``, ``cat_max_ratio``, ``flip_prob``, ``photometric``;
* ``carry_target_label`` (default False).

``loveda``: ``root`` (the folder holding ``Train/`` and ``Val/``), ``source_domain``
('Rural'), ``target_domain`` ('Urban').
``isprs``: ``root`` (the ``data`` folder), ``source`` and ``target``: a dataset folder under
``root`` or a path (e.g. ``'Potsdam_IRRG_DA'``, ``'Vaihingen_IRRG_DA'``), ``use_split_files``
(None = use ``<split>.txt`` when present).
``synthetic_aerial``: ``image_size`` (64), ``num_train`` (source), ``num_target_train``
(default ``num_train``), ``num_val``, ``data_seed`` (1234), ``shift`` (1.0: the full domain
shift; 0: none; see ``contrastjax.data.synthetic.aerial.domain_style``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import grain
import numpy as np

from contrastjax.data import prepared
from contrastjax.data.builder import DatasetInfo, DataSpec
from contrastjax.data.errors import DatasetError
from contrastjax.data.sources import isprs as isprs_lib
from contrastjax.data.sources import loveda as loveda_lib
from contrastjax.data.synthetic import aerial as aerial_lib
from contrastjax.data.transforms import mmseg as ST
from contrastjax.errors import ConfigError


#: The ``DataSpec.info`` of each maker (by function name; ``builder.dataset_info`` reads it).
INFO = {
    'loveda': DatasetInfo('loveda', loveda_lib.CLASSES, loveda_lib.PALETTE),
    'isprs': DatasetInfo('isprs', isprs_lib.CLASSES, isprs_lib.PALETTE),
    'synthetic_aerial': DatasetInfo('synthetic_aerial', aerial_lib.CLASSES, aerial_lib.PALETTE),
}


# ------------------------------------------------------------------------------------------------
# Source/target pairs.
# ------------------------------------------------------------------------------------------------


class PairSource:
  """All ``(source, target)`` pairs: entry ``i`` is ``(S[i // |T|], T[i % |T|])``."""

  def __init__(self, source: Any, target: Any):
    if len(source) < 1 or len(target) < 1:
      raise DatasetError(f'domain adaptation needs a non-empty source and target; got '
                         f'{len(source)} source and {len(target)} target examples '
                         f'({source!r}, {target!r})', kind='empty_split')
    self.source, self.target = source, target

  @property
  def parts(self) -> tuple[Any, Any]:
    """The two sources read (start-up validation reads each once, not every pair)."""
    return (self.source, self.target)

  def __len__(self) -> int:
    return len(self.source) * len(self.target)

  def __repr__(self) -> str:
    return f'PairSource({self.source!r}, {self.target!r})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    s, t = divmod(int(index) % n, len(self.target))
    return {'source': self.source[s], 'target': self.target[t],
            'source_index': np.int32(s), 'target_index': np.int32(t)}


class PairTrainAugment(grain.transforms.RandomMap):
  """The mmseg train pipeline on both members of a pair (independent draws, source first):
  ``{'source': {'image', 'label', 'index'}, 'target': {'image'[, 'label'], 'index'}, 'index'}``."""

  def __init__(self, cfg: ST.SegAugConfig, carry_target_label: bool = False):
    self.cfg = cfg
    self.carry_target_label = bool(carry_target_label)

  def random_map(self, x: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    s_img, s_lab = ST.train_example(x['source']['image'], x['source']['label'], rng, self.cfg)
    t_img, t_lab = ST.train_example(x['target']['image'], x['target']['label'], rng, self.cfg)
    out = {'source': {'image': s_img, 'label': s_lab, 'index': np.int32(x['source_index'])},
           'target': {'image': t_img, 'index': np.int32(x['target_index'])}}
    if self.carry_target_label:
      out['target']['label'] = t_lab
    if 'index' in x:
      out['index'] = x['index']
    return out


# ------------------------------------------------------------------------------------------------
# Makers.
# ------------------------------------------------------------------------------------------------


def _pair2(value, key: str):
  if value is None:
    return None
  if isinstance(value, (int, float, np.integer, np.floating)):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ConfigError(f'config.data.{key}={value!r}; expected a number or a pair')
  return value


def aug_config(dcfg, default: ST.SegAugConfig) -> ST.SegAugConfig:
  """``default`` with the pipeline overrides found in ``config.data``."""
  kw = {}
  if dcfg.get('img_scale', None) is not None:
    kw['img_scale'] = tuple(int(v) for v in _pair2(dcfg.img_scale, 'img_scale'))
  if 'ratio_range' in dcfg:
    rr = _pair2(dcfg.ratio_range, 'ratio_range')
    kw['ratio_range'] = None if rr is None else tuple(float(v) for v in rr)
  if dcfg.get('crop_size', None) is not None:
    kw['crop_size'] = tuple(int(v) for v in _pair2(dcfg.crop_size, 'crop_size'))
  for key, cast in (('cat_max_ratio', float), ('flip_prob', float), ('photometric', bool)):
    if dcfg.get(key, None) is not None:
      kw[key] = cast(dcfg[key])
  return dataclasses.replace(default, **kw)


def _spec(leaves: Mapping[str, Any], dcfg, default: ST.SegAugConfig, info: DatasetInfo,
          content: Mapping[str, Any]) -> DataSpec:
  """``leaves``: ``source_train``, ``target_train`` (paired into ``train``) and the
  evaluation splits; a preparation stores the leaves."""
  cfg = aug_config(dcfg, default)
  train = PairSource(leaves['source_train'], leaves['target_train'])
  sources = {'train': train, **{k: v for k, v in leaves.items() if k not in _TRAIN_LEAVES}}
  return DataSpec(
      sources=sources,
      train_transforms=[PairTrainAugment(cfg, bool(dcfg.get('carry_target_label', False)))],
      eval_transforms=[ST.SegEvalNormalize(cfg.mean, cfg.std)], info=info,
      display=functools.partial(ST.denormalize, mean=cfg.mean, std=cfg.std),
      content=dict(content), prepare_sources=dict(leaves))


#: The leaf splits that ``train`` pairs (source domain first).
_TRAIN_LEAVES = ('source_train', 'target_train')


def _root(dcfg, hint: str) -> str:
  root = os.path.expandvars(os.path.expanduser(str(dcfg.get('root', '') or '')))
  if not root or '$' in root:
    raise DatasetError(f'config.data.root={dcfg.get("root")!r}: set it to {hint}')
  if not os.path.isdir(root):
    raise DatasetError(f'config.data.root={root!r} does not exist or is not a folder; expected '
                       f'{hint}', path=root, kind='missing_folder')
  return root


def loveda(dcfg, seed: int) -> DataSpec:
  """LoveDA ``source_domain`` -> ``target_domain`` (reference: Rural -> Urban)."""
  del seed
  src = str(dcfg.get('source_domain', 'Rural'))
  tgt = str(dcfg.get('target_domain', 'Urban'))

  def folders():
    root = _root(dcfg, 'the LoveDA folder holding Train/ and Val/ (e.g. data/LoveDA)')
    leaves = {'source_train': loveda_lib.LoveDASource(root, 'Train', src),
              'target_train': loveda_lib.LoveDASource(root, 'Train', tgt),
              'val': loveda_lib.LoveDASource(root, 'Val', tgt)}
    if os.path.isdir(os.path.join(root, 'Val', src)):
      leaves['source_val'] = loveda_lib.LoveDASource(root, 'Val', src)
    return leaves

  content = {'source_domain': src, 'target_domain': tgt}
  leaves = prepared.split_sources(dcfg, 'loveda', folders, content)
  return _spec(leaves, dcfg, ST.LOVEDA_AUG, INFO['loveda'], content)


def _isprs_folder(root: str, name: str, key: str) -> str:
  path = os.path.expandvars(os.path.expanduser(name))
  if not os.path.isabs(path):
    path = os.path.join(root, path)
  if not os.path.isdir(path):
    raise DatasetError(f'config.data.{key}={name!r}: {path} does not exist; expected a tiled '
                       f'ISPRS folder such as {sorted(isprs_lib.FOLDERS.values())} (make it with '
                       '`python -m contrastjax.data.tools.isprs_tiles`)', path=path,
                       kind='missing_folder')
  return path


def isprs(dcfg, seed: int) -> DataSpec:
  """ISPRS ``source`` -> ``target`` (e.g. Potsdam_IRRG_DA -> Vaihingen_IRRG_DA)."""
  del seed
  use = dcfg.get('use_split_files', None)
  content = {'source': str(dcfg.get('source', 'Potsdam_IRRG_DA')),
             'target': str(dcfg.get('target', 'Vaihingen_IRRG_DA')), 'use_split_files': use}

  def folders():
    root = _root(dcfg, 'the folder holding the tiled ISPRS datasets (e.g. data)')
    src = _isprs_folder(root, content['source'], 'source')
    tgt = _isprs_folder(root, content['target'], 'target')
    leaves = {'source_train': isprs_lib.ISPRSSource(src, 'train', use_split_file=use),
              'target_train': isprs_lib.ISPRSSource(tgt, 'train', use_split_file=use),
              'val': isprs_lib.ISPRSSource(tgt, 'val', use_split_file=use)}
    if os.path.isdir(os.path.join(src, 'img_dir', 'val')):
      leaves['source_val'] = isprs_lib.ISPRSSource(src, 'val', use_split_file=use)
    return leaves

  leaves = prepared.split_sources(dcfg, 'isprs', folders, content)
  return _spec(leaves, dcfg, ST.ISPRS_AUG, INFO['isprs'], content)


def synthetic_aerial(dcfg, seed: int) -> DataSpec:
  """The procedural two-domain aerial dataset (source natural colour, target false colour)."""
  del seed  # the data do not depend on the training seed
  size = int(dcfg.get('image_size', 64))
  data_seed = int(dcfg.get('data_seed', 1234))
  n_src = int(dcfg.get('num_train', 256))
  n_tgt = int(dcfg.get('num_target_train', 0) or n_src)
  n_val = int(dcfg.get('num_val', 64))
  shift = float(dcfg.get('shift', 1.0))
  if not 0.0 <= shift <= 1.0:
    raise ConfigError(f'config.data.shift={shift!r}; expected a number in [0, 1] (0: the '
                     'target looks like the source, 1: the full domain shift)')
  content = {'image_size': size, 'data_seed': data_seed, 'num_train': n_src,
             'num_target_train': n_tgt, 'num_val': n_val, 'shift': shift}
  leaves = prepared.split_sources(dcfg, 'synthetic_aerial', lambda: {
      'source_train': aerial_lib.SyntheticAerial(n_src, size, data_seed, 'source'),
      'target_train': aerial_lib.SyntheticAerial(n_tgt, size, data_seed, 'target', shift),
      'val': aerial_lib.SyntheticAerial(n_val, size, data_seed + 1, 'target', shift),
      'source_val': aerial_lib.SyntheticAerial(n_val, size, data_seed + 1, 'source')},
      content)
  default = ST.SegAugConfig(img_scale=(size, size), ratio_range=(1.0, 2.0),
                            crop_size=(size, size))
  return _spec(leaves, dcfg, default, INFO['synthetic_aerial'], content)


def synthetic_pair_batch(batch_size: int, image_size: int, num_classes: int,
                         seed: int = 0) -> dict[str, Any]:
  """A SiamSeg training batch (``contrastjax.data.tasks.uda`` layout, nested):
  normalised ``image`` ``[B, S, S, 3]`` for both domains, a source ``label`` ``[B, S, S]``
  of random class blobs (0..C-1, some 255 ignored pixels) and the ``index`` entries."""
  rng = np.random.default_rng(seed)

  def images():
    return rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)

  coarse = rng.integers(0, num_classes, (batch_size, 8, 8))
  rep = -(-image_size // 8)
  label = np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)[:, :image_size, :image_size]
  label = np.where(rng.random(label.shape) < 0.02, 255, label).astype(np.int32)
  index = np.arange(batch_size, dtype=np.int32)
  return {"source": {"image": images(), "label": label, "index": index},
          "target": {"image": images(), "index": index}, "index": index}


def synthetic_batch(dcfg, batch_size: int, seed: int = 0) -> tuple[dict[str, Any], int]:
  """A training batch of ``config.data`` without reading data (benchmarks)."""
  crop = dcfg.get("image_size", None) or dcfg.get("crop_size", None) or 512
  size = int(crop if np.ndim(crop) == 0 else crop[0])
  num_classes = INFO[dcfg.name].num_classes
  return synthetic_pair_batch(batch_size, size, num_classes, seed), size


#: Maker name -> synthetic training batch (see ``data.builder.synthetic_batch``).
SYNTHETIC = {"loveda": synthetic_batch, "isprs": synthetic_batch,
             "synthetic_aerial": synthetic_batch}
