"""Tests of the PyTorch-convention layers in ``contrastjax.models.layers``.

Each op is checked against an independent NumPy implementation (runs without torch) and,
where torch is installed, against the PyTorch op itself.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import condseg_ops
from contrastjax.models import nn
from contrastjax.models import resample


def _rand(shape, seed=0, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# ----------------------------------------------------------------------------- resize
def _resize_numpy_loop(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear align_corners=True resize, one output pixel at a time (float64)."""
  b, h_in, w_in, c = x.shape
  h_out, w_out = size
  out = np.zeros((b, h_out, w_out, c), np.float64)
  for o in range(h_out):
    sy = o * (h_in - 1) / (h_out - 1) if h_out > 1 else 0.0
    y0 = int(np.floor(sy))
    y1 = min(y0 + 1, h_in - 1)
    fy = sy - y0
    for p in range(w_out):
      sx = p * (w_in - 1) / (w_out - 1) if w_out > 1 else 0.0
      x0 = int(np.floor(sx))
      x1 = min(x0 + 1, w_in - 1)
      fx = sx - x0
      out[:, o, p] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (8, 10)), ((3, 3), (24, 48)),
                                          ((7, 6), (3, 4)), ((1, 4), (4, 1)),
                                          ((5, 5), (5, 9))])
def test_resize_matches_numpy_loop(in_hw, out_hw):
  x = _rand((2, *in_hw, 3))
  got = np.asarray(resample.resize_bilinear_align_corners(jnp.asarray(x), out_hw))
  np.testing.assert_allclose(got, _resize_numpy_loop(x, out_hw), atol=2e-6, rtol=0)


def test_upsample_corners_are_exact_and_not_half_pixel():
  x = _rand((1, 4, 4, 2))
  up = np.asarray(resample.upsample(jnp.asarray(x), 4))
  assert up.shape == (1, 16, 16, 2)
  # align_corners=True keeps the corner pixels; half-pixel resizing would not.
  np.testing.assert_array_equal(up[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                                x[:, [0, 0, -1, -1], [0, -1, 0, -1]])
  half_pixel = np.asarray(jax.image.resize(jnp.asarray(x), (1, 16, 16, 2), "bilinear"))
  assert np.abs(half_pixel - up).max() > 1e-2


@pytest.mark.parametrize("scale", [2, 4, 8, 16])
def test_upsample_matches_torch(scale):
  torch = pytest.importorskip("torch")
  x = _rand((2, 5, 3, 4), seed=scale)
  want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                         scale_factor=scale, mode="bilinear",
                                         align_corners=True).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(resample.upsample(jnp.asarray(x), scale))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_resize_to_size_matches_torch():
  torch = pytest.importorskip("torch")
  x = _rand((1, 7, 9, 2), seed=3)
  want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                         size=(5, 16), mode="bilinear",
                                         align_corners=True).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(resample.resize_bilinear_align_corners(jnp.asarray(x), (5, 16)))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


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


# ----------------------------------------------------------------------------- conv / pool
def test_max_pool_pads_with_minus_inf():
  x = _rand((1, 6, 6, 2), low=-5.0, high=-1.0)  # all negative: zero padding would win
  got = np.asarray(nn.max_pool(jnp.asarray(x), 3, 2, 1))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  want = np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                             for j in range(3)], 1) for i in range(3)], 1)
  np.testing.assert_array_equal(got, want)
  assert got.max() < 0


@pytest.mark.parametrize("k,stride,pad,dil,bias", [(7, 2, 3, 1, False), (3, 2, 1, 1, True),
                                                   (1, 2, 0, 1, False), (3, 1, 6, 6, False)])
