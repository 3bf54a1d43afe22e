"""Tests of the grain pipelines (contrastjax.data.pipeline)."""

from __future__ import annotations

import itertools

import grain
import jax
import numpy as np
import pytest
from absl import flags

from contrastjax import parallel
from contrastjax.data import pipeline as P
from contrastjax.data.transforms import medseg as T
from contrastjax.data.synthetic.polyps import SyntheticPolyps

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()   # mp_prefetch reads absl flags (tests/conftest.py does it too)

N = 12
SIZE = 16


@pytest.fixture(scope='module')
def source():
  return SyntheticPolyps(N, 24, seed=5)


def _train(source, *, seed=0, batch=4, p=0, n=1, workers=0, ops=None):
  ops = T.train_transforms(SIZE, 'stage1') if ops is None else ops
  return P.train_dataset(source, ops, global_batch_size=batch, seed=seed, process_index=p,
                         process_count=n, worker_count=workers)


def _take(ds, k):
  return list(itertools.islice(iter(ds), k))


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contents(source):
  b = _take(_train(source), 1)[0]
  assert set(b) == {'image', 'mask', 'background', 'index'}      # 'name' (str) dropped
  assert b['image'].shape == (4, SIZE, SIZE, 3) and b['image'].dtype == np.float32
  assert b['mask'].shape == (4, SIZE, SIZE, 1) and b['mask'].dtype == np.float32
  assert b['background'].shape == (4, SIZE, SIZE, 1)
  assert b['index'].dtype == np.int32 and b['index'].shape == (4,)
  np.testing.assert_allclose(b['mask'] + b['background'], 1.0, atol=1e-6)
  assert 0.0 <= b['image'].min() and b['image'].max() <= 1.0


def test_deterministic_and_reshuffled_each_epoch(source):
  a = _take(_train(source, seed=1), 9)
  _assert_same(a, _take(_train(source, seed=1), 9))
  c = _take(_train(source, seed=2), 3)
  assert not all(np.array_equal(x['index'], y['index']) for x, y in zip(a, c))
  idx = np.concatenate([x['index'] for x in a])       # 9 batches of 4 = 3 epochs of 12
  epochs = idx.reshape(3, N)
  for e in epochs:
    assert sorted(e) == list(range(N))                 # each epoch is a permutation
  assert not np.array_equal(epochs[0], epochs[1])      # ... a different one each epoch


def test_epochs_straddle_batches(source):
  idx = np.concatenate([x['index'] for x in _take(_train(source, batch=5), 12)])
  for e in idx.reshape(5, N):                          # 60 elements = 5 whole epochs
    assert sorted(e) == list(range(N))
  assert P.steps_per_epoch(N, 5) == 3
  assert P.steps_per_epoch(12, 4) == 3


def test_two_processes_partition_the_global_batch(source):
  single = _take(_train(source, seed=3, batch=4), 6)
  shards = [_take(_train(source, seed=3, batch=4, p=p, n=2), 6) for p in range(2)]
  for t in range(6):
    for p in range(2):
      assert shards[p][t]['index'].shape == (2,)
    a, b = shards[0][t], shards[1][t]
    assert not set(a['index']) & set(b['index'])                   # disjoint
    np.testing.assert_array_equal(np.concatenate([a['index'], b['index']]),
                                  single[t]['index'])               # = the global batch, in order
    # Row r of process p is global position t*B + p*b + r: identical content, augmentation
    # included, whatever the number of processes.
    for p, r in itertools.product(range(2), range(2)):
      for k in ('image', 'mask', 'background', 'index'):
        np.testing.assert_array_equal(shards[p][t][k][r], single[t][k][2 * p + r])
  covered = np.concatenate([s[t]['index'] for s in shards for t in range(3)])
  assert sorted(covered) == list(range(N))                          # one epoch, every example
  with pytest.raises(ValueError, match='multiple'):
    _train(source, batch=5, n=2)
  with pytest.raises(ValueError, match='process_index'):
    _train(source, p=2, n=2)


