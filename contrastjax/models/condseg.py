"""ConDSeg (Lei et al., AAAI 2025) with the ResNet-50 encoder, in Flax linen (NHWC).

A port of the reference ``network/model.py`` and ``network/model_stage1.py``
(github.com/Mengqi-Lei/ConDSeg); see docs/methods/condseg.md for shapes and parameter
counts. Module names follow the paper; the reference's names are given in each
docstring, and :func:`load` / :func:`to_torch_state_dict` convert between the reference
``state_dict`` (937 keys for ConDSeg) and Flax variables.

Data flow of :class:`ConDSeg` for a ``[B, H, W, 3]`` input (H, W multiples of 16)::

  x1..x4   = encoder (ResNet-50 layer0..layer3)            at H/2, H/4, H/8, H/16
  d1..d4   = DilatedConv (FEM) of x1..x4                      dim channels
  f_fg, f_bg, f_uc = SemanticInformationDecoupling(x4)        at H/16
  fg/bg/uc = AuxiliaryHead(f_fg, f_bg, f_uc)                  at H (sigmoid)
  f4 = CDFA(d4, pre_fg4(f_fg), pre_bg4(f_bg));  f3 = CDFA(cat[d3, up2(f4)], ...); ... f1
  f_small = SAD(f2, f1), f_middle = SAD(f3, f2), f_large = SAD(f4, f3)
  mask = sigmoid(OutputBlock(f_small, f_middle, f_large))     at H

All upsampling is bilinear with ``align_corners=True``, as in the reference.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.models import resnet
from contrastjax.models.condseg_ops import (
    CHANNEL_ATTENTION_NAMES, ChannelAttention, SPATIAL_ATTENTION_NAMES,
    SpatialAttention, outlook_aggregate)
from contrastjax.models.nn import (
    CBR, Conv2d, TORCH_DEFAULT_KERNEL_INIT, torch_default_bias_init)
from contrastjax.models.resample import upsample
from contrastjax.models.torch_import import (
    CBR_NAMES, CONV_NAMES, LINEAR_NAMES, TorchNames, load_state_dict, read_state_dict,
    to_state_dict)

Array = jax.Array
Dtype = Any
PyTree = Any

_BRANCHES = ("fg", "bg", "uc")


def _dense(features: int, fan_in: int, dtype: Dtype, name: str) -> nn.Dense:
  """``torch.nn.Linear`` with PyTorch's default init."""
  return nn.Dense(features, dtype=dtype, kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                  bias_init=torch_default_bias_init(fan_in), name=name)


class DilatedConv(nn.Module):
  """The feature-enhancement ("Dil. Conv") block; reference ``dilated_conv``.

  Four parallel branches (1x1, and 3x3 with dilation 6/12/18), each CBR followed by
  channel attention, are concatenated and fused by a 3x3 CBR without ReLU; a 1x1 CBR
  shortcut without ReLU is added, then ReLU and spatial attention.

  Attributes:
    features: Output channels (128 in the reference).
    dtype: Compute dtype.
  """
  features: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps ``[B, H, W, C_in]`` to ``[B, H, W, features]``."""
    f, dt = self.features, self.dtype
    branches = []
    for i, dilation in enumerate((0, 6, 12, 18), start=1):
      if dilation == 0:
        cbr = CBR(f, 1, padding=0, dtype=dt, name=f"c{i}_cbr")
      else:
        cbr = CBR(f, 3, padding=dilation, dilation=dilation, dtype=dt, name=f"c{i}_cbr")
      branches.append(ChannelAttention(dtype=dt, name=f"c{i}_ca")(cbr(x, train)))
    xc = CBR(f, 3, padding=1, act=False, dtype=dt, name="c5")(
        jnp.concatenate(branches, axis=-1), train)
    xs = CBR(f, 1, padding=0, act=False, dtype=dt, name="c6")(x, train)
    return SpatialAttention(dtype=dt, name="sa")(nn.relu(xc + xs))


class SemanticInformationDecoupling(nn.Module):
  """Semantic Information Decoupling (SID); reference ``DecoupleLayer``.

  Three independent branches (foreground, background, uncertainty), each
  CBR3x3(-> mid) -> CBR3x3(-> features) -> CBR1x1(-> features), all with ReLU.

  Attributes:
    features: Output channels of each branch (128).
    mid_features: Width of the first CBR (512).
    dtype: Compute dtype.
  """
  features: int = 128
  mid_features: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> tuple[Array, Array, Array]:
    """Returns ``(f_fg, f_bg, f_uc)``, each ``[B, H, W, features]``."""
    outs = []
    for branch in _BRANCHES:
      y = CBR(self.mid_features, 3, 1, dtype=self.dtype, name=f"cbr_{branch}_0")(x, train)
      y = CBR(self.features, 3, 1, dtype=self.dtype, name=f"cbr_{branch}_1")(y, train)
      y = CBR(self.features, 1, 0, dtype=self.dtype, name=f"cbr_{branch}_2")(y, train)
      outs.append(y)
    return outs[0], outs[1], outs[2]


class AuxiliaryBranch(nn.Module):
  """One branch of the auxiliary head: ``len(widths)`` 3x3 CBRs with a x2 upsampling
  between consecutive ones, then a biased 1x1 conv to one channel (logits).

  Attributes:
    widths: CBR output widths (reference: 256, 256, 128, 64, 64).
    dtype: Compute dtype.
  """
  widths: Sequence[int] = (256, 256, 128, 64, 64)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps ``[B, h, w, C]`` to logits ``[B, h * 2**(len(widths)-1), ..., 1]``."""
    for i, width in enumerate(self.widths):
      if i > 0:
        x = upsample(x, 2)
      x = CBR(width, 3, 1, dtype=self.dtype, name=f"cbr_{i}")(x, train)
    return Conv2d(1, 1, use_bias=True, dtype=self.dtype, name="out_conv")(x)


