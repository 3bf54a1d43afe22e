"""ConDSeg (Lei et al., AAAI 2025) on the spine: stage 1 and stage 2 as two methods.

* ``condseg_stage1`` (:class:`ConDSegStage1Method`): Consistency Reinforcement. The
  encoder + a light head see each batch twice, clean and photometrically perturbed
  (``strong_augment``), in two train-mode forward passes (BatchNorm running statistics
  updated twice, chained), and learn
  ``DiceBCE(p, y) + DiceBCE(p', y) + w·L_cons(p, p')``
  (reference ``train_stage1.py``, ``utils/run_engine_stage1.py``).
* ``condseg`` (:class:`ConDSegMethod`): the full model with Semantic Information
  Decoupling, CDFA and the Size-Aware Decoder, trained with
  ``DiceBCE(mask, y) + β1·DiceBCE(fg, y) + β2·DiceBCE(bg, background) + L_compl``
  (reference ``train.py``, ``utils/run_engine.py``), optionally initialised from a
  stage-1 run (``init_from``).

Config keys (``config.condseg``; every key is optional, unknown keys are an error):

=========================  ========  ====================================================
key                        default   meaning
=========================  ========  ====================================================
``double_sigmoid``         False     True reproduces the reference's extra sigmoid inside
                                     ``DiceBCELoss`` (the paper's numbers); False is the
                                     corrected loss on logits (upstream PR #19).
``beta_per_image``         False     stage 2: False = reference β (area summed over the
                                     batch); True = mean area per image (batch-size
                                     independent). See ``condseg_losses.beta_weight``.
``consistency_weight``     1.0       stage 1: weight of ``L_cons`` (reference: 1).
``strong_aug``             {}        stage 1: keyword arguments of
                                     ``contrastjax.augment.photometric.strong_augment``
                                     (its defaults are the reference's torchvision
                                     ColorJitter(0.3, 0.3, 0.3, 0.1), RandomGrayscale(0.5),
                                     GaussianBlur((1, 7), (0.1, 3)), one draw per batch).
``pretrained_backbone``    ''        path of a PyTorch state dict (``.pth``/``.npz``/
                                     ``.safetensors``) loaded on a fresh start.
``pretrained_source``      resnet50  its kind for ``models.condseg.load``: ``resnet50``
                                     (torchvision ImageNet weights into the encoder,
                                     running statistics included), ``condseg_stage1`` or
                                     ``condseg`` (reference checkpoints).
``init_from``              ''        workdir of another contrastjax run (stage 1) whose
                                     encoder initialises this one (after
                                     ``pretrained_backbone``), on a fresh start only.
``init_from_which``        best      which checkpoint of ``init_from``: ``best``,
                                     ``latest`` or a step number (the reference keeps the
                                     best-mIoU stage-1 checkpoint).
``transfer_batch_stats``   True      also copy the encoder's BN running statistics from
                                     ``init_from``. False reproduces the reference
                                     ``train.py``, which copies ``named_parameters()``
                                     only, leaving the running statistics at their
                                     initial (with ``pretrained_backbone``: ImageNet)
                                     values.
=========================  ========  ====================================================

``config.model`` holds the model's fields (``stage_sizes``, ``stem_width``,
``base_width``, ``dim``, ``decouple_mid``, ``num_heads``, ``aux_widths``, ``dtype`` for
``ConDSeg``; ``stage_sizes``, ``stem_width``, ``base_width``, ``head_width``, ``dtype``
for ``ConDSegStage1``); ``config.model.name`` is ignored here. A field the model does
not have is an error.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp

from contrastjax import checkpoint
from contrastjax.augment import photometric
from contrastjax.errors import ConfigError
from contrastjax.methods import condseg_losses as losses
from contrastjax.methods import options
from contrastjax.methods.base import Method, Metrics, PyTree, module_kwargs, plain_config
from contrastjax.models import condseg as condseg_model

@dataclasses.dataclass(frozen=True)
class ConDSegOptions:
  """``config.condseg`` (sources in ``contrastjax/configs/condseg.py``)."""
  double_sigmoid: bool = False        # reference bug (DiceBCELoss sigmoid on sigmoid)
  beta_per_image: bool = False        # reference: beta from the area summed over the batch
  consistency_weight: float = 1.0     # stage 1
  strong_aug: dict = dataclasses.field(default_factory=dict)  # stage 1: strong_augment kwargs
  pretrained_backbone: str = ""       # ImageNet ResNet-50 weights file
  pretrained_source: str = "resnet50"
  init_from: str = ""                 # stage 2: the stage-1 workdir
  init_from_which: str | int = "best"
  transfer_batch_stats: bool = True   # reference copies named_parameters() only

  def check(self, where: str) -> None:
    accepted = set(inspect.signature(photometric.strong_augment).parameters) - {
        "rng", "images"}
    bad = sorted(set(self.strong_aug) - accepted)
    if bad:
      raise ConfigError(f"{where}.strong_aug has unknown key(s) {bad}; strong_augment "
                        f"accepts {sorted(accepted)}")


#: ``config.condseg`` keys only stage 1 (Consistency Reinforcement) reads.
STAGE1_ONLY = ("consistency_weight", "strong_aug")


def build_model(model_cls: type, model_cfg: Mapping[str, Any]):
  """Instantiates ``model_cls`` from ``config.model`` (``name`` ignored).

  Raises:
    ValueError: a key that is not a field of ``model_cls`` (names the valid fields).
  """
  return model_cls(**module_kwargs(model_cls, model_cfg, "config.model", skip=("name",)))


class _ConDSegBase(Method):
  """Shared set-up: config parsing, model, initialisation and weight import."""

  model_cls: type = condseg_model.ConDSeg

  def __init__(self, config, run=None):
    super().__init__(config, run)
    self.options = o = options.parse(ConDSegOptions, config.condseg, "config.condseg")
    self.model = build_model(self.model_cls, config.model)
    self.double_sigmoid = o.double_sigmoid
    self.beta_per_image = o.beta_per_image
    self.pretrained_backbone = o.pretrained_backbone
    self.pretrained_source = o.pretrained_source
    self.init_from = o.init_from
    self.init_from_which = o.init_from_which
    self.transfer_batch_stats = o.transfer_batch_stats

  # ------------------------------------------------------------------ set-up
  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    """Initialises the model on ``batch['image']`` (eval mode); traceable."""
    variables = self.model.init({"params": rng}, batch["image"], train=False)
    return variables["params"], {"batch_stats": variables["batch_stats"]}, {}

  def load_pretrained(self, params: PyTree, model_state: PyTree, extra: PyTree
                      ) -> tuple[PyTree, PyTree, PyTree]:
    """Imports ``pretrained_backbone``, then the encoder of ``init_from`` (fresh start).

    Raises:
      FileNotFoundError: a path or workdir that does not exist.
      KeyError / ValueError: weights that do not fit the model (names the tensor).
    """
    variables = {"params": params, **model_state}
    if self.pretrained_backbone:
      variables, ignored = condseg_model.load(variables, self.pretrained_backbone,
                                              source=self.pretrained_source)
      logging.info("loaded %s weights from %s (%d keys ignored)", self.pretrained_source,
                   self.pretrained_backbone, len(ignored))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    if self.init_from:
      params, model_state, step = checkpoint.import_subtrees(
          params, model_state, self.init_from, self.init_from_which, names=("encoder",),
          batch_stats=self.transfer_batch_stats,
          stats_hint="; set config.condseg.transfer_batch_stats=False to keep the initial "
          "running statistics")
      logging.info("initialised the encoder from %s (step %s; batch_stats %s)",
                   self.init_from, step, "copied" if self.transfer_batch_stats else "kept")
    return params, model_state, extra

  # ------------------------------------------------------------------ helpers
  def _apply_train(self, params: PyTree, model_state: PyTree, x: jax.Array):
    (mask, aux), new_state = self.model.apply({"params": params, **model_state}, x,
                                              train=True, mutable=["batch_stats"])
    return mask, aux, {**model_state, **new_state}

  def _apply_eval(self, params: PyTree, model_state: PyTree, x: jax.Array):
    return self.model.apply({"params": params, **model_state}, x, train=False)

  def _dice_bce(self, prob: jax.Array, logits: jax.Array, target: jax.Array,
                weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(bce, dice)`` of the reference DiceBCELoss in the configured semantics."""
    if self.double_sigmoid:
      # Reference: DiceBCELoss applies sigmoid to the model's sigmoid output.
      return losses.dice_bce_terms(prob, target, from_logits=False, double_sigmoid=True,
                                   weights=weights)
    return losses.dice_bce_terms(logits, target, from_logits=True, double_sigmoid=False,
                                 weights=weights)


