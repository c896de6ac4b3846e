"""`experiments.bench --plan`: the meshes, ZeRO stages, microbatch counts and remat policies of a
config that fit a target's devices, best first, from lm/parallel/memory.py's formula; with
--verify an abstract compile of the top option on this machine's devices (CPU host devices
standing in: --host_devices).

  python -m experiments.bench --plan --config=experiments/gpt2.py:medium --device_memory=16GB \
    --devices=8
  python -m experiments.bench --plan --config=experiments/wmt_ende.py:big --chip=v4-32 --verify \
    --host_devices=16

Needs no accelerator: models are built abstractly (nnx.eval_shape) and meshes are
jax.sharding.AbstractMesh. jax and lm are imported inside the functions (bench sets XLA_FLAGS
first).
"""

from __future__ import annotations


class ModelShapes:
  """The abstract model of a config per tensor size (the vocab pads to it) and its state counts
  per mesh, cached: the plan predicts thousands of options from a handful of models."""

  def __init__(self, cfg, platform: str):
    self.cfg, self.platform = cfg, platform
    self._models, self._counts = {}, {}

  def model(self, tensor: int):
    if tensor not in self._models:
      self._models[tensor] = self._build(tensor)
    return self._models[tensor]

  def _build(self, tensor: int):
    import jax
    from flax import nnx

    from lm import trees
    from lm.models.classifier import build_model
    from lm.models.transformer import ModelDims, logical_names
    from lm.parallel import mesh as lm_mesh

    cfg = self.cfg
    abstract = jax.sharding.AbstractMesh((1, 1, 1, tensor), lm_mesh.AXES)
    rows = lm_mesh.padded_vocab_size(cfg.model.vocab_size, abstract)
    dims = ModelDims.from_config(cfg.model, vocab_size=rows, platform=self.platform)
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: build_model(cfg.task, dims, cfg.seed))
    state = nnx.state(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    stacked = jax.tree.map(lambda names: names[:1] == ("layers",), logical_names(state),
                           is_leaf=lambda x: isinstance(x, tuple))  # fmt: skip
    return rows, logical_names(state), params, trees.trainable_mask(cfg, params), stacked

  def counts(self, shape: dict) -> dict:
    import jax

    from lm.parallel import memory
    from lm.parallel import mesh as lm_mesh

    key = tuple(shape[a] for a in lm_mesh.AXES)
    if key not in self._counts:
      _, logical, params, trainable, stacked = self.model(shape["tensor"])
      abstract = jax.sharding.AbstractMesh(key, lm_mesh.AXES)
      self._counts[key] = memory.state_counts(logical, params, trainable, stacked, abstract)
    return self._counts[key]

  def dims(self, cfg, shape: dict):
    from lm.models.transformer import ModelDims

    rows = self.model(shape["tensor"])[0]
    sharded = cfg.zero_stage == 3 and shape["fsdp"] > 1
    return ModelDims.from_config(
      cfg.model, vocab_size=rows, platform=self.platform, params_sharded=sharded
    )

  def flops(self, cfg, tensor: int) -> float:
    from lm import metrics

    return metrics.model_flops(cfg, self.model(tensor)[2])


def plan(cfg, chip, devices: int, headroom: float) -> tuple[list, int]:
  """(options whose predicted bytes per device fit chip.memory_bytes * (1 - headroom), best
  first: lowest predicted step time, then fewest microbatches (larger matmuls), then fewest
  bytes; how many valid options there were)."""
  from lm.parallel import memory

  shapes = ModelShapes(cfg, chip.platform)
  options = []
  for c, shape in memory.candidates(cfg, devices):
    counts = shapes.counts(shape)
    dims = shapes.dims(c, shape)
    flops = shapes.flops(c, shape["tensor"])
    options.append(memory.predict(c, dims, counts, shape, chip, flops))
  budget = chip.memory_bytes * (1 - headroom)
  rank = lambda o: (o.seconds, o.cfg.train.microbatches, o.total_bytes)
  fitting = sorted((o for o in options if o.total_bytes <= budget), key=rank)
  if not options:
    raise _config_error(f"no mesh of {devices} devices passes the config's checks")
  if not fitting:
    least = min(options, key=lambda o: o.total_bytes)
    raise _config_error(
      f"no option fits {_gb(budget)} per device ({_gb(chip.memory_bytes)} less {headroom:.0%} "
      f"headroom); the smallest, {least.label()}, needs {_gb(least.total_bytes)}: use devices "
      f"with at least {_gb(least.total_bytes / (1 - headroom))}, more devices, or a smaller "
      "train.global_batch_size"
    )
  return fitting, len(options)


def _config_error(message: str):
  from lm.config import ConfigError

  return ConfigError(f"--plan: {message}")


def _gb(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def print_plan(options: list, valid: int, chip, devices: int, headroom: float, top: int) -> None:
  print(
    f"target: {devices} x {chip.name}, {_gb(chip.memory_bytes)} each, {headroom:.0%} headroom; "
    f"{len(options)} of {valid} valid options fit. Ranked by predicted step time = FLOPs per "
    f"device / {chip.peak_flops / 1e12:g} TFLOP/s + collective bytes / "
    f"{chip.link_bytes_per_second / 1e9:g} GB/s (nothing overlapped)."
  )
  print(
    f"{'option':<58} | GiB/device (params+opt | temp) | TFLOP/device | comm GB | step s (model)"
  )
  for o in options[:top]:
    state = o.state["params"] + o.state["opt_state"] + o.batch_bytes
    print(
      f"{o.label():<58} | {o.total_bytes / 2**30:7.2f} ({state / 2**30:6.2f} | "
      f"{o.temp['total'] / 2**30:6.2f}) | {o.flops_per_device / 1e12:12.2f} | "
      f"{o.communication_bytes / 1e9:7.2f} | {o.seconds:.3f}"
    )


def as_json(option) -> dict:
  return {
    "option": option.label(),
    "mesh": option.mesh_shape,
    "zero_stage": option.cfg.zero_stage,
    "microbatches": option.cfg.train.microbatches,
    "remat": option.remat,
    "predicted_bytes": option.total_bytes,
    "state_bytes": option.state,
    "temp_bytes": option.temp,
    "flops_per_device": option.flops_per_device,
    "communication_bytes": option.communication_bytes,
    "predicted_seconds": option.seconds,
  }


def verify(option) -> dict:
  """An abstract compile of the option on this process's devices (as many as its mesh):
  compiled bytes per device (arguments + temporaries) beside the prediction, re-predicted for
  the compile's own platform (its dtype: a CPU stand-in computes in float32 under dtype=auto)."""
  import jax

  from lm.parallel import memory
  from lm.train_step import Trainer

  cfg, shape = option.cfg, option.mesh_shape
  devices = jax.devices()[: shape["data"] * shape["fsdp"] * shape["tensor"]]
  trainer = Trainer.build(cfg, devices=devices)
  compiled = trainer.compile_train_step()
  analysis = compiled.memory_analysis()
  shapes = ModelShapes(cfg, devices[0].platform)
  again = memory.predict(
    cfg,
    trainer.layout.dims,
    shapes.counts(shape),
    shape,
    memory.GENERIC,
    shapes.flops(cfg, shape["tensor"]),
  )
  compiled_total = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
  return {
    "platform": devices[0].platform,
    "predicted_bytes": again.total_bytes,
    "predicted_temp": again.temp["total"],
    "compiled_bytes": compiled_total,
    "compiled_temp": analysis.temp_size_in_bytes,
    "compiled_argument": analysis.argument_size_in_bytes,
    "ratio": again.total_bytes / compiled_total,
  }