class AuxiliaryHead(nn.Module):
  """Auxiliary head predicting the foreground, background and uncertainty maps.

  Reference ``AuxiliaryHead``; the reference ends each branch with a sigmoid, which
  :class:`ConDSeg` applies to the logits returned here.

  Attributes:
    widths: CBR widths of each branch.
    dtype: Compute dtype.
  """
  widths: Sequence[int] = (256, 256, 128, 64, 64)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_fg: Array, f_bg: Array, f_uc: Array,
               train: bool) -> tuple[Array, Array, Array]:
    """Returns the ``(fg, bg, uc)`` logits at 16x the input resolution."""
    return tuple(
        AuxiliaryBranch(self.widths, dtype=self.dtype, name=f"branch_{b}")(f, train)
        for b, f in zip(_BRANCHES, (f_fg, f_bg, f_uc)))


class CDFAPreprocess(nn.Module):
  """Brings a decoupled feature to a CDFA's resolution; reference ``CDFAPreprocess``.

  ``c1`` = CBR3x3, then ``log2(up_scale)`` times [x2 bilinear upsampling, CBR3x3].

  Attributes:
    features: Output channels.
    up_scale: Power-of-two upsampling factor (1, 2, 4 or 8 in ConDSeg).
    dtype: Compute dtype.
  """
  features: int = 128
  up_scale: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps ``[B, h, w, C]`` to ``[B, h * up_scale, w * up_scale, features]``."""
    up_times = int(math.log2(self.up_scale))
    if 2**up_times != self.up_scale:
      raise ValueError(f"up_scale must be a power of two, got {self.up_scale}")
    x = CBR(self.features, 3, 1, dtype=self.dtype, name="c1")(x, train)
    for i in range(up_times):
      x = CBR(self.features, 3, 1, dtype=self.dtype, name=f"conv_{i}")(
          upsample(x, 2), train)
    return x


class ContrastDrivenFeatureAggregation(nn.Module):
  """Contrast-Driven Feature Aggregation (CDFA): outlook attention guided by fg/bg.

  Reference ``ContrastDrivenFeatureAggregation`` (kernel 3, padding 1, stride 1):

  1. ``x = input_cbr(x)`` (two 3x3 CBRs), ``v = Linear_v(x)``.
  2. Values: the 3x3 neighbourhoods of ``v`` (``nn.Unfold`` layout, channel
     ``c*9 + kpos`` with ``c = head*head_dim + d``).
  3. Attention: ``softmax(scale * Linear_attn_fg(fg))`` with the ``heads*9*9`` outputs
     laid out as (head, i, j): weight of source position ``j`` for window position
     ``i``; softmax over ``j``, ``scale = head_dim**-0.5``.
  4. ``out[i] = sum_j A[i, j] v[j]`` per head, then ``fold`` (overlaps summed) and
     ``proj``: this is ``x_fg``.
  5. The background pass repeats 3.-4. with ``Linear_attn_bg(bg)`` on the
     neighbourhoods of ``x_fg`` itself (no ``v`` projection) and the same ``proj``.
  6. ``out = output_cbr(x_bg)`` (two 3x3 CBRs).

  Attributes:
    dim: Channels of the attention and the output (128).
    num_heads: Attention heads (4).
    kernel_size: Window size (3).
    padding: Window padding (1).
    dtype: Compute dtype (the softmax runs in at least float32).
  """
  dim: int = 128
  num_heads: int = 4
  kernel_size: int = 3
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, fg: Array, bg: Array, train: bool) -> Array:
    """Aggregates ``x`` ``[B, H, W, C_in]`` guided by ``fg``/``bg`` ``[B, H, W, dim]``."""
    dim, heads, k, dt = self.dim, self.num_heads, self.kernel_size, self.dtype
    if dim % heads:
      raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
    if k != 2 * self.padding + 1:
      raise ValueError("kernel_size must equal 2 * padding + 1 (same-size windows)")
    head_dim, k2 = dim // heads, k * k
    scale = head_dim**-0.5

    for i in range(2):
      x = CBR(dim, 3, 1, dtype=dt, name=f"input_cbr_{i}")(x, train)
    b, h, w, _ = x.shape
    proj = _dense(dim, dim, dt, "proj")

    def attention(guide: Array, layer_name: str) -> Array:
      logits = _dense(heads * k2 * k2, dim, dt, layer_name)(guide)
      logits = logits.reshape(b, h, w, heads, k2, k2)
      logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) * scale
      return jax.nn.softmax(logits, axis=-1).astype(dt)

    def aggregate(values: Array, attn: Array) -> Array:
      # fold(einsum('bxyhij,bxyhdj->bxyhdi', attn, unfold(values))), computed without
      # the unfolded copy (outlook_aggregate).
      return proj(outlook_aggregate(values, attn, k, self.padding))

    v = _dense(dim, dim, dt, "v")(x)
    x_fg = aggregate(v, attention(fg, "attn_fg"))
    x_bg = aggregate(x_fg, attention(bg, "attn_bg"))
    for i in range(2):
      x_bg = CBR(dim, 3, 1, dtype=dt, name=f"output_cbr_{i}")(x_bg, train)
    return x_bg


class SizeAwareDecoder(nn.Module):
  """One Size-Aware Decoder block; reference ``decoder_block`` (ConDSeg has three).

  ``cat[up2(x), skip]`` -> ``s1 = CBR1x1`` -> ``s2 = relu(CBR3x3'(s1) + s1)`` ->
  ``s3 = relu(CBR3x3'(s2) + s2 + s1)`` -> ``relu(CBR1x1'(s3) + s3 + s2 + s1)`` ->
  channel attention -> spatial attention (' = no ReLU).

  Attributes:
    features: Output channels (128).
    dtype: Compute dtype.
  """
  features: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array, train: bool) -> Array:
    """Decodes coarse ``x`` with ``skip`` (at twice ``x``'s resolution)."""
    f, dt = self.features, self.dtype
    x = jnp.concatenate([upsample(x, 2), skip], axis=-1)
    s1 = CBR(f, 1, 0, dtype=dt, name="c1")(x, train)
    s2 = nn.relu(CBR(f, 3, 1, act=False, dtype=dt, name="c2")(s1, train) + s1)
    s3 = nn.relu(CBR(f, 3, 1, act=False, dtype=dt, name="c3")(s2, train) + s2 + s1)
    x = nn.relu(CBR(f, 1, 0, act=False, dtype=dt, name="c4")(s3, train) + s3 + s2 + s1)
    x = ChannelAttention(dtype=dt, name="ca")(x)
    return SpatialAttention(dtype=dt, name="sa")(x)


class OutputBlock(nn.Module):
  """Fuses the three decoder outputs into mask logits; reference ``output_block``.

  ``cat[x1, up2(x2), up4(x3)]`` -> CBR3x3 ``fuse`` -> up2 -> CBR3x3 ``c1`` -> CBR1x1
  ``c2`` -> biased 1x1 conv ``c3`` to one channel (the reference then applies a
  sigmoid; :class:`ConDSeg` does that).

  Attributes:
    features: Width of ``fuse`` (128).
    head_widths: Widths of ``c1`` and ``c2`` (128, 64).
    dtype: Compute dtype.
  """
  features: int = 128
  head_widths: tuple[int, int] = (128, 64)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x1: Array, x2: Array, x3: Array, train: bool) -> Array:
    """Returns logits at twice ``x1``'s resolution."""
    dt = self.dtype
    x = jnp.concatenate([x1, upsample(x2, 2), upsample(x3, 4)], axis=-1)
    x = CBR(self.features, 3, 1, dtype=dt, name="fuse")(x, train)
    x = upsample(x, 2)
    x = CBR(self.head_widths[0], 3, 1, dtype=dt, name="c1")(x, train)
    x = CBR(self.head_widths[1], 1, 0, dtype=dt, name="c2")(x, train)
    return Conv2d(1, 1, use_bias=True, dtype=dt, name="c3")(x)


def _check_input(x: Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
  if x.shape[1] % 16 or x.shape[2] % 16:
    raise ValueError(f"image height and width must be multiples of 16, got {x.shape[1:3]}")


class ConDSeg(nn.Module):
  """ConDSeg with the ResNet-50 encoder (reference ``network/model.py``).

  The defaults are the reference model (45,552,786 parameters); the fields can shrink
  it for CPU demos and tests.

  Attributes:
    stage_sizes: Encoder blocks per stage (ResNet-50: 3, 4, 6).
    stem_width: Encoder stem width (64).
    base_width: Encoder ``layer1`` bottleneck width (64).
    dim: Width of FEM, CDFA, SAD and decoupled features (128).
    decouple_mid: Middle width of the SID branches (512).
    num_heads: CDFA heads (4).
    aux_widths: Auxiliary-head CBR widths (five entries: four x2 upsamplings).
    dtype: Compute dtype; parameters and BN statistics stay float32 and the returned
      maps are float32 (float64 for a float64 dtype).
  """
  stage_sizes: Sequence[int] = (3, 4, 6)
  stem_width: int = 64
  base_width: int = 64
  dim: int = 128
  decouple_mid: int = 512
  num_heads: int = 4
  aux_widths: Sequence[int] = (256, 256, 128, 64, 64)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict[str, Any]]:
    """Segments a batch of images.

    Args:
      x: ``[B, H, W, 3]`` float32 images, H and W multiples of 16.
      train: BatchNorm mode. With ``train=True`` pass ``mutable=['batch_stats']``.

    Returns:
      ``(mask, aux)``: ``mask`` is the sigmoid probability ``[B, H, W, 1]``; ``aux`` has
      ``'mask_logits'``, the auxiliary maps ``'fg'``, ``'bg'``, ``'uc'`` (sigmoid,
      ``[B, H, W, 1]``) and their ``'*_logits'``, and ``'features'``: the intermediates
      ``x1..x4, d1..d4, f_fg, f_bg, f_uc, f_fg1..4, f_bg1..4, f1..f4, f_small,
      f_middle, f_large`` (NHWC).
    """
    _check_input(x)
    if len(self.stage_sizes) != 3:
      raise ValueError(f"ConDSeg uses encoder stages layer1..layer3, got "
                       f"stage_sizes={self.stage_sizes}")
    if len(self.aux_widths) != 5:
      raise ValueError(f"aux_widths needs 5 entries (4 x2 upsamplings to full "
                       f"resolution), got {self.aux_widths}")
    dim, dt = self.dim, self.dtype
    enc = resnet.ResNet(self.stage_sizes, self.stem_width, self.base_width, dtype=dt,
                        name="encoder")(x, train=train)
    feats: dict[str, Array] = {f"x{i + 1}": enc[f"layer{i}"] for i in range(4)}
    for i in range(1, 5):
      feats[f"d{i}"] = DilatedConv(dim, dtype=dt, name=f"dconv{i}")(feats[f"x{i}"], train)

    f_fg, f_bg, f_uc = SemanticInformationDecoupling(
        dim, self.decouple_mid, dtype=dt, name="decouple_layer")(feats["x4"], train)
    feats.update(f_fg=f_fg, f_bg=f_bg, f_uc=f_uc)
    fg_logits, bg_logits, uc_logits = AuxiliaryHead(
        tuple(self.aux_widths), dtype=dt, name="aux_head")(f_fg, f_bg, f_uc, train)

    for level, up in ((4, 1), (3, 2), (2, 4), (1, 8)):
      for branch, f in (("fg", f_fg), ("bg", f_bg)):
        feats[f"f_{branch}{level}"] = CDFAPreprocess(
            dim, up, dtype=dt, name=f"preprocess_{branch}{level}")(f, train)

    prev = None
    for level in (4, 3, 2, 1):
      inp = feats[f"d{level}"]
      if prev is not None:
        inp = jnp.concatenate([inp, upsample(prev, 2)], axis=-1)
      prev = ContrastDrivenFeatureAggregation(dim, self.num_heads, dtype=dt,
                                              name=f"cdfa{level}")(
          inp, feats[f"f_fg{level}"], feats[f"f_bg{level}"], train)
      feats[f"f{level}"] = prev

    for size, (coarse, fine) in (("small", ("f2", "f1")), ("middle", ("f3", "f2")),
                                 ("large", ("f4", "f3"))):
      feats[f"f_{size}"] = SizeAwareDecoder(dim, dtype=dt, name=f"decoder_{size}")(
          feats[coarse], feats[fine], train)
    mask_logits = OutputBlock(dim, (dim, dim // 2), dtype=dt, name="output_block")(
        feats["f_small"], feats["f_middle"], feats["f_large"], train)

    logits = {"mask_logits": mask_logits, "fg_logits": fg_logits, "bg_logits": bg_logits,
              "uc_logits": uc_logits}
    out_dtype = jnp.promote_types(dt, jnp.float32)
    logits = {k: v.astype(out_dtype) for k, v in logits.items()}
    aux: dict[str, Any] = dict(logits)
    for name in _BRANCHES:
      aux[name] = nn.sigmoid(logits[f"{name}_logits"])
    aux["features"] = feats
    return nn.sigmoid(logits["mask_logits"]), aux


class Stage1Head(nn.Module):
  """Stage-1 (Consistency Reinforcement) head; reference ``adjust``.

  Each full-resolution encoder map goes through a 1x1 CBR to ``width`` channels; the
  four are concatenated and a bias-free 1x1 conv gives one logit channel.

  Attributes:
    width: Width of each 1x1 CBR (64).
    dtype: Compute dtype.
  """
  width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array], train: bool) -> Array:
    """Maps four ``[B, H, W, C_i]`` maps to ``[B, H, W, 1]`` logits."""
    ys = [CBR(self.width, 1, 0, dtype=self.dtype, name=f"conv{i + 1}")(x, train)
          for i, x in enumerate(xs)]
    return Conv2d(1, 1, dtype=self.dtype, name="conv_fuse")(jnp.concatenate(ys, axis=-1))


class ConDSegStage1(nn.Module):
  """ConDSeg stage-1 model (reference ``network/model_stage1.py``): encoder + head.

  The encoder's ``layer0..layer3`` maps are upsampled x2/x4/x8/x16 to the input
  resolution and fed to :class:`Stage1Head` (8,662,848 parameters by default).

  Attributes:
    stage_sizes: Encoder blocks per stage.
    stem_width: Encoder stem width.
    base_width: Encoder ``layer1`` bottleneck width.
    head_width: Width of the head's 1x1 CBRs (64).
    dtype: Compute dtype; the returned maps are float32 (float64 for a float64 dtype).
  """
  stage_sizes: Sequence[int] = (3, 4, 6)
  stem_width: int = 64
  base_width: int = 64
  head_width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict[str, Any]]:
    """Returns ``(mask, {'mask_logits', 'features': {x1..x4}})``, mask ``[B, H, W, 1]``."""
    _check_input(x)
    if len(self.stage_sizes) != 3:
      raise ValueError(f"ConDSegStage1 uses encoder stages layer1..layer3, got "
                       f"stage_sizes={self.stage_sizes}")
    enc = resnet.ResNet(self.stage_sizes, self.stem_width, self.base_width,
                        dtype=self.dtype, name="encoder")(x, train=train)
    feats = {f"x{i + 1}": enc[f"layer{i}"] for i in range(4)}
    ups = [upsample(feats[f"x{i + 1}"], 2**(i + 1)) for i in range(4)]
    logits = Stage1Head(self.head_width, dtype=self.dtype, name="head")(ups, train)
    logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32))
    return nn.sigmoid(logits), {"mask_logits": logits, "features": feats}


