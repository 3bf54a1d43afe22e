"""Tests of the ViT encoder (contrastjax.models.vit) and its weight import.

Parity is checked against timm's ``VisionTransformer`` (random weights, perturbed so
that LayerNorms, biases and the class token are not at their trivial init; eval mode)
with its state dict converted by :func:`vit.load`, at the native size and at other
input sizes (timm's ``dynamic_img_size`` resamples the position embeddings on the fly),
against Hugging Face's ``ViTModel``, and against the same timm weights written in the
original Google ``.npz`` naming by a conversion written here (independent of the one in
the package).
"""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import vit
from _variables import random_variables

# A small encoder for the option tests (compiling gradients is slow on a small CPU).
SMALL = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, img_size=32)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def shapes_of(model, size=None):
  h, w = vit._pair(size if size is not None else model.img_size)
  return jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, h, w, 3)), train=False), jax.random.key(0))




def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _timm_model(name, seed, **kwargs):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kwargs).eval()
  with torch.no_grad():  # move LayerNorms, biases and the class token off 1 / 0
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _timm_forward(model, x, blocks=()):
  """timm tokens ``[B, 1 + N, D]`` after the final norm, and the outputs of ``blocks``."""
  import torch  # pylint: disable=import-outside-toplevel
  seen = {}
  hooks = [model.blocks[i].register_forward_hook(
      lambda m, args, out, i=i: seen.__setitem__(i, out.numpy())) for i in blocks]
  try:
    with torch.no_grad():
      out = model.forward_features(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)))
  finally:
    for h in hooks:
      h.remove()
  return out.numpy(), [seen[i] for i in blocks]


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------- configs
def test_variants_and_parameter_counts_match_timm():
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  for variant, name in (("s16", "vit_small_patch16_224"), ("b16", "vit_base_patch16_224")):
    ours = shapes_of(vit.vit(variant))["params"]
    with torch.device("meta"):  # no memory, no init
      reference = timm.create_model(name, pretrained=False, num_classes=0)
    assert count(ours) == sum(p.numel() for p in reference.parameters()), variant
  params = shapes_of(vit.vit("ViT-B/16", img_size=384))["params"]
  assert params["pos_embed"].shape == (1, 577, 768)
  assert params["patch_embed"]["kernel"].shape == (16, 16, 3, 768)
  assert params["blocks_11"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
  assert params["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (768, 3072)
  assert vit.vit("ViT_Ti16").embed_dim == 192 and vit.vit("s/16").num_heads == 6
  with pytest.raises(ValueError, match="unknown ViT variant 'h14'"):
    vit.vit("h14")
  rates = vit.vit("b16", drop_path_rate=0.1).drop_path_rates()
  np.testing.assert_allclose(rates, np.linspace(0, 0.1, 12), atol=1e-12)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name,variant,scan", [("vit_tiny_patch16_224", "ti16", False),
                                               ("vit_small_patch16_224", "s16", True)],
                         ids=["tiny_unrolled", "small_scanned"])
def test_parity_with_timm_at_several_sizes(name, variant, scan, caplog):
  reference = _timm_model(name, seed=0)
  model = vit.vit(variant, scan_blocks=scan)
  with caplog.at_level(logging.WARNING):
    variables, ignored = vit.load(shapes_of(model), reference.state_dict())
  assert ignored == ["head.bias", "head.weight"]
  assert "ignored 2 classifier-head keys" in caplog.text
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, return_blocks=(0, 7)))
  # The native size, larger and smaller square inputs and a non-square one: the last
  # three resample the position embeddings as timm's dynamic_img_size does.
  for shape in ((2, 224, 224, 3), (2, 288, 288, 3), (1, 160, 160, 3), (1, 160, 224, 3)):
    x = images(shape, seed=shape[1] + shape[2])
    want, want_blocks = _timm_forward(reference, x, blocks=(0, 7))
    tokens, aux = apply(variables, x)
    h, w = shape[1] // 16, shape[2] // 16
    assert tokens.shape == (shape[0], h * w, model.embed_dim)
    assert aux["grid"].shape == (shape[0], h, w, model.embed_dim)
    assert _max_diff(tokens, want[:, 1:]) <= 1e-4, shape
    assert _max_diff(aux["cls"], want[:, 0]) <= 1e-4, shape
    np.testing.assert_array_equal(aux["grid"].reshape(tokens.shape), tokens)
    for got, ref in zip(aux["blocks"], want_blocks):
      assert got.shape == ref.shape and _max_diff(got, ref) <= 1e-4, shape


