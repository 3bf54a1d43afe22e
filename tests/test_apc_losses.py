"""APC building blocks against brute-force NumPy loops written here, and torch when present."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.methods import apc_losses as L


def _softmax_np(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def _patch_probs(seed, shape=(2, 4, 5, 6), scale=3.0):
  """Softmax probabilities with a spread of peakiness (some sharp drops, some flat)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0.0, 1.0, shape) * rng.uniform(0.5, scale, shape[:1] + (1, 1, 1))
  return _softmax_np(z).astype(np.float32)


def _class_lists(p):
  """Brute force: per (b, c) the list of the N patch scores, row-major."""
  b_, h, w, c_ = p.shape
  return [[[float(p[b, i // w, i % w, c]) for i in range(h * w)] for c in range(c_)]
          for b in range(b_)]


# --------------------------------------------------------------------------- brute force
def _bf_gmp(p):
  lists = _class_lists(p)
  return np.array([[max(v) for v in per_b] for per_b in lists], np.float32)


def _bf_k(p, rule, tau=None, rho=None, k_max=None):
  b_, h, w, c_ = p.shape
  n = h * w
  k_max = n if k_max is None else k_max
  lists = _class_lists(p)
  out = np.zeros((b_, c_), np.int64)
  for b in range(b_):
    winners = []
    for i in range(n):
      row = [p[b, i // w, i % w, c] for c in range(c_)]
      best = 0
      for c in range(1, c_):
        if row[c] > row[best]:
          best = c
      winners.append(best)
    for c in range(c_):
      vals = lists[b][c]
      if rule == "ratio_to_max":
        m = np.float32(max(vals))
        k = sum(1 for v in vals if np.float32(v) >= np.float32(tau) * m)
      elif rule == "consecutive_ratio":
        s = sorted(vals, reverse=True)
        k = n
        for kk in range(1, n):  # 1-based k: compare S_(k+1) with S_(k)
          if s[kk] / s[kk - 1] < tau:
            k = kk
            break
      else:
        n_c = sum(1 for x in winners if x == c)
        k = max(1, math.ceil(rho * n_c))
      out[b, c] = min(max(k, 1), k_max)
  return out


def _bf_selected(p, k):
  """Brute force: per (b, c) the patch indices of the k[b, c] largest scores."""
  lists = _class_lists(p)
  sel = {}
  for b, per_b in enumerate(lists):
    for c, vals in enumerate(per_b):
      order = sorted(range(len(vals)), key=lambda i: -vals[i])
      sel[(b, c)] = order[:int(k[b, c])]
  return sel


def _bf_topk_mean(p, k):
  b_, _, _, c_ = p.shape
  kk = np.full((b_, c_), k)
  sel = _bf_selected(p, kk)
  lists = _class_lists(p)
  return np.array([[sum(lists[b][c][i] for i in sel[(b, c)]) / k for c in range(c_)]
                   for b in range(b_)])


# --------------------------------------------------------------------------- pooling
def test_gmp_pool_matches_loops():
  p = _patch_probs(0)
  np.testing.assert_array_equal(np.asarray(L.gmp_pool(p)), _bf_gmp(p))


@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_pool_values_and_gradient_support(k):
  p = _patch_probs(1)
  b_, h, w, c_ = p.shape
  np.testing.assert_allclose(np.asarray(L.topk_pool(p, k)), _bf_topk_mean(p, k), rtol=1e-6)
  weights = np.random.default_rng(2).uniform(0.5, 2.0, (b_, c_)).astype(np.float32)
  grad = np.asarray(jax.grad(lambda x: jnp.sum(weights * L.topk_pool(x, k)))(p))
  expected = np.zeros_like(p)
  for (b, c), idx in _bf_selected(p, np.full((b_, c_), k)).items():
    for i in idx:
      expected[b, i // w, i % w, c] = weights[b, c] / k
  np.testing.assert_array_equal(grad != 0, expected != 0)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_topk_pool_matches_torch_topk():
  torch = pytest.importorskip("torch")
  p = _patch_probs(3, (3, 6, 7, 5))
  b_, h, w, c_ = p.shape
  for k in (1, 4, 42):
    ref = torch.topk(torch.tensor(p).reshape(b_, h * w, c_), k, dim=1).values.mean(1)
    np.testing.assert_allclose(np.asarray(L.topk_pool(p, k)), ref.numpy(), rtol=1e-6)


AKP_CASES = [
    ("ratio_to_max", dict(tau=0.5)),
    ("ratio_to_max", dict(tau=0.9, k_max=4)),
    ("ratio_to_max", dict(tau=0.2, k_max=7)),
    ("consecutive_ratio", dict(tau=0.7)),
    ("consecutive_ratio", dict(tau=0.95, k_max=6)),
    ("consecutive_ratio", dict(tau=0.5, k_max=3)),
    ("argmax_share", dict(rho=0.5)),
    ("argmax_share", dict(rho=0.25, k_max=3)),
    ("argmax_share", dict(rho=2.0, k_max=9)),
]


@pytest.mark.parametrize("rule,kw", AKP_CASES)
def test_adaptive_k_matches_loops(rule, kw):
  p = _patch_probs(4, (3, 5, 6, 7))
  k = np.asarray(L.adaptive_k(p, rule=rule, **kw))
  expected = _bf_k(p, rule, **kw)
  np.testing.assert_array_equal(k, expected)
  assert k.dtype == np.int32
  assert len(np.unique(expected)) > 1, "degenerate case: every K equal"


@pytest.mark.parametrize("rule,kw", AKP_CASES)
def test_akp_pool_values_and_gradient_only_at_selected(rule, kw):
  p = _patch_probs(5, (2, 5, 6, 7))
  b_, h, w, c_ = p.shape
  k = _bf_k(p, rule, **kw)
  sel = _bf_selected(p, k)
  lists = _class_lists(p)
  expected_val = np.array(
      [[sum(lists[b][c][i] for i in sel[(b, c)]) / k[b, c] for c in range(c_)]
       for b in range(b_)])
  pool = jax.jit(functools.partial(L.akp_pool, rule=rule, **kw))
  np.testing.assert_allclose(np.asarray(pool(p)), expected_val, rtol=1e-6)

  weights = np.random.default_rng(6).uniform(0.5, 2.0, (b_, c_)).astype(np.float32)
  grad = np.asarray(jax.grad(lambda x: jnp.sum(weights * pool(x)))(p))
  expected = np.zeros_like(p)
  for (b, c), idx in sel.items():
    for i in idx:
      expected[b, i // w, i % w, c] = weights[b, c] / k[b, c]
  np.testing.assert_array_equal(grad != 0, expected != 0)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


@pytest.mark.parametrize("rule,kw", [("ratio_to_max", dict(tau=0.9)),
                                     ("consecutive_ratio", dict(tau=0.8)),
                                     ("argmax_share", dict(rho=1.0))])
def test_akp_with_k_one_is_gmp_exactly(rule, kw):
  p = _patch_probs(7, (3, 6, 6, 8))
  gmp = np.asarray(L.gmp_pool(p))
  np.testing.assert_array_equal(np.asarray(L.akp_pool(p, rule=rule, k_max=1, **kw)), gmp)
  # K = 1 reached by the rule itself (not the cap) is also GMP bit for bit.
  k = np.asarray(L.adaptive_k(p, rule=rule, **kw))
  scores = np.asarray(L.akp_pool(p, rule=rule, **kw))
  assert (k == 1).any() and (k > 1).any()
  np.testing.assert_array_equal(scores[k == 1], gmp[k == 1])
  assert np.all(scores[k > 1] < gmp[k > 1])


def test_akp_ratio_tau_one_is_gmp_and_switch_dispatches():
  p = _patch_probs(8)
  gmp = np.asarray(L.gmp_pool(p))
  np.testing.assert_array_equal(np.asarray(L.akp_pool(p, rule="ratio_to_max", tau=1.0)), gmp)
  np.testing.assert_array_equal(np.asarray(L.pool_patch_scores(p, mode="gmp")), gmp)
  np.testing.assert_array_equal(np.asarray(L.pool_patch_scores(p, mode="topk", k=3)),
                                np.asarray(L.topk_pool(p, 3)))
  np.testing.assert_array_equal(
      np.asarray(L.pool_patch_scores(p, mode="akp", rule="argmax_share", rho=0.5, k_max=5)),
      np.asarray(L.akp_pool(p, rule="argmax_share", rho=0.5, k_max=5)))


def test_pooling_bad_arguments_raise():
  p = _patch_probs(9)
  with pytest.raises(ValueError, match="probs"):
    L.gmp_pool(p[0])
  with pytest.raises(ValueError, match="k must be in"):
    L.topk_pool(p, 0)
  with pytest.raises(ValueError, match="k must be in"):
    L.topk_pool(p, 21)
  with pytest.raises(ValueError, match="k must be a Python int"):
    L.topk_pool(p, 2.0)
  with pytest.raises(ValueError, match="rule must be one of"):
    L.akp_pool(p, rule="median", tau=0.5)
  with pytest.raises(ValueError, match="tau"):
    L.akp_pool(p, rule="ratio_to_max")
  with pytest.raises(ValueError, match="tau"):
    L.akp_pool(p, rule="consecutive_ratio", tau=1.5)
  with pytest.raises(ValueError, match="rho"):
    L.akp_pool(p, rule="argmax_share", rho=0.0)
  with pytest.raises(ValueError, match="k_max"):
    L.adaptive_k(p, rule="ratio_to_max", tau=0.5, k_max=0)
  with pytest.raises(ValueError, match="mode must be one of"):
    L.pool_patch_scores(p, mode="avg")


# --------------------------------------------------------------------------- classification
def test_keras_bce_matches_float32_loop_including_clipped_entries():
  rng = np.random.default_rng(10)
  s = rng.uniform(0, 1, (3, 6)).astype(np.float32)
  s[0, 0], s[0, 1], s[1, 2], s[2, 3] = 0.0, 1.0, 0.0, 1.0
  y = (rng.uniform(0, 1, s.shape) > 0.5).astype(np.float32)
  y[0, 0], y[0, 1], y[1, 2], y[2, 3] = 1.0, 0.0, 0.0, 1.0
  eps = np.float32(1e-7)
  total = 0.0
  for b in range(s.shape[0]):
    for c in range(s.shape[1]):
      p = np.float32(min(max(s[b, c], eps), np.float32(1) - eps))
      if y[b, c] == 1:
        total += -np.log(np.float32(p + eps))
      else:
        total += -np.log(np.float32(np.float32(1) - p + eps))
  expected = total / s.size
  np.testing.assert_allclose(float(L.keras_binary_crossentropy(s, y)), expected, rtol=1e-5)
  # A predicted 0 for a present class costs -log(2e-7), not infinity.
  one = L.keras_binary_crossentropy(np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32))
  np.testing.assert_allclose(float(one), -math.log(2e-7), rtol=1e-5)
  with pytest.raises(ValueError, match="scores and labels"):
    L.keras_binary_crossentropy(s, y[:, :3])


def test_l2_kernel_penalty_is_keras_l2():
  w = np.random.default_rng(11).normal(0, 0.05, (7, 5)).astype(np.float32)
  expected = 0.01 * sum(float(w[i, j]) ** 2 for i in range(7) for j in range(5))
  np.testing.assert_allclose(float(L.l2_kernel_penalty(w)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(L.l2_kernel_penalty(w, 0.5)), 50 * expected, rtol=1e-5)


# --------------------------------------------------------------------------- pseudo-labels
def _hand_probs():
  p = np.zeros((2, 1, 3, 3), np.float32)
  p[0, 0] = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]]
  p[1, 0] = [[0.0, 0.0, 1.0], [0.7, 0.0, 0.3], [0.9, 0.0, 0.1]]
  y = np.array([[1, 1, 0], [1, 1, 0]], np.float32)
  return p, y


def test_merge_class_labels_hand_example():
  p, y = _hand_probs()
  merged = np.asarray(L.merge_class_labels(p, y))
  # Image 0: present maxima 0.6 (bg) and 0.4 (class 1), class 2 masked.
  expected0 = np.array([[1 / 1.75, 0.75 / 1.75, 0], [0.4, 0.6, 0], [5 / 11, 6 / 11, 0]])
  # Image 1: class 1 present but all 0 (guarded 0/0 -> 0); patch 0 has no mass left.
  expected1 = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]])
  np.testing.assert_allclose(merged[0, 0], expected0, rtol=1e-6)
  np.testing.assert_allclose(merged[1, 0], expected1, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(
      jax.grad(lambda x: jnp.sum(L.merge_class_labels(x, y) ** 2))(p))))
  # Unmerged argmax would give [0, 2, 0]; merged: absent class 2 gone, class 1 wins patch 2.
  np.testing.assert_array_equal(np.asarray(L.merged_pseudo_labels(p, y))[0, 0], [0, 1, 1])
  np.testing.assert_array_equal(np.asarray(L.merged_pseudo_labels(p, y))[1, 0], [0, 0, 0])
  np.testing.assert_array_equal(
      np.asarray(L.merged_pseudo_labels(p, y, threshold=0.58))[0, 0], [255, 1, 255])
  np.testing.assert_array_equal(
      np.asarray(L.confident_labels(merged, threshold=0.58, ignore_index=7))[0, 0], [7, 1, 7])


def _bf_merge(p, y):
  b_, h, w, c_ = p.shape
  m = np.zeros(p.shape, np.float64)
  for b in range(b_):
    for c in range(c_):
      peak = max(p[b, i, j, c] * y[b, c] for i in range(h) for j in range(w))
      for i in range(h):
        for j in range(w):
          m[b, i, j, c] = p[b, i, j, c] * y[b, c] / peak if peak != 0 else 0.0
    for i in range(h):
      for j in range(w):
        s = sum(m[b, i, j, :])
        m[b, i, j, :] = m[b, i, j, :] / s if s != 0 else 0.0
  return m


def _bf_resize_align_corners(x, out):
  b_, h, w, c_ = x.shape
  ho, wo = out
  res = np.zeros((b_, ho, wo, c_))
  for oy in range(ho):
    sy = oy * (h - 1) / (ho - 1) if ho > 1 else 0.0
    y0 = int(math.floor(sy))
    y1 = min(y0 + 1, h - 1)
    ly = sy - y0
    for ox in range(wo):
      sx = ox * (w - 1) / (wo - 1) if wo > 1 else 0.0
      x0 = int(math.floor(sx))
      x1 = min(x0 + 1, w - 1)
      lx = sx - x0
      res[:, oy, ox] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) +
                        ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return res


def test_merged_pseudo_labels_upsampling_matches_loops():
  p = _patch_probs(12, (2, 3, 4, 5), scale=1.5)
  y = np.array([[1, 0, 1, 1, 0], [1, 1, 0, 0, 1]], np.float32)
  np.testing.assert_allclose(np.asarray(L.merge_class_labels(p, y)), _bf_merge(p, y),
                             rtol=1e-5, atol=1e-7)
  up = _bf_resize_align_corners(_bf_merge(p, y), (7, 10))
  labels = np.asarray(L.merged_pseudo_labels(p, y, out_size=(7, 10)))
  np.testing.assert_array_equal(labels, up.argmax(-1))
  assert set(np.unique(labels)) <= {0, 2, 3, 1, 4} and labels.shape == (2, 7, 10)
  thr = float(np.median(up.max(-1)))
  with_ignore = np.asarray(L.merged_pseudo_labels(p, y, out_size=(7, 10), threshold=thr))
  np.testing.assert_array_equal(with_ignore, np.where(up.max(-1) < thr, 255, up.argmax(-1)))
  # Absent classes never appear.
  for b in range(2):
    assert not set(np.unique(labels[b])) & set(np.flatnonzero(y[b] == 0))


def test_merged_pseudo_labels_interpolation_conventions_match_torch():
  torch = pytest.importorskip("torch")
  p = _patch_probs(13, (2, 3, 4, 5), scale=1.5)
  y = np.array([[1, 0, 1, 1, 0], [1, 1, 0, 0, 1]], np.float32)
  merged = torch.tensor(_bf_merge(p, y).transpose(0, 3, 1, 2))
  ac = torch.nn.functional.interpolate(merged, size=(9, 11), mode="bilinear",
                                       align_corners=True).argmax(1).numpy()
  hp = torch.nn.functional.interpolate(merged, size=(9, 11), mode="bilinear",
                                       align_corners=False).argmax(1).numpy()
  assert (ac != hp).any()  # the switch matters on this example
  np.testing.assert_array_equal(np.asarray(L.merged_pseudo_labels(p, y, out_size=(9, 11))), ac)
  np.testing.assert_array_equal(
      np.asarray(L.merged_pseudo_labels(p, y, out_size=(9, 11), align_corners=False)), hp)


def test_merge_bad_arguments_raise():
  p, y = _hand_probs()
  with pytest.raises(ValueError, match="labels must be multi-hot"):
    L.merge_class_labels(p, y[:, :2])
  with pytest.raises(ValueError, match="out_size"):
    L.merged_pseudo_labels(p, y, out_size=(4,))


# --------------------------------------------------------------------------- seg loss
def _bf_seg_loss(z, lab, ignore=255):
  b_, h, w, k = z.shape
  sums = {"bg": 0.0, "fg": 0.0}
  counts = {"bg": 0, "fg": 0}
  for b in range(b_):
    for i in range(h):
      for j in range(w):
        t = int(lab[b, i, j])
        if t == ignore:
          continue
        row = z[b, i, j].astype(np.float64)
        nll = math.log(sum(math.exp(v) for v in row)) - row[t]
        key = "bg" if t == 0 else "fg"
        sums[key] += nll
        counts[key] += 1
  terms = [sums[k] / counts[k] if counts[k] else float("nan") for k in ("bg", "fg")]
  return terms


def _torch_seg_loss(torch, z, lab, ignore=255):
  pred = torch.tensor(z.transpose(0, 3, 1, 2))
  label = torch.tensor(lab.astype(np.int64))
  bg = torch.where(label != 0, torch.full_like(label, ignore), label)
  fg = torch.where(label == 0, torch.full_like(label, ignore), label)
  ce = torch.nn.functional.cross_entropy
  return 0.5 * (ce(pred, bg, ignore_index=ignore) + ce(pred, fg, ignore_index=ignore))


def test_seg_loss_matches_loops_and_torch():
  rng = np.random.default_rng(14)
  z = rng.normal(0, 2, (2, 5, 6, 4)).astype(np.float32)
  lab = rng.integers(0, 4, (2, 5, 6))
  lab[rng.uniform(size=lab.shape) < 0.2] = 255
  lab[1] = np.where(lab[1] == 255, 255, 0)  # image 1: background only
  bg, fg = _bf_seg_loss(z, lab)
  value = float(L.seg_loss(z, lab))
  np.testing.assert_allclose(value, 0.5 * (bg + fg), rtol=1e-5)
  np.testing.assert_allclose(float(L.seg_loss(z, lab, nan_on_empty=True)), value, rtol=1e-6)
  torch = pytest.importorskip("torch")
  np.testing.assert_allclose(value, float(_torch_seg_loss(torch, z, lab)), rtol=1e-5)


def test_seg_loss_empty_foreground_nan_switch():
  rng = np.random.default_rng(15)
  z = rng.normal(0, 2, (2, 4, 4, 3)).astype(np.float32)
  lab = np.where(rng.uniform(size=(2, 4, 4)) < 0.3, 255, 0)
  bg, fg = _bf_seg_loss(z, lab)
  assert math.isnan(fg)
  np.testing.assert_allclose(float(L.seg_loss(z, lab)), 0.5 * bg, rtol=1e-5)
  assert math.isnan(float(L.seg_loss(z, lab, nan_on_empty=True)))
  grad = np.asarray(jax.grad(lambda x: L.seg_loss(x, lab))(z))
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # Everything ignored: 0 by default, NaN as the reference.
  all_ignored = np.full((2, 4, 4), 255)
  assert float(L.seg_loss(z, all_ignored)) == 0.0
  assert math.isnan(float(L.seg_loss(z, all_ignored, nan_on_empty=True)))
  torch = pytest.importorskip("torch")
  assert math.isnan(float(_torch_seg_loss(torch, z, lab)))


def test_seg_loss_bad_arguments_raise():
  z = np.zeros((1, 2, 2, 3), np.float32)
  with pytest.raises(ValueError, match="ignore_index must not be a class index"):
    L.seg_loss(z, np.zeros((1, 2, 2), np.int32), ignore_index=2)
  with pytest.raises(ValueError, match="labels"):
    L.seg_loss(z, np.zeros((1, 2, 3), np.int32))


# --------------------------------------------------------------------------- patch contrast
def _bf_aff_mask(y, ignore=255):
  b_, n = y.shape
  a = np.zeros((b_, n, n), np.int64)
  for b in range(b_):
    for i in range(n):
      for j in range(n):
        if i == j or y[b, i] == ignore or y[b, j] == ignore:
          a[b, i, j] = ignore
        else:
          a[b, i, j] = int(y[b, i] == y[b, j])
  return a


def _bf_ptc(f, a):
  b_, n, _ = f.shape
  fn = f.astype(np.float64)
  pos_sum = neg_sum = 0.0
  n_pos = n_neg = 0
  for b in range(b_):
    for i in range(n):
      for j in range(n):
        ni = max(math.sqrt(sum(v * v for v in fn[b, i])), 1e-8)
        nj = max(math.sqrt(sum(v * v for v in fn[b, j])), 1e-8)
        s = abs(sum(fn[b, i] * fn[b, j]) / (ni * nj))
        if a[b, i, j] == 1:
          pos_sum += s
          n_pos += 1
        elif a[b, i, j] == 0:
          neg_sum += s
          n_neg += 1
  return 0.5 * (1 - pos_sum / (n_pos + 1)) + 0.5 * neg_sum / (n_neg + 1)


def _token_data(seed, b_=2, h=3, w=4, d=5, classes=3, ignore_frac=0.25):
  rng = np.random.default_rng(seed)
  f = rng.normal(0, 1, (b_, h, w, d)).astype(np.float32)
  y = rng.integers(0, classes, (b_, h, w))
  y[rng.uniform(size=y.shape) < ignore_frac] = 255
  return f, y


def test_patch_affinity_mask_matches_loops():
  _, y = _token_data(16)
  flat = y.reshape(y.shape[0], -1)
  expected = _bf_aff_mask(flat)
  np.testing.assert_array_equal(np.asarray(L.patch_affinity_mask(y)), expected)
  np.testing.assert_array_equal(np.asarray(L.patch_affinity_mask(flat)), expected)
  assert (expected == 1).any() and (expected == 0).any()
  with pytest.raises(ValueError, match="ignore_index must not be 0 or 1"):
    L.patch_affinity_mask(y, ignore_index=1)


def test_masked_ptc_loss_matches_loops():
  f, y = _token_data(17)
  a = _bf_aff_mask(y.reshape(2, -1))
  flat = f.reshape(2, -1, f.shape[-1])
  expected = _bf_ptc(flat, a)
  np.testing.assert_allclose(float(L.masked_ptc_loss(f, a)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(L.patch_contrast_loss(f, y)), expected, rtol=1e-5)
  # A zero feature vector (norm below eps) is handled like F.normalize: finite.
  f0 = flat.copy()
  f0[0, 3] = 0.0
  np.testing.assert_allclose(float(L.masked_ptc_loss(f0, a)), _bf_ptc(f0, a), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(jax.grad(L.masked_ptc_loss)(f0, a))))
  with pytest.raises(ValueError, match="aff_mask must have shape"):
    L.masked_ptc_loss(f, a[:, :5, :5])


def _torch_ptc(torch, f, a):
  x = torch.nn.functional.normalize(f, p=2, dim=-1, eps=1e-8)
  sim = torch.matmul(x, x.transpose(1, 2)).abs()
  pos = (a == 1).to(sim.dtype)
  neg = (a == 0).to(sim.dtype)
  return (0.5 * (1 - (pos * sim).sum() / (pos.sum() + 1)) +
          0.5 * (neg * sim).sum() / (neg.sum() + 1))


def test_masked_ptc_loss_value_and_gradient_match_torch():
  torch = pytest.importorskip("torch")
  f, y = _token_data(18, b_=3, h=4, w=4, d=8)
  flat = f.reshape(3, 16, 8)
  a = _bf_aff_mask(y.reshape(3, -1))
  tf = torch.tensor(flat.astype(np.float64), requires_grad=True)
  ref = _torch_ptc(torch, tf, torch.tensor(a))
  ref.backward()
  value, grad = jax.value_and_grad(L.masked_ptc_loss)(flat, a)
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tf.grad.numpy(), rtol=1e-4, atol=1e-6)
  assert np.abs(tf.grad.numpy()).max() > 1e-3