Model = ConDSeg
Stage1Model = ConDSegStage1

# ----------------------------------------------------------------------------- torch names
_CBR = CBR_NAMES
_CA = CHANNEL_ATTENTION_NAMES
_SA = SPATIAL_ATTENTION_NAMES

_DILATED_CONV_NAMES = TorchNames(children={
    **{f"c{i}_cbr": (f"c{i}.0", _CBR) for i in range(1, 5)},
    **{f"c{i}_ca": (f"c{i}.1", _CA) for i in range(1, 5)},
    "c5": ("c5", _CBR), "c6": ("c6", _CBR), "sa": ("sa", _SA)})
_SID_NAMES = TorchNames(children={
    f"cbr_{b}_{i}": (f"cbr_{b}.{i}", _CBR) for b in _BRANCHES for i in range(3)})
# Reference branch Sequential: CBR at 0, 2, 4, 6, 8 (Upsample in between), Conv2d at 9.
_AUX_BRANCH_NAMES = TorchNames(children={
    **{f"cbr_{i}": (str(2 * i), _CBR) for i in range(5)},
    "out_conv": ("9", CONV_NAMES)})
_AUX_HEAD_NAMES = TorchNames(children={
    f"branch_{b}": (f"branch_{b}", _AUX_BRANCH_NAMES) for b in _BRANCHES})
