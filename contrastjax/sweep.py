"""How a method's step cost grows: ``contrastjax.benchmark --sweep``.

  python -m contrastjax.benchmark --config=configs/condseg_kvasir.py --steps=3 \
      --warmup=1 --init=host --reference_dir=... --sweep=resolution=128,192,256 \
      [--sweep_out=sweeps/condseg_resolution]

runs the same benchmark command once per value, each in a fresh process (so that each
point's peak memory is its own and nothing compiled for one size is reused by the next),
with the swept config key(s) set to the value, and writes to ``--sweep_out``:

* ``sweep.jsonl``: every point's full benchmark result (one JSON line each);
* ``sweep.md``: a table of step time, images/s and peak memory of both frameworks, their
  ratios, and each framework's cost per unit of work relative to the first point (1.00
  means linear growth: work is the batch size, or the pixel count for resolutions);
* ``sweep.png``: step time and peak memory against the swept value, both frameworks,
  with dashed lines for linear growth from the first point.

The axis is ``batch`` (``config.batch_size``), ``resolution`` (the method's input size
keys, :data:`RESOLUTION_KEYS`), or any dotted config key(s) joined by ``+``
(``data.image_size+model.image.image_size=128,224``). A point that fails (out of
memory, a time limit) is kept in the table with its error, and the command then exits 1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Sequence

#: The input-size config keys of each method (``--sweep=resolution=...``).
RESOLUTION_KEYS: dict[str, tuple[str, ...]] = {
    "condseg": ("data.image_size",),
    "siamseg": ("data.crop_size",),
    "apc": ("data.crop_size",),
    "clip": ("data.image_size", "model.image.image_size"),
}

#: Benchmark flags the sweep itself sets per point or handles (not passed on).
_OWN_FLAGS = ("sweep", "sweep_out", "sweep_timeout", "json_out")


@dataclasses.dataclass(frozen=True)
class Axis:
  """What is swept: ``name`` (``'batch'``, ``'resolution'`` or the keys), the config
  ``keys`` set to each value, and whether work grows with the value squared."""
  name: str
  keys: tuple[str, ...]
  values: tuple[int, ...]
  squared: bool


def parse(spec: str, config) -> Axis:
  """``AXIS=V1,V2,...`` against ``config`` (an ``ml_collections.ConfigDict``).

  Raises:
    ValueError: naming the part of ``spec`` that is wrong and what was expected.
  """
  name, sep, values = spec.partition("=")
  name = name.strip()
  if not sep or not name or not values.strip():
    raise ValueError(f"--sweep={spec!r}: expected AXIS=V1,V2,... with AXIS 'batch', "
                     f"'resolution' or config keys (e.g. --sweep=batch=2,4,8)")
  try:
    vals = tuple(int(v) for v in values.split(","))
  except ValueError:
    raise ValueError(f"--sweep={spec!r}: the values must be integers, got "
                     f"{values!r}") from None
  if any(v < 1 for v in vals) or len(set(vals)) != len(vals) or len(vals) < 2:
    raise ValueError(f"--sweep={spec!r}: expected at least two different positive "
                     f"values, got {list(vals)}")
  if name == "batch":
    keys, squared = ("batch_size",), False
  elif name == "resolution":
    method = str(config.get("method", ""))
    family = next((m for m in RESOLUTION_KEYS
                   if method == m or method.startswith(m + "_")), None)  # condseg_stage1
    if family is None:
      raise ValueError(f"--sweep=resolution: no input-size keys known for method "
                       f"{method!r}; name the keys (--sweep=data.image_size=...)")
    keys, squared = RESOLUTION_KEYS[family], True
  else:
    keys = tuple(k.strip() for k in name.split("+"))
    squared = any(k.endswith(("image_size", "crop_size")) for k in keys)
  for key in keys:
    try:
      _lookup(config, key)
    except KeyError:
      raise ValueError(f"--sweep={spec!r}: the config has no key {key!r}") from None
  return Axis(name, keys, vals, squared)


def _lookup(config, key: str) -> Any:
  """The value of dotted ``key`` in ``config``; KeyError if a part is missing."""
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def _value_text(config, key: str, value: int) -> str:
  """``value`` in the shape of the config's current value of ``key`` (a pair for
  ``crop_size=(512, 512)``)."""
  node = _lookup(config, key)
  if isinstance(node, (tuple, list)):
    return "(" + ", ".join([str(value)] * len(node)) + ")"
  return str(value)


def child_argv(argv: Sequence[str], axis: Axis, config, value: int,
               json_out: str) -> list[str]:
  """The benchmark command line of one point: ``argv`` (the sweep's own command line,
  program name first) without the sweep's own flags, with the swept keys set."""
  out, skip = [], False
  for arg in argv[1:]:
    if skip:
      skip = False
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("--") and name in _OWN_FLAGS:
      skip = "=" not in arg  # ``--flag value`` form
      continue
    out.append(arg)
  out += [f"--config.{k}={_value_text(config, k, value)}" for k in axis.keys]
  return [sys.executable, "-m", "contrastjax.benchmark", *out, f"--json_out={json_out}"]


