"""CIFAR-10 in the official python layout, and CLIP evaluation sources built on it.

Layout (``cifar-10-python.tar.gz`` extracted)::

  <root>/data_batch_1 .. data_batch_5   training pickles, 10,000 images each
  <root>/test_batch                     test pickle, 10,000 images
  <root>/batches.meta                   {'label_names': [...], ...}

Each batch pickle is a dict with ``data`` (uint8 ``[n, 3072]``: per row the 1024 red,
then green, then blue values of a 32x32 image, row-major) and ``labels`` (``n`` ints
in ``[0, 10)``); keys are bytes (Python 2 pickles) or str. The pickles are read with an
unpickler that only resolves the NumPy array reconstructors (and ``_codecs.encode``),
so a tampered file cannot run code. Every problem (missing file, truncated or foreign
pickle, missing key, wrong shape, label out of range) raises ``DatasetError`` naming
the file.

CLIP evaluation (Yaras et al., CPAL 2025, App. E.2: zero-shot and linear probe on
CIFAR-10) uses two sources built by :func:`clip_eval_sources` from
``config.data.cifar10_root``:

* ``cifar10_test``: the 10,000 test images, each paired with the prompt of its class
  (``captions``) and its ``label`` (the ``zeroshot`` evaluator);
* ``cifar10_probe``: the 50,000 training and then the 10,000 test images with ``label``
  and ``subset`` (0 train, 1 test) (the ``linear_probe`` evaluator), also with the
  class prompt as text (the CLIP predict function embeds both modalities).

Prompts (``config.data.cifar10_prompt``): ``'photo'`` (default) is ``"a photo of a
{class}."``, OpenAI CLIP's basic template; ``'paper'`` is the template as printed in the
paper, ``"A photo of the number {class}."``, almost certainly a copy-paste slip
(CIFAR-10 has no numbers); any other string containing ``{}`` is used as the template.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Sequence

import numpy as np

from contrastjax.data.errors import DatasetError
from contrastjax.errors import ConfigError

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
#: The label names of ``batches.meta``, in label order.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
PROMPTS = {
    "photo": "a photo of a {}.",            # OpenAI CLIP's basic template (default)
    "paper": "A photo of the number {}.",   # Yaras et al. App. E.2 as printed
}
SPLITS = {"train": TRAIN_FILES, "test": TEST_FILES}
DEFAULT_ROOT = "$CONTRASTJAX_DATA_DIR/cifar-10-batches-py"

# The only globals a CIFAR pickle needs: NumPy's array reconstruction (and, in protocol-2
# pickles written by Python 3, ``_codecs.encode`` for bytes objects).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the NumPy array reconstructors (and
  ``_codecs.encode``)."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR "
                                   "pickle")
    return super().find_class(module, name)


def load_pickle(path: str) -> dict[str, Any]:
  """Reads one CIFAR pickle as a dict with str keys.

  Raises:
    DatasetError: missing file, unreadable / truncated / foreign pickle, not a dict.
  """
  if not os.path.isfile(path):
    raise DatasetError("missing CIFAR-10 file (expected the official python layout: "
                       f"{', '.join(TRAIN_FILES + TEST_FILES)}, {META_FILE})", path=path,
                       kind="missing_file")
  try:
    with open(path, "rb") as f:
      raw = f.read()
    obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except OSError as e:
    raise DatasetError(f"cannot read: {e}", path=path, kind="unreadable") from None
  except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
    raise DatasetError(f"corrupt or not a CIFAR pickle ({type(e).__name__}: {e})",
                       path=path, kind="unreadable") from None
  if not isinstance(obj, dict):
    raise DatasetError(f"expected a pickled dict, got {type(obj).__name__}", path=path)
  return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def read_meta(root: str) -> list[str]:
  """The ``label_names`` of ``<root>/batches.meta``."""
  path = os.path.join(root, META_FILE)
  meta = load_pickle(path)
  names = meta.get("label_names")
  if not isinstance(names, (list, tuple)) or not names:
    raise DatasetError(f"key 'label_names' is missing or empty (keys: {sorted(meta)})",
                       path=path)
  return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def read_batch(path: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """One batch pickle -> ``(images uint8 [n, 32, 32, 3], labels int64 [n])``."""
  batch = load_pickle(path)
  for key in ("data", "labels"):
    if key not in batch:
      raise DatasetError(f"key {key!r} is missing (keys: {sorted(batch)})", path=path)
  data = np.asarray(batch["data"])
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    raise DatasetError(f"'data' must be uint8 [n, 3072], got {data.dtype} {data.shape}",
                       path=path)
  try:
    labels = np.asarray(batch["labels"], np.int64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise DatasetError(f"'labels' is not a list of integers: {e}", path=path) from None
  if labels.shape[0] != data.shape[0]:
    raise DatasetError(f"{data.shape[0]} images but {labels.shape[0]} labels", path=path)
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise DatasetError(f"{bad.size} label(s) outside [0, {num_classes}), e.g. "
                       f"labels[{bad[0]}] = {labels[bad[0]]}", path=path)
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


def read_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """``'train'`` (data_batch_1..5) or ``'test'`` (test_batch) of ``root``, concatenated.

  Returns:
    ``(images uint8 [N, 32, 32, 3], labels int64 [N])``.
  """
  if split not in SPLITS:
    raise ValueError(f"CIFAR-10 split {split!r} is not known; expected one of "
                     f"{sorted(SPLITS)}")
  if not os.path.isdir(root):
    raise DatasetError("CIFAR-10 folder does not exist (expected the extracted "
                       "cifar-10-batches-py folder)", path=root, kind="missing_file")
  num_classes = len(read_meta(root))
  parts = [read_batch(os.path.join(root, f), num_classes) for f in SPLITS[split]]
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def prompt_template(prompt: str) -> str:
  """The template of ``config.data.cifar10_prompt`` (a name of :data:`PROMPTS` or a
  string with ``{}``)."""
  if prompt in PROMPTS:
    return PROMPTS[prompt]
  if "{}" not in prompt:
    raise ConfigError(f"config.data.cifar10_prompt={prompt!r}: expected one of "
                     f"{sorted(PROMPTS)} or a template containing '{{}}'")
  return prompt


class CifarClipSource:
  """Random-access CLIP examples of CIFAR images: ``{'image': uint8 [32, 32, 3],
  'captions': [prompt of the class], 'label': int32, 'subset': int32}``.

  Args:
    parts: ``(images, labels, subset_id)`` triples, concatenated in order.
    class_names: Names filled into ``template``, by label.
    template: Prompt template with one ``{}``.
  """

  def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray, int]],
               class_names: Sequence[str], template: str):
    self.images = np.concatenate([p[0] for p in parts])
    self.labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
    self.subsets = np.concatenate([np.full(len(p[1]), p[2], np.int32) for p in parts])
    self.prompts = [template.format(name) for name in class_names]

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    label = int(self.labels[i])
    return {"image": self.images[i], "captions": [self.prompts[label]],
            "label": np.int32(label), "subset": self.subsets[i]}


def resolve_root(dcfg) -> str:
  """``config.data.cifar10_root`` with ``~``/``$VARS`` expanded; ``''`` when unset/empty.

  Raises:
    DatasetError: a root that names an unset variable or is not a folder.
  """
  raw = str(dcfg.get("cifar10_root", "") or "")
  if not raw:
    return ""
  root = os.path.expandvars(os.path.expanduser(raw))
  if "$" in root:
    raise DatasetError(f"config.data.cifar10_root={raw!r} uses an unset environment "
                       "variable: set it (e.g. CONTRASTJAX_DATA_DIR), point cifar10_root "
                       "at the extracted cifar-10-batches-py folder, or pass the config "
                       "argument 'cifar10=' (empty) to leave the CIFAR-10 evaluations out")
  if not os.path.isdir(root):
    raise DatasetError(f"config.data.cifar10_root={raw!r} is not a folder (expected the "
                       "extracted cifar-10-batches-py folder; the config argument "
                       "'cifar10=' leaves the CIFAR-10 evaluations out)", path=root,
                       kind="missing_file")
  return root


def clip_eval_sources(dcfg) -> dict[str, CifarClipSource]:
  """The ``cifar10_test`` and ``cifar10_probe`` sources (module docstring) of
  ``config.data.cifar10_root``; none when the root is empty."""
  root = resolve_root(dcfg)
  if not root:
    return {}
  names = read_meta(root)
  template = prompt_template(str(dcfg.get("cifar10_prompt", "photo")))
  train = read_split(root, "train")
  test = read_split(root, "test")
  return {"cifar10_test": CifarClipSource([(*test, 1)], names, template),
          "cifar10_probe": CifarClipSource([(*train, 0), (*test, 1)], names, template)}
