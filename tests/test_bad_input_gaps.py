"""Bad input that docs/bad_input.md listed as "Not covered": one section per method.

Each test feeds one kind of bad input through small fixtures in ``tmp_path`` (or a real
config file of ``configs/``) and asserts the exception type and that the message names
the file, key or value and says what was expected. No training, no compilation.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import shutil
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from _repo import load_module
from contrastjax.data import builder
from contrastjax.data.errors import DatasetError
from contrastjax.data.sources import cifar, coco, isprs, loveda, voc
from contrastjax.data.sources.medseg import MedSegSource
from contrastjax.data.tools import isprs_tiles
from contrastjax.errors import ConfigError
from test_clip_cifar import write_cifar
from test_clip_data import _coco
from test_data_isprs import POTSDAM_TILES, _image, _tif, make_potsdam
from test_data_loveda import make_loveda
from test_data_medseg import _disc, _rgb, _save, _single, make_dataset
from test_data_voc import COCO_TRAIN, COCO_VAL, make_coco, make_voc


@pytest.fixture
def dataset(tmp_path: pathlib.Path) -> pathlib.Path:
  """A medseg dataset in the reference layout (``test_data_medseg.make_dataset``)."""
  return make_dataset(tmp_path)


def _config(relative: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of ``configs/<relative>`` for ``arg``."""
  return load_module(f"configs/{relative}").get_config(arg)


def _with(section: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """``section`` with ``values`` set whatever their type. From Python a user can build any
  section; a locked ConfigDict would refuse the type change before the method sees it."""
  return ml_collections.ConfigDict({**section.to_dict(), **values})


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _disc_mask() -> np.ndarray:
  return np.where(_disc(), 255, 0).astype(np.uint8)


# =========================================================================== ConDSeg
def test_condseg_16bit_image_is_rejected(dataset):
  src = _single(dataset, "deep", np.full((24, 32), 40000, np.uint16), _disc_mask())
  with pytest.raises(DatasetError, match=r"image file .*deep\.png has I;16 pixels "
                     r"\(16/32-bit\); expected an 8-bit RGB or grayscale image") as e:
    src[0]
  assert e.value.kind == "bad_image"


def test_condseg_files_in_no_split_file_are_a_warning(dataset, caplog):
  # a, b, c are listed (train.txt, val.txt); z is in no split file.
  _save(dataset / "images" / "z.png", _rgb(5))
  _save(dataset / "masks" / "z.png", _disc_mask())
  with caplog.at_level(logging.WARNING):
    src = MedSegSource(dataset, "val")
  assert src.names == ("b",) and src.unlisted == 2
  assert ("2 image/mask file(s) are listed in no split file" in caplog.text
          and "images/z.png" in caplog.text and "masks/z.png" in caplog.text)
  caplog.clear()
  (dataset / "images" / "z.png").unlink()
  (dataset / "masks" / "z.png").unlink()
  with caplog.at_level(logging.WARNING):
    assert MedSegSource(dataset, "train").unlisted == 0
  assert "listed in no split file" not in caplog.text


def test_condseg_file_removed_after_indexing(dataset):
  src = MedSegSource(dataset, "train")
  (dataset / "images" / "b.png").unlink()
  with pytest.raises(DatasetError, match=r"image file .*images/b\.png does not exist \(it "
                     r"was there when the dataset was indexed\)") as e:
    src[1]
  assert e.value.kind == "missing_file"
  (dataset / "masks" / "c.bmp").unlink()
  with pytest.raises(DatasetError, match=r"mask file .*masks/c\.bmp does not exist"):
    src[2]


def test_condseg_maker_root_unset_or_not_a_folder(dataset, tmp_path, monkeypatch):
  def spec(root):
    return builder.make_spec(ml_collections.ConfigDict(dict(seed=0, data=dict(
        name="medseg", root=root, image_size=32))))
  with pytest.raises(DatasetError, match=r"config.data.root='': set it to the dataset folder "
                     r"\(holding images/, masks/, train.txt, val.txt\)"):
    spec("")
  monkeypatch.delenv("NO_SUCH_VAR_CJ", raising=False)
  with pytest.raises(DatasetError, match=r"config.data.root='\$NO_SUCH_VAR_CJ/Kvasir': set it"):
    spec("$NO_SUCH_VAR_CJ/Kvasir")
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(DatasetError, match=r"config.data.root='.*a_file' does not exist or is "
                     "not a folder"):
    spec(str(tmp_path / "a_file"))


@pytest.mark.parametrize("arg, key, value, match", [
    (None, "double_sigmoid", "yes", "expected True or False"),
    (None, "transfer_batch_stats", 1, "expected True or False"),
    (None, "init_from_which", 1.5, "expected a string or an integer"),
    (None, "pretrained_backbone", 3, "expected a string"),
    ("stage1", "consistency_weight", "high", "expected a number"),
    ("stage1", "strong_aug", "blur", "expected a dict"),
], ids=["double_sigmoid", "transfer_batch_stats", "init_from_which", "pretrained_backbone",
        "consistency_weight", "strong_aug"])
def test_condseg_wrong_types_in_config_condseg(arg, key, value, match):
  from contrastjax.methods import get_method_class  # pylint: disable=g-import-not-at-top
  c = _config("condseg_kvasir.py", arg)
  get_method_class(c.method)(c)                      # the config file itself is fine
  c.condseg = _with(c.condseg, **{key: value})
  with pytest.raises(ConfigError, match=rf"config\.condseg\.{key}={value!r}: {match}"):
    get_method_class(c.method)(c)


def test_condseg_stage1_options_in_stage2_are_refused():
  from contrastjax.methods import condseg as condseg_method  # pylint: disable=g-import-not-at-top
  stage1 = _config("condseg_kvasir.py", "stage1")
  c = _config("condseg_kvasir.py")
  c.condseg = _with(c.condseg, strong_aug=stage1.condseg.strong_aug.to_dict())
  with pytest.raises(ConfigError, match=r"config\.condseg\.strong_aug .* is a stage-1 option "
                     r"\(config\.method='condseg_stage1'\); config\.method='condseg' \(stage 2\) "
                     "does not use it"):
    condseg_method.ConDSegMethod(c)
  c.condseg = _with(c.condseg, consistency_weight=1.0)
  with pytest.raises(ConfigError, match=r"\['consistency_weight', 'strong_aug'\]"):
    condseg_method.ConDSegMethod(c)


def test_condseg_unknown_dataset_in_get_config():
  from contrastjax.configs import condseg as condseg_configs  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"dataset 'kvasir' is not known; expected one of "
                     r"\['glas', 'isic2016', 'isic2017', 'kvasir_seg', 'kvasir_sessile'\]"):
    condseg_configs.get_config("kvasir")


