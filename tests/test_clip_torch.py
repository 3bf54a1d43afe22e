"""The PyTorch counterpart of the CLIP step (``benchmarks/clip_torch.py``, timed side by side
by ``python -m contrastjax.benchmark --torch``) computes the same step as ours from the same
weights: the first step's loss, its gradients and the BatchNorm statistics, at a small size.
Also the package's whole-checkpoint OpenCLIP import (``clip.load_openclip``) it relies on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax import parallel
from contrastjax.configs import clip as clip_configs
from contrastjax.data import builder
from contrastjax.methods import clip as clip_lib
from contrastjax.models import clip as clip_model

from _repo import load_module

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")


def _config():
  c = clip_configs.get_config()
  c.model.embed_dim = 32
  c.model.image = dict(name="modified_resnet", layers=(1, 1, 1, 1), width=16, heads=8,
                       image_size=64)
  c.model.text = dict(name="transformer", vocab_size=100, context_length=16, width=32,
                      layers=2, heads=2, mlp_ratio=4.0)
  c.data.image_size, c.data.context_length, c.data.max_vocab = 64, 16, 100
  c.batch_size = 6
  return c


def _setup(c):
  counterpart = load_module("benchmarks/clip_torch.py")
  net = counterpart.build(c, seed=3)
  with torch.no_grad():   # BatchNorm / LayerNorm affines start at 1/0: make them matter
    for name, p in net.named_parameters():
      if p.ndim == 1 and name != "logit_scale":
        p.add_(0.1 * torch.randn_like(p))
  method = clip_lib.CLIPMethod(c)
  batch, _ = builder.synthetic_batch(c, seed=1)
  params, state, _ = jax.eval_shape(method.init, jax.random.PRNGKey(0), batch)
  variables = counterpart.jax_params_from_torch(net, {"params": params, **state}, method.model)
  return counterpart, net, method, batch, variables


def test_torch_counterpart_computes_the_same_step():
  c = _config()
  counterpart, net, method, batch, variables = _setup(c)
  params = jax.tree.map(jnp.asarray, variables.pop("params"))
  state = jax.tree.map(jnp.asarray, variables)
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    @jax.jit
    def loss_and_grad(p):
      return jax.value_and_grad(
          lambda p: method.loss_fn(p, state, {}, batch, jax.random.PRNGKey(1), 0),
          has_aux=True)(p)
    (value, (new_state, metrics)), grads = loss_and_grad(params)

  tb = counterpart.torch_batch(torch, batch)
  t_value, t_scale = counterpart.loss_fn(torch, net, tb)
  t_value.backward()
  np.testing.assert_allclose(float(t_value.detach()), float(value), rtol=1e-5)
  assert float(value) > 0.5
  np.testing.assert_allclose(float(t_scale.detach()), float(metrics["beta"]), rtol=1e-6)
  grad = dict(net.named_parameters())
  np.testing.assert_allclose(float(grads["logit_scale"]), float(grad["logit_scale"].grad),
                             rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grads["text_tower"]["text_projection"]),
                             grad["text_projection"].grad.numpy(), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(grads["image_tower"]["conv1"]["kernel"]).transpose(3, 2, 0, 1),
      grad["visual.conv1.weight"].grad.numpy(), rtol=2e-3, atol=1e-6)
  # BatchNorm running statistics after the step (momentum 0.1 in torch = 0.9 in Flax)
  np.testing.assert_allclose(
      np.asarray(new_state["batch_stats"]["image_tower"]["bn1"]["mean"]),
      net.visual.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-6)


def test_load_openclip_round_trip_and_errors():
  c = _config()
  counterpart, net, method, batch, variables = _setup(c)
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  # every torch tensor lands somewhere: the JAX tree holds as many numbers as the net
  n_jax = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
  assert n_jax == sum(p.numel() for p in net.parameters())
  np.testing.assert_array_equal(variables["params"]["text_tower"]["resblocks_1"]["attn"]
                                ["value"]["bias"].reshape(-1),
                                state["transformer.resblocks.1.attn.in_proj_bias"][64:96])
  template = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  del state["logit_scale"]
  with pytest.raises(KeyError, match="logit_scale"):
    clip_model.load_openclip(template, method.model, state)
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  state["transformer.resblocks.0.extra"] = np.zeros(3)
  with pytest.raises(KeyError, match="transformer.resblocks.0.extra"):
    clip_model.load_openclip(template, method.model, state)
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  state["positional_embedding"] = state["positional_embedding"][:8]
  with pytest.raises(ValueError, match="positional_embedding.*expected \\(16, 32\\)"):
    clip_model.load_openclip(template, method.model, state)
