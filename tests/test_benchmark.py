"""``contrastjax.benchmark`` and the speed paths it measures.

* The CLI runs end to end on a tiny ConDSeg (demo model, batch 2, 32x32) without the
  reference, and writes its JSON report.
* The benchmark's PyTorch stage-2 loss equals ``condseg_losses.condseg_stage2_loss`` in
  the reference's semantics (double sigmoid, batch-summed beta).
* The fast formulations BENCHMARKS.md reports (per-tap kernel gradients of ``conv2d``
  on the CPU, and its other backends' plain path equal to them,
  gather-based align-corners resize, ``outlook_aggregate`` for CDFA) give the values and
  gradients of the straightforward ones: equal to ~1e-13 in float64, to float32
  round-off in float32.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from contrastjax import benchmark
from contrastjax.models import condseg_ops
from contrastjax.models import conv_grad
from contrastjax.models import resample
from contrastjax.models.nn import Conv2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(rel_path, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, rel_path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ----------------------------------------------------------------------------- CLI
def test_cli_smoke_demo_model(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "contrastjax.benchmark",
         "--config=configs/condseg_kvasir.py:demo,stage1", "--config.batch_size=2",
         "--config.data.image_size=32", "--steps=2", "--warmup=1", "--init=host",
         "--xla_opt_level=0", f"--json_out={out}", f"--results={tmp_path}/r/results.jsonl"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (line,) = (tmp_path / "r" / "results.jsonl").read_text().splitlines()
  appended = json.loads(line)
  assert "--steps=2" in appended["command"] and appended["time"].endswith("Z")
  assert appended["jax"]["times"] == json.loads(out.read_text())["jax"]["times"]
  for text in ("compile", "images/s", "peak RSS", "XLA_FLAGS"):
    assert text in proc.stdout, proc.stdout
  result = json.loads(out.read_text())
  j = result["jax"]
  assert result["batch_size"] == 2 and result["image_size"] == 32
  assert j["steps"] == 2 and len(j["times"]) == 2 and all(t > 0 for t in j["times"])
  assert j["images_per_s"] == pytest.approx(2 / j["step_s_median"])
  assert j["compile_s"] > 0 and j["peak_rss_mib"] > 0
  assert j["compiler_options"] == {"xla_backend_optimization_level": 0}
  assert len(j["losses"]) == 3  # the first (separately timed) step and the two timed
  assert "torch" not in result and result["load_before"] and result["load_after"]


def test_synthetic_batch_contract():
  from contrastjax.data.tasks import binary_seg  # pylint: disable=g-import-not-at-top
  synthetic_batch = binary_seg.synthetic_batch_arrays
  batch = synthetic_batch(3, 16, seed=1)
  assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (3, 16, 16, 1)
  np.testing.assert_array_equal(batch["background"], 1.0 - batch["mask"])
  assert 0 < batch["mask"].mean() < 1 and batch["mask"].min() >= 0
  np.testing.assert_array_equal(synthetic_batch(3, 16, seed=1)["mask"], batch["mask"])


@pytest.mark.parametrize("path", ["configs/condseg_kvasir.py", "configs/siamseg_loveda.py",
                                  "configs/apc_voc.py"])
def test_synthetic_batch_matches_the_training_pipeline(path):
  """The benchmark's batch has the keys, shapes and dtypes of the real demo pipeline's
  (nested source/target dicts for SiamSeg)."""
  from contrastjax.data import builder  # pylint: disable=g-import-not-at-top
  config = _load_config(path, "demo")
  with config.unlocked():
    config.batch_size = 2
  real = next(iter(builder.build(config, local_batch_size=2, local_eval_batch_size=2).train))
  fake, size = benchmark.synthetic_batch_for(config, seed=0)
  assert size == config.data.image_size
  shapes = lambda tree: jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), tree)
  assert shapes(fake) == shapes(real)


def test_synthetic_batch_for_a_dataset_without_one_is_named():
  config = _load_config("configs/clip_gap_coco.py", "demo")
  config.data.name = "_toy:toy_data"   # a maker whose module has no SYNTHETIC entry
  with pytest.raises(ValueError, match="config.data.name='_toy:toy_data'.*no synthetic"):
    benchmark.synthetic_batch_for(config)


def test_every_built_in_dataset_has_a_synthetic_batch():
  from contrastjax.data import builder  # pylint: disable=import-outside-toplevel
  for name in sorted(builder._MAKERS):  # pylint: disable=protected-access
    maker = builder.get_maker(name)
    module = sys.modules[maker.__module__]
    assert maker.__name__ in getattr(module, "SYNTHETIC", {}), name


def test_reference_loss_matches_jax_stage2_loss():
  torch = pytest.importorskip("torch")
  from contrastjax.methods import condseg_losses  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  probs = [rng.uniform(0.02, 0.98, (2, 8, 8, 1)).astype(np.float32) for _ in range(4)]
  y = (rng.random((2, 8, 8, 1)) > 0.6).astype(np.float32)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  got = float(benchmark.reference_stage2_loss(torch, [nchw(p) for p in probs], nchw(y),
                                              nchw(1 - y)))
  outputs = dict(zip(("mask", "fg", "bg", "uc"), map(jnp.asarray, probs)))
  want, _ = condseg_losses.condseg_stage2_loss(
      outputs, {"mask": jnp.asarray(y), "background": jnp.asarray(1 - y)},
      {"double_sigmoid": True, "beta_per_image": False})
  assert got == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------- speed paths
def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _grads(fn, args, cotangent):
  out, vjp = jax.vjp(fn, *args)
  return (out, *vjp(cotangent))


def _check_same(fast, slow, args, rtol32=5e-6):
  """``fast`` and ``slow`` agree in value and VJP: float64 to 1e-12, float32 to round-off
  (both measured against the float64 result of ``slow``)."""
  rng = np.random.default_rng(1)
  out_shape = jax.eval_shape(slow, *args).shape
  cot = rng.normal(size=out_shape)
  with jax.enable_x64(True):
    args64 = [jnp.asarray(a, jnp.float64) for a in args]
    want = jax.jit(lambda *a: _grads(slow, a[:-1], a[-1]))(*args64, jnp.asarray(cot))
    got = jax.jit(lambda *a: _grads(fast, a[:-1], a[-1]))(*args64, jnp.asarray(cot))
    for g, w in zip(got, want):
      assert _max_rel(g, w) < 1e-12
  args32 = [jnp.asarray(a, jnp.float32) for a in args]
  got32 = jax.jit(lambda *a: _grads(fast, a[:-1], a[-1]))(*args32,
                                                          jnp.asarray(cot, jnp.float32))
  for g, w in zip(got32, want):
    assert g.dtype == jnp.float32
    assert _max_rel(g, w) < rtol32


@pytest.mark.parametrize("k,stride,padding,dilation,hw,c_in", [
    (3, 1, 1, 1, (9, 11), 16), (3, 2, 1, 1, (10, 10), 32), (3, 1, 6, 6, (12, 12), 16),
    (3, 1, 18, 18, (16, 16), 16), (1, 2, 0, 1, (12, 12), 20), (1, 1, 0, 1, (7, 5), 24),
    (7, 2, 3, 1, (17, 15), 16)])
def test_conv2d_tap_kernel_gradient(monkeypatch, k, stride, padding, dilation, hw, c_in):
  monkeypatch.setattr(conv_grad, "TAP_KERNEL_GRAD_MIN_FLOPS", 0)  # small test shapes
  assert conv_grad._use_tap_kernel_grad((2, *hw, c_in), (k, k, c_in, 8), stride, padding,
                                        dilation)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *hw, c_in))
  w = rng.normal(size=(k, k, c_in, 8)) / np.sqrt(k * k * c_in)
  dims = ("NHWC", "HWIO", "NHWC")

  def xla(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                    rhs_dilation=(dilation, dilation),
                                    dimension_numbers=dims)

  def fast(x, w):
    return conv_grad.conv2d(x, w, stride=stride, padding=padding, dilation=dilation,
                            impl="taps")

  _check_same(fast, xla, (x, w))


@pytest.mark.parametrize("k,stride,padding,dilation,hw,c_in", [
    (3, 1, 1, 1, (9, 11), 16), (3, 2, 1, 1, (10, 10), 32), (3, 1, 6, 6, (12, 12), 16),
    (1, 2, 0, 1, (12, 12), 20)])
def test_conv2d_gpu_path_equals_cpu_path(monkeypatch, k, stride, padding, dilation, hw,
                                          c_in):
  """``impl='conv'`` (what ``'auto'`` picks off the CPU) = ``'taps'`` (the CPU's pick)."""
  monkeypatch.setattr(conv_grad, "TAP_KERNEL_GRAD_MIN_FLOPS", 0)  # small test shapes
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, *hw, c_in))
  w = rng.normal(size=(k, k, c_in, 8)) / np.sqrt(k * k * c_in)
  conv = {impl: functools.partial(conv_grad.conv2d, stride=stride, padding=padding,
                                  dilation=dilation, impl=impl) for impl in ("taps", "conv")}
  _check_same(conv["conv"], conv["taps"], (x, w))

  # The layer: same values and gradients (input and parameters) with either switch.
  x32 = jnp.asarray(x, jnp.float32)
  convs = {impl: Conv2d(8, k, stride, padding, dilation, use_bias=True, impl=impl)
           for impl in ("taps", "conv")}
  variables = convs["taps"].init(jax.random.key(0), x32)

  def loss(layer, v, x):
    return jnp.sum(jnp.sin(layer.apply(v, x)))

  out = {i: jax.jit(jax.value_and_grad(functools.partial(loss, l), argnums=(0, 1)))(
      variables, x32) for i, l in convs.items()}
  for got, want in zip(jax.tree.leaves(out["conv"]), jax.tree.leaves(out["taps"])):
    assert _max_rel(got, want) < 1e-5


