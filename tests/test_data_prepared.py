"""Prepared datasets (TFDS ArrayRecord, contrastjax.data.prepared): written and read without
TensorFlow, they yield exactly the folder readers' examples (values, dtypes, types, order)
and the same training and evaluation batches; bad sources and mismatched configs are named."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from _repo import REPO
from contrastjax.data import builder
from contrastjax.data import prepared
from contrastjax.data.errors import DatasetError
from contrastjax.data.prepare import prepare_from_config
from contrastjax.errors import ConfigError
from contrastjax.data.tools import isprs_tiles
from test_clip_cifar import write_cifar
from test_clip_data import _coco
from test_data_isprs import CROP, STRIDE, make_potsdam, make_vaihingen
from test_data_loveda import make_loveda
from test_data_medseg import make_dataset
from test_data_voc import make_voc
from test_pins_methods import _config


class _ListSource:
  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


def _every_kind(i: int) -> dict:
  rng = np.random.default_rng(i)
  h, w = 5 + i, 7 + 2 * i   # sizes differ per example
  return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
          "rgba": rng.integers(0, 256, (h, w, 4), dtype=np.uint8),
          "mask": rng.integers(0, 256, (h, w), dtype=np.uint8),
          "labels": rng.random(20).astype(np.float32),
          "counts": rng.integers(-5, 5, (2, 3)).astype(np.int32),
          "name": f"id_{i} ü",
          "captions": [f"caption {j} of {i} – ü" for j in range(i % 3)],   # [] for i = 0
          "index": i, "weight": 0.5 * i, "flag": bool(i % 2),
          "label": np.int32(i), "score": np.float32(i / 3)}


def _assert_same_example(a: dict, b: dict, where: str) -> None:
  assert sorted(a) == sorted(b), where
  for k in a:
    if isinstance(a[k], dict):   # SiamSeg's pairs: {'source': {...}, 'target': {...}}
      _assert_same_example(a[k], b[k], f"{where}.{k}")
    elif isinstance(a[k], np.ndarray):
      assert isinstance(b[k], np.ndarray), (where, k)
      assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), (where, k)
      assert np.array_equal(a[k], b[k]), (where, k)
    else:
      assert type(a[k]) is type(b[k]) and a[k] == b[k], (where, k, a[k], b[k])


def test_every_kind_round_trips_exactly_without_tensorflow(tmp_path):
  # Splits with different keys (VOC's train_aug has no masks; its eval splits do).
  no_mask = [{k: v for k, v in _every_kind(i).items() if k not in ("mask", "captions")}
             for i in range(20, 23)]
  sources = {"train": _ListSource([_every_kind(i) for i in range(4)]),
             "val": _ListSource([_every_kind(i) for i in range(10, 12)]),
             "no_mask": _ListSource(no_mask)}
  summary = prepared.prepare("kinds", sources, str(tmp_path), progress=False,
                             content={"n": 4})
  assert not summary.reused and summary.examples == {"train": 4, "val": 2, "no_mask": 3}
  assert summary.shards["train"] >= 1 and summary.bytes["train"] > 0
  got = prepared.open_splits(summary.path)
  assert sorted(got) == ["no_mask", "train", "val"]
  for split, src in sources.items():
    assert len(got[split]) == len(src)
    for i in range(len(src)):
      _assert_same_example(src[i], got[split][i], f"{split}[{i}]")
    _assert_same_example(src[-1], got[split][-1], f"{split}[-1]")
  with pytest.raises(IndexError):
    got["val"][2]
  assert "tensorflow" not in sys.modules
  # Picklable for grain's worker processes; reopens its files lazily.
  import pickle  # pylint: disable=g-import-not-at-top
  _assert_same_example(sources["val"][1], pickle.loads(pickle.dumps(got["val"]))[1], "pickled")


def test_prepare_is_idempotent_and_overwrite_rewrites(tmp_path):
  sources = {"train": _ListSource([_every_kind(i) for i in range(3)])}
  first = prepared.prepare("idem", sources, str(tmp_path), progress=False)
  assert os.listdir(tmp_path) == ["idem"]   # nothing beside the dataset (no downloads/)
  files = {p: p.stat().st_mtime_ns for p in pathlib.Path(first.path).iterdir()}
  again = prepared.prepare("idem", sources, str(tmp_path), progress=False)
  assert again.reused and again.examples == first.examples
  assert {p: p.stat().st_mtime_ns for p in pathlib.Path(first.path).iterdir()} == files
  assert "already prepared" in again.lines()[0]
  sources = {"train": _ListSource([_every_kind(i) for i in range(5)])}
  redone = prepared.prepare("idem", sources, str(tmp_path), overwrite=True, progress=False)
  assert not redone.reused and redone.examples == {"train": 5}


class _BadAt(_ListSource):
  def __init__(self, examples, bad):
    super().__init__(examples)
    self.bad = bad

  def __getitem__(self, i):
    if i in self.bad:
      raise DatasetError(f"cannot decode image file /data/img_{i}.png (truncated)",
                         path=f"/data/img_{i}.png")
    return super().__getitem__(i)


def test_bad_source_files_are_all_named_and_nothing_is_written(tmp_path):
  sources = {"train": _BadAt([_every_kind(i) for i in range(6)], bad={0, 4}),
             "val": _BadAt([_every_kind(7), _every_kind(8)], bad={1})}
  with pytest.raises(DatasetError) as e:
    prepared.prepare("bad", sources, str(tmp_path), progress=False)
  text = str(e.value)
  assert "dataset 'bad': 3 bad example(s); nothing was written" in text
  assert "train[0]: cannot decode image file /data/img_0.png" in text
  assert "train[4]: cannot decode image file /data/img_4.png" in text
  assert "val[1]: cannot decode image file /data/img_1.png" in text
  assert not (tmp_path / "bad" / prepared.VERSION / "dataset_info.json").exists()
  # Fixed, the same call prepares it (TFDS's incomplete folder of the failed try is not in
  # the way).
  sources["train"].bad = sources["val"].bad = set()
  assert prepared.prepare("bad", sources, str(tmp_path), progress=False).examples == {
      "train": 6, "val": 2}
  # A split without one readable example: still every bad example of every split.
  with pytest.raises(DatasetError, match=r"2 bad example\(s\); nothing was written. "
                                         r"Each:\n  a\[1\]: .*\n  b\[0\]: "):
    prepared.prepare("none", {"a": _BadAt([_every_kind(0), _every_kind(1)], bad={1}),
                              "b": _BadAt([_every_kind(0)], bad={0})}, str(tmp_path),
                     progress=False)


def test_examples_of_another_shape_are_named(tmp_path):
  other = dict(_every_kind(1))
  del other["flag"]
  with pytest.raises(DatasetError, match=r"split 'train' example 1 has keys .* split's "
                                         r"first example had"):
    prepared.prepare("shape", {"train": _ListSource([_every_kind(0), other])},
                     str(tmp_path), progress=False)
  other = dict(_every_kind(1), labels=np.zeros(3, np.float32))
  with pytest.raises(DatasetError, match=r"key 'labels' is .*'shape': \[3\].* first example "
                                         r"had .*'shape': \[20\]"):
    prepared.prepare("shape2", {"train": _ListSource([_every_kind(0), other])},
                     str(tmp_path), progress=False)
  with pytest.raises(DatasetError, match="split\\(s\\) \\['val'\\] are empty"):
    prepared.prepare("empty", {"train": _ListSource([_every_kind(0)]),
                               "val": _ListSource([])}, str(tmp_path), progress=False)
  with pytest.raises(DatasetError, match=r"key 'labels' is .*'shape': \[3\].* in split "
                                         r"'val' but .*'shape': \[20\].* in an earlier"):
    prepared.prepare("shape3", {"train": _ListSource([_every_kind(0)]),
                                "val": _ListSource([other])}, str(tmp_path), progress=False)
  with pytest.raises(DatasetError, match="key 'x' holds a dict"):
    prepared.kind_of("x", {"a": 1})


# ------------------------------------------------------------------ per dataset, per method
def _medseg(tmp_path):
  c = _config("condseg_kvasir.py", None)
  c.data.root = str(make_dataset(tmp_path))
  c.data.binarize = "auto"   # the fixture mixes 0/255 masks with GlaS-like 0..3 labels
  return c


def _voc(tmp_path):
  c = _config("apc_voc.py", None)
  c.data.root = str(make_voc(tmp_path))
  return c


def _polyps_demo(tmp_path):
  del tmp_path
  c = _config("condseg_kvasir.py", "demo")
  c.data.num_train, c.data.num_val, c.data.num_test = 24, 8, 0
  return c


def _scenes_demo(tmp_path):
  del tmp_path
  c = _config("apc_voc.py", "demo")
  c.data.num_train, c.data.num_train_eval, c.data.num_val = 24, 8, 8
  return c


def _loveda(tmp_path):
  c = _config("siamseg_loveda.py", None)
  c.data.root = str(make_loveda(tmp_path / "LoveDA"))
  return c


def _isprs(tmp_path):
  make_potsdam(tmp_path / "raw_p")
  make_vaihingen(tmp_path / "raw_v")
  data = tmp_path / "data"
  for name, raw, ds in (("Potsdam_IRRG_DA", "raw_p", "potsdam"),
                        ("Vaihingen_IRRG_DA", "raw_v", "vaihingen")):
    isprs_tiles.tile_dataset(str(tmp_path / raw), str(data / name), ds, crop=CROP,
                             stride=STRIDE, log=lambda s: None)
  c = _config("siamseg_potsdam_vaihingen.py", None)
  c.data.root = str(data)
  c.data.img_scale, c.data.crop_size = (CROP, CROP), (CROP, CROP)
  return c


def _aerial_demo(tmp_path):
  del tmp_path
  c = _config("siamseg_loveda.py", "demo")
  c.data.num_train, c.data.num_val = 8, 4
  return c


def _coco_captions(tmp_path):
  root = tmp_path / "coco"
  _coco(str(root), "train", n_images=5)
  _coco(str(root), "val", n_images=3)
  write_cifar(str(tmp_path / "cifar"), n_train=8, n_test=6)
  c = _config("clip_gap_coco.py", None)
  c.data.root = str(root)
  c.data.cifar10_root = str(tmp_path / "cifar")   # zero-shot and probe splits, stored too
  c.data.image_size = 32
  return c


def _pairs_demo(tmp_path):
  del tmp_path
  c = _config("clip_gap_coco.py", "demo")
  c.data.num_train, c.data.num_val = 24, 8
  return c


def _batches(config, n=3):
  inputs = builder.build(config, local_batch_size=4, local_eval_batch_size=4)
  it = iter(inputs.train)
  train = [next(it) for _ in range(n)]
  evals = {s: list(inputs.eval_batches(s)) for s in inputs.spec.sources if s != "train"
           and s != config.data.get("train_split", "train")}
  return inputs.spec, train, evals


@pytest.mark.parametrize("make", [_medseg, _voc, _loveda, _isprs, _coco_captions,
                                  _polyps_demo, _scenes_demo, _aerial_demo, _pairs_demo],
                         ids=["medseg", "voc", "loveda", "isprs", "coco_captions",
                              "synthetic_polyps", "synthetic_scenes", "synthetic_aerial",
                              "synthetic_pairs"])
def test_prepared_dataset_yields_the_folder_readers_examples_and_batches(tmp_path, make):
  config = make(tmp_path)
  summary = prepare_from_config(config.copy_and_resolve_references(), str(tmp_path / "tfds"),
                                progress=False)
  folder = config.copy_and_resolve_references()
  tfds_cfg = config.copy_and_resolve_references()
  tfds_cfg.data.format, tfds_cfg.data.tfds_dir = "tfds", str(tmp_path / "tfds")
  tfds_cfg.data.root = str(tmp_path / "moved_away")   # not read in tfds mode
  spec_f, train_f, evals_f = _batches(folder)
  spec_t, train_t, evals_t = _batches(tfds_cfg)
  stored_f = spec_f.prepare_sources or spec_f.sources
  stored_t = spec_t.prepare_sources or spec_t.sources
  assert sorted(stored_f) == sorted(stored_t) == sorted(summary.examples)
  for split, src in stored_f.items():
    assert isinstance(stored_t[split], prepared.PreparedSource)
    assert len(stored_t[split]) == len(src) == summary.examples[split]
    for i in range(len(src)):
      _assert_same_example(src[i], stored_t[split][i], f"{split}[{i}]")
  assert sorted(spec_f.sources) == sorted(spec_t.sources)
  for split, src in spec_f.sources.items():   # SiamSeg's train split: the pairs
    assert len(spec_t.sources[split]) == len(src)
    for i in sorted({0, len(src) // 2, len(src) - 1}):
      _assert_same_example(src[i], spec_t.sources[split][i], f"{split}[{i}]")
  for a, b in zip(jax.tree.leaves((train_f, evals_f)), jax.tree.leaves((train_t, evals_t))):
    assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
  assert len(jax.tree.leaves(train_f)) == len(jax.tree.leaves(train_t)) > 0
  meta = prepared.read_metadata(summary.path)
  if spec_f.info is not None:
    assert meta[prepared.INFO]["classes"] == list(spec_f.info.classes)
  assert meta[prepared.CONTENT] == json.loads(json.dumps(spec_f.content))
  assert "tensorflow" not in sys.modules


def test_reading_under_another_content_or_no_dataset_is_named(tmp_path):
  config = _polyps_demo(tmp_path)
  out = str(tmp_path / "tfds")
  prepare_from_config(config.copy_and_resolve_references(), out, progress=False)
  config.data.format, config.data.tfds_dir = "tfds", out
  config.data.num_train = 25
  with pytest.raises(DatasetError, match=r"prepared with num_train=24, but this run's "
                                         r"config.data gives 25: it holds other examples"):
    builder.make_spec(config)
  config.data.num_train = 24
  config.data.tfds_dir = str(tmp_path / "nothing_here")
  with pytest.raises(DatasetError, match=r"nothing_here/synthetic_polyps/1.0.0 is not a "
                                         r"prepared dataset"):
    builder.make_spec(config)
  config.data.tfds_dir = ""
  with pytest.raises(DatasetError, match="needs config.data.tfds_dir"):
    builder.make_spec(config)
  config.data.format = "arrayrecord"
  with pytest.raises(ConfigError, match="config.data.format='arrayrecord': expected "
                                        "'folder' or 'tfds'"):
    builder.make_spec(config)
  # The dataset's own folder works as tfds_dir too.
  config.data.format = "tfds"
  config.data.tfds_dir = prepared.dataset_dir(out, "synthetic_polyps")
  assert len(builder.make_spec(config).sources["train"]) == 24


def _cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_prepare_command_line(tmp_path):
  """The documented command: prepare from a folder, a summary, a rerun that keeps it, and
  bad input as one line with the documented exit status."""
  root = make_dataset(tmp_path)
  out = tmp_path / "prepared"
  args = ["-m", "contrastjax.data.prepare", "--config=configs/condseg_kvasir.py",
          "--config.data.binarize=auto", f"--source={root}", f"--out={out}",
          "--noprogress"]
  r = _cli(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"prepared {out}/medseg/1.0.0" in r.stdout
  assert "train" in r.stdout and "3 examples" in r.stdout
  assert "--config.data.format=tfds --config.data.tfds_dir=" in r.stderr
  r = _cli(*args)
  assert r.returncode == 0 and "already prepared" in r.stdout, r.stderr[-3000:]
  (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
  r = _cli(*args[:-1], f"--out={tmp_path / 'other'}", "--noprogress")
  assert r.returncode == 4, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "nothing was written" in r.stderr
  assert r.stderr.count("images/b.png") >= 2   # b is in train and val: both named
  r = _cli(*args[:2], f"--out={out}")
  assert r.returncode == 2 and "--config is required" in r.stderr


class _FileBacked(_ListSource):
  """Examples whose 'image' comes from a file (as the folder readers' do)."""

  def __init__(self, examples, files):
    super().__init__(examples)
    self.files = files

  def encoded_files(self, i):
    return {"image": self.files[i]}


def test_source_files_are_stored_as_they_are_when_they_decode_exactly(tmp_path):
  """A JPEG stays the same JPEG bytes in the copy (as small as the folder, no re-encoding);
  a file that does not decode to the example's array (here: another image) is not used,
  the array is stored losslessly instead. Either way the example reads back exactly."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  arrays, files = [], []
  for i in range(3):
    a = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = tmp_path / f"{i}.jpg"
    Image.fromarray(a).save(path, quality=80)
    arrays.append(np.asarray(Image.open(path).convert("RGB")))   # the reader's decode
    files.append(str(path))
  examples = [{"image": arrays[0]}, {"image": arrays[1]},
              {"image": arrays[2] // 2}]   # not what its file decodes to
  summary = prepared.prepare("files", {"train": _FileBacked(examples, files)},
                             str(tmp_path / "out"), progress=False)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  raw = tfds.builder_from_directory(summary.path).as_data_source("train")
  assert raw[0]["image"] == pathlib.Path(files[0]).read_bytes()
  assert raw[1]["image"] == pathlib.Path(files[1]).read_bytes()
  assert raw[2]["image"] != pathlib.Path(files[2]).read_bytes()
  assert raw[2]["image"].startswith(b"\x89PNG")
  got = prepared.open_splits(summary.path)["train"]
  for i, ex in enumerate(examples):
    _assert_same_example(ex, got[i], f"train[{i}]")
