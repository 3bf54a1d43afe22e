"""Dataset makers for binary medical segmentation (ConDSeg): real folders and synthetic.

``config.data`` keys:

* ``name``: ``'medseg'`` (the reference layout: ``<root>/{images,masks}/``,
  ``train.txt``, ``val.txt``[, ``test.txt``]) or ``'synthetic_polyps'``;
* ``root`` (medseg): dataset folder; ``~`` and ``$VARS`` (e.g. ``$CONTRASTJAX_DATA_DIR``)
  are expanded;
* ``splits`` (medseg): split files to index, default ``('train', 'val', 'test')``
  (``test`` only if ``test.txt`` exists);
* ``binarize``, ``mask_suffix`` (medseg): see ``MedSegSource``;
* ``image_size``: training/evaluation resolution (reference: 256);
* ``augment``: geometric preset ``'stage1'``, ``'stage2'`` or ``'none'``;
* ``augment_background``: True (fix) = background target ``1 - mask`` after augmentation;
  False (reference) = background from the un-augmented mask;
* ``channel_order``: ``'rgb'`` (ours) or ``'bgr'`` (reference, cv2.imread);
* ``dropout_hole_size``: CoarseDropout hole side in original-image pixels (reference 32);
* synthetic only: ``num_train``, ``num_val``, ``num_test``, ``source_size`` (generated
  size, default ``image_size``), ``contrast``.

``DataSpec.info``: classes ``('background', 'foreground')``, palette black/white, no ignore
label (:data:`INFO`).
"""
from __future__ import annotations

import os

import numpy as np

from contrastjax.data import prepared
from contrastjax.data.builder import DatasetInfo, DataSpec
from contrastjax.data.errors import DatasetError
from contrastjax.data.sources.medseg import MedSegSource
from contrastjax.data.synthetic.polyps import SyntheticPolyps
from contrastjax.data.transforms import medseg as T

#: The ``DataSpec.info`` of each maker (by function name; ``builder.dataset_info`` reads it):
#: two classes, drawn black and white as the saved mask PNGs; no ignored label.
INFO = {
    name: DatasetInfo(name, ("background", "foreground"), ((0, 0, 0), (255, 255, 255)),
                      ignore_index=None)
    for name in ("medseg", "synthetic_polyps")
}


def _transforms(dcfg) -> tuple[list, list]:
  size = int(dcfg.image_size)
  order = dcfg.get("channel_order", "rgb")
  train = T.train_transforms(size, dcfg.get("augment", "stage2"),
                             augment_background=bool(dcfg.get("augment_background", True)),
                             channel_order=order,
                             dropout_hole_size=int(dcfg.get("dropout_hole_size", 32)))
  return train, T.eval_transforms(size, channel_order=order)


def _rgb_from_bgr(image):
  return image[..., ::-1]


def _display(dcfg):
  """Inputs are [0, 1] floats; with ``channel_order='bgr'`` (the reference's cv2 reads)
  their channels are reversed for pictures."""
  return _rgb_from_bgr if dcfg.get("channel_order", "rgb") == "bgr" else None


def medseg(dcfg, seed: int) -> DataSpec:
  """A dataset in the reference layout (Kvasir-SEG, Kvasir-Sessile, GlaS, ISIC...), or
  its prepared copy (``config.data.format='tfds'``)."""
  del seed
  content = {"splits": list(dcfg.get("splits", ("train", "val", "test"))),
             "binarize": dcfg.get("binarize", "auto"),
             "mask_suffix": dcfg.get("mask_suffix", "")}
  sources = prepared.split_sources(dcfg, "medseg", lambda: _medseg_folders(dcfg), content)
  train, evals = _transforms(dcfg)
  return DataSpec(sources=sources, train_transforms=train, eval_transforms=evals,
                  info=INFO["medseg"], display=_display(dcfg), content=content)


