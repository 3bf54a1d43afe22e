"""diffrax solves of the gap dynamics: adaptive, float64, log-time, gamma-exit events.

Horizons up to ``t = 1e12`` are integrated in *log-time* ``s = log(1 + t)`` (``t`` starts
exactly at 0): ``dy/ds = (1 + t) f(t, y)``, ``t = expm1(s)``. Every solve is
differentiable end to end (``RecursiveCheckpointAdjoint``, i.e. reverse mode through the
solver's steps with checkpointing): gradients of any final-time quantity w.r.t. the
schedule numbers in ``args``, the initial temperature and the initial features.

Call with float64 enabled (``with jax.enable_x64(True):``): ``gamma`` reaches 1e-3 and
``beta`` 35, so ``exp(-beta)`` is ~1e-15.

``gamma`` leaving ``[-1, 1]`` (the paper assumes it never does; docs/methods/modality_gap.md) is detected
by a diffrax event that stops the solve; :func:`check_exit` turns it into a
:class:`GammaExitError` naming the time and the remedy (``lift="sin_phi"``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "bosh3": diffrax.Bosh3,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "kvaerno5": diffrax.Kvaerno5,
}
#: Not diffrax: the stabilised explicit solver of :mod:`contrastjax.gap.rkc` (forward-mode
#: differentiable only; 18x SciPy's RK45 on the n = 512 full flow, BENCHMARKS.md).
RKC2 = "rkc2"


class GammaExitError(RuntimeError):
  """``|gamma|`` reached 1 under the raw flow: the lifted features stop existing."""


class Trajectory(NamedTuple):
  """A solve's output. ``ts`` are the flow times saved at (not log-times): the requested
  ones, except that after a gamma exit the first unreached slot holds the exit time and
  state and the later ones ``inf``; ``t_end``/``y_end`` where the solve stopped."""
  ts: Any
  ys: Any
  t_end: Any
  y_end: Any
  exited: Any        # bool: the gamma event fired
  num_steps: Any
  num_rhs: Any


def make_solver(name: str):
  if name not in SOLVERS:
    raise ValueError(f"solver {name!r} is not known; expected one of "
                     f"{tuple(SOLVERS) + (RKC2,)}")
  return SOLVERS[name]()


def log_time_field(f: Callable) -> Callable:
  """``g(s, y, args) = (1 + t) f(t, y, args)`` with ``t = expm1(s)``."""
  def g(s, y, args):
    t = jnp.expm1(s)
    return jax.tree.map(lambda v: (1.0 + t) * v, f(t, y, args))
  return g


def solve(f: Callable, y0, args, *, t1: float, ts=None, log_time: bool = True,
          rtol: float = 1e-8, atol: float = 1e-10, solver: str = "tsit5",
          max_steps: int = 100_000, gamma_fn: Callable | None = None,
          progress: bool = False, throw: bool = True,
          checkpoints: int | None = None, forward_mode: bool = False) -> Trajectory:
  """Integrates ``dy/dt = f(t, y, args)`` from ``t = 0`` to ``t1`` (traceable).

  Args:
    f: vector field in flow time (see :mod:`contrastjax.gap.flows`).
    y0: initial state pytree.
    args: pytree passed to ``f`` (schedule numbers, fixed ``Z``...); differentiable.
    t1: final flow time.
    ts: flow times to save at (increasing, within ``[0, t1]``); default ``[t1]``.
    log_time: integrate in ``s = log(1 + t)`` (recommended beyond t ~ 100).
    rtol, atol: PID controller tolerances.
    solver: one of :data:`SOLVERS` (diffrax), or ``'rkc2'`` (:mod:`contrastjax.gap.rkc`,
      for the stiff full flow: one RKC2 solve per save interval; forward-mode
      differentiable only, ``checkpoints`` does not apply, the progress bar advances per
      saved time).
    max_steps: step budget (the reverse pass checkpoints within it).
    gamma_fn: ``y -> gamma``; when given, a diffrax event stops the solve as soon as
      ``|gamma| >= 1`` (only needed for ``lift="gamma"``).
    progress: show a tqdm progress bar (over solver time).
    throw: raise on solver failure (e.g. ``max_steps`` reached).
    checkpoints: steps stored for the reverse pass (``RecursiveCheckpointAdjoint``);
      None: diffrax's default (binomial checkpointing over ``max_steps``, which costs
      O(log max_steps) recomputation); about the number of steps taken makes a gradient
      cost ~2-3 forward solves, at ``checkpoints x state`` memory.
    forward_mode: use ``diffrax.ForwardMode`` instead (for ``jax.jvp``/``jax.jacfwd``:
      cheapest when differentiating w.r.t. a few scalars, e.g. ``beta0`` or ``tau1``).
  """
  if not t1 > 0:
    raise ValueError(f"t1 must be > 0, got {t1!r}")
  ts = jnp.asarray([t1] if ts is None else ts, dtype=jnp.result_type(float))
  if log_time:
    field = log_time_field(f)
    s0, s1, save = 0.0, float(np.log1p(t1)), jnp.log1p(ts)
  else:
    field = f
    s0, s1, save = 0.0, float(t1), ts
  if solver == RKC2:
    if checkpoints is not None:
      raise ValueError("checkpoints applies to diffrax's reverse-mode adjoint; solver='rkc2' "
                       "is forward-mode only (use checkpoints=None)")
    return _solve_rkc2(field, y0, args, s1=s1, save=save, log_time=log_time, rtol=rtol,
                       atol=atol, max_steps=max_steps, gamma_fn=gamma_fn,
                       progress=progress, throw=throw)
  term = diffrax.ODETerm(field)
  event = None
  if gamma_fn is not None:
    event = diffrax.Event(lambda s, y, args, **kw: jnp.abs(gamma_fn(y)) >= 1.0)
  sol = diffrax.diffeqsolve(
      term, make_solver(solver), t0=s0, t1=s1, dt0=None, y0=y0, args=args,
      saveat=diffrax.SaveAt(ts=save, t1=True),
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      max_steps=max_steps, event=event, throw=throw,
      adjoint=(diffrax.ForwardMode() if forward_mode else
               diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)),
      progress_meter=diffrax.TqdmProgressMeter() if progress else
      diffrax.NoProgressMeter())
  n = ts.shape[0]
  # After an event diffrax writes the terminal state into the first unreached save
  # slot and inf into the later ones (t1's included): the end is the last finite slot.
  t_all = jnp.expm1(sol.ts) if log_time else sol.ts
  last = jnp.sum(jnp.isfinite(sol.ts)) - 1
  ys = jax.tree.map(lambda v: v[:n], sol.ys)
  y_end = jax.tree.map(lambda v: v[last], sol.ys)
  t_end = t_all[last]
  exited = (jnp.asarray(False) if event is None
            else jnp.asarray(sol.event_mask).reshape(()))
  return Trajectory(ts=t_all[:n], ys=ys, t_end=t_end, y_end=y_end, exited=exited,
                    num_steps=sol.stats["num_steps"],
                    num_rhs=sol.stats.get("num_rhs", sol.stats["num_steps"]))


def _solve_rkc2(g: Callable, y0, args, *, s1: float, save, log_time: bool, rtol: float,
                atol: float, max_steps: int, gamma_fn: Callable | None, progress: bool,
                throw: bool) -> Trajectory:
  """:func:`solve` with :func:`contrastjax.gap.rkc.solve`: one solve per save interval (the
  step size and the step budget carry over), stopping at the gamma event. Save-slot
  conventions as diffrax's: after a stop the first unreached slot holds the end time and
  state, the later ones ``inf``."""
  import equinox as eqx  # pylint: disable=g-import-not-at-top  (diffrax's dependency)
  from contrastjax.gap import rkc  # pylint: disable=g-import-not-at-top

  def field(s, y):
    return g(s, y, args)

  stop = None if gamma_fn is None else (lambda y: jnp.abs(gamma_fn(y)) >= 1.0)
  dtype = jnp.result_type(float)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=save.shape[0], desc="rkc2 save points", leave=False)

  def tick(_):
    if bar is not None:
      bar.update(1)

  def advance(c, target):
    """Continues the solve to ``target``, with the step size and budget left."""
    r = rkc.solve(field, c["y"], t0=c["s"], t1=target, rtol=rtol, atol=atol, h0=c["h"],
                  max_steps=max_steps - c["used"], stop_fn=stop)
    return dict(c, s=r.t, y=r.y, h=r.h, used=c["used"] + r.num_steps + r.num_rejected,
                steps=c["steps"] + r.num_steps, nfev=c["nfev"] + r.num_fevals,
                stopped=r.stopped | (r.t < target))

  def segment(c, s_next):
    c = jax.lax.cond(c["stopped"], lambda c: c, lambda c: advance(c, s_next), c)
    # a slot: the save time when reached; the end after a stop (once); inf after that
    first_unreached = c["stopped"] & ~c["wrote"]
    t_slot = jnp.where(~c["stopped"], s_next, jnp.where(first_unreached, c["s"], jnp.inf))
    y_slot = jax.tree.map(
        lambda v: jnp.where(~c["stopped"] | first_unreached, v, jnp.inf), c["y"])
    c = dict(c, wrote=c["wrote"] | first_unreached)
    if bar is not None:
      jax.debug.callback(tick, t_slot, ordered=True)
    return c, (t_slot, y_slot)

  init = dict(s=jnp.asarray(0.0, dtype), y=jax.tree.map(jnp.asarray, y0),
              h=jnp.asarray(1e-4, dtype), used=jnp.int32(0), steps=jnp.int32(0),
              nfev=jnp.int32(0), stopped=jnp.asarray(False), wrote=jnp.asarray(False))
  c, (t_slots, ys) = jax.lax.scan(segment, init, save)
  # the solve's end: s1 unless it stopped (the saved grid ends at or before s1)
  c = jax.lax.cond(c["stopped"] | (c["s"] >= s1), lambda c: c, lambda c: advance(c, s1), c)
  if bar is not None:
    jax.debug.callback(lambda _: bar.close(), c["s"], ordered=True)
  exited = (jnp.asarray(False) if gamma_fn is None
            else c["stopped"] & stop(c["y"]))
  if throw:
    failed = c["stopped"] & ~exited
    c = dict(c, s=eqx.error_if(
        c["s"], failed, "solver='rkc2' stopped before t1: max_steps reached or the vector "
        "field returned a non-finite value"))
  to_t = jnp.expm1 if log_time else (lambda x: x)
  return Trajectory(ts=to_t(t_slots), ys=ys, t_end=to_t(c["s"]), y_end=c["y"],
                    exited=exited, num_steps=c["steps"], num_rhs=c["nfev"])


def check_exit(traj: Trajectory, *, what: str = "the full feature flow") -> None:
  """Raises :class:`GammaExitError` if the solve stopped because ``|gamma|`` hit 1."""
  if bool(np.asarray(traj.exited)):
    raise GammaExitError(
        f"{what}: gamma left [-1, 1] at t = {float(traj.t_end):.4g} (|gamma| >= 1; the "
        "lifted features [sqrt(1-gamma^2) h, +-gamma] stop existing and 1-gamma^2 < 0 "
        "flips every similarity). This happens under the paper's raw gamma flow while "
        "pairs are mismatched (docs/methods/modality_gap.md). Use lift='sin_phi' (gamma = sin(phi), the "
        "gamma equation slowed by cos(phi)^2) to keep the lift on the sphere.")
