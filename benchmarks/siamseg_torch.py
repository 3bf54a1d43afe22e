"""The PyTorch counterpart of contrastjax's SiamSeg train step, for side-by-side timing.

Not part of the package (``python -m contrastjax.benchmark --config=configs/siamseg_loveda.py
--torch`` loads it from here). The same computation as ``contrastjax/methods/siamseg.py``
(``SiamSegMethod._terms``, then the update and ``post_update``), written as the reference
(github.com/woldier/SiamSeg, mmseg 0.21 + DACS) computes it:

* the network: ``transformers.SegformerModel`` (the MiT encoder: exact GELU, LayerNorm eps
  1e-6, stochastic depth) under ``model.backbone``; the DAFormer head with separable-ASPP
  fusion in mmseg's module names under ``model.decode_head`` (``embed_layers.N.proj``,
  ``fuse_layer.aspp_modules.N.{depthwise,pointwise}_conv.{conv,bn}``,
  ``fuse_layer.bottleneck``, ``conv_seg``, ``Dropout2d``); the SimSiam projector and
  predictor as the reference's ``nn.Sequential`` under ``contras_model.{fc,predictor}``;
* the step, in the reference's order with one ``backward()`` per loss: the source CE; the
  EMA teacher's pseudo-labels and confidence weight, ClassMix per image, DACS's strong
  augmentation (kornia ``ColorJitter`` and ``GaussianBlur2d``, as ``dacs_transforms.py``)
  and the weighted CE on the mixed images; SimSiam on two kornia-augmented views of the
  target images through the shared backbone; then AdamW (the decode head at 10x the rate,
  no decay on the encoder's norms) and the EMA teacher update
  ``alpha_t = min(1 - 1/(t + 1), alpha)``.

``loss_fn`` takes the random draws (the ClassMix masks, the strong augmentation's switch,
the two SimSiam views) from its caller when given, so that ``tests/test_siamseg_torch.py``
can feed it ours and check the first step's loss terms and gradients from the same
weights (:func:`jax_params_from_torch`, through the package's SiamSeg checkpoint import);
when timing, it draws them itself with kornia and NumPy as the reference does.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import numpy as np

from contrastjax.augment import views
from contrastjax.augment.views import IMAGENET_MEAN, IMAGENET_STD  # 0..255 scale
from contrastjax.methods.siamseg_losses import IGNORE_INDEX


def _torch():
  import torch  # pylint: disable=import-outside-toplevel
  return torch


def _options(config):
  from contrastjax.methods import siamseg  # pylint: disable=import-outside-toplevel
  from contrastjax.methods import options  # pylint: disable=import-outside-toplevel
  return options.parse(siamseg.SiamSegOptions, config.siamseg, "config.siamseg")


def _mit_kwargs(config) -> dict[str, Any]:
  """The MiT encoder's hyper-parameters: ``mit.CONFIGS[variant]`` and the config's
  ``model.backbone`` overrides."""
  from contrastjax.models import mit  # pylint: disable=import-outside-toplevel
  m = config.model
  fields = mit.MixVisionTransformer.__dataclass_fields__
  kw = {k: fields[k].default for k in ("num_heads", "sr_ratios", "patch_sizes", "strides",
                                       "mlp_ratio")}
  kw.update(mit.CONFIGS[m.get("variant", "b5")])
  kw.update({k: (tuple(v) if isinstance(v, (list, tuple)) else v)
             for k, v in dict(m.get("backbone", {}) or {}).items()})
  return kw


def build(config, seed: int = 0):
  """The student network of ``config`` (``nn.Module`` in train mode, mmseg/SiamSeg names)."""
  torch = _torch()
  import transformers  # pylint: disable=import-outside-toplevel
  nn = torch.nn
  functional = torch.nn.functional
  o = _options(config)
  m = config.model
  if m.get("fusion", "sep_aspp") != "sep_aspp":
    raise ValueError(f"config.model.fusion={m.fusion!r}: the counterpart builds the "
                     "reference's 'sep_aspp' head")
  kw = _mit_kwargs(config)
  widths = list(kw["embed_dims"])
  embed = int(m.get("embed_dims", 256))
  channels = int(m.get("channels", 256))
  dim = int(m.get("simsiam_dim", 2048))
  torch.manual_seed(seed)
  encoder = transformers.SegformerModel(transformers.SegformerConfig(
      num_channels=3, num_encoder_blocks=4, depths=list(kw["depths"]), hidden_sizes=widths,
      num_attention_heads=list(kw["num_heads"]), sr_ratios=list(kw["sr_ratios"]),
      patch_sizes=list(kw["patch_sizes"]), strides=list(kw["strides"]),
      mlp_ratios=[int(kw["mlp_ratio"])] * 4,
      hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      drop_path_rate=float(m.get("drop_path_rate", 0.1)), layer_norm_eps=1e-6))

  class ConvModule(nn.Module):   # mmcv ConvModule: conv (no bias) -> BN -> ReLU
    def __init__(self, cin, cout, k=1, dilation=1, groups=1):
      super().__init__()
      pad = dilation * (k - 1) // 2
      self.conv = nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, groups=groups,
                            bias=False)
      self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
      return functional.relu(self.bn(self.conv(x)))

  class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, dilation):
      super().__init__()
      self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
      self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
      return self.pointwise_conv(self.depthwise_conv(x))

  class ASPPWrapper(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.aspp_modules = nn.ModuleList(
          [ConvModule(cin, channels, 1)]
          + [DepthwiseSeparable(cin, channels, d) for d in (6, 12, 18)])
      self.bottleneck = ConvModule(4 * channels, channels, 3)

    def forward(self, x):
      return self.bottleneck(torch.cat([a(x) for a in self.aspp_modules], dim=1))

  class MLP(nn.Module):
    def __init__(self, cin):
      super().__init__()
      self.proj = nn.Linear(cin, embed)

    def forward(self, x):
      b, _, h, w = x.shape
      return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, embed, h, w)

  class DAFormerHead(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_layers = nn.ModuleDict({str(i): MLP(c) for i, c in enumerate(widths)})
      self.fuse_layer = ASPPWrapper(4 * embed)
      self.dropout = nn.Dropout2d(float(m.get("dropout_ratio", 0.1)))
      self.conv_seg = nn.Conv2d(channels, o.num_classes, 1)

    def forward(self, features):
      size = features[0].shape[2:]
      embedded = []
      for i, f in enumerate(features):
        e = self.embed_layers[str(i)](f)
        if e.shape[2:] != size:
          e = functional.interpolate(e, size=size, mode="bilinear", align_corners=False)
        embedded.append(e)
      return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))

  class Segmentor(nn.Module):   # mmseg EncoderDecoder
    def __init__(self):
      super().__init__()
      self.backbone = encoder
      self.decode_head = DAFormerHead()

    def features(self, x):
      return list(self.backbone(x, output_hidden_states=True).hidden_states)

    def forward(self, x):
      return self.decode_head(self.features(x))

  class SimSiam(nn.Module):   # simsiam.py: fc and predictor
    def __init__(self, width):
      super().__init__()
      self.fc = nn.Sequential(
          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, width, bias=False),
          nn.BatchNorm1d(width), nn.ReLU(inplace=True), nn.Linear(width, dim, bias=False),
          nn.BatchNorm1d(dim), nn.ReLU(inplace=True))
      self.predictor = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim),
                                     nn.ReLU(inplace=True), nn.Linear(dim, dim))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.model = Segmentor()
      if o.variant == "siamseg":
        self.contras_model = SimSiam(widths[-1])

    def forward(self, x):
      return self.model(x)

    def simsiam(self, q, k):
      """``(p1, p2, z1, z2)``: both views through the backbone at once (it has no
      batch-coupled layers), the projector and predictor per view."""
      n = q.shape[0]
      stage4 = self.model.features(torch.cat([q, k]))[-1]
      z1, z2 = self.contras_model.fc(stage4[:n]), self.contras_model.fc(stage4[n:])
      p1, p2 = self.contras_model.predictor(z1), self.contras_model.predictor(z2)
      return p1, p2, z1.detach(), z2.detach()

  return Net().train()


def make_teacher(net):
  """The EMA teacher: a copy of the segmentor, BatchNorm on batch statistics, no dropout
  or stochastic depth (as ours: ``contrastjax.methods.dacs.EMATeacher``)."""
  torch = _torch()
  teacher = copy.deepcopy(net.model)
  for p in teacher.parameters():
    p.requires_grad_(False)
  teacher.train()
  for module in teacher.modules():
    if isinstance(module, torch.nn.Dropout2d) or type(module).__name__.endswith("DropPath"):
      module.eval()
  return teacher


def jax_params_from_torch(net, variables) -> dict[str, Any]:
  """The torch student's weights as ``SiamSegNet`` variables (through
  ``contrastjax.models.daformer.load``: the encoder in Hugging Face names, the head and
  SimSiam in the reference's)."""
  from contrastjax.models import daformer  # pylint: disable=import-outside-toplevel
  state = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()
           if not k.endswith("num_batches_tracked")}
  kwargs = {} if "contrast" in variables["params"] else {"contrast_prefix": None}
  new, _ = daformer.load(variables, state, **kwargs)
  return new


