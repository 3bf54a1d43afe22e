r"""python -m contrastjax.train --config=configs/condseg_kvasir_sessile.py:stage1 \
      --config.data.root=/data/Kvasir-Sessile --workdir=workdirs/condseg_kvasir_sessile_stage1
  python -m contrastjax.train --config=configs/condseg_kvasir_sessile.py:init_from=workdirs/condseg_kvasir_sessile_stage1 \
      --config.data.root=/data/Kvasir-Sessile --workdir=workdirs/condseg_kvasir_sessile

ConDSeg on Kvasir-Sessile (endoscopy, polyp; 196 images, split 156/20/20).
Stage 1 (Consistency Reinforcement) above, then stage 2 from its best checkpoint.
Add ``backbone=/path/resnet50-19c8e357.pth`` to both (ImageNet encoder, as the reference),
``paper`` to reproduce the reference's original numerics, ``demo`` for the synthetic demo.

Paper (Lei et al., AAAI 2025, Tables 1-2; ResNet-50 encoder assumed): mIoU 81.2, mDSC 89.1, recall 90.1, precision 90.0.
Dataset notes: Random 156/20/20 split as in TGANet; the authors did not release it (issues #12, #20), so numbers on another split differ.
"""
from contrastjax.configs import condseg


def get_config(arg=None):
  return condseg.get_config("kvasir_sessile", arg)