def _bf_supcon(f, y, t, base, ignore=255):
  b_, n, _ = f.shape
  z = f.astype(np.float64)
  z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  losses = []
  for b in range(b_):
    for i in range(n):
      if y[b, i] == ignore:
        continue
      others = [a for a in range(n) if a != i and y[b, a] != ignore]
      pos = [p for p in others if y[b, p] == y[b, i]]
      if not pos:
        continue
      denom = sum(math.exp(float(z[b, i] @ z[b, a]) / t) for a in others)
      acc = sum(float(z[b, i] @ z[b, p]) / t - math.log(denom) for p in pos)
      losses.append(-(t / base) * acc / len(pos))
  return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("t,base", [(0.07, None), (0.5, 0.07), (0.01, None)])
def test_supcon_patch_loss_matches_loops(t, base):
  f, y = _token_data(19, classes=3, ignore_frac=0.3)
  flat_f = f.reshape(2, -1, f.shape[-1])
  flat_y = y.reshape(2, -1)
  expected = _bf_supcon(flat_f, flat_y, t, t if base is None else base)
  value = L.supcon_patch_loss(f, y, temperature=t, base_temperature=base)
  np.testing.assert_allclose(float(value), expected, rtol=2e-5)
  np.testing.assert_allclose(
      float(L.patch_contrast_loss(f, y, form="supcon", temperature=t, base_temperature=base)),
      expected, rtol=2e-5)


