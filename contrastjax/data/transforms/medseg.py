"""Host-side (numpy) per-example transforms for ConDSeg, as grain transforms.

An example is a dict ``{'image': uint8 [H, W, 3], 'mask': uint8 [H, W], ...}`` (see
:class:`~contrastjax.data.sources.medseg.MedSegSource`). The reference pipeline
(``utils/run_engine.py``, ``DATASET.__getitem__``) is, per example:

1. ``background = 255 - mask``;
2. albumentations geometric augmentation at the ORIGINAL resolution (:func:`geometric_augment`);
3. ``cv2.resize(..., INTER_LINEAR)`` of image, mask and background to the training size
   (:class:`Resize`; the mask targets become soft);
4. ``/ 255`` (:class:`ToFloat`; the reference feeds BGR, without mean/std normalisation).

Deviation with a switch: the reference passes ``background`` to albumentations as an unknown key,
which albumentations 1.x returns unchanged, so the background target is NOT rotated/flipped while
image and mask are (docs/methods/condseg.md, "Deviations"). ``augment_background=True`` (our default) recomputes
``background = 255 - mask`` after the augmentation; ``augment_background=False`` reproduces the
reference: background from the original, un-augmented mask.

All classes are module level and hold only plain data, so they pickle into grain workers.
Random transforms draw every random number from the ``np.random.Generator`` grain passes in, so a
pipeline is reproducible from its seed.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

Example = dict[str, Any]
GEOMETRIC_PRESETS = ('stage1', 'stage2', 'none')
CHANNEL_ORDERS = ('rgb', 'bgr')


# ------------------------------------------------------------------------------------------------
# Pure functions.
# ------------------------------------------------------------------------------------------------


def rotation_matrix(angle: float, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Output-to-input affine map in (row, col) coordinates of an albumentations ``Rotate``.

  albumentations 1.4 uses ``cv2.getRotationMatrix2D(center, angle, 1)`` with
  ``center = (W / 2 - 0.5, H / 2 - 0.5)`` and ``cv2.warpAffine`` to the same size: a positive
  angle rotates the content counter-clockwise as displayed (``angle=90`` on a square image equals
  ``np.rot90(image, 1)``).

  Args:
    angle: Degrees, counter-clockwise.
    shape: ``(H, W)``.

  Returns:
    ``(matrix [2, 2], offset [2])`` such that ``input_rc = matrix @ output_rc + offset`` (the
    convention of :func:`scipy.ndimage.affine_transform`).
  """
  h, w = shape
  t = np.deg2rad(angle)
  a, b = np.cos(t), np.sin(t)
  matrix = np.array([[a, b], [-b, a]])
  centre = np.array([h / 2.0 - 0.5, w / 2.0 - 0.5])
  return matrix, centre - matrix @ centre


def _mirror(coord: np.ndarray, n: int) -> np.ndarray:
  """Reflects coordinates into ``[0, n - 1]`` about the edge pixel centres (BORDER_REFLECT_101)."""
  if n == 1:
    return np.zeros_like(coord)
  period = np.float32(2 * (n - 1))
  coord = np.mod(np.abs(coord), period)
  return np.where(coord > n - 1, period - coord, coord)


