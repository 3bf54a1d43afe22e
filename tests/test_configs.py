"""Every config file loads in every variant, starts its docstring with its command, and
rejects unknown variants."""
import glob
import importlib.util
import os

import pytest

from contrastjax.configs.common import parse_arg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_variants_load(path):
  mod = _load(path)
  assert mod.__doc__.lstrip().startswith("python -m contrastjax.train --config=configs/"
                                         + os.path.basename(path))
  for arg in (None, "stage1", "paper", "demo", "stage1,paper", "demo,stage1",
              "init_from=/tmp/x,root=/data/x,backbone=/w/r50.pth"):
    c = mod.get_config(arg)
    assert c.method in ("condseg", "condseg_stage1")
    assert c.batch_size > 0 and c.optimizer.lr > 0
  paper = mod.get_config("paper")
  assert paper.condseg.double_sigmoid and not paper.data.augment_background
  assert not paper.condseg.transfer_batch_stats and paper.data.channel_order == "bgr"
  default = mod.get_config(None)
  assert not default.condseg.double_sigmoid and default.data.augment_background
  assert default.optimizer.lr == 1e-4 and default.batch_size == 12
  assert default.plateau.patience == 30 and default.early_stop_patience == 100
  assert mod.get_config("stage1").batch_size == 8
  with pytest.raises(ValueError, match="stag1"):
    mod.get_config("stag1")


def test_parse_arg_types_and_errors():
  a = parse_arg("demo,n=3,lr=0.5,name=x", demo=False, n=1, lr=0.1, name="")
  assert (a.demo, a.n, a.lr, a.name) == (True, 3, 0.5, "x")
  with pytest.raises(ValueError, match="needs a value"):
    parse_arg("n", n=1)
  with pytest.raises(ValueError, match="true/false"):
    parse_arg("demo=maybe", demo=False)
