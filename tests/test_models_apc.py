"""Tests of the APC model pieces (contrastjax.models.apc).

The HV-BiLSTM is checked against ``torch.nn.LSTM(bidirectional=True, batch_first=True)``
run over the rows and the columns of the grid (weights converted through the Keras
layout, gate order i, f, g, o); the decoders against PyTorch modules built here from
the description of ToCo's ``LargeFOV`` / ``ASPP`` (``model/decoder/conv_head.py`` at
e13514d); parameter counts against numbers computed here from the layer shapes and
from timm / PyTorch modules.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import apc
from contrastjax.models import vit
from contrastjax.models import torch_import

# A small ViT: 64x64 inputs give a 4x4 patch grid.
SMALL_VIT = (("embed_dim", 32), ("depth", 2), ("num_heads", 2))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def lstm_count(d, u):
  """Parameters of one LSTM direction with one bias vector (Keras / flax)."""
  return 4 * (d * u + u * u + u)


def _torch_lstm(d, u, seed):
  torch = pytest.importorskip("torch")
  torch.manual_seed(seed)
  return torch.nn.LSTM(d, u, bidirectional=True, batch_first=True).eval()


def _cell_params(lstm, suffix):
  """PyTorch LSTM direction -> Keras layout -> flax cell parameters, checked against a
  direct mapping of PyTorch's row blocks (i, f, g, o) to flax's gate names."""
  get = lambda name: getattr(lstm, name + suffix).detach().numpy()  # noqa: E731
  params = apc.lstm_params_from_keras(get("weight_ih_l0").T, get("weight_hh_l0").T,
                                      get("bias_ih_l0") + get("bias_hh_l0"))
  u = lstm.hidden_size
  for j, gate in enumerate("ifgo"):
    rows = slice(j * u, (j + 1) * u)
    np.testing.assert_array_equal(params[f"i{gate}"]["kernel"], get("weight_ih_l0")[rows].T)
    np.testing.assert_array_equal(params[f"h{gate}"]["kernel"], get("weight_hh_l0")[rows].T)
    np.testing.assert_array_equal(params[f"h{gate}"]["bias"],
                                  get("bias_ih_l0")[rows] + get("bias_hh_l0")[rows])
  return params


# ----------------------------------------------------------------------------- LSTM
def test_keras_lstm_cell_is_flax_cell_with_keras_init():
  d, u = 12, 8
  cell = apc.KerasLSTMCell(u)
  x = images((5, d), 0)
  carry = cell.initialize_carry(jax.random.key(0), x.shape)
  params = cell.init(jax.random.key(1), carry, x)["params"]
  for flax_cell in (nn.OptimizedLSTMCell(u), nn.LSTMCell(u)):
    theirs = jax.eval_shape(flax_cell.init, jax.random.key(1), carry, x)["params"]
    assert jax.tree.structure(theirs) == jax.tree.structure(params)
  # Keras init: forget bias 1, other biases 0, glorot-uniform bounds of [D, 4u].
  np.testing.assert_array_equal(params["hf"]["bias"], np.ones(u))
  for g in "igo":
    np.testing.assert_array_equal(params[f"h{g}"]["bias"], np.zeros(u))
  limit = math.sqrt(6.0 / (d + 4 * u))
  kernels = np.concatenate([params[f"i{g}"]["kernel"] for g in "ifgo"], axis=1)
  assert np.abs(kernels).max() <= limit and np.abs(kernels).max() > 0.8 * limit
  recurrent = np.asarray(params["hi"]["kernel"])
  np.testing.assert_allclose(recurrent.T @ recurrent, np.eye(u), atol=1e-5)
  # Same function as flax's cells on the same (perturbed) parameters, over two steps.
  params = jax.tree.map(lambda p: p + 0.3 * images(p.shape, 2), params)
  h = images((5, u), 3)
  carry = (images((5, u), 4), h)
  for flax_cell in (nn.OptimizedLSTMCell(u), nn.LSTMCell(u)):
    ours, theirs = carry, carry
    for step in range(2):
      ours, y_ours = cell.apply({"params": params}, ours, x + step)
      theirs, y_theirs = flax_cell.apply({"params": params}, theirs, x + step)
      np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
  # Keras layout round trip.
  k, r, b = apc.lstm_params_to_keras(params)
  assert k.shape == (d, 4 * u) and r.shape == (u, 4 * u) and b.shape == (4 * u,)
  back = apc.lstm_params_from_keras(k, r, b)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  with pytest.raises(ValueError, match=r"expected kernel \[D, 4u\]"):
    apc.lstm_params_from_keras(k[:, :-1], r, b)


def test_hvbilstm_matches_torch_bidirectional_lstm():
  torch = pytest.importorskip("torch")
  b, h, w, d, u = 2, 3, 5, 12, 8  # a non-square grid: rows and columns differ
  rows, cols = _torch_lstm(d, u, 0), _torch_lstm(d, u, 1)
  params = {name: {"forward_rnn": {"cell": _cell_params(lstm, "")},
                   "backward_rnn": {"cell": _cell_params(lstm, "_reverse")}}
            for name, lstm in (("rows", rows), ("cols", cols))}
  module = apc.HVBiLSTM(u, dropout_rate=0.2, lstm_dropout_rate=0.2)
  x = images((b, h, w, d), 5)
  shapes = jax.eval_shape(lambda k: module.init(k, x, deterministic=True), jax.random.key(0))
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)
  with torch.no_grad():
    xt = torch.from_numpy(np.array(x))
    want_rows = rows(xt.reshape(b * h, w, d))[0].reshape(b, h, w, 2 * u)
    want_cols = cols(xt.permute(0, 2, 1, 3).reshape(b * w, h, d))[0]
    want_cols = want_cols.reshape(b, w, h, 2 * u).permute(0, 2, 1, 3)
    want = torch.cat([want_rows, want_cols], dim=-1).numpy()
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x, deterministic=True))
  got = apply(params, x)
  assert got.shape == (b, h, w, 4 * u)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(apply(params, x), got)  # deterministic: no dropout
  # bfloat16 matmuls, float32 recurrence.
  low = apc.HVBiLSTM(u, dtype=jnp.bfloat16).apply({"params": params}, x, deterministic=True)
  assert low.dtype == jnp.bfloat16
  assert float(jnp.abs(low.astype(jnp.float32) - want).max()) < 0.05

  # ViT-PCM's size: 768 -> 4 x 192, parameters of four Keras LSTMs (one bias each;
  # PyTorch's LSTM has two bias vectors per direction).
  full = jax.eval_shape(lambda k: apc.HVBiLSTM().init(k, jnp.zeros((1, 24, 24, 768)),
                                                      deterministic=True),
                        jax.random.key(0))
  with torch.device("meta"):
    reference = torch.nn.LSTM(768, 192, bidirectional=True)
  torch_count = sum(p.numel() for p in reference.parameters())
  assert count(full) == 2 * (torch_count - 2 * 4 * 192) == 4 * lstm_count(768, 192)
  out = jax.eval_shape(lambda v: apc.HVBiLSTM().apply(v, jnp.zeros((1, 24, 24, 768)),
                                                      deterministic=True), full)
  assert out.shape == (1, 24, 24, 768)


@pytest.mark.parametrize("mode", ["per_step", "per_sequence"])
def test_lstm_input_dropout_masks(mode):
  b, h, w, d, u, rate = 2, 6, 7, 64, 4, 0.2
  module = apc.HVBiLSTM(u, dropout_rate=0.0, lstm_dropout_rate=rate, lstm_dropout_mode=mode)
  x = jnp.ones((b, h, w, d))
  variables = module.init(jax.random.key(0), x, deterministic=True)
  _, state = module.apply(variables, x, deterministic=False,
                          rngs={"dropout": jax.random.key(1)},
                          capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  masks = {(p, r): np.asarray(inter[p][f"{r}_rnn"]["input_dropout"]["__call__"][0])
           for p in ("rows", "cols") for r in ("forward", "backward")}
  for (p, r), m in masks.items():
    assert m.shape == ((b, h, w, d) if p == "rows" else (b, w, h, d))
    assert set(np.unique(m)) <= {0.0, np.float32(1 / (1 - rate))}
    assert abs(float((m == 0).mean()) - rate) < 0.03, (p, r)
    same_in_time = bool(np.all(m == m[:, :, :1]))  # time is axis 2 (w rows, h columns)
    assert same_in_time == (mode == "per_sequence"), (p, r)
  # Each LSTM (direction and pass) draws its own mask.
  assert not np.array_equal(masks[("rows", "forward")], masks[("rows", "backward")])
  assert not np.array_equal(masks[("cols", "forward")], masks[("cols", "backward")])
  # Off when deterministic.
  _, state = module.apply(variables, x, deterministic=True, capture_intermediates=True,
                          mutable=["intermediates"])
  np.testing.assert_array_equal(
      state["intermediates"]["rows"]["forward_rnn"]["input_dropout"]["__call__"][0], x)
  with pytest.raises(ValueError, match="mode must be 'per_step' or 'per_sequence'"):
    apc.HVBiLSTM(u, lstm_dropout_mode="per_gate").init(jax.random.key(0), x,
                                                        deterministic=True)


# ----------------------------------------------------------------------------- heads
def test_patch_classifier():
  module = apc.PatchClassifier(num_classes=20, dropout_rate=0.2)
  x = images((2, 4, 5, 768), 0)
  variables = module.init(jax.random.key(0), x, deterministic=True)
  kernel = variables["params"]["classifier"]["kernel"]
  assert list(variables["params"]["classifier"]) == ["kernel"]  # no bias
  assert kernel.shape == (768, 21)
  assert abs(float(jnp.std(kernel)) - 0.05) < 0.003 and abs(float(jnp.mean(kernel))) < 0.003
  logits, probs = module.apply(variables, x, deterministic=True)
  assert logits.shape == probs.shape == (2, 4, 5, 21) and probs.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.einsum("bhwd,dc->bhwc", x, kernel), rtol=1e-4,
                             atol=1e-4)
  e = np.exp(np.asarray(logits, np.float64) - np.asarray(logits).max(-1, keepdims=True))
  np.testing.assert_allclose(probs, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
  trained, _ = module.apply(variables, x, deterministic=False,
                            rngs={"dropout": jax.random.key(1)})
  assert float(jnp.abs(trained - logits).max()) > 1e-2
  params = {"patch_classifier": variables["params"]}
  assert apc.classifier_kernel(params) is kernel
  np.testing.assert_allclose(apc.classifier_l2(params),
                             0.01 * np.sum(np.square(np.asarray(kernel, np.float64))),
                             rtol=1e-5)
  with pytest.raises(KeyError, match="no APCNet patch classifier"):
    apc.classifier_kernel({"backbone": {}})


def _torch_decoders(d, c_out, seed):
  """ToCo's LargeFOV and ASPP, rebuilt from their description with plain nn.Conv2d."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(seed)
  nn_ = torch.nn

  class LargeFOV(nn_.Module):
    def __init__(self):
      super().__init__()
      self.conv6 = nn_.Conv2d(d, 512, 3, padding=5, dilation=5, bias=False)
      self.conv7 = nn_.Conv2d(512, 512, 3, padding=5, dilation=5, bias=False)
      self.conv8 = nn_.Conv2d(512, c_out, 1, bias=False)

    def forward(self, x):
      return self.conv8(torch.relu(self.conv7(torch.relu(self.conv6(x)))))

  class ASPP(nn_.Module):
    def __init__(self, rates=(6, 12, 18, 24)):
      super().__init__()
      for i, r in enumerate(rates):
        self.add_module(f"c{i}", nn_.Conv2d(d, c_out, 3, padding=r, dilation=r, bias=True))

    def forward(self, x):
      return sum(m(x) for m in self.children())

  aspp = ASPP()
  with torch.no_grad():  # non-zero biases (ToCo initialises them to 0)
    for m in aspp.children():
      m.bias.normal_()
  return LargeFOV().eval(), aspp.eval()


