"""Tests of the DAFormer head, the SimSiam branch and the SiamSeg network.

The PyTorch references are rebuilt here from ``torch.nn`` primitives following the
reference code (github.com/woldier/SiamSeg: ``daformer_head.py`` with mmcv's
``ConvModule`` / ``DepthwiseSeparableConvModule``, and ``uda/simsiam.py``), so their
``state_dict`` keys are the reference's and their parameter counts are independent of
the Flax code.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.methods import siamseg_losses
from contrastjax.models import daformer, mit, torch_import
from _variables import random_variables

# SiamSeg sizes: MiT-B5 (81,443,008, see test_models_mit.py), the head with LoveDA's 7
# classes and the SimSiam branch (512 -> 512 -> 2048, predictor 2048 -> 2048 -> 2048).
HEAD_PARAMS_7 = 3_709_191
SIMSIAM_PARAMS = 9_710_592
B5_PARAMS = 81_443_008
# A one-stage encoder for the wiring tests of the full network (gradients compile slowly).
SMALL_NET = dict(num_classes=5, embed_dims=16, channels=16, simsiam_dim=24,
                 backbone_overrides=(("embed_dims", (32,)), ("depths", (1,)),
                                     ("num_heads", (2,)), ("sr_ratios", (2,)),
                                     ("patch_sizes", (7,)), ("strides", (4,))))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def randn(shape, seed=0, scale=1.0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


# ----------------------------------------------------------------------------- torch refs
def torch_reference_head(in_channels, embed_dims, channels, num_classes, dilations=(1, 6, 12, 18),
                         pool=False):
  """The reference DAFormerHead (sep-ASPP fusion) from torch.nn primitives."""
  torch = pytest.importorskip("torch")
  nn, F = torch.nn, torch.nn.functional

  class ConvModule(nn.Module):
    def __init__(self, cin, cout, k=1, pad=0, dil=1, groups=1):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, k, padding=pad, dilation=dil, groups=groups,
                            bias=False)
      self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  class SepConvModule(nn.Module):
    def __init__(self, cin, cout, dil):
      super().__init__()
      self.depthwise_conv = ConvModule(cin, cin, 3, dil, dil, groups=cin)
      self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
      return self.pointwise_conv(self.depthwise_conv(x))

  class MLP(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.proj = nn.Linear(cin, cout)

    def forward(self, x):
      n, _, h, w = x.shape
      y = self.proj(x.flatten(2).transpose(1, 2))
      return y.permute(0, 2, 1).reshape(n, -1, h, w)

  class ASPPWrapper(nn.Module):
    def __init__(self, cin, ch):
      super().__init__()
      self.image_pool = (nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, ch))
                         if pool else None)
      self.aspp_modules = nn.ModuleList(
          [ConvModule(cin, ch) if d == 1 else SepConvModule(cin, ch, d) for d in dilations])
      self.bottleneck = ConvModule((len(dilations) + int(pool)) * ch, ch, 3, 1)

    def forward(self, x):
      outs = []
      if self.image_pool is not None:
        outs.append(F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear",
                                  align_corners=False))
      outs += [m(x) for m in self.aspp_modules]
      return self.bottleneck(torch.cat(outs, dim=1))

  class Head(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_layers = nn.ModuleDict(
          {str(i): MLP(c, embed_dims) for i, c in enumerate(in_channels)})
      self.fuse_layer = ASPPWrapper(embed_dims * len(in_channels), channels)
      self.dropout = nn.Dropout2d(0.1)
      self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, xs):
      size = xs[0].shape[2:]
      cs = [F.interpolate(self.embed_layers[str(i)](x), size=size, mode="bilinear",
                          align_corners=False) for i, x in enumerate(xs)]
      return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(cs, dim=1))))

  return Head()


def torch_reference_simsiam(in_features=512, dim=2048):
  """The reference SimSiam ``fc`` and ``predictor`` Sequentials."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  fc = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                     nn.Linear(in_features, in_features, bias=False),
                     nn.BatchNorm1d(in_features), nn.ReLU(),
                     nn.Linear(in_features, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU())
  predictor = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(),
                            nn.Linear(dim, dim))
  return nn.ModuleDict({"fc": fc, "predictor": predictor})


def _perturb(module, seed):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if name.endswith("running_var"):
        t.uniform_(0.5, 1.5)
      elif name.endswith("running_mean"):
        t.normal_(0, 0.1)
      elif t.is_floating_point() and name.endswith(("bn.weight", "bn.bias")):
        t.add_(torch.randn_like(t) * 0.1)