_PREPROCESS_NAMES = TorchNames(children={
    "c1": ("c1", _CBR), **{f"conv_{i}": (f"preprocess.conv_{i}", _CBR) for i in range(8)}})
_CDFA_NAMES = TorchNames(children={
    **{n: (n, LINEAR_NAMES) for n in ("v", "attn_fg", "attn_bg", "proj")},
    **{f"{s}_cbr_{i}": (f"{s}_cbr.{i}", _CBR) for s in ("input", "output") for i in range(2)}})
_DECODER_NAMES = TorchNames(children={
    **{f"c{i}": (f"c{i}", _CBR) for i in range(1, 5)}, "ca": ("ca", _CA), "sa": ("sa", _SA)})
_OUTPUT_NAMES = TorchNames(children={
    "fuse": ("fuse", _CBR), "c1": ("c1", _CBR), "c2": ("c2", _CBR),
    "c3": ("c3", CONV_NAMES)})
_STAGE1_HEAD_NAMES = TorchNames(children={
    **{f"conv{i}": (f"conv{i}", _CBR) for i in range(1, 5)},
    "conv_fuse": ("conv_fuse", CONV_NAMES)})


def _encoder_names(params: Mapping[str, Any], style: str) -> TorchNames:
  return TorchNames(children={
      "encoder": ("", resnet.torch_names(params["encoder"].keys(), style))})


