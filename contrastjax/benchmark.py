r"""Train-step benchmark: the configured method's jitted, sharded step, optionally next
to the reference PyTorch ConDSeg on the same batch and the same CPU.

  python -m contrastjax.benchmark --config=configs/condseg_kvasir.py \
      --config.batch_size=4 --config.data.image_size=256 --steps=10 \
      [--reference_dir=CONDSEG_CHECKOUT [--reference_device=cuda]] \
      [--xla_flags='--xla_cpu_...'] [--nocpu_flags] \
      [--hugepages] [--init=host] [--json_out=bench.json] [--results=results.jsonl]

The JAX side goes through the real spine: ``contrastjax.spine.build_run`` builds
the optimizer, the state shardings and ``spine.CompiledSteps``; the train step is then
lowered and compiled ahead of time (``.lower(state, batch).compile()``, so tracing and
XLA compilation are timed separately) and run ``--steps`` times on one synthetic batch
of the configured size (no dataset needed). Reported: state-init time, trace/lower and
compile time, mean/median/min step time, images/s, CPU seconds and minor page faults
per step, the peak resident memory of the phase (``VmHWM``, reset per phase where the
kernel allows it; ``ru_maxrss`` otherwise) and XLA's own memory analysis of the compiled
step (temporaries, arguments, outputs).

With ``--torch`` the method's PyTorch counterpart in ``benchmarks/<method>_torch.py``
is timed on the same batch in the same process: APC (timm's ViT, torch's LSTM, the same
heads and losses; ``tests/test_apc_torch.py``) and CLIP (OpenCLIP's RN50 model, its
``ClipLoss`` and AdamW groups; ``tests/test_clip_torch.py``) and SiamSeg (transformers'
SegFormer encoder, the DAFormer head and SimSiam in the reference's names, DACS with
kornia; ``tests/test_siamseg_torch.py``). Those tests check that the first step's loss
equals ours from the same weights.

With ``--reference_dir`` (a checkout of github.com/Mengqi-Lei/ConDSeg) the reference
``network/model.py`` ConDSeg is imported from that checkout (``resnet50`` with
``pretrained=False``: nothing is downloaded) and its stage-2 train step is timed on the
same batch: Adam(1e-4), the reference stage-2 loss of ``utils/run_engine.py`` (see
:func:`reference_stage2_loss`), ``loss.backward(); opt.step()``, with
``torch.set_num_threads(--threads)``. The ratio JAX / PyTorch of the median step times
is printed.

XLA flags are process-wide and read once, when the backend starts: ``--xla_flags`` is
appended to ``$XLA_FLAGS`` before JAX initialises, and ``--cpu_flags`` (default on)
adds ``contrastjax.platform.CPU_XLA_FLAGS`` as the trainer does. Compare flag settings
by running the command once per setting. ``--hugepages`` re-runs the command with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (both frameworks allocate through glibc).

On a known GPU (:data:`PEAK_TFLOPS`, or ``--peak_tflops``) the model FLOP utilisation is
reported: XLA's FLOPs per step over the step time and the device's peak. The persistent
compilation cache is used only when ``$CONTRASTJAX_COMPILATION_CACHE`` (or JAX's own
cache flag) names one, as ``launch/gpu_benchmarks.sh`` does: a rerun then loads the
compiled step, and its "compile" time is the load.

``--sweep=batch=2,4,8`` (or ``resolution=...``, or config keys) runs the command once per
value in fresh processes and writes a table and a plot of how step time and memory grow
(:mod:`contrastjax.sweep`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import os
import platform as py_platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

# Importing jax does not start its backend; XLA_FLAGS only has to be final before the
# first computation (``set_xla_flags`` checks that).
from contrastjax import parallel
from contrastjax import spine
from contrastjax import methods as methods_lib
from contrastjax.data import builder as data_builder

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config, e.g. configs/condseg_kvasir.py (any :ARG works).",
    lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps (after the warm-up); 0 "
                              "compiles the step only (XLA's memory plan and FLOPs).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps run before timing.")
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir", "", "Checkout of github.com/Mengqi-Lei/ConDSeg: also time its "
    "PyTorch train step on the same batch.")
_TORCH = flags.DEFINE_bool(
    "torch", False, "Also time the method's PyTorch counterpart in "
    "benchmarks/<method>_torch.py on the same batch (APC, CLIP, SiamSeg).")
_REFERENCE_STEPS = flags.DEFINE_integer(
    "reference_steps", None, "Timed PyTorch steps (default: --steps).")
_XLA_FLAGS = flags.DEFINE_string(
    "xla_flags", "", "Extra XLA flags appended to $XLA_FLAGS before JAX starts.")
_CPU_FLAGS = flags.DEFINE_bool(
    "cpu_flags", True, "Add contrastjax.platform.CPU_XLA_FLAGS where the config's "
    "xnn_fusion key (default True) allows them, as the trainer does.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "PyTorch intra-op threads (0: the CPUs this process may run on, which "
    "is what XLA:CPU uses).")
_REFERENCE_DEVICE = flags.DEFINE_string(
    "reference_device", "cpu", "torch device of the reference run: 'cpu', 'cuda', "
    "'cuda:N' or 'auto' (cuda when available).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the results to this file.")
_RESULTS = flags.DEFINE_string(
    "results", "", "Append the results as one JSON line (with the command line and the "
    "time) to this file, e.g. benchmarks/results.jsonl.")
_DATA_SEED = flags.DEFINE_integer("data_seed", 0, "Seed of the synthetic batch.")
_INIT = flags.DEFINE_enum(
    "init", "spine", ["spine", "host"], "How the train state is created: 'spine' jits "
    "the trainer's own initialiser (what training does; its XLA compile can take a "
    "minute); 'host' fills the parameters with NumPy draws on the same shapes "
    "(seconds; the step being timed is the same).")
_XLA_OPT_LEVEL = flags.DEFINE_integer(
    "xla_opt_level", None, "xla_backend_optimization_level for compiling the train step "
    "(default: XLA's). 0 compiles faster and runs slower: for smoke tests only.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "jax_num_cpu_devices: split the host into this many XLA CPU "
    "devices (the batch is sharded over them, as over accelerators).")
_SWEEP = flags.DEFINE_string(
    "sweep", "", "AXIS=V1,V2,...: run this benchmark once per value, each in a fresh "
    "process, and write a table and a plot of step time and memory against the value "
    "(AXIS: 'batch', 'resolution' or config keys joined by '+'; see contrastjax.sweep).")
_SWEEP_OUT = flags.DEFINE_string(
    "sweep_out", "", "Folder for the sweep's sweep.{jsonl,md,png} (default: "
    "sweeps/<method>_<axis>).")
_SWEEP_TIMEOUT = flags.DEFINE_float(
    "sweep_timeout", None, "Seconds each sweep point may run before it is recorded as "
    "failed.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", None, "The device's peak TFLOP/s for the model FLOP utilisation "
    "(default: known GPUs' dense bfloat16 / TF32 peaks, see PEAK_TFLOPS).")
_HUGEPAGES = flags.DEFINE_bool(
    "hugepages", False, "Re-run this command with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: "
    "glibc then backs its large allocations (XLA's per-step temporary buffers, "
    "PyTorch's tensors) with transparent huge pages, which removes most page faults.")


# ----------------------------------------------------------------------------- helpers
def _progress(message: str) -> None:
  """One line on stderr as each phase ends (a run cut short still shows how far it got)."""
  print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def set_xla_flags(extra: str = "", platform_defaults: bool = True) -> str:
  """Makes ``$XLA_FLAGS`` final for this process and returns it.

  Must run before the JAX backend starts (the first ``jax.devices()`` or computation);
  raises if it already has, since the flags would then silently not apply.
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("the JAX backend is already initialised; XLA flags cannot change")
  if platform_defaults:
    from contrastjax import platform  # pylint: disable=import-outside-toplevel
    platform.configure_cpu(True)
  if extra:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()
  return os.environ.get("XLA_FLAGS", "")


