r"""python -m contrastjax.train --config=configs/siamseg_potsdam_vaihingen.py:task=potsdam_irrg2vaihingen_irrg \
      --config.data.root=data --workdir=workdirs/siamseg_p2v_irrg \
      [--config.siamseg.pretrained=pretrained/mit_b5.pth]

SiamSeg on the ISPRS 2D labelling benchmark, Potsdam <-> Vaihingen (reference
``configs/SiamSeg/siamseg_daformer_sepaspp_mitb5_512x512_40k_<Task>.py``): the four reference tasks

* ``task=potsdam_irrg2vaihingen_irrg`` (default), ``task=potsdam_rgb2vaihingen_irrg``,
* ``task=vaihingen_irrg2potsdam_irrg``, ``task=vaihingen_irrg2potsdam_rgb`` (eval every 500).

``--config.data.root`` holds the tiled folders ``Potsdam_IRRG_DA``, ``Potsdam_RGB_DA``,
``Vaihingen_IRRG_DA`` (make them with ``python -m contrastjax.data.tools.isprs_tiles``). 6 classes
(clutter included in mIoU), CE class weights tree 1.25, car 1.5, clutter 1.5; 512 crops,
whole-image evaluation on the target domain's val tiles; the rest of the recipe as LoveDA.

Other variants (comma separated): ``dacs``, ``source_only``, ``slide``, ``tta``, ``paper``,
``demo``, ``pretrained=FILE``, ``init_from=DIR``, ``root=DIR``.

Paper (Wang et al. 2024, arXiv:2410.13471, per-task mIoU / mF1 of P-IRRG->V-IRRG, P-RGB->V-IRRG,
V-IRRG->P-IRRG, V-IRRG->P-RGB): the result tables could not be retrieved when this port was
written, so no target is quoted here (docs/methods/siamseg.md).
"""
from contrastjax.configs import siamseg


def get_config(arg=None):
  return siamseg.get_config("isprs", arg)
