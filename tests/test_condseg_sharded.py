"""A ConDSeg stage-1 train step (two BN passes, on-device photometric view drawn from
the step key) through the real spine: 8 simulated devices equal 1 device."""
import jax

import _toy
import ml_collections
import numpy as np

from contrastjax import parallel
from contrastjax.methods.condseg import ConDSegStage1Method
from contrastjax.data.synthetic.polyps import SyntheticPolyps
from contrastjax.data.transforms import medseg as T


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(stage_sizes=(1, 1, 1), stem_width=8, base_width=8, head_width=8)
  c.condseg = dict(double_sigmoid=False, consistency_weight=1.0, strong_aug={})
  c.optimizer = dict(name="adam", lr=1e-3, groups=[("^encoder/", 1.0, 1.0)])
  c.plateau = dict(monitor="val/loss", factor=0.1, patience=3)
  return c


def _batch(n=8, size=32):
  src = SyntheticPolyps(n, size, seed=3)
  chain = [T.AddBackground(), T.ToFloat("rgb")]
  examples = []
  for i in range(n):
    x = src[i]
    for t in chain:
      x = t.map(x)
    examples.append(x)
  return {k: np.stack([e[k] for e in examples]) for k in ("image", "mask", "background")}


def _two_steps(mesh, config, batch):
  return _toy.run_steps(ConDSegStage1Method(config), config, mesh, batch)


def test_condseg_stage1_step_8_devices_equals_1_device():
  config, batch = _config(), _batch()
  s1, m1 = _two_steps(parallel.make_mesh(devices=jax.devices()[:1]), config, batch)
  s8, m8 = _two_steps(parallel.make_mesh(), config, batch)
  # grad_norm: the gradient itself, which Adam's update would hide a device-count scale of
  for k in ("loss", "loss_consistency", "loss_mask_aug", "grad_norm"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=2e-5, err_msg=k)
  assert m1["grad_norm"] > 0
  for name, tree1, tree8 in (("params", s1.params, s8.params),
                             ("batch_stats", s1.model_state, s8.model_state)):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree1),
                            jax.tree.leaves(tree8)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)}")
