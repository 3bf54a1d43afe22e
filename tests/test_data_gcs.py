"""A prepared dataset in a ``gs://`` bucket, end to end: ``python -m contrastjax.data.prepare
--out=gs://...`` uploads it, and ``python -m contrastjax.train`` trains from
``--config.data.tfds_dir=gs://...`` exactly as from the generator.

The bucket is a local GCS emulator (``gcp-storage-emulator``, in the test extra): the JSON
files go through ``etils.epath`` and gcsfs (``STORAGE_EMULATOR_HOST``), the ArrayRecord
shards through array_record's own C++ GCS client (``CLOUD_STORAGE_EMULATOR_ENDPOINT``); the
same two paths a TPU VM uses against the real service. Each command runs in a subprocess
with those variables set."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from _harness import env as harness_env, eval_rows, train_rows
from _repo import REPO

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

# The CLIP demo: a small step to compile, every input a stored array.
_FLAGS = ["--config.data.num_train=64", "--config.data.num_val=16",
          "--config.data.num_zeroshot=8", "--config.batch_size=16",
          "--config.eval_batch_size=16", "--config.total_steps=4",
          "--config.eval_every_steps=4", "--config.ckpt_every_steps=4",
          "--config.log_every_steps=1", "--config.progress_bar=False",
          "--config.evals.val.gap_pairs=16"]
_CONFIG = os.path.join(REPO, "configs", "clip_gap_coco.py") + ":demo"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def gcs_env(tmp_path):
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path / "emulator.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start",
                           "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                          stdout=log, stderr=subprocess.STDOUT)
  try:
    for _ in range(200):
      try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        break
      except OSError:
        time.sleep(0.05)
    else:
      pytest.fail("the GCS emulator did not start: " + (tmp_path / "emulator.log").read_text())
    env = harness_env(
        STORAGE_EMULATOR_HOST=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
        # gcsfs's probe for hierarchical buckets speaks gRPC, which the emulator does not
        # (60 s timeouts per bucket); the real service answers it.
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        CONTRASTJAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"))
    r = subprocess.run([sys.executable, "-c",
                        "import gcsfs; gcsfs.GCSFileSystem(token='anon').mkdir('bucket')"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    yield env
  finally:
    proc.kill()
    proc.wait()
    log.close()


def _run(env, *args, timeout=900):
  r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-4000:]
  return r


@pytest.mark.slow  # two CLIP demo runs and two preparations, ~1 min
def test_prepare_to_a_bucket_and_train_from_it(gcs_env, tmp_path):
  out = "gs://bucket/prepared"
  r = _run(gcs_env, "-m", "contrastjax.data.prepare", f"--config={_CONFIG}", f"--out={out}",
           "--noprogress", *_FLAGS)
  assert f"prepared {out}/synthetic_pairs/1.0.0" in r.stdout, r.stdout
  r = _run(gcs_env, "-m", "contrastjax.data.prepare", f"--config={_CONFIG}", f"--out={out}",
           "--noprogress", *_FLAGS)
  assert "already prepared" in r.stdout, r.stdout
  local, remote = tmp_path / "local", tmp_path / "remote"
  _run(gcs_env, "-m", "contrastjax.train", f"--config={_CONFIG}", f"--workdir={local}",
       *_FLAGS)
  _run(gcs_env, "-m", "contrastjax.train", f"--config={_CONFIG}", f"--workdir={remote}",
       "--config.data.format=tfds", f"--config.data.tfds_dir={out}", *_FLAGS)
  rows = train_rows(remote)
  assert [s for s, _ in rows] == [1, 2, 3, 4]
  assert rows == train_rows(local)            # every loss term and norm, bitwise
  assert eval_rows(remote) == eval_rows(local) and eval_rows(local)
