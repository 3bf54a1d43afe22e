"""A procedurally generated two-domain aerial segmentation dataset for SiamSeg demos and tests.

Each example is a top-down "aerial" scene with five classes, :data:`CLASSES`:

* background: bare ground with a smooth soil texture;
* vegetation: smooth-noise patches with a crown-like high-frequency texture;
* water: one low-frequency blob (a lake or pond), flat and dark with faint ripples;
* road: one to four straight bands crossing the scene, with a lighter centre line;
* building: axis-aligned or slightly rotated rectangles with a roof ridge and a cast shadow on
  the ground next to them (the shadow keeps its ground label).

The two domains share the classes and the scene grammar but differ the way Potsdam (RGB) and
Vaihingen (IRRG), or LoveDA rural and urban, differ (the shift SiamSeg adapts to):

* **colour**: the source renders natural colour; the target renders an IR-R-G false colour
  (vegetation red, water near black, roofs grey-blue);
* **style**: the target is hazier (lower contrast), noisier, slightly blurred, with a finer
  texture and stronger illumination gradients;
* **content**: the target is more urban (more buildings and roads, less vegetation).

Examples are deterministic per ``(seed, domain, index)`` (``numpy.random.default_rng``), take about
a millisecond at 64x64, and match the source contract of the real readers:
``{'image': uint8 [S, S, 3], 'label': uint8 [S, S] in 0..4, 'name': str}``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

CLASSES = ('background', 'building', 'road', 'water', 'vegetation')
PALETTE = ((180, 160, 120), (220, 40, 40), (128, 128, 128), (30, 90, 230), (40, 170, 60))
DOMAINS = ('source', 'target')
BACKGROUND, BUILDING, ROAD, WATER, VEGETATION = range(5)


@dataclasses.dataclass(frozen=True)
class DomainStyle:
  """How one domain renders a scene (colours are RGB in [0, 1])."""
  ground: tuple[float, float, float]
  vegetation: tuple[float, float, float]
  water: tuple[float, float, float]
  road: tuple[float, float, float]
  roofs: tuple[tuple[float, float, float], ...]
  haze: float            # blend towards a flat haze colour
  noise: float           # per-pixel Gaussian noise std
  texture_cells: int     # coarse-grid cells of the texture noise (higher = finer)
  gradient: float        # strength of the linear illumination gradient
  blur: bool             # 3x3 box blur
  buildings: tuple[int, int]   # number of buildings (inclusive range)
  roads: tuple[int, int]       # number of roads (inclusive range)
  vegetation_cover: float      # fraction of the scene above the vegetation threshold
  water_prob: float            # probability of a water body


STYLES = {
    'source': DomainStyle(
        ground=(0.62, 0.55, 0.42), vegetation=(0.24, 0.46, 0.20), water=(0.14, 0.30, 0.52),
        road=(0.46, 0.46, 0.47),
        roofs=((0.72, 0.30, 0.24), (0.80, 0.52, 0.36), (0.58, 0.58, 0.60)),
        haze=0.0, noise=0.02, texture_cells=8, gradient=0.05, blur=False,
        buildings=(1, 5), roads=(1, 2), vegetation_cover=0.40, water_prob=0.6),
    'target': DomainStyle(
        ground=(0.56, 0.46, 0.44), vegetation=(0.78, 0.28, 0.32), water=(0.06, 0.09, 0.14),
        road=(0.55, 0.56, 0.62),
        roofs=((0.82, 0.84, 0.92), (0.34, 0.38, 0.58), (0.88, 0.76, 0.72)),
        haze=0.25, noise=0.05, texture_cells=16, gradient=0.15, blur=True,
        buildings=(3, 8), roads=(1, 3), vegetation_cover=0.20, water_prob=0.5),
}


def domain_style(domain: str, shift: float = 1.0) -> DomainStyle:
  """The style of ``domain``; for the target, ``shift`` in [0, 1] interpolates from the
  source style (0: no domain shift) to the full target style (1, the default): colours,
  haze, noise, texture, gradient, building/road counts and cover linearly, blur from 0.5.
  """
  if domain not in DOMAINS:
    raise ValueError(f'domain={domain!r}; expected one of {DOMAINS}')
  if not 0.0 <= shift <= 1.0:
    raise ValueError(f'shift={shift!r}; expected a number in [0, 1]')
  if domain == 'source' or shift == 1.0:
    return STYLES[domain]
  a, b = STYLES['source'], STYLES['target']

  def mix(x, y):
    if isinstance(x, tuple):
      return tuple(mix(u, v) for u, v in zip(x, y))
    if isinstance(x, bool):
      return y if shift >= 0.5 else x
    if isinstance(x, int):
      return int(round(x + shift * (y - x)))
    return float(x + shift * (y - x))

  return DomainStyle(**{f.name: mix(getattr(a, f.name), getattr(b, f.name))
                        for f in dataclasses.fields(DomainStyle)})


@functools.lru_cache(maxsize=16)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[:, None], c[None, :]


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Zero-mean smooth noise ``[size, size]``: a ``cells x cells`` Gaussian grid, bilinearly up."""
  g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
  t = np.linspace(0.0, cells, size, dtype=np.float32)
  i = np.minimum(t.astype(np.int32), cells - 1)
  f = t - i
  rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
  return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _box_blur(img: np.ndarray) -> np.ndarray:
  p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
  s = sum(p[dy:dy + img.shape[0], dx:dx + img.shape[1]] for dy in range(3) for dx in range(3))
  return s / 9.0


