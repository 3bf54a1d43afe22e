"""Tests of the ConDSeg models and their reference (PyTorch) weight import.

The full-size models are only shape-evaluated (``jax.eval_shape``); forward passes use a
shrunk configuration. ``test_matches_reference_*`` compare against the reference
PyTorch code and run only when ``CONDSEG_REFERENCE_DIR`` points at a checkout of
github.com/Mengqi-Lei/ConDSeg (and torch is installed).
"""
import functools
import importlib
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import condseg
from contrastjax.models import resnet
from contrastjax.models import torch_import
from _variables import random_variables

SMALL = dict(stage_sizes=(1, 1, 1), stem_width=8, base_width=4, dim=16, decouple_mid=16,
             num_heads=4, aux_widths=(8, 8, 8, 8, 8))
# XLA:CPU compilation dominates these tests; optimisation level 0 compiles ~2.5x faster.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_fn(fn, *args):
  """``jax.jit(fn)`` compiled for ``args`` with cheap XLA optimisation (small models
  only: unoptimised code is slow to run at full size)."""
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))




def _shapes(model, x):
  return jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))


@pytest.fixture(scope="module")
def small():
  """Shrunk ConDSeg, its variables, an input batch and a compiled eval forward."""
  model = condseg.ConDSeg(**SMALL)
  x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3), np.float32))
  shapes = _shapes(model, x)
  variables = random_variables(shapes, 0)
  forward = compile_fn(lambda v, x: model.apply(v, x, train=False), variables, x)
  return model, shapes, variables, x, forward


# ----------------------------------------------------------------------------- counts
def test_parameter_counts_match_reference():
  x = jnp.zeros((1, 64, 64, 3))
  shapes = _shapes(condseg.ConDSeg(), x)
  params = shapes["params"]
  assert count(params) == 45_552_786
  expected = {
      "encoder": 8_543_296, "dconv1": 837_218, "dconv2": 1_549_922, "dconv3": 2_500_194,
      "dconv4": 4_400_738, "decouple_layer": 15_979_008, "aux_head": 3_875_523,
      "preprocess_fg4": 147_712, "preprocess_bg3": 295_424, "preprocess_fg2": 443_136,
      "preprocess_bg1": 590_848, "cdfa4": 707_464, "cdfa3": 854_920, "cdfa1": 854_920,
      "decoder_small": 347_234, "decoder_large": 347_234, "output_block": 598_721}
  assert {k: count(params[k]) for k in expected} == expected
  encoder = params["encoder"]
  assert count({k: encoder[k] for k in ("conv1", "bn1")}) == 9_536  # layer0
  assert count({k: v for k, v in encoder.items() if k.startswith("layer3_")}) == 7_098_368
  cdfa3 = params["cdfa3"]
  assert count(cdfa3["attn_fg"]) == 41_796 and count(cdfa3["v"]) == 16_512
  assert count([cdfa3["input_cbr_0"], cdfa3["input_cbr_1"]]) == 442_880
  assert count(params["dconv4"]["c6"]) == 131_328 and count(params["dconv1"]["sa"]) == 98
  # 795 tensors + 142 num_batches_tracked = 937 reference state-dict keys.
  mapping = torch_import.torch_mapping(shapes, condseg.torch_names(shapes))
  num_bn = sum(k.endswith("running_mean") for k in mapping)
  assert num_bn == 142 and len(mapping) + num_bn == 937
  assert count(shapes["batch_stats"]) + num_bn == 59_022
  assert mapping["cdfa4.attn_fg.weight"].transform == "linear"
  assert mapping["layer1.1.0.downsample.1.running_var"].path == (
      "encoder", "layer1_0", "downsample_bn", "var")

  stage1 = _shapes(condseg.ConDSegStage1(), x)
  assert count(stage1["params"]) == 8_662_848
  assert count(stage1["params"]["head"]) == 119_552


def test_rejects_bad_input_size():
  with pytest.raises(ValueError, match="multiples of 16"):
    _shapes(condseg.ConDSeg(**SMALL), jnp.zeros((1, 72, 64, 3)))


