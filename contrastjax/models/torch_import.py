"""PyTorch ``state_dict`` naming and I/O for the Flax models.

Each model file declares how its Flax variables are named in the PyTorch reference's
``state_dict`` as a tree of :class:`TorchNames` (the building blocks' naming is here:
:data:`CONV_NAMES`, :data:`LINEAR_NAMES`, :data:`BN_NAMES`, :data:`CBR_NAMES`);
:func:`torch_mapping` resolves it to ``{torch key: TorchLeaf}``, :func:`read_state_dict`
reads ``.pth`` / ``.npz`` / ``.safetensors`` files and :func:`load_state_dict` /
:func:`to_state_dict` copy a state dict into a Flax variable tree and back (HWIO <-> OIHW
kernels, ``(in, out)`` <-> ``(out, in)`` linear weights).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

logger = logging.getLogger(__name__)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TorchNames:
  """How a Flax module's variables are named in a PyTorch ``state_dict``.

  Attributes:
    leaves: ``(collection, flax leaf name) -> (torch leaf name, transform)``, where
      transform is ``'conv'`` (HWIO <-> OIHW), ``'linear'`` ((in, out) <-> (out, in)) or
      ``'none'``.
    children: ``flax child name -> (torch segment, TorchNames of the child)``. The torch
      segment may contain dots (``'conv.0'``) or be empty (child flattened into parent).
  """
  leaves: Mapping[tuple[str, str], tuple[str, str]] = dataclasses.field(default_factory=dict)
  children: Mapping[str, tuple[str, TorchNames]] = dataclasses.field(default_factory=dict)


CONV_NAMES = TorchNames(leaves={("params", "kernel"): ("weight", "conv"),
                                ("params", "bias"): ("bias", "none")})
LINEAR_NAMES = TorchNames(leaves={("params", "kernel"): ("weight", "linear"),
                                  ("params", "bias"): ("bias", "none")})
BN_NAMES = TorchNames(leaves={("params", "scale"): ("weight", "none"),
                              ("params", "bias"): ("bias", "none"),
                              ("batch_stats", "mean"): ("running_mean", "none"),
                              ("batch_stats", "var"): ("running_var", "none")})
CBR_NAMES = TorchNames(children={"conv": ("conv.0", CONV_NAMES), "bn": ("conv.1", BN_NAMES)})


@dataclasses.dataclass(frozen=True)
class TorchLeaf:
  """Where one PyTorch tensor lives in a Flax variable tree."""
  collection: str
  path: tuple[str, ...]
  transform: str


def torch_mapping(variables: Mapping[str, PyTree], names: TorchNames,
                  collections: Iterable[str] = ("params", "batch_stats")
                  ) -> dict[str, TorchLeaf]:
  """Maps every leaf of ``variables`` to its PyTorch ``state_dict`` key.

  Args:
    variables: Flax variables (``{'params': ..., 'batch_stats': ...}``).
    names: Naming of the root module.
    collections: Collections to map (absent ones are skipped).

  Returns:
    ``{torch key: TorchLeaf}`` in a deterministic order.

  Raises:
    KeyError: A Flax variable has no declared PyTorch name (a naming bug).
  """
  mapping: dict[str, TorchLeaf] = {}
  for collection in collections:
    if collection not in variables:
      continue
    flat = traverse_util.flatten_dict(_to_dict(variables[collection]))
    for path in flat:
      node, segments = names, []
      for name in path[:-1]:
        if name not in node.children:
          raise KeyError(f"no PyTorch name declared for Flax module "
                         f"{collection}/{'/'.join(path[:-1])} (child {name!r})")
        segment, node = node.children[name]
        if segment:
          segments.append(segment)
      if (collection, path[-1]) not in node.leaves:
        raise KeyError(f"no PyTorch name declared for Flax variable "
                       f"{collection}/{'/'.join(path)}")
      leaf, transform = node.leaves[(collection, path[-1])]
      key = ".".join(segments + [leaf])
      if key in mapping:
        raise KeyError(f"PyTorch key {key!r} mapped twice")
      mapping[key] = TorchLeaf(collection, tuple(path), transform)
  return mapping


def _to_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  if transform == "linear":
    return np.transpose(value, (1, 0))
  return value


def _from_torch_layout(value: np.ndarray, transform: str) -> np.ndarray:
  if transform == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if transform == "linear":
    return np.transpose(value, (1, 0))
  return value


def _torch_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
  if transform == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == "linear":
    return (shape[1], shape[0])
  return tuple(shape)


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """Converts a torch tensor / jax array / array-like to a NumPy array."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      tensor = tensor.float()
    return tensor.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pragma: no cover - message path only
    raise TypeError(f"state dict entry {key!r} is not an array: {type(value)}") from e


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Reads a PyTorch-style state dict into ``{key: np.ndarray}``.

  Args:
    source: A ``.pth``/``.pt``/``.bin``/``.ckpt`` file (read with ``torch.load``,
      ``weights_only=True``; needs torch), an ``.npz`` or ``.safetensors`` file, or an
      in-memory mapping of arrays/tensors. A checkpoint that wraps the state dict as
      ``{'state_dict': ...}`` or ``{'model': ...}`` is unwrapped; a ``'module.'`` prefix
      on every key (``DataParallel``) is removed.

  Returns:
    The state dict with NumPy values.

  Raises:
    FileNotFoundError: The file does not exist.
    ValueError: Unknown file suffix.
    ImportError: A ``.pth`` file without torch installed.
  """
  if isinstance(source, Mapping):
    raw: Mapping[str, Any] = source
  else:
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(f"weights file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
      try:
        import torch  # pylint: disable=import-outside-toplevel
      except ImportError as e:
        raise ImportError(f"reading {path} needs torch; install it or convert the file to "
                          f".npz/.safetensors") from e
      raw = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".npz":
      with np.load(path) as data:
        raw = {k: data[k] for k in data.files}
    elif suffix == ".safetensors":
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      raw = load_file(path)
    else:
      raise ValueError(f"unknown weights format {suffix!r} for {path}; expected .pth, .pt, "
                       f".bin, .ckpt, .npz or .safetensors")
  for wrapper in ("state_dict", "model"):
    if isinstance(raw, Mapping) and set(raw) == {wrapper} and isinstance(raw[wrapper], Mapping):
      raw = raw[wrapper]
  if not isinstance(raw, Mapping):
    raise ValueError(f"expected a state dict (mapping of name to tensor), got {type(raw)}")
  state = {str(k): _to_numpy(v, str(k)) for k, v in raw.items()}
  if state and all(k.startswith("module.") for k in state):
    logger.info("stripping the 'module.' prefix from %d state-dict keys", len(state))
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def _place_like(value: np.ndarray, like: Any) -> Any:
  """``value`` with the dtype (and, for concrete shardings, the sharding) of ``like``.

  The value is copied first: on CPU, jax can alias a NumPy buffer without copying, and
  a state dict's arrays are often views of live torch tensors (``tensor.numpy()``)
  that torch updates in place (e.g. BatchNorm running statistics in a later forward
  pass), which would change the loaded variables behind the caller's back. A sharding
  on an abstract mesh (``jax.eval_shape`` under ``jax.set_mesh``) names no devices and
  is not used.
  """
  dtype = getattr(like, "dtype", value.dtype)
  value = np.array(value, dtype=dtype, copy=True)
  sharding = getattr(like, "sharding", None)
  if (isinstance(sharding, jax.sharding.NamedSharding)
      and isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
    sharding = None
  if sharding is not None:
    return jax.device_put(value, sharding)
  return jnp.asarray(value)


def load_state_dict(variables: Mapping[str, PyTree], state_dict: Mapping[str, np.ndarray],
                    names: TorchNames, *, ignore: Callable[[str], bool] = lambda k: False,
                    what: str = "model") -> tuple[dict[str, PyTree], list[str]]:
  """Copies a PyTorch state dict into a Flax variable tree.

  Every Flax leaf covered by ``names`` must be present in ``state_dict`` with the right
  shape. ``num_batches_tracked`` buffers are skipped; other state-dict keys without a
  Flax leaf are an error unless ``ignore(key)`` is true, in which case they are logged
  and returned. If ``variables`` has no ``batch_stats`` collection, BatchNorm running
  statistics are ignored (and reported) as well.

  Args:
    variables: Flax variables; leaves may be arrays or ``jax.ShapeDtypeStruct`` (from
      ``jax.eval_shape``), only shape, dtype and sharding are used.
    state_dict: ``{torch key: array}`` (see :func:`read_state_dict`).
    names: Naming of the root module of ``variables``.
    ignore: Predicate for state-dict keys that may be left unused.
    what: Description of the source used in messages.

  Returns:
    ``(new_variables, ignored_keys)``: a copy of ``variables`` with every mapped leaf
    replaced (dtype and sharding of the old leaf kept), and the sorted list of ignored
    state-dict keys (excluding ``num_batches_tracked``).

  Raises:
    KeyError: A key the model needs is missing, or the state dict has keys that are
      neither used nor ignorable (the message names them).
    ValueError: A tensor has the wrong shape (the message names the key, the expected
      and the found PyTorch shape).
  """
  mapping = torch_mapping(variables, names)
  has_stats = "batch_stats" in variables
  state = dict(state_dict)
  tracked = [k for k in state if k.endswith("num_batches_tracked")]
  for k in tracked:
    del state[k]

  missing = sorted(k for k in mapping if k not in state)
  if missing:
    more = f" (and {len(missing) - 1} more: {missing[1:6]}...)" if len(missing) > 1 else ""
    hint = ""
    if len(missing) > len(mapping) // 2:
      hint = (f"; {len(missing)} of the model's {len(mapping)} keys are missing (wrong "
              f"source or naming? the state dict starts with {sorted(state)[:3]})")
    raise KeyError(f"{what}: missing key {missing[0]!r} in the state dict{more}{hint}")

  def ignorable(key: str) -> bool:
    if ignore(key):
      return True
    return not has_stats and key.endswith(("running_mean", "running_var"))

  unused = sorted(k for k in state if k not in mapping)
  unexpected = [k for k in unused if not ignorable(k)]
  if unexpected:
    raise KeyError(f"{what}: unexpected key {unexpected[0]!r} in the state dict "
                   f"({len(unexpected)} unexpected: {unexpected[:6]}...); the model has no "
                   f"such variable")

  flat = {c: traverse_util.flatten_dict(_to_dict(variables[c])) for c in variables}
  for key, leaf in mapping.items():
    value = np.asarray(state[key])
    target = flat[leaf.collection][leaf.path]
    expected = _torch_shape(tuple(target.shape), leaf.transform)
    if tuple(value.shape) != expected:
      raise ValueError(f"{what}: shape mismatch for {key!r}: expected {expected}, got "
                       f"{tuple(value.shape)}")
    flat[leaf.collection][leaf.path] = _place_like(
        _from_torch_layout(value, leaf.transform), target)

  if unused:
    groups: dict[str, int] = {}
    for key in unused:
      prefix = key.split(".", 1)[0]
      groups[prefix] = groups.get(prefix, 0) + 1
    summary = ", ".join(f"{p}.* ({n})" for p, n in groups.items())
    logger.warning("%s: ignored %d state-dict keys not used by the model: %s", what,
                   len(unused), summary)
    logger.debug("%s: ignored keys: %s", what, unused)
  if tracked:
    logger.info("%s: skipped %d num_batches_tracked buffers", what, len(tracked))
  logger.info("%s: loaded %d tensors", what, len(mapping))
  new_variables = {c: traverse_util.unflatten_dict(f) for c, f in flat.items()}
  return new_variables, unused


def to_state_dict(variables: Mapping[str, PyTree], names: TorchNames
                  ) -> dict[str, np.ndarray]:
  """Inverse of :func:`load_state_dict`: Flax variables to a PyTorch-layout state dict.

  A ``num_batches_tracked`` (int64 zero) is emitted next to each BatchNorm's running
  mean so that ``torch.nn.Module.load_state_dict(strict=True)`` accepts the result.

  Args:
    variables: Flax variables with concrete array leaves.
    names: Naming of the root module of ``variables``.

  Returns:
    ``{torch key: np.ndarray}``.
  """
  mapping = torch_mapping(variables, names)
  flat = {c: traverse_util.flatten_dict(_to_dict(variables[c])) for c in variables}
  state: dict[str, np.ndarray] = {}
  for key, leaf in mapping.items():
    value = np.asarray(jax.device_get(flat[leaf.collection][leaf.path]))
    state[key] = np.array(_to_torch_layout(value, leaf.transform), order="C")  # writable
    if leaf.collection == "batch_stats" and key.endswith("running_mean"):
      state[key[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  return state
