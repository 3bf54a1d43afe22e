"""Per-method pins, written before the trainer is moved around:

* ``init_from`` of ConDSeg stage 2 (from a stage-1 run) and of SiamSeg (from another
  run), checked bitwise on the state a fresh run starts from, built with the spine's
  public pieces as the trainer builds it (``build_run`` -> ``initialise_state`` ->
  ``method.load_pretrained`` -> ``device_put``). The source checkpoints are written with
  ``Checkpointer`` and hold random values, so nothing can match by accident (the old
  end-to-end check compared two seed-0 inits that were equal anyway).
* kill -9 and resume of each method's real train step through the command line, with
  asynchronous checkpointing on (the default, as users run it): the final, rolling and
  best checkpoints (params, model state, optimizer, plateau, RNG, ``extra`` such as the
  EMA teacher) and the logged metrics equal an uninterrupted run's bit for bit.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import warnings

import jax
import ml_collections
import numpy as np
import pytest

from _harness import (FAULT_CLI, REPO, assert_trees_equal, build_run, cli, eval_rows,
                      finish, kill9, env as harness_env,
                      loop_state, raw_state, steps, train_rows, wait_until)
from contrastjax import checkpoint as ckpt_lib
from contrastjax import parallel
from contrastjax import spine
from contrastjax.methods import get_method_class


def _config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  path = os.path.join(REPO, "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _all_differ(a, b) -> bool:
  """No leaf of ``a`` equals its counterpart in ``b`` (the values can be told apart)."""
  la, lb = _leaves(a), _leaves(b)
  assert sorted(la) == sorted(lb)
  return not any(np.array_equal(la[k], lb[k]) for k in la)


# ============================================================================= init_from
def _fresh_start(config, example):
  """``(initial state, state after load_pretrained)`` of a fresh run of ``config`` on one
  device, as host trees: the trainer's fresh-start path, step by step."""
  method = get_method_class(config.method)(config)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global(example, mesh)
    rng = jax.random.PRNGKey(config.seed)
    run = build_run(config, method, mesh, rng, gb, total_steps=10)
    state = spine.initialise_state(run.create, run.state_sharding, rng, gb)
    initial = jax.device_get(state)
    params, model_state, extra = method.load_pretrained(
        state.params, state.model_state, state.extra)
    state = state.replace(params=params, model_state=model_state, extra=extra)
    state = jax.device_put(state, run.state_sharding)
    return initial, jax.device_get(state)


def _abstract_state(config, example):
  method = get_method_class(config.method)(config)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global(example, mesh)
    return build_run(config, method, mesh, jax.random.PRNGKey(0), gb, 10).abstract


