r"""Benchmark of the gap simulator against SciPy: ``python -m contrastjax.gap.benchmark``.

  python -m contrastjax.gap.benchmark [--t1_full=1e4 --n=512 --d=64 --json_out=b.json]

Side by side in one process, same ODE (log-time ``s = log(1 + t)``), same tolerances:

* full feature flow, n=512, d=64, tau0=0.07, gamma0=0.3, beta=e^nu: diffrax Tsit5 vs
  SciPy ``solve_ivp`` RK45 and DOP853 with a hand-derived NumPy right-hand side (LSODA
  cannot run: it allocates a dense 65538^2 Jacobian, 32 GiB; docs/methods/modality_gap.md). At this size
  the paper's raw gamma flow leaves [-1, 1] (the event time is reported), so both
  solvers use the ``gamma = sin(phi)`` lift;
* scalar model (Sec. 3.1) to t=1e12: diffrax Tsit5 vs SciPy LSODA (in t and in log-time);
* the cost of a reverse-mode gradient through each solve (final gap w.r.t. the initial
  features and temperature; final gamma w.r.t. beta0) relative to the forward solve.

JAX compile time is reported separately from run time (``jit(...).lower().compile()``).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate as sp_integrate

from contrastjax.gap import flows
from contrastjax.gap import integrate
from contrastjax.gap import measures
from contrastjax.gap import numpy_ref
from contrastjax.gap import rkc


def time_jax(fn: Callable, *args, repeats: int = 1) -> dict[str, Any]:
  """Compile (ahead of time) and run ``fn``; returns seconds and the last output."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  runs, out = [], None
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - t0)
  return dict(compile_s=compile_s, run_s=min(runs), runs=runs, out=out)


def _log_time(f):
  def g(s, y):
    t = math.expm1(s)
    return (1.0 + t) * f(t, y)
  return g


def _features(y):
  """The normalised features ``[2, n, d]`` of a full-flow state (to compare solutions)."""
  return jnp.stack([flows.normalize(y["u"]), flows.normalize(y["v"])])


