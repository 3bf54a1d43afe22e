"""Faults a user meets: kills at the wrong moment, divergence after a finite loss, data a
rule cannot read, two runs on one workdir, a full disk, mistyped paths. Each test fails
on the code before the fix (fc6e996) and pins the behaviour the README promises."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

import _toy
from _harness import REPO, TOY_CONFIG
from _harness import assert_same_variables as _assert_same_variables
from _harness import cli as _cli
from _harness import env as _env
from _harness import steps as _steps
from _harness import variables as _variables
from contrastjax import metric_writer
from contrastjax import train as train_lib
from contrastjax import workdir as workdir_lib
from contrastjax.data.errors import DatasetError


# ----------------------------------------------------------------------------- bug 1
@pytest.mark.slow
def test_kill_after_best_before_rolling_checkpoint_resumes(tmp_path):
  """kill -9 after ``best/N`` is committed and before ``checkpoints/N``: the rerun
  restores an earlier step, replays N bit for bit and rewrites ``best/N`` (orbax used to
  raise StepAlreadyExistsError on every rerun); the final and best checkpoints and the
  metrics equal an uninterrupted run's, and no step is logged twice."""
  args = ("total_steps=40", "ckpt_every_steps=20", "eval_every_steps=4",
          "async_checkpointing=true", "toy_step_sleep=0.05")
  ref = tmp_path / "ref"
  p = _cli(ref, args)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err

  killed = tmp_path / "killed"
  p = _cli(killed, args)
  t0 = time.time()
  while True:  # the window: a best checkpoint newer than every rolling checkpoint
    best, rolling = _steps(killed / "best"), _steps(killed / "checkpoints")
    if best and best[-1] > 20 and not rolling[-1:] == [40] and (
        not rolling or best[-1] > rolling[-1]):
      break
    assert p.poll() is None, p.communicate()[1]
    assert time.time() - t0 < 300, "the run never reached the window"
    time.sleep(0.01)
  p.send_signal(signal.SIGKILL)
  p.wait()
  best, rolling = _steps(killed / "best"), _steps(killed / "checkpoints")
  assert best and (not rolling or best[-1] > rolling[-1]), (best, rolling)

  p = _cli(killed, args)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err
  assert _steps(killed / "best") == _steps(ref / "best")
  _assert_same_variables(_variables(ref, 40), _variables(killed, 40))
  _assert_same_variables(_variables(ref, "best"), _variables(killed, "best"))
  # Each step logged once, with the uninterrupted run's values.
  lines = [json.loads(l) for l in open(killed / "metrics.jsonl")]
  train_steps = [l["step"] for l in lines if "train/loss" in l]
  assert train_steps == sorted(set(train_steps)) == list(range(2, 41, 2))
  ref_lines = [json.loads(l) for l in open(ref / "metrics.jsonl")]
  assert ([l["train/loss"] for l in lines if "train/loss" in l]
          == [l["train/loss"] for l in ref_lines if "train/loss" in l])
  assert not os.path.exists(killed / workdir_lib.LOCK_NAME)


def test_stale_best_checkpoint_of_the_same_step_is_replaced(tmp_path):
  """The on-disk state such a kill leaves, rebuilt exactly: a finished run whose rolling
  checkpoints after step 6 are removed (orbax commits are atomic renames, so this is what
  the disk holds). The rerun must finish and equal the uninterrupted run."""
  cfg = _toy.toy_config(total_steps=12, ckpt_every_steps=6, eval_every_steps=4)
  ref = tmp_path / "ref"
  train_lib.train_and_evaluate(cfg, str(ref))
  best_step = _steps(ref / "best")[-1]
  assert best_step > 6  # the case under test: the best was saved after checkpoint 6
  killed = tmp_path / "killed"
  shutil.copytree(ref, killed)
  shutil.rmtree(killed / "checkpoints" / "12")
  train_lib.train_and_evaluate(cfg, str(killed))
  _assert_same_variables(_variables(ref, 12), _variables(killed, 12))
  _assert_same_variables(_variables(ref, "best"), _variables(killed, "best"))
  # A fresh start beside a stale best checkpoint (killed before any rolling checkpoint).
  fresh = tmp_path / "fresh"
  shutil.copytree(ref, fresh)
  shutil.rmtree(fresh / "checkpoints")
  train_lib.train_and_evaluate(cfg, str(fresh))
  _assert_same_variables(_variables(ref, "best"), _variables(fresh, "best"))


