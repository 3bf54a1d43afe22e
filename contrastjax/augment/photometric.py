"""The stage-1 "strong" photometric view of ConDSeg, on device (jit-able JAX).

The reference (``utils/run_engine_stage1.py`` l.118-122) applies to the whole GPU batch tensor::

  Compose([ColorJitter(brightness=.3, contrast=.3, saturation=.3, hue=.1),
           RandomGrayscale(p=.5),
           GaussianBlur(kernel_size=(1, 7), sigma=(.1, 3))])

This module reproduces torchvision's semantics (``transforms/_functional_tensor.py``) on NHWC
float images in [0, 1]:

* ColorJitter draws a random order of its four ops (``torch.randperm(4)``) and factors
  b, c, s ~ U(max(0, 1 - x), 1 + x), h ~ U(-hue, hue); each op clamps to [0, 1]:
  brightness ``clip(b * x)``; contrast ``clip(c * x + (1 - c) * mean(gray(x)))`` with the mean over
  the whole image (per image of a batch); saturation ``clip(s * x + (1 - s) * gray(x))``; hue
  shifts H in HSV by h (mod 1).
* RandomGrayscale: with probability p, ``gray = 0.2989 R + 0.587 G + 0.114 B`` (torchvision's
  rounding of the ITU-R BT.601 weights) repeated to 3 channels.
* GaussianBlur: torchvision's ``kernel_size=(1, 7)`` is (kx, ky), so the blur is VERTICAL only; one
  sigma ~ U(0.1, 3) for both axes; kernel ``exp(-0.5 (t / sigma)^2)`` normalised at integer taps;
  reflect padding (edge not repeated). Here the kernel is given as ``blur_kernel=(height, width)
  = (7, 1)``.
* One parameter set for the whole batch (as the reference applies the transforms to the batch
  tensor); ``per_image=True`` draws one per image.

dm-pix is used where its semantics match torchvision: ``rgb_to_grayscale`` (same weights) and
``adjust_hue`` (same HSV round trip; verified in tests). Its ``adjust_brightness`` is additive,
its ``adjust_contrast`` blends with per-channel means and its ``adjust_saturation`` scales S in
HSV, and its ``gaussian_blur`` uses a square kernel with zero padding, so those are written here.

The ops act on the last axis as (R, G, B). With BGR input (the reference, ``ToFloat('bgr')``)
grayscale, saturation and hue therefore swap the R/B weights exactly as the reference does.
"""

from __future__ import annotations

from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp


class StrongAugmentParams(NamedTuple):
  """Random parameters of one strong view (leading batch axis when drawn per image).

  Attributes:
    order: int32 [4], a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
    brightness: Brightness factor.
    contrast: Contrast factor.
    saturation: Saturation factor.
    hue: Hue shift in [-0.5, 0.5].
    grayscale: Whether to convert to grayscale.
    sigma: Blur standard deviation in pixels.
  """

  order: jax.Array
  brightness: jax.Array
  contrast: jax.Array
  saturation: jax.Array
  hue: jax.Array
  grayscale: jax.Array
  sigma: jax.Array


def grayscale(images: jax.Array) -> jax.Array:
  """torchvision ``rgb_to_grayscale(img, 3)``: luma repeated to 3 channels (last axis)."""
  return pix.rgb_to_grayscale(images, keep_dims=True)


