"""Tests of the PyTorch-convention layers in ``contrastjax.models.nn``.

Each op is checked against an independent NumPy implementation (runs without torch) and,
where torch is installed, against the PyTorch op itself.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models.nn import BatchNorm, Conv2d, max_pool


def _rand(shape, seed=0, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# ----------------------------------------------------------------------------- conv / pool
def test_max_pool_pads_with_minus_inf():
  x = _rand((1, 6, 6, 2), low=-5.0, high=-1.0)  # all negative: zero padding would win
  got = np.asarray(max_pool(jnp.asarray(x), 3, 2, 1))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  want = np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                             for j in range(3)], 1) for i in range(3)], 1)
  np.testing.assert_array_equal(got, want)
  assert got.max() < 0


@pytest.mark.parametrize("k,stride,pad,dil,bias", [(7, 2, 3, 1, False), (3, 2, 1, 1, True),
                                                   (1, 2, 0, 1, False), (3, 1, 6, 6, False)])
def test_conv2d_matches_torch(k, stride, pad, dil, bias):
  torch = pytest.importorskip("torch")
  conv = Conv2d(5, k, stride, pad, dil, use_bias=bias)
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
  kernel = Conv2d(64, 3).init(jax.random.key(1), jnp.zeros((1, 4, 4, 32)))
  w = np.asarray(kernel["params"]["kernel"])
  bound = 1 / np.sqrt(3 * 3 * 32)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound


# ----------------------------------------------------------------------------- batch norm
def test_batchnorm_train_uses_biased_var_and_updates_unbiased():
  x = _rand((2, 3, 4, 5), seed=5) * 3 + 1
  bn = BatchNorm()
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
  bn = BatchNorm()
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
  y, new = BatchNorm(group_size=3).apply(variables, jnp.asarray(x), train=True,
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
  y6, _ = BatchNorm(group_size=6).apply(variables, jnp.asarray(x), train=True,
                                        mutable=["batch_stats"])
  y0, _ = BatchNorm().apply(variables, jnp.asarray(x), train=True,
                            mutable=["batch_stats"])
  np.testing.assert_allclose(y6, y0, atol=1e-6)
  with pytest.raises(ValueError, match="group_size=4 does not divide"):
    BatchNorm(group_size=4).apply(variables, jnp.asarray(x), train=True,
                                  mutable=["batch_stats"])
  with pytest.raises(ValueError, match="per channel and group"):
    BatchNorm(group_size=1).apply(variables, jnp.asarray(x), train=True,
                                  mutable=["batch_stats"])


def test_batchnorm_train_rejects_single_value_per_channel():
  bn = BatchNorm()
  x = jnp.ones((1, 1, 1, 3))
  variables = bn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    bn.apply(variables, x, train=True, mutable=["batch_stats"])
