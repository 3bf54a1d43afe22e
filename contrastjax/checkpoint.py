"""Checkpoints: one small wrapper over orbax ``CheckpointManager``.

A workdir holds two series:

* ``<workdir>/checkpoints/<step>/``: the last ``keep`` checkpoints, each with the train
  state (params, optimizer state, model state, method extras, step, RNG), the grain
  data-iterator state and the host-side loop state (best metric, early-stopping
  counter). ``--workdir`` resumes from the newest one, so a killed run restarted with
  the same command sees exactly the data and RNG it would have seen.
* ``<workdir>/best/<step>/``: the single best checkpoint by the configured metric
  (train state and loop state only).

A save that fails (a full disk, a read-only or vanished folder) raises
:class:`CheckpointSaveError` naming the step, the path and the OS error, at the save itself
for synchronous saves and at the trainer's next :meth:`Checkpointer.check` (every step) for
asynchronous ones; the previous checkpoints stay intact.

Replayed steps overwrite their best checkpoint: a run killed after ``best/<N>`` was committed
but before the rolling ``checkpoints/<N>`` resumes from an earlier step, replays step N
bit for bit and writes ``best/<N>`` again.

Everything orbax-specific lives here, so moving to the orbax V1 API touches one file.
"""
from __future__ import annotations

import os
import re
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from contrastjax import workdir as workdir_lib

CHECKPOINTS = "checkpoints"
BEST = "best"
#: Prefix of a step folder being deleted (see ``Checkpointer._delete``).
_TRASH = ".deleting-"


