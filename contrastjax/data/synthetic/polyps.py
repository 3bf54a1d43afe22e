"""A procedurally generated, learnable polyp-segmentation dataset for demos and convergence tests.

Each example imitates a colonoscopy frame with the two difficulties ConDSeg targets: a LOW
contrast between object and background, and uneven illumination. It is generated from scratch
(numpy only, ~1-2 ms at 96x96) and is deterministic per ``(seed, index)``:

* background: pinkish/reddish mucosa with a multi-octave smooth texture and thin, meandering
  dark vessels;
* objects: one to three smooth irregular ellipses (random radial harmonics, aspect, rotation),
  with radii log-uniform from small (~0.5 % of the image) to large (~35 %), soft anti-aliased
  edges; an object differs from the mucosa by a small colour shift (paler and more saturated),
  a dome shading with a shadowed rim, and fewer vessels. All object cues scale with
  ``contrast``;
* illumination: vignetting around a random centre, a linear gradient, specular highlights
  (more of them on objects, as on real polyps, unless ``contrast`` is near 0);
* acquisition: optional 3-tap blur and Gaussian noise.

The output dict has the same contract as :class:`~contrastjax.data.sources.medseg.MedSegSource`.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_MUCOSA = np.array([0.80, 0.45, 0.40], np.float32)   # base RGB of the mucosa.
_VESSEL = np.array([0.55, 0.16, 0.17], np.float32)   # RGB of vessels.


@functools.lru_cache(maxsize=32)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
  """Row-normalised Gaussian interpolation ``[size, cells]`` from a coarse grid to pixels."""
  pix = (np.arange(size, dtype=np.float32) + 0.5) / size
  ctr = (np.arange(cells, dtype=np.float32) + 0.5) / cells
  w = np.exp(-0.5 * ((pix[:, None] - ctr[None, :]) * cells / 0.75) ** 2)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in [-1, 1] (``y`` rows, ``x`` columns)."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
  return c[:, None], c[None, :]


def _smooth_noise(rng: np.random.Generator, size: int, octaves: tuple[int, ...],
                  decay: float = 0.5) -> np.ndarray:
  """Zero-mean, roughly unit-variance smooth noise ``[size, size]`` summed over octaves."""
  out = np.zeros((size, size), np.float32)
  amp, total = 1.0, 0.0
  for cells in octaves:
    u = _upsample_matrix(size, cells)
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    out += amp * (u @ g @ u.T) * np.sqrt(cells / 2.0)
    total += amp * amp
    amp *= decay
  return out / np.sqrt(total)


class SyntheticPolyps:
  """Random-access synthetic polyp dataset (a grain-compatible source).

  ``ds[i]`` returns ``{'image': uint8 [S, S, 3] RGB, 'mask': uint8 [S, S] in {0, 255},
  'name': 'synthetic_<i>'}``, identical for the same ``(seed, i)`` on every call and machine.
  """

  def __init__(self, num_examples: int, image_size: int = 96, seed: int = 0, *,
               contrast: float = 0.5, illumination: float = 1.0, noise: float = 1.0,
               max_objects: int = 3, min_radius: float = 0.1, max_radius: float = 0.7):
    """Configures the generator.

    Args:
      num_examples: Dataset length.
      image_size: Side ``S`` of the square images, in pixels.
      seed: Dataset seed; example ``i`` is drawn from ``np.random.default_rng((seed, i))``.
      contrast: Strength of every object-vs-background cue (colour shift, dome shading, rim
        shadow, vessel suppression). 0 makes objects invisible; 0.5 (default) is subtle but
        learnable; 1 is easy.
      illumination: Strength of vignetting, gradient and specular highlights (0 = flat light).
      noise: Scale of the Gaussian pixel noise (1 = sigma in [0.01, 0.03]).
      max_objects: Up to this many objects per image (at least one).
      min_radius: Smallest object radius, as a fraction of the half image side.
      max_radius: Largest object radius, as a fraction of the half image side.

    Raises:
      ValueError: Bad sizes or ranges.
    """
    if num_examples < 0:
      raise ValueError(f'num_examples={num_examples}; expected >= 0')
    if image_size < 8:
      raise ValueError(f'image_size={image_size}; expected >= 8')
    if not 0 < min_radius <= max_radius:
      raise ValueError(f'radius range ({min_radius}, {max_radius}); expected 0 < min <= max')
    if max_objects < 1:
      raise ValueError(f'max_objects={max_objects}; expected >= 1')
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.contrast = float(contrast)
    self.illumination = float(illumination)
    self.noise = float(noise)
    self.max_objects = int(max_objects)
    self.min_radius = float(min_radius)
    self.max_radius = float(max_radius)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticPolyps(n={self.num_examples}, size={self.image_size}, seed={self.seed}, '
            f'contrast={self.contrast})')

  @property
  def names(self) -> list[str]:
    """Example names, as :class:`MedSegSource.names`."""
    return [f'synthetic_{i:06d}' for i in range(self.num_examples)]

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Generates example ``index`` (negative indices count from the end)."""
    n = self.num_examples
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    index = int(index) % n
    image, mask = self.generate(index)
    return {'image': image, 'mask': mask, 'name': f'synthetic_{index:06d}'}

  def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Generates ``(image uint8 [S, S, 3], mask uint8 [S, S])`` for ``index``."""
    rng = np.random.default_rng((self.seed, int(index)))
    s = self.image_size
    y, x = _grid(s)
    c = self.contrast

    # --- Mucosa: base colour, texture, vessels.
    base = _MUCOSA + rng.normal(0.0, [0.05, 0.06, 0.05]).astype(np.float32)
    texture = _smooth_noise(rng, s, (3, 6, 12))
    vessel_field = _smooth_noise(rng, s, (4, 8))
    vessels = np.exp(-(vessel_field / rng.uniform(0.06, 0.12)) ** 2)   # thin zero-crossing lines
    vessels *= 0.5 + 0.5 * (_smooth_noise(rng, s, (3,)) > 0)             # only some of them

    # --- Objects: union of smooth irregular ellipses.
    num_obj = 1 + int(rng.choice(self.max_objects, p=_object_count_probs(self.max_objects)))
    inside = np.zeros((s, s), np.float32)      # soft (anti-aliased) coverage in [0, 1]
    dome = np.zeros((s, s), np.float32)        # 1 at an object's centre, 0 at its edge
    rim = np.zeros((s, s), np.float32)         # shadow on the side away from the light
    light = rng.uniform(0.0, 2.0 * np.pi)
    px = 2.0 / s                               # one pixel in normalised units
    for _ in range(num_obj):
      r0 = float(np.exp(rng.uniform(np.log(self.min_radius), np.log(self.max_radius))))
      lim = max(0.0, 0.85 - 0.5 * r0)
      cy, cx = (float(t) for t in rng.uniform(-lim, lim, size=2))
      rot = np.exp(1j * rng.uniform(0.0, np.pi))
      aspect = rng.uniform(0.65, 1.0)
      amps = rng.uniform(0.0, 0.28 / np.arange(2, 6))
      phases = np.exp(1j * rng.uniform(0.0, 2.0 * np.pi, size=4))
      # Work in the object's bounding window only (radius <= r0 * (1 + sum(amps)) + rim).
      ext = r0 * (1.0 + amps.sum()) + 4.0 * px
      r_lo, r_hi = _window(cy, ext, s)
      c_lo, c_hi = _window(cx, ext, s)
      if r_lo >= r_hi or c_lo >= c_hi:
        continue
      win = (slice(r_lo, r_hi), slice(c_lo, c_hi))
      z_img = (x[:, c_lo:c_hi] - cx) + 1j * (y[r_lo:r_hi] - cy)    # offset as a complex number
      z = z_img * np.conj(rot)                                       # in the object's frame
      u, v = z.real, z.imag / aspect
      rho = np.sqrt(u * u + v * v) / r0
      unit = (u + 1j * v) / np.maximum(rho * r0, 1e-6)               # e^{i theta}
      boundary = np.ones_like(rho)
      unit_k = unit
      for k in range(4):                                             # harmonics 2..5
        unit_k = unit_k * unit
        boundary += amps[k] * (unit_k * phases[k]).real
      dist = (boundary - rho) * r0 * aspect / px                     # ~ signed distance in px
      cov = np.clip(dist + 0.5, 0.0, 1.0)
      inside[win] = np.maximum(inside[win], cov)
      dome[win] = np.maximum(dome[win], np.clip(1.0 - (rho / boundary) ** 2, 0.0, 1.0))
      side = np.clip(-(z_img * np.exp(-1j * light)).real / np.maximum(np.abs(z_img), 1e-6),
                     0.0, 1.0)
      rim[win] = np.maximum(rim[win], np.exp(-((dist + 1.0) / 1.5) ** 2) * side)
    mask = np.where(inside >= 0.5, np.uint8(255), np.uint8(0))

    # --- Compose colours (all object cues scale with the contrast c).
    shift = np.array([0.05, 0.10, 0.08], np.float32) * rng.uniform(0.7, 1.3)
    mucosa = base * (1.0 + 0.07 * texture[..., None])
    v_strength = rng.uniform(0.3, 0.7) * vessels * (1.0 - np.clip(c * 1.5, 0.0, 0.9) * inside)
    mucosa = mucosa * (1.0 - v_strength[..., None]) + _VESSEL * v_strength[..., None]
    obj = mucosa + c * shift + c * 0.12 * dome[..., None]
    img = mucosa * (1.0 - inside[..., None]) + obj * inside[..., None]
    img *= (1.0 - c * 0.35 * rim)[..., None]

    # --- Illumination: vignetting, gradient, specular highlights.
    ill = self.illumination
    if ill > 0:
      vy, vx = (float(t) for t in rng.uniform(-0.4, 0.4, size=2))
      vig = 1.0 - ill * rng.uniform(0.25, 0.55) * ((x - vx) ** 2 + (y - vy) ** 2) / 2.0
      g_ang = rng.uniform(0.0, 2.0 * np.pi)
      grad = 1.0 + ill * rng.uniform(0.0, 0.25) * (x * np.cos(g_ang) + y * np.sin(g_ang))
      img *= (vig * grad)[..., None]
      spots = np.zeros((s, s), np.float32)
      num_spots = rng.integers(2, 9)
      # Specular highlights land on objects more often than elsewhere (a cue that, as all
      # object cues, vanishes with the contrast).
      on_obj = np.flatnonzero(mask.ravel())
      p_on_obj = 0.66 * min(1.0, 2.0 * c)
      for _ in range(num_spots):
        if on_obj.size and rng.random() < p_on_obj:
          flat = on_obj[rng.integers(on_obj.size)]
          sy, sx = float(y[flat // s, 0]), float(x[0, flat % s])
        else:
          sy, sx = (float(t) for t in rng.uniform(-1, 1, size=2))
        sig = rng.uniform(0.6, 2.0) * px
        r_lo, r_hi = _window(sy, 4.0 * sig, s)
        c_lo, c_hi = _window(sx, 4.0 * sig, s)
        spots[r_lo:r_hi, c_lo:c_hi] += np.exp(
            -0.5 * ((y[r_lo:r_hi] - sy) ** 2 + (x[:, c_lo:c_hi] - sx) ** 2) / sig ** 2)
      img += ill * np.clip(spots, 0.0, 1.0)[..., None] * (1.05 - img)

    # --- Acquisition: blur, noise.
    if rng.random() < 0.5:
      img = _blur3(img)
    sigma = self.noise * rng.uniform(0.01, 0.03)
    img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return image, mask


def _window(center: float, extent: float, size: int) -> tuple[int, int]:
  """Pixel range ``[lo, hi)`` covering normalised coordinates ``center +- extent``."""
  lo = int(np.floor((center - extent + 1.0) * size / 2.0))
  hi = int(np.ceil((center + extent + 1.0) * size / 2.0)) + 1
  return max(lo, 0), min(hi, size)


@functools.lru_cache(maxsize=8)
def _object_count_probs(max_objects: int) -> np.ndarray:
  p = 0.4 ** np.arange(max_objects)
  return p / p.sum()


def _blur3(img: np.ndarray) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur with edge replication."""
  p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
  p = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
  return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