def test_resample_pos_embed_matches_timm():
  torch = pytest.importorskip("torch")
  timm_pos = pytest.importorskip("timm.layers.pos_embed")
  pos = np.random.default_rng(0).standard_normal((1, 1 + 14 * 14, 24)).astype(np.float32)
  for new in ((18, 18), (10, 10), (24, 14), (14, 14)):
    want = timm_pos.resample_abs_pos_embed(torch.from_numpy(pos), list(new), [14, 14],
                                           num_prefix_tokens=1).numpy()
    got = vit.resample_pos_embed(jnp.asarray(pos), new, (14, 14))
    assert got.shape == want.shape and _max_diff(got, want) <= 1e-5, new
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])  # class token kept
  with pytest.raises(ValueError, match=r"do not match a \(13, 13\) grid"):
    vit.resample_pos_embed(jnp.asarray(pos), (4, 4), (13, 13))


def test_load_resamples_checkpoint_and_reads_files(tmp_path):
  torch = pytest.importorskip("torch")
  timm_pos = pytest.importorskip("timm.layers.pos_embed")
  reference = _timm_model("vit_tiny_patch16_224", seed=1, num_classes=0)
  state = reference.state_dict()
  # A model made for 288 (18 x 18 grid) from a 224 checkpoint (14 x 14).
  model = vit.vit("ti16", img_size=288)
  variables, ignored = vit.load(shapes_of(model), state)
  assert ignored == []
  want_pos = timm_pos.resample_abs_pos_embed(state["pos_embed"], [18, 18],
                                             num_prefix_tokens=1).numpy()
  assert _max_diff(variables["params"]["pos_embed"], want_pos) <= 1e-5
  x = images((1, 288, 288, 3), 3)
  tokens, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert _max_diff(tokens, _timm_forward(reference, x)[0][:, 1:]) <= 1e-4
  # File formats of the same timm state dict, and the exporter's round trip.
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vit.safetensors"))
  torch.save({"model": state}, tmp_path / "vit.pth")
  np.savez(tmp_path / "vit.npz", **{k: v.numpy() for k, v in state.items()})
  native = shapes_of(vit.vit("ti16"))
  loaded = [vit.load(native, tmp_path / f)[0] for f in ("vit.safetensors", "vit.pth", "vit.npz")]
  for other in loaded[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, loaded[0])
  exported = vit.to_torch_state_dict(loaded[0])
  assert sorted(exported) == sorted(state)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)
  # Non-square source grids need their size.
  odd = dict(exported, pos_embed=np.zeros((1, 1 + 12 * 16, 192), np.float32))
  with pytest.raises(ValueError, match=r"'pos_embed' holds 192 grid tokens, not a square"):
    vit.load(native, odd)
  fixed, _ = vit.load(native, odd, source_grid_size=(12, 16))
  assert fixed["params"]["pos_embed"].shape == (1, 197, 192)