def test_supcon_patch_loss_edge_cases():
  f, y = _token_data(20)
  # Every label unique within each image (no positive anywhere) or all ignored: 0.
  unique = np.arange(y[0].size).reshape(y.shape[1:])[None].repeat(2, 0)
  assert float(L.supcon_patch_loss(f, unique)) == 0.0
  assert float(L.supcon_patch_loss(f, np.full(y.shape, 255))) == 0.0
  g = np.asarray(jax.grad(L.supcon_patch_loss)(f, np.full(y.shape, 255)))
  assert np.all(g == 0)
  # Ignored patches change nothing: their features do not enter.
  g = np.asarray(jax.grad(L.supcon_patch_loss)(f, y))
  np.testing.assert_array_equal(g[y == 255], 0.0)
  assert np.all(np.isfinite(g)) and np.abs(g[y != 255]).max() > 0
  with pytest.raises(ValueError, match="temperature"):
    L.supcon_patch_loss(f, y, temperature=0.0)
  with pytest.raises(ValueError, match="token_labels must have shape"):
    L.supcon_patch_loss(f, y[:, :2])
  with pytest.raises(ValueError, match="form must be one of"):
    L.patch_contrast_loss(f, y, form="infonce")


def _torch_supcon(torch, f, y, t, ignore=255):
  z = torch.nn.functional.normalize(f, dim=-1, eps=1e-8)
  terms = []
  for b in range(f.shape[0]):
    for i in range(f.shape[1]):
      if y[b, i] == ignore:
        continue
      others = [a for a in range(f.shape[1]) if a != i and y[b, a] != ignore]
      pos = [p for p in others if y[b, p] == y[b, i]]
      if not pos:
        continue
      logits = (z[b, others] @ z[b, i]) / t
      log_prob = logits - torch.logsumexp(logits, 0)
      keep = torch.tensor([y[b, a] == y[b, i] for a in others])
      terms.append(-log_prob[keep].mean())
  return torch.stack(terms).mean()


