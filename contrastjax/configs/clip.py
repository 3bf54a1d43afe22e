"""The CLIP recipe of the modality-gap study (Yaras et al., CPAL 2025, Sec. 4 and App. E):
``configs/clip_gap_coco.py`` is the command-line shim; the variants and the sources of
every number are in its docstring and below."""
from __future__ import annotations

import ml_collections

from contrastjax.configs.common import parse_arg
from contrastjax.configs.common import trainer_defaults
from contrastjax.methods.clip import optimizer_groups

COCO_TRAIN2017_PAIRS = 591_753   # captions_train2017.json annotations (5-7 per image)
COCO_TRAIN2017_IMAGES = 118_287

_RECIPES = ("baseline", "flt", "ts", "s0", "s1", "s2", "s3", "a0", "a1", "tr", "softplus",
            "scale2", "scale10", "slrt", "hs", "ss")
_TS_TAU1 = {"s0": 2e-2, "s1": 3e-2, "s2": 4e-2, "s3": 5e-2}        # [paper] App. E / Table 4
_A_TAU1 = {"a0": 2e-2, "a1": 4e-2}                                  # [paper] Table 4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, demo=False, root="", bpe="", tau=0.0, p=-1.0, tvresnet=False,
                cifar10="$CONTRASTJAX_DATA_DIR/cifar-10-batches-py", prompt="photo",
                **{r: False for r in _RECIPES})
  chosen = [r for r in _RECIPES if a[r]]
  if len(chosen) > 1:
    raise ValueError(f"config arguments {chosen}: choose at most one recipe of {_RECIPES}")
  recipe = {"ts": "s3", "tr": "softplus", "baseline": "baseline"}.get(
      chosen[0] if chosen else "baseline", chosen[0] if chosen else "baseline")

  c = ml_collections.ConfigDict()
  c.method = "clip"
  c.seed = 0                                # [ours]; the paper averages 3 runs

  # ------------------------------------------------------------------ data
  c.data = ml_collections.ConfigDict()
  c.data.name = "coco_captions"
  c.data.root = a.root or "$CONTRASTJAX_DATA_DIR/coco"
  c.data.splits = ("train", "val")          # val2017 (5k images) serves as the test split
  c.data.train_mode = "pairs"               # [ours] one example per (image, caption)
  c.data.eval_caption = 0                   # [ours] first caption of each test image
  c.data.image_size = 224                   # [paper] RandomResizedCrop 224
  c.data.crop_scale = (0.9, 1.0)            # [openclip] image_transform scale
  c.data.tokenizer = "bpe" if a.bpe else "word"   # [ours] no download: word vocab
  c.data.bpe_path = a.bpe
  c.data.context_length = 77                # [openclip] RN50.json
  c.data.vocab_min_count = 1                # [ours]
  c.data.max_vocab = 49408                  # = text vocab_size
  c.data.worker_count = 0
  c.data.cifar10_root = a.cifar10           # '' = no CIFAR-10 evaluations
  c.data.cifar10_prompt = a.prompt          # [ours] 'photo'; 'paper' = App. E.2 as printed

  # ------------------------------------------------------------------ model ([openclip] RN50.json)
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 1024
  if a.tvresnet:                            # [ours] torchvision layout + avg pool
    c.model.image = dict(name="resnet", stage_sizes=(3, 4, 6, 3), stem_width=64,
                         base_width=64)
  else:                                     # [openclip] ModifiedResNet, heads 2048 // 64
    c.model.image = dict(name="modified_resnet", layers=(3, 4, 6, 3), width=64, heads=32,
                         image_size=c.data.image_size)
  c.model.text = dict(name="transformer", vocab_size=49408, context_length=77, width=512,
                      layers=12, heads=8, mlp_ratio=4.0)

  # ------------------------------------------------------------------ method
  c.clip = ml_collections.ConfigDict()
  c.clip.temperature = "learn"
  c.clip.parameterization = "exp"           # [openclip] logit_scale.exp()
  c.clip.scale = 1.0
  c.clip.tau_init = 0.07                    # [openclip] init_logit_scale = log(1/0.07)
  c.clip.beta_min = 1.0                     # [openclip] clamp_(0, ln 100)
  c.clip.beta_max = 100.0
  c.clip.tau0 = 0.01
  c.clip.tau1 = 0.05
  c.clip.schedule_horizon_steps = 0         # 0: the whole run (config.total_steps)
  c.clip.schedule_period_steps = 0
  c.clip.schedule_steps_per_epoch = 0
  c.clip.swap = "none"
  c.clip.swap_prob = 0.0
  c.clip.swap_renormalize = False           # [ours] unstated in the paper

  # ------------------------------------------------------------------ optimisation
  c.batch_size = 1024                       # [paper] App. E.1
  c.eval_batch_size = 1024
  steps_per_epoch = COCO_TRAIN2017_PAIRS // c.batch_size   # as train.resolve_steps
  epochs = 100                              # [paper]
  c.total_steps = epochs * steps_per_epoch
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",                         # [openclip] (the paper does not say)
      lr=5e-4,                              # [paper] best of {1e-5,5e-5,1e-4,5e-4}; [openclip] 5e-4
      b1=0.9, b2=0.999, eps=1e-8,           # [openclip] non-ViT defaults
      weight_decay=0.2,                     # [openclip] default
      schedule="warmup_cosine",             # [paper] cosine decay
      warmup_steps=20 * steps_per_epoch,    # [paper] 20 warm-up epochs
      groups=optimizer_groups(1.0)))        # [openclip] no wd on logit_scale and 1-D params
  c.temperature_lr_mult = 1.0               # lr multiplier of logit_scale (SLRT: x0.1)
  c.log_every_steps = 50
  c.eval_every_steps = steps_per_epoch * 5  # [ours]
  c.ckpt_every_steps = steps_per_epoch
  c.keep_checkpoints = 3
  c.best_metric = ""
  c.early_stop_patience = 0
  c.evals = ml_collections.ConfigDict(dict(
      val=dict(type="retrieval", split="val", gap_pairs=512, seed=0)))  # [paper] 512 pairs
  if a.cifar10:
    # [paper] App. E.2: zero-shot and linear probe on CIFAR-10, top-1 (test split).
    c.evals.zeroshot_cifar10 = dict(type="zeroshot", split="cifar10_test", with_loss=False)
    c.evals.linear_probe_cifar10 = dict(
        type="linear_probe", split="cifar10_probe", with_loss=False,
        val_fraction=0.2, seed=0,           # [ours] C chosen on 10k held-out train images
        cs=tuple(10.0 ** e for e in range(-2, 7)), refine=4, max_iter=1000, tol=1e-6)
  c.mesh = [("data", -1)]
  c.progress_bar = True
  c.plot_curves = True

  if a.demo:
    _demo(c)
  spe = c.clip.schedule_steps_per_epoch = (
      0 if a.demo else steps_per_epoch)     # [paper] tau changes per epoch
  _recipe(c, recipe, a, spe)
  return trainer_defaults(c)