def test_decoders_match_torch():
  torch = pytest.importorskip("torch")
  d, c = 32, 20
  fov_t, aspp_t = _torch_decoders(d, c + 1, seed=0)
  x = images((2, 24, 24, d), 1)  # ViT-PCM's 24x24 grid: the rate-24 ASPP branch too
  with torch.no_grad():
    xt = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))
    want_fov = fov_t(xt).numpy().transpose(0, 2, 3, 1)
    want_aspp = aspp_t(xt).numpy().transpose(0, 2, 3, 1)
  for module, names, reference, want in (
      (apc.LargeFOV(c), apc.LARGEFOV_NAMES, fov_t, want_fov),
      (apc.ASPP(c), apc.aspp_torch_names(4), aspp_t, want_aspp)):
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    variables, ignored = torch_import.load_state_dict(shapes, reference.state_dict(), names)
    assert ignored == []
    assert count(variables) == sum(p.numel() for p in reference.parameters())
    got = jax.jit(module.apply)(variables, x)
    assert got.shape == (2, 24, 24, c + 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    exported = torch_import.to_state_dict(variables, names)
    assert sorted(exported) == sorted(reference.state_dict())
  # Shapes and counts at ViT-B width, from the layer sizes.
  fov = jax.eval_shape(apc.LargeFOV(c).init, jax.random.key(0), jnp.zeros((1, 24, 24, 768)))
  assert "bias" not in fov["params"]["conv7"] and "bias" not in fov["params"]["conv8"]
  assert count(fov) == 9 * 768 * 512 + 9 * 512 * 512 + 512 * 21
  aspp = apc.ASPP(c).init(jax.random.key(0), jnp.zeros((1, 24, 24, 768)))
  assert count(aspp) == 4 * (9 * 768 * 21 + 21)
  kernel = np.asarray(aspp["params"]["c3"]["kernel"])
  assert abs(kernel.std() - 0.01) < 0.0005
  np.testing.assert_array_equal(aspp["params"]["c0"]["bias"], np.zeros(21))


# ----------------------------------------------------------------------------- network
def _small_net(**kw):
  return apc.APCNet(num_classes=20, img_size=64, backbone_overrides=SMALL_VIT,
                    hidden_size=8, decoder_channels=16, **kw)


def test_apcnet_full_size_parameter_counts():
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  with torch.device("meta"):
    backbone = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=0)
  vit_count = sum(p.numel() for p in backbone.parameters())
  x = jnp.zeros((1, 384, 384, 3))
  expected = {
      "none": vit_count + 4 * lstm_count(768, 192) + 768 * 21,
      "largefov": vit_count + 4 * lstm_count(768, 192) + 768 * 21
                  + 9 * 768 * 512 + 9 * 512 * 512 + 512 * 21}
  for decoder, want in expected.items():
    net = apc.APCNet(num_classes=20, decoder=decoder, scan_blocks=True)
    shapes = jax.eval_shape(lambda k, net=net: net.init(k, x, train=False),
                            jax.random.key(0))
    assert count(shapes) == want, decoder
    out, aux = jax.eval_shape(lambda v, net=net: net.apply(v, x, train=False), shapes)
    assert out.shape == (1, 24, 24, 21)
    assert aux["features"].shape == (1, 24, 24, 768)
    assert aux["vit_grid"].shape == (1, 24, 24, 768) and aux["cls"].shape == (1, 768)
  plain = apc.APCNet(num_classes=80, bilstm=False)
  shapes = jax.eval_shape(lambda k: plain.init(k, x, train=False), jax.random.key(0))
  assert count(shapes) == vit_count + 768 * 81
  assert "patch_conditioning" not in shapes["params"]


