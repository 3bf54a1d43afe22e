"""The procedural two-domain aerial dataset: determinism, classes, domain shift, maker."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from contrastjax.data import builder
from contrastjax.data.synthetic import aerial as sa


def _stack(ds, n):
  exs = [ds[i] for i in range(n)]
  return (np.stack([e['image'] for e in exs]).astype(np.float32) / 255.0,
          np.stack([e['label'] for e in exs]))


def test_deterministic_and_well_formed():
  a = sa.SyntheticAerial(4, 64, seed=3, domain='target')
  b = sa.SyntheticAerial(4, 64, seed=3, domain='target')
  for i in range(4):
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    np.testing.assert_array_equal(a[i]['label'], b[i]['label'])
  assert not np.array_equal(a[0]['image'], a[1]['image'])
  assert not np.array_equal(a[0]['image'], sa.SyntheticAerial(4, 64, 4, 'target')[0]['image'])
  ex = a[-1]
  assert ex['image'].shape == (64, 64, 3) and ex['image'].dtype == np.uint8
  assert ex['label'].dtype == np.uint8 and ex['label'].max() < len(sa.CLASSES)
  assert ex['name'] == 'target_3'
  with pytest.raises(IndexError):
    a[4]
  with pytest.raises(ValueError, match='domain'):
    sa.SyntheticAerial(2, 64, 0, 'night')


def test_domains_differ_in_colour_and_content_but_share_classes():
  n = 24
  xs, ys = _stack(sa.SyntheticAerial(n, 64, 0, 'source'), n)
  xt, yt = _stack(sa.SyntheticAerial(n, 64, 0, 'target'), n)
  for y in (ys, yt):      # every class occurs in both domains
    assert set(np.unique(y)) == set(range(len(sa.CLASSES)))
  # Colour statistics differ: vegetation is green in the source, red (false colour) in the
  # target; the whole-image channel means differ too.
  veg_s = xs[ys == sa.VEGETATION].mean(0)
  veg_t = xt[yt == sa.VEGETATION].mean(0)
  assert veg_s[1] > veg_s[0] and veg_t[0] > veg_t[1] + 0.2
  assert np.abs(xs.mean((0, 1, 2)) - xt.mean((0, 1, 2))).max() > 0.05
  # The target is more urban.
  assert (yt == sa.BUILDING).mean() > (ys == sa.BUILDING).mean()
  assert (yt == sa.VEGETATION).mean() < (ys == sa.VEGETATION).mean()

  # Learnable within a domain, shifted across: a nearest-class-mean colour classifier fitted on
  # one half of a domain does well on the other half but poorly on the other domain.
  def fit(x, y):
    return np.stack([x[y == c].mean(0) for c in range(len(sa.CLASSES))])

  def acc(means, x, y):
    d = ((x[..., None, :] - means) ** 2).sum(-1)
    return float((d.argmin(-1) == y).mean())

  m_src = fit(xs[:12], ys[:12])
  in_domain = acc(m_src, xs[12:], ys[12:])
  cross = acc(m_src, xt[12:], yt[12:])
  assert in_domain > 0.7 and cross < in_domain - 0.25


def test_maker_splits_and_batches():
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(
      name='synthetic_aerial', image_size=32, num_train=6, num_target_train=5, num_val=3)))
  spec = builder.make_spec(cfg)
  assert sorted(spec.sources) == ['source_val', 'train', 'val']
  assert len(spec.sources['train']) == 30
  assert spec.sources['val'].domain == 'target' and spec.sources['source_val'].domain == 'source'
  # Validation data is not the training data.
  assert not np.array_equal(spec.sources['val'][0]['image'],
                            spec.sources['train'].target[0]['image'])
  inputs = builder.build(cfg, local_batch_size=3, local_eval_batch_size=2)
  b1 = next(iter(inputs.train))
  b2 = next(iter(builder.build(cfg, local_batch_size=3, local_eval_batch_size=2).train))
  for x, y in zip(jax.tree.leaves(b1), jax.tree.leaves(b2), strict=True):  # same seed, stream
    np.testing.assert_array_equal(x, y)
  assert jax.tree.structure(b1) == jax.tree.structure(b2)
  assert b1['source']['image'].shape == (3, 32, 32, 3)
  assert b1['target']['image'].dtype == np.float32
  assert not np.array_equal(b1['source']['image'], b1['target']['image'])


def test_shift_interpolates_the_target_style():
  assert sa.domain_style('target', 0.0) == sa.STYLES['source']
  assert sa.domain_style('target', 1.0) == sa.STYLES['target']
  assert sa.domain_style('source', 0.3) == sa.STYLES['source']
  half = sa.domain_style('target', 0.5)
  src, tgt = sa.STYLES['source'], sa.STYLES['target']
  np.testing.assert_allclose(half.vegetation, (np.array(src.vegetation) +
                                               np.array(tgt.vegetation)) / 2)
  assert half.haze == pytest.approx(tgt.haze / 2) and half.blur is True
  assert sa.domain_style('target', 0.4).blur is False
  # The nearest-class-mean colour classifier of the source degrades with the shift.
  n = 16
  xs, ys = _stack(sa.SyntheticAerial(n, 64, 0, 'source'), n)
  means = np.stack([xs[ys == c].mean(0) for c in range(len(sa.CLASSES))])

  def acc(shift):
    x, y = _stack(sa.SyntheticAerial(n, 64, 1, 'target', shift), n)
    return float((((x[..., None, :] - means) ** 2).sum(-1).argmin(-1) == y).mean())

  a0, a5, a10 = acc(0.0), acc(0.5), acc(1.0)
  assert a0 > a5 > a10, (a0, a5, a10)
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match='shift'):
      sa.SyntheticAerial(2, 32, 0, 'target', bad)
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(
      name='synthetic_aerial', image_size=32, num_train=2, num_val=2, shift=2.0)))
  with pytest.raises(ValueError, match=r'config\.data\.shift'):
    builder.make_spec(cfg)