def _recipe(c, recipe: str, a, spe: int) -> None:
  """Sets the temperature / swap recipe of Table 2 (and Tables 3-5)."""
  cc = c.clip
  if recipe == "flt":
    cc.temperature = "fixed"
    cc.tau0 = a.tau or 4e-2                 # [paper] Table 2: 4e-2
  elif recipe in _TS_TAU1:
    cc.temperature = "linear"
    cc.tau0, cc.tau1 = 1e-2, _TS_TAU1[recipe]
  elif recipe in _A_TAU1:
    cc.temperature = "cosine"
    cc.tau0, cc.tau1 = 1e-2, _A_TAU1[recipe]
    # [ours] period unstated: 10 epochs (demo: a fifth of the run)
    cc.schedule_period_steps = 10 * spe if spe else max(c.total_steps // 5, 1)
  elif recipe == "softplus":
    cc.parameterization = "softplus"        # [paper] 1/tau = log(1 + e^nu); init [ours]
  elif recipe in ("scale2", "scale10"):
    cc.parameterization = "exp_scaled"      # [paper] 1/tau = exp(nu / s)
    cc.scale = 2.0 if recipe == "scale2" else 10.0
  elif recipe == "slrt":
    c.temperature_lr_mult *= 0.1                 # [paper] x0.1 lr on the temperature
  elif recipe == "hs":
    cc.swap = "hard"
    cc.swap_prob = a.p if a.p >= 0 else 1e-3     # [paper] Table 2: p = 1e-3
  elif recipe == "ss":
    cc.swap = "soft"
    cc.swap_prob = a.p if a.p >= 0 else 5e-2     # [paper] Table 2: p = 5e-2
  c.optimizer.groups = optimizer_groups(c.temperature_lr_mult)
  if a.tau and recipe != "flt":
    raise ValueError("config argument tau= applies to the flt recipe only")
  if a.p >= 0 and recipe not in ("hs", "ss"):
    raise ValueError("config argument p= applies to the hs and ss recipes only")


def _demo(c) -> None:
  """Synthetic paired vectors with MLP towers: a few minutes on a 2-core CPU."""
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic_pairs", num_train=16384, num_val=1024, num_zeroshot=1000,
      num_classes=10, latent_dim=8, dim_x=32, dim_y=24, within=1.0, noise=0.02,
      data_seed=1234, map_seed=0, worker_count=0))
  c.model = ml_collections.ConfigDict(dict(
      embed_dim=32,
      image=dict(name="mlp", hidden=128, depth=2),
      text=dict(name="mlp", hidden=128, depth=2)))
  c.batch_size = 256
  c.eval_batch_size = 512
  c.total_steps = 1500
  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 100
  # 1,500 steps stand in for COCO's 57,700: the temperature's learning rate is x30 so
  # that the learnable temperature travels as far as in the long run (OpenCLIP's
  # baseline reaches the tau = 0.01 clamp); SLRT then means x3.
  c.temperature_lr_mult = 30.0
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.ckpt_every_steps = 500
  c.evals = ml_collections.ConfigDict(dict(
      val=dict(type="retrieval", split="val", gap_pairs=512, seed=0),
      zeroshot=dict(type="zeroshot", split="zeroshot", with_loss=False)))

