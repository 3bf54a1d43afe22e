"""APC on the spine (the method is a reconstruction, docs/methods/apc.md): training batches
hold image labels only, the step runs through the real trainer with its evaluations, the
variants switch their components, and ViT-PCM's first phase freezes the backbone."""
import json
import os

import jax
import numpy as np
import pytest

from contrastjax import parallel
from contrastjax import train as train_lib
from contrastjax.configs import apc as apc_configs
from contrastjax.data import builder
from contrastjax.methods import apc as apc_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(arg="demo", **data):
  c = apc_configs.get_config("voc", arg)
  c.model.backbone_overrides = dict(patch_size=8, depth=1, embed_dim=32, num_heads=2)
  c.model.decoder_channels = 16
  c.data.num_train, c.data.num_train_eval, c.data.num_val = 32, 16, 16
  c.data.image_size = c.data.crop_size = c.data.eval_size = 32
  c.model.img_size = 32
  for k, v in data.items():
    c.data[k] = v
  c.batch_size = c.eval_batch_size = 8
  c.total_steps, c.eval_every_steps, c.ckpt_every_steps, c.log_every_steps = 4, 4, 4, 2
  c.apc.seg_warmup_steps = 2
  c.apc.eq_weight = 0.0  # the demo's equivariant loss: on where a test says so
  c.progress_bar = False
  c.plot_curves = False
  return c


def test_training_batches_hold_no_pixel_labels():
  c = _tiny()
  inputs = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  batch = next(iter(inputs.train))
  assert sorted(batch) == ["image", "labels"]
  assert batch["labels"].shape == (8, 6) and (batch["labels"][:, 0] == 1).all()
  ev = next(iter(inputs.eval_batches("val")))
  assert {"image", "label", "labels", "valid"} <= set(ev)
  sup = builder.build(_tiny("demo,supervised"), local_batch_size=8, local_eval_batch_size=8)
  assert "label" in next(iter(sup.train))  # only the supervised upper bound sees masks


@pytest.mark.slow
def test_apc_step_through_the_trainer(tmp_path):
  c = _tiny()
  c.apc.eq_weight = apc_configs.get_config("voc", "demo").apc.eq_weight  # the demo's 1.0
  result = train_lib.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 4
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if "train/loss" in r]
  for key in ("train/loss_cls", "train/loss_reg", "train/loss_seg", "train/loss_pcl",
              "train/loss_eq"):
    assert all(np.isfinite(r[key]) for r in train), key
  assert 0.0 <= result["val/mIoU"] <= 1.0 and 0.0 <= result["pseudo/mIoU"] <= 1.0
  assert os.listdir(tmp_path / "samples")


def test_variants_switch_components_and_predict_outputs():
  c = _tiny("demo,gmp")
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  inputs = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  batch = next(iter(inputs.train))
  ev = next(iter(inputs.eval_batches("val")))
  m = apc_lib.APCMethod(c)
  assert m.options.pooling == "gmp" and not m.options.uses_decoder
  with jax.set_mesh(mesh):
    params, _, _ = m.init(jax.random.PRNGKey(0), batch)
    assert "seg_decoder" not in params
    loss, (_, metrics) = m.loss_fn(params, {}, {}, batch, jax.random.PRNGKey(1), 0)
    assert set(metrics) == {"loss_cls", "loss_reg"} and np.isfinite(loss)
    out = m.predict(params, {}, {}, ev)
  assert out["pred"].shape == out["pseudo"].shape == ev["label"].shape
  # the pseudo-labels only name classes of the image (or background)
  for r in range(len(ev["labels"])):
    present = set(np.flatnonzero(ev["labels"][r]))
    assert set(np.unique(np.asarray(out["pseudo"][r]))) <= present
  full = apc_lib.APCMethod(_tiny("demo"))
  assert full.options.uses_decoder and full.options.uses_pcl


