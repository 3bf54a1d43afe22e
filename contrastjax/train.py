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
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from contrastjax import checkpoint as ckpt_lib
from contrastjax import cli
from contrastjax import errors
from contrastjax import evaluators as evaluators_lib
from contrastjax import loop
from contrastjax import methods as methods_lib
from contrastjax import metric_writer
from contrastjax import parallel
from contrastjax import spine
from contrastjax import workdir as workdir_lib
from contrastjax.data import builder as data_builder
from contrastjax.data import pipeline as data_pipeline
from contrastjax.data import validation as data_validation
from contrastjax.errors import ConfigError
from contrastjax.methods.base import RunInfo


_PROCESS_START = time.time()

DivergenceError = errors.DivergenceError  # raised by the loop (re-exported for callers)


def data_context(spec) -> dict[str, Any]:
  """What evaluators may take from the dataset (see ``evaluators.build``): class names,
  palette and ignore index of ``spec.info``, and how to draw a model input."""
  info = getattr(spec, "info", None)
  context: dict[str, Any] = dict(display=getattr(spec, "display", None))
  if info is not None:
    context.update(class_names=info.classes, palette=info.palette,
                   ignore_index=info.ignore_index)
  return context


def resolve_steps(config: ml_collections.ConfigDict, num_train: int) -> dict[str, int]:
  """Turns ``*_epochs`` / ``*_steps`` settings into step counts. An epoch is
  ``ceil(num_train / batch_size)`` steps (``data.pipeline.steps_per_epoch``: the stream
  drops nothing, and the reference PyTorch loaders keep their last, smaller batch)."""
  if num_train < config.batch_size:
    raise ConfigError(
        f"config.batch_size={config.batch_size} is larger than the {num_train} training "
        "examples: every batch would hold some examples twice")
  steps_per_epoch = data_pipeline.steps_per_epoch(num_train, config.batch_size)

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


def run_info(config: ml_collections.ConfigDict, num_train: int,
             steps: dict[str, int] | None = None) -> RunInfo:
  """The facts a method gets about its run (:class:`~contrastjax.methods.base.RunInfo`)."""
  steps = steps or resolve_steps(config, num_train)
  return RunInfo(total_steps=steps["total"], steps_per_epoch=steps["steps_per_epoch"],
                 global_batch_size=int(config.batch_size), num_train=int(num_train))


