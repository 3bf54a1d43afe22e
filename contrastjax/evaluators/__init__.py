"""Evaluators: small classes whose ``run()`` yields ``(name, value)`` pairs.

Built from ``config.evals.<name>`` dicts: ``type`` picks the class, ``split`` the data
split, ``prefix`` the metric prefix (default: the eval's name), ``with_loss`` whether the
method's eval loss is computed too, ``every_steps`` a sparser cadence of its own; the
remaining keys go to the class's constructor.

The contract, for a new evaluator type (register it with :func:`register`):

* ``__init__(predict_fn, batches_fn, *, prefix, loss_fn, reduce_fn, **options)``:
  ``predict_fn(batch) -> dict of host arrays`` (the method's ``predict``), ``batches_fn()``
  a fresh iterator of padded local batches with ``valid``, ``reduce_fn`` the cross-process
  sum of a dict of numbers;
* ``run() -> Iterator[(metric name, float)]``;
* ``loss_fn(batch)`` is the loss of the *global* batch, the same number on every process:
  count it with :func:`counts_batch_loss`, so that the cross-process sum counts it once;
* optionally ``pictures() -> {tag: uint8 image}`` after ``run()`` (TensorBoard and
  ``<workdir>/samples/``), and a class attribute ``pipeline_batches = True`` when ``run()``
  hands the pipeline's batches to ``predict_fn`` unchanged (the trainer then compiles the
  evaluation step ahead);
* options named ``class_names``, ``palette``, ``ignore_index``, ``display``, ``save_dir``,
  ``names`` receive the dataset's values unless the config sets them (see :func:`build`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import jax
import numpy as np

from contrastjax.errors import ConfigError

_REGISTRY = {
    "binary_seg": "contrastjax.evaluators.binary_seg:BinarySegEvaluator",
    "semseg": "contrastjax.evaluators.semseg:SemSegEvaluator",
    "retrieval": "contrastjax.evaluators.retrieval:RetrievalEvaluator",
    "zeroshot": "contrastjax.evaluators.retrieval:ZeroShotEvaluator",
    "linear_probe": "contrastjax.evaluators.linear_probe:LinearProbeEvaluator",
}
# Keys of an eval config consumed by the trainer, not passed to the evaluator.
_GENERIC_KEYS = ("type", "split", "prefix", "with_loss", "every_steps")


def counts_batch_loss(valid) -> bool:
  """Whether this process adds the batch's loss to its ``loss_sum``/``loss_batches``.

  The evaluation loss is the loss of the global batch (one compiled step over every
  process's rows), so each process holds the same value; summed over processes it would
  count ``process_count`` times, and batches whose valid rows sit on fewer processes (the
  last one) would weigh less. Process 0 counts it, if the global batch has a valid row:
  ``eval_batches`` gives process 0 the first rows of every global batch, so its local
  ``valid.any()`` is the global one. On one process: ``valid.any()``, as before."""
  return jax.process_index() == 0 and bool(np.asarray(valid).any())


def register(name: str, target: str) -> None:
  _REGISTRY[name] = target


def get_class(etype: str) -> type:
  """The evaluator class registered as ``etype``."""
  if etype not in _REGISTRY:
    raise ConfigError(f"evaluator type {etype!r} is not known; expected one of "
                      f"{sorted(_REGISTRY)}")
  module, cls = _REGISTRY[etype].split(":")
  return getattr(importlib.import_module(module), cls)


def build(ecfg, *, predict_fn: Callable, batches_fn: Callable, loss_fn=None,
          prefix: str = "val", reduce_fn=None, **context):
  """The evaluator of ``config.evals.<name>`` (``ecfg``).

  ``context``: what the run knows about the data, passed to the evaluators whose
  constructor takes it (e.g. ``class_names``, ``palette``, ``ignore_index`` from
  ``DataSpec.info``; ``display`` to draw a model input; ``save_dir``, ``names`` from
  ``contrastjax.evaluate``). Keys the config sets win over the context.
  """
  cls = get_class(ecfg.get("type", None))
  kwargs = {k: v for k, v in dict(ecfg).items() if k not in _GENERIC_KEYS}
  accepted = inspect.signature(cls.__init__).parameters
  for k, v in context.items():
    if k in accepted and k not in kwargs and v is not None:
      kwargs[k] = v
  return cls(predict_fn, batches_fn, prefix=prefix, loss_fn=loss_fn, reduce_fn=reduce_fn,
             **kwargs)


def accepts(ecfg, option: str) -> bool:
  """Whether the evaluator type of ``ecfg`` has the constructor option ``option``."""
  cls = get_class(ecfg.get("type", None))
  return option in inspect.signature(cls.__init__).parameters


def pipeline_batches(ecfg) -> bool:
  """True when the evaluator hands the pipeline's batches to ``predict_fn`` unchanged
  (class attribute ``pipeline_batches``): its step can be compiled ahead."""
  return bool(getattr(get_class(ecfg.get("type", None)), "pipeline_batches", False))
