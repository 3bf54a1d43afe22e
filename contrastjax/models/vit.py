"""Vision Transformer (ViT-Ti/S/B/L), the APC / ViT-PCM encoder, in Flax linen (NHWC input).

ViT (Dosovitskiy et al., ICLR 2021; https://arxiv.org/abs/2010.11929) cuts the image into
``p x p`` patches, embeds each with one linear map (a ``p x p`` convolution with stride
``p``), prepends a learned class token, adds learned position embeddings and runs
``depth`` pre-norm transformer blocks and a final LayerNorm::

  x = [cls; PatchEmbed(image)] + pos_embed          (then Dropout(pos_dropout_rate))
  block(x) = x + DropPath(Attention(LN1(x)))
             then x + DropPath(Mlp(LN2(x)))
  Attention: q|k|v = Wqkv x (bias); softmax(q k^T / sqrt(d_head)) v; output projection.
  Mlp: fc1 (D -> mlp_ratio D) -> GELU (exact erf) -> fc2 (mlp_ratio D -> D).
  tokens = LN(x)

This is the function of timm's ``VisionTransformer`` (class token, ``global_pool='token'``,
no layer scale, no pre-norm; https://github.com/huggingface/pytorch-image-models,
``timm/models/vision_transformer.py``), of the original Google models
(https://github.com/google-research/vision_transformer, ``vit_jax/models_vit.py``) used
by ViT-PCM through vit-keras, and of Hugging Face's ``ViTModel`` (with
``layer_norm_eps=1e-6``). LayerNorm epsilon is 1e-6; stochastic depth rises linearly
from 0 to ``drop_path_rate`` over the blocks (timm's ``linspace``).

Output contract (:meth:`VisionTransformer.__call__`): ``(tokens, aux)`` with ``tokens``
``[B, N, D]`` the patch tokens after the final LayerNorm, class token removed (ViT-PCM's
``Transformer/encoder_norm`` output ``[:, 1:]``), row-major over the patch grid;
``aux['cls']`` ``[B, D]`` the normalised class token; ``aux['grid']`` ``[B, H/p, W/p, D]``
the tokens as a map; ``aux['blocks']`` (only when ``return_blocks`` asks for it) the
residual stream after the requested blocks, ``[B, 1 + N, D]`` with the class token
first and no final norm (timm's ``forward_intermediates(norm=False)``).

Position embeddings are parameters for the ``img_size`` grid. Other input sizes use
them resampled on the fly (bicubic with antialiasing, class token kept, as timm's
``dynamic_img_size`` / ``resample_abs_pos_embed``); :func:`load` resamples a checkpoint
made for another size the same way. (vit-keras, which ViT-PCM uses at its native 384,
resizes with TF's bicubic without antialiasing and with clamped borders: the same
weights inside the grid when upsampling, different ones near the borders and when
downsampling.) Inputs whose sides are not multiples of ``p`` lose their trailing
rows/columns (as the strided convolution of timm does).

:func:`load` imports timm state dicts (``patch_embed.proj.weight``,
``blocks.0.attn.qkv.weight``, ...), the original Google ``.npz`` checkpoints
(``embedding/kernel``, ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/
kernel``, ...; the ImageNet-21k + ImageNet-1k ViT-B_16 at 384 of ViT-PCM) and Hugging
Face ``ViTModel`` weights (Hub files, ``encoder.layer.0.attention.attention.query``, and
the module names of transformers >= 5, ``layers.0.attention.q_proj``).

Options as :mod:`contrastjax.models.mit`: ``scan_blocks`` (one ``nn.scan`` over
stacked block parameters, ``blocks/...`` with a leading block axis instead of
``blocks_{i}/...``), ``remat`` (recompute each block in the backward pass),
``dtype=jnp.bfloat16`` (bfloat16 compute with float32 parameters; LayerNorm statistics
and the attention softmax stay float32).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from contrastjax.models.nn import TORCH_DEFAULT_KERNEL_INIT, torch_default_bias_init
from contrastjax.models.torch_import import (
    CONV_NAMES, LINEAR_NAMES, TorchNames, load_state_dict, read_state_dict,
    to_state_dict, torch_mapping)
from contrastjax.models.transformer import dense as _dense
from contrastjax.models.transformer import drop_path as _drop_path
from contrastjax.models.transformer import index_leaf as _index_leaf
from contrastjax.models.transformer import layer_norm as _layer_norm
from contrastjax.models.transformer import stack_leaves as _stack_leaves

logger = logging.getLogger(__name__)

Array = jax.Array
Dtype = Any
PyTree = Any

#: timm's Linear init (``trunc_normal_(std=.02)``, truncated at +-2 absolute, i.e. +-100
#: std: a plain normal), bias zero.
#: timm's position-embedding init (``trunc_normal_(std=.02)``, as above).
POS_EMBED_INIT = nn.initializers.normal(0.02)
#: timm's class-token init (``normal_(std=1e-6)``).
CLS_INIT = nn.initializers.normal(1e-6)

#: ViT variants (Dosovitskiy et al., Table 1; Ti and S from DeiT / timm): width, depth,
#: heads and patch size. All use MLP ratio 4.
CONFIGS: dict[str, dict[str, int]] = {
    "ti16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "s16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "b16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "b8": dict(embed_dim=768, depth=12, num_heads=12, patch_size=8),
    "l16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f"expected an int or (height, width), got {size}")
  return size


def resample_pos_embed(pos_embed: Array, new_grid: Sequence[int], old_grid: Sequence[int],
                       num_prefix_tokens: int = 1) -> Array:
  """Resizes position embeddings to another patch grid (timm's ``resample_abs_pos_embed``).

  The grid part is resized bicubically with antialiasing (Keys cubic, ``a = -0.5``,
  half-pixel centres, weights renormalised at the borders), in float32, which is
  ``F.interpolate(mode='bicubic', antialias=True, align_corners=False)`` as timm calls
  it; the prefix (class) tokens are kept as they are.

  Args:
    pos_embed: ``[1, num_prefix_tokens + gh * gw, D]``.
    new_grid: ``(h, w)`` of the new patch grid.
    old_grid: ``(gh, gw)`` of ``pos_embed``.
    num_prefix_tokens: Leading tokens that are not on the grid (1: the class token).

  Returns:
    ``[1, num_prefix_tokens + h * w, D]`` in the dtype of ``pos_embed``.
  """
  new_grid, old_grid = _pair(new_grid), _pair(old_grid)
  n, d = pos_embed.shape[1], pos_embed.shape[2]
  if n != num_prefix_tokens + old_grid[0] * old_grid[1]:
    raise ValueError(f"position embeddings {pos_embed.shape} do not match a {old_grid} "
                     f"grid with {num_prefix_tokens} prefix tokens")
  if new_grid == old_grid:
    return pos_embed
  prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  grid = grid.astype(jnp.float32).reshape(1, old_grid[0], old_grid[1], d)
  grid = jax.image.resize(grid, (1, new_grid[0], new_grid[1], d), "bicubic",
                          antialias=True)
  grid = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(pos_embed.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


class PatchEmbed(nn.Module):
  """``nn.Conv2d(C, D, kernel_size=p, stride=p)`` as one matmul over the cut patches.

  The same sums as the strided convolution (trailing rows/columns that do not fill a
  patch are dropped, as PyTorch does), with a plain matmul gradient (XLA:CPU's
  strided-convolution kernel gradients are slow). The kernel is stored HWIO
  ``[p, p, C, D]`` like :class:`~contrastjax.models.nn.Conv2d`; PyTorch's default init.

  Attributes:
    features: Embedding width ``D``.
    patch_size: ``p``.
    dtype: Compute dtype.
    precision: ``lax`` precision.
  """
  features: int
  patch_size: int = 16
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, H, W, C]`` -> ``[B, H // p, W // p, D]``."""
    b, h, w, c = x.shape
    p = self.patch_size
    fan_in = p * p * c
    kernel = self.param("kernel", TORCH_DEFAULT_KERNEL_INIT,
                        (p, p, c, self.features), jnp.float32)
    bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,),
                      jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    gh, gw = h // p, w // p
    if gh == 0 or gw == 0:
      raise ValueError(f"input {h}x{w} is smaller than the patch size {p}")
    patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh, gw, fan_in)
    y = jnp.einsum("bhwk,kd->bhwd", patches, kernel.reshape(fan_in, self.features),
                   precision=self.precision)
    return y + bias


