r"""The APC ablation on the demo: every variant and every adaptive-K rule, one training run
each through the command line, and a Markdown table of what they reach.

  python benchmarks/apc_ablation.py --workdir=workdirs/apc_ablation \
      [--runs=gmp,topk,akp,akp_h2,akp_h3,akp_pcl,gmp_noeq,apc_nopar,apc_noeq,apc,supervised] \
      [--extra=--config.total_steps=1200] [--table=ablation.md]

Each run is ``python -m contrastjax.train --config=configs/apc_voc.py:demo,<args>
--workdir=<workdir>/<run>``; its wall time (the whole command: start-up, compilation,
training and evaluations) is stored next to it in ``wall.json``. A run whose workdir
already holds a finished run and its ``wall.json`` is not trained again, so an interrupted
ablation continues where it stopped. The table reports, from each run's ``metrics.jsonl``,
the final pseudo-label mIoU (the patch classifier merged with the true image labels, on
the training images) and the final and best val mIoU (the segmentation: the decoder's, or
the merge with predicted labels for the classifier-only variants).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: run name -> (config arguments after ``demo``, extra --config flags, description)
RUNS = {
    "gmp": ("gmp", (), "ViT-PCM stage 1: max pooling, classifier only"),
    "topk": ("topk", (), "fixed top-K pooling (K=4), classifier only"),
    "akp": ("akp", (), "adaptive-K pooling, H1 ratio-to-max (tau 0.5)"),
    "akp_h2": ("akp,rule=consecutive_ratio", (), "adaptive-K, H2 consecutive ratio (tau 0.5)"),
    "akp_h3": ("akp,rule=argmax_share", (), "adaptive-K, H3 argmax share (rho 0.1)"),
    "akp_pcl": ("akp_pcl", (), "adaptive-K + patch contrast, classifier only"),
    "gmp_noeq": ("gmp", ("--config.apc.eq_weight=0",),
                 "ViT-PCM stage 1 without its equivariant loss"),
    "apc_nopar": ("apc", ("--config.apc.par=False",), "full APC without PAR"),
    "apc_noeq": ("apc", ("--config.apc.eq_weight=0",),
                 "full APC without ViT-PCM's equivariant loss"),
    "apc": ("apc", (), "full APC (AKP + PCL + decoder on PAR-refined pseudo-labels)"),
    "supervised": ("supervised", (), "the decoder on the true masks (upper bound)"),
}


def _final_metrics(workdir: str) -> dict[str, float]:
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rows.append(json.loads(line))
  evals = [r for r in rows if "val/mIoU" in r]
  if not evals:
    raise RuntimeError(f"{workdir}/metrics.jsonl has no val/mIoU record")
  last = evals[-1]
  best = max(evals, key=lambda r: r["val/mIoU"])
  pseudo = [r for r in rows if "pseudo/mIoU" in r]
  return {"step": last["step"], "val": last["val/mIoU"], "best": best["val/mIoU"],
          "best_step": best["step"], "pseudo": pseudo[-1]["pseudo/mIoU"] if pseudo else None}


def run_one(name: str, workdir: str, extra: list[str]) -> dict:
  args, flags, _ = RUNS[name]
  wall_path = os.path.join(workdir, "wall.json")
  if os.path.exists(wall_path):
    with open(wall_path, encoding="utf-8") as f:
      wall = json.load(f)
  else:
    cmd = [sys.executable, "-m", "contrastjax.train",
           f"--config={os.path.join(REPO, 'configs', 'apc_voc.py')}:demo,{args}",
           f"--workdir={workdir}", *flags, *extra]
    print(f"[ablation] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = {"wall_s": time.perf_counter() - t0, "command": cmd[1:]}
    with open(wall_path, "w", encoding="utf-8") as f:
      json.dump(wall, f)
  return {**_final_metrics(workdir), **wall}


def table(results: dict[str, dict]) -> str:
  sup = results.get("supervised", {}).get("val")
  lines = ["| run | what | pseudo mIoU (train) | val mIoU (final) | best val (step) | "
           "of supervised | wall time |", "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    share = f"{r['val'] / sup:.0%}" if sup else "-"
    pseudo = f"{r['pseudo']:.3f}" if r["pseudo"] is not None else "-"
    lines.append(f"| `{name}` | {RUNS[name][2]} | {pseudo} | {r['val']:.3f} | "
                 f"{r['best']:.3f} ({r['best_step']}) | {share} | "
                 f"{r['wall_s'] / 60:.1f} min |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--runs", default=",".join(RUNS))
  parser.add_argument("--extra", action="append", default=[],
                      help="extra flags for every run, e.g. --extra=--config.seed=1")
  parser.add_argument("--table", default="", help="also write the table to this file")
  a = parser.parse_args(argv)
  names = [n for n in a.runs.split(",") if n]
  unknown = [n for n in names if n not in RUNS]
  if unknown:
    parser.error(f"unknown runs {unknown}; expected some of {list(RUNS)}")
  results = {n: run_one(n, os.path.join(a.workdir, n), a.extra) for n in names}
  text = table(results)
  print(text)
  if a.table:
    with open(a.table, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  with open(os.path.join(a.workdir, "ablation.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