def _medseg_folders(dcfg) -> dict[str, MedSegSource]:
  root = os.path.expandvars(os.path.expanduser(str(dcfg.get("root", ""))))
  if not root or "$" in root:
    raise DatasetError(
        f"config.data.root={dcfg.get('root')!r}: set it to the dataset folder (holding "
        "images/, masks/, train.txt, val.txt), e.g. --config.data.root=/data/Kvasir-SEG")
  if not os.path.isdir(root):
    raise DatasetError(f"config.data.root={root!r} does not exist or is not a folder",
                       path=root)
  sources = {}
  for split in dcfg.get("splits", ("train", "val", "test")):
    if split == "test" and not os.path.exists(os.path.join(root, "test.txt")):
      continue
    sources[split] = MedSegSource(root, split, binarize=dcfg.get("binarize", "auto"),
                                  mask_suffix=dcfg.get("mask_suffix", ""))
  return sources


def synthetic_polyps(dcfg, seed: int) -> DataSpec:
  """Procedurally generated polyp-like frames (low contrast, uneven illumination)."""
  size = int(dcfg.get("source_size", 0) or dcfg.image_size)
  kw = dict(contrast=float(dcfg.get("contrast", 0.5)))
  for key, cast in (("illumination", float), ("noise", float), ("max_objects", int),
                    ("min_radius", float), ("max_radius", float)):
    if key in dcfg:   # generator defaults otherwise (SyntheticPolyps)
      kw[key] = cast(dcfg[key])
  # Splits use disjoint generator seeds, independent of the training seed, so every
  # run sees the same dataset.
  data_seed = int(dcfg.get("data_seed", 1234))

  def generated():
    sources = {
        "train": SyntheticPolyps(int(dcfg.num_train), size, data_seed, **kw),
        "val": SyntheticPolyps(int(dcfg.num_val), size, data_seed + 1, **kw),
    }
    if int(dcfg.get("num_test", 0)):
      sources["test"] = SyntheticPolyps(int(dcfg.num_test), size, data_seed + 2, **kw)
    return sources

  content = dict(kw, size=size, data_seed=data_seed, num_train=int(dcfg.num_train),
                 num_val=int(dcfg.num_val), num_test=int(dcfg.get("num_test", 0)))
  sources = prepared.split_sources(dcfg, "synthetic_polyps", generated, content)
  del seed
  train, evals = _transforms(dcfg)
  return DataSpec(sources=sources, train_transforms=train, eval_transforms=evals,
                  info=INFO["synthetic_polyps"], display=_display(dcfg), content=content)


def synthetic_batch_arrays(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch shaped like the ConDSeg pipeline's: ``image`` in [0, 1)
  ``[B, S, S, 3]``, a soft elliptical ``mask`` and ``background = 1 - mask``
  ``[B, S, S, 1]``, ``index`` int32 ``[B]``."""
  rng = np.random.default_rng(seed)
  image = rng.random((batch_size, image_size, image_size, 3), dtype=np.float32)
  yy, xx = np.meshgrid(np.linspace(-1, 1, image_size), np.linspace(-1, 1, image_size),
                       indexing="ij")
  masks = []
  for _ in range(batch_size):
    cy, cx = rng.uniform(-0.4, 0.4, 2)
    ry, rx = rng.uniform(0.2, 0.5, 2)
    r = ((yy - cy) / ry)**2 + ((xx - cx) / rx)**2
    masks.append(np.clip((1.2 - r) / 0.4, 0.0, 1.0))
  mask = np.stack(masks)[..., None].astype(np.float32)
  return {"image": image, "mask": mask, "background": 1.0 - mask,
          "index": np.arange(batch_size, dtype=np.int32)}


def synthetic_batch(dcfg, batch_size: int, seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
  """A training batch of ``config.data`` without reading data (benchmarks)."""
  size = int(dcfg.image_size)
  return synthetic_batch_arrays(batch_size, size, seed), size


#: Maker name -> synthetic training batch (see ``data.builder.synthetic_batch``).
SYNTHETIC = {"medseg": synthetic_batch, "synthetic_polyps": synthetic_batch}
