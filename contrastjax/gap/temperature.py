"""Temperature parameterisations and schedules (Yaras et al. 2025, Sec. 4 and App. C).

Shared by the gradient-flow simulator (``contrastjax.gap``) and the CLIP method
(``contrastjax.methods.clip``). ``beta = 1 / tau`` is the *inverse* temperature (the
logit scale); ``nu`` is the trainable parameter behind it.

Parameterisations ``beta(nu)``:

========== ======================= ====================================================
name        beta(nu)                where
========== ======================= ====================================================
exp         exp(nu)                 CLIP/OpenCLIP ``logit_scale`` (paper baseline)
softplus    log(1 + exp(nu))        TR, the paper's Table 2 entry
exp_scaled  exp(nu / s)             TR "Scale2" (s = 2) and "Scale10" (s = 10)
linear      nu                      the scalar-model contrast run (docs/methods/modality_gap.md)
========== ======================= ====================================================

Schedules ``tau(t)`` (t in steps, epochs or flow time; the caller picks the unit):

========== ========================================================================
fixed       tau0 for all t (FLT)
linear      tau0 -> tau1 linearly over [0, horizon], then tau1 (TS S0-S3)
cosine      alternates tau0 -> tau1 -> tau0 with period ``period``:
            tau0 + (tau1 - tau0) (1 - cos(2 pi t / period)) / 2 (TS A0/A1; the paper
            does not state the period)
========== ========================================================================
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ("exp", "softplus", "exp_scaled", "linear")
SCHEDULES = ("fixed", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """``beta(nu)`` and its inverse. ``scale`` is ``s`` of ``exp_scaled``."""
  name: str
  scale: float = 1.0

  def beta(self, nu):
    if self.name == "exp":
      return jnp.exp(nu)
    if self.name == "softplus":
      return jax.nn.softplus(nu)
    if self.name == "exp_scaled":
      return jnp.exp(nu / self.scale)
    return nu  # linear

  def dbeta(self, nu):
    """``beta'(nu)`` in closed form (the temperature/gap ODE, Eq. 11, needs it)."""
    if self.name == "exp":
      return jnp.exp(nu)
    if self.name == "softplus":
      return jax.nn.sigmoid(nu)
    if self.name == "exp_scaled":
      return jnp.exp(nu / self.scale) / self.scale
    return jnp.ones_like(nu)

  def nu_from_beta(self, beta):
    """The ``nu`` with ``beta(nu) = beta`` (e.g. to start at a given temperature)."""
    if self.name == "exp":
      return jnp.log(beta)
    if self.name == "softplus":
      # log(expm1(beta)), stable for large beta.
      return beta + jnp.log(-jnp.expm1(-beta))
    if self.name == "exp_scaled":
      return self.scale * jnp.log(beta)
    return beta

  def nu_from_tau(self, tau):
    return self.nu_from_beta(1.0 / tau)


def get_parameterization(name: str, scale: float = 1.0) -> Parameterization:
  """Validates ``name`` (one of :data:`PARAMETERIZATIONS`) and ``scale``."""
  if name not in PARAMETERIZATIONS:
    raise ValueError(f"temperature parameterisation {name!r} is not known; expected "
                     f"one of {PARAMETERIZATIONS}")
  if name == "exp_scaled" and not (isinstance(scale, (int, float)) and scale > 0):
    raise ValueError(f"temperature parameterisation 'exp_scaled' needs scale > 0, "
                     f"got {scale!r}")
  return Parameterization(name, float(scale))


def check_schedule(name: str, *, tau0: float, tau1: float | None = None,
                   horizon: float | None = None, period: float | None = None) -> None:
  """Raises ``ValueError`` naming the bad schedule argument."""
  if name not in SCHEDULES:
    raise ValueError(f"temperature schedule {name!r} is not known; expected one of "
                     f"{SCHEDULES}")
  if not tau0 > 0:
    raise ValueError(f"temperature schedule {name!r}: tau0 must be > 0, got {tau0!r}")
  if name in ("linear", "cosine") and not (tau1 is not None and tau1 > 0):
    raise ValueError(f"temperature schedule {name!r} needs tau1 > 0, got {tau1!r}")
  if name == "linear" and not (horizon is not None and horizon > 0):
    raise ValueError(f"temperature schedule 'linear' needs horizon > 0, got {horizon!r}")
  if name == "cosine" and not (period is not None and period > 0):
    raise ValueError(f"temperature schedule 'cosine' needs period > 0, got {period!r}")


def temperature_schedule(name: str, t, *, tau0: float, tau1: float | None = None,
                         horizon: float | None = None, period: float | None = None):
  """``tau(t)`` of the named schedule (traceable in ``t``; see the module table)."""
  check_schedule(name, tau0=tau0, tau1=tau1, horizon=horizon, period=period)
  return schedule_tau(name, t, tau0=tau0, tau1=tau1, horizon=horizon, period=period)


def schedule_tau(name: str, t, *, tau0, tau1=None, horizon=None, period=None):
  """``tau(t)`` without the argument checks, so that ``tau0``, ``tau1``, ``horizon`` and
  ``period`` may be traced (differentiated through, e.g. by the gap simulator).

  Call :func:`check_schedule` on concrete values first; :func:`temperature_schedule`
  does both.
  """
  if name not in SCHEDULES:
    raise ValueError(f"temperature schedule {name!r} is not known; expected one of "
                     f"{SCHEDULES}")
  t = jnp.asarray(t)
  if name == "fixed":
    return jnp.zeros(t.shape, dtype=jnp.result_type(t, float)) + tau0
  if name == "linear":
    frac = jnp.clip(t / horizon, 0.0, 1.0)
    return tau0 + (tau1 - tau0) * frac
  return tau0 + (tau1 - tau0) * 0.5 * (1.0 - jnp.cos(2.0 * math.pi * t / period))
