"""Pins of the training loop's bookkeeping on the toy method, written before the loop is
moved around: early stopping (ties, patience, the stop reason, the counter across a
resume), the best checkpoint, epoch-based step counts, checkpoint pruning and the
errors that name which checkpoints exist.

Each test says which bug it catches. The metric sequences come from
``_toy.ScriptedEvaluator`` (``type='toy_scripted'``), which reports ``values[step]`` for
the step of the state it evaluates, so a resumed run sees the same sequence.
"""
import math
import os

import jax
import ml_collections
import numpy as np
import pytest

import _toy
from _harness import (assert_trees_equal, build_run, eval_rows, loop_state, raw_state, steps,
                      train_rows)
from contrastjax import checkpoint as ckpt_lib
from contrastjax import parallel
from contrastjax import train as train_lib
from contrastjax import workdir as workdir_lib
from contrastjax.configs import condseg as condseg_configs
from contrastjax.data.sources.medseg import DATASETS
from contrastjax.errors import ConfigError


def _scripted_config(values: dict[int, float], total: int, mode: str = "max", **kw):
  """The toy with one evaluation ``val`` whose ``val/score`` at step s is values[s]."""
  table = [float(values.get(s, 0.0)) for s in range(total + 1)]
  c = _toy.toy_config(**{**dict(total_steps=total, eval_every_steps=2, ckpt_every_steps=2,
                                log_every_steps=2, keep_checkpoints=100, toy_track_step=True,
                                best_metric="val/score", best_mode=mode, tensorboard=False),
                         **kw})
  c.plateau = ml_collections.ConfigDict(dict(monitor=""))
  c.evals = ml_collections.ConfigDict(dict(
      val=dict(type="toy_scripted", split="val", with_loss=False, values=table)))
  return c


# ============================================================================= early stop
# patience 3: best 0.5 at step 4; step 6 worse (1 bad); step 8 TIES the best (not bad);
# step 10 worse (2); step 12 worse (3): stop at 12. Steps 14.. would keep being worse.
#   * ties counted as bad evaluations         -> stops at 10
#   * patience off by one (> instead of >=)   -> stops at 14
#   * counter reset (or not saved) on resume  -> the split run stops at 14
#   * the tie replacing the best (>= compare) -> best step 8
_SCRIPT = {2: 0.30, 4: 0.50, 6: 0.40, 8: 0.50, 10: 0.45, 12: 0.20, 14: 0.10, 16: 0.10,
           18: 0.10, 20: 0.10}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_early_stopping_ties_patience_best_and_resume(tmp_path, mode):
  sign = 1.0 if mode == "max" else -1.0
  script = {s: sign * v for s, v in _SCRIPT.items()}
  cfg = lambda total: _scripted_config(script, total, mode,  # noqa: E731
                                       early_stop_patience=3)

  ref = tmp_path / "ref"
  result = train_lib.train_and_evaluate(cfg(20), str(ref))
  assert result["step"] == 12, result
  assert result["stop_reason"] and result["stop_reason"].startswith("early stopping"), result
  assert "val/score" in result["stop_reason"] and "(step 4)" in result["stop_reason"]
  assert "for 3 evaluations" in result["stop_reason"]
  assert (result["best_step"], result["best_value"]) == (4, sign * 0.5)
  # Nothing after the stop: logged train steps end at 12, the stop step is checkpointed.
  assert [s for s, _ in train_rows(ref)] == [2, 4, 6, 8, 10, 12]
  assert [s for s, _ in eval_rows(ref)] == [2, 4, 6, 8, 10, 12]
  assert steps(ref / "checkpoints") == [2, 4, 6, 8, 10, 12]
  # The best checkpoint is the state at the argmax step (the whole state, bitwise), and
  # its loop state records it.
  assert steps(ref / "best") == [4]
  assert_trees_equal(raw_state(ref, 4, ckpt_lib.BEST), raw_state(ref, 4), "best/4 vs 4")
  best_loop = loop_state(ref, 4, ckpt_lib.BEST)
  assert (best_loop["best_step"], best_loop["best_value"]) == (4, sign * 0.5)
  assert loop_state(ref, 12)["bad_evals"] == 3

  # The same run stopped at step 8 (after the tie, 1 bad evaluation so far) and rerun
  # with the full step count: the counter comes back from the checkpoint.
  split = tmp_path / "split"
  first = train_lib.train_and_evaluate(cfg(8), str(split))
  assert first["step"] == 8 and first["stop_reason"] is None
  assert loop_state(split, 8)["bad_evals"] == 1
  assert loop_state(split, 8)["best_step"] == 4
  # extended to 20 steps: a changed config, continued on purpose
  second = train_lib.train_and_evaluate(cfg(20), str(split), allow_config_change=True)
  assert second["step"] == 12 and second["stop_reason"] == result["stop_reason"]
  assert (second["best_step"], second["best_value"]) == (4, sign * 0.5)
  assert steps(split / "best") == [4]
  assert_trees_equal(raw_state(ref, 12), raw_state(split, 12), "split vs ref, step 12")
  assert train_rows(split) == train_rows(ref)


