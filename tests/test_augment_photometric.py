"""Tests of the on-device strong view (contrastjax.augment.photometric).

Each op is checked against an independent numpy formula and, when torch is installed, against
torchvision.transforms.functional (the reference's implementation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.augment import photometric as P

LUMA = np.array([0.2989, 0.587, 0.114])


def _images(b: int = 2, h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).random((b, h, w, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# numpy references.
# ------------------------------------------------------------------------------------------------


def _np_gray(x):
  return (x.astype(np.float64) @ LUMA)[..., None]


def _np_brightness(x, f):
  return np.clip(f * x.astype(np.float64), 0, 1)


def _np_contrast(x, f):
  mean = _np_gray(x).mean(axis=(-3, -2, -1), keepdims=True)
  return np.clip(f * x + (1 - f) * mean, 0, 1)


def _np_saturation(x, f):
  return np.clip(f * x + (1 - f) * _np_gray(x), 0, 1)


def _np_hue(x, shift):
  import colorsys  # pylint: disable=g-import-not-at-top
  out = np.empty(x.shape, np.float64)
  for idx in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx])
    out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


def _np_blur(x, sigma, ky, kx):
  def kernel(k):
    t = np.arange(k) - (k - 1) / 2
    p = np.exp(-0.5 * (t / sigma) ** 2)
    return p / p.sum()
  out = x.astype(np.float64)
  for axis, k in ((-3, ky), (-2, kx)):
    half = k // 2
    pad = [(0, 0)] * out.ndim
    pad[axis] = (half, half)
    padded = np.pad(out, pad, mode='reflect')
    n = out.shape[axis]
    out = sum(w * np.take(padded, np.arange(i, i + n), axis=axis)
              for i, w in enumerate(kernel(k)))
  return out


def test_ops_match_numpy():
  x = _images()
  for f in (0.7, 1.3):
    np.testing.assert_allclose(P.adjust_brightness(x, f), _np_brightness(x, f), atol=1e-6)
    np.testing.assert_allclose(P.adjust_contrast(x, f), _np_contrast(x, f), atol=1e-6)
    np.testing.assert_allclose(P.adjust_saturation(x, f), _np_saturation(x, f), atol=1e-6)
  for h in (-0.1, 0.04, 0.5):
    np.testing.assert_allclose(P.adjust_hue(x, h), _np_hue(x, h), atol=2e-6)
  np.testing.assert_allclose(P.grayscale(x), np.repeat(_np_gray(x), 3, -1), atol=1e-6)
  for sigma in (0.1, 3.0):
    np.testing.assert_allclose(P.gaussian_blur(x, sigma, (7, 1)), _np_blur(x, sigma, 7, 1),
                               atol=1e-6)
    np.testing.assert_allclose(P.gaussian_blur(x, sigma, (3, 5)), _np_blur(x, sigma, 3, 5),
                               atol=1e-6)


def test_contrast_mean_is_per_image():
  x = _images()
  x[1] *= 0.2
  single = np.stack([np.asarray(P.adjust_contrast(x[i], 0.5)) for i in range(2)])
  np.testing.assert_allclose(P.adjust_contrast(x, 0.5), single, atol=1e-7)


def test_blur_is_vertical_only():
  row = np.random.default_rng(1).random((1, 1, 10, 3)).astype(np.float32)
  const_cols = np.broadcast_to(row, (1, 12, 10, 3))          # varies only horizontally
  np.testing.assert_allclose(P.gaussian_blur(const_cols, 2.0, (7, 1)), const_cols, atol=1e-6)
  col = np.swapaxes(const_cols, 1, 2)                         # varies only vertically
  assert np.abs(np.asarray(P.gaussian_blur(col, 2.0, (7, 1))) - col).max() > 0.05
  with pytest.raises(ValueError, match='odd'):
    P.gaussian_blur(col, 1.0, (6, 1))


# ------------------------------------------------------------------------------------------------
# torchvision parity.
# ------------------------------------------------------------------------------------------------


def test_ops_match_torchvision():
  torch = pytest.importorskip('torch')
  tf = pytest.importorskip('torchvision.transforms.functional')
  x = _images()
  t = torch.from_numpy(x).permute(0, 3, 1, 2)

  def check(ours, theirs, atol=1e-6):
    np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(), atol=atol)

  for f in (0.7, 1.3):
    check(P.adjust_brightness(x, f), tf.adjust_brightness(t, f))
    check(P.adjust_contrast(x, f), tf.adjust_contrast(t, f))
    check(P.adjust_saturation(x, f), tf.adjust_saturation(t, f))
  for h in (-0.1, 0.07, -0.5):
    check(P.adjust_hue(x, h), tf.adjust_hue(t, h), atol=2e-6)
  check(P.grayscale(x), tf.rgb_to_grayscale(t, 3))
  for sigma in (0.1, 3.0):
    check(P.gaussian_blur(x, sigma, (7, 1)), tf.gaussian_blur(t, [1, 7], [sigma, sigma]))


def test_full_chain_matches_torchvision_given_params():
  torch = pytest.importorskip('torch')
  tf = pytest.importorskip('torchvision.transforms.functional')
  x = _images(3)
  for order, gray in (((3, 1, 0, 2), True), ((0, 2, 3, 1), False)):
    params = P.StrongAugmentParams(order=jnp.asarray(order, jnp.int32), brightness=1.2,
                                   contrast=0.8, saturation=1.25, hue=-0.07,
                                   grayscale=jnp.asarray(gray), sigma=1.3)
    ours = P.apply_strong_augment(x, params)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    ops = {0: lambda v: tf.adjust_brightness(v, 1.2), 1: lambda v: tf.adjust_contrast(v, 0.8),
           2: lambda v: tf.adjust_saturation(v, 1.25), 3: lambda v: tf.adjust_hue(v, -0.07)}
    for i in order:
      t = ops[i](t)
    if gray:
      t = tf.rgb_to_grayscale(t, 3)
    t = tf.gaussian_blur(t, [1, 7], [1.3, 1.3])
    np.testing.assert_allclose(np.asarray(ours), t.permute(0, 2, 3, 1).numpy(), atol=3e-6)


# ------------------------------------------------------------------------------------------------
# Randomness.
# ------------------------------------------------------------------------------------------------


def test_parameter_distributions():
  keys = jax.random.split(jax.random.key(0), 4000)
  p = jax.jit(jax.vmap(lambda k: P.sample_strong_augment_params(k)))(keys)
  np.testing.assert_array_equal(np.sort(np.asarray(p.order), axis=1),
                                np.tile(np.arange(4), (4000, 1)))
  assert len({tuple(o) for o in np.asarray(p.order)}) == 24             # all 4! orders occur
  for name in ('brightness', 'contrast', 'saturation'):
    v = np.asarray(getattr(p, name))
    assert 0.7 <= v.min() < 0.72 and 1.28 < v.max() <= 1.3, name
  hue = np.asarray(p.hue)
  assert -0.1 <= hue.min() < -0.09 and 0.09 < hue.max() <= 0.1
  assert 0.47 < np.asarray(p.grayscale).mean() < 0.53
  sigma = np.asarray(p.sigma)
  assert 0.1 <= sigma.min() < 0.15 and 2.95 < sigma.max() <= 3.0
  big = P.sample_strong_augment_params(jax.random.key(1), brightness=2.0)
  assert float(big.brightness) >= 0.0                                    # max(0, 1 - b)
  with pytest.raises(ValueError, match='hue'):
    P.sample_strong_augment_params(jax.random.key(1), hue=0.6)


def test_batch_shares_parameters_unless_per_image():
  one = _images(1)
  batch = jnp.asarray(np.repeat(one, 6, axis=0))
  f = jax.jit(P.strong_augment, static_argnames=('per_image',))
  shared = np.asarray(f(jax.random.key(3), batch))
  np.testing.assert_allclose(shared, np.repeat(shared[:1], 6, axis=0), atol=1e-7)
  assert np.abs(shared - one).max() > 1e-3                    # the view differs from the input
  per = np.asarray(f(jax.random.key(3), batch, per_image=True))
  assert np.abs(per - per[:1]).max(axis=(1, 2, 3))[1:].min() > 1e-3
  assert per.shape == batch.shape and per.dtype == np.float32
  assert 0.0 <= per.min() and per.max() <= 1.0 + 1e-6
  np.testing.assert_array_equal(f(jax.random.key(3), batch, per_image=True), per)  # deterministic
  # A single HWC image with the same key gives the batch's first image: one parameter set per
  # call, whatever the batch size.
  single = f(jax.random.key(3), jnp.asarray(one[0]))
  np.testing.assert_allclose(single, shared[0], atol=1e-6)