# ----------------------------------------------------------------------------- losses
def seg_ce(torch, logits, labels, class_weight=None, pixel_weight=None):
  """mmseg 0.21 ``CrossEntropyLoss`` on logits upsampled to the labels (mean over all
  pixels, ignored ones counted as 0)."""
  functional = torch.nn.functional
  up = functional.interpolate(logits, size=labels.shape[1:], mode="bilinear",
                              align_corners=False)
  loss = functional.cross_entropy(up, labels, weight=class_weight, reduction="none",
                                  ignore_index=IGNORE_INDEX)
  if pixel_weight is not None:
    loss = loss * pixel_weight
  return loss.mean()


def cosine(torch, a, b, eps=1e-8):
  """``nn.CosineSimilarity`` as the reference's torch 1.10 computes it (ours too)."""
  dot = (a * b).sum(-1)
  return dot * torch.rsqrt(torch.clamp_min((a * a).sum(-1) * (b * b).sum(-1), eps * eps))


def simsiam_loss(torch, p1, p2, z1, z2):
  return -0.5 * (cosine(torch, p1, z2).mean() + cosine(torch, p2, z1).mean())


def class_mix_masks(torch, labels, rng: np.random.Generator):
  """DACS ``get_class_masks`` per image (the reference code): half of the classes present
  in each source label, chosen at random."""
  masks = []
  for label in labels:
    classes = torch.unique(label)
    classes = classes[classes != IGNORE_INDEX]
    n = classes.shape[0]
    chosen = classes[torch.from_numpy(rng.choice(n, (n + n % 2) // 2, replace=False))]
    masks.append((label.unsqueeze(-1) == chosen).any(-1).float())
  return torch.stack(masks)


def strong_augment(torch, images, o, rng: np.random.Generator):
  """DACS ``color_jitter`` + ``gaussian_blur`` (kornia), batch-wide switches as ours;
  ``o``: the ``SiamSegOptions``."""
  import kornia  # pylint: disable=import-outside-toplevel
  mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
  if rng.uniform() > o.color_jitter_probability:
    s = o.color_jitter_strength
    x = (images * std + mean) / 255.0
    x = kornia.augmentation.ColorJitter(s, s, s, s, p=1.0)(x)
    images = (x * 255.0 - mean) / std
  if o.blur and rng.uniform() > 0.5:
    sigma = float(rng.uniform(0.15, 1.15))
    size = tuple(views.blur_kernel_size(n) for n in images.shape[2:])
    images = kornia.filters.GaussianBlur2d(size, (sigma, sigma))(images)
  return images


def simsiam_views(torch, images, o):
  """Two SimSiam views (``sim_aug_transform``) with kornia, draws per image; the
  parameters are ours (``views.simsiam_view``'s defaults and ``o.views``)."""
  import kornia  # pylint: disable=import-outside-toplevel
  k = kornia.augmentation
  v = {name: p.default for name, p in inspect.signature(views.simsiam_view).parameters.items()
       if p.default is not inspect.Parameter.empty and name not in ("mean", "std")}
  v.update(dict(o.views))
  h, w = images.shape[2:]
  s = v["color_jitter_strength"]
  blur_size = views.blur_kernel_size(h)
  aug = torch.nn.Sequential(
      k.RandomResizedCrop((h, w), scale=tuple(v["crop_scale"])),
      k.ColorJitter(s, s, s, s, p=v["color_jitter_p"]),
      k.RandomGrayscale(p=v["grayscale_p"]),
      k.RandomGaussianBlur((blur_size, blur_size), (0.15, 1.15), p=v["blur_p"]),
      k.RandomHorizontalFlip(p=v["flip_p"]), k.RandomVerticalFlip(p=v["flip_p"]))
  return aug(images), aug(images)


def _ema_step(torch, teacher, student, step: int, alpha: float) -> None:
  a = min(1.0 - 1.0 / (step + 1), alpha)
  with torch.no_grad():
    for t, s in zip(teacher.parameters(), student.model.parameters()):
      t.mul_(a).add_(s.detach(), alpha=1.0 - a)


def loss_terms(torch, net, teacher, o, batch, draws=None, rng=None):
  """The step's loss terms as functions, in the reference's order: calling each runs its
  forward pass and returns ``(value, parts)`` (the caller back-propagates it before calling
  the next). ``draws`` (``{'mask', 'strong': callable, 'views': (q, k)}``) replaces the
  random ClassMix masks, strong augmentation and SimSiam views; without it they are drawn
  with ``rng`` (NumPy) and kornia."""
  xs, ys, xt = batch["source_image"], batch["source_label"], batch["target_image"]
  class_weight = (None if o.class_weight is None
                  else torch.tensor(o.class_weight, dtype=torch.float32, device=xs.device))

  def source():
    loss = seg_ce(torch, net(xs), ys, class_weight)
    return loss, {"loss_src": loss}

  terms = [source]
  if o.variant == "source_only":
    return terms

  def mix():
    functional = torch.nn.functional
    with torch.no_grad():
      t_logits = functional.interpolate(teacher(xt), size=xt.shape[2:], mode="bilinear",
                                        align_corners=False)
      prob, pseudo = torch.softmax(t_logits, dim=1).max(dim=1)
      weight = (prob >= o.pseudo_threshold).float().mean()
      mask = draws["mask"] if draws else class_mix_masks(torch, ys, rng)
      m4 = mask.unsqueeze(1)
      mixed = m4 * xs + (1 - m4) * xt
      mixed = draws["strong"](mixed) if draws else strong_augment(torch, mixed, o, rng)
      mixed_label = torch.where(mask > 0, ys, pseudo)
      mixed_weight = mask + (1 - mask) * weight
    loss = seg_ce(torch, net(mixed), mixed_label, class_weight, mixed_weight)
    return loss, {"loss_mix": loss, "pseudo_weight": weight}

  terms.append(mix)
  if o.variant != "siamseg":
    return terms

  def contrast():
    q, k = draws["views"] if draws else simsiam_views(torch, xt, o)
    loss = simsiam_loss(torch, *net.simsiam(q, k))
    return o.contrastive_weight * loss, {"loss_contrastive": loss}

  terms.append(contrast)
  return terms


def optimizer(torch, net, config):
  """AdamW as mmcv's constructor builds it for the reference: ``head`` x10 rate, no decay
  on the encoder's LayerNorms except the stage-final ones."""
  opt = config.optimizer
  lr = float(opt.lr)
  wd = float(opt.get("weight_decay", 0.01))
  head, no_decay, rest = [], [], []
  for name, p in net.named_parameters():
    if ".decode_head." in name:
      head.append(p)
    elif "layer_norm" in name and "encoder.layer_norm." not in name:
      no_decay.append(p)
    else:
      rest.append(p)
  return torch.optim.AdamW(
      [{"params": head, "lr": lr * 10.0}, {"params": no_decay, "weight_decay": 0.0},
       {"params": rest}],
      lr=lr, betas=(float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999))),
      eps=float(opt.get("eps", 1e-8)), weight_decay=wd)


def torch_batch(torch, batch_np, device: str = "cpu"):
  """Our ``{'source': {image, label}, 'target': {image}}`` NHWC batch as NCHW tensors."""
  def image(x):
    return torch.from_numpy(np.ascontiguousarray(
        np.asarray(x, np.float32).transpose(0, 3, 1, 2))).to(device)
  return {"source_image": image(batch_np["source"]["image"]),
          "source_label": torch.from_numpy(np.asarray(batch_np["source"]["label"],
                                                      np.int64)).to(device),
          "target_image": image(batch_np["target"]["image"])}


def run_torch(config, batch_np, *, steps: int, warmup: int, threads: int,
              device: str = "cpu", bench=None) -> dict[str, Any]:
  """Times ``steps`` torch train steps on ``batch_np`` (after ``warmup``): each loss's
  ``backward()`` in turn, ``opt.step()``, the EMA update."""
  if bench is None:
    from contrastjax import benchmark as bench  # pylint: disable=import-outside-toplevel
  torch, memory, device = bench.counterpart_setup(device, threads)
  o = _options(config)
  net = build(config).to(device)
  teacher = make_teacher(net) if o.variant != "source_only" else None
  opt = optimizer(torch, net, config)
  batch = torch_batch(torch, batch_np, device)
  rng = np.random.default_rng(0)
  cuda = device.startswith("cuda")
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)
  low = str(config.model.get("dtype", "float32")) == "bfloat16"
  losses, count = [], [0]

  def one():
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for term in loss_terms(torch, net, teacher, o, batch, rng=rng):
      if low:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
          value, _ = term()
      else:
        value, _ = term()
      value.backward()
      total += float(value.detach())
    opt.step()
    if teacher is not None:
      _ema_step(torch, teacher, net, count[0] + 1, o.alpha)   # as post_update(step)
    count[0] += 1
    losses.append(total)

  out = bench.time_torch_steps(torch, one, net, steps=steps, warmup=warmup,
                               batch_size=batch_np["source"]["image"].shape[0],
                               device=device, memory=memory, label="torch SiamSeg")
  out.update(losses=losses, counterpart="benchmarks/siamseg_torch.py", autocast_bfloat16=low)
  return out
