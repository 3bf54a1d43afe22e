"""Measures of the modality gap (Yaras et al. 2025, Sec. 2, Lemma 3.1, App. E.2).

* :func:`gap` -- ``Delta = ||c_X - c_Y||`` between the modality centres of the *lifted*
  features ``[sqrt(1 - gamma^2) h, +-gamma]``; :func:`gap_lower_bound` is ``2 |gamma|``.
* :func:`margin` -- ``alpha(Z) = min_{i != j} (Z_ii - Z_ij) ^ (Z_jj - Z_ij)``.
* :func:`uniformity` -- Fang et al. (2024) "Rethinking the uniformity metric in
  self-supervised learning": ``-W2(N(mu, Sigma), N(0, I/m))`` with ``mu``, ``Sigma`` the
  mean and covariance of the stacked features of both modalities (``m`` their
  dimension): ``W2 = sqrt(||mu||^2 + 1 + tr Sigma - (2/sqrt(m)) tr Sigma^{1/2})``.
* :func:`lemma31_beta` -- the conserved relation of Lemma 3.1 (Eq. 6) and its analogues
  for ``exp(nu/s)`` and ``linear``; :func:`lemma31_residual` its relative error.
"""
from __future__ import annotations

import jax.numpy as jnp

from contrastjax.gap.flows import normalize


def lifted(hx, hy, gamma):
  """``(H~_X, H~_Y)``: ``[sqrt(1-gamma^2) H, +gamma 1]`` and ``[.., -gamma 1]``."""
  c = jnp.sqrt(1.0 - gamma**2)
  n = hx.shape[0]
  one = jnp.ones((n, 1), hx.dtype)
  return (jnp.concatenate([c * hx, gamma * one], axis=1),
          jnp.concatenate([c * hy, -gamma * one], axis=1))


def gap(hx, hy, gamma):
  """``Delta = ||mean(H~_X) - mean(H~_Y)||`` on the lifted features (``hx``, ``hy``
  are unit rows)."""
  lx, ly = lifted(hx, hy, gamma)
  return jnp.linalg.norm(lx.mean(0) - ly.mean(0))


def gap_lower_bound(gamma):
  """``2 |gamma| <= Delta``."""
  return 2.0 * jnp.abs(gamma)


def similarity(u, v):
  """``Z = H_X H_Y^T`` of the normalised rows of ``u`` and ``v``."""
  return normalize(u) @ normalize(v).T


def margin(Z, targets=None):
  """``alpha(Z)`` (paper Sec. 2); with ``targets`` the pairing is ``(i, targets[i])``.

  Positive iff every pair is the best match in its row and its column.
  """
  if targets is not None:
    Z = Z[:, jnp.asarray(targets)]
  n = Z.shape[0]
  diag = jnp.diag(Z)
  d = jnp.minimum(diag[:, None] - Z, diag[None, :] - Z)
  d = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, d)
  return jnp.min(d)


def wasserstein_uniformity(features, ddof: int = 0):
  """``-W2`` of Fang et al. for features stacked as rows (``N x m``; both modalities).

  ``Sigma`` is the sample covariance with ``ddof`` (0: divide by N). ``tr Sigma^{1/2}``
  is the sum of the square roots of its (clipped) eigenvalues. Higher is more uniform;
  0 means ``N(0, I/m)`` exactly.
  """
  features = jnp.asarray(features)
  N, m = features.shape
  mu = features.mean(0)
  xc = features - mu
  cov = xc.T @ xc / (N - ddof)
  eig = jnp.clip(jnp.linalg.eigvalsh(cov), 0.0, None)
  w2sq = mu @ mu + 1.0 + jnp.trace(cov) - 2.0 / jnp.sqrt(m) * jnp.sum(jnp.sqrt(eig))
  return -jnp.sqrt(jnp.clip(w2sq, 0.0, None))


def uniformity(hx, hy, gamma=None):
  """Uniformity of both modalities together; lifted first when ``gamma`` is given."""
  if gamma is not None:
    hx, hy = lifted(hx, hy, gamma)
  return wasserstein_uniformity(jnp.concatenate([hx, hy], axis=0))


def lemma31_beta(gamma, *, beta0, gamma0, parameterization: str = "exp",
                 scale: float = 1.0):
  """``beta`` predicted from ``gamma`` by integrating Eq. 5 (learned temperature).

  ``dgamma/dbeta = -2 beta gamma / (beta'^2 (1 - gamma^2))``:

  * ``exp``: ``beta = beta0 sqrt(gamma0/gamma) exp((gamma^2 - gamma0^2)/4)`` (Eq. 6);
  * ``exp_scaled`` (``beta' = beta/s``): the same with exponents divided by ``s^2``;
  * ``linear`` (``beta' = 1``): ``beta^2 = beta0^2 + log(gamma0/gamma) +
    (gamma^2 - gamma0^2)/2``.

  ``softplus`` has no closed form (use :func:`lemma31_ratio`). Holds for any ``Z(t)``
  (free or frozen features), not under time schedules.
  """
  gamma = jnp.abs(gamma)
  gamma0 = jnp.abs(gamma0)
  if parameterization in ("exp", "exp_scaled"):
    s2 = 1.0 if parameterization == "exp" else scale**2
    return beta0 * (gamma0 / gamma) ** (0.5 / s2) * jnp.exp((gamma**2 - gamma0**2) / (4 * s2))
  if parameterization == "linear":
    return jnp.sqrt(beta0**2 + jnp.log(gamma0 / gamma) + (gamma**2 - gamma0**2) / 2)
  raise ValueError(f"lemma31_beta: no closed form for parameterisation "
                   f"{parameterization!r}; expected one of ('exp', 'exp_scaled', 'linear')")


def lemma31_residual(beta, gamma, *, beta0, gamma0, parameterization: str = "exp",
                     scale: float = 1.0):
  """``lemma31_beta(gamma) / beta - 1`` (zero along any exact trajectory)."""
  return lemma31_beta(gamma, beta0=beta0, gamma0=gamma0, parameterization=parameterization,
                      scale=scale) / beta - 1.0


def lemma31_ratio(nu, gamma, param):
  """``R = (dgamma/dt) / (dbeta/dt) = -2 beta gamma / (beta'^2 (1 - gamma^2))`` (Eq. 5)."""
  return -2.0 * param.beta(nu) * gamma / (param.dbeta(nu) ** 2 * (1.0 - gamma**2))
