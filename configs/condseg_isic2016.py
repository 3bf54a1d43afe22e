r"""python -m contrastjax.train --config=configs/condseg_isic2016.py:stage1 \
      --config.data.root=/data/ISIC2016 --workdir=workdirs/condseg_isic2016_stage1
  python -m contrastjax.train --config=configs/condseg_isic2016.py:init_from=workdirs/condseg_isic2016_stage1 \
      --config.data.root=/data/ISIC2016 --workdir=workdirs/condseg_isic2016

ConDSeg on ISIC2016 (dermoscopy, skin lesion; 1279 images, split 900/379).
Stage 1 (Consistency Reinforcement) above, then stage 2 from its best checkpoint.
Add ``backbone=/path/resnet50-19c8e357.pth`` to both (ImageNet encoder, as the reference),
``paper`` to reproduce the reference's original numerics, ``demo`` for the synthetic demo.

Paper (Lei et al., AAAI 2025, Tables 1-2; ResNet-50 encoder assumed): mIoU 86.8, mDSC 92.5.
Dataset notes: Official 900/379 split. Official masks are <id>_Segmentation.png: pass mask_suffix="_Segmentation" or rename.
"""
from contrastjax.configs import condseg


def get_config(arg=None):
  return condseg.get_config("isic2016", arg)
