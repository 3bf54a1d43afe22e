r"""python -m contrastjax.gap.simulate --config=configs/gap_dynamics.py:fig2 --workdir=workdirs/gap_fig2

Modality-gap dynamics (Yaras et al., CPAL 2025) as explicit gradient-flow simulations.
Variants: scalar, fig2, fig2_softplus, clip_size, schedule_opt (the recipes and what each
reproduces: contrastjax/configs/gap.py); outputs in --workdir: trajectory.json,
dynamics.png, snapshots.png (schedule_opt.json/.png for schedule_opt).
"""
from contrastjax.configs import gap


def get_config(arg=None):
  return gap.get_config(arg)
