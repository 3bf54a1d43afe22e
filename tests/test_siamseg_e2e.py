"""The SiamSeg demo config end to end through the command lines (train -> evaluate with
semantic-segmentation pictures), and the domain-adaptation check on the synthetic two-domain
data: SiamSeg's target mIoU beats source-only.

Both are ``slow``: every run compiles the full UDA step (about 3 minutes on a loaded 2-core
CPU); the adaptation check trains the demo's source stage and two 400-step continuations (about
10-20 minutes in all on such a machine).
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.num_train=16", "--config.data.num_target_train=16",
         "--config.data.num_val=8", "--config.batch_size=8", "--config.eval_batch_size=8"]


def _run(module, *args, timeout=1800):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                     text=True, timeout=timeout)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p


def _last_eval(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [l for l in lines if "val/mIoU" in l][-1]


@pytest.mark.heavy
def test_demo_train_then_evaluate_with_pictures(tmp_path):
  wd = tmp_path / "run"
  _run("contrastjax.train", "--config=configs/siamseg_loveda.py:demo", f"--workdir={wd}",
       "--config.total_steps=2", "--config.eval_every_steps=2", "--config.log_every_steps=1",
       "--config.progress_bar=False", *SMALL)
  lines = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  train = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train] == [1, 2]
  assert all(k in train[-1] for k in ("train/loss_src", "train/loss_mix",
                                      "train/loss_contrastive", "train/pseudo_weight"))
  assert 0.0 <= _last_eval(wd)["val/mIoU"] <= 1.0
  assert any(f.startswith("val_") for f in os.listdir(wd / "samples"))
  p = _run("contrastjax.evaluate", "--config=configs/siamseg_loveda.py:demo",
           f"--workdir={wd}", "--checkpoint=latest", "--splits=val", "--save_predictions=2",
           *SMALL)
  assert "val/mIoU" in p.stdout
  out = next((wd / "eval").iterdir())
  assert len(os.listdir(out / "val" / "masks")) == 8
  assert len(os.listdir(out / "val" / "overlays")) == 2


@pytest.mark.heavy
def test_siamseg_beats_source_only_on_the_target_domain(tmp_path):
  """The demo recipe: a source-only run, then from its checkpoint 400 steps of SiamSeg
  against 400 more steps of source-only training (same start, same step count)."""
  src = tmp_path / "source"
  _run("contrastjax.train", "--config=configs/siamseg_loveda.py:demo,source_only",
       f"--workdir={src}", "--config.progress_bar=False", timeout=3600)
  results = {}
  for variant, arg in (("source_only", "demo,source_only"), ("siamseg", "demo")):
    wd = tmp_path / variant
    _run("contrastjax.train", f"--config=configs/siamseg_loveda.py:{arg},init_from={src}",
         "--config.total_steps=400", f"--workdir={wd}", "--config.progress_bar=False",
         timeout=3600)
    results[variant] = _last_eval(wd)["val/mIoU"]
  assert results["siamseg"] > results["source_only"] + 0.02, results
