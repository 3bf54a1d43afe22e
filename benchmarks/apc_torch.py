"""The PyTorch counterpart of contrastjax's APC train step, for side-by-side timing.

Not part of the package (``python -m contrastjax.benchmark --config=configs/apc_voc.py
--torch`` loads it from here). The same computation as ``contrastjax/methods/apc.py``'s
``APCMethod._loss`` written with PyTorch and timm:

* the ViT: ``timm.models.vision_transformer.VisionTransformer`` (pre-norm, exact GELU,
  LayerNorm eps 1e-6, class token; ``dynamic_img_size`` resamples the position embeddings
  as ours does), its patch tokens as the grid;
* the HV-BiLSTM: ``torch.nn.LSTM(bidirectional=True)`` along rows, another along columns,
  concatenated ``[rows, cols]`` (input dropout on the grid; torch's LSTM has no per-step
  input dropout, the only difference, and a cheap one);
* the patch classifier: ``nn.Linear(D, C+1, bias=False)`` and a softmax;
* ToCo's LargeFOV decoder (bias-free 3x3 dilated convolutions) on the ViT grid;
* the losses of ``contrastjax/methods/apc_losses.py`` in torch ops: adaptive-K pooling
  (every K rule), top-K and max pooling, Keras' clipped binary cross-entropy, the
  classifier L2, ViT-PCM's merge into pseudo-labels (align-corners upsampling, confidence
  ignore), ToCo's background/foreground-balanced segmentation loss, ToCo's PTC patch
  contrast with batch-wide normalisation;
* the optimizer of the config: AdamW (ToCo recipe: head groups at 10x the rate) or Adam.

:func:`jax_params_from_torch` copies the torch weights into the JAX parameter tree, so
both sides compute the same loss from the same weights (``tests/test_apc_torch.py`` checks
the first step's loss and its parts at a small size).
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np


def _torch():
  import torch  # pylint: disable=import-outside-toplevel
  return torch


def _options(config):
  from contrastjax.methods import apc as apc_lib  # pylint: disable=import-outside-toplevel
  from contrastjax.methods import options  # pylint: disable=import-outside-toplevel
  return options.parse(apc_lib.APCOptions, config.apc, "config.apc")


def _backbone_kwargs(config) -> dict[str, Any]:
  from contrastjax.models import vit  # pylint: disable=import-outside-toplevel
  m = config.model
  kw = dict(vit.CONFIGS[vit._variant_key(m.variant)])  # pylint: disable=protected-access
  kw.update(dict(m.get("backbone_overrides", {}) or {}))
  return kw


def build(config, seed: int = 0):
  """The torch network of ``config`` (``nn.Module``) in train mode."""
  torch = _torch()
  from timm.models import vision_transformer as timm_vit  # pylint: disable=import-outside-toplevel
  nn = torch.nn
  o = _options(config)
  if o.par or o.eq_weight > 0:
    raise ValueError(
        f"config.apc.par={o.par}, eq_weight={o.eq_weight}: PAR is not in the PyTorch "
        f"counterpart, nor the equivariant loss (the VOC recipe uses neither); time the "
        f"step without them (--config.apc.par=False --config.apc.eq_weight=0)")
  m = config.model
  kw = _backbone_kwargs(config)
  torch.manual_seed(seed)
  width = kw["embed_dim"]
  num_out = o.num_classes + 1
  bilstm = bool(m.get("bilstm", True))
  hidden = int(m.get("hidden_size", 192))
  uses_decoder = o.uses_decoder
  channels = int(m.get("decoder_channels", 512))
  dilation = int(m.get("largefov_dilation", 5))
  drop = float(m.get("dropout_rate", 0.2))
  img = m.img_size

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.vit = timm_vit.VisionTransformer(
          img_size=img, patch_size=kw["patch_size"], embed_dim=width, depth=kw["depth"],
          num_heads=kw["num_heads"], mlp_ratio=float(kw.get("mlp_ratio", 4.0)),
          num_classes=0, dynamic_img_size=True,
          proj_drop_rate=float(m.get("backbone_dropout_rate", 0.0)))
      self.drop = nn.Dropout(drop)
      if bilstm:
        self.rows = nn.LSTM(width, hidden, bidirectional=True, batch_first=True)
        self.cols = nn.LSTM(width, hidden, bidirectional=True, batch_first=True)
      feat = 4 * hidden if bilstm else width
      self.classifier = nn.Linear(feat, num_out, bias=False)
      if uses_decoder:
        self.conv6 = nn.Conv2d(width, channels, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.conv7 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.conv8 = nn.Conv2d(channels, num_out, 1, bias=False)

    def forward(self, x):  # x: NCHW, normalised
      tokens = self.vit.forward_features(x)
      b = x.shape[0]
      h, w = x.shape[2] // kw["patch_size"], x.shape[3] // kw["patch_size"]
      grid = tokens[:, self.vit.num_prefix_tokens:].reshape(b, h, w, width)
      if bilstm:
        g = self.drop(grid)
        rows = self.rows(g.reshape(b * h, w, width))[0].reshape(b, h, w, 2 * hidden)
        cols = self.cols(g.permute(0, 2, 1, 3).reshape(b * w, h, width))[0]
        cols = cols.reshape(b, w, h, 2 * hidden).permute(0, 2, 1, 3)
        features = torch.cat([rows, cols], dim=-1)
      else:
        features = grid
      logits = self.classifier(self.drop(features))
      out = {"probs": torch.softmax(logits, dim=-1), "features": features, "grid": grid}
      if uses_decoder:
        g = grid.permute(0, 3, 1, 2)
        out["seg_logits"] = self.conv8(torch.relu(self.conv7(torch.relu(self.conv6(g)))))
      return out

  return Net().train()


def jax_params_from_torch(net, jax_params) -> dict[str, Any]:
  """The JAX ``APCNet`` parameter tree (structure of ``jax_params``) filled with ``net``'s
  weights (the ViT through ``models/apc.py: load_backbone``'s timm import)."""
  from contrastjax.models import apc as apc_model  # pylint: disable=import-outside-toplevel
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  vit_sd = {k[len("vit."):]: v for k, v in sd.items() if k.startswith("vit.")}
  loaded, _ = apc_model.load_backbone({"params": jax_params}, vit_sd)
  params = dict(loaded["params"])
  params["patch_classifier"] = {"classifier": {"kernel": sd["classifier.weight"].T}}
  if "patch_conditioning" in params:
    def direction(name, suffix):
      return {"cell": apc_model.lstm_params_from_keras(
          sd[f"{name}.weight_ih_l0{suffix}"].T, sd[f"{name}.weight_hh_l0{suffix}"].T,
          sd[f"{name}.bias_ih_l0{suffix}"] + sd[f"{name}.bias_hh_l0{suffix}"])}
    params["patch_conditioning"] = {
        name: {"forward_rnn": direction(name, ""), "backward_rnn": direction(name, "_reverse")}
        for name in ("rows", "cols")}
  if "seg_decoder" in params:
    params["seg_decoder"] = {n: {"kernel": sd[f"{n}.weight"].transpose(2, 3, 1, 0)}
                             for n in ("conv6", "conv7", "conv8")}
  return params


# ----------------------------------------------------------------------------- losses
def normalize(torch, images, kind: str):
  if kind == "vit_pcm":
    return images / 127.5 - 1.0
  mean = torch.tensor((0.485, 0.456, 0.406), dtype=images.dtype) * 255.0
  std = torch.tensor((0.229, 0.224, 0.225), dtype=images.dtype) * 255.0
  return (images - mean) / std


def pool(torch, probs, o, step: int):
  """``[B, h, w, C+1] -> [B, C+1]``: GMP, top-K or adaptive-K (K without gradient)."""
  b, h, w, c = probs.shape
  flat = probs.reshape(b, h * w, c).transpose(1, 2)          # [B, C, N]
  srt = torch.sort(flat, dim=-1, descending=True)[0]
  n = h * w
  if o.pooling == "gmp" or (o.pooling == "akp" and step < o.akp_warmup_steps):
    return srt[..., 0]
  if o.pooling == "topk":
    return srt[..., :o.topk].mean(-1)
  k_max = o.akp_k_max or n
  with torch.no_grad():
    s = srt[..., :k_max]
    if o.akp_rule == "ratio_to_max":
      k = (flat >= o.akp_tau * s[..., :1]).sum(-1)
    elif o.akp_rule == "consecutive_ratio":
      drop = s[..., 1:] < o.akp_tau * s[..., :-1]
      idx = torch.arange(1, k_max).expand_as(drop)
      k = torch.where(drop, idx, torch.full_like(idx, k_max)).min(-1)[0] if k_max > 1 else (
          torch.ones(b, c, dtype=torch.long))
    else:  # argmax_share
      winners = probs.argmax(-1).reshape(b, n)
      n_c = torch.nn.functional.one_hot(winners, c).sum(1).float()
      k = torch.ceil(o.akp_rho * n_c).long()
    k = k.clamp(1, k_max)
  keep = torch.arange(k_max)[None, None] < k[..., None]
  return (srt[..., :k_max] * keep).sum(-1) / k.to(probs.dtype)


def keras_bce(torch, scores, labels, eps: float = 1e-7):
  p = scores.clamp(eps, 1.0 - eps)
  return -(labels * torch.log(p + eps) + (1 - labels) * torch.log(1 - p + eps)).mean()


def merge(torch, probs, labels):
  m = probs * labels[:, None, None, :]
  mx = m.amax(dim=(1, 2), keepdim=True)
  m = torch.where(mx == 0, torch.zeros_like(m), m / torch.where(mx == 0, 1.0, mx))
  s = m.sum(-1, keepdim=True)
  return torch.where(s == 0, torch.zeros_like(m), m / torch.where(s == 0, 1.0, s))


def confident(torch, merged, threshold):
  label = merged.argmax(-1)
  if threshold:
    label = torch.where(merged.amax(-1) >= threshold, label, torch.full_like(label, 255))
  return label


def seg_loss(torch, logits, target):
  """ToCo's ``get_seg_loss`` (``logits`` NCHW), an empty set counting 0."""
  logp = torch.log_softmax(logits, dim=1)
  nll = -logp.gather(1, target.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
  bg, fg = target == 0, (target != 0) & (target != 255)
  def mean(mask):
    return (nll * mask).sum() / mask.sum().clamp(min=1)
  return 0.5 * (mean(bg) + mean(fg))


def ptc_loss(torch, feats, tokens):
  """ToCo's ``get_masked_ptc_loss`` with the batch-wide counts."""
  f = torch.nn.functional.normalize(feats, dim=-1, eps=1e-8)
  sim = torch.abs(f @ f.transpose(1, 2))
  n = tokens.shape[1]
  same = tokens[:, :, None] == tokens[:, None, :]
  bad = (tokens[:, :, None] == 255) | (tokens[:, None, :] == 255) | torch.eye(
      n, dtype=torch.bool)[None]
  pos, neg = same & ~bad, ~same & ~bad
  return (0.5 * (1 - (sim * pos).sum() / (pos.sum() + 1))
          + 0.5 * (sim * neg).sum() / (neg.sum() + 1))


def loss_fn(torch, net, o, batch, step: int):
  """``(loss, parts)`` of one APC step, as ``APCMethod._loss``."""
  F = torch.nn.functional
  images = batch["image"]                                   # NHWC 0..255
  labels = batch["labels"]
  x = normalize(torch, images, o.normalization).permute(0, 3, 1, 2).contiguous()
  out = net(x)
  probs = out["probs"]
  loss_cls = keras_bce(torch, pool(torch, probs, o, step), labels)
  loss_reg = o.l2_weight * net.classifier.weight.square().sum()
  loss = loss_cls + loss_reg
  parts = {"loss_cls": loss_cls, "loss_reg": loss_reg}
  size = images.shape[1:3]
  if o.uses_decoder:
    seg = F.interpolate(out["seg_logits"], size=size, mode="bilinear", align_corners=False)
    if o.variant == "supervised":
      parts["loss_seg"] = seg_loss(torch, seg, batch["label"].long())
    elif step >= o.seg_warmup_steps:  # as ours: no pseudo-labels before the warm-up ends
      with torch.no_grad():
        merged = merge(torch, probs.detach(), labels).permute(0, 3, 1, 2)
        up = F.interpolate(merged, size=size, mode="bilinear", align_corners=True)
        target = confident(torch, up.permute(0, 2, 3, 1), o.pseudo_threshold)
      parts["loss_seg"] = seg_loss(torch, seg, target)
    else:
      parts["loss_seg"] = seg.sum() * 0.0
    loss = loss + o.seg_weight * parts["loss_seg"]
  if o.uses_pcl:
    feats = out["features"] if o.pcl_features == "features" else out["grid"]
    b, h, w, d = feats.shape
    with torch.no_grad():
      tokens = confident(torch, merge(torch, probs.detach(), labels),
                         o.pcl_threshold).reshape(b, h * w)
    parts["loss_pcl"] = ptc_loss(torch, feats.reshape(b, h * w, d), tokens)
    loss = loss + float(step >= o.pcl_warmup_steps) * o.pcl_weight * parts["loss_pcl"]
  return loss, parts


def optimizer(torch, net, config):
  """The config's optimizer family with its base rate (schedules are not timed)."""
  opt = config.optimizer
  lr = float(opt.lr)
  heads = [p for n, p in net.named_parameters() if not n.startswith("vit.")]
  body = [p for n, p in net.named_parameters() if n.startswith("vit.")]
  if opt.name == "adamw":
    mult = 10.0 if opt.get("groups") else 1.0
    return torch.optim.AdamW([{"params": body, "lr": lr}, {"params": heads, "lr": lr * mult}],
                             lr=lr, betas=(opt.get("b1", 0.9), opt.get("b2", 0.999)),
                             weight_decay=float(opt.get("weight_decay", 0.01)))
  return torch.optim.Adam(net.parameters(), lr=lr)


def run_torch(config, batch_np: dict[str, np.ndarray], *, steps: int, warmup: int,
              threads: int, device: str = "cpu", step: int | None = None,
              bench=None) -> dict[str, Any]:
  """Times ``steps`` torch train steps on ``batch_np`` (after ``warmup``), as
  ``contrastjax.benchmark.run_reference`` does for ConDSeg. ``step`` is the training
  step the losses see (default: past every warm-up, so every term is computed);
  ``bench`` the module with the timing helpers (default ``contrastjax.benchmark``)."""
  if bench is None:
    from contrastjax import benchmark as bench  # pylint: disable=import-outside-toplevel
  B = bench  # noqa: N806
  torch, memory, device = B.counterpart_setup(device, threads)
  o = _options(config)
  net = build(config).to(device)
  opt = optimizer(torch, net, config)
  batch = {k: torch.from_numpy(np.asarray(v, np.float32 if k != "label" else np.int64)
                               ).to(device)
           for k, v in batch_np.items() if k in ("image", "labels", "label")}
  if step is None:
    step = max(o.seg_warmup_steps, o.pcl_warmup_steps, o.akp_warmup_steps)
  cuda = device.startswith("cuda")
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)
  losses = []

  # bfloat16 configs: autocast (the usual PyTorch mixed precision; weights stay float32
  # as ours do).
  low = str(config.model.get("dtype", "float32")) == "bfloat16"
  autocast = (lambda: torch.autocast(device_type="cuda" if cuda else "cpu",
                                     dtype=torch.bfloat16)) if low else contextlib.nullcontext

  def one():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss, _ = loss_fn(torch, net, o, batch, step)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))

  out = B.time_torch_steps(torch, one, net, steps=steps, warmup=warmup,
                           batch_size=batch_np["image"].shape[0], device=device,
                           memory=memory, label="torch APC")
  out.update(losses=losses, counterpart="benchmarks/apc_torch.py", autocast_bfloat16=low)
  return out