def render(size: int, domain: str, rng: np.random.Generator,
           shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Draws one scene of ``domain``: ``(image uint8 [S, S, 3], label uint8 [S, S])``
  (``shift``: see :func:`domain_style`)."""
  st = domain_style(domain, shift)
  ys, xs = _coords(size)
  label = np.full((size, size), BACKGROUND, np.uint8)
  # Vegetation: threshold smooth noise so that about `vegetation_cover` of the scene is covered.
  veg_field = _smooth(rng, size, 3) + 0.5 * _smooth(rng, size, 6)
  thr = np.quantile(veg_field, 1.0 - np.clip(st.vegetation_cover + rng.uniform(-0.1, 0.1),
                                             0.05, 0.9))
  label[veg_field > thr] = VEGETATION
  # Water: a blob around a random centre.
  if rng.random() < st.water_prob:
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    r = rng.uniform(0.12, 0.25) * size
    d = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) / r + 0.35 * _smooth(rng, size, 4)
    label[d < 1.0] = WATER
  # Roads: straight bands.
  road_centre = np.zeros((size, size), bool)
  for _ in range(int(rng.integers(st.roads[0], st.roads[1] + 1))):
    theta = rng.uniform(0, np.pi)
    py, px = rng.uniform(0.2, 0.8, size=2) * size
    dist = np.abs((xs - px) * np.sin(theta) - (ys - py) * np.cos(theta))
    width = rng.uniform(0.035, 0.06) * size
    label[dist < width] = ROAD
    road_centre |= dist < max(width * 0.15, 0.5)
  # Buildings: rectangles on ground or vegetation, with a shadow cast to the lower right.
  roof = np.zeros((size, size, 3), np.float32)
  shadow = np.zeros((size, size), bool)
  ridge = np.zeros((size, size), bool)
  sdy, sdx = rng.uniform(0.01, 0.03, size=2) * size + 1.0
  for _ in range(int(rng.integers(st.buildings[0], st.buildings[1] + 1))):
    cy, cx = rng.uniform(0.1, 0.9, size=2) * size
    hh, hw = rng.uniform(0.04, 0.10, size=2) * size
    angle = 0.0 if rng.random() < 0.6 else rng.uniform(-0.5, 0.5)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xs - cx) * ca + (ys - cy) * sa
    v = -(xs - cx) * sa + (ys - cy) * ca
    inside = (np.abs(u) < hw) & (np.abs(v) < hh)
    free = inside & ((label == BACKGROUND) | (label == VEGETATION))
    if free.sum() < 0.7 * max(inside.sum(), 1):   # keep buildings off roads and water
      continue
    us = (xs - sdx - cx) * ca + (ys - sdy - cy) * sa
    vs = -(xs - sdx - cx) * sa + (ys - sdy - cy) * ca
    shadow |= (np.abs(us) < hw) & (np.abs(vs) < hh)
    label[free] = BUILDING
    colour = np.asarray(st.roofs[int(rng.integers(len(st.roofs)))], np.float32)
    roof[free] = colour * rng.uniform(0.9, 1.1)
    along = np.abs(v) if hw > hh else np.abs(u)
    ridge |= free & (along < 0.6)
  shadow &= label != BUILDING

  # Appearance.
  tex = _smooth(rng, size, st.texture_cells)
  fine = rng.standard_normal((size, size)).astype(np.float32)
  img = np.empty((size, size, 3), np.float32)

  def paint(cls, colour, texture):
    m = label == cls
    jitter = rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    img[m] = (np.asarray(colour, np.float32) + jitter) * (1.0 + texture[m, None])

  paint(BACKGROUND, st.ground, 0.08 * tex)
  paint(VEGETATION, st.vegetation, 0.10 * tex + 0.12 * fine)
  paint(WATER, st.water, 0.03 * tex)
  paint(ROAD, st.road, 0.02 * fine)
  img[road_centre & (label == ROAD)] *= 1.35
  bm = label == BUILDING
  img[bm] = roof[bm] * (1.0 + 0.03 * fine[bm, None])
  img[ridge & bm] *= 0.8
  img[shadow] *= 0.55
  # Illumination gradient, haze, blur, noise.
  g = rng.uniform(-1, 1, size=2)
  img *= (1.0 + st.gradient * (g[0] * (ys / size - 0.5) + g[1] * (xs / size - 0.5)))[..., None]
  if st.haze:
    img = (1.0 - st.haze) * img + st.haze * np.float32(0.7)
  if st.blur:
    img = _box_blur(img)
  img += st.noise * rng.standard_normal(img.shape).astype(np.float32)
  image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  return image, label


class SyntheticAerial:
  """Random-access synthetic aerial source of one domain (grain-compatible).

  ``ds[i]`` returns ``{'image': uint8 [S, S, 3], 'label': uint8 [S, S] in 0..4, 'name': str}``,
  identical for the same ``(seed, domain, shift, i)``; ``shift`` scales the target domain's
  difference from the source (:func:`domain_style`). The scene layout (labels) depends only
  on the seed and index when the count ranges agree.
  """

  def __init__(self, num_examples: int, image_size: int = 64, seed: int = 0,
               domain: str = 'source', shift: float = 1.0):
    domain_style(domain, shift)  # validates both
    if num_examples < 1 or image_size < 16:
      raise ValueError(f'num_examples={num_examples}, image_size={image_size}; expected >= 1 '
                       'and >= 16')
    self.num_examples, self.image_size = int(num_examples), int(image_size)
    self.seed, self.domain, self.shift = int(seed), domain, float(shift)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticAerial(n={self.num_examples}, size={self.image_size}, seed={self.seed}, '
            f'domain={self.domain!r})')

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = self.num_examples
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    index = int(index) % n
    rng = np.random.default_rng((self.seed, DOMAINS.index(self.domain), index))
    image, label = render(self.image_size, self.domain, rng, self.shift)
    return {'image': image, 'label': label, 'name': f'{self.domain}_{index}'}
