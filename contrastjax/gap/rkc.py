"""A stabilised explicit solver for the stiff phase of the full feature flow (RKC2).

From ``t ~ 50`` on, the full flow (n = 512, d = 64) is stiff in the way that matters for
explicit Runge-Kutta methods: its largest Jacobian eigenvalue (~0.19 in ``t``) pins their
steps at ``dt ~ 20`` while the solution changes on time scales of ``t`` itself, so RK45,
DOP853 and diffrax's Tsit5 all need ~3.5k field evaluations to reach ``t = 1e4``
(BENCHMARKS.md). Implicit methods would need the dense 65,538^2 Jacobian.

This module is the second-order Runge-Kutta-Chebyshev method of Sommeijer, Shampine and
Verwer (J. Comput. Appl. Math. 88, 1997; the damped form of Verwer, Hundsdorfer and
Sommeijer, Numer. Math. 2004, Sec. V.1 of Hundsdorfer & Verwer's book): ``s`` stages whose
stability interval along the negative real axis grows like ``0.65 s^2``, with ``s`` chosen
each step from a power-iteration estimate of the spectral radius, the embedded error
estimate ``(12 (y_n - y_{n+1}) + 6 h (F_n + F_{n+1})) / 15`` and an ``err^(-1/3)`` step
controller. It fits problems whose stiffness comes from (nearly) real negative
eigenvalues -- a gradient flow's Hessian.

:func:`solve` runs in one ``jax.jit`` (a ``lax.while_loop`` over steps, a dynamic number
of stages per step): forward mode (``jax.jvp``/``jax.jacfwd``) differentiates through it;
for reverse-mode gradients use the diffrax solves of :mod:`contrastjax.gap.integrate`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

_EPS = 2.0 / 13.0  # damping (Verwer et al.): stability interval ~0.653 s^2
# Stage count from h * rho as RKC's rkc.f (Sommeijer et al.), which takes
# 1 + sqrt(1 + 1.54 h rho); we take ceil(sqrt(1 + 1.54 h rho)) >= sqrt(h rho / 0.653),
# the bound itself, since rho already carries a x1.2 safety factor.
_STABILITY = 0.653
_STAGE_FACTOR = 1.54


class Result(NamedTuple):
  """``y`` at ``t`` and the solve's counts. ``t < t1`` means the solve stopped early:
  ``max_steps`` reached, the field returned a non-finite value, or ``stop_fn`` fired."""
  t: jax.Array
  y: object
  num_steps: jax.Array       # accepted steps
  num_rejected: jax.Array
  num_fevals: jax.Array      # field evaluations, the power iterations included
  max_stages: jax.Array      # largest stage count used
  spectral_radius: jax.Array  # the last estimate (x 1.2 safety)
  h: jax.Array               # the next step size the controller proposed (to continue)
  stopped: jax.Array         # bool: ``stop_fn`` fired


def _chebyshev(s, w0, size: int):
  """``T_j(w0)``, ``T_j'(w0)``, ``T_j''(w0)`` for ``j = 0..size-1`` (valid up to ``s``)."""
  def body(j, c):
    T, dT, ddT = c
    T = T.at[j].set(2 * w0 * T[j - 1] - T[j - 2])
    dT = dT.at[j].set(2 * T[j - 1] + 2 * w0 * dT[j - 1] - dT[j - 2])
    ddT = ddT.at[j].set(4 * dT[j - 1] + 2 * w0 * ddT[j - 1] - ddT[j - 2])
    return T, dT, ddT
  z = jnp.zeros(size, w0.dtype)
  T = z.at[0].set(1.0).at[1].set(w0)
  dT = z.at[1].set(1.0)
  return jax.lax.fori_loop(2, s + 1, body, (T, dT, z))


def rkc_step(f: Callable, t, y, fy, h, s, size: int):
  """One RKC2 step of size ``h`` with ``s >= 2`` stages (``size > s``: array length)."""
  w0 = 1.0 + _EPS / s.astype(y.dtype) ** 2
  T, dT, ddT = _chebyshev(s, w0, size)
  w1 = dT[s] / ddT[s]
  j = jnp.arange(size)
  b = jnp.where(j >= 2, ddT / jnp.where(j >= 2, dT, 1.0) ** 2, 0.0)
  b = b.at[0].set(b[2]).at[1].set(b[2])
  a = 1.0 - b * T
  c = jnp.where(j >= 2, w1 * ddT / jnp.where(j >= 2, dT, 1.0), 0.0)
  c = c.at[1].set(c[2] / dT[2])
  y1 = y + (b[1] * w1) * h * fy

  def stage(k, carry):
    ym2, ym1 = carry
    mu = 2 * b[k] * w0 / b[k - 1]
    nu = -b[k] / b[k - 2]
    mut = 2 * b[k] * w1 / b[k - 1]
    gt = -a[k - 1] * mut
    yk = ((1 - mu - nu) * y + mu * ym1 + nu * ym2 + mut * h * f(t + c[k - 1] * h, ym1)
          + gt * h * fy)
    return ym1, yk

  _, ys = jax.lax.fori_loop(2, s + 1, stage, (y, y1))
  return ys


def spectral_radius(f: Callable, t, y, fy, v, iters: int = 12):
  """Nonlinear power iteration on the field's Jacobian at ``y`` (finite differences, as
  RKC's own ``rkcrho``); returns (estimate, the iterate to warm-start the next call)."""
  ynorm = jnp.linalg.norm(y)
  delta = jnp.sqrt(jnp.finfo(y.dtype).eps) * jnp.maximum(ynorm, 1.0)

  def body(_, c):
    v, _ = c
    v = v * (delta / jnp.maximum(jnp.linalg.norm(v), 1e-300))
    w = f(t, y + v) - fy
    return w, jnp.linalg.norm(w) / delta
  v, rho = jax.lax.fori_loop(0, iters, body, (v, jnp.zeros((), y.dtype)))
  return rho, v


