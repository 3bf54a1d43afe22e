"""MSCOCO captions in the official layout, and the CLIP image/text transforms.

Layout (2017 release)::

  <root>/annotations/captions_train2017.json   {"images": [{"id", "file_name", ...}],
  <root>/annotations/captions_val2017.json      "annotations": [{"id", "image_id", "caption"}]}
  <root>/train2017/<file_name>.jpg
  <root>/val2017/<file_name>.jpg

:func:`read_captions` checks everything up front and raises ``DatasetError`` naming the
file, the key or the annotation id: malformed JSON, missing keys, an annotation of an
unknown image, an empty caption, an image id listed twice, image files that are missing
and image files the JSON does not list (all counted, a few named). Images without any
caption are left out, with the count and a few names logged.

Examples of :class:`CocoCaptionsSource`:

* ``mode='pairs'``: one example per (image, caption) (a COCO CSV for OpenCLIP);
* ``mode='images'``: one per image with all its captions; :class:`ChooseCaption` draws
  one at random (per example and epoch, from the pipeline's seeded generator);
* ``mode='eval'``: one per image with caption ``caption_index`` (default the first).

Transforms (grain): :class:`ChooseCaption`, :class:`RandomResizedCrop` (torchvision's
algorithm, bicubic; OpenCLIP's train transform with ``scale=(0.9, 1.0)``),
:class:`ResizeCenterCrop` (OpenCLIP's eval transform), :class:`Normalize` (OpenAI CLIP
mean/std) and :class:`Tokenize`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import grain
import numpy as np
from PIL import Image

from contrastjax.data.errors import DatasetError
from contrastjax.data.sources import medseg
from contrastjax.errors import ConfigError

#: OpenAI CLIP normalisation (``open_clip.constants.OPENAI_DATASET_MEAN/STD``).
CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
#: Image files an image folder is checked for (files the caption JSON must list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class CaptionIndex:
  """The parsed annotations of one split."""
  split: str
  image_dir: str
  files: list[str]              # image file names
  image_ids: list[int]
  captions: list[list[str]]     # per image, in annotation order


def read_captions(root: str, split: str) -> CaptionIndex:
  """Parses ``annotations/captions_<split>2017.json`` and checks the image files.

  Raises:
    DatasetError: naming the file and the offending key / annotation / image.
  """
  ann_path = os.path.join(root, "annotations", f"captions_{split}2017.json")
  image_dir = os.path.join(root, f"{split}2017")
  if not os.path.isfile(ann_path):
    raise DatasetError(f"missing caption file for split {split!r} (expected the official "
                       "COCO layout: annotations/captions_{train,val}2017.json)",
                       path=ann_path, kind="missing_file")
  try:
    with open(ann_path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                       path=ann_path, kind="unreadable") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"cannot read: {e}", path=ann_path, kind="unreadable") from None
  if not isinstance(data, dict):
    raise DatasetError(f"expected a JSON object with 'images' and 'annotations', got "
                       f"{type(data).__name__}", path=ann_path)
  for key in ("images", "annotations"):
    if not isinstance(data.get(key), list):
      raise DatasetError(f"key {key!r} is missing or not a list", path=ann_path)
  files: dict[int, str] = {}
  first: dict[int, int] = {}
  for n, img in enumerate(data["images"]):
    if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
      raise DatasetError(f"images[{n}] needs 'id' and 'file_name', got {img!r:.200}",
                         path=ann_path)
    image_id = int(img["id"])
    if image_id in files:
      raise DatasetError(f"images[{n}] repeats id {image_id} of images[{first[image_id]}] "
                         f"({files[image_id]!r}); expected each image id once",
                         path=ann_path, kind="duplicate_id")
    files[image_id], first[image_id] = str(img["file_name"]), n
  captions: dict[int, list[str]] = {i: [] for i in files}
  for n, ann in enumerate(data["annotations"]):
    if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
      raise DatasetError(f"annotations[{n}] needs 'image_id' and 'caption', got "
                         f"{ann!r:.200}", path=ann_path)
    image_id = int(ann["image_id"])
    if image_id not in files:
      raise DatasetError(f"annotations[{n}] (id {ann.get('id')}) refers to image_id "
                         f"{image_id}, which is not in 'images'", path=ann_path)
    caption = ann["caption"]
    if not isinstance(caption, str) or not caption.strip():
      raise DatasetError(f"annotations[{n}] (id {ann.get('id')}, image_id {image_id}) has "
                         f"an empty caption {caption!r}", path=ann_path, kind="empty")
    captions[image_id].append(caption.strip())
  if not os.path.isdir(image_dir):
    raise DatasetError(f"image folder of split {split!r} is missing", path=image_dir,
                       kind="missing_file")
  present = set(os.listdir(image_dir))
  ids = sorted(i for i in files if captions[i])
  missing = [files[i] for i in ids if files[i] not in present]
  if missing:
    raise DatasetError(f"{len(missing)} image(s) listed in {ann_path} are missing, e.g. "
                       f"{missing[:3]}", path=image_dir, kind="missing_file")
  # The official caption files list every image of their folder: an image file that the
  # JSON does not list has no caption and would be silently unused.
  unlisted = sorted(f for f in present - set(files.values())
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
  if unlisted:
    raise DatasetError(f"{len(unlisted)} image file(s) in {image_dir} are not listed in "
                       f"{ann_path}, e.g. {unlisted[:3]}; expected the official layout, "
                       "whose caption file lists every image of its folder (move the others "
                       "out)", path=image_dir, kind="unlisted_file")
  dropped = [files[i] for i in sorted(files) if not captions[i]]
  if dropped:
    logging.warning("%s: %d image(s) have no caption and are left out, e.g. %s", ann_path,
                    len(dropped), dropped[:3])
  if not ids:
    raise DatasetError("no image with a caption", path=ann_path)
  return CaptionIndex(split, image_dir, [files[i] for i in ids], ids,
                      [captions[i] for i in ids])


def decode_image(path: str) -> np.ndarray:
  """RGB uint8 ``[H, W, 3]`` (grayscale, palette and RGBA converted, alpha dropped); a
  clear error for an unreadable file and for a 16/32-bit one (``convert('RGB')`` would
  clip its values to 255 without a word)."""
  try:
    with Image.open(path) as im:
      wide = medseg.wide_pixels(im)
      if wide:
        raise DatasetError(f"image file {path} has 16/32-bit pixels (mode {im.mode}, raw "
                           f"{wide}); expected an 8-bit RGB or grayscale image",
                           path=path, kind="bad_image")
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    if isinstance(e, DatasetError):
      raise
    raise DatasetError(f"cannot decode image file {path} ({type(e).__name__}: {e}); "
                       "expected a complete JPEG or PNG image", path=path,
                       kind="unreadable") from None


def caption_items(captions: list[list[str]], mode: str, caption_index: int = 0,
                  where: str = "", names: list[str] | None = None) -> list[tuple[int, int]]:
  """``(image, caption)`` per example of ``mode`` (caption ``-1``: all of them), from the
  captions of each image: ``'pairs'``, ``'images'`` or ``'eval'`` (see the module doc).

  Raises:
    ConfigError: an unknown mode.
    DatasetError: ``'eval'`` with images that have no caption ``caption_index``.
  """
  if mode not in ("pairs", "images", "eval"):
    raise ConfigError(f"config.data.train_mode={mode!r}: expected 'pairs' or 'images'")
  if mode == "pairs":
    return [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
  if mode == "eval":
    short = [(names or [str(i) for i in range(len(captions))])[i]
             for i, caps in enumerate(captions) if len(caps) <= caption_index]
    if short:
      raise DatasetError(f"config.data.eval_caption={caption_index}: {len(short)} image(s) "
                         f"have fewer captions, e.g. {short[:3]}", path=where or None)
    return [(i, caption_index) for i in range(len(captions))]
  return [(i, -1) for i in range(len(captions))]


class CocoCaptionsSource:
  """Random-access COCO examples ``{'image': uint8 [H, W, 3], 'captions': [str, ...]}``
  (one caption, except in ``mode='images'``)."""

  on_disk = True  # read in full at start-up by contrastjax.data.validation

  def __init__(self, index: CaptionIndex, mode: str = "pairs", caption_index: int = 0):
    self.index, self.mode = index, mode
    self.items = caption_items(index.captions, mode, caption_index, index.image_dir,
                               index.files)

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, k: int) -> dict[str, Any]:
    i, j = self.items[k]
    caps = self.index.captions[i]
    image = decode_image(os.path.join(self.index.image_dir, self.index.files[i]))
    return {"image": image, "captions": list(caps) if j < 0 else [caps[j]]}

  def encoded_files(self, k: int) -> dict[str, str]:
    """The image file of example ``k`` (stored as it is by a preparation)."""
    return {"image": os.path.join(self.index.image_dir, self.index.files[self.items[k][0]])}


class CaptionItems:
  """The examples of :class:`CocoCaptionsSource` in ``mode``, over a source of images
  with all their captions (``mode='images'`` examples, e.g. a prepared copy's split)."""

  def __init__(self, images: Any, captions: list[list[str]], mode: str = "pairs",
               caption_index: int = 0):
    if len(captions) != len(images):
      raise DatasetError(f"{len(captions)} caption lists for {len(images)} images of "
                         f"{images!r}")
    self.images, self.mode = images, mode
    self.items = caption_items(captions, mode, caption_index, repr(images))

  def __len__(self) -> int:
    return len(self.items)

  def __repr__(self) -> str:
    return f"CaptionItems({self.images!r}, mode={self.mode!r})"

  def __getitem__(self, k: int) -> dict[str, Any]:
    i, j = self.items[k]
    ex = self.images[i]
    caps = ex["captions"]
    return {"image": ex["image"], "captions": list(caps) if j < 0 else [caps[j]]}


class ChooseCaption(grain.transforms.RandomMap):
  """``captions`` -> ``caption``: the only one, or one drawn at random."""

  def random_map(self, x, rng: np.random.Generator):
    out = dict(x)
    caps = out.pop("captions")
    out["caption"] = caps[0] if len(caps) == 1 else caps[int(rng.integers(len(caps)))]
    return out


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize to ``(h, w)``."""
  h, w = size
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


class RandomResizedCrop(grain.transforms.RandomMap):
  """torchvision ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3))``, bicubic."""

  def __init__(self, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
    self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

  def random_map(self, x, rng: np.random.Generator):
    img = x["image"]
    h, w = img.shape[:2]
    area = h * w
    log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        break
    else:  # central crop at the clamped aspect ratio
      in_ratio = w / h
      if in_ratio < self.ratio[0]:
        cw, ch = w, int(round(w / self.ratio[0]))
      elif in_ratio > self.ratio[1]:
        ch, cw = h, int(round(h * self.ratio[1]))
      else:
        cw, ch = w, h
      top, left = (h - ch) // 2, (w - cw) // 2
    out = dict(x)
    out["image"] = _resize(img[top:top + ch, left:left + cw], (self.size, self.size))
    return out


class ResizeCenterCrop(grain.transforms.Map):
  """Shorter side to ``size`` (bicubic), then the central ``size x size`` crop."""

  def __init__(self, size: int):
    self.size = int(size)

  def map(self, x):
    img = x["image"]
    h, w = img.shape[:2]
    s = self.size / min(h, w)
    nh, nw = max(self.size, int(round(h * s))), max(self.size, int(round(w * s)))
    img = _resize(img, (nh, nw))
    top, left = (nh - self.size) // 2, (nw - self.size) // 2
    out = dict(x)
    out["image"] = img[top:top + self.size, left:left + self.size]
    return out


class Normalize(grain.transforms.Map):
  """uint8 -> float32 ``(x / 255 - mean) / std`` with OpenAI CLIP's mean/std."""

  def map(self, x):
    out = dict(x)
    out["image"] = ((x["image"].astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)
    return out


class Tokenize(grain.transforms.Map):
  """``caption`` (str) -> ``text`` int32 ``[context_length]``."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, x):
    out = dict(x)
    out["text"] = self.tokenizer.encode(out.pop("caption"))
    return out