# ----------------------------------------------------------------------------- Google npz
def timm_to_google(state, num_heads):
  """timm ViT tensors in the original Google ``vit_jax`` naming (written for the test
  from the layouts of flax's ``Dense`` / ``DenseGeneral`` and ``Conv``)."""
  s = {k: v.numpy() for k, v in state.items()}
  d = s["cls_token"].shape[-1]
  hd = d // num_heads
  out = {"cls": s["cls_token"], "Transformer/posembed_input/pos_embedding": s["pos_embed"],
         "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": s["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": s["norm.weight"],
         "Transformer/encoder_norm/bias": s["norm.bias"]}
  depth = 1 + max(int(m.group(1)) for k in s if (m := re.match(r"blocks\.(\d+)\.", k)))
  for i in range(depth):
    b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    for ln, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
      out[f"{g}{name}/scale"] = s[f"{b}{ln}.weight"]
      out[f"{g}{name}/bias"] = s[f"{b}{ln}.bias"]
    qkv_w = s[f"{b}attn.qkv.weight"].reshape(3, d, d)  # [3, out, in]
    qkv_b = s[f"{b}attn.qkv.bias"].reshape(3, d)
    for j, name in enumerate(("query", "key", "value")):
      # DenseGeneral(features=(heads, head_dim)): kernel [in, heads, head_dim].
      out[f"{g}MultiHeadDotProductAttention_1/{name}/kernel"] = (
          qkv_w[j].T.reshape(d, num_heads, hd))
      out[f"{g}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j].reshape(num_heads, hd)
    # DenseGeneral(axis=(-2, -1)): kernel [heads, head_dim, out].
    out[f"{g}MultiHeadDotProductAttention_1/out/kernel"] = (
        s[f"{b}attn.proj.weight"].T.reshape(num_heads, hd, d))
    out[f"{g}MultiHeadDotProductAttention_1/out/bias"] = s[f"{b}attn.proj.bias"]
    for j in (0, 1):
      out[f"{g}MlpBlock_3/Dense_{j}/kernel"] = s[f"{b}mlp.fc{j + 1}.weight"].T
      out[f"{g}MlpBlock_3/Dense_{j}/bias"] = s[f"{b}mlp.fc{j + 1}.bias"]
  out["head/kernel"] = s["head.weight"].T
  out["head/bias"] = s["head.bias"]
  out["pre_logits/kernel"] = np.zeros((d, d), np.float32)
  out["pre_logits/bias"] = np.zeros((d,), np.float32)
  return out


def test_google_npz_import(tmp_path, caplog):
  pytest.importorskip("torch")
  reference = _timm_model("vit_tiny_patch16_224", seed=2)
  google = timm_to_google(reference.state_dict(), num_heads=3)
  path = tmp_path / "ViT-Ti_16.npz"
  np.savez(path, **google)
  model = vit.vit("ti16")
  shapes = shapes_of(model)
  with caplog.at_level(logging.WARNING):
    variables, ignored = vit.load(shapes, path)
  assert vit.detect_style(google) == ("google", "")
  assert ignored == ["head/bias", "head/kernel", "pre_logits/bias", "pre_logits/kernel"]
  assert "ignored 4 classifier-head keys (head, pre_logits)" in caplog.text
  from_timm, _ = vit.load(shapes, reference.state_dict())
  jax.tree.map(np.testing.assert_array_equal, variables, from_timm)
  x = images((2, 224, 224, 3), 4)
  tokens, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  want, _ = _timm_forward(reference, x)
  assert _max_diff(tokens, want[:, 1:]) <= 1e-4 and _max_diff(aux["cls"], want[:, 0]) <= 1e-4
  # The scanned layout imports the same file.
  scanned, _ = vit.load(shapes_of(vit.vit("ti16", scan_blocks=True)), path)
  jax.tree.map(np.testing.assert_array_equal, scanned["params"],
               vit.stack_blocks(variables["params"]))

  # Errors name the source key, the file and the expected shape.
  key = "Transformer/encoderblock_4/MultiHeadDotProductAttention_1/value/kernel"
  missing = {k: v for k, v in google.items() if k != key}
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match=re.escape(
      f"missing key '{key}', expected shape (192, heads, head_dim) with heads * "
      f"head_dim = 192") + ".*") as info:
    vit.load(shapes, tmp_path / "missing.npz")
  assert str(tmp_path / "missing.npz") in str(info.value)
  wrong = dict(google)
  wrong["Transformer/encoderblock_2/MlpBlock_3/Dense_1/kernel"] = np.zeros((768, 191),
                                                                         np.float32)
  with pytest.raises(ValueError, match=r"shape mismatch for 'Transformer/encoderblock_2/"
                                       r"MlpBlock_3/Dense_1/kernel': expected \(768, 192\), "
                                       r"got \(768, 191\)"):
    vit.load(shapes, wrong)
  extra = dict(google)
  extra["Transformer/encoderblock_0/LayerNorm_1/scale"] = np.ones((192,), np.float32)
  with pytest.raises(ValueError, match=r"unexpected key 'Transformer/encoderblock_0/"
                                       r"LayerNorm_1/scale'"):
    vit.load(shapes, extra)
  deeper = shapes_of(vit.vit("ti16", depth=13))
  with pytest.raises(ValueError, match=r"missing key 'Transformer/encoderblock_12/"
                                       r"LayerNorm_0/bias', expected shape \(192,\) "
                                       r"\(16 missing keys"):
    vit.load(deeper, google)
  with pytest.raises(ValueError, match="no ViT found"):
    vit.load(shapes, {"conv1.weight": np.zeros((1,), np.float32)})
  two = {**{"student/" + k: v for k, v in google.items()},
         **{"teacher/" + k: v for k, v in google.items()}}
  with pytest.raises(ValueError, match="several ViT encoders"):
    vit.load(shapes, two)
  student, ignored = vit.load(shapes, two, prefix="student/")
  assert ignored and all(k.startswith(("teacher/", "student/head", "student/pre_logits"))
                         for k in ignored)
  jax.tree.map(np.testing.assert_array_equal, student, variables)


# ----------------------------------------------------------------------------- HF
def test_parity_with_transformers_vit(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(3)
  config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, image_size=64, patch_size=16,
                                  layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
  hf = transformers.ViTModel(config).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model = vit.VisionTransformer(patch_size=16, embed_dim=64, depth=2, num_heads=4,
                                img_size=64)
  shapes = shapes_of(model)
  x = images((2, 64, 64, 3), 5)
  with torch.no_grad():
    want = hf(pixel_values=torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))
              ).last_hidden_state.numpy()
  in_memory, ignored = vit.load(shapes, hf.state_dict())  # transformers >= 5 names
  assert vit.detect_style(hf.state_dict())[0] == "hf_v5"
  assert ignored == ["pooler.dense.bias", "pooler.dense.weight"]
  hf.save_pretrained(tmp_path / "hub")  # Hub naming: encoder.layer.0.attention.attention
  hub_file = tmp_path / "hub" / "model.safetensors"
  hub, _ = vit.load(shapes, hub_file)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  assert vit.detect_style(load_file(str(hub_file)))[0] == "hf"
  jax.tree.map(np.testing.assert_array_equal, hub, in_memory)
  tokens, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(in_memory, x)
  assert _max_diff(tokens, want[:, 1:]) <= 1e-4 and _max_diff(aux["cls"], want[:, 0]) <= 1e-4
  # Under a prefix, with a classifier beside it (ViTForImageClassification layout).
  prefixed = {"vit." + k: v for k, v in hf.state_dict().items()}
  prefixed["classifier.weight"] = torch.zeros(10, 64)
  loaded, ignored = vit.load(shapes, prefixed)
  assert "classifier.weight" in ignored
  jax.tree.map(np.testing.assert_array_equal, loaded, in_memory)


