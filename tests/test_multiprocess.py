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


# ----------------------------------------------------------------------------- each method
# Shrunk demo runs of each method through the command line: 2 steps, an evaluation at step
# 2 on an odd number of images (padded batches: the evaluators must drop the padding on
# every process), batches of 8 (one example per device of the 2 x 4).
_SEG = {"data.num_train": 16, "data.num_val": 13, "data.image_size": 32, "batch_size": 8,
        "eval_batch_size": 8, "total_steps": 2, "ckpt_every_steps": 2,
        "eval_every_steps": 2, "log_every_steps": 1, "optimizer.warmup_steps": 1}
_METHOD_RUNS = {
    "condseg": ("condseg_kvasir.py:demo,stage1",
                dict(_SEG, **{"data.num_test": 8, "data.source_size": 32})),
    "siamseg": ("siamseg_loveda.py:demo",
                dict(_SEG, **{"data.num_target_train": 16, "siamseg.pseudo_threshold": 0.1,
                              "progress_bar": False,
                              "evals.source_val.split": "val",
                              "evals.source_val.with_loss": True})),
    "clip": ("clip_gap_coco.py:demo,ss,p=0.5",
             {"data.num_train": 64, "data.num_val": 27, "data.num_zeroshot": 20,
              "batch_size": 16, "eval_batch_size": 8, "total_steps": 2,
              "ckpt_every_steps": 2, "eval_every_steps": 2, "log_every_steps": 1,
              "optimizer.warmup_steps": 1, "evals.val.gap_pairs": 16,
              "progress_bar": False}),
    "apc": ("apc_voc.py:demo",
            {"data.num_train": 16, "data.num_train_eval": 8, "data.num_val": 13,
             "data.image_size": 32, "data.crop_size": 32, "data.eval_size": 32,
             "model.img_size": 32, "batch_size": 8, "eval_batch_size": 8,
             "total_steps": 2, "ckpt_every_steps": 2, "eval_every_steps": 2,
             "log_every_steps": 1, "optimizer.warmup_steps": 1, "apc.akp_warmup_steps": 0,
             "apc.seg_warmup_steps": 0, "apc.pcl_warmup_steps": 0}),
}


#: Methods whose 2-process run reads the prepared (TFDS ArrayRecord) dataset.
_PREPARED = ("apc",)
#: Devices of the one-process run (default 8). SiamSeg's is 1 device: this test then
#: checks 1 device = 2 processes x 4 devices directly, and its in-process 8-vs-1-device
#: step test (two more compilations of the UDA step, ~2 min) is ``heavy``.
_SINGLE_DEVICES = {"siamseg": 1}


def _train_cli(workdir, config, overrides, devices, env_extra=None):
  env = _env()
  env["CONTRASTJAX_COMPILATION_CACHE"] = str(workdir.parent / "xla_cache")
  env.update(env_extra or {})
  return subprocess.Popen(
      [sys.executable, "-m", "contrastjax.train",
       f"--config={os.path.join(REPO, 'configs', config)}", f"--workdir={workdir}",
       f"--jax_num_cpu_devices={devices}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(_METHOD_RUNS))
def test_each_method_on_two_processes_equals_one_device(tmp_path, method):
  """``python -m contrastjax.train`` as one process on 8 devices (SiamSeg: 1), and as 2 processes of 4
  devices joined over loopback (``CONTRASTJAX_COORDINATOR`` & co., as a launcher sets
  them): the same per-step loss terms and gradient norm (a wrong gradient scale or a
  batch term computed per process would move them), and the same evaluation metrics,
  every one of them, over all validation images (none dropped or counted twice).

  APC's two processes read the dataset prepared as TFDS ArrayRecord shards
  (``python -m contrastjax.data.prepare``), its one process the generator: each host
  reads its part of the global batches from the shards."""
  config, overrides = _METHOD_RUNS[method]
  single, multi = tmp_path / "single", tmp_path / "multi"
  p = _train_cli(single, config, overrides, _SINGLE_DEVICES.get(method, 8))
  _, err = p.communicate(timeout=900)
  assert p.returncode == 0, err[-4000:]
  multi_overrides = dict(overrides)
  if method in _PREPARED:
    out = tmp_path / "prepared"
    r = subprocess.run(
        [sys.executable, "-m", "contrastjax.data.prepare",
         f"--config={os.path.join(REPO, 'configs', config)}", f"--out={out}",
         "--noprogress", *[f"--config.{k}={v}" for k, v in overrides.items()]],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    multi_overrides.update({"data.format": "tfds", "data.tfds_dir": str(out)})
  addr = f"127.0.0.1:{_free_port()}"
  procs = [_train_cli(multi, config, multi_overrides, 4, {
      "CONTRASTJAX_COORDINATOR": addr, "CONTRASTJAX_NUM_PROCESSES": "2",
      "CONTRASTJAX_PROCESS_ID": str(i)}) for i in range(2)]
  errs = [pr.communicate(timeout=900)[1] for pr in procs]
  for pr, e in zip(procs, errs):
    assert pr.returncode == 0, e[-4000:]
  assert "(2 processes)" in errs[0]  # the mesh line: it did run as 2 processes
  r1 = metric_writer.read_metrics(str(single / "metrics.jsonl"))
  r2 = metric_writer.read_metrics(str(multi / "metrics.jsonl"))
  timing = ("train/images_per_sec", "train/elapsed_s")
  assert [r["step"] for r in r1] == [r["step"] for r in r2]
  train_keys, eval_values = 0, {}
  for a, b in zip(r1, r2):
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for k in a:
      if k == "step" or k in timing or k.endswith("eval_seconds"):
        continue
      if k.startswith("train/"):
        train_keys += k.startswith("train/loss") or k == "train/grad_norm"
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-7,
                                   err_msg=f"step {a['step']} {k}")
      else:  # evaluation metrics: a thresholded pixel may flip, nothing more
        eval_values[k] = a[k]
        # NaN (e.g. the IoU of a class absent from the split) is written as "nan"
        np.testing.assert_allclose(float(b[k]), float(a[k]), rtol=1e-4, atol=2e-3,
                                   err_msg=f"step {a['step']} {k}")
  assert train_keys >= 4 and len(eval_values) >= 3, (train_keys, eval_values)
  counts = [v for k, v in eval_values.items() if k.endswith(("num_images", "num_pairs"))]
  sizes = {v for k, v in overrides.items()  # the evaluated splits' sizes
           if k.startswith("data.num_") and k not in ("data.num_train",
                                                      "data.num_target_train")}
  assert counts and set(counts) <= sizes, (counts, sizes)  # every image once
