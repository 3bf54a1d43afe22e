"""CLIP on synthetic pairs end to end: the demo config through ``train_and_evaluate``,
and the paper's main effect in miniature (TS ends with a smaller gap than the learnable
temperature)."""
import importlib.util
import json
import os

import jax
import numpy as np

from contrastjax import parallel
from contrastjax import spine
from contrastjax import train as train_lib
from contrastjax.data.synthetic.pairs import SyntheticPairs
from contrastjax.evaluators import retrieval as R
from contrastjax.methods.clip import CLIPMethod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg):
  path = os.path.join(REPO, "configs", "clip_gap_coco.py")
  spec = importlib.util.spec_from_file_location("clip_gap_coco", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_demo_config_trains_and_writes_retrieval_and_gap_metrics(tmp_path):
  c = _config("demo,ss")
  c.data.num_train, c.data.num_val, c.data.num_zeroshot = 256, 96, 40
  c.batch_size, c.eval_batch_size = 32, 64
  c.total_steps, c.eval_every_steps, c.log_every_steps, c.ckpt_every_steps = 6, 6, 3, 6
  c.optimizer.warmup_steps = 2
  c.clip.swap_prob = 1.0
  c.evals.val.gap_pairs = 64
  c.async_checkpointing, c.progress_bar, c.plot_curves, c.tensorboard = False, False, False, False
  result = train_lib.train_and_evaluate(c, str(tmp_path))
  assert result["step"] == 6
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  val = [r for r in rows if "val/gap" in r][-1]
  for key in ("val/gap", "val/gap_rand64", "val/uniformity", "val/i2t_R@1_pool96",
              "val/t2i_R@10_pool96", "val/i2t_R@1_pool64", "val/loss",
              "zeroshot/zeroshot_top1"):
    assert key in val and np.isfinite(val[key]), key
  assert 0 <= val["val/gap"] <= 2 and -2 <= val["val/uniformity"] <= 0
  train = [r for r in rows if "train/loss" in r][-1]
  assert train["train/swap_applied"] == 1.0 and 0.01 <= train["train/tau"] <= 1.0


def _train_gap(arg: str, steps: int, train, val) -> tuple[float, float]:
  c = _config(arg)
  c.total_steps = steps
  c.optimizer.warmup_steps = 20
  c.model.image.hidden = c.model.text.hidden = 64
  # TS reaches tau1 halfway and stays there (a short run's stand-in for 100 epochs).
  c.clip.schedule_horizon_steps = steps // 3
  c.optimizer.schedule = "constant"
  method = CLIPMethod(c)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  rs = np.random.default_rng(0)
  bs = 128
  with jax.set_mesh(mesh):
    gb = parallel.host_to_global({k: train[k][:bs] for k in ("image", "text")}, mesh)
    rng = jax.random.PRNGKey(0)
    m = spine.build_run(c, method, mesh, rng, gb, steps)
    state = jax.jit(m.create, out_shardings=m.state_sharding)(rng, gb)
    for _ in range(steps):
      idx = rs.integers(0, len(train["image"]), bs)
      state, metrics = m.compiled.train_step(state, parallel.host_to_global(
          {k: train[k][idx] for k in ("image", "text")}, mesh))
    out = jax.device_get(m.compiled.predict(state, parallel.host_to_global(val, mesh)))
  return R.modality_gap(out["image_embeds"], out["text_embeds"]), float(metrics["tau"])


def test_temperature_schedule_ends_with_a_smaller_gap_than_learned_temperature():
  kw = dict(data_seed=1234, map_seed=0, within=1.0, noise=0.02)
  def arrays(src):
    ex = [src[i] for i in range(len(src))]
    return {k: np.stack([e[k] for e in ex]) for k in ("image", "text")}
  train = arrays(SyntheticPairs(4096, "train", **kw))
  val = arrays(SyntheticPairs(512, "val", **kw))
  steps = 400
  gap_learn, tau_learn = _train_gap("demo", steps, train, val)
  gap_ts, tau_ts = _train_gap("demo,ts", steps, train, val)
  assert tau_learn < 0.02 and abs(tau_ts - 0.05) < 1e-3   # learned tau fell to the clamp
  assert gap_ts < 0.7 * gap_learn, (gap_ts, gap_learn)


def test_config_variants_have_the_paper_values():
  import pytest  # pylint: disable=g-import-not-at-top
  assert _config(None).clip.temperature == "learn" and _config(None).clip.tau_init == 0.07
  assert _config("flt").clip.tau0 == 4e-2 and _config("flt").clip.temperature == "fixed"
  ts = _config("ts")
  assert (ts.clip.temperature, ts.clip.tau0, ts.clip.tau1) == ("linear", 1e-2, 5e-2)
  assert [_config(s).clip.tau1 for s in ("s0", "s1", "s2", "a0", "a1")] == [
      2e-2, 3e-2, 4e-2, 2e-2, 4e-2]
  assert _config("tr").clip.parameterization == "softplus"
  assert _config("scale10").clip.scale == 10.0
  assert _config("slrt").optimizer.groups[0][1] == pytest.approx(0.1)
  assert (_config("hs").clip.swap, _config("hs").clip.swap_prob) == ("hard", 1e-3)
  assert (_config("ss").clip.swap, _config("ss").clip.swap_prob) == ("soft", 5e-2)
  assert _config(None).batch_size == 1024 and _config(None).optimizer.weight_decay == 0.2
  with pytest.raises(ValueError, match="at most one recipe"):
    _config("ts,flt")
  with pytest.raises(ValueError, match="'stage1'"):
    _config("stage1")


def test_coco_config_with_the_paper_towers_trains_and_evaluates(tmp_path):
  """The COCO config (shrunk OpenCLIP ModifiedResNet + text Transformer) on a COCO-layout
  fixture through ``train_and_evaluate``: training steps, the retrieval evaluation and a
  checkpoint. (Its first version could not start under the spine's mesh.)"""
  from test_clip_data import _coco  # pylint: disable=g-import-not-at-top
  root = tmp_path / "coco"
  _coco(str(root), "train", n_images=8)
  _coco(str(root), "val", n_images=5)
  c = _config(f"root={root},cifar10=")
  c.model.embed_dim = 16
  c.model.image = dict(name="modified_resnet", layers=(1, 1, 1, 1), width=8, heads=4,
                       image_size=32)
  c.model.text = dict(name="transformer", vocab_size=64, context_length=12, width=16,
                      layers=1, heads=2, mlp_ratio=2.0)
  c.data.update(image_size=32, context_length=12, max_vocab=64)
  c.batch_size, c.eval_batch_size = 8, 8   # one image per simulated device
  c.total_steps, c.eval_every_steps, c.log_every_steps, c.ckpt_every_steps = 3, 3, 1, 3
  c.optimizer.warmup_steps = 1
  c.clip.schedule_steps_per_epoch = 0
  c.evals.val.gap_pairs = 4
  c.async_checkpointing, c.progress_bar, c.plot_curves, c.tensorboard = False, False, False, False
  result = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  assert result["step"] == 3
  assert result["val/num_pairs"] == 5 and 0 <= result["val/gap"] <= 2
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
