"""ConDSeg stage-1 / stage-2 methods on a shrunk model (32x32 inputs, CPU).

Parameters are drawn with numpy on the shapes of ``jax.eval_shape(method.init)``: the
jitted flax init costs close to a minute of XLA:CPU compile (mostly the threefry RNG of
~400 leaves), while the method logic under test does not depend on which random values
the model starts from. Each training step is compiled once per model and reused.
"""
from __future__ import annotations

import math

from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from contrastjax.augment import photometric
from contrastjax.methods import condseg as condseg_method
from contrastjax.methods import condseg_losses as L
from contrastjax.methods import get_method_class
from contrastjax.models import condseg as condseg_model
from contrastjax.models import resnet

_ENCODER = dict(stage_sizes=(1, 1, 1), stem_width=8, base_width=8)
_STAGE1_MODEL = dict(name="condseg_stage1", head_width=8, **_ENCODER)
_STAGE2_MODEL = dict(name="condseg", dim=16, decouple_mid=16, num_heads=4,
                     aux_widths=(16, 16, 16, 8, 8), **_ENCODER)
_SIZE = 32


def _config(model: dict, **condseg) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"model": dict(model), "condseg": condseg})


def _batch(seed: int = 0, batch_size: int = 2) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:_SIZE, :_SIZE]
  masks, images = [], []
  for _ in range(batch_size):
    cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 9)
    m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
    img = 0.35 + 0.1 * rng.standard_normal((_SIZE, _SIZE, 3)) + 0.25 * m[..., None]
    masks.append(m[..., None])
    images.append(np.clip(img, 0, 1))
  mask = np.stack(masks).astype(np.float32)
  return {"image": np.stack(images).astype(np.float32), "mask": mask,
          "background": 1.0 - mask, "index": np.arange(batch_size)}


