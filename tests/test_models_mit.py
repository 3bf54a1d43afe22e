"""Tests of the Mix Transformer encoder (MiT-B0..B5) and its weight import.

Parity is checked against Hugging Face ``transformers``' ``SegformerModel`` (random
weights, perturbed so that LayerNorms and biases are not at their trivial init), with
its state dict converted by :func:`contrastjax.models.mit.load` in every supported
naming: transformers >= 5 module names, Hub files written by ``save_pretrained``
(``encoder.block.0.0.attention.self.query``), the official ``mit_b*.pth`` naming and
the mmseg naming (built here from the Hugging Face tensors by the rules of mmseg's
``mit2mmseg.py``).
"""
import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import mit
from _variables import random_variables

# A small encoder with every feature of the real ones (sr 8/4/2/1, several heads).
TINY = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1))
# One stage of two blocks (the first has no stochastic depth) (the encoder takes any number of stages): for the tests of
# block options, which compile gradients (slow on a small CPU).
ONE_STAGE = dict(embed_dims=(32,), depths=(2,), num_heads=(2,), sr_ratios=(2,),
                 patch_sizes=(7,), strides=(4,))
# MiT-B5 widths and heads with fewer blocks (B5's 3/6/40/3 is too slow for a CPU test).
B5_LIKE = dict(embed_dims=(64, 128, 320, 512), depths=(1, 1, 2, 1))

# Parameter counts of SegformerModel (transformers 5.24) with each MiT config; the
# test recomputes them from transformers when it is installed.
EXPECTED_PARAMS = {"b0": 3_319_392, "b1": 13_151_424, "b2": 24_196_288,
                   "b3": 44_072_128, "b4": 60_842_688, "b5": 81_443_008}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def shapes_of(model, size=64):
  return jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False),
      jax.random.key(0))




def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


# ----------------------------------------------------------------------------- configs
def test_variants_parameter_counts_and_drop_path():
  for name in ("b0", "b5"):  # tracing the others costs ~10 s more for little
    assert count(shapes_of(mit.mit(name))["params"]) == EXPECTED_PARAMS[name], name
  params = shapes_of(mit.mit("b5"))["params"]
  assert params["block3_39"]["attn"]["kv"]["kernel"].shape == (320, 640)
  assert params["block1_0"]["attn"]["sr"]["kernel"].shape == (8, 8, 64, 64)
  assert "sr" not in params["block4_2"]["attn"]
  assert params["block2_0"]["mlp"]["dwconv"]["kernel"].shape == (3, 3, 1, 512)
  assert params["patch_embed1"]["proj"]["kernel"].shape == (7, 7, 3, 64)
  assert params["patch_embed4"]["proj"]["kernel"].shape == (3, 3, 320, 512)
  rates = mit.mit("b5").drop_path_rates()
  assert len(rates) == 52 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
  np.testing.assert_allclose(rates, np.linspace(0, 0.1, 52), atol=1e-12)
  with pytest.raises(ValueError, match="unknown MiT variant 'b9'"):
    mit.mit("b9")
  assert mit.mit("mit_b2").depths == (3, 4, 6, 3)


def test_parameter_counts_match_transformers():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for name in ("b0", "b5"):  # meta tensors: no memory (building all six costs ~10 s)
    cfg, expected = mit.CONFIGS[name], EXPECTED_PARAMS[name]
    with torch.device("meta"):
      hf = transformers.SegformerModel(transformers.SegformerConfig(
          depths=list(cfg["depths"]), hidden_sizes=list(cfg["embed_dims"])))
    assert sum(p.numel() for p in hf.parameters()) == expected, name


# ----------------------------------------------------------------------------- parity
def _hf_model(cfg, seed):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  config = transformers.SegformerConfig(
      depths=list(cfg["depths"]), hidden_sizes=list(cfg["embed_dims"]),
      num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], drop_path_rate=0.1,
      layer_norm_eps=1e-6, hidden_act="gelu")
  model = transformers.SegformerModel(config).eval()
  with torch.no_grad():  # move LayerNorms and biases away from 1 / 0
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _hf_stages(model, x):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)),
                output_hidden_states=True)
  return [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]


