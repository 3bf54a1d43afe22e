"""CIFAR-10 reader (official python layout, fixture pickles written here), the CIFAR
evaluation splits of the COCO maker, the zero-shot and linear-probe evaluators on them,
and the linear probe against an independent NumPy solver (and scikit-learn if present)."""
from __future__ import annotations

import json
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from contrastjax.data import builder
from contrastjax.data.sources import cifar
from contrastjax.data.errors import DatasetError
from contrastjax.evaluators import build as build_evaluator
from contrastjax.evaluators import linear_probe as lp

# Class colours of the fixture images (classes 0..2; the rest unused).
COLOURS = np.asarray([[230, 20, 20], [20, 230, 20], [20, 20, 230]], np.uint8)


def _images(labels, rng):
  """32x32 images of the class colour plus noise, as CIFAR rows (R plane, G, B)."""
  img = COLOURS[labels][:, None, None, :].astype(np.int16)
  img = img + rng.integers(-20, 21, (len(labels), 32, 32, 3))
  img = np.clip(img, 0, 255).astype(np.uint8)
  return img, img.transpose(0, 3, 1, 2).reshape(len(labels), 3072)


def write_cifar(root, n_train=8, n_test=6, seed=0):
  """The official layout with bytes keys (as the Python 2 pickles of the release)."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  out = {}
  for name in cifar.TRAIN_FILES + cifar.TEST_FILES:
    n = n_test if name == "test_batch" else n_train
    labels = [int(v) for v in rng.integers(0, 3, n)]
    img, rows = _images(np.asarray(labels), rng)
    with open(os.path.join(root, name), "wb") as f:
      pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, f,
                  protocol=2)
    out[name] = (img, np.asarray(labels))
  with open(os.path.join(root, "batches.meta"), "wb") as f:
    pickle.dump({b"label_names": [c.encode() for c in cifar.CLASSES],
                 b"num_cases_per_batch": n_train, b"num_vis": 3072}, f)
  return out


class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


# ----------------------------------------------------------------------------- reader
def test_reader_layout_and_errors(tmp_path):
  root = str(tmp_path / "cifar-10-batches-py")
  written = write_cifar(root)
  assert cifar.read_meta(root) == list(cifar.CLASSES)
  images, labels = cifar.read_split(root, "train")
  assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[:8], written["data_batch_1"][0])   # HWC, RGB
  np.testing.assert_array_equal(images[32:], written["data_batch_5"][0])
  np.testing.assert_array_equal(labels[8:16], written["data_batch_2"][1])
  test_images, test_labels = cifar.read_split(root, "test")
  assert test_images.shape == (6, 32, 32, 3) and test_labels.dtype == np.int64
  assert test_images[0, 5, 7, 0] == written["test_batch"][0][0, 5, 7, 0]

  def broken(name, content: bytes):
    path = os.path.join(root, name)
    good = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(content(good) if callable(content) else content)
    return good

  good = broken("data_batch_3", lambda b: b[: len(b) // 2])     # truncated
  with pytest.raises(DatasetError, match=r"data_batch_3: corrupt or not a CIFAR pickle"):
    cifar.read_split(root, "train")
  broken("data_batch_3", pickle.dumps(_Evil()))                   # code in a pickle
  with pytest.raises(DatasetError, match=r"data_batch_3: .*posix.system is not allowed"
                     if os.name == "posix" else r"data_batch_3: .*not allowed"):
    cifar.read_split(root, "train")
  broken("data_batch_3", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                       b"labels": [0, 10]}))
  with pytest.raises(DatasetError, match=r"data_batch_3: 1 label\(s\) outside \[0, 10\)"):
    cifar.read_split(root, "train")
  broken("data_batch_3", pickle.dumps({"data": np.zeros((2, 1024), np.uint8),
                                       "labels": [0, 1]}))       # str keys are fine
  with pytest.raises(DatasetError, match=r"data_batch_3: 'data' must be uint8 \[n, 3072\]"):
    cifar.read_split(root, "train")
  broken("data_batch_3", pickle.dumps({b"labels": [0]}))
  with pytest.raises(DatasetError, match=r"data_batch_3: key 'data' is missing"):
    cifar.read_split(root, "train")
  broken("data_batch_3", good)
  os.remove(os.path.join(root, "test_batch"))
  with pytest.raises(DatasetError, match=r"test_batch: missing CIFAR-10 file") as e:
    cifar.read_split(root, "test")
  assert e.value.kind == "missing_file"
  with pytest.raises(DatasetError, match="does not exist"):
    cifar.read_split(str(tmp_path / "nowhere"), "train")


def test_prompts_sources_and_root_resolution(tmp_path, monkeypatch):
  root = str(tmp_path / "data" / "cifar-10-batches-py")
  write_cifar(root)
  assert cifar.prompt_template("photo").format("cat") == "a photo of a cat."
  assert cifar.prompt_template("paper").format("cat") == "A photo of the number cat."
  assert cifar.prompt_template("itap of a {}.") == "itap of a {}."
  with pytest.raises(ValueError, match="cifar10_prompt='cat'"):
    cifar.prompt_template("cat")
  monkeypatch.setenv("CONTRASTJAX_DATA_DIR", str(tmp_path / "data"))
  sources = cifar.clip_eval_sources({"cifar10_root": cifar.DEFAULT_ROOT})
  test, probe = sources["cifar10_test"], sources["cifar10_probe"]
  assert len(test) == 6 and len(probe) == 46
  ex = probe[45]
  assert ex["subset"] == 1 and probe[0]["subset"] == 0
  assert ex["captions"] == [f"a photo of a {cifar.CLASSES[int(ex['label'])]}."]
  paper = cifar.clip_eval_sources({"cifar10_root": root, "cifar10_prompt": "paper"})
  assert paper["cifar10_test"][0]["captions"][0].startswith("A photo of the number ")
  assert cifar.clip_eval_sources({"cifar10_root": ""}) == {}
  monkeypatch.delenv("CONTRASTJAX_DATA_DIR")
  with pytest.raises(DatasetError, match="unset environment variable.*'cifar10='"):
    cifar.clip_eval_sources({"cifar10_root": cifar.DEFAULT_ROOT})


# ----------------------------------------------------------------------------- evaluators
def _coco(root, split, n_images=3):
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
  images, anns = [], []
  for i in range(n_images):
    name = f"{i:012d}.jpg"
    Image.fromarray(np.full((36, 40, 3), 40 * i, np.uint8)).save(
        os.path.join(root, f"{split}2017", name))
    images.append({"id": i, "file_name": name})
    anns.append({"id": 10 + i, "image_id": i, "caption": "a photo of a red bird"})
  with open(os.path.join(root, "annotations", f"captions_{split}2017.json"), "w") as f:
    json.dump({"images": images, "annotations": anns}, f)


def test_coco_maker_adds_cifar_splits_and_evaluators_run(tmp_path):
  coco_root, cifar_root = str(tmp_path / "coco"), str(tmp_path / "cifar")
  _coco(coco_root, "train")
  _coco(coco_root, "val")
  write_cifar(cifar_root, n_train=12, n_test=10)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(name="coco_captions", root=coco_root, image_size=16, context_length=8,
                tokenizer="word", cifar10_root=cifar_root)
  inputs = builder.build(c, local_batch_size=2, local_eval_batch_size=16,
                         workdir=str(tmp_path / "run"))
  batch = next(iter(inputs.eval_batches("cifar10_test")))
  assert batch["image"].shape == (16, 16, 16, 3) and batch["text"].shape == (16, 8)
  assert batch["valid"].sum() == 10 and set(batch["label"][:10]) <= {0, 1, 2}

  # A stand-in for the CLIP predict function: the image embedding is the mean colour
  # (normalised), the text embedding of the prompt of class c is colour c.
  centred = (COLOURS / 255.0 - 0.45) / 0.27

  def predict_fn(b):
    img = b["image"].mean(axis=(1, 2))
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-6)
    txt = centred[np.minimum(b["label"], 2)]
    return {"image_embeds": img, "text_embeds": txt / np.linalg.norm(txt, axis=1,
                                                                      keepdims=True)}

  def run(ecfg):
    ev = build_evaluator(ml_collections.ConfigDict(ecfg), predict_fn=predict_fn,
                         batches_fn=lambda: inputs.eval_batches(ecfg["split"]),
                         prefix=ecfg["type"])
    return dict(ev.run())

  zs = run(dict(type="zeroshot", split="cifar10_test"))
  assert zs["zeroshot/zeroshot_top1"] == 1.0 and zs["zeroshot/num_images"] == 10
  probe = run(dict(type="linear_probe", split="cifar10_probe", cs=(1.0, 1e3), refine=1,
                   val_fraction=0.25))
  assert probe["linear_probe/num_train"] == 60 and probe["linear_probe/num_test"] == 10
  assert probe["linear_probe/linear_probe_top1"] == 1.0
  assert probe["linear_probe/linear_probe_log10_C"] in (0.0, 1.5, 3.0)


# ----------------------------------------------------------------------------- linear probe
def _newton_logreg(x, y, k, c, iters=40):
  """Independent solver: Newton's method on C * sum CE + ||W||^2 / 2 (bias unpenalised),
  float64, returns the class probabilities."""
  n, d = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], 1)
  onehot = np.eye(k)[y]
  pen = np.ones((d + 1, k))
  pen[-1] = 0.0
  pen = pen.reshape(-1) / c
  theta = np.zeros((d + 1) * k)

  def probs(t):
    z = xb @ t.reshape(d + 1, k)
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)

  for _ in range(iters):
    p = probs(theta)
    grad = (xb.T @ (p - onehot)).reshape(-1) + pen * theta
    hess = np.einsum("ni,nj,nab->iajb", xb, xb,
                     np.einsum("na,ab->nab", p, np.eye(k)) - np.einsum("na,nb->nab", p, p)
                     ).reshape(grad.size, grad.size) + np.diag(pen)
    theta -= np.linalg.lstsq(hess, grad, rcond=None)[0]
  return probs(theta), theta.reshape(d + 1, k)[:-1]


def _toy(n, seed, sep=1.5):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(99).normal(size=(3, 4)) * sep
  y = rng.integers(0, 3, n)
  return centres[y] + rng.normal(size=(n, 4)), y


def test_logreg_matches_newton_and_sklearn():
  x, y = _toy(90, 0)
  with jax.enable_x64(True):
    for c in (0.05, 3.0):
      params, info = lp.fit_logreg(x, y, 3, c, tol=1e-10, max_iter=300)
      assert params["w"].dtype == np.float64 and info["iterations"] < 300
      logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      want_p, want_w = _newton_logreg(x, y, 3, c)
      np.testing.assert_allclose(p, want_p, atol=1e-7)
      np.testing.assert_allclose(np.asarray(params["w"]), want_w, atol=1e-6)
  # scikit-learn is in the test extra (it is not a dependency of the library)
  linear_model = pytest.importorskip("sklearn.linear_model")
  ref = linear_model.LogisticRegression(C=3.0, tol=1e-10, max_iter=5000).fit(x, y)
  np.testing.assert_allclose(ref.predict_proba(x), want_p, atol=1e-5)


def test_select_and_fit_chooses_c_on_held_out_train_features():
  fit_idx, val_idx = lp.holdout_split(10, 0.2, 0)
  assert len(val_idx) == 2 and sorted(np.concatenate([fit_idx, val_idx])) == list(range(10))
  # Separable toy: perfect test accuracy at the chosen C.
  # (Both problems have the same shapes: the fit compiles once.)
  x, y = _toy(240, 1, sep=4.0)
  xt, yt = _toy(120, 2, sep=4.0)
  r = lp.select_and_fit(x.astype(np.float32), y, xt.astype(np.float32), yt,
                        cs=(1e-4, 1e-2, 1.0, 1e2), refine=2)
  assert r["test_top1"] == 1.0 and r["val_top1"] == 1.0
  assert r["num_train"] == 240 and r["num_test"] == 120
  scores = r["scores"]
  grid = (1e-4, 1e-2, 1.0, 1e2)
  best_grid = min(c for c in grid if scores[c] == max(scores[g] for g in grid))
  i = grid.index(best_grid)
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, 3)]
  extra = sorted(set(scores) - set(grid))     # the refinement: between the neighbours
  assert len(extra) == 2 and all(lo < c < hi for c in extra)
  # The winner: best held-out accuracy, ties to the smaller C.
  assert r["C"] == min(c for c in scores if scores[c] == max(scores.values()))
  # Label noise in the training features: a tiny C (predicting the majority class) loses
  # on the held-out part, so the selection moves away from it.
  x, y = _toy(240, 3, sep=0.7)
  xt, yt = _toy(120, 4, sep=0.7)
  r = lp.select_and_fit(x.astype(np.float32), y, xt.astype(np.float32), yt,
                        cs=(1e-6, 1.0), refine=0)
  assert r["C"] == 1.0 and r["test_top1"] > 0.5
