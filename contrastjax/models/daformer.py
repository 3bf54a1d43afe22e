"""DAFormer decode head, SimSiam branch and the SiamSeg network, in Flax linen (NHWC).

SiamSeg (Wang et al., 2024) segments with MiT-B5 and the DAFormer head with separable
ASPP context fusion (``configs/_base_/models/daformer_sepaspp_mitb5.py`` of
github.com/woldier/SiamSeg), and adds a SimSiam branch that shares the student
backbone (``mmseg/models/uda/simsiam.py``); see ``docs/methods/siamseg.md``.

:class:`DAFormerHead` (reference ``DAFormerHead``)::

  e_i = Linear(C_i -> 256)(stage map i)              (mlp embedding, no norm / act)
  e_i = bilinear resize to the stage-1 size          (align_corners=False)
  f   = fuse(cat[e_1, e_2, e_3, e_4])                (1024 channels)
  fuse = ASPPWrapper(sep=True, dilations=(1, 6, 12, 18), pool=False):
     d=1: ConvModule 1x1 (conv without bias -> BN -> ReLU)
     d>1: depthwise 3x3 dilation d (no bias) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU
     cat (4 x 256) -> ConvModule 3x3 -> 256
  logits = conv_seg(Dropout2d(0.1)(f))               (1x1 conv with bias, at H/4)

:class:`SimSiam` (reference ``SimSiam.fc`` / ``SimSiam.predictor``)::

  z = ReLU(BN(Linear(512 -> 2048, no bias)(ReLU(BN(Linear(512 -> 512, no bias)(GAP(s4)))))))
  p = Linear(2048 -> 2048, bias)(ReLU(BN(Linear(2048 -> 2048, no bias)(z))))

Note the ReLU after the projector's last BN and the 2048-wide predictor hidden layer:
both differ from the SimSiam paper and are kept as in the reference.

BatchNorm follows PyTorch (eps 1e-5, momentum 0.1, see :class:`~contrastjax.models.nn.BatchNorm`);
under ``jit`` with a data-sharded batch the decode head's statistics are global-batch
ones (the reference's SyncBN). The SimSiam BatchNorm1d is per-GPU in the reference.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.models import mit
from contrastjax.models.nn import (
    BatchNorm, Conv2d, TORCH_DEFAULT_KERNEL_INIT, torch_default_bias_init)
from contrastjax.models.resample import resize_bilinear_half_pixel
from contrastjax.models.torch_import import (
    BN_NAMES, CONV_NAMES, LINEAR_NAMES, TorchNames, load_state_dict, read_state_dict,
    to_state_dict)

Array = jax.Array
Dtype = Any
PyTree = Any

#: mmcv ``ConvModule`` conv init: ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _linear(features: int, fan_in: int, use_bias: bool, dtype: Dtype, name: str) -> nn.Dense:
  """``torch.nn.Linear`` with PyTorch's default init."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=TORCH_DEFAULT_KERNEL_INIT,
                  bias_init=torch_default_bias_init(fan_in), name=name)


