"""Bad input that every method shares, as users meet it: a data folder that is not there
(through the command line: exit status 4 and one line naming the path, no traceback), a
batch that does not divide over the devices, a config value of the wrong type, and an
unknown variant (named errors before any compilation). docs/bad_input.md lists every
bad-input class per method and its test."""
import subprocess
import sys

import jax
import pytest

from contrastjax import train as train_lib
from contrastjax.errors import ConfigError

from _harness import REPO, env

#: method -> the config file of its real recipe (each has a ``demo`` argument)
CONFIGS = {"condseg": "condseg_kvasir.py", "siamseg": "siamseg_loveda.py",
           "clip": "clip_gap_coco.py", "apc": "apc_voc.py"}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_missing_data_root_exits_4_with_one_line(tmp_path, method):
  missing = tmp_path / "no_such_data"
  p = subprocess.run(
      [sys.executable, "-m", "contrastjax.train", f"--config=configs/{CONFIGS[method]}",
       f"--config.data.root={missing}", f"--workdir={tmp_path / 'run'}"],
      env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 4, p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  errors = [l for l in p.stderr.splitlines() if l.startswith("ERROR: ")]
  assert len(errors) == 1 and str(missing) in errors[0], p.stderr[-3000:]
  assert "does not exist" in errors[0]


def _config(method, arg):
  """``configs/<method's file>`` -> ``get_config(arg)``, as the config flag loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"cfg_{method}",
                                                f"{REPO}/configs/{CONFIGS[method]}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("key", ["batch_size", "eval_batch_size"])
def test_batch_that_does_not_divide_over_the_devices_is_named(tmp_path, method, key):
  assert jax.device_count() == 8
  c = _config(method, "demo")
  c[key] = 12
  with pytest.raises(ConfigError, match=rf"config\.{key}=12 must be divisible by the 8 "
                                        r"devices of the mesh's 'data' axis"):
    train_lib.train_and_evaluate(c, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  assert not ckpts.exists() or not any(ckpts.iterdir())


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_unknown_variant_is_named_with_the_accepted_ones(method):
  with pytest.raises(ConfigError, match=r"config argument 'nope' \(in 'demo,nope'\) is not "
                                        r"known; accepted: \[.*'demo'"):
    _config(method, "demo,nope")


def test_config_file_errors_and_wrong_types_are_one_line_with_exit_code_2(tmp_path):
  """Through the command line: an unknown variant (an exception inside the config file's
  ``get_config``, which ml_collections wraps with its traceback) and a value that does not
  parse as the key's type are one ``ERROR:`` line each, exit status 2."""
  cases = [("configs/apc_voc.py:demo,nope", [],
            "ERROR: flag --config=configs/apc_voc.py:demo,nope: config argument 'nope' "
            "(in 'demo,nope') is not known; accepted: ["),
           ("configs/siamseg_loveda.py:demo", ["--config.siamseg.alpha=high"],
            "ERROR: flag --config.siamseg.alpha=high: could not convert string to float: "
            "'high'")]
  for config, flags, want in cases:
    p = subprocess.run([sys.executable, "-m", "contrastjax.train", f"--config={config}",
                        *flags, f"--workdir={tmp_path / 'run'}"],
                       env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [l for l in p.stderr.splitlines() if l.startswith("ERROR: ")]
    assert len(errors) == 1 and errors[0].startswith(want), p.stderr[-3000:]
