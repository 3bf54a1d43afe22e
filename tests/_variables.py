"""Concrete model variables for tests, drawn with NumPy from ``jax.eval_shape`` structs.

A jitted or eager ``init`` costs tens of seconds of XLA compilation on a small CPU; this
costs nothing. Kernels get std ``1/sqrt(fan_in)``; norm scales and BatchNorm running
variances uniform in [0.5, 1.5]; CLIP's positional embeddings std ``1/sqrt(width)``;
biases and running means std 0.1 (non-trivial values, so that a parity test against a
reference implementation exercises every parameter).
"""
import jax
import jax.numpy as jnp
import numpy as np


def random_variables(shapes, seed: int):
  """Variables shaped as ``shapes`` (one NumPy draw per leaf, in tree order)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif "positional" in name:
      value = rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[-1])
    else:  # biases, running means, embeddings
      value = rng.normal(size=leaf.shape) * 0.1
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
