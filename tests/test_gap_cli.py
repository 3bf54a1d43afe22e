"""``python -m contrastjax.gap.simulate``: the documented command runs, writes its
outputs, and rejects unknown config keys / variants with a clear message."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "gap_dynamics.py")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "contrastjax.gap.simulate", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _load_config_module():
  spec = importlib.util.spec_from_file_location("gap_dynamics", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_config_docstring_and_variants():
  mod = _load_config_module()
  assert mod.__doc__.lstrip().startswith(
      "python -m contrastjax.gap.simulate --config=configs/gap_dynamics.py")
  for v in ("scalar", "fig2", "fig2_softplus", "clip_size", "schedule_opt"):
    assert mod.get_config(v).variant == v
  assert mod.get_config("clip_size").lift == "sin_phi"
  with pytest.raises(ValueError, match="fig3"):
    mod.get_config("fig3")


def test_cli_scalar_writes_outputs(tmp_path):
  r = _run("--config=configs/gap_dynamics.py:scalar", f"--workdir={tmp_path}",
           "--config.t1=1e4", "--config.num_save=4", "--config.progress=False")
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads((tmp_path / "trajectory.json").read_text())
  assert data["model"] == "scalar" and data["config"]["t1"] == 1e4
  assert abs(data["t"][-1] - 1e4) < 1e-6
  assert abs(data["gamma"][-1] - 8.54e-3) < 0.01 * 8.54e-3  # scalar model at t=1e4 (docs/methods/modality_gap.md)
  assert (tmp_path / "dynamics.png").stat().st_size > 1000


@pytest.mark.parametrize("args,code,needle", [
    (("--config=configs/gap_dynamics.py:fig2", "--config.no_such_key=1"), 2,
     "'no_such_key' is not a key of the config"),
    (("--config=configs/gap_dynamics.py:fig2", "--config.t1=abc"), 2,
     "--config.t1=abc: could not convert string to float"),
    (("--config=configs/gap_dynamics.py:fig9",), 2, "variant 'fig9' is not known"),
    (("--config=configs/gap_dynamics.py:fig2", "--config.on_exit=boom"), 2,
     "config.on_exit='boom': expected 'raise' or 'report'"),
    # Spec Sec. 7's case (n=64, d=16, tau0=0.07, gamma0=0.3): the raw flow leaves [-1, 1].
    (("--config=configs/gap_dynamics.py:fig2", "--config.n=64", "--config.d=16",
      "--config.tau0=0.07", "--config.t1=1e3", "--config.rtol=1e-6", "--config.atol=1e-9",
      "--config.progress=False"), 3, "on_exit=report"),
], ids=["unknown_key", "wrong_type", "unknown_variant", "bad_value", "gamma_exit"])
def test_cli_bad_input_exit_status_and_one_line(tmp_path, args, code, needle):
  """The simulator shares the trainer's error handling (contrastjax.cli): the documented
  exit status and an ``ERROR:`` line naming the key or value, without a traceback."""
  r = _run(*args, f"--workdir={tmp_path}")
  assert r.returncode == code, r.stderr[-3000:]
  assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.count("ERROR:") == 1
