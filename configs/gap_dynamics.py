r"""python -m contrastjax.gap.simulate --config=configs/gap_dynamics.py:fig2 --workdir=workdirs/gap_fig2

Modality-gap dynamics (Yaras et al., CPAL 2025) as explicit gradient-flow simulations.
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
from contrastjax.configs import gap


def get_config(arg=None):
  return gap.get_config(arg)
