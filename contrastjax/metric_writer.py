"""Process-0 metric logging: ``metrics.jsonl``, TensorBoard event files, config.json."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np


def _to_float(v: Any) -> float:
  v = np.asarray(jax.device_get(v))
  return float(v.reshape(()) if v.size == 1 else v.mean())


class MetricWriter:
  """Appends one JSON object per logged step to ``<workdir>/metrics.jsonl`` and writes
  the same scalars as TensorBoard events under ``<workdir>/tensorboard``.

  Only process 0 writes; on other processes every call is a no-op.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write_config(self, config) -> None:
    if not self.active:
      return
    with open(os.path.join(self.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    values = {k: _to_float(v) for k, v in scalars.items()}
    if not self.active:
      return values
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    return values

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes uint8 HWC images to TensorBoard."""
    if not self.active or self._tb is None:
      return
    for k, img in images.items():
      self._tb.add_image(k, np.asarray(img), int(step), dataformats="HWC")
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  """Reads ``metrics.jsonl`` back (for plots, tests and notebooks)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