def rotate(array: np.ndarray, angle: float, *, order: int) -> np.ndarray:
  """Rotates an image ``[H, W]`` or ``[H, W, C]`` about its centre, keeping its size.

  Emulates ``cv2.warpAffine(..., borderMode=cv2.BORDER_REFLECT_101)``: the border is mirrored
  without repeating the edge pixel (scipy's ``mode='mirror'``). ``order=1`` is bilinear (cv2
  INTER_LINEAR, the albumentations default for images), ``order=0`` nearest (cv2 INTER_NEAREST,
  used for masks). cv2 quantises sampling positions to 1/32 pixel; this uses exact positions, so
  values may differ by about one grey level.

  Args:
    array: Image; integer inputs are rounded back to their dtype.
    angle: Degrees, counter-clockwise.
    order: Interpolation order, 0 or 1.

  Returns:
    The rotated array, same shape and dtype.
  """
  if order not in (0, 1):
    raise ValueError(f'order={order}; expected 0 (nearest) or 1 (bilinear)')
  h, w = array.shape[:2]
  matrix, offset = rotation_matrix(angle, (h, w))
  matrix, offset = matrix.astype(np.float32), offset.astype(np.float32)
  rows = np.arange(h, dtype=np.float32)[:, None]
  cols = np.arange(w, dtype=np.float32)[None, :]
  src_r = _mirror(matrix[0, 0] * rows + (matrix[0, 1] * cols + offset[0]), h).ravel()
  src_c = _mirror(matrix[1, 0] * rows + (matrix[1, 1] * cols + offset[1]), w).ravel()
  flat = array.reshape(h * w, -1)
  if order == 0:
    idx = np.rint(src_r).astype(np.intp) * w + np.rint(src_c).astype(np.intp)
    return np.take(flat, idx, axis=0).reshape(array.shape)
  r0 = src_r.astype(np.intp)            # floor: coordinates are >= 0 after mirroring
  c0 = src_c.astype(np.intp)
  wr = (src_r - r0).astype(np.float32)[:, None]
  wc = (src_c - c0).astype(np.float32)[:, None]
  dr = np.where(r0 < h - 1, w, 0)       # step to the next row / column, 0 at the last one
  dc = np.where(c0 < w - 1, 1, 0)
  i00 = r0 * w + c0

  def gather(i):
    return np.take(flat, i, axis=0).astype(np.float32)

  x00, x01 = gather(i00), gather(i00 + dc)
  top = x00 + wc * (x01 - x00)
  i10 = i00 + dr
  x10, x11 = gather(i10), gather(i10 + dc)
  bottom = x10 + wc * (x11 - x10)
  out = (top + wr * (bottom - top)).reshape(array.shape)
  if np.issubdtype(array.dtype, np.integer):
    info = np.iinfo(array.dtype)
    out = np.clip(np.rint(out), info.min, info.max)
  return out.astype(array.dtype)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of cv2 INTER_LINEAR along one axis (half-pixel centres)."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0.0, n_in - 1)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes like ``cv2.resize(array, (W, H), interpolation=cv2.INTER_LINEAR)``.

  Half-pixel centres (``src = (dst + 0.5) * in / out - 0.5``), source coordinates clamped to the
  image (edge replication), a 2-tap linear filter WITHOUT antialiasing when downscaling (unlike
  Pillow's BILINEAR or ``jax.image.resize`` with ``antialias=True``). cv2 uses 11-bit fixed-point
  weights for uint8, so results may differ from this float computation by one grey level.

  Args:
    array: ``[H, W]`` or ``[H, W, C]``; uint8 inputs are rounded back to uint8.
    size: Output ``(height, width)``.

  Returns:
    The resized array with the input's dtype.
  """
  out_h, out_w = size
  in_h, in_w = array.shape[:2]
  x = array.astype(np.float32)
  if (out_h, out_w) != (in_h, in_w):
    extra = (1,) * (array.ndim - 2)
    r0, r1, wr = _linear_taps(in_h, out_h)
    wr = wr.reshape((-1, 1) + extra)
    x = x[r0] * (1.0 - wr) + x[r1] * wr
    c0, c1, wc = _linear_taps(in_w, out_w)
    wc = wc.reshape((1, -1) + extra)
    x = x[:, c0] * (1.0 - wc) + x[:, c1] * wc
  if np.issubdtype(array.dtype, np.integer):
    info = np.iinfo(array.dtype)
    x = np.clip(np.rint(x), info.min, info.max)
  return x.astype(array.dtype)


# ------------------------------------------------------------------------------------------------
# Grain transforms.
# ------------------------------------------------------------------------------------------------


class AddBackground(grain.transforms.Map):
  """Adds ``background = 255 - mask`` (uint8), the target of the background branch."""

  def map(self, x: Example) -> Example:
    out = dict(x)
    out['background'] = (255 - x['mask'].astype(np.int16)).astype(np.uint8)
    return out


class Rotate(grain.transforms.RandomMap):
  """albumentations ``Rotate(limit, p)``: angle ~ U(-limit, limit) with probability ``p``.

  Image bilinear, mask nearest, mirrored border (``BORDER_REFLECT_101``), same size. Only
  ``'image'`` and ``'mask'`` are rotated; any other key (e.g. a ``'background'`` added before) is
  left untouched, as albumentations does with unknown keys.
  """

  def __init__(self, limit: float = 90.0, p: float = 0.5):
    self.limit = float(limit)
    self.p = float(p)

  def random_map(self, x: Example, rng: np.random.Generator) -> Example:
    if rng.random() >= self.p:
      return x
    angle = rng.uniform(-self.limit, self.limit)
    out = dict(x)
    out['image'] = rotate(x['image'], angle, order=1)
    out['mask'] = rotate(x['mask'], angle, order=0)
    return out


class HorizontalFlip(grain.transforms.RandomMap):
  """Flips image and mask left-right with probability ``p`` (other keys untouched)."""

  def __init__(self, p: float = 0.5):
    self.p = float(p)

  def random_map(self, x: Example, rng: np.random.Generator) -> Example:
    if rng.random() >= self.p:
      return x
    out = dict(x)
    out['image'] = np.ascontiguousarray(x['image'][:, ::-1])
    out['mask'] = np.ascontiguousarray(x['mask'][:, ::-1])
    return out


class VerticalFlip(grain.transforms.RandomMap):
  """Flips image and mask upside-down with probability ``p`` (other keys untouched)."""

  def __init__(self, p: float = 0.5):
    self.p = float(p)

  def random_map(self, x: Example, rng: np.random.Generator) -> Example:
    if rng.random() >= self.p:
      return x
    out = dict(x)
    out['image'] = np.ascontiguousarray(x['image'][::-1])
    out['mask'] = np.ascontiguousarray(x['mask'][::-1])
    return out


class CoarseDropout(grain.transforms.RandomMap):
  """albumentations 1.x ``CoarseDropout``: rectangular holes filled with ``fill_value``.

  With probability ``p``, draws ``randint(min_holes, max_holes)`` holes (inclusive bounds), each
  of height ``randint(min_height, max_height)`` and width ``randint(min_width, max_width)`` with
  a uniformly drawn top-left corner so the hole lies inside the image; holes may overlap. The
  ``min_*`` arguments default to the ``max_*`` ones (as in albumentations 1.x), so the ConDSeg
  setting always makes 10 holes of 32x32. Only the image is changed (``mask_fill_value=None``). A hole
  larger than the image is clipped to the image size.
  """

  def __init__(self, p: float = 0.5, max_holes: int = 10, max_height: int = 32,
               max_width: int = 32, min_holes: int | None = None, min_height: int | None = None,
               min_width: int | None = None, fill_value: int = 0):
    self.p = float(p)
    self.max_holes = int(max_holes)
    self.max_height = int(max_height)
    self.max_width = int(max_width)
    self.min_holes = self.max_holes if min_holes is None else int(min_holes)
    self.min_height = self.max_height if min_height is None else int(min_height)
    self.min_width = self.max_width if min_width is None else int(min_width)
    self.fill_value = fill_value
    if not (0 < self.min_holes <= self.max_holes and 0 < self.min_height <= self.max_height
            and 0 < self.min_width <= self.max_width):
      raise ValueError(f'CoarseDropout ranges holes=({self.min_holes}, {self.max_holes}) '
                       f'height=({self.min_height}, {self.max_height}) width=({self.min_width}, '
                       f'{self.max_width}); expected 0 < min <= max')

  def sample_holes(self, shape: tuple[int, int],
                   rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Draws holes ``(top, left, height, width)`` for an image of ``shape = (H, W)``."""
    h, w = shape
    holes = []
    for _ in range(int(rng.integers(self.min_holes, self.max_holes + 1))):
      hh = min(int(rng.integers(self.min_height, self.max_height + 1)), h)
      ww = min(int(rng.integers(self.min_width, self.max_width + 1)), w)
      top = int(rng.integers(0, h - hh + 1))
      left = int(rng.integers(0, w - ww + 1))
      holes.append((top, left, hh, ww))
    return holes

  def random_map(self, x: Example, rng: np.random.Generator) -> Example:
    if rng.random() >= self.p:
      return x
    image = x['image'].copy()
    for top, left, hh, ww in self.sample_holes(image.shape[:2], rng):
      image[top:top + hh, left:left + ww] = self.fill_value
    out = dict(x)
    out['image'] = image
    return out


class Resize(grain.transforms.Map):
  """cv2-style INTER_LINEAR resize of ``image``, ``mask`` and ``background`` (if present).

  As the reference, masks are resized bilinearly too, so they become soft at object edges.
  """

  def __init__(self, size: int | Sequence[int]):
    """Sets the output size.

    Args:
      size: ``S`` for ``S x S``, or ``(height, width)``.
    """
    if isinstance(size, (int, np.integer)):
      size = (int(size), int(size))
    self.size = (int(size[0]), int(size[1]))

  def map(self, x: Example) -> Example:
    out = dict(x)
    for key in ('image', 'mask', 'background'):
      if key in x:
        out[key] = resize_bilinear(x[key], self.size)
    return out


class ToFloat(grain.transforms.Map):
  """uint8 -> float32 in [0, 1]: image ``[H, W, 3]``, mask and background ``[H, W, 1]``.

  ``channel_order='rgb'`` (our default) keeps RGB; ``'bgr'`` reverses the channels to reproduce
  the reference's ``cv2.imread`` BGR input (its stage-1 colour jitter then also acts on BGR). No
  mean/std normalisation, as the reference.
  """

  def __init__(self, channel_order: str = 'rgb'):
    if channel_order not in CHANNEL_ORDERS:
      raise ValueError(f'channel_order={channel_order!r}; expected one of {CHANNEL_ORDERS}')
    self.channel_order = channel_order

  def map(self, x: Example) -> Example:
    out = dict(x)
    image = x['image'].astype(np.float32) / np.float32(255.0)
    if self.channel_order == 'bgr':
      image = image[..., ::-1]
    out['image'] = np.ascontiguousarray(image)
    for key in ('mask', 'background'):
      if key in x:
        m = x[key].astype(np.float32) / np.float32(255.0)
        out[key] = m[..., None] if m.ndim == 2 else m
    return out


# ------------------------------------------------------------------------------------------------
# Config-driven factories.
# ------------------------------------------------------------------------------------------------


def geometric_augment(name: str = 'stage2', *, augment_background: bool = True,
                      dropout_hole_size: int = 32) -> list[grain.transforms.Transformation]:
  """The reference's albumentations geometric augmentation, plus the background target.

  * ``'stage1'`` (``train_stage1.py``): Rotate(90, p=.5), HorizontalFlip(.5), VerticalFlip(.5),
    CoarseDropout(p=.3, 10 holes of 32x32).
  * ``'stage2'`` (``train.py``): Rotate(35, p=.3), HorizontalFlip(.3), VerticalFlip(.3),
    CoarseDropout(p=.3, 10 holes of 32x32).
  * ``'none'``: no augmentation (evaluation).

  Args:
    name: One of :data:`GEOMETRIC_PRESETS`.
    augment_background: True (default, the fix): ``background = 255 - mask`` after the
      augmentation. False (reference behaviour): background from the original mask,
      not rotated/flipped.
    dropout_hole_size: Side of the CoarseDropout holes in pixels of the original image (the
      reference's 32 suits its ~500-600 px frames; small synthetic images need smaller holes,
      or 10 holes of 32x32 erase most of a 64x64 image).

  Returns:
    Transforms producing ``image``, ``mask`` and ``background`` at the original resolution.
  """
  h = int(dropout_hole_size)
  if name == 'stage1':
    ops = [Rotate(90, 0.5), HorizontalFlip(0.5), VerticalFlip(0.5),
           CoarseDropout(0.3, max_holes=10, max_height=h, max_width=h)]
  elif name == 'stage2':
    ops = [Rotate(35, 0.3), HorizontalFlip(0.3), VerticalFlip(0.3),
           CoarseDropout(0.3, max_holes=10, max_height=h, max_width=h)]
  elif name == 'none':
    ops = []
  else:
    raise ValueError(f'geometric augmentation {name!r}; expected one of {GEOMETRIC_PRESETS}')
  if augment_background:
    return [*ops, AddBackground()]
  return [AddBackground(), *ops]


def train_transforms(image_size: int | Sequence[int], augment: str = 'stage2', *,
                     augment_background: bool = True, channel_order: str = 'rgb',
                     dropout_hole_size: int = 32) -> list[grain.transforms.Transformation]:
  """Full per-example training chain: augmentation, resize, float conversion.

  Args:
    image_size: Training size (the reference uses 256).
    augment: Geometric preset, see :func:`geometric_augment`.
    augment_background: See :func:`geometric_augment`.
    channel_order: See :class:`ToFloat`.

  Returns:
    Transforms for :func:`contrastjax.data.pipeline.train_dataset`.
  """
  return [*geometric_augment(augment, augment_background=augment_background,
                             dropout_hole_size=dropout_hole_size),
          Resize(image_size), ToFloat(channel_order)]


def eval_transforms(image_size: int | Sequence[int], *,
                    channel_order: str = 'rgb') -> list[grain.transforms.Transformation]:
  """Evaluation chain: background, resize (as the reference's test.py), float conversion."""
  return [AddBackground(), Resize(image_size), ToFloat(channel_order)]
