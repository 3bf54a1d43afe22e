"""The demo config end to end: stage 1 -> stage 2 (initialised from stage 1) -> evaluate,
through the real command lines."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastjax import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.total_steps=2", "--config.eval_every_steps=2", "--config.log_every_steps=1",
         "--config.data.num_train=32", "--config.data.num_val=8", "--config.data.num_test=8",
         "--config.batch_size=8", "--config.eval_batch_size=8"]


def _run(module, *args):
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p


@pytest.mark.slow
def test_demo_stage1_stage2_evaluate(tmp_path):
  s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
  _run("contrastjax.train", "--config=configs/condseg_kvasir.py:demo,stage1",
       f"--workdir={s1}", *SHORT)
  _run("contrastjax.train", f"--config=configs/condseg_kvasir.py:demo,init_from={s1}",
       f"--workdir={s2}", *SHORT)
  for wd in (s1, s2):
    lines = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    assert [l["step"] for l in lines if "train/loss" in l] == [1, 2]
    assert any("val/mDSC" in l for l in lines)
    assert (wd / "curves.png").exists()
  # Stage 2 started from stage 1's encoder (params and BatchNorm statistics): its first
  # checkpoint is two Adam steps (lr 1e-3) away from stage 1's best encoder.
  a = ckpt_lib.load_variables(str(s1), "best")
  b = ckpt_lib.load_variables(str(s2), "latest")
  enc_a = jax.tree.leaves(a["params"]["encoder"])
  enc_b = jax.tree.leaves(b["params"]["encoder"])
  assert max(float(np.abs(x - y).max()) for x, y in zip(enc_a, enc_b)) < 2 * 2e-3 + 1e-6
  p = _run("contrastjax.evaluate", "--config=configs/condseg_kvasir.py:demo",
           f"--workdir={s2}", "--splits=val,test", "--save_predictions=3",
           "--original_resolution", *SHORT)
  assert "val/mIoU" in p.stdout and "test/mDSC" in p.stdout
  out = next((s2 / "eval").iterdir())
  metrics = json.load(open(out / "metrics.json"))
  assert metrics["val/num_images"] == 8 and metrics["test/num_images"] == 8
  assert 0.0 <= metrics["val/mIoU"] <= metrics["val/mDSC"] <= 1.0
  # scored again at each image's original size (the demo's images are generated at the
  # training size, so both agree up to the bilinear round trip)
  assert abs(metrics["val/orig_res/mIoU"] - metrics["val/mIoU"]) < 0.05
  assert len(os.listdir(out / "val" / "masks")) == 8
  assert len(os.listdir(out / "val" / "overlays")) == 3