def _blend(a: jax.Array, b: jax.Array, ratio: jax.Array) -> jax.Array:
  return jnp.clip(ratio * a + (1.0 - ratio) * b, 0.0, 1.0)


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision ``adjust_brightness``: ``clip(factor * x, 0, 1)``."""
  return _blend(images, jnp.zeros_like(images), factor)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision ``adjust_contrast``: blend with the mean of the grayscale image (per image).

  Args:
    images: ``[..., H, W, 3]``.
    factor: Contrast factor (scalar).

  Returns:
    The adjusted images, clamped to [0, 1].
  """
  gray = pix.rgb_to_grayscale(images, keep_dims=False)     # [..., H, W, 1]
  mean = jnp.mean(gray, axis=(-3, -2, -1), keepdims=True)
  return _blend(images, mean, factor)


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision ``adjust_saturation``: blend with the grayscale image, clamped to [0, 1]."""
  return _blend(images, grayscale(images), factor)


def adjust_hue(images: jax.Array, shift: jax.Array) -> jax.Array:
  """torchvision ``adjust_hue`` for float images: ``H <- (H + shift) mod 1`` in HSV."""
  return jnp.clip(pix.adjust_hue(images, shift), 0.0, 1.0)


def gaussian_kernel1d(size: int, sigma: jax.Array) -> jax.Array:
  """torchvision ``_get_gaussian_kernel1d``: normalised Gaussian at integer taps around 0."""
  half = (size - 1) * 0.5
  t = jnp.linspace(-half, half, size)
  pdf = jnp.exp(-0.5 * (t / sigma) ** 2)
  return pdf / jnp.sum(pdf)


def _blur_axis(images: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
  size = kernel.shape[0]
  if size == 1:
    return images * kernel[0]
  half = size // 2
  n = images.shape[axis]
  if n <= half:
    raise ValueError(f'blur kernel of size {size} needs an image dimension > {half} for reflect '
                     f'padding; got {n}')
  pad = [(0, 0)] * images.ndim
  pad[axis] = (half, half)
  padded = jnp.pad(images, pad, mode='reflect')
  out = jnp.zeros_like(images)
  for k in range(size):
    out = out + kernel[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
  return out


def gaussian_blur(images: jax.Array, sigma: jax.Array,
                  kernel_size: tuple[int, int] = (7, 1)) -> jax.Array:
  """torchvision ``gaussian_blur(img, [kx, ky], [sigma, sigma])`` on ``[..., H, W, C]``.

  Args:
    images: Images, NHWC or HWC.
    sigma: Standard deviation (same for both axes, as ``transforms.GaussianBlur``).
    kernel_size: ``(height, width)`` taps, odd; ``(7, 1)`` = torchvision ``kernel_size=(1, 7)``.

  Returns:
    The blurred images (reflect padding, edge pixel not repeated).
  """
  ky, kx = kernel_size
  if ky % 2 == 0 or kx % 2 == 0 or ky < 1 or kx < 1:
    raise ValueError(f'blur kernel_size={kernel_size}; expected positive odd sizes')
  out = _blur_axis(images, gaussian_kernel1d(ky, sigma), axis=images.ndim - 3)
  return _blur_axis(out, gaussian_kernel1d(kx, sigma), axis=images.ndim - 2)


def sample_strong_augment_params(rng: jax.Array, *, brightness: float = 0.3,
                                 contrast: float = 0.3, saturation: float = 0.3,
                                 hue: float = 0.1, grayscale_p: float = 0.5,
                                 blur_sigma: tuple[float, float] = (0.1, 3.0),
                                 batch_shape: tuple[int, ...] = ()) -> StrongAugmentParams:
  """Draws strong-view parameters with torchvision's distributions.

  Args:
    rng: PRNG key.
    brightness: Brightness factor ~ U(max(0, 1 - brightness), 1 + brightness).
    contrast: Contrast factor ~ U(max(0, 1 - contrast), 1 + contrast).
    saturation: Saturation factor ~ U(max(0, 1 - saturation), 1 + saturation).
    hue: Hue shift ~ U(-hue, hue); must lie in [0, 0.5].
    grayscale_p: Probability of the grayscale conversion.
    blur_sigma: Range of the blur sigma.
    batch_shape: ``()`` for one set; ``(B,)`` for one set per image.

  Returns:
    The parameters.
  """
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f'hue={hue}; expected in [0, 0.5]')
  if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
    raise ValueError(f'blur_sigma={blur_sigma}; expected 0 < min <= max')
  keys = jax.random.split(rng, 7)

  def factor(key, x):
    return jax.random.uniform(key, batch_shape, minval=max(0.0, 1.0 - x), maxval=1.0 + x)

  orders = jax.random.split(keys[0], batch_shape) if batch_shape else keys[0]
  perm = jax.vmap(lambda k: jax.random.permutation(k, 4)) if batch_shape else (
      lambda k: jax.random.permutation(k, 4))
  return StrongAugmentParams(
      order=perm(orders).astype(jnp.int32),
      brightness=factor(keys[1], brightness),
      contrast=factor(keys[2], contrast),
      saturation=factor(keys[3], saturation),
      hue=jax.random.uniform(keys[4], batch_shape, minval=-hue, maxval=hue),
      grayscale=jax.random.uniform(keys[5], batch_shape) < grayscale_p,
      sigma=jax.random.uniform(keys[6], batch_shape, minval=blur_sigma[0],
                               maxval=blur_sigma[1]),
  )


def apply_strong_augment(images: jax.Array, params: StrongAugmentParams, *,
                         blur_kernel: tuple[int, int] = (7, 1)) -> jax.Array:
  """Applies one parameter set (scalars) to ``images`` ``[..., H, W, 3]``.

  ColorJitter ops in ``params.order``, then grayscale (if drawn), then the Gaussian blur.

  Args:
    images: float images in [0, 1].
    params: Scalar parameters (no batch axis).
    blur_kernel: Blur ``(height, width)`` taps.

  Returns:
    The strong view.
  """
  branches = (
      lambda x: adjust_brightness(x, params.brightness),
      lambda x: adjust_contrast(x, params.contrast),
      lambda x: adjust_saturation(x, params.saturation),
      lambda x: adjust_hue(x, params.hue),
  )
  # One switch inside a loop (not four unrolled switches) keeps the compiled program small.
  x = jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(params.order[i], branches, x), images)
  x = jnp.where(params.grayscale, grayscale(x), x)
  return gaussian_blur(x, params.sigma, blur_kernel)


def strong_augment(rng: jax.Array, images: jax.Array, *, brightness: float = 0.3,
                   contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.1,
                   grayscale_p: float = 0.5, blur_kernel: tuple[int, int] = (7, 1),
                   blur_sigma: tuple[float, float] = (0.1, 3.0),
                   per_image: bool = False) -> jax.Array:
  """The ConDSeg stage-1 strong view: ColorJitter -> RandomGrayscale -> GaussianBlur.

  Args:
    rng: PRNG key.
    images: float ``[B, H, W, 3]`` (or ``[H, W, 3]``) in [0, 1].
    brightness: ColorJitter brightness.
    contrast: ColorJitter contrast.
    saturation: ColorJitter saturation.
    hue: ColorJitter hue, in [0, 0.5].
    grayscale_p: RandomGrayscale probability.
    blur_kernel: Blur ``(height, width)``; ``(7, 1)`` = torchvision ``kernel_size=(1, 7)``.
    blur_sigma: Blur sigma range.
    per_image: False (reference): one parameter set for the whole batch. True: one per image.

  Returns:
    Augmented images, same shape and dtype.
  """
  kwargs = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                grayscale_p=grayscale_p, blur_sigma=blur_sigma)
  dtype = images.dtype
  if per_image and images.ndim == 4:
    params = sample_strong_augment_params(rng, batch_shape=(images.shape[0],), **kwargs)
    out = jax.vmap(lambda x, p: apply_strong_augment(x, p, blur_kernel=blur_kernel))(
        images, params)
  else:
    params = sample_strong_augment_params(rng, **kwargs)
    out = apply_strong_augment(images, params, blur_kernel=blur_kernel)
  return out.astype(dtype)