def test_conv2d_matches_torch(k, stride, pad, dil, bias):
  torch = pytest.importorskip("torch")
  conv = nn.Conv2d(5, k, stride, pad, dil, use_bias=bias)
  x = _rand((2, 10, 9, 3), seed=k)
  variables = conv.init(jax.random.key(0), jnp.asarray(x))
  tconv = torch.nn.Conv2d(3, 5, k, stride, pad, dil, bias=bias)
  with torch.no_grad():
    tconv.weight.copy_(torch.from_numpy(
        np.array(variables["params"]["kernel"]).transpose(3, 2, 0, 1)))
    if bias:
      tconv.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
    want = tconv(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(conv.apply(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_conv2d_default_init_is_torch_uniform():
  kernel = nn.Conv2d(64, 3).init(jax.random.key(1), jnp.zeros((1, 4, 4, 32)))
  w = np.asarray(kernel["params"]["kernel"])
  bound = 1 / np.sqrt(3 * 3 * 32)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound


# ----------------------------------------------------------------------------- batch norm
def test_batchnorm_train_uses_biased_var_and_updates_unbiased():
  x = _rand((2, 3, 4, 5), seed=5) * 3 + 1
  bn = nn.BatchNorm()
  variables = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
  y, new = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  flat = x.reshape(-1, 5).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
  n = flat.shape[0]
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1),
                             rtol=1e-6)
  # Eval mode uses the running statistics.
  y_eval = bn.apply({**variables, **new}, jnp.asarray(x), train=False)
  np.testing.assert_allclose(
      np.asarray(y_eval),
      (x - new["batch_stats"]["mean"]) / np.sqrt(new["batch_stats"]["var"] + 1e-5),
      atol=1e-5)


def test_batchnorm_matches_torch_train_and_eval():
  torch = pytest.importorskip("torch")
  x = _rand((3, 4, 5, 6), seed=9) * 2 + 0.5
  bn = nn.BatchNorm()
  rng = np.random.default_rng(1)
  variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=6), jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)}}
  tbn = torch.nn.BatchNorm2d(6)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(np.array(variables["params"]["scale"])))
    tbn.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
    tbn.running_mean.copy_(torch.from_numpy(np.array(variables["batch_stats"]["mean"])))
    tbn.running_var.copy_(torch.from_numpy(np.array(variables["batch_stats"]["var"])))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_eval = tbn.eval()(xt).numpy().transpose(0, 2, 3, 1)
    want_train = tbn.train()(xt).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(bn.apply(variables, jnp.asarray(x), train=False), want_eval,
                             atol=1e-5)
  y, new = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, want_train, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["mean"], tbn.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"], tbn.running_var.numpy(), atol=1e-6)


def test_grouped_batchnorm_is_unsynchronised_torch_batchnorm_per_group():
  """``group_size=N``: each group of N samples normalised by its own statistics, as
  ``torch.nn.BatchNorm1d`` on GPUs holding N samples each; running stats: the mean of the
  per-group updates."""
  torch = pytest.importorskip("torch")
  x = _rand((6, 5), seed=3) * 3 + 1.0
  rng = np.random.default_rng(2)
  variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=5), jnp.float32)},
               "batch_stats": {"mean": jnp.zeros(5, jnp.float32),
                               "var": jnp.ones(5, jnp.float32)}}
  y, new = nn.BatchNorm(group_size=3).apply(variables, jnp.asarray(x), train=True,
                                                mutable=["batch_stats"])
  outs, means, vars_ = [], [], []
  for g in range(2):   # two "GPUs" of 3 samples, no sync
    tbn = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
      tbn.weight.copy_(torch.from_numpy(np.array(variables["params"]["scale"])))
      tbn.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
      outs.append(tbn.train()(torch.from_numpy(x[3 * g:3 * g + 3])).numpy())
    means.append(tbn.running_mean.numpy())
    vars_.append(tbn.running_var.numpy())
  np.testing.assert_allclose(y, np.concatenate(outs), atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["mean"], np.mean(means, 0), atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"], np.mean(vars_, 0), atol=1e-6)
  # one group of the whole batch is the ungrouped layer
  y6, _ = nn.BatchNorm(group_size=6).apply(variables, jnp.asarray(x), train=True,
                                               mutable=["batch_stats"])
  y0, _ = nn.BatchNorm().apply(variables, jnp.asarray(x), train=True,
                                   mutable=["batch_stats"])
  np.testing.assert_allclose(y6, y0, atol=1e-6)
  with pytest.raises(ValueError, match="group_size=4 does not divide"):
    nn.BatchNorm(group_size=4).apply(variables, jnp.asarray(x), train=True,
                                         mutable=["batch_stats"])
  with pytest.raises(ValueError, match="per channel and group"):
    nn.BatchNorm(group_size=1).apply(variables, jnp.asarray(x), train=True,
                                         mutable=["batch_stats"])


def test_batchnorm_train_rejects_single_value_per_channel():
  bn = nn.BatchNorm()
  x = jnp.ones((1, 1, 1, 3))
  variables = bn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    bn.apply(variables, x, train=True, mutable=["batch_stats"])


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
