"""Optimising a temperature schedule by gradient descent through the simulation.

Beyond the paper: the paper compares hand-made linear/cosine schedules (TS S0-S3,
A0/A1). Here ``tau(t)`` is a free curve -- ``log tau`` piecewise linear in ``log(1+t)``
on ``K`` knots, squashed into ``[tau_min, tau_max]`` (the paper's TS range by default) --
and its knots are fitted by Adam on

    J = Delta(T) + penalty * relu(alpha_target - alpha(T))^2,

i.e. the smallest final gap at a fixed matching margin ``alpha(T) >= alpha_target``,
differentiating the diffrax solve of the full feature flow (reverse mode).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.gap import flows
from contrastjax.gap import integrate
from contrastjax.gap import measures


@dataclasses.dataclass(frozen=True)
class Problem:
  """The fixed part of the problem (features, horizon, box, target, solver)."""
  u0: Any
  v0: Any
  gamma0: float = 0.3
  horizon: float = 100.0
  tau_min: float = 0.01
  tau_max: float = 0.05
  margin_target: float = 0.2
  penalty: float = 100.0
  rtol: float = 1e-6
  atol: float = 1e-8
  max_steps: int = 20_000


def knots_to_log_tau(theta, prob: Problem):
  """Unconstrained knot values -> ``log tau`` in ``[log tau_min, log tau_max]``."""
  lo, hi = math.log(prob.tau_min), math.log(prob.tau_max)
  return lo + (hi - lo) * jax.nn.sigmoid(theta)


def log_tau_to_knots(log_tau, prob: Problem):
  lo, hi = math.log(prob.tau_min), math.log(prob.tau_max)
  p = jnp.clip((log_tau - lo) / (hi - lo), 1e-6, 1 - 1e-6)
  return jnp.log(p) - jnp.log1p(-p)


def final_measures(cfg: flows.FlowConfig, args: dict[str, Any], prob: Problem):
  """``(Delta(T), alpha(T), gamma(T), num_steps)`` of the schedule flow (traceable)."""
  tau_start = (flows.knots_tau(0.0, args["log_tau_knots"], args["horizon"])
               if cfg.schedule == "knots" else args["tau0"])
  y0 = flows.initial_state(cfg, prob.u0, prob.v0, tau0=tau_start, gamma0=prob.gamma0)
  traj = integrate.solve(flows.feature_vector_field(cfg), y0, args, t1=prob.horizon,
                         rtol=prob.rtol, atol=prob.atol, max_steps=prob.max_steps,
                         gamma_fn=lambda y: flows.gamma_of(cfg, y))
  y = traj.y_end
  hx, hy = flows.normalize(y["u"]), flows.normalize(y["v"])
  gamma = flows.gamma_of(cfg, y)
  return (measures.gap(hx, hy, gamma), measures.margin(hx @ hy.T), gamma,
          traj.num_steps)


def objective(theta, prob: Problem, cfg: flows.FlowConfig):
  args = dict(log_tau_knots=knots_to_log_tau(theta, prob), horizon=prob.horizon)
  delta, alpha, _, _ = final_measures(cfg, args, prob)
  return delta + prob.penalty * jax.nn.relu(prob.margin_target - alpha) ** 2, (delta, alpha)


def evaluate_schedule(prob: Problem, name: str, **numbers) -> dict[str, float]:
  """``Delta(T)`` and ``alpha(T)`` of a paper-style schedule (``fixed``/``linear``/
  ``cosine``) with ``numbers`` = ``tau0``, ``tau1``, ``period``."""
  cfg = flows.FlowConfig(temperature="schedule", schedule=name)
  args = dict(horizon=prob.horizon, **numbers)
  flows.check_schedule_args(cfg, args)
  delta, alpha, gamma, steps = jax.jit(lambda a: final_measures(cfg, a, prob))(args)
  return dict(gap=float(delta), margin=float(alpha), gamma=float(gamma),
              num_steps=int(steps))


def optimize(prob: Problem, *, num_knots: int = 6, steps: int = 40, lr: float = 0.3,
             init_tau: tuple[float, float] | None = None, progress: bool = False,
             log_every: int = 0) -> dict[str, Any]:
  """Adam on the knot values; starts from the linear ramp ``init_tau`` (default
  ``tau_min -> tau_max``, the paper's S3 shape in log-time). Returns the history, the
  best feasible knots (``alpha(T) >= alpha_target``, least gap) and timings."""
  import optax  # pylint: disable=g-import-not-at-top
  cfg = flows.FlowConfig(temperature="schedule", schedule="knots")
  lo_tau, hi_tau = init_tau or (prob.tau_min * 1.05, prob.tau_max * 0.95)
  log_init = jnp.linspace(math.log(lo_tau), math.log(hi_tau), num_knots)
  theta = log_tau_to_knots(log_init, prob)
  vg = jax.jit(jax.value_and_grad(lambda th: objective(th, prob, cfg), has_aux=True))
  tx = optax.adam(lr)
  opt_state = tx.init(theta)
  history, best = [], None
  it = range(steps + 1)
  if progress:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    it = tqdm.tqdm(it, desc="schedule_opt", dynamic_ncols=True)
  t_start = time.time()
  for i in it:
    (j, (delta, alpha)), grad = vg(theta)
    if not (np.isfinite(float(j)) and np.all(np.isfinite(np.asarray(grad)))):
      taus = np.round(np.exp(np.asarray(knots_to_log_tau(theta, prob))), 5).tolist()
      raise FloatingPointError(
          f"schedule_opt.optimize step {i}: the objective ({float(j)}) or its gradient is "
          f"not finite at tau knots {taus}; the flow may leave the domain (gamma reaches "
          f"1) before the horizon {prob.horizon}, or the solver tolerances (rtol="
          f"{prob.rtol}, atol={prob.atol}) are too loose for reverse-mode gradients")
    rec = dict(step=i, objective=float(j), gap=float(delta), margin=float(alpha),
               tau_knots=[float(x) for x in np.exp(knots_to_log_tau(theta, prob))])
    history.append(rec)
    if rec["margin"] >= prob.margin_target and (best is None or rec["gap"] < best["gap"]):
      best = rec
    if log_every and i % log_every == 0:
      print(f"step {i}: J={rec['objective']:.5g} gap={rec['gap']:.5g} "
            f"margin={rec['margin']:.4f}")
    if i == steps:
      break
    updates, opt_state = tx.update(grad, opt_state)
    theta = optax.apply_updates(theta, updates)
  return dict(history=history, best=best, seconds=time.time() - t_start,
              num_knots=num_knots, final_tau_knots=history[-1]["tau_knots"])


def paper_schedules(prob: Problem, period_fraction: float = 0.2) -> dict[str, dict]:
  """The paper's TS schedules scaled to the simulation horizon: FLT ``tau_min`` and
  ``tau_max``; S0-S3 ``tau_min -> 2,3,4,5 x tau_min`` linear over the horizon; A0/A1
  cosine between ``tau_min`` and ``2x``/``4x`` with period ``period_fraction * T``
  (the paper does not state it)."""
  t0 = prob.tau_min
  period = period_fraction * prob.horizon
  runs = {
      f"FLT {prob.tau_min:g}": ("fixed", dict(tau0=prob.tau_min)),
      f"FLT {prob.tau_max:g}": ("fixed", dict(tau0=prob.tau_max)),
  }
  for k, mult in enumerate((2, 3, 4, 5)):
    runs[f"S{k}"] = ("linear", dict(tau0=t0, tau1=mult * t0))
  runs["A0"] = ("cosine", dict(tau0=t0, tau1=2 * t0, period=period))
  runs["A1"] = ("cosine", dict(tau0=t0, tau1=4 * t0, period=period))
  return {name: dict(evaluate_schedule(prob, kind, **nums), schedule=kind, **nums)
          for name, (kind, nums) in runs.items()}
