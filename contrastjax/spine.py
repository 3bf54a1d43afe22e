"""The shared training machinery: train state, optimizer, the jitted sharded steps.

A method (``contrastjax.methods.base.Method``) supplies its loss and, optionally, a
post-update hook (e.g. an EMA teacher). The spine computes gradients, applies the
optimizer (with per-parameter-group learning rates, frozen groups and the plateau
scale), threads the BatchNorm state, and compiles everything as one ``jax.jit`` with
shardings and donated state. :func:`build_run` assembles one run's pieces from shapes
(``train``, ``evaluate`` and ``benchmark`` all start from it); :class:`CompileAhead`
compiles its steps on background threads; :func:`make_eval_fns` gives evaluators their
host-side prediction and loss functions. Nothing here depends on a particular method.
"""
from __future__ import annotations

import functools
import re
import threading
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from contrastjax import parallel
from contrastjax.errors import ConfigError

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array          # int32 scalar: number of updates done
  params: PyTree           # trainable parameters
  model_state: PyTree      # non-trainable flax collections, e.g. {"batch_stats": ...}
  opt_state: PyTree        # optax state
  plateau: PyTree          # optax.contrib.reduce_on_plateau state (scale etc.)
  extra: PyTree            # method-owned state (EMA teacher, ...)
  rng: jax.Array           # uint32[2] base key; step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------- optimizer
def _param_labels(params: PyTree, groups: list[tuple[str, str]]) -> PyTree:
  """Labels each parameter with the first group whose regex matches its path
  ('/'-joined names); unmatched parameters get the label 'default'."""
  compiled = [(name, re.compile(rx)) for name, rx in groups]

  def label(path, _):
    name = "/".join(str(p) for p in path)
    for group, rx in compiled:
      if rx.search(name):
        return group
    return "default"

  flat = traverse_util.flatten_dict(flax.core.unfreeze(params) if isinstance(
      params, flax.core.FrozenDict) else params)
  return traverse_util.unflatten_dict({k: label(k, v) for k, v in flat.items()})


def learning_rate_schedule(cfg: ml_collections.ConfigDict, base_lr: float,
                           total_steps: int) -> optax.Schedule:
  """``cfg.schedule``: 'constant' | 'warmup_poly' (linear warm-up then poly decay)
  | 'warmup_poly_mmcv' (:func:`mmcv_poly_schedule`) | 'warmup_cosine'."""
  sched = cfg.get("schedule", "constant")
  warmup = int(cfg.get("warmup_steps", 0))
  if sched == "warmup_poly_mmcv":
    return mmcv_poly_schedule(base_lr, total_steps, warmup,
                              power=float(cfg.get("power", 1.0)),
                              min_lr=float(cfg.get("end_lr", 0.0)),
                              warmup_ratio=float(cfg.get("warmup_ratio", 1e-6)))
  if sched == "constant":
    main = optax.constant_schedule(base_lr)
  elif sched == "warmup_poly":
    main = optax.polynomial_schedule(
        init_value=base_lr, end_value=float(cfg.get("end_lr", 0.0)),
        power=float(cfg.get("power", 1.0)), transition_steps=max(total_steps - warmup, 1))
  elif sched == "warmup_cosine":
    main = optax.cosine_decay_schedule(base_lr, max(total_steps - warmup, 1))
  else:
    raise ConfigError(f"config.optimizer.schedule={sched!r}: expected 'constant', "
                     "'warmup_poly', 'warmup_poly_mmcv' or 'warmup_cosine'")
  if warmup:
    warm = optax.linear_schedule(base_lr * float(cfg.get("warmup_init_factor", 0.0)),
                                 base_lr, warmup)
    return optax.join_schedules([warm, main], [warmup])
  return main


def mmcv_poly_schedule(base_lr: float, total_steps: int, warmup_steps: int = 0, *,
                       power: float = 1.0, min_lr: float = 0.0,
                       warmup_ratio: float = 1e-6) -> optax.Schedule:
  """mmcv's ``PolyLrUpdaterHook`` with ``warmup='linear'`` (by iteration).

  At 0-based step ``t``: ``regular = (base_lr - min_lr) * (1 - t / total) ** power + min_lr``
  (the poly decay counts from step 0, not from the end of the warm-up), and during the
  warm-up (``t < warmup_steps``) ``lr = regular * (1 - (1 - t / warmup) * (1 -
  warmup_ratio))``. Unlike ``'warmup_poly'`` the warm-up scales the decayed value, so the
  learning rate at the end of the warm-up is ``regular(warmup)``, not ``base_lr``.
  """
  total = float(max(total_steps, 1))

  def schedule(count):
    t = jnp.minimum(jnp.asarray(count, jnp.float32), total)
    regular = (base_lr - min_lr) * ((total - t) / total) ** power + min_lr
    if not warmup_steps:
      return regular
    # = 1 - (1 - t / warmup) * (1 - ratio), written without the cancellation (float32).
    k = warmup_ratio + (1.0 - warmup_ratio) * (t / float(warmup_steps))
    return jnp.where(t < warmup_steps, regular * k, regular)

  return schedule


