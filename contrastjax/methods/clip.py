"""CLIP training with temperature control and modality swapping (Yaras et al., CPAL 2025).

The loss is the symmetric InfoNCE of Eq. 2 over the *global* batch,
``l(beta * H_X H_Y^T)`` with ``l(M) = (CE(M, I) + CE(M^T, I)) / 2`` (OpenCLIP
``ClipLoss``). Under ``jit`` with the batch sharded over the mesh's ``data`` axis the
text (image) embeddings are resharded to every device before the similarity matmul
(``jax.sharding.reshard``, an all-gather, OpenCLIP's ``gather_with_grad``), so the loss
and its gradient are those of the global batch whatever the number of devices.

Temperature (``config.clip.temperature``), the paper's mitigations (§4, App. E):

============ ==================================================================
``learn``     ``beta = beta(nu)``, ``nu`` learned. ``parameterization``: ``exp``
              (baseline, OpenCLIP), ``softplus`` (TR), ``exp_scaled`` with
              ``scale`` 2 / 10 (TR Scale2 / Scale10). SLRT is this plus an optimizer
              group ``('logit_scale', 0.1, 0.0)`` (the config's job).
``fixed``     FLT: ``tau = tau0`` frozen.
``linear``    TS S0-S3: ``tau`` from ``tau0`` to ``tau1`` linearly over
              ``schedule_horizon_steps``; not learned.
``cosine``    TS A0/A1: ``tau`` alternates between ``tau0`` and ``tau1`` with period
              ``schedule_period_steps`` (unstated in the paper); not learned.
============ ==================================================================

With ``schedule_steps_per_epoch > 0`` the schedule's time is the start of the current
epoch (the paper changes ``tau`` per epoch).

Clamp (``learn`` only): after every update ``nu`` is projected so that
``beta(nu) in [beta_min, beta_max]`` (default ``[1, 100]``: OpenCLIP's
``logit_scale.clamp_(0, ln 100)`` for ``exp``; for the other parameterisations the same
range of ``beta`` is our choice). This runs in :meth:`CLIPMethod.project_params`, which
the spine calls after the optimizer update (the optimizer state is left alone, as
OpenCLIP's in-place clamp does).

Modality swapping (``config.clip.swap``), applied to the normalised features of a
training step with probability ``swap_prob`` (our reading of "p random portion of the
training": an independent Bernoulli(p) draw per step):

* ``hard`` (HS, :func:`hard_swap`): every coordinate ``(i, j)`` of ``H_X``/``H_Y`` is
  exchanged with probability 1/2;
* ``soft`` (SS, :func:`soft_swap`): ``lambda_ij ~ U[0, 1]``,
  ``H_X <- lambda H_X + (1 - lambda) H_Y`` and ``H_Y <- lambda H_Y + (1 - lambda) H_X``;
* ``hard_feature``: the paper's "Hard Swap Feature" ablation (whole rows swapped w.p. 1/2).

The paper does not say whether swapped features are renormalised before the loss:
``swap_renormalize`` (default False: the swapped features enter the loss as they are).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastjax import parallel
from contrastjax.errors import ConfigError
from contrastjax.gap import temperature as temp_lib
from contrastjax.methods import options
from contrastjax.methods.base import Method, Metrics, PyTree
from contrastjax.models import clip as clip_model

TEMPERATURE_MODES = ("learn", "fixed", "linear", "cosine")
SWAPS = ("none", "hard", "soft", "hard_feature")

@dataclasses.dataclass(frozen=True)
class CLIPOptions:
  """``config.clip`` (sources in ``configs/clip_gap_coco.py``)."""
  temperature: str = options.choice("learn", TEMPERATURE_MODES)
  parameterization: str = "exp"       # temperature parameterisation (gap.temperature)
  scale: float = 1.0                  # its scale (exp_scaled)
  tau_init: float = 0.07              # OpenCLIP: init_logit_scale = log(1/0.07)
  beta_min: float = 1.0               # OpenCLIP clamp of 1/tau: [1, 100]
  beta_max: float = 100.0
  tau0: float = 0.01                  # scheduled temperatures (start, end)
  tau1: float = 0.05
  schedule_horizon_steps: int = 0     # 0: the whole run (its resolved length)
  schedule_period_steps: int = 0
  schedule_steps_per_epoch: int = 0   # > 0: the schedule steps once per epoch
  swap: str = options.choice("none", SWAPS)
  swap_prob: float = 0.0
  swap_renormalize: bool = False

  def check(self, where: str) -> None:
    if not self.tau_init > 0:
      raise ConfigError(f"{where}.tau_init={self.tau_init!r}: expected > 0")
    if not 0 < self.beta_min < self.beta_max:
      raise ConfigError(f"{where}.beta_min={self.beta_min}, beta_max={self.beta_max}: "
                        "expected 0 < beta_min < beta_max")
    if not 0.0 <= self.swap_prob <= 1.0:
      raise ConfigError(f"{where}.swap_prob={self.swap_prob!r}: expected in [0, 1]")


# ============================================================================ losses
def symmetric_infonce(h_x: jax.Array, h_y: jax.Array, beta: jax.Array | float,
                      valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 2 of the paper: ``(CE(beta Z, I) + CE(beta Z^T, I)) / 2``, ``Z = H_X H_Y^T``.

  Args:
    h_x: ``[n, d]`` (image) features; the rows pair with those of ``h_y``.
    h_y: ``[n, d]`` (text) features.
    beta: inverse temperature (scalar).
    valid: optional ``[n]`` bool; invalid rows/columns (padding) are left out of both
      the softmax denominators and the mean.

  Returns:
    ``(loss, {'loss_i2t', 'loss_t2i', 'acc_i2t', 'acc_t2i'})``; the accuracies are the
    in-batch top-1 matching rates.
  """
  h_x = h_x.astype(jnp.float32)
  h_y = h_y.astype(jnp.float32)
  beta = jnp.asarray(beta, jnp.float32)
  logits = beta * (h_x @ parallel.gathered(h_y).T)            # [n, n] rows: images
  positive = beta * jnp.sum(h_x * h_y, axis=-1)        # diag(logits)
  n = h_x.shape[0]
  if valid is None:
    w = jnp.ones((n,), jnp.float32)
    masked = logits
  else:
    w = valid.astype(jnp.float32)
    col_ok = parallel.gathered(valid.astype(bool))
    masked = jnp.where(col_ok[None, :] & valid.astype(bool)[:, None], logits, -jnp.inf)
  lse_rows = jax.nn.logsumexp(masked, axis=1)          # image -> text
  lse_cols = jax.nn.logsumexp(masked, axis=0)          # text -> image (rows of Z^T)
  denom = jnp.maximum(jnp.sum(w), 1.0)
  loss_i2t = jnp.sum(w * jnp.where(w > 0, lse_rows - positive, 0.0)) / denom
  loss_t2i = jnp.sum(w * jnp.where(w > 0, parallel.sharded_like(lse_cols, positive) - positive,
                                   0.0)) / denom
  # In-batch top-1: the row's / column's best match is its own pair.
  ids = parallel.sharded_like(jnp.arange(n), positive)
  acc_i2t = jnp.sum(w * (jnp.argmax(masked, axis=1) == ids)) / denom
  acc_t2i = jnp.sum(w * (parallel.sharded_like(jnp.argmax(masked, axis=0), positive) == ids)
                    ) / denom
  loss = 0.5 * (loss_i2t + loss_t2i)
  return loss, {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "acc_i2t": acc_i2t,
                "acc_t2i": acc_t2i}