# ----------------------------------------------------------------------------- options
def test_scan_blocks_equals_unrolled_values_and_gradients():
  unrolled = vit.VisionTransformer(**SMALL)
  scanned = vit.VisionTransformer(**SMALL, scan_blocks=True)
  shapes, scan_shapes = shapes_of(unrolled), shapes_of(scanned)
  assert sorted(scan_shapes["params"]) == ["blocks", "cls_token", "norm", "patch_embed",
                                           "pos_embed"]
  assert scan_shapes["params"]["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
  assert vit.is_scanned(scan_shapes["params"]) and not vit.is_scanned(shapes["params"])
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(
      f"{a} vs {b}"), vit.stack_blocks(shapes["params"]), scan_shapes["params"])
  params = random_variables(shapes, 0)["params"]
  stacked = vit.stack_blocks(params)
  jax.tree.map(np.testing.assert_array_equal, vit.unstack_blocks(stacked), params)
  a, b = (vit.to_torch_state_dict({"params": p}) for p in (params, stacked))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  x = images((2, 40, 32, 3), 1)  # a 5 x 4 grid: resampled position embeddings too

  def loss_fn(module):
    def loss(p, x):
      tokens, aux = module.apply({"params": p}, x, train=False, return_blocks=(1,))
      return jnp.mean(jnp.square(tokens)) + jnp.mean(aux["blocks"][0]), (tokens, aux)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  (l0, (t0, a0)), (g0, gx0) = loss_fn(unrolled)(params, x)
  (l1, (t1, a1)), (g1, gx1) = loss_fn(scanned)(stacked, x)
  np.testing.assert_allclose(t0, t1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a0["blocks"][0], a1["blocks"][0], rtol=1e-5, atol=1e-5)
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               vit.stack_blocks(g0), g1)
  np.testing.assert_allclose(gx0, gx1, rtol=1e-4, atol=1e-6)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g1))


