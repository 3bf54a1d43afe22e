"""Tests of the ConDSeg-only blocks in ``contrastjax.models.condseg_ops``.

Each op is checked against an independent NumPy implementation (runs without torch) and,
where torch is installed, against the PyTorch op itself. (``outlook_aggregate`` is
checked against ``fold(window attention(unfold(x)))`` in ``test_benchmark.py``.)
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import condseg_ops


def _rand(shape, seed=0, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# ----------------------------------------------------------------------------- unfold/fold
def _unfold_numpy(x: np.ndarray, k: int, pad: int) -> np.ndarray:
  """nn.Unfold in NHWC: channel c*k*k + ki*k + kj holds x[i+ki-pad, j+kj-pad, c]."""
  b, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
  out = np.zeros((b, ho, wo, c * k * k), x.dtype)
  for ch, ki, kj in itertools.product(range(c), range(k), range(k)):
    out[..., ch * k * k + ki * k + kj] = xp[:, ki:ki + ho, kj:kj + wo, ch]
  return out


def _fold_numpy(cols: np.ndarray, size: tuple[int, int], k: int, pad: int) -> np.ndarray:
  """F.fold in NHWC: scatter-add every window entry back to its pixel, crop padding."""
  b, ho, wo, ck = cols.shape
  c = ck // (k * k)
  h, w = size
  out = np.zeros((b, h + 2 * pad, w + 2 * pad, c), np.float64)
  for ch, ki, kj in itertools.product(range(c), range(k), range(k)):
    out[:, ki:ki + ho, kj:kj + wo, ch] += cols[..., ch * k * k + ki * k + kj]
  return out[:, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize("k,pad", [(3, 1), (3, 0), (5, 2)])
def test_unfold_fold_match_numpy(k, pad):
  x = _rand((2, 6, 5, 3), seed=k + pad)
  cols = np.asarray(condseg_ops.unfold(jnp.asarray(x), k, pad))
  np.testing.assert_array_equal(cols, _unfold_numpy(x, k, pad))
  y = _rand(cols.shape, seed=7)
  folded = np.asarray(condseg_ops.fold(jnp.asarray(y), (6, 5), k, pad))
  np.testing.assert_allclose(folded, _fold_numpy(y, (6, 5), k, pad), atol=1e-5, rtol=0)
  # fold is the adjoint of unfold: <unfold(x), y> == <x, fold(y)>.
  np.testing.assert_allclose(np.vdot(cols.astype(np.float64), y),
                             np.vdot(x.astype(np.float64), folded), rtol=1e-6)


def test_unfold_fold_match_torch():
  torch = pytest.importorskip("torch")
  x = _rand((2, 5, 6, 4), seed=11)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  want = torch.nn.functional.unfold(xt, 3, padding=1)  # [B, C*9, H*W]
  got = np.asarray(condseg_ops.unfold(jnp.asarray(x), 3, 1))
  np.testing.assert_array_equal(got.reshape(2, 30, 36).transpose(0, 2, 1), want.numpy())
  y = _rand((2, 36, 30), seed=12)
  want_fold = torch.nn.functional.fold(torch.from_numpy(y), (5, 6), 3, padding=1).numpy()
  got_fold = np.asarray(condseg_ops.fold(jnp.asarray(y.transpose(0, 2, 1).reshape(2, 5, 6, 36)),
                                         (5, 6), 3, 1))
  np.testing.assert_allclose(got_fold.transpose(0, 3, 1, 2), want_fold, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- attention
def test_channel_and_spatial_attention_match_numpy():
  x = _rand((2, 5, 4, 32), seed=4)
  ca = condseg_ops.ChannelAttention()
  ca_vars = ca.init(jax.random.key(0), jnp.asarray(x))
  w1 = np.asarray(ca_vars["params"]["fc1"]["kernel"])[0, 0]  # [32, 2]
  w2 = np.asarray(ca_vars["params"]["fc2"]["kernel"])[0, 0]  # [2, 32]
  assert w1.shape == (32, 2)
  mlp = lambda p: np.maximum(p @ w1, 0) @ w2  # noqa: E731
  gate = 1 / (1 + np.exp(-(mlp(x.mean((1, 2))) + mlp(x.max((1, 2))))))
  np.testing.assert_allclose(ca.apply(ca_vars, jnp.asarray(x)), x * gate[:, None, None],
                             atol=1e-6)

  sa = condseg_ops.SpatialAttention()
  sa_vars = sa.init(jax.random.key(1), jnp.asarray(x))
  w = np.asarray(sa_vars["params"]["conv1"]["kernel"])[..., 0]  # [7, 7, 2]
  pooled = np.stack([x.mean(-1), x.max(-1)], -1)  # concat order [mean, max]
  padded = np.pad(pooled, ((0, 0), (3, 3), (3, 3), (0, 0)))
  att = sum(padded[:, i:i + 5, j:j + 4] @ w[i, j] for i in range(7) for j in range(7))
  np.testing.assert_allclose(sa.apply(sa_vars, jnp.asarray(x)),
                             x / (1 + np.exp(-att))[..., None], atol=1e-6)
