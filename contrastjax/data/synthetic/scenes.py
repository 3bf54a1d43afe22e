"""A procedurally generated weakly supervised segmentation (WSSS) demo dataset.

Each example is a cluttered scene with one to three objects of five classes, :data:`CLASSES`. The
training signal is the image-level label (which classes are visible); the pixel mask is kept for
evaluation only, as in PASCAL VOC WSSS (:mod:`contrastjax.data.sources.voc`). The scenes are
designed so that image-level supervision is learnable but not trivial:

* **classes are shape x texture, not colour**: each class is a fixed (shape, texture) pair,
  :data:`CLASS_TEXTURES` (disc/stripes, square/checker, triangle/dots, ring/solid,
  cross/noise). An object's colour is drawn from :data:`PALETTE` independently of its class, and
  every texture mixes the object colour ``A`` with its dark shade ``0.35 A`` half and half (dots
  of radius ``0.399`` cell cover half the cell; ``solid`` is the 50 % blend itself), so the mean
  colour of an object does not depend on its class while its texture statistics do.
* **texture alone is not enough**: the background holds low-contrast patches of the same five
  textures, and distractors (small ellipses, bars and crescents, never a class shape) carry
  them at full contrast; both are background (0) in the mask.
* **clutter and appearance**: a two-colour background with low-frequency noise, objects of varied
  size (``size_range``, default 15-40 % of the frame edge), random rotation, texture period and
  phase, a mild illumination gradient and gain (+-15 %), Gaussian pixel noise.
* **occlusion**: objects are painted in order, later ones on top (distractors lie beneath all
  objects), and an object after the first is placed next to an earlier one with probability
  ``overlap_prob`` (default 0.35), so that about two thirds of the scenes with several objects show
  overlaps; the mask shows what is visible, so a ring shows the scene behind its hole. An
  object left with less than ``min_visible_fraction`` (default 10 %) of its in-frame area
  counts as not visible: its few visible pixels are background in the mask and its class is
  not in the label unless another instance shows it. The last object is never occluded, so
  every image has at least one class.

The number of objects is uniform in ``1..max_objects`` and each object's class uniform over the
five, so classes are balanced. Examples are deterministic per ``(seed, index)``
(``np.random.default_rng((seed, index))``, as the other synthetic sources), numpy only, and
render in 1-1.5 ms at 64x64 on one CPU core (every object is drawn in its bounding window).

``ds[i]`` returns ``{'image': uint8 [S, S, 3], 'labels': float32 [6] (multi-hot, background at
index 0 always 1), 'name': str}`` and, with ``with_masks=True``, ``'label': uint8 [S, S]`` in
``0..5`` (0 = background), the contract of :class:`~contrastjax.data.sources.voc.VOCSource`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

CLASSES = ('background', 'disc', 'square', 'triangle', 'ring', 'cross')
TEXTURES = ('stripes', 'checker', 'dots', 'solid', 'noise')
#: Class index -> texture name (index 0, background, has none).
CLASS_TEXTURES = dict(zip(range(1, len(CLASSES)), TEXTURES))
DISTRACTOR_SHAPES = ('ellipse', 'bar', 'crescent')
#: Object colours (RGB in [0, 1]), shared by every class.
PALETTE = np.array([
    (0.90, 0.20, 0.20), (0.20, 0.75, 0.25), (0.25, 0.40, 0.95), (0.95, 0.80, 0.15),
    (0.85, 0.30, 0.85), (0.15, 0.80, 0.85), (0.95, 0.55, 0.15), (0.92, 0.92, 0.92)], np.float32)
DARK = 0.35            # the second colour of every texture is DARK * A
PATCH_DARK = 0.7       # background texture patches: lower contrast
_DOT_R2 = 0.5 / np.pi  # squared dot radius (cell units) covering half a cell


@dataclasses.dataclass(frozen=True)
class Scene:
  """One generated scene with its ground truth.

  Attributes:
    image: uint8 ``[S, S, 3]``.
    label: uint8 ``[S, S]`` class map of the visible objects (0 = background).
    instances: uint8 ``[S, S]``: ``k + 1`` where object ``k`` is on top, 0 elsewhere (hidden
      objects included).
    classes: Class of each object, in painting order.
    areas: In-frame pixel area of each object as drawn.
    visible_pixels: Pixels of each object left visible after occlusion.
    visible: Whether each object counts as visible (``>= min_visible_fraction`` of its area).
    drawn: Each object's full in-frame shape mask ``[S, S]`` before occlusion (only with
      ``keep_masks=True``).
  """
  image: np.ndarray
  label: np.ndarray
  instances: np.ndarray
  classes: tuple[int, ...]
  areas: tuple[int, ...]
  visible_pixels: tuple[int, ...]
  visible: tuple[bool, ...]
  drawn: tuple[np.ndarray, ...] | None = None

  @property
  def labels(self) -> np.ndarray:
    """float32 ``[len(CLASSES)]`` multi-hot of the classes in ``label``; background always 1."""
    out = (np.bincount(self.label.ravel(), minlength=len(CLASSES))[:len(CLASSES)] > 0)
    out = out.astype(np.float32)
    out[0] = 1.0
    return out


@functools.lru_cache(maxsize=32)
def _upsample(size: int, cells: int) -> np.ndarray:
  """Row-normalised Gaussian interpolation ``[size, cells]`` from a coarse grid to pixels."""
  pix = (np.arange(size, dtype=np.float32) + 0.5) / size
  ctr = (np.arange(cells, dtype=np.float32) + 0.5) / cells
  w = np.exp(-0.5 * ((pix[:, None] - ctr[None, :]) * cells / 0.75) ** 2)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Smooth noise ``[size, size]`` of roughly unit variance."""
  u = _upsample(size, cells)
  g = rng.standard_normal((cells, cells)).astype(np.float32)
  out = u @ g @ u.T
  return out / max(float(out.std()), 1e-6)