def test_dropout_drop_path_remat_and_attention_paths():
  cfg = dict(SMALL, dropout_rate=0.2, attention_dropout_rate=0.2, drop_path_rate=0.5,
             pos_dropout_rate=0.1)
  base = vit.VisionTransformer(**cfg)
  params = random_variables(shapes_of(base), 0)["params"]
  x = images((4, 32, 32, 3), 2)
  rng = jax.random.key(7)

  def run(module, p, **kw):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, rngs={"dropout": rng},
                                             **kw)[0])(p, x)

  evals = run(base, params, train=False)
  trained = run(base, params, train=True)
  assert float(jnp.abs(trained - evals).max()) > 1e-2  # dropout is on in training
  np.testing.assert_array_equal(run(base, params, train=True, deterministic=True), evals)
  rematted = vit.VisionTransformer(**cfg, remat=True)
  np.testing.assert_allclose(run(rematted, params, train=True), trained, rtol=1e-5,
                             atol=1e-5)
  # Scanned: the same with and without remat (other random draws than unrolled).
  scanned = [vit.VisionTransformer(**cfg, scan_blocks=True, remat=r) for r in (False, True)]
  stacked = vit.stack_blocks(params)
  outs = [run(m, stacked, train=True) for m in scanned]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(outs[0] - evals).max()) > 1e-2
  # jax.nn.dot_product_attention (default, `evals`) and the einsum path (used with a
  # precision) compute the same attention.
  einsum = vit.VisionTransformer(**cfg, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(run(einsum, params, train=False), evals, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"return_blocks \[3\] out of range for depth 3"):
    base.apply({"params": params}, x, train=False, return_blocks=(3,))


def test_bfloat16_forward_is_close_to_float32():
  model = vit.VisionTransformer(**SMALL)
  low = vit.VisionTransformer(**SMALL, dtype=jnp.bfloat16)
  variables = random_variables(shapes_of(model), 0)
  assert jax.tree.structure(shapes_of(low)) == jax.tree.structure(variables)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes_of(low)))
  x = images((2, 32, 32, 3), 3)
  ref, ref_aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got, aux = jax.jit(lambda v, x: low.apply(v, x, train=False))(variables, x)
  assert got.dtype == jnp.bfloat16 and aux["cls"].dtype == jnp.bfloat16
  scale = float(jnp.abs(ref).max())
  assert _max_diff(got.astype(jnp.float32), ref) < 0.05 * scale
  # Relative error of the whole map (bfloat16 keeps 8 bits of mantissa).
  rel = float(jnp.linalg.norm(got.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel < 0.02, rel