def _model_kind(variables: Mapping[str, PyTree]) -> str:
  params = variables.get("params", {})
  if "encoder" in params and "dconv1" in params:
    return "condseg"
  if "encoder" in params and "head" in params:
    return "condseg_stage1"
  raise ValueError("variables are neither ConDSeg nor ConDSegStage1 variables (expected "
                   "'params' with 'encoder' and 'dconv1' or 'head')")


def torch_names(variables: Mapping[str, PyTree]) -> TorchNames:
  """Reference PyTorch naming of ConDSeg or ConDSegStage1 ``variables``."""
  kind = _model_kind(variables)
  children = dict(_encoder_names(variables["params"], "condseg").children)
  if kind == "condseg_stage1":
    children["head"] = ("head", _STAGE1_HEAD_NAMES)
    return TorchNames(children=children)
  for i in range(1, 5):
    children[f"dconv{i}"] = (f"dconv{i}", _DILATED_CONV_NAMES)
    children[f"cdfa{i}"] = (f"cdfa{i}", _CDFA_NAMES)
    for b in ("fg", "bg"):
      children[f"preprocess_{b}{i}"] = (f"preprocess_{b}{i}", _PREPROCESS_NAMES)
  children["decouple_layer"] = ("decouple_layer", _SID_NAMES)
  children["aux_head"] = ("aux_head", _AUX_HEAD_NAMES)
  for size in ("small", "middle", "large"):
    children[f"decoder_{size}"] = (f"decoder_{size}", _DECODER_NAMES)
  children["output_block"] = ("output_block", _OUTPUT_NAMES)
  return TorchNames(children=children)