def _shape(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside test of a shape of unit radius in its own frame (``u``, ``v`` in radii)."""
  if name == 'disc':
    return u * u + v * v <= 1.0
  if name == 'square':
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if name == 'triangle':          # equilateral, circumradius 1.15
    return (v >= -0.575) & (v <= 1.15 - np.sqrt(3.0) * np.abs(u))
  if name == 'ring':
    rho2 = u * u + v * v
    return (rho2 <= 1.0) & (rho2 >= 0.25)
  if name == 'cross':
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
  if name == 'ellipse':
    return u * u + (v / 0.45) ** 2 <= 1.0
  if name == 'bar':
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.2)
  if name == 'crescent':
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.64)
  raise ValueError(f'unknown shape {name!r}')


def _texture(name: str, a: np.ndarray, b: np.ndarray, period: float, phase: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
  """Mixing weight of colour ``A`` in [0, 1], mean 1/2, at frame coordinates ``a``, ``b`` (px)."""
  a, b = np.broadcast_arrays(a, b)
  if name == 'stripes':
    return (np.mod(a / period + phase[0], 1.0) < 0.5).astype(np.float32)
  if name == 'checker':
    cells = np.floor(2.0 * a / period + phase[0]) + np.floor(2.0 * b / period + phase[1])
    return np.mod(cells, 2.0).astype(np.float32)
  if name == 'dots':
    da = np.mod(a / period + phase[0], 1.0) - 0.5
    db = np.mod(b / period + phase[1], 1.0) - 0.5
    return (da * da + db * db < _DOT_R2).astype(np.float32)
  if name == 'solid':
    return np.full(a.shape, 0.5, np.float32)
  if name == 'noise':
    return (rng.random(a.shape) < 0.5).astype(np.float32)
  raise ValueError(f'unknown texture {name!r}')


class SyntheticScenes:
  """Random-access synthetic WSSS source (grain-compatible; see the module docstring)."""

  class_names = CLASSES

  def __init__(self, num_examples: int, image_size: int = 64, seed: int = 0, *,
               with_masks: bool = False, max_objects: int = 3,
               size_range: tuple[float, float] = (0.15, 0.40),
               distractors: tuple[int, int] = (1, 3),
               distractor_size: tuple[float, float] = (0.12, 0.22),
               patches: tuple[int, int] = (1, 3), overlap_prob: float = 0.35,
               min_visible_fraction: float = 0.1):
    """Configures the generator.

    Args:
      num_examples: Dataset length.
      image_size: Side ``S`` of the square images.
      seed: Example ``i`` is drawn from ``np.random.default_rng((seed, i))``.
      with_masks: Whether examples carry the pixel mask ``'label'`` (evaluation).
      max_objects: Objects per image, uniform in ``1..max_objects``.
      size_range: Object diameter range as fractions of ``S``.
      distractors: Inclusive range of the number of distractor shapes.
      distractor_size: Distractor diameter range as fractions of ``S``.
      patches: Inclusive range of the number of background texture patches.
      overlap_prob: Probability that an object after the first is placed next to an earlier
        one (within 0.6 of the sum of their radii per axis), so that they overlap.
      min_visible_fraction: An object with a smaller visible fraction of its area is hidden.

    Raises:
      ValueError: Bad sizes or ranges.
    """
    if num_examples < 0:
      raise ValueError(f'num_examples={num_examples}; expected >= 0')
    if image_size < 16:
      raise ValueError(f'image_size={image_size}; expected >= 16')
    if max_objects < 1:
      raise ValueError(f'max_objects={max_objects}; expected >= 1')
    lo, hi = size_range
    if not 0.05 <= lo <= hi <= 0.9:
      raise ValueError(f'size_range={size_range}; expected 0.05 <= min <= max <= 0.9')
    for what, (a, b) in (('distractors', distractors), ('patches', patches)):
      if not 0 <= a <= b:
        raise ValueError(f'{what}={(a, b)}; expected 0 <= min <= max')
    dlo, dhi = distractor_size
    if not 0.02 <= dlo <= dhi <= 0.5:
      raise ValueError(f'distractor_size={distractor_size}; expected 0.02 <= min <= max <= 0.5')
    if not 0.0 <= overlap_prob <= 1.0:
      raise ValueError(f'overlap_prob={overlap_prob}; expected [0, 1]')
    if not 0.0 <= min_visible_fraction < 1.0:
      raise ValueError(f'min_visible_fraction={min_visible_fraction}; expected [0, 1)')
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.with_masks = bool(with_masks)
    self.max_objects = int(max_objects)
    self.size_range = (float(lo), float(hi))
    self.distractors = (int(distractors[0]), int(distractors[1]))
    self.distractor_size = (float(dlo), float(dhi))
    self.patches = (int(patches[0]), int(patches[1]))
    self.overlap_prob = float(overlap_prob)
    self.min_visible_fraction = float(min_visible_fraction)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticScenes(n={self.num_examples}, size={self.image_size}, seed={self.seed}, '
            f'with_masks={self.with_masks})')

  @property
  def names(self) -> list[str]:
    return [f'scene_{i:06d}' for i in range(self.num_examples)]

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = self.num_examples
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    index = int(index) % n
    scene = self.generate(index)
    ex: dict[str, Any] = {'image': scene.image, 'labels': scene.labels}
    if self.with_masks:
      ex['label'] = scene.label
    ex['name'] = f'scene_{index:06d}'
    return ex

  # ----------------------------------------------------------------------------------------------

  def _paint(self, img: np.ndarray, rng: np.random.Generator, shape: str, texture: str,
             diameter: float, dark: float, center: tuple[float, float] | None = None
             ) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Paints one textured shape onto ``img``; returns its window and in-window mask.

    ``center`` (pixels, ``(y, x)``) defaults to a uniform position in the frame.
    """
    s = self.image_size
    r = 0.5 * diameter
    if center is None:
      cy, cx = (float(t) for t in rng.uniform(0.0, s, size=2))
    else:
      cy, cx = center
    angle = rng.uniform(0.0, 2.0 * np.pi)
    period = s * rng.uniform(0.06, 0.09)
    phase = rng.uniform(0.0, 1.0, size=2)
    colour = PALETTE[rng.integers(len(PALETTE))] * rng.uniform(0.9, 1.1)
    ext = 1.2 * r
    y0, y1 = max(int(np.floor(cy - ext)), 0), min(int(np.ceil(cy + ext)) + 1, s)
    x0, x1 = max(int(np.floor(cx - ext)), 0), min(int(np.ceil(cx + ext)) + 1, s)
    if y0 >= y1 or x0 >= x1:
      return None
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    c, sn = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    a = dx * c + dy * sn               # object frame, pixels
    b = dy * c - dx * sn
    inside = _shape(shape, a / r, b / r)
    t = _texture(texture, a, b, period, phase, rng)
    win = (slice(y0, y1), slice(x0, x1))
    pix = (colour * dark + (colour - colour * dark) * t[..., None]).astype(np.float32)
    region = img[win]
    region[inside] = pix[inside]
    return win, inside

  def generate(self, index: int, keep_masks: bool = False) -> Scene:
    """Generates scene ``index`` (``keep_masks``: also return each object's drawn mask)."""
    rng = np.random.default_rng((self.seed, int(index)))
    s = self.image_size
    # Background: two colours blended by low-frequency noise.
    c0, c1 = rng.uniform(0.2, 0.8, size=(2, 3)).astype(np.float32)
    w = np.clip(0.5 + 0.35 * _smooth(rng, s, int(rng.integers(3, 6))), 0.0, 1.0)
    img = c0 + (c1 - c0) * w[..., None]
    # Background texture patches: irregular blobs, lower contrast, blended with the ground.
    ys = np.arange(s, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(s, dtype=np.float32)[None, :] + 0.5
    for _ in range(int(rng.integers(self.patches[0], self.patches[1] + 1))):
      blob = _smooth(rng, s, 4) > 1.0
      texture = TEXTURES[rng.integers(len(TEXTURES))]
      colour = PALETTE[rng.integers(len(PALETTE))]
      t = _texture(texture, xs, ys, s * rng.uniform(0.06, 0.09), rng.uniform(0, 1, size=2), rng)
      pix = colour * PATCH_DARK + colour * (1.0 - PATCH_DARK) * t[..., None]
      img[blob] = 0.4 * img[blob] + 0.6 * pix[blob]
    # Distractors: small non-class shapes with any texture, beneath the objects.
    for _ in range(int(rng.integers(self.distractors[0], self.distractors[1] + 1))):
      shape = DISTRACTOR_SHAPES[rng.integers(len(DISTRACTOR_SHAPES))]
      texture = TEXTURES[rng.integers(len(TEXTURES))]
      self._paint(img, rng, shape, texture, s * rng.uniform(*self.distractor_size), DARK)
    # Objects, later ones on top.
    num = int(rng.integers(1, self.max_objects + 1))
    instances = np.zeros((s, s), np.uint8)
    classes, areas, drawn, centres = [], [], [], []
    for k in range(num):
      cls = int(rng.integers(1, len(CLASSES)))
      diameter = s * rng.uniform(*self.size_range)
      r = 0.5 * diameter
      if k and rng.random() < self.overlap_prob:      # next to an earlier object: occlusion
        py, px, pr = centres[int(rng.integers(k))]
        lo, hi = 0.7 * r, max(s - 0.7 * r, 0.7 * r + 1e-3)
        centre = tuple(float(np.clip(p + rng.uniform(-1.0, 1.0) * (pr + r) * 0.6, lo, hi))
                       for p in (py, px))
      else:
        centre = tuple(float(t) for t in rng.uniform(0.7 * r, max(s - 0.7 * r, 0.7 * r + 1e-3),
                                                     size=2))
      centres.append((*centre, r))
      painted = self._paint(img, rng, CLASSES[cls], CLASS_TEXTURES[cls], diameter, DARK,
                            center=centre)
      assert painted is not None      # centres lie inside the frame
      win, inside = painted
      instances[win][inside] = k + 1
      classes.append(cls)
      areas.append(int(inside.sum()))
      if keep_masks:
        full = np.zeros((s, s), bool)
        full[win] = inside
        drawn.append(full)
    counts = np.bincount(instances.ravel(), minlength=num + 1)[1:]
    visible = [bool(c > 0 and c >= self.min_visible_fraction * a) for c, a in zip(counts, areas)]
    lut = np.zeros(num + 1, np.uint8)
    lut[1:] = [c if v else 0 for c, v in zip(classes, visible)]
    label = lut[instances]
    # Illumination: a gain and a gradient (+-15 % across the frame), then sensor noise.
    g = rng.uniform(-0.3, 0.3, size=2).astype(np.float32)
    ramp = ((np.arange(s, dtype=np.float32) + 0.5) / s - 0.5)
    gain = np.float32(rng.uniform(0.85, 1.15)) * (1.0 + g[0] * ramp[:, None] + g[1] * ramp[None, :])
    img = img * gain[..., None]
    img += 0.02 * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return Scene(image=image, label=label, instances=instances, classes=tuple(classes),
                 areas=tuple(areas), visible_pixels=tuple(int(c) for c in counts),
                 visible=tuple(visible), drawn=tuple(drawn) if keep_masks else None)
