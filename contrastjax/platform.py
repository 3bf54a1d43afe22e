"""Process-level platform settings that must happen before the JAX backend starts."""
from __future__ import annotations

import os

# XLA:CPU runs convolutions faster when XNNPACK fuses whole graphs: a ResNet-50 train
# step (batch 4, 256x256) took 2.3 s instead of 5.1 s on the 2-core development
# machine; at the demo model's size no difference was measurable (BENCHMARKS.md).
# All parity tests (tests/test_models_*.py: torchvision, the reference ConDSeg) run
# with it set by tests/conftest.py. CONTRASTJAX_CPU_FLAGS=0 turns it off.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_xnn_graph_fusion_mode="
                 "XNN_GRAPH_FUSION_MODE_GREEDY",)


def configure_cpu(enable: bool | None = None) -> None:
  """Adds the fast XLA:CPU flags to ``XLA_FLAGS`` unless the user set them.

  Call before JAX initialises its backend. ``CONTRASTJAX_CPU_FLAGS=0`` disables it.
  The flags only concern the CPU backend, so they are harmless on GPU/TPU hosts.
  """
  if enable is None:
    enable = os.environ.get("CONTRASTJAX_CPU_FLAGS", "1").lower() not in ("0", "false", "no")
  if not enable:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  for f in CPU_XLA_FLAGS:
    name = f.split("=")[0]
    if name not in flags:
      flags = (flags + " " + f).strip()
  os.environ["XLA_FLAGS"] = flags
