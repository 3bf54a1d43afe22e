"""``contrastjax.platform``: the XLA:CPU flags it sets, and that they keep the numerics.

The XNNPACK graph-fusion flag routes convolutions and matmuls through another library,
which sums in another order. ``test_xnn_fusion_matches_default_pipeline`` runs a small
ResNet (forward in train mode and gradients) in a subprocess without the flag and
compares it with this process, where ``tests/conftest.py`` set it: the two must agree
to float32 round-off.
"""
import os
import subprocess
import sys

import numpy as np

from contrastjax import platform

FLAG = platform.CPU_XLA_FLAGS[0].split("=")[0]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- flags
_CACHE_PROBE = """
import os, jax, jax.numpy as jnp
from contrastjax import platform
print(repr(platform.configure_compilation_cache()))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.ones(5)).block_until_ready()
"""


def _cache_probe(env_updates):
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.update(env_updates)
  out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_compilation_cache_dir_from_env_and_off_switch(tmp_path):
  cache = tmp_path / "xla"
  assert _cache_probe({"CONTRASTJAX_COMPILATION_CACHE": str(cache)}) == repr(str(cache))
  assert any(cache.iterdir()), "the compiled program was not written to the cache"
  assert _cache_probe({"CONTRASTJAX_COMPILATION_CACHE": "0"}) == "''"
  # The user's own JAX setting wins.
  own = tmp_path / "own"
  assert _cache_probe({"CONTRASTJAX_COMPILATION_CACHE": str(cache),
                       "JAX_COMPILATION_CACHE_DIR": str(own)}) == repr(str(own))


def test_configure_cpu_adds_flags_once(monkeypatch, tmp_path):
  dump = f"--xla_dump_to={tmp_path / 'x'}"
  monkeypatch.setenv("XLA_FLAGS", dump)
  monkeypatch.delenv("CONTRASTJAX_CPU_FLAGS", raising=False)
  platform.configure_cpu()
  platform.configure_cpu()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == dump
  assert flags.count(platform.CPU_XLA_FLAGS[0]) == 1


def test_configure_cpu_keeps_user_value_and_can_be_disabled(monkeypatch):
  mine = f"{FLAG}=XNN_GRAPH_FUSION_MODE_DISABLED"
  monkeypatch.setenv("XLA_FLAGS", mine)
  platform.configure_cpu()
  assert os.environ["XLA_FLAGS"] == mine
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("CONTRASTJAX_CPU_FLAGS", "0")
  platform.configure_cpu()
  assert os.environ["XLA_FLAGS"] == ""
  platform.configure_cpu(enable=True)
  assert FLAG in os.environ["XLA_FLAGS"]


# ----------------------------------------------------------------------------- numerics
def _compute() -> dict[str, np.ndarray]:
  """Train-mode forward of a small ResNet and the gradients of a loss on it.

  Deterministic NumPy inputs and parameters; ~3 s of compile. Runs in this process and,
  via ``__main__``, in a subprocess with other XLA flags.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from contrastjax.models import resnet  # pylint: disable=import-outside-toplevel

  model = resnet.ResNet(stage_sizes=(1, 1), stem_width=16, base_width=16)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((2, 32, 32, 3), np.float32))
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(size=leaf.shape) * 0.1
    return jnp.asarray(value, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)

  def loss(params):
    feats, _ = model.apply({**variables, "params": params}, x, train=True,
                           mutable=["batch_stats"])
    return sum(jnp.mean(jnp.square(f)) for f in feats.values()), feats

  (_, feats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  out = {f"out/{k}": np.asarray(v) for k, v in feats.items()}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    out["grad" + jax.tree_util.keystr(path)] = np.asarray(g)
  return out


def test_xnn_fusion_matches_default_pipeline(tmp_path):
  assert FLAG in os.environ.get("XLA_FLAGS", ""), "tests/conftest.py sets the platform flags"
  path = tmp_path / "default.npz"
  env = dict(os.environ, XLA_FLAGS="", CONTRASTJAX_CPU_FLAGS="0",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "XLA_FLAGS=\n" in proc.stdout  # the subprocess really ran without the flag
  want = dict(np.load(path))
  got = _compute()
  assert sorted(got) == sorted(want)
  assert len([k for k in got if k.startswith("grad")]) > 20
  for key, value in got.items():
    scale = max(float(np.abs(want[key]).max()), 1e-3)
    err = float(np.abs(value - want[key]).max())
    # float32 round-off of sums over up to a few thousand terms, relative to the scale.
    assert err <= 2e-5 * scale, (key, err, scale)


if __name__ == "__main__":
  # Subprocess of test_xnn_fusion_matches_default_pipeline: compute with this
  # process's XLA flags and save the arrays.
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  np.savez(sys.argv[1], **_compute())


def test_configure_cpu_for_follows_the_config_and_the_env(monkeypatch):
  monkeypatch.delenv("CONTRASTJAX_CPU_FLAGS", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not platform.configure_cpu_for({"xnn_fusion": False})
  assert os.environ["XLA_FLAGS"] == ""
  assert platform.configure_cpu_for({})  # default on
  assert FLAG in os.environ["XLA_FLAGS"]
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("CONTRASTJAX_CPU_FLAGS", "0")
  assert not platform.configure_cpu_for({"xnn_fusion": True})
  assert os.environ["XLA_FLAGS"] == ""


def test_configure_cpu_warns_once_the_backend_has_started(monkeypatch):
  import jax
  import pytest
  jax.devices()  # the backend is up in this process
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.warns(RuntimeWarning, match="already started"):
    platform.configure_cpu(enable=True)