def test_vitpcm_first_phase_freezes_the_backbone():
  c = _tiny("demo,recipe=vitpcm")
  c.total_steps = 2
  src = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  batch = next(iter(src.train))
  m = apc_lib.APCMethod(c)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  from contrastjax import spine  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global(batch, mesh)
    run = spine.build_run(c, m, mesh, jax.random.PRNGKey(0), gb, total_steps=2)
    state0 = jax.device_get(jax.jit(run.create, out_shardings=run.state_sharding)(
        jax.random.PRNGKey(0), gb))
    state = jax.device_put(state0, run.state_sharding)
    for _ in range(2):
      state, metrics = run.compiled.train_step(state, gb)
  state = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(state0.params["backbone"]),
                  jax.tree.leaves(state.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(state0.params["patch_classifier"]["classifier"]["kernel"],
                            state.params["patch_classifier"]["classifier"]["kernel"])


def test_config_variants_and_errors():
  for v in ("gmp", "topk", "akp", "akp_pcl", "apc", "supervised"):
    c = apc_configs.get_config("voc", v)
    assert c.apc.variant == v
  assert apc_configs.get_config("voc", "gmp").apc.pooling == "gmp"
  assert apc_configs.get_config("voc", "rule=argmax_share").apc.akp_rule == "argmax_share"
  assert apc_configs.get_config("voc", "msf").apc.inference == "msf"
  assert apc_configs.get_config("voc").apc.inference == "single"
  with pytest.raises(ValueError, match=r"exclude each other"):
    apc_configs.get_config("voc", "gmp,apc")
  with pytest.raises(ValueError, match=r"recipe='nope'"):
    apc_configs.get_config("voc", "recipe=nope")
  c = apc_configs.get_config("voc")
  c.apc.akp_rule = "h4"
  with pytest.raises(ValueError, match=r"config\.apc\.akp_rule='h4'"):
    apc_lib.APCMethod(c)


def test_msf_inference_is_toco_multiscale_flip_of_the_decoder():
  import jax.numpy as jnp
  from contrastjax.models import resample
  c = _tiny("demo")
  c.apc.inference, c.apc.msf_scales = "msf", (1.0, 1.5)
  m = apc_lib.APCMethod(c)
  inputs = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  ev = next(iter(inputs.eval_batches("val")))
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    params, _, _ = m.init(jax.random.PRNGKey(0), next(iter(inputs.train)))
    got = np.asarray(m.predict(params, {}, {}, ev)["pred"])

  x = apc_lib.normalize(jnp.asarray(ev["image"], jnp.float32), "imagenet")
  def seg(img):  # the decoder's logits at the image size, flipped back when asked
    out = m.net.apply({"params": params}, img, train=False)[1]["seg_logits"]
    return np.asarray(resample.resize_bilinear_half_pixel(out, (32, 32)))
  s1 = seg(x) + seg(x[:, :, ::-1])[:, :, ::-1]
  x48 = resample.resize_bilinear_half_pixel(x, (48, 48))
  s2 = seg(x48) + seg(x48[:, :, ::-1])[:, :, ::-1]
  want = np.maximum(s1, s2).argmax(-1)
  assert (got == want).mean() > 0.999
  assert not (want == s1.argmax(-1)).all()  # the second scale changed some pixels

  gmp = _tiny("demo,gmp")
  gmp.apc.inference = "msf"
  with pytest.raises(ValueError, match=r"config\.apc\.inference='msf' tests the decoder"):
    apc_lib.APCMethod(gmp)
  c.apc.msf_scales = (1.0, 0.0)
  with pytest.raises(ValueError, match=r"msf_scales=\(1\.0, 0\.0\)"):
    apc_lib.APCMethod(c)


def _assert_trees_close(a, b, what, rtol=2e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_apc_step_8_devices_equals_1_device():
  """The full one-stage step (classification, merged pseudo-labels, decoder, patch
  contrast) on a batch sharded over 8 simulated devices equals the 1-device step: the
  batch-wide terms (balanced CE, PCL pairs) are computed over the global batch."""
  import _toy  # pylint: disable=g-import-not-at-top
  c = _tiny()
  c.apc.seg_warmup_steps = 0
  inputs = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  batch = next(iter(inputs.train))
  m1 = apc_lib.APCMethod(c)
  one = parallel.make_mesh(devices=jax.devices()[:1])
  initial = _toy.initial_state(m1, c, one, batch)   # one initialisation for both meshes
  s1, r1 = _toy.run_steps(m1, c, one, batch, initial=initial)
  s8, r8 = _toy.run_steps(apc_lib.APCMethod(c), c, parallel.make_mesh(), batch,
                          initial=initial)
  # grad_norm: the gradient itself, which Adam's update would hide a device-count scale of
  for k in ("loss", "loss_cls", "loss_seg", "loss_pcl", "grad_norm"):
    np.testing.assert_allclose(r1[k], r8[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert np.isfinite(r1[k]) and r1[k] != 0, k
  _assert_trees_close(s1.params, s8.params, "params")
  assert {"backbone", "patch_classifier", "seg_decoder"} <= set(s1.params)


def test_akp_warmup_pools_with_gmp_then_akp():
  """Before ``akp_warmup_steps`` AKP pools as GMP (K = 1); from then on with its K rule.
  On near-uniform patch scores (an untrained classifier) H1 takes every patch: mean
  pooling, far below the max."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import apc_losses  # pylint: disable=g-import-not-at-top
  c = _tiny()
  c.apc.akp_warmup_steps = 10
  method = apc_lib.APCMethod(c)
  probs = jax.nn.softmax(0.05 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6)), -1)
  gmp = np.asarray(probs).reshape(2, 16, 6).max(1)
  np.testing.assert_allclose(method._pool(probs, jnp.asarray(9)), gmp, rtol=1e-6)
  akp = method._pool(probs, jnp.asarray(10))
  np.testing.assert_allclose(akp, apc_losses.akp_pool(probs, rule="ratio_to_max", tau=0.5),
                             rtol=1e-6)
  np.testing.assert_allclose(akp, np.asarray(probs).reshape(2, 16, 6).mean(1), rtol=1e-5)
  assert (np.asarray(akp) < gmp - 1e-3).all()
  np.testing.assert_allclose(method._pool(probs), akp, rtol=1e-6)  # evaluation: AKP


@pytest.mark.slow
@pytest.mark.heavy  # two full demo runs, ~25 min on 2 cores with 8 simulated devices
def test_demo_apc_beats_gmp(tmp_path):
  """The demo: full APC (AKP after a GMP warm-up, patch contrast, the decoder on the
  PAR-refined online pseudo-labels, all with ViT-PCM's equivariant loss) segments the
  validation scenes better than ViT-PCM's GMP stage alone (with the same equivariant
  loss), which is trained identically up to the AKP / decoder / PCL start.

  Measured on 1 device through the CLI (session 10): 0.455 against 0.324. Asserted: the
  issue's target of +10 points, which leaves 3 points for the +-2-point spread between
  device counts (session 8)."""
  results = {}
  for variant in ("demo", "demo,gmp"):
    c = apc_configs.get_config("voc", variant)
    c.progress_bar = False
    results[variant] = train_lib.train_and_evaluate(c, str(tmp_path / variant))
  apc, gmp = results["demo"]["val/mIoU"], results["demo,gmp"]["val/mIoU"]
  assert apc > gmp + 0.10, (apc, gmp)


def test_seg_loss_waits_for_its_warmup_then_uses_the_pseudo_labels():
  """Before ``seg_warmup_steps`` the segmentation term is 0 and no gradient reaches the
  decoder (the pseudo-labels are not computed); from then on it is ToCo's balanced CE of
  the decoder against the merged pseudo-labels, computed here by hand."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import apc_losses  # pylint: disable=g-import-not-at-top
  from contrastjax.models import resample  # pylint: disable=g-import-not-at-top
  c = _tiny()
  c.apc.update(seg_warmup_steps=3, pcl_weight=0.0, pseudo_threshold=0.3, par=False)
  m = apc_lib.APCMethod(c)
  inputs = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  batch = next(iter(inputs.train))
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    params, _, _ = m.init(jax.random.PRNGKey(0), batch)
    grad = jax.jit(jax.grad(lambda p, s: m.loss_fn(p, {}, {}, batch, jax.random.PRNGKey(1),
                                                   s)[0]))
    fn = jax.jit(lambda p, s: m.loss_fn(p, {}, {}, batch, jax.random.PRNGKey(1), s)[1][1])
    before, after = fn(params, 2), fn(params, 3)
    g_before, g_after = grad(params, 2), grad(params, 3)
  assert float(before["loss_seg"]) == 0.0
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_before["seg_decoder"]))
  assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(g_after["seg_decoder"]))
  # by hand: the train-mode forward (dropout rng as the method's), merge, balanced CE
  x = apc_lib.normalize(jnp.asarray(batch["image"], jnp.float32), "imagenet")
  probs, aux = m.net.apply({"params": params}, x, train=True,
                           rngs={"dropout": jax.random.PRNGKey(1)})
  target = apc_losses.merged_pseudo_labels(probs, jnp.asarray(batch["labels"]),
                                           out_size=(32, 32), threshold=0.3)
  logits = resample.resize_bilinear_half_pixel(aux["seg_logits"], (32, 32))
  want = apc_losses.seg_loss(logits, target)
  np.testing.assert_allclose(float(after["loss_seg"]), float(want), rtol=1e-5)
  assert float(want) > 0.1
  np.testing.assert_allclose(float(before["loss_cls"]), float(after["loss_cls"]), rtol=1e-6)


def test_par_pseudo_labels_at_reduced_resolution():
  """``par=True``: the merged patch map refined by PAR on the image resized by
  ``1/par_down_scale`` (ToCo's 2), resized back (half-pixel), renormalised, argmax with
  the confidence split; ``par_down_scale=1`` runs PAR at full resolution."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import apc_losses, apc_par  # pylint: disable=g-import-not-at-top
  from contrastjax.models import resample  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 4, 4, 6)) * 2, jnp.float32), -1)
  labels = jnp.asarray([[1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 1]], jnp.float32)
  merged = apc_losses.merge_class_labels(probs, labels)

  def expected(scale, threshold):
    small = resample.resize_bilinear_half_pixel(images / 255.0, (32 // scale, 32 // scale))
    ref = resample.resize_bilinear_half_pixel(apc_par.par_refine(small, merged), (32, 32))
    ref = ref / jnp.maximum(ref.sum(-1, keepdims=True), 1e-12)
    return np.asarray(apc_losses.confident_labels(ref, threshold=threshold))

  for scale, threshold in ((2, None), (1, 0.4)):
    c = _tiny()
    c.apc.update(par=True, par_down_scale=scale, pseudo_threshold=threshold or 0.0)
    got = np.asarray(apc_lib.APCMethod(c)._pseudo_labels(probs, labels, images))
    np.testing.assert_array_equal(got, expected(scale, threshold))
    assert set(np.unique(got[0])) <= {0, 1, 3, 255} and set(np.unique(got[1])) <= {0, 2, 5, 255}
  plain = apc_losses.merged_pseudo_labels(probs, labels, out_size=(32, 32))
  assert (np.asarray(plain) != expected(2, None)).mean() > 0.01  # PAR moved pixels
  c = _tiny()
  c.apc.par_down_scale = 0
  with pytest.raises(ValueError, match=r"config\.apc\.par_down_scale=0: expected >= 1"):
    apc_lib.APCMethod(c)


def test_pseudo_par_evaluation_scores_the_decoders_targets():
  """With PAR the demo also scores ``pseudo_par``: the merge with the true image labels,
  refined by PAR as in training, argmax without the confidence ignore (a composition of
  the tested pieces); the output exists only when an evaluation reads it, with or without
  PAR in training."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import apc_losses, apc_par  # pylint: disable=g-import-not-at-top
  from contrastjax.models import resample  # pylint: disable=g-import-not-at-top
  c = _tiny()
  assert c.apc.par and c.evals.pseudo_par.output_key == "pseudo_par"
  assert c.evals.pseudo_par.split == c.evals.pseudo.split
  method = apc_lib.APCMethod(c)
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(0, 255, (2, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray([[1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 1]], jnp.float32)
  params, _, _ = method.init(jax.random.key(0), {"image": images})
  out = method._predict(params, {"image": images, "labels": labels})
  probs, _ = method._apply(params, apc_lib.normalize(images, c.apc.normalization), train=False)
  merged = apc_losses.merge_class_labels(probs, labels)
  small = resample.resize_bilinear_half_pixel(images / 255.0, (16, 16))
  ref = resample.resize_bilinear_half_pixel(apc_par.par_refine(small, merged), (32, 32))
  np.testing.assert_array_equal(np.asarray(out["pseudo_par"]), np.argmax(np.asarray(ref), -1))
  del c.evals["pseudo_par"]
  assert "pseudo_par" not in apc_lib.APCMethod(c)._predict(params, {"image": images,
                                                                     "labels": labels})
  c.apc.par = False
  c.evals.extra = dict(c.evals.pseudo.to_dict(), output_key="pseudo_par")
  again = apc_lib.APCMethod(c)._predict(params, {"image": images, "labels": labels})
  np.testing.assert_array_equal(np.asarray(again["pseudo_par"]), np.asarray(out["pseudo_par"]))
  voc = apc_configs.get_config("voc")  # no PAR in the VOC recipe: no pseudo_par scoring
  assert not voc.apc.par and "pseudo" in voc.evals and "pseudo_par" not in voc.evals


def test_equivariant_mosaic_loss_is_wired_as_vitpcm():
  """``eq_weight > 0``: view 1 (flipped) is the classification input and, in inference
  mode, the teacher; view 2 (cropped where drawn, halved, flipped) is tiled four to a
  mosaic for the student; the loss is ``apc_losses.equivariance_loss`` of the two."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import apc_losses  # pylint: disable=g-import-not-at-top
  from contrastjax.models import resample  # pylint: disable=g-import-not-at-top
  c = _tiny("demo,gmp")
  c.apc.update(eq_weight=1.0, eq_crop_prob=0.5, eq_crop_fraction=0.5)
  m = apc_lib.APCMethod(c)
  inputs = builder.build(c, local_batch_size=8, local_eval_batch_size=8)
  batch = next(iter(inputs.train))
  rng = jax.random.PRNGKey(1)
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    params, _, _ = m.init(jax.random.PRNGKey(0), batch)
    loss, (_, metrics) = m.loss_fn(params, {}, {}, batch, rng, 3)
  assert set(metrics) == {"loss_cls", "loss_reg", "loss_eq"}
  assert float(metrics["loss_eq"]) > 0.1
  np.testing.assert_allclose(float(loss), float(metrics["loss_cls"] + metrics["loss_reg"]
                                                + metrics["loss_eq"]), rtol=1e-6)

  # The views, against numpy slicing and flips.
  rng_main, k_views, k_student = jax.random.split(rng, 3)
  images = jnp.asarray(batch["image"], jnp.float32)
  v = m.eq_views(images, k_views)
  x = np.asarray(images)

  def flip(a, f):
    a = a[:, ::-1] if f[0] else a
    a = a[::-1] if f[1] else a
    return a.transpose(1, 0, 2) if f[2] else a
  f1, f2 = np.asarray(v["flips1"]), np.asarray(v["flips2"])
  for i in range(8):
    np.testing.assert_array_equal(np.asarray(v["view1"])[i], flip(x[i], f1[i]))
  assert v["crop_size"] == 2 and 0 < np.asarray(v["crop_mask"]).sum() < 8
  tiles = np.asarray(apc_losses.unmosaic_2x2(v["mosaic"]))
  for i in range(8):
    src = x[i]
    if v["crop_mask"][i]:
      r, q = np.asarray(v["crop_offsets"])[i] * 8
      src = src[r:r + 16, q:q + 16]
    half = np.asarray(resample.resize_bilinear_align_corners(jnp.asarray(src[None]),
                                                             (16, 16)))[0]
    np.testing.assert_allclose(tiles[i], flip(half, f2[i]), rtol=1e-6, atol=1e-4)

  # The loss, recomputed from the views.
  norm = lambda a: apc_lib.normalize(a, "imagenet")  # noqa: E731
  teacher = m.net.apply({"params": params}, norm(v["view1"]), train=False)[0]
  student = m.net.apply({"params": params}, norm(v["mosaic"]), train=True,
                        rngs={"dropout": k_student})[0]
  want = apc_losses.equivariance_loss(
      teacher, student, jnp.asarray(batch["labels"]), teacher_flips=v["flips1"],
      student_flips=v["flips2"], crop_size=2, crop_offsets=v["crop_offsets"],
      crop_mask=v["crop_mask"])
  np.testing.assert_allclose(float(metrics["loss_eq"]), float(want), rtol=1e-5)

  bad = _tiny("demo,gmp")
  bad.apc.eq_weight, bad.batch_size = 1.0, 6
  with pytest.raises(ConfigError, match=r"config\.batch_size=6 must be a multiple of 4"):
    apc_lib.APCMethod(bad)
  bad = _tiny("demo,gmp")
  bad.apc.eq_crop_fraction = 0.0
  with pytest.raises(ConfigError, match=r"eq_crop_fraction"):
    apc_lib.APCMethod(bad)


def test_supervised_bound_with_the_equivariant_loss_flips_the_mask_with_the_image():
  """``supervised`` with ``eq_weight > 0``: the decoder sees view 1 (flipped), so its true
  mask is flipped the same way; the segmentation term equals ``seg_loss`` of the decoder
  on view 1 against the flipped mask, and differs from the unflipped mask's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastjax.methods import apc_losses  # pylint: disable=g-import-not-at-top
  from contrastjax.models import resample  # pylint: disable=g-import-not-at-top
  c = _tiny("demo,supervised")
  c.apc.update(eq_weight=1.0, eq_flip_prob=0.5)
  m = apc_lib.APCMethod(c)
  batch = next(iter(builder.build(c, local_batch_size=8, local_eval_batch_size=8).train))
  rng = jax.random.PRNGKey(3)
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    params, _, _ = m.init(jax.random.PRNGKey(0), batch)
    _, (_, metrics) = m.loss_fn(params, {}, {}, batch, rng, 3)
  rng_main, k_views, _ = jax.random.split(rng, 3)
  v = m.eq_views(jnp.asarray(batch["image"], jnp.float32), k_views)
  assert np.asarray(v["flips1"]).any(axis=1).sum() >= 2  # some images are flipped
  mask = np.asarray(batch["label"]).astype(np.int32)
  flipped = []
  for img_mask, f in zip(mask, np.asarray(v["flips1"])):
    img_mask = img_mask[:, ::-1] if f[0] else img_mask
    img_mask = img_mask[::-1] if f[1] else img_mask
    flipped.append(img_mask.T if f[2] else img_mask)
  logits = m.net.apply({"params": params}, apc_lib.normalize(v["view1"], "imagenet"),
                       train=True, rngs={"dropout": rng_main})[1]["seg_logits"]
  logits = resample.resize_bilinear_half_pixel(logits.astype(jnp.float32), (32, 32))
  want = apc_losses.seg_loss(logits, jnp.asarray(np.stack(flipped)))
  np.testing.assert_allclose(float(metrics["loss_seg"]), float(want), rtol=1e-6)
  assert (np.stack(flipped) != mask).mean() > 0.05
  # (an untrained decoder is nearly uniform, so the wrong mask moves the loss only a
  # little: still 30x the tolerance above)
  unflipped = apc_losses.seg_loss(logits, jnp.asarray(mask))
  assert abs(float(unflipped) - float(metrics["loss_seg"])) > 30e-6 * float(want)
