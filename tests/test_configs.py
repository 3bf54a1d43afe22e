"""Every config file starts its docstring with the command that runs it, loads with its
default, and rejects unknown variants naming them; the ConDSeg configs in every
variant. (Each method's own tests check its configs' variants in detail.)"""
import glob
import importlib.util
import os

import pytest

from contrastjax.configs.common import parse_arg
from contrastjax.data.sources.medseg import DATASETS
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


def _walk(config, dotted: str):
  """The value at ``a.b.c`` of a ConfigDict (KeyError naming the missing part)."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise KeyError(f"{dotted}: no key {part!r} (have {sorted(node.keys())})")
    node = node[part]
  return node


def _docstring_commands(mod) -> list[list[str]]:
  """The shell commands at the top of a config's docstring, ``\\``-continued lines
  joined, optional ``[--flag=x]`` unbracketed, each split into words."""
  import shlex  # pylint: disable=g-import-not-at-top
  text = mod.__doc__.split("\n\n")[0].replace("\\\n", " ")
  commands = []
  for line in text.splitlines():
    if line.strip().startswith("python -m "):
      commands.append(shlex.split(line.replace("[", " ").replace("]", " ")))
  return commands


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_docstring_commands_run_as_written(path):
  """Every command at the top of a config's docstring would start: its module exists,
  its ``--config=configs/<file>:ARG`` builds (ARG's variants are known), every
  ``--config.x.y=v`` override names a key of that config with a value of its type, and
  it names a ``--workdir``. Bugs caught: a renamed variant, key or module left in the
  documented command, a command pointing at another config file."""
  mod = _load(path)
  commands = _docstring_commands(mod)
  assert commands, "no command in the docstring"
  for words in commands:
    module = words[2]
    assert importlib.util.find_spec(module) is not None, module
    flags = dict(w[2:].split("=", 1) for w in words[3:])
    assert flags.get("workdir"), words
    config_path, _, arg = flags["config"].partition(":")
    assert config_path == f"configs/{os.path.basename(path)}", words
    c = mod.get_config(arg or None)
    for key, value in flags.items():
      if not key.startswith("config."):
        continue
      old = _walk(c, key[len("config."):])
      if isinstance(old, bool):
        assert value.lower() in ("true", "false", "1", "0"), (key, value)
      elif isinstance(old, (int, float)):
        type(old)(value)
      else:
        assert isinstance(old, str), (key, type(old))


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_medseg_dataset_has_its_condseg_config(dataset):
  """Each dataset of ``contrastjax.data.sources.medseg.DATASETS`` has exactly one
  ``configs/condseg_*.py`` that builds with it, in both stages, and whose docstring agrees
  with the dataset's facts: the folder in its command, the image count and split sizes,
  the paper's numbers. Bugs caught: a config file built on another dataset (copy-paste), a
  dataset without a config, a docstring left over from another dataset."""
  import re  # pylint: disable=g-import-not-at-top
  info = DATASETS[dataset]
  mine = [p for p in CONDSEG_CONFIGS if _load(p).get_config(None).data.dataset == dataset]
  assert len(mine) == 1, (dataset, mine)
  mod = _load(mine[0])
  assert mod.get_config("stage1").data.dataset == dataset
  assert mod.get_config("stage1").method == "condseg_stage1"
  assert mod.get_config(None).method == "condseg"
  for words in _docstring_commands(mod):
    roots = [w.split("=", 1)[1] for w in words if w.startswith("--config.data.root=")]
    assert [os.path.basename(r) for r in roots] == [info.folder], words
  sizes = "/".join(str(info.splits[s]) for s in ("train", "val", "test") if s in info.splits)
  assert (f"({info.modality}, {info.target}; {info.num_examples} images, split {sizes})"
          in mod.__doc__), mod.__doc__
  paper = re.search(r"^Paper \(.*?\): (.*)\.$", mod.__doc__, re.M).group(1)
  want = {"miou": "mIoU", "dice": "mDSC", "recall": "recall", "precision": "precision"}
  numbers = dict(item.rsplit(" ", 1) for item in paper.split(", "))
  assert numbers == {want[k]: f"{v}" for k, v in info.paper.items() if v is not None}


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