def test_supcon_patch_loss_value_and_gradient_match_torch():
  torch = pytest.importorskip("torch")
  f, y = _token_data(21, b_=2, h=4, w=4, d=6, classes=3, ignore_frac=0.2)
  flat_f = f.reshape(2, 16, 6)
  flat_y = y.reshape(2, 16)
  tf = torch.tensor(flat_f.astype(np.float64), requires_grad=True)
  ref = _torch_supcon(torch, tf, flat_y, 0.1)
  ref.backward()
  value, grad = jax.value_and_grad(
      lambda x: L.supcon_patch_loss(x, flat_y, temperature=0.1))(flat_f)
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tf.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_confident_token_labels_feed_ptc():
  # The high/low confidence split: low-confidence patches drop out of every pair.
  merged = np.array([[[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.3, 0.7]]], np.float32)
  y = np.asarray(L.confident_labels(merged, threshold=0.6))
  np.testing.assert_array_equal(y, [[0, 255, 1, 1]])
  a = np.asarray(L.patch_affinity_mask(y))
  assert np.all(a[0, 1] == 255) and np.all(a[0, :, 1] == 255)
  assert a[0, 2, 3] == 1 and a[0, 0, 2] == 0


# --------------------------------------------------------------------------- ET (ViT-PCM)
def _bf_flip_one(img, lr, ud, tr, inverse=False):
  """One image [g, g, C]; ViT-PCM order lr -> ud -> transpose (reversed for the inverse)."""
  g = img.shape[0]
  ops = [("lr", lr), ("ud", ud), ("tr", tr)]
  if inverse:
    ops = ops[::-1]
  out = img.copy()
  for name, on in ops:
    if not on:
      continue
    new = np.empty_like(out)
    for i in range(g):
      for j in range(g):
        if name == "lr":
          new[i, j] = out[i, g - 1 - j]
        elif name == "ud":
          new[i, j] = out[g - 1 - i, j]
        else:
          new[i, j] = out[j, i]
    out = new
  return out


