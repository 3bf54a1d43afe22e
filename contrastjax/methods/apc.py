"""APC: weakly supervised semantic segmentation from image-level labels, in one stage
(Wu et al., "Adaptive Patch Contrast for Weakly Supervised Semantic Segmentation", EAAI
139:109626, arXiv 2407.10649). ``config.method = 'apc'``.

APC has no public code and its full text could not be read: this is a documented
reconstruction on its base ViT-PCM (Rossetti et al., ECCV 2022, github.com/deepplants/
ViT-PCM @ 1fea66f) and the closest public single-stage method ToCo (Ru et al., CVPR 2023,
github.com/rulixiang/ToCo @ e13514d). Every choice the paper leaves open is an option of
:class:`APCOptions`; ``docs/methods/apc.md`` lists them with their alternatives.

One train step (``P``: per-patch class probabilities ``[B, h, w, C+1]``, background 0):

1. ViT -> (HV-BiLSTM) -> patch classifier: ``P`` (``models/apc.py:APCNet``);
2. classification: ``pool(P)`` (``gmp`` ViT-PCM, ``topk`` TKP, ``akp`` Adaptive-K Pooling)
   -> Keras BCE against the multi-hot labels including background, plus ViT-PCM's L2 on
   the classifier kernel (``apc_losses.pool_patch_scores``, ``keras_binary_crossentropy``,
   ``l2_kernel_penalty``);
3. online pseudo-labels without CAM: ViT-PCM's merge of ``P`` with the image labels
   (absent classes out, each class divided by its maximum, renormalised), upsampled to the
   image, argmax; options: confidence ignore, ToCo's PAR on the image
   (``apc_losses.merged_pseudo_labels``, ``apc_par.par_refine``); no gradient;
4. segmentation: the decoder (LargeFOV / ASPP) on the patch grid, upsampled, ToCo's
   background/foreground-balanced cross-entropy against the pseudo-labels, after a
   warm-up (``apc_losses.seg_loss``);
5. Patch Contrastive Learning on the patch embeddings with labels from the merged grid
   (confident patches only): ToCo's absolute-cosine form or a temperature-scaled
   supervised-contrastive form (``apc_losses.patch_contrast_loss``).

The ``supervised`` variant trains the same decoder on the true masks (the upper bound
WSSS papers report against); it is the only variant whose training batches hold masks.

``predict`` returns ``pred`` (the segmentation: the decoder's argmax, or without a decoder
the merge of ``P`` with the *predicted* image labels) and ``pseudo`` (the merge with the
*true* image labels: the pseudo-label quality WSSS papers report on VOC train) and, with
an evaluation reading it, ``pseudo_par`` (that merge refined by PAR: with ``par`` the
decoder's targets before the confidence ignore).
"""
from __future__ import annotations

import dataclasses

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastjax import checkpoint
from contrastjax import parallel
from contrastjax.errors import ConfigError
from contrastjax.evaluators import seg_inference
from contrastjax.methods import apc_losses as L
from contrastjax.methods import apc_par
from contrastjax.methods import options
from contrastjax.methods.base import Method, module_kwargs
from contrastjax.models import apc as apc_model
from contrastjax.models import resample
from contrastjax.models import vit as vit_lib

