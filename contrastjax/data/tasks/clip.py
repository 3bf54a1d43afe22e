"""Dataset makers for CLIP training: synthetic paired vectors and COCO captions.

``config.data`` keys:

* ``name``: ``'synthetic_pairs'`` or ``'coco_captions'``.
* synthetic: ``num_train``, ``num_val``, ``num_zeroshot`` (0: no zero-shot split),
  ``num_classes``, ``latent_dim``, ``dim_x``, ``dim_y``, ``within``, ``noise``,
  ``data_seed``, ``map_seed`` (see ``contrastjax.data.synthetic.pairs``).
* coco: ``root`` (the official layout: ``annotations/captions_{train,val}2017.json``,
  ``train2017/``, ``val2017/``; ``~`` and ``$VARS`` expanded), ``train_mode``
  (``'pairs'``: one example per (image, caption), the default, as an OpenCLIP CSV of
  COCO; ``'images'``: one example per image with a caption drawn at random each time),
  ``eval_caption`` (index of the caption per image for evaluation, default 0, the
  first), ``image_size`` (224), ``crop_scale`` (OpenCLIP's RandomResizedCrop scale,
  ``(0.9, 1.0)``), ``tokenizer`` (``'word'`` or ``'bpe'``), ``bpe_path`` (a
  ``bpe_simple_vocab_16e6.txt.gz``-format file, for ``'bpe'``), ``context_length`` (77),
  ``vocab_min_count`` (word tokenizer: words seen fewer times map to ``<unk>``),
  ``max_vocab`` (word tokenizer cap, 0 = none), ``cifar10_root`` (the extracted
  ``cifar-10-batches-py`` folder; empty: none) and ``cifar10_prompt``: with a root, the
  splits ``cifar10_test`` and ``cifar10_probe`` of ``contrastjax.data.sources.cifar`` (zero-shot
  and linear-probe evaluation) are added.

The word tokenizer is built from the training captions and saved to
``<workdir>/tokenizer.json``; a resumed run (or ``contrastjax.evaluate``) reloads it from
there, so the ids never change under a run.

The specs have no ``info`` (None): the data have no classes.
"""
from __future__ import annotations

import os

from absl import logging
import numpy as np

from contrastjax.data.builder import DataSpec
from contrastjax.data import prepared
from contrastjax.data.errors import DatasetError
from contrastjax.data.synthetic.pairs import SyntheticPairs

TOKENIZER_FILE = "tokenizer.json"


def synthetic_pairs(dcfg, seed: int) -> DataSpec:
  """Paired latent-variable vectors (the ``demo`` data): splits ``train``, ``val`` and
  (with ``num_zeroshot > 0``) ``zeroshot``."""
  del seed  # the dataset does not depend on the training seed
  kw = dict(data_seed=int(dcfg.get("data_seed", 1234)),
            map_seed=int(dcfg.get("map_seed", 0)),
            num_classes=int(dcfg.get("num_classes", 10)),
            latent_dim=int(dcfg.get("latent_dim", 8)),
            dim_x=int(dcfg.get("dim_x", 32)), dim_y=int(dcfg.get("dim_y", 24)),
            within=float(dcfg.get("within", 0.6)), noise=float(dcfg.get("noise", 0.05)))
  content = dict(kw, num_train=int(dcfg.num_train), num_val=int(dcfg.num_val),
                 num_zeroshot=int(dcfg.get("num_zeroshot", 0)))

  def generated():
    sources = {"train": SyntheticPairs(int(dcfg.num_train), "train", **kw),
               "val": SyntheticPairs(int(dcfg.num_val), "val", **kw)}
    if int(dcfg.get("num_zeroshot", 0)):
      sources["zeroshot"] = SyntheticPairs(int(dcfg.num_zeroshot), "zeroshot", **kw)
    return sources

  sources = prepared.split_sources(dcfg, "synthetic_pairs", generated, content)
  return DataSpec(sources=sources, train_transforms=[], eval_transforms=[], content=content)


def make_tokenizer(dcfg, train_captions, workdir: str | None):
  """The configured tokenizer: BPE from ``bpe_path``, or the word tokenizer built from
  ``train_captions`` (a callable returning the caption list) and saved to / reloaded
  from ``<workdir>/tokenizer.json``."""
  from contrastjax.data.text import tokenizer as tok  # pylint: disable=g-import-not-at-top
  kind = str(dcfg.get("tokenizer", "word"))
  context = int(dcfg.get("context_length", 77))
  if kind == "bpe":
    path = os.path.expandvars(os.path.expanduser(str(dcfg.get("bpe_path", ""))))
    if not path:
      raise DatasetError("config.data.tokenizer='bpe' needs config.data.bpe_path (a "
                         "bpe_simple_vocab_16e6.txt.gz-format merges file)")
    return tok.BPETokenizer(path, context_length=context)
  if kind != "word":
    raise DatasetError(f"config.data.tokenizer={kind!r} is not known; expected 'word' or "
                       "'bpe'")
  saved = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if saved and os.path.exists(saved):
    t = tok.WordTokenizer.load(saved)
    if t.context_length != context:
      raise DatasetError(f"{saved} has context_length {t.context_length} but "
                         f"config.data.context_length={context}", path=saved)
    logging.info("reloaded the word tokenizer (%d tokens) from %s", t.vocab_size, saved)
    return t
  t = tok.WordTokenizer.build(train_captions(), context_length=context,
                              min_count=int(dcfg.get("vocab_min_count", 1)),
                              max_vocab=int(dcfg.get("max_vocab", 0)))
  if saved:
    os.makedirs(workdir, exist_ok=True)
    t.save(saved)
    logging.info("built a word tokenizer of %d tokens; saved to %s", t.vocab_size, saved)
  return t