def _all_flag_combos():
  return np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], np.float32)


def test_apply_and_revert_flips_match_loops():
  flags = _all_flag_combos()
  x = np.random.default_rng(22).normal(size=(8, 4, 4, 3)).astype(np.float32)
  applied = np.asarray(L.apply_flips(x, flags))
  reverted = np.asarray(L.revert_flips(x, flags))
  for b in range(8):
    np.testing.assert_array_equal(applied[b], _bf_flip_one(x[b], *flags[b]))
    np.testing.assert_array_equal(reverted[b], _bf_flip_one(x[b], *flags[b], inverse=True))
  np.testing.assert_array_equal(np.asarray(L.revert_flips(applied, flags)), x)
  # lr + transpose do not commute: the inverse is not the forward map.
  assert not np.array_equal(applied[5], reverted[5])  # flags (1, 0, 1)
  with pytest.raises(ValueError, match="square grid"):
    L.apply_flips(x[:, :3], flags)
  with pytest.raises(ValueError, match="flips must be"):
    L.apply_flips(x, flags[:, :2])


def test_mosaic_layout_matches_loops_and_round_trips():
  x = np.random.default_rng(23).normal(size=(8, 3, 3, 2)).astype(np.float32)
  mosaic = np.asarray(L.mosaic_2x2(x))
  assert mosaic.shape == (2, 6, 6, 2)
  for m in range(2):
    for r in range(2):
      for q in range(2):
        for i in range(3):
          for j in range(3):
            np.testing.assert_array_equal(mosaic[m, r * 3 + i, q * 3 + j],
                                          x[4 * m + 2 * r + q, i, j])
  np.testing.assert_array_equal(np.asarray(L.unmosaic_2x2(mosaic)), x)
  with pytest.raises(ValueError, match="divisible by 4"):
    L.mosaic_2x2(x[:6])


