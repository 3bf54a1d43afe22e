"""contrastjax.gap: the modality-gap dynamics against independently computed numbers
(docs/methods/modality_gap.md, "Numbers the tests check": an independent LSODA solve of
the scalar model) and independent NumPy/SciPy computations. float64 only inside this module."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate as sp_integrate
from scipy import linalg as sp_linalg
from scipy import special

from contrastjax.gap import bounds
from contrastjax.gap import flows
from contrastjax.gap import integrate
from contrastjax.gap import liang_toy
from contrastjax.gap import measures
from contrastjax.gap import numpy_ref
from contrastjax.gap import simulate

CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "gap_dynamics.py")


@pytest.fixture(scope="module", autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _fig2_features():
  rng = np.random.default_rng(0)
  return rng.standard_normal((8, 2)), rng.standard_normal((8, 2))


FIG2_TS = np.array([0.1, 0.4, 1.0, 2.3, 4.0, 10.0, 1e2, 1e3, 1e4, 1e5])


def _measure(cfg, traj):
  hx = flows.normalize(traj.ys["u"])
  hy = flows.normalize(traj.ys["v"])
  gamma = flows.gamma_of(cfg, traj.ys)
  gap = jax.vmap(measures.gap)(hx, hy, gamma)
  margin = jax.vmap(measures.margin)(jnp.einsum("tid,tjd->tij", hx, hy))
  return np.asarray(gap), np.asarray(gamma), np.asarray(margin)


def _config(variant, **overrides):
  spec = importlib.util.spec_from_file_location("gap_dynamics", CONFIG_PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(variant)
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def fig2(x64):
  """Spec 4C reconstruction through the simulator: n=8, d=2, tau0=0.1, gamma0=0.3,
  beta = e^nu, to 1e5, saved at the reference times."""
  res = simulate.run(_config("fig2", num_save=2, t_min=0.1, snapshot_times=tuple(FIG2_TS),
                             rtol=1e-10, atol=1e-12, progress=False))
  t = np.asarray(res["t"])
  idx = [int(np.argmin(np.abs(t - x))) for x in FIG2_TS]
  np.testing.assert_allclose(t[idx], FIG2_TS, rtol=1e-12)
  get = lambda k: np.asarray(res[k], float)[idx]
  return dict(res=res, gap=get("gap"), gamma=get("gamma"), margin=get("margin"),
              beta=get("beta"), residual=get("lemma31_residual"))


# ============================================================================ feature flow (Fig. 2)
def test_fig2_reconstruction_rises_then_falls(fig2):
  gap, tau = fig2["gap"], 1 / fig2["beta"]
  # Fig. 2 reconstruction (docs/methods/modality_gap.md): Delta 1.798 / tau 0.145 at t = 0.4, Delta 0.022 / tau 0.012 at 1e5
  np.testing.assert_allclose(gap[[1, 5, 9]], [1.798, 0.077, 0.022], rtol=0.02)
  np.testing.assert_allclose(tau[[1, 9]], [0.145, 0.012], rtol=0.02)
  peak = int(np.argmax(gap))
  assert gap[peak] > 2 * 0.676 and 0 < peak < 4          # rises from 0.676 ...
  assert np.all(np.diff(gap[peak:]) < 0)                  # ... then falls
  assert fig2["margin"][0] < 0 and np.all(fig2["margin"][5:] > 0)  # matched by t=10
  assert np.all(gap >= 2 * np.abs(fig2["gamma"]) - 1e-12)  # Delta >= 2 gamma


def test_lemma31_invariant_along_full_flow(fig2):
  res = measures.lemma31_residual(fig2["beta"], fig2["gamma"], beta0=10.0, gamma0=0.3)
  assert np.max(np.abs(res)) < 1e-6, res
  assert np.max(np.abs(fig2["residual"])) < 1e-6
  assert np.max(np.abs(np.asarray(fig2["res"]["lemma31_residual"]))) < 1e-6


def test_simulator_outputs(fig2, tmp_path):
  res = fig2["res"]
  assert res["thm32"]["holds"] and not res["exited"]
  simulate.write_outputs(dict(res, config={}), str(tmp_path))
  for name in ("trajectory.json", "dynamics.png", "snapshots.png"):
    assert (tmp_path / name).stat().st_size > 1000, name
  data = json.loads((tmp_path / "trajectory.json").read_text())
  assert set(data["snapshots"]) >= {"0.4", "100000"}
  assert len(data["t"]) == len(data["gap"]) == len(data["uniformity"])
  assert all(-2 < u < 0 for u in data["uniformity"])


def test_thm32_bound_holds_after_matching(fig2):
  k = 5  # t = 10: matched, and the theorem's beta0 condition holds there
  alpha = float(fig2["margin"][k:].min())
  cst = bounds.thm32_constants(alpha=alpha, n=8, beta0=fig2["beta"][k],
                               gamma0=fig2["gamma"][k])
  assert cst.assumptions_hold, cst
  lb = bounds.thm32_gamma_lower_bound(FIG2_TS[k:] - FIG2_TS[k], alpha=alpha, n=8,
                                      beta0=fig2["beta"][k], gamma0=fig2["gamma"][k])
  np.testing.assert_allclose(lb[0], fig2["gamma"][k], rtol=1e-12)  # tight at t_m
  assert np.all(fig2["gamma"][k + 1:] >= lb[1:]) and lb[-1] > 0


def test_softplus_closes_gap_by_t100(x64):
  cfg = flows.FlowConfig(parameterization="softplus")
  u0, v0 = _fig2_features()
  y0 = flows.initial_state(cfg, u0, v0, tau0=0.1, gamma0=0.3)
  traj = integrate.solve(flows.feature_vector_field(cfg), y0, {}, t1=100.0,
                         ts=[0.4, 10.0, 100.0], gamma_fn=lambda y: y["gamma"])
  gap, _, _ = _measure(cfg, traj)
  assert gap[0] > 1.5 and gap[-1] < 1e-3, gap


# ============================================================================ scalar model
# gamma and beta of the Sec. 3.1 scalar model (beta0 = 2, gamma0 = 0.5, beta = e^nu) at
# these times, from a LSODA solve at rtol 1e-10 (docs/methods/modality_gap.md).
REF_T = [1e2, 1e4, 1e8]
REF_GAMMA = [2.39e-2, 8.54e-3, 2.88e-3]
REF_BETA = [8.59, 14.38, 24.75]


def test_scalar_model_matches_reference_values_and_lsoda(x64):
  cfg = flows.FlowConfig()
  y0 = flows.scalar_state(cfg, beta0=2.0, gamma0=0.5)
  ts = np.array([1e1, 1e2, 1e3, 1e4, 1e6, 1e8, 1e10, 1e12])
  traj = integrate.solve(flows.scalar_vector_field(cfg), y0, {}, t1=1e12, ts=ts,
                         rtol=1e-10, atol=1e-12)
  gamma, beta = np.asarray(traj.ys["gamma"]), np.exp(np.asarray(traj.ys["nu"]))
  sel = [1, 3, 5]
  np.testing.assert_allclose(gamma[sel], REF_GAMMA, rtol=0.01)
  np.testing.assert_allclose(beta[sel], REF_BETA, rtol=0.01)
  ref = sp_integrate.solve_ivp(numpy_ref.scalar_rhs, (0, 1e12), [math.log(2), 0.5],
                               method="LSODA", rtol=1e-11, atol=1e-14, t_eval=ts)
  np.testing.assert_allclose(gamma, ref.y[1], rtol=1e-5)
  np.testing.assert_allclose(beta, np.exp(ref.y[0]), rtol=1e-5)
  gl2 = gamma * np.log(ts) ** 2  # creeps from 0.34 to 1.12 (the 1/log^2 t rate)
  assert abs(gl2[0] - 0.34) < 0.02 and abs(gl2[-1] - 1.12) < 0.02
  res = measures.lemma31_residual(beta, gamma, beta0=2.0, gamma0=0.5)
  assert np.max(np.abs(res)) < 1e-6


@pytest.mark.parametrize("name,scale", [("exp", 1.0), ("exp_scaled", 2.0),
                                        ("exp_scaled", 10.0), ("linear", 1.0)])
@pytest.mark.parametrize("model", ["scalar", "closed"])
def test_lemma31_closed_forms_are_conserved(x64, name, scale, model):
  """d/dt [beta_pred(gamma) - beta(nu)] = 0 under the vector field, at random states."""
  cfg = flows.FlowConfig(parameterization=name, scale=scale)
  rng = np.random.default_rng(4)
  Z = np.asarray(measures.similarity(rng.standard_normal((5, 3)),
                                     rng.standard_normal((5, 3))))
  field = (flows.scalar_vector_field(cfg) if model == "scalar"
           else flows.closed_vector_field(cfg))
  for beta0, gamma0 in [(2.0, 0.5), (7.0, 0.05), (1.3, 0.9)]:
    y = flows.scalar_state(cfg, beta0=beta0, gamma0=gamma0)
    dy = field(0.0, y, dict(Z=Z))
    pred = lambda g: measures.lemma31_beta(g, beta0=beta0, gamma0=gamma0,
                                           parameterization=name, scale=scale)
    np.testing.assert_allclose(pred(gamma0), beta0, rtol=1e-12)
    d_pred = jax.jvp(pred, (y["gamma"],), (dy["gamma"],))[1]
    d_beta = cfg.param.dbeta(y["nu"]) * dy["nu"]
    np.testing.assert_allclose(d_pred, d_beta, rtol=1e-10, atol=1e-300)


def test_fixed_beta_decay_rate(x64):
  beta0 = 5.0
  cfg = flows.FlowConfig(temperature="schedule", schedule="fixed")
  y0 = flows.scalar_state(cfg, beta0=beta0, gamma0=0.01)
  traj = integrate.solve(flows.scalar_vector_field(cfg), y0, dict(tau0=1 / beta0),
                         t1=60.0, ts=[20.0, 60.0], log_time=False, rtol=1e-11,
                         atol=1e-14)
  g = np.asarray(traj.ys["gamma"])
  rate = -(np.log(g[1]) - np.log(g[0])) / 40.0
  np.testing.assert_allclose(rate, 2 * beta0 * math.exp(-beta0), rtol=1e-3)  # 0.0674


def test_linear_closes_fast(x64):
  for name in ("linear",):
    cfg = flows.FlowConfig(parameterization=name)
    y0 = flows.scalar_state(cfg, beta0=2.0, gamma0=0.5)
    traj = integrate.solve(flows.scalar_vector_field(cfg), y0, {}, t1=100.0,
                           rtol=1e-10, atol=1e-16)
    assert float(traj.ys["gamma"][-1]) < 1e-8, name


# ============================================================================ bounds (Thm 3.2, 3.3)
@pytest.mark.parametrize("d", [3, 16])
def test_thm33_initial_gamma_rate_vs_bessel(x64, d):
  n, beta0, gamma0 = 4000, 1 / 0.07, 0.5
  rng = np.random.default_rng(d)
  hx, hy = rng.standard_normal((n, d)), rng.standard_normal((n, d))

  @jax.jit
  def rates(hx, hy):
    Z = flows.normalize(hx) @ flows.normalize(hy).T
    dgamma = -jax.grad(lambda g: flows.symmetric_ce(beta0 * (1 - g**2) * Z))(gamma0)
    return dgamma, -2 * beta0 * gamma0 * flows.g_a(Z, beta0 * (1 - gamma0**2))
  dgamma, closed = rates(hx, hy)
  np.testing.assert_allclose(dgamma, closed, rtol=1e-10)  # Eq. 11's closed form
  pred = bounds.thm33_dgamma_dt_limit(beta0=beta0, gamma0=gamma0, d=d)
  assert float(dgamma) > 0
  np.testing.assert_allclose(float(dgamma), pred, rtol=0.03)
  # d = 3 closed form: I_{3/2}/I_{1/2} = coth a - 1/a
  a = beta0 * (1 - gamma0**2)
  if d == 3:
    np.testing.assert_allclose(bounds.thm33_bessel_ratio(a, 3), 1 / math.tanh(a) - 1 / a,
                               rtol=1e-12)


def test_thm33_xi_and_finite_n_bound(x64):
  # xi1, xi2 against direct quadrature of the density of Lemma B.2
  for d, a in [(3, 1.5), (16, 10.7)]:
    c = math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d - 1) / 2))
    dens = lambda z: c * (1 - z * z) ** ((d - 3) / 2)
    xi2 = sp_integrate.quad(lambda z: dens(z) * math.exp(a * z), -1, 1)[0]
    xi1 = sp_integrate.quad(lambda z: z * dens(z) * math.exp(a * z), -1, 1)[0]
    np.testing.assert_allclose(bounds.thm33_xi(a, d), (xi1, xi2), rtol=1e-8)
  # finite-n bound: below the sampled 2 dgamma/dt, tends to the limit as n grows
  beta0, gamma0, d, n = 2.0, 0.5, 3, 4000
  b = bounds.thm33_bound(beta0=beta0, gamma0=gamma0, d=d, n=n, delta=0.1)
  lim = bounds.thm33_bound(beta0=beta0, gamma0=gamma0, d=d)
  rng = np.random.default_rng(1)
  hx = rng.standard_normal((n, d))
  hy = rng.standard_normal((n, d))
  hx /= np.linalg.norm(hx, axis=1, keepdims=True)
  hy /= np.linalg.norm(hy, axis=1, keepdims=True)
  a = beta0 * (1 - gamma0**2)
  dgamma = -2 * beta0 * gamma0 * numpy_ref_g(hx @ hy.T, a)
  assert 0 < b < 2 * float(dgamma)
  assert abs(bounds.thm33_bound(beta0=beta0, gamma0=gamma0, d=d, n=10**12) - lim) < 1e-3
  # limit expression 4 b0 g0 I_{rho+1}/I_rho with scipy.special.iv directly
  a = beta0 * (1 - gamma0**2)
  np.testing.assert_allclose(lim, 4 * beta0 * gamma0 * special.iv(1.5, a) / special.iv(0.5, a))


def numpy_ref_g(Z, a):
  return -np.sum(Z * numpy_ref.loss_grad_matrix(a * Z))


# ============================================================================ Liang et al. toy
def test_liang_toy_argmin_table(x64):
  table = liang_toy.argmin_table()
  for s in liang_toy.SCALES:
    assert abs(abs(table[False][s]) - 0.0101) < 1e-3
  expected = {1.0: 0.0101, 5.0: 0.0101, 10.0: 0.0101, 50.0: 0.717, 100.0: 0.859,
              500.0: 0.980, 1000.0: 0.980}
  for s, z in expected.items():
    assert abs(abs(table[True][s]) - z) < 2e-3, (s, table[True][s])
  # independent NumPy loss at one point (Liang's CE with labels 3 and 8 swapped)
  img, txt = (np.asarray(p) for p in liang_toy.toy_points(0.5))
  M = 50.0 * img @ txt.T
  lab = np.arange(9)
  lab[[3, 8]] = lab[[8, 3]]
  ce = lambda m: np.mean(special.logsumexp(m, axis=1) - m[np.arange(9), lab])
  np.testing.assert_allclose(liang_toy.toy_loss(0.5, 50.0, True), (ce(M) + ce(M.T)) / 2,
                             rtol=1e-12)


# ============================================================================ measures
def test_gap_margin_uniformity_vs_numpy(x64):
  rng = np.random.default_rng(3)
  hx = rng.standard_normal((20, 5))
  hx /= np.linalg.norm(hx, axis=1, keepdims=True)
  hy = rng.standard_normal((20, 5))
  hy /= np.linalg.norm(hy, axis=1, keepdims=True)
  gamma = 0.37
  np.testing.assert_allclose(measures.gap(hx, hy, gamma), numpy_ref.gap(hx, hy, gamma),
                             rtol=1e-12)
  assert float(measures.gap(hx, hy, gamma)) >= 2 * gamma
  Z = hx @ hy.T
  ref = min(min(Z[i, i] - Z[i, j], Z[j, j] - Z[i, j])
            for i in range(20) for j in range(20) if i != j)
  np.testing.assert_allclose(measures.margin(Z), ref, rtol=1e-12)
  # Fang et al.: -W2(N(mu, Sigma), N(0, I/m)) with the matrix square root
  lx, ly = (np.asarray(a) for a in measures.lifted(hx, hy, gamma))
  F = np.vstack([lx, ly])
  m = F.shape[1]
  mu, cov = F.mean(0), np.cov(F.T, bias=True)
  w2 = math.sqrt(mu @ mu + 1 + np.trace(cov)
                 - 2 / math.sqrt(m) * np.trace(sp_linalg.sqrtm(cov)).real)
  np.testing.assert_allclose(measures.uniformity(hx, hy, gamma), -w2, rtol=1e-8)
  # generic W2 between Gaussians: sqrt(|mu|^2 + tr S1 + tr S2 - 2 tr (S2^1/2 S1 S2^1/2)^1/2)
  s2 = np.eye(m) / m
  r = sp_linalg.sqrtm(s2)
  w2_generic = math.sqrt(mu @ mu + np.trace(cov) + 1 - 2 * np.trace(
      sp_linalg.sqrtm(r @ cov @ r)).real)
  np.testing.assert_allclose(w2, w2_generic, rtol=1e-8)


def test_margin_with_mismatch_pattern(x64):
  img, txt = (np.asarray(p) for p in liang_toy.toy_points(0.3))
  Z = img @ txt.T
  assert float(measures.margin(Z)) > 0
  assert float(measures.margin(Z, liang_toy.toy_targets(True))) < 0


# ============================================================================ flows
@pytest.mark.parametrize("lift", ["gamma", "sin_phi"])
def test_jax_grad_field_matches_numpy_gradient(x64, lift):
  n, d = 7, 4
  rng = np.random.default_rng(1)
  u0, v0 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  cfg = flows.FlowConfig(lift=lift)
  y = flows.initial_state(cfg, u0, v0, tau0=0.2, gamma0=0.4)
  dy = jax.jit(flows.feature_vector_field(cfg))(0.0, y, {})
  key = "phi" if lift == "sin_phi" else "gamma"
  flat = np.concatenate([u0.ravel(), v0.ravel(), [float(y["nu"]), float(y[key])]])
  got = np.concatenate([np.ravel(dy["u"]), np.ravel(dy["v"]), [dy["nu"], dy[key]]])
  for shared_exp in (False, True):  # the benchmark's SciPy baseline uses shared_exp
    ref = numpy_ref.feature_rhs(n, d, lift, shared_exp=shared_exp)(0.0, flat)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cfg_kw,tau0", [
    (dict(lift="gamma"), 0.2),
    (dict(lift="sin_phi", parameterization="softplus"), 0.07),
    (dict(targets=(1, 0, 2, 3, 4, 6, 5), parameterization="exp_scaled", scale=2.0), 0.1),
    (dict(temperature="schedule", schedule="linear"), 0.05),
    (dict(train_features=False), 0.3),
    # beta = 1000: similarities spread over 2000 > the shared-exp limit -> two-pass path
    (dict(lift="sin_phi"), 1e-3),
])
def test_closed_form_field_equals_autodiff_field(x64, cfg_kw, tau0):
  n, d = 7, 5
  rng = np.random.default_rng(3)
  u0, v0 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  cfg = flows.FlowConfig(**cfg_kw)
  args = dict(tau0=tau0, tau1=0.5, horizon=10.0) if cfg.temperature == "schedule" else {}
  y = flows.initial_state(cfg, u0, v0, tau0=tau0, gamma0=0.4)
  closed = jax.jit(flows.feature_vector_field(cfg))(2.0, y, args)
  auto = jax.jit(flows.feature_vector_field(cfg, autodiff=True))(2.0, y, args)
  assert set(closed) == set(auto)
  for k in auto:
    np.testing.assert_allclose(closed[k], auto[k], rtol=1e-9, atol=1e-12, err_msg=k)
  # Its own derivative (what a gradient through a solve uses) matches too.
  def final(field):
    return lambda u: jnp.sum(field(0.5, dict(y, u=u), args)["v"] ** 2)
  np.testing.assert_allclose(jax.grad(final(flows.feature_vector_field(cfg)))(y["u"]),
                             jax.grad(final(flows.feature_vector_field(
                                 cfg, autodiff=True)))(y["u"]), rtol=1e-8, atol=1e-11)


def test_shared_softmax_matches_two_pass_in_float32():
  rng = np.random.default_rng(4)
  M = jnp.asarray(rng.standard_normal((9, 9)) * 20, jnp.float32)
  col, row = flows.softmax_pair(M)
  np.testing.assert_allclose(col, jax.nn.softmax(M, axis=0), rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(row, jax.nn.softmax(M, axis=1), rtol=2e-6, atol=1e-7)
  wide = M * 10  # spread ~ 1000 > 80: the shared exp would underflow rows in float32
  col, row = flows.softmax_pair(wide)
  assert np.all(np.isfinite(np.asarray(col))) and np.all(np.isfinite(np.asarray(row)))
  np.testing.assert_allclose(row.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(col, jax.nn.softmax(wide, axis=0), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["exp", "softplus"])
def test_closed_eq11_matches_frozen_feature_flow(x64, name):
  rng = np.random.default_rng(2)
  u0, v0 = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
  targets = (1, 0, 2, 3, 5, 4)
  full = flows.FlowConfig(parameterization=name, train_features=False, targets=targets)
  y = flows.initial_state(full, u0, v0, tau0=0.3, gamma0=0.2)
  dy = jax.jit(flows.feature_vector_field(full))(0.0, y, {})
  Z = measures.similarity(u0, v0)
  dz = jax.jit(flows.closed_vector_field(full))(0.0, dict(nu=y["nu"], gamma=y["gamma"]),
                                                dict(Z=Z))
  np.testing.assert_allclose([dy["nu"], dy["gamma"]], [dz["nu"], dz["gamma"]],
                             rtol=1e-10)
  assert not np.any(np.asarray(dy["u"]))


def test_gamma_exit_is_detected_and_sin_phi_stays_inside(x64):
  """Spec Sec. 7: n=64, d=16, tau0=0.07, gamma0=0.3 -- the raw flow leaves [-1, 1]."""
  rng = np.random.default_rng(0)
  u0, v0 = rng.standard_normal((64, 16)), rng.standard_normal((64, 16))
  raw = flows.FlowConfig()
  traj = integrate.solve(flows.feature_vector_field(raw),
                         flows.initial_state(raw, u0, v0, tau0=0.07, gamma0=0.3), {},
                         t1=1e3, rtol=1e-6, atol=1e-9, gamma_fn=lambda y: y["gamma"])
  assert bool(traj.exited) and 0 < float(traj.t_end) < 1e3
  assert abs(float(traj.y_end["gamma"])) >= 1.0
  with pytest.raises(integrate.GammaExitError, match="sin_phi"):
    integrate.check_exit(traj)
  sp = flows.FlowConfig(lift="sin_phi")
  traj = integrate.solve(flows.feature_vector_field(sp),
                         flows.initial_state(sp, u0, v0, tau0=0.07, gamma0=0.3), {},
                         t1=100.0, ts=[1.0, 10.0, 100.0], rtol=1e-6, atol=1e-9)
  gamma = np.sin(np.asarray(traj.ys["phi"]))
  assert not bool(traj.exited) and np.all(np.abs(gamma) < 1)


# ============================================================================ gradients
def test_gradients_through_simulator_match_finite_differences(x64):
  """d Delta(T) / d (initial temperature = schedule tau0, schedule tau1, initial feature)
  by reverse mode through diffrax vs central differences; the learned-temperature case
  through the scalar model (d gamma(T) / d beta0)."""
  u0, v0 = _fig2_features()
  T = 5.0
  cfg = flows.FlowConfig(temperature="schedule", schedule="linear")

  def final_gap(p):
    y0 = flows.initial_state(cfg, p["u"], v0, tau0=p["tau0"], gamma0=0.3)
    args = dict(tau0=p["tau0"], tau1=p["tau1"], horizon=T)
    traj = integrate.solve(flows.feature_vector_field(cfg), y0, args, t1=T,
                           rtol=1e-11, atol=1e-13, max_steps=4096)
    y = traj.y_end
    return measures.gap(flows.normalize(y["u"]), flows.normalize(y["v"]), y["gamma"])

  f = jax.jit(final_gap)
  p = dict(u=jnp.asarray(u0), tau0=jnp.asarray(0.1), tau1=jnp.asarray(0.3))
  grad = jax.jit(jax.grad(final_gap))(p)
  h = 1e-5
  for key, pick in (("tau0", ()), ("tau1", ()), ("u", (2, 1))):
    e = jnp.zeros_like(p[key]).at[pick].set(h)
    fd = (f(dict(p, **{key: p[key] + e})) - f(dict(p, **{key: p[key] - e}))) / (2 * h)
    np.testing.assert_allclose(grad[key][pick], fd, rtol=1e-4, err_msg=key)

  # learned temperature: forward mode (diffrax.ForwardMode) through the scalar model
  scfg = flows.FlowConfig()
  def final_gamma(beta0):
    traj = integrate.solve(flows.scalar_vector_field(scfg),
                           flows.scalar_state(scfg, beta0=beta0, gamma0=0.5), {},
                           t1=1e4, rtol=1e-11, atol=1e-14, max_steps=4096,
                           forward_mode=True)
    return traj.y_end["gamma"]
  g = jax.jacfwd(final_gamma)(2.0)
  fd = (final_gamma(2.0 + h) - final_gamma(2.0 - h)) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=1e-4)


# ============================================================================ errors
def test_bad_names_give_clear_errors(x64):
  with pytest.raises(ValueError, match="expected one of"):
    flows.FlowConfig(parameterization="cosh")
  with pytest.raises(ValueError, match="lift"):
    flows.FlowConfig(lift="tan")
  with pytest.raises(ValueError, match="schedule"):
    flows.FlowConfig(schedule="warmup")
  with pytest.raises(ValueError, match="permutation"):
    flows.FlowConfig(targets=(0, 0, 1))
  with pytest.raises(ValueError, match="solver"):
    integrate.make_solver("euler2")
  with pytest.raises(ValueError, match="needs args"):
    flows.check_schedule_args(flows.FlowConfig(temperature="schedule", schedule="linear"),
                              dict(tau1=0.1, horizon=1.0))
  with pytest.raises(ValueError, match="no closed form"):
    measures.lemma31_beta(0.1, beta0=1.0, gamma0=0.2, parameterization="softplus")
  with pytest.raises(ValueError, match="alpha"):
    bounds.thm32_constants(alpha=-0.1, n=8, beta0=10.0, gamma0=0.3)


def test_schedules_and_knots(x64):
  """The flow's schedules: paper TS shapes from temperature.py, and the optimiser's
  piecewise-linear log tau in log(1 + t)."""
  from contrastjax.gap import schedule_opt
  knots = jnp.log(jnp.array([0.01, 0.02, 0.05]))
  T = 99.0
  s = np.log1p(T)
  np.testing.assert_allclose(flows.knots_tau(0.0, knots, T), 0.01, rtol=1e-12)
  np.testing.assert_allclose(flows.knots_tau(np.expm1(s / 2), knots, T), 0.02, rtol=1e-12)
  np.testing.assert_allclose(flows.knots_tau(np.expm1(s / 4), knots, T),
                             math.sqrt(0.01 * 0.02), rtol=1e-12)
  np.testing.assert_allclose(flows.knots_tau(1e6, knots, T), 0.05, rtol=1e-12)
  prob = schedule_opt.Problem(u0=np.zeros((2, 2)), v0=np.zeros((2, 2)))
  theta = schedule_opt.log_tau_to_knots(jnp.log(jnp.array([0.011, 0.03, 0.049])), prob)
  np.testing.assert_allclose(jnp.exp(schedule_opt.knots_to_log_tau(theta, prob)),
                             [0.011, 0.03, 0.049], rtol=1e-9)
  cos = flows.FlowConfig(temperature="schedule", schedule="cosine")
  args = dict(tau0=0.01, tau1=0.04, period=20.0)
  np.testing.assert_allclose(1 / flows.schedule_beta(cos, 10.0, args), 0.04, rtol=1e-12)
  np.testing.assert_allclose(1 / flows.schedule_beta(cos, 20.0, args), 0.01, rtol=1e-12)
  # under a schedule nu does not move and beta is 1/tau(t)
  cfg = flows.FlowConfig(temperature="schedule", schedule="knots")
  rng = np.random.default_rng(0)
  y = flows.initial_state(cfg, rng.standard_normal((4, 2)), rng.standard_normal((4, 2)),
                          tau0=0.01, gamma0=0.2)
  dy = jax.jit(flows.feature_vector_field(cfg))(3.0, y, dict(log_tau_knots=knots,
                                                             horizon=T))
  assert float(dy["nu"]) == 0.0 and float(dy["gamma"]) != 0.0


def test_schedule_optimizer_lowers_its_objective_and_keeps_the_best_feasible(x64):
  """``schedule_opt.optimize`` (the notebook's schedule search, which its CI run skips):
  Adam on the knots lowers the objective it reports; every history record equals an
  independent evaluation of its knots; ``best`` is the feasible record of least gap."""
  from contrastjax.gap import schedule_opt
  rng = np.random.default_rng(0)
  # Tight tolerances: here the gradient equals central differences to 3 digits; at
  # rtol=1e-5 the reverse pass through the step-size controller gave 6.6e35 (session 10).
  prob = schedule_opt.Problem(u0=rng.standard_normal((4, 2)), v0=rng.standard_normal((4, 2)),
                              horizon=20.0, margin_target=0.2, rtol=1e-8, atol=1e-10)
  out = schedule_opt.optimize(prob, num_knots=3, steps=6, lr=0.3)
  hist = out["history"]
  assert len(hist) == 7 and [h["step"] for h in hist] == list(range(7))
  assert min(h["objective"] for h in hist[1:]) < hist[0]["objective"]
  cfg = flows.FlowConfig(temperature="schedule", schedule="knots")
  for h in (hist[0], hist[-1]):
    theta = schedule_opt.log_tau_to_knots(jnp.log(jnp.asarray(h["tau_knots"])), prob)
    j, (delta, alpha) = schedule_opt.objective(theta, prob, cfg)
    np.testing.assert_allclose([float(j), float(delta), float(alpha)],
                               [h["objective"], h["gap"], h["margin"]], rtol=1e-6)
  feasible = [h for h in hist if h["margin"] >= prob.margin_target]
  if feasible:
    assert out["best"] == min(feasible, key=lambda h: h["gap"])
  else:
    assert out["best"] is None
  assert all(0.01 - 1e-12 <= t <= 0.05 + 1e-12 for h in hist for t in h["tau_knots"])

  # A flow that leaves the domain (gamma reaches 1 before the horizon): a named error,
  # not a history of NaN.
  exits = schedule_opt.Problem(u0=rng.standard_normal((8, 2)), v0=rng.standard_normal((8, 2)),
                               horizon=100.0, margin_target=0.2)
  with pytest.raises(FloatingPointError, match=r"step 0: the objective \(nan\) or its "
                     r"gradient is not finite at tau knots .*gamma reaches 1"):
    schedule_opt.optimize(exits, num_knots=3, steps=2)
