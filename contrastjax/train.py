r"""The one trainer: ``python -m contrastjax.train --config=PATH[:ARG] --workdir=DIR``.

Reads top to bottom: devices and mesh, data, method/model/optimizer, sharding and
compiled steps, checkpoint (auto-resume), evaluators, loop. Methods differ in
``contrastjax/methods/<name>.py``, not here.

  python -m contrastjax.train --config=configs/condseg_kvasir.py:demo \
      --workdir=workdirs/condseg_demo [--config.batch_size=8 ...]

Restarting the same command resumes from the newest checkpoint in ``--workdir``.
SIGTERM (e.g. a preempted Cloud TPU VM) saves a checkpoint and exits cleanly; a
non-finite loss, gradient or parameter stops training, names the step and keeps the last
good checkpoint (a checkpoint is only written from a state checked to be finite).

Expected errors print one line (the traceback with ``--verbosity=1``) and exit with
:data:`EXIT_CODES`: 2 config or usage, 3 divergence, 4 data, 5 workdir in use or
unusable, 6 checkpoint or disk I/O.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from contrastjax import checkpoint as ckpt_lib
from contrastjax import cli
from contrastjax import errors
from contrastjax import parallel
from contrastjax import spine
from contrastjax import evaluators as evaluators_lib
from contrastjax import metric_writer
from contrastjax import workdir as workdir_lib
from contrastjax.data import builder as data_builder
from contrastjax.data import validation as data_validation
from contrastjax.methods import get_method_class
from contrastjax.errors import ConfigError


_PROCESS_START = time.time()


DivergenceError = errors.DivergenceError  # raised by the loop (re-exported for callers)

#: The metrics of every train step checked for NaN/Inf: the loss (computed before the
#: update), and the gradient and parameter norms (after it: an update can make the
#: parameters non-finite while its loss was finite).
_FINITE_METRICS = ("loss", "grad_norm", "param_norm")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("SIGTERM received: will save a checkpoint and stop.")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. called from a notebook thread)
      self._previous = None

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _SampleCollector:
  """Keeps the first evaluation examples of segmentation methods (``image``, ``mask``
  and predicted ``prob``) and writes them as overlays to TensorBoard and a PNG."""

  def __init__(self, n: int, palette=None):
    self.n, self.rows = n, []
    self.palette = palette  # semantic segmentation: class colours (None: binary masks)

  def __call__(self, batch, outputs) -> None:
    if len(self.rows) >= self.n:
      return
    if self.palette is not None and "pred" in outputs and "label" in batch:
      mask_key, out_key = "label", "pred"   # class maps (semseg evaluator)
    elif "prob" in outputs and "mask" in batch:
      mask_key, out_key = "mask", "prob"
    else:
      return
    for r in np.flatnonzero(np.asarray(batch["valid"]).astype(bool)):
      if len(self.rows) >= self.n:
        break
      self.rows.append((np.asarray(batch["image"][r]), np.asarray(batch[mask_key][r]),
                        np.asarray(outputs[out_key][r])))

  def write(self, writer, step: int, tag: str, path: str, channel_order: str) -> None:
    if not self.rows or not writer.active:
      return
    from contrastjax import visualize  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    panels = []
    for image, mask, prob in self.rows:
      if self.palette is not None:  # normalised image, label and predicted class map
        from contrastjax.data.transforms import mmseg as seg_transforms  # pylint: disable=g-import-not-at-top
        from contrastjax.evaluators import semseg  # pylint: disable=g-import-not-at-top
        panels.append(semseg.semseg_panel(seg_transforms.denormalize(image), mask, prob,
                                          self.palette))
        continue
      if channel_order == "bgr":
        image = image[..., ::-1]
      panels.append(visualize.overlay(image, mask[..., 0] > 0.5, prob[..., 0] > 0.5))
    grid = np.concatenate(panels, axis=0)
    writer.write_images(step, {tag: grid})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)


def _palette(config: ml_collections.ConfigDict, eval_name: str):
  """Class colours for the sample pictures of a ``type='semseg'`` evaluator, else None."""
  ecfg = (config.get("evals") or {}).get(eval_name, {})
  if ecfg.get("type") != "semseg":
    return None
  try:
    return data_builder.dataset_info(config.data.name).palette
  except ValueError:
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3))
            for _ in range(int(ecfg.get("num_classes", 1)))]


def resolve_steps(config: ml_collections.ConfigDict, num_train: int) -> dict[str, int]:
  """Turns ``*_epochs`` / ``*_steps`` settings into step counts."""
  steps_per_epoch = max(num_train // config.batch_size, 1)
  if num_train < config.batch_size:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is larger than the {num_train} training "
        "examples: nothing to train on (batches drop the incomplete remainder)")

  def get(prefix: str, default: int | None) -> int | None:
    s, e = config.get(f"{prefix}_steps"), config.get(f"{prefix}_epochs")
    if s and e:
      raise ConfigError(f"set only one of config.{prefix}_steps and config.{prefix}_epochs")
    if s:
      return int(s)
    if e:
      return max(int(round(float(e) * steps_per_epoch)), 1)
    return default

  total = get("total", None)
  if total is None:
    raise ConfigError("config.total_steps or config.total_epochs must be set")
  return dict(steps_per_epoch=steps_per_epoch, total=total,
              log_every=get("log_every", 50), eval_every=get("eval_every", 0) or 0,
              ckpt_every=get("ckpt_every", 1000))


def _is_better(value: float, best: float | None, mode: str) -> bool:
  if best is None:
    return True
  return value > best if mode == "max" else value < best


def _is_worse(value: float, best: float | None, mode: str) -> bool:
  if best is None:
    return False
  return value < best if mode == "max" else value > best


class Machinery(NamedTuple):
  tx: Any
  plateau_tx: Any
  create: Any             # (rng, batch) -> TrainState, traceable
  abstract: Any           # abstract TrainState with shardings (restore target)
  state_sharding: Any
  compiled: spine.CompiledSteps


def build_machinery(config: ml_collections.ConfigDict, method, mesh, rng,
                    global_example, total_steps: int) -> Machinery:
  """Optimizer, state constructor, abstract state with shardings, compiled steps."""
  params_shape = jax.eval_shape(lambda r, b: method.init(r, b)[0], rng, global_example)
  tx = spine.make_optimizer(config.optimizer, params_shape, total_steps)
  plateau_tx = spine.make_plateau(config.get("plateau"))
  create = functools.partial(spine.create_train_state, method, tx, plateau_tx)
  abstract = jax.eval_shape(create, rng, global_example)
  state_sharding = spine.state_shardings(abstract, mesh)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
      state_sharding)
  compiled = spine.CompiledSteps(method, tx, mesh, state_sharding)
  return Machinery(tx, plateau_tx, create, abstract, state_sharding, compiled)


class CompileAhead:
  """Compiles jitted steps from abstract arguments on background threads.

  The train and evaluation steps only need the state's shapes and shardings, so they
  can compile while the state is initialised or restored (XLA's compiler and the
  initialiser run outside the GIL). On the 2-core development machine the ConDSeg demo
  reaches its first step 8 s sooner and skips its first evaluation's 17 s compilation
  (BENCHMARKS.md); on many-core hosts the compilations overlap fully. ``jit``'s call
  cache then holds the executables, so the loop's first calls do not compile again. A
  failure here is only logged: the first call compiles on its own and raises the error
  where it belongs.
  """

  def __init__(self, mesh, jobs: dict[str, tuple[Any, tuple]]):
    self.seconds: dict[str, float] = {}
    self.errors: dict[str, BaseException] = {}

    def work(name, fn, args):
      t0 = time.time()
      try:
        with jax.set_mesh(mesh):  # the mesh context is per thread
          fn.lower(*args).compile()
        self.seconds[name] = time.time() - t0
      except BaseException as e:  # pylint: disable=broad-except
        self.errors[name] = e

    self._threads = [threading.Thread(target=work, args=(name, fn, args), daemon=True,
                                      name=f"compile-ahead-{name}")
                     for name, (fn, args) in jobs.items()]
    for t in self._threads:
      t.start()

  def join(self) -> None:
    t0 = time.time()
    for t in self._threads:
      t.join()
    for name, e in self.errors.items():
      logging.warning("compiling the %s ahead failed (%s: %s); it compiles at its first "
                      "call instead", name, type(e).__name__, e)
    if self.seconds:
      logging.info("compiled ahead: %s (waited %.1f s)", ", ".join(
          f"{k} {v:.1f} s" for k, v in self.seconds.items()), time.time() - t0)


# Evaluators that hand the input pipeline's evaluation batches to ``predict_fn``
# unchanged, so their step can be compiled ahead from the first batch's shapes.
_PIPELINE_BATCH_EVALUATORS = ("binary_seg", "semseg")


def _compile_ahead_jobs(config, compiled, inputs, mesh, abstract, global_example) -> dict:
  jobs = {"train step": (compiled.train_step, (abstract, global_example))}
  seen = set()  # evaluations of one split with one step share one program
  for name, ecfg in (config.get("evals") or {}).items():
    split, with_loss = ecfg.get("split", name), bool(ecfg.get("with_loss", True))
    if ecfg.get("type") not in _PIPELINE_BATCH_EVALUATORS or (split, with_loss) in seen:
      continue
    seen.add((split, with_loss))
    first = next(iter(inputs.eval_batches(split)), None)
    if first is None:
      continue
    fn = compiled.eval_step if with_loss else compiled.predict
    jobs[f"{split} eval step"] = (fn, (abstract, parallel.host_to_global(first, mesh)))
  return jobs


def make_eval_fns(compiled: spine.CompiledSteps, mesh, get_state, *, with_loss: bool):
  """Host-side ``predict_fn(batch) -> numpy outputs`` and ``loss_fn(batch) -> float``
  for evaluators. With the loss, both come from one compiled ``eval_step`` call per
  batch (the loss is kept for the ``loss_fn`` call on the same batch)."""
  last: dict[str, Any] = {}

  def predict_fn(batch_np):
    gb = parallel.host_to_global(batch_np, mesh)
    if with_loss:
      out, loss = compiled.eval_step(get_state(), gb)
      last.update(batch=batch_np, loss=loss)
    else:
      out = compiled.predict(get_state(), gb)
    return parallel.global_to_local(out, mesh)

  def loss_fn(batch_np):
    if last.get("batch") is not batch_np:  # not the batch just predicted: compute it
      predict_fn(batch_np)
    return float(jax.device_get(last.pop("loss")))

  return predict_fn, (loss_fn if with_loss else None)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming if possible) and returns the last evaluation's metrics."""
  # ===================================================================== devices
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh(config.get("mesh"))
  workdir = workdir_lib.resolve(workdir)
  with jax.set_mesh(mesh):  # scoped: callers (notebooks, tests) keep their own mesh
    with _locked(workdir):
      return _train_and_evaluate(config, workdir, mesh)


