r"""Evaluate a trained run: restore a checkpoint, run the evaluators, save predictions.

  python -m contrastjax.evaluate --config=configs/condseg_kvasir.py:demo \
      --workdir=workdirs/condseg_demo [--checkpoint=best|latest|STEP] [--splits=val,test] \
      [--save_predictions=64] [--original_resolution]

Prints a metrics table and writes, under ``<workdir>/eval/<checkpoint>_<step>/``:
``metrics.json``, and per split ``<split>/masks/<name>.png`` (binarised predictions) and
``<split>/overlays/<name>.png`` (image | ground truth | prediction side by side); for
``type='semseg'`` evaluators the masks are palette-coloured class maps.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from contrastjax import checkpoint as ckpt_lib
from contrastjax import cli
from contrastjax import evaluators as evaluators_lib
from contrastjax import parallel
from contrastjax import platform
from contrastjax import methods as methods_lib
from contrastjax import spine
from contrastjax import train as train_lib
from contrastjax.data import builder as data_builder


def _eval_config(evals_cfg: dict, split: str) -> dict:
  """The config's evaluation of ``split``; else its first evaluation applied to that split
  (e.g. ``--splits=test`` for a run that validated on ``val``)."""
  for ecfg in evals_cfg.values():
    if ecfg.get("split") == split:
      return dict(ecfg)
  if not evals_cfg:
    raise cli.ConfigError("config.evals is empty: nothing says how to evaluate")
  first = dict(next(iter(evals_cfg.values())))
  first["split"] = split
  return first


def evaluate(config, workdir: str, *, checkpoint: str = "best", splits=None,
             save_predictions: int = 32, original_resolution: bool = False,
             output_dir: str | None = None) -> dict[str, float]:
  """Restores ``checkpoint`` of ``workdir`` and evaluates it on ``splits``."""
  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh(config.get("mesh"))
  with jax.set_mesh(mesh):  # scoped: callers keep their own mesh
    return _evaluate(config, workdir, mesh, checkpoint=checkpoint, splits=splits,
                     save_predictions=save_predictions,
                     original_resolution=original_resolution, output_dir=output_dir)


def _evaluate(config, workdir: str, mesh, *, checkpoint: str, splits,
              save_predictions: int, original_resolution: bool,
              output_dir: str | None) -> dict[str, float]:
  # First, so that a mistyped workdir fails at once (and nothing is written into it).
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False, create=False)
  try:
    return _evaluate_with(ckpt, config, workdir, mesh, checkpoint=checkpoint, splits=splits,
                          save_predictions=save_predictions,
                          original_resolution=original_resolution, output_dir=output_dir)
  finally:
    ckpt.close()


def _evaluate_with(ckpt, config, workdir: str, mesh, *, checkpoint: str, splits,
                   save_predictions: int, original_resolution: bool,
                   output_dir: str | None) -> dict[str, float]:
  local_batch = parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
  eval_batch = config.get("eval_batch_size", config.batch_size)
  local_eval = parallel.check_batch_size(eval_batch, mesh, "config.eval_batch_size")
  inputs = data_builder.build(config, local_batch_size=local_batch,
                              local_eval_batch_size=local_eval, workdir=workdir)
  evals_cfg = dict(config.get("evals") or {})
  if splits is None:
    splits = [e.get("split", n) for n, e in evals_cfg.items()] or ["val"]
  unknown = [s for s in splits if s not in inputs.spec.sources]
  if unknown:
    raise cli.ConfigError(f"--splits {unknown} not in the dataset; have "
                     f"{sorted(inputs.spec.sources)}")

  steps = train_lib.resolve_steps(config, inputs.num_train)
  method = methods_lib.build(config, train_lib.run_info(config, inputs.num_train, steps))
  rng = jax.random.PRNGKey(config.seed)
  example = next(iter(inputs.train))
  global_example = parallel.host_to_global(example, mesh)
  run = spine.build_run(config, method, mesh, rng, global_example, steps["total"])
  state, _, step = ckpt.restore(run.abstract, step=checkpoint)
  logging.info("evaluating %s checkpoint (step %d) of %s", checkpoint, step, workdir)

  out_dir = output_dir or os.path.join(ckpt.workdir, "eval", f"{checkpoint}_{step}")
  results: dict[str, float] = {"step": float(step)}
  context = train_lib.data_context(inputs.spec)

  for split in splits:
    ecfg = _eval_config(evals_cfg, split)
    source = inputs.spec.sources[split]
    predict_np, loss_np = spine.make_eval_fns(run.compiled, mesh, lambda: state,
                                              with_loss=bool(ecfg.get("with_loss", True)))
    extra = dict(source=source)
    if original_resolution:
      if not evaluators_lib.accepts(ecfg, "original_resolution"):
        raise cli.ConfigError(
            f"--original_resolution: the {ecfg.get('type')!r} evaluation of split {split!r} "
            "has no original-resolution scoring (its data are at their original size)")
      extra["original_resolution"] = True
    if save_predictions:
      extra.update(save_dir=os.path.join(out_dir, split), save_overlays=save_predictions,
                   names=getattr(source, "names", None))
    ev = evaluators_lib.build(
        ecfg, predict_fn=predict_np, batches_fn=lambda s=split: inputs.eval_batches(s),
        loss_fn=loss_np, prefix=split, reduce_fn=parallel.process_sum, samples=0,
        **extra, **context)
    for k, v in ev.run():
      results[k] = float(v)

  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(dict(results, checkpoint=checkpoint, workdir=os.path.abspath(workdir)),
                f, indent=2, sort_keys=True)
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
      print(f"{k:<{width}}  {v:.4f}" if k != "step" else f"{k:<{width}}  {int(v)}")
    print(f"written to {out_dir}")
  return results


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config of the run.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Workdir of the run to evaluate.")
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step.")
  flags.DEFINE_list("splits", None, "Splits to evaluate (default: config.evals).")
  flags.DEFINE_integer("save_predictions", 32,
                       "Overlays to save per split (masks are saved for all images); 0 "
                       "saves nothing.")
  flags.DEFINE_bool("original_resolution", False,
                    "Also score predictions resized to each image's original size.")
  flags.DEFINE_string("output_dir", None, "Where to write (default: WORKDIR/eval/...).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  f = flags.FLAGS
  if f.config is None or not f.workdir:
    raise app.UsageError("--config and --workdir are required")
  platform.configure_cpu_for(f.config)  # before the backend starts
  evaluate(f.config, f.workdir, checkpoint=f.checkpoint, splits=f.splits,
           save_predictions=f.save_predictions,
           original_resolution=f.original_resolution, output_dir=f.output_dir)


if __name__ == "__main__":
  _define_flags()
  jax.config.parse_flags_with_absl()
  platform.configure_compilation_cache()
  cli.run(main)