def solve(f: Callable, y0, *, t0: float = 0.0, t1: float, rtol: float = 1e-6,
          atol: float = 1e-9, h0: float = 1e-4, max_steps: int = 100_000,
          max_stages: int = 256, radius_every: int = 25, power_iters: int = 12,
          stop_fn: Callable | None = None) -> Result:
  """Integrates ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` with adaptive RKC2.

  ``y0`` may be any pytree of float arrays (``f`` maps it to the same structure).
  Error norm: RMS of ``est / (atol + rtol max(|y_n|, |y_{n+1}|))``, as SciPy's solvers.
  The spectral radius is re-estimated every ``radius_every`` accepted steps and after a
  rejection; a step never uses more than ``max_stages`` stages (it shrinks instead).
  ``t0``, ``t1``, ``h0`` and ``max_steps`` (steps + rejections) may be traced values.
  ``stop_fn(y) -> bool`` ends the solve after the first accepted step where it is True
  (an event at step resolution, as a diffrax boolean event).
  """
  flat0, unravel = ravel_pytree(y0)
  dtype = flat0.dtype

  def F(t, x):
    return ravel_pytree(f(t, unravel(x)))[0].astype(dtype)

  size = int(max_stages) + 1
  t0 = jnp.asarray(t0, dtype)
  t1 = jnp.asarray(t1, dtype)
  fy0 = F(t0, flat0)
  v0 = jnp.sin(jnp.arange(flat0.size, dtype=dtype) + 1.0)  # any fixed non-special start
  rho0, v0 = spectral_radius(F, t0, flat0, fy0, v0, power_iters)
  stop = ((lambda x: jnp.asarray(stop_fn(unravel(x)), bool).reshape(()))
          if stop_fn is not None else (lambda x: jnp.asarray(False)))
  init = dict(t=t0, y=flat0, fy=fy0, h=jnp.asarray(h0, dtype), rho=1.2 * rho0, v=v0,
              steps=jnp.int32(0), rej=jnp.int32(0), nfev=jnp.int32(1 + power_iters),
              since=jnp.int32(0), smax=jnp.int32(0), stopped=stop(flat0))

  def cond(c):  # a non-finite field value makes the step size NaN and ends the solve
    return ((c["t"] < t1) & (c["steps"] + c["rej"] < max_steps) & jnp.isfinite(c["h"])
            & (c["h"] > 0) & ~c["stopped"])

  def body(c):
    # Spectral radius: refresh every radius_every accepted steps (and after rejections).
    def refresh(c):
      rho, v = spectral_radius(F, c["t"], c["y"], c["fy"], c["v"], power_iters)
      return dict(c, rho=1.2 * rho, v=v, since=jnp.int32(0),
                  nfev=c["nfev"] + power_iters)
    c = jax.lax.cond(c["since"] >= radius_every, refresh, lambda c: c, c)
    rho = jnp.maximum(c["rho"], 1e-300)
    # The stage count's stability bound 0.653 s^2 >= h rho caps the step at max_stages.
    h_cap = _STABILITY * (max_stages ** 2 - 1) / rho
    h = jnp.minimum(jnp.minimum(c["h"], h_cap), t1 - c["t"])
    s = jnp.clip(jnp.ceil(jnp.sqrt(1.0 + _STAGE_FACTOR * h * rho)).astype(jnp.int32), 2, max_stages)
    yn = rkc_step(F, c["t"], c["y"], c["fy"], h, s, size)
    fn = F(c["t"] + h, yn)
    est = (12.0 * (c["y"] - yn) + 6.0 * h * (c["fy"] + fn)) / 15.0
    wt = atol + rtol * jnp.maximum(jnp.abs(c["y"]), jnp.abs(yn))
    err = jnp.sqrt(jnp.mean((est / wt) ** 2))
    ok = err <= 1.0
    fac = 0.8 * jnp.where(err > 0, err, 1e-10) ** (-1.0 / 3.0)
    new_h = jnp.where(ok, h * jnp.clip(fac, 0.1, 10.0), h * jnp.clip(fac, 0.1, 0.9))
    # A step shortened to land on t1 keeps the size it would have had, for a continuation.
    new_h = jnp.where(ok & (h < c["h"]), jnp.maximum(new_h, c["h"]), new_h)
    nfev = c["nfev"] + s  # s - 1 stage evaluations plus F(y_{n+1})
    return dict(
        t=jnp.where(ok, c["t"] + h, c["t"]), y=jnp.where(ok, yn, c["y"]),
        fy=jnp.where(ok, fn, c["fy"]), h=new_h, rho=c["rho"], v=c["v"],
        steps=c["steps"] + ok.astype(jnp.int32), rej=c["rej"] + (~ok).astype(jnp.int32),
        nfev=nfev, since=jnp.where(ok, c["since"] + 1, radius_every),
        smax=jnp.maximum(c["smax"], s), stopped=ok & stop(yn))

  out = jax.lax.while_loop(cond, body, init)
  return Result(t=out["t"], y=unravel(out["y"]), num_steps=out["steps"],
                num_rejected=out["rej"], num_fevals=out["nfev"], max_stages=out["smax"],
                spectral_radius=out["rho"], h=out["h"], stopped=out["stopped"])
