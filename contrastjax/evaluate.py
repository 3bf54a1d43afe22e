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
import numpy as np
from ml_collections import config_flags

from contrastjax import checkpoint as ckpt_lib
from contrastjax import cli
from contrastjax import evaluators as evaluators_lib
from contrastjax import parallel
from contrastjax import platform
from contrastjax import train as train_lib
from contrastjax.data import builder as data_builder
from contrastjax.data.transforms import medseg as data_transforms
from contrastjax.evaluators import binary_seg
from contrastjax.methods import get_method_class


class _PredictionSaver:
  """``on_batch`` callback: writes masks and overlays of valid examples (process 0)."""

  def __init__(self, out_dir: str, source, limit: int, threshold: float,
               channel_order: str):
    self.out_dir, self.source, self.limit = out_dir, source, limit
    self.threshold, self.channel_order = threshold, channel_order
    self.saved = 0
    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)

  def _name(self, index: int) -> str:
    names = getattr(self.source, "names", None)
    name = names[index] if names is not None else f"{index:06d}"
    return os.path.basename(str(name))

  def __call__(self, batch, outputs) -> None:
    from contrastjax import visualize  # pylint: disable=g-import-not-at-top
    valid = np.asarray(batch["valid"]).astype(bool)
    prob = np.asarray(outputs["prob"])[..., 0]
    for r in np.flatnonzero(valid):
      index = int(batch["index"][r])
      name = self._name(index)
      pred = prob[r] > self.threshold
      visualize.save_mask_png(os.path.join(self.out_dir, "masks", name + ".png"), pred)
      if self.saved < self.limit:
        image = np.asarray(batch["image"][r])
        if self.channel_order == "bgr":
          image = image[..., ::-1]
        visualize.save_overlay_png(
            os.path.join(self.out_dir, "overlays", name + ".png"), image,
            np.asarray(batch["mask"][r])[..., 0] > 0.5, pred)
        self.saved += 1


class _SemSegPredictionSaver(_PredictionSaver):
  """``on_batch`` callback of ``type='semseg'`` evaluators: class maps as palette PNGs and
  ``image | ground truth | prediction`` panels (process 0)."""

  def __init__(self, out_dir: str, source, limit: int, palette):
    super().__init__(out_dir, source, limit, threshold=0.5, channel_order="rgb")
    self.palette = palette

  def __call__(self, batch, outputs) -> None:
    from contrastjax.data.transforms import mmseg as seg_transforms  # pylint: disable=g-import-not-at-top
    from contrastjax.evaluators import semseg  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    valid = np.asarray(batch["valid"]).astype(bool)
    pred = semseg.predictions_from_outputs(outputs)
    for r in np.flatnonzero(valid):
      name = self._name(int(batch["index"][r]))
      Image.fromarray(semseg.colorize(pred[r], self.palette)).save(
          os.path.join(self.out_dir, "masks", name + ".png"))
      if self.saved < self.limit:
        semseg.save_semseg_png(os.path.join(self.out_dir, "overlays", name + ".png"),
                               seg_transforms.denormalize(batch["image"][r]),
                               np.asarray(batch["label"][r]), pred[r], self.palette)
        self.saved += 1


def _semseg_palette(config, num_classes: int):
  """The dataset's class colours (``data.builder.dataset_info``), else a fixed map."""
  try:
    return data_builder.dataset_info(config.data.name).palette
  except ValueError:
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes)]


class _OriginalResolution:
  """``on_batch`` callback: metrics with the prediction resized (bilinear) to each
  image's original size and scored against the original, un-resized mask."""

  def __init__(self, source, threshold: float):
    self.source, self.threshold = source, threshold
    self.sums = {k: 0.0 for k in binary_seg.METRIC_NAMES}
    self.count = 0.0

  def __call__(self, batch, outputs) -> None:
    valid = np.asarray(batch["valid"]).astype(bool)
    prob = np.asarray(outputs["prob"])[..., 0]
    for r in np.flatnonzero(valid):
      raw = self.source[int(batch["index"][r])]
      gt = np.asarray(raw["mask"], np.float32) / 255.0
      p = data_transforms.resize_bilinear(prob[r][..., None], gt.shape[:2])[..., 0]
      scores = binary_seg.binary_metrics(p[None], gt[None], self.threshold)
      for k in self.sums:
        self.sums[k] += float(scores[k][0])
      self.count += 1

  def results(self, prefix: str) -> dict[str, float]:
    sums = parallel.process_sum(dict(self.sums, count=self.count))
    n = max(float(sums["count"]), 1.0)
    return {f"{prefix}/orig_res/{name}": float(sums[k]) / n
            for k, name in binary_seg.METRIC_NAMES.items()}


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

  method = get_method_class(config.method)(config)
  rng = jax.random.PRNGKey(config.seed)
  example = next(iter(inputs.train))
  global_example = parallel.host_to_global(example, mesh)
  total = train_lib.resolve_steps(config, inputs.num_train)["total"]
  m = train_lib.build_machinery(config, method, mesh, rng, global_example, total)
  state, _, step = ckpt.restore(m.abstract, step=checkpoint)
  logging.info("evaluating %s checkpoint (step %d) of %s", checkpoint, step, workdir)

  out_dir = output_dir or os.path.join(os.path.abspath(workdir), "eval",
                                       f"{checkpoint}_{step}")
  template = next(iter(evals_cfg.values()), {"type": "binary_seg"})
  threshold = float(template.get("threshold", 0.5))
  results: dict[str, float] = {"step": float(step)}

  predict_np, loss_np = train_lib.make_eval_fns(m.compiled, mesh, lambda: state,
                                                with_loss=True)

  for split in splits:
    source = inputs.spec.sources[split]
    callbacks = []
    is_semseg = template.get("type") == "semseg"
    if save_predictions and jax.process_index() == 0:
      if is_semseg:
        callbacks.append(_SemSegPredictionSaver(
            os.path.join(out_dir, split), source, save_predictions,
            _semseg_palette(config, int(template.get("num_classes", 0)))))
      else:
        callbacks.append(_PredictionSaver(
            os.path.join(out_dir, split), source, save_predictions, threshold,
            config.data.get("channel_order", "rgb")))
    if original_resolution and is_semseg:
      raise ValueError("--original_resolution is only for binary_seg evaluators; semseg "
                       "evaluation data are already at their original size")
    orig = _OriginalResolution(source, threshold) if original_resolution else None
    if orig is not None:
      callbacks.append(orig)
    ecfg = dict(template)
    ecfg.pop("on_batch", None)
    ev = evaluators_lib.build(
        ecfg, predict_fn=predict_np,
        batches_fn=lambda s=split: inputs.eval_batches(s), loss_fn=loss_np,
        prefix=split, reduce_fn=parallel.process_sum)
    ev.on_batch = (lambda b, o, cbs=tuple(callbacks): [cb(b, o) for cb in cbs])
    for k, v in ev.run():
      results[k] = float(v)
    if orig is not None:
      results.update(orig.results(split))

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