def test_crop_resize_patches_matches_loops():
  rng = np.random.default_rng(24)
  x = rng.uniform(size=(3, 6, 6, 2)).astype(np.float32)
  offsets = np.array([[0, 2], [1, 1], [2, 0]], np.int32)
  mask = np.array([True, False, True])
  got = np.asarray(L.crop_resize_patches(x, out_size=5, crop_size=4, crop_offsets=offsets,
                                         crop_mask=mask))
  for b in range(3):
    if mask[b]:
      y0, x0 = offsets[b]
      src = x[b:b + 1, y0:y0 + 4, x0:x0 + 4]
    else:
      src = x[b:b + 1]
    np.testing.assert_allclose(got[b], _bf_resize_align_corners(src, (5, 5))[0], rtol=1e-5,
                               atol=1e-7)
  # Crop size equal to the output size: the crop itself, no interpolation.
  same = np.asarray(L.crop_resize_patches(x, out_size=4, crop_size=4, crop_offsets=offsets))
  np.testing.assert_array_equal(same[1], x[1, 1:5, 1:5])
  with pytest.raises(ValueError, match="crop_offsets"):
    L.crop_resize_patches(x, out_size=4, crop_size=4)


def test_keras_categorical_crossentropy_hand_values_and_loops():
  # Unnormalised prediction (renormalised first) and a clipped zero.
  val = L.keras_categorical_crossentropy(np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
                                         np.array([[2.0, 2.0], [1.0, 0.0]], np.float32))
  np.testing.assert_allclose(np.asarray(val), [math.log(2), -math.log(1e-7)], rtol=1e-5)
  rng = np.random.default_rng(25)
  t = _softmax_np(rng.normal(size=(4, 5)))
  p = rng.uniform(size=(4, 5))
  expected = []
  for b in range(4):
    s = sum(p[b])
    expected.append(-sum(t[b, c] * math.log(min(max(p[b, c] / s, 1e-7), 1 - 1e-7))
                         for c in range(5)))
  np.testing.assert_allclose(np.asarray(L.keras_categorical_crossentropy(
      t.astype(np.float32), p.astype(np.float32))), expected, rtol=1e-5)


