r"""Gap-dynamics simulator: ``python -m contrastjax.gap.simulate --config=PATH[:VARIANT]
--workdir=DIR``.

  python -m contrastjax.gap.simulate --config=configs/gap_dynamics.py:fig2 \
      --workdir=workdirs/gap_fig2 [--config.t1=1e4 --config.lift=sin_phi ...]

Writes ``trajectory.json`` (times and measures), ``dynamics.png`` (gap Delta, 2 gamma,
tau and the margin alpha on log-time axes) and ``snapshots.png`` (features on the sphere,
as the paper's Fig. 2); the ``schedule_opt`` variant adds ``schedule_opt.json`` and
``schedule_opt.png``. All numerics run in float64.

Importable: :func:`run` returns the results dict without writing anything.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastjax.gap import bounds
from contrastjax.gap import flows
from contrastjax.gap import integrate
from contrastjax.gap import measures
from contrastjax.errors import ConfigError

MODELS = ("features", "scalar")


# ============================================================================ helpers
def init_features(n: int, d: int, seed: int):
  """``u_i, v_i ~ N(0, I_d)`` from ``numpy.random.default_rng(seed)`` (u first)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, d)), rng.standard_normal((n, d))


def parse_mismatch(spec: str, n: int) -> tuple[int, ...] | None:
  """``"3-8,0-1"`` -> the permutation of ``range(n)`` swapping those pairs."""
  if not spec:
    return None
  t = list(range(n))
  for item in spec.split(","):
    try:
      i, j = (int(x) for x in item.split("-"))
    except ValueError:
      raise ConfigError(f"config.mismatch={spec!r}: expected swapped pairs like '3-8' or "
                       "'0-1,2-5'") from None
    if not (0 <= i < n and 0 <= j < n):
      raise ConfigError(f"config.mismatch={spec!r}: index out of range(0, {n})")
    t[i], t[j] = t[j], t[i]
  return tuple(t)


def flow_config(c: ml_collections.ConfigDict) -> flows.FlowConfig:
  return flows.FlowConfig(
      parameterization=c.parameterization, scale=c.scale, temperature=c.temperature,
      schedule=c.schedule, lift=c.lift, train_features=c.train_features,
      targets=parse_mismatch(c.mismatch, c.n) if c.model == "features" else None)


