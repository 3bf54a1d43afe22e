"""The ConDSeg recipe (Lei et al., AAAI 2025), shared by ``configs/condseg_*.py``.

Sources of the numbers: the reference code github.com/Mengqi-Lei/ConDSeg at e6a314b
(``train.py``, ``train_stage1.py``, ``utils/run_engine*.py``), summarised with line
references in docs/methods/condseg.md.

Variants (the ``:arg`` of ``--config=configs/condseg_<dataset>.py:ARG``, comma separated):

* (none)       stage 2, the full model, reference hyper-parameters, our bug fixes;
* ``stage1``   stage 1, Consistency Reinforcement (encoder + light head);
* ``paper``    the reference's original numerics: double sigmoid in DiceBCE, background
               target not augmented with the mask, stage-1 BN statistics not transferred,
               BGR input (cv2.imread) -- what produced the paper's numbers;
* ``demo``     synthetic polyps, a shrunk model, a few minutes on a laptop CPU;
* ``init_from=DIR``  stage 2 initialised from the stage-1 run in DIR (its best checkpoint);
* ``root=DIR``       the dataset folder (else ``$CONTRASTJAX_DATA_DIR/<Dataset>``);
* ``backbone=FILE``  torchvision ImageNet ResNet-50 weights (``resnet50-19c8e357.pth``,
               or ``.npz``/``.safetensors``) -- the reference uses them by default.
"""
from __future__ import annotations

import ml_collections

from contrastjax.configs.common import parse_arg
from contrastjax.configs.common import trainer_defaults
from contrastjax.data.sources.medseg import DATASETS
from contrastjax.errors import ConfigError

# Reference defaults of the model (network/model.py); the demo shrinks them. The demo
# keeps 2 CDFA heads of 8 channels (the reference: 4 of 32): with 4 heads of 4 channels
# the 4*81 attention logits per position of the 32x32 CDFA made the step 1.5x slower
# (0.43 vs 0.28 s on 2 cores, BENCHMARKS.md) for no gain in quality.
FULL_MODEL = dict(stage_sizes=(3, 4, 6), stem_width=64, base_width=64, dim=128,
                  decouple_mid=512, num_heads=4, aux_widths=(256, 256, 128, 64, 64))
DEMO_MODEL = dict(stage_sizes=(1, 1, 1), stem_width=16, base_width=16, dim=16,
                  decouple_mid=32, num_heads=2, aux_widths=(16, 16, 16, 8, 8))