_SOURCES = ("condseg", "condseg_stage1", "resnet50")
_REFERENCE_ENCODER_KEY = re.compile(r"^layer[0-3]\.")


def load(variables: Mapping[str, PyTree],
         path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
         source: str = "condseg") -> tuple[dict[str, PyTree], list[str]]:
  """Imports PyTorch weights into ConDSeg / ConDSegStage1 variables.

  * ``source='condseg'`` / ``'condseg_stage1'``: a reference ``ConDSeg`` /
    ``ConDSegStage1`` ``state_dict`` (keys ``layer0.0.weight``, ``dconv1.c1.0.conv.0
    .weight``, ``cdfa4.attn_fg.weight``, ``head.conv_fuse.weight``, ...). When the
    source is the *other* model, only the shared encoder (``layer0..layer3``) is loaded
    and the remaining keys are ignored and reported (e.g. initialising stage 2 from a
    stage-1 checkpoint; unlike the reference's ``train.py``, which copies parameters
    only, this also copies the BN running statistics: keep the old ``batch_stats`` if
    you want the reference behaviour).
  * ``source='resnet50'``: a torchvision ResNet-50 ``state_dict`` into the encoder only
    (``layer4.*`` and ``fc.*`` ignored and reported).

  Variables outside the loaded part are returned unchanged. ``num_batches_tracked`` is
  skipped; Linear weights are transposed, conv weights go OIHW -> HWIO.

  Args:
    variables: ``{'params', 'batch_stats'}`` of :class:`ConDSeg` or
      :class:`ConDSegStage1`; leaves may be ``jax.eval_shape`` structs (a full load then
      needs no real initialisation).
    path_or_state_dict: ``.pth``/``.pt`` (needs torch), ``.npz`` or ``.safetensors`` file,
      or a mapping of arrays/tensors.
    source: ``'condseg'``, ``'condseg_stage1'`` or ``'resnet50'``.

  Returns:
    ``(new_variables, ignored_keys)``.

  Raises:
    KeyError: Missing or unexpected key (named in the message).
    ValueError: Unknown source, or a shape mismatch (key, expected and got shape).
  """
  if source not in _SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {_SOURCES}")
  kind = _model_kind(variables)
  state = read_state_dict(path_or_state_dict)
  what = f"{source} state dict"
  if source == kind:
    return load_state_dict(variables, state, torch_names(variables), what=what)

  params = variables["params"]
  if source == "resnet50":
    names = _encoder_names(params, "torchvision")
    ignore = resnet.torchvision_ignored(params["encoder"])
  else:
    names = _encoder_names(params, "condseg")
    ignore = lambda key: not _REFERENCE_ENCODER_KEY.match(key)  # noqa: E731
  sub = {c: {"encoder": variables[c]["encoder"]} for c in ("params", "batch_stats")
         if c in variables}
  loaded, ignored = load_state_dict(sub, state, names, ignore=ignore,
                                    what=f"{what} (encoder only)")
  new_variables = {c: dict(v) for c, v in variables.items()}
  for c, tree in loaded.items():
    new_variables[c]["encoder"] = tree["encoder"]
  return new_variables, ignored


def to_torch_state_dict(variables: Mapping[str, PyTree]) -> dict[str, np.ndarray]:
  """ConDSeg / ConDSegStage1 variables as a reference-named PyTorch state dict.

  Values are NumPy arrays in PyTorch layout (OIHW convs, (out, in) Linear), with an
  int64 ``num_batches_tracked`` per BatchNorm, so ``torch.nn.Module.load_state_dict``
  of the reference model accepts the result with ``strict=True``.
  """
  return to_state_dict(variables, torch_names(variables))