def test_apcnet_outputs_determinism_and_errors():
  net = _small_net(decoder="largefov")
  x = images((2, 64, 64, 3), 0)
  variables = net.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  d, u = 32, 8
  vit_count = count(jax.eval_shape(
      lambda k: vit.vit("b16", img_size=64, **dict(SMALL_VIT)).init(k, x, train=False),
      jax.random.key(0)))
  assert count(params) == (vit_count + 4 * lstm_count(d, u) + 4 * u * 21
                           + 9 * d * 16 + 9 * 16 * 16 + 16 * 21)
  assert sorted(params) == ["backbone", "patch_classifier", "patch_conditioning",
                            "seg_decoder"]
  apply = jax.jit(lambda v, x: net.apply(v, x, train=False))
  probs, aux = apply(variables, x)
  assert probs.shape == (2, 4, 4, 21) and probs.dtype == jnp.float32
  assert sorted(aux) == ["cls", "features", "logits", "probs", "seg_logits", "vit_grid"]
  np.testing.assert_array_equal(aux["probs"], probs)
  np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-5)
  assert aux["features"].shape == (2, 4, 4, 4 * u)
  assert aux["vit_grid"].shape == (2, 4, 4, d) and aux["cls"].shape == (2, d)
  assert aux["seg_logits"].shape == (2, 4, 4, 21)
  # The pieces: the decoder reads the ViT grid; the classifier the BiLSTM features.
  np.testing.assert_allclose(
      aux["seg_logits"], apc.LargeFOV(20, 16).apply({"params": params["seg_decoder"]},
                                                    aux["vit_grid"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      aux["logits"], aux["features"] @ params["patch_classifier"]["classifier"]["kernel"],
      rtol=1e-4, atol=1e-5)
  # Eval is deterministic, and so is training with deterministic=True; training drops.
  again, _ = apply(variables, x)
  np.testing.assert_array_equal(again, probs)
  rng = {"dropout": jax.random.key(1)}
  det, _ = jax.jit(lambda v, x: net.apply(v, x, train=True, deterministic=True,
                                          rngs=rng))(variables, x)
  np.testing.assert_array_equal(det, probs)
  trained, _ = jax.jit(lambda v, x: net.apply(v, x, train=True, rngs=rng))(variables, x)
  assert float(jnp.abs(trained - probs).max()) > 1e-3

  # Decoder on the BiLSTM output; no BiLSTM: the classifier reads the ViT grid.
  on_lstm = _small_net(decoder="aspp", decoder_input="bilstm", aspp_rates=(1, 2))
  shapes = jax.eval_shape(lambda k: on_lstm.init(k, x, train=False), jax.random.key(0))
  assert shapes["params"]["seg_decoder"]["c0"]["kernel"].shape == (3, 3, 4 * u, 21)
  bare = _small_net(bilstm=False)
  bare_vars = bare.init(jax.random.key(0), x, train=False)
  _, bare_aux = bare.apply(bare_vars, x, train=False)
  np.testing.assert_array_equal(bare_aux["features"], bare_aux["vit_grid"])
  assert "seg_logits" not in bare_aux
  with pytest.raises(ValueError, match="decoder must be one of"):
    _small_net(decoder="fcn").init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="decoder_input='bilstm' needs bilstm=True"):
    _small_net(decoder="aspp", decoder_input="bilstm", bilstm=False).init(
        jax.random.key(0), x, train=False)


def test_apcnet_gradients_are_finite():
  net = _small_net(decoder="largefov", drop_path_rate=0.1)
  x = images((2, 64, 64, 3), 2)
  variables = net.init(jax.random.key(0), x, train=False)
  labels = jnp.zeros((2, 21)).at[:, 0].set(1).at[0, 3].set(1).at[1, 7].set(1)

  def loss(params, x):
    probs, aux = net.apply({"params": params}, x, train=True,
                           rngs={"dropout": jax.random.key(3)})
    pooled = jnp.clip(jnp.max(probs, axis=(1, 2)), 1e-7, 1 - 1e-7)  # ViT-PCM's GMP + BCE
    bce = -jnp.mean(labels * jnp.log(pooled) + (1 - labels) * jnp.log(1 - pooled))
    seg = -jnp.mean(jax.nn.log_softmax(aux["seg_logits"])[..., 0])
    return bce + seg + apc.classifier_l2(params) + 1e-3 * jnp.mean(aux["features"] ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"], x)
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
  for name in ("backbone", "patch_conditioning", "patch_classifier", "seg_decoder"):
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))) > 0, name


def test_load_backbone_from_timm():
  torch = pytest.importorskip("torch")
  timm_vit = pytest.importorskip("timm.models.vision_transformer")
  torch.manual_seed(4)
  reference = timm_vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2,
                                         num_heads=2, num_classes=5).eval()
  net = _small_net()
  x = images((1, 64, 64, 3), 5)
  variables = net.init(jax.random.key(0), x, train=False)
  loaded, ignored = apc.load_backbone(variables, reference.state_dict())
  assert ignored == ["head.bias", "head.weight"]
  jax.tree.map(np.testing.assert_array_equal, loaded["params"]["patch_classifier"],
               variables["params"]["patch_classifier"])
  _, aux = net.apply(loaded, x, train=False)
  with torch.no_grad():
    want = reference.forward_features(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(aux["vit_grid"].reshape(1, 16, 32), want.numpy()[:, 1:],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(KeyError, match="no 'backbone' in the APCNet params"):
    apc.load_backbone({"params": {}}, reference.state_dict())
