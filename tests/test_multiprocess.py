"""Two processes joined by jax.distributed over loopback train exactly like one."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastjax import checkpoint as ckpt_lib
from contrastjax import metric_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_mp_worker.py")


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(REPO, "tests"), REPO, env.get("PYTHONPATH", "")])
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_equals_single_process(tmp_path):
  single = tmp_path / "single"
  p = subprocess.run([sys.executable, WORKER, str(single), "8"], env=_env(), cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  multi = tmp_path / "multi"
  addr = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, WORKER, str(multi), "4", addr, "2", str(i)],
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [pr.communicate(timeout=600)[0] for pr in procs]
  for pr, out in zip(procs, outs):
    assert pr.returncode == 0, out
  res_single = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
  res_multi = [l for o in outs for l in o.splitlines() if l.startswith("RESULT")]
  assert len(res_multi) == 2
  # Every process reports the same global metrics, over all 10 validation images.
  miou_single = float(res_single[0].split()[2])
  for line in res_multi:
    _, _, miou, n = line.split()
    assert float(n) == 10
    # thresholded metrics: float round-off may flip a pixel, nothing more
    np.testing.assert_allclose(float(miou), miou_single, atol=1e-3)
  # The gradient itself (Adam's update would hide a process-count scale of it): the
  # logged gradient norms agree step by step.
  def grad_norms(workdir):
    return {r["step"]: r["train/grad_norm"] for r in
            metric_writer.read_metrics(str(workdir / "metrics.jsonl")) if "train/grad_norm" in r}
  g1, g2 = grad_norms(single), grad_norms(multi)
  assert len(g1) >= 2 and g1.keys() == g2.keys() and all(v > 0 for v in g1.values())
  for step in g1:
    np.testing.assert_allclose(g2[step], g1[step], rtol=1e-5, err_msg=f"step {step}")
  a = ckpt_lib.load_variables(str(single), 6)
  b = ckpt_lib.load_variables(str(multi), 6)
  for x, y in zip(jax.tree.leaves((a["params"], a["model_state"])),
                  jax.tree.leaves((b["params"], b["model_state"]))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