# =========================================================================== SiamSeg
def _isprs_root(tmp_path: pathlib.Path, names=("a", "b")) -> pathlib.Path:
  """A tiled ISPRS dataset: ``img_dir/train/<name>.png`` and valid 8x8 labels."""
  root = tmp_path / "Potsdam_IRRG_DA"
  for split in ("train", "val"):
    (root / "img_dir" / split).mkdir(parents=True)
    (root / "ann_dir" / split).mkdir(parents=True)
  for k, name in enumerate(names):
    Image.fromarray(_image(k, 8, 8)).save(root / "img_dir" / "train" / f"{name}.png")
    Image.fromarray(np.full((8, 8), 1 + k, np.uint8)).save(
        root / "ann_dir" / "train" / f"{name}.png")
  return root


def test_siamseg_truncated_images_and_labels(tmp_path):
  root = make_loveda(tmp_path / "LoveDA")
  src = loveda.LoveDASource(root, "Train", "Rural")
  _truncate(root / "Train" / "Rural" / "images_png" / "100.png")
  with pytest.raises(DatasetError, match=r"cannot decode image file .*images_png/100\.png "
                     r"\(.*\); expected a complete") as e:
    src[0]
  assert e.value.kind == "unreadable"
  _truncate(root / "Train" / "Rural" / "masks_png" / "101.png")
  with pytest.raises(DatasetError, match=r"cannot decode label file .*masks_png/101\.png "
                     r"\(.*\); expected a complete 8-bit single-channel PNG") as e:
    src[1]
  assert e.value.kind == "unreadable"
  isprs_root = _isprs_root(tmp_path)
  (isprs_root / "ann_dir" / "train" / "b.png").write_bytes(b"not a png")
  with pytest.raises(DatasetError, match=r"cannot decode label file .*ann_dir/train/b\.png"):
    isprs.ISPRSSource(isprs_root, "train")[1]


