"""Pictures of predictions: one option of the segmentation evaluators, shared by the
trainer (TensorBoard + ``<workdir>/samples/``) and ``contrastjax.evaluate`` (every
prediction saved).

* ``samples=N``: the first N valid examples of an evaluation as one image grid, returned
  by the evaluator's ``pictures()`` after ``run()``;
* ``save_dir=DIR``: every valid prediction written as ``DIR/masks/<name>.png``, and the
  first ``save_overlays`` as ``DIR/overlays/<name>.png`` panels.

Only process 0 keeps or writes pictures. How an example is drawn (a binary overlay or a
class-coloured panel) is the evaluator's :class:`Renderer`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np
from PIL import Image


def default_display(image: np.ndarray) -> np.ndarray:
  """A model input as uint8 RGB: values in [0, 1] scaled, 0..255 kept."""
  from contrastjax import visualize  # pylint: disable=g-import-not-at-top
  return visualize._to_uint8_rgb(image)  # pylint: disable=protected-access


class Renderer(Protocol):
  def panel(self, image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``image | ground truth | prediction`` as uint8 RGB."""

  def mask(self, pred: np.ndarray) -> np.ndarray:
    """The prediction alone as a uint8 image (written as PNG)."""


class Pictures:
  """Collects and writes the pictures of one evaluator (see the module docstring)."""

  def __init__(self, renderer: Renderer, *, samples: int = 0,
               display: Callable[[np.ndarray], np.ndarray] | None = None,
               save_dir: str | None = None, save_overlays: int = 0,
               names: Sequence[str] | None = None):
    self.renderer = renderer
    self.samples = int(samples or 0)
    self.display = display or default_display
    self.save_dir, self.save_overlays = save_dir, int(save_overlays or 0)
    self.names = list(names) if names is not None else None
    self.active = jax.process_index() == 0 and (self.samples > 0 or save_dir)
    self._rows: list[np.ndarray] = []
    self._saved = 0

  def reset(self) -> None:
    self._rows, self._saved = [], 0

  def _name(self, batch: Mapping[str, Any], r: int) -> str:
    if "index" not in batch:
      return f"{self._saved:06d}"
    index = int(np.asarray(batch["index"])[r])
    name = self.names[index] if self.names is not None else f"{index:06d}"
    return os.path.basename(str(name))

  def add(self, batch: Mapping[str, Any], gt: np.ndarray, pred: np.ndarray,
          valid: np.ndarray) -> None:
    """Offers a batch: ``gt``/``pred`` per example as the renderer takes them."""
    if not self.active:
      return
    for r in np.flatnonzero(valid):
      keep = len(self._rows) < self.samples
      write = self.save_dir is not None
      overlay = write and self._saved < self.save_overlays
      if not (keep or write):
        return
      panel = None
      if keep or overlay:
        panel = self.renderer.panel(self.display(np.asarray(batch["image"][r])),
                                    gt[r], pred[r])
      if keep:
        self._rows.append(panel)
      if write:
        name = self._name(batch, r)
        _save_png(os.path.join(self.save_dir, "masks", name + ".png"),
                  self.renderer.mask(pred[r]))
        if overlay:
          _save_png(os.path.join(self.save_dir, "overlays", name + ".png"), panel)
          self._saved += 1

  def grid(self) -> dict[str, np.ndarray]:
    """``{'samples': uint8 grid}`` of the kept examples ({} when none)."""
    if not self._rows:
      return {}
    return {"samples": np.concatenate(self._rows, axis=0)}


def _save_png(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(image)).save(path)