def hf_to_mmseg(state, prefix="backbone."):
  """transformers (>= 5) SegformerModel tensors under mmseg names (``mit2mmseg.py``)."""
  out = {}
  for key, value in state.items():
    value = value.numpy()
    m = re.match(r"stages\.(\d+)\.(.*)$", key)
    s, rest = m.group(1), m.group(2)
    rest = re.sub(r"^patch_embeddings\.proj\.", "0.projection.", rest)
    rest = re.sub(r"^patch_embeddings\.layer_norm\.", "0.norm.", rest)
    rest = re.sub(r"^layer_norm\.", "2.", rest)
    m = re.match(r"blocks\.(\d+)\.(.*)$", rest)
    if m:
      block, sub = m.group(1), m.group(2)
      head = f"{prefix}layers.{s}.1.{block}."
      if sub.startswith(("attention.k_proj", "attention.v_proj")):
        continue
      if sub.startswith("attention.q_proj"):
        leaf = sub.rsplit(".", 1)[1]
        packed = [state[f"stages.{s}.blocks.{block}.attention.{n}_proj.{leaf}"].numpy()
                  for n in "qkv"]
        out[f"{head}attn.attn.in_proj_{leaf}"] = np.concatenate(packed, axis=0)
        continue
      sub = (sub.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
             .replace("attention.o_proj", "attn.attn.out_proj")
             .replace("attention.sequence_reduction.sequence_reduction", "attn.sr")
             .replace("attention.sequence_reduction.layer_norm", "attn.norm")
             .replace("mlp.fc1", "ffn.layers.0").replace("mlp.dwconv.dwconv", "ffn.layers.1")
             .replace("mlp.fc2", "ffn.layers.4"))
      if re.match(r"ffn\.layers\.[04]\.weight", sub):
        value = value[:, :, None, None]
      out[head + sub] = value
    else:
      out[f"{prefix}layers.{s}.{rest}"] = value
  return out


@pytest.mark.parametrize("cfg", [mit.CONFIGS["b0"], B5_LIKE], ids=["b0", "b5_reduced"])
def test_parity_with_transformers_segformer(cfg, tmp_path, caplog):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  hf = _hf_model(cfg, seed=0)
  model = mit.MixVisionTransformer(**cfg)
  shapes = shapes_of(model)
  x = images((2, 64, 64, 3))
  expected = _hf_stages(hf, x)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def check(variables, label):
    outs = apply(variables, x)
    assert len(outs) == 4
    for i, (a, b) in enumerate(zip(outs, expected)):
      assert a.shape == b.shape == (2, 64 // 2**(i + 2), 64 // 2**(i + 2),
                                    cfg["embed_dims"][i])
      diff = float(np.abs(np.asarray(a) - b).max())
      assert diff <= 1e-4, f"{label}: stage {i + 1} max abs diff {diff}"

  # 1. transformers >= 5 module names, in memory.
  state = hf.state_dict()
  v5, ignored = mit.load(shapes, state)
  assert ignored == []
  check(v5, "hf_v5")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  # 2. Hub naming, from the .safetensors file written by save_pretrained.
  hf.save_pretrained(tmp_path / "hub")
  hub, ignored = mit.load(shapes, tmp_path / "hub" / "model.safetensors")
  assert ignored == []
  assert mit.detect_style(load_file(str(tmp_path / "hub" / "model.safetensors")))[0] == "hf"
  jax.tree.map(np.testing.assert_array_equal, hub, v5)
  # 3. Official naming (+ an ImageNet classifier head), via .pth (torch) and .npz.
  official = mit.to_torch_state_dict(v5)
  assert "block1.0.attn.kv.weight" in official and "patch_embed2.norm.bias" in official
  official["head.weight"] = np.zeros((1000, cfg["embed_dims"][-1]), np.float32)
  official["head.bias"] = np.zeros((1000,), np.float32)
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in official.items()}},
             tmp_path / "mit.pth")
  with caplog.at_level(logging.WARNING):
    from_pth, ignored = mit.load(shapes, tmp_path / "mit.pth")
  assert ignored == ["head.bias", "head.weight"]
  np.savez(tmp_path / "mit.npz", **official)
  from_npz, _ = mit.load(shapes, tmp_path / "mit.npz")
  jax.tree.map(np.testing.assert_array_equal, from_pth, v5)
  jax.tree.map(np.testing.assert_array_equal, from_npz, v5)
  # 4. mmseg naming (packed q|k|v, 1x1-conv MixFFN) under a 'backbone.' prefix, with a
  # decode head beside it.
  mmseg = hf_to_mmseg(state)
  assert "backbone.layers.0.1.0.attn.attn.in_proj_weight" in mmseg
  exported = mit.to_torch_state_dict(v5, "mmseg")
  assert set(exported) == {k[len("backbone."):] for k in mmseg}
  for k, value in exported.items():
    np.testing.assert_array_equal(value, mmseg["backbone." + k], err_msg=k)
  mmseg["decode_head.conv_seg.weight"] = np.zeros((7, 256, 1, 1), np.float32)
  from_mmseg, ignored = mit.load(shapes, mmseg)
  assert ignored == ["decode_head.conv_seg.weight"]
  jax.tree.map(np.testing.assert_array_equal, from_mmseg, v5)
  check(from_mmseg, "mmseg")


