"""Shared helpers of the subprocess tests: the training command line, checkpoint folders,
kill -9 windows and bitwise comparisons of what a run left on disk.

Moved here from ``test_faults.py`` (``cli``/``steps``/``variables``/
``assert_same_variables``/``env``) and extended for the per-method resume tests
(``test_pins_methods.py``): waiting helpers, the full on-disk train state (optimizer,
plateau, RNG and method state included) and the metrics a run logged.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from contrastjax import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(REPO, "tests", "_toy_config.py")

#: Metrics that measure time, not training: left out of the metric comparisons.
TIMING_KEYS = ("train/images_per_sec", "train/elapsed_s")


def env(**extra):
  """The environment of a subprocess run: ``tests/`` importable (the toy method), the
  persistent compilation cache off unless ``extra`` names a folder for it."""
  e = dict(os.environ)
  e["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(REPO, "tests"), REPO, e.get("PYTHONPATH", "")])
  e["CONTRASTJAX_COMPILATION_CACHE"] = "0"
  e.update(extra)
  return e


#: ``python tests/_fault_cli.py``: the trainer with a pause before a checkpoint's commit.
FAULT_CLI = os.path.join(REPO, "tests", "_fault_cli.py")


def cli(workdir, args=(), extra_flags=(), *, config=TOY_CONFIG, env_extra=None,
        entry=None, **kw):
  """``python -m contrastjax.train --config=CONFIG[:args] --workdir=WORKDIR [flags]``
  (``entry``: a script run instead of the module, e.g. :data:`FAULT_CLI`)."""
  config = config + (("," if ":" in os.path.basename(config) else ":") + ",".join(args)
                     if args else "")
  program = ["-m", "contrastjax.train"] if entry is None else [entry]
  return subprocess.Popen(
      [sys.executable, *program, f"--config={config}",
       f"--workdir={workdir}", *extra_flags],
      env=env(**(env_extra or {})), cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=900):
  """Waits for ``proc``; asserts it exited 0 (its stderr tail in the message)."""
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-6000:]}"
  return out, err


def steps(folder):
  """The committed checkpoint steps in ``folder`` (orbax's temporary folders, not yet
  renamed to their step, are not counted)."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def variables(workdir, which):
  v = ckpt_lib.load_variables(str(workdir), which)
  return jax.tree.leaves((v["params"], v["model_state"]))


def assert_same_variables(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def wait_until(predicate, proc, *, timeout=600, what="the condition", poll=0.01):
  """Polls ``predicate()`` until true; fails if ``proc`` ends first or on timeout."""
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n"
                           f"{err[-6000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      proc.communicate()
      raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    time.sleep(poll)


def kill9(proc):
  """SIGKILL (no handler runs, no checkpoint is finished) and reap the process."""
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, proc.returncode


def raw_state(workdir, which, series=ckpt_lib.CHECKPOINTS):
  """The whole ``state`` item of checkpoint ``workdir/series/which`` as a nested dict of
  numpy arrays: params, model state, optimizer state, plateau state, method ``extra``,
  RNG and step. Read with orbax's PyTree reader, without the model or the optimizer."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(workdir), series, str(which), "state")
  reader = ocp.PyTreeCheckpointer()
  meta = reader.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def loop_state(workdir, which, series=ckpt_lib.CHECKPOINTS):
  """The host-side loop state (best value/step, early-stopping counter, last evaluation)
  saved beside the train state."""
  with open(os.path.join(str(workdir), series, str(which), "loop", "metadata")) as f:
    return json.load(f)


def assert_trees_equal(a, b, where="state"):
  """Bitwise equality of two nested dict/list trees of arrays, naming the first leaf
  that differs (its path) instead of only its index."""
  fa = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(a)}
  fb = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(b)}
  assert sorted(fa) == sorted(fb), (where, sorted(set(fa) ^ set(fb))[:10])
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, (where + k, x.dtype, y.dtype,
                                                        x.shape, y.shape)
    if not np.array_equal(x, y, equal_nan=True):
      diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
      raise AssertionError(f"{where}{k} differs (max abs diff {np.nanmax(diff):.3g})")


def records(workdir):
  """metrics.jsonl as a list of dicts (one per write)."""
  with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def train_rows(workdir):
  """``[(step, {train/... metrics but the timing ones})]`` in file order."""
  return [(r["step"], {k: v for k, v in r.items()
                       if k.startswith("train/") and k not in TIMING_KEYS})
          for r in records(workdir) if "train/loss" in r]


def eval_rows(workdir):
  """``[(step, {evaluation metrics but *eval_seconds})]`` in file order."""
  return [(r["step"], {k: v for k, v in r.items() if k != "step"
                       and not k.startswith("train/") and not k.endswith("eval_seconds")})
          for r in records(workdir) if "train/loss" not in r]


def build_run(config, method, mesh, rng, global_example, total_steps):
  """The compiled-run pieces of the spine (``create``, ``abstract`` state with shardings,
  ``state_sharding``, ``compiled`` steps, ``tx``): ``spine.build_run`` since the trainer
  was split into named pieces (3e42297), ``train.build_machinery`` before. One name for
  both, so that the pin tests run unchanged on either side of that refactor."""
  from contrastjax import spine  # pylint: disable=g-import-not-at-top
  if hasattr(spine, "build_run"):
    return spine.build_run(config, method, mesh, rng, global_example, total_steps)
  from contrastjax import train  # pylint: disable=g-import-not-at-top
  return train.build_machinery(config, method, mesh, rng, global_example, total_steps)
