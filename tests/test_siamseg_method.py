"""The SiamSeg method on the spine: the whole UDA step (teacher, ClassMix, strong transform,
SimSiam views, BatchNorm threading, EMA) on 8 simulated devices equals 1 device on the same
global batch; EMA bookkeeping; configs; errors a user can act on."""
from __future__ import annotations

import importlib.util
import os

import _toy
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastjax import parallel
from contrastjax.data.synthetic import aerial as synthetic_aerial
from contrastjax.data.transforms.mmseg import IMAGENET_MEAN, IMAGENET_STD
from contrastjax.methods import base
from contrastjax.methods import siamseg as S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(variant="b0", drop_path_rate=0.1, embed_dims=8, channels=8,
                  dropout_ratio=0.1, simsiam_dim=16,
                  backbone=dict(embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1),
                                num_heads=(1, 1, 1, 1), sr_ratios=(2, 1, 1, 1)))


def _config(variant="siamseg", **siamseg):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(TINY_MODEL)
  c.siamseg = ml_collections.ConfigDict(dict(
      variant=variant, num_classes=5, class_weight=(1.0, 1.0, 1.25, 1.5, 1.0), **siamseg))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, weight_decay=0.01, eps=1e-4, schedule="warmup_poly_mmcv",
      warmup_steps=2, groups=[[r"^decode_head/", 10.0, 1.0],
                              [r"^backbone/(patch_embed\d+/norm|block\d+_\d+/(norm1|norm2|attn/norm))/",
                               1.0, 0.0]]))
  c.plateau = ml_collections.ConfigDict(dict(monitor="", factor=0.1, patience=3))
  return c


def _batch(n=8, size=32):
  mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
  src = synthetic_aerial.SyntheticAerial(n, size, 3, "source")
  tgt = synthetic_aerial.SyntheticAerial(n, size, 3, "target")
  norm = lambda img: (img.astype(np.float32) - mean) / std  # noqa: E731
  return {
      "source": {"image": np.stack([norm(src[i]["image"]) for i in range(n)]),
                 "label": np.stack([src[i]["label"].astype(np.int32) for i in range(n)]),
                 "index": np.arange(n, dtype=np.int32)},
      "target": {"image": np.stack([norm(tgt[i]["image"]) for i in range(n)]),
                 "index": np.arange(n, dtype=np.int32)},
      "index": np.arange(n, dtype=np.int32),
  }


