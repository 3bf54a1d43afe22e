r"""MiT encoder forward + backward: contrastjax (JAX/Flax) against ``transformers``'
``SegformerModel`` (PyTorch), side by side in one process, on the same weights and batch.

  python benchmarks/mit_encoder.py --variant=b5 --image_size=512 --batch=2 \
      --runs=jax:float32:scan,jax:bfloat16:scan,jax:bfloat16:remat:scan,torch:float32 \
      [--steps=10] [--warmup=2] [--json_out=mit.json]

Each run times ``loss = sum_s mean(stage_s * probe_s)`` (``probe_s`` a fixed random tensor
of the stage's shape, so the loss depends on every output value; a mean of squares of the
LayerNorm'ed stage maps would be ~1 whatever the weights) and its gradient with respect
to all encoder parameters (SiamSeg's backbone cost without the head): JAX through one
``jax.jit`` of ``value_and_grad`` (compiled ahead of time, so compile time is reported
separately), PyTorch through ``loss.backward()`` in training mode. Both use the same
random weights (the PyTorch model's, converted with ``contrastjax.models.mit.load``)
and stochastic depth off, so the losses of the float32 runs agree.

XLA flags: the trainer's CPU defaults (``contrastjax.platform.configure_cpu``) are added
unless ``CONTRASTJAX_CPU_FLAGS=0``.

Precision: ``float32`` runs use each framework's default matmul precision on the device
(on NVIDIA GPUs XLA uses TF32 for float32 dots and convolutions; PyTorch's default is
TF32 for convolutions and full float32 for matmuls unless ``--torch_tf32``);
``bfloat16`` means JAX computes in bfloat16 with float32 parameters (LayerNorm and
softmax statistics in float32) and PyTorch runs under ``torch.autocast(bfloat16)``.
``remat`` recomputes each transformer block in the backward pass and ``scan`` runs each
stage's blocks as one ``nn.scan`` (``scan_blocks=True``; JAX only).

Reported per run: compile (JAX) or first-step time, median/mean/min step time,
images/s, the loss and the peak device memory of the run (JAX: XLA's memory analysis of
the compiled step, temporaries + arguments + outputs; PyTorch:
``torch.cuda.max_memory_allocated`` after a reset; on CPU the process's peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

# GPU: JAX must not take 75% of the device up front when PyTorch shares the process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


def _parse_runs(text: str) -> list[tuple[str, str, frozenset[str]]]:
  runs = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    parts = item.split(":")
    options = frozenset(parts[2:])
    if parts[0] not in ("jax", "torch") or len(parts) < 2 or \
        parts[1] not in ("float32", "bfloat16") or not options <= {"remat", "scan"} or \
        len(options) != len(parts[2:]):
      raise SystemExit(f"--runs: bad entry {item!r}; expected FRAMEWORK:DTYPE[:remat][:scan] "
                       "with FRAMEWORK jax|torch and DTYPE float32|bfloat16")
    if parts[0] == "torch" and options:
      raise SystemExit(f"--runs: {item!r}: remat and scan are JAX options here")
    runs.append((parts[0], parts[1], options))
  return runs


def _times_summary(times: list[float], batch: int) -> dict[str, Any]:
  med = statistics.median(times)
  return {"step_s_median": med, "step_s_mean": statistics.fmean(times),
          "step_s_min": min(times), "steps": len(times), "images_per_s": batch / med}


def _time_steps(step, steps: int, warmup: int) -> tuple[float, list[float]]:
  """``(first call's seconds, timed durations)``: the first call (compilation / lazy
  set-up), ``warmup - 1`` more untimed calls, then ``steps`` timed ones
  (``contrastjax.benchmark.time_steps``)."""
  from contrastjax import benchmark  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  times, _ = benchmark.time_steps(step, steps, max(warmup - 1, 0))
  return first, times


def _peak_rss_mib() -> float:
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_torch_model(variant: str, seed: int):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from contrastjax.models import mit  # pylint: disable=import-outside-toplevel
  cfg = mit.CONFIGS[variant]
  torch.manual_seed(seed)
  config = transformers.SegformerConfig(
      depths=list(cfg["depths"]), hidden_sizes=list(cfg["embed_dims"]),
      num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], drop_path_rate=0.0,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      layer_norm_eps=1e-6, hidden_act="gelu")
  return transformers.SegformerModel(config)


def probes(image_size: int, batch: int, widths, seed: int) -> list[np.ndarray]:
  """Fixed random NHWC tensors shaped like the four stage maps (strides 4/8/16/32)."""
  rng = np.random.default_rng(seed + 1)
  return [rng.standard_normal((batch, -(-image_size // s), -(-image_size // s), c))
          .astype(np.float32) for s, c in zip((4, 8, 16, 32), widths)]


def run_torch(model, x_nhwc: np.ndarray, probe_nhwc: list[np.ndarray], dtype: str,
              steps: int, warmup: int, device: str) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  model = model.to(device).train()
  nchw = lambda a: torch.from_numpy(  # noqa: E731
      np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)
  x = nchw(x_nhwc)
  probe = [nchw(p) for p in probe_nhwc]
  cuda = device.startswith("cuda")
  if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
  autocast = (torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
              if dtype == "bfloat16" else None)
  losses = []

  def step():
    model.zero_grad(set_to_none=True)
    if autocast is not None:
      with autocast:
        hidden = model(x, output_hidden_states=True).hidden_states
    else:
      hidden = model(x, output_hidden_states=True).hidden_states
    loss = sum((h.float() * p).mean() for h, p in zip(hidden, probe))
    loss.backward()
    losses.append(float(loss.detach()))  # synchronises

  first, times = _time_steps(step, steps, warmup)
  out = {"first_step_s": first, **_times_summary(times, x.shape[0]), "loss": losses[0],
         "losses": losses}
  if cuda:
    out["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
  else:
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
  model.to("cpu")
  return out


def run_jax(variant: str, variables_np, x_nhwc: np.ndarray, probe_nhwc: list[np.ndarray],
            dtype: str, remat: bool, steps: int, warmup: int, scan: bool = False
            ) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from contrastjax.models import mit  # pylint: disable=import-outside-toplevel
  model = mit.mit(variant, drop_path_rate=0.0, remat=remat, scan_blocks=scan,
                  dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  params = variables_np["params"]
  params = jax.device_put(mit.stack_blocks(params) if scan else params)
  x = jax.device_put(x_nhwc)
  probe = jax.device_put(probe_nhwc)

  def loss_fn(p, x, probe):
    outs = model.apply({"params": p}, x, train=True)
    return sum(jnp.mean(o.astype(jnp.float32) * w) for o, w in zip(outs, probe))

  fn = jax.jit(jax.value_and_grad(loss_fn))
  t0 = time.perf_counter()
  lowered = fn.lower(params, x, probe)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  losses = []

  def step():
    loss, grads = compiled(params, x, probe)
    jax.block_until_ready(grads)
    losses.append(loss)

  first, times = _time_steps(step, steps, warmup)
  out = {"trace_lower_s": lower_s, "compile_s": compile_s, "first_step_s": first,
         **_times_summary(times, x.shape[0]), "loss": float(losses[0]),
         "losses": [float(v) for v in losses]}
  analysis = compiled.memory_analysis()
  if analysis is not None:
    parts = {k: getattr(analysis, f"{k}_size_in_bytes", 0)
             for k in ("temp", "argument", "output")}
    out["xla_memory_mib"] = {k: round(v / 2**20, 1) for k, v in parts.items()}
    out["peak_device_mib"] = round(sum(parts.values()) / 2**20, 1)
  if jax.devices()[0].platform == "cpu":
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="b5")
  parser.add_argument("--image_size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--runs", default="jax:float32,torch:float32")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--torch_tf32", action="store_true",
                      help="allow TF32 in PyTorch matmuls too (XLA's GPU default)")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args(argv)
  runs = _parse_runs(args.runs)
  if args.steps < 1:
    raise SystemExit(f"--steps must be at least 1, got {args.steps}")

  from contrastjax import platform  # pylint: disable=import-outside-toplevel
  platform.configure_cpu()  # the trainer's XLA:CPU flags (CONTRASTJAX_CPU_FLAGS=0: off)
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from contrastjax.models import mit  # pylint: disable=import-outside-toplevel
  if args.variant not in mit.CONFIGS:
    raise SystemExit(f"--variant: unknown MiT variant {args.variant!r}; expected one of "
                     f"{sorted(mit.CONFIGS)}")
  torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.torch_tf32:
    torch.backends.cuda.matmul.allow_tf32 = True
  if torch_device == "cpu":
    torch.set_num_threads(len(os.sched_getaffinity(0)))

  torch_model = build_torch_model(args.variant, args.seed)
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  abstract = jax.eval_shape(
      lambda: mit.mit(args.variant).init(jax.random.PRNGKey(0),
                                         np.zeros((1, 64, 64, 3), np.float32), train=False))
  variables, _ = mit.load(abstract, state)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  x = np.random.default_rng(args.seed).standard_normal(
      (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)

  probe = probes(args.image_size, args.batch, mit.CONFIGS[args.variant]["embed_dims"],
                 args.seed)
  dev = jax.devices()[0]
  result: dict[str, Any] = {
      "variant": args.variant, "image_size": args.image_size, "batch": args.batch,
      "jax": jax.__version__, "torch": torch.__version__,
      "jax_device": f"{dev.device_kind} ({dev.platform})",
      "torch_device": (torch.cuda.get_device_name() if torch_device == "cuda" else "cpu"),
      "torch_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "params": int(sum(v.size for v in jax.tree_util.tree_leaves(variables))),
      "runs": []}
  for framework, dtype, options in runs:
    name = ":".join([framework, dtype] + sorted(options))
    print(f"--- {name}", flush=True)
    try:
      if framework == "jax":
        out = run_jax(args.variant, variables, x, probe, dtype, "remat" in options,
                      args.steps, args.warmup, scan="scan" in options)
      else:
        out = run_torch(torch_model, x, probe, dtype, args.steps, args.warmup,
                        torch_device)
    except Exception as e:  # pylint: disable=broad-except  (report, go on with the rest)
      out = {"error": f"{type(e).__name__}: {e}"}
    out["run"] = name
    result["runs"].append(out)
    print(json.dumps({k: v for k, v in out.items() if k != "losses"}), flush=True)
    if args.json_out:
      with open(args.json_out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
  ok = {r["run"]: r for r in result["runs"] if "error" not in r}
  for name, j in ok.items():
    t = ok.get(f"torch:{name.split(':')[1]}")
    if name.startswith("jax:") and t:
      print(f"ratio {name} / {t['run']} step time: "
            f"{j['step_s_median'] / t['step_s_median']:.3f}; loss {j['loss']:.6f} vs "
            f"{t['loss']:.6f}", flush=True)
  return result


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