def test_early_stopping_off_runs_to_the_end(tmp_path):
  """``early_stop_patience=0`` never stops (bug caught: patience 0 read as 'stop at the
  first bad evaluation'); the best checkpoint still follows the metric."""
  result = train_lib.train_and_evaluate(
      _scripted_config(_SCRIPT, 16, early_stop_patience=0), str(tmp_path))
  assert result["step"] == 16 and result["stop_reason"] is None
  assert result["best_step"] == 4 and steps(tmp_path / "best") == [4]
  assert loop_state(tmp_path, 16)["bad_evals"] == 5  # 6, 10, 12, 14, 16 worse; 8 a tie


# ============================================================================= epochs
def expected_steps_per_epoch(num_train: int, batch_size: int) -> int:
  # ceil: the stream carries an epoch's remainder into the next batch (nothing dropped),
  # and the reference's PyTorch loaders (drop_last=False) take ceil(N / B) steps per epoch.
  # (Before the refactor this was floor: full batches only.)
  return math.ceil(num_train / batch_size)


def _steps_config(**kw):
  c = ml_collections.ConfigDict(dict(batch_size=8))
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("num_train,batch", [(100, 8), (880, 12), (85, 12), (16, 8), (9, 8)])
def test_resolve_steps_from_epochs(num_train, batch):
  """Bugs caught: epochs multiplied by the wrong steps-per-epoch, fractional epochs
  truncated instead of rounded (0.9 epoch), a tiny fraction giving 0 (an every-0-steps
  schedule)."""
  spe = expected_steps_per_epoch(num_train, batch)
  got = train_lib.resolve_steps(_steps_config(
      batch_size=batch, total_epochs=3, eval_every_epochs=1, ckpt_every_epochs=0.9,
      log_every_epochs=0.001), num_train)
  assert got == dict(steps_per_epoch=spe, total=3 * spe, eval_every=spe,
                     ckpt_every=max(round(0.9 * spe), 1), log_every=1)
  # Steps win where given; defaults where neither is set (log 50, eval off, ckpt 1000).
  got = train_lib.resolve_steps(_steps_config(batch_size=batch, total_steps=7), num_train)
  assert got == dict(steps_per_epoch=spe, total=7, eval_every=0, ckpt_every=1000,
                     log_every=50)


def test_resolve_steps_errors_name_the_keys():
  for prefix in ("total", "eval_every", "ckpt_every", "log_every"):
    cfg = _steps_config(**{"total_steps": 10, f"{prefix}_steps": 3,
                           f"{prefix}_epochs": 2})
    with pytest.raises(ConfigError, match=(f"set only one of config.{prefix}_steps and "
                                           f"config.{prefix}_epochs")):
      train_lib.resolve_steps(cfg, 100)
  with pytest.raises(ConfigError, match=r"config\.batch_size=16 is larger than the 10 "
                                        "training examples"):
    train_lib.resolve_steps(_steps_config(batch_size=16, total_steps=5), 10)
  with pytest.raises(ConfigError, match="config.total_steps or config.total_epochs"):
    train_lib.resolve_steps(_steps_config(total_steps=0, total_epochs=0), 100)
  # Exactly one batch of data is enough.
  assert train_lib.resolve_steps(_steps_config(batch_size=10, total_epochs=2), 10)[
      "total"] == 2 * expected_steps_per_epoch(10, 10)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("stage1", [False, True])
def test_real_condseg_configs_count_in_epochs(dataset, stage1):
  """Every real ConDSeg config trains 300 epochs and evaluates once per epoch on the
  dataset's train split (bug caught: a config or resolve_steps change that silently
  turns 300 epochs into 300 steps, or evaluates per step)."""
  c = condseg_configs.get_config(dataset, "stage1" if stage1 else None)
  info = DATASETS[dataset]
  n = info.splits[info.train_split]
  spe = expected_steps_per_epoch(n, c.batch_size)
  got = train_lib.resolve_steps(c, n)
  assert got["steps_per_epoch"] == spe
  assert got["total"] == 300 * spe and got["eval_every"] == spe
  assert got["ckpt_every"] == 500 and got["log_every"] == 50


def test_epoch_config_drives_the_loop(tmp_path):
  """The loop uses the resolved counts: evaluations and checkpoints at epoch ends,
  ``train/epoch`` = step / steps_per_epoch (bug caught: the loop reading
  ``config.total_steps`` directly, or logging epochs with another steps-per-epoch)."""
  c = _toy.toy_config(total_steps=0, eval_every_steps=0, ckpt_every_steps=0,
                      log_every_steps=1, tensorboard=False)
  c.data.num_train = 20
  c.total_epochs, c.eval_every_epochs, c.ckpt_every_epochs = 3, 1, 1
  spe = expected_steps_per_epoch(20, c.batch_size)
  result = train_lib.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 3 * spe
  assert [s for s, _ in eval_rows(tmp_path)] == [spe, 2 * spe, 3 * spe]
  assert steps(tmp_path / "checkpoints") == [spe, 2 * spe, 3 * spe]
  rows = train_rows(tmp_path)
  assert [s for s, _ in rows] == list(range(1, 3 * spe + 1))
  for s, r in rows:
    assert r["train/epoch"] == pytest.approx(s / spe)


