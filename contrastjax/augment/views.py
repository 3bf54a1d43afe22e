"""SiamSeg's device-side augmentations (jit-able JAX, explicit PRNG keys, NHWC).

Images are normalised with ImageNet mean/std on 0..255 values (``(x - mean) / std``, the
mean/std of :mod:`contrastjax.data.transforms.mmseg`) as the data pipeline emits them; the
photometric ops run on the de-normalised [0, 1] image and the result is re-normalised.
Reference: github.com/woldier/SiamSeg (``mmseg/models/utils/dacs_transform.py``,
``sim_aug_transform.py``); see ``docs/methods/siamseg.md``.

* :func:`strong_transform`: DACS's colour jitter and Gaussian blur of the ClassMix-ed images:
  the two on/off draws are made once per batch (``random.uniform`` in
  ``_prepare_strong_transform_param``), the jitter factors, jitter order and blur sigma per
  image (the reference calls kornia once per image; kornia samples factors per call, numpy
  draws sigma per call).
* :func:`siamseg_views`: the two SimSiam views of each target image (``sim_aug_transform.py``),
  every draw per image (:func:`simsiam_view`, :func:`random_resized_crop`).

Colour jitter follows torchvision's semantics, which kornia's ``ColorJitter`` follows since
kornia 0.6.7 (the reference does not pin kornia; older kornia's ``ColorJitter`` is today's
``ColorJiggle``): multiplicative brightness, contrast blended with the grey mean, saturation
blended with grey, hue rotated in HSV, each clamped to [0, 1], in a random order. The ops are
those of :mod:`contrastjax.augment.photometric`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from contrastjax.augment import photometric
from contrastjax.data.transforms.mmseg import IMAGENET_MEAN, IMAGENET_STD


def denormalize(x: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """Normalised -> [0, 1] (``denorm_``: ``(x * std + mean) / 255``)."""
  return (x * jnp.asarray(std, x.dtype) + jnp.asarray(mean, x.dtype)) / 255.0


def renormalize(x: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """[0, 1] -> normalised (``renorm_``)."""
  return (x * 255.0 - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def blur_kernel_size(size: int) -> int:
  """DACS's kernel size for a side of ``size`` px: about ``0.1 * size``, odd (51 at 512)."""
  c = math.ceil(0.1 * size)
  return int(math.floor(c - 0.5 + c % 2))


def _jitter_one(x01: jax.Array, params: photometric.StrongAugmentParams) -> jax.Array:
  branches = (
      lambda x: photometric.adjust_brightness(x, params.brightness),
      lambda x: photometric.adjust_contrast(x, params.contrast),
      lambda x: photometric.adjust_saturation(x, params.saturation),
      lambda x: photometric.adjust_hue(x, params.hue),
  )
  return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(params.order[i], branches, x),
                           x01)