def _proc_status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


class PeakMemory:
  """Peak resident memory of a phase of this process.

  Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) at the start when
  allowed, so ``peak_mib`` is the phase's own peak (``VmHWM``); otherwise it is the
  process peak so far (``ru_maxrss``) and ``reset`` is False. ``start_mib`` is the
  resident size when the phase began (libraries, earlier phases' live arrays).
  """

  def __init__(self):
    self.reset = False
    try:
      with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
      self.reset = True
    except OSError:
      pass
    self.start_mib = (_proc_status_kib("VmRSS") or 0) / 1024

  def result(self) -> dict[str, Any]:
    hwm = _proc_status_kib("VmHWM") if self.reset else None
    if hwm is None:
      hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    peak = hwm / 1024
    return {"peak_rss_mib": round(peak, 1), "start_rss_mib": round(self.start_mib, 1),
            "phase_rss_increase_mib": round(peak - self.start_mib, 1),
            "peak_is_phase_only": self.reset}


def synthetic_batch_for(config: ml_collections.ConfigDict, seed: int = 0
                        ) -> tuple[Any, int]:
  """``(batch, image size)`` shaped like the training pipeline of ``config.data``
  (``data.builder.synthetic_batch``: each dataset maker provides one)."""
  return data_builder.synthetic_batch(config, seed)


