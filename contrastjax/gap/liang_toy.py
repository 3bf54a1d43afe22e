"""Liang et al. (NeurIPS 2022) 9-point toy: the static version of the gap mechanism.

Nine points per modality on the circles at heights ``+z`` (image) and ``-z`` (text) of
``S^2``, at radius ``sqrt(1 - z^2)`` and angles ``0, pi, pi/2, -pi/2``, the four diagonals
and ``1.53 pi`` (order: ``(a,0), (-a,0), (0,a), (0,-a), (b,b), (-b,b), (b,-b), (-b,-b),
1.53 pi`` with ``b = a / sqrt(2)``). The symmetric CE at logit scale ``s`` is scanned over
100 values of ``z`` in ``[-1, 1]``, with correct labels and with labels 3 and 8
(0-based) swapped. With the swap and a low temperature the loss is minimised far from
``z = 0``: mismatched pairs keep the modalities apart (docs/methods/modality_gap.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastjax.gap.flows import symmetric_ce

SCALES = (1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0)
SWAP = (3, 8)


def toy_points(z):
  """``(image, text)`` 9x3 arrays at heights ``+z`` and ``-z``."""
  z = jnp.asarray(z)
  a = jnp.sqrt(1.0 - z * z)
  angles = jnp.array([0.0, math.pi, math.pi / 2, -math.pi / 2, math.pi / 4,
                      3 * math.pi / 4, -math.pi / 4, -3 * math.pi / 4, 1.53 * math.pi])
  xy = a * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
  ones = jnp.ones((9, 1), xy.dtype)
  return (jnp.concatenate([xy, z * ones], axis=1),
          jnp.concatenate([xy, -z * ones], axis=1))


def toy_targets(swap: bool):
  t = list(range(9))
  if swap:
    i, j = SWAP
    t[i], t[j] = t[j], t[i]
  return tuple(t)


def toy_loss(z, scale, swap: bool):
  """Symmetric CE of the toy at height ``z`` and logit scale ``scale``."""
  img, txt = toy_points(z)
  return symmetric_ce(scale * img @ txt.T, toy_targets(swap))


def argmin_table(num_z: int = 100, scales=SCALES):
  """``{swap: {scale: z*}}`` with ``z*`` the grid ``z`` of least loss (ties: first).

  The grid is ``linspace(-1, 1, num_z)``; it excludes 0 for even ``num_z``, so the
  matched optimum shows up as ``|z*| = 0.0101``.
  """
  zs = jnp.linspace(-1.0, 1.0, num_z)
  out = {}
  for swap in (False, True):
    grid = jax.jit(jax.vmap(jax.vmap(lambda z, s: toy_loss(z, s, swap), (0, None)),
                            (None, 0)))
    idx = jnp.argmin(grid(zs, jnp.asarray(scales, zs.dtype)), axis=1)
    out[swap] = {float(s): float(zs[i]) for s, i in zip(scales, idx)}
  return out
