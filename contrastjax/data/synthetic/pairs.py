"""Synthetic paired data for CLIP: one shared latent, two modalities.

Each example has a class ``c`` (uniform over ``num_classes``) and a latent
``z = mu_c + within * N(0, I_k)`` (class centres ``mu_c ~ N(0, I_k)``). The two
"modalities" are fixed random two-layer networks of the latent plus independent noise:

  image = W2_x tanh(W1_x z + b1_x) + noise * N(0, I),
  text  = W2_y tanh(W1_y z + b1_y) + noise * N(0, I),

with different weights for the two maps (drawn once from ``map_seed``, shared by every
split), so neither modality is a linear function of the other and the pairing is only
recoverable through the shared latent. The ``zeroshot`` split pairs each noisy image
with its class's *prompt*, the text map of the class centre without noise
(``g(mu_c)``); the zero-shot evaluator classifies images against those prompts.

Examples: ``{'image': float32[dim_x], 'text': float32[dim_y], 'label': int32}``.
Everything is a pure function of ``(data_seed, split, index)``: the same dataset on
every run and process.
"""
from __future__ import annotations

import dataclasses

import numpy as np

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "zeroshot": 3}


@dataclasses.dataclass(frozen=True)
class PairMaps:
  """The fixed random nonlinear maps latent -> modality and the class centres."""
  centres: np.ndarray        # [C, k]
  w1: tuple[np.ndarray, np.ndarray]
  b1: tuple[np.ndarray, np.ndarray]
  w2: tuple[np.ndarray, np.ndarray]

  @classmethod
  def make(cls, map_seed: int, num_classes: int, latent_dim: int, dims: tuple[int, int],
           hidden: int = 64) -> "PairMaps":
    rng = np.random.default_rng(map_seed)
    centres = rng.standard_normal((num_classes, latent_dim))
    w1, b1, w2 = [], [], []
    for d in dims:
      w1.append(rng.standard_normal((latent_dim, hidden)) * 1.5 / np.sqrt(latent_dim))
      b1.append(rng.standard_normal(hidden) * 0.5)
      w2.append(rng.standard_normal((hidden, d)) / np.sqrt(hidden))
    return cls(centres, tuple(w1), tuple(b1), tuple(w2))

  def modality(self, m: int, z: np.ndarray) -> np.ndarray:
    """Modality ``m`` (0 image, 1 text) of latents ``z`` ``[..., k]`` (noise-free)."""
    return np.tanh(z @ self.w1[m] + self.b1[m]) @ self.w2[m]


class SyntheticPairs:
  """Random-access source of paired examples (see the module docstring).

  Args:
    num_examples: Length of the split.
    split: ``'train'``, ``'val'``, ``'test'`` or ``'zeroshot'`` (prompt texts).
    data_seed: Seed of the examples (the split is folded in).
    map_seed: Seed of the maps and class centres (share it across splits).
    num_classes: Number of classes.
    latent_dim: Dimension ``k`` of the shared latent.
    dim_x: Image-modality dimension.
    dim_y: Text-modality dimension.
    within: Within-class spread of the latent.
    noise: Standard deviation of the per-modality observation noise.
  """

  def __init__(self, num_examples: int, split: str = "train", *, data_seed: int = 0,
               map_seed: int = 0, num_classes: int = 10, latent_dim: int = 8,
               dim_x: int = 32, dim_y: int = 24, within: float = 0.6,
               noise: float = 0.05):
    if split not in _SPLIT_IDS:
      raise ValueError(f"split {split!r} is not known; expected one of {sorted(_SPLIT_IDS)}")
    if num_examples < 1:
      raise ValueError(f"num_examples={num_examples} for split {split!r}: expected >= 1")
    if num_classes < 1 or latent_dim < 1 or dim_x < 1 or dim_y < 1:
      raise ValueError("num_classes, latent_dim, dim_x and dim_y must be >= 1, got "
                       f"{(num_classes, latent_dim, dim_x, dim_y)}")
    self.n, self.split = int(num_examples), split
    self.data_seed = int(data_seed)
    self.within, self.noise = float(within), float(noise)
    self.num_classes = int(num_classes)
    self.maps = PairMaps.make(int(map_seed), self.num_classes, int(latent_dim),
                              (int(dim_x), int(dim_y)))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < self.n:
      raise IndexError(f"index {i} out of range for {self.n} examples")
    rng = np.random.default_rng((self.data_seed, _SPLIT_IDS[self.split], int(i)))
    label = int(rng.integers(self.num_classes))
    centre = self.maps.centres[label]
    z = centre + self.within * rng.standard_normal(centre.shape)
    x = self.maps.modality(0, z)
    x = x + self.noise * rng.standard_normal(x.shape)
    if self.split == "zeroshot":
      y = self.maps.modality(1, centre)     # the class prompt: no latent spread, no noise
    else:
      y = self.maps.modality(1, z)
      y = y + self.noise * rng.standard_normal(y.shape)
    return {"image": x.astype(np.float32), "text": y.astype(np.float32),
            "label": np.int32(label)}
