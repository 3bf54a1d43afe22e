"""Vector fields of the modality-gap dynamics (Yaras et al. 2025, Sec. 2-3, App. B-C).

Three models, all written explicitly in JAX and all differentiable:

* :func:`feature_vector_field` -- the full gradient flow of Eq. 4 with *free features*:
  ``u_i, v_i in R^d`` (``h = u / ||u||``), the parallel-lift parameter ``gamma`` and the
  temperature parameter ``nu``; the velocity is ``-jax.grad`` of
  ``l(beta(nu) (1 - gamma^2) H_X H_Y^T)`` (Eq. 3) with the symmetric softmax CE (Eq. 2).
* :func:`closed_vector_field` -- the closed temperature/gap dynamics of Eq. 11 for a
  fixed similarity matrix ``Z``, with ``g_a(Z)`` computed in closed form (no autodiff).
* :func:`scalar_vector_field` -- the simplified model of Sec. 3.1, ``l(m) = exp(-m)``
  with ``m = beta (1 - gamma^2)``.

The temperature is either learned (``beta = beta(nu)`` for one of the parameterisations
of :mod:`contrastjax.gap.temperature`) or prescribed by a time schedule ``tau(t)``
(``fixed``, ``linear``, ``cosine`` of the paper's TS, plus ``knots``: piecewise-linear
``log tau`` in ``log(1 + t)``, used by the schedule optimiser). Under a schedule ``nu``
does not move.

Lift of the gap (docs/methods/modality_gap.md): ``lift="gamma"`` is the paper's flow on ``gamma`` itself;
it can leave ``[-1, 1]`` while pairs are mismatched (the integrator detects this).
``lift="sin_phi"`` writes ``gamma = sin(phi)`` and runs the gradient flow on ``phi``:
``dphi/dt = -cos(phi) dl/dgamma``, i.e. ``dgamma/dt = -cos(phi)^2 dl/dgamma`` -- the
paper's gamma equation with its clock slowed by ``cos^2(phi) = 1 - gamma^2`` (``cos(phi)``
per unit of ``phi``), which keeps the lifted features on the sphere for all t.

An optional fixed *mismatch pattern* ``targets`` (a permutation; ``x_i`` is paired with
``y_{targets[i]}``) replaces the identity pairing in the loss, as in Liang et al.'s toy
with two swapped labels. With ``train_features=False`` the features are frozen and only
``nu`` and ``gamma`` move (the setting of Eq. 11).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from contrastjax.gap import temperature as temp_lib

LIFTS = ("gamma", "sin_phi")
TEMPERATURES = ("learned", "schedule")
FLOW_SCHEDULES = temp_lib.SCHEDULES + ("knots",)


# ============================================================================ losses
def _pairing(n: int, targets):
  return jnp.arange(n) if targets is None else jnp.asarray(targets)


def _logsumexp(M, axis):
  """``logsumexp`` whose reverse pass reuses the forward ``exp`` (``jax.nn``'s
  recomputes it): ~12% faster vector field at n=512; the shift is the exact max."""
  m = jax.lax.stop_gradient(jnp.max(M, axis=axis, keepdims=True))
  return jnp.squeeze(m + jnp.log(jnp.sum(jnp.exp(M - m), axis=axis, keepdims=True)), axis)


def symmetric_ce(M, targets=None):
  """Symmetric softmax cross-entropy of Eq. 2 (mean over the n pairs).

  ``l(M) = (1/2n) sum_i [CE(M_{i,:}, e_{t_i}) + CE(M_{:,t_i}, e_i)]`` with ``t = targets``
  (identity by default), i.e. OpenCLIP's ``(CE(logits, labels) + CE(logits.T, labels))/2``
  for an involutive ``targets``.
  """
  n = M.shape[0]
  idx = _pairing(n, targets)
  pos = M[jnp.arange(n), idx]
  rows = _logsumexp(M, axis=1) - pos
  cols = _logsumexp(M, axis=0)[idx] - pos
  return (rows.sum() + cols.sum()) / (2 * n)


def loss_gradient(M, targets=None):
  """``grad l(M) = (1/2n)(colsoftmax(M) + rowsoftmax(M)) - (1/n) P`` in closed form
  (App. B.1; ``P`` the pairing's permutation matrix)."""
  n = M.shape[0]
  idx = _pairing(n, targets)
  P = jnp.zeros_like(M).at[jnp.arange(n), idx].set(1.0)
  return (jax.nn.softmax(M, axis=0) + jax.nn.softmax(M, axis=1)) / (2 * n) - P / n


def g_a(Z, a, targets=None):
  """``g_a(Z) = -<Z, grad l(a Z)>`` (App. B.1); ``>= 0`` when all pairs are matched."""
  return -jnp.sum(Z * loss_gradient(a * Z, targets))


def normalize(x, axis=-1):
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


# ============================================================================ config
@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Static description of a flow (hashable: safe as a ``jit`` static argument).

  Attributes:
    parameterization: ``beta(nu)`` name (``exp``, ``softplus``, ``exp_scaled``,
      ``linear``); only used when ``temperature == "learned"``.
    scale: ``s`` of ``exp_scaled``.
    temperature: ``learned`` (``nu`` follows the flow) or ``schedule`` (``tau(t)``).
    schedule: schedule name when ``temperature == "schedule"`` (see module docstring);
      its numbers (``tau0``, ``tau1``, ``horizon``, ``period``, ``log_tau_knots``) are
      passed in ``args`` so that they can be differentiated.
    lift: ``gamma`` or ``sin_phi``.
    train_features: False freezes ``u`` and ``v``.
    targets: optional fixed mismatch pattern (tuple permutation of ``range(n)``).
  """
  parameterization: str = "exp"
  scale: float = 1.0
  temperature: str = "learned"
  schedule: str = "fixed"
  lift: str = "gamma"
  train_features: bool = True
  targets: tuple[int, ...] | None = None

  def __post_init__(self):
    temp_lib.get_parameterization(self.parameterization, self.scale)  # validates
    if self.temperature not in TEMPERATURES:
      raise ValueError(f"temperature={self.temperature!r} is not known; expected one of "
                       f"{TEMPERATURES}")
    if self.schedule not in FLOW_SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r} is not known; expected one of "
                       f"{FLOW_SCHEDULES}")
    if self.lift not in LIFTS:
      raise ValueError(f"lift={self.lift!r} is not known; expected one of {LIFTS}")
    if self.targets is not None:
      t = tuple(int(i) for i in self.targets)
      if sorted(t) != list(range(len(t))):
        raise ValueError(f"targets={self.targets!r} must be a permutation of "
                         f"range({len(t)})")
      object.__setattr__(self, "targets", t)

  @property
  def param(self) -> temp_lib.Parameterization:
    return temp_lib.get_parameterization(self.parameterization, self.scale)


def knots_tau(t, log_tau_knots, horizon):
  """``tau(t)``: ``log tau`` piecewise linear in ``s = log(1 + t)`` on equally spaced
  knots over ``[0, log(1 + horizon)]`` (constant beyond)."""
  k = log_tau_knots.shape[0]
  s_knots = jnp.linspace(0.0, jnp.log1p(horizon), k)
  return jnp.exp(jnp.interp(jnp.log1p(t), s_knots, log_tau_knots))


def schedule_beta(cfg: FlowConfig, t, args: dict[str, Any]):
  """Inverse temperature ``1 / tau(t)`` of the configured schedule."""
  if cfg.schedule == "knots":
    return 1.0 / knots_tau(t, args["log_tau_knots"], args["horizon"])
  return 1.0 / temp_lib.schedule_tau(cfg.schedule, t, tau0=args["tau0"],
                                     tau1=args.get("tau1"), horizon=args.get("horizon"),
                                     period=args.get("period"))


def check_schedule_args(cfg: FlowConfig, args: dict[str, Any]) -> None:
  """Clear errors for missing/invalid schedule numbers (concrete values only)."""
  if cfg.temperature != "schedule":
    return
  if cfg.schedule == "knots":
    for key in ("log_tau_knots", "horizon"):
      if key not in args:
        raise ValueError(f"schedule 'knots' needs args[{key!r}]")
    return
  try:
    temp_lib.check_schedule(cfg.schedule, tau0=float(args["tau0"]),
                            tau1=None if args.get("tau1") is None else float(args["tau1"]),
                            horizon=None if args.get("horizon") is None
                            else float(args["horizon"]),
                            period=None if args.get("period") is None
                            else float(args["period"]))
  except KeyError as e:
    raise ValueError(f"schedule {cfg.schedule!r} needs args[{e.args[0]!r}]") from None
  except (TypeError, jax.errors.ConcretizationTypeError):
    pass  # traced values: checked by the caller beforehand


# ============================================================================ state
def gamma_of(cfg: FlowConfig, y: dict[str, Any]):
  """``gamma`` from the state (``sin(phi)`` under ``lift="sin_phi"``)."""
  return jnp.sin(y["phi"]) if cfg.lift == "sin_phi" else y["gamma"]


def beta_of(cfg: FlowConfig, t, y: dict[str, Any], args: dict[str, Any]):
  """Current inverse temperature: ``beta(nu)`` or the schedule's ``1/tau(t)``."""
  if cfg.temperature == "schedule":
    return schedule_beta(cfg, t, args)
  return cfg.param.beta(y["nu"])


def initial_state(cfg: FlowConfig, u0, v0, *, tau0, gamma0) -> dict[str, Any]:
  """State pytree ``{u, v, nu, gamma | phi}`` starting at temperature ``tau0``."""
  u0, v0 = jnp.asarray(u0), jnp.asarray(v0)
  nu0 = cfg.param.nu_from_tau(jnp.asarray(tau0, u0.dtype))
  y = dict(u=u0, v=v0, nu=nu0)
  gamma0 = jnp.asarray(gamma0, u0.dtype)
  if cfg.lift == "sin_phi":
    y["phi"] = jnp.arcsin(gamma0)
  else:
    y["gamma"] = gamma0
  return y


def feature_loss(cfg: FlowConfig, t, y: dict[str, Any], args: dict[str, Any]):
  """``l(beta (1 - gamma^2) H_X H_Y^T)`` (Eq. 3) at state ``y``."""
  hx, hy = normalize(y["u"]), normalize(y["v"])
  gamma = gamma_of(cfg, y)
  beta = beta_of(cfg, t, y, args)
  return symmetric_ce(beta * (1.0 - gamma**2) * (hx @ hy.T), cfg.targets)


def softmax_pair(M):
  """``(colsoftmax(M), rowsoftmax(M))`` from one ``exp`` pass when it is safe.

  Shifting by the global maximum instead of each row's/column's lets both softmaxes
  share ``E = exp(M - max M)``: half the exponentials of the two separate softmaxes
  (the dominant elementwise cost of the feature flow). That is exact in exact arithmetic
  and loses nothing in floating point as long as no row or column sum of ``E``
  underflows, i.e. while ``max M - min M`` stays well inside the exponent range (the
  similarities of unit vectors scaled by ``beta (1 - gamma^2)`` span ``2 beta``); wider
  spreads (``beta`` in the hundreds in float32) take the two-pass path.
  """
  lim = 80.0 if M.dtype == jnp.float32 else 600.0  # exp(-lim) far above the tiny normal
  gmax = jax.lax.stop_gradient(jnp.max(M))
  spread = gmax - jax.lax.stop_gradient(jnp.min(M))

  def shared(M):
    E = jnp.exp(M - gmax)
    return E / jnp.sum(E, axis=0, keepdims=True), E / jnp.sum(E, axis=1, keepdims=True)

  def separate(M):
    return jax.nn.softmax(M, axis=0), jax.nn.softmax(M, axis=1)

  return jax.lax.cond(spread < lim, shared, separate, M)


def feature_gradient(cfg: FlowConfig, t, y: dict[str, Any], args: dict[str, Any]):
  """``grad_y l`` of :func:`feature_loss` in closed form (App. B.1 and the chain rule).

  With ``h = u / ||u||``, ``S = H_X H_Y^T``, ``a = beta (1 - gamma^2)`` and
  ``G = grad l(a S)`` (:func:`loss_gradient`):
  ``dl/dH_X = a G H_Y``, ``dl/dH_Y = a G^T H_X``,
  ``dl/du_i = (I - h_i h_i^T) dl/dh_i / ||u_i||``, ``dl/da = <G, S>``,
  ``dl/dgamma = -2 beta gamma dl/da`` (``dl/dphi = cos(phi) dl/dgamma``) and
  ``dl/dnu = beta'(nu) (1 - gamma^2) dl/da``. The same numbers as ``jax.grad`` of
  :func:`feature_loss` (tested to float round-off) with half the exponentials (one shared
  ``exp`` for both softmaxes, :func:`softmax_pair`) and no reverse pass of the
  log-sum-exps; the field is matmul-bound, so the time per call is about the same as the
  autodiff field's (2.8-3.6 ms at n = 512, d = 64 in float64 on 2 cores; BENCHMARKS.md).
  Remains differentiable (gradients through a solve use its VJP).
  """
  n = y["u"].shape[0]
  nu_u = jnp.linalg.norm(y["u"], axis=-1, keepdims=True)
  nu_v = jnp.linalg.norm(y["v"], axis=-1, keepdims=True)
  hx, hy = y["u"] / nu_u, y["v"] / nu_v
  gamma = gamma_of(cfg, y)
  beta = beta_of(cfg, t, y, args)
  a = beta * (1.0 - gamma**2)
  S = hx @ hy.T
  col, row = softmax_pair(a * S)
  idx = _pairing(n, cfg.targets)
  pairs = jnp.arange(n)[None, :] == idx[:, None]  # P, fused rather than scattered
  G = (col + row) / (2 * n) - jnp.where(pairs, 1.0 / n, 0.0).astype(S.dtype)
  dl_da = jnp.sum(G * S)
  out: dict[str, Any] = {}
  if cfg.train_features:
    gx, gy = a * (G @ hy), a * (G.T @ hx)
    out["u"] = (gx - hx * jnp.sum(hx * gx, axis=-1, keepdims=True)) / nu_u
    out["v"] = (gy - hy * jnp.sum(hy * gy, axis=-1, keepdims=True)) / nu_v
  else:
    out["u"], out["v"] = jnp.zeros_like(y["u"]), jnp.zeros_like(y["v"])
  if cfg.temperature == "schedule":
    out["nu"] = jnp.zeros_like(y["nu"])
  else:
    out["nu"] = cfg.param.dbeta(y["nu"]) * (1.0 - gamma**2) * dl_da
  dl_dgamma = -2.0 * beta * gamma * dl_da
  if cfg.lift == "sin_phi":
    out["phi"] = jnp.cos(y["phi"]) * dl_dgamma
  else:
    out["gamma"] = dl_dgamma
  return out


def feature_vector_field(cfg: FlowConfig, *, autodiff: bool = False):
  """Returns ``f(t, y, args) = -grad_y l`` (Eq. 4) for diffrax.

  The gradient is :func:`feature_gradient` (closed form); ``autodiff=True`` takes
  ``jax.grad`` of :func:`feature_loss` instead (the reference the closed form is tested
  against).
  """
  def f(t, y, args):
    if autodiff:
      grads = jax.grad(lambda yy: feature_loss(cfg, t, yy, args))(y)
      if not cfg.train_features:
        grads["u"] = jnp.zeros_like(grads["u"])
        grads["v"] = jnp.zeros_like(grads["v"])
      if cfg.temperature == "schedule":
        grads["nu"] = jnp.zeros_like(grads["nu"])
    else:
      grads = feature_gradient(cfg, t, y, args)
    return jax.tree.map(jnp.negative, grads)
  return f


# ============================================================================ Eq. 11
def closed_vector_field(cfg: FlowConfig):
  """Eq. 11 for fixed ``Z = args["Z"]``: state ``{nu, gamma}`` (or ``{nu, phi}``).

  ``dnu/dt = beta'(nu) (1 - gamma^2) g_a(Z)`` (so ``dbeta/dt = beta'^2 (1-gamma^2) g``),
  ``dgamma/dt = -2 beta gamma g_a(Z)``, ``a = beta (1 - gamma^2)``; ``g`` in closed form.
  """
  param = cfg.param

  def f(t, y, args):
    gamma = gamma_of(cfg, y)
    beta = beta_of(cfg, t, y, args)
    g = g_a(args["Z"], beta * (1.0 - gamma**2), cfg.targets)
    dgamma = -2.0 * beta * gamma * g
    out = {}
    if cfg.temperature == "schedule":
      out["nu"] = jnp.zeros_like(y["nu"])
    else:
      out["nu"] = param.dbeta(y["nu"]) * (1.0 - gamma**2) * g
    if cfg.lift == "sin_phi":
      out["phi"] = jnp.cos(y["phi"]) * dgamma  # dphi/dt = cos(phi) * (-dl/dgamma)
    else:
      out["gamma"] = dgamma
    return out
  return f


# ============================================================================ Sec. 3.1
def scalar_vector_field(cfg: FlowConfig):
  """The scalar model of Sec. 3.1: ``l(m) = exp(-m)``, ``m = beta (1 - gamma^2)``.

  ``dnu/dt = beta'(nu) (1 - gamma^2) e^{-m}``, ``dgamma/dt = -2 beta gamma e^{-m}``; under
  a schedule ``beta = 1/tau(t)`` and ``nu`` is constant. State ``{nu, gamma | phi}``.
  """
  param = cfg.param

  def f(t, y, args):
    gamma = gamma_of(cfg, y)
    beta = beta_of(cfg, t, y, args)
    e = jnp.exp(-beta * (1.0 - gamma**2))
    dgamma = -2.0 * beta * gamma * e
    out = {}
    if cfg.temperature == "schedule":
      out["nu"] = jnp.zeros_like(y["nu"])
    else:
      out["nu"] = param.dbeta(y["nu"]) * (1.0 - gamma**2) * e
    if cfg.lift == "sin_phi":
      out["phi"] = jnp.cos(y["phi"]) * dgamma
    else:
      out["gamma"] = dgamma
    return out
  return f


def scalar_state(cfg: FlowConfig, *, beta0, gamma0, dtype=None) -> dict[str, Any]:
  """``{nu, gamma | phi}`` for the scalar / closed models, starting at ``beta0``."""
  dtype = dtype or jnp.result_type(float)
  y = dict(nu=cfg.param.nu_from_beta(jnp.asarray(beta0, dtype)))
  gamma0 = jnp.asarray(gamma0, dtype)
  if cfg.lift == "sin_phi":
    y["phi"] = jnp.arcsin(gamma0)
  else:
    y["gamma"] = gamma0
  return y
