"""Reading every file of a dataset once at start-up, so that a bad file stops the run at
once with every problem listed, instead of hours later when the pipeline first reaches it.

``config.data.validate``: ``'auto'`` (default: validate when the dataset's on-disk
sources hold at most :data:`AUTO_MAX_EXAMPLES` examples together), ``True`` (always),
``False`` (never). Sources opt in with a class attribute ``on_disk = True`` (procedural
sources have nothing to check); wrappers expose the sources they read as ``parts``.
In a multi-process run each process reads its share and all stop together.
"""
from __future__ import annotations

import collections
from typing import Any, Mapping

from absl import logging
import jax

from contrastjax.data.errors import DatasetError
from contrastjax.errors import ConfigError

#: ``validate='auto'`` reads the dataset when its on-disk sources hold at most this many
#: examples (a few minutes on 2 cores for 1024 px PNGs).
AUTO_MAX_EXAMPLES = 10_000


def on_disk_sources(sources: Mapping[str, Any]) -> list[tuple[str, Any]]:
  """``(split, source)`` for every distinct on-disk source behind ``sources``."""
  out, seen = [], set()

  def visit(split: str, src: Any) -> None:
    parts = getattr(src, "parts", None)
    if parts is not None:
      for p in parts:
        visit(split, p)
    elif getattr(src, "on_disk", False) and id(src) not in seen:
      seen.add(id(src))
      out.append((split, src))

  for split, src in sources.items():
    visit(split, src)
  return out


def check_sources(sources: Mapping[str, Any], mode: Any = "auto", *,
                  progress: bool = True) -> int:
  """Reads every example of the on-disk sources behind ``sources`` (split -> source).

  Returns:
    The number of examples read (0 when skipped).

  Raises:
    DatasetError: One or more examples failed: the message counts them per kind and
      names the first files of each kind.
    ValueError: ``mode`` is not 'auto', True or False.
  """
  if isinstance(mode, str) and mode.lower() in ("true", "false"):
    mode = mode.lower() == "true"
  if mode not in ("auto", True, False):
    raise ConfigError(f"config.data.validate={mode!r}: expected 'auto', True or False")
  if mode is False:
    return 0
  leaves = on_disk_sources(sources)
  total = sum(len(s) for _, s in leaves)
  if not leaves:
    return 0
  if mode == "auto" and total > AUTO_MAX_EXAMPLES:
    logging.info("not validating the %d examples of the dataset up front (more than %d; "
                 "set config.data.validate=True to read them all now)", total,
                 AUTO_MAX_EXAMPLES)
    return 0
  pid, nproc = jax.process_index(), jax.process_count()
  problems: dict[str, list[str]] = collections.defaultdict(list)
  bar = None
  if progress and pid == 0:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=total, desc="validating data", unit="file", leave=False,
                    dynamic_ncols=True)
  done = 0
  for split, src in leaves:
    for i in range(len(src)):
      if done % nproc == pid:  # each process reads its share
        try:
          src[i]
        except DatasetError as e:
          problems[e.kind].append(f"[{split}] {e}")
      done += 1
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  failed = sum(len(v) for v in problems.values())
  if nproc > 1:
    from contrastjax import parallel  # pylint: disable=g-import-not-at-top
    any_failed = parallel.process_any(bool(failed))
  else:
    any_failed = bool(failed)
  if failed:
    lines = [f"{failed} of the {total} examples failed validation (read at start-up; set "
             "config.data.validate=False to skip this check):"]
    for kind, msgs in sorted(problems.items()):
      lines.append(f"  {kind}: {len(msgs)}")
      lines.extend(f"    {m}" for m in msgs[:5])
    raise DatasetError("\n".join(lines), kind="validation")
  if any_failed:
    raise DatasetError("another process found invalid data at start-up; its log names the "
                       "files", kind="validation")
  logging.info("validated %d examples in %d on-disk sources", total, len(leaves))
  return total