# ----------------------------------------------------------------------------- forward
def test_forward_contract_and_shapes(small):
  _, _, variables, x, forward = small
  mask, aux = forward(variables, x)
  assert mask.shape == (2, 64, 64, 1) and mask.dtype == jnp.float32
  assert set(aux) == {"mask_logits", "fg", "bg", "uc", "fg_logits", "bg_logits",
                      "uc_logits", "features"}
  np.testing.assert_allclose(mask, jax.nn.sigmoid(aux["mask_logits"]), atol=1e-7)
  for name in ("fg", "bg", "uc"):
    assert aux[name].shape == (2, 64, 64, 1)
    np.testing.assert_allclose(aux[name], jax.nn.sigmoid(aux[f"{name}_logits"]), atol=1e-7)
  want = {"x1": (32, 8), "x2": (16, 16), "x3": (8, 32), "x4": (4, 64),
          "d1": (32, 16), "d2": (16, 16), "d3": (8, 16), "d4": (4, 16),
          "f_fg": (4, 16), "f_bg": (4, 16), "f_uc": (4, 16),
          "f1": (32, 16), "f2": (16, 16), "f3": (8, 16), "f4": (4, 16),
          "f_fg1": (32, 16), "f_bg4": (4, 16),
          "f_small": (32, 16), "f_middle": (16, 16), "f_large": (8, 16)}
  for name, (hw, c) in want.items():
    assert aux["features"][name].shape == (2, hw, hw, c), name
  assert float(jnp.std(aux["mask_logits"])) > 1e-3  # not a constant map


def test_stage1_train_mode_updates_batch_stats():
  model = condseg.ConDSegStage1(stage_sizes=(1, 1, 1), stem_width=8, base_width=4,
                                head_width=8)
  x = jnp.asarray(np.random.default_rng(1).random((2, 32, 32, 3), np.float32))
  shapes = _shapes(model, x)
  assert set(shapes["params"]) == {"encoder", "head"}
  variables = random_variables(shapes, 1)
  step = compile_fn(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                    variables, x)
  (mask, aux), new_state = step(variables, x)
  assert mask.shape == (2, 32, 32, 1) and aux["mask_logits"].shape == (2, 32, 32, 1)
  assert aux["features"]["x4"].shape == (2, 2, 2, 64)
  old = variables["batch_stats"]["head"]["conv1"]["bn"]["mean"]
  new = new_state["batch_stats"]["head"]["conv1"]["bn"]["mean"]
  assert new.shape == old.shape and not np.allclose(new, old)
  keys = condseg.to_torch_state_dict(variables)
  assert "head.conv_fuse.weight" in keys and "layer1.1.0.conv1.weight" in keys


# ----------------------------------------------------------------------------- import
def test_state_dict_roundtrip(small, tmp_path):
  model, shapes, variables, x, forward = small
  state = condseg.to_torch_state_dict(variables)
  assert state["layer0.0.weight"].shape == (8, 3, 7, 7)
  assert state["cdfa1.attn_fg.weight"].shape == (4 * 81, 16)
  assert state["aux_head.branch_uc.9.bias"].shape == (1,)
  assert state["dconv2.c3.1.fc1.weight"].shape == (1, 16, 1, 1)
  assert state["decouple_layer.cbr_bg.2.conv.1.num_batches_tracked"].dtype == np.int64
  loaded, ignored = condseg.load(shapes, state)
  assert ignored == []
  mask_a, aux_a = forward(variables, x)
  mask_b, aux_b = forward(loaded, x)
  np.testing.assert_array_equal(mask_a, mask_b)
  for name in ("fg", "bg", "uc"):
    np.testing.assert_array_equal(aux_a[name], aux_b[name])
  again = condseg.to_torch_state_dict(loaded)
  assert again.keys() == state.keys()
  for key in state:
    np.testing.assert_array_equal(again[key], state[key], err_msg=key)

  np.savez(tmp_path / "condseg.npz", **state)
  from safetensors.numpy import save_file
  save_file(state, str(tmp_path / "condseg.safetensors"))
  for name in ("condseg.npz", "condseg.safetensors"):
    from_file, _ = condseg.load(shapes, tmp_path / name)
    np.testing.assert_array_equal(
        from_file["params"]["cdfa2"]["proj"]["kernel"],
        variables["params"]["cdfa2"]["proj"]["kernel"])


