"""Datasets prepared once into TFDS ArrayRecord shards, and read back as random-access sources.

A prepared dataset is a TFDS dataset (``file_format='array_record'``) written from a dataset
maker's own sources (``contrastjax.data.builder``), so it holds exactly the examples the folder
readers yield: the same keys, values, dtypes and order, split by split. Reading it back gives
a :class:`PreparedSource` per split, a drop-in for the folder source in the same grain
pipeline (per-process sharding, seeded shuffling, checkpointable iterator state).

No TensorFlow is involved, on either side:

* writing: a :class:`tfds.core.GeneratorBasedBuilder` made per dataset, fed images as
  encoded bytes (TFDS would encode numpy images with TensorFlow); the example protos and the
  ArrayRecord files need no TensorFlow;
* reading: ``tfds.builder_from_directory(...).as_data_source(split)``; the image bytes are
  decoded here with Pillow (:func:`decode_pixels`), as the folder readers decode.

How each example key is stored (inferred from the first example of each split; every later
example of the split must have the same keys and kinds, else the preparation names the
example; splits may have different keys, e.g. VOC's ``train_aug`` has no masks):

=========================================  ==============================================
value in the folder reader's example       stored as
=========================================  ==============================================
uint8 ``[H, W, C]`` (C = 1, 3, 4)          bytes: the source's file when it decodes to
                                           exactly the array (a JPEG stays a JPEG), else
                                           a lossless PNG
uint8 ``[H, W]`` (a mask, a label map)     bytes: a lossless PNG (the reader's mask, after
                                           binarisation or label mapping)
other numpy arrays (e.g. float32 labels)   ``Tensor`` of that shape and dtype
numpy scalars (e.g. ``np.int32`` labels)   ``Tensor`` of shape ``()``, a numpy scalar on read
``str``                                    ``Text`` (UTF-8)
list of ``str`` (e.g. captions)            ``Sequence(Text)``
``int`` / ``float`` / ``bool``             ``Scalar`` int64 / float64 / bool
=========================================  ==============================================

What the keys of each split were (``kinds``), the maker's ``DatasetInfo`` (class names, palette, ignore
label) and the data config that produced it are stored in the dataset's metadata
(``metadata.json``), so a reader needs nothing but the directory.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import io
import json
import os
import sys
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from contrastjax.data.errors import DatasetError

# tensorflow-datasets reads ``DatasetBuilder.code_path`` through ``importlib_resources``, a
# backport it requires only on Python < 3.9; the standard library module serves the same.
sys.modules.setdefault("importlib_resources", importlib.resources)

#: The version every prepared dataset is written under (``<out>/<name>/<VERSION>/``).
VERSION = "1.0.0"
#: Keys of ``metadata.json``.
KINDS, INFO, CONTENT, DATA_CONFIG = ("contrastjax_kinds", "contrastjax_info",
                                     "contrastjax_content", "contrastjax_data_config")
#: PNG compression level (0-9). Lossless at every level: it trades file size for the time
#: Pillow spends encoding (the cost of a preparation; level 6, Pillow's default, took
#: ~4x as long on 256x256 masks, 10 ms against 2.2 ms).
PNG_LEVEL = 1


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


# ---------------------------------------------------------------------------------- kinds
def kind_of(key: str, value: Any) -> dict[str, Any]:
  """How ``value`` (one example's ``key``) is stored; see the module docstring."""
  if isinstance(value, np.ndarray):
    if value.dtype == np.uint8 and value.ndim == 2:
      return {"kind": "mask"}
    if value.dtype == np.uint8 and value.ndim == 3 and value.shape[-1] in (1, 3, 4):
      return {"kind": "image", "channels": int(value.shape[-1])}
    if value.dtype == object:
      raise DatasetError(f"example key {key!r} holds an object array; expected numbers, "
                         "a string or a list of strings")
    return {"kind": "tensor", "shape": list(value.shape), "dtype": value.dtype.name}
  if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
    return {"kind": "tensor", "shape": [], "dtype": value.dtype.name, "scalar": True}
  if isinstance(value, str):
    return {"kind": "text"}
  if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return {"kind": "texts"}
  if isinstance(value, bool):
    return {"kind": "bool"}
  if isinstance(value, int):
    return {"kind": "int"}
  if isinstance(value, float):
    return {"kind": "float"}
  raise DatasetError(f"example key {key!r} holds a {type(value).__name__}; a prepared "
                     "dataset stores uint8 images and masks, numeric arrays, strings, lists "
                     "of strings and numbers")


def _feature(kind: Mapping[str, Any]):
  tfds = _tfds()
  k = kind["kind"]
  if k in ("image", "mask"):
    # Encoded bytes (the source's own file, or PNG), decoded by :func:`decode_pixels`, not
    # by TFDS (which may pick OpenCV over Pillow, another JPEG decoder).
    return tfds.features.Tensor(shape=(), dtype=np.object_)
  if k == "tensor":
    return tfds.features.Tensor(shape=tuple(kind["shape"]), dtype=np.dtype(kind["dtype"]))
  if k == "text":
    return tfds.features.Text()
  if k == "texts":
    return tfds.features.Sequence(tfds.features.Text())
  return tfds.features.Scalar(dtype={"int": np.int64, "float": np.float64,
                                     "bool": np.bool_}[k])


def decode_pixels(data: bytes, kind: Mapping[str, Any]) -> np.ndarray:
  """Stored image bytes back to the array, with Pillow as the folder readers decode:
  RGB images converted from other modes (grayscale or CMYK JPEGs), masks as stored."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    if kind["kind"] == "image" and kind["channels"] == 3 and im.mode != "RGB":
      im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _stored_pixels(array: np.ndarray, kind: Mapping[str, Any], path: str | None) -> bytes:
  """The bytes stored for an image: the source file itself when it decodes to exactly
  ``array`` (a JPEG stays a JPEG: the copy is as small as the folder, and as fast to
  decode), else a lossless PNG of ``array``."""
  if path is not None:
    from etils import epath  # pylint: disable=g-import-not-at-top
    data = epath.Path(path).read_bytes()
    try:
      same = np.array_equal(decode_pixels(data, kind), array)
    except Exception:  # pylint: disable=broad-except  (a file Pillow reads otherwise)
      same = False
    if same:
      return data
  return _png(array)


def _png(array: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG",
                                                    compress_level=PNG_LEVEL)
  return buf.getvalue()


def _placeholder(kind: Mapping[str, Any]) -> Any:
  """The value stored for a key that a split's examples do not have (another split's do:
  TFDS keeps one feature set per dataset); :func:`decode` leaves it out."""
  k = kind["kind"]
  if k == "image":
    return _png(np.zeros((1, 1, kind["channels"]), np.uint8))
  if k == "mask":
    return _png(np.zeros((1, 1), np.uint8))
  if k == "tensor":
    return np.zeros(kind["shape"], kind["dtype"])
  return {"text": "", "texts": [], "int": 0, "float": 0.0, "bool": False}[k]


def encode(example: Mapping[str, Any], kinds: Mapping[str, Mapping[str, Any]],
           where: str, features: Mapping[str, Mapping[str, Any]] | None = None,
           files: Mapping[str, str] | None = None) -> dict[str, Any]:
  """One folder-reader example as TFDS feature inputs (images as encoded bytes).
  ``kinds``: its split's keys; ``features``: every split's (placeholders fill the
  others); ``files``: the source files of image keys (``source.encoded_files(i)``), stored
  as they are when they decode to exactly the example's array."""
  if set(example) != set(kinds):
    raise DatasetError(f"{where} has keys {sorted(example)}; the split's first example "
                       f"had {sorted(kinds)} (every example of a split must have the same "
                       "keys)")
  out = {key: _placeholder(kind) for key, kind in (features or {}).items()
         if key not in kinds}
  for key, kind in kinds.items():
    value = example[key]
    got = kind_of(key, value)
    if got != kind:
      raise DatasetError(f"{where}: key {key!r} is {got}; the split's first example had "
                         f"{dict(kind)}")
    if kind["kind"] in ("image", "mask"):
      value = _stored_pixels(value, kind, (files or {}).get(key))
    elif kind["kind"] == "texts":
      value = list(value)
    out[key] = value
  return out


