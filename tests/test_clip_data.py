"""CLIP data: COCO captions reader (official layout) and its errors, tokenizers (word,
BPE on a made-up merges file), synthetic pairs, and a COCO batch through the builder
into the CLIP method."""
import gzip
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastjax.data import builder
from contrastjax.data.sources import coco
from contrastjax.data.text import tokenizer as tok
from contrastjax.data.errors import DatasetError
from contrastjax.data.synthetic.pairs import SyntheticPairs


def _coco(root, split="train", n_images=4, caps=("a dog on grass", "A Dog.",
                                                   "two cats &amp; a dog")):
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
  images, anns = [], []
  rng = np.random.default_rng(0)
  for i in range(n_images):
    name = f"{i:012d}.jpg"
    Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 48, 3), np.uint8)).save(
        os.path.join(root, f"{split}2017", name))
    images.append({"id": 100 + i, "file_name": name, "height": 40, "width": 48})
    for j, c in enumerate(caps[: 1 + i % len(caps)]):
      anns.append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": c})
  path = os.path.join(root, "annotations", f"captions_{split}2017.json")
  with open(path, "w") as f:
    json.dump({"info": {}, "images": images, "annotations": anns}, f)
  return path


def test_read_captions_and_sources(tmp_path):
  _coco(str(tmp_path))
  index = coco.read_captions(str(tmp_path), "train")
  assert index.image_ids == [100, 101, 102, 103]
  assert [len(c) for c in index.captions] == [1, 2, 3, 1]
  pairs = coco.CocoCaptionsSource(index, "pairs")
  assert len(pairs) == 7 and pairs[2]["captions"] == ["A Dog."]
  assert pairs[0]["image"].shape == (40, 48, 3) and pairs[0]["image"].dtype == np.uint8
  assert len(coco.CocoCaptionsSource(index, "images")) == 4
  ev = coco.CocoCaptionsSource(index, "eval")
  assert [ev[i]["captions"] for i in range(4)] == [[c[0]] for c in index.captions]
  with pytest.raises(DatasetError, match="eval_caption=1: 2 image"):
    coco.CocoCaptionsSource(index, "eval", caption_index=1)


def test_coco_errors_name_file_and_entry(tmp_path):
  root = str(tmp_path)
  path = _coco(root)
  with pytest.raises(DatasetError, match="captions_val2017.json"):
    coco.read_captions(root, "val")
  with open(path) as f:
    data = json.load(f)
  with open(path, "w") as f:
    f.write(json.dumps(data)[:-5])
  with pytest.raises(DatasetError, match=r"captions_train2017.json.*malformed JSON at line 1"):
    coco.read_captions(root, "train")
  bad = json.loads(json.dumps(data))
  bad["annotations"][3]["caption"] = "   "
  with open(path, "w") as f:
    json.dump(bad, f)
  with pytest.raises(DatasetError, match=r"annotations\[3\] \(id 1020, image_id 102\).*empty"):
    coco.read_captions(root, "train")
  bad = json.loads(json.dumps(data))
  bad["annotations"][0]["image_id"] = 7
  with open(path, "w") as f:
    json.dump(bad, f)
  with pytest.raises(DatasetError, match="image_id 7"):
    coco.read_captions(root, "train")
  del bad["annotations"]
  with open(path, "w") as f:
    json.dump(bad, f)
  with pytest.raises(DatasetError, match="'annotations' is missing"):
    coco.read_captions(root, "train")
  with open(path, "w") as f:
    json.dump(data, f)
  os.remove(os.path.join(root, "train2017", "000000000002.jpg"))
  with pytest.raises(DatasetError, match=r"1 image\(s\) .* missing.*000000000002.jpg"):
    coco.read_captions(root, "train")


def test_word_tokenizer_build_save_reload(tmp_path):
  t = tok.WordTokenizer.build(["A dog, a cat.", "the dog"], context_length=8)
  assert t.words[:2] == ["a", "dog"]                  # by frequency, then alphabetical
  ids = t.encode("a dog saw a zebra")
  assert ids.dtype == np.int32 and ids.shape == (8,)
  assert ids[0] == t.sot and ids[6] == t.eot and ids[7] == 0 and 1 in ids  # zebra: <unk>
  assert t.eot == t.vocab_size - 1 == int(ids.max())
  long = t.encode(" ".join(["dog"] * 20))
  assert long[-1] == t.eot and long[0] == t.sot
  t.save(str(tmp_path / "tok.json"))
  t2 = tok.WordTokenizer.load(str(tmp_path / "tok.json"))
  np.testing.assert_array_equal(t2.encode("the cat"), t.encode("the cat"))
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(DatasetError, match="bad.json"):
    tok.WordTokenizer.load(str(tmp_path / "bad.json"))
  assert len(tok.WordTokenizer.build(["a b c d e f"], max_vocab=6).words) == 2