def test_load_errors_name_the_key(small):
  _, shapes, variables, _, _ = small
  state = condseg.to_torch_state_dict(variables)
  missing = dict(state)
  del missing["cdfa3.attn_bg.bias"]
  with pytest.raises(KeyError, match=r"cdfa3\.attn_bg\.bias"):
    condseg.load(shapes, missing)
  wrong = dict(state)
  wrong["dconv1.c2.0.conv.0.weight"] = np.zeros((16, 8, 1, 1), np.float32)
  with pytest.raises(ValueError,
                     match=r"dconv1\.c2\.0\.conv\.0\.weight.*\(16, 8, 3, 3\).*\(16, 8, 1, 1\)"):
    condseg.load(shapes, wrong)
  extra = dict(state)
  extra["decoder_small.c5.conv.0.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(KeyError, match=r"decoder_small\.c5\.conv\.0\.weight"):
    condseg.load(shapes, extra)
  with pytest.raises(ValueError, match="unknown source"):
    condseg.load(shapes, state, source="resnet101")
  with pytest.raises(KeyError, match=r"missing key 'aux_head\.branch_bg\.0\.conv\.0\.weight'"
                     r".*of the model's \d+ keys are missing \(wrong source"):
    condseg.load(shapes, resnet.to_torch_state_dict(
        {c: variables[c]["encoder"] for c in variables}))


def test_partial_loads_report_ignored_keys(small, caplog):
  model, shapes, variables, _, _ = small
  stage1_model = condseg.ConDSegStage1(stage_sizes=(1, 1, 1), stem_width=8, base_width=4)
  stage1 = random_variables(_shapes(stage1_model, jnp.zeros((1, 32, 32, 3))), 5)
  stage1_state = condseg.to_torch_state_dict(stage1)

  # Stage-1 checkpoint -> stage-2 model: encoder only, head reported.
  with caplog.at_level(logging.WARNING):
    loaded, ignored = condseg.load(variables, stage1_state, source="condseg_stage1")
  assert ignored and all(k.startswith("head.") for k in ignored)
  assert "head.conv_fuse.weight" in ignored and f"head.* ({len(ignored)})" in caplog.text
  for c in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, loaded[c]["encoder"], stage1[c]["encoder"])
    jax.tree.map(np.testing.assert_array_equal, loaded[c]["cdfa1"], variables[c]["cdfa1"])

  # ConDSeg checkpoint -> stage-1 model: encoder only.
  _, ignored = condseg.load(stage1, condseg.to_torch_state_dict(variables),
                            source="condseg")
  assert "cdfa4.proj.weight" in ignored and not any(k.startswith("layer") for k in ignored)

  # torchvision ResNet -> encoder; layer4/fc ignored and reported.
  tv = resnet.to_torch_state_dict({c: stage1[c]["encoder"] for c in stage1})
  tv.update({"fc.weight": np.zeros((10, 256), np.float32),
             "layer4.0.conv1.weight": np.zeros((32, 64, 1, 1), np.float32)})
  loaded, ignored = condseg.load(shapes, tv, source="resnet50")
  assert ignored == ["fc.weight", "layer4.0.conv1.weight"]
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["encoder"],
               stage1["params"]["encoder"])
  assert isinstance(loaded["params"]["dconv1"]["c5"]["conv"]["kernel"], jax.ShapeDtypeStruct)


# ----------------------------------------------------------------------------- CDFA
def _np_cbr(x, p, s):
  """3x3 conv (pad 1, HWIO kernel) -> eval BN -> ReLU."""
  k = p["conv"]["kernel"]
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = sum(xp[:, a:a + h, b:b + w] @ k[a, b] for a in range(3) for b in range(3))
  bn, st = p["bn"], s["bn"]
  y = (y - st["mean"]) / np.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
  return np.maximum(y, 0)


