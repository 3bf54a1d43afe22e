"""``--workdir=gs://bucket/run``: the path stays a URL (it used to become
``<cwd>/gs:/bucket/run``) and everything the trainer writes besides checkpoints goes through
``etils.epath``. The bucket is simulated by fsspec's in-memory filesystem registered for
``gs://``: epath reaches Google Cloud Storage through fsspec. (Orbax writes checkpoint
arrays through tensorstore's own GCS driver, which needs the network: that part cannot be
simulated here and runs on a TPU VM.)"""
import json
import os

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import ml_collections
import numpy as np
import pytest

from contrastjax import checkpoint as ckpt_lib
from contrastjax import loop
from contrastjax import metric_writer
from contrastjax import visualize
from contrastjax import workdir as workdir_lib


class _Bucket(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""


@pytest.fixture
def bucket(monkeypatch):
  registry = dict(fsspec.registry)
  for proto in ("gs", "gcs"):
    fsspec.register_implementation(proto, _Bucket, clobber=True)
  _Bucket.store.clear()
  yield _Bucket.store
  _Bucket.store.clear()
  for proto in ("gs", "gcs"):
    if proto in registry:
      fsspec.register_implementation(proto, registry[proto], clobber=True)


def test_remote_paths_are_not_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir_lib.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert workdir_lib.resolve("runs/x") == os.path.join(str(tmp_path), "runs", "x")
  assert workdir_lib.is_remote("gs://b/x") and not workdir_lib.is_remote("/a/gs:/b")
  lock = workdir_lib.WorkdirLock("gs://bucket/run")
  lock.acquire()  # not lockable: logged, nothing written, no local folder made
  lock.release()
  assert not os.path.exists(tmp_path / "gs:")


def test_metrics_config_curves_and_samples_written_to_a_bucket(bucket):
  run = "gs://bucket/run"
  w = metric_writer.MetricWriter(run, tensorboard=False)
  w.write_config(ml_collections.ConfigDict(dict(method="toy", lr=0.1)))
  for step, loss in ((2, 1.0), (4, 0.5), (6, 0.25)):
    w.write_scalars(step, {"train/loss": loss})
  w.write_scalars(6, {"val/mIoU": 0.5})
  w.close()
  assert json.loads(bucket["gs://bucket/run/config.json"].getvalue())["lr"] == 0.1
  assert [r["step"] for r in metric_writer.read_metrics(run)] == [2, 4, 6]
  # a resume from step 4 drops the later records (replayed), on the bucket too
  w = metric_writer.MetricWriter(run, tensorboard=False, resume_step=4)
  w.write_scalars(6, {"train/loss": 0.3})
  assert [(r["step"], r["train/loss"]) for r in metric_writer.read_metrics(run)] == [
      (2, 1.0), (4, 0.5), (6, 0.3)]
  visualize.plot_curves(run + "/metrics.jsonl", run + "/curves.png")
  assert bucket["gs://bucket/run/curves.png"].getvalue()[:4] == b"\x89PNG"

  class Ev:
    def run(self):
      yield "val/mIoU", 0.7

    def pictures(self):
      return {"samples": np.zeros((4, 6, 3), np.uint8)}

  results = loop.Evaluations({"val": Ev()}, {}, w, run + "/samples").run(8, 8)
  assert results["val/mIoU"] == 0.7
  assert bucket["gs://bucket/run/samples/val_00000008.png"].getvalue()[:4] == b"\x89PNG"


def test_evaluate_on_a_missing_bucket_path_is_a_named_error(bucket):
  with pytest.raises(workdir_lib.WorkdirNotFoundError,
                     match="gs://bucket/nope does not exist"):
    ckpt_lib.Checkpointer("gs://bucket/nope", create=False)
  assert not any(k.startswith("gs://bucket/nope") for k in bucket)
