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
    enable = _env_allows_cpu_flags()
  if not enable:
    return
  _warn_if_backend_started()
  flags = os.environ.get("XLA_FLAGS", "")
  for f in CPU_XLA_FLAGS:
    name = f.split("=")[0]
    if name not in flags:
      flags = (flags + " " + f).strip()
  os.environ["XLA_FLAGS"] = flags


def configure_cpu_for(config) -> bool:
  """``configure_cpu`` as a run's config asks: its ``xnn_fusion`` key (default True)
  and ``CONTRASTJAX_CPU_FLAGS`` must both allow the flags. Returns whether they are set.

  XNNPACK graph fusion pays for large convolutions (ResNet-50 at 256x256: 2.3 s instead
  of 5.1 s per step) but costs small ones: the 64x64 ConDSeg demo steps in 0.25 s with
  it and 0.20 s without (BENCHMARKS.md), so the demo config turns it off.
  """
  enable = bool(config.get("xnn_fusion", True)) and _env_allows_cpu_flags()
  configure_cpu(enable)
  return enable


def _env_allows_cpu_flags() -> bool:
  return os.environ.get("CONTRASTJAX_CPU_FLAGS", "1").lower() not in ("0", "false", "no")


def _warn_if_backend_started() -> None:
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" not in sys.modules:
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn("contrastjax.platform.configure_cpu: the JAX backend has already "
                  "started, so XLA_FLAGS changes take no effect in this process",
                  RuntimeWarning, stacklevel=3)


DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "contrastjax", "xla")


def configure_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache for the command-line tools.

  Compiling a train step takes from a minute (the CPU demo) to many minutes (MiT-B5 on
  a TPU); with the cache, a rerun, a resume after preemption or ``evaluate`` after
  ``train`` loads the executables instead. The directory is, in order: the user's own
  ``--jax_compilation_cache_dir`` / ``$JAX_COMPILATION_CACHE_DIR``,
  ``$CONTRASTJAX_COMPILATION_CACHE``, else ``~/.cache/contrastjax/xla``;
  ``CONTRASTJAX_COMPILATION_CACHE=0`` turns it off. Call after JAX's flags are parsed
  and before the first compilation. Returns the directory in use ('' when off).
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  setting = os.environ.get("CONTRASTJAX_COMPILATION_CACHE", "")
  if setting.lower() in ("0", "false", "no", "off"):
    return ""
  path = setting or DEFAULT_CACHE_DIR
  if "://" not in path:  # gs://... etc. are handled by JAX itself
    path = os.path.expanduser(path)
    try:
      os.makedirs(path, exist_ok=True)
    except OSError:
      return ""  # read-only home etc.: run uncached rather than fail
  jax.config.update("jax_compilation_cache_dir", path)
  return path