def _host_values(tree: Any, seed: int) -> Any:
  """NumPy values for the abstract leaves of ``tree``: kernels ``U(+-1/sqrt(fan_in))``,
  BatchNorm scales and running variances 1, everything else 0."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:]) if path else ""
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      value = np.zeros(leaf.shape)
    elif "kernel" in name:
      bound = 1.0 / np.sqrt(max(1, int(np.prod(leaf.shape[:-1]))))
      value = rng.uniform(-bound, bound, leaf.shape)
    elif "scale" in name or "var" in name:
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return np.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, tree)


def host_initialised_state(machinery: spine.CompiledRun, rng: jax.Array,
                           seed: int = 0) -> spine.TrainState:
  """A train state with the spine's structure, dtypes and shardings whose parameters
  come from NumPy (:func:`_host_values`); optimizer and plateau states are the real
  initial ones."""
  abstract = machinery.abstract
  params = _host_values(abstract.params, seed)
  model_state = _host_values(abstract.model_state, seed + 1)
  extra = _host_values(abstract.extra, seed + 2)
  _, state_rng = jax.random.split(rng)

  def make(params, model_state, extra, state_rng):
    return spine.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
        opt_state=machinery.tx.init(params), plateau=machinery.plateau_tx.init(params),
        extra=extra, rng=state_rng)

  return jax.jit(make, out_shardings=machinery.state_sharding)(
      params, model_state, extra, state_rng)


class CpuUsage:
  """User/system CPU seconds and minor page faults of this process between calls."""

  def __init__(self):
    self._start = resource.getrusage(resource.RUSAGE_SELF)

  def per_step(self, steps: int) -> dict[str, float]:
    end = resource.getrusage(resource.RUSAGE_SELF)
    n = max(steps, 1)
    return {"user_cpu_s_per_step": (end.ru_utime - self._start.ru_utime) / n,
            "sys_cpu_s_per_step": (end.ru_stime - self._start.ru_stime) / n,
            "minor_faults_per_step": (end.ru_minflt - self._start.ru_minflt) / n}


def _summary(times: list[float], batch_size: int) -> dict[str, Any]:
  med = statistics.median(times)
  return {"step_s_mean": statistics.fmean(times), "step_s_median": med,
          "step_s_min": min(times), "step_s_max": max(times),
          "step_s_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
          "images_per_s": batch_size / med, "steps": len(times)}


def time_steps(step: Callable[[], Any], steps: int, warmup: int
               ) -> tuple[list[float], dict[str, float]]:
  """Runs ``step`` ``warmup`` times, then times ``steps`` calls.

  ``step`` must block until its work is done. Returns the wall-clock durations and the
  per-step CPU time and page faults of the timed calls (:class:`CpuUsage`).
  """
  for _ in range(warmup):
    step()
  times = []
  usage = CpuUsage()
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times, usage.per_step(steps)


# ----------------------------------------------------------------------------- JAX
def run_jax(config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray],
            steps: int, warmup: int, init: str = "spine",
            xla_opt_level: int | None = None) -> dict[str, Any]:
  """Builds the configured method's train step through the spine and times it.

  Args:
    config: The training config (method, model, optimizer, batch size, mesh).
    batch_np: One host batch (:func:`synthetic_batch_for`), reused every step.
    steps: Timed steps.
    warmup: Untimed steps before them (the first call is timed separately).
    init: ``'spine'`` (jit the trainer's initialiser) or ``'host'``
      (:func:`host_initialised_state`).
    xla_opt_level: ``xla_backend_optimization_level`` of the step's compilation.
  """
  mesh = parallel.make_mesh(config.get("mesh"))
  with jax.set_mesh(mesh):  # scoped: callers keep their own mesh
    return _run_jax(config, batch_np, steps, warmup, init, xla_opt_level, mesh)


#: Dense peak TFLOP/s per device for model FLOP utilisation (MFU = XLA's FLOPs per step
#: / step time / peak), by a substring of ``device_kind``: bfloat16 tensor cores, and
#: TF32 for float32 (XLA's default precision of float32 matmuls on these GPUs). The
#: first match wins (H100 PCIe before the SXM default). ``--peak_tflops`` overrides.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The peak for ``device_kind`` in compute ``dtype`` (``--peak_tflops`` if given;
  None for unknown devices, CPUs included)."""
  if flags.FLAGS.is_parsed() and _PEAK_TFLOPS.value:
    return float(_PEAK_TFLOPS.value)
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      return peaks.get(dtype)
  return None


def _cost_and_devices(executable) -> dict[str, Any]:
  """XLA's FLOPs per step (where the backend reports them) and the devices."""
  out: dict[str, Any] = {}
  try:
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      out["xla_gflops_per_step"] = float(cost["flops"]) / 1e9
  except Exception:  # pylint: disable=broad-except
    pass
  devices = jax.devices()
  out["devices"] = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
  return out


def _xla_memory_mib(executable) -> dict[str, float]:
  """XLA's memory analysis of a compiled step in MiB (empty where the backend has none)."""
  try:
    analysis = executable.memory_analysis()
    if analysis is None:
      return {}
    return {k: round(getattr(analysis, f"{k}_size_in_bytes") / 2**20, 1)
            for k in ("temp", "argument", "output", "alias", "generated_code")
            if hasattr(analysis, f"{k}_size_in_bytes")}
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return {}


def _run_jax(config, batch_np, steps, warmup, init, xla_opt_level, mesh):
  memory = PeakMemory()
  parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
  method = methods_lib.build(config)
  rng = jax.random.PRNGKey(config.seed)
  batch = parallel.host_to_global(batch_np, mesh)

  t0 = time.perf_counter()
  machinery = spine.build_run(config, method, mesh, rng, batch, total_steps=1000)
  if init == "host":
    state = host_initialised_state(machinery, rng, config.seed)
  else:
    state = spine.initialise_state(machinery.create, machinery.state_sharding, rng, batch)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  _progress(f"state initialised ({init}) in {init_s:.1f} s")

  t0 = time.perf_counter()
  lowered = machinery.compiled.train_step.lower(state, batch)
  lower_s = time.perf_counter() - t0
  _progress(f"train step traced and lowered in {lower_s:.1f} s")
  options = ({} if xla_opt_level is None
             else {"xla_backend_optimization_level": int(xla_opt_level)})
  t0 = time.perf_counter()
  executable = lowered.compile(compiler_options=options or None)
  compile_s = time.perf_counter() - t0
  _progress(f"train step compiled in {compile_s:.1f} s")
  xla_memory = _xla_memory_mib(executable)
  if xla_memory:   # before the first step: an out-of-memory step shows its plan first
    _progress("XLA memory plan: " + ", ".join(f"{k} {v / 1024:.2f} GiB"
                                               for k, v in xla_memory.items() if v))
  compiled = {"init": init, "init_s": init_s, "trace_lower_s": lower_s,
              "compile_s": compile_s, "compiler_options": options}
  if xla_memory:
    compiled["xla_memory_mib"] = xla_memory
  compiled.update(_cost_and_devices(executable))
  if steps == 0:   # --steps=0: compile only
    return {**compiled, "steps": 0, **memory.result()}

  box = [state]
  losses, first_metrics = [], {}

  def step():
    new_state, metrics = executable(box[0], batch)
    box[0] = new_state
    losses.append(metrics["loss"])
    if not first_metrics:
      first_metrics.update(metrics)
    jax.block_until_ready((new_state, metrics))

  t_first = time.perf_counter()
  step()
  first_step_s = time.perf_counter() - t_first
  _progress(f"first step in {first_step_s:.2f} s")
  times, usage = time_steps(step, steps, max(warmup - 1, 0))
  _progress(f"{steps} timed steps, median {statistics.median(times):.4f} s")
  out = {**compiled, "first_step_s": first_step_s,
         **_summary(times, config.batch_size), **usage,
         "losses": [float(x) for x in jax.device_get(losses)], "times": times,
         # Same batch and (with --init=host) the same parameters in every run: compare
         # these across XLA flag settings to see whether a flag changes the numerics.
         "first_step_metrics": {k: float(v) for k, v in
                                jax.device_get(first_metrics).items()}}
  out.update(memory.result())
  peak = peak_tflops(jax.devices()[0].device_kind, str(config.model.get("dtype", "float32")))
  if peak and "xla_gflops_per_step" in out:
    # XLA's cost analysis of the partitioned program counts one device's share.
    out["peak_tflops"] = peak
    out["mfu"] = out["xla_gflops_per_step"] / out["step_s_median"] / (peak * 1e3)
  devices = jax.devices()
  stats = devices[0].memory_stats()
  if stats:
    out["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  box.clear()  # free the device buffers before returning
  state = executable = lowered = machinery = batch = None
  return out


# ----------------------------------------------------------------------------- PyTorch
@contextlib.contextmanager
def _on_path(path: str):
  sys.path.insert(0, path)
  try:
    yield
  finally:
    sys.path.remove(path)


def load_reference(reference_dir: str):
  """Imports the reference ``network/model.py`` from a ConDSeg checkout.

  Its ``from resnet import resnet50`` needs ``network/`` on ``sys.path``; the reference
  ``resnet50()`` defaults to downloading ImageNet weights, so the module's ``resnet50``
  is replaced by ``resnet50(pretrained=False)``. The imported modules are removed from
  ``sys.modules`` again (their names, ``model`` and ``resnet``, are generic).

  Returns:
    ``(torch, model_module)``.
  """
  import torch  # pylint: disable=import-outside-toplevel
  network = os.path.join(os.path.abspath(os.path.expanduser(reference_dir)), "network")
  if not os.path.isfile(os.path.join(network, "model.py")):
    raise FileNotFoundError(f"--reference_dir={reference_dir} has no network/model.py "
                            "(expected a checkout of github.com/Mengqi-Lei/ConDSeg)")
  names = ("resnet", "model")
  saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
  try:
    with _on_path(network):
      ref_resnet, ref_model = map(importlib.import_module, names)
  finally:
    for n in names:
      sys.modules.pop(n, None)
    sys.modules.update(saved)
  ref_model.resnet50 = functools.partial(ref_resnet.resnet50, pretrained=False)
  return torch, ref_model


def reference_stage2_loss(torch, outputs, y, y_bg):
  """The reference stage-2 loss (``utils/run_engine.py`` l.115-131, ``utils/metrics.py``
  ``DiceBCELoss``), written from the reference's loss (docs/methods/condseg.md, "Deviations").

  ``DiceBCE(p, t) = BCE(s, t) + 1 - (2 Σ s t + 1) / (Σ s + Σ t + 1)`` with
  ``s = sigmoid(p)`` (the reference applies it to the model's sigmoid outputs);
  ``L = DiceBCE(mask, y) + β1 DiceBCE(fg, y) + β2 DiceBCE(bg, y_bg) + L_compl``,
  ``β = 1 / (tanh(Σ_{b,h,w} map / (H W)) + 1e-15)`` (not detached) and
  ``L_compl = Σ (P_fg P_bg + P_fg P_uc + P_bg P_uc) / (B H W)`` with ``P`` the softmax
  over the three stacked sigmoid maps.
  """
  functional = torch.nn.functional
  mask, fg, bg, uc = outputs

  def dice_bce(pred, target):
    s = torch.sigmoid(pred).reshape(-1)
    t = target.reshape(-1)
    dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
    return functional.binary_cross_entropy(s, t) + dice

  hw = fg.shape[2] * fg.shape[3]
  beta1 = 1 / (torch.tanh(fg.sum() / hw) + 1e-15)
  beta2 = 1 / (torch.tanh(bg.sum() / hw) + 1e-15)
  probs = functional.softmax(torch.stack([fg, bg, uc], dim=1), dim=1)
  p_fg, p_bg, p_uc = probs[:, 0], probs[:, 1], probs[:, 2]
  compl = (p_fg * p_bg + p_fg * p_uc + p_bg * p_uc).sum() / (fg.shape[0] * hw)
  return dice_bce(mask, y) + beta1 * dice_bce(fg, y) + beta2 * dice_bce(bg, y_bg) + compl


def run_reference(reference_dir: str, batch_np: dict[str, np.ndarray], steps: int,
                  warmup: int, threads: int, device: str = "cpu") -> dict[str, Any]:
  """Times the reference PyTorch ConDSeg stage-2 train step on ``batch_np``.

  ``device``: torch device (``'cpu'``, ``'cuda[:N]'`` or ``'auto'``). On CUDA each step
  ends with ``float(loss)``, which waits for the device, and the peak device memory
  (``torch.cuda.max_memory_allocated``) is reported.
  """
  memory = PeakMemory()
  torch, ref_model = load_reference(reference_dir)
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  if device.startswith("cuda") and not torch.cuda.is_available():
    raise ValueError(f"--reference_device={device}: this torch ({torch.__version__}) sees "
                     "no CUDA device")
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  height, width = batch_np["image"].shape[1:3]
  net = ref_model.ConDSeg(H=height, W=width).to(device).train()
  opt = torch.optim.Adam(net.parameters(), lr=1e-4)
  nchw = lambda a: torch.from_numpy(  # noqa: E731
      np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
  x, y, y_bg = nchw(batch_np["image"]), nchw(batch_np["mask"]), nchw(batch_np["background"])
  cuda = device.startswith("cuda")
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)
  losses = []

  def step():
    opt.zero_grad()
    loss = reference_stage2_loss(torch, net(x), y, y_bg)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))  # waits for the device

  out = time_torch_steps(torch, step, net, steps=steps, warmup=warmup,
                         batch_size=batch_np["image"].shape[0], device=device, memory=memory,
                         label="reference")
  out["losses"] = losses
  return out