def _abs(path: str) -> str:
  return workdir_lib.resolve(path)


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed; the message names the step, the path and the OS error."""


def _os_error_text(e: BaseException) -> str:
  """The operating-system error behind ``e`` (orbax/tensorstore wrap it in ValueErrors
  whose text carries ``[os_error_code='28']``), as ``[Errno 28] No space left on device``;
  else the innermost message."""
  seen, chain = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    if isinstance(e, OSError) and e.errno:
      return f"[Errno {e.errno}] {os.strerror(e.errno)}"
    e = e.__cause__ or e.__context__
  for c in chain:
    m = re.search(r"os_error_code='?(\d+)", str(c))
    if m:
      code = int(m.group(1))
      return f"[Errno {code}] {os.strerror(code)}"
  text = str(chain[-1]) if chain else ""
  return text.splitlines()[0][:300] if text else type(chain[-1]).__name__


class Checkpointer:
  """Saves and restores train state, data iterator and loop state in a workdir.

  With ``create=False`` (evaluation, imports from another run) nothing is written: a
  workdir without checkpoints raises ``FileNotFoundError`` instead of gaining empty
  ``checkpoints/`` and ``best/`` folders.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               create: bool = True):
    self.workdir = _abs(workdir)
    if not create:
      root = epath.Path(self.workdir)
      found = [d for d in (CHECKPOINTS, BEST) if (root / d).is_dir()]
      if not found:
        what = ("does not exist" if not root.exists() else
                f"holds no {CHECKPOINTS}/ or {BEST}/ folder")
        raise workdir_lib.WorkdirNotFoundError(
            f"workdir {self.workdir} {what}: expected the --workdir of a training run")
    # Old checkpoints are deleted here, not by orbax (max_to_keep=None): orbax deletes a
    # superseded step in a background thread, and a kill -9 in the middle leaves a
    # half-deleted folder it keeps listing (and fails to read). :meth:`_prune` renames a
    # step folder to a hidden name first (atomic), then removes it.
    self._keep = int(keep)
    self._latest = ocp.CheckpointManager(
        os.path.join(self.workdir, CHECKPOINTS),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=create, enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(self.workdir, BEST),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=create, enable_async_checkpointing=async_save))
    # The last save submitted to each manager (step, folder), for error messages.
    self._submitted: dict[int, tuple[int, str]] = {}
    if create and jax.process_index() == 0:
      for mngr in (self._latest, self._best):  # leftovers of a kill during a deletion
        root = epath.Path(str(mngr.directory))
        for leftover in root.glob(f"{_TRASH}*") if root.exists() else ():
          leftover.rmtree(missing_ok=True)

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._latest.all_steps())

  # ------------------------------------------------------------------ saving
  def _save(self, mngr, step: int, items: dict, force: bool) -> bool:
    """``mngr.save`` with failures (this one, or an earlier asynchronous one that orbax
    reports here) turned into :class:`CheckpointSaveError`."""
    self._raise_if_failed(mngr)
    folder = os.path.join(str(mngr.directory), str(step))
    self._submitted[id(mngr)] = (step, folder)
    try:
      return mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f"saving checkpoint {step} to {folder} failed: {_os_error_text(e)}. "
          f"{self._intact_hint()}") from e

  def save(self, step: int, state: Any, *, data_iter=None,
           loop_state: dict | None = None, force: bool = False) -> bool:
    """Saves a rolling checkpoint (state + data iterator + loop state)."""
    items = dict(state=ocp.args.StandardSave(state),
                 loop=ocp.args.JsonSave(dict(loop_state or {})))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self._save(self._latest, step, items, force)

  def save_best(self, step: int, state: Any, *, loop_state: dict | None = None) -> bool:
    """Saves ``state`` as the best checkpoint (replacing the previous best).

    A best checkpoint of the same step already on disk was written before a kill and is
    being replayed after the resume: it is replaced by the new one.
    """
    items = dict(state=ocp.args.StandardSave(state),
                 loop=ocp.args.JsonSave(dict(loop_state or {})))
    if step in self._best.all_steps():
      self.wait_best()
      logging.info("replacing %s/%d, written before this run resumed", BEST, step)
      self._delete(self._best, step)
    return self._save(self._best, step, items, True)

  def _delete(self, mngr, step: int) -> None:
    """Removes a step folder: renamed to a hidden name first (atomic on a local disk),
    so that no kill leaves a half-deleted checkpoint orbax would list."""
    if jax.process_index() == 0:
      root = epath.Path(str(mngr.directory))
      src, trash = root / str(step), root / f"{_TRASH}{step}"
      if trash.exists():
        trash.rmtree()
      if src.exists():
        src.rename(trash)
        trash.rmtree()
    mngr.reload()

  def _prune(self, mngr, keep: int) -> None:
    """Deletes all but the newest ``keep`` committed steps (none while saving)."""
    if mngr.is_saving_in_progress():
      return
    steps = sorted(mngr.all_steps())
    for step in steps[:max(len(steps) - keep, 0)]:
      self._delete(mngr, step)

  def wait_best(self) -> None:
    self._wait(self._best)

  def _wait(self, mngr) -> None:
    try:
      mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, folder = self._submitted.get(id(mngr), (None, str(mngr.directory)))
      raise CheckpointSaveError(
          f"saving checkpoint {step} to {folder} failed: {_os_error_text(e)}. "
          f"{self._intact_hint()}") from e

  def _raise_if_failed(self, mngr) -> None:
    if not mngr.is_saving_in_progress():
      self._wait(mngr)  # returns at once unless the finished save failed

  def check(self) -> None:
    """Raises :class:`CheckpointSaveError` if an asynchronous save has failed (cheap:
    the trainer calls it every step, so a failed save stops the run at once); prunes
    the checkpoints a finished save superseded."""
    self._raise_if_failed(self._latest)
    self._raise_if_failed(self._best)
    self._prune(self._latest, self._keep)
    self._prune(self._best, 1)

  def _intact_hint(self) -> str:
    steps = [s for s in self._latest.all_steps()
             if s != self._submitted.get(id(self._latest), (None,))[0]]
    if steps:
      return (f"The previous checkpoint, step {max(steps)}, is intact; fix the cause and "
              "rerun the same command to resume from it.")
    return "No earlier checkpoint exists."

  def wait(self) -> None:
    self._wait(self._latest)
    self._wait(self._best)
    self._prune(self._latest, self._keep)
    self._prune(self._best, 1)

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
  if not epath.Path(workdir).is_dir():
    raise FileNotFoundError(f"workdir {workdir!r} (to initialise from) does not exist")
  ckpt = Checkpointer(workdir, keep=1000, async_save=False, create=False)
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