# ============================================================================ full flow
def full_flow(n: int, d: int, t1: float, *, rtol: float, atol: float, seed: int = 0,
              scipy_methods=("RK45", "DOP853"), repeats: int = 1,
              with_grad: bool = True, max_steps: int = 20_000,
              checkpoints: int | None = 2048, log=print) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  u0, v0 = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  tau0, gamma0 = 0.07, 0.3
  out: dict[str, Any] = dict(n=n, d=d, t1=t1, rtol=rtol, atol=atol, tau0=tau0,
                             gamma0=gamma0, state_size=2 * n * d + 2,
                             checkpoints=checkpoints, max_steps=max_steps)

  # 1) the raw gamma flow at this size: where does gamma leave [-1, 1]?
  raw = flows.FlowConfig()
  def raw_solve(u, v):
    y0 = flows.initial_state(raw, u, v, tau0=tau0, gamma0=gamma0)
    tr = integrate.solve(flows.feature_vector_field(raw), y0, {}, t1=t1, rtol=rtol,
                         atol=atol, gamma_fn=lambda y: y["gamma"])
    return tr.exited, tr.t_end, tr.y_end["gamma"]
  ex, t_exit, g_exit = jax.jit(raw_solve)(u0, v0)
  out["raw_gamma_exit"] = dict(exited=bool(ex), t=float(t_exit), gamma=float(g_exit))
  log(f"[full] raw gamma flow: exited={bool(ex)} at t={float(t_exit):.4g} "
      f"(gamma={float(g_exit):.4f}) -> benchmarking the gamma = sin(phi) lift")

  cfg = flows.FlowConfig(lift="sin_phi")

  def final(u, v, tau):
    y0 = flows.initial_state(cfg, u, v, tau0=tau, gamma0=gamma0)
    tr = integrate.solve(flows.feature_vector_field(cfg), y0, {}, t1=t1, rtol=rtol,
                         atol=atol, max_steps=max_steps, checkpoints=checkpoints)
    y = tr.y_end
    gap = measures.gap(flows.normalize(y["u"]), flows.normalize(y["v"]),
                       jnp.sin(y["phi"]))
    return gap, jnp.sin(y["phi"]), y["nu"], tr.num_steps, _features(y)

  args = (jnp.asarray(u0), jnp.asarray(v0), jnp.asarray(tau0))
  fw = time_jax(final, *args, repeats=repeats)
  gap, gamma, nu, steps, feats = (np.asarray(x) for x in fw.pop("out"))
  out["jax_forward"] = dict(fw, gap=float(gap), gamma=float(gamma), tau=float(np.exp(-nu)),
                            num_steps=int(steps))
  log(f"[full] diffrax Tsit5: compile {fw['compile_s']:.2f}s, run {fw['run_s']:.2f}s, "
      f"{int(steps)} steps; gap(T)={float(gap):.6g} gamma(T)={float(gamma):.6g}")

  # The stabilised explicit solver (contrastjax.gap.rkc) on the same field, in t.
  def final_rkc(u, v, tau):
    y0 = flows.initial_state(cfg, u, v, tau0=tau, gamma0=gamma0)
    field = flows.feature_vector_field(cfg)
    r = rkc.solve(lambda t, y: field(t, y, {}), y0, t1=t1, rtol=rtol, atol=atol)
    y = r.y
    g = measures.gap(flows.normalize(y["u"]), flows.normalize(y["v"]), jnp.sin(y["phi"]))
    return (g, jnp.sin(y["phi"]), y["nu"], r.num_steps, r.num_rejected, r.num_fevals,
            r.max_stages, _features(y))

  rk = time_jax(final_rkc, *args, repeats=max(repeats, 2))
  (rgap, rgamma, rnu, rsteps, rrej, rnfev, rsmax, rfeats) = (
      np.asarray(x) for x in rk.pop("out"))
  out["jax_rkc2"] = dict(rk, gap=float(rgap), gamma=float(rgamma), tau=float(np.exp(-rnu)),
                         num_steps=int(rsteps), num_rejected=int(rrej), nfev=int(rnfev),
                         max_stages=int(rsmax),
                         max_feature_diff_vs_tsit5=float(np.max(np.abs(rfeats - feats))),
                         speedup_vs_tsit5=fw["run_s"] / rk["run_s"])
  # Forward mode through RKC2 (its while_loop has no reverse mode): d nu(T) / d tau0.
  def rkc_jvp(u, v, tau):
    return jax.jvp(lambda x: final_rkc(u, v, x)[2], (tau,), (jnp.ones_like(tau),))
  jv = time_jax(rkc_jvp, *args, repeats=max(repeats, 2))
  out["jax_rkc2_jvp"] = dict(compile_s=jv["compile_s"], run_s=jv["run_s"], runs=jv["runs"],
                             dnu_dtau0=float(jv["out"][1]),
                             ratio_run=jv["run_s"] / rk["run_s"])
  log(f"[full] RKC2 forward-mode d nu(T)/d tau0 = {float(jv['out'][1]):.6g}: run "
      f"{jv['run_s']:.2f}s = {jv['run_s'] / rk['run_s']:.2f}x the RKC2 forward run")
  log(f"[full] RKC2: compile {rk['compile_s']:.2f}s, run {rk['run_s']:.2f}s, {int(rsteps)} "
      f"steps ({int(rrej)} rejected), {int(rnfev)} evaluations, <= {int(rsmax)} stages; "
      f"max |features - Tsit5's| {out['jax_rkc2']['max_feature_diff_vs_tsit5']:.2e}")

  if with_grad:
    grad_fn = jax.grad(lambda u, v, tau: final(u, v, tau)[0], argnums=(0, 1, 2))
    gr = time_jax(grad_fn, *args, repeats=1)
    g = gr.pop("out")
    out["jax_grad"] = dict(gr, ratio_run=gr["run_s"] / fw["run_s"],
                           dgap_dtau0=float(g[2]),
                           grad_norm_u=float(jnp.linalg.norm(g[0])))
    log(f"[full] gradient (reverse mode through the solve): compile "
        f"{gr['compile_s']:.2f}s, run {gr['run_s']:.2f}s = "
        f"{gr['run_s'] / fw['run_s']:.2f}x the forward run")

  # The NumPy field gets the JAX field's arithmetic (one shared exp for both softmaxes).
  rhs = _log_time(numpy_ref.feature_rhs(n, d, "sin_phi", shared_exp=True))
  y0 = np.concatenate([u0.ravel(), v0.ravel(), [math.log(1 / tau0), math.asin(gamma0)]])
  out["scipy"] = {}
  for method in scipy_methods:
    t0 = time.perf_counter()
    sol = sp_integrate.solve_ivp(rhs, (0.0, math.log1p(t1)), y0, method=method,
                                 rtol=rtol, atol=atol)
    secs = time.perf_counter() - t0
    yT = sol.y[:, -1]
    hx = yT[:n * d].reshape(n, d)
    hy = yT[n * d:2 * n * d].reshape(n, d)
    hx /= np.linalg.norm(hx, axis=1, keepdims=True)
    hy /= np.linalg.norm(hy, axis=1, keepdims=True)
    gT = math.sin(yT[-1])
    sgap = numpy_ref.gap(hx, hy, gT)
    sfeats = np.stack([hx, hy])
    out["scipy"][method] = dict(run_s=secs, nfev=int(sol.nfev), status=int(sol.status),
                                gap=sgap, gamma=gT,
                                speedup_vs_jax_run=secs / fw["run_s"],
                                speedup_of_rkc2=secs / rk["run_s"],
                                rel_diff_gap=abs(sgap - float(gap)) / max(abs(sgap), 1e-300),
                                max_feature_diff_vs_tsit5=float(np.max(np.abs(sfeats - feats))),
                                max_feature_diff_vs_rkc2=float(np.max(np.abs(sfeats - rfeats))))
    log(f"[full] SciPy {method}: {secs:.2f}s, {sol.nfev} RHS evaluations, gap(T)={sgap:.6g}"
        f" -> diffrax Tsit5 is {secs / fw['run_s']:.2f}x faster, RKC2 "
        f"{secs / rk['run_s']:.2f}x; max |features - Tsit5's| "
        f"{out['scipy'][method]['max_feature_diff_vs_tsit5']:.2e}, - RKC2's "
        f"{out['scipy'][method]['max_feature_diff_vs_rkc2']:.2e}")
  return out


