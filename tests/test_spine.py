"""The shared spine: optimizer groups, plateau, sharded step, train loop, resume,
preemption, divergence, multi-process."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _toy
from contrastjax import checkpoint as ckpt_lib
from contrastjax import parallel
from contrastjax import spine
from contrastjax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.join(REPO, "tests"), REPO, env.get("PYTHONPATH", "")])
  env.update(extra)
  return env


# ----------------------------------------------------------------------------- optimizer
def test_param_groups_scale_learning_rates():
  params = {"backbone": {"w": jnp.ones((3,))}, "decode_head": {"w": jnp.ones((3,)),
                                                              "norm": jnp.ones((3,))}}
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5,
      groups=[("head.*norm", 10.0, 0.0), ("head", 10.0, 1.0)]))
  tx = spine.make_optimizer(cfg, params, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # sgd update = -lr * (g + wd * p)
  np.testing.assert_allclose(updates["backbone"]["w"], -0.1 * (1 + 0.5))
  np.testing.assert_allclose(updates["decode_head"]["w"], -1.0 * (1 + 0.5))
  np.testing.assert_allclose(updates["decode_head"]["norm"], -1.0 * 1.0)


def test_warmup_poly_schedule_values():
  cfg = ml_collections.ConfigDict(dict(schedule="warmup_poly", warmup_steps=10,
                                       power=1.0, warmup_init_factor=0.0))
  sched = spine.learning_rate_schedule(cfg, 1.0, total_steps=110)
  np.testing.assert_allclose(sched(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sched(60), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.0, atol=1e-7)


def test_plateau_follows_torch_reduce_lr_on_plateau():
  values = [1.0, 0.9, 0.9, 0.95, 0.91, 0.9, 0.8, 0.85, 0.85, 0.85, 0.85, 0.7]
  cfg = ml_collections.ConfigDict(dict(factor=0.1, patience=2, rtol=1e-4))
  ptx = spine.make_plateau(cfg)
  st = ptx.init({"w": jnp.zeros(())})
  ours = []
  for v in values:
    st = spine.plateau_update(ptx, st, v)
    ours.append(float(st.scale))
  torch = pytest.importorskip("torch")
  p = torch.nn.Parameter(torch.zeros(()))
  opt = torch.optim.SGD([p], lr=1.0)
  sch = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor=0.1, patience=2)
  theirs = []
  for v in values:
    sch.step(v)
    theirs.append(opt.param_groups[0]["lr"])
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert min(ours) < 1.0  # the sequence does plateau


# ----------------------------------------------------------------------------- sharded step
def _one_step(mesh, config, batch_np):
  return _toy.run_steps(_toy.ToyMethod(config), config, mesh, batch_np)


def test_step_on_8_devices_equals_1_device():
  assert jax.device_count() == 8
  config = _toy.toy_config()
  src = _toy.ToySource(16, 8, 0)
  batch = {k: np.stack([src[i][k] for i in range(16)]) for k in ("image", "mask")}
  s1, m1 = _one_step(parallel.make_mesh(devices=jax.devices()[:1]), config, batch)
  s8, m8 = _one_step(parallel.make_mesh(), config, batch)
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  # the gradient itself: Adam's update would hide a device-count scale of it
  np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
  assert m1["grad_norm"] > 0
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s1.model_state), jax.tree.leaves(s8.model_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # BatchNorm statistics are global-batch: the 8-device run saw one example per device.
  assert not np.allclose(jax.tree.leaves(s8.model_state)[0], 0.0)


# ----------------------------------------------------------------------------- loop
def _final_params(workdir, which="latest"):
  ck = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    mngr, step = ck._resolve(which)
  finally:
    ck.close()
  v = ckpt_lib.load_variables(workdir, which)
  return v, step


def test_train_loop_logs_evaluates_checkpoints(tmp_path):
  config = _toy.toy_config()
  # A second, sparser evaluation (every_steps): only at its multiples and the last step.
  config.evals.sparse = dict(type="binary_seg", split="val", every_steps=8)
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 12
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  steps_logged = [l["step"] for l in lines if "train/loss" in l]
  assert steps_logged == [2, 4, 6, 8, 10, 12]
  evals = [l for l in lines if "val/mIoU" in l]
  assert [l["step"] for l in evals] == [4, 8, 12]
  assert all(0.0 <= l["val/mIoU"] <= 1.0 and l["val/num_images"] == 10 for l in evals)
  assert [l["step"] for l in lines if "sparse/mIoU" in l] == [8, 12]
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  assert losses[-1] < losses[0]  # it learns
  assert json.load(open(tmp_path / "config.json"))["method"] == "_toy:ToyMethod"
  assert os.listdir(tmp_path / "tensorboard")
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert ck.all_steps() == [3, 6, 9, 12]
  best = max(evals, key=lambda l: l["val/mIoU"])["step"]
  assert ck.best_step() == best
  ck.close()


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = _toy.toy_config(toy_nan_at_step=8)
  with pytest.raises(train_lib.DivergenceError, match="at step 8"):
    train_lib.train_and_evaluate(cfg, str(tmp_path))
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  assert ck.all_steps() == [3, 6]
  ck.close()
  v = ckpt_lib.load_variables(str(tmp_path), "latest")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(v["params"]))


def _run_cli(workdir, extra_args=(), **kw):
  return subprocess.Popen(
      [sys.executable, "-m", "contrastjax.train",
       f"--config={os.path.join(REPO, 'tests', '_toy_config.py')}"
       + (":" + ",".join(extra_args) if extra_args else ""),
       f"--workdir={workdir}"],
      env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      **kw)


def _wait_for_checkpoint(workdir, step, proc, timeout=240):
  path = os.path.join(workdir, "checkpoints", str(step))
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for a checkpoint")
    time.sleep(0.05)


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(tmp_path):
  args = ("total_steps=40", "ckpt_every_steps=5", "eval_every_steps=10")
  ref = tmp_path / "ref"
  p = _run_cli(str(ref), args)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out
  killed = tmp_path / "killed"
  p = _run_cli(str(killed), args)
  _wait_for_checkpoint(str(killed), 15, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  ck = ckpt_lib.Checkpointer(str(killed), async_save=False)
  assert ck.latest_step() < 40
  ck.close()
  p = _run_cli(str(killed), args)
  out = p.communicate(timeout=600)[0]
  assert p.returncode == 0, out
  a, b = ckpt_lib.load_variables(str(ref), 40), ckpt_lib.load_variables(str(killed), 40)
  for x, y in zip(jax.tree.leaves((a["params"], a["model_state"])),
                  jax.tree.leaves((b["params"], b["model_state"]))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  args = ("total_steps=100000", "ckpt_every_steps=10000", "eval_every_steps=0")
  p = _run_cli(str(tmp_path), args)
  # wait until training runs (metrics.jsonl gets its first line)
  t0 = time.time()
  while not (os.path.exists(tmp_path / "metrics.jsonl")
             and os.path.getsize(tmp_path / "metrics.jsonl") > 0):
    assert p.poll() is None, p.stdout.read()
    assert time.time() - t0 < 240
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 0, out
  assert "SIGTERM" in out
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  step = ck.latest_step()
  ck.close()
  assert step is not None and 0 < step < 100000


def test_cli_rejects_unknown_config_key(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "contrastjax.train",
       f"--config={os.path.join(REPO, 'tests', '_toy_config.py')}",
       "--config.no_such_key=1", f"--workdir={tmp_path}"],
      env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  assert "no_such_key" in p.stderr


def test_train_loop_compiles_train_and_eval_steps_ahead(tmp_path, caplog):
  """The train and eval steps compile on background threads during state init; the
  loop's first calls then find them in jit's cache: each program compiles once."""
  # Fresh shapes, so neither program is in this process's caches from other tests.
  config = _toy.toy_config(total_steps=4, eval_every_steps=4, ckpt_every_steps=4,
                           batch_size=16, eval_batch_size=16)
  # A second evaluation of the same split shares the val step's program.
  config.evals.sparse = dict(type="binary_seg", split="val", every_steps=4)
  jax.config.update("jax_log_compiles", True)  # global: the context manager is per thread
  try:
    with caplog.at_level("INFO"):
      train_lib.train_and_evaluate(config, str(tmp_path))
  finally:
    jax.config.update("jax_log_compiles", False)
  text = caplog.text
  assert "compiled ahead: " in text and "train step" in text and "val eval step" in text
  assert "ahead failed" not in text
  assert text.count("XLA compilation of jit(train_step)") == 1
  assert text.count("XLA compilation of jit(eval_step)") == 1


def test_compile_ahead_failure_is_logged_not_raised(caplog):
  def broken(*args):
    raise ValueError("bad shapes")

  class Fn:
    lower = staticmethod(broken)

  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  with caplog.at_level("WARNING"):
    spine.CompileAhead(mesh, {"train step": (Fn, ())}).join()
  assert "compiling the train step ahead failed (ValueError: bad shapes)" in caplog.text


# ----------------------------------------------------------------------------- frozen groups
@jax.custom_vjp
def _poisoned_identity(w):
  return w


def _poisoned_fwd(w):
  return w, None


def _poisoned_bwd(_, g):
  return (g * jnp.nan,)  # a differentiated frozen parameter would poison the gradient


_poisoned_identity.defvjp(_poisoned_fwd, _poisoned_bwd)


class _ProbeMethod(_toy.ToyMethod):
  """The toy whose first convolution kernel passes through an identity whose backward
  returns NaN: any gradient taken through it makes grad_norm NaN."""

  def loss_fn(self, params, model_state, extra, batch, rng, step):
    params = dict(params, Conv_0=dict(params["Conv_0"],
                                      kernel=_poisoned_identity(params["Conv_0"]["kernel"])))
    return super().loss_fn(params, model_state, extra, batch, rng, step)


def test_frozen_group_is_neither_updated_nor_differentiated_and_has_no_state():
  config = _toy.toy_config()
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-2, groups=[dict(regex="Conv_0", frozen=True),
                                    dict(regex="Conv_1", lr_mult=0.5,
                                         schedule=dict(schedule="warmup_poly",
                                                       warmup_steps=5))]))
  src = _toy.ToySource(8, 8, 0)
  batch = {k: np.stack([src[i][k] for i in range(8)]) for k in ("image", "mask")}
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  method = _ProbeMethod(config)
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global(batch, mesh)
    run = spine.build_run(config, method, mesh, jax.random.PRNGKey(0), gb, total_steps=10)
    state0 = jax.device_get(jax.jit(run.create, out_shardings=run.state_sharding)(
        jax.random.PRNGKey(0), gb))
    state = jax.device_put(state0, run.state_sharding)
    for _ in range(3):
      state, metrics = run.compiled.train_step(state, gb)
  state = jax.device_get(state)
  assert np.isfinite(metrics["grad_norm"])  # the poisoned backward never ran
  for a, b in zip(jax.tree.leaves(state0.params["Conv_0"]),
                  jax.tree.leaves(state.params["Conv_0"])):
    np.testing.assert_array_equal(a, b)      # frozen: untouched
  assert not np.allclose(state0.params["Conv_1"]["kernel"], state.params["Conv_1"]["kernel"])
  inner = state.opt_state.inner_states
  assert jax.tree.leaves(inner["group0:Conv_0"]) == []       # no optimizer state
  assert jax.tree.leaves(inner["group1:Conv_1"])              # Adam moments
  # Unfrozen, the same probe poisons the gradient: the test can fail.
  config.optimizer.groups = [dict(regex="Conv_1", lr_mult=0.5)]
  with jax.set_mesh(mesh):
    run = spine.build_run(config, method, mesh, jax.random.PRNGKey(0), gb, total_steps=10)
    state = jax.jit(run.create, out_shardings=run.state_sharding)(jax.random.PRNGKey(0), gb)
    _, metrics = run.compiled.train_step(state, gb)
  assert np.isnan(metrics["grad_norm"])


def test_group_schedule_overrides_the_base_schedule():
  params = {"a": jnp.ones(()), "b": jnp.ones(())}
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", lr=1.0, momentum=0.0, schedule="constant",
      groups=[dict(regex="^b", lr_mult=2.0, schedule=dict(schedule="warmup_poly",
                                                            warmup_steps=4, power=1.0))]))
  tx = spine.make_optimizer(cfg, params, total_steps=8)
  st = tx.init(params)
  grads = {"a": jnp.ones(()), "b": jnp.ones(())}
  got = []
  for _ in range(3):
    u, st = tx.update(grads, st, params)
    got.append((float(u["a"]), float(u["b"])))
  # a: constant lr 1; b: 2 x linear warm-up from 0 over 4 steps: 0, 0.5, 1.0
  np.testing.assert_allclose(got, [(-1, 0), (-1, -0.5), (-1, -1.0)], atol=1e-6)
  with pytest.raises(ValueError, match=r"groups\[0\].schedule has unknown key\(s\) \['lr'\]"):
    spine.make_optimizer(ml_collections.ConfigDict(dict(
        lr=1.0, groups=[dict(regex="a", schedule=dict(lr=3))])), params, 8)
  with pytest.raises(ValueError, match=r"groups\[0\]=.*unknown \['frozn'\]"):
    spine.make_optimizer(ml_collections.ConfigDict(dict(
        lr=1.0, groups=[dict(regex="a", frozn=True)])), params, 8)