def run(argv: Sequence[str], axis: Axis, config, out_dir: str,
        timeout_s: float | None = None) -> list[dict[str, Any]]:
  """Runs every point (in order) and returns ``{'value', 'result' | 'error'}`` rows."""
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for value in axis.values:
    path = os.path.join(out_dir, f"point_{value}.json")
    if os.path.exists(path):
      os.remove(path)
    cmd = child_argv(argv, axis, config, value, path)
    print(f"[sweep] {axis.name}={value}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                            check=False)
      code, err = proc.returncode, proc.stderr
      if proc.stdout:
        print(proc.stdout, end="", flush=True)
    except subprocess.TimeoutExpired as e:
      code = "timeout"
      err = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes)
             else e.stderr or "") + f"\nran past --sweep_timeout={timeout_s:g} s"
    if code == 0 and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        rows.append({"value": value, "result": json.load(f)})
      os.remove(path)  # kept in sweep.jsonl
    else:
      last = [ln for ln in (err or "").splitlines() if ln.strip()][-1:] or ["(no output)"]
      rows.append({"value": value, "error": f"exit {code}: {last[0][:300]}"})
      print(f"[sweep] {axis.name}={value} failed: {rows[-1]['error']}", file=sys.stderr,
            flush=True)
  return rows


def _work(axis: Axis, value: int) -> float:
  return float(value) ** 2 if axis.squared else float(value)


def _gib(mib: float | None) -> float | None:
  return None if mib is None else mib / 1024