def schedule_args(c: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(tau0=c.tau0, tau1=c.tau1, horizon=c.horizon, period=c.period)


def save_times(c: ml_collections.ConfigDict) -> np.ndarray:
  if not 0 < c.t_min < c.t1:
    raise ConfigError(f"config.t_min={c.t_min!r} must be in (0, config.t1={c.t1!r})")
  grid = np.geomspace(c.t_min, c.t1, int(c.num_save))
  snaps = [t for t in c.snapshot_times if 0 < t <= c.t1]
  return np.unique(np.concatenate([grid, np.asarray(snaps, float)]))


def validate(c: ml_collections.ConfigDict) -> None:
  if c.model not in MODELS:
    raise ConfigError(f"config.model={c.model!r} is not known; expected one of {MODELS}")
  if c.on_exit not in ("raise", "report"):
    raise ConfigError(f"config.on_exit={c.on_exit!r}: expected 'raise' or 'report'")
  if not 0 < c.tau0:
    raise ConfigError(f"config.tau0 must be > 0, got {c.tau0!r}")
  if not -1 < c.gamma0 < 1:
    raise ConfigError(f"config.gamma0 must be in (-1, 1), got {c.gamma0!r}")
  if not c.t1 > 0:
    raise ConfigError(f"config.t1 must be > 0, got {c.t1!r}")
  if c.model == "features" and (c.n < 2 or c.d < 2):
    raise ConfigError(f"config.n and config.d must be >= 2, got n={c.n}, d={c.d}")


def _finite_list(x) -> list:
  return [float(v) if np.isfinite(v) else None for v in np.asarray(x, float).ravel()]


# ============================================================================ runs
def run_scalar(c: ml_collections.ConfigDict, *, args=None) -> dict[str, Any]:
  """Sec. 3.1 scalar model (state ``{nu, gamma}``), saved on the log-time grid."""
  cfg = flow_config(c)
  args = schedule_args(c) if args is None else args
  flows.check_schedule_args(cfg, args)
  y0 = flows.scalar_state(cfg, beta0=1.0 / c.tau0, gamma0=c.gamma0)
  ts = save_times(c)
  t0 = time.time()
  traj = integrate.solve(flows.scalar_vector_field(cfg), y0, args, t1=c.t1, ts=ts,
                         rtol=c.rtol, atol=c.atol, solver=c.solver,
                         max_steps=c.max_steps, progress=c.progress,
                         gamma_fn=(lambda y: flows.gamma_of(cfg, y))
                         if c.lift == "gamma" else None)
  ok = np.isfinite(np.asarray(traj.ts))
  ts = np.asarray(traj.ts)[ok]
  ys = jax.tree.map(lambda a: a[ok], traj.ys)
  gamma = np.asarray(flows.gamma_of(cfg, ys))
  beta = np.asarray(jax.vmap(lambda t, y: flows.beta_of(cfg, t, y, args))(
      jnp.asarray(ts), ys))
  seconds = time.time() - t0
  _handle_exit(c, traj, "the scalar model")
  out = dict(model="scalar", t=[0.0] + _finite_list(ts),
             gamma=[c.gamma0] + _finite_list(gamma),
             beta=[1.0 / c.tau0] + _finite_list(beta),
             tau=[c.tau0] + _finite_list(1.0 / beta),
             gap_bound=[2 * abs(c.gamma0)] + _finite_list(2 * np.abs(gamma)),
             gamma_log2t=[None] + _finite_list(gamma * np.log(ts) ** 2),
             exited=bool(traj.exited), t_end=float(traj.t_end),
             num_steps=int(traj.num_steps), seconds=seconds)
  if c.temperature == "learned" and c.parameterization != "softplus":
    res = measures.lemma31_residual(beta, gamma, beta0=1.0 / c.tau0, gamma0=c.gamma0,
                                    parameterization=c.parameterization, scale=c.scale)
    out["lemma31_residual"] = [0.0] + _finite_list(res)
  return out


def _handle_exit(c, traj, what):
  if bool(traj.exited) and c.on_exit == "raise":
    integrate.check_exit(traj, what=what)


def run_features(c: ml_collections.ConfigDict, *, args=None, u0=None,
                 v0=None) -> dict[str, Any]:
  """Full feature flow (Eq. 4) with all measures along the trajectory."""
  cfg = flow_config(c)
  args = schedule_args(c) if args is None else args
  flows.check_schedule_args(cfg, args)
  if u0 is None:
    u0, v0 = init_features(c.n, c.d, c.seed)
  tau_start = (float(flows.knots_tau(0.0, args["log_tau_knots"], args["horizon"]))
               if cfg.temperature == "schedule" and cfg.schedule == "knots"
               else c.tau0 if cfg.temperature == "learned"
               else float(flows.schedule_beta(cfg, 0.0, args)) ** -1)
  y0 = flows.initial_state(cfg, u0, v0, tau0=tau_start, gamma0=c.gamma0)
  ts = save_times(c)
  t0 = time.time()
  traj = integrate.solve(flows.feature_vector_field(cfg), y0, args, t1=c.t1, ts=ts,
                         rtol=c.rtol, atol=c.atol, solver=c.solver,
                         max_steps=c.max_steps, progress=c.progress,
                         gamma_fn=(lambda y: flows.gamma_of(cfg, y))
                         if c.lift == "gamma" else None)
  jax.block_until_ready(traj.ys)
  seconds = time.time() - t0
  _handle_exit(c, traj, "the full feature flow")
  all_t = np.concatenate([[0.0], np.asarray(traj.ts)])
  ys = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), y0, traj.ys)
  ok = np.isfinite(all_t)
  all_t, ys = all_t[ok], jax.tree.map(lambda a: a[ok], ys)

  @jax.jit
  def measure(t, y):
    hx, hy = flows.normalize(y["u"]), flows.normalize(y["v"])
    gamma = flows.gamma_of(cfg, y)
    beta = flows.beta_of(cfg, t, y, args)
    Z = hx @ hy.T
    return dict(gap=measures.gap(hx, hy, gamma), gamma=gamma, beta=beta,
                margin=measures.margin(Z, cfg.targets),
                uniformity=measures.uniformity(hx, hy, gamma),
                loss=flows.feature_loss(cfg, t, y, args),
                g=flows.g_a(Z, beta * (1 - gamma**2), cfg.targets))
  m = jax.tree.map(np.asarray, jax.vmap(measure)(jnp.asarray(all_t), ys))
  out = dict(model="features", t=_finite_list(all_t), gap=_finite_list(m["gap"]),
             gamma=_finite_list(m["gamma"]), gap_bound=_finite_list(2 * np.abs(m["gamma"])),
             beta=_finite_list(m["beta"]), tau=_finite_list(1.0 / m["beta"]),
             margin=_finite_list(m["margin"]), uniformity=_finite_list(m["uniformity"]),
             loss=_finite_list(m["loss"]), g=_finite_list(m["g"]),
             exited=bool(traj.exited), t_end=float(traj.t_end),
             num_steps=int(traj.num_steps), seconds=seconds, n=c.n, d=c.d,
             lift=c.lift, parameterization=c.parameterization)
  if c.temperature == "learned" and c.parameterization != "softplus":
    out["lemma31_residual"] = _finite_list(measures.lemma31_residual(
        m["beta"], m["gamma"], beta0=1.0 / c.tau0, gamma0=c.gamma0,
        parameterization=c.parameterization, scale=c.scale))
  out["thm32"] = _thm32_along(c, all_t, m)
  snaps = {}
  for ts_ in c.snapshot_times:
    k = int(np.argmin(np.abs(all_t - ts_)))
    if abs(all_t[k] - ts_) <= 1e-9 * max(1.0, ts_):
      y = jax.tree.map(lambda a: a[k], ys)
      snaps[f"{ts_:g}"] = dict(t=float(all_t[k]),
                               hx=np.asarray(flows.normalize(y["u"])).tolist(),
                               hy=np.asarray(flows.normalize(y["v"])).tolist(),
                               gamma=float(m["gamma"][k]))
  out["snapshots"] = snaps
  return out