def _compile_ahead_jobs(config, compiled, inputs, mesh, abstract, global_example) -> dict:
  jobs = {"train step": (compiled.train_step, (abstract, global_example))}
  seen = set()  # evaluations of one split with one step share one program
  for name, ecfg in (config.get("evals") or {}).items():
    split, with_loss = ecfg.get("split", name), bool(ecfg.get("with_loss", True))
    if not evaluators_lib.pipeline_batches(ecfg) or (split, with_loss) in seen:
      continue
    seen.add((split, with_loss))
    first = next(iter(inputs.eval_batches(split)), None)
    if first is None:
      continue
    fn = compiled.eval_step if with_loss else compiled.predict
    jobs[f"{split} eval step"] = (fn, (abstract, parallel.host_to_global(first, mesh)))
  return jobs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (resuming if possible) and returns the last evaluation's metrics.

  A workdir whose checkpoints were written under another config (``config.json`` differs
  in a key that changes what is computed) is a :class:`ConfigError` before anything is
  computed, unless ``allow_config_change`` (``--allow_config_change``)."""
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh(config.get("mesh"))
  workdir = workdir_lib.resolve(workdir)
  with jax.set_mesh(mesh):  # scoped: callers (notebooks, tests) keep their own mesh
    with _locked(workdir):
      return _train_and_evaluate(config, workdir, mesh, allow_config_change)


def _on_process_0(fn, catch: type[Exception], elsewhere: Exception) -> None:
  """Runs ``fn`` on process 0; if it raises ``catch`` every process stops: process 0 with
  its error, the others with ``elsewhere`` (their logs point to process 0's)."""
  error = None
  if jax.process_index() == 0:
    try:
      fn()
    except catch as e:  # pylint: disable=broad-except
      error = e
  if jax.process_count() > 1 and parallel.process_any(error is not None) and error is None:
    error = elsewhere
  if error is not None:
    raise error


def _check_resumed_config(config, workdir: str, resume_step: int, allow: bool) -> None:
  """Process 0 compares the config with the workdir's; every process stops if it differs."""
  _on_process_0(
      lambda: workdir_lib.check_resumed_config(workdir, config.to_json_best_effort(),
                                               resume_step, allow_change=allow),
      errors.ConfigError,
      errors.ConfigError(f"process 0 found that the workdir {workdir} holds checkpoints of "
                         "another config; its log names the keys"))


class _locked:
  """Holds the workdir lock for the run (process 0 takes it; all processes stop together
  when it is held by another run)."""

  def __init__(self, workdir: str):
    self.lock = workdir_lib.WorkdirLock(workdir)

  def __enter__(self):
    _on_process_0(self.lock.acquire, workdir_lib.WorkdirError, workdir_lib.WorkdirBusyError(
        f"process 0 could not take the lock of the workdir {self.lock.workdir}; its log "
        "says why"))
    return self

  def __exit__(self, *exc):
    self.lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        mesh: jax.sharding.Mesh, allow_config_change: bool) -> dict[str, Any]:
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                               async_save=config.get("async_checkpointing", True))
  writer = None
  try:
    resume_step = ckpt.latest_step()
    if resume_step is not None:
      _check_resumed_config(config, workdir, resume_step, allow_config_change)
    # Records after the step being resumed from are replayed: the writer drops them.
    writer = metric_writer.MetricWriter(
        workdir, tensorboard=config.get("tensorboard", True), resume_step=resume_step or 0)
    try:
      return _train(config, workdir, mesh, ckpt, writer, resume_step)
    except (ckpt_lib.CheckpointSaveError, workdir_lib.WorkdirError):
      raise
    except OSError as e:
      # A write of the run's records (metrics.jsonl, events, pictures) failed: Pillow and
      # plain file writes report it without a path. Name the workdir and what is intact.
      if e.errno is None:
        raise
      # A save still in flight either commits (then it is the last intact checkpoint)
      # or fails (then it is not one): wait for it before naming the step.
      try:
        ckpt.wait()
      except ckpt_lib.CheckpointSaveError as save_error:
        logging.warning("the checkpoint save in flight failed as well: %s",
                        str(save_error).splitlines()[0])
      last = ckpt.latest_step()
      intact = (f"The last checkpoint, step {last}, is intact; make room (or fix the "
                "cause) and rerun the same command to resume from it." if last is not None
                else "No checkpoint was written yet.")
      err = workdir_lib.RunWriteError(
          f"writing the run's records (metrics, events, pictures) to {workdir}/ failed: "
          f"[Errno {e.errno}] {e.strerror}" + (f" ({e.filename})" if e.filename else "")
          + f". {intact}")
      err.errno = e.errno
      raise err from e
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
  run = run_info(config, inputs.num_train, steps)
  total_steps = run.total_steps
  train_iter = iter(inputs.train)
  example = next(iter(inputs.train))  # a separate iterator: shapes only

  # ===================================================================== method, optimizer, steps
  method = methods_lib.build(config, run)
  rng = jax.random.PRNGKey(config.seed)
  global_example = parallel.host_to_global(example, mesh)
  compiled_run = spine.build_run(config, method, mesh, rng, global_example, total_steps)
  compiled = compiled_run.compiled
  ahead = None
  if config.get("compile_ahead", True):  # compiles while the state is initialised below
    ahead = spine.CompileAhead(mesh, _compile_ahead_jobs(
        config, compiled, inputs, mesh, compiled_run.abstract, global_example))

  # ===================================================================== state: resume or init
  loop_state: dict[str, Any] = {}
  if resume_step is not None:
    state, loop_state, restored_step = ckpt.restore(compiled_run.abstract,
                                                    data_iter=train_iter)
    if not spine.state_is_finite(state):
      raise DivergenceError(
          f"checkpoint {restored_step} in {os.path.join(workdir, ckpt_lib.CHECKPOINTS)} "
          "holds non-finite (NaN/Inf) values (written by a version that did not check); "
          f"delete the folder {os.path.join(workdir, ckpt_lib.CHECKPOINTS, str(restored_step))} "
          "to resume from the one before it")
    logging.info("resumed from %s at step %d", ckpt.workdir, restored_step)
    best_step = loop_state.get("best_step")
    if best_step is not None and ckpt.best_step() != best_step:
      if best_step == restored_step:
        # Killed after the rolling checkpoint of a new best committed and before the best
        # one did (two asynchronous saves): the restored state is that best state.
        logging.warning("best checkpoint %d was lost to an interruption; writing it again "
                        "from checkpoint %d (the same state)", best_step, restored_step)
        ckpt.save_best(restored_step, state, loop_state=loop_state)
        ckpt.wait_best()
      else:
        logging.warning("the loop state names best step %s but %s holds %s; the next "
                        "better evaluation writes a new best checkpoint", best_step,
                        os.path.join(workdir, ckpt_lib.BEST), ckpt.best_step())
  else:
    t0 = time.time()
    state = spine.initialise_state(compiled_run.create, compiled_run.state_sharding, rng,
                                   global_example)
    params, model_state, extra = method.load_pretrained(
        state.params, state.model_state, state.extra)
    state = state.replace(params=params, model_state=model_state, extra=extra)
    state = jax.device_put(state, compiled_run.state_sharding)
    logging.info("initialised the train state in %.1f s", time.time() - t0)
  first_step = int(jax.device_get(state.step))
  if ahead is not None:
    ahead.join()

  # ===================================================================== evaluators
  state_box = [state]  # evaluators always see the current state
  evaluators, every = {}, {}
  context = data_context(inputs.spec)
  for name, ecfg in (config.get("evals") or {}).items():
    predict_fn, loss_fn = spine.make_eval_fns(compiled, mesh, lambda: state_box[0],
                                              with_loss=ecfg.get("with_loss", True))
    evaluators[name] = evaluators_lib.build(
        ecfg, predict_fn=predict_fn,
        batches_fn=functools.partial(inputs.eval_batches, ecfg.get("split", name)),
        loss_fn=loss_fn, prefix=ecfg.get("prefix", name), reduce_fn=parallel.process_sum,
        samples=int(config.get("eval_samples", 4)), **context)
    every[name] = int(ecfg.get("every_steps", 0) or 0)
  evaluations = loop.Evaluations(evaluators, every, writer, os.path.join(workdir, "samples"))
  best = loop.BestTracker(config.get("best_metric", None), config.get("best_mode", "max"),
                          config.get("early_stop_patience", 0), loop_state)
  plateau_monitor = (config.get("plateau") or {}).get("monitor", None)
  guard = loop.DivergenceGuard(os.path.join(workdir, ckpt_lib.CHECKPOINTS),
                               ckpt.latest_step())
  last_eval: dict[str, float] = dict(loop_state.get("last_eval") or {})

  def save(step: int) -> None:
    guard.check()
    if not spine.state_is_finite(state):  # e.g. a BatchNorm statistic overflowed
      raise guard.error(step, "the train state holds NaN/Inf values")
    if ckpt.save(step, state, data_iter=train_iter,
                 loop_state=dict(best.state, last_eval=last_eval), force=True):
      guard.last_good = step

  # ===================================================================== loop
  progress = None
  if is_chief and config.get("progress_bar", True):
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=total_steps, initial=first_step, unit="step",
                         dynamic_ncols=True, desc=config.method)
  t_last, imgs_since = time.time(), 0
  stop_reason = None
  step = first_step
  try:
    with loop.Preemption() as preemption:
      for step in range(first_step + 1, total_steps + 1):
        batch = next(train_iter)
        t_step = time.time()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = compiled.train_step(state, parallel.host_to_global(batch, mesh))
        if step == first_step + 1:
          logging.info("first train step (tracing and compilation) dispatched in %.1f s; "
                       "%.1f s since the process started", time.time() - t_step,
                       time.time() - _PROCESS_START)
        guard.add(step, metrics)
        ckpt.check()  # an asynchronous save that failed (e.g. a full disk) stops the run
        imgs_since += config.batch_size

        if loop.due(step, steps["log_every"], total_steps):
          guard.check()
          dt = time.time() - t_last
          scalars = {f"train/{k}": v for k, v in metrics.items()}
          scalars["train/images_per_sec"] = imgs_since / max(dt, 1e-9)
          scalars["train/epoch"] = step / run.steps_per_epoch
          scalars["train/elapsed_s"] = time.time() - _PROCESS_START
          vals = writer.write_scalars(step, scalars)
          t_last, imgs_since = time.time(), 0
          if progress is not None:
            progress.set_postfix(loss=f"{vals['train/loss']:.4f}",
                                 img_s=f"{vals['train/images_per_sec']:.1f}")

        if evaluations and loop.due(step, steps["eval_every"], total_steps):
          guard.check()
          state_box[0] = state
          last_eval = evaluations.run(step, total_steps)
          if plateau_monitor:
            if plateau_monitor not in last_eval:
              raise ConfigError(f"config.plateau.monitor={plateau_monitor!r} is not an "
                                f"evaluation metric; have {sorted(last_eval)}")
            state = state.replace(plateau=spine.plateau_update(
                compiled_run.plateau_tx, state.plateau, last_eval[plateau_monitor]))
            last_eval["lr_scale"] = float(jax.device_get(state.plateau.scale))
          writer.write_scalars(step, last_eval)
          if progress is not None:
            progress.write(f"step {step}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in sorted(last_eval.items())
                if not k.endswith("eval_seconds")))
          is_best, stop_reason = best.update(step, last_eval)
          if is_best:
            ckpt.save_best(step, state, loop_state=dict(best.state, last_eval=last_eval))

        if progress is not None:
          progress.update(1)
        if preemption.stop_now():
          stop_reason = f"preempted (SIGTERM) at step {step}"
        if loop.due(step, steps["ckpt_every"], total_steps) or stop_reason:
          save(step)
        if stop_reason:
          logging.warning("%s; checkpoint saved in %s. Rerun the same command to resume.",
                          stop_reason, workdir)
          if progress is not None:
            progress.write(stop_reason)
          break
      guard.check()
  finally:
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
  return dict(last_eval, step=step, best_value=best.state["best_value"],
              best_step=best.state["best_step"], stop_reason=stop_reason)


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
  result = train_and_evaluate(  # expected errors: cli.run's one line
      config, workdir, allow_config_change=flags.FLAGS.allow_config_change)
  logging.info("done: %s", result)


if __name__ == "__main__":
  from contrastjax import platform  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Training config file, e.g. configs/condseg_kvasir.py:demo.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume a workdir whose config.json differs from --config (the old one "
                    "is kept as config.<step>.json); without it such a resume stops.")
  jax.config.parse_flags_with_absl()
  platform.configure_compilation_cache()
  cli.run(main)
