"""``python -m contrastjax.data.benchmark``: the stand-in datasets are what the folder readers
expect (official layouts, native sizes), and the measurement covers both formats."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _repo import REPO
from contrastjax.data import benchmark
from contrastjax.data import builder
from test_pins_methods import _config


@pytest.mark.parametrize("config,arg,name,size", [
    ("condseg_kvasir.py", None, "medseg", (529, 622)),
    ("siamseg_loveda.py", None, "loveda", (1024, 1024)),
    ("apc_voc.py", None, "voc", (375, 500)),
])
def test_stand_ins_are_read_by_the_folder_readers(tmp_path, config, arg, name, size):
  c = _config(config, arg)
  assert c.data.name == name
  benchmark.STAND_INS[name](str(tmp_path), 4)
  c.data.root = str(tmp_path)
  if name == "medseg":
    c.data.binarize = "threshold"   # the stand-in masks are 0/255 JPEGs, as Kvasir's
  spec = builder.make_spec(c)
  stored = spec.prepare_sources or spec.sources
  for split, src in stored.items():
    assert len(src) > 0, split
    ex = src[0]
    assert ex["image"].shape == (*size, 3), (split, ex["image"].shape)


def test_run_measures_both_formats_and_the_preparation(tmp_path, monkeypatch):
  import tempfile  # pylint: disable=g-import-not-at-top
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  c = _config("condseg_kvasir.py", None)
  c.batch_size = 2
  lines = []
  # 10 timed batches: more than the 4 that the read threads may have ready in advance.
  rows = benchmark.run(c, formats=("folder", "tfds"), workers=(0,), batches=10, stand_in=12,
                       log=lines.append)
  prep = [r for r in rows if r["what"] == "prepare"]
  assert len(prep) == 1 and prep[0]["examples"] == 12 and prep[0]["examples_per_s"] > 0
  pipe = {r["format"]: r for r in rows if r["what"] == "pipeline"}
  assert sorted(pipe) == ["folder", "tfds"]
  for r in pipe.values():
    assert r["batches"] == 10 and r["batch_size"] == 2 and r["workers"] == 0
    assert r["examples_per_s"] == pytest.approx(20 / r["seconds"])
    assert r["cpu_s"] > 0 and r["examples_per_cpu_s"] == pytest.approx(20 / r["cpu_s"])
  assert any("stand-in" in l for l in lines) and any("examples/s" in l for l in lines)
  assert os.listdir(scratch) == []   # the stand-in and the prepared copy are removed


def test_command_line(tmp_path):
  out = tmp_path / "rows.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
  args = [sys.executable, "-m", "contrastjax.data.benchmark",
          "--config=configs/condseg_kvasir.py", "--config.batch_size=2", "--stand_in=6",
          "--batches=2", "--formats=folder", f"--results={out}"]
  r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["format"] for r in rows] == ["folder"] and rows[0]["config"].endswith(
      "condseg_kvasir.py")
  assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]   # stand-in folder removed
  r = subprocess.run(args[:-3] + ["--formats=parquet"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "--formats: unknown ['parquet']" in r.stderr
  r = subprocess.run([*args[:3], "--config=configs/clip_gap_coco.py", "--stand_in=4"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and "no stand-in writer for config.data.name='coco_captions'" in (
      r.stderr)