def _assert_trees_close(a, b, what, rtol=2e-4, atol=2e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


# Two compilations of the full UDA step (~2 min on 2 cores): heavy. In CI,
# test_multiprocess.py's SiamSeg run checks 1 device = 2 processes x 4 devices through the
# command line (losses, gradient norm, every evaluation metric); this in-process test adds
# the parameter, BatchNorm and EMA-teacher leaves after two steps (passed in session 12).
@pytest.mark.slow
@pytest.mark.heavy
def test_siamseg_step_8_devices_equals_1_device():
  config, batch = _config(), _batch()
  one = parallel.make_mesh(devices=jax.devices()[:1])
  initial = _toy.initial_state(S.SiamSegMethod(config), config, one, batch)  # once for both
  s1, m1 = _toy.run_steps(S.SiamSegMethod(config), config, one, batch, initial=initial)
  s8, m8 = _toy.run_steps(S.SiamSegMethod(config), config, parallel.make_mesh(), batch,
                          initial=initial)
  # grad_norm: the gradient itself, which AdamW's update would hide a device-count scale of
  for k in ("loss", "loss_src", "loss_mix", "loss_contrastive", "pseudo_weight",
            "mix_fraction", "grad_norm"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert np.isfinite(m1["loss"]) and m1["loss_contrastive"] < 0
  _assert_trees_close(s1.params, s8.params, "params")
  _assert_trees_close(s1.model_state, s8.model_state, "batch_stats")
  _assert_trees_close(s1.extra, s8.extra, "teacher")
  assert set(s1.params) == {"backbone", "decode_head", "contrast"}
  assert set(s1.extra["teacher"]) == {"backbone", "decode_head"}


def test_teacher_is_the_ema_of_the_student_and_variants_drop_branches():
  batch = _batch(2)
  method = S.SiamSegMethod(_config(variant="dacs"))
  params, _, extra = method.init(jax.random.PRNGKey(0), batch)
  assert "contrast" not in params
  _assert_trees_close(extra["teacher"], {k: params[k] for k in S.SEGMENTOR},
                      "initial copy", rtol=0, atol=0)
  p1 = jax.tree.map(lambda x: x + 1.0, params)
  p2 = jax.tree.map(lambda x: x - 2.0, params)
  e1 = method.post_update(jnp.asarray(1), p1, extra)       # alpha = 1 - 1/2
  e2 = method.post_update(jnp.asarray(2), p2, e1)          # alpha = 1 - 1/3
  want1 = jax.tree.map(lambda t, p: 0.5 * t + 0.5 * p, extra["teacher"],
                       {k: p1[k] for k in S.SEGMENTOR})
  want2 = jax.tree.map(lambda t, p: (2 / 3) * t + (1 / 3) * p, want1,
                       {k: p2[k] for k in S.SEGMENTOR})
  _assert_trees_close(e1["teacher"], want1, "teacher@1", rtol=1e-6, atol=1e-6)
  _assert_trees_close(e2["teacher"], want2, "teacher@2", rtol=1e-6, atol=1e-6)
  so = S.SiamSegMethod(_config(variant="source_only"))
  params, _, extra = jax.eval_shape(so.init, jax.random.PRNGKey(0), batch)
  assert extra == {} and set(params) == {"backbone", "decode_head"}
  assert so.post_update(jnp.asarray(1), params, extra) == {}


def test_per_loss_backward_equals_the_gradient_of_the_sum():
  """``backward='per_loss'`` (one gradient per term, each pass after the previous gradient,
  as the reference) gives the joint gradient, loss, metrics and BatchNorm statistics."""
  batch = jax.tree.map(jnp.asarray, _batch(4))
  out = {}
  for mode in ("joint", "per_loss"):
    method = S.SiamSegMethod(_config(backward=mode))
    params, state, extra = method.init(jax.random.PRNGKey(0), batch)
    out[mode] = jax.jit(method.value_and_grad)(params, state, extra, batch,
                                               jax.random.PRNGKey(3), jnp.asarray(5))
  (l_j, (s_j, m_j)), g_j = out["joint"]
  (l_p, (s_p, m_p)), g_p = out["per_loss"]
  np.testing.assert_allclose(float(l_p), float(l_j), rtol=1e-6)
  assert sorted(m_p) == sorted(m_j) == ["loss_contrastive", "loss_mix", "loss_src",
                                        "mix_fraction", "pseudo_weight"]
  for k in m_j:
    np.testing.assert_allclose(float(m_p[k]), float(m_j[k]), rtol=1e-6, err_msg=k)
  _assert_trees_close(g_p, g_j, "grads", rtol=1e-5, atol=1e-7)
  _assert_trees_close(s_p, s_j, "batch_stats", rtol=1e-6, atol=1e-7)
  # every term contributes: the contrastive branch and the head have gradients
  assert float(_toy_norm(g_p["contrast"])) > 0 and float(_toy_norm(g_p["decode_head"])) > 0
  # the zero that orders the passes is exactly zero for finite gradients, NaN otherwise
  assert float(base.zero_after(g_p)) == 0.0
  assert np.isnan(float(base.zero_after({"a": jnp.asarray([1.0, jnp.inf])})))


def test_stat_group_size_per_gpu_statistics():
  """``stat_group_size`` = the global batch is the default; a smaller group changes the
  SimSiam BatchNorm statistics and the pseudo weights; one that does not divide the batch
  is refused, naming the key."""
  batch = jax.tree.map(jnp.asarray, _batch(4))
  out = {}
  for g in (0, 4, 2):
    method = S.SiamSegMethod(_config(stat_group_size=g, pseudo_threshold=0.3))
    params, state, extra = method.init(jax.random.PRNGKey(0), batch)
    out[g] = jax.jit(method.loss_fn)(params, state, extra, batch, jax.random.PRNGKey(3),
                                     jnp.asarray(5))
  (l0, (_, m0)), (l4, _), (_, (_, m2)) = out[0], out[4], out[2]
  np.testing.assert_allclose(float(l4), float(l0), rtol=1e-6)
  assert abs(float(m2["loss_contrastive"]) - float(m0["loss_contrastive"])) > 1e-4
  np.testing.assert_allclose(float(m2["loss_src"]), float(m0["loss_src"]), rtol=1e-6)
  method = S.SiamSegMethod(_config(stat_group_size=3))
  params, state, extra = method.init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match="stat_group_size=3 must divide"):
    method.loss_fn(params, state, extra, batch, jax.random.PRNGKey(3), jnp.asarray(5))


def _toy_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree)))