def _np_cdfa(params, stats, x, fg, bg, heads):
  """CDFA written from its description (docs/methods/condseg.md), loops over windows."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
  for i in range(2):
    x = _np_cbr(x, p[f"input_cbr_{i}"], s[f"input_cbr_{i}"])
  b, h, w, c = x.shape
  d = c // heads
  offsets = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]  # row-major window
  linear = lambda z, name: z @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731

  def attention(guide, name):
    # 4*81 outputs laid out (head, i = output window position, j = source position).
    logits = linear(guide, name).reshape(b, h, w, heads, 9, 9) * d**-0.5
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  def aggregate(values, attn):
    padded = np.pad(values, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h + 2, w + 2, c))
    for i, (di, dj) in enumerate(offsets):
      acc = np.zeros((b, h, w, heads, d))
      for j, (ei, ej) in enumerate(offsets):  # value at source position j of the window
        src = padded[:, 1 + ei:1 + ei + h, 1 + ej:1 + ej + w].reshape(b, h, w, heads, d)
        acc += attn[..., i, j][..., None] * src
      # Window entry i of the window centred at p belongs to pixel p + offset_i (fold).
      out[:, 1 + di:1 + di + h, 1 + dj:1 + dj + w] += acc.reshape(b, h, w, c)
    return linear(out[:, 1:-1, 1:-1], "proj")

  x_fg = aggregate(linear(x, "v"), attention(fg, "attn_fg"))
  x_bg = aggregate(x_fg, attention(bg, "attn_bg"))  # bg pass: fg output as values, no v
  for i in range(2):
    x_bg = _np_cbr(x_bg, p[f"output_cbr_{i}"], s[f"output_cbr_{i}"])
  return x_bg


def test_cdfa_matches_independent_numpy():
  rng = np.random.default_rng(3)
  x, fg, bg = (rng.normal(size=(2, 6, 5, c)).astype(np.float32) for c in (24, 16, 16))
  module = condseg.ContrastDrivenFeatureAggregation(dim=16, num_heads=4)
  args = tuple(map(jnp.asarray, (x, fg, bg)))
  shapes = jax.eval_shape(lambda k: module.init(k, *args, train=False), jax.random.key(0))
  variables = random_variables(shapes, 3)
  # Larger attention logits so the softmax is far from uniform.
  for name in ("attn_fg", "attn_bg"):
    variables["params"][name]["kernel"] = variables["params"][name]["kernel"] * 8
  with jax.default_matmul_precision("highest"):
    got = compile_fn(lambda v, *a: module.apply(v, *a, train=False), variables, *args)(
        variables, *args)
  want = _np_cdfa(variables["params"], variables["batch_stats"], x, fg, bg, heads=4)
  assert got.shape == (2, 6, 5, 16)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6 * np.abs(want).max(), rtol=0)

  # Reduced precision runs and stays close.
  module16 = condseg.ContrastDrivenFeatureAggregation(dim=16, num_heads=4,
                                                      dtype=jnp.bfloat16)
  got16 = compile_fn(lambda v, *a: module16.apply(v, *a, train=False), variables, *args)(
      variables, *args)
  assert got16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(got16, np.float32) - want).max() < 0.1 * np.abs(want).max()


# ----------------------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def reference():
  """(torch, reference network/model.py, network/model_stage1.py), pretrained off."""
  ref_dir = os.environ.get("CONDSEG_REFERENCE_DIR")
  if not ref_dir:
    pytest.skip("set CONDSEG_REFERENCE_DIR to a checkout of Mengqi-Lei/ConDSeg")
  torch = pytest.importorskip("torch")
  network = os.path.join(ref_dir, "network")
  if not os.path.isfile(os.path.join(network, "model.py")):
    pytest.fail(f"CONDSEG_REFERENCE_DIR={ref_dir} has no network/model.py")
  names = ("resnet", "model", "model_stage1")  # the reference imports `from resnet ...`
  saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
  sys.path.insert(0, network)
  try:
    ref_resnet, ref_model, ref_stage1 = map(importlib.import_module, names)
  finally:
    sys.path.remove(network)
    for n in names:
      sys.modules.pop(n, None)
    sys.modules.update(saved)
  no_download = functools.partial(ref_resnet.resnet50, pretrained=False)
  ref_model.resnet50 = no_download
  ref_stage1.resnet50 = no_download
  torch.set_num_threads(2)
  return torch, ref_model, ref_stage1


def _randomise_bn(torch, net, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
        m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
        m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


_HOOKS = {**{f"layer{i}": f"x{i + 1}" for i in range(4)},
          **{f"dconv{i}": f"d{i}" for i in range(1, 5)},
          **{f"cdfa{i}": f"f{i}" for i in range(1, 5)},
          **{f"preprocess_{b}{i}": f"f_{b}{i}" for b in ("fg", "bg") for i in range(1, 5)},
          **{f"decoder_{s}": f"f_{s}" for s in ("small", "middle", "large")},
          "decouple_layer": "decoupled", "output_block.c3": "mask_logits",
          **{f"aux_head.branch_{b}.9": f"{b}_logits" for b in ("fg", "bg", "uc")}}


def _run_reference(torch, net, x):
  """Reference forward on NHWC numpy ``x``: (outputs, intermediates), NHWC numpy."""
  captured = {}
  handles = [m.register_forward_hook(
      lambda mod, inp, out, key=_HOOKS[n]: captured.__setitem__(key, out))
             for n, m in net.named_modules() if n in _HOOKS]
  try:
    with torch.no_grad():
      outputs = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  finally:
    for h in handles:
      h.remove()
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
  if "decoupled" in captured:
    for b, t in zip(("fg", "bg", "uc"), captured.pop("decoupled")):
      captured[f"f_{b}"] = t
  outputs = outputs if isinstance(outputs, tuple) else (outputs,)
  return [nhwc(o) for o in outputs], {k: nhwc(v) for k, v in captured.items()}


def _max_errors(ours_outputs, ours_aux, ref_outputs, ref_features):
  errors = {name: float(np.abs(np.asarray(o) - r).max())
            for name, o, r in zip(("mask", "fg", "bg", "uc"), ours_outputs, ref_outputs)}
  for key, want in ref_features.items():
    got = ours_aux[key] if key in ours_aux else ours_aux["features"][key]
    errors[key] = float(np.abs(np.asarray(got, np.float64) - want).max())
  return errors


def test_matches_reference_condseg(reference):
  torch, ref_model, _ = reference
  torch.manual_seed(0)
  net = ref_model.ConDSeg()
  _randomise_bn(torch, net, 1)
  state = {k: v.clone() for k, v in net.state_dict().items()}
  assert len(state) == 937
  x = np.random.default_rng(0).random((2, 64, 64, 3), np.float32)
  model = condseg.ConDSeg()
  variables, ignored = condseg.load(_shapes(model, jnp.asarray(x)), state)
  assert ignored == []

  # float32, eval mode: the four outputs.
  ref_out, ref_feat = _run_reference(torch, net.eval(), x)
  with jax.default_matmul_precision("highest"):
    mask, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                   jnp.asarray(x))
  errors = _max_errors((mask, aux["fg"], aux["bg"], aux["uc"]), aux, ref_out, ref_feat)
  print("float32 eval max abs errors:", errors)
  for name in ("mask", "fg", "bg", "uc", "mask_logits", "fg_logits"):
    assert errors[name] <= 1e-4, (name, errors[name])
  for key, want in ref_feat.items():  # intermediates: relative to their scale
    assert errors[key] <= 1e-5 * max(1.0, np.abs(want).max()), (key, errors[key])

  # float64, eval and train mode: every intermediate and the updated BN statistics.
  # In float64 rounding noise is ~1e-12, so any semantic difference shows far above it.
  with jax.enable_x64(True):
    model64 = condseg.ConDSeg(dtype=jnp.float64)
    v64 = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    x64 = x.astype(np.float64)
    net.double()
    for train in (False, True):
      net.load_state_dict(state)  # restore float32-exact running stats
      net.double().train(train)
      ref_out, ref_feat = _run_reference(torch, net, x64)
      fn = lambda v, x, t=train: model64.apply(  # noqa: E731
          v, x, train=t, mutable=["batch_stats"] if t else False)
      out = jax.jit(fn)(v64, jnp.asarray(x64))
      (mask, aux), new_state = out if train else (out, None)
      errors = _max_errors((mask, aux["fg"], aux["bg"], aux["uc"]), aux, ref_out, ref_feat)
      print(f"float64 train={train} max abs errors:", errors)
      assert max(errors.values()) <= 1e-9, errors
      if train:
        ours = condseg.to_torch_state_dict({"params": v64["params"], **new_state})
        ref_state = net.state_dict()
        stat_err = max(float(np.abs(ours[k] - ref_state[k].numpy()).max())
                       for k in ours if k.endswith(("running_mean", "running_var")))
        print("float64 running-stat max abs error:", stat_err)
        assert stat_err <= 1e-10


def test_matches_reference_stage1(reference):
  torch, _, ref_stage1 = reference
  torch.manual_seed(1)
  net = ref_stage1.ConDSegStage1()
  _randomise_bn(torch, net, 2)
  state = {k: v.clone() for k, v in net.state_dict().items()}
  x = np.random.default_rng(1).random((2, 64, 64, 3), np.float32)
  model = condseg.ConDSegStage1()
  variables, ignored = condseg.load(_shapes(model, jnp.asarray(x)), state,
                                    source="condseg_stage1")
  assert ignored == []
  with torch.no_grad():
    want = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  with jax.default_matmul_precision("highest"):
    mask, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                 jnp.asarray(x))
  err = float(np.abs(np.asarray(mask) - want).max())
  print("stage1 float32 eval max abs error:", err)
  assert err <= 1e-4
  net.train()
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  (mask, _), new_state = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
          variables, jnp.asarray(x))
  err = float(np.abs(np.asarray(mask) - want).max())
  ours = condseg.to_torch_state_dict({"params": variables["params"], **new_state})
  ref_state = net.state_dict()
  stat_err = max(float(np.abs(ours[k] - ref_state[k].numpy()).max() /
                       max(1.0, np.abs(ref_state[k].numpy()).max()))
                 for k in ours if k.endswith(("running_mean", "running_var")))
  print("stage1 float32 train max abs error:", err, "running stats (rel):", stat_err)
  assert err <= 1e-4 and stat_err <= 1e-4
