"""Modality gap, uniformity, cross-modal retrieval and zero-shot classification.

Metrics of Yaras et al. (CPAL 2025, App. E.2), computed from the L2-normalised image
and text embeddings of a whole evaluation split (accumulated over its padded batches;
``valid`` marks real rows):

* **gap** ``||mean(img) - mean(txt)||`` (Liang et al. 2022): over the full split
  (``<prefix>/gap``) and over ``gap_pairs`` (512) random pairs drawn with ``seed``
  (``<prefix>/gap_rand512``; the paper's number);
* **uniformity** ``-W2(N(mu, Sigma), N(0, I/m))`` of Fang et al. 2023 over the stacked
  ``2n`` image and text embeddings (``m`` = embedding dimension):
  ``W2 = sqrt(||mu||^2 + 1 + tr Sigma - (2/sqrt(m)) tr Sigma^{1/2})``, ``Sigma`` the
  maximum-likelihood (1/N) covariance (the paper does not say which normalisation);
  reported on the full split and on the random pairs;
* **recall@{1,5,10}** image->text (``i2t``) and text->image (``t2i``), each image with
  the caption of its example (one caption per image), ranks by cosine similarity,
  a tie counted against the query (pessimistic). The candidate pool is named in the
  metric: ``i2t_R@1_pool<N>`` for the full split of ``N`` pairs, and
  ``i2t_R@1_pool512`` among the random pairs (the paper does not state its pool; its
  R@1 of 68-85% suggests a small one). The paper's "Image retrieval" is most likely
  ``t2i`` and "Text retrieval" ``i2t``.

:class:`ZeroShotEvaluator` classifies every image of a split whose examples pair an
image with its class prompt (``label`` + the prompt's embedding as ``text``): class
embeddings are the normalised mean prompt embedding per label. For COCO runs that split
is ``cifar10_test`` (``contrastjax.data.sources.cifar``: the CIFAR-10 test images with the
prompt of their class, "a photo of a {class}." by default; Yaras et al. App. E.2), for
the synthetic demo ``zeroshot``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from contrastjax.evaluators import counts_batch_loss

RECALL_KS = (1, 5, 10)


# ============================================================================ metrics
def modality_gap(img: np.ndarray, txt: np.ndarray) -> float:
  """``||mean(img) - mean(txt)||`` of ``[n, d]`` embeddings."""
  return float(np.linalg.norm(np.mean(img, 0, dtype=np.float64)
                              - np.mean(txt, 0, dtype=np.float64)))


def uniformity_w2(img: np.ndarray, txt: np.ndarray) -> float:
  """Fang et al.'s Wasserstein uniformity ``-W2`` of the stacked embeddings."""
  z = np.concatenate([img, txt], 0).astype(np.float64)
  m = z.shape[1]
  mu = z.mean(0)
  centred = z - mu
  cov = centred.T @ centred / z.shape[0]
  eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
  w2_sq = mu @ mu + 1.0 + np.trace(cov) - 2.0 / np.sqrt(m) * np.sum(np.sqrt(eig))
  return -float(np.sqrt(max(w2_sq, 0.0)))


def recall_at_k(img: np.ndarray, txt: np.ndarray, ks=RECALL_KS, block: int = 1024
                ) -> dict[str, float]:
  """Image->text and text->image recall@k; pair ``i`` is ``(img[i], txt[i])``.

  Rank of the true match = number of candidates scoring at least as high, minus one
  (ties count against the query). Computed in row blocks of ``block`` queries.
  """
  img = np.asarray(img, np.float32)
  txt = np.asarray(txt, np.float32)
  n = img.shape[0]
  out = {}
  for name, q, c in (("i2t", img, txt), ("t2i", txt, img)):
    ranks = np.empty(n, np.int64)
    for s in range(0, n, block):
      sim = q[s:s + block] @ c.T                       # [b, n]
      pos = sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])]
      ranks[s:s + block] = np.sum(sim >= pos[:, None], axis=1) - 1
    for k in ks:
      out[f"{name}_R@{k}"] = float(np.mean(ranks < k))
  return out