def test_predict_modes_and_eval_loss():
  batch = _batch(2)
  ev = {"image": batch["target"]["image"], "label": batch["source"]["label"],
        "valid": np.asarray([True, False])}
  outs = {}
  for mode in ("whole", "slide", "tta"):
    method = S.SiamSegMethod(_config(inference=mode, slide_crop=(16, 16),
                                     slide_stride=(8, 8), tta_img_scale=(32, 32)))
    params, state, extra = method.init(jax.random.PRNGKey(0), batch)
    outs[mode] = np.asarray(method.predict(params, state, extra, ev)["pred"])
    assert outs[mode].shape == (2, 32, 32) and outs[mode].dtype == np.int32
  loss = method.eval_loss(params, state, extra, ev)
  one = method.eval_loss(params, state, extra, {k: v[:1] for k, v in ev.items()})
  np.testing.assert_allclose(float(loss), float(one), rtol=1e-5)   # padded row ignored


@pytest.mark.parametrize("bad, match", [
    (dict(variant="siamsegg"), "variant"),
    (dict(variant="siamseg", classmix_scope="pixel"), "classmix_scope"),
    (dict(variant="siamseg", inference="sliding"), "inference"),
    (dict(variant="siamseg", views=dict(crop=1)), "views"),
    (dict(variant="siamseg", backward="sequential"), "backward"),
    (dict(variant="siamseg", stat_group_size=-2), "stat_group_size"),
    (dict(variant="siamseg", colour_jitter=0.2), "unknown key"),
    (dict(variant="siamseg", class_weight=(1.0, 2.0)), "class_weight"),
])
def test_bad_method_config_is_rejected(bad, match):
  c = _config()
  for k, v in bad.items():
    c.siamseg[k] = v
  with pytest.raises(ValueError, match=match):
    S.SiamSegMethod(c)
  c = _config()
  c.model.widht = 3
  with pytest.raises(ValueError, match="widht"):
    S.SiamSegMethod(c)


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("name", ["siamseg_loveda.py", "siamseg_potsdam_vaihingen.py"])
def test_configs_load_variants_and_reject_typos(name):
  path = os.path.join(REPO, "configs", name)
  mod = _load(path)
  assert mod.__doc__.lstrip().startswith(f"python -m contrastjax.train --config=configs/{name}")
  for arg in (None, "demo", "dacs", "source_only", "paper,tta", "slide,demo",
              "root=/data/x,pretrained=/w/mit_b5.pth,init_from=/tmp/run"):
    c = mod.get_config(arg)
    S.SiamSegMethod(c)  # every variant builds its method
    assert c.method == "siamseg" and c.batch_size > 0
  c = mod.get_config(None)
  assert c.optimizer.lr == 6e-5 and c.total_steps == 40000 and c.batch_size == 24
  assert c.optimizer.warmup_steps == 1500 and c.optimizer.schedule == "warmup_poly_mmcv"
  assert c.siamseg.pseudo_threshold == 0.968 and c.siamseg.alpha == 0.999
  # B5 at 512x512 without remat plans 52.9 GiB of temporaries at batch 2 (BENCHMARKS.md)
  assert c.model.remat and c.model.scan_blocks and not mod.get_config("demo").model.remat
  assert mod.get_config("dacs").siamseg.variant == "dacs"
  assert mod.get_config("source_only").siamseg.variant == "source_only"
  assert mod.get_config("paper").siamseg.classmix_scope == "batch"
  with pytest.raises(ValueError, match="dmeo"):
    mod.get_config("dmeo")
  with pytest.raises(ValueError, match="exclude"):
    mod.get_config("dacs,source_only")
  if name == "siamseg_loveda.py":
    u2r = mod.get_config("urban2rural")
    assert (u2r.data.source_domain, u2r.data.target_domain) == ("Urban", "Rural")
    assert mod.get_config("tta").siamseg.inference == "tta"
  else:
    t = mod.get_config("task=vaihingen_irrg2potsdam_rgb")
    assert t.data.target == "Potsdam_RGB_DA" and t.eval_every_steps == 500
    with pytest.raises(ValueError, match="ISPRS task"):
      mod.get_config("task=loveda_rural2urban")


