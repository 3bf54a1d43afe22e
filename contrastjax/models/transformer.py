"""Pieces shared by the transformer encoders (``mit.py``: MiT/SegFormer; ``vit.py``: ViT):
the initialised Dense and LayerNorm factories, stochastic depth with a traced rate (blocks
under ``nn.scan``), and the leaf helpers of the stacked (scanned) parameter layout."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any

#: Linear init of both references (``trunc_normal_(std=.02)``: truncated at +-2 absolute,
#: i.e. +-100 std, a plain normal), bias zero.
LINEAR_INIT = nn.initializers.normal(0.02)


def dense(features: int, use_bias: bool, dtype: Dtype, precision: Any,
          name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, precision=precision,
                  kernel_init=LINEAR_INIT, bias_init=nn.initializers.zeros, name=name)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance like torch (flax's fast E[x^2] - E[x]^2 loses digits).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def drop_path(module: nn.Module, y: Array, rate: Array, deterministic: bool) -> Array:
  """Per-sample stochastic depth with a traced rate: ``nn.Dropout(rate,
  broadcast_dims=(1, ..., ndim - 1))`` written out (same mask shape, scaling and ``'dropout'``
  rng stream), since ``nn.Dropout`` needs its rate as a Python number."""
  if deterministic:
    return y
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep,
                              (y.shape[0],) + (1,) * (y.ndim - 1))
  mask = jnp.broadcast_to(mask, y.shape)
  return lax.select(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))


def index_leaf(leaf: Any, j: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[j]


def stack_leaves(*leaves: Any) -> Any:
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)
