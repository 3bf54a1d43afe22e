"""The modality-gap dynamics simulator's configs (Yaras et al., CPAL 2025): one recipe
per variant of ``python -m contrastjax.gap.simulate``; ``configs/gap_dynamics.py`` is the
command-line shim. Importable from the installed package (the Colab notebook builds its
configs here): ``contrastjax.configs.gap.get_config('fig2')``.

Variants (``:name``; combine with ``--config.key=value`` overrides, unknown keys fail):

  scalar         Sec. 3.1 scalar model, beta0=2, gamma0=0.5, beta=e^nu, to t=1e12
  fig2           full feature flow, n=8, d=2, tau0=0.1, gamma0=0.3, exp (Fig. 2)
  fig2_softplus  the same with beta = softplus(nu) (TR): the gap closes
  clip_size      n=512, d=64, tau0=0.07, gamma0=0.3 with gamma = sin(phi) (the raw flow
                 leaves [-1, 1] at t ~ 0.72 at this size: BENCHMARKS.md)
  schedule_opt   gradient descent on a temperature schedule through the simulation,
                 compared with the paper's FLT/TS schedules (S0-S3, A0/A1)

Outputs in --workdir: trajectory.json, dynamics.png (gap, tau, margin vs log t),
snapshots.png (features on the sphere), and schedule_opt.json/.png for schedule_opt.
"""
from __future__ import annotations

import ml_collections

from contrastjax.errors import ConfigError

VARIANTS = ("default", "scalar", "fig2", "fig2_softplus", "clip_size", "schedule_opt")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = (arg or "default").strip()
  if variant not in VARIANTS:
    raise ConfigError(f"configs/gap_dynamics.py: variant {variant!r} is not known; "
                     f"expected one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.model = "features"         # features | scalar
  c.n = 8
  c.d = 2
  c.seed = 0
  c.tau0 = 0.1                 # initial temperature (beta0 = 1/tau0)
  c.gamma0 = 0.3
  c.parameterization = "exp"   # exp | softplus | exp_scaled | linear
  c.scale = 1.0                # s of exp_scaled
  c.temperature = "learned"    # learned | schedule
  c.schedule = "fixed"         # fixed | linear | cosine (when temperature=schedule)
  c.tau1 = 0.05
  c.horizon = 100.0
  c.period = 20.0
  c.lift = "gamma"             # gamma | sin_phi
  c.train_features = True
  c.mismatch = ""              # fixed mismatch pattern: swapped pairs, e.g. "3-8" or "0-1,2-5"
  c.t1 = 1e5
  c.t_min = 1e-2               # first saved time > 0 (log-spaced grid from here)
  c.num_save = 120
  c.snapshot_times = (0.0, 0.4, 2.3, 4.0, 100.0, 1e5)
  c.rtol = 1e-8
  c.atol = 1e-10
  c.solver = "tsit5"          # diffrax: tsit5 | dopri5 | dopri8 | bosh3 | kvaerno5; or rkc2
                               # (gap.rkc: stiff long horizons of the full flow, forward-mode only)
  c.max_steps = 200_000
  c.on_exit = "raise"          # raise | report: what to do if gamma leaves [-1, 1]
  c.progress = True
  c.opt = ml_collections.ConfigDict(dict(
      steps=25, lr=0.2, num_knots=6, tau_min=0.01, tau_max=0.05, margin_target=0.2,
      penalty=100.0, horizon=100.0, rtol=1e-6, atol=1e-8))

  if variant == "scalar":
    c.model = "scalar"
    c.tau0 = 0.5               # beta0 = 2
    c.gamma0 = 0.5
    c.t1 = 1e12
    c.rtol, c.atol = 1e-10, 1e-12
    c.snapshot_times = ()
  elif variant == "fig2_softplus":
    c.parameterization = "softplus"
  elif variant == "clip_size":
    c.n, c.d = 512, 64
    c.tau0 = 0.07
    c.lift = "sin_phi"
    c.t1 = 1e3
    c.num_save = 40
    c.rtol, c.atol = 1e-6, 1e-9
    c.snapshot_times = (0.0, 1.0, 10.0, 1e3)
  elif variant == "schedule_opt":
    c.temperature = "schedule"
    c.schedule = "knots"
    c.t1 = 100.0
    c.tau0 = 0.01
    c.snapshot_times = (0.0, 1.0, 10.0, 100.0)
  return c
