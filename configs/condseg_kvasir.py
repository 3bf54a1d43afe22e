r"""python -m contrastjax.train --config=configs/condseg_kvasir.py:stage1 \
      --config.data.root=/data/Kvasir-SEG --workdir=workdirs/condseg_kvasir_stage1
  python -m contrastjax.train --config=configs/condseg_kvasir.py:init_from=workdirs/condseg_kvasir_stage1 \
      --config.data.root=/data/Kvasir-SEG --workdir=workdirs/condseg_kvasir

ConDSeg on Kvasir-SEG (endoscopy, polyp; 1000 images, split 880/120).
Stage 1 (Consistency Reinforcement) above, then stage 2 from its best checkpoint.
Add ``backbone=/path/resnet50-19c8e357.pth`` to both (ImageNet encoder, as the reference),
``paper`` to reproduce the reference's original numerics, ``demo`` for the synthetic demo.

Paper (Lei et al., AAAI 2025, Tables 1-2; ResNet-50 encoder assumed): mIoU 84.6, mDSC 90.5, recall 92.3, precision 91.7.
Dataset notes: ColonSegNet/TGANet train.txt/val.txt; val doubles as test. Masks are JPEG (3-channel, near-gray, noisy edges).
"""
from contrastjax.configs import condseg


def get_config(arg=None):
  return condseg.get_config("kvasir_seg", arg)
