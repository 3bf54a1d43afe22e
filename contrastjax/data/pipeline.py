"""grain input pipelines: an infinite, sharded, checkpointable training stream and exact eval.

Training (:func:`train_dataset`)::

  MapDataset.source(src) -> add 'index' -> .seed(seed) -> .shuffle() -> .repeat()
    -> per-example transforms (keyed by the global stream position)
    -> drop non-array fields -> .batch(local, drop_remainder) -> [process_index::process_count]
    -> .to_iter_dataset(ReadOptions) [-> .mp_prefetch(workers)]

An example (and so a batch) is a dict of numpy arrays, possibly nested: a method with two input
streams gets e.g. ``{'source': {'image': ...}, 'target': {...}, 'index': ...}`` (every leaf
batched along its leading axis; ``contrastjax.parallel.host_to_global`` maps over the pytree).

* The stream is one endless sequence of epochs; grain's shuffle folds the epoch number into its
  seed, so every epoch has a new order, and the same seed always gives the same stream.
* Random transforms get a generator seeded from the pipeline seed and the GLOBAL stream position,
  so two processes never share augmentation draws, and the augmentation of a given position does
  not depend on the number of processes.
* Process ``p`` of ``P`` takes the ``p``-th contiguous block of ``b = B / P`` positions of every
  global batch (``B`` = global batch): its batch ``t`` holds positions ``t * B + p * b + r``.
  Concatenating the processes' batches in process order (what
  ``jax.make_array_from_process_local_data`` does) gives exactly the single-process global batch
  ``t``, rows in the same order, so a run computes the same thing on one host or many.
* Batches straddle epoch boundaries (nothing is dropped); :func:`steps_per_epoch` is
  ``ceil(N / B)``, the reference's optimiser steps per epoch (``drop_last=False``).
* The iterator is checkpointable: ``it.get_state()`` / ``it.set_state(state)`` resume at exactly
  the next batch, with or without worker processes.

Evaluation (:func:`eval_batches`): every example exactly once, in order, the last batch padded
to the fixed local batch size with ``valid = False`` rows, sharded so that concatenating the
processes' local batches (in process order) gives the global batch in dataset order.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

Example = dict[str, Any]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Optimiser steps per epoch: ``ceil(N / B)``, the one definition of an epoch in steps.

  The training stream (:func:`train_dataset`) never drops an example: when ``B`` does not
  divide ``N`` the last batch of an epoch is completed with the first examples of the next
  epoch. ``ceil(N / B)`` steps therefore see every example at least once, and it is the number
  of optimiser steps per epoch of the reference PyTorch loaders (``drop_last=False``). It is
  also the number of (padded) evaluation batches, :func:`num_eval_batches`.

  Args:
    num_examples: ``N``, the size of the training split (>= 1).
    global_batch_size: ``B``, the batch size summed over processes (>= 1).

  Raises:
    ValueError: ``N < 1`` or ``B < 1``.
  """
  if num_examples < 1 or global_batch_size < 1:
    raise ValueError(f'num_examples={num_examples}, global_batch_size={global_batch_size}; '
                     'expected both >= 1')
  return -(-int(num_examples) // int(global_batch_size))


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None and process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)
    return jax.process_index(), jax.process_count()
  if process_index is None or process_count is None:
    raise ValueError('give both process_index and process_count, or neither (then jax decides)')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  return global_batch_size // process_count


class AddIndex(grain.transforms.MapWithIndex):
  """Adds ``'index'``: the example's position in the source (int32).

  Downstream of ``repeat``/``shuffle`` grain passes ``epoch * N + i``; the index is taken
  modulo the source length ``N``.
  """

  def __init__(self, num_examples: int):
    self.num_examples = int(num_examples)

  def map_with_index(self, index: int, x: Example) -> Example:
    out = dict(x)
    out['index'] = np.int32(index % self.num_examples)
    return out


def _select_arrays(x: Example) -> Example:
  out = {}
  for key, value in x.items():
    if isinstance(value, dict):
      value = _select_arrays(value)
      if value:
        out[key] = value
    elif isinstance(value, (np.ndarray, np.number, bool, int, float)):
      value = np.asarray(value)
      if value.dtype.kind in 'biuf':
        out[key] = value
  return out


class SelectArrays(grain.transforms.Map):
  """Keeps the numeric fields (numpy arrays and scalars), in nested dicts too; drops strings
  such as ``'name'`` and dicts left empty."""

  def map(self, x: Example) -> Example:
    out = _select_arrays(x)
    if 'index' in out:
      out['index'] = out['index'].astype(np.int32)
    return out


def _map_leaves(fn, tree: Any, path: str = '') -> Any:
  """``fn(path, leaf)`` on every leaf of nested dicts; paths join keys with ``'/'``."""
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v, f'{path}/{k}' if path else k) for k, v in tree.items()}
  return fn(path, tree)


def _stack(rows: Sequence[Any]) -> Any:
  """Stacks a list of (nested) example dicts into one batch, leaf by leaf."""
  if isinstance(rows[0], dict):
    return {k: _stack([row[k] for row in rows]) for k in rows[0]}
  return np.stack(rows)


def _leaf_shapes(rows: Sequence[Example]) -> dict[str, list[tuple[int, ...]]]:
  shapes: dict[str, set] = {}
  for row in rows:
    _map_leaves(lambda path, v: shapes.setdefault(path, set()).add(np.shape(v)), row)
  return {k: sorted(v) for k, v in shapes.items()}


