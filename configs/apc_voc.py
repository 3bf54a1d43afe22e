r"""python -m contrastjax.train --config=configs/apc_voc.py --config.data.root=/data/VOCdevkit \
      --config.apc.pretrained=/weights/ViT-B_16.npz --workdir=workdirs/apc_voc
  python -m contrastjax.train --config=configs/apc_voc.py:demo --workdir=workdirs/apc_demo

APC (Wu et al., EAAI 139:109626, arXiv 2407.10649) on PASCAL VOC 2012 + SBD train_aug
(10,582 images, image-level labels only); evaluation: pseudo-label mIoU on VOC train
(1,464) and segmentation mIoU on val (1,449). A documented reconstruction (no public
code or full text): docs/methods/apc.md lists every open choice and its switch.
Variants: gmp, topk, akp, akp_pcl, apc (default), supervised; rule=, recipe=, demo.

Reference numbers (VOC 2012): ViT-PCM train 71.39 / val 69.32 (ECCV 2022 README; released
weights 71.79 / 69.23); ToCo ViT-B single-scale val 69.2 (multi-scale + CRF 71.1); APC
not retrievable.
"""
from contrastjax.configs import apc


def get_config(arg=None):
  return apc.get_config("voc", arg)
