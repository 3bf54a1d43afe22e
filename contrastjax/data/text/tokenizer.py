"""Tokenizers for the CLIP text tower: a word vocabulary built from the training captions
(no download) and CLIP's byte-level BPE read from a ``bpe_simple_vocab_16e6.txt.gz``-
format merges file.

Both produce OpenCLIP's layout: ``[<start_of_text>, tokens..., <end_of_text>, 0, ...]``
of length ``context_length`` (int32), truncated so that the end-of-text token is always
the last kept token, and both give the end-of-text token the largest id of the
vocabulary (the text tower pools at ``argmax(tokens)``, as OpenCLIP).

The BPE follows the published algorithm of CLIP's ``simple_tokenizer``: text cleaned
(HTML entities unescaped, whitespace collapsed, lower-cased), split by the CLIP
pre-tokenisation pattern, bytes mapped to printable unicode characters, then the merges
applied by rank; the vocabulary is the 256 byte characters, the same with ``</w>``,
one entry per merge, then ``<start_of_text>``, ``<end_of_text>``. (``ftfy`` text fixing
is not applied.)
"""
from __future__ import annotations

import collections
import gzip
import html
import json
import os
import re
from typing import Iterable

import numpy as np

from contrastjax.data.errors import DatasetError

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
# CLIP's pattern with \p{L} -> [^\W\d_] and \p{N} -> \d (Python's re has no \p{..}).
_BPE_RE = re.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
    re.IGNORECASE)


def _clean(text: str) -> str:
  text = html.unescape(html.unescape(text))
  return re.sub(r"\s+", " ", text).strip().lower()


def _pack(ids: list[int], sot: int, eot: int, context_length: int) -> np.ndarray:
  ids = [sot] + ids[: context_length - 2] + [eot]
  out = np.zeros(context_length, np.int32)
  out[: len(ids)] = ids
  return out


class WordTokenizer:
  """Lower-cased words and punctuation; ids ``0 = <pad>``, ``1 = <unk>``, then words by
  decreasing frequency (ties alphabetical), then ``<start_of_text>``, ``<end_of_text>``."""

  def __init__(self, words: list[str], context_length: int = 77):
    if context_length < 3:
      raise ValueError(f"context_length={context_length}: expected >= 3")
    self.words = list(words)
    self.context_length = int(context_length)
    self.index = {w: i + 2 for i, w in enumerate(self.words)}
    self.sot = len(self.words) + 2
    self.eot = self.sot + 1
    self.vocab_size = self.eot + 1

  @staticmethod
  def split(text: str) -> list[str]:
    return _WORD_RE.findall(_clean(text))

  @classmethod
  def build(cls, captions: Iterable[str], *, context_length: int = 77, min_count: int = 1,
            max_vocab: int = 0) -> "WordTokenizer":
    """Vocabulary of the words seen at least ``min_count`` times; with ``max_vocab`` the
    most frequent ones so that ``vocab_size <= max_vocab``."""
    counts = collections.Counter()
    for c in captions:
      counts.update(cls.split(c))
    words = sorted((w for w, n in counts.items() if n >= min_count),
                   key=lambda w: (-counts[w], w))
    if max_vocab:
      if max_vocab < 5:
        raise ValueError(f"max_vocab={max_vocab}: expected >= 5 (4 special tokens)")
      words = words[: max_vocab - 4]
    return cls(words, context_length)

  def encode(self, text: str) -> np.ndarray:
    ids = [self.index.get(w, 1) for w in self.split(text)]
    return _pack(ids, self.sot, self.eot, self.context_length)

  def __call__(self, texts: Iterable[str]) -> np.ndarray:
    return np.stack([self.encode(t) for t in texts])

  def save(self, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"kind": "word", "context_length": self.context_length,
                 "words": self.words}, f)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "WordTokenizer":
    try:
      with open(path) as f:
        d = json.load(f)
      return cls(list(d["words"]), int(d["context_length"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DatasetError(f"cannot read the word tokenizer: {type(e).__name__}: {e}; "
                         "delete the file to rebuild it from the training captions",
                         path=path) from None


def bytes_to_unicode() -> dict[int, str]:
  """CLIP/GPT-2's reversible map of the 256 bytes to printable unicode characters."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(keep, (chr(c) for c in chars)))


class BPETokenizer:
  """CLIP's byte-level BPE (see the module docstring).

  Args:
    path: gzip text file: a header line, then one merge ``"a b"`` per line.
    context_length: output length (77).
    max_merges: merges used (CLIP: the first 49152 - 256 - 2 = 48894 after the header).
  """

  def __init__(self, path: str, context_length: int = 77, max_merges: int = 48894):
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
      raise DatasetError(f"cannot read the BPE merges file: {type(e).__name__}: {e}",
                         path=path) from None
    merges = []
    for n, line in enumerate(lines[1: max_merges + 1], start=2):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise DatasetError(f"line {n}: expected a merge 'a b', got {line!r}", path=path)
      merges.append(tuple(parts))
    if not merges:
      raise DatasetError("no merges after the header line", path=path)
    self.byte_encoder = bytes_to_unicode()
    vocab = list(self.byte_encoder.values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    self.encoder = {t: i for i, t in enumerate(vocab)}
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.sot = self.encoder["<start_of_text>"]
    self.eot = self.encoder["<end_of_text>"]
    self.vocab_size = len(vocab)
    self.context_length = int(context_length)
    self._cache: dict[str, list[str]] = {}

  def bpe(self, token: str) -> list[str]:
    """The BPE pieces of one pre-token (its last symbol carries ``</w>``)."""
    if token in self._cache:
      return self._cache[token]
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[token] = word
    return word

  def ids(self, text: str) -> list[int]:
    out = []
    for tok in _BPE_RE.findall(_clean(text)):
      tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
      out.extend(self.encoder[p] for p in self.bpe(tok))
    return out

  def encode(self, text: str) -> np.ndarray:
    return _pack(self.ids(text), self.sot, self.eot, self.context_length)

  def decode(self, ids: Iterable[int]) -> str:
    byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    out = bytearray()
    for i in ids:
      piece = self.decoder[int(i)]
      if piece in ("<start_of_text>", "<end_of_text>"):
        continue
      end = piece.endswith("</w>")
      out.extend(byte_decoder[c] for c in (piece[:-4] if end else piece))
      if end:
        out.extend(b" ")
    return out.decode("utf-8", errors="replace").strip()

  def __call__(self, texts: Iterable[str]) -> np.ndarray:
    return np.stack([self.encode(t) for t in texts])
