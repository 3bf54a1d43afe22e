"""SiamSeg/DACS building blocks against independent computations (NumPy, torch, mmcv's
formulas written out): ClassMix, EMA, pseudo-label weight, CE reduction, the per-group
learning-rate schedule, augmentations."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastjax import spine
from contrastjax.augment import views
from contrastjax.configs import siamseg as siamseg_cfg
from contrastjax.methods import dacs, siamseg_losses


# ----------------------------------------------------------------------------- ClassMix
def test_class_mix_masks_choose_half_of_present_classes_per_image():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, (6, 16, 16)).astype(np.int32)   # classes 0..3 of C = 7
  labels[0] = 2                                                # one class -> ceil(1/2) = 1
  labels[1, :8] = 255                                          # ignored pixels never chosen
  labels[2] = np.where(labels[2] == 3, 6, labels[2])           # classes 0, 1, 2, 6
  masks = np.asarray(dacs.class_mix_masks(jax.random.PRNGKey(1), jnp.asarray(labels), 7))
  for i in range(labels.shape[0]):
    present = sorted(set(np.unique(labels[i])) - {255})
    chosen = sorted(set(np.unique(labels[i][masks[i] > 0])))
    assert len(chosen) == (len(present) + 1) // 2, (i, present, chosen)
    assert set(chosen) <= set(present)
    np.testing.assert_array_equal(masks[i] > 0, np.isin(labels[i], chosen))
  assert not masks[1][:8].any()


def test_class_mix_choice_is_uniform_and_batch_scope():
  present = jnp.asarray([True, False, True, True, True, False])   # n = 4 -> choose 2
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  chosen = np.asarray(jax.vmap(dacs.choose_half, in_axes=(0, None))(keys, present))
  assert (chosen.sum(1) == 2).all() and not chosen[:, [1, 5]].any()
  np.testing.assert_allclose(chosen[:, [0, 2, 3, 4]].mean(0), 0.5, atol=0.04)
  # 'batch' (paper runs): classes come from the whole batch's label set.
  labels = jnp.stack([jnp.zeros((8, 8), jnp.int32), jnp.full((8, 8), 3, jnp.int32)])
  m = np.asarray(dacs.class_mix_masks(jax.random.PRNGKey(2), labels, 4, scope="batch"))
  # Each image has one class, the batch two: one of {0, 3} chosen per image.
  assert set(np.unique(m)) <= {0.0, 1.0}
  with pytest.raises(ValueError, match="scope"):
    dacs.class_mix_masks(jax.random.PRNGKey(2), labels, 4, scope="pixel")


def test_class_mix_mixes_images_labels_and_weights():
  m = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
  src, tgt = jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3))
  np.testing.assert_array_equal(dacs.class_mix(m, src, tgt)[..., 0], m)
  w = dacs.class_mix(m, jnp.ones_like(m), jnp.full_like(m, 0.3))
  np.testing.assert_allclose(w, [[[1.0, 0.3], [0.3, 1.0]]])


# ----------------------------------------------------------------------------- EMA
def test_ema_alpha_ramp_and_update():
  for it, want in ((0, 0.0), (1, 0.5), (9, 0.9), (999, 0.999), (5000, 0.999)):
    np.testing.assert_allclose(float(dacs.ema_alpha(it, 0.999)), min(1 - 1 / (it + 1), 0.999),
                               rtol=1e-6)
    assert math.isclose(min(1 - 1 / (it + 1), 0.999), want, rel_tol=1e-6, abs_tol=1e-9)
  t = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(3.0)}}
  s = {"a": jnp.asarray([5.0, 6.0]), "b": {"c": jnp.asarray(-1.0)}}
  out = dacs.ema_update(t, s, 3, 0.999)          # alpha = 0.75
  np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * 6])
  np.testing.assert_allclose(out["b"]["c"], 0.75 * 3 - 0.25)
  np.testing.assert_allclose(dacs.ema_update(t, s, 0, 0.999)["a"], s["a"])  # iter 0: a copy
  teacher = dacs.EMATeacher(0.99, 0.968)
  np.testing.assert_allclose(teacher.update(t, s, 1000)["a"], 0.99 * t["a"] + 0.01 * s["a"],
                             rtol=1e-6)


# ----------------------------------------------------------------------------- pseudo-labels
def test_pseudo_label_weight_is_the_confident_fraction_of_the_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 4, (3, 5, 7, 4)).astype(np.float32)
  label, weight = dacs.pseudo_label_weight(jnp.asarray(logits), 0.968)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  np.testing.assert_array_equal(label, p.argmax(-1))
  np.testing.assert_allclose(float(weight), float((p.max(-1) >= 0.968).mean()), rtol=1e-6)
  assert 0 < float(weight) < 1
  _, w1 = dacs.pseudo_label_weight(jnp.asarray(logits), None)
  assert float(w1) == 1.0


def test_per_group_statistics_pseudo_weight_and_class_set():
  """``group_size``: the reference's per-GPU pseudo weight and batch-scope ClassMix class
  set, as the whole-batch functions applied to each group."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(0, 4, (4, 5, 7, 3)).astype(np.float32))
  _, w = dacs.pseudo_label_weight(logits, 0.9, group_size=2)
  want = [float(dacs.pseudo_label_weight(logits[2 * g:2 * g + 2], 0.9)[1]) for g in range(2)]
  np.testing.assert_allclose(w, np.repeat(want, 2), rtol=1e-6)
  assert want[0] != want[1]
  _, w_all = dacs.pseudo_label_weight(logits, 0.9, group_size=4)
  np.testing.assert_allclose(w_all, float(dacs.pseudo_label_weight(logits, 0.9)[1]), rtol=1e-6)
  with pytest.raises(ValueError, match="stat_group_size=3 must divide"):
    dacs.pseudo_label_weight(logits, 0.9, group_size=3)
  labels = jnp.asarray(rng.integers(0, 2, (4, 6, 6)) + 2 * (np.arange(4) >= 2)[:, None, None],
                       jnp.int32)                # images 0-1: classes {0, 1}; 2-3: {2, 3}
  key = jax.random.PRNGKey(5)
  m_group = dacs.class_mix_masks(key, labels, 4, scope="batch", group_size=2)
  for g in range(2):   # a group's masks only pick classes present in that group
    sl = slice(2 * g, 2 * g + 2)
    picked = set(np.unique(np.asarray(labels[sl])[np.asarray(m_group[sl]) > 0]).tolist())
    assert picked <= {2 * g, 2 * g + 1}
  # group of 1 = per-image scope; group of the batch = whole-batch scope (same key)
  np.testing.assert_array_equal(dacs.class_mix_masks(key, labels, 4, "batch", group_size=1),
                                dacs.class_mix_masks(key, labels, 4, "image"))
  np.testing.assert_array_equal(dacs.class_mix_masks(key, labels, 4, "batch", group_size=4),
                                dacs.class_mix_masks(key, labels, 4, "batch"))


