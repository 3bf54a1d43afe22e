"""The contract between a training method and the shared spine.

A method says *what* is optimised (its losses, its model, any extra state such as an
EMA teacher); the spine (``contrastjax.spine``) says *how*: gradients, the optimizer
update, the learning-rate plateau scale, sharding, jit, donation, checkpoints.

Batches are dicts of arrays whose leading axis is the global batch; every leaf is
sharded along that axis over the mesh's ``data`` axis. A method with two input
streams (e.g. SiamSeg's source and target) simply nests them:
``{"source": {...}, "target": {...}}``.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from contrastjax.errors import ConfigError

PyTree = Any
Metrics = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """The resolved facts of a run a method may need (schedule horizons, warm-ups in
  epochs): computed once by the trainer from the config and the data, so that a method
  never re-reads ``config.total_steps`` (which is unset when the config counts epochs)."""
  total_steps: int
  steps_per_epoch: int
  global_batch_size: int
  num_train: int


def plain_config(value: Any) -> Any:
  """A ConfigDict / list config value as plain Python (dicts, tuples)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, list):
    return tuple(value)
  return value


def module_kwargs(cls: type, cfg: Any, where: str, skip: Sequence[str] = ()
                  ) -> dict[str, Any]:
  """The config dict ``cfg`` (found at ``where``, e.g. ``'config.model'``) as keyword
  arguments of the flax module (dataclass) ``cls``.

  Values become plain Python (lists -> tuples) and a ``dtype`` string a NumPy dtype;
  keys in ``skip`` are left out.

  Raises:
    ValueError: a key that is not a field of ``cls``, naming it and the valid fields.
  """
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  out = {}
  for key, value in dict(plain_config(cfg) or {}).items():
    if key in skip:
      continue
    if key not in fields:
      raise ConfigError(f"{where}.{key} is not a field of {cls.__name__}; "
                       f"valid fields: {sorted(fields)}")
    value = plain_config(value)
    if key == "dtype" and isinstance(value, str):
      value = jnp.dtype(value)
    out[key] = value
  return out


def value_and_grad_except(loss, params: PyTree, frozen: PyTree | None):
  """``jax.value_and_grad(loss, has_aux=True)(params)``, differentiating only the leaves
  whose ``frozen`` flag is False; frozen leaves enter ``loss`` as constants and get
  zero gradients."""
  if frozen is None:
    return jax.value_and_grad(loss, has_aux=True)(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = treedef.flatten_up_to(frozen)
  trainable = [x for x, f in zip(leaves, flags) if not f]

  def merged(trainable_leaves):
    it = iter(trainable_leaves)
    return treedef.unflatten([x if f else next(it) for x, f in zip(leaves, flags)])

  out, g = jax.value_and_grad(lambda t: loss(merged(t)), has_aux=True)(trainable)
  it = iter(g)
  grads = treedef.unflatten([jnp.zeros_like(x) if f else next(it)
                             for x, f in zip(leaves, flags)])
  return out, grads


#: One term of a loss that is a sum of terms with separate forward passes:
#: ``term(params, model_state, after) -> (value, new_model_state, metrics)``. ``after`` is a
#: float32 scalar zero that the term must add to every input it reads (images, also those of
#: passes it does not differentiate, e.g. a teacher's): :func:`value_and_grad_by_term` makes
#: it depend on the previous term's gradient, so that the term's passes run after it.
LossTerm = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, PyTree, Metrics]]


def zero_after(tree: PyTree) -> jax.Array:
  """A float32 zero that XLA can compute only once every leaf of ``tree`` exists.

  Added to the next pass's inputs it orders that pass after ``tree`` (e.g. the previous
  gradient), so the previous pass's activations are dead before the next pass's are made.
  (An ``optimization_barrier`` does not survive to XLA's scheduler on every backend:
  XLA:CPU removes it before scheduling.) NaN or Inf in ``tree`` make it NaN: a step with
  such a gradient diverged anyway and the spine rejects it.
  """
  total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree))
  return jax.lax.stop_gradient(total * 0.0)


def loss_of_terms(terms: Sequence[LossTerm], params: PyTree, model_state: PyTree
                  ) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
  """``(loss, (model_state, metrics))`` of a loss that is the sum of ``terms``.

  The terms run in order, each on the model state the previous one returned
  (``after = 0``); the loss is ``((0 + v_1) + v_2) + ...``, the metrics the union of the
  terms' (a later term's key wins). Differentiating it takes one gradient of the sum
  (all passes' activations live at once); :func:`value_and_grad_by_term` gives the same
  numbers term by term.
  """
  state, loss, metrics = model_state, 0.0, {}
  for term in terms:
    value, state, m = term(params, state, jnp.zeros((), jnp.float32))
    loss = loss + value
    metrics.update(m)
  return loss, (state, metrics)


def value_and_grad_by_term(terms: Sequence[LossTerm], params: PyTree, model_state: PyTree
                           ) -> tuple[tuple[jax.Array, tuple[PyTree, Metrics]], PyTree]:
  """``jax.value_and_grad`` of :func:`loss_of_terms` taken term by term.

  One ``value_and_grad`` per term, the gradients summed in term order
  (``(g_1 + g_2) + ...``); each term's ``after`` is :func:`zero_after` of the gradient
  summed so far (0 for the first), so XLA runs a term's forward pass only once the
  previous term's backward pass is done and holds one term's activations at a time
  (each loss back-propagated before the next forward pass, as PyTorch training loops
  that call ``backward()`` per loss do). The value, model state and metrics are those
  of :func:`loss_of_terms`; the gradient equals its gradient up to float summation
  order.

  Returns:
    ``((loss, (model_state, metrics)), grads)``, as
    ``jax.value_and_grad(..., has_aux=True)`` of :func:`loss_of_terms`.
  """
  state, loss, metrics, grads = model_state, 0.0, {}, None
  after = jnp.zeros((), jnp.float32)
  for term in terms:
    if grads is not None:
      after = zero_after(grads)

    def f(p, state=state, term=term, after=after):
      value, new_state, m = term(p, state, after)
      return value, (new_state, m)

    (value, (state, m)), g = jax.value_and_grad(f, has_aux=True)(params)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    loss = loss + value
    metrics.update(m)
  return (loss, (state, metrics)), grads


