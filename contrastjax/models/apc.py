"""APC model pieces: ViT encoder, HV-BiLSTM patch conditioning, patch classifier, decoders.

APC (Wu et al., "Adaptive Patch Contrast for Weakly Supervised Semantic Segmentation",
EAAI 2025, https://arxiv.org/abs/2407.10649) builds on ViT-PCM (Rossetti et al., ECCV
2022; https://github.com/deepplants/ViT-PCM at commit 1fea66f, ``model.py``). The model
here is ViT-PCM's, plus an optional segmentation decoder for APC's single-stage
training (ToCo's, https://github.com/rulixiang/ToCo at commit e13514d,
``model/decoder/conv_head.py``); see docs/methods/apc.md. Pooling (GMP / top-K /
adaptive-K), patch contrast and the losses belong to the method, not to this file::

  grid     = ViT(x)[:, 1:] as [B, h, w, D]              (h, w = H/16, W/16; 24x24 at 384)
  features = HVBiLSTM(grid)                              [B, h, w, 4 * hidden]  (optional)
  logits   = Dense(C + 1, no bias)(Dropout(features))    softmax per patch -> probs
  seg      = LargeFOV / ASPP (grid or features)          [B, h, w, C + 1]       (optional)

Classes: ``num_classes`` is the number of *foreground* classes ``C`` (20 for VOC, 80
for COCO); every output has ``C + 1`` channels with the background at index 0
(ViT-PCM's ``NUM_CLASSES: 21``).

Input: images normalised by the method, as the encoder weights expect: ``[-1, 1]``
(``x / 127.5 - 1``) for the Google / vit-keras checkpoints ViT-PCM starts from and
timm's ``augreg`` ViTs (mean = std = 0.5); ImageNet mean/std for DeiT (ToCo).

Deviations and choices, each documented where it happens:

* HV-BiLSTM's recurrent cell is :class:`KerasLSTMCell`, flax's ``OptimizedLSTMCell``
  with Keras' initialisation (forget-gate bias 1); parameters are interchangeable with
  flax's cells. Keras' LSTM input dropout is reproduced as TF 2 runs it in ViT-PCM
  (see :class:`HVBiLSTM`).
* The decoders follow ToCo's code, not its dead ``_init_weights`` (see :class:`LargeFOV`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastjax.models import vit as vit_lib
from contrastjax.models.nn import Conv2d
from contrastjax.models.torch_import import CONV_NAMES, TorchNames

Array = jax.Array
Dtype = Any
PyTree = Any
Initializer = Any

#: The LSTM gates in the order of Keras, PyTorch and flax's parameter names: input,
#: forget, cell candidate (Keras ``c``, PyTorch/flax ``g``), output.
GATES = ("i", "f", "g", "o")
#: ViT-PCM's classifier init, ``RandomNormal(0, 0.05)``.
CLASSIFIER_INIT = nn.initializers.normal(0.05)
#: ToCo's ASPP init (its ``_init_weights``, which ``ASPP.__init__`` does call):
#: ``normal_(0, 0.01)``, bias zero.
ASPP_INIT = nn.initializers.normal(0.01)


# ----------------------------------------------------------------------------- LSTM
def keras_lstm_kernel_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32
                           ) -> Array:
  """Keras' ``glorot_uniform`` of the packed input kernel ``[D, 4 * units]``, for one
  gate's ``[D, units]`` slice: ``U(-l, l)`` with ``l = sqrt(6 / (D + 4 * units))``."""
  limit = math.sqrt(6.0 / (shape[0] + 4 * shape[1]))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


class _GateParams(nn.Module):
  """The ``kernel`` (and ``bias``) of one gate, under flax's ``Dense`` names."""
  features: int
  use_bias: bool
  kernel_init: Initializer
  bias_init: Initializer
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array | None]:
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return kernel, bias


