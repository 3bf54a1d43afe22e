"""From ``config.data`` to the trainer's inputs: sources, transforms, grain pipelines.

``config.data.name`` names a dataset maker (registered below, or a ``"module:function"``
path); a maker returns a ``DataSpec``: the random-access sources per split, the
per-example transforms for training and evaluation, and what the labels mean
(:class:`DatasetInfo`, or None). The builder wraps them in the shared grain pipelines
(``contrastjax.data.pipeline``): per-process sharding, seeded shuffling, batching,
prefetching and checkpointable iterator state.

A maker's module may list the ``DatasetInfo`` its specs carry in a module-level dict
``INFO`` keyed by the maker's function name; :func:`dataset_info` then finds it by
``config.data.name`` without reading any data (a config needs ``num_classes`` before the
data exist).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections

from contrastjax.data import pipeline
from contrastjax.data.errors import DatasetError
from contrastjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a dataset's labels mean.

  Attributes:
    name: The dataset (its maker's registered name, e.g. ``'loveda'``).
    classes: Class names; label ``k`` is ``classes[k]``.
    palette: One RGB colour ``(r, g, b)`` (0..255) per class, in the order of ``classes``.
    ignore_index: The label value that marks pixels excluded from losses and metrics
      (255 for the semantic-segmentation datasets); None when there is none (binary masks).
  """
  name: str
  classes: tuple[str, ...]
  palette: tuple[tuple[int, int, int], ...]
  ignore_index: int | None = 255

  def __post_init__(self):
    object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
    object.__setattr__(self, "palette", tuple(tuple(int(v) for v in c) for c in self.palette))
    if len(self.palette) != len(self.classes) or any(len(c) != 3 for c in self.palette):
      raise ValueError(f"DatasetInfo {self.name!r}: {len(self.classes)} classes need as many "
                       f"RGB colours; got palette {self.palette}")

  @property
  def num_classes(self) -> int:
    return len(self.classes)


@dataclasses.dataclass
class DataSpec:
  """What a dataset maker returns."""
  sources: Mapping[str, Any]            # split name -> random-access source
  train_transforms: Sequence[Any]       # grain transforms for training examples
  eval_transforms: Sequence[Any]        # grain transforms for evaluation examples
  info: DatasetInfo | None = None       # class names, palette, ignore label (None: no classes)
  # A model input (one example of a batch's 'image') as uint8 RGB, for pictures; None:
  # values in [0, 1] (or 0..255) in RGB order.
  display: Callable[[Any], Any] | None = None
  # What decides the examples the sources yield (resolved config values: a split list, a
  # binarisation rule, a synthetic set's size and seed); stored by a preparation, checked
  # when a prepared copy is read (``contrastjax.data.prepared``).
  content: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # The sources a preparation writes, split -> source, when they are not ``sources``
  # (e.g. SiamSeg's two training domains, which ``sources['train']`` pairs); None: sources.
  prepare_sources: Mapping[str, Any] | None = None


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
    "voc": "contrastjax.data.tasks.wsss:voc",
    "coco_wsss": "contrastjax.data.tasks.wsss:coco_wsss",
    "synthetic_scenes": "contrastjax.data.tasks.wsss:synthetic_scenes",
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


def dataset_info(name: str) -> DatasetInfo:
  """The :class:`DatasetInfo` of the dataset maker ``name`` (a ``config.data.name``), found
  without reading data: the ``INFO`` dict of the maker's module, keyed by its function name.

  Raises:
    ConfigError: ``name`` is not a known maker.
    ValueError: the dataset has no classes (e.g. the CLIP makers: ``DataSpec.info`` is None).
  """
  maker = get_maker(name)
  module = sys.modules.get(getattr(maker, "__module__", None) or "")
  info = getattr(module, "INFO", {}).get(getattr(maker, "__name__", None))
  if info is None:
    raise ValueError(f"dataset {name!r} has no class names or palette (its DataSpec.info "
                     "is None)")
  return info


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> tuple[Any, int]:
  """``(batch, image size)``: a global training batch of ``config.batch_size`` shaped like
  the pipeline of ``config.data`` (keys, shapes, dtypes), made without reading data: the
  ``SYNTHETIC`` dict of the maker's module provides it (benchmarks at paper size).

  Raises:
    ConfigError: the dataset's maker provides none.
  """
  maker = get_maker(config.data.name)
  module = sys.modules.get(getattr(maker, "__module__", None) or "")
  fn = getattr(module, "SYNTHETIC", {}).get(getattr(maker, "__name__", None))
  if fn is None:
    raise ConfigError(f"config.data.name={config.data.name!r}: its maker provides no "
                      "synthetic batch (a SYNTHETIC entry in its module)")
  return fn(config.data, int(config.batch_size), seed)


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