def _base_optimizer(cfg: ml_collections.ConfigDict, lr: optax.Schedule,
                    weight_decay: float) -> optax.GradientTransformation:
  name = cfg.get("name", "adam")
  b1, b2, eps = float(cfg.get("b1", 0.9)), float(cfg.get("b2", 0.999)), float(cfg.get("eps", 1e-8))
  if name == "adam":
    tx = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if weight_decay:  # torch Adam's L2 (coupled) weight decay
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx
  if name == "adamw":
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if name == "sgd":
    tx = optax.sgd(lr, momentum=float(cfg.get("momentum", 0.9)) or None,
                   nesterov=bool(cfg.get("nesterov", False)))
    if weight_decay:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx
  raise ConfigError(f"config.optimizer.name={name!r}: expected 'adam', 'adamw' or 'sgd'")


#: Keys of a ``config.optimizer.groups`` entry given as a dict.
GROUP_KEYS = ("regex", "lr_mult", "wd_mult", "frozen", "schedule")
#: Keys a group's ``schedule`` may override (see :func:`learning_rate_schedule`).
SCHEDULE_KEYS = ("schedule", "warmup_steps", "warmup_init_factor", "warmup_ratio", "power",
                 "end_lr")


def parse_groups(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """``config.optimizer.groups`` as dicts with every key of :data:`GROUP_KEYS`.

  An entry is ``(regex, lr_mult, wd_mult)`` or a dict with ``regex`` and any of
  ``lr_mult`` (1), ``wd_mult`` (1), ``frozen`` (False: True gives the group no gradient
  and no optimizer state) and ``schedule`` (a dict overriding the base schedule's keys
  for this group, e.g. ``{'schedule': 'constant'}`` or another ``warmup_steps``).
  """
  out = []
  for i, g in enumerate(cfg.get("groups", ()) or ()):
    where = f"config.optimizer.groups[{i}]"
    if hasattr(g, "to_dict") or isinstance(g, dict):
      g = dict(g.to_dict() if hasattr(g, "to_dict") else g)
      unknown = sorted(set(g) - set(GROUP_KEYS))
      if unknown or "regex" not in g:
        raise ConfigError(f"{where}={g!r}: expected a dict with 'regex' and optionally "
                          f"{list(GROUP_KEYS[1:])}; unknown {unknown}")
      sched = dict(g.get("schedule") or {})
      bad = sorted(set(sched) - set(SCHEDULE_KEYS))
      if bad:
        raise ConfigError(f"{where}.schedule has unknown key(s) {bad}; accepted: "
                          f"{list(SCHEDULE_KEYS)}")
      out.append(dict(regex=str(g["regex"]), lr_mult=float(g.get("lr_mult", 1.0)),
                      wd_mult=float(g.get("wd_mult", 1.0)),
                      frozen=bool(g.get("frozen", False)), schedule=sched))
    else:
      g = tuple(g)
      if len(g) != 3:
        raise ConfigError(f"{where}={g!r}: expected (regex, lr_mult, wd_mult) or a dict "
                          f"with keys {list(GROUP_KEYS)}")
      out.append(dict(regex=str(g[0]), lr_mult=float(g[1]), wd_mult=float(g[2]),
                      frozen=False, schedule={}))
  return out


def _group_names(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
  return [(f"group{i}:{g['regex']}", g["regex"]) for i, g in enumerate(groups)]


def frozen_mask(cfg: ml_collections.ConfigDict, params: PyTree) -> PyTree | None:
  """A pytree of bools like ``params``: True for parameters of a ``frozen`` group; None
  when no group is frozen (the train step is then exactly the plain one)."""
  groups = parse_groups(cfg)
  frozen = {name for (name, _), g in zip(_group_names(groups), groups) if g["frozen"]}
  if not frozen:
    return None
  labels = _param_labels(params, _group_names(groups))
  return jax.tree.map(lambda label: label in frozen, labels)


def make_optimizer(cfg: ml_collections.ConfigDict, params: PyTree,
                   total_steps: int) -> optax.GradientTransformation:
  """Builds the optimizer from ``config.optimizer``.

  Keys: ``name``, ``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay``, ``schedule``,
  ``warmup_steps``, ``power``, ``grad_clip_norm`` and ``groups`` (:func:`parse_groups`):
  matched in order against '/'-joined parameter paths, each with its learning-rate and
  weight-decay multipliers (e.g. SiamSeg's head x10 and no weight decay on norms), an
  optional schedule of its own, or frozen (``optax.set_to_zero``: no update and no
  optimizer state; the train step does not differentiate them either).
  """
  base_lr = float(cfg.lr)
  wd = float(cfg.get("weight_decay", 0.0))
  groups = parse_groups(cfg)
  if not groups:
    tx = _base_optimizer(cfg, learning_rate_schedule(cfg, base_lr, total_steps), wd)
  else:
    transforms, names = {}, _group_names(groups)
    for (name, _), g in zip(names, groups):
      if g["frozen"]:
        transforms[name] = optax.set_to_zero()
        continue
      sched_cfg = cfg
      if g["schedule"]:
        sched_cfg = ml_collections.ConfigDict(dict(cfg.to_dict(), **g["schedule"]))
      transforms[name] = _base_optimizer(
          cfg, learning_rate_schedule(sched_cfg, base_lr * g["lr_mult"], total_steps),
          wd * g["wd_mult"])
    transforms["default"] = _base_optimizer(
        cfg, learning_rate_schedule(cfg, base_lr, total_steps), wd)
    tx = optax.multi_transform(transforms, _param_labels(params, names))
  clip = cfg.get("grad_clip_norm", None)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  return tx


def make_plateau(cfg: ml_collections.ConfigDict | None) -> optax.GradientTransformationExtraArgs:
  """``optax.contrib.reduce_on_plateau`` from ``config.plateau``, with PyTorch's
  ``ReduceLROnPlateau`` meaning of ``patience`` (torch reduces once the number of bad
  epochs *exceeds* patience; optax once it *equals* it, hence the +1)."""
  cfg = cfg or ml_collections.ConfigDict()
  return optax.contrib.reduce_on_plateau(
      factor=float(cfg.get("factor", 0.1)),
      patience=int(cfg.get("patience", 10)) + 1,
      rtol=float(cfg.get("rtol", 1e-4)),
      atol=float(cfg.get("atol", 0.0)),
      cooldown=int(cfg.get("cooldown", 0)),
      min_scale=float(cfg.get("min_scale", 0.0)))


# ----------------------------------------------------------------------------- state
def init_key(rng: jax.Array) -> jax.Array:
  """The key parameter initialisers draw from: an RBG key derived from ``rng``.

  Flax draws every parameter from its own key; with threefry that is hundreds of
  unrolled hash networks for XLA to compile (~40 s of the demo model's start-up on
  CPU), with RBG about a third less. Initial values only need to be good random
  numbers, not sharding-invariant ones; training-step randomness stays threefry.
  """
  return jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")


def create_train_state(method, tx, plateau_tx, rng: jax.Array, batch: PyTree) -> TrainState:
  """Initialises the train state (traceable: used under ``jax.jit`` and ``eval_shape``)."""
  init_rng, state_rng = jax.random.split(rng)
  params, model_state, extra = method.init(init_key(init_rng), batch)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
      opt_state=tx.init(params), plateau=plateau_tx.init(params), extra=extra,
      rng=state_rng)


def initialise_state(create: Callable, state_sharding: PyTree, rng: jax.Array,
                     batch: PyTree) -> TrainState:
  """Runs the (jitted) state initialiser ``create(rng, batch)`` with its shardings.

  On CPU the initialiser is compiled at XLA backend optimisation level 0: it runs once,
  and its program is mostly unrolled random-number generation (one key derivation per
  parameter), which LLVM's optimisation passes spend ~25% longer on than the program
  saves in run time (15.7 s vs 20.5 s of compilation for the demo ConDSeg).
  """
  lowered = jax.jit(create, out_shardings=state_sharding).lower(rng, batch)
  options = ({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
             else None)
  return lowered.compile(compiler_options=options)(rng, batch)


def _tree_norm(tree: PyTree) -> jax.Array:
  return optax.tree.norm(tree)


@jax.jit
def tree_all_finite(tree: PyTree) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is free of NaN and Inf."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def state_is_finite(state: TrainState) -> bool:
  """The trainer's check before writing a checkpoint and after restoring one: the
  parameters, BatchNorm state, optimizer state and method state hold no NaN/Inf. (The
  plateau state is left out: its best value starts at +Inf.)"""
  return bool(tree_all_finite((state.params, state.model_state, state.opt_state,
                               state.extra)))


def make_train_step(method, tx: optax.GradientTransformation,
                    frozen: PyTree | None = None) -> Callable:
  """Returns ``train_step(state, batch) -> (state, metrics)`` (not yet jitted).

  ``frozen``: :func:`frozen_mask`; the method does not differentiate those parameters
  (``Method.value_and_grad``), so no backward pass is built for them.
  """
  extra_kwargs = {} if frozen is None else {"frozen": frozen}

  def train_step(state: TrainState, batch: PyTree):
    rng = jax.random.fold_in(state.rng, state.step)

    (loss, (model_state, metrics)), grads = method.value_and_grad(
        state.params, state.model_state, state.extra, batch, rng, state.step,
        **extra_kwargs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    params = method.project_params(step, params)  # e.g. CLIP's logit-scale clamp
    extra = method.post_update(step, params, state.extra)
    new_state = state.replace(step=step, params=params, model_state=model_state,
                              opt_state=opt_state, extra=extra)
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = _tree_norm(grads)
    metrics["param_norm"] = _tree_norm(params)
    metrics["lr_scale"] = scale
    return new_state, metrics

  return train_step


def plateau_update(plateau_tx, plateau_state, value: float):
  """Feeds one monitored value (e.g. an epoch's validation loss) to the plateau state."""
  _, new_state = plateau_tx.update(updates={}, state=plateau_state, params=None,
                                   value=jnp.asarray(value, jnp.float32))
  return new_state


class CompiledSteps:
  """The jitted, sharded train / predict / eval-loss functions of one run."""

  def __init__(self, method, tx, mesh: jax.sharding.Mesh, state_sharding: PyTree,
               frozen: PyTree | None = None):
    self.mesh = mesh
    data_sh = parallel.data_sharding(mesh)
    repl = parallel.replicated(mesh)
    self.train_step = jax.jit(
        make_train_step(method, tx, frozen),
        in_shardings=(state_sharding, data_sh),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,))

    def predict(state: TrainState, batch):
      return method.predict(state.params, state.model_state, state.extra, batch)

    def eval_step(state: TrainState, batch):
      outputs = method.predict(state.params, state.model_state, state.extra, batch)
      loss = method.eval_loss(state.params, state.model_state, state.extra, batch)
      return outputs, loss

    self.predict = jax.jit(predict, in_shardings=(state_sharding, data_sh),
                           out_shardings=data_sh)
    # Predictions and the validation loss in one program: one compilation, and XLA
    # shares the forward pass when the method's loss reuses it.
    self.eval_step = jax.jit(eval_step, in_shardings=(state_sharding, data_sh),
                             out_shardings=(data_sh, repl))


def state_shardings(abstract_state: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Sharding rule for the train state: replicate everything (data parallelism).

  This is the one place to add an FSDP / model-axis rule later.
  """
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda _: repl, abstract_state)


# ----------------------------------------------------------------------------- the compiled run
class CompiledRun(NamedTuple):
  """Everything of one run that is built from shapes: optimizer, state constructor,
  abstract state with shardings (the restore target) and the compiled steps."""
  tx: optax.GradientTransformation
  plateau_tx: Any
  create: Callable          # (rng, batch) -> TrainState, traceable
  abstract: PyTree          # abstract TrainState with shardings
  state_sharding: PyTree
  compiled: "CompiledSteps"


def build_run(config: ml_collections.ConfigDict, method, mesh, rng, global_example,
              total_steps: int) -> CompiledRun:
  """Optimizer, state constructor, abstract state with shardings, compiled steps."""
  params_shape = jax.eval_shape(lambda r, b: method.init(r, b)[0], rng, global_example)
  tx = make_optimizer(config.optimizer, params_shape, total_steps)
  plateau_tx = make_plateau(config.get("plateau"))
  create = functools.partial(create_train_state, method, tx, plateau_tx)
  abstract = jax.eval_shape(create, rng, global_example)
  state_sharding = state_shardings(abstract, mesh)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
      state_sharding)
  compiled = CompiledSteps(method, tx, mesh, state_sharding,
                           frozen_mask(config.optimizer, params_shape))
  return CompiledRun(tx, plateau_tx, create, abstract, state_sharding, compiled)


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


def make_eval_fns(compiled: CompiledSteps, mesh, get_state, *, with_loss: bool):
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