def test_siamseg_tiling_tool_unreadable_zip_and_tiles(tmp_path):
  src = make_potsdam(tmp_path / "zip")
  (src / "3_Ortho_IRRG.zip").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(DatasetError, match=r"3_Ortho_IRRG\.zip is not a readable zip .*; "
                     "re-download it") as e:
    isprs_tiles.find_tiles(str(src), "potsdam")
  assert e.value.kind == "unreadable"

  def with_tile(where, data):
    members = {f"3_Ortho_IRRG/top_potsdam_{t}_IRRG.tif": _tif(_image(k)[..., ::-1].copy())
               for k, t in enumerate(POTSDAM_TILES)}
    members["3_Ortho_IRRG/top_potsdam_2_10_IRRG.tif"] = data
    with zipfile.ZipFile(where / "3_Ortho_IRRG.zip", "w") as zf:
      for name, content in members.items():
        zf.writestr(name, content)
    return str(where)

  src = with_tile(make_potsdam(tmp_path / "garbage"), b"II*\x00 not a tiff")
  with pytest.raises(DatasetError, match=r"cannot decode image tile .*top_potsdam_2_10_IRRG"
                     r"\.tif .*expected an 8-bit TIFF"):
    isprs_tiles.tile_dataset(src, str(tmp_path / "o1"), "potsdam", crop=8, stride=4,
                             log=lambda s: None)
  src = with_tile(make_potsdam(tmp_path / "deep"), _tif(np.full((20, 24), 999, np.uint16)))
  with pytest.raises(DatasetError, match=r"image tile .*top_potsdam_2_10_IRRG\.tif has I;16 "
                     "pixels; expected 8-bit 3-channel") as e:
    isprs_tiles.tile_dataset(src, str(tmp_path / "o2"), "potsdam", crop=8, stride=4,
                             log=lambda s: None)
  assert e.value.kind == "bad_image"


def test_siamseg_image_modes_and_16bit_labels(tmp_path):
  root = make_loveda(tmp_path / "LoveDA")
  folder = root / "Train" / "Rural"
  rgb = np.asarray(Image.open(folder / "images_png" / "100.png"))
  Image.fromarray(rgb[..., 0]).save(folder / "images_png" / "100.png")          # grayscale
  Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(
      folder / "images_png" / "101.png")                                        # RGBA
  src = loveda.LoveDASource(root, "Train", "Rural")
  gray, rgba = src[0]["image"], src[1]["image"]
  assert gray.shape == rgba.shape == rgb.shape and gray.dtype == np.uint8
  np.testing.assert_array_equal(gray[..., 1], rgb[..., 0])
  np.testing.assert_array_equal(rgba, np.asarray(Image.open(folder / "images_png" /
                                                            "101.png"))[..., :3])
  Image.fromarray(np.full(rgb.shape[:2], 300, np.uint16)).save(folder / "images_png" / "102.png")
  with pytest.raises(DatasetError, match=r"image file .*102\.png has I;16 pixels \(16/32-bit\); "
                     "expected an 8-bit") as e:
    src[2]
  assert e.value.kind == "bad_image"
  Image.fromarray(np.full(rgb.shape[:2], 3, np.uint16)).save(folder / "masks_png" / "100.png")
  with pytest.raises(DatasetError, match=r"label file .*masks_png/100\.png has mode I;16; "
                     r"expected an 8-bit single-channel \(L or P\) PNG") as e:
    src[0]
  assert e.value.kind == "bad_mask"


def test_siamseg_empty_or_duplicate_isprs_split_file(tmp_path):
  root = _isprs_root(tmp_path)
  (root / "train.txt").write_text("\n  \n")
  with pytest.raises(DatasetError, match=r"split file .*train\.txt lists no ids") as e:
    isprs.ISPRSSource(root, "train")
  assert e.value.kind == "empty_split"
  (root / "train.txt").write_text("a\nb\na\n")
  with pytest.raises(DatasetError, match=r"split file .*train\.txt lists 1 id\(s\) more than "
                     r"once \(first: \['a'\]\); expected each id once") as e:
    isprs.ISPRSSource(root, "train")
  assert e.value.kind == "duplicate_id"


def test_siamseg_isprs_without_split_file_unmatched_and_mismatched(tmp_path):
  root = _isprs_root(tmp_path)
  assert isprs.ISPRSSource(root, "train").names == ("a", "b")
  Image.fromarray(_image(5, 8, 8)).save(root / "img_dir" / "train" / "c.png")
  with pytest.raises(DatasetError, match=r"1 image\(s\) in .*img_dir/train have no label "
                     r".*ann_dir/train/<name>\.png; first: \['c\.png'\]"):
    isprs.ISPRSSource(root, "train")
  (root / "img_dir" / "train" / "c.png").unlink()
  Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "ann_dir" / "train" / "d.png")
  with pytest.raises(DatasetError, match=r"1 label\(s\) in .*ann_dir/train have no image in "
                     r".*; first: \['d\.png'\]"):
    isprs.ISPRSSource(root, "train")
  (root / "ann_dir" / "train" / "d.png").unlink()
  Image.fromarray(np.ones((8, 9), np.uint8)).save(root / "ann_dir" / "train" / "b.png")
  with pytest.raises(DatasetError, match=r"image .*img_dir/train/b\.png is 8x8 \(WxH\) but "
                     r"label .*ann_dir/train/b\.png is 9x8; expected equal sizes") as e:
    isprs.ISPRSSource(root, "train")[1]
  assert e.value.kind == "size_mismatch"


