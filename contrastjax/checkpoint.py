"""Checkpoints: one small wrapper over orbax ``CheckpointManager``.

A workdir holds two series:

* ``<workdir>/checkpoints/<step>/``: the last ``keep`` checkpoints, each with the train
  state (params, optimizer state, model state, method extras, step, RNG), the grain
  data-iterator state and the host-side loop state (best metric, early-stopping
  counter). ``--workdir`` resumes from the newest one, so a killed run restarted with
  the same command sees exactly the data and RNG it would have seen.
* ``<workdir>/best/<step>/``: the single best checkpoint by the configured metric
  (train state and loop state only).

Everything orbax-specific lives here, so moving to the orbax V1 API touches one file.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
BEST = "best"


def _abs(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


class Checkpointer:
  """Saves and restores train state, data iterator and loop state in a workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.workdir = _abs(workdir)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, CHECKPOINTS),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, BEST),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=async_save))

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._latest.all_steps())

  # ------------------------------------------------------------------ saving
  def save(self, step: int, state: Any, *, data_iter=None,
           loop_state: dict | None = None, force: bool = False) -> bool:
    """Saves a rolling checkpoint (state + data iterator + loop state)."""
    items = dict(state=ocp.args.StandardSave(state),
                 loop=ocp.args.JsonSave(dict(loop_state or {})))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._latest.save(step, args=ocp.args.Composite(**items), force=force)

  def save_best(self, step: int, state: Any, *, loop_state: dict | None = None) -> bool:
    """Saves ``state`` as the best checkpoint (replacing the previous best)."""
    items = dict(state=ocp.args.StandardSave(state),
                 loop=ocp.args.JsonSave(dict(loop_state or {})))
    return self._best.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()

  # ------------------------------------------------------------------ restoring
  def restore(self, abstract_state: Any, *, step: int | str = "latest", data_iter=None
              ) -> tuple[Any, dict, int]:
    """Restores ``(state, loop_state, step)``.

    ``step`` is ``"latest"``, ``"best"`` or an int. ``abstract_state`` is a pytree of
    ``jax.ShapeDtypeStruct`` with shardings (from ``jax.eval_shape``), which restores
    optax namedtuples and places arrays on the mesh. If ``data_iter`` is given, its
    position is restored too (rolling checkpoints only).
    """
    mngr, step = self._resolve(step)
    items = dict(state=ocp.args.StandardRestore(abstract_state),
                 loop=ocp.args.JsonRestore())
    if data_iter is not None:
      if mngr is self._best:
        raise ValueError("the best checkpoint holds no data-iterator state")
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], dict(restored["loop"] or {}), step

  def _resolve(self, step: int | str):
    if step == "latest":
      s = self._latest.latest_step()
      if s is None:
        raise FileNotFoundError(
            f"no checkpoint in {os.path.join(self.workdir, CHECKPOINTS)}")
      return self._latest, s
    if step == "best":
      s = self._best.latest_step()
      if s is None:
        raise FileNotFoundError(
            f"no best checkpoint in {os.path.join(self.workdir, BEST)} (is an "
            "evaluation with config.best_metric configured?)")
      return self._best, s
    try:
      step = int(step)
    except (TypeError, ValueError):
      raise ValueError(
          f"checkpoint={step!r}: expected 'latest', 'best' or a step number") from None
    if step in self._latest.all_steps():
      return self._latest, step
    if step in self._best.all_steps():
      return self._best, step
    raise FileNotFoundError(
        f"no checkpoint for step {step} in {self.workdir}; have "
        f"{sorted(self._latest.all_steps())} (best: {self._best.all_steps()})")


def load_variables(workdir: str, which: int | str = "best") -> dict:
  """Reads ``{'params', 'model_state', 'extra', 'step'}`` of a workdir's checkpoint as
  host numpy trees, without needing the optimizer or the model to rebuild the state.

  Used to initialise one run from another (e.g. ConDSeg stage 2 from stage 1).
  ``which`` is ``"best"``, ``"latest"`` or a step number; ``"best"`` falls back to the
  latest checkpoint (with a log line) when the run kept no best checkpoint.
  """
  workdir = _abs(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} (to initialise from) does not exist")
  ckpt = Checkpointer(workdir, keep=1000, async_save=False)
  try:
    if which == "best" and ckpt.best_step() is None:
      logging.warning("%s has no best checkpoint; using the latest one", workdir)
      which = "latest"
    mngr, step = ckpt._resolve(which)  # pylint: disable=protected-access
    path = os.path.join(str(mngr.directory), str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    restored = checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    ckpt.close()
  restored = jax.tree.map(lambda x: jax.device_get(x), restored)
  return dict(params=restored["params"], model_state=restored.get("model_state", {}),
              extra=restored.get("extra", {}), step=int(step))