class _locked:
  """Holds the workdir lock for the run (process 0 takes it; all processes stop together
  when it is held by another run)."""

  def __init__(self, workdir: str):
    self.lock = workdir_lib.WorkdirLock(workdir)

  def __enter__(self):
    error = None
    if jax.process_index() == 0:
      try:
        self.lock.acquire()
      except workdir_lib.WorkdirError as e:
        error = e
    if jax.process_count() > 1 and parallel.process_any(error is not None) and error is None:
      error = workdir_lib.WorkdirBusyError(
          f"process 0 could not take the lock of the workdir {self.lock.workdir}; its "
          "log says why")
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc):
    self.lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        mesh: jax.sharding.Mesh) -> dict[str, Any]:
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                               async_save=config.get("async_checkpointing", True))
  writer = None
  try:
    resume_step = ckpt.latest_step()
    # Records after the step being resumed from are replayed: the writer drops them.
    writer = metric_writer.MetricWriter(
        workdir, tensorboard=config.get("tensorboard", True), resume_step=resume_step or 0)
    return _train(config, workdir, mesh, ckpt, writer, resume_step)
  finally:
    failing = sys.exc_info()[0] is not None
    try:
      ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      if not failing:
        raise
      logging.warning("closing the checkpointer after the error also failed: %s",
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
    if writer is not None:
      writer.close()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           ckpt: ckpt_lib.Checkpointer, writer: metric_writer.MetricWriter,
           resume_step: int | None) -> dict[str, Any]:
  """The run itself, on an open checkpointer and metric writer."""
  is_chief = jax.process_index() == 0
  writer.write_config(config)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape),
               jax.device_count(), jax.process_count())

  # ===================================================================== data
  local_batch = parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
  eval_batch = config.get("eval_batch_size", config.batch_size)
  local_eval_batch = parallel.check_batch_size(eval_batch, mesh, "config.eval_batch_size")
  inputs = data_builder.build(config, local_batch_size=local_batch,
                              local_eval_batch_size=local_eval_batch, workdir=workdir)
  data_validation.check_sources(inputs.spec.sources, config.data.get("validate", "auto"),
                                progress=config.get("progress_bar", True))
  steps = resolve_steps(config, inputs.num_train)
  total_steps = steps["total"]
  train_iter = iter(inputs.train)
  example = next(iter(inputs.train))  # a separate iterator: shapes only

  # ===================================================================== model & optimizer
  method = get_method_class(config.method)(config)
  rng = jax.random.PRNGKey(config.seed)
  global_example = parallel.host_to_global(example, mesh)

  # ===================================================================== sharding & steps
  machinery = build_machinery(config, method, mesh, rng, global_example, total_steps)
  create, abstract = machinery.create, machinery.abstract
  plateau_tx, compiled = machinery.plateau_tx, machinery.compiled
  state_sharding = machinery.state_sharding

  # ===================================================================== compile ahead
  ahead = None
  if config.get("compile_ahead", True):
    ahead = CompileAhead(mesh, _compile_ahead_jobs(config, compiled, inputs, mesh,
                                                   abstract, global_example))

  # ===================================================================== checkpoint
  loop_state: dict[str, Any] = dict(best_value=None, best_step=None, bad_evals=0,
                                    last_eval={})
  if resume_step is not None:
    state, loop_state, restored_step = ckpt.restore(abstract, data_iter=train_iter)
    if not spine.state_is_finite(state):
      raise DivergenceError(
          f"checkpoint {restored_step} in {os.path.join(workdir, ckpt_lib.CHECKPOINTS)} "
          "holds non-finite (NaN/Inf) values (written by a version that did not check); "
          f"delete the folder {os.path.join(workdir, ckpt_lib.CHECKPOINTS, str(restored_step))} "
          "to resume from the one before it")
    logging.info("resumed from %s at step %d", ckpt.workdir, restored_step)
  else:
    t0 = time.time()
    state = spine.initialise_state(create, state_sharding, rng, global_example)
    params, model_state, extra = method.load_pretrained(
        state.params, state.model_state, state.extra)
    state = state.replace(params=params, model_state=model_state, extra=extra)
    state = jax.device_put(state, state_sharding)
    logging.info("initialised the train state in %.1f s", time.time() - t0)
  first_step = int(jax.device_get(state.step))
  if ahead is not None:
    ahead.join()

  # ===================================================================== evaluators
  state_box = [state]  # evaluators always see the current state
  evals = {}
  for name, ecfg in (config.get("evals") or {}).items():
    predict_fn, loss_fn = make_eval_fns(compiled, mesh, lambda: state_box[0],
                                        with_loss=ecfg.get("with_loss", True))
    evals[name] = evaluators_lib.build(
        ecfg, predict_fn=predict_fn,
        batches_fn=functools.partial(inputs.eval_batches, ecfg.get("split", name)),
        loss_fn=loss_fn, prefix=ecfg.get("prefix", name), reduce_fn=parallel.process_sum)

  best_metric = config.get("best_metric", None)
  best_mode = config.get("best_mode", "max")
  plateau_monitor = (config.get("plateau") or {}).get("monitor", None)
  early_patience = int(config.get("early_stop_patience", 0) or 0)

  num_samples = int(config.get("eval_samples", 4)) if is_chief else 0

  def run_evals(step: int) -> dict[str, float]:
    state_box[0] = state
    results: dict[str, float] = {}
    for name, ev in evals.items():
      every = int(config.evals[name].get("every_steps", 0) or 0)
      if every and step % every and step != total_steps:
        continue  # an expensive eval (e.g. a linear probe) on its own, sparser cadence
      t0 = time.time()
      samples = _SampleCollector(num_samples, _palette(config, name))
      if hasattr(ev, "on_batch") and ev.on_batch is None:
        ev.on_batch = samples
      for k, v in ev.run():
        results[k] = float(v)
      if ev.on_batch is samples:
        ev.on_batch = None
        samples.write(writer, step, f"{name}/samples",
                      os.path.join(workdir, "samples", f"{name}_{step:08d}.png"),
                      config.get("data", {}).get("channel_order", "rgb"))
      results[f"{name}/eval_seconds"] = time.time() - t0
    return results

  # ===================================================================== loop
  preemption = _Preemption()
  preemption.install()
  progress = None
  if is_chief and config.get("progress_bar", True):
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=total_steps, initial=first_step, unit="step",
                         dynamic_ncols=True, desc=config.method)
  pending: list[tuple[int, Any]] = []  # (step, metrics) not yet checked for NaN
  last_good_ckpt = ckpt.latest_step()
  t_last, imgs_since = time.time(), 0
  t_start = _PROCESS_START
  last_eval: dict[str, float] = dict(loop_state.get("last_eval") or {})
  stop_reason = None

  def diverged(s: int, what: str) -> DivergenceError:
    good = ("step " + str(last_good_ckpt) if last_good_ckpt is not None else "none")
    return DivergenceError(
        f"training diverged: {what} at step {s}. Parameters after step {s - 1} are "
        f"discarded; the last good checkpoint is {good} in "
        f"{os.path.join(workdir, ckpt_lib.CHECKPOINTS)}. Lower the learning rate or check "
        "the data, then rerun the same command to resume from it.")

  def check_finite(upto_all: bool) -> None:
    """Checks the loss, gradient norm and parameter norm of finished steps (lagging one
    step behind to keep the device busy) and raises DivergenceError on NaN/Inf."""
    while pending and (upto_all or len(pending) > 1):
      s, m = pending.pop(0)
      values = {k: float(v) for k, v in jax.device_get(
          {k: m[k] for k in _FINITE_METRICS}).items()}
      if not np.isfinite(values["loss"]):
        raise diverged(s, f"loss is {values['loss']}")
      bad = {k: v for k, v in values.items() if not np.isfinite(v)}
      if bad:
        raise diverged(s, "the update made the parameters non-finite (" + ", ".join(
            f"{k}={v}" for k, v in bad.items()) + f", while the loss was {values['loss']:.6g})")

  def save(step: int, force: bool = False) -> None:
    nonlocal last_good_ckpt
    check_finite(upto_all=True)
    if not spine.state_is_finite(state):  # e.g. a BatchNorm statistic overflowed
      raise diverged(step, "the train state holds NaN/Inf values")
    loop_state["last_eval"] = last_eval
    if ckpt.save(step, state, data_iter=train_iter, loop_state=loop_state, force=force):
      last_good_ckpt = step

  step = first_step
  try:
    for step in range(first_step + 1, total_steps + 1):
      batch = next(train_iter)
      t_step = time.time()
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = compiled.train_step(state, parallel.host_to_global(batch, mesh))
      if step == first_step + 1:
        logging.info("first train step (tracing and compilation) dispatched in %.1f s; "
                     "%.1f s since the process started", time.time() - t_step,
                     time.time() - t_start)
      pending.append((step, metrics))
      check_finite(upto_all=False)
      ckpt.check()  # an asynchronous save that failed (e.g. a full disk) stops the run here
      imgs_since += config.batch_size

      if step % steps["log_every"] == 0 or step == total_steps:
        check_finite(upto_all=True)
        dt = time.time() - t_last
        scalars = {f"train/{k}": v for k, v in metrics.items()}
        scalars["train/images_per_sec"] = imgs_since / max(dt, 1e-9)
        scalars["train/epoch"] = step / steps["steps_per_epoch"]
        scalars["train/elapsed_s"] = time.time() - t_start  # since this process started
        vals = writer.write_scalars(step, scalars)
        t_last, imgs_since = time.time(), 0
        if progress is not None:
          progress.set_postfix(loss=f"{vals['train/loss']:.4f}",
                               img_s=f"{vals['train/images_per_sec']:.1f}")

      if evals and steps["eval_every"] and (
          step % steps["eval_every"] == 0 or step == total_steps):
        check_finite(upto_all=True)
        last_eval = run_evals(step)
        if plateau_monitor:
          if plateau_monitor not in last_eval:
            raise ConfigError(f"config.plateau.monitor={plateau_monitor!r} is not an "
                           f"evaluation metric; have {sorted(last_eval)}")
          state = state.replace(plateau=spine.plateau_update(
              plateau_tx, state.plateau, last_eval[plateau_monitor]))
          last_eval["lr_scale"] = float(jax.device_get(state.plateau.scale))
        writer.write_scalars(step, last_eval)
        if progress is not None:
          progress.write(f"step {step}: " + ", ".join(
              f"{k}={v:.4f}" for k, v in sorted(last_eval.items())
              if not k.endswith("eval_seconds")))
        if best_metric:
          if best_metric not in last_eval:
            raise ConfigError(f"config.best_metric={best_metric!r} is not an evaluation "
                           f"metric; have {sorted(last_eval)}")
          value = last_eval[best_metric]
          if _is_better(value, loop_state["best_value"], best_mode):
            loop_state.update(best_value=value, best_step=step, bad_evals=0)
            ckpt.save_best(step, state, loop_state=dict(loop_state, last_eval=last_eval))
          elif _is_worse(value, loop_state["best_value"], best_mode):
            loop_state["bad_evals"] += 1  # as the reference: ties do not count
          if early_patience and loop_state["bad_evals"] >= early_patience:
            stop_reason = (f"early stopping: {best_metric} has not improved on "
                           f"{loop_state['best_value']:.4f} (step "
                           f"{loop_state['best_step']}) for {early_patience} evaluations")

      if progress is not None:
        progress.update(1)
      preempted = parallel.process_any(preemption.requested) if (
          jax.process_count() > 1) else preemption.requested
      if preempted:
        stop_reason = f"preempted (SIGTERM) at step {step}"
      if step % steps["ckpt_every"] == 0 or step == total_steps or stop_reason:
        save(step, force=True)
      if stop_reason:
        logging.warning("%s; checkpoint saved in %s. Rerun the same command to resume.",
                        stop_reason, workdir)
        if progress is not None:
          progress.write(stop_reason)
        break
    check_finite(upto_all=True)
  finally:
    preemption.uninstall()
    if progress is not None:
      progress.close()
  ckpt.wait()  # the last save is on disk (or its failure raises) before "done"
  if is_chief and config.get("plot_curves", True):
    try:
      from contrastjax import visualize  # pylint: disable=g-import-not-at-top
      visualize.plot_curves(os.path.join(workdir, "metrics.jsonl"),
                            os.path.join(workdir, "curves.png"))
    except Exception as e:  # plotting must never lose a finished run
      logging.warning("could not plot the learning curves: %s", e)
  return dict(last_eval, step=step, best_value=loop_state["best_value"],
              best_step=loop_state["best_step"], stop_reason=stop_reason)


# ============================================================================= CLI
def main(argv):
  """Entry point of ``python -m contrastjax.train`` (flags are defined in __main__, so
  importing this module from evaluate/benchmark/tests defines no flags)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/condseg_kvasir.py:demo")
  if not workdir:
    raise app.UsageError("--workdir is required")
  from contrastjax import platform  # pylint: disable=g-import-not-at-top
  platform.configure_cpu_for(config)  # before the backend starts: it reads XLA_FLAGS once
  result = train_and_evaluate(config, workdir)  # expected errors: cli.run's one line
  logging.info("done: %s", result)


if __name__ == "__main__":
  from contrastjax import platform  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Training config file, e.g. configs/condseg_kvasir.py:demo.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  jax.config.parse_flags_with_absl()
  platform.configure_compilation_cache()
  cli.run(main)