class KerasLSTMCell(nn.OptimizedLSTMCell):
  """flax's ``OptimizedLSTMCell`` with Keras ``LSTM`` defaults at initialisation.

  Same function and parameters as ``nn.OptimizedLSTMCell`` / ``nn.LSTMCell`` (per gate
  ``i{g}/kernel`` ``[D, units]`` without bias and ``h{g}/kernel`` ``[units, units]`` with
  ``h{g}/bias``, gates ``g`` in :data:`GATES`; ``c' = f c + i g``, ``h' = o tanh(c')``,
  sigmoid gates; the tests check it against flax's cell and ``torch.nn.LSTM``). It
  exists because flax's cells take one bias initialiser for all gates, while Keras'
  ``unit_forget_bias=True`` starts the forget gate at 1. Defaults: input kernels
  :func:`keras_lstm_kernel_init` (Keras' ``glorot_uniform`` of the packed kernel),
  recurrent kernels orthogonal per gate (Keras draws one orthogonal ``[units,
  4 * units]`` matrix; its gate blocks are not orthogonal each: an init-only
  difference), biases zero except the forget gate's ``forget_bias_init`` (ones).

  The matmuls run in ``dtype``; gates, cell state and output are float32.

  Attributes:
    forget_bias_init: Initialiser of ``hf/bias``.
  """
  kernel_init: Initializer = keras_lstm_kernel_init
  forget_bias_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, carry: tuple[Array, Array], inputs: Array
               ) -> tuple[tuple[Array, Array], Array]:
    """One step: ``((c, h), x) -> ((c', h'), h')``."""
    c, h = carry
    units = h.shape[-1]
    w_i, w_h, b_h = [], [], []
    for gate in GATES:
      w_i.append(_GateParams(units, False, self.kernel_init, None, self.param_dtype,
                             name=f"i{gate}")(inputs.shape[-1])[0])
      bias_init = self.forget_bias_init if gate == "f" else self.bias_init
      kernel, bias = _GateParams(units, True, self.recurrent_kernel_init, bias_init,
                                 self.param_dtype, name=f"h{gate}")(units)
      w_h.append(kernel)
      b_h.append(bias)
    kernel_i = jnp.concatenate(w_i, axis=-1)
    kernel_h = jnp.concatenate(w_h, axis=-1)
    bias = jnp.concatenate(b_h, axis=-1)
    x, h_in, kernel_i, kernel_h, bias = nn.dtypes.promote_dtype(
        inputs, h, kernel_i, kernel_h, bias, dtype=self.dtype)
    z = (jnp.dot(x, kernel_i) + jnp.dot(h_in, kernel_h) + bias).astype(jnp.float32)
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    new_c = self.gate_fn(zf) * c + self.gate_fn(zi) * self.activation_fn(zg)
    new_h = self.gate_fn(zo) * self.activation_fn(new_c)
    return (new_c, new_h), new_h


