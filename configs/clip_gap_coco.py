r"""python -m contrastjax.train --config=configs/clip_gap_coco.py:demo --workdir=workdirs/clip_demo
  python -m contrastjax.train --config=configs/clip_gap_coco.py:demo,ts --workdir=workdirs/clip_demo_ts
  python -m contrastjax.train --config=configs/clip_gap_coco.py:ts,root=/data/coco \
      --workdir=workdirs/clip_coco_ts

CLIP trained from scratch on MSCOCO with the modality-gap mitigations of Yaras et al.,
"Explaining and Mitigating the Modality Gap in Contrastive Multimodal Learning" (CPAL
2025), §4 and App. E; docs/methods/modality_gap.md.

Variants (the ``:arg``, comma separated; at most one recipe):

* (none) / ``baseline``  learnable tau, beta = exp(nu), OpenCLIP init tau = 0.07, clamp
                       beta <= 100 (Table 2 "Baseline");
* ``flt``              fixed tau = 4e-2 (Table 2 FLT; ``tau=`` for the Table 3 sweep);
* ``ts`` = ``s3``      tau 1e-2 -> 5e-2 linearly per epoch (Table 2 TS); ``s0``/``s1``/
                       ``s2``: to 2e-2/3e-2/4e-2; ``a0``/``a1``: cosine between 1e-2 and
                       2e-2/4e-2 (Table 4);
* ``tr`` = ``softplus``  beta = softplus(nu) (Table 2 TR); ``scale2``/``scale10``:
                       beta = exp(nu/s) (Table 5);
* ``slrt``             temperature learning rate x0.1 (Table 2 SLRT);
* ``hs``               hard swap with p = 1e-3 (Table 2 HS; ``p=`` for Table 5's 1e-1, 1e-2);
* ``ss``               soft swap with p = 5e-2 (Table 2 SS);
* ``demo``             synthetic paired vectors and MLP towers; a few minutes on a CPU;
* ``root=DIR``         COCO folder (else ``$CONTRASTJAX_DATA_DIR/coco``);
* ``bpe=FILE``         CLIP BPE merges (``bpe_simple_vocab_16e6.txt.gz``) instead of the
                       word tokenizer built from the training captions;
* ``cifar10=DIR``      extracted ``cifar-10-batches-py`` folder for the CIFAR-10
                       zero-shot and linear-probe evaluations (else
                       ``$CONTRASTJAX_DATA_DIR/cifar-10-batches-py``); ``cifar10=``
                       (empty) leaves both evaluations out (``demo`` has none);
* ``prompt=NAME``      zero-shot prompt: ``photo`` (default) "a photo of a {class}.";
                       ``paper`` "A photo of the number {class}.", as printed in App. E.2
                       (a copy-paste slip there); or a template with ``{}``;
* ``tvresnet``         image tower = the torchvision-layout ResNet-50 + global average
                       pooling + a linear projection to 1024, instead of the default
                       OpenCLIP ModifiedResNet-50 (RN50: 3-conv stem, anti-aliased
                       strides, attention pooling; ``contrastjax.models.clip_resnet``);

Model ([openclip] ``RN50.json``): ModifiedResNet-50 (layers 3-4-6-3, width 64, 32
attention-pool heads, 224 px) and a 12-layer, width-512, 8-head text Transformer with
context 77, both embedding in 1024 dimensions; 49408 token ids (the CLIP BPE vocabulary
with ``bpe=``; with the word tokenizer its vocabulary, capped at 49408, uses the first
ids and the remaining embedding rows are never looked up).

Paper (Table 2; 3-seed means, RN50, COCO, 100 epochs): gap 0.294 / 0.122 / 0.088 / 0.284 /
0.268 / 0.225 / 0.139 and text R@1 78.4 / 82.7 / 85.3 / 80.1 / 80.4 / 79.7 / 79.2 for
baseline / FLT / TS / TR / SLRT / HS / SS.
Sources of each number: [paper] = Yaras et al. App. E; [openclip] = OpenCLIP default
(``RN50.json``, ``params.py``, ``model.py``); [ours] = not stated, our choice.
"""
from contrastjax.configs import clip


def get_config(arg=None):
  return clip.get_config(arg)
