"""The PyTorch counterpart of contrastjax's CLIP train step, for side-by-side timing.

Not part of the package (``python -m contrastjax.benchmark --config=configs/clip_gap_coco.py
--torch`` loads it from here). The same computation as ``contrastjax/methods/clip.py``'s
``CLIPMethod.loss_fn`` and the trainer's update, written with OpenCLIP and torch:

* the model: ``open_clip.model.CLIP`` with the config's towers (the paper's RN50: OpenCLIP's
  ``ModifiedResNet`` image tower and its causal text ``Transformer``, exact GELU as
  ``RN50.json``), in train mode (BatchNorm on batch statistics, as ours);
* the loss: ``open_clip.loss.ClipLoss`` on the normalised features and
  ``logit_scale.exp()`` (the symmetric InfoNCE of the paper's Eq. 2);
* the update: ``torch.optim.AdamW`` with OpenCLIP's parameter groups (no weight decay on
  1-D parameters and ``logit_scale``; ``logit_scale`` at ``config.temperature_lr_mult`` x
  the rate, as our ``config.optimizer.groups``), then OpenCLIP's clamp of ``logit_scale``
  to ``[log beta_min, log beta_max]`` (our ``project_params``).

Supported: the learned temperature with the ``exp`` parameterisation and no modality
swap (the baseline recipe, the one worth timing: the other recipes change a scalar).
:func:`jax_params_from_torch` copies the torch weights into the JAX variables through the
package's OpenCLIP import (``contrastjax.models.clip.load_openclip``), so both sides start
from the same weights; ``tests/test_clip_torch.py`` checks the first step's loss and
gradients at a small size.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def _torch():
  import torch  # pylint: disable=import-outside-toplevel
  return torch


def _check(config) -> None:
  c, m = config.clip, config.model
  problems = []
  if c.temperature != "learn" or c.parameterization != "exp":
    problems.append(f"config.clip.temperature={c.temperature!r}, parameterization="
                    f"{c.parameterization!r} (the counterpart has the learned exp temperature)")
  if c.get("swap", "none") != "none":
    problems.append(f"config.clip.swap={c.swap!r} (no modality swap in the counterpart)")
  if m.image.name != "modified_resnet" or m.text.name != "transformer":
    problems.append(f"config.model.image.name={m.image.name!r}, text.name={m.text.name!r} "
                    "(the counterpart builds OpenCLIP's modified_resnet + transformer)")
  if problems:
    raise ValueError("the PyTorch CLIP counterpart times the baseline recipe only: "
                     + "; ".join(problems))


def build(config, seed: int = 0):
  """The ``open_clip.model.CLIP`` of ``config`` in train mode."""
  torch = _torch()
  from open_clip import model as oc  # pylint: disable=import-outside-toplevel
  _check(config)
  m = config.model
  image, text = m.image, m.text
  width = int(image.get("width", 64))
  heads = int(image.get("heads", width * 32 // 64))
  vision = oc.CLIPVisionCfg(layers=tuple(image.get("layers", (3, 4, 6, 3))), width=width,
                            head_width=width * 32 // heads,
                            image_size=int(image.get("image_size", 224)))
  text_cfg = oc.CLIPTextCfg(context_length=int(text.get("context_length", 77)),
                            vocab_size=int(text.get("vocab_size", 49408)),
                            width=int(text.get("width", 512)), heads=int(text.get("heads", 8)),
                            layers=int(text.get("layers", 12)),
                            mlp_ratio=float(text.get("mlp_ratio", 4.0)))
  torch.manual_seed(seed)
  net = oc.CLIP(int(m.embed_dim), vision, text_cfg, quick_gelu=False,
                init_logit_scale=math.log(1.0 / float(config.clip.tau_init)))
  return net.train()


def jax_params_from_torch(net, variables, model) -> dict[str, Any]:
  """The torch weights as JAX variables of ``model`` (``contrastjax.models.clip.CLIP``)."""
  from contrastjax.models import clip as clip_model  # pylint: disable=import-outside-toplevel
  state = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
  return clip_model.load_openclip(variables, model, state)


def loss_fn(torch, net, batch):
  """OpenCLIP's forward and ``ClipLoss``; returns ``(loss, logit_scale)``."""
  from open_clip import loss as oc_loss  # pylint: disable=import-outside-toplevel
  image_features, text_features, scale = net(batch["image"], batch["text"])
  return oc_loss.ClipLoss()(image_features, text_features, scale), scale


def optimizer(torch, net, config):
  """AdamW with OpenCLIP's weight-decay exclusions and the temperature's rate multiplier."""
  opt = config.optimizer
  lr = float(opt.lr)
  excluded = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n  # noqa: E731
  scale = [p for n, p in net.named_parameters() if n == "logit_scale"]
  flat = [p for n, p in net.named_parameters() if n != "logit_scale" and excluded(n, p)]
  rest = [p for n, p in net.named_parameters() if n != "logit_scale" and not excluded(n, p)]
  return torch.optim.AdamW(
      [{"params": flat, "weight_decay": 0.0},
       {"params": rest, "weight_decay": float(opt.get("weight_decay", 0.2))},
       {"params": scale, "weight_decay": 0.0,
        "lr": lr * float(config.get("temperature_lr_mult", 1.0))}],
      lr=lr, betas=(float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999))),
      eps=float(opt.get("eps", 1e-8)))


def torch_batch(torch, batch_np: dict[str, np.ndarray], device: str = "cpu"):
  """``image`` NHWC -> NCHW float32, ``text`` int64."""
  return {"image": torch.from_numpy(np.ascontiguousarray(
              np.asarray(batch_np["image"], np.float32).transpose(0, 3, 1, 2))).to(device),
          "text": torch.from_numpy(np.asarray(batch_np["text"], np.int64)).to(device)}


def run_torch(config, batch_np: dict[str, np.ndarray], *, steps: int, warmup: int,
              threads: int, device: str = "cpu", bench=None) -> dict[str, Any]:
  """Times ``steps`` torch train steps on ``batch_np`` (after ``warmup``), as
  ``contrastjax.benchmark.run_reference`` does for ConDSeg; ``bench`` is the module with
  the timing helpers (default ``contrastjax.benchmark``)."""
  if bench is None:
    from contrastjax import benchmark as bench  # pylint: disable=import-outside-toplevel
  torch, memory, device = bench.counterpart_setup(device, threads)
  net = build(config).to(device)
  opt = optimizer(torch, net, config)
  batch = torch_batch(torch, batch_np, device)
  cuda = device.startswith("cuda")
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)
  bounds = (math.log(float(config.clip.beta_min)), math.log(float(config.clip.beta_max)))
  low = str(config.model.get("dtype", "float32")) == "bfloat16"
  losses = []

  def one():
    opt.zero_grad(set_to_none=True)
    if low:
      with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
        loss, _ = loss_fn(torch, net, batch)
    else:
      loss, _ = loss_fn(torch, net, batch)
    loss.backward()
    opt.step()
    with torch.no_grad():   # OpenCLIP's train loop: logit_scale.clamp_(0, ln 100)
      net.logit_scale.clamp_(*bounds)
    losses.append(float(loss.detach()))

  out = bench.time_torch_steps(torch, one, net, steps=steps, warmup=warmup,
                               batch_size=batch_np["image"].shape[0], device=device,
                               memory=memory, label="torch CLIP")
  out.update(losses=losses, counterpart="benchmarks/clip_torch.py", autocast_bfloat16=low)
  return out
