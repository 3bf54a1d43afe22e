"""CLIP method: InfoNCE, swaps, temperature modes, clamp, optimizer groups, metrics vs
independent NumPy, and the sharded step (8 simulated devices equal 1 device)."""
import _toy
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from contrastjax import parallel
from contrastjax import spine
from contrastjax.data.synthetic.pairs import SyntheticPairs
from contrastjax.evaluators import retrieval as R
from contrastjax.methods import clip as clip_lib
from contrastjax.methods.base import RunInfo


def _unit(rng, n, d):
  x = rng.standard_normal((n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _np_infonce(x, y, beta):
  """Symmetric softmax CE written from the paper's Eq. 2, in float64."""
  z = beta * (x.astype(np.float64) @ y.astype(np.float64).T)
  n = z.shape[0]
  def ce_rows(m):
    mx = m.max(1, keepdims=True)
    lse = np.log(np.exp(m - mx).sum(1)) + mx[:, 0]
    return np.mean(lse - m[np.arange(n), np.arange(n)])
  return 0.5 * (ce_rows(z) + ce_rows(z.T))


def test_symmetric_infonce_matches_numpy_and_masks_padding():
  rng = np.random.default_rng(0)
  x, y = _unit(rng, 12, 5), _unit(rng, 12, 5)
  loss, parts = clip_lib.symmetric_infonce(jnp.asarray(x), jnp.asarray(y), 14.3)
  np.testing.assert_allclose(float(loss), _np_infonce(x, y, 14.3), rtol=1e-5)
  assert abs(float(parts["loss_i2t"]) + float(parts["loss_t2i"]) - 2 * float(loss)) < 1e-5
  # Padding rows (valid=False) are ignored: same as the loss of the valid rows alone.
  xp = np.concatenate([x[:9], rng.standard_normal((3, 5)).astype(np.float32)])
  yp = np.concatenate([y[:9], rng.standard_normal((3, 5)).astype(np.float32)])
  valid = np.arange(12) < 9
  masked, _ = clip_lib.symmetric_infonce(jnp.asarray(xp), jnp.asarray(yp), 14.3,
                                         jnp.asarray(valid))
  np.testing.assert_allclose(float(masked), _np_infonce(x[:9], y[:9], 14.3), rtol=1e-5)


def test_hard_swap_statistics():
  rng = np.random.default_rng(1)
  x, y = jnp.asarray(_unit(rng, 256, 64)), jnp.asarray(_unit(rng, 256, 64))
  sx, sy = clip_lib.hard_swap(jax.random.PRNGKey(0), x, y)
  swapped = np.asarray(sx == y) & np.asarray(sy == x)
  kept = np.asarray(sx == x) & np.asarray(sy == y)
  assert np.all(swapped | kept)                        # each coordinate: swapped or kept
  assert abs(swapped.mean() - 0.5) < 0.01              # ~half of 16384 coordinates
  np.testing.assert_array_equal(np.asarray(sx + sy), np.asarray(x + y))


def test_soft_swap_is_a_convex_combination_preserving_the_sum():
  rng = np.random.default_rng(2)
  x, y = jnp.asarray(_unit(rng, 128, 32)), jnp.asarray(_unit(rng, 128, 32))
  sx, sy = clip_lib.soft_swap(jax.random.PRNGKey(3), x, y)
  np.testing.assert_allclose(np.asarray(sx + sy), np.asarray(x + y), atol=1e-6)
  lam = (np.asarray(sx) - np.asarray(y)) / (np.asarray(x) - np.asarray(y))
  assert lam.min() >= -1e-4 and lam.max() <= 1 + 1e-4
  assert abs(lam.mean() - 0.5) < 0.02 and lam.std() > 0.25   # U[0, 1]: std 0.289
  lo, hi = np.minimum(x, y), np.maximum(x, y)
  assert np.all((np.asarray(sx) >= lo - 1e-6) & (np.asarray(sx) <= hi + 1e-6))


def test_modality_swap_probability_and_renormalisation():
  rng = np.random.default_rng(4)
  x, y = jnp.asarray(_unit(rng, 16, 8)), jnp.asarray(_unit(rng, 16, 8))
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  applied = np.asarray(jax.jit(jax.vmap(
      lambda k: clip_lib.modality_swap(k, x, y, "hard", 0.3)[2]))(keys))
  assert 0.22 < np.mean(applied) < 0.38
  sx, sy, a = clip_lib.modality_swap(jax.random.PRNGKey(0), x, y, "soft", 1.0,
                                     renormalize=True)
  assert float(a) == 1.0
  np.testing.assert_allclose(np.linalg.norm(np.asarray(sx), axis=1), 1.0, rtol=1e-5)
  sx, sy, a = clip_lib.modality_swap(jax.random.PRNGKey(0), x, y, "none", 1.0)
  assert float(a) == 0.0 and np.array_equal(np.asarray(sx), np.asarray(x))


def test_metrics_match_independent_numpy():
  rng = np.random.default_rng(5)
  n, d = 300, 16
  img = _unit(rng, n, d)
  txt = img + 0.6 * rng.standard_normal((n, d)).astype(np.float32) + 0.3
  txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float32)
  # gap
  assert abs(R.modality_gap(img, txt) - np.sqrt(np.sum(
      (img.mean(0) - txt.mean(0)) ** 2))) < 1e-9
  # uniformity: -W2 between N(mu, S) and N(0, I/d) from the closed form with a matrix
  # square root by eigendecomposition of (S^(1/2) (I/d) S^(1/2)).
  z = np.concatenate([img, txt]).astype(np.float64)
  mu, cov = z.mean(0), np.cov(z.T, bias=True)
  w, v = np.linalg.eigh(cov)
  sqrt_cov = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  cross = sqrt_cov @ (np.eye(d) / d) @ sqrt_cov
  w2, v2 = np.linalg.eigh(cross)
  tr_cross_sqrt = np.sum(np.sqrt(np.clip(w2, 0, None)))
  w2_sq = mu @ mu + np.trace(cov) + np.trace(np.eye(d) / d) - 2 * tr_cross_sqrt
  assert abs(R.uniformity_w2(img, txt) + np.sqrt(w2_sq)) < 1e-9
  # recall by explicit sorting
  sim = img @ txt.T
  for k in (1, 5, 10):
    i2t = np.mean([i in np.argsort(-sim[i], kind="stable")[:k] for i in range(n)])
    t2i = np.mean([i in np.argsort(-sim[:, i], kind="stable")[:k] for i in range(n)])
    rec = R.recall_at_k(img, txt, block=64)
    assert rec[f"i2t_R@{k}"] == pytest.approx(i2t) and rec[f"t2i_R@{k}"] == pytest.approx(t2i)
  # zero-shot: prompts at the class means
  labels = rng.integers(0, 3, n)
  protos = _unit(rng, 3, d)
  acc, c = R.zero_shot_accuracy(protos[labels] + 0.01, protos[labels], labels)
  assert c == 3 and acc == 1.0


def test_retrieval_evaluator_accumulates_padded_batches_and_names_pools():
  rng = np.random.default_rng(6)
  n = 700
  img, txt = _unit(rng, n, 8), _unit(rng, n, 8)

  def batches():
    for s in range(0, n, 256):
      m = min(256, n - s)
      valid = np.zeros(256, bool); valid[:m] = True
      index = np.full(256, -1, np.int32); index[:m] = np.arange(s, s + m)
      yield {"valid": valid, "index": index, "rows": index}

  def predict(batch):
    r = np.clip(batch["rows"], 0, None)
    return {"image_embeds": img[r], "text_embeds": txt[r]}

  out = dict(R.RetrievalEvaluator(predict, batches, prefix="val", gap_pairs=512).run())
  assert out["val/num_pairs"] == n
  assert out["val/gap"] == pytest.approx(R.modality_gap(img, txt))
  sub = R.random_pairs(n, 512, 0)
  assert out["val/gap_rand512"] == pytest.approx(R.modality_gap(img[sub], txt[sub]))
  assert out["val/i2t_R@1_pool700"] == pytest.approx(R.recall_at_k(img, txt)["i2t_R@1"])
  assert "val/t2i_R@10_pool512" in out and "val/uniformity_rand512" in out


def _config(**clip):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 10
  c.model = dict(embed_dim=8, image=dict(name="mlp", hidden=16, depth=1),
                 text=dict(name="mlp", hidden=16, depth=1))
  c.clip = dict(clip)
  c.optimizer = dict(name="adamw", lr=1e-2, weight_decay=0.2,
                     groups=clip_lib.optimizer_groups(1.0))
  return c


def _batch(n=16):
  src = SyntheticPairs(n, "train", data_seed=0, dim_x=6, dim_y=5)
  ex = [src[i] for i in range(n)]
  return {k: np.stack([e[k] for e in ex]) for k in ("image", "text")}


def test_clip_step_8_devices_equals_1_device():
  # Learned temperature (the clamp hook), a hard swap drawn from the step key on every
  # step: the draws and the global-batch loss do not depend on the device count.
  config, batch = _config(swap="hard", swap_prob=1.0), _batch()
  method = clip_lib.CLIPMethod(config)
  s1, m1 = _toy.run_steps(method, config, parallel.make_mesh(devices=jax.devices()[:1]),
                          batch)
  s8, m8 = _toy.run_steps(method, config, parallel.make_mesh(), batch)
  assert float(m1["swap_applied"]) == 1.0
  # grad_norm: the gradient itself, which Adam's update would hide a device-count scale of
  for k in ("loss", "loss_i2t", "loss_t2i", "batch_gap", "beta", "grad_norm"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, err_msg=k)
  assert m1["grad_norm"] > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1.params),
                          jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_global_loss_under_8_devices_equals_numpy():
  rng = np.random.default_rng(7)
  x, y = _unit(rng, 16, 4), _unit(rng, 16, 4)
  mesh = parallel.make_mesh()
  with jax.set_mesh(mesh):
    gx, gy = parallel.host_to_global(x, mesh), parallel.host_to_global(y, mesh)
    loss = jax.jit(lambda a, b: clip_lib.symmetric_infonce(a, b, 20.0)[0])(gx, gy)
  np.testing.assert_allclose(float(loss), _np_infonce(x, y, 20.0), rtol=1e-5)


