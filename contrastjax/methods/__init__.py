"""Training methods. Each module defines a ``Method`` subclass; look them up by name."""
from __future__ import annotations

import importlib

from contrastjax.errors import ConfigError

# config.method -> "module:Class"
_REGISTRY = {
    "condseg_stage1": "contrastjax.methods.condseg:ConDSegStage1Method",
    "condseg": "contrastjax.methods.condseg:ConDSegMethod",
    "clip": "contrastjax.methods.clip:CLIPMethod",
    "siamseg": "contrastjax.methods.siamseg:SiamSegMethod",
    "apc": "contrastjax.methods.apc:APCMethod",
}


def register(name: str, target: str) -> None:
  """Registers ``name`` -> ``"module:Class"`` (for methods living outside this package)."""
  _REGISTRY[name] = target


def get_method_class(name: str):
  """Looks up ``config.method``: a registered name or a ``"module:Class"`` path."""
  if ":" in name and name not in _REGISTRY:
    module, cls = name.split(":")
    return getattr(importlib.import_module(module), cls)
  if name not in _REGISTRY:
    raise ConfigError(
        f"config.method={name!r} is not a known method; expected one of "
        f"{sorted(_REGISTRY)}")
  module, cls = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def build(config, run=None):
  """The method named by ``config.method``, built with the run's resolved facts
  (:class:`~contrastjax.methods.base.RunInfo`; None where only shapes are needed)."""
  return get_method_class(config.method)(config, run)