def test_kill_after_rolling_before_best_checkpoint_rewrites_the_best(tmp_path):
  """The other order of the two asynchronous saves of a new best step: the rolling
  checkpoint committed, the best one did not (found by CI: ConDSeg's kill/resume test,
  killed between the two). The rerun restores that step, whose state is the best
  state, and writes the best checkpoint again: equal to the uninterrupted run's."""
  cfg = _toy.toy_config(total_steps=12, ckpt_every_steps=4, eval_every_steps=4)
  ref = tmp_path / "ref"
  train_lib.train_and_evaluate(cfg, str(ref))
  assert _steps(ref / "best") == [12]  # the toy's last evaluation is its best
  killed = tmp_path / "killed"
  shutil.copytree(ref, killed)
  shutil.rmtree(killed / "best" / "12")  # killed after checkpoints/12 committed
  train_lib.train_and_evaluate(cfg, str(killed))
  assert _steps(killed / "best") == [12]
  _assert_same_variables(_variables(ref, "best"), _variables(killed, "best"))
  _assert_same_variables(_variables(ref, 12), _variables(killed, 12))


# ----------------------------------------------------------------------------- bug 2
@pytest.mark.parametrize("total", [9, 7])
def test_update_that_makes_parameters_non_finite_is_never_saved(tmp_path, total):
  """The loss of step 7 is finite (computed before the update), but lr=1e39 makes the
  parameters infinite. Nothing non-finite is saved, the error names step 7 and the last
  finite checkpoint, and a run that diverges at its last step does not finish as done."""
  workdir = str(tmp_path)
  train_lib.train_and_evaluate(_toy.toy_config(total_steps=6, ckpt_every_steps=3),
                               workdir)
  cfg = _toy.toy_config(total_steps=total, ckpt_every_steps=1)
  cfg.optimizer.lr = 1e39
  with pytest.raises(train_lib.DivergenceError) as e:
    train_lib.train_and_evaluate(cfg, workdir, allow_config_change=True)
  text = str(e.value)
  assert "at step 7" in text and "param_norm=" in text and "last good checkpoint is step 6" in text
  assert _steps(tmp_path / "checkpoints") == [3, 6]
  for x in _variables(tmp_path, "latest"):
    assert np.isfinite(x).all()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(l["step"] <= 7 for l in lines)
  assert not any(str(v) in ("nan", "inf") for l in lines for k, v in l.items()
                 if k.startswith("val/"))


def test_restoring_a_non_finite_checkpoint_is_a_named_error(tmp_path, monkeypatch):
  """A NaN checkpoint written by an older version (simulated: the checks switched off)
  is not resumed from silently."""
  cfg = _toy.toy_config(total_steps=3, ckpt_every_steps=3)
  train_lib.train_and_evaluate(cfg, str(tmp_path))
  with monkeypatch.context() as m:  # the old trainer: only the loss was checked
    m.setattr(train_lib.loop, "FINITE_METRICS", ("loss",))
    m.setattr(train_lib.spine, "state_is_finite", lambda state: True)
    bad = _toy.toy_config(total_steps=4, ckpt_every_steps=1, eval_every_steps=0)
    bad.optimizer.lr = 1e39
    train_lib.train_and_evaluate(bad, str(tmp_path), allow_config_change=True)
  assert not all(np.isfinite(x).all() for x in _variables(tmp_path, 4))
  with pytest.raises(train_lib.DivergenceError, match=r"checkpoint 4 .*non-finite.*delete"):
    train_lib.train_and_evaluate(_toy.toy_config(total_steps=6), str(tmp_path),
                                 allow_config_change=True)


