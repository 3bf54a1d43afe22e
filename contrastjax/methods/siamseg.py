"""SiamSeg / DACS / source-only unsupervised domain adaptation on the spine.

Reference: github.com/woldier/SiamSeg (mmseg 0.21 fork with DAFormer's DACS loop); the method,
its configs and the deviations are described in ``docs/methods/siamseg.md``. Images are NHWC,
normalised with ImageNet mean/std on 0..255 values (``(x - mean) / std``) as the data pipeline
emits them; labels are int32 with 255 = ignored.

This module holds the training step (:class:`SiamSegMethod`), its options and the network
builder; the building blocks live by role:

* :mod:`contrastjax.methods.dacs`: EMA teacher, pseudo-label weight, ClassMix;
* :mod:`contrastjax.augment.views`: DACS's strong transform, the SimSiam views;
* :mod:`contrastjax.methods.siamseg_losses`: mmseg's CE, the SimSiam loss;
* :mod:`contrastjax.models.daformer`: the network (MiT + DAFormer head + SimSiam branch);
* :func:`contrastjax.methods.base.value_and_grad_by_term`: the per-loss backward.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastjax import parallel
from contrastjax.augment import views
from contrastjax.errors import ConfigError
from contrastjax.evaluators import seg_inference
from contrastjax.methods import dacs, options
from contrastjax.methods.base import (Method, Metrics, loss_of_terms, module_kwargs,
                                      plain_config, value_and_grad_by_term)
from contrastjax.methods.siamseg_losses import seg_cross_entropy, simsiam_loss
from contrastjax.models import mit
from contrastjax.models.resample import resize_bilinear_half_pixel

PyTree = Any


VARIANTS = ("siamseg", "dacs", "source_only")
BACKWARD_MODES = ("per_loss", "joint")
INFERENCE_MODES = ("whole", "slide", "tta")


@dataclasses.dataclass(frozen=True)
class SiamSegOptions:
  """``config.siamseg`` (sources in ``contrastjax/configs/siamseg.py``; the class
  docstring of :class:`SiamSegMethod` explains each)."""
  variant: str = options.choice("siamseg", VARIANTS)
  num_classes: int = 0                 # required (> 0)
  class_weight: tuple[float, ...] | None = None
  alpha: float = 0.999                 # EMA teacher
  pseudo_threshold: float = 0.968
  classmix_scope: str = options.choice("image", ("image", "batch"))
  color_jitter_strength: float = 0.2
  color_jitter_probability: float = 0.2
  blur: bool = True
  contrastive_weight: float = 1.0
  contrastive_domain: str = options.choice("target", ("target", "source", "all"))
  views: dict = dataclasses.field(default_factory=dict)
  backward: str = options.choice("per_loss", BACKWARD_MODES)
  stat_group_size: int = 0
  avg_non_ignore: bool = False
  inference: str = options.choice("whole", INFERENCE_MODES)
  slide_crop: tuple[int, ...] = (512, 512)
  slide_stride: tuple[int, ...] = (341, 341)
  tta_ratios: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)
  tta_img_scale: tuple[int, ...] | None = (1024, 1024)
  tta_flip: bool = False
  pretrained: str = ""
  pretrained_kind: str = options.choice("mit", ("mit", "siamseg"))
  pretrained_prefix: str | None = None
  init_from: str = ""
  init_from_which: str | int = "latest"

  def check(self, where: str) -> None:
    if self.num_classes <= 0:
      raise ConfigError(f"{where}.num_classes must be set (> 0)")
    if self.class_weight is not None and len(self.class_weight) != self.num_classes:
      raise ConfigError(f"{where}.class_weight has {len(self.class_weight)} entries for "
                        f"num_classes={self.num_classes}")
    if self.stat_group_size < 0:
      raise ConfigError(f"{where}.stat_group_size={self.stat_group_size}; expected 0 "
                        "(whole-batch statistics) or a positive group size")
    import inspect  # pylint: disable=g-import-not-at-top
    accepted = set(inspect.signature(views.simsiam_view).parameters) - {"rng", "images",
                                                                        "mean", "std"}
    bad = sorted(set(self.views) - accepted)
    if bad:
      raise ConfigError(f"{where}.views has unknown key(s) {bad}; accepted: "
                        f"{sorted(accepted)}")


#: The segmentor's parameter subtrees (what the EMA teacher averages and evaluation uses).
SEGMENTOR = ("backbone", "decode_head")  # "contrast": the SimSiam projector/predictor


def build_net(net_cls: type, model_cfg: Any, num_classes: int, stat_group_size: int = 0):
  """The SiamSeg network (``models.daformer.SiamSegNet``) from ``config.model``.

  Keys: the network's fields (``variant``, ``drop_path_rate``, ``remat``, ``fusion``,
  ``embed_dims``, ``channels``, ``dropout_ratio``, ``simsiam_dim``, ``dtype``) and
  ``backbone`` (a dict of extra :class:`~contrastjax.models.mit.MixVisionTransformer` fields,
  e.g. smaller ``embed_dims``/``depths`` for a demo). ``num_classes`` and the SimSiam
  BatchNorm group size (``stat_group_size``) come from ``config.siamseg``.
  """
  cfg = dict(plain_config(model_cfg) or {})
  backbone = dict(plain_config(cfg.pop("backbone", {})) or {})
  kwargs = module_kwargs(net_cls, cfg, "config.model",
                         skip=("num_classes", "backbone_overrides", "simsiam_bn_group_size"))
  mit_fields = module_kwargs(mit.MixVisionTransformer, backbone, "config.model.backbone")
  overrides = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                           for k, v in mit_fields.items()))
  return net_cls(num_classes=num_classes, backbone_overrides=overrides,
                 simsiam_bn_group_size=int(stat_group_size), **kwargs)


class SiamSegMethod(Method):
  """SiamSeg / DACS / source-only UDA training (``config.method = 'siamseg'``).

  One training step (reference ``SiamSeg.forward_train``; the reference back-propagates each
  loss at once, which sums the gradients; here ``backward='per_loss'`` (default) does the
  same, one gradient per term, and ``'joint'`` takes one gradient of the summed loss):

  1. source CE: student on the source crops, class-weighted CE against the labels;
  2. (dacs, siamseg) teacher logits of the target crops -> pseudo-labels and the scalar
     confidence weight; ClassMix of source and target (image, label, weight 1 vs pseudo
     weight); strong colour jitter + blur; weighted CE of the student on the mixed images;
  3. (siamseg) two views of each target crop through the student BACKBONE (shared),
     stage-4 average pool -> projector -> predictor; ``contrastive_weight * simsiam_loss``.

  The student's BatchNorm statistics (decode head, SimSiam) are threaded through the passes
  in that order. After the optimizer update, ``post_update`` moves the EMA teacher.

  Config: ``config.model`` (fields of ``models.daformer.SiamSegNet`` plus ``backbone``, extra
  MiT fields; see :func:`build_net`) and ``config.siamseg`` (the fields of
  :class:`SiamSegOptions`; unknown keys are an error):

  * ``variant``: ``'siamseg'`` | ``'dacs'`` (no SimSiam) | ``'source_only'``;
  * ``num_classes``, ``class_weight`` (CE class weights), ``avg_non_ignore`` (False = mmseg 0.21);
  * ``backward``: ``'per_loss'`` (each term's gradient before the next term's forward pass,
    as the reference; XLA then holds one student pass's activations at a time) or
    ``'joint'`` (one gradient of the sum; all passes' activations live at once);
  * ``alpha`` (0.999), ``pseudo_threshold`` (0.968): the EMA teacher;
  * ``stat_group_size``: 0 (global batch) or ``N``: pseudo-label weight, SimSiam BatchNorm
    statistics and ``batch``-scope ClassMix class set per group of ``N`` images (see below);
  * ``classmix_scope``: ``'image'`` (reference code) or ``'batch'`` (paper runs, pre PR #5);
  * ``color_jitter_strength`` (0.2), ``color_jitter_probability`` (0.2), ``blur`` (True);
  * ``contrastive_weight`` (1), ``contrastive_domain`` (``'target'``), ``views`` (keyword
    arguments of :func:`contrastjax.augment.views.simsiam_view`);
  * ``inference``: ``'whole'`` | ``'slide'`` (``slide_crop``, ``slide_stride``) | ``'tta'``
    (``tta_ratios``, ``tta_img_scale``, ``tta_flip``);
  * ``pretrained`` (file), ``pretrained_kind`` (``'mit'`` ImageNet MiT weights in official /
    Hugging Face / mmseg naming, or ``'siamseg'`` a reference UDA checkpoint),
    ``pretrained_prefix``, ``init_from`` (a contrastjax workdir), ``init_from_which``.

  Deviations from the reference (global-batch semantics, so that 8 devices equal 1): by
  default (``stat_group_size=0``) the pseudo-label weight, the SimSiam BatchNorm statistics
  and ``batch``-scope ClassMix's class set are computed over the global batch; the reference
  computes each per GPU (6 images). ``stat_group_size=N`` (the ``paper`` variant: 6) computes
  them per group of ``N`` consecutive images of the global batch instead, the reference's
  per-GPU statistics on any number of devices. Not reproduced: the reference's contrastive
  gradients are not all-reduced across GPUs (its replicas' parameters drift apart); here
  every gradient is the global batch's.
  """

  name = "siamseg"

  def __init__(self, config, run=None):
    super().__init__(config, run)
    self.options = o = options.parse(SiamSegOptions, config.siamseg, "config.siamseg")
    self.variant, self.num_classes = o.variant, o.num_classes
    self.class_weight = o.class_weight
    self.stat_group_size = o.stat_group_size
    self.teacher = dacs.EMATeacher(o.alpha, o.pseudo_threshold, self.stat_group_size)
    self.classmix_scope = o.classmix_scope
    self.strong = dict(color_jitter_strength=o.color_jitter_strength,
                       color_jitter_probability=o.color_jitter_probability, blur=o.blur)
    self.contrastive_weight = o.contrastive_weight
    self.contrastive_domain = o.contrastive_domain
    self.view_kwargs = {k: plain_config(v) for k, v in o.views.items()}
    self.avg_non_ignore, self.backward = o.avg_non_ignore, o.backward
    self.inference = o.inference
    self.slide_crop, self.slide_stride = o.slide_crop, o.slide_stride
    self.tta_ratios, self.tta_img_scale, self.tta_flip = o.tta_ratios, o.tta_img_scale, o.tta_flip
    self.pretrained, self.pretrained_kind = o.pretrained, o.pretrained_kind
    self.pretrained_prefix = o.pretrained_prefix
    self.init_from, self.init_from_which = o.init_from, o.init_from_which
    groups = (config.get("optimizer", None) or {}).get("groups", None) or ()
    frozen = [i for i, g in enumerate(groups) if hasattr(g, "get") and g.get("frozen", False)]
    if frozen and self.backward != "joint":
      # Named here, before any compilation (value_and_grad checks it again).
      raise ConfigError(f"config.optimizer.groups[{frozen[0]}].frozen=True needs "
                        f"config.siamseg.backward='joint', got {self.backward!r} (the "
                        "per-loss backward differentiates every parameter)")

    from contrastjax.models import daformer  # pylint: disable=g-import-not-at-top
    self.net = build_net(daformer.SiamSegNet, config.model, self.num_classes,
                         self.stat_group_size)

  # ------------------------------------------------------------------ networks
  @staticmethod
  def _stats(model_state):
    return {"batch_stats": model_state["batch_stats"]} if model_state.get("batch_stats") else {}

  def _segment(self, params, model_state, x, *, train: bool, rng=None,
               deterministic: bool | None = None):
    """``(logits [B, H/4, W/4, C], new model_state)`` of the segmentor."""
    variables = {"params": params, **self._stats(model_state)}
    if not train:
      logits, _ = self.net.apply(variables, x, train=False)
      return logits, model_state
    det = (not train) if deterministic is None else deterministic
    rngs = {} if det else {"dropout": rng}
    (logits, _), new = self.net.apply(variables, x, train=True, deterministic=det, rngs=rngs,
                                      mutable=["batch_stats"])
    return logits, {**model_state, **new}

  def _simsiam(self, params, model_state, q, k, rng):
    """``(p1, p2, z1, z2, new model_state)``: both views through the shared backbone."""
    variables = {"params": params, **self._stats(model_state)}
    out, new = self.net.apply(variables, q, k, train=True, method="simsiam",
                              rngs={"dropout": rng}, mutable=["batch_stats"])
    return (*out, {**model_state, **new})

  # ------------------------------------------------------------------ set-up
  def _images(self, batch):
    if "source" in batch:
      return batch["source"]["image"]
    return batch["image"]

  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    """Student parameters (backbone, decode_head[, simsiam]), BN statistics and the teacher."""
    return parallel.auto_axes(self._init, P())(rng, batch)

  def _init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    variables = self.net.init({"params": rng}, self._images(batch), train=False)
    params = dict(variables["params"])
    model_state = {"batch_stats": dict(variables.get("batch_stats", {}))}
    if self.variant != "siamseg":   # no SimSiam branch: no parameters for it
      params.pop("contrast", None)
      model_state["batch_stats"].pop("contrast", None)
    extra = {}
    if self.variant != "source_only":
      extra["teacher"] = jax.tree.map(jnp.copy, {k: params[k] for k in SEGMENTOR})
    return params, model_state, extra

  def load_pretrained(self, params: PyTree, model_state: PyTree, extra: PyTree
                      ) -> tuple[PyTree, PyTree, PyTree]:
    """Imports MiT weights (``pretrained``) and/or another run's parameters (``init_from``)
    into the student, then re-copies the teacher (the reference's iter-0 copy).

    Raises:
      FileNotFoundError: a path or workdir that does not exist.
      KeyError / ValueError: weights that do not fit the model (names the tensor).
    """
    params = dict(params)
    changed = False
    if self.pretrained and self.pretrained_kind == "mit":
      new, ignored = mit.load({"params": params["backbone"]}, self.pretrained,
                              prefix=self.pretrained_prefix)
      params["backbone"] = new["params"]
      logging.info("loaded MiT weights from %s (%d keys ignored)", self.pretrained,
                   len(ignored))
      changed = True
    elif self.pretrained:   # a reference SiamSeg (mmseg UDA) checkpoint: student + SimSiam
      from contrastjax.models import daformer  # pylint: disable=g-import-not-at-top
      variables = {"params": params, **model_state}
      kwargs = {} if self.pretrained_prefix is None else {"prefix": self.pretrained_prefix}
      if "contrast" not in params:
        kwargs["contrast_prefix"] = None
      new, ignored = daformer.load(variables, self.pretrained, **kwargs)
      params = dict(new["params"])
      model_state = {k: v for k, v in new.items() if k != "params"}
      logging.info("loaded a SiamSeg checkpoint from %s (%d keys ignored)", self.pretrained,
                   len(ignored))
      changed = True
    if self.init_from:
      from contrastjax import checkpoint  # pylint: disable=g-import-not-at-top
      params, model_state, step = checkpoint.import_subtrees(
          params, model_state, self.init_from, self.init_from_which)
      logging.info("initialised %s from %s (step %s)", sorted(params), self.init_from, step)
      changed = True
    if changed and "teacher" in extra:
      extra = dict(extra, teacher={k: jax.tree.map(jnp.copy, params[k]) for k in SEGMENTOR})
    return params, model_state, extra

  # ------------------------------------------------------------------ training
  def _ce(self, logits, labels, pixel_weight=None):
    up = resize_bilinear_half_pixel(logits, labels.shape[1:3])
    return seg_cross_entropy(up, labels, self.class_weight, pixel_weight,
                             avg_non_ignore=self.avg_non_ignore)

  def loss_fn(self, params: PyTree, model_state: PyTree, extra: PyTree, batch: PyTree,
              rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Source CE (+ ClassMix CE with pseudo-labels) (+ SimSiam); see the class docstring."""
    del step
    return parallel.auto_axes(self._loss, P())(params, model_state, extra, batch, rng)

  def value_and_grad(self, params: PyTree, model_state: PyTree, extra: PyTree,
                     batch: PyTree, rng: jax.Array, step: jax.Array,
                     frozen: PyTree | None = None):
    """The loss and its gradient; with ``config.siamseg.backward='per_loss'`` (the
    reference's order: each loss back-propagated before the next forward pass) one
    ``value_and_grad`` per term, summed, so that only one student pass's activations are
    live at a time. The same numbers as ``'joint'`` (one gradient of the sum)."""
    if self.backward == "joint":
      return super().value_and_grad(params, model_state, extra, batch, rng, step, frozen)
    if frozen is not None:
      raise ConfigError("frozen optimizer groups need config.siamseg.backward='joint' (the "
                        "per-loss backward differentiates every parameter)")
    return parallel.auto_axes(self._per_loss_value_and_grad, P())(params, model_state, extra,
                                                                  batch, rng)

  def _terms(self, extra, batch, rng):
    """The step's loss terms, in the reference's order.

    Returns a list of functions ``term(params, model_state, after) -> (value, model_state,
    metrics)``: the step's loss is the sum of the values, the BatchNorm statistics thread
    through the terms in order. ``after`` is a float32 scalar zero that is added to every
    image a term reads (teacher input and SimSiam views included): a data dependence that
    :func:`~contrastjax.methods.base.value_and_grad_by_term` uses to run each term after
    the previous gradient, as the reference does (its teacher pass follows the source
    backward).
    """
    xs, ys = batch["source"]["image"], batch["source"]["label"].astype(jnp.int32)
    xt = batch["target"]["image"]
    dacs.check_groups(xs.shape[0], self.stat_group_size)
    keys = jax.random.split(rng, 8)

    # 1. source
    def source(params, state, after):
      logits, state = self._segment(params, state, xs + after, train=True, rng=keys[0])
      loss_src = self._ce(logits, ys)
      return loss_src, state, {"loss_src": loss_src}

    terms = [source]
    if self.variant == "source_only":
      return terms

    # 2. pseudo-labels from the EMA teacher (BN batch statistics, no dropout/drop path),
    # ClassMix + strong augmentation, CE of the student on the mixed images
    def mix(params, state, after):
      t_logits, _ = self._segment(extra["teacher"], state, xt + after, train=True,
                                  deterministic=True)
      t_logits = jax.lax.stop_gradient(resize_bilinear_half_pixel(t_logits, xt.shape[1:3]))
      pseudo, weight = self.teacher.pseudo_label(t_logits)
      mask = dacs.class_mix_masks(keys[1], ys, self.num_classes, self.classmix_scope,
                                  self.stat_group_size)
      mixed = views.strong_transform(keys[2], dacs.class_mix(mask, xs + after, xt + after),
                                     **self.strong)
      mixed_label = jnp.where(mask > 0, ys, pseudo)
      per_pixel = jnp.broadcast_to(weight.reshape(weight.shape + (1, 1)), mask.shape)
      mixed_weight = dacs.class_mix(mask, jnp.ones_like(mask), per_pixel)
      logits, state = self._segment(params, state, mixed, train=True, rng=keys[3])
      loss_mix = self._ce(logits, mixed_label, mixed_weight)
      return loss_mix, state, {"loss_mix": loss_mix, "pseudo_weight": jnp.mean(weight),
                               "mix_fraction": jnp.mean(mask)}

    terms.append(mix)
    if self.variant != "siamseg":
      return terms

    # 3. SimSiam on two views of each (target) image, through the student backbone
    groups = {"target": [xt], "source": [xs], "all": [xt, xs]}[self.contrastive_domain]

    def contrast(params, state, after):
      outs = []
      for g, x in enumerate(groups):   # 'all': one branch call per domain, as the reference
        q, k = views.siamseg_views(jax.random.fold_in(keys[4], g), x + after, **self.view_kwargs)
        *pz, state = self._simsiam(params, state, q, k, jax.random.fold_in(keys[5], g))
        outs.append(pz)
      p1, p2, z1, z2 = (jnp.concatenate([o[i] for o in outs]) for i in range(4))
      loss_con = simsiam_loss(p1, p2, z1, z2)
      return self.contrastive_weight * loss_con, state, {"loss_contrastive": loss_con}

    terms.append(contrast)
    return terms

  def _loss(self, params, model_state, extra, batch, rng):
    return loss_of_terms(self._terms(extra, batch, rng), params, model_state)

  def _per_loss_value_and_grad(self, params, model_state, extra, batch, rng):
    return value_and_grad_by_term(self._terms(extra, batch, rng), params, model_state)

  def post_update(self, step: jax.Array, params: PyTree, extra: PyTree) -> PyTree:
    """EMA teacher update with the new student (``step`` = updates applied so far)."""
    if "teacher" not in extra:
      return extra
    student = {k: params[k] for k in SEGMENTOR}
    return dict(extra, teacher=self.teacher.update(extra["teacher"], student, step))

  # ------------------------------------------------------------------ evaluation
  def logits_fn(self, params: PyTree, model_state: PyTree):
    """``images -> logits [B, H/4, W/4, C]`` of the student in eval mode (for inference)."""
    def fn(images):
      logits, _ = self._segment(params, model_state, images, train=False)
      return logits.astype(jnp.float32)
    return fn

  def predict(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree) -> dict[str, jax.Array]:
    """The STUDENT's class map ``{'pred': int32 [B, H, W]}`` (the reference evaluates the
    student), by whole-image, sliding-window or multi-scale inference."""
    del extra
    return parallel.auto_axes(self._predict, P(parallel.DATA_AXIS))(params, model_state,
                                                                  batch["image"])

  def _predict(self, params, model_state, images):
    fn = self.logits_fn(params, model_state)
    if self.inference == "whole":
      scores = seg_inference.whole_inference(fn, images)
    elif self.inference == "slide":
      scores = seg_inference.slide_inference(fn, images, self.slide_crop, self.slide_stride)
    else:
      scores = seg_inference.multiscale_inference(
          fn, images, ratios=self.tta_ratios, img_scale=self.tta_img_scale,
          flip=self.tta_flip)
    return {"pred": seg_inference.predict_classes(scores)}

  def eval_loss(self, params: PyTree, model_state: PyTree, extra: PyTree,
                batch: PyTree) -> jax.Array:
    """Whole-image CE of the student over the valid examples of a padded batch."""
    del extra
    return parallel.auto_axes(self._eval_loss, P())(params, model_state, batch)

  def _eval_loss(self, params, model_state, batch):
    logits = resize_bilinear_half_pixel(self.logits_fn(params, model_state)(batch["image"]),
                           batch["label"].shape[1:3])
    labels = batch["label"].astype(jnp.int32)
    valid = batch["valid"].astype(jnp.float32)
    pixel_weight = jnp.broadcast_to(valid[:, None, None], labels.shape)
    per = seg_cross_entropy(logits, labels, self.class_weight, pixel_weight,
                            avg_non_ignore=self.avg_non_ignore)
    return per * labels.shape[0] / jnp.maximum(valid.sum(), 1.0)
