"""The run's workdir: its path and the lock that keeps one run per workdir.

``--workdir`` holds a run's checkpoints and logs; two runs writing one workdir interleave
checkpoint writes and metric logs (a Slurm requeue while the old job still lives is the
usual way it happens). :class:`WorkdirLock` makes the second run refuse at once, naming the
host and process that hold the workdir:

* the lock is the file ``<workdir>/.lock`` created atomically (``O_EXCL``), holding the
  host name, PID, the PID's start time and the time the run started;
* the holder touches it every ``heartbeat_s`` seconds from a daemon thread;
* a lock is *stale*, and is taken over with a warning, when its process is gone (same host:
  the PID no longer exists, or it is another process that reused the PID) or, for a lock
  written on another host, when its heartbeat is older than ``stale_after_s``;
* it is removed when the run ends (normally or with an error); a ``kill -9`` leaves it,
  and the next run takes it over as stale.

Only process 0 of a multi-process run holds the lock; the trainer broadcasts the outcome so
that every process stops together. Non-local workdirs (``gs://...``) have no atomic
create-exclusive; they are not locked (a log line says so).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from absl import logging
from etils import epath

from contrastjax.errors import ConfigError

LOCK_NAME = ".lock"


class RunWriteError(OSError):
  """Writing the run's records (metrics, TensorBoard events, pictures, curves) into the
  workdir failed, e.g. a full disk; the checkpoints are intact (exit status 6)."""


class WorkdirError(OSError):
  """A workdir that cannot be used: held by another run, not writable, or missing."""


class WorkdirBusyError(WorkdirError):
  """Another live run holds the workdir's lock."""


class WorkdirNotFoundError(WorkdirError, FileNotFoundError):
  """A workdir that should hold a run's checkpoints does not (e.g. a mistyped path)."""


def is_remote(path: str) -> bool:
  """True for URL-style paths (``gs://bucket/run``, ``s3://...``)."""
  return "://" in str(path)


def resolve(path: str) -> str:
  """The absolute form of a workdir path; URL-style paths (``gs://``) are left as given
  (``os.path.abspath`` would turn ``gs://b/run`` into ``<cwd>/gs:/b/run``)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def _proc_start_time(pid: int) -> str | None:
  """The start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # Field 22 (starttime); the command name (field 2) may contain spaces, so split after ')'.
  fields = stat.rsplit(")", 1)[-1].split()
  return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  now_start = _proc_start_time(pid)
  if start is not None and now_start is not None and now_start != start:
    return False  # the PID was reused by another process
  return True


class WorkdirLock:
  """One run per workdir (see the module docstring)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0,
               stale_after_s: float = 300.0):
    self.workdir = resolve(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self.heartbeat_s = float(heartbeat_s)
    self.stale_after_s = float(stale_after_s)
    self._held = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    pid = os.getpid()
    self.info = dict(host=socket.gethostname(), pid=pid,
                     pid_start=_proc_start_time(pid), started=time.time())

  # ------------------------------------------------------------------ queries
  def read(self) -> dict[str, Any] | None:
    """The holder's record, or None (no lock, or an unreadable/partial file)."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _stale_reason(self, holder: dict[str, Any] | None) -> str | None:
    """Why the existing lock is stale, or None when its run is alive."""
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return "it disappeared"
    if holder is None:
      # Unreadable: a writer killed between create and write, or garbage. Wait for the
      # writer's heartbeat window before taking it over.
      return f"it is unreadable and {age:.0f} s old" if age > self.heartbeat_s else None
    if holder.get("host") == self.info["host"]:
      pid = int(holder.get("pid", -1))
      if pid == self.info["pid"]:
        return "this process holds it"
      if not _pid_alive(pid, holder.get("pid_start")):
        return f"process {pid} on this host is gone"
      return None
    if age > self.stale_after_s:
      return (f"its heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s) and it "
              f"was written on another host ({holder.get('host')})")
    return None

  # ------------------------------------------------------------------ acquire / release
  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder.

    Raises:
      WorkdirBusyError: A live run holds the workdir.
      WorkdirError: The workdir cannot be created or written.
    """
    if is_remote(self.workdir):
      logging.info("workdir %s is not local: it is not locked against a second run",
                   self.workdir)
      return
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"cannot create the workdir {self.workdir}: {e}") from None
    record = json.dumps(self.info)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self.read()
        reason = self._stale_reason(holder)
        if reason is None:
          h = holder or {}
          started = h.get("started")
          when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
                  if started else "an unknown time")
          raise WorkdirBusyError(
              f"workdir {self.workdir} is in use by another run: PID {h.get('pid')} on "
              f"host {h.get('host')}, started {when} (lock file {self.path}). Stop that "
              "run or use another --workdir; the lock of a run that died is taken over "
              "automatically.") from None
        logging.warning("taking over the stale lock %s (%s; it was held by PID %s on %s)",
                        self.path, reason, (holder or {}).get("pid"),
                        (holder or {}).get("host"))
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      except OSError as e:
        raise WorkdirError(f"cannot write the lock file {self.path} in the workdir: "
                           f"{e}") from None
      with os.fdopen(fd, "w") as f:
        f.write(record)
      self._held = True
      break
    else:
      raise WorkdirBusyError(f"could not take the lock {self.path}: another run keeps "
                             "taking it at the same time")
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name="workdir-lock-heartbeat")
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError:
        pass  # the disk may be full or gone; the run itself reports that

  def release(self) -> None:
    """Removes the lock if this process holds it (idempotent)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    if not self._held:
      return
    self._held = False
    holder = self.read()
    if holder is not None and (holder.get("host"), holder.get("pid")) != (
        self.info["host"], self.info["pid"]):
      logging.warning("the lock %s is now held by PID %s on %s; leaving it", self.path,
                      holder.get("pid"), holder.get("host"))
      return
    try:
      os.remove(self.path)
    except OSError:
      pass

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ----------------------------------------------------------------------------- the run's config
CONFIG_NAME = "config.json"