def test_conv2d_auto_picks_taps_on_cpu_only(monkeypatch):
  monkeypatch.setattr(conv_grad, "TAP_KERNEL_GRAD_MIN_FLOPS", 0)
  x, w = jnp.zeros((2, 8, 8, 16)), jnp.zeros((3, 3, 16, 16))

  def custom_vjp(impl):
    jaxpr = jax.make_jaxpr(lambda x, w: conv_grad.conv2d(x, w, padding=1, impl=impl))(x, w)
    return "custom_vjp" in str(jaxpr)

  assert custom_vjp("taps") and not custom_vjp("conv")
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert conv_grad.resolve_impl("auto") == "taps" and custom_vjp("auto")
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert conv_grad.resolve_impl("auto") == "conv" and not custom_vjp("auto")
  with pytest.raises(ValueError, match="impl"):
    conv_grad.conv2d(x, w, impl="cudnn")


def test_conv2d_uses_xla_gradient_for_thin_or_small_convolutions():
  assert not conv_grad._use_tap_kernel_grad((4, 256, 256, 3), (7, 7, 3, 64), 2, 3, 1)
  assert not conv_grad._use_tap_kernel_grad((2, 16, 16, 16), (3, 3, 16, 16), 1, 1, 1)
  assert conv_grad._use_tap_kernel_grad((2, 16, 16, 16), (1, 1, 16, 16), 1, 0, 1)
  assert conv_grad._use_tap_kernel_grad((4, 256, 256, 64), (3, 3, 64, 64), 1, 1, 1)


