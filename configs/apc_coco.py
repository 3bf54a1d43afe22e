r"""python -m contrastjax.train --config=configs/apc_coco.py --config.data.root=/data/MSCOCO \
      --config.apc.pretrained=/weights/ViT-B_16.npz --workdir=workdirs/apc_coco

APC (Wu et al., EAAI 139:109626, arXiv 2407.10649) on COCO 2014 (80 + 1 classes) in the
layout WSSS code uses (JPEGImages/, SegmentationClass/, cls_labels.npy); evaluation:
segmentation mIoU on val. A documented reconstruction: docs/methods/apc.md.
Variants: gmp, topk, akp, akp_pcl, apc (default), supervised; rule=, recipe=.

Reference numbers (COCO 2014 val): ViT-PCM 45.03 (released weights); ToCo ViT-B
multi-scale + CRF 42.2; APC 45.7 (a third-party listing, unverified).
"""
from contrastjax.configs import apc


def get_config(arg=None):
  return apc.get_config("coco_wsss", arg)