def _fill(shapes, seed: int):
  """Numpy values on an eval_shape tree: PyTorch-like uniform kernels, BN at identity."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    leaf = path[-1]
    if leaf in ("scale", "var"):
      value = np.ones(s.shape)
    elif leaf in ("bias", "mean"):
      value = np.zeros(s.shape)
    else:
      bound = 1.0 / math.sqrt(max(1, math.prod(s.shape[:-1])))
      value = rng.uniform(-bound, bound, s.shape)
      if path[-2] == "fc1":
        # Channel attention has C//16 = 1 hidden unit at these widths; its inputs are
        # post-ReLU, so a positive kernel keeps that unit alive and every leaf must then
        # receive gradient.
        value = np.abs(value)
    out[path] = value.astype(s.dtype)
  return traverse_util.unflatten_dict(out)


def _variables(method, seed: int, batch):
  params_s, state_s, extra_s = jax.eval_shape(method.init, jax.random.key(0), batch)
  assert extra_s == {}
  return _fill(params_s, seed), _fill(state_s, seed + 1)


def _train_step(method, tx):
  def step(params, opt_state, model_state, batch, rng):
    (loss, (model_state, metrics)), grads = jax.value_and_grad(
        method.loss_fn, has_aux=True)(params, model_state, {}, batch, rng, jnp.int32(0))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state, loss, metrics, grads
  return step


def _compile(fn, *args):
  # Not ``xla_backend_optimization_level=0``: it halves the compile time but gives NaN
  # gradients through this model on XLA:CPU (jax 0.10.2).
  return jax.jit(fn).lower(*args).compile()


def _assert_all_grads_nonzero(grads):
  flat = traverse_util.flatten_dict(grads)
  dead = ["/".join(k) for k, g in flat.items() if not np.any(np.asarray(g) != 0)]
  assert not dead, f"leaves without gradient: {dead}"
  assert all(np.all(np.isfinite(np.asarray(g))) for g in flat.values())


def _adam_losses(compiled, params, opt_state, model_state, batch, rng, steps):
  losses = []
  for _ in range(steps):
    params, opt_state, model_state, loss, _, _ = compiled(params, opt_state, model_state,
                                                          batch, rng)
    losses.append(float(loss))
  return losses


# --------------------------------------------------------------------------- config
def test_registry_and_config_errors():
  assert get_method_class("condseg_stage1") is condseg_method.ConDSegStage1Method
  assert get_method_class("condseg") is condseg_method.ConDSegMethod
  m = condseg_method.ConDSegMethod(_config(_STAGE2_MODEL))
  assert isinstance(m.model, condseg_model.ConDSeg) and m.model.dim == 16
  assert not m.double_sigmoid and m.transfer_batch_stats
  with pytest.raises(ValueError, match="doble_sigmoid"):
    condseg_method.ConDSegMethod(_config(_STAGE2_MODEL, doble_sigmoid=True))
  with pytest.raises(ValueError, match="config.model.dim"):
    condseg_method.ConDSegStage1Method(_config(dict(_STAGE1_MODEL, dim=16)))
  with pytest.raises(ValueError, match="strong_aug"):
    condseg_method.ConDSegStage1Method(_config(_STAGE1_MODEL, strong_aug={"blurr": 1}))
  m1 = condseg_method.ConDSegStage1Method(_config(
      dict(_STAGE1_MODEL, dtype="bfloat16", stage_sizes=[1, 1, 1]),
      strong_aug={"hue": 0.0}, double_sigmoid=True))
  assert m1.model.dtype == jnp.bfloat16 and m1.model.stage_sizes == (1, 1, 1)
  assert m1.strong_aug == {"hue": 0.0} and m1.double_sigmoid


def _init_kind(path: tuple[str, ...], shape: tuple[int, ...], flat_params, bn_modules):
  """The PyTorch initial distribution of one parameter of the reference ConDSeg, from its
  layer type and shape alone: ``('normal', std)``, ``('uniform', bound)`` or
  ``('const', value)``.

  * torchvision ResNet (the encoder): conv weights ``kaiming_normal_(mode='fan_out',
    nonlinearity='relu')``, std ``sqrt(2 / (k*k*out))``; BatchNorm weight 1, bias 0;
  * everything else, PyTorch's defaults: ``Conv2d``/``Linear`` weight and bias
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = in * k*k`` (``in`` for
    ``Linear``); ``BatchNorm2d`` weight 1, bias 0.
  """
  module, leaf = path[:-1], path[-1]
  if module in bn_modules:
    return ("const", 1.0 if leaf == "scale" else 0.0)
  kernel = flat_params[module + ("kernel",)]
  if kernel.ndim == 4:  # HWIO
    k, _, cin, cout = kernel.shape
    if path[0] == "encoder":
      assert leaf == "kernel", path  # torchvision's convs have no bias
      return ("normal", math.sqrt(2.0 / (k * k * cout)))
    return ("uniform", 1.0 / math.sqrt(k * k * cin))
  assert kernel.ndim == 2, path   # Dense (torch Linear): [in, out]
  return ("uniform", 1.0 / math.sqrt(kernel.shape[0]))


def test_init_follows_torch_and_torchvision_initialisers():
  """``ConDSegMethod.init`` (as the spine calls it: RBG key, jitted) draws every
  parameter from the reference's PyTorch distribution, computed here from layer types and
  shapes (see ``_init_kind``), and sets the BatchNorm running statistics to 0/1.

  Per leaf: uniform values inside their bound and (for 64+ values) reaching 80% of it;
  normal leaves (256+ values) with their std within 20%. Pooled over all leaves
  (normalised by bound or std), a Kolmogorov-Smirnov test against U(-1, 1) and N(0, 1).
  Bugs caught: fan-in for fan-out (or the reverse), kaiming-uniform(a=0) or flax's
  lecun-normal defaults, truncated normals, zero-init biases, BN scale 0."""
  from contrastjax import spine  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  batch = _batch()
  m = condseg_method.ConDSegMethod(_config(_STAGE2_MODEL))
  key = spine.init_key(jax.random.PRNGKey(0))
  init = jax.jit(m.init).lower(key, batch).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  params, state, extra = jax.device_get(init(key, batch))
  assert extra == {}
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  stats_flat = traverse_util.flatten_dict(state["batch_stats"])
  bn_modules = {k[:-1] for k in stats_flat}
  for k, v in stats_flat.items():
    np.testing.assert_array_equal(v, 0.0 if k[-1] == "mean" else 1.0, err_msg=str(k))
  assert {k[-1] for k in stats_flat} == {"mean", "var"}

  pooled = {"uniform": [], "normal": []}
  counts = {"uniform": 0, "normal": 0, "const": 0}
  for path, w in flat.items():
    kind, value = _init_kind(path, w.shape, flat, bn_modules)
    counts[kind] += 1
    name = "/".join(path)
    if kind == "const":
      np.testing.assert_array_equal(w, value, err_msg=name)
    elif kind == "uniform":
      assert np.abs(w).max() <= value * (1 + 1e-6), (name, np.abs(w).max(), value)
      if w.size >= 64:
        assert np.abs(w).max() >= 0.8 * value, (name, np.abs(w).max(), value)
      pooled["uniform"].append(w.ravel() / value)
    else:
      if w.size >= 256:
        assert 0.8 < w.std() / value < 1.2, (name, w.std(), value)
      pooled["normal"].append(w.ravel() / value)
  # Every kind of layer is present: encoder convs, BN, default convs/linears and biases.
  assert counts["normal"] >= 10 and counts["uniform"] >= 50 and counts["const"] >= 50, counts
  u = np.concatenate(pooled["uniform"])
  z = np.concatenate(pooled["normal"])
  assert u.size > 10_000 and z.size > 10_000
  assert stats.kstest(u, "uniform", args=(-1.0, 2.0)).pvalue > 1e-4
  assert stats.kstest(z, "norm").pvalue > 1e-4


# --------------------------------------------------------------------------- stage 1
def test_stage1_train_step_grads_bn_twice_and_adam():
  method = condseg_method.ConDSegStage1Method(_config(_STAGE1_MODEL))
  batch = _batch(0)
  params, state = _variables(method, 10, batch)
  # Non-zero starting running mean of the stem BN, to tell the updates apart.
  m0 = np.linspace(-1.0, 1.0, 8).astype(np.float32)
  state["batch_stats"]["encoder"]["bn1"]["mean"] = m0
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  rng = jax.random.key(3)
  compiled = _compile(_train_step(method, tx), params, opt_state, state, batch, rng)
  _, _, new_state, loss, metrics, grads = compiled(params, opt_state, state, batch, rng)

  assert np.isfinite(float(loss))
  assert set(metrics) == {"loss", "loss_mask", "loss_mask_bce", "loss_mask_dice",
                          "loss_mask_aug", "loss_consistency"}
  np.testing.assert_allclose(
      float(loss), float(metrics["loss_mask"] + metrics["loss_mask_aug"]
                         + metrics["loss_consistency"]), rtol=1e-6)
  _assert_all_grads_nonzero(grads)

  # Stem BN running mean after the clean pass then the augmented pass (chained):
  # m2 = 0.9 (0.9 m0 + 0.1 mu(x)) + 0.1 mu(x_aug); one pass would give 0.9 m0 + 0.1 mu(x).
  kernel = params["encoder"]["conv1"]["kernel"]

  def stem_mean(x):
    y = lax.conv_general_dilated(jnp.asarray(x), kernel, (2, 2), ((3, 3), (3, 3)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return np.asarray(jnp.mean(y, axis=(0, 1, 2)))

  x_aug = jax.jit(photometric.strong_augment)(rng, jnp.asarray(batch["image"]))
  mu, mu_aug = stem_mean(batch["image"]), stem_mean(x_aug)
  assert np.abs(mu - mu_aug).max() > 1e-3  # the two views differ
  twice = 0.9 * (0.9 * m0 + 0.1 * mu) + 0.1 * mu_aug
  got = np.asarray(new_state["batch_stats"]["encoder"]["bn1"]["mean"])
  np.testing.assert_allclose(got, twice, rtol=1e-4, atol=1e-5)
  assert np.abs(got - (0.9 * m0 + 0.1 * mu)).max() > 1e-3

  losses = _adam_losses(compiled, params, opt_state, state, batch, rng, 6)
  assert losses[-1] < losses[0] - 0.05, losses


def test_stage1_eval_loss_paper_and_corrected():
  batch = _batch(1)
  batch["valid"] = np.array([True, False])
  for double_sigmoid in (False, True):
    method = condseg_method.ConDSegStage1Method(
        _config(_STAGE1_MODEL, double_sigmoid=double_sigmoid))
    params, state = _variables(method, 20, batch)

    def evaluate(params, state, batch):
      return (method.predict(params, state, {}, batch),
              method.eval_loss(params, state, {}, batch))

    compiled = _compile(evaluate, params, state, batch)
    out, loss = compiled(params, state, batch)
    assert set(out) == {"prob"} and out["prob"].shape == (2, _SIZE, _SIZE, 1)
    prob = np.asarray(out["prob"])[:1]
    want = L.dice_bce(prob, batch["mask"][:1], from_logits=False,
                      double_sigmoid=double_sigmoid)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    # The padded example does not count.
    garbage = dict(batch, image=batch["image"][::-1].copy(), mask=1 - batch["mask"])
    garbage["image"][0], garbage["mask"][0] = batch["image"][0], batch["mask"][0]
    np.testing.assert_allclose(float(compiled(params, state, garbage)[1]), float(loss),
                               rtol=1e-6)


# --------------------------------------------------------------------------- stage 2
# The full ConDSeg graph costs ~35 s (train step) and ~10 s (eval) of XLA:CPU compile.
@pytest.mark.slow
def test_stage2_train_step_grads_and_adam():
  method = condseg_method.ConDSegMethod(_config(_STAGE2_MODEL))
  batch = _batch(2)
  params, state = _variables(method, 30, batch)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  rng = jax.random.key(0)
  compiled = _compile(_train_step(method, tx), params, opt_state, state, batch, rng)
  _, _, new_state, loss, metrics, grads = compiled(params, opt_state, state, batch, rng)
  assert np.isfinite(float(loss))
  assert {"loss", "loss_mask", "loss_fg", "loss_bg", "loss_compl", "beta1",
          "beta2"} <= set(metrics)
  m = {k: float(v) for k, v in metrics.items()}
  np.testing.assert_allclose(
      m["loss"], m["loss_mask"] + m["beta1"] * m["loss_fg"] + m["beta2"] * m["loss_bg"]
      + m["loss_compl"], rtol=1e-5)
  _assert_all_grads_nonzero(grads)
  # Running statistics moved (train mode updates them) and keep their structure.
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                       new_state, state))
  assert all(moved)

  losses = _adam_losses(compiled, params, opt_state, state, batch, rng, 6)
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
def test_stage2_predict_and_padded_eval_loss():
  method = condseg_method.ConDSegMethod(_config(_STAGE2_MODEL))
  batch = _batch(3, batch_size=3)
  batch["valid"] = np.array([True, True, False])
  params, state = _variables(method, 40, batch)

  def evaluate(params, state, batch):
    return (method.predict(params, state, {}, batch),
            method.eval_loss(params, state, {}, batch))

  compiled = _compile(evaluate, params, state, batch)
  out, loss = compiled(params, state, batch)
  assert set(out) == {"prob", "fg", "bg", "uc"}
  for v in out.values():
    assert v.shape == (3, _SIZE, _SIZE, 1) and v.dtype == jnp.float32
    assert np.all((np.asarray(v) >= 0) & (np.asarray(v) <= 1))
  assert np.isfinite(float(loss))
  garbage = dict(batch)
  garbage["image"] = batch["image"].copy()
  garbage["image"][2] = 1.0 - batch["image"][2]
  garbage["mask"] = batch["mask"].copy()
  garbage["mask"][2] = 1.0
  garbage["background"] = 1.0 - garbage["mask"]
  out2, loss2 = compiled(params, state, garbage)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out2["prob"])[:2], np.asarray(out["prob"])[:2])
  everything = dict(batch, valid=np.ones(3, bool))
  assert abs(float(compiled(params, state, everything)[1]) - float(loss)) > 1e-4


# --------------------------------------------------------------------------- transfer
def _stage1_source(seed: int, model=_STAGE1_MODEL):
  m1 = condseg_method.ConDSegStage1Method(_config(model))
  params, state = _variables(m1, seed, _batch())
  # Distinct running statistics, as after training.
  state = jax.tree.map(lambda a: a + np.float32(0.5), state)
  return {"params": params, "model_state": state, "extra": {}, "step": 7}


@pytest.mark.parametrize("transfer_batch_stats", [True, False])
def test_stage1_to_stage2_transfer(monkeypatch, transfer_batch_stats):
  source = _stage1_source(50)
  calls = []

  def fake_load_variables(workdir, which="best"):
    calls.append((workdir, which))
    return source

  monkeypatch.setattr(condseg_method.checkpoint, "load_variables", fake_load_variables)
  m2 = condseg_method.ConDSegMethod(_config(
      _STAGE2_MODEL, init_from="runs/stage1", transfer_batch_stats=transfer_batch_stats))
  params, state = _variables(m2, 60, _batch())
  new_params, new_state, extra = m2.load_pretrained(params, state, {})
  assert calls == [("runs/stage1", "best")] and extra == {}

  same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))  # noqa: E731
  assert same(new_params["encoder"], source["params"]["encoder"])
  for key in params:
    if key != "encoder":
      assert same(new_params[key], params[key]), key
  enc_stats = new_state["batch_stats"]["encoder"]
  if transfer_batch_stats:
    assert same(enc_stats, source["model_state"]["batch_stats"]["encoder"])
  else:  # reference train.py: parameters only
    assert same(enc_stats, state["batch_stats"]["encoder"])
  assert same(new_state["batch_stats"]["dconv1"], state["batch_stats"]["dconv1"])


def test_transfer_errors(monkeypatch):
  m2 = condseg_method.ConDSegMethod(_config(_STAGE2_MODEL, init_from="runs/s1"))
  params, state = _variables(m2, 70, _batch())
  wider = _stage1_source(71, dict(_STAGE1_MODEL, base_width=16))
  monkeypatch.setattr(condseg_method.checkpoint, "load_variables", lambda *a, **k: wider)
  with pytest.raises(ValueError, match="shape mismatch"):
    m2.load_pretrained(params, state, {})
  deeper = _stage1_source(72, dict(_STAGE1_MODEL, stage_sizes=(2, 1, 1)))
  monkeypatch.setattr(condseg_method.checkpoint, "load_variables", lambda *a, **k: deeper)
  with pytest.raises(KeyError, match="does not match"):
    m2.load_pretrained(params, state, {})


def test_pretrained_backbone_then_init_from(tmp_path, monkeypatch):
  """Paper recipe: ImageNet encoder, stage-1 parameters on top, ImageNet BN stats kept."""
  imagenet = _stage1_source(80)
  state_dict = resnet.to_torch_state_dict({
      "params": imagenet["params"]["encoder"],
      "batch_stats": imagenet["model_state"]["batch_stats"]["encoder"]})
  state_dict["fc.weight"] = np.zeros((10, 32), np.float32)  # ignored, as torchvision's fc
  path = tmp_path / "resnet50.npz"
  np.savez(path, **state_dict)
  stage1 = _stage1_source(81)
  monkeypatch.setattr(condseg_method.checkpoint, "load_variables",
                      lambda *a, **k: stage1)
  m2 = condseg_method.ConDSegMethod(_config(
      _STAGE2_MODEL, pretrained_backbone=str(path), init_from="runs/s1",
      init_from_which="12", transfer_batch_stats=False))
  assert m2.init_from_which == "12"
  params, state = _variables(m2, 82, _batch())
  new_params, new_state, _ = m2.load_pretrained(params, state, {})
  close = lambda a, b: jax.tree.all(jax.tree.map(  # noqa: E731
      lambda x, y: np.allclose(np.asarray(x), np.asarray(y)), a, b))
  assert close(new_params["encoder"], stage1["params"]["encoder"])
  assert close(new_state["batch_stats"]["encoder"],
               imagenet["model_state"]["batch_stats"]["encoder"])
  # Only the backbone: the rest of the model keeps its initial values.
  assert close(new_params["decouple_layer"], params["decouple_layer"])