def _resize_by_matrices(x, size):
  """The align-corners resize as dense per-axis interpolation matrices (einsum)."""
  def matrix(n_in, n_out):
    plan = resample._align_corners_plan(n_in, n_out, x.dtype == jnp.float64)
    m = np.zeros((n_out, n_in), plan.w0.dtype)
    np.add.at(m, (np.arange(n_out), plan.i0), plan.w0)
    np.add.at(m, (np.arange(n_out), plan.i1), plan.w1)
    return jnp.asarray(m, x.dtype)
  return jnp.einsum("oh,bhwc,pw->bopc", matrix(x.shape[1], size[0]), x,
                    matrix(x.shape[2], size[1]))


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (8, 10)), ((3, 3), (48, 24)),
                                          ((7, 6), (3, 4)), ((1, 4), (4, 1)),
                                          ((5, 5), (5, 9))])
def test_resize_gradient_is_the_transposed_interpolation(in_hw, out_hw):
  x = np.random.default_rng(2).normal(size=(2, *in_hw, 3))
  _check_same(lambda x: resample.resize_bilinear_align_corners(x, out_hw),
              lambda x: _resize_by_matrices(x, out_hw), (x,))


@pytest.mark.parametrize("k,hw,heads,head_dim", [(3, (6, 5), 2, 4), (3, (1, 3), 1, 2),
                                                 (5, (6, 4), 2, 2)])
def test_outlook_aggregate_is_fold_of_window_attention(k, hw, heads, head_dim):
  pad = k // 2
  rng = np.random.default_rng(3)
  values = rng.normal(size=(2, *hw, heads * head_dim))
  attn = rng.normal(size=(2, *hw, heads, k * k, k * k))

  def unfolded(values, attn):
    b, h, w, c = values.shape
    windows = condseg_ops.unfold(values, k, pad).reshape(b, h, w, heads, head_dim, k * k)
    out = jnp.einsum("bxyhij,bxyhdj->bxyhdi", attn, windows)
    return condseg_ops.fold(out.reshape(b, h, w, c * k * k), (h, w), k, pad)

  _check_same(lambda v, a: condseg_ops.outlook_aggregate(v, a, k, pad), unfolded,
              (values, attn))
  bf16 = condseg_ops.outlook_aggregate(jnp.asarray(values, jnp.bfloat16),
                                       jnp.asarray(attn, jnp.bfloat16), k, pad)
  assert bf16.dtype == jnp.bfloat16
  assert _max_rel(bf16.astype(jnp.float32), unfolded(values, attn)) < 2e-2