class Attention(nn.Module):
  """Multi-head self-attention with a packed ``qkv`` projection (timm ``Attention``).

  With ``attention_dropout_rate == 0`` (or deterministic) and ``precision=None`` the
  attention is ``jax.nn.dot_product_attention`` (logits and softmax in float32;
  ``implementation`` picks XLA, cuDNN, ...); otherwise an einsum formulation with
  the same float32 softmax, dropout on the attention probabilities and ``precision``
  on both matmuls.

  Attributes:
    num_heads: Attention heads (the width must be divisible by it).
    qkv_bias: Bias on the qkv projection.
    attention_dropout_rate: Dropout on the attention probabilities.
    dropout_rate: Dropout after the output projection (timm ``proj_drop``).
    implementation: ``implementation`` of ``jax.nn.dot_product_attention``.
    dtype: Compute dtype.
    precision: ``lax`` precision.
  """
  num_heads: int
  qkv_bias: bool = True
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """Attends over the tokens of ``[B, T, D]``; returns the same shape."""
    b, t, d = x.shape
    heads = self.num_heads
    if d % heads:
      raise ValueError(f"width {d} is not divisible by num_heads {heads}")
    head_dim = d // heads
    qkv = _dense(3 * d, self.qkv_bias, self.dtype, self.precision, "qkv")(x)
    qkv = qkv.reshape(b, t, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    drop_attn = self.attention_dropout_rate > 0 and not deterministic
    if drop_attn or self.precision is not None:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision,
                          preferred_element_type=jnp.float32)
      attn = jax.nn.softmax(logits * (head_dim ** -0.5), axis=-1).astype(v.dtype)
      attn = nn.Dropout(self.attention_dropout_rate)(attn, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", attn, v, precision=self.precision)
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = _dense(d, True, self.dtype, self.precision, "proj")(out.reshape(b, t, d))
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class Mlp(nn.Module):
  """``fc1 -> GELU (erf) -> Dropout -> fc2 -> Dropout`` (timm ``Mlp``).

  Attributes:
    hidden_features: Hidden width (``mlp_ratio * D``).
    dropout_rate: Dropout after the activation and after ``fc2``.
    dtype: Compute dtype.
    precision: ``lax`` precision.
  """
  hidden_features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """``[B, T, D]`` -> ``[B, T, D]``."""
    d = x.shape[-1]
    y = _dense(self.hidden_features, True, self.dtype, self.precision, "fc1")(x)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = _dense(d, True, self.dtype, self.precision, "fc2")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm transformer block with stochastic depth (timm ``Block``, no layer scale).

  Attributes:
    num_heads: Attention heads.
    mlp_ratio: MLP hidden width / block width.
    qkv_bias: Bias on the qkv projection.
    drop_path: Stochastic-depth rate of this block (per sample, rescaled by
      ``1 / (1 - rate)``; rng stream ``'dropout'``).
    dropout_rate: Dropout after the attention projection and in the MLP.
    attention_dropout_rate: Dropout on the attention probabilities.
    eps: LayerNorm epsilon.
    attention_impl: See :class:`Attention`.
    dtype: Compute dtype.
    precision: ``lax`` precision.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  eps: float = 1e-6
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """Applies the block to ``[B, T, D]``; ``deterministic`` disables all dropout."""
    return self._apply(x, deterministic, None)

  def _apply(self, x: Array, deterministic: bool, drop_rate: Array | None) -> Array:
    """The block; ``drop_rate`` (a traced scalar, from a scan over blocks) replaces the
    static ``drop_path`` when given."""
    d = x.shape[-1]
    if drop_rate is None:
      drop = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(  # noqa: E731
          y, deterministic=deterministic)
    else:
      drop = lambda y: _drop_path(self, y, drop_rate, deterministic)  # noqa: E731
    y = _layer_norm(self.eps, self.dtype, "norm1")(x)
    y = Attention(self.num_heads, self.qkv_bias, self.attention_dropout_rate,
                  self.dropout_rate, self.attention_impl, self.dtype, self.precision,
                  name="attn")(y, deterministic)
    x = x + drop(y)
    y = _layer_norm(self.eps, self.dtype, "norm2")(x)
    y = Mlp(int(d * self.mlp_ratio), self.dropout_rate, self.dtype, self.precision,
            name="mlp")(y, deterministic)
    return x + drop(y)


class _ScannedBlock(Block):
  """:class:`Block` as the body of ``nn.scan`` over the blocks: carry ``x``, scanned
  input the block's stochastic-depth rate; outputs the block output when ``collect``."""
  deterministic: bool = True
  collect: bool = False

  @nn.compact
  def __call__(self, x: Array, drop_rate: Array) -> tuple[Array, Array | None]:
    y = self._apply(x, self.deterministic, drop_rate).astype(x.dtype)
    return y, (y if self.collect else None)


class VisionTransformer(nn.Module):
  """The ViT encoder (defaults: ViT-B/16 at 224, as timm's ``vit_base_patch16_224``).

  Attributes:
    patch_size: Patch size ``p``.
    embed_dim: Width ``D``.
    depth: Transformer blocks.
    num_heads: Attention heads.
    mlp_ratio: MLP hidden width / ``D``.
    qkv_bias: Bias on the qkv projections.
    img_size: ``(H, W)`` (or one int) the position embeddings are made for; other
      input sizes resample them (see the module docstring).
    dropout_rate: Dropout after the attention projection and in the MLPs (timm's
      ``proj_drop_rate``; vit-keras / ViT-PCM: 0.1).
    pos_dropout_rate: Dropout after adding the position embeddings (timm's
      ``pos_drop_rate``; vit-keras has none, the original ``vit_jax`` uses
      ``dropout_rate``).
    attention_dropout_rate: Dropout on the attention probabilities.
    drop_path_rate: Stochastic depth of the last block; block ``i`` of ``n`` uses
      ``rate * i / (n - 1)``.
    eps: LayerNorm epsilon (1e-6).
    remat: Rematerialise each block in the backward pass (``nn.remat``).
    scan_blocks: Run the blocks as one ``nn.scan`` over stacked parameters (``blocks``
      with a leading block axis instead of ``blocks_{i}``): the same function,
      compiled once instead of once per block. Stochastic-depth and dropout draws
      differ from the unrolled model's (another rng split). :func:`stack_blocks` /
      :func:`unstack_blocks` convert parameters between the layouts; :func:`load` and
      :func:`to_torch_state_dict` accept both.
    attention_impl: ``implementation`` of ``jax.nn.dot_product_attention`` (``None``:
      JAX's choice, XLA; ``'cudnn'`` for cuDNN flash attention on GPUs).
    dtype: Compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    precision: ``lax`` precision of the matmuls (not ``None``: the einsum attention).
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  img_size: int | tuple[int, int] = 224
  dropout_rate: float = 0.0
  pos_dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  eps: float = 1e-6
  remat: bool = False
  scan_blocks: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  precision: Any = None

  @property
  def grid_size(self) -> tuple[int, int]:
    """Patch grid of ``img_size`` (the grid of the position-embedding parameters)."""
    h, w = _pair(self.img_size)
    return h // self.patch_size, w // self.patch_size

  def drop_path_rates(self) -> list[float]:
    """Per-block stochastic-depth rates, ``linspace(0, drop_path_rate, depth)``."""
    n = self.depth
    return [self.drop_path_rate * i / max(n - 1, 1) for i in range(n)]

  @nn.compact
  def __call__(self, x: Array, *, train: bool, deterministic: bool | None = None,
               return_blocks: Sequence[int] = ()) -> tuple[Array, dict[str, Any]]:
    """Encodes images.

    Args:
      x: ``[B, H, W, C]`` images, normalised as the weights expect (Google / ViT-PCM
        and timm ``augreg`` checkpoints: ``[-1, 1]``, i.e. ``x / 127.5 - 1``).
      train: Training mode; enables dropout and stochastic depth (needs the
        ``'dropout'`` rng when a rate is positive).
      deterministic: Overrides ``not train`` for dropout and stochastic depth.
      return_blocks: Indices of blocks whose outputs go to ``aux['blocks']``.

    Returns:
      ``(tokens, aux)``: ``tokens`` ``[B, h * w, D]`` (``h, w = H // p, W // p``) after
      the final LayerNorm without the class token, in ``dtype``; ``aux`` with ``'cls'``
      ``[B, D]``, ``'grid'`` ``[B, h, w, D]`` and, if ``return_blocks``, ``'blocks'``:
      a tuple of ``[B, 1 + h * w, D]`` block outputs (class token first, no final
      norm) in the order of ``return_blocks``.
    """
    if x.ndim != 4:
      raise ValueError(f"expected NHWC images [B, H, W, C], got shape {x.shape}")
    return_blocks = tuple(int(i) for i in return_blocks)
    bad = [i for i in return_blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"return_blocks {bad} out of range for depth {self.depth}")
    det = (not train) if deterministic is None else deterministic
    d = self.embed_dim
    x = PatchEmbed(d, self.patch_size, self.dtype, self.precision,
                   name="patch_embed")(x.astype(self.dtype))
    b, h, w, _ = x.shape
    gh, gw = self.grid_size
    cls_token = self.param("cls_token", CLS_INIT, (1, 1, d), jnp.float32)
    pos_embed = self.param("pos_embed", POS_EMBED_INIT, (1, 1 + gh * gw, d), jnp.float32)
    pos_embed = resample_pos_embed(pos_embed, (h, w), (gh, gw))
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, d)),
                         x.reshape(b, h * w, d)], axis=1)
    x = x + pos_embed.astype(self.dtype)
    x = nn.Dropout(self.pos_dropout_rate)(x, deterministic=det)

    rates = self.drop_path_rates()
    block_args = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                      qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate,
                      attention_dropout_rate=self.attention_dropout_rate, eps=self.eps,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      precision=self.precision)
    collected: dict[int, Array] = {}
    if self.scan_blocks and self.depth > 0:
      cell = nn.remat(_ScannedBlock, prevent_cse=False) if self.remat else _ScannedBlock
      # Random draws only where something can be dropped (as nn.Dropout(0.0), which
      # needs no 'dropout' rng).
      drops = not det and (any(r > 0 for r in rates) or self.dropout_rate > 0
                           or self.attention_dropout_rate > 0)
      stack = nn.scan(cell, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": drops},
                      in_axes=0, length=self.depth)
      x, ys = stack(**block_args, drop_path=0.0, deterministic=not drops,
                    collect=bool(return_blocks), name="blocks")(
                        x, jnp.asarray(rates, jnp.float32))
      collected = {i: ys[i] for i in return_blocks}
    else:
      block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
      for i in range(self.depth):
        x = block_cls(**block_args, drop_path=rates[i], name=f"blocks_{i}")(x, det)
        if i in return_blocks:
          collected[i] = x
    x = _layer_norm(self.eps, self.dtype, "norm")(x)
    tokens = x[:, 1:]
    aux: dict[str, Any] = {"cls": x[:, 0], "grid": tokens.reshape(b, h, w, d)}
    if return_blocks:
      aux["blocks"] = tuple(collected[i] for i in return_blocks)
    return tokens, aux


Model = VisionTransformer


def _variant_key(variant: str) -> str:
  key = variant.lower()
  for junk in ("vit", "-", "_", "/", " "):
    key = key.replace(junk, "")
  return key


def vit(variant: str = "b16", **overrides: Any) -> VisionTransformer:
  """A :class:`VisionTransformer` of a named size.

  Args:
    variant: Key of :data:`CONFIGS` (``'ti16'``, ``'s16'``, ``'b16'``, ``'b8'``,
      ``'l16'``); spellings like ``'ViT-B/16'`` or ``'ViT_B16'`` are accepted.
    **overrides: Other attributes (``img_size``, ``scan_blocks``, ``dtype``, ...).
  """
  key = _variant_key(variant)
  if key not in CONFIGS:
    raise ValueError(f"unknown ViT variant {variant!r}; expected one of {sorted(CONFIGS)}")
  return VisionTransformer(**{**CONFIGS[key], **overrides})


# ----------------------------------------------------------------------------- torch names
LN_NAMES = TorchNames(leaves={("params", "scale"): ("weight", "none"),
                              ("params", "bias"): ("bias", "none")})
_BLOCK_NAMES = TorchNames(children={
    "norm1": ("norm1", LN_NAMES),
    "attn": ("attn", TorchNames(children={"qkv": ("qkv", LINEAR_NAMES),
                                          "proj": ("proj", LINEAR_NAMES)})),
    "norm2": ("norm2", LN_NAMES),
    "mlp": ("mlp", TorchNames(children={"fc1": ("fc1", LINEAR_NAMES),
                                        "fc2": ("fc2", LINEAR_NAMES)}))})
_BLOCK_RE = re.compile(r"^blocks_(\d+)$")


def torch_names(params: Mapping[str, Any]) -> TorchNames:
  """timm naming of an unrolled :class:`VisionTransformer`'s ``params`` (only the
  top-level names are read): ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``."""
  children: dict[str, tuple[str, TorchNames]] = {
      "patch_embed": ("patch_embed.proj", CONV_NAMES), "norm": ("norm", LN_NAMES)}
  for name in params:
    match = _BLOCK_RE.match(name)
    if match:
      children[name] = (f"blocks.{match.group(1)}", _BLOCK_NAMES)
  return TorchNames(
      leaves={("params", "cls_token"): ("cls_token", "none"),
              ("params", "pos_embed"): ("pos_embed", "none")},
      children=children)


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether ``params`` use the ``scan_blocks`` layout (a ``blocks`` entry)."""
  return "blocks" in params


def unstack_blocks(params: Mapping[str, PyTree]) -> dict[str, PyTree]:
  """``scan_blocks`` parameters (``blocks/...`` with a leading block axis) in the
  unrolled layout (``blocks_{i}/...``); other entries unchanged. Works on arrays and
  ``jax.ShapeDtypeStruct`` leaves."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  if "blocks" not in params:
    return out
  tree = params["blocks"]
  depths = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(tree)}
  if len(depths) != 1:
    raise ValueError(f"stacked ViT blocks: leaves disagree on the block axis (leading "
                     f"sizes {sorted(depths)})")
  for j in range(depths.pop()):
    out[f"blocks_{j}"] = jax.tree_util.tree_map(lambda leaf, j=j: _index_leaf(leaf, j), tree)
  return out


def stack_blocks(params: Mapping[str, PyTree]) -> dict[str, PyTree]:
  """Unrolled parameters (``blocks_{i}``) in the ``scan_blocks`` layout (``blocks`` with
  the blocks stacked along a new leading axis, in order of ``i``)."""
  out: dict[str, PyTree] = {}
  blocks: dict[int, PyTree] = {}
  for name, tree in params.items():
    match = _BLOCK_RE.match(name)
    if match:
      blocks[int(match.group(1))] = tree
    else:
      out[name] = tree
  if blocks:
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f"ViT blocks_*: expected indices 0..{len(blocks) - 1}, got "
                       f"{sorted(blocks)}")
    out["blocks"] = jax.tree_util.tree_map(_stack_leaves,
                                           *[blocks[j] for j in range(len(blocks))])
  return out


# ----------------------------------------------------------------------------- import
@dataclasses.dataclass(frozen=True)
class _Part:
  """One source tensor of a timm tensor: its key (without prefix), the expected shape
  (a tuple, or a description when several shapes are valid) and a shape check."""
  key: str
  expect: tuple[int, ...] | str
  ok: Callable[[tuple[int, ...]], bool]


def _exact(key: str, shape: Sequence[int]) -> _Part:
  shape = tuple(int(s) for s in shape)
  return _Part(key, shape, lambda s: tuple(s) == shape)


def _heads(key: str, lead: tuple[int, ...], width: int, tail: tuple[int, ...]) -> _Part:
  """A Google attention tensor ``lead + (heads, head_dim) + tail`` with any split of
  ``width = heads * head_dim``."""
  n = len(lead)

  def ok(s: tuple[int, ...]) -> bool:
    return (len(s) == n + 2 + len(tail) and tuple(s[:n]) == lead
            and s[n] * s[n + 1] == width and tuple(s[n + 2:]) == tail)

  spec = ", ".join([str(v) for v in lead] + ["heads", "head_dim"] + [str(v) for v in tail])
  return _Part(key, f"({spec}) with heads * head_dim = {width}", ok)


def _pos_part(key: str, shape: tuple[int, ...]) -> _Part:
  d = shape[-1]
  return _Part(key, f"(1, 1 + gh * gw, {d}) (other grids than the model's "
               f"{shape[1] - 1} tokens are resampled)",
               lambda s: len(s) == 3 and s[0] == 1 and s[2] == d and s[1] > 1)


Rule = tuple[list[_Part], Callable[[list[np.ndarray]], np.ndarray]]


def _same(arrays: list[np.ndarray]) -> np.ndarray:
  return arrays[0]


def _timm_rule(key: str, shape: tuple[int, ...]) -> Rule:
  if key == "pos_embed":
    return [_pos_part(key, shape)], _same
  return [_exact(key, shape)], _same


_GOOGLE_LEAVES = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_2/scale", "norm2.bias": "LayerNorm_2/bias",
    "attn.proj.bias": "MultiHeadDotProductAttention_1/out/bias",
    "mlp.fc1.bias": "MlpBlock_3/Dense_0/bias", "mlp.fc2.bias": "MlpBlock_3/Dense_1/bias"}


def _google_rule(key: str, shape: tuple[int, ...]) -> Rule:
  """Original Google naming (``vit_jax`` checkpoints, flax ``Dense`` kernels
  ``[in, out]``, attention kernels ``[D, heads, head_dim]`` / ``[heads, head_dim, D]``,
  HWIO patch embedding)."""
  if key == "cls_token":
    return [_exact("cls", shape)], _same
  if key == "pos_embed":
    return [_pos_part("Transformer/posembed_input/pos_embedding", shape)], _same
  if key == "patch_embed.proj.weight":  # OIHW <- HWIO
    o, i, kh, kw = shape
    return ([_exact("embedding/kernel", (kh, kw, i, o))],
            lambda a: np.transpose(a[0], (3, 2, 0, 1)))
  if key == "patch_embed.proj.bias":
    return [_exact("embedding/bias", shape)], _same
  if key in ("norm.weight", "norm.bias"):
    leaf = "scale" if key.endswith("weight") else "bias"
    return [_exact(f"Transformer/encoder_norm/{leaf}", shape)], _same
  match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
  if not match:
    raise KeyError(f"no Google-naming rule for {key!r}")
  base, leaf = f"Transformer/encoderblock_{match.group(1)}/", match.group(2)
  attn = base + "MultiHeadDotProductAttention_1/"
  if leaf in _GOOGLE_LEAVES:
    return [_exact(base + _GOOGLE_LEAVES[leaf], shape)], _same
  if leaf == "attn.qkv.weight":  # [3D, D] <- 3 x [D, heads, head_dim]
    d = shape[1]
    return ([_heads(f"{attn}{n}/kernel", (d,), d, ()) for n in ("query", "key", "value")],
            lambda a: np.concatenate([x.reshape(d, d).T for x in a], axis=0))
  if leaf == "attn.qkv.bias":
    d = shape[0] // 3
    return ([_heads(f"{attn}{n}/bias", (), d, ()) for n in ("query", "key", "value")],
            lambda a: np.concatenate([x.reshape(-1) for x in a]))
  if leaf == "attn.proj.weight":  # [D, D] <- [heads, head_dim, D]
    d = shape[0]
    return [_heads(f"{attn}out/kernel", (), d, (d,))], lambda a: a[0].reshape(d, d).T
  match = re.match(r"^mlp\.fc([12])\.weight$", leaf)
  if match:
    dense = f"{base}MlpBlock_3/Dense_{int(match.group(1)) - 1}/kernel"
    return [_exact(dense, shape[::-1])], lambda a: a[0].T
  raise KeyError(f"no Google-naming rule for {key!r}")


def _hf_rule_factory(block: str, names: Mapping[str, str], qkv: Sequence[str],
                     final_norm: str) -> Callable[[str, tuple[int, ...]], Rule]:
  """Hugging Face ``ViTModel`` naming: ``block`` is the per-layer prefix
  (``encoder.layer.`` or ``layers.``), ``names`` maps timm leaves to HF leaves, ``qkv``
  the three separate q/k/v modules."""

  def rule(key: str, shape: tuple[int, ...]) -> Rule:
    if key == "cls_token":
      return [_exact("embeddings.cls_token", shape)], _same
    if key == "pos_embed":
      return [_pos_part("embeddings.position_embeddings", shape)], _same
    if key.startswith("patch_embed.proj."):
      leaf = key.rsplit(".", 1)[1]
      return [_exact(f"embeddings.patch_embeddings.projection.{leaf}", shape)], _same
    if key.startswith("norm."):
      return [_exact(f"{final_norm}.{key.rsplit('.', 1)[1]}", shape)], _same
    match = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if not match:
      raise KeyError(f"no Hugging Face naming rule for {key!r}")
    base, module, leaf = f"{block}{match.group(1)}.", match.group(2), match.group(3)
    if module == "attn.qkv":
      part_shape = (shape[0] // 3,) + tuple(shape[1:])
      return ([_exact(f"{base}{n}.{leaf}", part_shape) for n in qkv],
              lambda a: np.concatenate(a, axis=0))
    return [_exact(f"{base}{names[module]}.{leaf}", shape)], _same

  return rule


_HF_MODULES = {"norm1": "layernorm_before", "norm2": "layernorm_after",
               "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
               "mlp.fc2": "output.dense"}
_HF_V5_MODULES = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                  "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
                  "mlp.fc2": "mlp.fc2"}
_RULES: dict[str, Callable[[str, tuple[int, ...]], Rule]] = {
    "timm": _timm_rule,
    "google": _google_rule,
    "hf": _hf_rule_factory("encoder.layer.", _HF_MODULES,
                           [f"attention.attention.{n}" for n in ("query", "key", "value")],
                           "layernorm"),
    "hf_v5": _hf_rule_factory("layers.", _HF_V5_MODULES,
                              [f"attention.{n}_proj" for n in "qkv"], "layernorm"),
}
#: Keys (after the prefix) each naming may hold beside the encoder: classifier heads,
#: the 21k models' pre-logits layer, Hugging Face's pooler.
_IGNORABLE: dict[str, tuple[str, ...]] = {
    "timm": ("head.", "fc_norm."),
    "google": ("head/", "pre_logits/"),
    "hf": ("pooler.", "classifier."),
    "hf_v5": ("pooler.", "classifier."),
}
_ANCHORS: dict[str, re.Pattern[str]] = {
    "timm": re.compile(r"^(.*?)patch_embed\.proj\.weight$"),
    "google": re.compile(r"^(.*?)embedding/kernel$"),
    "hf": re.compile(r"^(.*?)embeddings\.patch_embeddings\.projection\.weight$"),
}


def detect_style(state: Mapping[str, Any], prefix: str | None = None) -> tuple[str, str]:
  """Finds the naming style and key prefix of a ViT state dict.

  Args:
    state: The state dict.
    prefix: Expected key prefix (e.g. ``'vit.'`` or ``'backbone.'``); ``None`` detects
      it.

  Returns:
    ``(style, prefix)``, style in ``'timm'``, ``'google'`` (original ``vit_jax`` npz),
    ``'hf'`` (Hugging Face Hub files) or ``'hf_v5'`` (transformers >= 5 module names).

  Raises:
    ValueError: No ViT found, or several (pass ``prefix`` to choose).
  """
  found = []
  for key in state:
    for style, pattern in _ANCHORS.items():
      match = pattern.match(key)
      if match and (prefix is None or match.group(1) == prefix):
        found.append((style, match.group(1)))
  if not found:
    where = f" under prefix {prefix!r}" if prefix is not None else ""
    raise ValueError(f"no ViT found{where}: expected a key like 'patch_embed.proj.weight' "
                     f"(timm), 'embedding/kernel' (Google npz) or 'embeddings."
                     f"patch_embeddings.projection.weight' (Hugging Face); the state dict "
                     f"starts with {sorted(state)[:3]}")
  if len(found) > 1:
    raise ValueError(f"several ViT encoders in the state dict (style, prefix): {found}; "
                     f"pass prefix= to choose one")
  style, pre = found[0]
  if style == "hf":
    if any(k.startswith(pre + "layers.") for k in state):
      style = "hf_v5"
  return style, pre


def _torch_shape(shape: Sequence[int], transform: str) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if transform == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == "linear":
    return (shape[1], shape[0])
  return shape


def _plain(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def _square_grid(tokens: int, key: str, what: str) -> tuple[int, int]:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f"{what}: {key!r} holds {tokens} grid tokens, not a square grid; "
                     f"pass its grid as source_grid_size= (and the model's as grid_size=)")
  return side, side


def load(variables: Mapping[str, PyTree],
         path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
         prefix: str | None = None, grid_size: Sequence[int] | None = None,
         source_grid_size: Sequence[int] | None = None
         ) -> tuple[dict[str, PyTree], list[str]]:
  """Imports timm / Google / Hugging Face ViT weights into encoder variables.

  Supported namings (detected from the keys, see :func:`detect_style`):

  * timm (``.safetensors``, ``.npz``, ``.pth``; also ToCo / DeiT checkpoints under a
    prefix): ``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
    ``blocks.0.attn.qkv.weight``, ``norm.weight``, ...
  * original Google ``.npz`` (``vit_jax``; ViT-PCM's ``imagenet21k+imagenet2012``
    ViT-B_16 at 384): ``embedding/kernel`` (HWIO), ``cls``,
    ``Transformer/posembed_input/pos_embedding``,
    ``Transformer/encoderblock_0/LayerNorm_0/scale``,
    ``MultiHeadDotProductAttention_1/{query,key,value}/kernel`` ``[D, heads, head_dim]``,
    ``out/kernel`` ``[heads, head_dim, D]``, ``LayerNorm_2``, ``MlpBlock_3/Dense_{0,1}``,
    ``Transformer/encoder_norm``.
  * Hugging Face ``ViTModel``: Hub files (``[vit.]embeddings.patch_embeddings.projection.
    weight``, ``encoder.layer.0.attention.attention.query.weight``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``,
    ``layernorm_before`` / ``layernorm_after``, ``layernorm``) and the module names of
    transformers >= 5 (``layers.0.attention.q_proj``, ``o_proj``, ``mlp.fc1``).

  Classifier heads (timm ``head.*``, Google ``head/*`` and ``pre_logits/*``, Hugging
  Face ``pooler.*`` / ``classifier.*``) are ignored (counted in the log); keys outside
  the prefix are ignored; both are returned. Position embeddings for another grid than
  the model's are resampled (:func:`resample_pos_embed`, as timm's checkpoint filter).
  Note that the number of heads is not checked for timm / Hugging Face weights (their
  tensors do not carry it).

  Args:
    variables: ``{'params': ...}`` of a :class:`VisionTransformer` (arrays or
      ``jax.eval_shape`` structs; either block layout).
    path_or_state_dict: ``.pth``/``.pt``/``.bin`` (needs torch), ``.npz`` or
      ``.safetensors`` file, or a mapping of arrays/tensors.
    prefix: Key prefix of the encoder (``None``: detected).
    grid_size: The model's patch grid ``(h, w)``; needed only to resample position
      embeddings into a non-square grid (default: square).
    source_grid_size: The checkpoint's patch grid; needed only for a non-square one.

  Returns:
    ``(new_variables, ignored_keys)`` (ignored keys under their source names).

  Raises:
    ValueError: No (or an ambiguous) ViT, a missing, wrongly shaped or unexpected key;
      the message names the source key, the file and the expected shape.
  """
  source = ("an in-memory state dict" if isinstance(path_or_state_dict, Mapping)
            else os.fspath(path_or_state_dict))
  scanned = is_scanned(variables["params"])
  if scanned:
    variables = {**variables, "params": unstack_blocks(variables["params"])}
  state = read_state_dict(path_or_state_dict)
  style, prefix = detect_style(state, prefix)
  what = f"ViT state dict ({style} naming, {source})"
  rule = _RULES[style]
  names = torch_names(variables["params"])
  mapping = torch_mapping(variables, names)
  flat = {c: traverse_util.flatten_dict(_plain(variables[c])) for c in variables}

  rules = {}
  missing = []
  for key, leaf in mapping.items():
    shape = _torch_shape(flat[leaf.collection][leaf.path].shape, leaf.transform)
    rules[key] = (shape,) + rule(key, shape)
    missing += [(prefix + part.key, part.expect) for part in rules[key][1]
                if prefix + part.key not in state]
  if missing:
    missing.sort()
    more = (f" ({len(missing)} missing keys: {[k for k, _ in missing[:6]]}...)"
            if len(missing) > 1 else "")
    raise ValueError(f"{what}: missing key {missing[0][0]!r}, expected shape "
                     f"{missing[0][1]}{more}")

  converted: dict[str, np.ndarray] = {}
  used: set[str] = set()
  for key, (shape, parts, combine) in rules.items():
    arrays = []
    for part in parts:
      src = prefix + part.key
      value = np.asarray(state[src])
      if not part.ok(tuple(value.shape)):
        raise ValueError(f"{what}: shape mismatch for {src!r}: expected {part.expect}, "
                         f"got {tuple(value.shape)}")
      arrays.append(value)
      used.add(src)
    value = combine(arrays)
    if key == "pos_embed" and tuple(value.shape) != shape:
      new = tuple(grid_size) if grid_size is not None else _square_grid(
          shape[1] - 1, "the model's pos_embed", what)
      old = (tuple(source_grid_size) if source_grid_size is not None
             else _square_grid(value.shape[1] - 1, prefix + parts[0].key, what))
      if new[0] * new[1] != shape[1] - 1:
        raise ValueError(f"{what}: grid_size {new} does not match the model's "
                         f"{shape[1] - 1} position tokens")
      logger.info("%s: resampling position embeddings from a %s to a %s grid", what,
                  old, new)
      value = np.asarray(resample_pos_embed(jnp.asarray(value, jnp.float32), new, old))
    converted[key] = value

  inside = [k for k in state if k.startswith(prefix)]
  outside = sorted(k for k in state if not k.startswith(prefix))
  unused = sorted(k for k in inside if k not in used)
  ignorable = _IGNORABLE[style]
  heads = [k for k in unused if k[len(prefix):].startswith(ignorable)]
  unexpected = [k for k in unused if k not in heads]
  if unexpected:
    raise ValueError(f"{what}: unexpected key {unexpected[0]!r} ({len(unexpected)} "
                     f"unexpected: {unexpected[:6]}); the model has no such variable")
  new_variables, _ = load_state_dict(variables, converted, names, what=what)
  if heads:
    groups = sorted({re.split(r"[./]", k[len(prefix):])[0] for k in heads})
    logger.warning("%s: ignored %d classifier-head keys (%s)", what, len(heads),
                   ", ".join(groups))
  if outside:
    logger.warning("%s: ignored %d keys outside the encoder (prefix %r)", what,
                   len(outside), prefix)
  if scanned:
    new_variables = {**new_variables, "params": stack_blocks(new_variables["params"])}
  return new_variables, sorted(heads + outside)


def to_torch_state_dict(variables: Mapping[str, PyTree]) -> dict[str, np.ndarray]:
  """Encoder variables as a timm state dict (NumPy, torch layout; either block layout)."""
  if is_scanned(variables["params"]):
    variables = {**variables, "params": unstack_blocks(variables["params"])}
  return to_state_dict(variables, torch_names(variables["params"]))
