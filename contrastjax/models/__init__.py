"""Flax linen (NHWC) models of the reimplemented methods and their shared building blocks.

Building blocks:

* ``nn``: PyTorch-convention layers: torch default inits, ``Conv2d``, ``BatchNorm``
  (optionally per-group statistics), ``CBR``, ``max_pool``.
* ``conv_grad``: ``conv2d`` (NHWC/HWIO), with the kernel gradient as per-tap matmuls on
  the CPU backend and XLA's own elsewhere (``impl='auto'``).
* ``resample``: bilinear resizes: align-corners (``resize_bilinear_align_corners``,
  ``upsample``, gather-based adjoint) and half-pixel (``resize_bilinear_half_pixel``).
* ``torch_import``: PyTorch ``state_dict`` naming (``TorchNames``) and its I/O
  (``read_state_dict``, ``load_state_dict``, ``to_state_dict``).
* ``transformer``: what the transformer encoders share (Dense/LayerNorm factories,
  traced-rate stochastic depth, stacked-layout leaf helpers).

Models:

* ``resnet``: torchvision ResNet-50 (v1.5) encoder.
* ``condseg``: ConDSeg (stage I and II); ``condseg_ops``: its own blocks (CBAM attention,
  ``unfold`` / ``fold``, CDFA's ``outlook_aggregate``).
* ``clip``: CLIP-style two-tower models; ``clip_resnet``: OpenCLIP's ModifiedResNet (RN50).
* ``mit``: Mix Transformer (MiT-B0..B5), the SegFormer encoder.
* ``daformer``: DAFormer decode head, SimSiam branch and the SiamSeg network.
* ``vit``: Vision Transformer (ViT-Ti/S/B/L), the APC / ViT-PCM encoder.
* ``apc``: APC model pieces (HV-BiLSTM patch conditioning, patch classifier, decoders).
"""