def time_torch_steps(torch, step: Callable[[], Any], net, *, steps: int, warmup: int,
                     batch_size: int, device: str, memory: PeakMemory,
                     label: str) -> dict[str, Any]:
  """Times a PyTorch train ``step`` (which must wait for its device, e.g. by reading the
  loss) as :func:`time_steps` does, after one separately timed first call; the result
  has the keys of the JAX side's summary plus the torch version, threads, device, the
  parameter count of ``net``, the phase's peak RSS (``memory``) and, on CUDA, the peak
  device memory allocated."""
  t_first = time.perf_counter()
  step()
  first_step_s = time.perf_counter() - t_first
  _progress(f"{label} first step in {first_step_s:.2f} s")
  times, usage = time_steps(step, steps, max(warmup - 1, 0))
  _progress(f"{label}: {steps} timed steps, median {statistics.median(times):.4f} s")
  out = {"first_step_s": first_step_s, **_summary(times, batch_size), **usage,
         "times": times, "torch_threads": torch.get_num_threads(),
         "torch": torch.__version__, "device": device,
         "params": sum(p.numel() for p in net.parameters())}
  out.update(memory.result())
  if device.startswith("cuda"):
    out["device_name"] = torch.cuda.get_device_name(device)
    out["device_peak_bytes_in_use"] = int(torch.cuda.max_memory_allocated(device))
  return out