def _thm32_along(c, t, m) -> dict[str, Any] | None:
  """Theorem 3.2's gamma lower bound restarted at the first matched time ``t_m``
  (``alpha = min margin on [t_m, T]``), when its assumptions hold there."""
  if c.temperature != "learned" or c.parameterization != "exp":
    return None
  matched = np.flatnonzero(m["margin"] > 0)
  for k in matched:
    alpha = float(np.min(m["margin"][k:]))
    if alpha <= 0 or not 0 < m["gamma"][k] < 1:
      continue
    cst = bounds.thm32_constants(alpha=alpha, n=c.n, beta0=float(m["beta"][k]),
                                 gamma0=float(m["gamma"][k]))
    if cst.assumptions_hold:
      lb = bounds.thm32_gamma_lower_bound(t[k:] - t[k], alpha=alpha, n=c.n,
                                          beta0=float(m["beta"][k]),
                                          gamma0=float(m["gamma"][k]))
      return dict(t_start=float(t[k]), alpha=alpha, t=_finite_list(t[k:]),
                  gamma_lower_bound=_finite_list(lb),
                  holds=bool(np.all(m["gamma"][k:] >= lb * (1 - 1e-9))))
  return None


def run_schedule_opt(c: ml_collections.ConfigDict) -> dict[str, Any]:
  from contrastjax.gap import schedule_opt  # pylint: disable=g-import-not-at-top
  u0, v0 = init_features(c.n, c.d, c.seed)
  o = c.opt
  prob = schedule_opt.Problem(u0=u0, v0=v0, gamma0=c.gamma0, horizon=o.horizon,
                              tau_min=o.tau_min, tau_max=o.tau_max,
                              margin_target=o.margin_target, penalty=o.penalty,
                              rtol=o.rtol, atol=o.atol)
  paper = schedule_opt.paper_schedules(prob)
  opt = schedule_opt.optimize(prob, num_knots=o.num_knots, steps=o.steps, lr=o.lr,
                              progress=c.progress)
  best = opt["best"] or opt["history"][-1]
  return dict(paper=paper, opt=opt, best=best,
              log_tau_knots=[math.log(x) for x in best["tau_knots"]],
              problem=dict(horizon=o.horizon, tau_min=o.tau_min, tau_max=o.tau_max,
                           margin_target=o.margin_target, n=c.n, d=c.d,
                           gamma0=c.gamma0, seed=c.seed))


