"""The PyTorch counterpart of the APC step (``benchmarks/apc_torch.py``, timed side by side
by ``python -m contrastjax.benchmark --torch``) computes the same loss as ours from the same
weights: each loss term and the classifier's gradient on the first step, at a small size."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastjax import parallel
from contrastjax.configs import apc as apc_configs
from contrastjax.data import builder
from contrastjax.methods import apc as apc_lib

from _repo import REPO, load_module

torch = pytest.importorskip("torch")
pytest.importorskip("timm")


def _counterpart():
  return load_module("benchmarks/apc_torch.py")


def _config(arg, **apc):
  c = apc_configs.get_config("voc", arg)
  c.model.backbone_overrides = dict(patch_size=8, depth=2, embed_dim=32, num_heads=2)
  c.model.update(img_size=32, decoder_channels=16, bilstm=True, hidden_size=8,
                 dropout_rate=0.0, backbone_dropout_rate=0.0)
  c.data.num_train, c.data.num_train_eval, c.data.num_val = 16, 8, 8
  c.data.image_size = c.data.crop_size = c.data.eval_size = 32
  c.batch_size = c.eval_batch_size = 4
  c.apc.update(**{**dict(seg_warmup_steps=0, pcl_warmup_steps=0, akp_warmup_steps=0,
                         l2_weight=0.01, pseudo_threshold=0.3, pcl_threshold=0.3,
                         par=False, eq_weight=0.0), **apc})
  return c


@pytest.mark.parametrize("arg,apc", [
    ("demo", {}),                                               # AKP (H1) + PCL + decoder
    ("demo,rule=consecutive_ratio", {"pcl_features": "vit"}),
    ("demo,supervised", {}),
])
def test_torch_counterpart_computes_the_same_loss(arg, apc):
  apc_torch = _counterpart()
  c = _config(arg, **apc)
  inputs = builder.build(c, local_batch_size=4, local_eval_batch_size=4)
  batch = next(iter(inputs.train))
  method = apc_lib.APCMethod(c)
  o = method.options
  net = apc_torch.build(c, seed=3)
  with jax.set_mesh(parallel.make_mesh(devices=jax.devices()[:1])):
    params, _, _ = method.init(jax.random.PRNGKey(0), batch)
    params = jax.tree.map(jnp.asarray, apc_torch.jax_params_from_torch(net, params))

    def loss(p):
      return method.loss_fn(p, {}, {}, batch, jax.random.PRNGKey(1), 5)
    (value, (_, parts)), grads = jax.value_and_grad(loss, has_aux=True)(params)

  tb = {k: torch.from_numpy(np.asarray(v, np.int64 if k == "label" else np.float32))
        for k, v in batch.items()}
  t_value, t_parts = apc_torch.loss_fn(torch, net, o, tb, 5)
  t_value.backward()
  assert set(t_parts) == set(parts)
  for k in parts:
    np.testing.assert_allclose(float(t_parts[k].detach()), float(parts[k]), rtol=2e-4, atol=2e-5,
                               err_msg=k)
  np.testing.assert_allclose(float(t_value.detach()), float(value), rtol=2e-4, atol=2e-5)
  assert float(parts["loss_cls"]) > 0.1
  if "loss_seg" in parts:
    assert float(parts["loss_seg"]) > 0.1
  np.testing.assert_allclose(
      grads["patch_classifier"]["classifier"]["kernel"],
      net.classifier.weight.grad.numpy().T, rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(
      grads["backbone"]["patch_embed"]["kernel"].sum(),
      float(net.vit.patch_embed.proj.weight.grad.sum()), rtol=2e-3, atol=1e-5)


def test_torch_counterpart_is_timed_by_the_benchmark_cli(tmp_path):
  """``python -m contrastjax.benchmark --torch`` times both sides on one batch."""
  import json
  import subprocess
  import sys
  from contrastjax import benchmark
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "contrastjax.benchmark", "--config=configs/apc_voc.py:demo",
         "--config.batch_size=4", "--config.apc.par=False", "--config.apc.eq_weight=0",
         "--steps=2", "--warmup=1", "--init=host",
         "--xla_opt_level=0", "--torch", "--threads=1", f"--json_out={out}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "PyTorch counterpart benchmarks/apc_torch.py" in proc.stdout, proc.stdout
  result = json.loads(out.read_text())
  t = result["torch"]
  assert t["counterpart"] == "benchmarks/apc_torch.py" and t["steps"] == 2
  assert len(t["losses"]) == 3 and all(np.isfinite(t["losses"]))
  assert t["losses"][-1] < t["losses"][0]  # the optimizer steps the same batch
  assert result["ratio_jax_over_torch"] == pytest.approx(
      result["jax"]["step_s_median"] / t["step_s_median"])
  with pytest.raises(ValueError, match=r"no PyTorch counterpart for method 'gap'"):
    benchmark.counterpart_module("gap")
  with pytest.raises(ValueError,
                     match=r"config\.apc\.par=True, eq_weight=0\.0: PAR is not in the PyTorch"):
    _counterpart().build(_config("demo", par=True))
