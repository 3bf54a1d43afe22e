"""torchvision ResNet-50 (v1.5) encoder in Flax linen, with torchvision weight import.

The encoder keeps the stem (``layer0`` = conv1 7x7/2 + bn1 + ReLU) and the bottleneck
stages ``layer1`` (preceded by the 3x3/2 max-pool) .. ``layer3`` (``layer4`` when
``stage_sizes`` has four entries), and returns every stage's output. ``v1.5`` means the
stride of a downsampling block sits on its 3x3 convolution, as in torchvision.

Flax variable names follow torchvision's (``conv1``, ``bn1``, ``layer2_0/conv2``,
``layer2_0/downsample_conv``, ...); :func:`load` maps a torchvision ``state_dict``
(``conv1.weight``, ``layer2.0.downsample.0.weight``, ...) onto them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.models.nn import BatchNorm, Conv2d, max_pool
from contrastjax.models.torch_import import (
    BN_NAMES, CONV_NAMES, TorchNames, load_state_dict, read_state_dict, to_state_dict)

Array = jax.Array
Dtype = Any
PyTree = Any

#: torchvision's ResNet conv init: ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
#: Bottleneck expansion: output channels = 4 x the block's width.
EXPANSION = 4
_BLOCK_RE = re.compile(r"^layer(\d+)_(\d+)$")


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5: the stride is on the 3x3 convolution).

  ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + identity)``, where
  ``identity`` is ``downsample_bn(downsample_conv(x))`` (1x1, strided) when the stride
  is not 1 or the channel count changes, else ``x``.

  Attributes:
    planes: Width of the 1x1/3x3 convolutions; the block outputs ``4 * planes``.
    stride: Stride of the 3x3 convolution and of the downsample path.
    dtype: Compute dtype.
  """
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Applies the block to ``[B, H, W, C]`` input."""
    out_features = self.planes * EXPANSION
    conv = lambda f, k, s, p, name: Conv2d(  # noqa: E731
        f, k, s, p, kernel_init=KAIMING_FAN_OUT, dtype=self.dtype, name=name)
    bn = lambda name: BatchNorm(dtype=self.dtype, name=name)  # noqa: E731
    y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, 0, "conv1")(x), train))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, self.stride, 1, "conv2")(y), train))
    y = bn("bn3")(conv(out_features, 1, 1, 0, "conv3")(y), train)
    identity = x
    if self.stride != 1 or x.shape[-1] != out_features:
      identity = conv(out_features, 1, self.stride, 0, "downsample_conv")(x)
      identity = bn("downsample_bn")(identity, train)
    return nn.relu(y + identity.astype(y.dtype))


class ResNet(nn.Module):
  """torchvision ResNet-50 encoder without ``avgpool``/``fc``.

  Attributes:
    stage_sizes: Bottleneck blocks per stage; ``(3, 4, 6)`` keeps ``layer1..layer3`` of
      ResNet-50, ``(3, 4, 6, 3)`` adds ``layer4``. Smaller values shrink the model.
    stem_width: Output channels of the 7x7 stem convolution (64 in ResNet-50).
    base_width: Bottleneck width of ``layer1``; stage ``i`` uses ``base_width * 2**i``
      and outputs 4x that (64 -> 256/512/1024/2048 channels in ResNet-50).
    dtype: Compute dtype (parameters and BN statistics stay float32).
  """
  stage_sizes: Sequence[int] = (3, 4, 6)
  stem_width: int = 64
  base_width: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> dict[str, Array]:
    """Runs the encoder.

    Args:
      x: ``[B, H, W, 3]`` images.
      train: BatchNorm mode (batch statistics and running-stat updates when True).

    Returns:
      ``{'layer0': [B, H/2, W/2, stem_width], 'layer1': [B, H/4, W/4, 4*base_width],
      'layer2': .../8, 'layer3': .../16}`` (and ``'layer4'`` at /32 with four stages).
    """
    if not 1 <= len(self.stage_sizes) <= 4:
      raise ValueError(f"stage_sizes must have 1 to 4 entries, got {self.stage_sizes}")
    x = x.astype(self.dtype)
    x = Conv2d(self.stem_width, 7, 2, 3, kernel_init=KAIMING_FAN_OUT,
               dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
    features = {"layer0": x}
    x = max_pool(x, 3, 2, 1)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = Bottleneck(self.base_width * 2**stage, stride, dtype=self.dtype,
                       name=f"layer{stage + 1}_{block}")(x, train)
      features[f"layer{stage + 1}"] = x
    return features


Model = ResNet

_BOTTLENECK_NAMES = TorchNames(children={
    **{f"conv{i}": (f"conv{i}", CONV_NAMES) for i in (1, 2, 3)},
    **{f"bn{i}": (f"bn{i}", BN_NAMES) for i in (1, 2, 3)},
    "downsample_conv": ("downsample.0", CONV_NAMES),
    "downsample_bn": ("downsample.1", BN_NAMES),
})


def torch_names(child_names: Iterable[str], style: str = "torchvision") -> TorchNames:
  """PyTorch naming of a :class:`ResNet`'s variables.

  Args:
    child_names: The encoder's top-level Flax module names (``conv1``, ``bn1``,
      ``layer1_0``, ...), e.g. ``variables['params'].keys()``.
    style: ``'torchvision'`` (``conv1``, ``bn1``, ``layer1.0``, ...) or ``'condseg'``,
      the ConDSeg reference's re-wrapping (``layer0.0`` = conv1, ``layer0.1`` = bn1,
      ``layer1.1.<i>`` because ``layer1 = Sequential(maxpool, layer1)``, ``layer2.<i>``).

  Returns:
    The :class:`~contrastjax.models.torch_import.TorchNames` of the encoder.
  """
  if style not in ("torchvision", "condseg"):
    raise ValueError(f"unknown ResNet naming style {style!r}")
  condseg = style == "condseg"
  children: dict[str, tuple[str, TorchNames]] = {
      "conv1": ("layer0.0" if condseg else "conv1", CONV_NAMES),
      "bn1": ("layer0.1" if condseg else "bn1", BN_NAMES),
  }
  for name in child_names:
    match = _BLOCK_RE.match(name)
    if match:
      stage, block = match.groups()
      prefix = "layer1.1" if condseg and stage == "1" else f"layer{stage}"
      children[name] = (f"{prefix}.{block}", _BOTTLENECK_NAMES)
  return TorchNames(children=children)


def _stages(params: Mapping[str, Any]) -> set[int]:
  return {int(m.group(1)) for m in map(_BLOCK_RE.match, params) if m}


def load(variables: Mapping[str, PyTree],
         path_or_state_dict: str | os.PathLike | Mapping[str, Any]
         ) -> tuple[dict[str, PyTree], list[str]]:
  """Imports a torchvision ResNet-50 ``state_dict`` into :class:`ResNet` variables.

  Keys of stages the model does not have (``layer4.*`` for the 3-stage encoder) and of
  the classifier (``fc.*``) are ignored, logged and returned; ``num_batches_tracked`` is
  skipped. Anything else missing, unexpected or mis-shaped is an error.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a :class:`ResNet` (arrays or
      ``jax.eval_shape`` structs).
    path_or_state_dict: ``.pth`` (needs torch), ``.npz`` or ``.safetensors`` file, or a
      mapping of arrays.

  Returns:
    ``(new_variables, ignored_keys)``.

  Raises:
    KeyError: Missing or unexpected key (named in the message).
    ValueError: Shape mismatch (key, expected and found shape in the message).
  """
  state = read_state_dict(path_or_state_dict)
  params = variables["params"]
  return load_state_dict(variables, state, torch_names(params.keys(), "torchvision"),
                         ignore=torchvision_ignored(params), what="torchvision ResNet")


def torchvision_ignored(params: Mapping[str, Any]) -> Callable[[str], bool]:
  """Predicate for torchvision keys an encoder with these ``params`` does not use.

  True for the classifier (``fc.*``) and for stages the encoder does not have (e.g.
  ``layer4.*`` for ``stage_sizes=(3, 4, 6)``).
  """
  present = _stages(params)
  prefixes = ("fc.",) + tuple(f"layer{s}." for s in range(1, 5) if s not in present)
  return lambda key: key.startswith(prefixes)


def to_torch_state_dict(variables: Mapping[str, PyTree]) -> dict[str, np.ndarray]:
  """:class:`ResNet` variables as a torchvision-named state dict (NumPy, OIHW)."""
  return to_state_dict(variables, torch_names(variables["params"].keys()))