def test_cli_divergence_exit_code_and_one_line(tmp_path):
  p = _cli(tmp_path, ("toy_nan_at_step=5",))
  out, err = p.communicate(timeout=300)
  assert p.returncode == 3, err
  lines = [l for l in err.splitlines() if l.startswith("ERROR: ")]
  assert len(lines) == 1 and "loss is nan at step 5" in lines[0]
  assert "Traceback" not in err
  assert "last good checkpoint is step 3" in lines[0]


# ----------------------------------------------------------------------------- bug 3
def _kvasir_with_01_masks(root):
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    os.makedirs(root / sub)
  ids = [f"im{i}" for i in range(12)]
  for i in ids:
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(root / "images" / f"{i}.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 6:18] = 1  # 0/1, as some converted datasets store them
    Image.fromarray(mask).save(root / "masks" / f"{i}.png")
  (root / "train.txt").write_text("\n".join(ids[:8]))
  (root / "val.txt").write_text("\n".join(ids[8:]))


def test_masks_the_threshold_rule_would_empty_stop_the_run_at_start_up(tmp_path):
  from contrastjax.configs import condseg  # pylint: disable=g-import-not-at-top
  root = tmp_path / "Kvasir-SEG"
  _kvasir_with_01_masks(root)
  config = condseg.get_config("kvasir_seg", f"stage1,root={root}")
  config.data.binarize = "threshold"  # the ISIC configs' rule, on 0/1 masks
  config.batch_size = 8
  config.eval_batch_size = 8
  config.progress_bar = False
  with pytest.raises(DatasetError) as e:
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))
  text = str(e.value)
  assert "12 of the 12 examples failed validation" in text
  assert "label_mask_under_threshold_rule: 12" in text and "im0.png" in text
  assert "binarize='nonzero'" in text
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


def test_validation_switch_and_auto_limit(tmp_path, monkeypatch):
  from contrastjax.data.sources import medseg  # pylint: disable=g-import-not-at-top
  from contrastjax.data import validation  # pylint: disable=g-import-not-at-top
  root = tmp_path / "Kvasir-SEG"
  _kvasir_with_01_masks(root)
  sources = {s: medseg.MedSegSource(root, s, binarize="threshold") for s in ("train", "val")}
  assert validation.check_sources(sources, False) == 0  # the switch: nothing read
  with pytest.raises(DatasetError, match="12 of the 12"):
    validation.check_sources(sources, "auto", progress=False)
  monkeypatch.setattr(validation, "AUTO_MAX_EXAMPLES", 5)  # too many for 'auto': skipped
  assert validation.check_sources(sources, "auto") == 0
  with pytest.raises(DatasetError):
    validation.check_sources(sources, True, progress=False)  # True reads them anyway
  ok = {s: medseg.MedSegSource(root, s, binarize="nonzero") for s in ("train", "val")}
  assert validation.check_sources(ok, True, progress=False) == 12
  with pytest.raises(ValueError, match="config.data.validate='yes'"):
    validation.check_sources(ok, "yes")


# ----------------------------------------------------------------------------- bug 4
def test_second_run_on_a_workdir_refuses_naming_the_holder(tmp_path):
  args = ("total_steps=100000", "ckpt_every_steps=100000", "eval_every_steps=0",
          "toy_step_sleep=0.01")
  first = _cli(tmp_path, args)
  try:
    t0 = time.time()
    while not (tmp_path / "metrics.jsonl").exists():
      assert first.poll() is None, first.communicate()[1]
      assert time.time() - t0 < 240
      time.sleep(0.05)
    second = _cli(tmp_path, args)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 5, err
    line = [l for l in err.splitlines() if l.startswith("ERROR: ")][0]
    assert f"PID {first.pid}" in line and os.uname().nodename in line
    assert first.poll() is None  # the first run goes on
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=240)
  assert first.returncode == 0
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()  # released at the end


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / workdir_lib.LOCK_NAME).write_text(json.dumps(
      dict(host=os.uname().nodename, pid=dead.pid, pid_start=None, started=time.time())))
  with caplog.at_level("WARNING"):
    with workdir_lib.WorkdirLock(str(tmp_path)) as lock:
      assert lock.read()["pid"] == os.getpid()
  assert f"process {dead.pid} on this host is gone" in caplog.text
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()