class ConvModule(nn.Module):
  """mmcv ``ConvModule`` with a norm: conv (no bias) -> BatchNorm -> ReLU.

  Attributes:
    features: Output channels.
    kernel_size: Square kernel size.
    padding: Symmetric zero padding.
    dilation: Kernel dilation.
    depthwise: Depthwise convolution (``groups = channels``; ``features`` must equal
      the input channels).
    dtype: Compute dtype.
    depthwise_impl: :class:`mit.DepthwiseConv2d` ``impl`` of a depthwise convolution.
  """
  features: int
  kernel_size: int = 1
  padding: int = 0
  dilation: int = 1
  depthwise: bool = False
  dtype: Dtype | None = None
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies conv, BN and ReLU to ``[B, H, W, C]`` input."""
    if self.depthwise:
      if self.features != x.shape[-1]:
        raise ValueError(f"depthwise ConvModule keeps the width: {x.shape[-1]} -> "
                         f"{self.features}")
      x = mit.DepthwiseConv2d(self.kernel_size, self.padding, self.dilation, use_bias=False,
                              dtype=self.dtype, kernel_init=KAIMING_FAN_OUT,
                              impl=self.depthwise_impl, name="conv")(x)
    else:
      x = Conv2d(self.features, self.kernel_size, 1, self.padding, self.dilation,
                 use_bias=False, dtype=self.dtype, kernel_init=KAIMING_FAN_OUT,
                 name="conv")(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))


class DepthwiseSeparableConvModule(nn.Module):
  """mmcv ``DepthwiseSeparableConvModule``: depthwise ConvModule, then pointwise 1x1.

  Attributes:
    features: Output channels.
    kernel_size: Depthwise kernel size.
    dilation: Depthwise dilation (padding ``dilation * (k // 2)``).
    dtype: Compute dtype.
    depthwise_impl: :class:`mit.DepthwiseConv2d` ``impl``.
  """
  features: int
  kernel_size: int = 3
  dilation: int = 1
  dtype: Dtype | None = None
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """``[B, H, W, C]`` -> ``[B, H, W, features]``."""
    pad = self.dilation * (self.kernel_size // 2)
    x = ConvModule(x.shape[-1], self.kernel_size, pad, self.dilation, depthwise=True,
                   dtype=self.dtype, depthwise_impl=self.depthwise_impl,
                   name="depthwise_conv")(x, train)
    return ConvModule(self.features, 1, dtype=self.dtype, name="pointwise_conv")(x, train)


class ASPPWrapper(nn.Module):
  """DAFormer's context fusion (reference ``ASPPWrapper``, ``context_cfg=None``).

  Attributes:
    channels: Width of each branch and of the output.
    dilations: One branch per dilation; dilation 1 is a 1x1 ConvModule.
    sep: Depthwise-separable branches for dilations > 1 (``DepthwiseSeparableASPPModule``)
      instead of dilated 3x3 ConvModules (``ASPPModule``).
    pool: Add the image-pooling branch (global average -> 1x1 ConvModule -> broadcast).
    dtype: Compute dtype.
    depthwise_impl: :class:`mit.DepthwiseConv2d` ``impl`` of the separable branches.
  """
  channels: int = 256
  dilations: Sequence[int] = (1, 6, 12, 18)
  sep: bool = True
  pool: bool = False
  dtype: Dtype | None = None
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """``[B, H, W, C]`` -> ``[B, H, W, channels]``."""
    outs = []
    if self.pool:
      pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
      pooled = ConvModule(self.channels, 1, dtype=self.dtype, name="image_pool")(pooled, train)
      outs.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.channels,)))
    for i, d in enumerate(self.dilations):
      if d == 1:
        branch = ConvModule(self.channels, 1, dtype=self.dtype, name=f"aspp_{i}")
      elif self.sep:
        branch = DepthwiseSeparableConvModule(self.channels, 3, d, dtype=self.dtype,
                                              depthwise_impl=self.depthwise_impl,
                                              name=f"aspp_{i}")
      else:
        branch = ConvModule(self.channels, 3, d, d, dtype=self.dtype, name=f"aspp_{i}")
      outs.append(branch(x, train))
    x = jnp.concatenate(outs, axis=-1)
    return ConvModule(self.channels, 3, 1, dtype=self.dtype, name="bottleneck")(x, train)


class DAFormerHead(nn.Module):
  """The DAFormer decode head (reference ``DAFormerHead``, SiamSeg's resolved config).

  Attributes:
    num_classes: Output classes (``conv_seg`` width).
    embed_dims: Width of each level's linear embedding (``decoder_params.embed_dims``).
    channels: Width after fusion (``channels``).
    fusion: ``'sep_aspp'`` (SiamSeg / DAFormer: ``daformer_sepaspp_mitb5``), ``'aspp'``
      (dilated 3x3 branches) or ``'conv'`` (a 1x1 ConvModule: ``daformer_conv1_mitb5``).
    dilations: ASPP dilations.
    pool: ASPP image-pooling branch (False in the reference config).
    dropout_ratio: ``Dropout2d`` rate before ``conv_seg`` (rng stream ``'dropout'``).
    dtype: Compute dtype (parameters and BN statistics stay float32).
    depthwise_impl: :class:`mit.DepthwiseConv2d` ``impl`` of the ASPP's depthwise
      convolutions.
  """
  num_classes: int
  embed_dims: int = 256
  channels: int = 256
  fusion: str = "sep_aspp"
  dilations: Sequence[int] = (1, 6, 12, 18)
  pool: bool = False
  dropout_ratio: float = 0.1
  dtype: Dtype | None = None
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, features: Sequence[Array], *, train: bool,
               deterministic: bool | None = None) -> tuple[Array, dict[str, Any]]:
    """Decodes the encoder's stage maps.

    Args:
      features: The stage maps ``[B, H_i, W_i, C_i]``, finest first.
      train: BatchNorm mode (batch statistics; pass ``mutable=['batch_stats']``) and
        dropout.
      deterministic: Overrides ``not train`` for dropout.

    Returns:
      ``(logits, aux)``: ``logits`` ``[B, H_1, W_1, num_classes]`` at the resolution
      of the first map (H/4; the reference upsamples to the label size in its loss),
      ``aux['fused']`` the fused ``[B, H_1, W_1, channels]`` features.
    """
    if self.fusion not in ("sep_aspp", "aspp", "conv"):
      raise ValueError(f"unknown fusion {self.fusion!r}; expected 'sep_aspp', 'aspp' or "
                       f"'conv'")
    det = (not train) if deterministic is None else deterministic
    size = features[0].shape[1:3]
    embedded = []
    for i, f in enumerate(features):
      e = _linear(self.embed_dims, f.shape[-1], True, self.dtype, f"embed_{i}")(f)
      embedded.append(resize_bilinear_half_pixel(e, size))
    x = jnp.concatenate(embedded, axis=-1)
    if self.fusion == "conv":
      x = ConvModule(self.channels, 1, dtype=self.dtype, name="fuse_layer")(x, train)
    else:
      x = ASPPWrapper(self.channels, self.dilations, self.fusion == "sep_aspp", self.pool,
                      dtype=self.dtype, depthwise_impl=self.depthwise_impl,
                      name="fuse_layer")(x, train)
    fused = x
    x = nn.Dropout(self.dropout_ratio, broadcast_dims=(1, 2))(x, deterministic=det)
    logits = Conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                    kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name="conv_seg")(x)
    return logits, {"fused": fused}


class SimSiamProjector(nn.Module):
  """Reference ``SimSiam.fc``: global average pool, then two Linear-BN-ReLU layers.

  Attributes:
    hidden_features: First layer width (``pred_dim`` = 512, the stage-4 width).
    features: Output width (``dim`` = 2048).
    dtype: Compute dtype.
  """
  hidden_features: int = 512
  features: int = 2048
  dtype: Dtype | None = None
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """``[B, H, W, C]`` map (or ``[B, C]``) -> ``z`` ``[B, features]``."""
    if x.ndim == 4:
      x = jnp.mean(x, axis=(1, 2))
    if x.shape[-1] != self.hidden_features:
      raise ValueError(f"the projector expects {self.hidden_features} input features "
                       f"(reference: pred_dim must equal the stage-4 width), got "
                       f"{x.shape[-1]}")
    g = self.bn_group_size
    x = _linear(self.hidden_features, x.shape[-1], False, self.dtype, "linear1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, group_size=g, name="bn1")(x, train))
    x = _linear(self.features, x.shape[-1], False, self.dtype, "linear2")(x)
    return nn.relu(BatchNorm(dtype=self.dtype, group_size=g, name="bn2")(x, train))


class SimSiamPredictor(nn.Module):
  """Reference ``SimSiam.predictor``: Linear-BN-ReLU, then Linear with bias.

  Attributes:
    hidden_features: Hidden width (2048 in the reference, not SimSiam's 512).
    features: Output width (2048).
    dtype: Compute dtype.
  """
  hidden_features: int = 2048
  features: int = 2048
  dtype: Dtype | None = None
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, z: Array, train: bool) -> Array:
    """``z`` ``[B, D]`` -> ``p`` ``[B, features]``."""
    x = _linear(self.hidden_features, z.shape[-1], False, self.dtype, "linear1")(z)
    x = nn.relu(BatchNorm(dtype=self.dtype, group_size=self.bn_group_size,
                          name="bn1")(x, train))
    return _linear(self.features, x.shape[-1], True, self.dtype, "linear2")(x)


class SimSiam(nn.Module):
  """SimSiam projector + predictor on one view's stage-4 map (backbone outside).

  Attributes:
    in_features: Stage-4 width (``pred_dim``; 512 for MiT-B1..B5).
    dim: Projection / prediction width (2048).
    dtype: Compute dtype.
  """
  in_features: int = 512
  dim: int = 2048
  dtype: Dtype | None = None
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, stage4: Array, *, train: bool) -> tuple[Array, Array]:
    """Returns ``(p, z)`` for one view; ``z`` is *not* stop-gradient'ed here."""
    g = self.bn_group_size
    z = SimSiamProjector(self.in_features, self.dim, self.dtype, g, name="projector")(
        stage4, train)
    p = SimSiamPredictor(self.dim, self.dim, self.dtype, g, name="predictor")(z, train)
    return p, z


# ----------------------------------------------------------------------------- torch names
_BN = BN_NAMES
_CONV_MODULE_NAMES = TorchNames(children={"conv": ("conv", CONV_NAMES),
                                          "bn": ("bn", _BN)})
_DSCONV_NAMES = TorchNames(children={
    "depthwise_conv": ("depthwise_conv", _CONV_MODULE_NAMES),
    "pointwise_conv": ("pointwise_conv", _CONV_MODULE_NAMES)})


def head_torch_names(params: Mapping[str, Any]) -> TorchNames:
  """mmseg naming (``decode_head.*`` without the prefix) of :class:`DAFormerHead` params."""
  children: dict[str, tuple[str, TorchNames]] = {
      "conv_seg": ("conv_seg", CONV_NAMES)}
  for name in params:
    if name.startswith("embed_"):
      children[name] = (f"embed_layers.{name[len('embed_'):]}.proj", LINEAR_NAMES)
  fuse = params.get("fuse_layer", {})
  if "conv" in fuse:  # fusion='conv'
    children["fuse_layer"] = ("fuse_layer", _CONV_MODULE_NAMES)
  else:
    fuse_children: dict[str, tuple[str, TorchNames]] = {
        "bottleneck": ("bottleneck", _CONV_MODULE_NAMES),
        "image_pool": ("image_pool.1", _CONV_MODULE_NAMES)}
    for name, sub in fuse.items():
      if name.startswith("aspp_"):
        names = _DSCONV_NAMES if "depthwise_conv" in sub else _CONV_MODULE_NAMES
        fuse_children[name] = (f"aspp_modules.{name[len('aspp_'):]}", names)
    children["fuse_layer"] = ("fuse_layer", TorchNames(children=fuse_children))
  return TorchNames(children=children)


SIMSIAM_NAMES = TorchNames(children={
    "projector": ("fc", TorchNames(children={
        "linear1": ("2", LINEAR_NAMES), "bn1": ("3", _BN),
        "linear2": ("5", LINEAR_NAMES), "bn2": ("6", _BN)})),
    "predictor": ("predictor", TorchNames(children={
        "linear1": ("0", LINEAR_NAMES), "bn1": ("1", _BN),
        "linear2": ("3", LINEAR_NAMES)})),
})


# ----------------------------------------------------------------------------- SiamSeg
class SiamSegNet(nn.Module):
  """MiT encoder + DAFormer head, with the SimSiam branch on the shared encoder.

  ``__call__`` is the segmentor (reference ``EncoderDecoder``); :meth:`simsiam` runs the
  contrastive branch on two views. Both use the same ``backbone`` parameters.

  Attributes:
    num_classes: Segmentation classes.
    variant: MiT size (``'b5'`` in SiamSeg; see :data:`mit.CONFIGS`).
    backbone_overrides: Extra :class:`mit.MixVisionTransformer` attributes as
      ``(name, value)`` pairs (e.g. ``(('depths', (1, 1, 2, 1)),)`` for a small test).
    drop_path_rate: Stochastic depth of the last encoder block (0.1).
    remat: Rematerialise the encoder blocks in the backward pass.
    remat_policy: What they keep (:data:`mit.REMAT_POLICIES`).
    scan_blocks: Run each encoder stage as one ``nn.scan`` over stacked block
      parameters (see :class:`mit.MixVisionTransformer`; compiles several times faster).
    fusion: Decode-head fusion (see :class:`DAFormerHead`).
    embed_dims: Decode-head embedding width (256).
    channels: Decode-head width after fusion (256).
    dropout_ratio: Decode-head dropout (0.1).
    simsiam_dim: SimSiam projection width (2048).
    simsiam_bn_group_size: 0: the SimSiam BatchNorms normalise with the statistics of the
      whole batch; ``N``: per group of ``N`` consecutive images (the reference's
      unsynchronised ``BatchNorm1d`` on GPUs holding ``N`` images each).
    dtype: Compute dtype (parameters and BN statistics stay float32).
    depthwise: Implementation of every depthwise convolution (encoder MixFFNs and the
      head's ASPP), one of :data:`mit.DEPTHWISE_IMPLS`: the same function; ``'auto'``
      is the low-memory shifted form on CPUs and XLA's grouped convolution elsewhere.
    gelu_grad: The encoder GELUs' backward pass (:data:`mit.GELU_GRADS`; the same
      function).
  """
  num_classes: int
  variant: str = "b5"
  backbone_overrides: tuple[tuple[str, Any], ...] = ()
  drop_path_rate: float = 0.1
  remat: bool = False
  remat_policy: str = "nothing"
  scan_blocks: bool = False
  fusion: str = "sep_aspp"
  embed_dims: int = 256
  channels: int = 256
  dropout_ratio: float = 0.1
  simsiam_dim: int = 2048
  simsiam_bn_group_size: int = 0
  dtype: Dtype = jnp.float32
  depthwise: str = "auto"
  gelu_grad: str = "input"

  def setup(self):
    self.backbone = mit.mit(self.variant, drop_path_rate=self.drop_path_rate,
                            remat=self.remat, remat_policy=self.remat_policy,
                            scan_blocks=self.scan_blocks,
                            dtype=self.dtype, depthwise=self.depthwise,
                            gelu_grad=self.gelu_grad,
                            **dict(self.backbone_overrides))
    self.decode_head = DAFormerHead(self.num_classes, self.embed_dims, self.channels,
                                    self.fusion, dropout_ratio=self.dropout_ratio,
                                    dtype=self.dtype, depthwise_impl=self.depthwise)
    self.contrast = SimSiam(self.backbone.embed_dims[-1], self.simsiam_dim, self.dtype,
                            self.simsiam_bn_group_size)

  def __call__(self, x: Array, *, train: bool,
               deterministic: bool | None = None) -> tuple[Array, dict[str, Any]]:
    """Segments ``[B, H, W, 3]`` images.

    Args:
      x: Normalised images.
      train: BN batch statistics (pass ``mutable=['batch_stats']``), stochastic depth
        and dropout (rng ``'dropout'``).
      deterministic: Overrides ``not train`` for stochastic depth and dropout (e.g. the
        EMA teacher: batch statistics, no drop).

    Returns:
      ``(logits, aux)``: logits ``[B, H/4, W/4, num_classes]``; ``aux['features']`` the
      four stage maps, ``aux['fused']`` the head's fused features.
    """
    features = self.backbone(x, train=train, deterministic=deterministic)
    logits, aux = self.decode_head(features, train=train, deterministic=deterministic)
    if self.is_initializing():  # create the SimSiam parameters as well
      self.contrast(features[-1], train=False)
    return logits, {"features": features, **aux}

  def simsiam(self, x1: Array, x2: Array, *, train: bool,
              deterministic: bool | None = None) -> tuple[Array, Array, Array, Array]:
    """The contrastive branch on two views (reference ``SimSiam.forward``).

    The encoder runs once on both views stacked (it has no batch-coupled layers); the
    projector and predictor run per view, so their BatchNorms see each view's batch
    as in the reference (two forward calls, two running-stat updates).

    Returns:
      ``(p1, p2, z1, z2)`` with ``z`` stop-gradient'ed (the reference's ``detach``);
      the loss is :func:`contrastjax.methods.siamseg_losses.simsiam_loss`.
    """
    n = x1.shape[0]
    stage4 = self.backbone(jnp.concatenate([x1, x2]), train=train,
                          deterministic=deterministic)[-1]
    p1, z1 = self.contrast(stage4[:n], train=train)
    p2, z2 = self.contrast(stage4[n:], train=train)
    return p1, p2, jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)


Model = SiamSegNet


def torch_names(params: Mapping[str, Any]) -> TorchNames:
  """Naming of :class:`SiamSegNet` params: ``model.backbone.*`` (official MiT names;
  :func:`to_torch_state_dict` also writes mmseg's), ``model.decode_head.*`` and
  ``contras_model.fc.*`` / ``contras_model.predictor.*``."""
  return TorchNames(children={
      "backbone": ("model.backbone", mit.torch_names(params["backbone"])),
      "decode_head": ("model.decode_head", head_torch_names(params["decode_head"])),
      "contrast": ("contras_model", SIMSIAM_NAMES)})


def load(variables: Mapping[str, PyTree],
         path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
         prefix: str = "model.", contrast_prefix: str | None = "contras_model."
         ) -> tuple[dict[str, PyTree], list[str]]:
  """Imports a SiamSeg (mmseg) checkpoint into :class:`SiamSegNet` variables.

  The encoder is read from ``{prefix}backbone.`` in any naming :func:`mit.load`
  accepts; the head from ``{prefix}decode_head.`` (mmseg names: ``embed_layers.0.proj``,
  ``fuse_layer.aspp_modules.1.depthwise_conv.conv``, ``fuse_layer.bottleneck.bn``,
  ``conv_seg``, ...); the SimSiam branch from ``{contrast_prefix}fc.*`` /
  ``predictor.*`` (``None``: keep the current SimSiam variables). Everything else
  (the EMA teacher ``ema_model.*``, the branch's copy of the shared backbone) is ignored
  and returned.

  Args:
    variables: ``{'params', 'batch_stats'}`` of a :class:`SiamSegNet`.
    path_or_state_dict: ``.pth`` (needs torch), ``.npz``, ``.safetensors`` or a mapping.
    prefix: Prefix of the segmentor (``'model.'`` in a UDA checkpoint, ``''`` in a
      plain ``EncoderDecoder`` one).
    contrast_prefix: Prefix of the SimSiam branch.

  Returns:
    ``(new_variables, ignored_keys)``.

  Raises:
    KeyError / ValueError: As :func:`mit.load` and :func:`torch_import.load_state_dict`,
      naming the key.
  """
  state = read_state_dict(path_or_state_dict)
  params = variables["params"]
  encoder, enc_ignored = mit.load({"params": params["backbone"]}, state,
                                  prefix=prefix + "backbone.")
  head_prefix = prefix + "decode_head."
  sub = {c: {"decode_head": variables[c]["decode_head"]} for c in variables
         if "decode_head" in variables[c]}
  names = {"decode_head": (head_prefix.rstrip("."),
                           head_torch_names(params["decode_head"]))}
  used_prefixes = [head_prefix]
  if contrast_prefix is not None:
    for c in variables:
      if "contrast" in variables[c]:
        sub.setdefault(c, {})["contrast"] = variables[c]["contrast"]
    names["contrast"] = (contrast_prefix.rstrip("."), SIMSIAM_NAMES)
    used_prefixes += [contrast_prefix + "fc.", contrast_prefix + "predictor."]
  head_state = {k: v for k, v in state.items() if k.startswith(tuple(used_prefixes))}
  loaded, _ = load_state_dict(sub, head_state, TorchNames(children=names),
                              what="SiamSeg decode head / SimSiam state dict")
  new_variables = {c: dict(v) for c, v in variables.items()}
  new_variables["params"]["backbone"] = encoder["params"]
  for c, tree in loaded.items():
    new_variables[c].update(tree)
  ignored = sorted(k for k in enc_ignored
                   if not k.startswith(tuple(used_prefixes))
                   and not k.endswith("num_batches_tracked"))
  return new_variables, ignored


def to_torch_state_dict(variables: Mapping[str, PyTree], backbone_style: str = "mmseg"
                        ) -> dict[str, np.ndarray]:
  """:class:`SiamSegNet` variables under SiamSeg's names (NumPy, torch layout).

  ``model.backbone.*`` in ``backbone_style`` (``'mmseg'``, SiamSeg's own naming, or
  ``'official'``), ``model.decode_head.*`` and ``contras_model.{fc,predictor}.*``.
  """
  params = variables["params"]
  rest = {c: {k: v for k, v in tree.items() if k != "backbone"}
          for c, tree in variables.items()}
  names = TorchNames(children={k: v for k, v in torch_names(params).children.items()
                               if k != "backbone"})
  state = to_state_dict(rest, names)
  backbone = mit.to_torch_state_dict({"params": params["backbone"]}, backbone_style)
  state.update({f"model.backbone.{k}": v for k, v in backbone.items()})
  return state