def modality_gap(h_x: jax.Array, h_y: jax.Array) -> jax.Array:
  """``||mean(H_X) - mean(H_Y)||`` (Liang et al. 2022; the paper's App. E.2)."""
  return jnp.linalg.norm(jnp.mean(h_x, axis=0) - jnp.mean(h_y, axis=0))


# ============================================================================ swaps
def hard_swap(rng: jax.Array, h_x: jax.Array, h_y: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """HS: exchanges each coordinate ``(i, j)`` of ``H_X``/``H_Y`` with probability 1/2."""
  swap = parallel.sharded_like(jax.random.bernoulli(rng, 0.5, h_x.shape), h_x)
  return jnp.where(swap, h_y, h_x), jnp.where(swap, h_x, h_y)


def soft_swap(rng: jax.Array, h_x: jax.Array, h_y: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """SS: ``lambda_ij ~ U[0,1]``; ``(lambda H_X + (1-lambda) H_Y, lambda H_Y + (1-lambda) H_X)``."""
  lam = parallel.sharded_like(jax.random.uniform(rng, h_x.shape, h_x.dtype), h_x)
  return lam * h_x + (1 - lam) * h_y, lam * h_y + (1 - lam) * h_x


def hard_swap_feature(rng: jax.Array, h_x: jax.Array, h_y: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """"Hard Swap Feature" ablation (Table 5): whole rows exchanged with probability 1/2."""
  swap = parallel.sharded_like(jax.random.bernoulli(rng, 0.5, h_x.shape[:1]), h_x[:, 0])[:, None]
  return jnp.where(swap, h_y, h_x), jnp.where(swap, h_x, h_y)


_SWAP_FNS = {"hard": hard_swap, "soft": soft_swap, "hard_feature": hard_swap_feature}


def modality_swap(rng: jax.Array, h_x: jax.Array, h_y: jax.Array, kind: str,
                  prob: float, renormalize: bool = False
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Applies swap ``kind`` to the whole step with probability ``prob``.

  Returns ``(h_x, h_y, applied)`` where ``applied`` is a float 0/1 scalar.
  """
  if kind == "none" or prob <= 0:
    return h_x, h_y, jnp.zeros((), jnp.float32)
  if kind not in _SWAP_FNS:
    raise ConfigError(f"config.clip.swap={kind!r} is not known; expected one of {SWAPS}")
  k_apply, k_swap = jax.random.split(rng)
  apply = jax.random.bernoulli(k_apply, prob)
  sx, sy = _SWAP_FNS[kind](k_swap, h_x, h_y)
  if renormalize:
    sx, sy = clip_model.l2_normalize(sx), clip_model.l2_normalize(sy)
  return (jnp.where(apply, sx, h_x), jnp.where(apply, sy, h_y),
          apply.astype(jnp.float32))


# ============================================================================ method
class CLIPMethod(Method):
  """``config.method = 'clip'``: see the module docstring for ``config.clip``.

  Batches: ``{'image': [B, ...], 'text': [B, ...], 'valid'?: [B], 'label'?: [B]}``.
  """

  name = "clip"

  def __init__(self, config, run=None):
    super().__init__(config, run)
    o = options.parse(CLIPOptions, config.get("clip", None), "config.clip")
    self.mode = o.temperature
    try:
      self.param = temp_lib.get_parameterization(o.parameterization, o.scale)
    except ValueError as e:
      raise ConfigError(f"config.clip.parameterization: {e}") from None
    self.tau_init = o.tau_init
    self.beta_min, self.beta_max = o.beta_min, o.beta_max
    self.tau0, self.tau1 = o.tau0, o.tau1
    # The schedule's horizon: explicit, else the run's resolved length (also when the
    # config counts epochs: config.total_steps is unset then).
    horizon = o.schedule_horizon_steps or (self.run.total_steps if self.run else 0)
    self.horizon = float(horizon) if horizon else None
    self.period = float(o.schedule_period_steps) or None
    self.steps_per_epoch = o.schedule_steps_per_epoch
    if self.mode != "learn":
      sched = "fixed" if self.mode == "fixed" else self.mode
      try:
        temp_lib.check_schedule(sched, tau0=self.tau0, tau1=self.tau1,
                                horizon=self.horizon, period=self.period)
      except ValueError as e:
        raise ConfigError(f"config.clip (temperature={self.mode!r}): {e} (horizon = "
                         "schedule_horizon_steps or total_steps; period = "
                         "schedule_period_steps)") from None
    self.swap, self.swap_prob = o.swap, o.swap_prob
    self.swap_renormalize = o.swap_renormalize
    nu0 = float(self.param.nu_from_tau(self.tau_init))
    with jax.ensure_compile_time_eval():
      self.nu_bounds = (float(self.param.nu_from_beta(self.beta_min)),
                        float(self.param.nu_from_beta(self.beta_max)))
    if self.mode == "learn" and not (self.beta_min <= 1.0 / self.tau_init <= self.beta_max):
      raise ConfigError(f"config.clip.tau_init={self.tau_init}: 1/tau_init is outside "
                       f"[beta_min, beta_max] = [{self.beta_min}, {self.beta_max}]")
    self.model = clip_model.build_clip(config.model, nu0)
    # Towers with gathers and attention (the text Transformer's token embedding and
    # end-of-text pooling, the ModifiedResNet's attention pooling) are traced with GSPMD
    # propagation under the spine's explicit mesh (``parallel.auto_axes``), as SiamSeg's
    # and APC's networks; the MLP towers of the demo keep the explicit-sharding path.
    self._auto = not all(isinstance(t, clip_model.MLPTower)
                         for t in (self.model.image_tower, self.model.text_tower))

  def _sharded(self, fn, out_spec):
    return parallel.auto_axes(fn, out_spec) if self._auto else fn

  # ------------------------------------------------------------------ temperature
  def beta(self, nu: jax.Array, step: jax.Array) -> jax.Array:
    """The inverse temperature used at ``step`` (learned or scheduled)."""
    if self.mode == "learn":
      return self.param.beta(nu)
    t = jnp.asarray(step, jnp.float32)
    if self.steps_per_epoch > 0:
      t = jnp.floor(t / self.steps_per_epoch) * self.steps_per_epoch
    tau = temp_lib.temperature_schedule(self.mode, t, tau0=self.tau0, tau1=self.tau1,
                                        horizon=self.horizon, period=self.period)
    return 1.0 / tau

  def project_params(self, step: jax.Array, params: PyTree) -> PyTree:
    """After each update: clamp ``nu`` so that ``beta(nu)`` stays in
    ``[beta_min, beta_max]`` (OpenCLIP: ``logit_scale.clamp_(0, ln 100)``)."""
    del step
    if self.mode != "learn":
      return params
    params = dict(params)
    params["logit_scale"] = jnp.clip(params["logit_scale"], *self.nu_bounds)
    return params

  # ------------------------------------------------------------------ set-up
  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    return self._sharded(self._init, P())(rng, batch)

  def _init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    variables = self.model.init({"params": rng}, batch["image"], batch["text"],
                                train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables, {}

  def _apply(self, params, model_state, batch, train: bool):
    variables = {"params": params, **model_state}
    if train and model_state:
      (out, aux), new_state = self.model.apply(variables, batch["image"], batch["text"],
                                               train=True, mutable=list(model_state))
      return out, aux, {**model_state, **new_state}
    out, aux = self.model.apply(variables, batch["image"], batch["text"], train=train)
    return out, aux, model_state

  # ------------------------------------------------------------------ training
  def loss_fn(self, params: PyTree, model_state: PyTree, extra: PyTree, batch: PyTree,
              rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    del extra
    return self._sharded(self._loss, P())(params, model_state, batch, rng, step)

  def _loss(self, params, model_state, batch, rng, step):
    out, _, new_state = self._apply(params, model_state, batch, train=True)
    h_x, h_y = out["image_embeds"], out["text_embeds"]
    nu = out["logit_scale"]
    if self.mode != "learn":
      nu = jax.lax.stop_gradient(nu)
    beta = self.beta(nu, step)
    gap = modality_gap(jax.lax.stop_gradient(h_x), jax.lax.stop_gradient(h_y))
    h_x, h_y, applied = modality_swap(rng, h_x, h_y, self.swap, self.swap_prob,
                                      self.swap_renormalize)
    loss, parts = symmetric_infonce(h_x, h_y, beta)
    metrics = dict(parts)
    metrics.update(loss=loss, beta=jax.lax.stop_gradient(beta),
                   tau=1.0 / jax.lax.stop_gradient(beta), batch_gap=gap,
                   swap_applied=applied)
    return loss, (new_state, metrics)

  # ------------------------------------------------------------------ evaluation
  def predict(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree) -> dict[str, jax.Array]:
    """``{'image_embeds', 'text_embeds'}``: unit-norm ``[B, D]`` float32."""
    del extra
    return self._sharded(self._predict, P(parallel.DATA_AXIS))(params, model_state, batch)

  def _predict(self, params, model_state, batch):
    out, _, _ = self._apply(params, model_state, batch, train=False)
    return {"image_embeds": out["image_embeds"], "text_embeds": out["text_embeds"]}

  def eval_loss(self, params: PyTree, model_state: PyTree, extra: PyTree,
                batch: PyTree) -> jax.Array:
    """InfoNCE of the batch's valid pairs at the current temperature (the learned one,
    or the schedule's final ``tau1`` / fixed ``tau0``)."""
    del extra
    return self._sharded(self._eval_loss, P())(params, model_state, batch)

  def _eval_loss(self, params, model_state, batch):
    out, _, _ = self._apply(params, model_state, batch, train=False)
    if self.mode == "learn":
      beta = self.param.beta(out["logit_scale"])
    else:
      beta = self.beta(out["logit_scale"], jnp.asarray(self.horizon or 0, jnp.float32))
    valid = batch.get("valid", None)
    loss, _ = symmetric_infonce(out["image_embeds"], out["text_embeds"], beta, valid)
    return loss


def no_weight_decay_regex() -> str:
  """OpenCLIP excludes ``logit_scale``, biases, norm gains and every other 1-D parameter
  from weight decay. In our models those are exactly the leaves named ``bias`` or
  ``scale`` (LayerNorm/BatchNorm) and ``logit_scale`` (``tests/test_clip_method.py``
  checks that every parameter with fewer than 2 dimensions matches)."""
  return r"(^|/)(bias|scale|logit_scale)$"


def optimizer_groups(slrt_mult: float = 1.0) -> list[tuple[str, float, float]]:
  """Parameter groups ``(regex, lr_mult, wd_mult)`` for ``config.optimizer.groups``:
  ``logit_scale`` at ``slrt_mult`` x the learning rate (SLRT: 0.1) and no weight decay,
  then every other 1-D parameter without weight decay."""
  return [(r"^logit_scale$", float(slrt_mult), 0.0), (no_weight_decay_regex(), 1.0, 0.0)]
