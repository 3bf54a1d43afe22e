"""Every config file starts its docstring with the command that runs it, loads with its
default, and rejects unknown variants naming them; the ConDSeg configs in every
variant. (Each method's own tests check its configs' variants in detail.)"""
import glob
import importlib.util
import os

import pytest

from contrastjax.configs.common import parse_arg
from contrastjax.methods import get_method_class

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
CONDSEG_CONFIGS = [p for p in CONFIGS if os.path.basename(p).startswith("condseg_")]


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_docstring_default_and_unknown_variant(path):
  mod = _load(path)
  first = mod.__doc__.lstrip().splitlines()[0]
  assert first.startswith("python -m contrastjax."), first
  assert f"--config=configs/{os.path.basename(path)}" in first, first
  c = mod.get_config(None)
  if first.startswith("python -m contrastjax.train "):
    get_method_class(c.method)  # a registered method (raises naming it otherwise)
  with pytest.raises(ValueError, match="no_such_variant"):
    mod.get_config("no_such_variant")


def test_condseg_configs_present():
  assert len(CONDSEG_CONFIGS) == 5


@pytest.mark.parametrize("path", CONDSEG_CONFIGS, ids=os.path.basename)
def test_condseg_config_variants_load(path):
  mod = _load(path)
  for arg in (None, "stage1", "paper", "demo", "stage1,paper", "demo,stage1",
              "init_from=workdirs/x,root=data/x,backbone=weights/r50.pth"):
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


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_unknown_model_key_is_named(path):
  mod = _load(path)
  c = mod.get_config(None)
  if not c.get("method") or "model" not in c:
    pytest.skip("not a training config with a model")
  with c.unlocked():
    c.model.no_such_field = 1
  with pytest.raises(ValueError, match=r"config\.model\.no_such_field"):
    get_method_class(c.method)(c)