def _bf_equivariance(teacher, mosaics, labels, f1, f2, crop_size, offsets, mask):
  b_, g, _, c_ = teacher.shape
  s = mosaics.shape[1] // 2
  total, count = 0.0, 0
  for b in range(b_):
    t = _bf_flip_one(teacher[b], *f1[b], inverse=True)
    if mask[b]:
      y0, x0 = offsets[b]
      t = t[y0:y0 + crop_size, x0:x0 + crop_size]
    t = _bf_resize_align_corners(t[None].astype(np.float64), (s, s))[0]
    t = _bf_flip_one(t, *f2[b])
    t = _bf_merge(t[None], labels[b:b + 1])[0]
    m, r, q = b // 4, (b % 4) // 2, b % 2
    for i in range(s):
      for j in range(s):
        pred = mosaics[m, r * s + i, q * s + j].astype(np.float64)
        pred = pred / pred.sum()
        total += -sum(t[i, j, c] * math.log(min(max(pred[c], 1e-7), 1 - 1e-7))
                      for c in range(c_))
        count += 1
  return total / count


def test_equivariance_loss_matches_loops_and_stops_teacher_gradient():
  rng = np.random.default_rng(26)
  teacher = _patch_probs(27, (8, 6, 6, 4), scale=2.0)
  mosaics = _patch_probs(28, (2, 8, 8, 4), scale=2.0)
  labels = np.array([[1, 1, 0, 1], [1, 0, 1, 0]] * 4, np.float32)
  f1 = _all_flag_combos()
  f2 = _all_flag_combos()[rng.permutation(8)]
  offsets = rng.integers(0, 3, (8, 2)).astype(np.int32)
  mask = rng.uniform(size=8) < 0.5
  kw = dict(teacher_flips=f1, student_flips=f2, crop_size=4, crop_offsets=offsets,
            crop_mask=mask)
  loss = jax.jit(functools.partial(L.equivariance_loss, **kw))
  expected = _bf_equivariance(teacher, mosaics, labels, f1, f2, 4, offsets, mask)
  np.testing.assert_allclose(float(loss(teacher, mosaics, labels)), expected, rtol=1e-5)
  g_t, g_s = jax.grad(loss, argnums=(0, 1))(teacher, mosaics, labels)
  assert np.all(np.asarray(g_t) == 0)
  assert np.all(np.isfinite(np.asarray(g_s))) and np.abs(np.asarray(g_s)).max() > 0


