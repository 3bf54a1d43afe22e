"""Independent NumPy right-hand sides (hand-derived gradients, no autodiff).

Used as the SciPy ``solve_ivp`` baseline of the benchmark and, in the tests, to check
the ``jax.grad`` vector field of :mod:`contrastjax.gap.flows`. Learned ``beta = e^nu``
only (the benchmark's and the paper's baseline).

Flat state ``[u (n*d), v (n*d), nu, c]`` with ``c = gamma`` (``lift="gamma"``) or
``c = phi`` (``gamma = sin(phi)``, ``lift="sin_phi"``).
"""
from __future__ import annotations

import numpy as np


def _softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def loss_grad_matrix(M, shared_exp: bool = False):
  """``grad l(M) = (1/2n)(colsoftmax + rowsoftmax) - I/n``.

  ``shared_exp``: both softmaxes from one ``exp(M - max M)`` (what the JAX field does;
  valid while ``max M - min M`` stays far from the float64 exponent range, < 600).
  """
  n = M.shape[0]
  if shared_exp and M.max() - M.min() < 600.0:
    e = np.exp(M - M.max())
    s = e / e.sum(axis=0, keepdims=True) + e / e.sum(axis=1, keepdims=True)
  else:
    s = _softmax(M, 0) + _softmax(M, 1)
  return s / (2 * n) - np.eye(n) / n


def feature_rhs(n: int, d: int, lift: str = "gamma", shared_exp: bool = False):
  """Returns ``f(t, y)`` for SciPy: the gradient flow of Eq. 4 with ``beta = e^nu``.

  ``shared_exp`` computes both softmaxes from one ``exp`` (:func:`loss_grad_matrix`):
  the benchmark's baseline uses it so that SciPy gets the same arithmetic as diffrax.

  With ``a = beta (1 - gamma^2)``, ``G = a grad l(a Z)``: ``dl/dH_X = G H_Y``,
  ``dl/dH_Y = G^T H_X``, ``dl/du = (I - h h^T) dl/dh / ||u||``, ``dl/dnu =
  -beta (1-gamma^2) g``, ``dl/dgamma = 2 beta gamma g``, ``g = -<Z, grad l(aZ)>``.
  """
  nd = n * d

  def f(t, y):  # pylint: disable=unused-argument
    u = y[:nd].reshape(n, d)
    v = y[nd:2 * nd].reshape(n, d)
    nu, c = y[2 * nd], y[2 * nd + 1]
    gamma = np.sin(c) if lift == "sin_phi" else c
    ru = np.linalg.norm(u, axis=1, keepdims=True)
    rv = np.linalg.norm(v, axis=1, keepdims=True)
    hx, hy = u / ru, v / rv
    beta = np.exp(nu)
    a = beta * (1 - gamma**2)
    Z = hx @ hy.T
    gl = loss_grad_matrix(a * Z, shared_exp)
    g = -np.sum(Z * gl)
    G = a * gl
    dhx, dhy = G @ hy, G.T @ hx
    du = (dhx - hx * np.sum(hx * dhx, axis=1, keepdims=True)) / ru
    dv = (dhy - hy * np.sum(hy * dhy, axis=1, keepdims=True)) / rv
    dnu = beta * (1 - gamma**2) * g
    dgamma = -2 * beta * gamma * g
    dc = np.cos(c) * dgamma if lift == "sin_phi" else dgamma
    return np.concatenate([-du.ravel(), -dv.ravel(), [dnu, dc]])
  return f


def scalar_rhs(t, y):  # pylint: disable=unused-argument
  """Sec. 3.1 with ``beta = e^nu``: ``y = [nu, gamma]``."""
  nu, gamma = y
  beta = np.exp(nu)
  e = np.exp(-beta * (1 - gamma**2))
  return np.array([beta * (1 - gamma**2) * e, -2 * beta * gamma * e])


def gap(hx, hy, gamma):
  """``||c_X - c_Y||`` of the lifted features, explicitly."""
  c = np.sqrt(1 - gamma**2)
  lx = np.hstack([c * hx, np.full((len(hx), 1), gamma)])
  ly = np.hstack([c * hy, np.full((len(hy), 1), -gamma)])
  return float(np.linalg.norm(lx.mean(0) - ly.mean(0)))
