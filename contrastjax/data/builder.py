"""From ``config.data`` to the trainer's inputs: sources, transforms, grain pipelines.

``config.data.name`` names a dataset maker (registered below, or a ``"module:function"``
path); a maker returns a ``DataSpec``: the random-access sources per split and the
per-example transforms for training and evaluation. The builder wraps them in the
shared grain pipelines (``contrastjax.data.pipeline``): per-process sharding, seeded
shuffling, batching, prefetching and checkpointable iterator state.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections

from contrastjax.data import pipeline
from contrastjax.data.errors import DatasetError
from contrastjax.errors import ConfigError


@dataclasses.dataclass
class DataSpec:
  """What a dataset maker returns."""
  sources: Mapping[str, Any]            # split name -> random-access source
  train_transforms: Sequence[Any]       # grain transforms for training examples
  eval_transforms: Sequence[Any]        # grain transforms for evaluation examples


@dataclasses.dataclass
class Inputs:
  """What the trainer consumes."""
  spec: DataSpec
  train: Any                            # grain IterDataset of local train batches
  num_train: int
  eval_batches: Callable[[str], Iterator[dict]]


_MAKERS = {
    "synthetic_polyps": "contrastjax.data.tasks.binary_seg:synthetic_polyps",
    "medseg": "contrastjax.data.tasks.binary_seg:medseg",
    "loveda": "contrastjax.data.tasks.uda:loveda",
    "isprs": "contrastjax.data.tasks.uda:isprs",
    "synthetic_aerial": "contrastjax.data.tasks.uda:synthetic_aerial",
    "synthetic_pairs": "contrastjax.data.tasks.clip:synthetic_pairs",
    "coco_captions": "contrastjax.data.tasks.clip:coco_captions",
}


def register(name: str, target: str) -> None:
  """Registers a dataset maker ``name`` -> ``"module:function"``."""
  _MAKERS[name] = target


def get_maker(name: str) -> Callable[..., DataSpec]:
  target = _MAKERS.get(name, name if ":" in name else None)
  if target is None:
    raise ConfigError(f"config.data.name={name!r} is not a known dataset; expected one "
                     f"of {sorted(_MAKERS)} or a 'module:function' path")
  module, fn = target.split(":")
  return getattr(importlib.import_module(module), fn)


def make_spec(config: ml_collections.ConfigDict, workdir: str | None = None) -> DataSpec:
  """Calls the maker; a maker with a ``workdir`` parameter also gets the run's workdir
  (e.g. to save/reload a tokenizer built from the training data)."""
  maker = get_maker(config.data.name)
  kwargs = {}
  if workdir is not None and "workdir" in inspect.signature(maker).parameters:
    kwargs["workdir"] = workdir
  return maker(config.data, seed=int(config.seed), **kwargs)


def build(config: ml_collections.ConfigDict, *, local_batch_size: int,
          local_eval_batch_size: int, workdir: str | None = None) -> Inputs:
  """Builds the train pipeline and the evaluation batch factories."""
  spec = make_spec(config, workdir)
  dcfg = config.data
  train_split = dcfg.get("train_split", "train")
  if train_split not in spec.sources:
    raise ConfigError(f"config.data.train_split={train_split!r}: dataset "
                     f"{dcfg.name!r} has splits {sorted(spec.sources)}")
  train_source = spec.sources[train_split]
  if len(train_source) == 0:
    raise DatasetError(f"the {train_split!r} split of {dcfg.name!r} is empty",
                       kind="empty_split")
  train = pipeline.train_dataset(
      train_source, spec.train_transforms,
      global_batch_size=local_batch_size * jax.process_count(), seed=int(config.seed),
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=int(dcfg.get("worker_count", 0)))

  def eval_batches(split: str) -> Iterator[dict]:
    if split not in spec.sources:
      raise ConfigError(f"evaluation split {split!r} is not in dataset {dcfg.name!r}; "
                       f"have {sorted(spec.sources)}")
    return pipeline.eval_batches(
        spec.sources[split], spec.eval_transforms,
        global_batch_size=local_eval_batch_size * jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count())

  return Inputs(spec=spec, train=train, num_train=len(train_source),
                eval_batches=eval_batches)
