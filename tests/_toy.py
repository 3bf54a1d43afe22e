"""A tiny but real method and dataset for spine tests (conv + BatchNorm segmenter)."""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastjax import evaluators
from contrastjax.data.builder import DataSpec
from contrastjax.methods.base import Method


class ToyModel(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    return nn.Conv(1, (1, 1))(x)


class ToyMethod(Method):
  name = "toy"

  def __init__(self, config, run=None):
    super().__init__(config, run)
    self.model = ToyModel(width=config.get("toy_width", 8))
    self.nan_at_step = int(config.get("toy_nan_at_step", -1))
    # Seconds each train step waits on the host: widens the windows kill tests aim at.
    self.step_sleep = float(config.get("toy_step_sleep", 0.0))
    # Keeps the step count in ``extra`` and returns it from ``predict`` (as ``step``), for
    # ScriptedEvaluator: evaluation results chosen by the test, step by step.
    self.track_step = bool(config.get("toy_track_step", False))

  def init(self, rng, batch):
    v = self.model.init(rng, batch["image"], train=False)
    extra = {"step": jnp.zeros((), jnp.int32)} if self.track_step else {}
    return v["params"], {"batch_stats": v["batch_stats"]}, extra

  def post_update(self, step, params, extra):
    if self.track_step:
      return dict(extra, step=jnp.asarray(step, jnp.int32))
    return extra

  def loss_fn(self, params, model_state, extra, batch, rng, step):
    # Input noise drawn from the step key: exercises RNG determinism and sharding.
    x = batch["image"] + 0.05 * jax.random.normal(rng, batch["image"].shape)
    logits, new_state = self.model.apply({"params": params, **model_state}, x,
                                         train=True, mutable=["batch_stats"])
    loss = optax.sigmoid_binary_cross_entropy(logits, batch["mask"]).mean()
    loss = jnp.where(step + 1 == self.nan_at_step, jnp.nan, loss)
    if self.step_sleep > 0:
      sleep = self.step_sleep
      loss = loss + jax.pure_callback(
          lambda s: (time.sleep(sleep), np.zeros((), np.float32))[1],
          jax.ShapeDtypeStruct((), jnp.float32), step)
    return loss, (new_state, {"bce": loss})

  def predict(self, params, model_state, extra, batch):
    logits = self.model.apply({"params": params, **model_state}, batch["image"],
                              train=False)
    out = {"prob": jax.nn.sigmoid(logits)}
    if self.track_step:
      out["step"] = jnp.broadcast_to(extra["step"], logits.shape[:1])
    return out

  def eval_loss(self, params, model_state, extra, batch):
    logits = self.model.apply({"params": params, **model_state}, batch["image"],
                              train=False)
    per = optax.sigmoid_binary_cross_entropy(logits, batch["mask"]).mean((1, 2, 3))
    w = batch["valid"].astype(per.dtype)
    return (per * w).sum() / jnp.maximum(w.sum(), 1.0)


class ToySource:
  """Bright squares on noise; the mask is the square."""

  def __init__(self, n: int, size: int, seed: int):
    self.n, self.size, self.seed = n, size, seed

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng((self.seed, i))
    s = self.size
    img = rng.uniform(0, 0.5, (s, s, 3)).astype(np.float32)
    mask = np.zeros((s, s, 1), np.float32)
    a, b = rng.integers(0, s // 2, 2)
    w = rng.integers(2, s // 2)
    mask[a:a + w, b:b + w] = 1.0
    img += 0.4 * mask
    return {"image": img, "mask": mask}


class ScriptedEvaluator:
  """An evaluator (``type='toy_scripted'``) whose metric ``<prefix>/<name>`` at step ``s``
  is ``values[s]``: early stopping and best checkpoints on a sequence the test chooses.
  Needs ``toy_track_step=True`` (the step comes from the state being evaluated, so a
  resumed run sees the same sequence)."""

  on_batch = None  # the pre-3e42297 trainer's sample-picture hook (never called here)

  def __init__(self, predict_fn, batches_fn, *, prefix, loss_fn=None, reduce_fn=None,
               values=(), name="score"):
    del loss_fn, reduce_fn
    self.predict_fn, self.batches_fn = predict_fn, batches_fn
    self.prefix, self.values, self.name = prefix, tuple(values), name

  def run(self):
    out = self.predict_fn(next(iter(self.batches_fn())))
    step = int(np.asarray(out["step"]).reshape(-1)[0])
    yield f"{self.prefix}/{self.name}", float(self.values[step])


evaluators.register("toy_scripted", "_toy:ScriptedEvaluator")


def toy_data(dcfg, seed: int) -> DataSpec:
  n, size = int(dcfg.get("num_train", 32)), int(dcfg.get("image_size", 8))
  return DataSpec(
      sources={"train": ToySource(n, size, seed),
               "val": ToySource(int(dcfg.get("num_val", 10)), size, seed + 1)},
      train_transforms=[], eval_transforms=[])


def toy_config(**overrides):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.method = "_toy:ToyMethod"
  c.seed = 0
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 12
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.ckpt_every_steps = 3
  c.keep_checkpoints = 10
  c.async_checkpointing = False
  c.progress_bar = False
  c.plot_curves = False
  c.best_metric = "val/mIoU"
  c.best_mode = "max"
  c.early_stop_patience = 0
  c.toy_width = 8
  c.toy_nan_at_step = -1
  c.toy_step_sleep = 0.0
  c.tensorboard = True
  c.optimizer = ml_collections.ConfigDict(dict(name="adam", lr=1e-2))
  c.plateau = ml_collections.ConfigDict(dict(monitor="val/loss", factor=0.5, patience=1))
  c.data = ml_collections.ConfigDict(dict(name="_toy:toy_data", num_train=32, num_val=10,
                                          image_size=8, worker_count=0))
  c.evals = ml_collections.ConfigDict(dict(val=dict(type="binary_seg", split="val")))
  for k, v in overrides.items():
    c[k] = v
  return c


def run_steps(method, config, mesh, batch_np, n: int = 2, initial=None):
  """Initialises ``method`` through the real spine on ``mesh`` and runs ``n`` jitted
  train steps on the same global batch; returns host copies of (state, last metrics).

  ``initial``: a host train state to start from instead (e.g. another mesh's
  :func:`initial_state`): the runs then start from the same values, and the jitted
  initialisation is compiled once, not per mesh (close to a minute for the larger
  models on 2 cores)."""
  from contrastjax import parallel  # pylint: disable=g-import-not-at-top
  from contrastjax import spine  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global(batch_np, mesh)
    rng = jax.random.PRNGKey(0)
    m = spine.build_run(config, method, mesh, rng, gb, total_steps=10)
    if initial is None:
      state = jax.jit(m.create, out_shardings=m.state_sharding)(rng, gb)
    else:
      state = jax.device_put(initial, m.state_sharding)
    metrics = {}
    for _ in range(n):
      state, metrics = m.compiled.train_step(state, gb)
    return jax.device_get(state), jax.device_get(metrics)


def initial_state(method, config, mesh, batch_np):
  """The host copy of the train state that :func:`run_steps` starts from on ``mesh``."""
  return run_steps(method, config, mesh, batch_np, n=0)[0]