def _random_state(abstract, seed: int):
  """A train state of ``abstract``'s shapes full of distinctive random values (as a long
  training run would leave): floats ~ N(0.3, 1), variances positive, counters large."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = jax.tree_util.keystr(path)
    if np.issubdtype(a.dtype, np.floating):
      v = rng.normal(0.3, 1.0, a.shape)
      return (np.abs(v) + 0.5 if "'var'" in name else v).astype(a.dtype)
    if a.dtype == np.uint32:
      return rng.integers(0, 2**32, a.shape, dtype=np.uint32)
    return rng.integers(500, 1000, a.shape).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _write_run(workdir, abstract, *, best_step, latest_step):
  """A finished run's workdir: best checkpoint ``best_step`` and rolling checkpoint
  ``latest_step`` with different random states; returns both."""
  best, latest = _random_state(abstract, 1), _random_state(abstract, 2)
  ck = ckpt_lib.Checkpointer(str(workdir), async_save=False)
  try:
    ck.save_best(best_step, best, loop_state=dict(best_value=0.5, best_step=best_step,
                                                  bad_evals=0))
    ck.save(latest_step, latest, loop_state=dict(best_value=0.5, best_step=best_step,
                                                 bad_evals=1))
    ck.wait()
  finally:
    ck.close()
  return best, latest


def _polyp_batch(size=32, n=8):
  rng = np.random.default_rng(0)
  mask = (rng.uniform(size=(n, size, size, 1)) > 0.7).astype(np.float32)
  return {"image": rng.uniform(size=(n, size, size, 3)).astype(np.float32), "mask": mask,
          "background": 1.0 - mask}


@pytest.mark.slow
def test_condseg_stage2_init_from_copies_the_stage1_best_encoder_bitwise(tmp_path):
  """``configs/condseg_kvasir.py:demo,init_from=DIR``: before any step, the stage-2
  encoder's params AND BatchNorm statistics are the stage-1 run's BEST checkpoint's, bit
  for bit; everything outside the encoder keeps its fresh init; the optimizer starts
  fresh. ``paper`` (``transfer_batch_stats=False``) copies the params only. Bugs caught:
  the latest instead of the best checkpoint, statistics not copied (or copied under
  ``paper``), a cast/transposition on the way, decoder or stage-1 head leaking in."""
  stage1 = _config("condseg_kvasir.py", "demo,stage1")
  stage1.data.image_size = 32
  example = _polyp_batch()
  s1_dir = tmp_path / "stage1"
  best, latest = _write_run(s1_dir, _abstract_state(stage1, example), best_step=5,
                            latest_step=8)

  stage2 = _config("condseg_kvasir.py", f"demo,init_from={s1_dir}")
  stage2.data.image_size = 32
  stage2.seed = 3  # any seed: nothing may depend on the two runs' seeds matching
  assert stage2.condseg.transfer_batch_stats and stage2.condseg.init_from_which == "best"
  initial, state = _fresh_start(stage2, example)

  enc, enc_stats = best.params["encoder"], best.model_state["batch_stats"]["encoder"]
  assert _all_differ(initial.params["encoder"], enc)  # the import is visible
  assert _all_differ(latest.params["encoder"], enc)   # best and latest differ
  assert_trees_equal(state.params["encoder"], enc, "params['encoder']")
  assert_trees_equal(state.model_state["batch_stats"]["encoder"], enc_stats,
                     "batch_stats['encoder']")
  # Only the encoder: the decoder and the other stage-2 parts keep their init, and no
  # stage-1 head parameters appear.
  assert sorted(state.params) == sorted(initial.params)
  assert sorted(state.model_state["batch_stats"]) == sorted(
      initial.model_state["batch_stats"])
  for name in initial.params:
    if name != "encoder":
      assert_trees_equal(state.params[name], initial.params[name], f"params[{name!r}]")
  for name in initial.model_state["batch_stats"]:
    if name != "encoder":
      assert_trees_equal(state.model_state["batch_stats"][name],
                         initial.model_state["batch_stats"][name], f"batch_stats[{name!r}]")
  assert "head" in best.params and "head" not in state.params
  # A fresh optimizer and step, not the stage-1 run's.
  assert int(state.step) == 0
  assert_trees_equal(state.opt_state, initial.opt_state, "opt_state")
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))

  # ``paper``: the reference's train.py copies named_parameters() only.
  paper = _config("condseg_kvasir.py", f"demo,paper,init_from={s1_dir}")
  assert not paper.condseg.transfer_batch_stats
  method = get_method_class(paper.method)(paper)
  params, model_state, _ = method.load_pretrained(initial.params, initial.model_state,
                                                  initial.extra)
  assert_trees_equal(params["encoder"], enc, "paper: params['encoder']")
  assert_trees_equal(model_state, initial.model_state, "paper: model_state")


def _aerial_batch(size=32, n=8):
  rng = np.random.default_rng(0)
  img = lambda: rng.normal(size=(n, size, size, 3)).astype(np.float32)  # noqa: E731
  lab = lambda: rng.integers(0, 7, (n, size, size)).astype(np.int32)  # noqa: E731
  return {"source": {"image": img(), "label": lab()},
          "target": {"image": img(), "label": lab()}}


@pytest.mark.slow
def test_siamseg_init_from_sets_student_and_teacher_to_the_source_student(tmp_path):
  """``configs/siamseg_loveda.py:demo,init_from=DIR``: after the import the student
  (every part the source has, BatchNorm statistics included) and the EMA teacher both
  equal the source run's STUDENT of its latest checkpoint (the config's
  ``init_from_which``); not the source's teacher; the optimizer and step start fresh. From
  a ``source_only`` run (the documented demo flow) the SimSiam branch, which that run
  does not have, keeps its init. Bugs caught: the teacher left at its random init or
  taken from the source's teacher, the best instead of the latest checkpoint, parts or
  statistics not copied."""
  example = _aerial_batch()
  sources = {}
  for variant in ("demo", "demo,source_only"):
    c = _config("siamseg_loveda.py", variant)
    c.data.image_size = 32
    wd = tmp_path / variant.replace(",", "_")
    sources[variant] = (wd, *_write_run(wd, _abstract_state(c, example), best_step=5,
                                        latest_step=8))
  assert "teacher" in sources["demo"][2].extra       # the source has its own teacher
  assert "contrast" not in sources["demo,source_only"][2].params

  initial = None
  for variant, (wd, best, latest) in sources.items():
    c = _config("siamseg_loveda.py", f"demo,init_from={wd}")
    c.data.image_size = 32
    c.seed = 3
    assert c.siamseg.init_from_which == "latest"
    if initial is None:
      initial, state = _fresh_start(c, example)
    else:  # the same model and seed: only load_pretrained differs
      method = get_method_class(c.method)(c)
      params, model_state, extra = method.load_pretrained(
          initial.params, initial.model_state, initial.extra)
      state = initial.replace(params=params, model_state=model_state, extra=extra)
    assert sorted(state.params) == ["backbone", "contrast", "decode_head"]
    for name in state.params:
      if name in latest.params:
        assert _all_differ(initial.params[name], latest.params[name])
        assert_trees_equal(state.params[name], latest.params[name],
                           f"{variant}: params[{name!r}]")
      else:  # not in the source: keeps its init
        assert_trees_equal(state.params[name], initial.params[name],
                           f"{variant}: params[{name!r}]")
    for name, stats in state.model_state["batch_stats"].items():
      src = latest.model_state["batch_stats"].get(name, initial.model_state[
          "batch_stats"][name])
      assert_trees_equal(stats, src, f"{variant}: batch_stats[{name!r}]")
    assert sorted(state.extra["teacher"]) == ["backbone", "decode_head"]
    for name, teacher in state.extra["teacher"].items():
      assert_trees_equal(teacher, latest.params[name], f"{variant}: teacher[{name!r}]")
      if "teacher" in latest.extra:
        assert _all_differ(teacher, latest.extra["teacher"][name])
    assert int(state.step) == 0
    assert_trees_equal(state.opt_state, initial.opt_state, "opt_state")
    assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))


# ============================================================================= kill -9
def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _tree_of(folder) -> dict[str, bytes]:
  """Every file under ``folder`` (its lock aside) with its bytes."""
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      if f != ".lock":
        with open(os.path.join(root, f), "rb") as fh:
          out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
  return out


def _logged_steps(workdir) -> list[int]:
  """The steps of metrics.jsonl's train records, a line cut short by a write in
  progress left out."""
  out = []
  try:
    with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:
          continue
        if "train/loss" in r:
          out.append(r["step"])
  except FileNotFoundError:
    pass
  return out


class _Disk:
  """Where the faulted run's workdir lives: a tmpfs of its own (``mounted``: the full-disk
  fault can fill it) or, where mounting is not allowed, ``tmp_path``."""

  def __init__(self, tmp_path):
    self.path = tmp_path / "disk"
    self.path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.path)],
                       capture_output=True, text=True)
    self.mounted = r.returncode == 0
    if not self.mounted:
      warnings.warn(f"no tmpfs ({r.stderr.strip()}): the full-disk fault is left out")

  def close(self):
    if self.mounted:
      subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
  d = _Disk(tmp_path)
  yield d
  d.close()


def _kill_and_resume(tmp_path, config: str, overrides: dict, *, total: int,
                     kill_after: int, disk: _Disk, timeout: int = 1500,
                     prepared_data: bool = False):
  """Runs ``config`` uninterrupted (``ref``), then puts another run of it (``killed``)
  through the faults of a user's week, and finishes it:

  1. SIGKILL during the asynchronous save of rolling checkpoint ``kill_after``: all its
     files are in orbax's temporary folder, the commit is not made (``tests/_fault_cli.py``
     holds it there). While that run holds the workdir, a second run on the same workdir
     exits 5 naming the holder's PID.
  2. The rerun resumes, and gets SIGTERM once it has logged step ``kill_after + 1``: it
     exits 0 with a checkpoint of the last step it logged (``sigterm_step``).
  3. A rerun with another ``seed`` exits 2 naming the key and both values, before any
     compute: the workdir is unchanged byte for byte.
  4. Where ``disk`` is a tmpfs: the disk filled to half a checkpoint; the next save fails
     with exit 6 naming the path and the intact checkpoint. The filler removed:
  5. The same command as before finishes the run.

  The runs share a persistent compilation cache: only the first compiles (one after the
  other rather than side by side: on 2 busy cores two cold compilations cost more than
  one). Every checkpoint is kept (``keep_checkpoints``), so that each of ``ref``'s can be
  compared. ``prepared_data``: the faulted run reads the dataset prepared by
  ``python -m contrastjax.data.prepare`` (TFDS ArrayRecord), the reference run its folder
  reader: the two must still agree bitwise. Returns ``(ref, killed, sigterm_step)``."""
  name, _, arg = config.partition(":")
  c = _config(name, arg)
  assert c.get("async_checkpointing", True), "the real configs save asynchronously"
  env_extra = {"CONTRASTJAX_COMPILATION_CACHE": str(tmp_path / "xla_cache")}
  flags = _flags(dict(overrides, total_steps=total, keep_checkpoints=100))
  cfg_path = os.path.join(REPO, "configs", config)
  ref, killed = tmp_path / "ref", disk.path / "killed"
  killed_flags = []
  if prepared_data:
    out = tmp_path / "prepared"
    r = subprocess.run([sys.executable, "-m", "contrastjax.data.prepare",
                        f"--config={cfg_path}", f"--out={out}", "--noprogress", *flags],
                       env=harness_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    killed_flags = ["--config.data.format=tfds", f"--config.data.tfds_dir={out}"]

  def run(workdir, extra=(), **kw):
    more = killed_flags if workdir == killed else []
    return cli(workdir, config=cfg_path, extra_flags=flags + more + list(extra),
               env_extra=dict(env_extra, **kw.pop("env", {})), **kw)

  finish(run(ref), timeout)
  # 1. SIGKILL with checkpoint `kill_after` written but not committed.
  marker = tmp_path / "paused_commit"
  p = run(killed, entry=FAULT_CLI, env={
      "CONTRASTJAX_TEST_PAUSE_COMMIT": f"checkpoints/{kill_after}",
      "CONTRASTJAX_TEST_PAUSE_MARKER": str(marker)})
  try:
    wait_until(marker.exists, p, timeout=timeout, what=f"the commit of checkpoint {kill_after}")
    second = run(killed)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 5, f"exit {second.returncode}\n{err[-3000:]}"
    assert f"is in use by another run: PID {p.pid}" in err, err[-3000:]
    kill9(p)
  finally:
    if p.poll() is None:
      p.kill()
      p.communicate()
  in_flight = marker.read_text()
  assert os.path.basename(in_flight).startswith(f"{kill_after}.") and os.path.isdir(
      in_flight), in_flight  # killed with the save's files on disk, uncommitted
  done = steps(killed / "checkpoints")
  assert done and max(done) < kill_after, f"killed too late: {done}"
  # 2. Resume; SIGTERM once the resumed run has logged step kill_after + 1. (The killed
  # run logged past its last checkpoint; the resume rewrites metrics.jsonl without those
  # records, as a new file.)
  inode = os.stat(killed / "metrics.jsonl").st_ino
  p = run(killed)
  try:
    wait_until(lambda: (os.stat(killed / "metrics.jsonl").st_ino != inode
                        and kill_after + 1 in _logged_steps(killed)), p, timeout=timeout,
               what=f"step {kill_after + 1} of the resumed run")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
  finally:
    if p.poll() is None:
      p.kill()
      p.communicate()
  assert p.returncode == 0 and "SIGTERM" in err, f"exit {p.returncode}\n{err[-3000:]}"
  sigterm_step = max(steps(killed / "checkpoints"))
  assert kill_after < sigterm_step < total, (sigterm_step, total)
  assert max(_logged_steps(killed)) == sigterm_step  # saved the last step it finished
  assert int(raw_state(killed, sigterm_step)["step"]) == sigterm_step
  # 3. Another config on this workdir: refused before any compute.
  before = _tree_of(killed)
  p = run(killed, ["--config.seed=7"])
  _, err = p.communicate(timeout=300)
  assert p.returncode == 2, f"exit {p.returncode}\n{err[-3000:]}"
  errors = [l for l in err.splitlines() if l.startswith("ERROR: ")]
  assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
  assert "config.seed: 0 in the workdir, 7 now" in errors[0], errors[0]
  assert _tree_of(killed) == before
  # 4. A full disk (when the workdir is on a tmpfs: ``disk``): filled up to half a
  # checkpoint, the next save fails; exit 6, one line naming the step, the path and the
  # OS error, the earlier checkpoints intact. Room made, the run goes on.
  if disk.mounted:
    size = max(sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                   os.walk(killed / "checkpoints" / str(s)) for f in fs)
               for s in steps(killed / "checkpoints"))
    filler = disk.path / "filler"
    free = os.statvfs(disk.path).f_bavail * os.statvfs(disk.path).f_frsize
    with open(filler, "wb") as f:
      f.write(b"\0" * max(0, free - size // 2))
    good = steps(killed / "checkpoints")
    p = run(killed)
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 6, f"exit {p.returncode}\n{err[-3000:]}"
    errors = [l for l in err.splitlines() if l.startswith("ERROR: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    # The save that fails may be a checkpoint or a write of the run's records (an
    # evaluation's pictures can fill the disk first, after one more checkpoint fitted):
    # either way the line names the path and the last committed checkpoint, and nothing
    # committed before is lost.
    after = steps(killed / "checkpoints")
    assert after[:len(good)] == good, (good, after)
    assert ("No space left on device" in errors[0] and f"step {max(after)}, is intact"
            in errors[0] and f"to {killed}/" in errors[0]), errors[0]
    os.remove(filler)
  # 5. Finish.
  finish(run(killed), timeout)
  return ref, killed, sigterm_step


def _assert_same_run(ref, killed, total, sigterm_step):
  # Every rolling checkpoint (and the one SIGTERM wrote) and the best one, whole states.
  assert steps(killed / "checkpoints") == sorted(set(steps(ref / "checkpoints"))
                                                 | {sigterm_step})
  assert steps(ref / "checkpoints")[-1] == total
  for s in steps(ref / "checkpoints"):
    assert_trees_equal(raw_state(ref, s), raw_state(killed, s), f"checkpoints/{s}")
  # The best checkpoint: the one 'best' resolves to, bitwise. Not the folder list: a kill
  # while orbax deletes the superseded best checkpoint (in the background, just after
  # committing the new one) leaves it half-deleted beside the new one, and nothing removes
  # it until the next new best (reported as a bug; tighten to a list equality once fixed).
  assert len(steps(ref / "best")) == 1
  b = steps(ref / "best")[-1]
  assert steps(killed / "best")[-1] == b
  assert_trees_equal(raw_state(ref, b, ckpt_lib.BEST), raw_state(killed, b, ckpt_lib.BEST),
                     f"best/{b}")
  for series, s in ((ckpt_lib.CHECKPOINTS, total), (ckpt_lib.BEST, b)):
    la, lb = loop_state(ref, s, series), loop_state(killed, s, series)
    for ls in (la, lb):
      ls["last_eval"] = {k: v for k, v in ls.get("last_eval", {}).items()
                         if not k.endswith("eval_seconds")}
    assert la == lb, series
  # Each step logged once, with the uninterrupted run's values (losses, norms, lr
  # scale, method metrics), and the same evaluation results.
  assert [s for s, _ in train_rows(killed)] == list(range(1, total + 1))
  assert train_rows(killed) == train_rows(ref)
  assert eval_rows(killed) == eval_rows(ref)


# Shrunk demo runs: 32x32 images, a few examples, 8 steps, a checkpoint every 2 steps.
_SEG_SMALL = {"data.num_train": 16, "data.num_val": 8, "data.image_size": 32,
              "batch_size": 4, "eval_batch_size": 8, "ckpt_every_steps": 2,
              "eval_every_steps": 2, "log_every_steps": 1, "optimizer.warmup_steps": 2}
# ConDSeg with the plateau on (the demo turns it off): val/loss must fall by 90% to
# count as an improvement, so the learning-rate scale halves at every evaluation after
# the first, before the kill (step 4) and after it. A plateau state restored wrongly
# changes the scale and with it every later update.
_CONDSEG_SMALL = dict(_SEG_SMALL, **{
    "data.num_test": 8, "data.source_size": 32, "plateau.monitor": "val/loss",
    "plateau.patience": 0, "plateau.factor": 0.5, "plateau.rtol": 0.9})


def _lr_scales(workdir):
  return [(s, r["train/lr_scale"]) for s, r in train_rows(workdir)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    "demo,stage1",
    # Stage 2's three runs compile its 2-pass step cold three times (~5 min on 2 cores):
    # outside CI's budget; run with CONTRASTJAX_HEAVY_TESTS=1 (passed in session 7).
    pytest.param("demo", marks=pytest.mark.heavy)])
def test_condseg_kill9_resume_is_bitwise(disk, tmp_path, variant):
  """Stage 1 (two train-mode passes, photometric strong augmentation drawn from the step
  key) and stage 2 (the full model), with the plateau scale changing around the kill."""
  ref, killed, term = _kill_and_resume(tmp_path, f"condseg_kvasir.py:{variant}",
                                       _CONDSEG_SMALL, total=8, kill_after=4, disk=disk)
  _assert_same_run(ref, killed, 8, term)
  # The scale a step used (evaluations at 2, 4, 6, 8; the first sets the best loss).
  scales = dict(_lr_scales(ref))
  assert (scales[3], scales[5], scales[7]) == (1.0, 0.5, 0.25), scales
  assert dict(eval_rows(ref))[8]["lr_scale"] == 0.125


@pytest.mark.slow
def test_siamseg_kill9_resume_is_bitwise(disk, tmp_path):
  """SiamSeg (DACS + SimSiam): the EMA teacher in ``extra``, the paired source/target
  iterator, per-loss backward. Pseudo threshold 0.1 < 1/5 (5 classes: every maximum
  softmax probability passes, weight 1) so that the teacher's pseudo-labels weigh in the
  loss (with the demo's 0.5 a random teacher's weight is 0). The faulted run reads the
  dataset prepared as TFDS ArrayRecord shards (the two domains stored apart, paired on
  read), the reference run the generator: every resume continues with the same next
  pair of batches, mid-epoch."""
  overrides = dict(_SEG_SMALL, **{"data.num_target_train": 16, "progress_bar": False,
                                  "siamseg.pseudo_threshold": 0.1,
                                  # the second evaluation on the first one's split and
                                  # program: one compilation fewer
                                  "evals.source_val.split": "val",
                                  "evals.source_val.with_loss": True})
  c = _config("siamseg_loveda.py", "demo")
  assert c.siamseg.backward == "per_loss" and c.siamseg.variant == "siamseg"
  ref, killed, term = _kill_and_resume(tmp_path, "siamseg_loveda.py:demo", overrides,
                                       total=8, kill_after=4, disk=disk, prepared_data=True)
  _assert_same_run(ref, killed, 8, term)
  final = raw_state(ref, 8)
  assert sorted(final["extra"]["teacher"]) == ["backbone", "decode_head"]
  assert _all_differ(final["extra"]["teacher"]["decode_head"],
                     final["params"]["decode_head"])  # a real EMA, not a copy
  rows = dict(train_rows(ref))
  assert all(rows[s]["train/pseudo_weight"] == 1.0 for s in rows)


@pytest.mark.slow
def test_clip_kill9_resume_is_bitwise(disk, tmp_path):
  """CLIP (soft swap applied at random on half the steps, the temperature clamp active):
  the swap draws come from the step key, the clamp from the restored parameters."""
  overrides = {"data.num_train": 512, "data.num_val": 64, "data.num_zeroshot": 40,
               "batch_size": 32, "eval_batch_size": 64, "ckpt_every_steps": 3,
               "eval_every_steps": 4, "log_every_steps": 1, "progress_bar": False,
               "optimizer.warmup_steps": 2, "evals.val.gap_pairs": 32,
               "best_metric": "val/i2t_R@1_pool64",
               # beta_min 13 = tau <= 1/13: the learned tau rises into the clamp in a
               # few steps (from 1/0.07 = 14.3).
               "clip.beta_min": 13.0}
  ref, killed, term = _kill_and_resume(tmp_path, "clip_gap_coco.py:demo,ss,p=0.5",
                                       overrides, total=24, kill_after=6, disk=disk)
  _assert_same_run(ref, killed, 24, term)
  rows = dict(train_rows(ref))
  # Swaps drawn at random (both outcomes occur); the per-step pattern after the resume
  # is the reference's (train_rows equality above): the step keys were restored.
  swaps = [rows[s]["train/swap_applied"] for s in sorted(rows)]
  assert 0.0 in swaps and 1.0 in swaps, swaps
  clamped = [s for s in sorted(rows) if rows[s]["train/beta"] == pytest.approx(13.0)]
  assert clamped and clamped[-1] > 6, clamped  # the clamp acts after the resume


@pytest.mark.slow
def test_apc_kill9_resume_is_bitwise(disk, tmp_path):
  """APC (one stage: dropout draws from the step key; GMP turns into AKP before the kill,
  the segmentation loss and patch contrast switch on after it, by the step counter)."""
  overrides = {"data.num_train": 32, "data.num_train_eval": 8, "data.num_val": 8,
               "data.image_size": 32, "data.crop_size": 32, "data.eval_size": 32,
               "model.img_size": 32, "batch_size": 8, "eval_batch_size": 8,
               "ckpt_every_steps": 2, "eval_every_steps": 4, "log_every_steps": 1,
               "optimizer.warmup_steps": 2,
               "apc.akp_warmup_steps": 3, "apc.seg_warmup_steps": 5,
               "apc.pcl_warmup_steps": 5}
  ref, killed, term = _kill_and_resume(tmp_path, "apc_voc.py:demo", overrides, total=8,
                                       kill_after=4, disk=disk)
  _assert_same_run(ref, killed, 8, term)
  rows = dict(train_rows(ref))
  assert all(np.isfinite(rows[s]["train/loss_seg"]) for s in rows)