def test_siamseg_two_files_with_one_basename(tmp_path):
  root = make_loveda(tmp_path / "LoveDA")
  folder = root / "Train" / "Urban" / "images_png"
  shutil.copy(folder / "103.png", folder / "103.PNG")
  if len(os.listdir(folder)) == 3:
    pytest.skip("case-insensitive file system")
  with pytest.raises(DatasetError, match=r"LoveDA Train/Urban image folder .*images_png has 1 "
                     r"basename\(s\) with more than one file, expected exactly one: "
                     r"\[\"103 -> \['103\.PNG', '103\.png'\]\"\]") as e:
    loveda.LoveDASource(root, "Train", "Urban")
  assert e.value.kind == "ambiguous_file"


@pytest.mark.parametrize("name", ["loveda", "isprs"])
def test_siamseg_root_that_is_not_a_folder(tmp_path, name):
  (tmp_path / "a_file").write_text("x")
  cfg = ml_collections.ConfigDict(dict(seed=0, data=dict(
      name=name, root=str(tmp_path / "a_file"), img_scale=(32, 32), crop_size=(16, 16))))
  with pytest.raises(DatasetError, match=r"config.data.root='.*a_file' does not exist or is "
                     "not a folder; expected the") as e:
    builder.make_spec(cfg)
  assert e.value.kind == "missing_folder"


@pytest.mark.parametrize("key, value, match", [
    ("alpha", "high", "expected a number"),
    ("blur", "yes", "expected True or False"),
    ("stat_group_size", 2.5, "expected an integer"),
    ("num_classes", "7", "expected an integer"),
    ("slide_crop", "512", "expected a list or tuple"),
    ("tta_img_scale", "1024", "expected a list or tuple or None"),
], ids=["alpha", "blur", "stat_group_size", "num_classes", "slide_crop", "tta_img_scale"])
def test_siamseg_wrong_types_in_config_siamseg(key, value, match):
  from contrastjax.methods import siamseg  # pylint: disable=g-import-not-at-top
  c = _config("siamseg_loveda.py", "demo")
  siamseg.SiamSegMethod(c)
  c.siamseg = _with(c.siamseg, **{key: value})
  with pytest.raises(ConfigError, match=rf"config\.siamseg\.{key}={value!r}: {match}"):
    siamseg.SiamSegMethod(c)


def test_siamseg_conflicting_options():
  from contrastjax.methods import siamseg  # pylint: disable=g-import-not-at-top
  for name in ("siamseg_loveda.py", "siamseg_potsdam_vaihingen.py"):
    with pytest.raises(ConfigError, match=r"config arguments 'tta' and 'slide' exclude each "
                       r"other \('demo,tta,slide'\); tta runs whole-image inference"):
      _config(name, "demo,tta,slide")
  c = _config("siamseg_loveda.py", "demo")
  assert c.siamseg.backward == "per_loss"
  c.optimizer.groups = [dict(regex="^backbone/", frozen=True)]
  with pytest.raises(ConfigError, match=r"config\.optimizer\.groups\[0\]\.frozen=True needs "
                     r"config\.siamseg\.backward='joint', got 'per_loss'"):
    siamseg.SiamSegMethod(c)
  c.siamseg.backward = "joint"
  siamseg.SiamSegMethod(c)


# =========================================================================== CLIP
def test_clip_unreadable_and_truncated_images(tmp_path):
  root = str(tmp_path)
  _coco(root)
  src = coco.CocoCaptionsSource(coco.read_captions(root, "train"), "images")
  _truncate(tmp_path / "train2017" / "000000000001.jpg")
  with pytest.raises(DatasetError, match=r"cannot decode image file .*000000000001\.jpg "
                     r"\(OSError: .*truncated.*\); expected a complete JPEG or PNG image") as e:
    src[1]
  assert e.value.kind == "unreadable"
  (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"<html>not found</html>")
  with pytest.raises(DatasetError, match=r"cannot decode image file .*000000000002\.jpg"):
    src[2]


