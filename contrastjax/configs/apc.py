"""The APC recipe (Wu et al., EAAI 2025, arXiv 2407.10649), shared by ``configs/apc_*.py``.

APC's code and full text are not public: this is a reconstruction (docs/methods/apc.md).
Sources of the numbers: [vitpcm] = github.com/deepplants/ViT-PCM @ 1fea66f
(``configs/voc12.yaml``, ``model.py``); [toco] = github.com/rulixiang/ToCo @ e13514d
(``scripts/dist_train_voc_seg_neg.py``); [recon] = our choice where APC is unknown.

Variants (the ``:arg``, comma separated):

* (none) / ``apc``  the full method: adaptive-K pooling, patch contrast, LargeFOV decoder
                    on the online pseudo-labels, one stage;
* ``gmp``           ViT-PCM's first stage (global max pooling, classifier only);
* ``topk``          fixed top-K pooling (TKP); ``akp``: adaptive-K pooling alone;
* ``akp_pcl``       adaptive-K pooling + patch contrast, no decoder;
* ``supervised``    the same decoder trained on the true masks (the upper bound);
* ``rule=NAME``     the adaptive-K rule: ``ratio_to_max`` (H1, default), ``consecutive_ratio``
                    (H2), ``argmax_share`` (H3);
* ``recipe=NAME``   ``toco`` (default: AdamW 6e-5, heads x10, poly, 1500 warm-up, 20k
                    iterations at batch 4, crop 448) or ``vitpcm`` (Adam 1e-3 with the
                    backbone frozen: ViT-PCM's first phase; its second phase is a second
                    run with ``init_from=`` and ``recipe=vitpcm2``: last 5 blocks + norm at
                    1e-4, the rest frozen);
* ``msf``           ToCo's multi-scale + flip test of the decoder (scales 1.0, 1.5, 1.25,
                    the flipped pass added, the maximum over scales) instead of one pass;
* ``crf``           also evaluate val with the dense CRF on the decoder's probabilities
                    (ToCo's parameters; ``pip install "contrastjax[crf]"``): ``val_crf/*``;
* ``root=DIR``, ``pretrained=FILE`` (ViT weights: the Google ``.npz`` ViT-B_16 at 384, timm
  or Hugging Face files), ``init_from=DIR``;
* ``demo``          procedural scenes, a small ViT from scratch, ~9 min on a CPU (see
                    ``_demo`` for its deviations).
"""
from __future__ import annotations

import ml_collections

from contrastjax.configs.common import parse_arg
from contrastjax.configs.common import trainer_defaults
from contrastjax.data import builder as data_builder
from contrastjax.errors import ConfigError
from contrastjax.methods import options
from contrastjax.methods.apc import APCOptions, VARIANTS

RECIPES = ("toco", "vitpcm", "vitpcm2")
DATASETS = {"voc": dict(num_classes=20, crop=448, eval_size=512, root="VOCdevkit"),
            "coco_wsss": dict(num_classes=80, crop=448, eval_size=640, root="MSCOCO")}


def get_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, demo=False, recipe="toco", rule="ratio_to_max", root="",
                pretrained="", init_from="", msf=False, crf=False, **{v: False for v in VARIANTS})
  chosen = [v for v in VARIANTS if a[v]]
  if len(chosen) > 1:
    raise ConfigError(f"config arguments {chosen} exclude each other ({arg!r})")
  variant = chosen[0] if chosen else "apc"
  if a.recipe not in RECIPES:
    raise ConfigError(f"config argument recipe={a.recipe!r}; expected one of {RECIPES}")
  c = ml_collections.ConfigDict()
  c.method = "apc"
  c.seed = 0

  # ------------------------------------------------------------------ data
  d = DATASETS["voc" if a.demo else dataset]
  c.data = ml_collections.ConfigDict(dict(
      name=dataset, root=a.root or f"$CONTRASTJAX_DATA_DIR/{d['root']}",
      crop_size=d["crop"], eval_size=d["eval_size"], train_resize="crop",
      scale_range=(0.5, 2.0),               # [toco] random rescale
      train_masks=variant == "supervised", labels="cls_labels", worker_count=0))
  train_split, eval_splits = ("train_aug", ("train", "val")) if dataset == "voc" else (
      "train_wsss", ("val",))
  c.data.train_split = train_split
  c.data.eval_splits = eval_splits

  # ------------------------------------------------------------------ model [vitpcm]
  c.model = ml_collections.ConfigDict(dict(
      variant="b16", img_size=384, backbone_dropout_rate=0.1, bilstm=True, hidden_size=192,
      dropout_rate=0.2, decoder="largefov", decoder_input="vit", remat=False,
      scan_blocks=True, dtype="float32"))

  # ------------------------------------------------------------------ method
  pooling = {"gmp": "gmp", "topk": "topk"}.get(variant, "akp")
  c.apc = ml_collections.ConfigDict(options.defaults(
      APCOptions, variant=variant, num_classes=d["num_classes"], pooling=pooling,
      akp_rule=a.rule, pretrained=a.pretrained, init_from=a.init_from,
      inference="msf" if a.msf else "single"))

  # ------------------------------------------------------------------ optimisation
  c.batch_size = 4                          # [toco] 2 per GPU x 2 GPUs
  c.eval_batch_size = 4
  c.total_steps = 20000                     # [toco] VOC 20k iterations
  head = "^(patch_conditioning|patch_classifier|seg_decoder)/"
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-5, b1=0.9, b2=0.999, weight_decay=0.01,   # [toco]
      schedule="warmup_poly_mmcv", warmup_steps=1500, warmup_ratio=1e-6, power=0.9,
      groups=[(head, 10.0, 1.0)]))          # [toco] heads x10
  if a.recipe == "vitpcm":                  # phase 1: frozen backbone, Adam 1e-3 [vitpcm]
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-3, schedule="constant",
        groups=[dict(regex="^backbone/", frozen=True)]))
  elif a.recipe == "vitpcm2":               # phase 2: last 5 blocks + norm at 1e-4 [vitpcm]
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-4, schedule="constant",
        groups=[dict(regex="^backbone/(blocks_(7|8|9|10|11)|encoder_norm)/", frozen=False),
                dict(regex="^backbone/", frozen=True)]))
  c.log_every_steps = 50
  c.eval_every_steps = 2000
  c.ckpt_every_steps = 2000
  c.keep_checkpoints = 3
  c.best_metric = "val/mIoU"
  c.best_mode = "max"
  c.early_stop_patience = 0
  c.eval_samples = 4
  info = data_builder.dataset_info(dataset)
  evals = dict(val=dict(type="semseg", split="val", num_classes=info.num_classes,
                        with_loss=True))
  if dataset == "voc":  # pseudo-label quality on VOC train (1,464) [toco, vitpcm]
    evals["pseudo"] = dict(type="semseg", split="train", output_key="pseudo",
                           num_classes=info.num_classes, with_loss=False)
  c.evals = ml_collections.ConfigDict(evals)

  if a.demo:
    _demo(c, variant, a.recipe)
  if c.apc.par and "pseudo" in c.evals:  # the decoder's targets: PAR-refined pseudo-labels
    c.evals.pseudo_par = dict(c.evals.pseudo.to_dict(), output_key="pseudo_par")
  if a.crf:
    if variant not in ("apc", "supervised"):
      raise ConfigError(f"config argument crf refines the decoder's probabilities; the "
                        f"variant {variant!r} has no decoder (expected apc or supervised)")
    c.evals.val_crf = dict(c.evals.val.to_dict(), output_key="seg_prob", postprocess="crf",
                           with_loss=False)
  return trainer_defaults(c)