def color_jitter(rng: jax.Array, images: jax.Array, strength: float,
                 apply: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """kornia ``ColorJitter(s, s, s, s)`` per image on de-normalised images, re-normalised.

  Args:
    rng: PRNG key (factors and order drawn per image).
    images: Normalised ``[B, H, W, 3]``.
    strength: ``s`` (brightness/contrast/saturation factors in ``[1 - s, 1 + s]``, hue shift
      in ``[-s, s]``).
    apply: bool, scalar (one draw for the batch) or ``[B]``: where False the image is returned
      unchanged (not even clamped).
    mean, std: The normalisation of ``images`` (0..255 scale).
  """
  params = photometric.sample_strong_augment_params(
      rng, brightness=strength, contrast=strength, saturation=strength, hue=strength,
      grayscale_p=0.0, batch_shape=(images.shape[0],))
  out = jax.vmap(_jitter_one)(denormalize(images, mean, std), params)
  out = renormalize(out, mean, std)
  apply = jnp.broadcast_to(jnp.asarray(apply), (images.shape[0],))
  return jnp.where(apply[:, None, None, None], out, images).astype(images.dtype)


def gaussian_blur(rng: jax.Array, images: jax.Array, apply: jax.Array,
                  sigma_range: tuple[float, float] = (0.15, 1.15)) -> jax.Array:
  """DACS ``gaussian_blur``: kornia ``GaussianBlur2d`` (reflect border), kernel
  :func:`blur_kernel_size` of the image's height/width, sigma ~ U(0.15, 1.15) per image."""
  b, h, w = images.shape[:3]
  sigma = jax.random.uniform(rng, (b,), minval=sigma_range[0], maxval=sigma_range[1])
  kernel = (blur_kernel_size(h), blur_kernel_size(w))
  out = jax.vmap(lambda x, s: photometric.gaussian_blur(x, s, kernel))(images, sigma)
  apply = jnp.broadcast_to(jnp.asarray(apply), (b,))
  return jnp.where(apply[:, None, None, None], out, images).astype(images.dtype)


def strong_transform(rng: jax.Array, images: jax.Array, *, color_jitter_strength: float = 0.2,
                     color_jitter_probability: float = 0.2, blur: bool = True,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """DACS's strong augmentation of the mixed images (after ``one_mix``).

  Jitter is applied to the whole batch when one ``U(0, 1) > color_jitter_probability`` (the
  reference's ``color_jitter > p``, i.e. with probability 0.8), blur when one ``U(0, 1) > 0.5``;
  factors, order and sigma are per image.
  """
  k_flag_j, k_flag_b, k_j, k_b = jax.random.split(rng, 4)
  do_jitter = jax.random.uniform(k_flag_j) > color_jitter_probability
  do_blur = (jax.random.uniform(k_flag_b) > 0.5) & blur
  x = color_jitter(k_j, images, color_jitter_strength, do_jitter, mean, std)
  return gaussian_blur(k_b, x, do_blur)


def random_resized_crop(rng: jax.Array, images: jax.Array,
                        scale: tuple[float, float] = (0.6, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """kornia ``RandomResizedCrop(size=(H, W), scale, ratio)`` per image, bilinear.

  Area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio); the box is clipped to the image
  (kornia retries up to 10 times and falls back to a centre crop instead) and placed uniformly.
  Resampling uses half-pixel centres (kornia's default is ``align_corners=True``; a sub-pixel
  difference).
  """
  b, h, w, _ = images.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (b,), minval=scale[0], maxval=scale[1]) * (h * w)
  log_r = jax.random.uniform(k_ratio, (b,), minval=math.log(ratio[0]),
                             maxval=math.log(ratio[1]))
  r = jnp.exp(log_r)
  cw = jnp.clip(jnp.round(jnp.sqrt(area * r)), 1.0, float(w))
  ch = jnp.clip(jnp.round(jnp.sqrt(area / r)), 1.0, float(h))
  y0 = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - ch + 1.0))
  x0 = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - cw + 1.0))

  def one(img, y0, x0, ch, cw):
    sy, sx = h / ch, w / cw
    return jax.image.scale_and_translate(
        img, (h, w, img.shape[-1]), (0, 1), jnp.stack([sy, sx]),
        jnp.stack([-y0 * sy, -x0 * sx]), method="linear", antialias=False)

  return jax.vmap(one)(images, y0, x0, ch, cw).astype(images.dtype)


def simsiam_view(rng: jax.Array, images: jax.Array, *, color_jitter_strength: float = 0.25,
                 color_jitter_p: float = 0.4, grayscale_p: float = 0.1, blur_p: float = 0.5,
                 flip_p: float = 0.5, crop_scale: tuple[float, float] = (0.6, 1.0),
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """One SimSiam view per image (``sim_aug_transform.augment_transform``), draws per image.

  RandomResizedCrop(scale 0.6-1.0) -> colour jitter (s=0.25, p 0.4, on [0, 1]) -> grayscale
  (p 0.1; the reference converts the NORMALISED image, luma 0.299/0.587/0.114) -> Gaussian blur
  (p 0.5) -> horizontal flip (p 0.5) -> vertical flip (p 0.5).
  """
  b = images.shape[0]
  keys = jax.random.split(rng, 7)
  x = random_resized_crop(keys[0], images, scale=crop_scale)
  x = color_jitter(keys[1], x, color_jitter_strength,
                   jax.random.uniform(keys[2], (b,)) < color_jitter_p, mean, std)
  gray = jax.random.uniform(keys[3], (b,)) < grayscale_p
  x = jnp.where(gray[:, None, None, None], photometric.grayscale(x), x)
  x = gaussian_blur(keys[4], x, jax.random.uniform(keys[5], (b,)) < blur_p)
  flips = jax.random.uniform(keys[6], (2, b)) < flip_p
  x = jnp.where(flips[0][:, None, None, None], x[:, :, ::-1], x)
  x = jnp.where(flips[1][:, None, None, None], x[:, ::-1], x)
  return x.astype(images.dtype)


def siamseg_views(rng: jax.Array, images: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
  """The two independent views ``(q, k)`` of ``images`` (``tow_transform``); ``kwargs`` are
  :func:`simsiam_view`'s."""
  k1, k2 = jax.random.split(rng)
  return simsiam_view(k1, images, **kwargs), simsiam_view(k2, images, **kwargs)
