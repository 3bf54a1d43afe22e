"""OpenCLIP's ``ModifiedResNet`` (the ``RN50`` image tower) in Flax linen, with weight import.

Differences from the torchvision ResNet of ``contrastjax.models.resnet`` (Radford et al.
2021, §2.4; ``open_clip/modified_resnet.py``):

* a three-convolution stem: 3x3/2 to ``width/2``, 3x3 to ``width/2``, 3x3 to ``width``
  (each + BatchNorm + ReLU), then a 2x2 average pool (no max pool);
* anti-aliased strided blocks: every convolution has stride 1; a block of stride ``s``
  average-pools (``s x s``) after its 3x3 convolution, and its downsample branch is
  ``AvgPool(s) -> 1x1 conv -> BatchNorm``;
* attention pooling (:class:`AttentionPool2d`) instead of global average pooling: the
  ``h*w`` tokens of the last stage, with their mean prepended, plus a learned positional
  embedding of ``(image_size // 32)**2 + 1`` tokens, go through one multi-head attention
  (``q/k/v/c_proj``) whose output at the mean token, projected by ``c_proj`` to
  ``embed_dim`` (OpenCLIP's ``output_dim``), is the image embedding.

RN50 (``open_clip/model_configs/RN50.json``): ``layers=(3, 4, 6, 3)``, ``width=64``,
``image_size=224``, ``embed_dim=1024``, ``heads = width * 32 // 64 = 32`` (OpenCLIP's
``head_width`` 64); 38,316,896 parameters.

Initialisation follows OpenCLIP: PyTorch's default convolution init, BatchNorm
``(1, 0)`` except ``bn3`` of every block (zero scale), ``q/k/v/c_proj`` weights
``N(0, (width*32)**-0.5)`` with PyTorch's default bias init, positional embedding
``N(0, 1) / sqrt(width*32)``.

Flax names follow OpenCLIP's (``conv1`` .. ``bn3``, ``layer2_0/downsample_conv``,
``attnpool/q_proj``, ...); :func:`load` maps an OpenCLIP ``state_dict`` (``visual.conv1
.weight``, ``visual.layer2.0.downsample.0.weight``, ``visual.attnpool.positional_embedding``,
...; the ``visual.`` prefix optional) onto them, e.g. a pretrained OpenCLIP ``RN50``
checkpoint (``.pt``/``.bin``/``.safetensors``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.models.nn import BatchNorm, Conv2d, torch_default_bias_init
from contrastjax.models.torch_import import (
    BN_NAMES, CONV_NAMES, LINEAR_NAMES, TorchNames, load_state_dict, read_state_dict,
    to_state_dict)

Array = jax.Array
Dtype = Any
PyTree = Any

#: Bottleneck expansion: output channels = 4 x the block's width.
EXPANSION = 4
#: OpenCLIP's ``head_width`` for ResNet towers: ``heads = width * 32 // HEAD_WIDTH``.
HEAD_WIDTH = 64
_BLOCK_RE = re.compile(r"^layer(\d+)_(\d+)$")


def avg_pool(x: Array, stride: int) -> Array:
  """``torch.nn.AvgPool2d(stride)`` (kernel = stride, no padding, floor) on NHWC."""
  if stride == 1:
    return x
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="VALID")


class ZeroScaleBatchNorm(BatchNorm):
  """:class:`~contrastjax.models.nn.BatchNorm` whose ``scale`` is initialised to
  zero (OpenCLIP zeroes ``bn3`` of every block); applying it is the same."""

  def param(self, name, init_fn, *args, **kwargs):
    if name == "scale":
      init_fn = nn.initializers.zeros
    return super().param(name, init_fn, *args, **kwargs)


class Bottleneck(nn.Module):
  """OpenCLIP's anti-aliased ``Bottleneck``.

  ``relu(bn3(conv3(avgpool_s(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + identity)`` with
  ``identity = downsample_bn(downsample_conv(avgpool_s(x)))`` when the stride is not 1
  or the channel count changes, else ``x``. All convolutions have stride 1.

  Attributes:
    planes: Width of the 1x1/3x3 convolutions; the block outputs ``4 * planes``.
    stride: Average-pool size of the strided path (1 or 2).
    dtype: Compute dtype.
  """
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the block to ``[B, H, W, C]`` input."""
    out_features = self.planes * EXPANSION
    conv = lambda f, k, p, name: Conv2d(f, k, 1, p, dtype=self.dtype,  # noqa: E731
                                        name=name)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)  # noqa: E731
    y = nn.relu(bn("bn1")(conv(self.planes, 1, 0, "conv1")(x), train))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, 1, "conv2")(y), train))
    y = avg_pool(y, self.stride)
    y = conv(out_features, 1, 0, "conv3")(y)
    y = ZeroScaleBatchNorm(dtype=self.dtype, name="bn3")(y, train)
    identity = x
    if self.stride > 1 or x.shape[-1] != out_features:
      identity = avg_pool(x, self.stride)
      identity = conv(out_features, 1, 0, "downsample_conv")(identity)
      identity = bn("downsample_bn")(identity, train)
    return nn.relu(y + identity.astype(y.dtype))


