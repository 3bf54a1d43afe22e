"""The SiamSeg recipe (Wang et al. 2024, arXiv:2410.13471), shared by ``configs/siamseg_*.py``.

Source of the numbers: the reference code github.com/woldier/SiamSeg (mmseg 0.21 fork), resolved
from its mmcv config inheritance in docs/methods/siamseg.md ("Recipe") (``configs/SiamSeg/*.py``,
``configs/_base_/uda/dcas.py``, ``schedules/adamw.py``, ``poly_schedule_40k.py``,
``models/daformer_sepaspp_mitb5.py``).

Variants (the ``:arg`` of ``--config=configs/siamseg_<task>.py:ARG``, comma separated):

* (none)        SiamSeg: DACS self-training + the SimSiam branch on target views;
* ``dacs``      the same without the SimSiam branch (isolates the contrastive term);
* ``source_only``  supervised source training only (no teacher, no mixing, no SimSiam);
* ``paper``     ClassMix classes drawn from the batch's label set (the reference before
                PR #5, which produced the paper's numbers; default: per image, current code),
                and the per-GPU statistics of the reference's 4 x 6 images: pseudo-label
                weight, SimSiam BatchNorm and that class set per group of 6 images
                (``config.siamseg.stat_group_size``; default 0: the global batch);
* ``tta``       LoveDA's 4-scale test-time augmentation (0.75/1/1.25/1.5 of 1024, the
                reference's LoveDA evaluation); default: whole-image inference;
* ``slide``     sliding-window inference (512 crops, stride 341; not used by the reference);
* ``demo``      synthetic two-domain aerial data (64 px, half the full domain shift), a tiny
                MiT, minutes on a CPU; run ``demo,source_only`` first and adapt from it with
                ``demo,init_from=<that workdir>`` (EMA alpha 0.99, threshold 0.5 in the demo);
* ``root=DIR``  dataset folder; ``pretrained=FILE`` MiT ImageNet weights (``mit_b5.pth``,
                official / Hugging Face / mmseg naming); ``init_from=DIR`` a contrastjax run
                whose parameters initialise this one.
"""
from __future__ import annotations

import ml_collections

from contrastjax.configs.common import parse_arg
from contrastjax.configs.common import trainer_defaults
from contrastjax.data import builder as data_builder
from contrastjax.errors import ConfigError

#: The reference network (``models.daformer.SiamSegNet``): MiT-B5 (drop path 0.1) + DAFormer
#: head with separable-ASPP fusion (embed 256, channels 256, dilations 1/6/12/18, dropout 0.1)
#: + SimSiam projector 512 -> 512 -> 2048 and predictor 2048 -> 2048 -> 2048 (``simsiam.py``:
#: ``dim=2048``; ``pred_dim=512`` is the projector input = MiT-B5 stage-4 width).
#: ``scan_blocks``: each MiT stage runs as one ``nn.scan`` over its stacked blocks (the same
#: function; stochastic-depth draws come from another rng split than an unrolled model's),
#: so XLA compiles B5's 52 blocks as 4: set it False for the unrolled ``block{i}_{j}``
#: parameter layout (``mit.stack_blocks``/``unstack_blocks`` convert checkpoints).
#: ``remat`` (default on): each encoder block's activations are recomputed in the backward
#: pass. Without it XLA plans 52.9 GiB of temporaries for the step at 512x512 and batch 2
#: (out of memory on a 24 GiB CPU host; PyTorch needs 9.7 GiB), with it 10.4 GiB
#: (BENCHMARKS.md, session 13). The numbers are the same; ``--config.model.remat=False``
#: for the first measurement.
#: ``depthwise``: how every depthwise convolution (MixFFN, ASPP) is computed, the same
#: function (``models.mit.DepthwiseConv2d``). ``'auto'``: on CPUs the shifted sum with its
#: hand-written backward pass (XLA's own gradient of it materialises nine shifted copies
#: of each input: 7.6 against 1.5 GiB of temporaries on the head's dilated layers), on
#: GPUs/TPUs XLA's grouped convolution. ``gelu_grad='input'``: the MixFFN GELU's backward
#: pass keeps only its input (``models.mit.gelu_saving_input``; 15% off the MiT-B5
#: forward + backward on this CPU). The demo keeps XLA's own gradients
#: (``'shifts_autodiff'``, ``'autodiff'``), with which its README numbers were measured:
#: the gradients differ in float rounding only (BENCHMARKS.md, session 14).
FULL_MODEL = dict(variant="b5", drop_path_rate=0.1, remat=True, remat_policy="nothing",
                  scan_blocks=True,
                  fusion="sep_aspp",
                  embed_dims=256, channels=256, dropout_ratio=0.1, simsiam_dim=2048,
                  dtype="float32", depthwise="auto", gelu_grad="input")
