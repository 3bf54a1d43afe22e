"""Tests of the ResNet-50 encoder and its torchvision weight import."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax.models import resnet
from _variables import random_variables

SMALL = dict(stage_sizes=(1, 2, 1), stem_width=8, base_width=4)




def _small_variables(seed=0):
  model = resnet.ResNet(**SMALL)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
                          jax.random.key(0))
  return model, random_variables(shapes, seed)


def test_small_resnet_shapes_and_names():
  model, variables = _small_variables()
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                             jnp.zeros((2, 64, 32, 3)))
  assert {k: v.shape for k, v in out.items()} == {
      "layer0": (2, 32, 16, 8), "layer1": (2, 16, 8, 16), "layer2": (2, 8, 4, 32),
      "layer3": (2, 4, 2, 64)}
  params = variables["params"]
  assert "downsample_conv" in params["layer1_0"]  # 8 -> 16 channels
  assert "downsample_conv" not in params["layer2_1"]
  assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 8, 8)
  keys = resnet.to_torch_state_dict(variables)
  assert keys["conv1.weight"].shape == (8, 3, 7, 7)
  assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys


def test_resnet50_parameter_count():
  variables = jax.eval_shape(
      lambda k: resnet.ResNet().init(k, jnp.zeros((1, 64, 64, 3)), train=False),
      jax.random.key(0))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
  assert count(variables["params"]) == 8_543_296
  four = jax.eval_shape(
      lambda k: resnet.ResNet((3, 4, 6, 3)).init(k, jnp.zeros((1, 64, 64, 3)), train=False),
      jax.random.key(0))
  assert count(four["params"]) == 23_508_032  # torchvision resnet50 without fc


# ----------------------------------------------------------------------------- import errors
def test_load_roundtrip_and_error_messages(tmp_path, caplog):
  model, variables = _small_variables(0)
  _, other = _small_variables(1)
  state = resnet.to_torch_state_dict(other)
  state["fc.weight"] = np.zeros((10, 64), np.float32)
  state["layer4.0.conv1.weight"] = np.zeros((4, 4, 1, 1), np.float32)
  with caplog.at_level(logging.WARNING):
    loaded, ignored = resnet.load(variables, state)
  assert ignored == ["fc.weight", "layer4.0.conv1.weight"]
  assert "fc.* (1), layer4.* (1)" in caplog.text
  x = jnp.asarray(np.random.default_rng(0).random((1, 32, 32, 3), np.float32))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  a, b = apply(loaded, x), apply(other, x)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])

  # A checkpoint wrapped as {'state_dict': ...} with DataParallel's 'module.' prefix.
  wrapped = {"state_dict": {"module." + k: v for k, v in state.items()}}
  unwrapped, _ = resnet.load(variables, wrapped)
  np.testing.assert_array_equal(unwrapped["params"]["conv1"]["kernel"],
                                other["params"]["conv1"]["kernel"])

  missing = dict(state)
  del missing["layer2.0.bn1.running_var"]
  with pytest.raises(KeyError, match=r"layer2\.0\.bn1\.running_var"):
    resnet.load(variables, missing)
  wrong = dict(state)
  wrong["layer1.0.conv2.weight"] = np.zeros((4, 4, 1, 3), np.float32)
  with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight.*\(4, 4, 3, 3\).*\(4, 4, 1, 3\)"):
    resnet.load(variables, wrong)
  unexpected = dict(state)
  unexpected["layer1.0.conv9.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(KeyError, match=r"layer1\.0\.conv9\.weight"):
    resnet.load(variables, unexpected)

  # Files: .npz and .safetensors (and .pth when torch is installed).
  np.savez(tmp_path / "w.npz", **state)
  from safetensors.numpy import save_file
  save_file(state, str(tmp_path / "w.safetensors"))
  for name in ("w.npz", "w.safetensors"):
    from_file, _ = resnet.load(variables, tmp_path / name)
    np.testing.assert_array_equal(from_file["params"]["layer2_0"]["conv1"]["kernel"],
                                  other["params"]["layer2_0"]["conv1"]["kernel"])
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    resnet.load(variables, tmp_path / "nope.npz")


# ----------------------------------------------------------------------------- torchvision
def _torchvision_resnet50(torch, torchvision, seed=0):
  """Random torchvision ResNet-50 with non-trivial BN parameters and running stats.

  The running statistics are first set to the statistics of a random batch (so the
  activations stay O(1) through the random network), then perturbed.
  """
  torch.manual_seed(seed)
  net = torchvision.models.resnet50(weights=None)
  gen = torch.Generator().manual_seed(seed + 1)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.momentum = 1.0
    net.train()(torch.rand(4, 3, 64, 64, generator=gen))
    for m in bns:
      c = m.num_features
      m.momentum = 0.1
      m.running_mean.add_(torch.randn(c, generator=gen) * 0.1)
      m.running_var.mul_(torch.rand(c, generator=gen) * 0.5 + 0.75)
      m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
      m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
  return net


def _torch_stages(torch, net, x):
  """layer0..layer3 outputs of a torchvision ResNet, as NHWC numpy."""
  with torch.no_grad():
    h = net.relu(net.bn1(net.conv1(torch.from_numpy(x.transpose(0, 3, 1, 2)))))
    out = {"layer0": h}
    h = net.layer1(net.maxpool(h))
    out["layer1"] = h
    h = net.layer2(h)
    out["layer2"] = h
    out["layer3"] = net.layer3(h)
  return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}


def test_matches_torchvision_resnet50_eval():
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  net = _torchvision_resnet50(torch, torchvision).eval()
  model = resnet.ResNet()
  x = np.random.default_rng(0).random((1, 64, 64, 3), np.float32)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.asarray(x), train=False),
                          jax.random.key(0))
  variables, ignored = resnet.load(shapes, net.state_dict())
  assert ignored and all(k.startswith(("layer4.", "fc.")) for k in ignored)
  assert len(ignored) == len([k for k in net.state_dict()
                              if k.startswith(("layer4.", "fc.")) and "num_batches" not in k])
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
  want = _torch_stages(torch, net, x)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-4, rtol=0, err_msg=k)


def test_matches_torchvision_resnet50_train_mode_bn():
  """One train-mode forward: batch-statistics outputs and the updated running stats.

  Run in float64 on both sides so that any semantic difference (e.g. biased instead of
  unbiased running variance, momentum convention) shows far above rounding noise.
  """
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  net = _torchvision_resnet50(torch, torchvision, seed=3).double().train()
  x = np.random.default_rng(1).random((2, 64, 64, 3))
  with jax.enable_x64(True):
    model = resnet.ResNet(dtype=jnp.float64)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.asarray(x), train=False),
                            jax.random.key(0))
    variables, _ = resnet.load(shapes, net.state_dict())
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    got, new_state = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
            variables, jnp.asarray(x))
    want = _torch_stages(torch, net, x)
    for k in want:
      np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-9, rtol=0, err_msg=k)
    new_torch = resnet.to_torch_state_dict({"params": variables["params"], **new_state})
  state = net.state_dict()
  checked = 0
  for key, value in new_torch.items():
    if key.endswith(("running_mean", "running_var")):
      np.testing.assert_allclose(value, state[key].numpy(), atol=1e-10, rtol=0, err_msg=key)
      checked += 1
  assert checked == 2 * 43


def test_load_pth_file(tmp_path):
  torch = pytest.importorskip("torch")
  _, variables = _small_variables(0)
  _, other = _small_variables(2)
  state = resnet.to_torch_state_dict(other)
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
  loaded, _ = resnet.load(variables, tmp_path / "w.pth")
  np.testing.assert_array_equal(loaded["batch_stats"]["bn1"]["var"],
                                other["batch_stats"]["bn1"]["var"])


def test_load_copies_and_ignores_abstract_mesh_shardings():
  """Loaded variables own their memory (a state dict of live ``tensor.numpy()`` views
  that torch later updates in place must not change them), and templates from
  ``jax.eval_shape`` under a mesh (abstract shardings) load."""
  _, variables = _small_variables(0)
  _, other = _small_variables(1)


  def aligned(x):  # 64-byte aligned, as torch's buffers are: jax may alias such memory
    buf = np.empty(x.nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    out = buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out

  state = {k: aligned(np.asarray(v)) for k, v in resnet.to_torch_state_dict(other).items()}
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    template = jax.eval_shape(lambda v: v, variables)
    loaded, _ = resnet.load(template, state)
  before = np.array(loaded["batch_stats"]["bn1"]["var"])
  state["bn1.running_var"] += 1.0   # what a torch BatchNorm forward does to its buffer
  state["conv1.weight"][...] = 0.0
  np.testing.assert_array_equal(loaded["batch_stats"]["bn1"]["var"], before)
  assert np.abs(np.asarray(loaded["params"]["conv1"]["kernel"])).max() > 0
