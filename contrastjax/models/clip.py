"""CLIP-style two-tower models (Radford et al. 2021; OpenCLIP) for the modality-gap study.

Yaras et al. (CPAL 2025, App. E.1) train OpenCLIP's ``RN50`` from scratch on MSCOCO: a
ModifiedResNet-50 image tower (three-conv stem, anti-aliased strides, attention
pooling; ``contrastjax.models.clip_resnet``) and a 12-layer,
width-512, 8-head causal text Transformer, both projected to a 1024-d joint space, and a
learnable inverse temperature ``logit_scale``. This module has

* :class:`TextTransformer`: OpenCLIP's text tower (token + positional embedding, causal
  pre-LN Transformer, final LayerNorm, pooling at the end-of-text token, linear
  projection without bias), with OpenCLIP's initialisation;
* image towers: ``'modified_resnet'``, OpenCLIP's ModifiedResNet
  (:class:`contrastjax.models.clip_resnet.ModifiedResNet`, the paper's RN50), and
  ``'resnet'``, :class:`ResNetImageTower`: the torchvision-layout ResNet of
  ``contrastjax.models.resnet`` + global average pooling + a linear projection (an
  alternative that differs in the stem, the strided blocks and the pooling);
* :class:`MLPTower`: a small MLP for vector inputs (the synthetic paired data);
* :class:`CLIP`: two towers, L2-normalised embeddings and the raw logit-scale parameter
  ``nu`` (``logit_scale``; the method maps it to ``beta(nu)``, see
  ``contrastjax.gap.temperature``).

Models return ``(output, aux)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.models import clip_resnet
from contrastjax.models import resnet
from contrastjax.models import torch_import
from contrastjax.errors import ConfigError

Array = jax.Array
Dtype = Any


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """``x / max(||x||, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
  return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class MLPTower(nn.Module):
  """``depth`` x (Dense -> LayerNorm -> GELU), then a linear projection to ``embed_dim``.

  Attributes:
    hidden: Width of the hidden layers.
    depth: Number of hidden layers.
    embed_dim: Output (joint space) dimension.
  """
  hidden: int = 128
  depth: int = 2
  embed_dim: int = 32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    del train
    h = x.astype(jnp.float32)
    for i in range(self.depth):
      h = nn.Dense(self.hidden, name=f"fc{i}")(h)
      h = nn.LayerNorm(name=f"ln{i}")(h)
      h = nn.gelu(h, approximate=False)
    z = nn.Dense(self.embed_dim, use_bias=False, name="proj")(h)
    return z, {"features": h}


class ResNetImageTower(nn.Module):
  """torchvision-layout ResNet (``contrastjax.models.resnet``), global average pooling of
  the last stage and a linear projection (no bias) to ``embed_dim``.

  Attributes:
    stage_sizes: Bottleneck blocks per stage (ResNet-50: ``(3, 4, 6, 3)``).
    stem_width: Stem width (64).
    base_width: First-stage bottleneck width (64).
    embed_dim: Output dimension.
    dtype: Compute dtype.
  """
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  stem_width: int = 64
  base_width: int = 64
  embed_dim: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    feats = resnet.ResNet(tuple(self.stage_sizes), self.stem_width, self.base_width,
                          dtype=self.dtype, name="backbone")(x, train=train)
    last = feats[f"layer{len(self.stage_sizes)}"]
    pooled = jnp.mean(last.astype(jnp.float32), axis=(1, 2))
    width = pooled.shape[-1]
    z = nn.Dense(self.embed_dim, use_bias=False, name="proj",
                 kernel_init=nn.initializers.normal(width ** -0.5))(pooled)
    return z, {"pooled": pooled}


class ResidualAttentionBlock(nn.Module):
  """Pre-LN Transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

  The MLP is ``c_fc`` (width -> mlp_ratio * width) -> GELU (exact) -> ``c_proj``.
  Initialisation follows OpenCLIP's ``TextTransformer.init_parameters``.
  """
  width: int
  heads: int
  layers: int                    # total depth, for the projection init std
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    attn_std = self.width ** -0.5
    proj_std = attn_std * (2 * self.layers) ** -0.5
    fc_std = (2 * self.width) ** -0.5
    y = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, qkv_features=self.width, out_features=self.width,
        kernel_init=nn.initializers.normal(attn_std),
        out_kernel_init=nn.initializers.normal(proj_std), name="attn")(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-5, name="ln_2")(x)
    y = nn.Dense(int(self.width * self.mlp_ratio), name="c_fc",
                 kernel_init=nn.initializers.normal(fc_std))(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.width, name="c_proj", kernel_init=nn.initializers.normal(proj_std))(y)
    return x + y