def test_clip_gray_rgba_and_16bit_images(tmp_path):
  root = str(tmp_path)
  _coco(root)
  folder = tmp_path / "train2017"
  rgb = np.asarray(Image.open(folder / "000000000000.jpg"))
  Image.fromarray(rgb[..., 0]).save(folder / "000000000000.jpg", format="PNG")
  rgba = np.dstack([np.asarray(Image.open(folder / "000000000001.jpg")),
                    np.full((44, 48), 9, np.uint8)])
  Image.fromarray(rgba).save(folder / "000000000001.jpg", format="PNG")
  src = coco.CocoCaptionsSource(coco.read_captions(root, "train"), "images")
  gray = src[0]["image"]
  assert gray.shape == (40, 48, 3) and gray.dtype == np.uint8
  np.testing.assert_array_equal(gray[..., 2], rgb[..., 0])
  np.testing.assert_array_equal(src[1]["image"], rgba[..., :3])        # alpha dropped
  Image.fromarray(np.full((48, 48), 700, np.uint16)).save(folder / "000000000002.jpg",
                                                          format="PNG")
  with pytest.raises(DatasetError, match=r"image file .*000000000002\.jpg has 16/32-bit pixels "
                     r"\(mode I;16, .*\); expected an 8-bit RGB or grayscale image") as e:
    src[2]
  assert e.value.kind == "bad_image"


def _rewrite(path: str, edit) -> None:
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)


def test_clip_images_without_captions_and_malformed_entries(tmp_path, caplog):
  root = str(tmp_path)
  path = _coco(root)
  _rewrite(path, lambda d: d.update(annotations=[a for a in d["annotations"]
                                                 if a["image_id"] not in (101, 103)]))
  with caplog.at_level(logging.WARNING):
    index = coco.read_captions(root, "train")
  assert index.image_ids == [100, 102]
  assert ("captions_train2017.json: 2 image(s) have no caption and are left out, e.g. "
          "['000000000001.jpg', '000000000003.jpg']") in caplog.text
  _rewrite(path, lambda d: d.update(annotations=[]))
  with pytest.raises(DatasetError, match=r"captions_train2017\.json: no image with a caption"):
    coco.read_captions(root, "train")
  _rewrite(path, lambda d: d.update(annotations=[{"id": 1, "image_id": 100}]))
  with pytest.raises(DatasetError, match=r"captions_train2017\.json: annotations\[0\] needs "
                     r"'image_id' and 'caption', got \{'id': 1, 'image_id': 100\}"):
    coco.read_captions(root, "train")
  _rewrite(path, lambda d: d["images"][1].pop("file_name"))
  with pytest.raises(DatasetError, match=r"captions_train2017\.json: images\[1\] needs 'id' "
                     r"and 'file_name', got \{'id': 101"):
    coco.read_captions(root, "train")


def test_clip_image_folder_missing(tmp_path):
  root = str(tmp_path)
  _coco(root)
  shutil.rmtree(tmp_path / "train2017")
  with pytest.raises(DatasetError, match=r"train2017: image folder of split 'train' is "
                     "missing") as e:
    coco.read_captions(root, "train")
  assert e.value.path == str(tmp_path / "train2017")


def test_clip_image_files_the_json_does_not_list(tmp_path):
  root = str(tmp_path)
  _coco(root)
  folder = tmp_path / "train2017"
  for name in ("000000000777.jpg", "000000000778.jpg"):
    shutil.copy(folder / "000000000000.jpg", folder / name)
  (folder / "README.txt").write_text("not an image: ignored")
  with pytest.raises(DatasetError, match=r"2 image file\(s\) in .*train2017 are not listed in "
                     r".*captions_train2017\.json, e\.g\. \['000000000777\.jpg', "
                     r"'000000000778\.jpg'\]; expected the official layout") as e:
    coco.read_captions(root, "train")
  assert e.value.kind == "unlisted_file"


def test_clip_duplicate_image_entries(tmp_path):
  root = str(tmp_path)
  path = _coco(root)
  _rewrite(path, lambda d: d["images"].append(dict(d["images"][1], file_name="x.jpg")))
  with pytest.raises(DatasetError, match=r"captions_train2017\.json: images\[4\] repeats id 101 "
                     r"of images\[1\] \('000000000001\.jpg'\); expected each image id once") as e:
    coco.read_captions(root, "train")
  assert e.value.kind == "duplicate_id"


def test_clip_cifar_count_mismatch_and_meta_without_names(tmp_path):
  root = str(tmp_path / "cifar-10-batches-py")
  write_cifar(root)
  with open(os.path.join(root, "data_batch_2"), "wb") as f:
    pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, f)
  with pytest.raises(DatasetError, match=r"data_batch_2: 3 images but 2 labels"):
    cifar.read_split(root, "train")
  with open(os.path.join(root, "batches.meta"), "wb") as f:
    pickle.dump({b"num_vis": 3072}, f)
  with pytest.raises(DatasetError, match=r"batches\.meta: key 'label_names' is missing or "
                     r"empty \(keys: \['num_vis'\]\)"):
    cifar.read_meta(root)