def test_equivariance_loss_is_the_target_entropy_when_the_student_agrees():
  teacher = _patch_probs(30, (4, 8, 8, 3), scale=2.0)
  labels = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], np.float32)
  f1 = _all_flag_combos()[[1, 3, 5, 6]]
  f2 = _all_flag_combos()[[7, 2, 4, 0]]
  # Student grid 4x4: the teacher (8x8) is resized; no crop.
  targets = []
  for b in range(4):
    t = _bf_flip_one(teacher[b], *f1[b], inverse=True)
    t = _bf_resize_align_corners(t[None].astype(np.float64), (4, 4))[0]
    targets.append(_bf_merge(_bf_flip_one(t, *f2[b])[None], labels[b:b + 1])[0])
  targets = np.stack(targets).astype(np.float32)
  # A student that predicts exactly the targets (absent classes are 0 in both).
  mosaic = np.asarray(L.mosaic_2x2(targets))
  entropy = np.mean([-sum(v * math.log(min(max(v, 1e-7), 1 - 1e-7)) for v in row)
                     for row in targets.reshape(-1, 3)])
  value = float(L.equivariance_loss(teacher, mosaic, labels, teacher_flips=f1,
                                    student_flips=f2))
  np.testing.assert_allclose(value, entropy, rtol=1e-5)
  # Any mis-bookkeeping (tiles swapped, a flag ignored) costs more.
  swapped = np.asarray(L.mosaic_2x2(targets[[1, 0, 2, 3]]))
  assert float(L.equivariance_loss(teacher, swapped, labels, teacher_flips=f1,
                                   student_flips=f2)) > value + 0.05
  assert float(L.equivariance_loss(teacher, mosaic, labels, teacher_flips=f2,
                                   student_flips=f2)) > value + 0.05
