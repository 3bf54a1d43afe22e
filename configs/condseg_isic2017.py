r"""python -m contrastjax.train --config=configs/condseg_isic2017.py:stage1 \
      --config.data.root=/data/ISIC2017 --workdir=workdirs/condseg_isic2017_stage1
  python -m contrastjax.train --config=configs/condseg_isic2017.py:init_from=workdirs/condseg_isic2017_stage1 \
      --config.data.root=/data/ISIC2017 --workdir=workdirs/condseg_isic2017

ConDSeg on ISIC2017 (dermoscopy, skin lesion; 2750 images, split 2000/150/600).
Stage 1 (Consistency Reinforcement) above, then stage 2 from its best checkpoint.
Add ``backbone=/path/resnet50-19c8e357.pth`` to both (ImageNet encoder, as the reference),
``paper`` to reproduce the reference's original numerics, ``demo`` for the synthetic demo.

Paper (Lei et al., AAAI 2025, Tables 1-2; ResNet-50 encoder assumed): mIoU 80.9, mDSC 88.3.
Dataset notes: Official 2000/150/600 split. How the authors combined val and test is not visible in their code (issue #12). Masks are <id>_Segmentation.png.
"""
from contrastjax.configs import condseg


def get_config(arg=None):
  return condseg.get_config("isic2017", arg)