# ----------------------------------------------------------------------------- errors
def test_load_errors_name_the_source_key():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  hf = _hf_model(TINY, seed=1)
  shapes = shapes_of(mit.MixVisionTransformer(**TINY))
  state = {k: v.numpy() for k, v in hf.state_dict().items()}

  wrong = dict(state)
  wrong["stages.1.blocks.0.mlp.fc1.weight"] = np.zeros((128, 31), np.float32)
  with pytest.raises(ValueError, match=r"stages\.1\.blocks\.0\.mlp\.fc1\.weight.*"
                                       r"expected \(128, 32\), got \(128, 31\)"):
    mit.load(shapes, wrong)
  wrong = dict(state)
  wrong["stages.0.blocks.0.attention.v_proj.weight"] = np.zeros((16, 15), np.float32)
  with pytest.raises(ValueError, match=r"k_proj\.weight.*v_proj\.weight"):
    mit.load(shapes, wrong)
  missing = dict(state)
  del missing["stages.2.blocks.0.attention.v_proj.bias"]
  with pytest.raises(KeyError, match=r"stages\.2\.blocks\.0\.attention\.k_proj\.bias"
                                     r".*no matching value"):
    mit.load(shapes, missing)
  missing = dict(state)
  del missing["stages.3.layer_norm.weight"]
  with pytest.raises(KeyError, match=r"missing key 'norm4\.weight'"):
    mit.load(shapes, missing)
  unexpected = dict(state)
  unexpected["stages.0.blocks.0.mlp.fc3.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(KeyError, match=r"stages\.0\.blocks\.0\.mlp\.fc3\.weight"):
    mit.load(shapes, unexpected)
  deeper = shapes_of(mit.MixVisionTransformer(embed_dims=(16, 32, 40, 64),
                                              depths=(2, 1, 1, 1)))
  with pytest.raises(KeyError, match=r"missing key 'block1\.1\.attn\.kv\.bias'"):
    mit.load(deeper, state)
  with pytest.raises(KeyError, match="no MiT encoder found"):
    mit.load(shapes, {"conv1.weight": np.zeros((1,), np.float32)})

  # A UDA checkpoint with student and teacher: the prefix must be chosen.
  two = {**{"model.backbone." + k: v for k, v in hf_to_mmseg(hf.state_dict(), "").items()},
         **{"ema_model.backbone." + k: v for k, v in
            hf_to_mmseg(hf.state_dict(), "").items()}}
  with pytest.raises(KeyError, match="several MiT encoders"):
    mit.load(shapes, two)
  student, ignored = mit.load(shapes, two, prefix="model.backbone.")
  assert ignored and all(k.startswith("ema_model.") for k in ignored)
  reference, _ = mit.load(shapes, state)
  jax.tree.map(np.testing.assert_array_equal, student, reference)


# ----------------------------------------------------------------------------- options
def test_drop_path_remat_and_bf16():
  base = mit.MixVisionTransformer(**ONE_STAGE, drop_path_rate=0.5)
  rematted = mit.MixVisionTransformer(**ONE_STAGE, drop_path_rate=0.5, remat=True)
  shapes = shapes_of(base, 32)
  assert jax.tree.structure(shapes) == jax.tree.structure(shapes_of(rematted, 32))
  variables = random_variables(shapes, 0)
  x = images((4, 32, 32, 3), 1)
  rng = jax.random.key(3)

  def loss_fn(module):
    def loss(params, x):
      outs = module.apply({"params": params}, x, train=True, rngs={"dropout": rng})
      return sum(jnp.mean(jnp.square(o)) for o in outs), outs
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (l0, outs0), g0 = loss_fn(base)(variables["params"], x)
  for policy in mit.REMAT_POLICIES:  # what the recomputed blocks keep: same numbers
    m = rematted.clone(remat_policy=policy)
    (l1, outs1), g1 = loss_fn(m)(variables["params"], x)
    assert float(l0) == pytest.approx(float(l1), rel=1e-6), policy
    for a, b in zip(outs0, outs1):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
  with pytest.raises(ValueError, match=r"remat_policy must be one of \('nothing', 'dots', "
                     r"'all_dots'\), got 'some'"):
    rematted.clone(remat_policy="some").apply(variables, x, train=False)

  # Stochastic depth is active in training and off in eval / when deterministic.
  evals, train_det = jax.jit(lambda v, x: (
      base.apply(v, x, train=False),
      base.apply(v, x, train=True, deterministic=True, rngs={"dropout": rng})))(variables, x)
  assert any(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(outs0, evals))
  for a, b in zip(train_det, evals):
    np.testing.assert_array_equal(a, b)

  # bfloat16 compute with float32 parameters.
  bf16 = mit.MixVisionTransformer(**ONE_STAGE, dtype=jnp.bfloat16)
  low = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x)
  for a, b in zip(low, evals):
    assert a.dtype == jnp.bfloat16
    scale = float(jnp.abs(b).max())
    assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 0.05 * scale