def run(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the configured simulation in float64 and returns its results."""
  validate(c)
  with jax.enable_x64(True):
    if c.variant == "schedule_opt":
      so = run_schedule_opt(c)
      args = dict(log_tau_knots=jnp.asarray(so["log_tau_knots"]), horizon=c.opt.horizon)
      res = run_features(c, args=args)
      res["schedule_opt"] = so
      return res
    if c.model == "scalar":
      return run_scalar(c)
    return run_features(c)


# ============================================================================ plots
def plot_dynamics(res: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  t = np.asarray(res["t"], float)
  pos = t > 0
  arr = lambda k: np.asarray([np.nan if v is None else v for v in res[k]], float)
  panels = [("gap", "gap")] if res["model"] == "features" else []
  panels += [("tau", "temperature tau")]
  if res["model"] == "features":
    panels.append(("margin", "margin alpha(Z)"))
  else:
    panels.append(("gamma_log2t", "gamma log(t)^2"))
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  for ax, (key, title) in zip(np.atleast_1d(axes), panels):
    if key == "gap":
      ax.plot(t[pos], arr("gap")[pos], label="Delta (lifted)")
      ax.plot(t[pos], arr("gap_bound")[pos], "--", label="2 gamma")
      if res.get("thm32"):
        th = res["thm32"]
        ax.plot(th["t"][1:], 2 * np.asarray(th["gamma_lower_bound"][1:], float), ":",
                label=f"Thm 3.2 bound (from t={th['t_start']:.3g})")
      ax.set_yscale("log")
      ax.legend(fontsize=7)
    else:
      ax.plot(t[pos], arr(key)[pos])
    if key == "margin":
      ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_title(title)
  if res["model"] == "scalar":
    ax0 = np.atleast_1d(axes)[0]
    ax0.plot(t[pos], arr("gap_bound")[pos], "--", label="2 gamma")
    ax0.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_snapshots(res: dict[str, Any], path: str) -> None:
  """Lifted features at the snapshot times; ``d = 2``: on the 3-D sphere (the paper's
  Fig. 2), else the top-2 principal directions of both modalities plus the lift axis."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  snaps = res.get("snapshots") or {}
  if not snaps:
    return
  k = len(snaps)
  fig = plt.figure(figsize=(3.2 * k, 3.4))
  u, v = np.mgrid[0:2 * np.pi:30j, 0:np.pi:15j]
  for i, (name, s) in enumerate(snaps.items()):
    ax = fig.add_subplot(1, k, i + 1, projection="3d")
    hx, hy, g = np.asarray(s["hx"]), np.asarray(s["hy"]), s["gamma"]
    if hx.shape[1] > 2:
      both = np.concatenate([hx, hy])
      _, _, vt = np.linalg.svd(both - both.mean(0), full_matrices=False)
      hx, hy = hx @ vt[:2].T, hy @ vt[:2].T
      nrm = np.linalg.norm(np.concatenate([hx, hy]), axis=1).max()
      hx, hy = hx / nrm, hy / nrm
    c = math.sqrt(max(1 - g * g, 0.0))
    px = np.concatenate([c * hx, np.full((len(hx), 1), g)], 1)
    py = np.concatenate([c * hy, np.full((len(hy), 1), -g)], 1)
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
                      color="k", alpha=0.06, lw=0.5)
    m = min(len(px), 64)
    for j in range(m):
      ax.plot(*zip(px[j], py[j]), color="gray", lw=0.6, alpha=0.7)
    ax.scatter(*px[:m].T, c="r", s=12, label="x")
    ax.scatter(*py[:m].T, c="b", s=12, label="y")
    ax.set_title(f"t = {s['t']:g}", fontsize=9)
    ax.set_axis_off()
    ax.set_box_aspect((1, 1, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_schedule_opt(res: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  so = res["schedule_opt"]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for name, r in so["paper"].items():
    a1.scatter(r["margin"], r["gap"], label=name)
  a1.scatter(so["best"]["margin"], so["best"]["gap"], marker="*", s=150, c="k",
             label="optimised")
  a1.axvline(so["problem"]["margin_target"], color="k", lw=0.5, ls="--")
  a1.set_yscale("log")
  a1.set_xlabel("margin alpha(T)")
  a1.set_ylabel("gap Delta(T)")
  a1.legend(fontsize=6)
  h = so["opt"]["history"]
  a2.plot([r["step"] for r in h], [r["gap"] for r in h], label="gap")
  a2.set_yscale("log")
  a2.set_xlabel("Adam step")
  a2.set_title("final gap during optimisation")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def simulate(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs :func:`run` and writes JSON + PNGs into ``workdir``."""
  res = run(c)
  res["config"] = c.to_dict()
  write_outputs(res, workdir)
  return res


def write_outputs(res: dict[str, Any], workdir: str) -> None:
  """``trajectory.json``, ``dynamics.png``, ``snapshots.png`` (+ schedule_opt files)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "trajectory.json"), "w") as f:
    json.dump({k: v for k, v in res.items() if k != "schedule_opt"}, f, default=_jsonable)
  plot_dynamics(res, os.path.join(workdir, "dynamics.png"))
  plot_snapshots(res, os.path.join(workdir, "snapshots.png"))
  if "schedule_opt" in res:
    with open(os.path.join(workdir, "schedule_opt.json"), "w") as f:
      json.dump(res["schedule_opt"], f, default=_jsonable, indent=1)
    plot_schedule_opt(res, os.path.join(workdir, "schedule_opt.png"))


def _jsonable(x):
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  return str(x)


def summary(res: dict[str, Any]) -> str:
  lines = [f"model={res['model']} steps={res['num_steps']} solve={res['seconds']:.2f}s"
           + (f" EXITED at t={res['t_end']:.4g}" if res["exited"] else "")]
  t = res["t"]
  idx = np.unique(np.linspace(0, len(t) - 1, 8).astype(int))
  for k in idx:
    row = f"  t={t[k]:<10.4g}"
    for key in ("gap", "gamma", "tau", "margin"):
      if key in res and res[key][k] is not None:
        row += f" {key}={res[key][k]:.4g}"
    lines.append(row)
  if "schedule_opt" in res:
    so = res["schedule_opt"]
    lines.append("schedule comparison at T=%g (gap, margin):" % so["problem"]["horizon"])
    for name, r in so["paper"].items():
      lines.append(f"  {name:10s} gap={r['gap']:.4g} margin={r['margin']:.4f}")
    lines.append(f"  optimised  gap={so['best']['gap']:.4g} margin={so['best']['margin']:.4f}"
                 f" tau knots={[round(x, 4) for x in so['best']['tau_knots']]}")
  return "\n".join(lines)


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if c is None:
    raise app.UsageError("--config is required, e.g. --config=configs/gap_dynamics.py:fig2")
  if not workdir:
    raise app.UsageError("--workdir is required")
  try:
    res = simulate(c, workdir)
  except integrate.GammaExitError as e:
    print(f"ERROR: {e}\n(or pass --config.on_exit=report to keep the trajectory up to "
          "the exit)", file=sys.stderr)
    sys.exit(3)
  print(summary(res))
  print(f"wrote {os.path.join(os.path.abspath(workdir), 'trajectory.json')} and plots")


if __name__ == "__main__":
  from absl import flags as _flags
  from ml_collections import config_flags

  from contrastjax import cli as _cli
  config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/gap_dynamics.py:fig2.", lock_config=True)
  _flags.DEFINE_string("workdir", None, "Output directory.")
  # The trainer's error handling: one line and a documented exit status (contrastjax.cli).
  _cli.run(main)