# ----------------------------------------------------------------------------- losses
def test_seg_cross_entropy_matches_mmseg_reduction_via_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 6, 5)).astype(np.int64)
  labels[0, :2] = 255
  cw = [1, 1, 1, 1.25, 1.5, 1.5, 1.0]
  pw = rng.uniform(0.2, 1.0, (2, 6, 5)).astype(np.float32)
  t_logits = torch.from_numpy(logits).permute(0, 3, 1, 2)
  per = torch.nn.functional.cross_entropy(
      t_logits, torch.from_numpy(labels), weight=torch.tensor(cw, dtype=torch.float32),
      reduction="none", ignore_index=255)
  want = (per * torch.from_numpy(pw)).mean().item()        # mean over ALL pixels
  got = siamseg_losses.seg_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), cw,
                            jnp.asarray(pw))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  want_nonign = (per * torch.from_numpy(pw)).sum().item() / float((labels != 255).sum())
  got_nonign = siamseg_losses.seg_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), cw,
                                   jnp.asarray(pw), avg_non_ignore=True)
  np.testing.assert_allclose(float(got_nonign), want_nonign, rtol=1e-5)
  with pytest.raises(ValueError, match="class_weight"):
    siamseg_losses.seg_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32), [1.0, 2.0])


def test_simsiam_loss_symmetric_negative_cosine_with_stop_gradient():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(4))
  cos = torch.nn.CosineSimilarity(dim=1)
  t = [torch.from_numpy(a) for a in (p1, p2, z1, z2)]
  want = -(cos(t[0], t[3]).mean() + cos(t[1], t[2]).mean()).item() * 0.5
  got = siamseg_losses.simsiam_loss(*(jnp.asarray(a) for a in (p1, p2, z1, z2)))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  gz = jax.grad(lambda z: siamseg_losses.simsiam_loss(jnp.asarray(p1), jnp.asarray(p2), z, z))(
      jnp.asarray(z1))
  assert float(jnp.abs(gz).max()) == 0.0