def test_checkpoint_resumes_exactly(source):
  ds = _train(source, seed=4)
  it = iter(ds)
  _take_from(it, 5)
  state = it.get_state()
  expected = _take_from(it, 3)
  it2 = iter(_train(source, seed=4))
  it2.set_state(state)
  _assert_same(_take_from(it2, 3), expected)


def _take_from(it, k):
  return [next(it) for _ in range(k)]


def test_workers_same_batches_and_checkpoint(source):
  ref = _take(_train(source, seed=6), 8)
  ds = _train(source, seed=6, workers=2)
  it = iter(ds)
  first = _take_from(it, 5)
  _assert_same(first, ref[:5])
  state = it.get_state()
  rest = _take_from(it, 3)
  _assert_same(rest, ref[5:])
  it2 = iter(_train(source, seed=6, workers=2))
  it2.set_state(state)
  _assert_same(_take_from(it2, 3), ref[5:])
  for i in (it, it2):
    i.close()


@pytest.mark.parametrize('n_proc', [1, 2])
def test_eval_every_example_once_with_padding(source, n_proc):
  per = [list(P.eval_batches(source, T.eval_transforms(SIZE), global_batch_size=8,
                             process_index=p, process_count=n_proc)) for p in range(n_proc)]
  local = 8 // n_proc
  assert all(len(b) == P.num_eval_batches(N, 8) == 2 for b in per)
  seen = []
  for t in range(2):
    rows = [per[p][t] for p in range(n_proc)]
    for b in rows:
      assert b['image'].shape == (local, SIZE, SIZE, 3) and b['valid'].dtype == bool
      assert b['index'].dtype == np.int32
      np.testing.assert_array_equal(b['index'] >= 0, b['valid'])
      assert not b['image'][~b['valid']].any()                  # padding rows are zeros
    index = np.concatenate([b['index'] for b in rows])            # process order = data order
    valid = np.concatenate([b['valid'] for b in rows])
    seen.extend(index[valid])
  assert seen == list(range(N))                                   # all, once, in order
  assert sum(int(b['valid'].sum()) for bs in per for b in bs) == N
  ex = T.AddBackground().map(source[11])
  want = T.ToFloat().map(T.Resize(SIZE).map(ex))
  last = per[-1][-1] if n_proc == 1 else per[0][-1]
  row = int(np.flatnonzero(last['index'] == 11)[0])
  np.testing.assert_array_equal(last['image'][row], want['image'])
  np.testing.assert_array_equal(last['mask'][row], want['mask'])


def test_eval_process_with_only_padding(source):
  # 12 examples, global batch 16 on 4 processes: process 3 holds positions 12..15 = padding.
  b = list(P.eval_batches(source, T.eval_transforms(SIZE), global_batch_size=16,
                          process_index=3, process_count=4))
  assert len(b) == 1 and not b[0]['valid'].any() and (b[0]['index'] == -1).all()
  assert b[0]['mask'].shape == (4, SIZE, SIZE, 1)


@pytest.mark.parametrize('n, b, want', [(12, 4, 3), (12, 5, 3), (7, 8, 1), (1, 1, 1), (10, 3, 4)])
def test_steps_per_epoch_is_ceil_and_covers_one_epoch(n, b, want):
  steps = P.steps_per_epoch(n, b)
  assert steps == want and (steps - 1) * b < n <= steps * b
  # The first `steps` batches of the stream hold every example of the first epoch (and, when
  # b does not divide n, the start of the second): nothing is dropped.
  idx = np.concatenate([x['index'] for x in _take(
      P.train_dataset(SyntheticPolyps(n, 24, seed=5), [], global_batch_size=b, seed=0,
                      process_index=0, process_count=1), steps)])
  assert sorted(idx[:n]) == list(range(n)) and len(idx) == steps * b
  for bad in ((0, 4), (4, 0)):
    with pytest.raises(ValueError, match='expected both >= 1'):
      P.steps_per_epoch(*bad)


# ------------------------------------------------------------------------- nested examples


