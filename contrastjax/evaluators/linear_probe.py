"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

The protocol of CLIP (Radford et al. 2021, App. A.3) that Yaras et al. (CPAL 2025,
App. E.2) report on CIFAR-10: features of the frozen image tower for the training and
test images, a logistic-regression classifier fitted on the training features with the
regularisation strength chosen on a held-out part of them, top-1 accuracy on the test
features.

The classifier minimises (the objective of scikit-learn's ``LogisticRegression(C=C)``
with the default multinomial loss, divided by ``C n``)::

  (1/n) sum_i CE(softmax(x_i W + b), y_i) + ||W||^2 / (2 C n)

(no penalty on the bias), full batch, with ``optax.lbfgs`` (zoom line search) until the
gradient norm is below ``tol`` or ``max_iter`` iterations, all in JAX (one compilation
for every ``C``: ``C`` is a traced argument).

Model selection (:func:`select_and_fit`): a random ``val_fraction`` of the training
features (``seed``) is held out; ``C`` runs over ``Cs`` (log-spaced, from the strongest
regularisation up, each fit warm-started from the previous one), then ``refine`` extra
log-spaced values between the best one's neighbours (CLIP's two-stage sweep, coarser);
the best validation accuracy wins (ties: the smaller ``C``). The classifier is then
refitted on all training features with that ``C`` and scored on the test features.

Features: the evaluator uses what the predict function returns, for CLIP the
L2-normalised ``image_embeds``. For OpenCLIP's ModifiedResNet the embedding *is* the
attention-pool output that CLIP probes (its ``c_proj`` is part of the pool); the
normalisation is ours (the paper does not say).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from contrastjax.evaluators.retrieval import collect_embeddings

DEFAULT_CS = tuple(float(c) for c in np.logspace(-2, 6, 9))


def logreg_objective(params: dict[str, jax.Array], x: jax.Array, y: jax.Array,
                     weight: jax.Array, inv_c: jax.Array) -> jax.Array:
  """``sum_i w_i CE(x_i W + b, y_i) / n + ||W||^2 inv_c / (2 n)`` with ``n = sum_i w_i``
  (``inv_c = 1 / C``; 0/1 weights select the rows fitted, so a held-out part needs no
  new compilation)."""
  logits = x @ params["w"] + params["b"]
  ce = (jax.nn.logsumexp(logits, axis=-1)
        - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])
  n = jnp.sum(weight)
  return (jnp.sum(weight * ce) + 0.5 * inv_c * jnp.sum(jnp.square(params["w"]))) / n


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit(params0, x, y, weight, inv_c, tol, max_iter: int):
  fun = functools.partial(logreg_objective, x=x, y=y, weight=weight, inv_c=inv_c)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=fun)
    return optax.apply_updates(params, updates), state

  def going(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    gnorm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (gnorm >= tol))

  params, state = jax.lax.while_loop(going, step, (params0, opt.init(params0)))
  return params, otu.tree_get(state, "count"), fun(params)


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, c: float, *,
               weight: np.ndarray | None = None,
               init: dict[str, jax.Array] | None = None, max_iter: int = 1000,
               tol: float = 1e-6) -> tuple[dict[str, jax.Array], dict[str, float]]:
  """Fits the L2-regularised multinomial logistic regression (module docstring).

  Args:
    x: ``[n, d]`` features (float; the fit runs in this dtype, float32 at least).
    y: ``[n]`` integer labels in ``[0, num_classes)``.
    num_classes: Number of classes ``K``.
    c: Inverse regularisation strength ``C`` (> 0; ``inf``: no penalty).
    weight: Optional ``[n]`` 0/1 row weights (rows with 0 are left out of the fit).
    init: Warm start ``{'w': [d, K], 'b': [K]}`` (default zeros).
    max_iter: L-BFGS iteration cap.
    tol: Stop when the gradient norm of the (mean) objective is below this.

  Returns:
    ``({'w', 'b'}, {'iterations', 'objective'})``.
  """
  if not c > 0:
    raise ValueError(f"C={c}: expected > 0")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 4:
    x = x.astype(jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  if init is None:
    init = {"w": jnp.zeros((x.shape[1], num_classes), x.dtype),
            "b": jnp.zeros((num_classes,), x.dtype)}
  weight = jnp.ones(x.shape[:1], x.dtype) if weight is None else jnp.asarray(weight,
                                                                              x.dtype)
  params, count, value = _fit(init, x, y, weight, jnp.asarray(1.0 / c, x.dtype),
                              jnp.asarray(tol, x.dtype), int(max_iter))
  return params, {"iterations": float(count), "objective": float(value)}


def predict(params: dict[str, jax.Array], x: np.ndarray) -> np.ndarray:
  """Arg-max class of ``x @ w + b``."""
  x = jnp.asarray(x, params["w"].dtype)
  return np.asarray(jnp.argmax(x @ params["w"] + params["b"], axis=-1))


def accuracy(params: dict[str, jax.Array], x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(predict(params, x) == np.asarray(y)))


def holdout_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(fit_idx, val_idx)``: a random ``val_fraction`` (at least one row each) held out."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction={val_fraction}: expected in (0, 1)")
  if n < 2:
    raise ValueError(f"the linear probe needs at least 2 training examples, got {n}")
  perm = np.random.default_rng(seed).permutation(n)
  k = min(max(int(round(n * val_fraction)), 1), n - 1)
  return np.sort(perm[k:]), np.sort(perm[:k])