class Method(abc.ABC):
  """Base class of a method on the spine.

  Subclasses are plain Python objects built from the config; everything they return
  from the methods below must be jit-traceable (no Python side effects on values).
  """

  #: Name used in configs (``config.method``).
  name: str = ""

  def __init__(self, config, run: RunInfo | None = None):
    """``config``: the run's config (a method reads its own section, e.g.
    ``config.condseg``); ``run``: the resolved step counts (None where a method is built
    without data, e.g. for shapes; a method that needs them raises then)."""
    self.config = config
    self.run = run

  def require_run(self, what: str) -> RunInfo:
    """``self.run``, or a ConfigError naming what needed it."""
    if self.run is None:
      raise ConfigError(f"method {self.name!r} needs the run's step counts for {what}; "
                        "build it with its RunInfo (the trainer does)")
    return self.run

  # ---------------------------------------------------------------- set-up
  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: PyTree) -> tuple[PyTree, PyTree, PyTree]:
    """Returns ``(params, model_state, extra)`` for an example (global) batch.

    Must be traceable (it runs under ``jax.jit``/``jax.eval_shape``): no file I/O here;
    pretrained weights go through ``load_pretrained``.

    ``model_state`` holds the non-trainable flax collections (e.g.
    ``{"batch_stats": ...}``); ``extra`` is any method-owned pytree (an EMA teacher's
    parameters, a queue, ...), ``{}`` when unused.
    """

  def load_pretrained(self, params: PyTree, model_state: PyTree, extra: PyTree
                      ) -> tuple[PyTree, PyTree, PyTree]:
    """Host-side hook run once on a fresh start (never on resume): import pretrained
    weights or another run's checkpoint into the freshly initialised trees (numpy or
    jax arrays in, arrays of the same shapes out). Default: unchanged."""
    return params, model_state, extra

  # ---------------------------------------------------------------- training
  @abc.abstractmethod
  def loss_fn(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree, rng: jax.Array, step: jax.Array
              ) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
    """Training loss. Returns ``(loss, (new_model_state, metrics))``.

    ``metrics`` are scalars averaged over the global batch (they are logged as
    ``train/<name>``); ``loss`` is differentiated with respect to ``params``.
    """

  def value_and_grad(self, params: PyTree, model_state: PyTree, extra: PyTree,
                     batch: PyTree, rng: jax.Array, step: jax.Array,
                     frozen: PyTree | None = None
                     ) -> tuple[tuple[jax.Array, tuple[PyTree, Metrics]], PyTree]:
    """``((loss, (new_model_state, metrics)), grads)`` of :meth:`loss_fn` w.r.t. ``params``.

    The spine's train step calls this. Default: one ``jax.value_and_grad`` of the whole
    loss. A method whose loss is a sum of terms with separate forward passes may override it
    to differentiate term by term (the same gradient, a lower peak of live activations;
    :func:`value_and_grad_by_term`).

    ``frozen``: None, or a pytree of bools like ``params`` (the optimizer's frozen
    groups): those parameters are not differentiated (no backward pass is built for
    them) and get zero gradients. An override must honour it or refuse it.
    """
    def loss(p):
      return self.loss_fn(p, model_state, extra, batch, rng, step)
    return value_and_grad_except(loss, params, frozen)

  def project_params(self, step: jax.Array, params: PyTree) -> PyTree:
    """Runs right after the optimizer update inside the jitted step (``step`` counts the
    updates done, the new one included); returns the parameters to keep, e.g. CLIP's
    clamp of the logit scale. Default: unchanged (adds no operation to the step)."""
    del step
    return params

  def post_update(self, step: jax.Array, params: PyTree, extra: PyTree) -> PyTree:
    """Runs after the optimizer update inside the jitted step; returns the new
    ``extra`` (e.g. an EMA teacher update). Default: unchanged."""
    del step, params
    return extra

  # ---------------------------------------------------------------- evaluation
  @abc.abstractmethod
  def predict(self, params: PyTree, model_state: PyTree, extra: PyTree,
              batch: PyTree) -> dict[str, jax.Array]:
    """Eval-mode forward pass; returns per-example outputs (leading batch axis)."""

  def eval_loss(self, params: PyTree, model_state: PyTree, extra: PyTree,
                batch: PyTree) -> jax.Array:
    """Eval-mode loss of one padded batch (``batch["valid"]`` marks real examples).

    Used for validation-loss driven schedules (ReduceLROnPlateau). A method without
    an eval-mode loss keeps this default, which tells the user which switch to turn
    off (an evaluation asked for a loss the method cannot compute).
    """
    del params, model_state, extra, batch
    raise ValueError(
        f"method {self.name!r} has no eval-mode loss: set "
        f"config.evals.<name>.with_loss=False for its evaluations (and leave "
        f"config.plateau.monitor off '<split>/loss')")
