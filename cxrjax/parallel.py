"""Device mesh, logical-axis sharding rules and multi-process start-up.

All sharding decisions live here. Parameters are annotated with logical axis names in the
model code (`embed`, `mlp`, `heads`, ...); `RULES` maps each name to mesh axes in one table
(MaxText style), so changing the parallelism layout never touches the model.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxrjax.config_lib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
# `batch` is data-parallel over both data and fsdp: fsdp shards parameters *and* the batch.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),    # prototype / vocabulary dimension of large heads (DINO, iBOT)
    ("patch", None),
    ("classes", None),
)


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when launched as one of several processes.

  Which environment starts it (checked in this order):
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
                             explicit (launch/local_multiprocess.sh, any cluster);
    SLURM_NTASKS > 1         SLURM (jax reads the node list and task ids itself);
    TPU_WORKER_HOSTNAMES or CXRJAX_DISTRIBUTED=1
                             TPU pods / other clusters that jax detects (launch/tpu_pod.sh).
  Returns whether it initialised. Must run before anything touches a device.
  """
  explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  auto = bool(os.environ.get("TPU_WORKER_HOSTNAMES")) or os.environ.get(
      "CXRJAX_DISTRIBUTED", "") == "1"
  if not (explicit or slurm or auto):
    return False
  if explicit:
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ConfigError(f"JAX_COORDINATOR_ADDRESS={explicit!r} is set but {missing} are not; "
                        "set all three (see launch/local_multiprocess.sh)")
    try:
      num, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except ValueError as e:
      raise ConfigError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {e}") from e
    if not 0 <= index < num:
      raise ConfigError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={num})")
  # CPU processes need a cross-process collectives backend (the TPU/GPU ones are built in);
  # setting it is harmless on accelerators.
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=explicit, num_processes=num,
                               process_id=index)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def process_index_and_count() -> tuple[int, int]:
  """This process's index and the process count, without starting JAX's backends."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  state = distributed.global_state
  if state.client is None:
    return 0, 1
  return state.process_id, state.num_processes


_barriers = 0


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process reaches this point (no-op with one process).

  Uses the coordination service, not a device collective: on CPU, Gloo gives a process
  only 30 s to join a collective's first use, and compile times differ by more than that
  between processes (e.g. one hits the compilation cache), so processes meet here first.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  _barriers += 1  # a barrier id is used once
  distributed.global_state.client.wait_at_barrier(f"cxrjax/{_barriers}/{name}",
                                                  timeout_s * 1000)


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the (data, fsdp, tensor) sizes; at most one may be -1 (fill the rest)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))}: each axis must be a positive size, "
        "and at most one may be -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ConfigError(
          f"config.mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
          f"divisible by the fixed axes' product {known}")
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"but {num_devices} are available")
  return tuple(sizes)


def mesh_devices(mesh_cfg: Mapping[str, int]) -> list[jax.Device]:
  """All devices, or the first `num_devices` of this process (single-process only)."""
  wanted = int(mesh_cfg.get("num_devices", 0))
  if wanted <= 0:
    return jax.devices()
  if jax.process_count() > 1 or wanted > jax.local_device_count():
    raise ConfigError(
        f"config.mesh.num_devices={wanted}: only a single process may use a subset of its "
        f"{jax.local_device_count()} local devices (running {jax.process_count()} processes)")
  return jax.local_devices()[:wanted]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; Auto axes, because shardings are given at jit boundaries."""
  devices = list(devices if devices is not None else mesh_devices(mesh_cfg))
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


# ----------------------------------------------------------------------------
# Logical -> mesh.
# ----------------------------------------------------------------------------


def logical_to_mesh_spec(names: Sequence[str | None] | P, shape: Sequence[int] | None = None,
                         mesh: Mesh | None = None, rules=RULES) -> P:
  """Maps logical axis names to a mesh PartitionSpec.

  A dimension that the mapped mesh axes do not divide evenly is replicated instead (e.g.
  3 heads of ViT-Ti on a tensor axis of 4), and a mesh axis is used at most once.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(tuple(names)):
    axes = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule in cxrjax.parallel.RULES "
                     f"({', '.join(n for n, _ in rules)})")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an (abstract) nnx.State, from its logical annotations."""
  specs = nnx.get_partition_spec(abstract_state)

  def to_sharding(variable, spec):
    value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
    spec = spec.get_value() if isinstance(spec, nnx.Variable) else spec
    shape = getattr(value, "shape", ())
    names = tuple(spec) if isinstance(spec, P) else (None,) * len(shape)
    if len(names) < len(shape):
      names = names + (None,) * (len(shape) - len(names))
    return NamedSharding(mesh, logical_to_mesh_spec(names, shape, mesh))

  return jax.tree.map(to_sharding, abstract_state, specs,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Shards the leading (batch) dimension over the data-parallel axes."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Puts this process's part of a global batch on the mesh (numeric arrays only).

  Non-numeric fields (string ids) stay on the host. Works multi-process: each process
  passes its own slice and `make_array_from_process_local_data` assembles the global array.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "OUS":
      continue
    sharding = batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def device_summary(mesh: Mesh) -> str:
  kinds = sorted({d.device_kind for d in mesh.devices.flat})
  return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} {'/'.join(kinds)} device(s), "
          f"{jax.process_count()} process(es)")