def get_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Builds the config for ``dataset`` (a key of ``contrastjax.data.sources.medseg.DATASETS``)."""
  if dataset not in DATASETS:
    raise ConfigError(f"dataset {dataset!r} is not known; expected one of {sorted(DATASETS)}")
  a = parse_arg(arg, stage1=False, paper=False, demo=False, init_from="", root="",
                backbone="")
  c = ml_collections.ConfigDict()
  c.method = "condseg_stage1" if a.stage1 else "condseg"
  c.seed = 0                         # train.py l.35 (stage 1 draws a random seed; we fix it)

  # ------------------------------------------------------------------ data
  c.data = ml_collections.ConfigDict()
  c.data.name = "medseg"
  c.data.dataset = dataset
  info = DATASETS[dataset]
  c.data.root = a.root or f"$CONTRASTJAX_DATA_DIR/{info.folder}"
  c.data.splits = ("train", "val", "test")
  c.data.binarize = info.binarize    # GlaS instance labels -> label > 0 (issue #18)
  c.data.mask_suffix = ""            # e.g. "_Segmentation" for official ISIC mask names
  c.data.image_size = 256            # run_engine.py: cv2.resize to 256x256
  c.data.augment = "stage1" if a.stage1 else "stage2"  # albumentations presets
  c.data.augment_background = not a.paper  # reference: background target not augmented
  c.data.channel_order = "bgr" if a.paper else "rgb"  # reference: cv2.imread BGR, /255
  c.data.dropout_hole_size = 32      # CoarseDropout(max_holes=10, 32x32) at original size
  c.data.worker_count = 0            # grain worker processes (reference: 8 loader workers)

  # ------------------------------------------------------------------ model
  c.model = ml_collections.ConfigDict(dict(FULL_MODEL))
  if a.stage1:
    del c.model["dim"], c.model["decouple_mid"], c.model["num_heads"], c.model["aux_widths"]
  c.model.dtype = "float32"

  # ------------------------------------------------------------------ method
  c.condseg = ml_collections.ConfigDict()
  c.condseg.double_sigmoid = a.paper   # reference DiceBCELoss sigmoid on sigmoid (issue #17)
  c.condseg.beta_per_image = False     # reference beta: area summed over the batch
  c.condseg.transfer_batch_stats = not a.paper  # reference copies named_parameters() only
  c.condseg.pretrained_backbone = a.backbone  # reference: ImageNet ResNet-50 (pretrained=True)
  c.condseg.pretrained_source = "resnet50"
  c.condseg.init_from = a.init_from
  c.condseg.init_from_which = "best"
  if a.stage1:
    c.condseg.consistency_weight = 1.0
    c.condseg.strong_aug = ml_collections.ConfigDict(dict(
        brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, grayscale_p=0.5,
        blur_kernel=(7, 1), blur_sigma=(0.1, 3.0), per_image=False))

  # ------------------------------------------------------------------ optimisation
  c.batch_size = 8 if a.stage1 else 12   # train_stage1.py / train.py
  c.eval_batch_size = c.batch_size
  c.total_epochs = 300
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      schedule="constant",
      # encoder and the rest are two Adam param groups at the same lr in train.py
      groups=[("^encoder/", 1.0, 1.0)]))
  # ReduceLROnPlateau('min', patience=30) on the validation loss, stepped every epoch.
  c.plateau = ml_collections.ConfigDict(dict(monitor="val/loss", factor=0.1, patience=30,
                                             rtol=1e-4, cooldown=0))
  c.eval_every_epochs = 1
  c.best_metric = "val/mIoU"          # checkpoint on the best validation mIoU
  c.best_mode = "max"
  c.early_stop_patience = 100         # epochs (evaluations) without improvement
  c.log_every_steps = 50
  c.ckpt_every_steps = 500
  c.keep_checkpoints = 3
  c.evals = ml_collections.ConfigDict(dict(
      val=dict(type="binary_seg", split="val", threshold=0.5)))
  c.mesh = [("data", -1)]
  # XLA:CPU XNNPACK graph fusion (contrastjax.platform; no effect off CPU): pays for the
  # full model's large convolutions, costs the demo's small ones.
  c.xnn_fusion = True

  if a.demo:
    c.data.name = "synthetic_polyps"
    c.data.root = ""
    del c.data["splits"], c.data["binarize"], c.data["mask_suffix"]
    c.data.num_train, c.data.num_val, c.data.num_test = 512, 64, 64
    c.data.image_size = 64
    c.data.source_size = 64
    c.data.contrast = 0.5
    # Object radii as a fraction of the half frame side (log-uniform). The generator's
    # default smallest radius, 0.1, is 3 px at 64 px: objects under 1% of the frame,
    # which this model at 1/4 of the reference resolution segments with Dice ~0.25
    # (BENCHMARKS.md, val Dice by object size); the demo starts at 0.15 (~5 px).
    c.data.min_radius = 0.15
    c.data.max_radius = 0.7
    c.data.dropout_hole_size = 4     # 32 px of a ~500 px frame, scaled to 64 px
    c.data.data_seed = 1234
    for k, v in DEMO_MODEL.items():
      if k in c.model:
        c.model[k] = v
    c.batch_size = 8
    c.eval_batch_size = 32
    c.total_epochs = 0
    c.total_steps = 500              # ~4.6 min cold on 2 cores (BENCHMARKS.md)
    # A short run wants a decaying learning rate rather than the plateau schedule.
    c.optimizer.lr = 2e-3
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = 50
    c.plateau.monitor = ""
    c.eval_every_epochs = 0
    c.eval_every_steps = 100
    c.early_stop_patience = 0
    c.log_every_steps = 20
    c.ckpt_every_steps = 200
    c.xnn_fusion = False             # 0.20 s instead of 0.25 s per step at 64x64
  return trainer_defaults(c)
