"""Devices, meshes and host <-> global arrays.

One mesh over every device of every process with a ``data`` axis (and room for a
``model`` axis). Parameters and optimizer state are replicated (``P()``); batches are
sharded along their leading axis over ``data``. Under ``jax.jit`` with a data-sharded
batch, BatchNorm statistics are computed over the global batch (SyncBN for free).

Multi-host (Cloud TPU VM slices, Slurm, several GPU nodes): every process runs the same
command; ``maybe_initialize_distributed`` joins them with ``jax.distributed.initialize``
and each process reads its own shard of the data, which
``jax.make_array_from_process_local_data`` assembles into global arrays.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from contrastjax.errors import ConfigError

P = jax.sharding.PartitionSpec
DATA_AXIS = "data"


def _launched_multi_process() -> bool:
  """True when the environment says this is one process of a multi-process job."""
  if os.environ.get("CONTRASTJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # Multi-host Cloud TPU slices expose the worker hostnames to every worker.
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True
  return False


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when this is a multi-process launch.

  With explicit arguments (or ``CONTRASTJAX_COORDINATOR``/``CONTRASTJAX_NUM_PROCESSES``/
  ``CONTRASTJAX_PROCESS_ID``) it joins that cluster; on TPU VMs, Slurm and Open MPI
  every argument is auto-detected. Returns True if it initialised.
  """
  coordinator_address = coordinator_address or os.environ.get("CONTRASTJAX_COORDINATOR")
  if num_processes is None and "CONTRASTJAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["CONTRASTJAX_NUM_PROCESSES"])
  if process_id is None and "CONTRASTJAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["CONTRASTJAX_PROCESS_ID"])
  explicit = coordinator_address is not None
  if not explicit and not _launched_multi_process():
    return False
  if jax.distributed.is_initialized():
    return True
  # CPU collectives across processes (tests on loopback, CPU-only clusters) need gloo;
  # the setting only concerns the CPU backend, so it is harmless on GPU/TPU.
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs: dict[str, Any] = {}
  if explicit:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(mesh_axes: Sequence[tuple[str, int]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the device mesh, by default ``[("data", -1)]`` over all devices.

  ``mesh_axes`` is a list of ``(name, size)`` pairs; one size may be ``-1`` (the rest).
  Axes are ``Explicit``-typed as ``jax.make_mesh`` makes them.
  """
  devices = list(jax.devices() if devices is None else devices)
  mesh_axes = list(mesh_axes or [(DATA_AXIS, -1)])
  names = [str(n) for n, _ in mesh_axes]
  sizes = [int(s) for _, s in mesh_axes]
  if DATA_AXIS not in names:
    raise ConfigError(f"config.mesh={mesh_axes!r} must contain a {DATA_AXIS!r} axis")
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh={mesh_axes!r}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"config.mesh={mesh_axes!r} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(
        f"config.mesh={mesh_axes!r} has {int(np.prod(sizes))} devices but "
        f"{len(devices)} are available")
  return jax.make_mesh(tuple(sizes), tuple(names), devices=devices,
                       axis_types=(jax.sharding.AxisType.Explicit,) * len(names))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over ``data``; the rest replicated."""
  return jax.sharding.NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


def num_data_shards(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape[DATA_AXIS]


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, what: str) -> int:
  """Validates a global batch size and returns the per-process batch size."""
  n = num_data_shards(mesh)
  if global_batch_size % n:
    raise ConfigError(
        f"{what}={global_batch_size} must be divisible by the {n} devices of the "
        f"mesh's {DATA_AXIS!r} axis")
  if global_batch_size % jax.process_count():
    raise ConfigError(
        f"{what}={global_batch_size} must be divisible by the {jax.process_count()} "
        "processes")
  return global_batch_size // jax.process_count()


def host_to_global(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Turns this process's numpy batch (a pytree) into global, data-sharded arrays."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def global_to_local(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Returns this process's rows of data-sharded arrays as numpy (inverse of
  ``host_to_global``); replicated arrays come back whole."""
  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_replicated or jax.process_count() == 1:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        x, mesh, P(DATA_AXIS)))
  return jax.tree.map(one, tree)


def process_sum(tree: Any) -> Any:
  """Sums a pytree of host numpy values over processes (identity on one process)."""
  if jax.process_count() == 1:
    return tree
  gathered = multihost_utils.process_allgather(tree)
  return jax.tree.map(lambda x: np.asarray(x).sum(axis=0), gathered)


def process_any(flag: bool) -> bool:
  """True if ``flag`` is True on any process."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag))).any())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host pytree on every device (replicated)."""
  return jax.device_put(tree, replicated(mesh))


# ----------------------------------------------------------------------------- explicit sharding
def explicit_mesh_active() -> bool:
  """True when traced under a mesh with explicit axes (the spine's jitted steps)."""
  mesh = jax.sharding.get_abstract_mesh()
  return (not mesh.empty) and any(t == jax.sharding.AxisType.Explicit
                                  for t in mesh.axis_types)


def auto_axes(fn, out_spec):
  """``fn`` traced with GSPMD sharding propagation (``jax.sharding.auto_axes``) when
  called under an explicit-axes mesh; unchanged otherwise. For model code that reshapes
  batch-sharded activations in ways explicit sharding cannot type (e.g. attention
  heads); the numbers are the same."""
  def wrapped(*args):
    if not explicit_mesh_active():
      return fn(*args)
    return jax.sharding.auto_axes(fn, out_sharding=out_spec)(*args)
  return wrapped


def gathered(x: jax.Array) -> jax.Array:
  """``x`` replicated on every device under an explicit mesh (an all-gather of its
  batch-sharded rows); unchanged otherwise."""
  if not explicit_mesh_active():
    return x
  return jax.sharding.reshard(x, P(*([None] * x.ndim)))


def sharded_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` (replicated, same shape as ``like``) laid out like ``like`` under an explicit
  mesh; unchanged otherwise."""
  if not explicit_mesh_active():
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding.spec)