def select_and_fit(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, *, num_classes: int | None = None,
                   cs: Sequence[float] = DEFAULT_CS, refine: int = 4,
                   val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                   tol: float = 1e-6) -> dict[str, Any]:
  """Chooses ``C`` on a held-out part of the training features, refits on all of them
  and scores the test features (module docstring).

  Returns:
    ``{'test_top1', 'val_top1', 'C', 'num_train', 'num_test', 'scores'}``, ``scores``
    the held-out accuracy of every ``C`` tried.
  """
  y_train = np.asarray(y_train, np.int64)
  y_test = np.asarray(y_test, np.int64)
  k = int(num_classes or int(max(y_train.max(), y_test.max())) + 1)
  cs = sorted(float(c) for c in cs)
  if not cs or cs[0] <= 0:
    raise ValueError(f"Cs={cs}: expected positive values")
  fit_idx, val_idx = holdout_split(len(y_train), val_fraction, seed)
  mask = np.zeros(len(y_train), np.float32)
  mask[fit_idx] = 1.0
  xv, yv = x_train[val_idx], y_train[val_idx]
  fit = functools.partial(fit_logreg, x_train, y_train, k, max_iter=max_iter, tol=tol)

  scores: dict[float, float] = {}
  params = None
  for c in cs:
    params, _ = fit(c, weight=mask, init=params)
    scores[c] = accuracy(params, xv, yv)
  if refine > 0 and len(cs) > 1:
    best = max(cs, key=lambda c: (scores[c], -c))
    i = cs.index(best)
    lo, hi = np.log10(cs[max(i - 1, 0)]), np.log10(cs[min(i + 1, len(cs) - 1)])
    extra = [float(c) for c in np.logspace(lo, hi, refine + 2)[1:-1] if c not in scores]
    params = None
    for c in extra:
      params, _ = fit(c, weight=mask, init=params)
      scores[c] = accuracy(params, xv, yv)
  best = max(scores, key=lambda c: (scores[c], -c))
  params, _ = fit(best)
  return {"test_top1": accuracy(params, x_test, y_test), "val_top1": scores[best],
          "C": best, "num_train": float(len(y_train)), "num_test": float(len(y_test)),
          "scores": dict(sorted(scores.items()))}


class LinearProbeEvaluator:
  """Linear-probe top-1 on a split of ``label``-ed examples with a ``subset`` key
  (0: training, 1: test), e.g. ``cifar10_probe`` of ``contrastjax.data.sources.cifar``.

  Yields ``<prefix>/linear_probe_top1`` (test), ``<prefix>/linear_probe_val_top1``
  (held-out training part, at the chosen ``C``), ``<prefix>/linear_probe_log10_C``,
  ``<prefix>/num_train`` and ``<prefix>/num_test``.
  """

  def __init__(self, predict_fn: Callable, batches_fn: Callable[[], Iterable], *,
               prefix: str = "linear_probe", feature: str = "image_embeds",
               cs: Sequence[float] = DEFAULT_CS, refine: int = 4,
               val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
               tol: float = 1e-6, num_classes: int = 0,
               loss_fn: Callable | None = None, reduce_fn: Callable | None = None):
    """Builds the evaluator.

    Args:
      predict_fn: ``batch -> {feature: [B, D], ...}``.
      batches_fn: returns a fresh iterator over padded local batches with ``valid``,
        ``label`` and ``subset``.
      prefix: metric name prefix.
      feature: key of the predict function's output to probe.
      cs: grid of ``C`` values (inverse regularisation strength).
      refine: extra ``C`` values tried between the best grid value's neighbours.
      val_fraction: held-out fraction of the training features for choosing ``C``.
      seed: seed of the held-out split.
      max_iter: L-BFGS iteration cap per fit.
      tol: gradient-norm tolerance per fit.
      num_classes: number of classes (0: the largest label + 1).
      loss_fn: unused (a probe has no contrastive loss).
      reduce_fn: unused.
    """
    del loss_fn, reduce_fn
    self.predict_fn, self.batches_fn, self.prefix = predict_fn, batches_fn, prefix
    self.feature = feature
    self.kwargs = dict(cs=tuple(float(c) for c in cs), refine=int(refine),
                       val_fraction=float(val_fraction), seed=int(seed),
                       max_iter=int(max_iter), tol=float(tol),
                       num_classes=int(num_classes) or None)
    self.on_batch = None

  def run(self) -> Iterator[tuple[str, float]]:
    emb = collect_embeddings(self.predict_fn, self.batches_fn(), keys=(self.feature,),
                             batch_keys=("label", "subset"))
    x, y, subset = emb[self.feature], emb["label"], emb["subset"]
    train, test = subset == 0, subset == 1
    if not train.any() or not test.any():
      raise ValueError(f"{self.prefix}: the split has {int(train.sum())} training "
                       f"(subset 0) and {int(test.sum())} test (subset 1) examples; the "
                       "linear probe needs both")
    r = select_and_fit(x[train], y[train], x[test], y[test], **self.kwargs)
    p = self.prefix
    yield f"{p}/linear_probe_top1", r["test_top1"]
    yield f"{p}/linear_probe_val_top1", r["val_top1"]
    yield f"{p}/linear_probe_log10_C", float(np.log10(r["C"]))
    yield f"{p}/num_train", r["num_train"]
    yield f"{p}/num_test", r["num_test"]