# ----------------------------------------------------------------------------- schedule
def _mmcv_lr(base_lr, t, total=40000, warmup=1500, ratio=1e-6, power=1.0):
  regular = base_lr * (1 - t / total) ** power
  if t < warmup:
    return regular * (1 - (1 - t / warmup) * (1 - ratio))
  return regular


def test_learning_rate_per_parameter_group_follows_mmcv():
  """One AdamW step at step t on a gradient of ones: the update of each parameter reveals its
  group's learning rate and weight decay (rules of the reference's ``paramwise_cfg``)."""
  c = siamseg_cfg.get_config("loveda")
  params = {
      "backbone": {"patch_embed1": {"norm": {"scale": 1.0}, "proj": {"kernel": 1.0}},
                   "block1_0": {"norm1": {"scale": 1.0}, "norm2": {"bias": 1.0},
                                "attn": {"norm": {"scale": 1.0}, "q": {"bias": 1.0}}},
                   # scan_blocks layout (the full model's default): blocks stacked
                   "block3": {"norm1": {"scale": np.ones(2)},
                              "mlp": {"fc1": {"kernel": np.ones(2)}}},
                   "norm1": {"scale": 1.0}},
      "decode_head": {"bn": {"scale": 1.0}, "conv_seg": {"kernel": 1.0}},
      "simsiam": {"projector_bn0": {"scale": 1.0}},
  }
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  # (lr_mult, wd_mult) in mmcv: 'head' -> (10, 1); 'norm' in the torch name -> (1, 0); stage
  # norms (torch layers.i.2) and biases keep decay.
  expect = {
      ("backbone", "patch_embed1", "norm", "scale"): (1, 0),
      ("backbone", "patch_embed1", "proj", "kernel"): (1, 1),
      ("backbone", "block1_0", "norm1", "scale"): (1, 0),
      ("backbone", "block1_0", "norm2", "bias"): (1, 0),
      ("backbone", "block1_0", "attn", "norm", "scale"): (1, 0),
      ("backbone", "block1_0", "attn", "q", "bias"): (1, 1),
      ("backbone", "block3", "norm1", "scale"): (1, 0),
      ("backbone", "block3", "mlp", "fc1", "kernel"): (1, 1),
      ("backbone", "norm1", "scale"): (1, 1),
      ("decode_head", "bn", "scale"): (10, 1),
      ("decode_head", "conv_seg", "kernel"): (10, 1),
      ("simsiam", "projector_bn0", "scale"): (1, 1),
  }
  tx = spine.make_optimizer(c.optimizer, params, c.total_steps)
  grads = jax.tree.map(jnp.ones_like, params)
  b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
  for t in (0, 1, 749, 1499, 1500, 20000, 39999):
    state = tx.init(params)
    state = jax.tree.map(lambda x: jnp.full_like(x, t) if x.dtype == jnp.int32 else x, state)
    updates, _ = tx.update(grads, state, params)
    flat = {tuple(p.key for p in path): float(v.reshape(-1)[0])
            for path, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
    c1 = t + 1
    adam = ((1 - b1) / (1 - b1 ** c1)) / (math.sqrt((1 - b2) / (1 - b2 ** c1)) + eps)
    for key, (lr_mult, wd_mult) in expect.items():
      lr = _mmcv_lr(6e-5 * lr_mult, t)
      want = -lr * (adam + wd * wd_mult * 1.0)
      np.testing.assert_allclose(flat[key], want, rtol=2e-5, err_msg=f"{key} at t={t}")


def test_mmcv_poly_schedule_values():
  sched = spine.mmcv_poly_schedule(6e-4, 40000, 1500, power=1.0, warmup_ratio=1e-6)
  for t in (0, 1, 749, 1499, 1500, 20000, 39999, 40000):
    np.testing.assert_allclose(float(sched(t)), _mmcv_lr(6e-4, t), rtol=1e-5, atol=1e-12)
  cfg = ml_collections.ConfigDict(dict(schedule="nope"))
  with pytest.raises(ValueError, match="warmup_poly_mmcv"):
    spine.learning_rate_schedule(cfg, 1.0, 10)


# ----------------------------------------------------------------------------- augmentations
def test_strong_transform_and_views():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  assert views.blur_kernel_size(512) == 51 and views.blur_kernel_size(64) == 7
  # Flags off: unchanged (no clamping).
  same = views.color_jitter(jax.random.PRNGKey(1), x, 0.2, jnp.asarray(False))
  np.testing.assert_array_equal(same, x)
  same = views.gaussian_blur(jax.random.PRNGKey(1), x, jnp.asarray(False))
  np.testing.assert_array_equal(same, x)
  # Jitter works on [0, 1] and re-normalises: the output de-normalises into [0, 1].
  j = views.color_jitter(jax.random.PRNGKey(1), x, 0.2, jnp.asarray(True))
  d = np.asarray(views.denormalize(j))
  assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5
  # Per-image draws: two identical images get different jitter.
  same_imgs = jnp.repeat(x[:1], 2, axis=0)
  j2 = np.asarray(views.color_jitter(jax.random.PRNGKey(3), same_imgs, 0.25, jnp.asarray(True)))
  assert np.abs(j2[0] - j2[1]).max() > 1e-3
  q, k = views.siamseg_views(jax.random.PRNGKey(4), x)
  assert q.shape == x.shape and k.shape == x.shape
  assert np.abs(np.asarray(q) - np.asarray(k)).max() > 1e-3
  # Full-size crop without jitter/blur/flip/grayscale is the identity.
  ident = views.simsiam_view(jax.random.PRNGKey(5), x, crop_scale=(1.0, 1.0), color_jitter_p=0.0,
                         grayscale_p=0.0, blur_p=0.0, flip_p=0.0)
  # Aspect ratio still varies (3/4..4/3): only check the shape and finiteness here.
  assert ident.shape == x.shape and np.isfinite(np.asarray(ident)).all()
  y = views.strong_transform(jax.random.PRNGKey(6), x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_color_jitter_and_blur_match_torchvision_given_the_draws():
  """SiamSeg's strong transform, against torchvision's functional ops: ``color_jitter``
  de-normalises, applies brightness, contrast, saturation and hue in each image's drawn
  order with its drawn factors (the draws are ``sample_strong_augment_params`` of the same
  key), clamps and re-normalises; ``gaussian_blur`` blurs each image with its drawn sigma
  and DACS's kernel size (reflect border)."""
  torch = pytest.importorskip("torch")
  tf = pytest.importorskip("torchvision.transforms.functional")
  from contrastjax.augment import photometric  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x01 = rng.uniform(0.05, 0.95, (3, 24, 24, 3)).astype(np.float32)
  x = views.renormalize(jnp.asarray(x01))
  key = jax.random.PRNGKey(7)
  got = np.asarray(views.denormalize(views.color_jitter(key, x, 0.25, jnp.asarray(True))))
  p = photometric.sample_strong_augment_params(
      key, brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25, grayscale_p=0.0,
      batch_shape=(3,))
  ops = (tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation, tf.adjust_hue)
  for i in range(3):
    factors = (p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i])
    t = torch.from_numpy(x01[i]).permute(2, 0, 1)
    for j in np.asarray(p.order[i]):
      t = ops[j](t, float(factors[j]))
    np.testing.assert_allclose(got[i], t.permute(1, 2, 0).numpy(), atol=2e-5, err_msg=i)
  assert len({tuple(np.asarray(p.order[i])) for i in range(3)}) > 1  # per-image orders

  sigma = np.asarray(jax.random.uniform(key, (3,), minval=0.15, maxval=1.15))
  blurred = np.asarray(views.gaussian_blur(key, jnp.asarray(x01), jnp.asarray(True)))
  k = views.blur_kernel_size(24)
  for i in range(3):
    want = tf.gaussian_blur(torch.from_numpy(x01[i]).permute(2, 0, 1), [k, k],
                            [float(sigma[i]), float(sigma[i])])
    np.testing.assert_allclose(blurred[i], want.permute(1, 2, 0).numpy(), atol=1e-5)
  assert np.abs(blurred - x01).max() > 1e-3