# ============================================================================ scalar
def scalar(t1: float = 1e12, *, rtol: float = 1e-10, atol: float = 1e-12,
           repeats: int = 5, checkpoints: int | None = 512, log=print) -> dict[str, Any]:
  cfg = flows.FlowConfig()
  out: dict[str, Any] = dict(t1=t1, rtol=rtol, atol=atol, beta0=2.0, gamma0=0.5,
                             checkpoints=checkpoints)

  def final(beta0, forward_mode=False):
    tr = integrate.solve(flows.scalar_vector_field(cfg),
                         flows.scalar_state(cfg, beta0=beta0, gamma0=0.5), {}, t1=t1,
                         rtol=rtol, atol=atol, max_steps=4096, checkpoints=checkpoints,
                         forward_mode=forward_mode)
    return tr.y_end["gamma"], tr.y_end["nu"], tr.num_steps

  fw = time_jax(final, jnp.asarray(2.0), repeats=repeats)
  gamma, nu, steps = (np.asarray(x) for x in fw.pop("out"))
  out["jax_forward"] = dict(fw, gamma=float(gamma), beta=float(np.exp(nu)),
                            num_steps=int(steps))
  log(f"[scalar] diffrax Tsit5 (log-time): compile {fw['compile_s']:.2f}s, run "
      f"{fw['run_s'] * 1e3:.2f} ms, {int(steps)} steps; gamma(1e12)={float(gamma):.6g}")
  gr = time_jax(jax.grad(lambda b: final(b)[0]), jnp.asarray(2.0), repeats=repeats)
  dg = float(gr.pop("out"))
  out["jax_grad"] = dict(gr, ratio_run=gr["run_s"] / fw["run_s"], dgamma_dbeta0=dg)
  log(f"[scalar] gradient (reverse mode): compile {gr['compile_s']:.2f}s, run "
      f"{gr['run_s'] * 1e3:.2f} ms = {gr['run_s'] / fw['run_s']:.2f}x the forward run")
  gf = time_jax(jax.jacfwd(lambda b: final(b, True)[0]), jnp.asarray(2.0), repeats=repeats)
  dgf = float(gf.pop("out"))
  out["jax_grad_forward_mode"] = dict(gf, ratio_run=gf["run_s"] / fw["run_s"],
                                      dgamma_dbeta0=dgf)
  log(f"[scalar] gradient (forward mode): compile {gf['compile_s']:.2f}s, run "
      f"{gf['run_s'] * 1e3:.2f} ms = {gf['run_s'] / fw['run_s']:.2f}x the forward run; "
      f"d gamma(T)/d beta0 = {dgf:.6g} (reverse: {dg:.6g})")
  out["scipy"] = {}
  for label, fn, span in (("LSODA", numpy_ref.scalar_rhs, (0.0, t1)),
                          ("LSODA (log-time)", _log_time(numpy_ref.scalar_rhs),
                           (0.0, math.log1p(t1)))):
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      sol = sp_integrate.solve_ivp(fn, span, [math.log(2.0), 0.5], method="LSODA",
                                   rtol=rtol, atol=atol)
      runs.append(time.perf_counter() - t0)
    secs = min(runs)
    out["scipy"][label] = dict(run_s=secs, nfev=int(sol.nfev), gamma=float(sol.y[1, -1]),
                               speedup_vs_jax_run=secs / fw["run_s"],
                               rel_diff_gamma=abs(sol.y[1, -1] - float(gamma))
                               / abs(sol.y[1, -1]))
    log(f"[scalar] SciPy {label}: {secs * 1e3:.2f} ms, {sol.nfev} RHS evaluations, "
        f"gamma={sol.y[1, -1]:.6g} -> diffrax run is {secs / fw['run_s']:.2f}x faster")
  return out


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  F = flags.FLAGS
  jax.config.update("jax_enable_x64", True)
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  results: dict[str, Any] = dict(device=str(jax.devices()[0]), jax=jax.__version__)
  parts = [p for p in F.parts.split(",") if p]
  for p in parts:
    if p not in ("scalar", "full"):
      raise app.UsageError(f"--parts: {p!r} is not known; expected scalar and/or full")
  with tqdm.tqdm(parts, desc="benchmark", dynamic_ncols=True) as bar:
    for p in bar:
      bar.set_postfix(part=p)
      if p == "scalar":
        results["scalar"] = scalar(F.t1_scalar, log=bar.write)
      else:
        results["full"] = full_flow(F.n, F.d, F.t1_full, rtol=F.rtol, atol=F.atol,
                                    scipy_methods=[m for m in F.scipy_methods.split(",")
                                                   if m],
                                    with_grad=F.grad, log=bar.write)
  if F.json_out:
    with open(F.json_out, "w") as f:
      json.dump(results, f, indent=1, default=lambda x: np.asarray(x).tolist())
    print(f"wrote {F.json_out}")


if __name__ == "__main__":
  from absl import app as _app
  from absl import flags as _flags
  _flags.DEFINE_string("parts", "scalar,full", "Comma-separated: scalar, full.")
  _flags.DEFINE_integer("n", 512, "Pairs of the full flow.")
  _flags.DEFINE_integer("d", 64, "Feature dimension of the full flow.")
  _flags.DEFINE_float("t1_full", 1e4, "Horizon of the full flow.")
  _flags.DEFINE_float("t1_scalar", 1e12, "Horizon of the scalar model.")
  _flags.DEFINE_float("rtol", 1e-6, "Relative tolerance of the full flow (both solvers).")
  _flags.DEFINE_float("atol", 1e-9, "Absolute tolerance of the full flow (both solvers).")
  _flags.DEFINE_string("scipy_methods", "RK45,DOP853", "SciPy methods for the full flow.")
  _flags.DEFINE_bool("grad", True, "Also time a gradient through the full flow.")
  _flags.DEFINE_string("json_out", "", "Optional path for the JSON results.")
  _app.run(main)
