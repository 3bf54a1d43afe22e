"""contrastjax.gap.rkc: the stabilised explicit RKC2 solver against exact solutions,
SciPy, diffrax, finite differences, and the benchmark harness at a small size."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate as sp_integrate

from contrastjax.gap import benchmark
from contrastjax.gap import flows
from contrastjax.gap import integrate
from contrastjax.gap import rkc


@pytest.fixture(scope="module", autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def test_chebyshev_values_match_numpy():
  s, w0 = 9, 1.0 + (2 / 13) / 81
  T, dT, ddT = (np.asarray(a) for a in rkc._chebyshev(jnp.int32(s), jnp.float64(w0), 12))
  cheb = np.polynomial.chebyshev.Chebyshev
  for j in range(s + 1):
    p = cheb.basis(j)
    np.testing.assert_allclose([T[j], dT[j], ddT[j]],
                               [p(w0), p.deriv(1)(w0), p.deriv(2)(w0)], rtol=1e-12, atol=1e-12)


def test_stiff_linear_problem_against_exact_solution():
  """Eigenvalues 1e-2..1e3 (stiffness ratio 1e5): the stage count rises to keep the
  steps stable, with fewer evaluations than SciPy's RK45 at the same tolerances (here
  accuracy, not stability, sets most steps: 6.0k vs 10.7k)."""
  lam = jnp.logspace(-2, 3, 40)
  y0 = jnp.linspace(1.0, 2.0, 40)
  r = jax.jit(lambda y: rkc.solve(lambda t, y: -lam * y, y, t1=5.0, rtol=1e-6,
                                  atol=1e-9))(y0)
  np.testing.assert_allclose(r.y, y0 * jnp.exp(-lam * 5.0), atol=2e-6)
  assert float(r.t) == 5.0
  assert int(r.max_stages) >= 4
  np.testing.assert_allclose(float(r.spectral_radius), 1.2e3, rtol=0.02)  # x1.2 safety
  sp = sp_integrate.solve_ivp(lambda t, y: -np.asarray(lam) * y, (0, 5.0), np.asarray(y0),
                              method="RK45", rtol=1e-6, atol=1e-9)
  assert int(r.num_fevals) < 0.8 * sp.nfev


def test_pytree_state_time_dependent_field_and_tolerance():
  f = lambda t, y: {"a": jnp.cos(t) * jnp.ones(2), "b": -y["b"]}
  y0 = {"a": jnp.zeros(2), "b": jnp.ones(1)}
  errs = []
  for rtol in (1e-5, 1e-8):
    r = rkc.solve(f, y0, t1=3.0, rtol=rtol, atol=rtol * 1e-2)
    errs.append(max(abs(float(r.y["a"][0]) - math.sin(3.0)),
                    abs(float(r.y["b"][0]) - math.exp(-3.0))))
  assert errs[1] < 5e-6 and errs[1] < errs[0] / 20  # tighter tolerance, smaller error


def test_full_flow_matches_diffrax_and_forward_mode_matches_finite_differences():
  rng = np.random.default_rng(0)
  u0, v0 = rng.standard_normal((24, 6)), rng.standard_normal((24, 6))
  cfg = flows.FlowConfig(lift="sin_phi")
  field = flows.feature_vector_field(cfg)

  def rkc_final(tau):
    y0 = flows.initial_state(cfg, jnp.asarray(u0), jnp.asarray(v0), tau0=tau, gamma0=0.3)
    return rkc.solve(lambda t, y: field(t, y, {}), y0, t1=300.0, rtol=1e-8, atol=1e-11)

  r = jax.jit(rkc_final)(0.07)
  y0 = flows.initial_state(cfg, jnp.asarray(u0), jnp.asarray(v0), tau0=0.07, gamma0=0.3)
  ref = integrate.solve(field, y0, {}, t1=300.0, rtol=1e-10, atol=1e-13).y_end
  for k in ("u", "v", "nu", "phi"):
    np.testing.assert_allclose(r.y[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)

  def final_nu(tau):
    return rkc_final(tau).y["nu"]
  _, tangent = jax.jvp(final_nu, (jnp.float64(0.07),), (jnp.float64(1.0),))
  eps = 1e-5
  fd = (final_nu(0.07 + eps) - final_nu(0.07 - eps)) / (2 * eps)
  np.testing.assert_allclose(float(tangent), float(fd), rtol=1e-3)


def test_benchmark_harness_small_full_flow():
  out = benchmark.full_flow(16, 4, 200.0, rtol=1e-6, atol=1e-9, scipy_methods=("RK45",),
                            with_grad=False, log=lambda *_: None)
  rk, sp = out["jax_rkc2"], out["scipy"]["RK45"]
  assert rk["max_feature_diff_vs_tsit5"] < 1e-4
  assert sp["max_feature_diff_vs_rkc2"] < 1e-4 and sp["max_feature_diff_vs_tsit5"] < 1e-4
  assert rk["nfev"] > 0 and rk["num_steps"] > 0 and sp["speedup_of_rkc2"] > 0


def test_non_finite_field_stops_the_solve_early():
  r = rkc.solve(lambda t, y: jnp.where(t > 1.0, jnp.nan, -y), jnp.ones(3), t1=10.0)
  assert float(r.t) < 10.0 and float(r.t) >= 0.0
  r = rkc.solve(lambda t, y: -y, jnp.ones(3), t1=10.0, max_steps=5)
  assert int(r.num_steps) + int(r.num_rejected) == 5 and float(r.t) < 10.0
