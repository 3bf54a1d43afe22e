"""What the command-line tools share: expected errors as one line and an exit code.

A misspelt config key, a bad data file, a workdir held by another run, a diverged run or a
full disk are expected: the user gets one line naming the key, file or path and what was
expected, and a documented exit status. The traceback is printed only with
``--verbosity=1`` (or ``-v 1``); any other exception is a bug and keeps its traceback.

======  ===========================================================================
status  meaning
======  ===========================================================================
0       done
1       an unexpected error (a bug: the traceback is printed)
2       config or usage: a misspelt or mistyped key, an unknown variant, a bad value
3       training diverged (NaN/Inf); the last good checkpoint is kept
4       data: a missing, unreadable or malformed file, an empty split
5       workdir: in use by another run, missing, or not writable
6       checkpoint or disk I/O failed (e.g. no space left on device)
======  ===========================================================================
"""
from __future__ import annotations

import logging as std_logging
import re
import sys
import threading
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from contrastjax.errors import ConfigError

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_DATA = 4
EXIT_WORKDIR = 5
EXIT_IO = 6


def exit_code(e: BaseException) -> int | None:
  """The exit status of an expected error, or None for anything else (a bug)."""
  # Imported here, not at the top: ``python -m contrastjax.train`` runs the trainer as
  # ``__main__``; the exception classes live in modules imported under one name only.
  from contrastjax import checkpoint  # pylint: disable=g-import-not-at-top
  from contrastjax import workdir  # pylint: disable=g-import-not-at-top
  from contrastjax.data.errors import DatasetError  # pylint: disable=g-import-not-at-top
  from contrastjax.errors import DivergenceError  # pylint: disable=g-import-not-at-top
  if isinstance(e, DivergenceError):
    return EXIT_DIVERGED
  if isinstance(e, DatasetError):
    return EXIT_DATA
  if isinstance(e, workdir.WorkdirError):
    return EXIT_WORKDIR
  if isinstance(e, (ConfigError, app.UsageError, flags.Error)):
    return EXIT_CONFIG
  if isinstance(e, checkpoint.CheckpointSaveError):
    return EXIT_IO
  if isinstance(e, FileNotFoundError):  # a missing workdir, dataset folder or weights file
    return EXIT_DATA
  if isinstance(e, OSError):  # e.g. no space left while writing logs
    return EXIT_IO
  return None


def _verbose(argv: Sequence[str]) -> bool:
  for i, a in enumerate(argv):
    if a.startswith("--verbosity=") or a.startswith("-v="):
      value = a.split("=", 1)[1]
    elif a in ("--verbosity", "-v") and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    try:
      return int(value) >= 1
    except ValueError:
      return False
  return False


def fail(e: BaseException, code: int, verbose: bool) -> None:
  """Prints ``ERROR: <first lines of e>`` (and the traceback when verbose); exits."""
  if verbose:
    logging.exception("%s", e)
  text = str(e) or type(e).__name__
  print(f"ERROR: {text}", file=sys.stderr)
  if not verbose:
    print("(exit status %d; rerun with --verbosity=1 for the traceback)" % code,
          file=sys.stderr)
  sys.exit(code)


def _unknown_key_message(text: str, argv: Sequence[str]) -> str:
  """'--config.optimizer.lrr=1: 'lrr' is not a key of the config (did you mean 'lr'?)'
  from ml_collections' ``AttributeError("'lrr'\\nDid you mean ...")``."""
  text = text.replace("\\n", "\n").replace("\\'", "'")
  key = re.search(r"'([^'\\]+)'", text)
  key = key.group(1) if key else text.strip("'\"")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  flag = next((a.split("=", 1)[0] for a in argv
               if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")),
              f"--config...{key}")
  return (f"{flag}: {key!r} is not a key of the config" +
          (f" (did you mean {hint.group(1)!r}?)" if hint else "") +
          "; overrides can only set keys the config file defines")


def _config_file_error(message: str) -> str:
  """ml_collections reports an exception raised by a config file's ``get_config`` (an
  unknown variant, a bad config argument) as a flag error whose text holds the whole
  traceback; keeps the flag and the exception's own line, without its class path:
  ``flag --config=configs/apc_voc.py:nope: config argument 'nope' ... is not known; ...``."""
  head, sep, tail = message.partition("Error whilst parsing config file:")
  if not sep or _TRACEBACK.strip() not in tail:
    return message
  lines = [l for l in tail.splitlines() if l.strip()]
  last = lines[-1].strip() if lines else tail.strip()
  m = re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Warning|Exit)\w*: (.*)$", last)
  return head.rstrip() + " " + (m.group(2) if m else last)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections reports a misspelt --config.key as an AttributeError/KeyError from
    # inside flag parsing; absl as flags.Error. Both are usage errors.
    verbose = _verbose(argv)
    cause = e
    while isinstance(cause, flags.Error) and cause.__cause__ is not None:
      cause = cause.__cause__
    message = str(cause) if cause is not e else str(e)
    if isinstance(cause, (AttributeError, KeyError)):
      message = _unknown_key_message(message, argv)
    message = _config_file_error(message)
    fail(ConfigError(message), EXIT_CONFIG, verbose)
    raise  # not reached


