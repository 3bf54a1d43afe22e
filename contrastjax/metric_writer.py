"""Process-0 metric logging: ``metrics.jsonl``, TensorBoard event files, config.json."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np


def _to_float(v: Any) -> float:
  v = np.asarray(jax.device_get(v))
  return float(v.reshape(()) if v.size == 1 else v.mean())


class MetricWriter:
  """Appends one JSON object per logged step to ``<workdir>/metrics.jsonl`` and writes
  the same scalars as TensorBoard events under ``<workdir>/tensorboard``.

  Only process 0 writes; on other processes every call is a no-op.

  ``resume_step``: the step the run (re)starts from. Records of later steps, written
  before a kill, are dropped from ``metrics.jsonl`` (and TensorBoard purges its events
  after it), because the resumed run replays those steps: each step is logged once.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self._tb = None
    if not self.active:
      return
    self._dir = epath.Path(workdir)  # local, or gs://... (object stores: no appends)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._path = self._dir / "metrics.jsonl"
    self._remote = "://" in str(workdir)
    self._lines: list[str] | None = None  # remote: the file's lines, rewritten per write
    if resume_step is not None:
      self._drop_after(int(resume_step))
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(
            os.path.join(workdir, "tensorboard"),
            purge_step=None if resume_step is None else int(resume_step) + 1)
      except ImportError as e:  # e.g. gs:// without google-cloud-storage
        logging.warning("no TensorBoard events in %s (%s)", workdir, e)

  def _read_lines(self) -> list[str]:
    if not self._path.exists():
      return []
    return [line for line in self._path.read_text().splitlines(keepends=True)
            if line.strip()]

  def _drop_after(self, step: int) -> None:
    lines = self._read_lines()
    if not lines:
      return
    def step_of(line: str) -> float:
      try:
        return json.loads(line).get("step", 0)
      except ValueError:  # a line cut short by a kill
        return float("inf")
    keep = [line for line in lines if step_of(line) <= step]
    if len(keep) == len(lines):
      return
    tmp = self._dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(keep))
    tmp.replace(self._path)  # atomic on a local disk
    logging.info("metrics.jsonl: dropped %d records after step %d (replayed on resume)",
                 len(lines) - len(keep), step)

  def write_config(self, config) -> None:
    if not self.active:
      return
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if self._remote:  # an object is written whole
      (self._dir / "config.json").write_text(text)
      return
    tmp = self._dir / "config.json.tmp"  # a kill mid-write leaves the old file whole
    tmp.write_text(text)
    tmp.replace(self._dir / "config.json")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    values = {k: _to_float(v) for k, v in scalars.items()}
    if not self.active:
      return values
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    line = json.dumps(record) + "\n"
    if self._remote:  # object stores cannot append: keep the lines, rewrite the object
      if self._lines is None:
        self._lines = self._read_lines()
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
    else:
      with open(self._path, "a") as f:
        f.write(line)
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


def read_metrics(path: str) -> list[dict]:
  """Reads ``metrics.jsonl`` (or a workdir holding it) back, one record per step in step
  order (for plots, tests and notebooks).

  Records of one step are merged. Files written before resumes dropped replayed records
  could hold a step twice: a record whose step is lower than the one before it starts a
  replay, which replaces the records from that step on (the last value wins). Lines cut
  short by a kill are skipped.
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  records: list[dict] = []
  with path.open() as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      step = rec.get("step", len(records))
      if records and step < records[-1]["step"]:  # a replay after a resume
        records = [r for r in records if r["step"] < step]
      if records and records[-1]["step"] == step:
        records[-1].update(rec)
      else:
        records.append(dict(rec, step=step))
  return records