def summarise(axis: Axis, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per point: both frameworks' median step time, images/s and phase memory (GiB),
  the ratios, and each framework's step time per unit of work relative to the first
  successful point (``*_vs_linear``)."""
  out = []
  base: dict[str, tuple[float, float]] = {}
  for row in rows:
    s: dict[str, Any] = {"value": row["value"], "error": row.get("error")}
    r = row.get("result")
    if r is not None:
      for side in ("jax", "torch"):
        if side not in r:
          continue
        t = r[side]
        s[f"{side}_step_s"] = t["step_s_median"]
        s[f"{side}_images_per_s"] = t["images_per_s"]
        s[f"{side}_memory_gib"] = _gib(t.get("phase_rss_increase_mib"))
        if t.get("device_peak_bytes_in_use"):
          s[f"{side}_memory_gib"] = t["device_peak_bytes_in_use"] / 2**30
        if side not in base:
          base[side] = (t["step_s_median"], _work(axis, row["value"]))
        t0, w0 = base[side]
        s[f"{side}_vs_linear"] = (t["step_s_median"] / t0) / (_work(axis, row["value"]) / w0)
      j = r["jax"]
      s["jax_compile_s"] = j.get("compile_s")
      s["xla_temp_gib"] = _gib(j.get("xla_memory_mib", {}).get("temp"))
      if "torch" in r:
        s["time_ratio"] = s["jax_step_s"] / s["torch_step_s"]
        if s.get("jax_memory_gib") and s.get("torch_memory_gib"):
          s["memory_ratio"] = s["jax_memory_gib"] / s["torch_memory_gib"]
    out.append(s)
  return out


def _fmt(v: Any, spec: str = ".2f") -> str:
  return "-" if v is None else format(v, spec)


def table(axis: Axis, summary: Sequence[dict[str, Any]]) -> str:
  """The markdown table of :func:`summarise`'s rows."""
  torch = any("torch_step_s" in s for s in summary)
  head = [axis.name, "JAX compile", "JAX step", "JAX images/s", "JAX memory",
          "XLA temp", "JAX vs linear"]
  if torch:
    head += ["PyTorch step", "PyTorch images/s", "PyTorch memory", "PyTorch vs linear",
             "time JAX/PyTorch", "memory JAX/PyTorch"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    if s.get("error"):
      lines.append(f"| {s['value']} | failed: {s['error']} |" + " |" * (len(head) - 2))
      continue
    cells = [str(s["value"]), _fmt(s.get("jax_compile_s"), ".1f") + " s",
             _fmt(s.get("jax_step_s"), ".3f") + " s", _fmt(s.get("jax_images_per_s")),
             _fmt(s.get("jax_memory_gib")) + " GiB", _fmt(s.get("xla_temp_gib")) + " GiB",
             _fmt(s.get("jax_vs_linear"))]
    if torch:
      cells += [_fmt(s.get("torch_step_s"), ".3f") + " s",
                _fmt(s.get("torch_images_per_s")), _fmt(s.get("torch_memory_gib")) + " GiB",
                _fmt(s.get("torch_vs_linear")), _fmt(s.get("time_ratio")),
                _fmt(s.get("memory_ratio"))]
    lines.append("| " + " | ".join(cells) + " |")
  work = "pixels" if axis.squared else "batch size"
  lines.append("")
  lines.append(f"Memory: the benchmark phase's peak RSS increase on CPUs, peak device memory "
               f"on GPUs. 'vs linear': step time per unit of work ({work}) relative to "
               f"the first point; 1.00 is linear growth.")
  return "\n".join(lines)


def plot(axis: Axis, summary: Sequence[dict[str, Any]], path: str, title: str) -> None:
  """Step time and peak memory against the swept value (log-log), both frameworks, with
  linear growth from the first point dashed."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, metric, label in ((axes[0], "step_s", "median step time (s)"),
                            (axes[1], "memory_gib", "peak memory (GiB)")):
    for side, name, color in (("jax", "JAX", "tab:blue"), ("torch", "PyTorch", "tab:orange")):
      pts = [(s["value"], s[f"{side}_{metric}"]) for s in summary
             if s.get(f"{side}_{metric}") is not None]
      if not pts:
        continue
      xs, ys = zip(*pts)
      ax.plot(xs, ys, "o-", color=color, label=name)
      if metric == "step_s":
        w0 = _work(axis, xs[0])
        ax.plot(xs, [ys[0] * _work(axis, x) / w0 for x in xs], "--", color=color,
                alpha=0.5, label=f"{name}, linear")
    failed = [s["value"] for s in summary if s.get("error")]
    for x in failed:
      ax.axvline(x, color="red", alpha=0.3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks(list(axis.values), [str(v) for v in axis.values])
    ax.set_xlabel(axis.name)
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title + (f" (red: failed at {failed})" if failed else ""), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(axis: Axis, rows: Sequence[dict[str, Any]], out_dir: str, title: str) -> str:
  """Writes ``sweep.jsonl``, ``sweep.md`` and ``sweep.png``; returns the table."""
  with open(os.path.join(out_dir, "sweep.jsonl"), "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, default=str) + "\n")
  summary = summarise(axis, rows)
  text = table(axis, summary)
  with open(os.path.join(out_dir, "sweep.md"), "w", encoding="utf-8") as f:
    f.write(f"{title}\n\n{text}\n")
  plot(axis, summary, os.path.join(out_dir, "sweep.png"), title)
  return text
