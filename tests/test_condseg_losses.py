"""ConDSeg losses against hand-computed values, numpy formulas and (if present) torch."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.methods import condseg_losses as L


def _rand(rng, shape, lo=0.0, hi=1.0):
  return rng.uniform(lo, hi, shape).astype(np.float32)


# --------------------------------------------------------------------------- BCE
def test_bce_hand_values_and_clamp():
  p = np.array([[0.2, 0.9, 0.0, 1.0]], np.float32)
  t = np.array([[0.0, 1.0, 1.0, 1.0]], np.float32)
  expected = (-math.log(0.8) - math.log(0.9) + 100.0 + 0.0) / 4
  np.testing.assert_allclose(float(L.binary_cross_entropy(p, t)), expected, rtol=1e-6)
  # Soft target: -(0.3 log 0.6 + 0.7 log 0.4).
  soft = L.binary_cross_entropy(np.array([[0.6]], np.float32), np.array([[0.3]], np.float32))
  np.testing.assert_allclose(float(soft), -(0.3 * math.log(0.6) + 0.7 * math.log(0.4)),
                             rtol=1e-6)


def test_bce_gradient_is_torch_formula_even_when_clamped():
  p = np.array([[0.25, 0.0, 1.0]], np.float32)
  t = np.array([[1.0, 1.0, 0.0]], np.float32)
  g = np.asarray(jax.grad(L.binary_cross_entropy)(p, t))
  expected = (p - t) / np.maximum(p * (1 - p), 1e-12) / p.size
  np.testing.assert_allclose(g, expected, rtol=1e-5)
  assert np.all(np.isfinite(g))


def test_bce_with_logits_matches_probability_bce_and_is_stable():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 2, (3, 5, 5, 1)).astype(np.float32)
  t = _rand(rng, z.shape)
  np.testing.assert_allclose(float(L.bce_with_logits(z, t)),
                             float(L.binary_cross_entropy(jax.nn.sigmoid(z), t)), rtol=1e-5)
  big = np.array([[80.0, -80.0]], np.float32)
  # sigmoid saturates to exactly 1/0 in float32; the logits form stays exact.
  np.testing.assert_allclose(float(L.bce_with_logits(big, np.array([[0.0, 1.0]]))), 80.0,
                             rtol=1e-6)


def test_bce_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  p = _rand(rng, (2, 6, 6, 1))
  p[0, 0, 0, 0], p[1, 0, 0, 0] = 0.0, 1.0
  t = _rand(rng, p.shape)
  tp = torch.tensor(p, requires_grad=True)
  ref = torch.nn.functional.binary_cross_entropy(tp, torch.tensor(t))
  ref.backward()
  value, grad = jax.value_and_grad(L.binary_cross_entropy)(p, t)
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), tp.grad.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- Dice
def test_dice_hand_value_and_whole_batch_pooling():
  s = np.array([[0.5, 0.5]], np.float32)
  t = np.array([[1.0, 0.0]], np.float32)
  np.testing.assert_allclose(float(L.dice_loss(s, t)), 1 - 2 / 3, rtol=1e-6)
  # Two images: the pooled Dice is not the mean of the per-image Dice.
  s2 = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
  t2 = np.array([[1.0, 1.0], [1.0, 0.0]], np.float32)
  pooled = 1 - (2 * 2 + 1) / (2 + 3 + 1)
  per_image = np.mean([1 - 5 / 5, 1 - 1 / 2])
  np.testing.assert_allclose(float(L.dice_loss(s2, t2)), pooled, rtol=1e-6)
  assert abs(pooled - per_image) > 0.05


def test_dice_bce_double_sigmoid_matches_torch_reference():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  p = _rand(rng, (3, 8, 8, 1))
  t = (_rand(rng, p.shape) > 0.6).astype(np.float32)
  tp = torch.tensor(p, requires_grad=True)
  # The reference DiceBCELoss (utils/metrics.py), written out.
  s = torch.sigmoid(tp).view(-1)
  tt = torch.tensor(t).view(-1)
  ref = (torch.nn.functional.binary_cross_entropy(s, tt)
         + 1 - (2 * (s * tt).sum() + 1) / (s.sum() + tt.sum() + 1))
  ref.backward()
  fn = lambda x: L.dice_bce(x, t, from_logits=False, double_sigmoid=True)
  value, grad = jax.value_and_grad(fn)(p)
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tp.grad.numpy(), rtol=1e-4, atol=1e-9)


def test_double_sigmoid_bce_floors():
  """Spec §2.2: with the double sigmoid the BCE cannot go below 0.693 / 0.313."""
  zeros = np.zeros((1, 4, 4, 1), np.float32)
  ones = np.ones((1, 4, 4, 1), np.float32)
  bce0, _ = L.dice_bce_terms(zeros, zeros, from_logits=False, double_sigmoid=True)
  bce1, _ = L.dice_bce_terms(ones, ones, from_logits=False, double_sigmoid=True)
  np.testing.assert_allclose(float(bce0), math.log(2.0), rtol=1e-6)  # 0.693
  np.testing.assert_allclose(float(bce1), -math.log(1 / (1 + math.exp(-1))), rtol=1e-6)
  assert abs(float(bce1) - 0.3133) < 1e-3
  # The corrected path reaches ~0 with confident logits.
  bce0c, dice0c = L.dice_bce_terms(zeros - 20, ones, from_logits=True,
                                   double_sigmoid=False)
  assert float(bce0c) > 19  # wrong and confident: large, not floored
  bce1c, dice1c = L.dice_bce_terms(ones * 20, ones, from_logits=True, double_sigmoid=False)
  assert float(bce1c) < 1e-6 and float(dice1c) < 1e-6
  del dice0c


def test_dice_bce_corrected_logits_equals_probability_form():
  rng = np.random.default_rng(3)
  z = rng.normal(0, 1.5, (2, 6, 6, 1)).astype(np.float32)
  t = _rand(rng, z.shape)
  from_logits = L.dice_bce(z, t, from_logits=True, double_sigmoid=False)
  from_prob = L.dice_bce(jax.nn.sigmoid(z), t, from_logits=False, double_sigmoid=False)
  np.testing.assert_allclose(float(from_logits), float(from_prob), rtol=1e-5)
  # And logits + double sigmoid = probabilities + double sigmoid.
  np.testing.assert_allclose(
      float(L.dice_bce(z, t, from_logits=True, double_sigmoid=True)),
      float(L.dice_bce(jax.nn.sigmoid(z), t, from_logits=False, double_sigmoid=True)),
      rtol=1e-6)


@pytest.mark.parametrize("double_sigmoid", [False, True])
def test_weights_exclude_padded_examples(double_sigmoid):
  rng = np.random.default_rng(4)
  z = rng.normal(0, 1, (4, 5, 5, 1)).astype(np.float32)
  t = _rand(rng, z.shape)
  valid = np.array([True, False, True, False])
  got = L.dice_bce(z, t, from_logits=True, double_sigmoid=double_sigmoid, weights=valid)
  want = L.dice_bce(z[valid], t[valid], from_logits=True, double_sigmoid=double_sigmoid)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  got_c = L.binary_consistency_loss(z, -z, from_logits=True, weights=valid)
  want_c = L.binary_consistency_loss(z[valid], -z[valid], from_logits=True)
  np.testing.assert_allclose(float(got_c), float(want_c), rtol=1e-6)
  with pytest.raises(ValueError, match="weights"):
    L.dice_loss(z, t, weights=np.ones(3))


# --------------------------------------------------------------------------- consistency
def test_consistency_hand_value_and_stop_gradient():
  p = np.array([[0.8, 0.3]], np.float32)
  q = np.array([[0.6, 0.7]], np.float32)
  # targets: 1[q>0.5] = [1, 1] for p; 1[p>0.5] = [1, 0] for q.
  expected = (-math.log(0.8) - math.log(0.3)) / 2 + (-math.log(0.6) - math.log(0.3)) / 2
  value = L.binary_consistency_loss(p, q, from_logits=False)
  np.testing.assert_allclose(float(value), expected, rtol=1e-6)
  gp, gq = jax.grad(lambda a, b: L.binary_consistency_loss(a, b, from_logits=False),
                    argnums=(0, 1))(p, q)
  # Gradient of BCE with the binarised targets held fixed (they are constants).
  np.testing.assert_allclose(np.asarray(gp), (p - [[1.0, 1.0]]) / (p * (1 - p)) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gq), (q - [[1.0, 0.0]]) / (q * (1 - q)) / 2,
                             rtol=1e-5)


def test_consistency_logits_equals_probabilities():
  rng = np.random.default_rng(5)
  a = rng.normal(0, 2, (2, 4, 4, 1)).astype(np.float32)
  b = rng.normal(0, 2, a.shape).astype(np.float32)
  np.testing.assert_allclose(
      float(L.binary_consistency_loss(a, b, from_logits=True)),
      float(L.binary_consistency_loss(jax.nn.sigmoid(a), jax.nn.sigmoid(b),
                                      from_logits=False)), rtol=1e-5)
  # Agreeing confident predictions give ~0; disagreeing ones a large loss.
  confident = np.sign(a) * 20
  assert float(L.binary_consistency_loss(confident, confident, from_logits=True)) < 1e-6
  assert float(L.binary_consistency_loss(confident, -confident, from_logits=True)) > 30


# --------------------------------------------------------------------------- beta
def test_beta_batch_summed_as_reference():
  m = np.full((2, 4, 4, 1), 0.25, np.float32)
  np.testing.assert_allclose(float(L.beta_weight(m)), 1 / math.tanh(2 * 0.25), rtol=1e-6)
  # The reference's beta depends on the batch size; per_image_mean does not.
  m4 = np.concatenate([m, m])
  assert float(L.beta_weight(m4)) < float(L.beta_weight(m)) - 0.3
  np.testing.assert_allclose(float(L.beta_weight(m4, per_image_mean=True)),
                             float(L.beta_weight(m, per_image_mean=True)), rtol=1e-6)
  np.testing.assert_allclose(float(L.beta_weight(m, per_image_mean=True)),
                             1 / math.tanh(0.25), rtol=1e-6)
  # Empty prediction: 1 / (0 + 1e-15).
  np.testing.assert_allclose(float(L.beta_weight(np.zeros_like(m))), 1e15, rtol=1e-6)
  # Padded examples add no area.
  padded = np.concatenate([m, np.ones_like(m)])
  np.testing.assert_allclose(float(L.beta_weight(padded, np.array([1, 1, 0, 0]))),
                             float(L.beta_weight(m)), rtol=1e-6)


def test_beta_is_not_detached():
  m = np.full((1, 4, 4, 1), 0.1, np.float32)
  g = np.asarray(jax.grad(lambda x: L.beta_weight(x))(m))
  a = 0.1 * 16 / 16
  expected = -(1 - math.tanh(a) ** 2) / math.tanh(a) ** 2 / 16
  np.testing.assert_allclose(g, np.full_like(m, expected), rtol=1e-5)


# --------------------------------------------------------------------------- complementary
def _complementary_numpy(fg, bg, uc):
  b, h, w = fg.shape[:3]
  total = 0.0
  for i in range(b):
    for y in range(h):
      for x in range(w):
        e = np.exp([fg[i, y, x, 0], bg[i, y, x, 0], uc[i, y, x, 0]], dtype=np.float64)
        pf, pb, pu = e / e.sum()
        total += pf * pb + pf * pu + pb * pu
  return total / (b * h * w)


def test_complementary_loss_matches_numpy_loops():
  rng = np.random.default_rng(6)
  fg, bg, uc = (_rand(rng, (2, 5, 4, 1)) for _ in range(3))
  np.testing.assert_allclose(float(L.complementary_loss(fg, bg, uc)),
                             _complementary_numpy(fg, bg, uc), rtol=1e-5)
  # Equal maps: each P = 1/3, loss = 3 * 1/9.
  same = np.full((1, 3, 3, 1), 0.7, np.float32)
  np.testing.assert_allclose(float(L.complementary_loss(same, same, same)), 1 / 3, rtol=1e-6)
  w = np.array([1.0, 0.0])
  np.testing.assert_allclose(float(L.complementary_loss(fg, bg, uc, w)),
                             _complementary_numpy(fg[:1], bg[:1], uc[:1]), rtol=1e-5)


# --------------------------------------------------------------------------- stage 2
def _stage2_outputs(rng, shape=(2, 8, 8, 1)):
  out = {}
  for name in ("mask", "fg", "bg", "uc"):
    z = rng.normal(0, 1.5, shape).astype(np.float32)
    out[f"{name}_logits"] = z
    out[name] = np.asarray(jax.nn.sigmoid(z))
  return out


@pytest.mark.parametrize("double_sigmoid", [False, True])
def test_stage2_loss_composition(double_sigmoid):
  rng = np.random.default_rng(7)
  out = _stage2_outputs(rng)
  y = (_rand(rng, out["mask"].shape) > 0.5).astype(np.float32)
  batch = {"mask": y, "background": 1 - y}
  loss, metrics = L.condseg_stage2_loss(out, batch, {"double_sigmoid": double_sigmoid})

  def dbce(name, target):
    key = name if double_sigmoid else f"{name}_logits"
    return float(L.dice_bce(out[key], target, from_logits=not double_sigmoid,
                            double_sigmoid=double_sigmoid))

  b1 = 1 / (math.tanh(out["fg"].sum() / 64) + 1e-15)
  b2 = 1 / (math.tanh(out["bg"].sum() / 64) + 1e-15)
  compl = _complementary_numpy(out["fg"], out["bg"], out["uc"])
  expected = dbce("mask", y) + b1 * dbce("fg", y) + b2 * dbce("bg", 1 - y) + compl
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["beta1"]), b1, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_compl"]), compl, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_bg"]), dbce("bg", 1 - y), rtol=1e-5)
  assert set(metrics) >= {"loss", "loss_mask", "loss_fg", "loss_bg", "loss_compl",
                          "beta1", "beta2"}


def test_stage2_loss_valid_mask_and_jit():
  rng = np.random.default_rng(8)
  out = _stage2_outputs(rng, (3, 8, 8, 1))
  y = (_rand(rng, out["mask"].shape) > 0.5).astype(np.float32)
  batch = {"mask": y, "background": 1 - y, "valid": np.array([True, True, False])}
  cfg = {"double_sigmoid": False}
  loss, _ = jax.jit(lambda o, b: L.condseg_stage2_loss(o, b, cfg))(out, batch)
  sub_out = {k: v[:2] for k, v in out.items()}
  sub_batch = {"mask": y[:2], "background": 1 - y[:2]}
  want, _ = L.condseg_stage2_loss(sub_out, sub_batch, cfg)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert jnp.isfinite(loss)
