"""The PyTorch counterpart of the SiamSeg step (``benchmarks/siamseg_torch.py``: transformers'
SegFormer encoder, the DAFormer head and SimSiam in the reference's module names, DACS's
ClassMix and pseudo-labels, one ``backward()`` per loss) computes our step from the same
weights: each loss term, the pseudo-label weight, and the gradients, on the first step at
a small size, with ClassMix masks and SimSiam views drawn by our code and fed to both."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax import parallel
from contrastjax.augment import views
from contrastjax.configs import siamseg as siamseg_configs
from contrastjax.data import builder
from contrastjax.methods import dacs
from contrastjax.methods import siamseg as siamseg_lib

from _repo import load_module

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("kornia")


def _config(arg="demo"):
  c = siamseg_configs.get_config("loveda", arg)
  c.model.dropout_ratio = 0.0        # no random draws inside the networks
  c.model.drop_path_rate = 0.0
  c.siamseg.color_jitter_probability = 1.0   # U(0, 1) > 1 never: no jitter
  c.siamseg.blur = False
  c.data.image_size = 64
  c.batch_size = 4
  return c


def _grad_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


def _torch_norm(params):
  return float(np.sqrt(sum(float((p.grad ** 2).sum()) for p in params if p.grad is not None)))


@pytest.mark.parametrize("arg", ["demo", "demo,source_only"])
def test_torch_counterpart_computes_the_same_step(arg):
  counterpart = load_module("benchmarks/siamseg_torch.py")
  c = _config(arg)
  batch, _ = builder.synthetic_batch(c, seed=2)
  net = counterpart.build(c, seed=3)
  with torch.no_grad():   # BatchNorm affines start at 1/0: make them matter
    for name, p in net.named_parameters():
      if ".bn." in name or name.endswith(("3.weight", "3.bias", "6.weight", "6.bias")):
        p.add_(0.1 * torch.randn_like(p))
    # The confidence threshold at the median of the teacher's (= the student's) top
    # probabilities: a pseudo-label weight near 1/2, so that thresholding is exercised.
    xt = counterpart.torch_batch(torch, batch)["target_image"]
    logits = torch.nn.functional.interpolate(net(xt), size=xt.shape[2:], mode="bilinear",
                                             align_corners=False)
    c.siamseg.pseudo_threshold = float(torch.softmax(logits, 1).max(1).values.median())
  method = siamseg_lib.SiamSegMethod(c)
  o = method.options
  rng = jax.random.PRNGKey(5)
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    params, state, extra = method.init(jax.random.PRNGKey(0), batch)
    variables = counterpart.jax_params_from_torch(net, {"params": params, **state})
    params = jax.tree.map(jnp.asarray, variables.pop("params"))
    state = jax.tree.map(jnp.asarray, variables)
    if "teacher" in extra:
      extra = {"teacher": {k: params[k] for k in siamseg_lib.SEGMENTOR}}

    @jax.jit
    def loss_and_grad(p):
      return jax.value_and_grad(
          lambda p: method.loss_fn(p, state, extra, batch, rng, 0), has_aux=True)(p)
    (value, (_, metrics)), grads = loss_and_grad(params)
    # The draws our step makes with this rng (SiamSegMethod._terms' key use).
    @jax.jit
    def draws(rng, ys, xt):
      keys = jax.random.split(rng, 8)
      mask = dacs.class_mix_masks(keys[1], ys.astype(jnp.int32), o.num_classes,
                                  o.classmix_scope)
      return mask, views.siamseg_views(jax.random.fold_in(keys[4], 0), xt)
    mask, (q, k) = draws(rng, batch["source"]["label"], batch["target"]["image"])

  nchw = lambda a: torch.from_numpy(np.asarray(a, np.float32).transpose(0, 3, 1, 2).copy())  # noqa: E731
  draws = {"mask": torch.from_numpy(np.array(mask)), "strong": lambda x: x,
           "views": (nchw(q), nchw(k))}
  tb = counterpart.torch_batch(torch, batch)
  teacher = counterpart.make_teacher(net) if o.variant != "source_only" else None
  parts, total = {}, 0.0
  for term in counterpart.loss_terms(torch, net, teacher, o, tb, draws):
    v, p = term()
    v.backward()
    total += float(v.detach())
    parts.update({key: float(x.detach()) for key, x in p.items()})

  want = {"demo": {"loss_src", "loss_mix", "pseudo_weight", "loss_contrastive"},
          "demo,source_only": {"loss_src"}}[arg]
  assert set(parts) == want
  for key in parts:
    np.testing.assert_allclose(parts[key], float(metrics[key]), rtol=2e-4, atol=1e-6,
                               err_msg=key)
  np.testing.assert_allclose(total, float(value), rtol=2e-4)
  if "pseudo_weight" in parts:
    assert 0.2 < parts["pseudo_weight"] < 0.8
  np.testing.assert_allclose(
      np.asarray(grads["decode_head"]["conv_seg"]["kernel"])[0, 0].T,
      net.model.decode_head.conv_seg.weight.grad.numpy()[:, :, 0, 0], rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(_grad_norm(grads["backbone"]),
                             _torch_norm(net.model.backbone.parameters()), rtol=2e-3)
  if "contrast" in grads:
    np.testing.assert_allclose(_grad_norm(grads["contrast"]),
                               _torch_norm(net.contras_model.parameters()), rtol=2e-3)