def _demo(c: ml_collections.ConfigDict, variant: str, recipe: str) -> None:
  """Procedural scenes (5 shape/texture classes, shared colours, clutter), a 4-block,
  width-96 ViT with 8 px patches trained from scratch: 1,800 steps, ~9 min on 2 CPU
  cores; val mIoU 0.455 against 0.324 for ``gmp`` and 0.580 for ``supervised`` (78%) on
  1 device (BENCHMARKS.md). Demo-only choices [recon]: larger objects and fewer
  distractors than the scene generator's defaults (``data.scene``), AKP pooling as GMP
  for the first 600 steps (from scratch, H1/H2 pick every patch and the classifier stays
  at the label prior), the segmentation loss and PCL from step 1,000 on confident pixels
  (``pseudo_threshold`` 0.4), no classifier L2. ViT-PCM's equivariant mosaic loss
  (``eq_weight`` 1, every variant, ``gmp`` included) and ToCo's PAR (at 1/2 resolution)
  are on: without them APC ends at 0.274 (neither) and 0.351 (PAR only, 2,400 steps)."""
  info = data_builder.dataset_info("synthetic_scenes")
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic_scenes", image_size=64, num_train=16384, num_train_eval=128, num_val=128,
      data_seed=1234, crop_size=64, eval_size=64, train_resize="resize",
      train_masks=variant == "supervised", worker_count=0,
      scene=dict(size_range=(0.30, 0.50), distractors=(0, 2), patches=(0, 2),
                 overlap_prob=0.35)))
  c.model = ml_collections.ConfigDict(dict(
      variant="ti16", img_size=64, backbone_dropout_rate=0.0, bilstm=False,
      dropout_rate=0.1, decoder="largefov", decoder_input="vit", decoder_channels=64,
      largefov_dilation=2, remat=False, scan_blocks=False, dtype="float32",
      backbone_overrides=dict(patch_size=8, depth=4, embed_dim=96, num_heads=3)))
  c.apc.num_classes = info.num_classes - 1
  c.apc.normalization = "imagenet"
  c.apc.seg_warmup_steps = 1000
  c.apc.pcl_warmup_steps = 1000
  c.apc.l2_weight = 0.0
  c.apc.akp_warmup_steps = 600
  c.apc.pseudo_threshold = 0.4   # decoder targets: confident pixels only [recon]
  c.apc.par = True               # ToCo's PAR on the pseudo-labels, at 1/2 resolution [toco]
  c.apc.eq_weight = 1.0          # ViT-PCM's equivariant mosaic loss, in every variant [vitpcm]
  c.batch_size = 32
  c.eval_batch_size = 64
  c.total_steps = 1800
  if recipe == "toco":  # the ViT-PCM recipes keep their (frozen-group) optimizers
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, weight_decay=0.01, schedule="warmup_cosine",
        warmup_steps=100))
  c.log_every_steps = 25
  c.eval_every_steps = 600
  c.ckpt_every_steps = 600
  c.evals = ml_collections.ConfigDict(dict(
      val=dict(type="semseg", split="val", num_classes=info.num_classes, with_loss=True),
      pseudo=dict(type="semseg", split="train_eval", output_key="pseudo",
                  num_classes=info.num_classes, with_loss=False)))