_TRACEBACK = "Traceback (most recent call last):\n"


class _DropClosedLoopTracebacks:
  """A ``sys.stderr`` wrapper that drops the tracebacks ending in ``RuntimeError: Event
  loop is closed``.

  After a failed asynchronous checkpoint write, tensorstore completes the remaining writes
  into orbax's already closed event loop; each completion prints such a traceback from
  C++ (hundreds after a full disk), and they say nothing the one-line error does not.
  Everything else passes through at once (partial lines too: tqdm redraws with ``\r``);
  only a block starting with ``Traceback`` is held until its last line.
  """

  def __init__(self, stream):
    self._stream = stream
    # Per writing thread: an incomplete line that may start a traceback, and the lines of
    # a traceback being held. Tensorstore's threads print their tracebacks at the same
    # time, piece by piece; one buffer for all would splice them into each other.
    self._threads: dict[int, tuple[str, list[str] | None]] = {}
    self._lock = threading.Lock()

  def write(self, text: str) -> int:
    with self._lock:
      pending, held = self._threads.get(threading.get_ident(), ("", None))
      pending += text
      out = []
      while "\n" in pending:
        line, pending = pending.split("\n", 1)
        line += "\n"
        if held is None:
          if line == _TRACEBACK:
            held = [line]
          else:
            out.append(line)
        else:
          held.append(line)
          if not line.startswith(" "):  # the exception line ends the block
            if line.strip() != "RuntimeError: Event loop is closed":
              out.extend(held)
            held = None
      if held is None and pending and not _TRACEBACK.startswith(pending):
        out.append(pending)
        pending = ""
      if pending or held is not None:
        self._threads[threading.get_ident()] = (pending, held)
      else:
        self._threads.pop(threading.get_ident(), None)
      if out:
        self._stream.write("".join(out))
    return len(text)

  def flush(self) -> None:
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _quiet_writer_thread_errors(args) -> None:
  """``threading.excepthook`` for the command-line tools: an ``OSError`` that kills a
  library's background writer thread (tensorboardX's event writer on a full disk) is one
  warning line; the run's own error (the failed checkpoint save) is reported, once, by
  :func:`fail`. Any other uncaught thread exception keeps Python's traceback."""
  frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
  if (isinstance(args.exc_value, OSError)
      and any("/tensorboardX/" in f.filename for f in frames)):
    logging.warning("the TensorBoard event writer stopped: %s (metrics.jsonl has the "
                    "metrics)", args.exc_value)
    return
  threading.__excepthook__(args)


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run(main)`` with expected errors turned into one line + exit status."""
  verbose = _verbose(sys.argv)

  def wrapped(argv):
    if not verbose:  # installed after absl's logging set-up, which keeps its own stream
      sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
      threading.excepthook = _quiet_writer_thread_errors
    try:
      main(argv)
    except SystemExit:
      raise
    except BaseException as e:  # pylint: disable=broad-except
      code = exit_code(e)
      if code is None:
        raise
      fail(e, code, verbose)

  app.run(wrapped, flags_parser=_parse_flags)


def quiet_library_logs() -> None:
  """Drops INFO lines of orbax/grain/tensorstore/TFDS (dozens per checkpoint) so the progress
  bar and our own messages stay readable; their warnings still show, and their errors
  (unless ``--verbosity`` is raised) are summarised by our own one-line message."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
  std_logging.getLogger("absl").addFilter(_QuietLibraries())


class _QuietLibraries:
  noisy = ("/orbax/", "/grain/", "/tensorstore/", "/tensorflow_datasets/")

  def _noisy(self, record) -> bool:
    if any(n in record.pathname for n in self.noisy):
      return True
    # asyncio's "Future exception was never retrieved" for a failed orbax/tensorstore
    # write (one per array after a full disk) is logged from asyncio's own file; its
    # traceback says where it came from.
    exc = record.exc_info[1] if record.exc_info else None
    if record.name == "asyncio" and exc is not None:
      frames = traceback.extract_tb(exc.__traceback__)
      return any(n in f.filename for f in frames for n in self.noisy)
    return False

  def filter(self, record) -> bool:
    if not self._noisy(record):
      return True
    if record.levelno >= std_logging.ERROR:
      return flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1
    return record.levelno >= std_logging.WARNING