class TextTransformer(nn.Module):
  """OpenCLIP's text tower (``open_clip.transformer.TextTransformer``, defaults of RN50).

  ``tokens`` ``[B, context_length]`` int32 -> token embedding (std 0.02) + positional
  embedding (std 0.01) -> ``layers`` causal pre-LN blocks -> ``ln_final`` -> the
  features at the end-of-text token -> ``@ text_projection`` (std ``width**-0.5``).

  Pooling is OpenCLIP's ``'argmax'``: the position of the largest token id, which is
  the end-of-text token for both tokenizers of ``contrastjax.data.text.tokenizer`` (it has
  the largest id of their vocabularies).

  Attributes:
    vocab_size: Vocabulary size (CLIP BPE: 49408).
    context_length: Maximum sequence length (77).
    width: Transformer width (512).
    layers: Number of blocks (12).
    heads: Attention heads (8).
    mlp_ratio: MLP hidden size / width (4).
    embed_dim: Joint-space dimension (RN50: 1024).
  """
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0
  embed_dim: int = 1024

  @nn.compact
  def __call__(self, tokens: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    del train
    if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
      raise ValueError(f"tokens must be [B, L<={self.context_length}], got {tokens.shape}")
    tokens = tokens.astype(jnp.int32)
    length = tokens.shape[1]
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(tokens)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (self.context_length, self.width))
    x = x + pos[:length]
    mask = nn.make_causal_mask(tokens, dtype=jnp.bool_)  # [B, 1, L, L]
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.width, self.heads, self.layers, self.mlp_ratio,
                                 name=f"resblocks_{i}")(x, mask)
    x = nn.LayerNorm(epsilon=1e-5, name="ln_final")(x)
    eot = jnp.argmax(tokens, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.param("text_projection", nn.initializers.normal(self.width ** -0.5),
                      (self.width, self.embed_dim))
    return pooled @ proj, {"pooled": pooled}


class CLIP(nn.Module):
  """Two towers with L2-normalised embeddings and the raw logit-scale parameter.

  Attributes:
    image_tower: Module mapping ``image`` to ``([B, D], aux)``.
    text_tower: Module mapping ``text`` to ``([B, D], aux)``.
    logit_scale_init: Initial value of the parameter ``logit_scale`` (``nu``); for
      OpenCLIP's ``beta = exp(nu)`` that is ``log(1 / 0.07)``.
  """
  image_tower: nn.Module
  text_tower: nn.Module
  logit_scale_init: float = float(np.log(1 / 0.07))

  @nn.compact
  def __call__(self, image: Array, text: Array, train: bool = False
               ) -> tuple[dict[str, Array], dict[str, Any]]:
    """Returns ``({'image_embeds', 'text_embeds', 'logit_scale'}, aux)``; the embeddings
    are unit-norm ``[B, D]`` float32, ``logit_scale`` is the raw scalar ``nu``."""
    zi, aux_i = self.image_tower(image, train=train)
    zt, aux_t = self.text_tower(text, train=train)
    if zi.shape[-1] != zt.shape[-1]:
      raise ValueError(f"the image tower embeds in {zi.shape[-1]} dimensions but the text "
                       f"tower in {zt.shape[-1]}; set the same embed_dim for both")
    nu = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), ())
    out = {"image_embeds": l2_normalize(zi.astype(jnp.float32)),
           "text_embeds": l2_normalize(zt.astype(jnp.float32)),
           "logit_scale": nu}
    return out, {"image": aux_i, "text": aux_t,
                 "image_unnormalized": zi, "text_unnormalized": zt}


