"""The launchers in ``launch/`` in their dry-run mode (``DRY_RUN=1``): the commands they
would run, checked; every command of the GPU benchmark script names files, modules
and config keys that exist (a renamed key would otherwise fail only on a lent GPU); and
the GPU benchmark script run for real at small sizes on this CPU (``SMALL=1``)."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _run(script, *args, **env):
  e = dict(os.environ, DRY_RUN="1", **env)
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=60, check=False)


def _bash_split(line):
  """The words bash reads from a printed ``printf %q`` command line."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                       capture_output=True, text=True, check=True).stdout
  return out.split("\0")[:-1]


@pytest.mark.parametrize("script", sorted(os.listdir(LAUNCH)))
def test_launchers_parse(script):
  proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr


def test_local_multiprocess_commands():
  p = _run("local_multiprocess.sh", "3", "--config=configs/condseg_kvasir.py:demo",
           "--workdir=w d", PORT="23456")
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line == (f"CONTRASTJAX_COORDINATOR=127.0.0.1:23456 CONTRASTJAX_NUM_PROCESSES=3 "
                    f"CONTRASTJAX_PROCESS_ID={i} python -m contrastjax.train "
                    f"--config=configs/condseg_kvasir.py:demo --workdir=w d")
  bad = _run("local_multiprocess.sh", "two", "--config=x")
  assert bad.returncode == 2 and "positive integer, got 'two'" in bad.stderr


def test_slurm_step():
  p = _run("slurm_gpu.sbatch", "--config=configs/siamseg_loveda.py", "--workdir=/runs/a")
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == ("srun --kill-on-bad-exit=1 python -m contrastjax.train "
                              "--config=configs/siamseg_loveda.py --workdir=/runs/a")
  text = open(os.path.join(LAUNCH, "slurm_gpu.sbatch"), encoding="utf-8").read()
  # requeue on preemption, SIGTERM ahead of the kill: the trainer's checkpoint-and-exit
  assert "#SBATCH --requeue" in text and "#SBATCH --signal=TERM@" in text
  assert "export CONTRASTJAX_DISTRIBUTED=1" in text


def test_tpu_vm_commands():
  p = _run("tpu_vm.sh", "vm1", "us-central2-b", "v4-16", "--", "python", "-m",
           "contrastjax.train", "--config=configs/condseg_kvasir.py", "--workdir=gs://b/r",
           PROJECT="proj", DATA_DIR="/mnt/data", SPOT="1")
  assert p.returncode == 0, p.stderr
  cmds = [_bash_split(l) for l in p.stdout.splitlines() if l.startswith(("gcloud", "tar"))]
  gc = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert [c[:5] for c in cmds] == [gc + ["create"], ["tar", "-C", REPO, "--exclude=.venv",
                                                     "--exclude=.git"],
                                   gc + ["scp"], gc + ["ssh"], gc + ["ssh"]]
  create, tar, scp, unpack, train = cmds
  assert {"--zone=us-central2-b", "--accelerator-type=v4-16", "--project=proj",
          "--spot"} <= set(create)
  assert tar[-1] == "." and tar[-2] == scp[5]  # the tarball made is the one copied
  for c in (scp, unpack, train):
    assert "--worker=all" in c and "--project=proj" in c
  script = train[train.index("--command") + 1]
  assert "pip install -q -e '.[gcs]' 'jax[tpu]'" in script  # gcsfs: gs:// data and workdirs
  assert "export CONTRASTJAX_DISTRIBUTED=1 CONTRASTJAX_DATA_DIR=/mnt/data" in script
  assert script.rstrip().endswith(
      "python -m contrastjax.train --config=configs/condseg_kvasir.py --workdir=gs://b/r")
  usage = _run("tpu_vm.sh", "vm1", "zone", "v4-8")
  assert usage.returncode == 2 and "Cloud TPU VM launcher" in usage.stdout