class AttentionPool2d(nn.Module):
  """OpenCLIP's ``AttentionPool2d``: QKV attention pooling of a ``[B, h, w, C]`` map.

  Tokens: the mean of the ``h*w`` positions followed by the positions (row-major, as
  ``torch.flatten`` of NCHW), plus ``positional_embedding`` ``[(h*w)+1, C]``. One
  multi-head attention (``heads`` heads, queries scaled by ``head_dim**-0.5``) with
  separate ``q_proj``/``k_proj``/``v_proj`` and output projection ``c_proj`` (to
  ``output_dim``); the result at the mean token is returned. Only that query is
  computed (the other rows of OpenCLIP's attention output are discarded there).

  Attributes:
    spacial_dim: Side of the map the positional embedding is made for
      (``image_size // 32``).
    heads: Number of attention heads (must divide ``C``).
    output_dim: Output dimension of ``c_proj``.
    dtype: Compute dtype (the softmax runs in float32).
  """
  spacial_dim: int
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, h, w, C]`` -> ``[B, output_dim]``."""
    b, h, w, c = x.shape
    n = self.spacial_dim ** 2 + 1
    if h * w + 1 != n:
      raise ValueError(f"AttentionPool2d: the feature map is {h}x{w} but the positional "
                       f"embedding has {n} tokens ({self.spacial_dim}x{self.spacial_dim} "
                       "+ 1); feed images of size image_size (the map is image_size // 32)")
    if c % self.heads:
      raise ValueError(f"AttentionPool2d: {c} channels are not divisible by heads="
                       f"{self.heads}")
    std = c ** -0.5
    pos = self.param("positional_embedding", nn.initializers.normal(std), (n, c))
    tokens = x.reshape(b, h * w, c)
    tokens = jnp.concatenate(
        [jnp.mean(tokens.astype(jnp.float32), axis=1, keepdims=True).astype(tokens.dtype),
         tokens], axis=1)
    tokens = tokens + pos.astype(tokens.dtype)[None]
    dense = lambda f, name: nn.Dense(  # noqa: E731
        f, kernel_init=nn.initializers.normal(std),
        bias_init=torch_default_bias_init(c), dtype=self.dtype, name=name)
    hd = c // self.heads
    q = dense(c, "q_proj")(tokens[:, 0]).reshape(b, self.heads, hd)
    k = dense(c, "k_proj")(tokens).reshape(b, n, self.heads, hd)
    v = dense(c, "v_proj")(tokens).reshape(b, n, self.heads, hd)
    scores = jnp.einsum("bhd,bnhd->bhn", q.astype(jnp.float32) * hd ** -0.5,
                        k.astype(jnp.float32))
    attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhn,bnhd->bhd", attn, v.astype(jnp.float32)).reshape(b, c)
    return dense(self.output_dim, "c_proj")(out.astype(self.dtype))


class ModifiedResNet(nn.Module):
  """OpenCLIP's ``ModifiedResNet`` as a CLIP image tower (see the module docstring).

  Attributes:
    layers: Bottleneck blocks per stage (RN50: ``(3, 4, 6, 3)``); exactly four stages,
      since the attention pool expects a ``/32`` map.
    width: Stem width; stage ``i`` has bottleneck width ``width * 2**i`` and the last
      stage outputs ``width * 32`` channels (RN50: 64 -> 2048).
    heads: Attention-pool heads; ``0`` means OpenCLIP's ``width * 32 // 64``.
    image_size: Input side the positional embedding is made for (RN50: 224); inputs
      must give the same ``image_size // 32`` map.
    embed_dim: Output dimension (OpenCLIP's ``output_dim``; RN50: 1024).
    dtype: Compute dtype (parameters and BatchNorm statistics stay float32).
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  heads: int = 0
  image_size: int = 224
  embed_dim: int = 1024
  dtype: Dtype = jnp.float32

  @property
  def num_heads(self) -> int:
    return int(self.heads) or self.width * 32 // HEAD_WIDTH

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Embeds ``[B, H, W, 3]`` images.

    Returns:
      ``(z [B, embed_dim], {'features': [B, H/32, W/32, width*32]})``.
    """
    if len(self.layers) != 4:
      raise ValueError(f"ModifiedResNet needs 4 stages, got layers={tuple(self.layers)}")
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ModifiedResNet expects [B, H, W, 3] images, got {x.shape}")
    x = x.astype(self.dtype)
    half = self.width // 2
    for i, f in enumerate((half, half, self.width), start=1):
      x = Conv2d(f, 3, 2 if i == 1 else 1, 1, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train))
    x = avg_pool(x, 2)
    for stage, num_blocks in enumerate(self.layers):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(self.width * 2**stage, stride, dtype=self.dtype,
                       name=f"layer{stage + 1}_{block}")(x, train)
    z = AttentionPool2d(self.image_size // 32, self.num_heads, self.embed_dim,
                        dtype=self.dtype, name="attnpool")(x)
    return z, {"features": x}


# ----------------------------------------------------------------------------- weights
_BOTTLENECK_NAMES = TorchNames(children={
    **{f"conv{i}": (f"conv{i}", CONV_NAMES) for i in (1, 2, 3)},
    **{f"bn{i}": (f"bn{i}", BN_NAMES) for i in (1, 2, 3)},
    "downsample_conv": ("downsample.0", CONV_NAMES),
    "downsample_bn": ("downsample.1", BN_NAMES),
})
_ATTNPOOL_NAMES = TorchNames(
    leaves={("params", "positional_embedding"): ("positional_embedding", "none")},
    children={p: (p, LINEAR_NAMES) for p in ("q_proj", "k_proj", "v_proj", "c_proj")})


def torch_names(child_names: Iterable[str]) -> TorchNames:
  """OpenCLIP naming (without the ``visual.`` prefix) of a :class:`ModifiedResNet`.

  Args:
    child_names: The tower's top-level Flax module names (``variables['params']``).
  """
  children: dict[str, tuple[str, TorchNames]] = {
      **{f"conv{i}": (f"conv{i}", CONV_NAMES) for i in (1, 2, 3)},
      **{f"bn{i}": (f"bn{i}", BN_NAMES) for i in (1, 2, 3)},
      "attnpool": ("attnpool", _ATTNPOOL_NAMES),
  }
  for name in child_names:
    match = _BLOCK_RE.match(name)
    if match:
      children[name] = (f"layer{match.group(1)}.{match.group(2)}", _BOTTLENECK_NAMES)
  return TorchNames(children=children)


def visual_state_dict(state: Mapping[str, np.ndarray], prefix: str = "visual."
                      ) -> tuple[dict[str, np.ndarray], list[str]]:
  """The image-tower part of an OpenCLIP state dict.

  If any key starts with ``prefix`` (a whole CLIP checkpoint), those keys are returned
  without it and every other key (text tower, ``logit_scale``, ...) is reported as
  ignored; otherwise the state dict is taken to be the tower's own.

  Returns:
    ``(tower_state, ignored_keys)``.
  """
  if not any(k.startswith(prefix) for k in state):
    return dict(state), []
  tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return tower, sorted(k for k in state if not k.startswith(prefix))


def load(variables: Mapping[str, PyTree],
         path_or_state_dict: str | os.PathLike | Mapping[str, Any]
         ) -> tuple[dict[str, PyTree], list[str]]:
  """Imports OpenCLIP ``ModifiedResNet`` weights into :class:`ModifiedResNet` variables.

  Accepts the tower's own state dict (``conv1.weight``, ``attnpool.q_proj.bias``, ...)
  or a whole OpenCLIP CLIP checkpoint (``visual.*`` keys; the rest is ignored and
  returned). ``num_batches_tracked`` is skipped; a missing, unexpected or mis-shaped
  tower key is an error naming it (e.g. a checkpoint for another ``image_size`` has a
  differently shaped ``attnpool.positional_embedding``).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a :class:`ModifiedResNet`
      (arrays or ``jax.eval_shape`` structs); for a :class:`~contrastjax.models.clip.CLIP`
      pass its ``image_tower`` sub-trees.
    path_or_state_dict: ``.pt``/``.pth``/``.bin`` (torch), ``.npz`` or ``.safetensors``
      file, or a mapping of arrays / tensors.

  Returns:
    ``(new_variables, ignored_keys)``.

  Raises:
    KeyError: Missing or unexpected key (named in the message).
    ValueError: Shape mismatch (key, expected and found shape in the message).
  """
  state, ignored = visual_state_dict(read_state_dict(path_or_state_dict))
  new, unused = load_state_dict(variables, state, torch_names(variables["params"]),
                                what="OpenCLIP ModifiedResNet")
  return new, sorted(ignored + ["visual." + k if ignored else k for k in unused])


def to_torch_state_dict(variables: Mapping[str, PyTree], prefix: str = ""
                        ) -> dict[str, np.ndarray]:
  """:class:`ModifiedResNet` variables as an OpenCLIP-named state dict (NumPy, OIHW);
  ``prefix='visual.'`` gives the keys of a whole CLIP checkpoint."""
  state = to_state_dict(variables, torch_names(variables["params"].keys()))
  return {prefix + k: v for k, v in state.items()}