def test_mit_encoder_benchmark_runs_both_frameworks_on_the_same_function(tmp_path):
  """benchmarks/mit_encoder.py: JAX (unrolled and scanned blocks) and transformers'
  SegformerModel compute the same loss on the converted weights; the JSON holds each run."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "mit_encoder.py")
  spec = importlib.util.spec_from_file_location("mit_encoder", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "mit.json"
  result = module.main(["--variant=b0", "--image_size=32", "--batch=1", "--steps=1",
                        "--warmup=1", "--runs=jax:float32,jax:float32:scan,torch:float32",
                        f"--json_out={out}"])
  runs = {r["run"]: r for r in result["runs"]}
  assert set(runs) == {"jax:float32", "jax:float32:scan", "torch:float32"}
  assert all("error" not in r for r in runs.values()), runs
  want = runs["torch:float32"]["loss"]
  assert abs(want) > 1e-4  # the probe loss is not trivially constant
  for name in ("jax:float32", "jax:float32:scan"):
    assert runs[name]["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6), name
  assert json.loads(out.read_text())["params"] == 3_319_392
  with pytest.raises(SystemExit, match="bad entry 'jax:float16'"):
    module.main(["--runs=jax:float16"])


_FAKE_RESNET = '''
import torch
def resnet50(pretrained=True):
  assert not pretrained, "the benchmark must not download weights"
  return torch.nn.Conv2d(3, 4, 3, padding=1)
'''
_FAKE_MODEL = '''
import torch
from resnet import resnet50
class ConDSeg(torch.nn.Module):
  def __init__(self, H=256, W=256):
    super().__init__()
    self.body = resnet50()
  def forward(self, x):
    y = self.body(x)
    return tuple(y[:, i:i + 1] for i in range(4))  # mask, fg, bg, uc
'''


def test_run_reference_times_a_checkout_and_names_a_missing_device(tmp_path):
  """``run_reference`` imports ``network/model.py`` of a checkout (here a stand-in with the
  reference's import structure), trains it with the reference stage-2 loss, and refuses a
  CUDA device that torch cannot see."""
  torch = pytest.importorskip("torch")
  (tmp_path / "network").mkdir()
  (tmp_path / "network" / "resnet.py").write_text(_FAKE_RESNET)
  (tmp_path / "network" / "model.py").write_text(_FAKE_MODEL)
  from contrastjax.data.tasks import binary_seg  # pylint: disable=g-import-not-at-top
  batch = binary_seg.synthetic_batch_arrays(2, 16)
  out = benchmark.run_reference(str(tmp_path), batch, steps=2, warmup=1, threads=1)
  assert out["device"] == "cpu" and out["steps"] == 2 and out["params"] == 4 * 3 * 9 + 4
  assert len(out["losses"]) == 3 and all(np.isfinite(out["losses"]))
  assert out["losses"][-1] < out["losses"][0]  # Adam steps on the same batch
  if not torch.cuda.is_available():
    with pytest.raises(ValueError, match="reference_device=cuda.*no CUDA device"):
      benchmark.run_reference(str(tmp_path), batch, steps=1, warmup=1, threads=1,
                              device="cuda")
  with pytest.raises(FileNotFoundError, match="no network/model.py"):
    benchmark.run_reference(str(tmp_path / "network"), batch, steps=1, warmup=1, threads=1)


def test_peak_tflops_of_known_devices():
  assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0  # not the SXM peak
  assert benchmark.peak_tflops("NVIDIA H200", "float32") == 494.7
  assert benchmark.peak_tflops("cpu", "float32") is None
  assert benchmark.peak_tflops("NVIDIA H200", "float16") is None


def test_steps_zero_compiles_only_and_reports_the_plan():
  """``--steps=0``: the step is compiled, XLA's memory plan and FLOPs reported, nothing
  run; a PyTorch side needs timed steps."""
  config = _load_config("configs/condseg_kvasir.py", "demo,stage1")
  config.batch_size, config.data.image_size = 8, 32   # the 8 simulated devices
  result = benchmark.run(config, steps=0, init="host", xla_opt_level=0)
  j = result["jax"]
  assert j["steps"] == 0 and j["compile_s"] > 0 and "step_s_median" not in j
  assert j["xla_memory_mib"]["temp"] > 0 and j["xla_gflops_per_step"] > 0
  report = benchmark.format_report(result)
  assert "compile only (--steps=0)" in report and "GFLOP/step" in report
  assert "images/s" not in report
  with pytest.raises(ValueError, match="--steps=0 compiles the JAX step only"):
    benchmark.run(config, steps=0, torch=True)