def test_lock_held_by_a_live_process_and_by_another_host(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from contrastjax import workdir
          lock = workdir.WorkdirLock({str(tmp_path)!r})
          lock.acquire()
          print("held", flush=True)
          time.sleep(60)
          """)], env=_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"PID {holder.pid} on host"):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  # A lock from another host is live while its heartbeat is fresh, stale after.
  path = tmp_path / workdir_lib.LOCK_NAME
  path.write_text(json.dumps(dict(host="other-node", pid=1, started=time.time())))
  with pytest.raises(workdir_lib.WorkdirBusyError, match="other-node"):
    workdir_lib.WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
  old = time.time() - 120
  os.utime(path, (old, old))
  lock = workdir_lib.WorkdirLock(str(tmp_path), stale_after_s=60)
  lock.acquire()
  lock.release()
  assert not path.exists()


# ----------------------------------------------------------------------------- bug 5
@pytest.fixture
def tiny_tmpfs(tmp_path):
  """A 2 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
  mnt = _mount_tmpfs(tmp_path / "tmpfs", "2m")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _mount_tmpfs(mnt, size):
  """Mounts a tmpfs of ``size`` on the new folder ``mnt`` (skips the test where mounting
  is not allowed: it needs root)."""
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
  return mnt


@pytest.mark.slow
def test_full_disk_stops_at_the_failed_save_with_one_line(tiny_tmpfs):
  # ~1.3 MB per checkpoint (4096-wide toy, random weights, Adam moments): the first
  # checkpoint fits the 2 MiB disk, the second does not.
  workdir = tiny_tmpfs / "run"
  args = ("total_steps=30", "ckpt_every_steps=3", "eval_every_steps=0",
          "async_checkpointing=true", "toy_width=4096", "toy_step_sleep=0.05",
          "tensorboard=false")
  p = _cli(workdir, args)
  out, err = p.communicate(timeout=600)
  assert p.returncode == 6, err
  errors = [l for l in err.splitlines() if l.startswith("ERROR: ")]
  assert len(errors) == 1, err
  assert ("saving checkpoint 6 to " + str(workdir / "checkpoints" / "6") in errors[0]
          and "[Errno 28] No space left on device" in errors[0]
          and "step 3, is intact" in errors[0]), errors[0]
  assert "Traceback" not in err and "Event loop is closed" not in err
  assert len(err.splitlines()) < 40, err
  # It stopped at the failed save, not steps later.
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert max(l["step"] for l in lines) <= 8
  assert _steps(workdir / "checkpoints") == [3]
  for x in _variables(workdir, 3):
    assert np.isfinite(x).all()


# ----------------------------------------------------------------------------- also
def test_evaluate_on_a_mistyped_workdir_writes_nothing(tmp_path):
  from contrastjax import evaluate  # pylint: disable=g-import-not-at-top
  missing = tmp_path / "no_such_run"
  with pytest.raises(workdir_lib.WorkdirNotFoundError, match="does not exist"):
    evaluate.evaluate(_toy.toy_config(), str(missing))
  assert not missing.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(workdir_lib.WorkdirNotFoundError, match="holds no checkpoints"):
    evaluate.evaluate(_toy.toy_config(), str(empty))
  assert os.listdir(empty) == []


def test_misspelt_config_key_is_one_line_with_exit_code_2(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "contrastjax.train", f"--config={TOY_CONFIG}",
       "--config.optimizer.lrr=1", f"--workdir={tmp_path}"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr
  line = [l for l in p.stderr.splitlines() if l.startswith("ERROR: ")][0]
  assert line == ("ERROR: --config.optimizer.lrr: 'lrr' is not a key of the config (did you "
                  "mean 'lr'?); overrides can only set keys the config file defines")
  p = subprocess.run(
      [sys.executable, "-m", "contrastjax.train", f"--config={TOY_CONFIG}",
       "--config.optimizer.lrr=1", f"--workdir={tmp_path}", "--verbosity=1"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" in p.stderr


def test_read_metrics_takes_the_replayed_records(tmp_path):
  """Files written before replays were dropped hold replayed steps twice."""
  path = tmp_path / "metrics.jsonl"
  rows = [dict(step=2, **{"train/loss": 1.0}), dict(step=4, **{"train/loss": 0.9}),
          dict(step=4, **{"val/mIoU": 0.1}), dict(step=6, **{"train/loss": 0.8}),
          dict(step=4, **{"train/loss": 0.7}), dict(step=4, **{"val/mIoU": 0.2}),
          dict(step=6, **{"train/loss": 0.6})]
  path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 8, "train/lo')
  got = metric_writer.read_metrics(str(tmp_path))
  assert got == [dict(step=2, **{"train/loss": 1.0}),
                 dict(step=4, **{"train/loss": 0.7, "val/mIoU": 0.2}),
                 dict(step=6, **{"train/loss": 0.6})]
  # The writer itself drops the records after the step a run resumes from.
  w = metric_writer.MetricWriter(str(tmp_path), tensorboard=False, resume_step=4)
  w.close()
  assert [json.loads(l)["step"] for l in open(path)] == [2, 4, 4, 4, 4]


def test_stderr_filter_drops_only_closed_loop_tracebacks():
  import io  # pylint: disable=g-import-not-at-top
  from contrastjax import cli  # pylint: disable=g-import-not-at-top
  sink = io.StringIO()
  f = cli._DropClosedLoopTracebacks(sink)  # pylint: disable=protected-access
  closed = ("Traceback (most recent call last):\n"
            '  File "base_events.py", line 806, in call_soon_threadsafe\n'
            "    self._check_closed()\n"
            "RuntimeError: Event loop is closed\n")
  other = ("Traceback (most recent call last):\n"
           '  File "x.py", line 1, in <module>\n'
           "ValueError: kept\n")
  f.write("progress 10%\r")  # a partial line passes through at once
  assert sink.getvalue() == "progress 10%\r"
  for chunk in (closed[:20], closed[20:], "line\n", other, closed, "Trace"):
    f.write(chunk)
  f.write("back is a word\n")
  assert sink.getvalue() == "progress 10%\rline\n" + other + "Traceback is a word\n"


def test_log_filter_drops_asyncio_never_retrieved_from_orbax_writes():
  """asyncio logs "exception was never retrieved" (with the traceback) for each failed
  orbax write after a full disk; those are dropped, other asyncio errors are kept."""
  import logging  # pylint: disable=g-import-not-at-top
  from contrastjax import cli  # pylint: disable=g-import-not-at-top

  def raised_in(filename):
    code = compile("def f():\n  raise ValueError('RESOURCE_EXHAUSTED')\n", filename, "exec")
    ns = {}
    exec(code, ns)  # pylint: disable=exec-used
    try:
      ns["f"]()
    except ValueError as e:
      return (ValueError, e, e.__traceback__)

  def record(exc_info, name="asyncio"):
    return logging.LogRecord(name, logging.ERROR, "/usr/lib/python3.11/asyncio/base_events.py",
                             1771, "_GatheringFuture exception was never retrieved", (),
                             exc_info)

  quiet = cli._QuietLibraries()  # pylint: disable=protected-access
  assert not quiet.filter(record(raised_in("/venv/orbax/checkpoint/serialization.py")))
  assert quiet.filter(record(raised_in("/home/user/my_code.py")))
  assert quiet.filter(record(None))
  assert quiet.filter(record(raised_in("/venv/orbax/x.py"), name="my_logger"))


def test_checkpoint_written_by_fc6e996_restores_and_continues(tmp_path):
  """A toy run's checkpoint 3 (and best 6) written by the code before the architecture
  pass (fc6e996, 8 simulated devices, tests/fixtures/fc6e996_toy): today's trainer resumes
  from it and reaches the parameters and BatchNorm statistics fc6e996 wrote at step 6 (to
  float32 rounding); the old best checkpoint restores too."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from contrastjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  fixture = os.path.join(REPO, "tests", "fixtures", "fc6e996_toy")
  workdir = tmp_path / "run"
  shutil.copytree(fixture, workdir, ignore=shutil.ignore_patterns("*.npz"))
  best = ckpt_lib.load_variables(str(workdir), "best")
  assert best["step"] == 6
  cfg = _toy.toy_config(total_steps=6, ckpt_every_steps=3, eval_every_steps=3,
                        keep_checkpoints=10)
  train_lib.train_and_evaluate(cfg, str(workdir))
  got = ckpt_lib.load_variables(str(workdir), 6)
  expected = np.load(os.path.join(fixture, "step6_expected.npz"))
  flat = {"params/" + "/".join(k): v
          for k, v in traverse_util.flatten_dict(got["params"]).items()}
  flat.update({"model_state/" + "/".join(k): v
               for k, v in traverse_util.flatten_dict(got["model_state"]).items()})
  assert sorted(flat) == sorted(expected.files)
  # Equal up to float32 rounding carried through 3 Adam steps (rtol 1e-4): on a loaded
  # 2-core machine XLA:CPU's threaded reductions (the 8 simulated devices' all-reduce, the
  # convolution gradients) sometimes sum in another order: 3.7e-9 on a BatchNorm bias of
  # 0.06 and 3e-8 on a kernel entry of 0.025 in session 8's dry runs, bitwise otherwise.
  # A wrong restore (optimizer moments, step count, rng, batch statistics) moves the
  # parameters by about the learning rate per step, orders of magnitude more.
  for k in expected.files:
    np.testing.assert_allclose(flat[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_kill_during_a_checkpoint_deletion_leaves_nothing_half_deleted(tmp_path, monkeypatch):
  """Superseded checkpoints are renamed to a hidden folder before they are removed: a kill
  in the middle of the removal (simulated: rmtree dies) leaves no half-deleted step that
  orbax would list and fail to read; the next run removes the leftover."""
  from contrastjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  cfg = _toy.toy_config(total_steps=6, ckpt_every_steps=3, keep_checkpoints=1)
  train_lib.train_and_evaluate(cfg, str(tmp_path))
  assert _steps(tmp_path / "checkpoints") == [6]       # pruned to keep=1
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False)

  def killed(self, *a, **k):
    raise KeyboardInterrupt("killed while deleting")

  monkeypatch.setattr(type(epath.Path(str(tmp_path))), "rmtree", killed)
  with pytest.raises(KeyboardInterrupt):
    ck._delete(ck._latest, 6)  # pylint: disable=protected-access
  monkeypatch.undo()
  ck.close()
  # what the next run (or evaluate) sees: no step 6 at all, not a half-readable one
  reader = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False, create=False)
  assert reader.all_steps() == [] and reader.best_step() is not None
  reader.close()
  assert (tmp_path / "checkpoints" / ".deleting-6").exists()
  ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False).close()
  assert not (tmp_path / "checkpoints" / ".deleting-6").exists()


# ----------------------------------------------------------------------------- another config
def _tree_of(folder):
  """Every file under ``folder`` with its bytes (what a refused run must leave alone)."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(root, f)
      if f != ".lock":
        with open(p, "rb") as fh:
          out[os.path.relpath(p, folder)] = fh.read()
  return out


def test_resume_under_another_config_is_refused_before_any_compute(tmp_path):
  from contrastjax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  cfg = _toy.toy_config(total_steps=6, ckpt_every_steps=3, tensorboard=False)
  train_lib.train_and_evaluate(cfg, str(tmp_path))
  before = _tree_of(tmp_path)
  old_config = json.loads((tmp_path / "config.json").read_text())
  # A changed learning rate and toy width: named with both values, nothing written.
  changed = _toy.toy_config(total_steps=9, ckpt_every_steps=3, tensorboard=False,
                            toy_width=16)
  changed.optimizer.lr = 5e-3
  with pytest.raises(ConfigError) as e:
    train_lib.train_and_evaluate(changed, str(tmp_path))
  msg = str(e.value)
  assert "config.optimizer.lr: 0.01 in the workdir, 0.005 now" in msg, msg
  assert "config.toy_width: 8 in the workdir, 16 now" in msg, msg
  assert "config.total_steps: 6 in the workdir, 9 now" in msg, msg
  assert "up to step 6" in msg and "--allow_config_change" in msg, msg
  assert _tree_of(tmp_path) == before  # not a byte written: no step, log or config
  assert not (tmp_path / ".lock").exists()  # and the lock is released
  # Keys that change only reporting may change freely (nothing left to train: 6 of 6).
  free = _toy.toy_config(total_steps=6, ckpt_every_steps=3, tensorboard=False,
                         progress_bar=True, log_every_steps=1, keep_checkpoints=5)
  assert train_lib.train_and_evaluate(free, str(tmp_path))["step"] == 6
  old_config = json.loads((tmp_path / "config.json").read_text())
  assert old_config["log_every_steps"] == 1  # the latest run's config, free keys and all
  # With the flag: it continues under the new config and keeps the old one.
  more = _toy.toy_config(total_steps=9, ckpt_every_steps=3, tensorboard=False)
  more.optimizer.lr = 5e-3
  assert train_lib.train_and_evaluate(more, str(tmp_path),
                                      allow_config_change=True)["step"] == 9
  assert json.loads((tmp_path / "config.6.json").read_text()) == old_config
  now = json.loads((tmp_path / "config.json").read_text())
  assert now["optimizer"]["lr"] == 5e-3 and now["total_steps"] == 9
  assert _steps(tmp_path / "checkpoints")[-1] == 9


def test_config_changes_flattens_and_skips_free_keys():
  old = {"a": 1, "optimizer": {"lr": 0.1, "b1": 0.9}, "mesh": [["data", -1]],
         "data": {"worker_count": 0, "root": "/x"}, "gone": True}
  new = {"a": 1, "optimizer": {"lr": 0.2, "b1": 0.9}, "mesh": [["data", 4]],
         "data": {"worker_count": 8, "root": "/y"}, "extra": {"k": 2}}
  assert workdir_lib.config_changes(old, new) == [
      ("data.root", "/x", "/y"), ("extra.k", "<absent>", 2), ("gone", True, "<absent>"),
      ("optimizer.lr", 0.1, 0.2)]


@pytest.fixture
def readonly_mount(tmp_path):
  """A read-only tmpfs holding a finished toy run's workdir (root ignores file modes, so a
  chmod would not stop it; skipped where mounting is not allowed)."""
  src = tmp_path / "run"
  train_lib.train_and_evaluate(_toy.toy_config(total_steps=3, tensorboard=False), str(src))
  mnt = _mount_tmpfs(tmp_path / "ro", "8m")
  try:
    shutil.copytree(src, mnt / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_and_uncreatable_workdirs_exit_5_naming_the_path(readonly_mount, tmp_path):
  """A workdir on a read-only disk (a finished run copied to a read-only mount), and one
  that cannot be created (its parent is a file): exit status 5 and one line naming the
  path and the OS error, before anything is computed; the read-only run is unchanged."""
  ro = readonly_mount / "run"
  before = _tree_of(ro)
  p = _cli(ro, ("total_steps=6",))
  out, err = p.communicate(timeout=300)
  assert p.returncode == 5, err
  errors = [l for l in err.splitlines() if l.startswith("ERROR: ")]
  assert len(errors) == 1 and "Traceback" not in err, err
  assert str(ro / ".lock") in errors[0] and "Read-only file system" in errors[0], errors[0]
  assert _tree_of(ro) == before
  parent = tmp_path / "a_file"
  parent.write_text("not a folder")
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f"cannot create the workdir {parent / 'run'}: .*Not a directory"):
    train_lib.train_and_evaluate(_toy.toy_config(), str(parent / "run"))


def test_stderr_filter_keeps_each_threads_traceback_apart():
  """Tensorstore's threads print their closed-loop tracebacks at the same time, piece by
  piece (seen after a full disk in SiamSeg's run): each thread's pieces are joined on
  their own, so every such traceback is dropped and nothing else is."""
  import io  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from contrastjax import cli  # pylint: disable=g-import-not-at-top
  sink = io.StringIO()
  f = cli._DropClosedLoopTracebacks(sink)  # pylint: disable=protected-access
  pieces = ["Traceback (most recent call last):\n",
            '  File "base_events.py", line 806, in call_soon_threadsafe\n',
            "    self._check_closed()\n", "RuntimeError", ": Event loop is closed", "\n"]
  barriers = [threading.Barrier(4) for _ in pieces]

  def printer(name):
    for piece, barrier in zip(pieces, barriers):
      barrier.wait()  # every thread writes piece k before any writes piece k + 1
      f.write(piece)
    f.write(f"kept {name}\n")

  threads = [threading.Thread(target=printer, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(sink.getvalue().splitlines()) == [f"kept {i}" for i in range(4)]


def test_a_writer_threads_os_error_is_one_warning_line(caplog, capsys):
  """tensorboardX's event-writer thread dies with ``OSError: [Errno 28]`` when the disk
  fills (seen in APC's full-disk run, depending on when it flushes): one warning line,
  not a thread traceback beside the run's own error. Other thread errors keep theirs."""
  import threading  # pylint: disable=g-import-not-at-top
  from contrastjax import cli  # pylint: disable=g-import-not-at-top
  src = ("def write():\n"
         "  raise OSError(28, 'No space left on device')\n"
         "def other():\n"
         "  raise ValueError('a real bug')\n")
  writer = {}
  exec(compile(src, "/site-packages/tensorboardX/record_writer.py", "exec"), writer)  # pylint: disable=exec-used
  old = threading.excepthook
  threading.excepthook = cli._quiet_writer_thread_errors  # pylint: disable=protected-access
  try:
    for target in (writer["write"], writer["other"]):
      t = threading.Thread(target=target)
      t.start()
      t.join()
  finally:
    threading.excepthook = old
  err = capsys.readouterr().err
  assert "OSError" not in err and "ValueError: a real bug" in err, err
  assert [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()] == [
      "the TensorBoard event writer stopped: [Errno 28] No space left on device "
      "(metrics.jsonl has the metrics)"]


def _records_fail_at(step: int, tmp_path, monkeypatch):
  """A toy run (12 steps, checkpoints every 4) whose metrics write at ``step`` fails as on
  a full disk; returns the ``pytest.raises`` info of its ``RunWriteError``."""
  cfg = _toy.toy_config(total_steps=12, ckpt_every_steps=4, eval_every_steps=4)
  real = metric_writer.MetricWriter.write_scalars

  def full_at(self, at, scalars):
    if at == step:
      raise OSError(28, "No space left on device")
    return real(self, at, scalars)

  monkeypatch.setattr(metric_writer.MetricWriter, "write_scalars", full_at)
  with pytest.raises(workdir_lib.RunWriteError) as e:
    train_lib.train_and_evaluate(cfg, str(tmp_path / "run"))
  return e


def test_full_disk_while_writing_records_names_the_workdir_and_the_intact_step(
    tmp_path, monkeypatch):
  """A write of the run's records (here metrics.jsonl at step 8; Pillow's pictures fail
  the same way) that raises a path-less ``OSError`` on a full disk: the error names the
  workdir and the intact checkpoint, and has exit status 6 (found by ConDSeg's full-disk
  fault step in a CI dry run, where the pictures of an evaluation filled the disk before
  the checkpoint save did)."""
  from contrastjax import cli  # pylint: disable=g-import-not-at-top
  e = _records_fail_at(8, tmp_path, monkeypatch)
  text = str(e.value)
  assert text.startswith(f"writing the run's records (metrics, events, pictures) to "
                         f"{tmp_path / 'run'}/ failed: [Errno 28] No space left on device")
  assert "The last checkpoint, step 4, is intact" in text, text
  assert e.value.errno == 28 and cli.exit_code(e.value) == cli.EXIT_IO
  assert _steps(tmp_path / "run" / "checkpoints") == [4]


def test_records_error_names_the_checkpoint_a_save_in_flight_commits(tmp_path, monkeypatch):
  """The records write fails two steps after checkpoint 8 was submitted (asynchronously):
  the message names the last checkpoint that is intact once the save in flight has
  finished, the one a rerun resumes from (a CI dry run saw "step 6, is intact" while
  step 8 committed during the shutdown)."""
  e = _records_fail_at(10, tmp_path, monkeypatch)   # the next logged step after the save
  committed = _steps(tmp_path / "run" / "checkpoints")
  assert committed == [4, 8]
  assert f"The last checkpoint, step {max(committed)}, is intact" in str(e.value), str(e.value)