def random_pairs(n: int, k: int, seed: int) -> np.ndarray:
  """``min(k, n)`` distinct indices of ``range(n)``, sorted, drawn with ``seed``."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n, size=min(k, n), replace=False))


# ============================================================================ collection
def _allgather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates every process's rows (identity on one process).

  Processes hold different numbers of valid rows whenever the split does not divide
  evenly (27 pairs over 2 processes: 14 and 13), and an all-gather needs one shape: each
  process pads its rows to the largest count, the padding is dropped after the gather."""
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n_local = {len(v) for v in arrays.values()}
  if len(n_local) != 1:
    raise ValueError(f"rows to gather differ in length: { {k: len(v) for k, v in arrays.items()} }")
  counts = np.asarray(multihost_utils.process_allgather(
      np.asarray(n_local.pop(), np.int64))).reshape(-1)
  most = int(counts.max())
  padded = {k: np.concatenate([v, np.zeros((most - len(v),) + v.shape[1:], v.dtype)])
            for k, v in arrays.items()}
  gathered = multihost_utils.process_allgather(padded)  # [processes, most, ...]
  return {k: np.concatenate([np.asarray(v)[i, :c] for i, c in enumerate(counts)])
          for k, v in gathered.items()}


def collect_embeddings(predict_fn: Callable, batches: Iterable[Mapping[str, np.ndarray]],
                       keys: tuple[str, ...] = ("image_embeds", "text_embeds"),
                       batch_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Runs ``predict_fn`` over padded batches; returns the valid rows of ``keys``
  (outputs) and ``batch_keys`` (inputs, e.g. ``label``), in dataset order over all
  processes (rows are sorted by the pipeline's ``index``)."""
  rows: dict[str, list] = {k: [] for k in keys + batch_keys + ("index",)}
  for i, batch in enumerate(batches):
    if "valid" not in batch:
      raise KeyError(f"evaluation batch {i} has no 'valid' entry (keys: {sorted(batch)}); "
                     "the input pipeline must pad and mark batches")
    valid = np.asarray(batch["valid"]).astype(bool).reshape(-1)
    out = predict_fn(batch)
    for k in keys:
      if k not in out:
        raise KeyError(f"predict_fn returned {sorted(out)}; expected {k!r}")
      rows[k].append(np.asarray(out[k])[valid])
    for k in batch_keys:
      if k not in batch:
        raise KeyError(f"evaluation batch {i} has no {k!r} entry (keys: {sorted(batch)})")
      rows[k].append(np.asarray(batch[k])[valid])
    index = np.asarray(batch["index"])[valid] if "index" in batch else (
        np.arange(valid.sum()) + sum(len(r) for r in rows["index"]))
    rows["index"].append(index)
  if not rows["index"]:
    raise ValueError("the evaluation split yielded no batch")
  local = {k: np.concatenate(v, 0) for k, v in rows.items()}
  full = _allgather_rows(local) if jax.process_count() > 1 else local
  order = np.argsort(full["index"], kind="stable")
  return {k: v[order] for k, v in full.items()}


# ============================================================================ evaluators
class RetrievalEvaluator:
  """Gap, uniformity and recall of an image-caption split (see the module docstring).

  ``run()`` yields ``<prefix>/gap``, ``gap_rand<k>``, ``uniformity``,
  ``uniformity_rand<k>``, ``{i2t,t2i}_R@{1,5,10}_pool<N>``,
  ``{i2t,t2i}_R@{1,5,10}_pool<k>``, ``num_pairs`` and ``loss`` (with a ``loss_fn``).
  """

  def __init__(self, predict_fn: Callable, batches_fn: Callable[[], Iterable], *,
               prefix: str = "val", gap_pairs: int = 512, seed: int = 0,
               loss_fn: Callable | None = None, reduce_fn: Callable | None = None):
    """Builds the evaluator.

    Args:
      predict_fn: ``batch -> {'image_embeds': [B, D], 'text_embeds': [B, D]}``.
      batches_fn: returns a fresh iterator over padded local batches with ``valid``.
      prefix: metric name prefix.
      gap_pairs: size of the random subset (the paper: 512 random test pairs); with
        fewer pairs in the split, all of them are used and the name says how many.
      seed: seed of the random subset.
      loss_fn: optional ``batch -> float`` (InfoNCE of the batch), averaged over batches.
      reduce_fn: cross-process sum of a dict of floats (used for the loss).
    """
    if gap_pairs < 2:
      raise ValueError(f"gap_pairs={gap_pairs}: expected >= 2")
    self.predict_fn, self.batches_fn = predict_fn, batches_fn
    self.prefix, self.gap_pairs, self.seed = prefix, int(gap_pairs), int(seed)
    self.loss_fn = loss_fn
    self.reduce_fn = reduce_fn if reduce_fn is not None else (lambda sums: sums)
    self.on_batch = None

  def _batches_with_loss(self, sums: dict[str, float]):
    for batch in self.batches_fn():
      yield batch
      if self.loss_fn is not None:  # after predict_fn on this batch: reuses its result
        loss = float(self.loss_fn(batch))
        if counts_batch_loss(batch["valid"]):
          sums["loss_sum"] += loss
          sums["loss_batches"] += 1.0

  def run(self) -> Iterator[tuple[str, float]]:
    sums = {"loss_sum": 0.0, "loss_batches": 0.0}
    emb = collect_embeddings(self.predict_fn, self._batches_with_loss(sums))
    img, txt = emb["image_embeds"], emb["text_embeds"]
    n = img.shape[0]
    if n < 2:
      raise ValueError(f"{self.prefix}: the evaluation split has {n} valid pair(s); "
                       "retrieval needs at least 2")
    p = self.prefix
    sub = random_pairs(n, self.gap_pairs, self.seed)
    k = len(sub)
    yield f"{p}/gap", modality_gap(img, txt)
    yield f"{p}/gap_rand{k}", modality_gap(img[sub], txt[sub])
    yield f"{p}/uniformity", uniformity_w2(img, txt)
    yield f"{p}/uniformity_rand{k}", uniformity_w2(img[sub], txt[sub])
    for name, value in recall_at_k(img, txt).items():
      yield f"{p}/{name}_pool{n}", value
    if k < n:
      for name, value in recall_at_k(img[sub], txt[sub]).items():
        yield f"{p}/{name}_pool{k}", value
    yield f"{p}/num_pairs", float(n)
    if self.loss_fn is not None:
      sums = self.reduce_fn(sums)
      yield f"{p}/loss", float(sums["loss_sum"]) / max(float(sums["loss_batches"]), 1.0)


def zero_shot_accuracy(img: np.ndarray, prompt_txt: np.ndarray, labels: np.ndarray
                       ) -> tuple[float, int]:
  """Top-1 accuracy of classifying ``img`` by the most similar class embedding (the
  normalised mean prompt embedding of each label present). Returns
  ``(accuracy, num_classes)``."""
  classes = np.unique(labels)
  protos = np.stack([prompt_txt[labels == c].mean(0) for c in classes])
  protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
  pred = classes[np.argmax(img @ protos.T, axis=1)]
  return float(np.mean(pred == labels)), int(len(classes))


class ZeroShotEvaluator:
  """Zero-shot top-1 accuracy on a split of (image, class prompt, ``label``) examples.

  Yields ``<prefix>/zeroshot_top1``, ``<prefix>/zeroshot_num_classes``,
  ``<prefix>/num_images``.
  """

  def __init__(self, predict_fn: Callable, batches_fn: Callable[[], Iterable], *,
               prefix: str = "zeroshot", loss_fn: Callable | None = None,
               reduce_fn: Callable | None = None):
    del loss_fn, reduce_fn
    self.predict_fn, self.batches_fn, self.prefix = predict_fn, batches_fn, prefix
    self.on_batch = None

  def run(self) -> Iterator[tuple[str, float]]:
    emb = collect_embeddings(self.predict_fn, self.batches_fn(), batch_keys=("label",))
    acc, c = zero_shot_accuracy(emb["image_embeds"], emb["text_embeds"], emb["label"])
    yield f"{self.prefix}/zeroshot_top1", acc
    yield f"{self.prefix}/zeroshot_num_classes", float(c)
    yield f"{self.prefix}/num_images", float(len(emb["label"]))