def copy_subtree(target: Any, source: Any, what: str) -> dict:
  """Returns ``source``'s leaves shaped and typed like ``target``'s.

  Args:
    target: the freshly initialised subtree (arrays or shape structs).
    source: the subtree to copy from (same structure).
    what: description used in error messages (e.g. ``"params['encoder']"``).

  Raises:
    KeyError: the two trees do not have the same leaves (names a few).
    ValueError: a leaf's shape differs (names the leaf and both shapes).
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat_t = traverse_util.flatten_dict(dict(target))
  flat_s = traverse_util.flatten_dict(dict(source))
  missing = sorted(set(flat_t) - set(flat_s))
  unexpected = sorted(set(flat_s) - set(flat_t))
  if missing or unexpected:
    raise KeyError(
        f"{what}: the source does not match this model (missing "
        f"{['/'.join(k) for k in missing[:5]]}, unexpected "
        f"{['/'.join(k) for k in unexpected[:5]]}); were both runs configured with the "
        "same model (config.model)?")
  out = {}
  for key, t in flat_t.items():
    value = np.asarray(flat_s[key])
    if tuple(value.shape) != tuple(t.shape):
      raise ValueError(f"{what}/{'/'.join(key)}: shape mismatch, this model has "
                       f"{tuple(t.shape)} but the source has {tuple(value.shape)}")
    out[key] = np.asarray(value, dtype=t.dtype)
  return traverse_util.unflatten_dict(out)


def import_subtrees(params: dict, model_state: dict, workdir: str,
                    which: int | str = "best", *, names=None, batch_stats: bool = True,
                    stats_hint: str = "") -> tuple[dict, dict, int]:
  """``init_from``: copies top-level subtrees of another run's checkpoint into freshly
  initialised ``params`` (and their BatchNorm statistics into ``model_state``).

  Args:
    params, model_state: this run's initial trees (``model_state['batch_stats']``).
    workdir: the other run's workdir; ``which``: 'best', 'latest' or a step (a digit
      string counts as a step).
    names: the top-level names to copy (each must exist in the source), or None: every
      name both runs have.
    batch_stats: also copy the running statistics of those subtrees.
    stats_hint: appended to the error when a required subtree has no statistics.

  Returns:
    ``(params, model_state, step of the source checkpoint)``.

  Raises:
    FileNotFoundError: no such workdir or checkpoint.
    KeyError / ValueError: subtrees that do not fit (named, with both shapes).
  """
  if isinstance(which, str) and which.isdigit():
    which = int(which)
  source = load_variables(workdir, which=which)
  required = names is not None
  names = list(names) if required else [n for n in params if n in source["params"]]
  params = dict(params)
  for n in names:
    if n not in source["params"]:
      raise KeyError(f"{workdir}: the checkpoint's params have no {n!r} (top-level: "
                     f"{sorted(source['params'])})")
    params[n] = copy_subtree(params[n], source["params"][n], f"{workdir}: params[{n!r}]")
  if batch_stats and "batch_stats" in model_state:
    stats = source.get("model_state", {}).get("batch_stats", {})
    bs = dict(model_state.get("batch_stats", {}))
    for n in names:
      if n not in bs:
        continue
      if n not in stats:
        if required:
          raise KeyError(f"{workdir}: the checkpoint has no batch_stats[{n!r}] to "
                         f"transfer{stats_hint}")
        continue
      bs[n] = copy_subtree(bs[n], stats[n], f"{workdir}: batch_stats[{n!r}]")
    model_state = dict(model_state, batch_stats=bs)
  return params, model_state, int(source["step"])

