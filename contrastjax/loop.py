"""The named pieces of the training loop, so that ``train.py`` reads top to bottom.

* :func:`due`: the cadence rule ("every N steps, and at the last step");
* :class:`BestTracker`: the best evaluation so far, early stopping (its state is saved
  with every checkpoint);
* :class:`DivergenceGuard`: NaN/Inf in the loss, gradient or parameters, checked one step
  behind the device, and the last checkpoint known to be finite;
* :class:`Evaluations`: the configured evaluators at their cadences, with prediction
  pictures;
* :class:`Preemption`: SIGTERM turned into a flag checked at step boundaries.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax
import numpy as np

from contrastjax import parallel
from contrastjax.errors import ConfigError
from contrastjax.errors import DivergenceError


def due(step: int, every: int, total: int) -> bool:
  """True at multiples of ``every`` (0: never) and at the last step."""
  return bool(every) and (step % every == 0 or step == total)


# ----------------------------------------------------------------------------- best / early stop
class BestTracker:
  """The best value of ``metric`` so far and the early-stopping counter.

  ``mode`` 'max' or 'min'; ``patience`` evaluations without improvement stop the run (0:
  never). As the reference: an evaluation equal to the best is neither better nor worse
  (ties do not count towards patience). :attr:`state` is the checkpointed part.
  """

  def __init__(self, metric: str | None, mode: str = "max", patience: int = 0,
               state: Mapping[str, Any] | None = None):
    if mode not in ("max", "min"):
      raise ConfigError(f"config.best_mode={mode!r}: expected 'max' or 'min'")
    self.metric, self.mode, self.patience = metric or None, mode, int(patience or 0)
    state = dict(state or {})
    self.state = dict(best_value=state.get("best_value"), best_step=state.get("best_step"),
                      bad_evals=int(state.get("bad_evals", 0)))

  def _better(self, value: float) -> bool:
    best = self.state["best_value"]
    return best is None or (value > best if self.mode == "max" else value < best)

  def _worse(self, value: float) -> bool:
    best = self.state["best_value"]
    return best is not None and (value < best if self.mode == "max" else value > best)

  def update(self, step: int, metrics: Mapping[str, float]) -> tuple[bool, str | None]:
    """``(is_new_best, stop_reason or None)`` after an evaluation at ``step``."""
    if not self.metric:
      return False, None
    if self.metric not in metrics:
      raise ConfigError(f"config.best_metric={self.metric!r} is not an evaluation "
                        f"metric; have {sorted(metrics)}")
    value = float(metrics[self.metric])
    is_best = self._better(value)
    if is_best:
      self.state.update(best_value=value, best_step=step, bad_evals=0)
    elif self._worse(value):
      self.state["bad_evals"] += 1
    stop = None
    if self.patience and self.state["bad_evals"] >= self.patience:
      stop = (f"early stopping: {self.metric} has not improved on "
              f"{self.state['best_value']:.4f} (step {self.state['best_step']}) for "
              f"{self.patience} evaluations")
    return is_best, stop


# ----------------------------------------------------------------------------- divergence
#: The metrics of every train step checked for NaN/Inf: the loss (computed before the
#: update), and the gradient and parameter norms (after it: an update can make the
#: parameters non-finite while its loss was finite).
FINITE_METRICS = ("loss", "grad_norm", "param_norm")


class DivergenceGuard:
  """Checks each step's loss, gradient norm and parameter norm for NaN/Inf, one step
  behind the device (so that the host never waits for the step it just dispatched), and
  names the last good checkpoint in the error."""

  def __init__(self, checkpoints_dir: str, last_good: int | None,
               keys: tuple[str, ...] | None = None):
    self.checkpoints_dir = checkpoints_dir
    self.last_good = last_good
    self.keys = tuple(keys) if keys is not None else FINITE_METRICS
    self._pending: list[tuple[int, Mapping[str, Any]]] = []

  def error(self, step: int, what: str) -> DivergenceError:
    good = f"step {self.last_good}" if self.last_good is not None else "none"
    return DivergenceError(
        f"training diverged: {what} at step {step}. Parameters after step {step - 1} are "
        f"discarded; the last good checkpoint is {good} in {self.checkpoints_dir}. Lower "
        "the learning rate or check the data, then rerun the same command to resume "
        "from it.")

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Queues a dispatched step's metrics and checks all but the newest."""
    self._pending.append((step, metrics))
    self.check(upto_all=False)

  def check(self, upto_all: bool = True) -> None:
    """Raises :class:`DivergenceError` on the first queued step with NaN/Inf."""
    while self._pending and (upto_all or len(self._pending) > 1):
      step, m = self._pending.pop(0)
      values = {k: float(v) for k, v in jax.device_get({k: m[k] for k in self.keys}).items()}
      if not np.isfinite(values["loss"]):
        raise self.error(step, f"loss is {values['loss']}")
      bad = {k: v for k, v in values.items() if not np.isfinite(v)}
      if bad:
        raise self.error(step, "the update made the parameters non-finite (" + ", ".join(
            f"{k}={v}" for k, v in bad.items()) + f", while the loss was {values['loss']:.6g})")


# ----------------------------------------------------------------------------- evaluations
class Evaluations:
  """Runs the configured evaluators at their cadences; writes their pictures.

  ``evaluators``: name -> evaluator (``run()`` yields ``(metric, value)``; optionally
  ``pictures()`` returns ``{tag: uint8 image}`` after a run, see
  :mod:`contrastjax.evaluators`). ``every``: name -> its own sparser cadence (0: every
  evaluation of the run).
  """

  def __init__(self, evaluators: Mapping[str, Any], every: Mapping[str, int], writer,
               samples_dir: str):
    self.evaluators, self.every = dict(evaluators), dict(every)
    self.writer, self.samples_dir = writer, samples_dir

  def __bool__(self) -> bool:
    return bool(self.evaluators)

  def run(self, step: int, total: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, ev in self.evaluators.items():
      every = int(self.every.get(name, 0) or 0)
      if every and step % every and step != total:
        continue  # an expensive evaluation (e.g. a linear probe) on its own cadence
      t0 = time.time()
      for k, v in ev.run():
        results[k] = float(v)
      results[f"{name}/eval_seconds"] = time.time() - t0
      pictures = ev.pictures() if hasattr(ev, "pictures") else {}
      for tag, image in pictures.items():
        self.writer.write_images(step, {f"{name}/{tag}": image})
        if self.writer.active:
          from PIL import Image  # pylint: disable=g-import-not-at-top
          folder = epath.Path(self.samples_dir)
          folder.mkdir(parents=True, exist_ok=True)
          with (folder / f"{name}_{step:08d}.png").open("wb") as f:
            Image.fromarray(image).save(f, format="PNG")
    return results


# ----------------------------------------------------------------------------- preemption
class Preemption:
  """SIGTERM (a preempted TPU VM, Slurm's pre-kill signal) as a flag the loop checks at
  step boundaries; in a multi-process run any process's signal stops all of them."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("SIGTERM received: will save a checkpoint and stop.")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. called from a notebook thread)
      self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def stop_now(self) -> bool:
    return parallel.process_any(self.requested) if jax.process_count() > 1 else self.requested

