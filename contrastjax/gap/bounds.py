"""The explicit bounds of Theorems 3.2 and 3.3 (Yaras et al. 2025, App. B.3-B.4).

Closed-form numbers (NumPy/SciPy): they are compared with simulations, not simulated.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special


# ============================================================================ Thm 3.2
@dataclasses.dataclass(frozen=True)
class Thm32Constants:
  c1: float
  c2: float
  c3: float
  c4: float
  beta0_min: float        # log(4(n-1)) / (alpha (1 - gamma0^2))
  assumptions_hold: bool  # beta0 >= beta0_min and c4 > 0


def thm32_constants(*, alpha: float, n: int, beta0: float, gamma0: float) -> Thm32Constants:
  """Constants of the proof of Theorem 3.2 (App. B.3).

  ``c1 = 2 alpha (n-1) beta0 sqrt(gamma0)``,
  ``c2 = alpha beta0 sqrt(gamma0) (1 - gamma0^2) exp(-gamma0^2/4)``,
  ``c3 = 55 c1 / 2``, ``c4 = c2 - 1/10``.
  """
  if not alpha > 0:
    raise ValueError(f"thm32: the margin alpha must be > 0 (matched pairs), got {alpha!r}")
  if not 0 < gamma0 < 1:
    raise ValueError(f"thm32: gamma0 must be in (0, 1), got {gamma0!r}")
  c1 = 2.0 * alpha * (n - 1) * beta0 * math.sqrt(gamma0)
  c2 = alpha * beta0 * math.sqrt(gamma0) * (1 - gamma0**2) * math.exp(-gamma0**2 / 4)
  c3 = 55.0 * c1 / 2.0
  c4 = c2 - 0.1
  beta0_min = math.log(4 * (n - 1)) / (alpha * (1 - gamma0**2))
  return Thm32Constants(c1, c2, c3, c4, beta0_min, bool(beta0 >= beta0_min and c4 > 0))


def thm32_gamma_lower_bound(t, *, alpha: float, n: int, beta0: float, gamma0: float):
  """``gamma(t) >= c4^2 / log(c3 t + exp(c4/sqrt(gamma0)))^2``.

  The PDF prints ``c2`` in the numerator; ``c4^2`` is what its derivation gives (spec
  Sec. 1.6). ``Delta(t) >= 2 gamma(t)`` >= twice this. Valid under the theorem's
  assumptions (see :func:`thm32_constants`).
  """
  c = thm32_constants(alpha=alpha, n=n, beta0=beta0, gamma0=gamma0)
  t = np.asarray(t, dtype=np.float64)
  # log(c3 t + e^x) computed stably for large x.
  x = c.c4 / math.sqrt(gamma0)
  log_term = np.logaddexp(np.log(c.c3 * t + 1e-300), x)
  return c.c4**2 / log_term**2


# ============================================================================ Thm 3.3
def _log_gamma_prefactor(a, d):
  rho = (d - 2) / 2
  return special.gammaln(d / 2) + rho * np.log(2.0 / a)


def thm33_xi(a: float, d: int) -> tuple[float, float]:
  """``xi1 = E[z e^{az}]`` and ``xi2 = E[e^{az}]`` for the inner product ``z`` of two
  independent uniform points of ``S^{d-1}`` (Lemma B.3):
  ``xi2 = Gamma(d/2) (2/a)^rho I_rho(a)``, ``xi1 = Gamma(d/2) (2/a)^rho
  [I_{rho-1}(a) - (2 rho / a) I_rho(a)] = Gamma(d/2) (2/a)^rho I_{rho+1}(a)``,
  ``rho = (d-2)/2``. Computed with exponentially scaled Bessel functions.
  """
  if d < 2:
    raise ValueError(f"thm33: dimension d must be >= 2, got {d!r}")
  rho = (d - 2) / 2
  lp = _log_gamma_prefactor(a, d) + a
  xi2 = math.exp(lp + math.log(special.ive(rho, a)))
  xi1 = math.exp(lp + math.log(special.ive(rho + 1, a)))
  return xi1, xi2


def thm33_bessel_ratio(a: float, d: int) -> float:
  """``I_{rho+1}(a) / I_rho(a)`` (= ``xi1/xi2``)."""
  rho = (d - 2) / 2
  return float(special.ive(rho + 1, a) / special.ive(rho, a))


def thm33_dgamma_dt_limit(*, beta0: float, gamma0: float, d: int) -> float:
  """n -> infinity value of ``dgamma/dt`` at ``t = 0``:
  ``2 beta0 gamma0 I_{rho+1}(a) / I_rho(a)``, ``a = beta0 (1 - gamma0^2)``."""
  a = beta0 * (1 - gamma0**2)
  return 2.0 * beta0 * gamma0 * thm33_bessel_ratio(a, d)


def thm33_bound(*, beta0: float, gamma0: float, d: int, n: int | None = None,
                delta: float = 0.1) -> float:
  """Theorem 3.3's lower bound on ``dDelta/dt`` at ``t = 0`` (Eq. 8).

  Finite ``n``, with probability ``1 - delta``:
  ``4 beta0 gamma0 [(xi1 - 2 e^a eps) / (xi2 + (e^a - e^{-a}) eps) - 2 eps]``,
  ``eps = sqrt(log((4n+1)/delta) / (2n))``. ``n=None``: the limit
  ``4 beta0 gamma0 I_{rho+1}(a)/I_rho(a)``. The paper's step ``dDelta/dt >= 2 dgamma/dt``
  is loose (docs/methods/modality_gap.md, paper errata); read the bound as one on ``2 dgamma/dt``.
  """
  if n is None:
    return 2.0 * thm33_dgamma_dt_limit(beta0=beta0, gamma0=gamma0, d=d)
  if not 0 < delta < 1:
    raise ValueError(f"thm33: delta must be in (0, 1), got {delta!r}")
  a = beta0 * (1 - gamma0**2)
  xi1, xi2 = thm33_xi(a, d)
  eps = math.sqrt(math.log((4 * n + 1) / delta) / (2 * n))
  ea = math.exp(a)
  return 4.0 * beta0 * gamma0 * ((xi1 - 2 * ea * eps) / (xi2 + (ea - 1 / ea) * eps)
                                 - 2 * eps)