#: Methods with a PyTorch counterpart under ``benchmarks/`` (not shipped in the package).
COUNTERPARTS = {"apc": "apc_torch.py", "clip": "clip_torch.py", "siamseg": "siamseg_torch.py"}


def counterpart_module(method: str, directory: str | None = None):
  """Imports ``benchmarks/<method>_torch.py`` from the repository (or ``directory``)."""
  if method not in COUNTERPARTS:
    raise ValueError(f"no PyTorch counterpart for method {method!r} under benchmarks/ "
                     f"(have: {sorted(COUNTERPARTS)}); ConDSeg is timed against its "
                     f"reference code with --reference_dir")
  directory = directory or os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  path = os.path.join(directory, COUNTERPARTS[method])
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: the PyTorch counterpart of {method!r} is not there "
                            f"(it lives in the repository checkout, not the installed package)")
  spec = importlib.util.spec_from_file_location(f"{method}_torch_counterpart", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def counterpart_setup(device: str, threads: int):
  """For ``benchmarks/<method>_torch.py``: ``(torch, PeakMemory(), device)`` with the
  device ``'auto'`` resolved (CUDA when torch sees one) and torch's CPU threads set."""
  import torch  # pylint: disable=import-outside-toplevel
  memory = PeakMemory()
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(threads)
  return torch, memory, device


def run_counterpart(config: ml_collections.ConfigDict, batch_np: dict[str, np.ndarray], *,
                    steps: int, warmup: int, threads: int, device: str = "cpu"
                    ) -> dict[str, Any]:
  """Times the method's PyTorch counterpart (:func:`counterpart_module`) on ``batch_np``."""
  module = counterpart_module(config.method)
  # This module's own timing helpers: under ``python -m contrastjax.benchmark`` it is
  # ``__main__``, and importing it again by name would define its flags twice.
  return module.run_torch(config, batch_np, steps=steps, warmup=warmup, threads=threads,
                          device=device, bench=sys.modules[__name__])


# ----------------------------------------------------------------------------- report
def machine_info() -> dict[str, Any]:
  """CPU model, usable cores, RAM, library versions, load averages."""
  cpu = py_platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_kib = None
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      mem_kib = int(f.readline().split()[1])
  except (OSError, ValueError, IndexError):
    pass
  import jaxlib  # pylint: disable=import-outside-toplevel
  info = {"cpu": cpu, "cores": _usable_cores(), "ram_gib": round((mem_kib or 0) / 2**20, 1),
          "python": py_platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__}
  return info


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _fmt_s(x: float) -> str:
  return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def _xla_plan_text(j: dict[str, Any]) -> str:
  """XLA's memory plan and FLOPs per step of a JAX result, for the report lines."""
  return ((f"; XLA {j['xla_memory_mib']}" if "xla_memory_mib" in j else "")
          + (f"; {j['xla_gflops_per_step']:.1f} GFLOP/step" if "xla_gflops_per_step" in j
             else ""))


def format_report(result: dict[str, Any]) -> str:
  """Human-readable summary of :func:`run`'s result."""
  m, j = result["machine"], result["jax"]
  lines = [
      f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; jax {m['jax']} "
      f"(jaxlib {m['jaxlib']})" + (f", torch {result['torch']['torch']}"
                                   if "torch" in result else ""),
      f"load average before/after: {result['load_before']} / {result['load_after']}",
      f"XLA_FLAGS: {result['xla_flags'] or '(none)'}; GLIBC_TUNABLES: "
      f"{result['glibc_tunables'] or '(none)'}",
      f"config: method={result['method']} batch={result['batch_size']} "
      f"image={result['image_size']} model={result['model']}",
      f"JAX ({j['devices']}): init {_fmt_s(j['init_s'])}, trace+lower "
      f"{_fmt_s(j['trace_lower_s'])}, compile {_fmt_s(j['compile_s'])}"
      + (f", first step {_fmt_s(j['first_step_s'])}" if j["steps"] else
         "; compile only (--steps=0)" + _xla_plan_text(j)),
  ]
  if j["steps"]:
    lines += [
      f"  step: mean {_fmt_s(j['step_s_mean'])}, median {_fmt_s(j['step_s_median'])}, "
      f"min {_fmt_s(j['step_s_min'])} over {j['steps']} steps; "
      f"{j['images_per_s']:.2f} images/s",
      f"  cpu per step: user {j['user_cpu_s_per_step']:.1f} s, sys "
      f"{j['sys_cpu_s_per_step']:.1f} s, {j['minor_faults_per_step']:.0f} minor page faults",
      f"  memory: peak RSS {j['peak_rss_mib']} MiB (phase increase "
      f"{j['phase_rss_increase_mib']} MiB)" + _xla_plan_text(j)
      + (f"; MFU {100 * j['mfu']:.1f}% of {j['peak_tflops']:g} TFLOP/s" if "mfu" in j
         else ""),
    ]
  if result.get("compilation_cache"):
    lines.insert(3, f"persistent compilation cache: {result['compilation_cache']}")
  if j.get("device_peak_bytes_in_use"):
    lines.append(f"  device memory: peak {j['device_peak_bytes_in_use'] / 2**20:.0f} MiB "
                 "in use (whole process)")
  if "torch" in result:
    t = result["torch"]
    where = (t.get("device_name") or t.get("device", "cpu"))
    lines += [
        f"PyTorch {'counterpart ' + t['counterpart'] if 'counterpart' in t else 'reference'} ({where}, {t['torch_threads']} threads): first step "
        f"{_fmt_s(t['first_step_s'])}",
        f"  step: mean {_fmt_s(t['step_s_mean'])}, median {_fmt_s(t['step_s_median'])}, "
        f"min {_fmt_s(t['step_s_min'])} over {t['steps']} steps; "
        f"{t['images_per_s']:.2f} images/s",
        f"  cpu per step: user {t['user_cpu_s_per_step']:.1f} s, sys "
        f"{t['sys_cpu_s_per_step']:.1f} s, {t['minor_faults_per_step']:.0f} minor page "
        f"faults",
        f"  memory: peak RSS {t['peak_rss_mib']} MiB (phase increase "
        f"{t['phase_rss_increase_mib']} MiB)",
        f"ratio JAX / PyTorch (median step time): {result['ratio_jax_over_torch']:.3f}",
    ]
    if t.get("device_peak_bytes_in_use"):
      lines.insert(-1, f"  device memory: peak {t['device_peak_bytes_in_use'] / 2**20:.0f} "
                   "MiB allocated")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
        reference_dir: str = "", reference_steps: int | None = None, threads: int = 0,
        reference_device: str = "cpu", torch: bool = False,
        data_seed: int = 0, init: str = "spine",
        xla_opt_level: int | None = None) -> dict[str, Any]:
  """Runs the benchmark and returns the results as a JSON-able dict.

  Set XLA flags (:func:`set_xla_flags`) before calling: this starts the JAX backend.
  The arguments are those of the command line (see the module docstring).
  """
  if steps < 0:
    raise ValueError(f"steps must be at least 0 (0: compile only), got {steps}")
  if steps == 0 and (torch or reference_dir):
    raise ValueError("--steps=0 compiles the JAX step only: drop --torch/--reference_dir "
                     "or time at least one step")
  threads = threads or _usable_cores()
  batch_np, image_size = synthetic_batch_for(config, data_seed)
  result: dict[str, Any] = {
      "machine": machine_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "method": config.method, "batch_size": int(config.batch_size),
      "image_size": image_size, "model": config.model.to_dict(),
      "load_before": [round(x, 2) for x in os.getloadavg()]}
  if torch and reference_dir:
    raise ValueError("--torch and --reference_dir each time a PyTorch side: give one")
  if torch:
    counterpart_module(config.method)  # fail before the JAX side runs
  result["jax"] = run_jax(config, batch_np, steps, warmup, init, xla_opt_level)
  if torch:
    result["torch"] = run_counterpart(config, batch_np, steps=reference_steps or steps,
                                      warmup=warmup, threads=threads, device=reference_device)
    result["ratio_jax_over_torch"] = (result["jax"]["step_s_median"] /
                                      result["torch"]["step_s_median"])
  if reference_dir:
    if config.method != "condseg":
      raise ValueError(f"--reference_dir times the reference stage-2 ConDSeg; the config's "
                       f"method is {config.method!r}")
    result["torch"] = run_reference(reference_dir, batch_np, reference_steps or steps,
                                    warmup, threads, reference_device)
    result["ratio_jax_over_torch"] = (result["jax"]["step_s_median"] /
                                      result["torch"]["step_s_median"])
  result["load_after"] = [round(x, 2) for x in os.getloadavg()]
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/condseg_kvasir.py")
  if _HUGEPAGES.value and HUGEPAGE_TUNABLE not in os.environ.get("GLIBC_TUNABLES", ""):
    # glibc reads its tunables at process start: run the same command again with it.
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(
        t for t in (env.get("GLIBC_TUNABLES", ""), HUGEPAGE_TUNABLE) if t)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "contrastjax.benchmark", *sys.argv[1:]],
              env)
  if _SWEEP.value:
    sys.exit(_run_sweep(_CONFIG.value))
  set_xla_flags(_XLA_FLAGS.value,
                _CPU_FLAGS.value and bool(_CONFIG.value.get("xnn_fusion", True)))
  cache = ""
  if os.environ.get("CONTRASTJAX_COMPILATION_CACHE") or jax.config.jax_compilation_cache_dir:
    # Only when asked for: a cache hit would time loading, not compiling.
    from contrastjax import platform  # pylint: disable=import-outside-toplevel
    cache = platform.configure_compilation_cache()
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  result = run(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
               reference_dir=_REFERENCE_DIR.value, reference_steps=_REFERENCE_STEPS.value,
               threads=_THREADS.value, reference_device=_REFERENCE_DEVICE.value,
               torch=_TORCH.value,
               data_seed=_DATA_SEED.value, init=_INIT.value,
               xla_opt_level=_XLA_OPT_LEVEL.value)
  result["compilation_cache"] = cache
  print(format_report(result), flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  if _RESULTS.value:
    append_result(_RESULTS.value, result, argv=sys.argv)


def _run_sweep(config: ml_collections.ConfigDict) -> int:
  """``--sweep``: one benchmark process per value; returns the exit code (1 if a point
  failed)."""
  from contrastjax import sweep  # pylint: disable=import-outside-toplevel
  try:
    axis = sweep.parse(_SWEEP.value, config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out_dir = _SWEEP_OUT.value or os.path.join("sweeps", f"{config.method}_{axis.name}")
  rows = sweep.run(sys.argv, axis, config, out_dir, _SWEEP_TIMEOUT.value)
  side = (" vs PyTorch" if _TORCH.value or _REFERENCE_DIR.value else "")
  title = (f"{config.method}{side}: {axis.name} sweep ({'+'.join(axis.keys)}) on "
           f"{machine_info()['cpu']}")
  print(sweep.write(axis, rows, out_dir, title), flush=True)
  print(f"[sweep] wrote {out_dir}/sweep.{{jsonl,md,png}}", file=sys.stderr, flush=True)
  return 1 if any("error" in r for r in rows) else 0


def append_result(path: str, result: dict[str, Any], argv: list[str]) -> None:
  """Appends ``result`` with the command line and the UTC time as one JSON line."""
  line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "command": " ".join(argv), **result}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(line, default=str) + "\n")


if __name__ == "__main__":
  app.run(main)