#: Config keys that change how a run reports or saves, not what it computes: a resumed run
#: may change them without ``--allow_config_change``. ``mesh`` is here because resuming a
#: run on another slice is a supported move (orbax reshards; results agree up to float
#: rounding). Anything else that differs from the workdir's ``config.json`` stops a resume.
RESUME_FREE_KEYS = ("progress_bar", "tensorboard", "plot_curves", "compile_ahead",
                    "async_checkpointing", "log_every_steps", "log_every_epochs",
                    "keep_checkpoints", "eval_samples", "mesh", "data.worker_count",
                    "data.validate",
                    # A prepared copy yields the folder reader's examples, and is read only
                    # under the same content (data.prepared.split_sources): moving a run to
                    # it (e.g. onto a pod) changes nothing that is computed.
                    "data.format", "data.tfds_dir", "data.tfds_name")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(old: dict[str, Any], new: dict[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """``(key, old value, new value)`` for every key whose value differs between two
  configs (as JSON trees), the keys of :data:`RESUME_FREE_KEYS` left out. A key only one
  config has is paired with the string ``"<absent>"``."""
  a, b = _flatten(old), _flatten(new)
  free_trees = tuple(f + "." for f in RESUME_FREE_KEYS)
  out = []
  for key in sorted(set(a) | set(b)):
    if key in RESUME_FREE_KEYS or key.startswith(free_trees):
      continue
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va != vb:
      out.append((key, va, vb))
  return out


def check_resumed_config(workdir: str, config_json: str, resume_step: int, *,
                         allow_change: bool) -> None:
  """Stops a resume whose config differs from the one that wrote the workdir's checkpoints
  (``<workdir>/config.json``), before anything is computed: the checkpoints would
  continue under other settings (another learning rate, loss weight or dataset) and the
  run would mix two experiments. With ``allow_change`` the run goes on: the differences
  are logged and the old file is kept as ``config.<resume_step>.json`` (the new one is
  written as ``config.json`` by the run).

  Raises:
    ConfigError: the configs differ and ``allow_change`` is False (the message names up to
      ten differing keys with both values, and the flag).
  """
  path = epath.Path(workdir) / CONFIG_NAME
  if not path.exists():
    logging.warning("%s does not exist: cannot check that this run continues the config of "
                    "checkpoint %d", path, resume_step)
    return
  try:
    old = json.loads(path.read_text())
  except ValueError as e:
    logging.warning("%s is not valid JSON (%s): cannot check that this run continues the "
                    "config of checkpoint %d", path, e, resume_step)
    return
  changes = config_changes(old, json.loads(config_json))
  if not changes:
    return
  lines = [f"config.{k}: {va!r} in the workdir, {vb!r} now" for k, va, vb in changes[:10]]
  if len(changes) > 10:
    lines.append(f"... and {len(changes) - 10} more")
  what = "; ".join(lines)
  if not allow_change:
    raise ConfigError(
        f"the workdir {workdir} holds checkpoints (up to step {resume_step}) of another "
        f"config ({path}): {what}. Resume with the config that wrote it, train in another "
        "--workdir, or pass --allow_config_change to continue from checkpoint "
        f"{resume_step} under the new config (the old one is then kept as "
        f"config.{resume_step}.json)")
  kept = epath.Path(workdir) / f"config.{resume_step}.json"
  kept.write_text(path.read_text())
  logging.warning("--allow_config_change: continuing checkpoint %d under a changed config "
                  "(%s); the old config is kept in %s", resume_step, what, kept)
