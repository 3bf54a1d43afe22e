"""benchmarks/apc_ablation.py: reads each run's metrics, skips finished runs, and tabulates
(the runs themselves are the trainer's CLI, tested elsewhere)."""
import json
import os

import pytest

from _repo import load_module


def _module():
  return load_module("benchmarks/apc_ablation.py")


def _fake_run(workdir, vals, pseudo, wall_s):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, (v, p) in enumerate(zip(vals, pseudo)):
      f.write(json.dumps({"step": 600 * (i + 1), "train/loss": 1.0}) + "\n")
      f.write(json.dumps({"step": 600 * (i + 1), "val/mIoU": v, "pseudo/mIoU": p}) + "\n")
  with open(os.path.join(workdir, "wall.json"), "w") as f:
    json.dump({"wall_s": wall_s}, f)


def test_ablation_table_from_finished_runs(tmp_path, monkeypatch):
  m = _module()
  _fake_run(tmp_path / "gmp", [0.2, 0.3, 0.25], [0.2, 0.22, 0.24], 420.0)
  _fake_run(tmp_path / "supervised", [0.4, 0.5], [0.3, 0.31], 600.0)
  monkeypatch.setattr(m.subprocess, "run", lambda *a, **k: pytest.fail("retrained"))
  m.main([f"--workdir={tmp_path}", "--runs=gmp,supervised", f"--table={tmp_path}/t.md"])
  text = (tmp_path / "t.md").read_text()
  assert "| `gmp` |" in text and "| 0.240 | 0.250 | 0.300 (1200) | 50% | 7.0 min |" in text
  assert "| `supervised` |" in text and "| 100% | 10.0 min |" in text
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert saved["gmp"]["best_step"] == 1200 and saved["gmp"]["val"] == 0.25
  with pytest.raises(SystemExit):
    m.main([f"--workdir={tmp_path}", "--runs=gmp,nope"])
