"""The builder's dataset registry: ``DataSpec.info`` of every maker and ``dataset_info``."""
from __future__ import annotations

import ml_collections
import pytest

from contrastjax.data import builder
from contrastjax.data.builder import DatasetInfo
from contrastjax.data.sources import isprs
from contrastjax.data.sources import loveda
from contrastjax.data.synthetic import aerial
from contrastjax.errors import ConfigError


def test_dataset_info_fields():
  info = DatasetInfo("x", ["a", "b"], [[1, 2, 3], (4, 5, 6)])
  assert info.classes == ("a", "b") and info.palette == ((1, 2, 3), (4, 5, 6))
  assert info.num_classes == 2 and info.ignore_index == 255
  with pytest.raises(ValueError, match="2 classes need as many RGB colours"):
    DatasetInfo("x", ("a", "b"), ((0, 0, 0),))
  with pytest.raises(ValueError, match="RGB"):
    DatasetInfo("x", ("a",), ((0, 0),))


def test_dataset_info_by_name():
  assert builder.dataset_info("loveda") == DatasetInfo("loveda", loveda.CLASSES, loveda.PALETTE)
  assert builder.dataset_info("loveda").num_classes == 7
  assert builder.dataset_info("isprs") == DatasetInfo("isprs", isprs.CLASSES, isprs.PALETTE)
  assert builder.dataset_info("synthetic_aerial") == DatasetInfo(
      "synthetic_aerial", aerial.CLASSES, aerial.PALETTE)
  for name in ("medseg", "synthetic_polyps"):
    info = builder.dataset_info(name)
    assert info.name == name and info.classes == ("background", "foreground")
    assert info.palette == ((0, 0, 0), (255, 255, 255)) and info.ignore_index is None
  for name in ("synthetic_pairs", "coco_captions"):
    with pytest.raises(ValueError, match="no class names"):
      builder.dataset_info(name)
  with pytest.raises(ConfigError, match="not a known dataset"):
    builder.dataset_info("no_such_dataset")


@pytest.mark.parametrize("name, data", [
    ("synthetic_polyps", dict(num_train=2, num_val=2, image_size=32)),
    ("synthetic_aerial", dict(image_size=32, num_train=2, num_val=2)),
    ("synthetic_pairs", dict(num_train=4, num_val=4)),
])
def test_every_maker_fills_spec_info(name, data):
  spec = builder.make_spec(ml_collections.ConfigDict(dict(seed=0, data=dict(name=name, **data))))
  if name == "synthetic_pairs":
    assert spec.info is None
  else:
    assert spec.info == builder.dataset_info(name)