#: The demo network: a 4-stage MiT with one block per stage and narrow widths, head 32 wide.
DEMO_MODEL = dict(variant="b0", drop_path_rate=0.0, remat=False, remat_policy="nothing",
                  scan_blocks=False,
                  fusion="sep_aspp",
                  embed_dims=32, channels=32, dropout_ratio=0.1, simsiam_dim=128,
                  dtype="float32", depthwise="shifts_autodiff", gelu_grad="autodiff",
                  backbone=dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                                num_heads=(1, 2, 4, 8)))

#: Parameter-group rules of mmcv 1.5's ``DefaultOptimizerConstructor`` with
#: ``custom_keys={'head': lr_mult 10, 'pos_block': decay_mult 0, 'norm': decay_mult 0}``
#: (first key in mmcv's order that is a substring of the torch name wins). In torch names
#: (mmseg MiT) the LayerNorms called ``*norm*`` are the patch-embedding norm, the attention's
#: spatial-reduction norm and the blocks' ``norm1``/``norm2``; the stage-final LayerNorms are
#: ``layers.{i}.2`` and so KEEP weight decay (here they are called ``backbone/norm{i}``, hence the
#: explicit paths). ``decode_head`` (BatchNorms included) gets lr x10 with decay; SimSiam's
#: projector/predictor get the base lr with decay.
PARAM_GROUPS = (
    (r"^decode_head/", 10.0, 1.0),
    (r"^backbone/(patch_embed\d+/norm|block\d+(_\d+)?/(norm1|norm2|attn/norm))/", 1.0, 0.0),
)

TASKS = {
    # name: (data maker, maker keys, eval_every)
    "loveda_rural2urban": ("loveda", dict(source_domain="Rural", target_domain="Urban"), 1000),
    "loveda_urban2rural": ("loveda", dict(source_domain="Urban", target_domain="Rural"), 1000),
    "potsdam_irrg2vaihingen_irrg": (
        "isprs", dict(source="Potsdam_IRRG_DA", target="Vaihingen_IRRG_DA"), 1000),
    "potsdam_rgb2vaihingen_irrg": (
        "isprs", dict(source="Potsdam_RGB_DA", target="Vaihingen_IRRG_DA"), 1000),
    "vaihingen_irrg2potsdam_irrg": (
        "isprs", dict(source="Vaihingen_IRRG_DA", target="Potsdam_IRRG_DA"), 1000),
    "vaihingen_irrg2potsdam_rgb": (
        "isprs", dict(source="Vaihingen_IRRG_DA", target="Potsdam_RGB_DA"), 500),
}
#: CE class weights of the task configs (``loss_decode.class_weight``).
CLASS_WEIGHTS = {
    "loveda": (1.0, 1.0, 1.0, 1.25, 1.5, 1.5, 1.0),   # water 1.25, barren 1.5, forest 1.5
    "isprs": (1.0, 1.0, 1.0, 1.25, 1.5, 1.5),          # tree 1.25, car 1.5, clutter 1.5
}
VARIANTS = ("siamseg", "dacs", "source_only")