def test_schedule_horizon_is_the_resolved_run_length_also_in_epochs():
  """A config counting epochs has no config.total_steps: the horizon of a scheduled
  temperature comes from the run's resolved steps (it used to be silently missing)."""
  from contrastjax import train as train_lib  # pylint: disable=g-import-not-at-top
  c = _config(temperature="linear", tau0=0.01, tau1=0.05)
  del c["total_steps"]
  c.total_epochs = 3
  c.batch_size = 8
  run = train_lib.run_info(c, num_train=40)
  assert run.total_steps == 15 and run.steps_per_epoch == 5
  m = clip_lib.CLIPMethod(c, run)
  assert m.horizon == 15.0
  assert 1 / float(m.beta(0.0, 15)) == pytest.approx(0.05)
  assert 1 / float(m.beta(0.0, 0)) == pytest.approx(0.01)
  with pytest.raises(ValueError, match="needs horizon > 0"):
    clip_lib.CLIPMethod(c)  # no run facts, no explicit horizon: a named error


def test_temperature_modes_clamp_and_groups():
  batch = _batch(8)
  # learn + exp: OpenCLIP init and the clamp at ln 100 / 0.
  m = clip_lib.CLIPMethod(_config())
  params, _, _ = m.init(jax.random.PRNGKey(0), batch)
  assert float(params["logit_scale"]) == pytest.approx(np.log(1 / 0.07), rel=1e-6)
  big = dict(params, logit_scale=jnp.asarray(7.0))
  assert float(m.project_params(1, big)["logit_scale"]) == pytest.approx(np.log(100.0))
  small = dict(params, logit_scale=jnp.asarray(-3.0))
  assert float(m.project_params(1, small)["logit_scale"]) == pytest.approx(0.0)
  # softplus: init gives tau_init; clamp keeps beta <= 100.
  m = clip_lib.CLIPMethod(_config(parameterization="softplus"))
  params, _, _ = m.init(jax.random.PRNGKey(0), batch)
  assert float(jax.nn.softplus(params["logit_scale"])) == pytest.approx(1 / 0.07, rel=1e-5)
  # schedules: linear S3 from 0.01 to 0.05 over total_steps; per-epoch quantisation.
  run = RunInfo(total_steps=10, steps_per_epoch=4, global_batch_size=8, num_train=32)
  m = clip_lib.CLIPMethod(_config(temperature="linear", tau0=0.01, tau1=0.05,
                                  schedule_steps_per_epoch=4), run)
  assert 1 / float(m.beta(0.0, 0)) == pytest.approx(0.01)
  assert 1 / float(m.beta(0.0, 7)) == pytest.approx(0.01 + 0.04 * 4 / 10)
  m = clip_lib.CLIPMethod(_config(temperature="cosine", tau0=0.01, tau1=0.04,
                                  schedule_period_steps=8))
  assert 1 / float(m.beta(0.0, 4)) == pytest.approx(0.04)
  assert 1 / float(m.beta(0.0, 8)) == pytest.approx(0.01)
  assert m.project_params(1, {"logit_scale": 9.0})["logit_scale"] == 9.0  # not learned
  # weight decay: every parameter with < 2 dims is in a no-decay group.
  import re  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from contrastjax.models import clip as clip_model  # pylint: disable=g-import-not-at-top
  text = clip_model.TextTransformer(vocab_size=20, context_length=6, width=8, layers=1,
                                    heads=2, embed_dim=4)
  image = clip_model.ResNetImageTower(stage_sizes=(1,), stem_width=4, base_width=2,
                                      embed_dim=4)
  model = clip_model.CLIP(image, text)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)),
                                        jnp.zeros((2, 6), jnp.int32)))
  flat = traverse_util.flatten_dict(v["params"])
  rx = re.compile(clip_lib.no_weight_decay_regex())
  for path, leaf in flat.items():
    name = "/".join(path)
    if len(leaf.shape) < 2:
      assert rx.search(name), name
    if rx.search(name):  # OpenCLIP: "bias" in the name also excludes (attention biases)
      assert len(leaf.shape) < 2 or name.endswith("bias"), name
  labels = spine._param_labels(v["params"], [(f"g{i}", g[0]) for i, g in
                                             enumerate(clip_lib.optimizer_groups(0.1))])
  assert labels["logit_scale"] == "g0"


