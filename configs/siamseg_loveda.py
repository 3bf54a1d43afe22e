r"""python -m contrastjax.train --config=configs/siamseg_loveda.py \
      --config.data.root=data/LoveDA --workdir=workdirs/siamseg_loveda_r2u \
      [--config.siamseg.pretrained=pretrained/mit_b5.pth]

SiamSeg on LoveDA Rural -> Urban (reference ``configs/SiamSeg/siamseg_daformer_sepaspp_mitb5_
512x512_40k_Rural_2_Urban.py``): MiT-B5 + DAFormer head (sep-ASPP), DACS self-training (EMA
teacher 0.999, pseudo threshold 0.968, ClassMix, colour jitter + blur) + SimSiam on two target
views; AdamW 6e-5 (head x10, no decay on ``*norm*``), 1500 warm-up then poly 1.0 over 40k steps,
512 crops, global batch 24 (reference: 6 source + 6 target per GPU x 4 GPUs). ``--config.data.root``
is the folder holding ``Train/`` and ``Val/`` (official zips unpacked); evaluation is on
``Val/Urban`` (the reference's val = test).

Variants (``--config=configs/siamseg_loveda.py:ARG``): ``urban2rural`` (Urban -> Rural; the
reference ships no such config, same recipe), ``dacs`` (no SimSiam), ``source_only``, ``tta``
(the reference's 4-scale LoveDA evaluation: 0.75/1/1.25/1.5 of 1024), ``slide``, ``paper``
(batch-wide ClassMix classes, as when the paper's numbers were produced), ``demo`` (synthetic
two-domain aerial data, tiny MiT; two commands of ~2-3 minutes each on a 2-core CPU:
``demo,source_only --workdir=workdirs/ss_src``, then ``demo,init_from=workdirs/ss_src``),
``pretrained=FILE``, ``init_from=DIR``, ``root=DIR``.

Paper (Wang et al. 2024, arXiv:2410.13471, LoveDA Rural -> Urban, mIoU / mF1 on Val Urban with
the 4-scale TTA): the result tables could not be retrieved when this port was written (only
the abstract was readable), so no target is quoted here (docs/methods/siamseg.md). Reference
hardware: 4 GPUs, 40k iterations, no released checkpoints.
"""
from contrastjax.configs import siamseg


def get_config(arg=None):
  return siamseg.get_config("loveda", arg)