class ConDSegStage1Method(_ConDSegBase):
  """Stage 1, Consistency Reinforcement (``config.method = 'condseg_stage1'``)."""

  name = "condseg_stage1"
  model_cls = condseg_model.ConDSegStage1

  def __init__(self, config, run=None):
    super().__init__(config, run)
    self.consistency_weight = self.options.consistency_weight
    self.strong_aug = {k: plain_config(v) for k, v in self.options.strong_aug.items()}

  def loss_fn(self, params: PyTree, model_state: PyTree, extra: PyTree, batch: PyTree,
              rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Two train-mode passes (clean, strongly augmented); BN statistics chained."""
    del extra, step
    x, y = batch["image"], batch["mask"]
    p, aux, state = self._apply_train(params, model_state, x)
    x_aug = photometric.strong_augment(rng, x, **self.strong_aug)
    p_aug, aux_aug, state = self._apply_train(params, state, x_aug)

    bce, dice = self._dice_bce(p, aux["mask_logits"], y)
    bce_aug, dice_aug = self._dice_bce(p_aug, aux_aug["mask_logits"], y)
    if self.double_sigmoid:
      # Reference BinaryConsistencyLoss: torch BCE on the sigmoid outputs (no extra
      # sigmoid there, so paper mode feeds the probabilities unchanged).
      cons = losses.binary_consistency_loss(p, p_aug, from_logits=False)
    else:
      cons = losses.binary_consistency_loss(aux["mask_logits"], aux_aug["mask_logits"],
                                            from_logits=True)
    loss_mask, loss_mask_aug = bce + dice, bce_aug + dice_aug
    loss = loss_mask + loss_mask_aug + self.consistency_weight * cons
    metrics = {
        "loss": loss,
        "loss_mask": loss_mask,
        "loss_mask_bce": bce,
        "loss_mask_dice": dice,
        "loss_mask_aug": loss_mask_aug,
        "loss_consistency": cons,
    }
    return loss, (state, metrics)

  def predict(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree) -> dict[str, jax.Array]:
    """Eval mode: ``{'prob': [B, H, W, 1]}``."""
    del extra
    mask, _ = self._apply_eval(params, model_state, batch["image"])
    return {"prob": mask.astype(jnp.float32)}

  def eval_loss(self, params: PyTree, model_state: PyTree, extra: PyTree,
                batch: PyTree) -> jax.Array:
    """Eval-mode DiceBCE of the clean view over the valid examples (as the reference)."""
    del extra
    mask, aux = self._apply_eval(params, model_state, batch["image"])
    bce, dice = self._dice_bce(mask, aux["mask_logits"], batch["mask"], batch["valid"])
    return bce + dice


class ConDSegMethod(_ConDSegBase):
  """Stage 2, the full ConDSeg model (``config.method = 'condseg'``)."""

  name = "condseg"
  model_cls = condseg_model.ConDSeg

  def __init__(self, config, run=None):
    super().__init__(config, run)
    # Stage-1 options given to stage 2 would be silently unused.
    given = sorted(k for k in STAGE1_ONLY if k in (config.condseg or {}))
    if given:
      raise ConfigError(f"config.condseg.{given[0]} ({given}) is a stage-1 option "
                        f"(config.method='condseg_stage1'); config.method={self.name!r} "
                        "(stage 2) does not use it: remove it, or train stage 1")

  def _loss_cfg(self) -> dict[str, bool]:
    return {"double_sigmoid": self.double_sigmoid, "beta_per_image": self.beta_per_image}

  def loss_fn(self, params: PyTree, model_state: PyTree, extra: PyTree, batch: PyTree,
              rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """One train-mode pass; ``condseg_losses.condseg_stage2_loss``."""
    del extra, rng, step
    mask, aux, state = self._apply_train(params, model_state, batch["image"])
    loss, metrics = losses.condseg_stage2_loss(dict(aux, mask=mask), batch,
                                               self._loss_cfg())
    return loss, (state, metrics)

  def predict(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree) -> dict[str, jax.Array]:
    """Eval mode: ``{'prob', 'fg', 'bg', 'uc'}``, each ``[B, H, W, 1]``."""
    del extra
    mask, aux = self._apply_eval(params, model_state, batch["image"])
    out = {"prob": mask}
    out.update({k: aux[k] for k in ("fg", "bg", "uc")})
    return {k: v.astype(jnp.float32) for k, v in out.items()}

  def eval_loss(self, params: PyTree, model_state: PyTree, extra: PyTree,
                batch: PyTree) -> jax.Array:
    """Eval-mode stage-2 loss over the valid examples of a padded batch."""
    del extra
    mask, aux = self._apply_eval(params, model_state, batch["image"])
    loss, _ = losses.condseg_stage2_loss(dict(aux, mask=mask), batch, self._loss_cfg())
    return loss
