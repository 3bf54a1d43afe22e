r"""Input-pipeline throughput: folder reader against the prepared TFDS ArrayRecord copy.

  python -m contrastjax.data.benchmark --config=configs/condseg_kvasir.py \
      --source=/data/Kvasir-SEG [--workers=0,2] [--batches=30]

times the training pipeline alone (read, decode, the host transforms of the config,
batching; no model) in examples per second, for each format and each number of grain
worker processes, on the config's own batch size and resolution. Without a dataset,
``--stand_in=N`` writes ``N`` stand-in examples of the dataset's native size in its official
layout (smooth random images, JPEG/PNG as the real files) to a temporary folder and
measures on them. The prepared copy is made in a temporary folder (``--tfds_dir`` reuses
one), and its preparation rate is reported too.

Per core: examples per CPU second, the CPU time of this process (its grain read threads
included) and of its worker processes summed over the timed batches; on a machine whose
cores are all busy it is the rate each core adds. A JSON line per measurement goes to
``--results``.

Each measurement first takes, untimed, the batches that start-up and read-ahead have made
ready (up to 6 per producing process), then times ``--batches`` in steady state, where
every batch is made while it is waited for. Use ``--config.batch_size=`` to shorten the
runs: the per-example rates do not depend on it.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
import numpy as np

from contrastjax import cli
from contrastjax.data import builder


# ------------------------------------------------------------------------------ stand-ins
def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A photo-like uint8 RGB image: low-frequency colour fields plus mild noise (random
  noise alone would make every codec's worst case)."""
  small = rng.uniform(0, 255, (max(2, h // 32), max(2, w // 32), 3))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  big = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BILINEAR),
                   dtype=np.float32)
  return np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)


def _blob_mask(rng: np.random.Generator, h: int, w: int, values=(0, 255)) -> np.ndarray:
  yy, xx = np.mgrid[:h, :w]
  out = np.full((h, w), values[0], np.uint8)
  for v in values[1:]:
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    r = rng.uniform(0.1, 0.3) * min(h, w)
    out[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = v
  return out


def _save(path: str, array: np.ndarray, **kw) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kw)


def stand_in_medseg(root: str, n: int, seed: int = 0, size=(529, 622)) -> None:
  """Kvasir-SEG's layout and sizes (JPEG images and masks, ~622x529)."""
  rng = np.random.default_rng(seed)
  names = [f"s{i:05d}" for i in range(n)]
  for name in names:
    _save(f"{root}/images/{name}.jpg", _smooth_image(rng, *size), quality=90)
    _save(f"{root}/masks/{name}.jpg", _blob_mask(rng, *size), quality=90)
  k = max(1, n // 10)
  with open(f"{root}/train.txt", "w") as f:
    f.write("\n".join(names[k:] or names) + "\n")
  with open(f"{root}/val.txt", "w") as f:
    f.write("\n".join(names[:k]) + "\n")


def stand_in_loveda(root: str, n: int, seed: int = 0, size=(1024, 1024)) -> None:
  """LoveDA's layout and sizes (1024x1024 PNG images and masks, both domains)."""
  rng = np.random.default_rng(seed)
  k = 0
  for split, count in (("Train", n), ("Val", max(1, n // 4))):
    for domain in ("Rural", "Urban"):
      for _ in range(count):
        _save(f"{root}/{split}/{domain}/images_png/{k}.png", _smooth_image(rng, *size))
        _save(f"{root}/{split}/{domain}/masks_png/{k}.png",
              _blob_mask(rng, *size, values=(1, 2, 3, 4, 5, 6, 7)))
        k += 1


def stand_in_voc(root: str, n: int, seed: int = 0, size=(375, 500)) -> None:
  """VOC 2012 + SBD's layout and sizes (~500x375 JPEG, class-index PNG masks, ToCo's
  image-level label file)."""
  rng = np.random.default_rng(seed)
  base = f"{root}/VOCdevkit/VOC2012"
  names = [f"2007_{i:06d}" for i in range(n)]
  labels = {}
  for name in names:
    _save(f"{base}/JPEGImages/{name}.jpg", _smooth_image(rng, *size), quality=90)
    classes = sorted(rng.choice(np.arange(1, 21), size=2, replace=False).tolist())
    mask = _blob_mask(rng, *size, values=(0, *classes))
    _save(f"{base}/SegmentationClassAug/{name}.png", mask)
    _save(f"{base}/SegmentationClass/{name}.png", mask)
    onehot = np.zeros(20, np.float32)
    onehot[np.unique(mask[mask > 0]) - 1] = 1
    labels[name] = onehot
  os.makedirs(f"{base}/ImageSets/Segmentation", exist_ok=True)
  k = max(1, n // 10)
  for split, ids in (("train_aug", names[k:] or names), ("train", names[:k]),
                     ("val", names[:k])):
    with open(f"{base}/ImageSets/Segmentation/{split}.txt", "w") as f:
      f.write("\n".join(ids) + "\n")
  np.save(f"{base}/cls_labels_onehot.npy", labels)


#: ``config.data.name`` -> stand-in writer.
STAND_INS: dict[str, Callable[..., None]] = {
    "medseg": stand_in_medseg, "loveda": stand_in_loveda, "voc": stand_in_voc}


# ------------------------------------------------------------------------------ measuring
def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its live children (grain workers)."""
  import psutil  # pylint: disable=g-import-not-at-top
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


#: Batches a pipeline may hold ready per producing process: the read threads' prefetch
#: (``pipeline.train_dataset``: 4) plus a worker's output buffer (2).
AHEAD_PER_PROCESS = 6


def measure(config, *, batches: int, warmup: int | None = None) -> dict[str, float]:
  """Examples per second of ``config``'s training pipeline (``config.data.worker_count``
  worker processes), in steady state.

  The consumer here does no work, so once the batches produced ahead during start-up are
  taken, every ``next`` waits for a batch being made: ``warmup`` (default: start-up plus
  all that can be ready ahead, :data:`AHEAD_PER_PROCESS` per producing process) batches are
  taken untimed, then ``batches`` are timed."""
  per_batch = int(config.batch_size)
  workers = int(config.data.get("worker_count", 0))
  if warmup is None:
    warmup = 2 + AHEAD_PER_PROCESS * max(1, workers)
  inputs = builder.build(config, local_batch_size=per_batch, local_eval_batch_size=per_batch)
  it = iter(inputs.train)
  for _ in range(warmup):
    next(it)
  t0, c0 = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    next(it)
  seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  n = batches * per_batch
  return {"examples_per_s": n / seconds, "examples_per_cpu_s": n / max(cpu, 1e-9),
          "cpu_s": cpu, "seconds": seconds, "batches": batches, "batch_size": per_batch,
          "warmup": warmup}


def run(config, *, formats=("folder", "tfds"), workers=(0,), batches: int = 30,
        tfds_dir: str = "", stand_in: int = 0, log=print) -> list[dict[str, Any]]:
  """Every (format, workers) measurement of ``config``'s pipeline; see the module doc."""
  rows = []
  with contextlib.ExitStack() as stack:
    dcfg = config.data
    if stand_in:
      name = str(dcfg.name)
      if name not in STAND_INS:
        from contrastjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
        raise ConfigError(f"--stand_in: no stand-in writer for config.data.name={name!r}; "
                          f"have {sorted(STAND_INS)}")
      root = stack.enter_context(tempfile.TemporaryDirectory(prefix="cj_standin_"))
      t0 = time.perf_counter()
      STAND_INS[name](root, stand_in)
      log(f"wrote {stand_in} stand-in examples of {name!r} in {time.perf_counter() - t0:.1f}"
          " s")
      with dcfg.ignore_type():
        dcfg.root = root
    if "tfds" in formats and not tfds_dir:
      tfds_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="cj_prepared_"))
      from contrastjax.data.prepare import prepare_from_config  # pylint: disable=g-import-not-at-top
      t0 = time.perf_counter()
      summary = prepare_from_config(config.copy_and_resolve_references(), tfds_dir,
                                    progress=False)
      seconds = time.perf_counter() - t0
      total = sum(summary.examples.values())
      mib = sum(summary.bytes.values()) / 2**20
      row = {"what": "prepare", "examples": total, "seconds": seconds,
             "examples_per_s": total / seconds, "MiB": mib}
      rows.append(row)
      log(f"prepared {total} examples ({mib:.1f} MiB) in {seconds:.1f} s: "
          f"{total / seconds:.1f} examples/s")
    for fmt in formats:
      for w in workers:
        c = config.copy_and_resolve_references()
        with c.data.ignore_type():
          c.data.format, c.data.tfds_dir, c.data.worker_count = fmt, tfds_dir, int(w)
        row = dict(measure(c, batches=batches), what="pipeline", format=fmt, workers=int(w),
                   dataset=str(dcfg.name))
        rows.append(row)
        log(f"{fmt:7s} workers={w}: {row['examples_per_s']:8.1f} examples/s, "
            f"{row['examples_per_cpu_s']:8.1f} per CPU second")
  return rows


def main(argv):
  from contrastjax.data.prepare import config_from_flags  # pylint: disable=g-import-not-at-top
  config = config_from_flags(argv)
  f = flags.FLAGS
  formats = [s for s in f.formats.split(",") if s]
  bad = sorted(set(formats) - {"folder", "tfds"})
  if bad:
    raise app.UsageError(f"--formats: unknown {bad}; expected folder and/or tfds")
  try:
    workers = [int(w) for w in f.workers.split(",") if w]
  except ValueError:
    raise app.UsageError(f"--workers={f.workers!r}: expected integers, e.g. 0,2") from None
  rows = run(config, formats=formats, workers=workers, batches=f.batches,
             tfds_dir=f.tfds_dir or "", stand_in=f.stand_in)
  if f.results:
    given = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    with open(f.results, "a") as out:
      for row in rows:
        out.write(json.dumps(dict(row, config=given)) + "\n")


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config whose data section is measured.",
                                  lock_config=False)
  flags.DEFINE_string("source", None, "The dataset folder (sets config.data.root).")
  flags.DEFINE_string("formats", "folder,tfds", "Comma-separated: folder, tfds.")
  flags.DEFINE_string("workers", "0", "Comma-separated grain worker counts, e.g. 0,2.")
  flags.DEFINE_integer("batches", 30, "Timed batches per measurement (after 2 warm-up).")
  flags.DEFINE_string("tfds_dir", "", "An existing preparation's --out (else a temporary "
                      "one is made and timed).")
  flags.DEFINE_integer("stand_in", 0, "Write this many stand-in examples in the dataset's "
                       "official layout and measure on them (no dataset needed).")
  flags.DEFINE_string("results", "", "Append one JSON line per measurement to this file.")
  cli.run(main)