def test_clip_maker_root_and_tokenizer_errors(tmp_path, monkeypatch):
  from contrastjax.data.tasks import clip as clip_task  # pylint: disable=g-import-not-at-top
  from contrastjax.data.text import tokenizer as tok  # pylint: disable=g-import-not-at-top

  def dcfg(**kw):
    return ml_collections.ConfigDict(dict(dict(name="coco_captions", root=str(tmp_path)), **kw))
  with pytest.raises(DatasetError, match=r"config.data.root='': set it to the COCO folder "
                     r"\(holding annotations/, train2017/, val2017/\)"):
    clip_task.coco_captions(dcfg(root=""), 0)
  monkeypatch.delenv("NO_SUCH_VAR_CJ", raising=False)
  with pytest.raises(DatasetError, match=r"config.data.root='\$NO_SUCH_VAR_CJ': set it"):
    clip_task.coco_captions(dcfg(root="$NO_SUCH_VAR_CJ"), 0)
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(DatasetError, match=r"config.data.root='.*a_file' does not exist or is "
                     "not a folder"):
    clip_task.coco_captions(dcfg(root=str(tmp_path / "a_file")), 0)
  captions = lambda: ["a dog", "two cats"]  # noqa: E731
  with pytest.raises(DatasetError, match=r"config.data.tokenizer='sentencepiece' is not known; "
                     r"expected 'word' or 'bpe'"):
    clip_task.make_tokenizer(dcfg(tokenizer="sentencepiece"), captions, None)
  with pytest.raises(DatasetError, match=r"config.data.tokenizer='bpe' needs "
                     r"config.data.bpe_path \(a bpe_simple_vocab_16e6.txt.gz-format"):
    clip_task.make_tokenizer(dcfg(tokenizer="bpe"), captions, None)
  workdir = tmp_path / "run"
  workdir.mkdir()
  tok.WordTokenizer.build(captions(), context_length=8).save(str(workdir / "tokenizer.json"))
  with pytest.raises(DatasetError, match=r"tokenizer\.json has context_length 8 but "
                     r"config.data.context_length=16"):
    clip_task.make_tokenizer(dcfg(context_length=16), captions, str(workdir))
  assert clip_task.make_tokenizer(dcfg(context_length=8), captions,
                                  str(workdir)).context_length == 8


@pytest.mark.parametrize("key, value, match", [
    ("tau_init", "0.07", "expected a number"),
    ("swap_renormalize", "no", "expected True or False"),
    ("schedule_period_steps", 2.5, "expected an integer"),
    ("parameterization", 1, "expected a string"),
], ids=["tau_init", "swap_renormalize", "schedule_period_steps", "parameterization"])
def test_clip_wrong_types_in_config_clip(key, value, match):
  from contrastjax.methods import clip as clip_lib  # pylint: disable=g-import-not-at-top
  c = _config("clip_gap_coco.py", "demo")
  clip_lib.CLIPMethod(c)
  c.clip = _with(c.clip, **{key: value})
  with pytest.raises(ConfigError, match=rf"config\.clip\.{key}={value!r}: {match}"):
    clip_lib.CLIPMethod(c)


# =========================================================================== APC
def test_apc_truncated_and_unreadable_mask(tmp_path):
  base = make_voc(tmp_path)
  src = voc.VOCSource(base, "val", with_masks=True)
  _truncate(base / "SegmentationClass" / "2008_000002.png")
  with pytest.raises(DatasetError, match=r"cannot decode label file .*SegmentationClass/"
                     r"2008_000002\.png \(.*\); expected a complete 8-bit single-channel "
                     "PNG") as e:
    src[0]
  assert e.value.kind == "unreadable"
  (base / "SegmentationClass" / "2008_000003.png").write_bytes(b"not a png")
  with pytest.raises(DatasetError, match=r"cannot decode label file .*2008_000003\.png"):
    src[1]
  assert voc.validate(src).counts == {"unreadable": 2}