# ----------------------------------------------------------------------------- scan_blocks
# Two stages of 3 and 2 blocks: the scanned model must reproduce the unrolled one.
SCAN_CFG = dict(embed_dims=(16, 32), depths=(3, 2), num_heads=(1, 2), sr_ratios=(4, 2),
                patch_sizes=(7, 3), strides=(4, 2))


def test_scan_blocks_is_the_unrolled_function_on_stacked_parameters():
  unrolled = mit.MixVisionTransformer(**SCAN_CFG, drop_path_rate=0.5)
  scanned = mit.MixVisionTransformer(**SCAN_CFG, drop_path_rate=0.5, scan_blocks=True)
  shapes, scan_shapes = shapes_of(unrolled, 32), shapes_of(scanned, 32)
  assert sorted(scan_shapes["params"]) == ["block1", "block2", "norm1", "norm2",
                                           "patch_embed1", "patch_embed2"]
  assert scan_shapes["params"]["block1"]["attn"]["kv"]["kernel"].shape == (3, 16, 32)
  stacked_shapes = mit.stack_blocks(shapes["params"])
  assert jax.tree.structure(stacked_shapes) == jax.tree.structure(scan_shapes["params"])
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(
      f"{a} vs {b}"), stacked_shapes, scan_shapes["params"])
  assert mit.is_scanned(scan_shapes["params"]) and not mit.is_scanned(shapes["params"])

  params = random_variables(shapes, 0)["params"]
  stacked = mit.stack_blocks(params)
  jax.tree.map(np.testing.assert_array_equal, mit.unstack_blocks(stacked), params)
  np.testing.assert_array_equal(stacked["block1"]["mlp"]["fc1"]["kernel"][2],
                                params["block1_2"]["mlp"]["fc1"]["kernel"])
  x = images((2, 32, 32, 3), 1)

  def loss_fn(module):
    def loss(p, x):
      outs = module.apply({"params": p}, x, train=False)
      return sum(jnp.mean(jnp.square(o)) for o in outs), outs
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (l0, outs0), g0 = loss_fn(unrolled)(params, x)
  (l1, outs1), g1 = loss_fn(scanned)(stacked, x)
  for a, b in zip(outs0, outs1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               mit.stack_blocks(g0), g1)

  # Training: stochastic depth is active (needs the rng), the same with remat, and off
  # when deterministic.
  rng = jax.random.key(5)
  rematted = mit.MixVisionTransformer(**SCAN_CFG, drop_path_rate=0.5, scan_blocks=True,
                                      remat=True)
  train = [jax.jit(lambda p, x, m=m: m.apply({"params": p}, x, train=True,
                                             rngs={"dropout": rng}))(stacked, x)
           for m in (scanned, rematted, rematted.clone(remat_policy="dots"))]
  for a, b, c in zip(*train):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
  (_, _), g2 = loss_fn(rematted.clone(remat_policy="dots"))(stacked, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
  assert any(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(train[0], outs1))
  det = scanned.apply({"params": stacked}, x, train=True, deterministic=True)
  for a, b in zip(det, outs1):  # not jitted: other fusions, float32 rounding
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception, match="dropout"):
    scanned.apply({"params": stacked}, x, train=True)

  # No stochastic depth at all: training needs no rng (as with nn.Dropout(0.0)).
  plain = mit.MixVisionTransformer(**SCAN_CFG, drop_path_rate=0.0, scan_blocks=True)
  for a, b in zip(plain.apply({"params": stacked}, x, train=True), outs1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_scan_blocks_stochastic_depth_drops_whole_samples():
  """With a huge rate each residual branch is either dropped (the block passes its input
  through) or rescaled by 1 / (1 - rate), per sample, as nn.Dropout(broadcast) does."""
  y = images((64, 4, 4, 8), 2)
  rate = jnp.float32(0.75)

  class Probe(mit.Block):
    @mit.nn.compact
    def __call__(self, x):
      return mit._drop_path(self, x, rate, deterministic=False)

  out = Probe(num_heads=1, sr_ratio=1).apply({}, y, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(jnp.all(jnp.isclose(out, y / 0.25), axis=(1, 2, 3)))
  dropped = np.asarray(jnp.all(out == 0, axis=(1, 2, 3)))
  assert np.all(kept | dropped) and 4 <= kept.sum() <= 32  # Binomial(64, 0.25): mean 16


def test_scan_blocks_weight_import_and_export():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cfg = dict(embed_dims=(16, 32, 40, 64), depths=(2, 1, 3, 1))
  hf = _hf_model(cfg, seed=2)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  unrolled, _ = mit.load(shapes_of(mit.MixVisionTransformer(**cfg)), state)
  scanned, ignored = mit.load(
      shapes_of(mit.MixVisionTransformer(**cfg, scan_blocks=True)), state)
  assert not ignored
  jax.tree.map(np.testing.assert_array_equal, scanned["params"],
               mit.stack_blocks(unrolled["params"]))
  for style in ("official", "mmseg"):
    a, b = (mit.to_torch_state_dict(v, style) for v in (unrolled, scanned))
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  x = images((1, 64, 64, 3), 3)
  expected = _hf_stages(hf, x)
  outs = mit.MixVisionTransformer(**cfg, scan_blocks=True).apply(scanned, x, train=False)
  for got, want in zip(outs, expected):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match=r"block1_\*: expected indices 0\.\.1"):
    mit.stack_blocks({"block1_0": {}, "block1_2": {}})


@pytest.mark.parametrize("kernel,padding,dilation,block_rows", [
    (3, 1, 1, None), (3, 6, 6, None), (3, 18, 18, None), (5, 2, 1, None),
    (3, 1, 1, 4), (3, 6, 6, 5)])  # block_rows: the kernel gradient in row blocks
def test_depthwise_conv_implementations_agree(kernel, padding, dilation, block_rows,
                                              monkeypatch):
  x = images((2, 13, 11, 6), 4)
  if block_rows is not None:  # ~block_rows output rows per block, the last one partial
    monkeypatch.setattr(mit, "DEPTHWISE_GRAD_BLOCK_BYTES", 2 * 11 * 6 * 4 * block_rows)
  modules = {impl: mit.DepthwiseConv2d(kernel, padding, dilation, impl=impl)
             for impl in ("shifts", "shifts_autodiff", "conv")}
  variables = random_variables(
      jax.eval_shape(modules["shifts"].init, jax.random.key(0), x), 1)
  # Independent reference: a direct loop over taps in NumPy (zero padding, dilation), and
  # its gradient of sum(y^2): dy = 2y; dx and dk by the same loop transposed.
  xn, kn = np.asarray(x, np.float64), np.asarray(variables["params"]["kernel"], np.float64)
  xp = np.pad(xn, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  ho = 13 + 2 * padding - dilation * (kernel - 1)
  wo = 11 + 2 * padding - dilation * (kernel - 1)
  want = np.zeros((2, ho, wo, 6)) + np.asarray(variables["params"]["bias"])
  for i in range(kernel):
    for j in range(kernel):
      want += xp[:, i * dilation:i * dilation + ho, j * dilation:j * dilation + wo] * kn[i, j, 0]
  dy = 2 * want
  dxp, dk = np.zeros_like(xp), np.zeros_like(kn)
  for i in range(kernel):
    for j in range(kernel):
      rows, cols = slice(i * dilation, i * dilation + ho), slice(j * dilation, j * dilation + wo)
      dxp[:, rows, cols] += dy * kn[i, j, 0]
      dk[i, j, 0] = np.sum(xp[:, rows, cols] * dy, axis=(0, 1, 2))
  dx = dxp[:, padding:padding + 13, padding:padding + 11]
  for impl, module in modules.items():
    np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-5, atol=1e-5,
                               err_msg=impl)
    gv, gx = jax.grad(lambda v, x, m=module: jnp.sum(jnp.square(m.apply(v, x))),
                      (0, 1))(variables, x)
    np.testing.assert_allclose(gx, dx, rtol=1e-4, atol=1e-4, err_msg=impl)
    np.testing.assert_allclose(gv["params"]["kernel"], dk, rtol=1e-4, atol=1e-4, err_msg=impl)
    np.testing.assert_allclose(gv["params"]["bias"], dy.sum((0, 1, 2)), rtol=1e-4,
                               atol=1e-4, err_msg=impl)
  for impl in ("shifts", "conv"):
    low = mit.DepthwiseConv2d(kernel, padding, dilation, impl=impl, dtype=jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    assert low.apply(variables, xb).dtype == jnp.bfloat16
    gv, gx = jax.grad(lambda v, x, m=low: jnp.sum(jnp.square(m.apply(v, x).astype(
        jnp.float32))), (0, 1))(variables, xb)
    assert gx.dtype == jnp.bfloat16 and gv["params"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(gv["params"]["kernel"], dk, rtol=0.05, atol=0.05 * np.abs(dk).max())
  with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'shifts', "
                     r"'shifts_autodiff', 'conv'\), got 'fft'"):
    mit.DepthwiseConv2d(kernel, padding, dilation, impl="fft").apply(variables, x)


def test_depthwise_shifts_gradient_keeps_no_shifted_copies(monkeypatch):
  """XLA:CPU materialises every tap's shifted view for the kernel-gradient reductions of
  the autodiff form (nine input-sized copies); the hand-written backward pass keeps at
  most a row block of each (here 1/16 of the map; 16 MiB by default). XLA's own memory
  plan of the gradient shows it."""
  x = jax.ShapeDtypeStruct((2, 64, 64, 256), jnp.float32)
  view = 2 * 64 * 64 * 256 * 4
  monkeypatch.setattr(mit, "DEPTHWISE_GRAD_BLOCK_BYTES", view // 16)
  temps = {}
  for impl in ("shifts", "shifts_autodiff"):
    m = mit.DepthwiseConv2d(3, 6, 6, impl=impl)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda v, x, m=m: jnp.sum(jnp.square(m.apply(v, x))), (0, 1)))
    temps[impl] = grad.lower(v, x).compile().memory_analysis().temp_size_in_bytes
  assert temps["shifts_autodiff"] >= 8 * view, temps  # the copies this test is about
  assert temps["shifts"] <= 4 * view, temps  # padded input and gradient, row blocks


def test_gelu_saving_input_is_the_erf_gelu_with_its_gradient():
  x = jnp.linspace(-6.0, 6.0, 1001)
  np.testing.assert_array_equal(mit.gelu_saving_input(x), nn.gelu(x, approximate=False))
  # d/dx [x Phi(x)] = Phi(x) + x phi(x), in float64 NumPy from math.erf
  xs = np.asarray(x, np.float64)
  phi = np.exp(-xs ** 2 / 2) / np.sqrt(2 * np.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(xs / np.sqrt(2)))
  g = jax.grad(lambda x: jnp.sum(mit.gelu_saving_input(x)))(x)
  np.testing.assert_allclose(g, cdf + xs * phi, rtol=1e-5, atol=1e-6)
  g_xla = jax.grad(lambda x: jnp.sum(nn.gelu(x, approximate=False)))(x)
  np.testing.assert_allclose(g, g_xla, rtol=1e-5, atol=1e-6)
  gb = jax.grad(lambda x: jnp.sum(mit.gelu_saving_input(x).astype(jnp.float32)))(
      x.astype(jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gb, np.float32), cdf + xs * phi, atol=0.02)
  ffn = mit.MixFFN(8, gelu_grad="tanh")
  with pytest.raises(ValueError, match=r"gelu_grad must be one of \('input', 'autodiff'\), "
                     r"got 'tanh'"):
    ffn.init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))


def test_depthwise_shifts_gradient_with_the_batch_sharded_over_8_devices(monkeypatch):
  """The hand-written backward pass (row blocks in a ``fori_loop``) under a batch
  sharded over the 8 simulated devices, under ``jit``, equals the one-device result."""
  monkeypatch.setattr(mit, "DEPTHWISE_GRAD_BLOCK_BYTES", 8 * 11 * 6 * 4 * 3)  # 3-row blocks
  m = mit.DepthwiseConv2d(3, 2, 2, impl="shifts")
  x = images((8, 13, 11, 6), 4)
  v = random_variables(jax.eval_shape(m.init, jax.random.key(0), x), 1)
  grad = jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.square(m.apply(v, x))), (0, 1)))
  want = grad(v, x)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  got = grad(v, xs)
  assert len(got[1].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
