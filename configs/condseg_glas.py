r"""python -m contrastjax.train --config=configs/condseg_glas.py:stage1 \
      --config.data.root=/data/GlaS --workdir=workdirs/condseg_glas_stage1
  python -m contrastjax.train --config=configs/condseg_glas.py:init_from=workdirs/condseg_glas_stage1 \
      --config.data.root=/data/GlaS --workdir=workdirs/condseg_glas

ConDSeg on GlaS (histology (WSI), gland; 165 images, split 85/80).
Stage 1 (Consistency Reinforcement) above, then stage 2 from its best checkpoint.
Add ``backbone=/path/resnet50-19c8e357.pth`` to both (ImageNet encoder, as the reference),
``paper`` to reproduce the reference's original numerics, ``demo`` for the synthetic demo.

Paper (Lei et al., AAAI 2025, Tables 1-2; ResNet-50 encoder assumed): mIoU 85.1, mDSC 91.6, recall 93.5, precision 90.5.
Dataset notes: Official 85/80 split (testA+testB as val). Masks are instance labels 0..K (official names <id>_anno.bmp: pass mask_suffix="_anno" or rename); foreground is label > 0 (issue #18).
"""
from contrastjax.configs import condseg


def get_config(arg=None):
  return condseg.get_config("glas", arg)