def test_apc_coco_images(tmp_path):
  root = make_coco(tmp_path)
  folder = root / "JPEGImages" / "train2014"
  names = list(COCO_TRAIN)
  rgb = np.asarray(Image.open(folder / f"{names[0]}.jpg"))
  Image.fromarray(rgb[..., 1]).save(folder / f"{names[0]}.jpg")                  # grayscale
  Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 5, np.uint8)])).save(
      folder / f"{names[1]}.jpg", format="PNG")                                 # RGBA
  train = voc.COCOSegSource(root, "train")
  assert train[0]["image"].shape == rgb.shape and train[1]["image"].shape == rgb.shape
  report = voc.validate(train)
  assert report.ok and set(report.warnings) == {"grayscale_to_rgb", "alpha_dropped"}
  _truncate(folder / f"{names[2]}.jpg")
  with pytest.raises(DatasetError, match=rf"cannot decode image file .*{names[2]}\.jpg "
                     r"\(OSError: ") as e:
    train[2]
  assert e.value.kind == "unreadable"
  (folder / f"{names[2]}.jpg").write_bytes(b"GIF87a garbage")
  with pytest.raises(DatasetError, match=rf"cannot decode image file .*{names[2]}\.jpg"):
    train[2]
  Image.fromarray(np.full(rgb.shape[:2], 999, np.uint16)).save(folder / f"{names[2]}.jpg",
                                                               format="PNG")
  with pytest.raises(DatasetError, match=rf"image file .*{names[2]}\.jpg has 16 bits per "
                     "channel .*expected an 8-bit RGB or grayscale image") as e:
    train[2]
  assert e.value.kind == "bad_image"
  # Size mismatch and no foreground class, on the evaluation split (masks read).
  val_names = list(COCO_VAL)
  mask_dir = root / "SegmentationClass" / "val2014"
  Image.fromarray(np.zeros((rgb.shape[0], rgb.shape[1] + 1), np.uint8), "L").save(
      mask_dir / f"{val_names[0]}.png")
  val = voc.COCOSegSource(root, "val", with_masks=True)
  with pytest.raises(DatasetError, match=rf"image .*{val_names[0]}\.jpg is 32x24 \(WxH\) but "
                     rf"mask .*{val_names[0]}\.png is 33x24; expected equal sizes") as e:
    val[0]
  assert e.value.kind == "size_mismatch"
  Image.fromarray(np.zeros(rgb.shape[:2], np.uint8), "L").save(mask_dir / f"{val_names[1]}.png")
  masks = voc.COCOSegSource(root, "val", labels="masks", with_masks=True)
  with pytest.raises(DatasetError, match=rf"COCO image {val_names[1]} has no foreground class "
                     r"\(mask file .*\.png holds only background/ignored pixels\)") as e:
    masks[1]
  assert e.value.kind == "no_foreground"
  assert voc.COCOSegSource(root, "val", labels="masks", with_masks=True,
                           allow_empty=True)[1]["labels"].tolist() == [1.0] + [0.0] * 80


def test_apc_coco_instance_annotation_file(tmp_path):
  pytest.importorskip("pycocotools")
  root = make_coco(tmp_path)
  path = root / "annotations" / "instances_val2014.json"
  with pytest.raises(DatasetError, match=r"instance annotation file .*instances_val2014\.json "
                     "does not exist; expected the official annotations_trainval2014.zip") as e:
    voc.COCOSegSource(root, "val", labels="instances")
  assert e.value.kind == "missing_file"
  path.parent.mkdir(parents=True)
  for content in ('{"images": [{"id": 1', "[1, 2, 3]", b"\x89PNG binary"):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match=r"cannot read instance annotations .*instances_"
                       r"val2014\.json \(.*\); expected an official COCO instances_\*\.json") as e:
      voc.COCOSegSource(root, "val", labels="instances")
    assert e.value.kind == "unreadable"
  path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
  with pytest.raises(DatasetError, match=r"instances_val2014\.json have 0 categories .*expected "
                     "the 80 COCO categories") as e:
    voc.COCOSegSource(root, "val", labels="instances")
  assert e.value.kind == "bad_annotations"


def test_apc_files_without_ids_are_an_info_line(tmp_path, caplog):
  base = make_voc(tmp_path)
  # The official layout: JPEGImages holds every image, a split lists some of them.
  with caplog.at_level(logging.INFO):
    src = voc.VOCSource(base, "val", with_masks=True)
  assert src.names == ("2008_000002", "2008_000003")
  assert ("5 image file(s) of " in caplog.text and "JPEGImages are not listed and are not read "
          "(normal for the official layout" in caplog.text
          and "['2007_000032.jpg', '2007_000039.jpg'" in caplog.text)
  assert "3 mask file(s) of " in caplog.text        # SegmentationClass holds train + val
  caplog.clear()
  root = make_coco(tmp_path / "coco")
  Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(
      root / "JPEGImages" / "val2014" / "COCO_val2014_000000000999.jpg")
  with caplog.at_level(logging.INFO):
    voc.COCOSegSource(root, "val")
  assert "1 image file(s) of " in caplog.text and "COCO_val2014_000000000999.jpg" in caplog.text


