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


# ------------------------------------------------------------ as a solver of integrate.solve
def _flow(n, d, lift, seed=0):
  rng = np.random.default_rng(seed)
  u0, v0 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  cfg = flows.FlowConfig(lift=lift)
  return flows.feature_vector_field(cfg), flows.initial_state(cfg, u0, v0, tau0=0.07,
                                                              gamma0=0.3)


def test_integrate_solve_rkc2_saves_the_trajectory_as_diffrax():
  field, y0 = _flow(16, 6, "sin_phi")
  ts = np.geomspace(0.1, 1e3, 7)
  got = integrate.solve(field, y0, {}, t1=1e3, ts=ts, rtol=1e-9, atol=1e-12, solver="rkc2")
  ref = integrate.solve(field, y0, {}, t1=1e3, ts=ts, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(got.ts, ts, rtol=1e-12)
  for k in ("u", "v", "nu", "phi"):
    np.testing.assert_allclose(got.ys[k], ref.ys[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(got.y_end[k], ref.y_end[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(got.t_end) == pytest.approx(1e3) and not bool(got.exited)
  assert int(got.num_rhs) > int(got.num_steps) > 0
  # flow time (log_time=False) agrees too
  lin = integrate.solve(field, y0, {}, t1=50.0, ts=[5.0, 50.0], log_time=False, rtol=1e-8,
                        atol=1e-11, solver="rkc2")
  ref = integrate.solve(field, y0, {}, t1=50.0, ts=[5.0, 50.0], rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(lin.ys["u"], ref.ys["u"], rtol=1e-5, atol=1e-6)


def test_integrate_solve_rkc2_gamma_exit_slots_and_failures():
  """The raw flow at n=64, d=16 leaves [-1, 1] (docs/methods/modality_gap.md): rkc2 stops there, fills the
  save slots as diffrax does, and check_exit raises; a spent step budget raises."""
  field, y0 = _flow(64, 16, "gamma")
  ts = [0.1, 1.0, 10.0, 100.0, 1e3]
  kw = dict(t1=1e3, ts=ts, rtol=1e-6, atol=1e-9, gamma_fn=lambda y: y["gamma"])
  got = integrate.solve(field, y0, {}, solver="rkc2", **kw)
  assert bool(got.exited) and abs(float(got.y_end["gamma"])) >= 1.0
  t_end = float(got.t_end)
  # a tight solve without the event: the crossing (t ~ 0.163) lies within 0.01 before the
  # step end where rkc2 stopped (diffrax's Tsit5 at the same tolerance stops at 0.174)
  ref = integrate.solve(field, y0, {}, t1=t_end, ts=[t_end - 0.01, t_end], rtol=1e-10,
                        atol=1e-13)
  assert abs(float(ref.ys["gamma"][0])) < 1.0 <= abs(float(ref.ys["gamma"][1]))
  t_slots = np.asarray(got.ts)
  reached = np.asarray(ts) < t_end
  np.testing.assert_allclose(t_slots[reached], np.asarray(ts)[reached], rtol=1e-12)
  k = int(np.sum(reached))            # the first unreached slot holds the exit
  assert t_slots[k] == pytest.approx(t_end) and np.all(np.isinf(t_slots[k + 1:]))
  np.testing.assert_allclose(got.ys["gamma"][k], got.y_end["gamma"])
  with pytest.raises(integrate.GammaExitError, match="sin_phi"):
    integrate.check_exit(got)

  field, y0 = _flow(8, 4, "sin_phi")
  with pytest.raises(Exception, match="max_steps"):
    jax.block_until_ready(integrate.solve(field, y0, {}, t1=1e3, solver="rkc2", max_steps=5))
  out = integrate.solve(field, y0, {}, t1=1e3, ts=[1.0, 1e3], solver="rkc2", max_steps=5,
                        throw=False)
  assert float(out.t_end) < 1e3 and not bool(out.exited) and np.isinf(float(out.ts[1]))
  with pytest.raises(ValueError, match="checkpoints"):
    integrate.solve(field, y0, {}, t1=1.0, solver="rkc2", checkpoints=10)
  with pytest.raises(ValueError, match="rkc2"):
    integrate.solve(field, y0, {}, t1=1.0, solver="rk45")