@pytest.mark.parametrize("clip, match", [
    (dict(parameterization="cosh"), "parameterization.*'cosh'"),
    (dict(temperature="stepwise"), "temperature='stepwise'"),
    (dict(temperature="cosine"), "period"),
    (dict(swap="medium"), "swap='medium'"),
    (dict(swap_prob=2.0), "swap_prob"),
    (dict(tau_init=0.001), "tau_init"),
    (dict(bogus=1), "config.clip.bogus"),
])
def test_bad_clip_config_is_named(clip, match):
  with pytest.raises(ValueError, match=match):
    clip_lib.CLIPMethod(_config(**clip))


def test_bad_model_config_is_named():
  c = _config()
  c.model.image = dict(name="vit")
  with pytest.raises(ValueError, match="config.model.image.name='vit'"):
    clip_lib.CLIPMethod(c)
  c = _config()
  c.model.text = dict(name="mlp", widht=3)
  with pytest.raises(ValueError, match="config.model.text.widht"):
    clip_lib.CLIPMethod(c)


def test_paper_towers_step_8_devices_equals_1_device():
  """The paper's towers (OpenCLIP's ModifiedResNet and causal text Transformer, shrunk)
  through the spine: their gathers (token embedding, end-of-text pooling) and attention
  run under the 8-device mesh, with the same loss, gradient norm, BatchNorm statistics
  and parameters as on 1 device. (The first version of the CLIP method failed to trace
  them under the spine's explicit mesh: the COCO config could not start.)"""
  from contrastjax.configs import clip as clip_configs  # pylint: disable=g-import-not-at-top
  from contrastjax.data import builder  # pylint: disable=g-import-not-at-top
  c = clip_configs.get_config()
  c.model.embed_dim = 16
  c.model.image = dict(name="modified_resnet", layers=(1, 1, 1, 1), width=8, heads=4,
                       image_size=32)
  c.model.text = dict(name="transformer", vocab_size=50, context_length=12, width=16,
                      layers=1, heads=2, mlp_ratio=2.0)
  c.data.image_size, c.data.context_length, c.data.max_vocab = 32, 12, 50
  c.batch_size, c.total_steps = 16, 10
  # SGD: Adam would normalise the float-rounding noise of near-zero gradients (a key
  # bias's is exactly zero in theory) into full-size, device-dependent steps.
  c.optimizer = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, momentum=0.9,
                                               schedule="constant"))
  batch, _ = builder.synthetic_batch(c, seed=0)
  batch = {k: batch[k] for k in ("image", "text")}
  method = clip_lib.CLIPMethod(c)
  one = parallel.make_mesh(devices=jax.devices()[:1])
  initial = _toy.initial_state(method, c, one, batch)
  s1, m1 = _toy.run_steps(method, c, one, batch, n=1, initial=initial)
  s8, m8 = _toy.run_steps(method, c, parallel.make_mesh(), batch, n=1, initial=initial)
  for k in ("loss", "batch_gap", "beta", "grad_norm"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, err_msg=k)
  assert m1["grad_norm"] > 0
  # One step: each leaf's change (the gradient's step) agrees to 1% of its largest entry
  # (BatchNorm's batch reductions and the loss's sum are ordered differently over 8
  # devices, and this shrunk ResNet's 1x1 and 2x2 maps amplify rounding over steps).
  def tree(s):
    return {"params": s.params, "state": s.model_state}
  changed = 0
  for (path, a), b, a0 in zip(jax.tree_util.tree_leaves_with_path(tree(s1)),
                              jax.tree.leaves(tree(s8)), jax.tree.leaves(tree(initial))):
    change = np.abs(np.asarray(a) - a0).max()
    changed += change > 0   # (zero-initialised bn3: no gradient into the residual
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * change + 1e-8,  # branches yet)
                               err_msg=jax.tree_util.keystr(path))
  assert changed > 30