# ----------------------------------------------------------------------------- counts
def test_siamseg_parameter_counts():
  # The head on MiT-B5's stage maps and the SimSiam branch on its stage 4; the B5
  # encoder itself (81,443,008) is counted in test_models_mit.py.
  feats = [jax.ShapeDtypeStruct((2, 64 // 2**i, 64 // 2**i, c), jnp.float32)
           for i, c in enumerate((64, 128, 320, 512))]
  head = jax.eval_shape(
      lambda k, fs: daformer.DAFormerHead(7).init(k, fs, train=False), jax.random.key(0),
      feats)
  simsiam = jax.eval_shape(lambda k, f: daformer.SimSiam().init(k, f, train=False),
                           jax.random.key(0), feats[-1])
  assert count(head["params"]) == HEAD_PARAMS_7
  assert count(simsiam["params"]) == SIMSIAM_PARAMS
  assert head["params"]["fuse_layer"]["aspp_1"]["depthwise_conv"]["conv"][
      "kernel"].shape == (3, 3, 1, 1024)
  assert simsiam["params"]["predictor"]["linear1"]["kernel"].shape == (2048, 2048)
  assert "bias" not in simsiam["params"]["projector"]["linear2"]
  assert simsiam["params"]["predictor"]["linear2"]["bias"].shape == (2048,)
  # Every Flax variable has a reference name.
  names = {f"model.decode_head.{k}" for k in torch_import.torch_mapping(
      head, daformer.head_torch_names(head["params"]))}
  names |= {f"contras_model.{k}" for k in torch_import.torch_mapping(simsiam,
                                                                     daformer.SIMSIAM_NAMES)}
  assert {"model.decode_head.embed_layers.3.proj.weight",
          "model.decode_head.fuse_layer.aspp_modules.3.pointwise_conv.bn.running_var",
          "model.decode_head.fuse_layer.bottleneck.conv.weight",
          "model.decode_head.conv_seg.bias", "contras_model.fc.6.running_mean",
          "contras_model.predictor.3.bias"} <= names

  torch = pytest.importorskip("torch")
  with torch.device("meta"):
    torch_head = torch_reference_head([64, 128, 320, 512], 256, 256, 7)
    torch_simsiam = torch_reference_simsiam()
  assert sum(p.numel() for p in torch_head.parameters()) == HEAD_PARAMS_7
  assert sum(p.numel() for p in torch_simsiam.parameters()) == SIMSIAM_PARAMS
  torch_names = {f"model.decode_head.{k}" for k in torch_head.state_dict()}
  torch_names |= {f"contras_model.{k}" for k in torch_simsiam.state_dict()}
  assert names == {k for k in torch_names if not k.endswith("num_batches_tracked")}


# ----------------------------------------------------------------------------- parity
def test_daformer_head_parity_with_torch_reference():
  torch = pytest.importorskip("torch")
  in_channels, embed, ch, classes = (16, 24, 40, 48), 16, 24, 5
  ref = torch_reference_head(in_channels, embed, ch, classes, pool=True)
  _perturb(ref, 0)
  feats = [randn((3, 16 // 2**i, 16 // 2**i, c), seed=i) for i, c in enumerate(in_channels)]
  head = daformer.DAFormerHead(classes, embed, ch, pool=True)
  shapes = jax.eval_shape(lambda k: head.init(k, feats, train=False), jax.random.key(0))
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  variables, ignored = torch_import.load_state_dict(
      shapes, state, daformer.head_torch_names(shapes["params"]))
  assert ignored == []
  tfeats = [torch.from_numpy(f.transpose(0, 3, 1, 2)) for f in feats]

  @jax.jit
  def run(v, fs):
    evaluated, _ = head.apply(v, fs, train=False)
    (trained, _), updates = head.apply(v, fs, train=True, deterministic=True,
                                       mutable=["batch_stats"])
    return evaluated, trained, updates["batch_stats"]

  evaluated, trained, stats = run(variables, [jnp.asarray(f) for f in feats])
  with torch.no_grad():
    ref.eval()
    expected_eval = ref(tfeats).numpy().transpose(0, 2, 3, 1)
    ref.train()
    ref.dropout.eval()
    expected_train = ref(tfeats).numpy().transpose(0, 2, 3, 1)
  assert evaluated.shape == (3, 16, 16, classes)
  np.testing.assert_allclose(evaluated, expected_eval, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(trained, expected_train, atol=1e-4, rtol=1e-4)
  new_state = torch_import.to_state_dict({"params": variables["params"], "batch_stats": stats},
                                         daformer.head_torch_names(variables["params"]))
  for key in ("fuse_layer.aspp_modules.2.depthwise_conv.bn.running_var",
              "fuse_layer.image_pool.1.bn.running_mean", "fuse_layer.bottleneck.bn.running_var"):
    np.testing.assert_allclose(new_state[key], ref.state_dict()[key].numpy(), atol=1e-5,
                               rtol=1e-5)

  # Dropout2d drops whole channels in training.
  (dropped, aux), _ = jax.jit(lambda v, fs: head.apply(
      v, fs, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}))(
          variables, [jnp.asarray(f) for f in feats])
  assert not np.allclose(dropped, trained, atol=1e-4)
  assert aux["fused"].shape == (3, 16, 16, ch)


def test_simsiam_parity_with_torch_reference():
  torch = pytest.importorskip("torch")
  in_features, dim = 32, 48
  ref = torch_reference_simsiam(in_features, dim)
  _perturb(ref, 1)
  x1, x2 = randn((4, 3, 3, in_features), 1), randn((4, 3, 3, in_features), 2)
  model = daformer.SimSiam(in_features, dim)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.asarray(x1), train=False),
                          jax.random.key(0))
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  variables, _ = torch_import.load_state_dict(shapes, state, daformer.SIMSIAM_NAMES)

  def loss_fn(params, stats, a, b):
    v = {"params": params, "batch_stats": stats}
    (p1, z1), upd = model.apply(v, a, train=True, mutable=["batch_stats"])
    (p2, z2), upd = model.apply({"params": params, **upd}, b, train=True,
                                mutable=["batch_stats"])
    return siamseg_losses.simsiam_loss(p1, p2, z1, z2), (p1, z1, upd["batch_stats"])

  (loss, (p1, z1, stats)), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 2), has_aux=True))(variables["params"], variables["batch_stats"],
                                              jnp.asarray(x1), jnp.asarray(x2))
  ref.train()
  t1 = torch.from_numpy(x1.transpose(0, 3, 1, 2)).requires_grad_()
  t2 = torch.from_numpy(x2.transpose(0, 3, 1, 2))
  tz1, tz2 = ref["fc"](t1), ref["fc"](t2)
  tp1, tp2 = ref["predictor"](tz1), ref["predictor"](tz2)
  cos = torch.nn.CosineSimilarity(dim=1)
  tloss = -(cos(tp1, tz2.detach()).mean() + cos(tp2, tz1.detach()).mean()) * 0.5
  tloss.backward()
  assert float(loss) == pytest.approx(float(tloss.detach()), abs=1e-5)
  np.testing.assert_allclose(p1, tp1.detach().numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(z1, tz1.detach().numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(grads[1], t1.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6,
                             rtol=1e-3)
  np.testing.assert_allclose(grads[0]["predictor"]["linear2"]["kernel"],
                             ref["predictor"][3].weight.grad.numpy().T, atol=1e-6, rtol=1e-3)
  np.testing.assert_allclose(grads[0]["projector"]["linear1"]["kernel"],
                             ref["fc"][2].weight.grad.numpy().T, atol=1e-6, rtol=1e-3)
  # Two forward calls, two running-stat updates (as the reference's two fc() calls).
  np.testing.assert_allclose(stats["projector"]["bn2"]["var"],
                             ref["fc"][6].running_var.numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------- network


def test_siamseg_net_wiring_and_checkpoint_import(tmp_path, caplog):
  net = daformer.SiamSegNet(**SMALL_NET)
  x = jnp.asarray(randn((2, 32, 32, 3)))
  variables = random_variables(
      jax.eval_shape(lambda k: net.init(k, x, train=False), jax.random.key(0)), 0)
  assert set(variables["params"]) == {"backbone", "decode_head", "contrast"}

  def loss(params, stats, a, b):
    (p1, p2, z1, z2), upd = net.apply({"params": params, "batch_stats": stats}, a, b,
                                      train=True, method=daformer.SiamSegNet.simsiam,
                                      mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return siamseg_losses.simsiam_loss(p1, p2, z1, z2), (z1, upd["batch_stats"])

  (value, (z1, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"], variables["batch_stats"], x, x[::-1])
  assert z1.shape == (2, 24) and np.isfinite(float(value))
  # The loss reaches the shared backbone, not the decode head.
  assert float(jnp.abs(grads["backbone"]["block1_0"]["attn"]["q"]["kernel"]).max()) > 0
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads["decode_head"]))) == 0.0
  jax.tree.map(np.testing.assert_array_equal, stats["decode_head"],
               variables["batch_stats"]["decode_head"])
  assert not np.allclose(stats["contrast"]["projector"]["bn1"]["mean"],
                         variables["batch_stats"]["contrast"]["projector"]["bn1"]["mean"])
  # Segmentation path (numerics are tested per part; shapes only, no compile here).
  (logits, aux), _ = jax.eval_shape(lambda v: net.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}),
                                    variables)
  assert logits.shape == (2, 8, 8, 5) and aux["features"][0].shape == (2, 8, 8, 32)

  # SiamSeg UDA checkpoint: student 'model.*', teacher 'ema_model.*', the SimSiam copy of
  # the backbone 'contras_model.backbone.*'; mmseg names for the backbone.
  state = daformer.to_torch_state_dict(variables)
  assert "model.backbone.layers.0.1.0.attn.attn.in_proj_weight" in state
  official, _ = daformer.load(jax.tree.map(jnp.zeros_like, variables),
                              daformer.to_torch_state_dict(variables, "official"))
  jax.tree.map(np.testing.assert_array_equal, official, variables)
  uda = dict(state)
  for k, v in state.items():
    if k.startswith("model."):
      uda["ema_model." + k[len("model."):]] = v
    if k.startswith("model.backbone."):
      uda["contras_model.backbone." + k[len("model.backbone."):]] = v
  other = jax.tree.map(jnp.zeros_like, variables)
  with caplog.at_level(logging.WARNING):
    loaded, ignored = daformer.load(other, uda)
  assert ignored and all(k.startswith(("ema_model.", "contras_model.backbone."))
                         for k in ignored)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  np.savez(tmp_path / "siamseg.npz", **state)
  from_file, _ = daformer.load(other, tmp_path / "siamseg.npz")
  jax.tree.map(np.testing.assert_array_equal, from_file, variables)

  wrong = dict(state)
  wrong["model.decode_head.conv_seg.weight"] = np.zeros((6, 16, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"model\.decode_head\.conv_seg\.weight.*"
                                       r"expected \(5, 16, 1, 1\), got \(6, 16, 1, 1\)"):
    daformer.load(other, wrong)
  missing = {k: v for k, v in state.items() if not k.startswith("contras_model.fc.3.")}
  with pytest.raises(KeyError, match=r"contras_model\.fc\.3\."):
    daformer.load(other, missing)
  without_branch, _ = daformer.load(other, missing, contrast_prefix=None)
  jax.tree.map(np.testing.assert_array_equal, without_branch["params"]["contrast"],
               other["params"]["contrast"])


def test_siamseg_net_scanned_encoder_imports_and_exports_the_same_checkpoint():
  """The full configs' ``scan_blocks=True`` layout reads and writes the same SiamSeg
  checkpoint as the unrolled one (blocks stacked / unstacked by ``mit``)."""
  cfg = dict(SMALL_NET)
  overrides = dict(cfg.pop("backbone_overrides", ()))
  overrides["depths"] = (3,)
  x = jnp.zeros((1, 32, 32, 3))
  nets = [daformer.SiamSegNet(**cfg, backbone_overrides=tuple(sorted(overrides.items())),
                              scan_blocks=scan) for scan in (False, True)]
  shapes = [jax.eval_shape(lambda k, n=n: n.init(k, x, train=False), jax.random.key(0))
            for n in nets]
  assert "block1" in shapes[1]["params"]["backbone"]
  assert shapes[1]["params"]["backbone"]["block1"]["mlp"]["fc1"]["kernel"].shape[0] == 3
  variables = random_variables(shapes[0], 4)
  state = daformer.to_torch_state_dict(variables)
  scanned, _ = daformer.load(shapes[1], state)
  want = {**variables["params"], "backbone": mit.stack_blocks(variables["params"]["backbone"])}
  jax.tree.map(np.testing.assert_array_equal, scanned["params"], want)
  back = daformer.to_torch_state_dict(scanned)
  assert sorted(back) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