def decode(record: Mapping[str, Any], kinds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """A TFDS record back to the folder reader's example (exact inverse of :func:`encode`)."""
  out = {}
  for key, kind in kinds.items():
    value, k = record[key], kind["kind"]
    if k in ("mask", "image"):
      value = decode_pixels(value, kind)
    elif k == "text":
      value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    elif k == "texts":
      value = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
    elif k == "tensor":
      value = np.asarray(value, dtype=kind["dtype"]).reshape(kind["shape"])
      if kind.get("scalar"):
        value = value[()]   # a numpy scalar, as the reader gave
    elif k == "int":
      value = int(value)
    elif k == "float":
      value = float(value)
    elif k == "bool":
      value = bool(value)
    out[key] = value
  return out


# ---------------------------------------------------------------------------------- write
@dataclasses.dataclass
class Summary:
  """What a preparation wrote (or found already written)."""
  path: str                       # <out>/<name>/<version>
  examples: dict[str, int]        # per split
  bytes: dict[str, int]           # per split, on disk
  shards: dict[str, int]          # per split
  reused: bool                    # True: the dataset was already complete; nothing written

  def lines(self) -> list[str]:
    head = (f"{self.path}: already prepared (nothing written; --overwrite rewrites it)"
            if self.reused else f"prepared {self.path}")
    rows = [f"  {s:12s} {self.examples[s]:8d} examples  {self.bytes[s] / 2**20:9.1f} MiB  "
            f"{self.shards[s]} shard(s)" for s in self.examples]
    return [head, *rows]


def _builder_class(name: str, kinds, features, metadata, split_examples, progress):
  tfds = _tfds()

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"contrastjax prepared dataset {name!r} (contrastjax.data.prepared)",
        features=tfds.features.FeaturesDict({k: _feature(v) for k, v in features.items()}),
        metadata=tfds.core.MetadataDict(metadata),
        # Records keep the folder reader's order: index i of a split is its example i.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in split_examples}

  def _generate_examples(self, split):
    for i, example, files in progress(split, split_examples[split]()):
      yield i, encode(example, kinds[split], f"{name} split {split!r} example {i}",
                      features, files)

  camel = "".join(p.capitalize() for p in name.replace("-", "_").split("_") if p) or "Data"
  cls = type(camel, (tfds.core.GeneratorBasedBuilder,), dict(
      VERSION=tfds.core.Version(VERSION), code_path=None, _info=_info,
      _split_generators=_split_generators, _generate_examples=_generate_examples),
      skip_registration=True)
  cls.name = name
  return cls


def dataset_dir(out: str, name: str) -> str:
  return os.path.join(str(out), name, VERSION)


def _split_stats(path: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
  tfds = _tfds()
  info = tfds.builder_from_directory(path).info
  examples, nbytes, shards = {}, {}, {}
  for split, s in info.splits.items():
    examples[split] = int(s.num_examples)
    nbytes[split] = int(s.num_bytes)
    shards[split] = int(s.num_shards)
  return examples, nbytes, shards


def _iter_checked(source, split: str, errors: list[str]
                  ) -> Iterable[tuple[int, Any, Mapping[str, str]]]:
  """``(index, example, files)`` in order (``files``: ``source.encoded_files(index)``
  where the source has it); a ``DatasetError`` (a bad file) is collected, not raised, so
  that one preparation names every bad file of the split."""
  files_of = getattr(source, "encoded_files", None)
  for i in range(len(source)):
    try:
      example = source[i]
    except DatasetError as e:
      errors.append(f"{split}[{i}]: {e}")
      continue
    yield i, example, (files_of(i) if files_of is not None else {})


def _first_readable(source) -> Mapping[str, Any] | None:
  """The first example of ``source`` that reads (it decides the split's keys); None if
  none does."""
  for i in range(len(source)):
    try:
      return source[i]
    except DatasetError:
      continue
  return None


def _bad_examples(name: str, errors: list[str]) -> DatasetError:
  return DatasetError(f"dataset {name!r}: {len(errors)} bad example(s); nothing was "
                      "written. Each:\n  " + "\n  ".join(errors))


def _all_errors(name: str, sources: Mapping[str, Any]) -> DatasetError:
  errors: list[str] = []
  for split, source in sources.items():
    for _ in _iter_checked(source, split, errors):
      pass
  return _bad_examples(name, errors)


def prepare(name: str, sources: Mapping[str, Any], out: str, *,
            info: Any = None, content: Mapping[str, Any] | None = None,
            data_config: Mapping[str, Any] | None = None,
            overwrite: bool = False, progress: bool = True) -> Summary:
  """Writes ``sources`` (split -> random-access source) as the TFDS dataset ``name`` in
  ``out`` (``<out>/<name>/1.0.0``), ArrayRecord shards, one example per source index.

  Idempotent: a complete dataset already at the path is kept (``overwrite=True`` rewrites
  it); an interrupted preparation leaves only TFDS's temporary folder, which the next call
  replaces.

  ``out`` may be a bucket (``gs://...``, through ``etils.epath``): ArrayRecord has no
  writer for it, so the dataset is prepared in a local temporary folder and uploaded,
  ``dataset_info.json`` last (a dataset without it is not complete, and is redone).

  Raises:
    DatasetError: bad source files (all of them named, with split and index; nothing is
      kept), or examples whose keys or kinds differ.
  """
  if "://" in str(out):
    return _prepare_remote(name, sources, str(out), info=info, content=content,
                           data_config=data_config, overwrite=overwrite, progress=progress)
  tfds = _tfds()
  path = dataset_dir(out, name)
  if not overwrite and os.path.exists(os.path.join(path, "dataset_info.json")):
    return Summary(path, *_split_stats(path), reused=True)
  if overwrite and os.path.isdir(path):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path)
  splits = [s for s in sources if len(sources[s])]
  empty = [s for s in sources if not len(sources[s])]
  if empty:
    raise DatasetError(f"dataset {name!r}: split(s) {empty} are empty; nothing to prepare")
  kinds, features = {}, {}
  for split in splits:
    first = _first_readable(sources[split])
    if first is None:   # a split without one readable example: name every bad one
      raise _all_errors(name, {s: sources[s] for s in splits})
    kinds[split] = {k: kind_of(k, v) for k, v in first.items()}
    for key, kind in kinds[split].items():
      if features.setdefault(key, kind) != kind:
        raise DatasetError(f"dataset {name!r}: key {key!r} is {kind} in split {split!r} "
                           f"but {features[key]} in an earlier split; expected one kind "
                           "per key")
  metadata = {KINDS: kinds, INFO: _info_dict(info), CONTENT: _jsonable(content or {}),
              DATA_CONFIG: _jsonable(data_config or {})}
  errors: list[str] = []
  done: list[str] = []

  def split_examples(split):
    def gen():
      yield from _iter_checked(sources[split], split, errors)
      done.append(split)
      # Raised at the end of the last split, before TFDS finalises the dataset: every bad
      # file of every split is named, and nothing is kept.
      if errors and len(done) == len(splits):
        raise _bad_examples(name, errors)
    return gen

  def bar(split, it):
    if not progress:
      return it
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(it, total=len(sources[split]), desc=f"{name}/{split}", unit="ex",
                leave=False)

  cls = _builder_class(name, kinds, features, metadata,
                       {s: split_examples(s) for s in splits}, bar)
  import tempfile  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()   # ours (per split, in examples) replaces TFDS's
  with tempfile.TemporaryDirectory(prefix="contrastjax_prepare_") as scratch:
    # TFDS makes an (empty) folder with mkdtemp while it looks for the dataset's info in
    # its public bucket (disabled); kept inside our scratch folder, it goes with it.
    saved, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      builder = cls(data_dir=str(out), file_format="array_record")
    finally:
      tempfile.tempdir = saved
    builder.download_and_prepare(
        download_dir=os.path.join(scratch, "downloads"),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return Summary(path, *_split_stats(path), reused=False)


def _prepare_remote(name: str, sources: Mapping[str, Any], out: str, **kw) -> Summary:
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  remote = epath.Path(out) / name / VERSION
  overwrite = kw.pop("overwrite")
  if not overwrite and (remote / "dataset_info.json").exists():
    return Summary(str(remote), *_split_stats(str(remote)), reused=True)
  with tempfile.TemporaryDirectory(prefix="contrastjax_prepare_") as local:
    done = prepare(name, sources, local, overwrite=True, **kw)
    if remote.exists():
      remote.rmtree()
    files = sorted(epath.Path(done.path).iterdir(),
                   key=lambda f: (f.name == "dataset_info.json", f.name))
    for f in files:
      with open(f, "rb") as src, (remote / f.name).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
  return Summary(str(remote), done.examples, done.bytes, done.shards, reused=False)


def _info_dict(info) -> dict[str, Any] | None:
  if info is None:
    return None
  return {"name": info.name, "classes": list(info.classes),
          "palette": [list(c) for c in info.palette], "ignore_index": info.ignore_index}


# ----------------------------------------------------------------------------------- read
class PreparedSource:
  """One split of a prepared dataset: ``len()`` and ``source[i]`` give the folder reader's
  example ``i`` (same keys, values and dtypes). Picklable (grain worker processes)."""

  def __init__(self, path: str, split: str):
    self.path, self.split = str(path), split
    self._source = None
    self.kinds = read_metadata(self.path)[KINDS].get(split, {})
    builder = _tfds().builder_from_directory(self.path)
    if split not in builder.info.splits:
      raise DatasetError(f"prepared dataset {self.path} has no split {split!r}; it has "
                         f"{sorted(builder.info.splits)}", path=self.path)
    self._len = int(builder.info.splits[split].num_examples)

  def _data(self):
    if self._source is None:
      self._source = _tfds().builder_from_directory(self.path).as_data_source(self.split)
    return self._source

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = self._len
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self!r}")
    return decode(self._data()[int(index) % n], self.kinds)

  def column(self, key: str) -> list[Any]:
    """Every example's ``key``, in order, read without decoding the other keys (e.g. all
    captions, to build a tokenizer: no image is decoded)."""
    if key not in self.kinds:
      raise KeyError(f"{key!r} is not a key of {self!r}; it has {sorted(self.kinds)}")
    kind = {key: self.kinds[key]}
    data = self._data()
    return [decode(data[i], kind)[key] for i in range(self._len)]

  def __getstate__(self):
    return {"path": self.path, "split": self.split, "kinds": self.kinds, "_len": self._len,
            "_source": None}

  def __repr__(self) -> str:
    return f"PreparedSource({self.path!r}, split={self.split!r}, {self._len} examples)"


def read_metadata(path: str) -> dict[str, Any]:
  """The ``metadata.json`` of a prepared dataset (``<out>/<name>/1.0.0``).

  Raises:
    DatasetError: not a prepared dataset (names the path and what was expected).
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  meta = epath.Path(path) / "metadata.json"
  if not (epath.Path(path) / "dataset_info.json").exists() or not meta.exists():
    raise DatasetError(
        f"{path} is not a prepared dataset: expected dataset_info.json and metadata.json "
        "(written by python -m contrastjax.data.prepare); prepare it first, or set "
        "config.data.format='folder'", path=str(path))
  data = json.loads(meta.read_text())
  if KINDS not in data:
    raise DatasetError(f"{meta} has no {KINDS!r}: a TFDS dataset that contrastjax did not "
                       "prepare", path=str(meta))
  return data


def open_splits(path: str, splits: Iterable[str] | None = None) -> dict[str, PreparedSource]:
  """``{split: PreparedSource}`` for ``splits`` (default: every split of the dataset)."""
  if splits is None:
    splits = sorted(_tfds().builder_from_directory(str(path)).info.splits)
  return {s: PreparedSource(path, s) for s in splits}


def resolve(dcfg, default_name: str) -> str:
  """The prepared dataset's directory from ``config.data.tfds_dir``: either the dataset's
  own folder (holding ``dataset_info.json``) or the ``--out`` folder of the preparation
  (``<tfds_dir>/<config.data.tfds_name or default_name>/1.0.0``)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = os.path.expandvars(os.path.expanduser(str(dcfg.get("tfds_dir", "") or "")))
  if not root:
    raise DatasetError("config.data.format='tfds' needs config.data.tfds_dir: the folder "
                       "python -m contrastjax.data.prepare wrote (its --out)")
  if (epath.Path(root) / "dataset_info.json").exists():
    return root
  return dataset_dir(root, str(dcfg.get("tfds_name", "") or default_name))


def data_format(dcfg) -> str:
  from contrastjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  fmt = str(dcfg.get("format", "folder"))
  if fmt not in ("folder", "tfds"):
    raise ConfigError(f"config.data.format={fmt!r}: expected 'folder' or 'tfds'")
  return fmt


def split_sources(dcfg, default_name: str, folder: Callable[[], Mapping[str, Any]],
                  content: Mapping[str, Any]) -> dict[str, Any]:
  """A maker's sources: ``folder()`` for ``config.data.format='folder'``, else the
  prepared dataset's splits (:func:`resolve`), under the same split names.

  ``content``: what decides the examples the folder sources yield, as the maker resolved
  it (e.g. ``{'binarize': 'auto'}``, a synthetic set's sizes and seed); the maker also
  puts it in ``DataSpec.content``, which a preparation stores. A prepared dataset is
  read only under the same content.

  Raises:
    DatasetError: the prepared dataset was made under another content (names the key and
      both values).
  """
  if data_format(dcfg) == "folder":
    return dict(folder())
  path = resolve(dcfg, default_name)
  stored = read_metadata(path).get(CONTENT, {})
  now = _jsonable(content)
  for key in sorted(set(now) | set(stored)):
    if now.get(key) != stored.get(key):
      raise DatasetError(
          f"{path} was prepared with {key}={stored.get(key)!r}, but this run's config.data "
          f"gives {now.get(key)!r}: it holds other examples. Prepare the dataset again "
          "with this config (python -m contrastjax.data.prepare), or set the key back",
          path=path)
  return open_splits(path)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))
