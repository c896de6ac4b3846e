"""The (stage, data, fsdp, tensor) device mesh from config, and the checks that need the device
count."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

from lm.config import ConfigError

# `stage` first: pipeline stages may cross slices (DCN), and stage-major device order keeps each
# stage's (data, fsdp, tensor) devices together.
AXES = ("stage", "data", "fsdp", "tensor")
FILL_AXES = ("data", "fsdp", "tensor")  # the axes one of which may be -1


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the one -1 axis so that stage*data*fsdp*tensor equals the device count."""
  sizes = [mesh_cfg.stage * mesh_cfg.dcn_stage] + [mesh_cfg[a] for a in FILL_AXES]
  sizes[1] *= mesh_cfg.dcn_data if sizes[1] != -1 else 1
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
        f"config.mesh: the fixed axes multiply to {known}, which does not divide the "
        f"{num_devices} devices; change mesh.stage/data/fsdp/tensor"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"config.mesh: stage*data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are "
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
  dcn = (mesh_cfg.dcn_stage, mesh_cfg.dcn_data, 1, 1)
  if math.prod(dcn) > 1:
    # `stage` and `data` span slices over DCN; fsdp and tensor stay inside a slice (ICI).
    ici = tuple(size // d for size, d in zip(shape, dcn))
    # TPU slices name themselves (device.slice_index); elsewhere (GPU hosts, the local
    # multi-process tests) each process is one granule of the DCN axes.
    slices = {getattr(d, "slice_index", 0) for d in devices}
    processes = {d.process_index for d in devices}
    if math.prod(dcn) not in (len(slices), len(processes)):
      field = "dcn_stage" if mesh_cfg.dcn_stage > 1 else "dcn_data"
      raise ConfigError(
        f"config.mesh.{field}: dcn_stage*dcn_data = {math.prod(dcn)}, but the devices form "
        f"{len(slices)} slice(s) in {len(processes)} process(es); make it one of those"
      )
    grid = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=len(slices) != math.prod(dcn)
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
  # Each (data, fsdp) group's rows of a microbatch split into the pipeline's microbatches.
  per_shard = cfg.train.microbatches * pipeline_microbatches(cfg, mesh)
  if rows % (batch_shards * per_shard):
    what = (
      "microbatches*pipeline_microbatches"
      if per_shard != cfg.train.microbatches
      else ("microbatches")
    )
    raise ConfigError(
      f"config.train.global_batch_size: {rows} is not divisible by data*fsdp*{what} = "
      f"{batch_shards}*{per_shard}; use a multiple of {batch_shards * per_shard}"
    )


def pipeline_microbatches(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """M: train.pipeline_microbatches, 0 meaning one per stage; 1 without pipelining."""
  stages = mesh.shape["stage"]
  if stages == 1:
    return 1
  return cfg.train.pipeline_microbatches or stages


def check_divisibility(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Errors of the model's layout that need the mesh, raised before anything compiles."""
  tensor = mesh.shape["tensor"]
  check_pipeline(cfg, mesh)
  if cfg.model.num_heads % tensor:
    raise ConfigError(
      f"config.model.num_heads: {cfg.model.num_heads} is not divisible by mesh.tensor="
      f"{tensor}; choose a tensor size that divides the heads"
    )
  if cfg.model.mlp_dim % tensor:
    raise ConfigError(
      f"config.model.mlp_dim: {cfg.model.mlp_dim} is not divisible by mesh.tensor={tensor}"
    )


def check_pipeline(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Pipeline parallelism's rules (mesh.stage > 1), before anything compiles."""
  stages, repeats = mesh.shape["stage"], cfg.model.pipeline_repeats
  if stages == 1:
    return
  if cfg.task != "lm":
    raise ConfigError(
      f"config.mesh.stage: {stages}, but pipeline parallelism runs the decoder-only LM only "
      f"(task={cfg.task!r}); set mesh.stage=1 and use data, fsdp or tensor"
    )
  layers = cfg.model.dec_layers
  if layers % (stages * repeats):
    raise ConfigError(
      f"config.model.dec_layers: {layers} is not divisible by mesh.stage*model.pipeline_repeats"
      f" = {stages}*{repeats}; each stage holds dec_layers/(stage*repeats) layers per repeat"
    )
  m = pipeline_microbatches(cfg, mesh)
  if m < stages or m % stages:
    raise ConfigError(
      f"config.train.pipeline_microbatches: {m} must be a multiple of mesh.stage={stages} (and"
      f" at least it); use {stages} or {2 * stages}"
    )


VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, mesh: jax.sharding.Mesh) -> int:
  """The vocab rounded up to a multiple of 128 (and of the tensor axis).

  A fixed multiple rather than the tensor size alone keeps checkpoints restorable on any
  mesh with tensor <= 128, and suits TPU/GPU tiles.
  """
  multiple = math.lcm(VOCAB_MULTIPLE, mesh.shape["tensor"])
  return -(-vocab_size // multiple) * multiple