VARIANTS = ("gmp", "topk", "akp", "akp_pcl", "apc", "supervised")
INFERENCE_MODES = ("single", "msf")
NORMALIZATIONS = ("vit_pcm", "imagenet")
#: ImageNet mean/std on 0..1 (timm / ToCo inputs).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class APCOptions:
  """``config.apc``. [vitpcm] = ViT-PCM's code, [toco] = ToCo's code, [recon] = our
  reconstruction of what APC leaves open (alternatives are the other choices)."""
  # which components train: 'gmp'/'topk'/'akp' the classifier alone (the pooling is
  # `pooling`, which the config's variant sets), 'akp_pcl' + patch contrast, 'apc' +
  # decoder on the pseudo-labels, 'supervised' the decoder on the true masks
  variant: str = options.choice("apc", VARIANTS)
  num_classes: int = 0                  # foreground classes (VOC 20, COCO 80)
  normalization: str = options.choice("vit_pcm", NORMALIZATIONS)  # [vitpcm] x/127.5 - 1
  # pooling [recon]: 'gmp' [vitpcm], 'topk' (TKP), 'akp' with one of three K rules
  pooling: str = options.choice("akp", L.POOLING_MODES)
  topk: int = 4
  akp_rule: str = options.choice("ratio_to_max", L.AKP_RULES)
  akp_tau: float = 0.5                  # H1/H2 ratio threshold [recon]
  akp_rho: float = 0.1                  # H3 share [recon]
  akp_k_max: int = 0                    # 0: no cap
  # AKP starts as GMP (K = 1) for this many steps [recon]. From an uninformative start
  # every patch scores alike, so the H1/H2 rules pick K = all patches (mean pooling),
  # which asks every patch to be background and each present class at once: on the
  # demo the classifier stays at the label prior. 0: AKP from the first step.
  akp_warmup_steps: int = 0
  l2_weight: float = L.VITPCM_L2_WEIGHT  # [vitpcm] classifier L2(0.01)
  # segmentation branch [recon, toco]
  seg_weight: float = 0.1               # [toco] w_seg 0.1
  seg_warmup_steps: int = 2000          # [toco] seg loss off for the first 2000 iterations
  pseudo_threshold: float = 0.0         # confidence ignore (0: off) [recon]
  par: bool = False                     # ToCo's PAR on the merged map [toco]
  par_iters: int = apc_par.TOCO_NUM_ITER
  # PAR runs on the image resized by 1/par_down_scale (half-pixel bilinear), its result
  # resized back: ToCo's refine_cams_with_bkg_v2 uses 2 [toco]; 1 = full resolution
  par_down_scale: int = 2
  seg_nan_on_empty: bool = False        # [toco] bug: NaN without foreground in the batch
  # patch contrast [recon, toco form]
  pcl_weight: float = 0.2               # [toco] w_ptc 0.2
  pcl_warmup_steps: int = 0
  pcl_form: str = options.choice("ptc", L.PATCH_CONTRAST_FORMS)
  pcl_temperature: float = 0.07         # supcon only
  pcl_features: str = options.choice("features", ("features", "vit"))  # BiLSTM out / ViT
  pcl_threshold: float = 0.5            # patches below this merged confidence: ignored
  # ViT-PCM's equivariant mosaic loss (model.py compute_cce_loss; its loss is mce + cce +
  # reg, weight 1) [vitpcm]; whether APC keeps it is unknown, so it is off by default
  # [recon]. The two views are made in the step from the batch image: view 1 (the
  # classification input and, in inference mode without gradient, the teacher) and
  # view 2 (the student), each flipped left-right / up-down / transposed with
  # eq_flip_prob; view 2 is also cropped with eq_crop_prob (a patch-aligned square of
  # eq_crop_fraction of the side) and resized to half the side, and four of them are
  # tiled into one mosaic of the input size [vitpcm: TRAIN 384, CROP 128, SCALE 192].
  eq_weight: float = 0.0
  eq_flip_prob: float = 0.5             # [vitpcm] PROB_FLIP_LR, PROB_FLIP_UD, PROB_ROT90
  eq_crop_prob: float = 0.3             # [vitpcm] PROB_CROP
  eq_crop_fraction: float = 1.0 / 3.0   # [vitpcm] CROP / TRAIN = 128 / 384
  # evaluation
  score_threshold: float = 0.5          # predicted image labels (no decoder)
  # 'single': one pass; 'msf': ToCo's multi-scale + flip test of the decoder (scales
  # (1.0, 1.5, 1.25), flipped pass added, maximum over scales) [toco]
  inference: str = options.choice("single", INFERENCE_MODES)
  msf_scales: tuple[float, ...] = seg_inference.TOCO_MSF_SCALES
  msf_flip: bool = True
  # weights
  pretrained: str = ""                  # ViT weights (.npz Google / timm / HF)
  init_from: str = ""                   # a previous phase's workdir (e.g. frozen backbone)
  init_from_which: str | int = "latest"

  def check(self, where: str) -> None:
    if self.num_classes <= 0:
      raise ConfigError(f"{where}.num_classes must be set (> 0, foreground classes)")
    if self.eq_weight < 0 or not 0.0 <= self.eq_flip_prob <= 1.0 or not (
        0.0 <= self.eq_crop_prob <= 1.0) or not 0.0 < self.eq_crop_fraction <= 1.0:
      raise ConfigError(f"{where}.eq_weight / eq_flip_prob / eq_crop_prob / "
                        f"eq_crop_fraction: expected eq_weight >= 0, probabilities in "
                        f"[0, 1] and a crop fraction in (0, 1]")
    if self.par_down_scale < 1:
      raise ConfigError(f"{where}.par_down_scale={self.par_down_scale}: expected >= 1")
    for name in ("topk", "par_iters", "seg_warmup_steps", "pcl_warmup_steps", "akp_k_max",
                 "akp_warmup_steps"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{where}.{name}={getattr(self, name)}: expected >= 0")
    if not 0.0 <= self.pseudo_threshold < 1.0 or not 0.0 <= self.pcl_threshold < 1.0:
      raise ConfigError(f"{where}.pseudo_threshold / pcl_threshold: expected in [0, 1)")
    if self.inference == "msf":
      if not self.uses_decoder:
        raise ConfigError(
            f"{where}.inference='msf' tests the decoder (ToCo's multi-scale + flip); the "
            f"variant {self.variant!r} has none: expected 'single' or a variant in "
            f"('apc', 'supervised')")
      if not self.msf_scales or any(not float(s) > 0 for s in self.msf_scales):
        raise ConfigError(f"{where}.msf_scales={tuple(self.msf_scales)}: expected one or "
                          f"more positive scales")

  @property
  def uses_decoder(self) -> bool:
    return self.variant in ("apc", "supervised")

  @property
  def uses_pcl(self) -> bool:
    return self.variant in ("akp_pcl", "apc") and self.pcl_weight > 0


def normalize(images: jax.Array, kind: str) -> jax.Array:
  """uint8-range images (0..255 floats) -> the backbone's input range."""
  if kind == "vit_pcm":
    return images / 127.5 - 1.0
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype) * 255.0
  std = jnp.asarray(IMAGENET_STD, images.dtype) * 255.0
  return (images - mean) / std


