"""Tests of the bilinear resampling in ``contrastjax.models.resample``.

Each op is checked against an independent NumPy implementation (runs without torch) and,
where torch is installed, against the PyTorch op itself.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# ----------------------------------------------------------------------------- half-pixel
def test_resize_half_pixel_matches_torch():
  torch = pytest.importorskip("torch")
  x = _rand((2, 5, 7, 3))
  for size in ((16, 16), (10, 14), (3, 4)):
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="bilinear",
        align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(resample.resize_bilinear_half_pixel(jnp.asarray(x), size),
                               expected, atol=1e-5)


def test_resize_half_pixel_is_jax_image_resize_and_keeps_same_size_input():
  x = jnp.asarray(_rand((2, 5, 7, 3)), jnp.bfloat16)
  same = resample.resize_bilinear_half_pixel(x, np.array([5, 7]))
  assert same is x
  got = resample.resize_bilinear_half_pixel(x, (9.0, 4))
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 9, 4, 3)
  want = jax.image.resize(x, (2, 9, 4, 3), "bilinear", antialias=False)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