def lstm_params_from_keras(kernel: np.ndarray, recurrent_kernel: np.ndarray,
                           bias: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
  """Keras ``LSTM`` weights as :class:`KerasLSTMCell` (or flax LSTM cell) parameters.

  Args:
    kernel: ``[D, 4 * units]``, gate blocks ``i, f, c, o`` along the columns.
    recurrent_kernel: ``[units, 4 * units]``, same blocks.
    bias: ``[4 * units]``. (PyTorch ``nn.LSTM``: ``kernel = weight_ih.T``,
      ``recurrent_kernel = weight_hh.T``, ``bias = bias_ih + bias_hh``; same gate order.)

  Returns:
    ``{'ii': {'kernel'}, 'hi': {'kernel', 'bias'}, ...}``.
  """
  kernel, recurrent_kernel, bias = (np.asarray(a) for a in (kernel, recurrent_kernel, bias))
  units = recurrent_kernel.shape[0]
  if (kernel.ndim != 2 or recurrent_kernel.shape != (units, 4 * units)
      or kernel.shape[1] != 4 * units or bias.shape != (4 * units,)):
    raise ValueError(f"LSTM weights: expected kernel [D, 4u], recurrent_kernel [u, 4u] and "
                     f"bias [4u]; got {kernel.shape}, {recurrent_kernel.shape}, {bias.shape}")
  out: dict[str, dict[str, np.ndarray]] = {}
  for j, gate in enumerate(GATES):
    cols = slice(j * units, (j + 1) * units)
    out[f"i{gate}"] = {"kernel": kernel[:, cols]}
    out[f"h{gate}"] = {"kernel": recurrent_kernel[:, cols], "bias": bias[cols]}
  return out


def lstm_params_to_keras(params: Mapping[str, Mapping[str, Any]]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Inverse of :func:`lstm_params_from_keras`: ``(kernel, recurrent_kernel, bias)``."""
  try:
    kernel = np.concatenate([np.asarray(params[f"i{g}"]["kernel"]) for g in GATES], axis=1)
    recurrent = np.concatenate([np.asarray(params[f"h{g}"]["kernel"]) for g in GATES], axis=1)
    bias = np.concatenate([np.asarray(params[f"h{g}"]["bias"]) for g in GATES])
  except KeyError as e:
    raise KeyError(f"LSTM cell parameters lack {e}; expected i{{g}}/kernel, h{{g}}/kernel "
                   f"and h{{g}}/bias for g in {GATES}, got {sorted(params)}") from e
  return kernel, recurrent, bias


class InputDropoutRNN(nn.RNN):
  """``nn.RNN`` with Keras' LSTM input dropout in front (``dropout=`` of Keras' LSTM).

  ``mode`` (masks are inverted dropout, drawn from the ``'dropout'`` rng, one per RNN,
  shared by the four gates as Keras' ``implementation=2``):

  * ``'per_step'``: an independent mask for every element of the input sequence. This
    is what TF 2 Keras runs for ViT-PCM's ``LSTM(192, dropout=0.2)``: the layer is
    cuDNN-eligible (tanh/sigmoid, no recurrent dropout), and that path multiplies the
    whole ``[batch, time, features]`` input by one mask of that shape
    (``get_dropout_mask_for_cell(inputs)`` in ``recurrent_v2.LSTM.call``).
  * ``'per_sequence'``: one mask per sequence reused at every timestep (variational
    dropout, Gal & Ghahramani 2016), which the Keras documentation describes and its
    generic per-cell path does.

  Attributes:
    dropout_rate: Input dropout rate.
    mode: ``'per_step'`` or ``'per_sequence'``.
    deterministic: Disables the dropout.
  """
  dropout_rate: float = 0.0
  mode: str = "per_step"
  deterministic: bool = True

  @nn.compact
  def __call__(self, inputs: Array, **kwargs: Any) -> Any:
    """Drops input features, then runs the RNN (arguments as ``nn.RNN``)."""
    if self.mode not in ("per_step", "per_sequence"):
      raise ValueError(f"InputDropoutRNN.mode must be 'per_step' or 'per_sequence', got "
                       f"{self.mode!r}")
    if self.time_major or kwargs.get("time_major"):
      raise ValueError("InputDropoutRNN expects batch-major inputs [..., time, features]")
    broadcast = (inputs.ndim - 2,) if self.mode == "per_sequence" else ()
    x = nn.Dropout(self.dropout_rate, broadcast_dims=broadcast, name="input_dropout")(
        inputs, deterministic=self.deterministic)
    return super().__call__(x, **kwargs)


class HVBiLSTM(nn.Module):
  """ViT-PCM's patch conditioning (``HVBiLSTM``): bidirectional LSTMs along rows and columns.

  ``[B, h, w, D] -> [B, h, w, 4 * hidden_size]``::

    x = Dropout(dropout_rate)(grid)                          (one mask for both passes)
    rows = BiLSTM_rows(x)         sequences along w, one per (b, row)
    cols = BiLSTM_cols(x^T)^T     sequences along h, one per (b, column)
    out  = [rows_fwd, rows_bwd, cols_fwd, cols_bwd]          (Keras' concat order)

  Each BiLSTM is ``nn.Bidirectional(nn.RNN(KerasLSTMCell), nn.RNN(KerasLSTMCell))``
  (:class:`InputDropoutRNN`); the backward LSTM reads the sequence reversed and its
  outputs are put back in forward order before the concatenation (Keras'
  ``Bidirectional(return_sequences=True)``, PyTorch's bidirectional LSTM). The zero
  initial state is the same for every sequence (Keras and PyTorch). Parameters:
  ``rows/forward_rnn/cell/{ii,hi,...}`` etc.

  Attributes:
    hidden_size: Units per direction (ViT-PCM ``MODEL.HIDDEN_SIZE: 192``).
    dropout_rate: Dropout on the input grid (``SOLVER.DROPOUT: 0.2``).
    lstm_dropout_rate: Keras LSTM ``dropout`` (0.2 in ViT-PCM).
    lstm_dropout_mode: See :class:`InputDropoutRNN` (default: as ViT-PCM ran).
    dtype: Compute dtype of the matmuls; the output is cast to it.
    unroll: ``nn.RNN`` unroll factor.
  """
  hidden_size: int = 192
  dropout_rate: float = 0.2
  lstm_dropout_rate: float = 0.2
  lstm_dropout_mode: str = "per_step"
  dtype: Dtype = jnp.float32
  unroll: int = 1

  def _bilstm(self, deterministic: bool, name: str) -> nn.Bidirectional:
    def rnn() -> InputDropoutRNN:
      # parent=None: adopted by nn.Bidirectional as 'forward_rnn' / 'backward_rnn'.
      return InputDropoutRNN(KerasLSTMCell(self.hidden_size, dtype=self.dtype, parent=None),
                             unroll=self.unroll, dropout_rate=self.lstm_dropout_rate,
                             mode=self.lstm_dropout_mode, deterministic=deterministic,
                             parent=None)
    return nn.Bidirectional(rnn(), rnn(), name=name)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """Conditions ``[B, h, w, D]`` patch features; ``deterministic`` disables dropout."""
    if x.ndim != 4:
      raise ValueError(f"HVBiLSTM expects a patch grid [B, h, w, D], got {x.shape}")
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    rows = self._bilstm(deterministic, "rows")(x)
    cols = self._bilstm(deterministic, "cols")(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    return jnp.concatenate([rows, cols], axis=-1).astype(self.dtype)


# ----------------------------------------------------------------------------- heads
class PatchClassifier(nn.Module):
  """ViT-PCM's patch classifier (``PC`` without its pooling): per-patch softmax over C+1.

  ``logits = Dense(C + 1, use_bias=False)(Dropout(x))`` with kernel init
  ``N(0, 0.05)``; ``probs = softmax(logits)`` over the last axis (float32). ViT-PCM
  regularises the kernel with Keras ``L2(0.01)``, i.e. ``0.01 * sum(w ** 2)`` added to
  the loss: :func:`classifier_l2`.

  Attributes:
    num_classes: Foreground classes ``C``; outputs have ``C + 1`` (background 0).
    dropout_rate: Dropout on the input (0.2).
    dtype: Compute dtype of the matmul.
  """
  num_classes: int
  dropout_rate: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> tuple[Array, Array]:
    """``[..., D]`` -> ``(logits, probs)``, both ``[..., C + 1]`` float32."""
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    logits = nn.Dense(self.num_classes + 1, use_bias=False, kernel_init=CLASSIFIER_INIT,
                      dtype=self.dtype, name="classifier")(x).astype(jnp.float32)
    return logits, jax.nn.softmax(logits, axis=-1)


class LargeFOV(nn.Module):
  """ToCo's ``LargeFOV`` decoder (DeepLab-LargeFOV head) on the patch grid.

  ``conv6`` 3x3 dilation ``d`` (padding ``d``) ``D -> channels`` -> ReLU -> ``conv7`` 3x3
  dilation ``d`` ``channels -> channels`` -> ReLU -> ``conv8`` 1x1 ``channels -> C + 1``,
  all without bias (ToCo's ``conv3x3`` / ``conv1x1`` helpers pass ``bias=False``).
  Initialisation: PyTorch's default (``kaiming_uniform_(a=sqrt(5))``), which is what
  ToCo's modules get: its ``LargeFOV._init_weights`` is never called (and would fail on
  the missing biases).

  Attributes:
    num_classes: Foreground classes ``C``; ``C + 1`` outputs.
    channels: Hidden width (512).
    dilation: Dilation of the 3x3 convolutions (5).
    dtype: Compute dtype.
  """
  num_classes: int
  channels: int = 512
  dilation: int = 5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, h, w, D]`` -> ``[B, h, w, C + 1]``."""
    d = self.dilation
    x = nn.relu(Conv2d(self.channels, 3, 1, d, d, use_bias=False, dtype=self.dtype,
                       name="conv6")(x))
    x = nn.relu(Conv2d(self.channels, 3, 1, d, d, use_bias=False, dtype=self.dtype,
                       name="conv7")(x))
    return Conv2d(self.num_classes + 1, 1, use_bias=False, dtype=self.dtype,
                  name="conv8")(x)


class ASPP(nn.Module):
  """ToCo's ``ASPP`` decoder (DeepLab v2 ASPP-L): the sum of parallel dilated 3x3 convs.

  One ``D -> C + 1`` 3x3 convolution with bias per rate (dilation = padding = rate;
  ToCo: 6, 12, 18, 24), outputs summed. Init as ToCo: ``N(0, 0.01)`` kernels, zero
  biases. On a 24x24 grid the rate-24 branch sees only its centre tap (the others
  read padding).

  Attributes:
    num_classes: Foreground classes ``C``; ``C + 1`` outputs.
    rates: Dilation rates, one branch ``c{i}`` each.
    dtype: Compute dtype.
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[B, h, w, D]`` -> ``[B, h, w, C + 1]``."""
    out = None
    for i, r in enumerate(self.rates):
      y = Conv2d(self.num_classes + 1, 3, 1, r, r, use_bias=True, dtype=self.dtype,
                 kernel_init=ASPP_INIT, bias_init=nn.initializers.zeros,
                 name=f"c{i}")(x)
      out = y if out is None else out + y
    if out is None:
      raise ValueError("ASPP needs at least one rate")
    return out


#: PyTorch (ToCo) names of the decoders' parameters.
LARGEFOV_NAMES = TorchNames(children={
    f"conv{i}": (f"conv{i}", CONV_NAMES) for i in (6, 7, 8)})


def aspp_torch_names(num_rates: int = 4) -> TorchNames:
  """PyTorch (ToCo) names of an :class:`ASPP` with ``num_rates`` branches (``c0``...)."""
  return TorchNames(children={f"c{i}": (f"c{i}", CONV_NAMES)
                              for i in range(num_rates)})


# ----------------------------------------------------------------------------- network
DECODERS = ("none", "largefov", "aspp")


class APCNet(nn.Module):
  """ViT -> (HV-BiLSTM) -> patch classifier, with an optional segmentation decoder.

  Attributes:
    num_classes: Foreground classes ``C`` (VOC 20, COCO 80); outputs have ``C + 1``
      channels, background first.
    variant: ViT size (:data:`vit.CONFIGS`; ViT-PCM: ``'b16'``).
    img_size: Input size of the position-embedding parameters (ViT-PCM: 384, the
      ``imagenet21k+imagenet2012`` ViT-B_16 checkpoint's; other input sizes resample).
    backbone_overrides: Extra :class:`vit.VisionTransformer` attributes as ``(name,
      value)`` pairs (e.g. ``(('depth', 2),)`` for a small test).
    backbone_dropout_rate: Dropout inside the ViT blocks (vit-keras' ``dropout=0.1``,
      active in ViT-PCM's training steps; no dropout after the position embeddings).
    drop_path_rate: ViT stochastic depth (ViT-PCM: none).
    bilstm: Use :class:`HVBiLSTM` (ViT-PCM ``LSTM: HV_BiLSTM``); without it the
      classifier reads the ViT grid.
    hidden_size: HV-BiLSTM units per direction (192: 4 x 192 = 768 features).
    dropout_rate: The HV-BiLSTM input dropout, its LSTMs' input dropout and the
      classifier dropout (ViT-PCM ``SOLVER.DROPOUT: 0.2``).
    lstm_dropout_mode: See :class:`InputDropoutRNN`.
    decoder: ``'none'``, ``'largefov'`` or ``'aspp'``.
    decoder_input: ``'vit'`` (the ViT grid, as ToCo) or ``'bilstm'`` (the HV-BiLSTM
      output; needs ``bilstm``).
    decoder_channels: LargeFOV hidden width (512).
    largefov_dilation: LargeFOV dilation (5).
    aspp_rates: ASPP rates (6, 12, 18, 24).
    remat: Rematerialise the ViT blocks in the backward pass.
    scan_blocks: Scan over the ViT blocks (stacked parameters).
    dtype: Compute dtype (parameters float32; the classifier's logits and
      probabilities are float32).
  """
  num_classes: int
  variant: str = "b16"
  img_size: int | tuple[int, int] = 384
  backbone_overrides: tuple[tuple[str, Any], ...] = ()
  backbone_dropout_rate: float = 0.1
  drop_path_rate: float = 0.0
  bilstm: bool = True
  hidden_size: int = 192
  dropout_rate: float = 0.2
  lstm_dropout_mode: str = "per_step"
  decoder: str = "none"
  decoder_input: str = "vit"
  decoder_channels: int = 512
  largefov_dilation: int = 5
  aspp_rates: tuple[int, ...] = (6, 12, 18, 24)
  remat: bool = False
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.decoder not in DECODERS:
      raise ValueError(f"APCNet.decoder must be one of {DECODERS}, got {self.decoder!r}")
    if self.decoder_input not in ("vit", "bilstm"):
      raise ValueError(f"APCNet.decoder_input must be 'vit' or 'bilstm', got "
                       f"{self.decoder_input!r}")
    if self.decoder != "none" and self.decoder_input == "bilstm" and not self.bilstm:
      raise ValueError("APCNet: decoder_input='bilstm' needs bilstm=True")
    self.backbone = vit_lib.vit(
        self.variant, img_size=self.img_size, dropout_rate=self.backbone_dropout_rate,
        drop_path_rate=self.drop_path_rate, remat=self.remat, scan_blocks=self.scan_blocks,
        dtype=self.dtype, **dict(self.backbone_overrides))
    if self.bilstm:
      self.patch_conditioning = HVBiLSTM(self.hidden_size, self.dropout_rate,
                                         self.dropout_rate, self.lstm_dropout_mode,
                                         dtype=self.dtype)
    self.patch_classifier = PatchClassifier(self.num_classes, self.dropout_rate,
                                            dtype=self.dtype)
    if self.decoder == "largefov":
      self.seg_decoder = LargeFOV(self.num_classes, self.decoder_channels,
                                  self.largefov_dilation, dtype=self.dtype)
    elif self.decoder == "aspp":
      self.seg_decoder = ASPP(self.num_classes, tuple(self.aspp_rates), dtype=self.dtype)

  def __call__(self, x: Array, *, train: bool,
               deterministic: bool | None = None) -> tuple[Array, dict[str, Array]]:
    """Classifies the patches of ``[B, H, W, 3]`` images.

    Args:
      x: Normalised images (see the module docstring for the range).
      train: Training mode: dropout (and stochastic depth) on, rng ``'dropout'``.
      deterministic: Overrides ``not train`` for dropout (e.g. ViT-PCM's
        stop-gradient teacher pass in inference mode).

    Returns:
      ``(probs, aux)``: ``probs`` ``[B, h, w, C + 1]`` per-patch class probabilities
      (float32; ``h, w = H // 16, W // 16``); ``aux`` with ``'logits'`` and ``'probs'``
      (``[B, h, w, C + 1]`` float32), ``'features'`` (the classifier's input, before
      its dropout: HV-BiLSTM output ``[B, h, w, 4 * hidden_size]`` or the ViT grid;
      for patch contrast), ``'vit_grid'`` (``[B, h, w, D]``), ``'cls'`` (``[B, D]``)
      and, with a decoder, ``'seg_logits'`` (``[B, h, w, C + 1]`` at grid resolution,
      in ``dtype``).
    """
    det = (not train) if deterministic is None else deterministic
    _, enc = self.backbone(x, train=train, deterministic=deterministic)
    grid = enc["grid"]
    features = self.patch_conditioning(grid, deterministic=det) if self.bilstm else grid
    logits, probs = self.patch_classifier(features, deterministic=det)
    aux = {"logits": logits, "probs": probs, "features": features, "vit_grid": grid,
           "cls": enc["cls"]}
    if self.decoder != "none":
      aux["seg_logits"] = self.seg_decoder(grid if self.decoder_input == "vit"
                                           else features)
    return probs, aux


Model = APCNet


def classifier_kernel(params: Mapping[str, Any]) -> Array:
  """The patch-classifier kernel ``[features, C + 1]`` of :class:`APCNet` ``params``."""
  try:
    return params["patch_classifier"]["classifier"]["kernel"]
  except KeyError as e:
    raise KeyError(f"no APCNet patch classifier in params (expected "
                   f"params['patch_classifier']['classifier']['kernel']; top-level "
                   f"entries {sorted(params)})") from e


def classifier_l2(params: Mapping[str, Any], weight: float = 0.01) -> Array:
  """ViT-PCM's ``reg_loss``: Keras ``L2(weight)`` on the classifier kernel,
  ``weight * sum(w ** 2)`` (no 1/2), in float32."""
  kernel = classifier_kernel(params).astype(jnp.float32)
  return weight * jnp.sum(jnp.square(kernel))


def load_backbone(variables: Mapping[str, PyTree],
                  path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                  **kwargs: Any) -> tuple[dict[str, PyTree], list[str]]:
  """Imports ViT weights (any naming :func:`vit.load` reads) into ``params['backbone']``
  of :class:`APCNet` variables; other variables are kept.

  Returns:
    ``(new_variables, ignored_keys)`` as :func:`vit.load`.
  """
  params = variables["params"]
  if "backbone" not in params:
    raise KeyError(f"no 'backbone' in the APCNet params (top-level entries {sorted(params)})")
  loaded, ignored = vit_lib.load({"params": params["backbone"]}, path_or_state_dict,
                                 **kwargs)
  new_variables = {c: dict(v) for c, v in variables.items()}
  new_variables["params"]["backbone"] = loaded["params"]
  return new_variables, ignored