def get_config(family: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Builds the config of a task of ``family`` (``'loveda'`` or ``'isprs'``).

  ``arg`` holds the variants of the module docstring plus the task: for LoveDA
  ``urban2rural`` (default Rural -> Urban), for ISPRS ``task=<name>`` with a name of
  :data:`TASKS` (default ``potsdam_irrg2vaihingen_irrg``).
  """
  if family == "loveda":
    a = parse_arg(arg, demo=False, dacs=False, source_only=False, paper=False, tta=False,
                  slide=False, root="", pretrained="", init_from="", urban2rural=False)
    task = "loveda_urban2rural" if a.urban2rural else "loveda_rural2urban"
  elif family == "isprs":
    a = parse_arg(arg, demo=False, dacs=False, source_only=False, paper=False, tta=False,
                  slide=False, root="", pretrained="", init_from="",
                  task="potsdam_irrg2vaihingen_irrg")
    task = a.task
    if task not in TASKS or TASKS[task][0] != "isprs":
      raise ConfigError(f"config argument task={task!r} is not an ISPRS task; expected one of "
                       f"{sorted(k for k, v in TASKS.items() if v[0] == 'isprs')}")
  else:
    raise ValueError(f"SiamSeg task family {family!r}; expected 'loveda' or 'isprs'")
  if a.dacs and a.source_only:
    raise ConfigError(f"config arguments 'dacs' and 'source_only' exclude each other ({arg!r})")
  if a.tta and a.slide:
    raise ConfigError(f"config arguments 'tta' and 'slide' exclude each other ({arg!r}); "
                     "tta runs whole-image inference per scale")
  maker, maker_keys, eval_every = TASKS[task]
  c = ml_collections.ConfigDict()
  c.method = "siamseg"
  c.task = task
  c.seed = 0                        # reference: random unless --seed; we fix it

  # ------------------------------------------------------------------ data
  c.data = ml_collections.ConfigDict()
  c.data.name = maker
  default_root = "$CONTRASTJAX_DATA_DIR/LoveDA" if maker == "loveda" else "$CONTRASTJAX_DATA_DIR"
  c.data.root = a.root or default_root
  for k, v in maker_keys.items():
    c.data[k] = v
  c.data.crop_size = (512, 512)     # RandomCrop(crop_size) of the train pipelines
  c.data.worker_count = 0           # grain workers (reference: workers_per_gpu=3)
  info = data_builder.dataset_info(maker)

  # ------------------------------------------------------------------ model
  c.model = ml_collections.ConfigDict(FULL_MODEL)
  c.model.backbone = ml_collections.ConfigDict()   # extra MixVisionTransformer fields

  # ------------------------------------------------------------------ method
  s = c.siamseg = ml_collections.ConfigDict()
  s.variant = "source_only" if a.source_only else ("dacs" if a.dacs else "siamseg")
  s.num_classes = info.num_classes
  s.class_weight = CLASS_WEIGHTS[maker]
  s.alpha = 0.999                   # EMA, alpha_t = min(1 - 1/(iter+1), 0.999)
  s.pseudo_threshold = 0.968
  s.classmix_scope = "batch" if a.paper else "image"
  # Pseudo-label weight, SimSiam BatchNorm statistics and the 'batch' ClassMix class set per
  # group of 6 consecutive images: the reference's per-GPU statistics (6 per GPU, 4 GPUs;
  # `paper`). 0: over the global batch (our default; the reference's 4-GPU runs differ).
  s.stat_group_size = 6 if a.paper else 0
  s.color_jitter_strength = 0.2     # dcas.py: color_jitter_strength=0.2
  s.color_jitter_probability = 0.2  # applied when U(0,1) > 0.2
  s.blur = True
  s.contrastive_weight = 1.0        # siam_seg.py: no coefficient
  s.contrastive_domain = "target"   # contras_model_cfg=dict(mod="target")
  # Each loss's gradient before the next forward pass, as the reference's per-loss
  # backward(): one student pass's activations live at a time. 'joint': one gradient of
  # the summed loss (same numbers, every pass's activations live at once).
  s.backward = "per_loss"
  s.inference = "tta" if a.tta else ("slide" if a.slide else "whole")
  s.slide_crop = (512, 512)
  s.slide_stride = (341, 341)
  s.tta_ratios = (0.75, 1.0, 1.25, 1.5)
  s.tta_img_scale = (1024, 1024) if maker == "loveda" else (512, 512)
  s.pretrained = a.pretrained       # reference: pretrained/mit_b5.pth (ImageNet)
  s.init_from = a.init_from
  s.init_from_which = "latest"

  # ------------------------------------------------------------------ optimisation
  # Reference: samples_per_gpu=6 source + 6 target on 4 GPUs (readme dist_train.sh ... 4).
  c.batch_size = 24                 # global: 6 per GPU x 4 GPUs
  c.eval_batch_size = 8
  c.total_steps = 40000             # IterBasedRunner(max_iters=40000)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=6e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
      schedule="warmup_poly_mmcv", warmup_steps=1500, warmup_ratio=1e-6, power=1.0,
      end_lr=0.0, groups=[list(g) for g in PARAM_GROUPS]))
  c.eval_every_steps = eval_every   # EvalHook interval
  c.ckpt_every_steps = eval_every   # CheckpointHook interval
  c.log_every_steps = 50
  c.keep_checkpoints = 3
  c.best_metric = "val/mIoU"
  c.best_mode = "max"
  c.early_stop_patience = 0
  c.eval_samples = 4
  c.progress_bar = True
  c.evals = ml_collections.ConfigDict(dict(
      val=dict(type="semseg", split="val", num_classes=info.num_classes,
               class_names=list(info.classes), with_loss=True)))
  c.mesh = [("data", -1)]

  if a.demo:
    aerial = data_builder.dataset_info("synthetic_aerial")
    c.task = "synthetic_aerial_source2target"
    c.data = ml_collections.ConfigDict(dict(
        name="synthetic_aerial", image_size=64, num_train=256, num_target_train=256,
        num_val=64, data_seed=1234, shift=0.5, worker_count=0))
    c.model = ml_collections.ConfigDict(DEMO_MODEL)
    s.num_classes = aerial.num_classes
    s.class_weight = (1.0,) * aerial.num_classes
    s.tta_img_scale = (64, 64)
    s.slide_crop = (32, 32)
    s.slide_stride = (21, 21)
    c.batch_size = 8
    c.eval_batch_size = 32
    if a.paper:
      s.stat_group_size = 4   # two "GPUs" of 4 images
    # The demo is two commands (BENCHMARKS.md): ``demo,source_only`` (600 steps), then
    # ``demo,init_from=<its workdir>`` adapts for 400 steps. A run this short needs a
    # teacher that follows the student within ~100 steps and a lower confidence threshold
    # (the reference's 0.999 / 0.968 are for 40k steps: its pseudo weight stays ~0.05 here).
    # Threshold 0.5 (pseudo weight ~0.9): target mIoU 0.587 vs 0.540 at 0.9 and 0.479 for
    # continued source-only training (BENCHMARKS.md, threshold sweep).
    c.total_steps = 600 if a.source_only else 400
    s.alpha = 0.99
    s.pseudo_threshold = 0.5
    c.optimizer.lr = 4e-4
    c.optimizer.warmup_steps = 40
    c.eval_every_steps = 200
    c.ckpt_every_steps = 200
    c.log_every_steps = 20
    c.evals = ml_collections.ConfigDict(dict(
        val=dict(type="semseg", split="val", num_classes=aerial.num_classes,
                 class_names=list(aerial.classes), with_loss=True),
        source_val=dict(type="semseg", split="source_val", num_classes=aerial.num_classes,
                        class_names=list(aerial.classes), with_loss=False)))
  return trainer_defaults(c)