def _base(source: Any, seed: int) -> grain.MapDataset:
  """The source as a MapDataset with an 'index' field and the pipeline seed."""
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  if len(ds) < 1:
    raise ValueError(f'source {source!r} is empty')
  return ds.map_with_index(AddIndex(len(ds))).seed(seed)


def train_dataset(source: Any, transforms: Sequence[Any], *, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  worker_count: int = 0, prefetch: int = 2,
                  read_threads: int = 4) -> grain.IterDataset:
  """The infinite, shuffled, augmented, per-process training stream of batches.

  Args:
    source: Random-access source (``__len__``/``__getitem__`` returning example dicts) or a
      ``grain.MapDataset``.
    transforms: Per-example grain transforms (``Map``/``RandomMap``), e.g.
      :func:`contrastjax.data.transforms.medseg.train_transforms`.
    global_batch_size: Batch size summed over processes.
    seed: Pipeline seed (shuffle and augmentation); in [0, 2**32).
    process_index: This process; default ``jax.process_index()``.
    process_count: Number of processes; default ``jax.process_count()``.
    worker_count: Worker processes for ``mp_prefetch`` (0 = threads in this process only).
      Transforms must then be picklable module-level classes, and the main module guarded by
      ``if __name__ == '__main__'``.
    prefetch: Batches buffered ahead (per worker with ``worker_count > 0``).
    read_threads: Threads producing batches in each (worker) process.

  Returns:
    An ``IterDataset``; ``iter(ds)`` yields (possibly nested) dicts of numpy arrays with a leading
    local batch axis ``b = global_batch_size // process_count`` (for the ConDSeg transforms:
    ``image`` float32 [b, H, W, 3], ``mask`` and ``background`` float32 [b, H, W, 1], ``index``
    int32 [b]). The iterator supports ``get_state()``/``set_state()``.
  """
  p, n_proc = _processes(process_index, process_count)
  local = _local_batch_size(global_batch_size, n_proc)
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed={seed}; expected an integer in [0, 2**32)')
  ds = _base(source, seed).shuffle().repeat()
  ds = ds.apply(list(transforms)).map(SelectArrays())
  ds = ds.batch(local, drop_remainder=True)[p::n_proc]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(prefetch, read_threads)))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=prefetch))
  return it


class _Gather(grain.transforms.Map):
  """Maps a position to the element of ``ds`` at that position."""

  def __init__(self, ds: grain.MapDataset):
    self.ds = ds

  def map(self, position: int) -> Example:
    return self.ds[int(position)]


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Number of (padded) batches :func:`eval_batches` yields on every process."""
  return steps_per_epoch(num_examples, global_batch_size)


def eval_batches(source: Any, transforms: Sequence[Any], *, global_batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 seed: int = 0, read_threads: int = 4) -> Iterator[Example]:
  """Every example exactly once, in order, in fixed-size padded batches.

  Global batch ``t`` covers dataset positions ``[t * B, (t + 1) * B)``; process ``p`` gets the
  contiguous chunk ``t * B + p * b + [0, b)`` (``b = B // process_count``). Positions past the end
  are padding rows: zeros, ``index = -1`` (every ``'index'`` leaf, nested ones too),
  ``valid = False``. Every process yields the same number of batches, :func:`num_eval_batches`.

  Args:
    source: Random-access source or ``grain.MapDataset``.
    transforms: Per-example transforms, e.g. :func:`contrastjax.data.transforms.medseg.eval_transforms`
      (random ones are seeded by ``seed`` and the source index).
    global_batch_size: ``B``.
    process_index: This process; default ``jax.process_index()``.
    process_count: Number of processes; default ``jax.process_count()``.
    seed: Seed for random transforms, if any.
    read_threads: Threads reading ahead.

  Yields:
    (Possibly nested) dicts of numpy arrays with leading axis ``b``, including top-level
    ``index`` int32 [b] and ``valid`` bool [b].
  """
  p, n_proc = _processes(process_index, process_count)
  local = _local_batch_size(global_batch_size, n_proc)
  ds = _base(source, seed).apply(list(transforms)).map(SelectArrays())
  n = len(ds)
  num_batches = num_eval_batches(n, global_batch_size)
  positions = [t * global_batch_size + p * local + r
               for t in range(num_batches) for r in range(local)]
  real = [q for q in positions if q < n]       # a prefix: positions increase
  template = None
  if len(real) < len(positions):
    template = _map_leaves(
        lambda path, v: np.int32(-1) if path.rsplit('/', 1)[-1] == 'index' else np.zeros_like(v),
        ds[0])
  elements = iter(grain.MapDataset.source(real).map(_Gather(ds)).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * local)))
  for t in range(num_batches):
    rows, valid = [], []
    for r in range(local):
      if t * local + r < len(real):
        rows.append(next(elements))
        valid.append(True)
      else:
        rows.append(template)
        valid.append(False)
    try:
      batch = _stack(rows)
    except ValueError as e:
      shapes = _leaf_shapes(rows)
      raise ValueError(f'cannot batch examples of different shapes {shapes}; add a Resize to '
                       'the eval transforms') from e
    batch['valid'] = np.asarray(valid, dtype=bool)
    yield batch