def test_apc_maker_root_and_train_resize(tmp_path):
  base = make_voc(tmp_path)

  def spec(**data):
    return builder.make_spec(ml_collections.ConfigDict(dict(seed=0, data=dict(
        dict(name="voc", root=str(base), crop_size=16, eval_size=32), **data))))
  assert set(spec().sources) == {"train_aug", "train", "val"}
  for name, what in (("voc", "VOCdevkit"), ("coco_wsss", "MSCOCO")):
    with pytest.raises(DatasetError, match=rf"config.data.root='': set it to the {what} folder, "
                       rf"e.g. --config.data.root=/data/{what}"):
      spec(name=name, root="")
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(DatasetError, match=r"VOC root .*a_file does not exist; expected the "
                     "official layout"):
    spec(root=str(tmp_path / "a_file"))
  with pytest.raises(DatasetError, match=r"COCO root .*a_file does not exist; expected ToCo's "
                     "layout"):
    spec(name="coco_wsss", root=str(tmp_path / "a_file"))
  with pytest.raises(ConfigError, match=r"config.data.train_resize='crop_resize'; expected one "
                     r"of \('crop', 'resize'\)"):
    spec(train_resize="crop_resize")


def test_apc_equivariance_crop_size_not_a_multiple_of_two_patches():
  from contrastjax.methods import apc  # pylint: disable=g-import-not-at-top
  c = _config("apc_voc.py", "demo")
  patch = apc.APCMethod(c).patch_size
  c.apc.eq_weight = 1.0
  c.batch_size = 8
  c.data.crop_size = 6 * patch
  apc.APCMethod(c)
  c.data.crop_size = 5 * patch                       # a multiple of the patch, not of 2x
  with pytest.raises(ConfigError, match=rf"config\.apc\.eq_weight > 0 halves the {5 * patch}-"
                     r"pixel crops into mosaic tiles: config\.data\.crop_size must be a multiple "
                     rf"of 2 x patch size = {2 * patch}"):
    apc.APCMethod(c)


@pytest.mark.parametrize("key, value, match", [
    ("eq_weight", "0.5", "expected a number"),
    ("par", "true", "expected True or False"),
    ("topk", 4.5, "expected an integer"),
    ("msf_scales", 1.0, "expected a list or tuple"),
    ("init_from_which", None, "expected a string or an integer"),
], ids=["eq_weight", "par", "topk", "msf_scales", "init_from_which"])
def test_apc_wrong_types_in_config_apc(key, value, match):
  from contrastjax.methods import apc  # pylint: disable=g-import-not-at-top
  c = _config("apc_voc.py", "demo")
  apc.APCMethod(c)
  c.apc = _with(c.apc, **{key: value})
  with pytest.raises(ConfigError, match=rf"config\.apc\.{key}={value!r}: {match}"):
    apc.APCMethod(c)


# =========================================================================== all methods
def test_mesh_that_does_not_fit_the_devices():
  import jax  # pylint: disable=g-import-not-at-top
  from contrastjax import parallel  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:1] * 3                    # make_mesh only counts them here
  with pytest.raises(ConfigError, match=r"config\.mesh=\[\('data', -1\), \('model', 2\)\] "
                     "does not divide 3 devices"):
    parallel.make_mesh([("data", -1), ("model", 2)], devices=devices)
  with pytest.raises(ConfigError, match=r"config\.mesh=\[\('data', 2\)\] has 2 devices but 3 "
                     "are available"):
    parallel.make_mesh([("data", 2)], devices=devices)
  with pytest.raises(ConfigError, match=r"must contain a 'data' axis"):
    parallel.make_mesh([("batch", -1)], devices=devices)


def test_non_numeric_config_argument():
  from contrastjax.configs.common import parse_arg  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"config argument n='abc': expected an integer"):
    parse_arg("n=abc", n=3)
  with pytest.raises(ConfigError, match=r"config argument tau='fast': expected a number"):
    _config("clip_gap_coco.py", "demo,tau=fast")
  assert parse_arg("n=4,tau=0.5", n=3, tau=0.0).to_dict() == {"n": 4, "tau": 0.5}


def test_unknown_config_method():
  from contrastjax.methods import get_method_class  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"config\.method='condseg_stage3' is not a known "
                     r"method; expected one of \[.*'apc'.*'condseg_stage1'.*\]"):
    get_method_class("condseg_stage3")
