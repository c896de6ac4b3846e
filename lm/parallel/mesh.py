"""The (data, fsdp, tensor) device mesh from config, and the checks that need the device count."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

from lm.config import ConfigError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves the one -1 axis so that data*fsdp*tensor equals the device count."""
  sizes = [mesh_cfg[a] for a in AXES]
  sizes[0] *= mesh_cfg.dcn_data if sizes[0] != -1 else 1
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
        f"config.mesh: the fixed axes multiply to {known}, which does not divide the "
        f"{num_devices} devices; change mesh.data/fsdp/tensor"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"config.mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are "
      "available; set mesh.fsdp=-1 to fill"
    )
  return tuple(sizes)


def init_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  heartbeat_timeout: int = 100,
) -> None:
  """Joins this process to a multi-process job; call before any other JAX use. Arguments left
  None are detected (TPU VM pod slices, SLURM, Open MPI). A process silent for
  `heartbeat_timeout` seconds (killed, out of memory, a lost host) makes JAX's coordination
  service end every other process with an error, instead of leaving them in a collective."""
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout
  )
  index, count = jax.process_index(), jax.process_count()
  # Flushed now: a file-buffered stdout would otherwise land after a later stderr error line.
  print(f"process {index} of {count}: {jax.local_device_count()} local devices", flush=True)


def make_mesh(
  mesh_cfg: ml_collections.ConfigDict, devices: list | None = None
) -> jax.sharding.Mesh:
  """Auto axes: GSPMD propagates shardings from our in/out shardings and constraints."""
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  if mesh_cfg.dcn_data > 1:
    # `data` spans slices over DCN; fsdp and tensor stay inside a slice (ICI).
    ici = (shape[0] // mesh_cfg.dcn_data, shape[1], shape[2])
    # TPU slices name themselves (device.slice_index); elsewhere (GPU hosts, the local
    # multi-process tests) each process is one granule of the DCN axis.
    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = {d.process_index for d in devices}
    if mesh_cfg.dcn_data not in (len(slices), len(processes)):
      raise ConfigError(
        f"config.mesh.dcn_data: {mesh_cfg.dcn_data}, but the devices form {len(slices)} "
        f"slice(s) in {len(processes)} process(es); set it to one of those"
      )
    grid = mesh_utils.create_hybrid_device_mesh(
      ici,
      (mesh_cfg.dcn_data, 1, 1),
      devices,
      process_is_granule=len(slices) != mesh_cfg.dcn_data,
    )
  else:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(
    np.asarray(grid), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES)
  )


def check_batch_divisibility(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Training's batch must split evenly over the batch axes and microbatches."""
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = cfg.train.global_batch_size
  if rows % (batch_shards * cfg.train.microbatches):
    raise ConfigError(
      f"config.train.global_batch_size: {rows} is not divisible by data*fsdp*microbatches = "
      f"{batch_shards}*{cfg.train.microbatches}; use a multiple of "
      f"{batch_shards * cfg.train.microbatches}"
    )


def check_divisibility(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Errors of the model's layout that need the mesh, raised before anything compiles."""
  tensor = mesh.shape["tensor"]
  if cfg.model.num_heads % tensor:
    raise ConfigError(
      f"config.model.num_heads: {cfg.model.num_heads} is not divisible by mesh.tensor="
      f"{tensor}; choose a tensor size that divides the heads"
    )
  if cfg.model.mlp_dim % tensor:
    raise ConfigError(
      f"config.model.mlp_dim: {cfg.model.mlp_dim} is not divisible by mesh.tensor={tensor}"
    )


VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, mesh: jax.sharding.Mesh) -> int:
  """The vocab rounded up to a multiple of 128 (and of the tensor axis).

  A fixed multiple rather than the tensor size alone keeps checkpoints restorable on any
  mesh with tensor <= 128, and suits TPU/GPU tiles.
  """
  multiple = math.lcm(VOCAB_MULTIPLE, mesh.shape["tensor"])
  return -(-vocab_size // multiple) * multiple