def coco_captions(dcfg, seed: int, workdir: str | None = None) -> DataSpec:
  """MSCOCO captions (2017 release) in the official layout, or its prepared copy: splits
  ``train`` and ``val`` (the 5k ``val2017`` images, the usual "test" split of COCO-trained
  CLIPs). A prepared copy stores each image once with all its captions (the folder's
  ``mode='images'`` examples); the training pairs and the evaluation caption are chosen on
  read, as from the folder."""
  del seed
  from contrastjax.data.sources import coco  # pylint: disable=g-import-not-at-top
  split_names = tuple(dcfg.get("splits", ("train", "val")))
  if "train" not in split_names:
    raise DatasetError(f"config.data.splits={split_names} has no 'train'")
  mode = str(dcfg.get("train_mode", "pairs"))
  eval_caption = int(dcfg.get("eval_caption", 0))
  from contrastjax.data.sources import cifar  # pylint: disable=g-import-not-at-top
  with_cifar = bool(str(dcfg.get("cifar10_root", "") or ""))
  content = {"splits": list(split_names),
             "cifar10_prompt": (cifar.prompt_template(str(dcfg.get("cifar10_prompt", "photo")))
                                if with_cifar else None)}
  indexes = {}

  def folders():
    root = os.path.expandvars(os.path.expanduser(str(dcfg.get("root", ""))))
    if not root or "$" in root:
      raise DatasetError(f"config.data.root={dcfg.get('root')!r}: set it to the COCO folder "
                         "(holding annotations/, train2017/, val2017/), e.g. "
                         "--config.data.root=/data/coco")
    if not os.path.isdir(root):
      raise DatasetError(f"config.data.root={root!r} does not exist or is not a folder",
                         path=root)
    indexes.update({s: coco.read_captions(root, s) for s in split_names})
    out = {s: coco.CocoCaptionsSource(index, mode="images") for s, index in
           indexes.items()}
    out.update(cifar.clip_eval_sources(dcfg))   # the CIFAR-10 zero-shot / probe splits
    return out

  stored = prepared.split_sources(dcfg, "coco_captions", folders, content)
  if indexes:   # the folder: the sources as before (a decode per pair)
    captions = {s: index.captions for s, index in indexes.items()}
    sources = {s: coco.CocoCaptionsSource(
        index, mode=mode if s == "train" else "eval",
        caption_index=0 if s == "train" else eval_caption) for s, index in indexes.items()}
  else:         # the prepared copy: captions read without decoding an image
    captions = {s: stored[s].column("captions") for s in split_names}
    sources = {s: coco.CaptionItems(stored[s], captions[s],
                                    mode=mode if s == "train" else "eval",
                                    caption_index=0 if s == "train" else eval_caption)
               for s in split_names}
  sources.update({s: src for s, src in stored.items() if s not in split_names})
  tokenizer = make_tokenizer(dcfg, lambda: [c for caps in captions["train"] for c in caps],
                             workdir)
  size = int(dcfg.get("image_size", 224))
  scale = tuple(float(s) for s in dcfg.get("crop_scale", (0.9, 1.0)))
  train_tf = [coco.ChooseCaption(), coco.RandomResizedCrop(size, scale),
              coco.Normalize(), coco.Tokenize(tokenizer)]
  eval_tf = [coco.ChooseCaption(), coco.ResizeCenterCrop(size), coco.Normalize(),
             coco.Tokenize(tokenizer)]
  return DataSpec(sources=sources, train_transforms=train_tf, eval_transforms=eval_tf,
                  content=content, prepare_sources=stored)


def synthetic_caption_batch(dcfg, batch_size: int, seed: int = 0) -> tuple[dict, int]:
  """A COCO-captions training batch without reading data (benchmarks): ``image``
  normalised float32 ``[B, S, S, 3]``, ``text`` int32 ``[B, context_length]`` laid out as
  the tokenizers pack captions (start token, 8-20 word ids, the end-of-text token, which
  has the largest id, ``config.data.max_vocab - 1``), then zeros), ``index`` int32 ``[B]``."""
  rng = np.random.default_rng(seed)
  size = int(dcfg.get("image_size", 224))
  ctx = int(dcfg.get("context_length", 77))
  vocab_size = int(dcfg.get("max_vocab", 0) or 49408)   # the configs' text vocab_size
  eot, sot = vocab_size - 1, vocab_size - 2
  text = np.zeros((batch_size, ctx), np.int32)
  for row in text:
    n = int(rng.integers(8, min(20, ctx - 2) + 1))
    row[0], row[n + 1] = sot, eot
    row[1:n + 1] = rng.integers(1, sot, n)
  image = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
  return {"image": image, "text": text,
          "index": np.arange(batch_size, dtype=np.int32)}, size


def synthetic_pairs_batch(dcfg, batch_size: int, seed: int = 0) -> tuple[dict, int]:
  """A ``synthetic_pairs`` training batch drawn from the generator itself (it reads no
  files): ``image`` ``[B, dim_x]``, ``text`` ``[B, dim_y]`` float32."""
  source = synthetic_pairs(dcfg, seed=0).sources["train"]
  rows = [source[i % len(source)] for i in range(seed * batch_size, (seed + 1) * batch_size)]
  batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
  return batch, 0


#: Maker name -> synthetic training batch (see ``data.builder.synthetic_batch``).
SYNTHETIC = {"coco_captions": synthetic_caption_batch, "synthetic_pairs": synthetic_pairs_batch}
