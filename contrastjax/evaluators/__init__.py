"""Evaluators: small classes whose ``run()`` yields ``(name, value)`` pairs.

Built from ``config.evals.<name>`` dicts: ``type`` picks the class, ``split`` the data
split, ``prefix`` the metric prefix (default: the eval's name); the remaining keys go
to the class's constructor.
"""
from __future__ import annotations

import importlib
from typing import Callable

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


def register(name: str, target: str) -> None:
  _REGISTRY[name] = target


def build(ecfg, *, predict_fn: Callable, batches_fn: Callable, loss_fn=None,
          prefix: str = "val", reduce_fn=None):
  etype = ecfg.get("type", None)
  if etype not in _REGISTRY:
    raise ConfigError(f"evaluator type {etype!r} is not known; expected one of "
                     f"{sorted(_REGISTRY)}")
  module, cls = _REGISTRY[etype].split(":")
  kwargs = {k: v for k, v in dict(ecfg).items() if k not in _GENERIC_KEYS}
  return getattr(importlib.import_module(module), cls)(
      predict_fn, batches_fn, prefix=prefix, loss_fn=loss_fn, reduce_fn=reduce_fn,
      **kwargs)