@pytest.mark.slow  # one compilation of the loss and its terms run eagerly
def test_full_loss_equals_an_independent_composition_of_its_terms():
  """The SiamSeg loss (source CE + pseudo-label-weighted ClassMix CE + weighted SimSiam)
  against a composition outside the method: the CE terms with torch's ``cross_entropy``
  (class weights, pixel weights, mmseg's mean over all pixels) on logits upsampled by
  torch's bilinear ``interpolate``, the pseudo-labels and their confidence weight in
  NumPy, the mixed labels and weights by NumPy ``where``, SimSiam with torch's cosine
  similarity. The model passes, ClassMix masks, strong transform and views are the
  method's (each tested against its reference elsewhere), drawn from the same keys."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  from contrastjax.augment import views  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import dacs  # pylint: disable=g-import-not-at-top
  weight_c = 0.7
  method = S.SiamSegMethod(_config(contrastive_weight=weight_c))
  batch = jax.tree.map(jnp.asarray, _batch(4))
  params, state, extra = method.init(jax.random.PRNGKey(0), batch)
  rng = jax.random.PRNGKey(3)
  xs, ys = batch["source"]["image"], np.asarray(batch["source"]["label"], np.int64)
  xt = batch["target"]["image"]
  keys = jax.random.split(rng, 8)
  cw = torch.tensor(method.class_weight, dtype=torch.float32)
  assert not method.avg_non_ignore  # mmseg 0.21: the mean over all pixels

  def ce(logits, labels, pixel_weight=None):
    t = torch.from_numpy(np.array(logits, np.float32)).permute(0, 3, 1, 2)
    up = F.interpolate(t, size=labels.shape[1:], mode="bilinear", align_corners=False)
    per = F.cross_entropy(up, torch.from_numpy(labels), weight=cw, reduction="none",
                          ignore_index=255)
    if pixel_weight is not None:
      per = per * torch.from_numpy(pixel_weight.astype(np.float32))
    return per.mean().item()

  logits_s, st = method._segment(params, state, xs, train=True, rng=keys[0])  # pylint: disable=protected-access
  loss_src = ce(logits_s, ys)
  t_logits, _ = method._segment(extra["teacher"], st, xt, train=True, deterministic=True)  # pylint: disable=protected-access
  t_up = F.interpolate(torch.from_numpy(np.array(t_logits)).permute(0, 3, 1, 2),
                       size=ys.shape[1:], mode="bilinear", align_corners=False)
  probs = torch.softmax(t_up, dim=1).numpy()
  # The threshold at the median confidence of this (random) teacher: a weight strictly
  # between 0 and 1 (the parameters do not depend on the threshold).
  threshold = float(np.median(probs.max(1)))
  method = S.SiamSegMethod(_config(pseudo_threshold=threshold, contrastive_weight=weight_c))
  total, (_, metrics) = jax.jit(method.loss_fn)(params, state, extra, batch, rng,
                                                jnp.asarray(5))
  pseudo, confident = probs.argmax(1), probs.max(1) >= threshold
  weight = confident.mean()
  assert 0.0 < weight < 1.0, weight
  mask = np.asarray(dacs.class_mix_masks(keys[1], batch["source"]["label"].astype(jnp.int32),
                                         method.num_classes, method.classmix_scope, 0))
  mixed = views.strong_transform(keys[2], dacs.class_mix(jnp.asarray(mask), xs, xt),
                                 **method.strong)
  logits_m, st = method._segment(params, st, mixed, train=True, rng=keys[3])  # pylint: disable=protected-access
  loss_mix = ce(logits_m, np.where(mask > 0, ys, pseudo),
                np.where(mask > 0, 1.0, weight))
  q, k = views.siamseg_views(jax.random.fold_in(keys[4], 0), xt, **method.view_kwargs)
  p1, p2, z1, z2, _ = method._simsiam(params, st, q, k, jax.random.fold_in(keys[5], 0))  # pylint: disable=protected-access
  t = [torch.from_numpy(np.array(a, np.float32)) for a in (p1, p2, z1, z2)]
  loss_con = -0.5 * (F.cosine_similarity(t[0], t[3]).mean()
                     + F.cosine_similarity(t[1], t[2]).mean()).item()
  for name, want in (("loss_src", loss_src), ("loss_mix", loss_mix),
                     ("loss_contrastive", loss_con), ("pseudo_weight", weight),
                     ("mix_fraction", mask.mean())):
    np.testing.assert_allclose(float(metrics[name]), want, rtol=2e-5, atol=1e-6,
                               err_msg=name)
  np.testing.assert_allclose(float(total), loss_src + loss_mix + weight_c * loss_con,
                             rtol=2e-5)
