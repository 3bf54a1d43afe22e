"""``contrastjax.benchmark --sweep``: the axis parsing, the per-point command lines, the
summary's ratios and linearity, failures kept in the table, and one real sweep."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from contrastjax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(method="siamseg"):
  return ml_collections.ConfigDict({
      "method": method, "batch_size": 2,
      "data": {"crop_size": (512, 512), "image_size": 224},
      "model": {"image": {"image_size": 224}}})


def test_parse_axes_and_errors():
  c = _config()
  a = sweep.parse("batch=2,4,8", c)
  assert a.keys == ("batch_size",) and a.values == (2, 4, 8) and not a.squared
  a = sweep.parse("resolution=256,384", c)
  assert a.keys == ("data.crop_size",) and a.squared
  a = sweep.parse("resolution=128,224", _config("clip"))
  assert a.keys == ("data.image_size", "model.image.image_size")
  assert sweep.parse("resolution=1,2", _config("condseg_stage1")).keys == ("data.image_size",)
  a = sweep.parse("data.image_size+model.image.image_size=64,96", c)
  assert a.keys == ("data.image_size", "model.image.image_size") and a.squared
  for spec, message in [("batch", "expected AXIS=V1,V2"), ("batch=2,x", "must be integers"),
                        ("batch=4", "at least two different positive"),
                        ("batch=4,4", "at least two different positive"),
                        ("batch=0,2", "at least two different positive"),
                        ("data.crop=1,2", "the config has no key 'data.crop'"),
                        ("data.crop_size.x=1,2", "no key 'data.crop_size.x'")]:
    with pytest.raises(ValueError, match=message):
      sweep.parse(spec, c)
  with pytest.raises(ValueError, match="no input-size keys known for method 'toy'"):
    sweep.parse("resolution=1,2", _config("toy"))


def test_child_command_drops_the_sweep_flags_and_sets_the_keys():
  c = _config()
  axis = sweep.parse("resolution=256,384", c)
  argv = ["benchmark", "--config=configs/siamseg_loveda.py", "--sweep=resolution=256,384",
          "--sweep_out", "out dir", "--json_out=x.json", "--steps=2", "--torch"]
  cmd = sweep.child_argv(argv, axis, c, 384, "/p/point_384.json")
  assert cmd[:3] == [sys.executable, "-m", "contrastjax.benchmark"]
  assert cmd[3:] == ["--config=configs/siamseg_loveda.py", "--steps=2", "--torch",
                     "--config.data.crop_size=(384, 384)", "--json_out=/p/point_384.json"]


def _point(value, jax_s, torch_s, jax_mib, torch_mib):
  return {"value": value, "result": {
      "jax": {"step_s_median": jax_s, "images_per_s": value / jax_s, "compile_s": 3.0,
              "phase_rss_increase_mib": jax_mib, "xla_memory_mib": {"temp": 512.0}},
      "torch": {"step_s_median": torch_s, "images_per_s": value / torch_s,
                "phase_rss_increase_mib": torch_mib}}}


def test_summary_ratios_linearity_failures_table_and_plot(tmp_path):
  axis = sweep.parse("resolution=128,256,512", _config())
  rows = [_point(128, 1.0, 2.0, 1024, 512), _point(256, 8.0, 8.0, 2048, 2048),
          {"value": 512, "error": "exit 1: RESOURCE_EXHAUSTED: Out of memory"}]
  s = sweep.summarise(axis, rows)
  # 4x the pixels: JAX took 8x (2.0 of linear), PyTorch 4x (1.0 of linear)
  assert s[1]["jax_vs_linear"] == pytest.approx(2.0)
  assert s[1]["torch_vs_linear"] == pytest.approx(1.0)
  assert s[0]["time_ratio"] == pytest.approx(0.5) and s[1]["time_ratio"] == pytest.approx(1.0)
  assert s[0]["memory_ratio"] == pytest.approx(2.0) and s[0]["xla_temp_gib"] == 0.5
  assert s[2]["error"].startswith("exit 1")
  text = sweep.write(axis, rows, str(tmp_path), "test sweep")
  lines = text.splitlines()
  assert lines[2].startswith("| 128 | 3.0 s | 1.000 s | 128.00 | 1.00 GiB | 0.50 GiB | 1.00 |")
  assert lines[2].endswith("| 2.000 s | 64.00 | 0.50 GiB | 1.00 | 0.50 | 2.00 |")
  assert "| 512 | failed: exit 1: RESOURCE_EXHAUSTED: Out of memory |" in lines[4]
  assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [json.loads(ln)["value"] for ln in (tmp_path / "sweep.jsonl").read_text().splitlines()] == [128, 256, 512]
  assert "test sweep" in (tmp_path / "sweep.md").read_text()


def test_a_point_that_fails_is_kept_with_its_error(tmp_path):
  axis = sweep.parse("batch=2,4", _config())
  rows = sweep.run(["benchmark", "--config=/nonexistent/cfg.py"], axis, _config(),
                   str(tmp_path))
  assert [r["value"] for r in rows] == [2, 4]
  assert all(r["error"].startswith("exit 1") and "nonexistent" in r["error"] for r in rows)


def test_cli_resolution_sweep(tmp_path):
  """A real two-point sweep through the command line (ConDSeg demo network)."""
  out = tmp_path / "sw"
  cmd = [sys.executable, "-m", "contrastjax.benchmark",
         "--config=configs/condseg_kvasir.py:demo,stage1", "--config.batch_size=2",
         "--steps=1", "--warmup=1", "--init=host", "--xla_opt_level=0",
         "--sweep=resolution=16,32", f"--sweep_out={out}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(ln) for ln in (out / "sweep.jsonl").read_text().splitlines()]
  assert [r["result"]["image_size"] for r in rows] == [16, 32]
  assert all(r["result"]["batch_size"] == 2 for r in rows)
  table = (out / "sweep.md").read_text()
  assert "| resolution | JAX compile |" in table and "\n| 16 |" in table and "\n| 32 |" in table
  assert (out / "sweep.png").stat().st_size > 1000
  assert "| 32 |" in proc.stdout