def _merges(path):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\n")
  return str(path)


def test_bpe_on_a_made_up_merges_file(tmp_path):
  t = tok.BPETokenizer(_merges(tmp_path / "m.txt.gz"), context_length=8)
  assert t.vocab_size == 256 * 2 + 4 + 2
  assert t.bpe("hello") == ["hello</w>"] and t.bpe("hell") == ["he", "l", "l</w>"]
  hello = t.encoder["hello</w>"]
  assert hello == 512 + 3 and t.sot == 516 and t.eot == 517
  ids = t.encode("Hello  HELLO hi")
  h, i_end = ord("h") - ord("!"), 256 + ord("i") - ord("!")
  np.testing.assert_array_equal(ids, [516, hello, hello, h, i_end, 517, 0, 0])
  assert t.decode(t.ids("hello, hi!")) == "hello , hi !"
  (tmp_path / "bad.gz").write_bytes(b"not gzip")
  with pytest.raises(DatasetError, match="bad.gz"):
    tok.BPETokenizer(str(tmp_path / "bad.gz"))


def test_bpe_matches_open_clip_simple_tokenizer(tmp_path):
  oc_tok = pytest.importorskip("open_clip.tokenizer")
  path = _merges(tmp_path / "m.txt.gz")
  ours = tok.BPETokenizer(path)
  ref = oc_tok.SimpleTokenizer(bpe_path=path)
  for text in ("hello world, hello!", "Héllo 42 cats's  hell_o", "a &amp; b"):
    assert ours.ids(text) == ref.encode(text), text


def test_synthetic_pairs_are_deterministic_and_prompts_noise_free():
  a = SyntheticPairs(5, "train", data_seed=3)
  b = SyntheticPairs(5, "train", data_seed=3)
  np.testing.assert_array_equal(a[2]["image"], b[2]["image"])
  assert not np.array_equal(a[2]["image"], SyntheticPairs(5, "val", data_seed=3)[2]["image"])
  z = SyntheticPairs(50, "zeroshot", data_seed=3)
  by_label = {}
  for i in range(50):
    by_label.setdefault(int(z[i]["label"]), []).append(z[i]["text"])
  for texts in by_label.values():
    np.testing.assert_array_equal(texts[0], texts[-1])   # one prompt per class
  with pytest.raises(ValueError, match="split 'tests'"):
    SyntheticPairs(5, "tests")


def test_coco_maker_builds_batches_and_reuses_the_saved_vocabulary(tmp_path):
  root = str(tmp_path / "coco")
  _coco(root, "train")
  _coco(root, "val", n_images=3, caps=("a red bus", "bus"))
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name="coco_captions", root=root, image_size=32, context_length=12,
                tokenizer="word", max_vocab=64)
  workdir = str(tmp_path / "run")
  inputs = builder.build(c, local_batch_size=4, local_eval_batch_size=4, workdir=workdir)
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
  assert inputs.num_train == 7
  batch = next(iter(inputs.train))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (4, 12) and batch["text"].dtype == np.int32
  ev = list(inputs.eval_batches("val"))
  assert len(ev) == 1 and ev[0]["valid"].tolist() == [True, True, True, False]
  # "bus" is not in the training vocabulary: <unk>.
  saved = tok.WordTokenizer.load(os.path.join(workdir, "tokenizer.json"))
  assert saved.encode("bus")[1] == 1
  np.testing.assert_array_equal(ev[0]["text"][1], saved.encode("a red bus"))
  # A resumed run reloads the vocabulary even if the training captions changed.
  _coco(root, "train", caps=("zebras everywhere",))
  again = builder.build(c, local_batch_size=4, local_eval_batch_size=4, workdir=workdir)
  ev2 = next(iter(again.eval_batches("val")))
  np.testing.assert_array_equal(ev2["text"], ev[0]["text"])
  # The batch runs through a tiny CLIP (ResNet + text transformer).
  from contrastjax.methods.clip import CLIPMethod  # pylint: disable=g-import-not-at-top
  mc = ml_collections.ConfigDict()
  mc.total_steps = 10
  mc.model = dict(embed_dim=8, image=dict(name="resnet", stage_sizes=(1,), stem_width=4,
                                          base_width=2),
                  text=dict(name="transformer", vocab_size=64, context_length=12,
                            width=16, layers=1, heads=2))
  method = CLIPMethod(mc)
  params, state, extra = jax.jit(method.init)(jax.random.PRNGKey(0), batch)
  loss, (_, metrics) = jax.jit(method.loss_fn)(params, state, extra, batch,
                                               jax.random.PRNGKey(1), 0)
  assert np.isfinite(float(loss)) and float(metrics["tau"]) == pytest.approx(0.07, rel=1e-5)
