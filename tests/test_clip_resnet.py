"""Tests of OpenCLIP's ModifiedResNet (RN50 image tower) and its OpenCLIP weight import."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import clip as clip_model
from contrastjax.models import clip_resnet as cr
from contrastjax.models import torch_import
from _variables import random_variables

TINY = dict(layers=(1, 1, 1, 1), width=16, image_size=64, embed_dim=32)  # heads 8
RN50_VISUAL_PARAMS = 38_316_896  # open_clip.create_model('RN50').visual, counted below


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model, size):
  """Variable shapes, without sharding (after other tests an ``eval_shape`` struct can
  carry an abstract-mesh sharding that ``device_put`` refuses)."""
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                          jax.random.key(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)




# ----------------------------------------------------------------------------- structure
def test_rn50_parameter_count_and_shapes():
  shapes = _shapes(cr.ModifiedResNet(), 224)
  assert _count(shapes["params"]) == RN50_VISUAL_PARAMS
  p = shapes["params"]
  assert p["attnpool"]["positional_embedding"].shape == (50, 2048)
  assert p["attnpool"]["c_proj"]["kernel"].shape == (2048, 1024)
  assert p["conv1"]["kernel"].shape == (3, 3, 3, 32)
  assert p["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
  assert "downsample_conv" in p["layer1_0"] and "downsample_conv" not in p["layer1_1"]
  assert cr.ModifiedResNet().num_heads == 32
  keys = set(cr.torch_names(p.keys()) and torch_import.torch_mapping(shapes, cr.torch_names(p)))
  assert {"attnpool.positional_embedding", "layer4.2.bn3.running_var",
          "layer3.0.downsample.0.weight", "conv3.weight"} <= keys


def test_init_follows_openclip_and_size_checks():
  model = cr.ModifiedResNet(**TINY)
  # unsafe_rbg: the init compiles in seconds instead of a minute (threefry) on a CPU.
  v = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3))))(
      jax.random.key(1, impl="unsafe_rbg"))
  p = v["params"]
  for name in ("layer1_0", "layer2_0", "layer3_0", "layer4_0"):
    assert not np.any(np.asarray(p[name]["bn3"]["scale"]))          # zeroed bn3
    np.testing.assert_array_equal(p[name]["bn1"]["scale"], 1.0)
  c = 16 * 32
  q = np.asarray(p["attnpool"]["q_proj"]["kernel"])
  assert abs(q.std() * np.sqrt(c) - 1) < 0.02
  assert np.abs(np.asarray(p["attnpool"]["q_proj"]["bias"])).max() <= c ** -0.5
  conv = np.asarray(p["layer1_0"]["conv2"]["kernel"])                 # U(+-1/sqrt(fan_in))
  assert np.abs(conv).max() <= (9 * 16) ** -0.5
  assert abs(np.asarray(p["attnpool"]["positional_embedding"]).std() * np.sqrt(c) - 1) < 0.1
  z, aux = jax.eval_shape(model.apply, v, jnp.zeros((2, 64, 64, 3)))
  assert z.shape == (2, 32) and aux["features"].shape == (2, 2, 2, 512)
  with pytest.raises(ValueError, match=r"feature map is 3x3 .* 5 tokens"):
    jax.eval_shape(model.apply, v, jnp.zeros((1, 96, 96, 3)))
  with pytest.raises(ValueError, match="4 stages"):
    _shapes(cr.ModifiedResNet(layers=(1, 1, 1)), 64)


def test_clip_tower_option():
  tower = clip_model.build_tower(dict(name="modified_resnet", layers=[1, 1, 1, 1], width=8,
                                      image_size=32), 16, "image")
  assert isinstance(tower, cr.ModifiedResNet) and tower.embed_dim == 16
  assert tower.layers == (1, 1, 1, 1) and tower.num_heads == 4


# ----------------------------------------------------------------------------- import
def test_load_roundtrip_prefix_and_errors(tmp_path):
  model = cr.ModifiedResNet(**TINY)
  shapes = _shapes(model, 64)
  other = random_variables(shapes, 1)
  state = cr.to_torch_state_dict(other, prefix="visual.")
  assert "visual.layer1.0.downsample.1.num_batches_tracked" in state
  # A whole CLIP checkpoint: text-tower keys are ignored and reported.
  full = {**state, "logit_scale": np.float32(2.0), "transformer.resblocks.0.ln_1.weight":
          np.ones(8, np.float32)}
  loaded, ignored = cr.load(shapes, full)
  assert ignored == ["logit_scale", "transformer.resblocks.0.ln_1.weight"]
  jax.tree.map(np.testing.assert_array_equal, loaded, other)   # every leaf back in place
  # The tower's own state dict (no prefix), from a .safetensors file.
  from safetensors.numpy import save_file
  save_file(cr.to_torch_state_dict(other), str(tmp_path / "rn.safetensors"))
  loaded, ignored = cr.load(shapes, tmp_path / "rn.safetensors")
  assert ignored == []
  np.testing.assert_array_equal(loaded["params"]["attnpool"]["positional_embedding"],
                                other["params"]["attnpool"]["positional_embedding"])
  missing = dict(state)
  del missing["visual.attnpool.k_proj.bias"]
  with pytest.raises(KeyError, match=r"attnpool\.k_proj\.bias"):
    cr.load(shapes, missing)
  bigger = cr.to_torch_state_dict(random_variables(
      _shapes(cr.ModifiedResNet(**{**TINY, "image_size": 96}), 96), 2), prefix="visual.")
  with pytest.raises(ValueError, match=r"attnpool\.positional_embedding.*\(5, 512\).*\(10, 512\)"):
    cr.load(shapes, bigger)


# ----------------------------------------------------------------------------- OpenCLIP parity
def _openclip_modified_resnet():
  pytest.importorskip("torch")
  try:
    from open_clip.modified_resnet import ModifiedResNet
  except ImportError:
    try:
      from open_clip.model import ModifiedResNet
    except ImportError:
      pytest.skip("open_clip (open_clip_torch) is not installed")
  return ModifiedResNet


def _randomise_bn(torch, net, seed):
  """Non-trivial BN parameters and running statistics (bn3 is zero after init)."""
  gen = torch.Generator().manual_seed(seed)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.momentum = 1.0
    net.train()(torch.randn(4, 3, net.image_size, net.image_size, generator=gen))
    for m in bns:
      c = m.num_features
      m.momentum = 0.1
      m.running_mean.add_(torch.randn(c, generator=gen) * 0.1)
      m.running_var.mul_(torch.rand(c, generator=gen) * 0.5 + 0.75)
      m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
      m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def test_matches_openclip_modified_resnet(tmp_path):
  ModifiedResNet = _openclip_modified_resnet()
  import torch
  torch.manual_seed(0)
  net = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=32, heads=8, image_size=64,
                       width=16)
  _randomise_bn(torch, net, 1)
  net.eval()
  model = cr.ModifiedResNet(**TINY)
  shapes = _shapes(model, 64)
  # Through a .pt file with a whole-CLIP naming (visual.* plus a text key), as an
  # OpenCLIP checkpoint.
  torch.save({**{"visual." + k: v for k, v in net.state_dict().items()},
              "logit_scale": torch.tensor(2.6)}, tmp_path / "clip.pt")
  variables, ignored = cr.load(shapes, tmp_path / "clip.pt")
  assert ignored == ["logit_scale"]
  x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()

  def both(v, x):  # eval mode, and train-mode BatchNorm (batch statistics): one compile
    (z, _), _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    return model.apply(v, x)[0], z

  with jax.default_matmul_precision("highest"):
    got, got_train = jax.jit(both)(variables, jnp.asarray(x))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"ModifiedResNet eval max|diff| = {diff:.2e} (|out| max {np.abs(want).max():.2f})")
  assert diff <= 1e-4
  with torch.no_grad():
    want_train = net.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(got_train), want_train, atol=1e-4, rtol=0)

  # The full RN50 visual tower has the same number of parameters as ours.
  rn50 = ModifiedResNet(layers=[3, 4, 6, 3], output_dim=1024, heads=32, image_size=224,
                        width=64)
  assert sum(p.numel() for p in rn50.parameters()) == RN50_VISUAL_PARAMS
  buffers = sum(b.numel() for n, b in rn50.named_buffers() if "num_batches" not in n)
  assert buffers == _count(_shapes(cr.ModifiedResNet(), 224)["batch_stats"])