def _load_config(spec):
  """``configs/x.py[:arg]`` -> its ``get_config(arg)``, as ml_collections' config flag."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("launch_cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


ALL_PARTS = "gap mit_b5 condseg siamseg_f32 siamseg_bf16_remat clip apc apc_bf16"


def test_gpu_benchmark_parts_name_what_exists(tmp_path):
  p = _run("gpu_benchmarks.sh", OUT=str(tmp_path), PARTS=ALL_PARTS)
  assert p.returncode == 0, p.stderr
  lines = [l for l in p.stdout.splitlines() if " (limit " in l]
  assert [l.split()[0] for l in lines] == ALL_PARTS.split()
  for line in lines:
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[0] == "python3"
    if argv[1] == "-m":
      assert importlib.util.find_spec(argv[2]) is not None, line
    else:
      assert os.path.isfile(os.path.join(REPO, argv[1])), line
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is None:
      continue
    config = _load_config(config_path)
    for a in argv:
      if a.startswith("--config."):
        node = config
        for k in a[len("--config."):].split("=", 1)[0].split("."):
          assert k in node, f"{line}: {k!r} is not a key of {config_path}"
          node = node[k]
    for a in argv:
      if a.startswith("--json_out="):
        assert a.split("=", 1)[1].startswith(str(tmp_path))
  bad = _run("gpu_benchmarks.sh", OUT=str(tmp_path), PARTS="gap nope")
  assert bad.returncode == 2 and "unknown part nope" in bad.stdout


def _small_run(tmp_path, parts):
  """``SMALL=1 bash launch/gpu_benchmarks.sh``: the parts run for real, at small sizes
  on this CPU (both frameworks); returns ``{part: rc}`` and the results folder."""
  out = tmp_path / "gpu"
  env = dict(os.environ, OUT=str(out), SMALL="1", PARTS=parts, PYTHON=sys.executable,
             CONTRASTJAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"))
  env.pop("DRY_RUN", None)
  p = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_benchmarks.sh")], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=1500, check=False)
  log = (out / "gpu_benchmarks.log").read_text()
  assert p.returncode == 0, p.stdout + log[-5000:]
  rcs = {}
  for line in p.stdout.splitlines():
    if line.startswith("=== ") and " rc=" in line:
      name, rc = line.split()[1], line.split(" rc=")[1].split()[0]
      rcs[name] = int(rc)
  assert rcs == {name: 0 for name in parts.split()}, log[-8000:]
  return out, log


JSON_OF = {"gap": "gap.json", "mit_b5": "mit_b5.json", "condseg": "condseg.json",
           "siamseg_f32": "siamseg_b5_f32.json",
           "siamseg_bf16_remat": "siamseg_b5_bf16_remat.json", "clip": "clip_f32.json",
           "apc": "apc_f32.json", "apc_bf16": "apc_bf16.json"}


def _check_small_results(out, parts):
  for part in parts.split():
    result = json.loads((out / JSON_OF[part]).read_text())
    if part in ("gap", "mit_b5"):
      continue
    j = result["jax"]
    assert j["step_s_median"] > 0 and j["xla_gflops_per_step"] > 0, part
    assert "mfu" not in j  # no known peak on a CPU
    if part != "condseg":   # both frameworks, the same first loss
      t = result["torch"]
      assert t["step_s_median"] > 0 and result["ratio_jax_over_torch"] > 0, part
      assert result["compilation_cache"], part


@pytest.mark.slow
def test_gpu_benchmarks_small_dry_run_on_cpu(tmp_path):
  """The GPU script's CLIP part runs end to end at a small size on this CPU (every
  part: ``test_gpu_benchmarks_small_dry_run_every_part``, heavy)."""
  parts = "clip"
  out, _ = _small_run(tmp_path, parts)
  _check_small_results(out, parts)


@pytest.mark.heavy
def test_gpu_benchmarks_small_dry_run_every_part(tmp_path):
  out, log = _small_run(tmp_path, ALL_PARTS)
  _check_small_results(out, ALL_PARTS)
  assert "no third_party/ConDSeg checkout" in log