class APCMethod(Method):
  """See the module docstring. Batches: ``image`` float ``[B, H, W, 3]`` in 0..255,
  ``labels`` multi-hot ``[B, C+1]`` (background first, always 1); the ``supervised``
  variant's training batches and every evaluation batch also hold ``label`` ``[B, H, W]``
  (class ids, 255 ignored)."""

  name = "apc"

  def __init__(self, config, run=None):
    super().__init__(config, run)
    self.options = o = options.parse(APCOptions, config.apc, "config.apc")
    model_cfg = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
                     else config.model)
    if o.uses_decoder and model_cfg.get("decoder", "none") == "none":
      model_cfg["decoder"] = "largefov"  # [toco] the decoder of the single-stage loop
    if not o.uses_decoder:
      model_cfg["decoder"] = "none"
    kwargs = module_kwargs(apc_model.APCNet, model_cfg, "config.model",
                           skip=("num_classes", "name"))
    if "backbone_overrides" in kwargs:
      kwargs["backbone_overrides"] = tuple(
          (k, tuple(v) if isinstance(v, list) else v)
          for k, v in dict(kwargs["backbone_overrides"]).items())
    self.net = apc_model.APCNet(num_classes=o.num_classes, **kwargs)
    self.patch_size = int(dict(kwargs.get("backbone_overrides", ())).get(
        "patch_size", vit_lib.vit(model_cfg.get("variant", "b16")).patch_size))
    if o.eq_weight > 0:
      size = int(config.data.get("crop_size", 0) or 0)
      if config.get("batch_size", 4) % 4:
        raise ConfigError(f"config.apc.eq_weight > 0 tiles four view-2 images per mosaic: "
                          f"config.batch_size={config.batch_size} must be a multiple of 4")
      if size and size % (2 * self.patch_size):
        raise ConfigError(f"config.apc.eq_weight > 0 halves the {size}-pixel crops into "
                          f"mosaic tiles: config.data.crop_size must be a multiple of "
                          f"2 x patch size = {2 * self.patch_size}")
    # The decoder's probabilities go to the host only for an evaluation that refines them
    # (a dense CRF): [B, H, W, C+1] floats per batch otherwise cost transfer for nothing.
    evals = config.get("evals", None) or {}
    read = {dict(e).get("output_key") for e in dict(evals).values()}
    self.seg_prob_output = o.uses_decoder and "seg_prob" in read
    # Likewise the PAR-refined pseudo-labels (ten PAR passes per batch); they are what
    # PAR makes of the merged map whether or not training uses PAR (config.apc.par).
    self.pseudo_par_output = "pseudo_par" in read

  # ------------------------------------------------------------------ set-up
  def init(self, rng, batch):
    x = normalize(batch["image"].astype(jnp.float32), self.options.normalization)
    variables = parallel.auto_axes(
        lambda r, x: self.net.init({"params": r, "dropout": r}, x, train=False), P())(rng, x)
    return variables["params"], {}, {}

  def load_pretrained(self, params, model_state, extra):
    o = self.options
    if o.pretrained:
      new, ignored = apc_model.load_backbone({"params": params}, o.pretrained)
      params = new["params"]
      logging.info("loaded ViT weights from %s (%d keys ignored)", o.pretrained, len(ignored))
    if o.init_from:
      params, model_state, step = checkpoint.import_subtrees(
          params, model_state, o.init_from, o.init_from_which)
      logging.info("initialised %s from %s (step %s)", sorted(params), o.init_from, step)
    return params, model_state, extra

  # ------------------------------------------------------------------ pieces
  def _apply(self, params, x, *, train: bool, rng=None):
    rngs = {"dropout": rng} if train else {}
    return self.net.apply({"params": params}, x, train=train, rngs=rngs)

  def _pool(self, probs, step=None):
    """Pooled image scores; ``step`` (training) selects GMP during the AKP warm-up."""
    o = self.options
    pooled = L.pool_patch_scores(probs, mode=o.pooling, k=o.topk, rule=o.akp_rule,
                                 tau=o.akp_tau, rho=o.akp_rho, k_max=o.akp_k_max or None)
    if o.pooling == "akp" and o.akp_warmup_steps and step is not None:
      pooled = jnp.where(step < o.akp_warmup_steps, L.gmp_pool(probs), pooled)
    return pooled

  def _pseudo_labels(self, probs, labels, images):
    """Online pseudo-labels ``[B, H, W]`` (255 = ignored), without gradient."""
    o = self.options
    probs = jax.lax.stop_gradient(probs)
    size = images.shape[1:3]
    if not o.par:
      return L.merged_pseudo_labels(probs, labels, out_size=size,
                                    threshold=o.pseudo_threshold or None)
    return L.confident_labels(self._par_refined(probs, labels, images),
                              threshold=o.pseudo_threshold or None)

  def _par_refined(self, probs, labels, images):
    """ViT-PCM's merged map refined by ToCo's PAR on the image (at 1/par_down_scale),
    resized to the image and renormalised: ``[B, H, W, C+1]``."""
    o = self.options
    size = images.shape[1:3]
    merged = L.merge_class_labels(probs, labels)
    small = (size[0] // o.par_down_scale, size[1] // o.par_down_scale)
    if min(small) < 1:
      raise ValueError(f"config.apc.par_down_scale={o.par_down_scale} shrinks {size} images "
                       f"to nothing")
    refined = apc_par.par_refine(resample.resize_bilinear_half_pixel(images / 255.0, small),
                                 merged, num_iter=o.par_iters)
    refined = resample.resize_bilinear_half_pixel(refined, size)
    return refined / jnp.maximum(refined.sum(-1, keepdims=True), 1e-12)

  def _token_labels(self, probs, labels):
    merged = L.merge_class_labels(jax.lax.stop_gradient(probs), labels)
    return L.confident_labels(merged, threshold=self.options.pcl_threshold or None)

  # ------------------------------------------------------------------ training
  def loss_fn(self, params, model_state, extra, batch, rng, step):
    # The ViT reshapes batch-sharded activations (patches, heads): traced with sharding
    # propagation under the spine's explicit mesh (the numbers are the same).
    del extra
    return parallel.auto_axes(self._loss, P())(params, model_state, batch, rng, step)

  def eq_views(self, images, rng):
    """ViT-PCM's two views of ``images`` ``[B, S, S, 3]`` for the equivariant loss.

    Returns a dict: ``view1`` ``[B, S, S, 3]`` (flipped by ``flips1``), ``mosaic``
    ``[B/4, S, S, 3]`` (view 2: cropped where ``crop_mask``, at patch offsets
    ``crop_offsets`` and ``crop_size`` patches, resized to ``S/2`` with align-corners
    bilinear as ViT-PCM's ``resize``, flipped by ``flips2``, tiled by
    :func:`apc_losses.mosaic_2x2`), and those flags.
    """
    o = self.options
    b, s, s2, _ = images.shape
    p = self.patch_size
    if s != s2 or s % (2 * p) or b % 4:
      raise ValueError(f"the equivariant loss needs square images whose side is a multiple of "
                       f"2 x patch = {2 * p} and a batch divisible by 4; got {images.shape}")
    g = s // p
    crop = max(1, min(g, int(round(o.eq_crop_fraction * g))))
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    flips1 = (jax.random.uniform(k1, (b, 3)) < o.eq_flip_prob).astype(jnp.int32)
    flips2 = (jax.random.uniform(k2, (b, 3)) < o.eq_flip_prob).astype(jnp.int32)
    crop_mask = jax.random.uniform(k3, (b,)) < o.eq_crop_prob
    offsets = jax.random.randint(k4, (b, 2), 0, g - crop + 1)
    half = (s // 2, s // 2)
    crops = jax.vmap(lambda x, off: jax.lax.dynamic_slice(
        x, (off[0] * p, off[1] * p, 0), (crop * p, crop * p, 3)))(images, offsets)
    view2 = jnp.where(crop_mask[:, None, None, None],
                      resample.resize_bilinear_align_corners(crops, half),
                      resample.resize_bilinear_align_corners(images, half))
    return {"view1": L.apply_flips(images, flips1), "flips1": flips1,
            "mosaic": L.mosaic_2x2(L.apply_flips(view2, flips2)), "flips2": flips2,
            "crop_size": crop, "crop_offsets": offsets, "crop_mask": crop_mask}

  def _loss(self, params, model_state, batch, rng, step):
    o = self.options
    images = batch["image"].astype(jnp.float32)
    labels = batch["labels"].astype(jnp.float32)
    if o.eq_weight > 0:
      rng, k_views, k_student = jax.random.split(rng, 3)
      views = self.eq_views(images, k_views)
      images = views["view1"]  # the classification input is view 1 [vitpcm]
    probs, aux = self._apply(params, normalize(images, o.normalization), train=True, rng=rng)
    scores = self._pool(probs, step)
    loss_cls = L.keras_binary_crossentropy(scores, labels)
    loss_reg = L.l2_kernel_penalty(apc_model.classifier_kernel(params), o.l2_weight)
    loss = loss_cls + loss_reg
    metrics = {"loss_cls": loss_cls, "loss_reg": loss_reg}
    step_f = jnp.asarray(step, jnp.float32)
    if o.uses_decoder:
      seg_logits = resample.resize_bilinear_half_pixel(aux["seg_logits"].astype(jnp.float32),
                                                 images.shape[1:3])
      if o.variant == "supervised":
        mask = batch["label"].astype(jnp.int32)
        if o.eq_weight > 0:  # the input is view 1: its mask takes the same flips
          mask = L.apply_flips(mask[..., None], views["flips1"])[..., 0]
        loss_seg = L.seg_loss(seg_logits, mask, nan_on_empty=o.seg_nan_on_empty)
      else:
        # The pseudo-labels (PAR's ten passes among them) are only computed once the
        # segmentation loss is on: before the warm-up ends the term is 0 (logged as 0).
        def seg_term(logits):
          target = self._pseudo_labels(probs, labels, images)
          return L.seg_loss(logits, target, nan_on_empty=o.seg_nan_on_empty)
        loss_seg = jax.lax.cond(step_f >= o.seg_warmup_steps, seg_term,
                                lambda logits: jnp.zeros((), jnp.float32), seg_logits)
      loss = loss + o.seg_weight * loss_seg
      metrics["loss_seg"] = loss_seg
    if o.uses_pcl:
      feats = aux["features"] if o.pcl_features == "features" else aux["vit_grid"]
      b, h, w, d = feats.shape
      tokens = self._token_labels(probs, labels).reshape(b, h * w)
      loss_pcl = L.patch_contrast_loss(feats.reshape(b, h * w, d).astype(jnp.float32),
                                       tokens, form=o.pcl_form,
                                       temperature=o.pcl_temperature)
      on = (step_f >= o.pcl_warmup_steps).astype(jnp.float32)
      loss = loss + on * o.pcl_weight * loss_pcl
      metrics["loss_pcl"] = loss_pcl
    if o.eq_weight > 0:
      # ViT-PCM: the teacher is view 1 in inference mode, without gradient; the student
      # the view-2 mosaics in training mode.
      teacher, _ = self._apply(params, normalize(images, o.normalization), train=False)
      student, _ = self._apply(params, normalize(views["mosaic"], o.normalization),
                               train=True, rng=k_student)
      loss_eq = L.equivariance_loss(
          jax.lax.stop_gradient(teacher), student, labels, teacher_flips=views["flips1"],
          student_flips=views["flips2"], crop_size=views["crop_size"],
          crop_offsets=views["crop_offsets"], crop_mask=views["crop_mask"])
      loss = loss + o.eq_weight * loss_eq
      metrics["loss_eq"] = loss_eq
    return loss, (model_state, metrics)

  # ------------------------------------------------------------------ evaluation
  def predict(self, params, model_state, extra, batch) -> dict[str, jax.Array]:
    """``pred`` (segmentation) and ``pseudo`` (merge with the true image labels) class
    maps ``[B, H, W]``, ``scores`` (pooled image scores ``[B, C+1]``) and, with a decoder,
    ``seg_prob`` (its softmax probabilities ``[B, H, W, C+1]``, single-scale or ``msf``:
    what the ``postprocess='crf'`` evaluation refines; only when an evaluation of the
    config reads it)."""
    del model_state, extra
    return parallel.auto_axes(self._predict, P(parallel.DATA_AXIS))(params, batch)

  def _predict(self, params, batch):
    o = self.options
    images = batch["image"].astype(jnp.float32)
    probs, aux = self._apply(params, normalize(images, o.normalization), train=False)
    size = images.shape[1:3]
    scores = self._pool(probs)
    out = {"scores": scores}
    if "labels" in batch:
      out["pseudo"] = L.merged_pseudo_labels(probs, batch["labels"].astype(jnp.float32),
                                             out_size=size)
      if self.pseudo_par_output:  # the decoder's targets, before the confidence ignore
        out["pseudo_par"] = L.confident_labels(
            self._par_refined(probs, batch["labels"].astype(jnp.float32), images))
    if o.uses_decoder and o.inference == "msf":
      decoder = lambda x: self._apply(params, x, train=False)[1]["seg_logits"]
      seg = seg_inference.toco_msf_inference(decoder, normalize(images, o.normalization),
                                             scales=o.msf_scales, flip=o.msf_flip)
    elif o.uses_decoder:
      seg = resample.resize_bilinear_half_pixel(aux["seg_logits"].astype(jnp.float32), size)
    if o.uses_decoder:
      out["pred"] = seg_inference.predict_classes(seg)
      if self.seg_prob_output:
        out["seg_prob"] = jax.nn.softmax(seg, axis=-1)  # the dense CRF's input [toco]
    else:
      present = (scores > o.score_threshold).astype(jnp.float32).at[:, 0].set(1.0)
      out["pred"] = L.merged_pseudo_labels(probs, present, out_size=size)
    return out

  def eval_loss(self, params, model_state, extra, batch) -> jax.Array:
    """The classification loss of the valid rows (the validation loss)."""
    del model_state, extra
    return parallel.auto_axes(self._eval_loss, P())(params, batch)

  def _eval_loss(self, params, batch):
    o = self.options
    images = batch["image"].astype(jnp.float32)
    probs, _ = self._apply(params, normalize(images, o.normalization), train=False)
    scores = jnp.clip(self._pool(probs), L.KERAS_EPSILON, 1.0 - L.KERAS_EPSILON)
    y = batch["labels"].astype(jnp.float32)
    per = -jnp.mean(y * jnp.log(scores + L.KERAS_EPSILON)
                    + (1 - y) * jnp.log(1 - scores + L.KERAS_EPSILON), axis=-1)
    w = batch["valid"].astype(per.dtype)
    return (per * w).sum() / jnp.maximum(w.sum(), 1.0)