# ----------------------------------------------------------------------------- build
TOWERS = {
    "mlp": MLPTower,
    "resnet": ResNetImageTower,
    "modified_resnet": clip_resnet.ModifiedResNet,
    "transformer": TextTransformer,
}


def build_tower(cfg: Mapping[str, Any], embed_dim: int, what: str) -> nn.Module:
  """A tower from ``{'name': ..., **fields}``; ``embed_dim`` is the model's.

  Raises:
    ValueError: an unknown tower name or a field the tower does not have (named).
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  name = cfg.pop("name", None)
  classes = TOWERS
  if name not in classes:
    raise ConfigError(f"config.model.{what}.name={name!r} is not a known tower; expected "
                     f"one of {sorted(classes)}")
  cls = classes[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  bad = sorted(set(cfg) - fields)
  if bad:
    raise ConfigError(f"config.model.{what}.{bad[0]} is not a field of {cls.__name__}; "
                     f"valid fields: {sorted(fields)}")
  for k, v in cfg.items():
    if isinstance(v, list):
      cfg[k] = tuple(v)
    if k == "dtype" and isinstance(v, str):
      cfg[k] = jnp.dtype(v)
  return cls(embed_dim=int(embed_dim), **cfg)


def build_clip(model_cfg: Mapping[str, Any], logit_scale_init: float) -> CLIP:
  """``config.model = {embed_dim, image: {name, ...}, text: {name, ...}}`` -> CLIP."""
  for key in ("embed_dim", "image", "text"):
    if key not in model_cfg:
      raise ConfigError(f"config.model.{key} is missing (config.model needs embed_dim, "
                       "image and text)")
  extra = sorted(set(model_cfg.keys()) - {"embed_dim", "image", "text", "name"})
  if extra:
    raise ConfigError(f"config.model.{extra[0]} is not known; expected embed_dim, image, "
                     "text")
  d = int(model_cfg["embed_dim"])
  return CLIP(build_tower(model_cfg["image"], d, "image"),
              build_tower(model_cfg["text"], d, "text"), float(logit_scale_init))


# ----------------------------------------------------------------------------- OpenCLIP import
def _text_params_from_openclip(state: Mapping[str, np.ndarray], template: Mapping[str, Any],
                               heads: int) -> tuple[dict[str, Any], set[str]]:
  """:class:`TextTransformer` params from OpenCLIP's text keys (``token_embedding.weight``,
  ``transformer.resblocks.N.attn.in_proj_weight`` (q|k|v rows), ``ln_final.*``,
  ``text_projection``); returns ``(params, used keys)``."""
  used: set[str] = set()

  def take(key: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray:
    if key not in state:
      raise KeyError(f"OpenCLIP text tower: missing key {key!r} in the state dict")
    value = np.asarray(state[key], np.float32)
    value = value.T if transpose else value
    if value.shape != tuple(shape):
      raise ValueError(f"OpenCLIP text tower: shape mismatch for {key!r}: expected "
                       f"{tuple(shape)[::-1] if transpose else tuple(shape)}, got "
                       f"{np.asarray(state[key]).shape}")
    used.add(key)
    return value

  def norm(prefix: str, like) -> dict[str, np.ndarray]:
    return {"scale": take(prefix + ".weight", like["scale"].shape),
            "bias": take(prefix + ".bias", like["bias"].shape)}

  t = template
  width = t["positional_embedding"].shape[1]
  hd = width // heads
  proj_shape = t["text_projection"].shape
  if "text_projection.weight" in state:   # OpenCLIP's proj_type='linear' (bias-free)
    proj = take("text_projection.weight", proj_shape, transpose=True)
  else:
    proj = take("text_projection", proj_shape)
  params: dict[str, Any] = {
      "token_embedding": {"embedding": take("token_embedding.weight",
                                            t["token_embedding"]["embedding"].shape)},
      "positional_embedding": take("positional_embedding", t["positional_embedding"].shape),
      "ln_final": norm("ln_final", t["ln_final"]),
      "text_projection": proj}
  for name, block in t.items():
    if not name.startswith("resblocks_"):
      continue
    p = f"transformer.resblocks.{name.split('_', 1)[1]}."
    w_in = take(p + "attn.in_proj_weight", (3 * width, width))
    b_in = take(p + "attn.in_proj_bias", (3 * width,))
    attn = {}
    for j, part in enumerate(("query", "key", "value")):
      rows = slice(j * width, (j + 1) * width)
      attn[part] = {"kernel": w_in[rows].T.reshape(width, heads, hd),
                    "bias": b_in[rows].reshape(heads, hd)}
    attn["out"] = {"kernel": take(p + "attn.out_proj.weight", (width, width),
                                  transpose=True).reshape(heads, hd, width),
                   "bias": take(p + "attn.out_proj.bias", (width,))}
    params[name] = {
        "ln_1": norm(p + "ln_1", block["ln_1"]), "ln_2": norm(p + "ln_2", block["ln_2"]),
        "attn": attn,
        "c_fc": {"kernel": take(p + "mlp.c_fc.weight", block["c_fc"]["kernel"].shape, True),
                 "bias": take(p + "mlp.c_fc.bias", block["c_fc"]["bias"].shape)},
        "c_proj": {"kernel": take(p + "mlp.c_proj.weight", block["c_proj"]["kernel"].shape,
                                  True),
                   "bias": take(p + "mlp.c_proj.bias", block["c_proj"]["bias"].shape)}}
  return params, used


def load_openclip(variables: Mapping[str, Any], model: CLIP,
                  path_or_state_dict: Any) -> dict[str, Any]:
  """Imports a whole OpenCLIP ``CLIP`` checkpoint (``visual.*``, the text tower's keys,
  ``logit_scale``) into the variables of a :class:`CLIP` whose image tower is
  ``'modified_resnet'`` and text tower ``'transformer'`` (the paper's RN50).

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of ``model`` (arrays or
      ``jax.eval_shape`` structs).
    model: The :class:`CLIP` (for the text tower's head count).
    path_or_state_dict: ``.pt``/``.pth``/``.bin``, ``.npz`` or ``.safetensors`` file, or a
      mapping of arrays / tensors (``open_clip.create_model('RN50').state_dict()``).

  Returns:
    New variables (NumPy leaves), every leaf replaced.

  Raises:
    KeyError: A missing key, or keys the model has no variable for (named).
    ValueError: A shape mismatch (key, expected and found shape), or towers of other kinds.
  """
  if not (isinstance(model.image_tower, clip_resnet.ModifiedResNet)
          and isinstance(model.text_tower, TextTransformer)):
    raise ValueError("load_openclip needs image tower 'modified_resnet' and text tower "
                     f"'transformer'; got {type(model.image_tower).__name__} and "
                     f"{type(model.text_tower).__name__}")
  state = torch_import.read_state_dict(path_or_state_dict)
  params = variables["params"]
  image_vars = {"params": params["image_tower"]}
  if "batch_stats" in variables:
    image_vars["batch_stats"] = variables["batch_stats"]["image_tower"]
  image, _ = clip_resnet.load(image_vars, {k: v for k, v in state.items()
                                           if k.startswith("visual.")})
  text, used = _text_params_from_openclip(state, params["text_tower"], model.text_tower.heads)
  if "logit_scale" not in state:
    raise KeyError("OpenCLIP CLIP: missing key 'logit_scale' in the state dict")
  used.add("logit_scale")
  unused = sorted(k for k in state if not k.startswith("visual.") and k not in used)
  if unused:
    raise KeyError(f"OpenCLIP CLIP: unexpected key {unused[0]!r} in the state dict "
                   f"({len(unused)} unexpected: {unused[:6]}); the model has no such "
                   "variable")
  new = {"params": {"image_tower": image["params"], "text_tower": text,
                    "logit_scale": np.asarray(state["logit_scale"], np.float32).reshape(())}}
  if "batch_stats" in variables:
    new["batch_stats"] = {"image_tower": image["batch_stats"]}
  return new