class _Nested:
  """Examples with two nested streams, strings at every level and a dict of strings only."""

  def __len__(self):
    return N

  def __getitem__(self, i):
    i = int(i)
    return {'a': {'x': np.full((2,), i, np.float32), 'name': f'a{i}'},
            'b': {'y': np.int32(10 * i), 'index': np.int32(i)},
            'meta': {'name': 'only strings'}, 'name': str(i)}


class _NestedNoise(grain.transforms.RandomMap):

  def random_map(self, x, rng):
    return {**x, 'a': {**x['a'], 'noise': rng.random(3).astype(np.float32)}}


def _nested_train(seed=0, batch=4, p=0, n=1):
  return P.train_dataset(_Nested(), [_NestedNoise()], global_batch_size=batch, seed=seed,
                         process_index=p, process_count=n)


def _assert_same_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_nested_batches_keep_nested_arrays():
  batch = _take(_nested_train(), 1)[0]
  assert set(batch) == {'a', 'b', 'index'}                  # strings and the string-only dict go
  assert set(batch['a']) == {'x', 'noise'} and set(batch['b']) == {'y', 'index'}
  assert batch['a']['x'].shape == (4, 2) and batch['a']['noise'].shape == (4, 3)
  assert batch['b']['index'].dtype == np.int32 and batch['index'].dtype == np.int32
  np.testing.assert_array_equal(batch['b']['index'], batch['index'])
  np.testing.assert_array_equal(batch['b']['y'], 10 * batch['index'])
  np.testing.assert_array_equal(batch['a']['x'][:, 0], batch['index'])


def test_nested_batches_shard_and_resume():
  single = _take(_nested_train(seed=2), 4)
  shards = [_take(_nested_train(seed=2, p=p, n=2), 4) for p in range(2)]
  for t in range(4):
    _assert_same_trees(jax.tree.map(lambda *x: np.concatenate(x), shards[0][t], shards[1][t]),
                       single[t])
  it = iter(_nested_train(seed=2))
  _take_from(it, 2)
  state = it.get_state()
  it2 = iter(_nested_train(seed=2))
  it2.set_state(state)
  for x, y in zip(_take_from(it2, 2), single[2:]):
    _assert_same_trees(x, y)


@pytest.mark.parametrize('n_proc', [1, 2])
def test_nested_eval_batches_pad_every_leaf(n_proc):
  per = [list(P.eval_batches(_Nested(), [], global_batch_size=8, process_index=p,
                             process_count=n_proc)) for p in range(n_proc)]
  assert all(len(b) == 2 for b in per)
  last = jax.tree.map(lambda *x: np.concatenate(x), *[b[-1] for b in per])
  assert set(last) == {'a', 'b', 'index', 'valid'} and set(last['a']) == {'x'}
  np.testing.assert_array_equal(last['valid'], [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(last['index'], [8, 9, 10, 11] + [-1] * 4)
  np.testing.assert_array_equal(last['b']['index'], last['index'])      # nested index padded too
  assert not last['a']['x'][4:].any() and not last['b']['y'][4:].any()
  assert last['b']['index'].dtype == np.int32


class _Ragged(_Nested):

  def __getitem__(self, i):
    out = super().__getitem__(i)
    out['a']['x'] = np.zeros((1 + int(i) % 2,), np.float32)
    return out


def test_nested_eval_shape_error_names_the_leaf():
  with pytest.raises(ValueError, match=r"'a/x': \[\(1,\), \(2,\)\]"):
    list(P.eval_batches(_Ragged(), [], global_batch_size=4, process_index=0, process_count=1))


def test_nested_batch_to_global_arrays():
  mesh = parallel.make_mesh()
  batch = _take(_nested_train(batch=jax.device_count()), 1)[0]
  global_batch = parallel.host_to_global(batch, mesh)
  assert jax.tree.structure(global_batch) == jax.tree.structure(batch)
  for x in jax.tree.leaves(global_batch):
    assert x.sharding.spec[0] == parallel.DATA_AXIS
  _assert_same_trees(jax.tree.map(np.asarray, global_batch), batch)