# ============================================================================= checkpoints
def _abstract_toy_state(config):
  """The toy's abstract train state (shapes and shardings), the restore target."""
  mesh = parallel.make_mesh()
  src = _toy.ToySource(8, 8, 0)
  batch = {k: np.stack([src[i][k] for i in range(8)]) for k in ("image", "mask")}
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global(batch, mesh)
    m = build_run(config, _toy.ToyMethod(config), mesh, jax.random.PRNGKey(0), gb,
                  total_steps=12)
  return m.abstract, mesh


def test_keep_checkpoints_prunes_rolling_not_best(tmp_path):
  """``keep_checkpoints=2`` leaves exactly the two newest rolling checkpoints on disk,
  with asynchronous saves as users run them; the best checkpoint (older than both) is
  not pruned. Bugs caught: keep ignored, off by one, pruning counting the best series."""
  c = _scripted_config({2: 0.1, 4: 0.9, 6: 0.2, 8: 0.3, 10: 0.2, 12: 0.1}, 12,
                       keep_checkpoints=2, async_checkpointing=True)
  c.ckpt_every_steps = 3
  train_lib.train_and_evaluate(c, str(tmp_path))
  assert steps(tmp_path / "checkpoints") == [9, 12]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "9"]  # no leftovers
  assert steps(tmp_path / "best") == [4]
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False, create=False)
  try:
    assert ck.all_steps() == [9, 12] and ck.latest_step() == 12 and ck.best_step() == 4
  finally:
    ck.close()


def test_restore_resolves_and_errors_name_what_exists(tmp_path):
  """``Checkpointer.restore``: 'latest', 'best', a step of either series, and errors that
  name the checkpoints that do exist (bugs caught: a pruned step restoring something else,
  a best step not found because only the rolling series is searched, a typo read as
  'latest')."""
  c = _scripted_config({2: 0.1, 4: 0.9, 6: 0.2, 8: 0.3, 10: 0.2, 12: 0.1}, 12,
                       keep_checkpoints=2)
  c.ckpt_every_steps = 3
  train_lib.train_and_evaluate(c, str(tmp_path))
  abstract, mesh = _abstract_toy_state(c)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False, create=False)
  try:
    with jax.set_mesh(mesh):
      for which, want_step, series in (("latest", 12, ckpt_lib.CHECKPOINTS),
                                       ("best", 4, ckpt_lib.BEST),
                                       (9, 9, ckpt_lib.CHECKPOINTS),
                                       ("9", 9, ckpt_lib.CHECKPOINTS),
                                       (4, 4, ckpt_lib.BEST)):
        state, loop, step = ck.restore(abstract, step=which)
        assert step == want_step, which
        assert_trees_equal(jax.device_get(state.params),
                           raw_state(tmp_path, want_step, series)["params"], str(which))
        assert loop["best_step"] == 4
      with pytest.raises(FileNotFoundError) as e:
        ck.restore(abstract, step=6)  # pruned
      assert str(e.value) == (f"no checkpoint for step 6 in {tmp_path}; have [9, 12] "
                              "(best: [4])")
      with pytest.raises(ValueError, match=r"checkpoint='lastest': expected 'latest', "
                                           r"'best' or a step number"):
        ck.restore(abstract, step="lastest")
      with pytest.raises(ValueError, match="best checkpoint holds no data-iterator"):
        ck.restore(abstract, step="best", data_iter=iter([]))
  finally:
    ck.close()


def test_missing_best_and_missing_checkpoints_are_named(tmp_path, caplog):
  """A run without ``best_metric`` has no best checkpoint: restoring 'best' says so and
  how to get one, ``load_variables('best')`` falls back to the latest with a warning;
  an empty workdir names the missing folder."""
  c = _toy.toy_config(total_steps=6, ckpt_every_steps=3, best_metric="",
                      tensorboard=False)
  train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  abstract, mesh = _abstract_toy_state(c)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "run"), async_save=False, create=False)
  try:
    with jax.set_mesh(mesh), pytest.raises(FileNotFoundError) as e:
      ck.restore(abstract, step="best")
  finally:
    ck.close()
  assert str(e.value) == (f"no best checkpoint in {tmp_path / 'run' / 'best'} (is an "
                          "evaluation with config.best_metric configured?)")
  with caplog.at_level("WARNING"):
    v = ckpt_lib.load_variables(str(tmp_path / "run"), "best")
  assert v["step"] == 6 and "has no best checkpoint; using the latest one" in caplog.text

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(workdir_lib.WorkdirNotFoundError, match="holds no checkpoints/"):
    ckpt_lib.Checkpointer(str(empty), create=False)
  ck = ckpt_lib.Checkpointer(str(empty), async_save=False)
  try:
    with pytest.raises(FileNotFoundError) as e:
      ck.restore(abstract, step="latest")
  finally:
    ck.close()
  assert str(e.value) == f"no checkpoint in {empty / 'checkpoints'}"
