"""What every mode builds: the model laid out on the mesh for the ZeRO stage. No optimizer.

`Layout.build(cfg)` validates the config against the devices, builds the mesh and the abstract
model, and derives every parameter's sharding and the batch placement. Evaluation, decoding,
export and serving need nothing more; training adds its optimizer on top (`lm.train_step`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lm import config as lmc
from lm import trees
from lm.models.classifier import build_model
from lm.models.transformer import ModelDims, logical_names
from lm.parallel import mesh as lm_mesh
from lm.parallel import pipeline as pp
from lm.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Layout:
  """The model's graph, abstract parameters and shardings, derived from the config alone."""

  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  dims: ModelDims
  graphdef: Any
  logical: dict  # logical axis names per parameter
  abstract_params: dict  # ShapeDtypeStructs
  shardings: sharding.StateShardings
  vocab_limit: int  # ids >= this (mesh padding, unused rows) never enter a loss or an output

  @classmethod
  def build(
    cls,
    cfg: ml_collections.ConfigDict,
    devices=None,
    tokenizer_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
  ) -> Layout:
    """Compiles nothing. The embedding has max(model.vocab_size, tokenizer_size) rows padded
    for the mesh; only the tokenizer's ids (model.vocab_size without one) can be targets or
    outputs. `mesh`: this one instead of the one cfg.mesh builds over `devices`."""
    lmc.validate(cfg, training=False)
    if mesh is not None:
      assert devices is None and lm_mesh.mesh_shape(cfg.mesh, mesh.size) == mesh.devices.shape
    mesh = mesh or lm_mesh.make_mesh(cfg.mesh, devices)
    lm_mesh.check_divisibility(cfg, mesh)
    if cfg.task == "classify" and not cfg.model.num_classes:
      raise lmc.ConfigError(
        "config.model.num_classes: 0 is resolved from data.labels or the training data when "
        "training loads it; set it to build a classifier without data"
      )
    vocab_limit = tokenizer_size or cfg.model.vocab_size
    rows = lm_mesh.padded_vocab_size(max(cfg.model.vocab_size, vocab_limit), mesh)
    schedule = None
    if mesh.shape["stage"] > 1:
      schedule = pp.Schedule(
        mesh.shape["stage"],
        cfg.model.pipeline_repeats,
        lm_mesh.pipeline_microbatches(cfg, mesh),
        cfg.train.pipeline_gather,
      )
    dims = ModelDims.from_config(
      cfg.model,
      vocab_size=rows,
      platform=mesh.devices.flat[0].platform,
      params_sharded=cfg.zero_stage == 3 and mesh.shape["fsdp"] > 1,
      grad_reduce_dtype=cfg.train.grad_reduce_dtype,
      pipeline=schedule,
    )
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: build_model(cfg.task, dims, cfg.seed))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    logical = logical_names(state)
    abstract_params = nnx.to_pure_dict(state)
    shardings = sharding.stage_shardings(logical, abstract_params, mesh, cfg.zero_stage)
    return cls(cfg, mesh, dims, graphdef, logical, abstract_params, shardings, vocab_limit)

  def notes(self) -> list[str]:
    """Start-up lines on where the layout departs from the sharding rules' aim."""
    tensor, kv = self.mesh.shape["tensor"], self.dims.num_kv_heads
    if tensor > 1 and kv % tensor:
      return [
        f"model.num_kv_heads={kv} is not divisible by mesh.tensor={tensor}: the key/value "
        "projections and the KV cache are replicated over tensor (query heads stay split)"
      ]
    return []

  def placed_params(self) -> dict:
    """The parameters as abstract arrays in their shardings: a restore's target."""
    return trees.placed(self.abstract_params, self.shardings.params)

  def fresh_params(self) -> dict:
    """A new model's parameters (inside a jit whose out_shardings place them), the stacks in
    stage order."""
    with nnx.use_eager_sharding(False):
      model = build_model(self.cfg.task, self.dims, self.cfg.seed)
    return self.to_stage_order(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  @property
  def reorders_layers(self) -> bool:
    """A circular pipeline keeps each stage's layer groups together in memory (stage order);
    checkpoints and exports hold layer order."""
    return self.dims.pipeline is not None and self.dims.pipeline.repeats > 1

  def to_stage_order(self, params: dict) -> dict:
    """Parameters in layer order (a checkpoint's) -> this layout's memory order."""
    return self._reorder(params, pp.to_stage_order)

  def to_layer_order(self, params: dict) -> dict:
    """This layout's memory order -> layer order, what checkpoints and exports hold."""
    return self._reorder(params, pp.to_layer_order)

  def _reorder(self, params: dict, reorder) -> dict:
    """`reorder(leaf, schedule)` on every stacked parameter."""
    if not self.reorders_layers:
      return params
    stacks = _stacks(self.logical)
    leaf = lambda x: reorder(x, self.dims.pipeline)
    return {k: jax.tree.map(leaf, v) if k in stacks else v for k, v in params.items()}

  @property
  def batch_multiple(self) -> int:
    """Rows of any batch this layout runs are a multiple of this: one per (stage, data, fsdp)
    device, or with pipelining M pipeline microbatches per (data, fsdp) group."""
    shape = self.mesh.shape
    per_group = self.dims.pipeline.microbatches if self.dims.pipeline else shape["stage"]
    return per_group * shape["data"] * shape["fsdp"]

  def unpipelined(self) -> Layout:
    """This layout on the same devices with its pipeline stages as data replicas: what decoding
    runs on (one token at a time through every layer leaves nothing to pipeline)."""
    if self.dims.pipeline is None:
      return self
    cfg = self.cfg.copy_and_resolve_references()
    mesh = cfg.mesh
    if mesh.data != -1:
      mesh.data *= mesh.stage
    mesh.dcn_data *= mesh.dcn_stage
    mesh.stage, mesh.dcn_stage = 1, 1
    # The same device order, stage-major in data: building the mesh anew could order a TPU's or
    # a multi-slice job's devices otherwise, and moving parameters between meshes needs one.
    shape = self.mesh.devices.shape
    devices = self.mesh.devices.reshape(1, shape[0] * shape[1], *shape[2:])
    flat = jax.sharding.Mesh(devices, self.mesh.axis_names, axis_types=self.mesh.axis_types)
    return Layout.build(cfg, tokenizer_size=self.vocab_limit, mesh=flat)

  def stacked(self) -> dict:
    """Per parameter: is it a stacked layer (leading 'layers' axis)?"""
    stacks = _stacks(self.logical)
    return {
      key: jax.tree.map(lambda _, stacked=key in stacks: stacked, names, is_leaf=_is_names)
      for key, names in self.logical.items()
    }

  def in_memory_order(self, params: dict) -> dict:
    """Restored parameters (layer order) in this layout's memory order, jitted in place."""
    if not self.reorders_layers:
      return params
    with jax.set_mesh(self.mesh):
      return jax.jit(self.to_stage_order, out_shardings=self.shardings.params, donate_argnums=0)(
        params
      )

  def init_params(self) -> dict:
    """A new model's parameters, initialized directly into their shards."""
    with jax.set_mesh(self.mesh):
      return jax.jit(self.fresh_params, out_shardings=self.shardings.params)()

  def logits(self, params, batch: dict, dropout_key=None) -> jax.Array:
    """[batch, length, vocab] float32 (a classifier's: [batch, classes]); dropout only with a
    key."""
    return nnx.merge(self.graphdef, params)(batch, dropout_key)

  def hidden(self, params, batch: dict, dropout_key=None) -> jax.Array:
    """A sequence model's final hidden states [batch, length, embed]: the head's input."""
    return nnx.merge(self.graphdef, params).hidden(batch, dropout_key)

  def head(self, params) -> Callable[[jax.Array], jax.Array]:
    """A sequence model's output head: hidden states [batch, positions, embed] -> logits
    [batch, positions, vocab] float32, its weights read (gathered) once for all calls."""
    return nnx.merge(self.graphdef, params).head()

  def gathered(self, params):
    """Inside the training step's manual region under ZeRO-3: the parameters outside the layer
    stacks gathered, once per microbatch (each stack gathers its own layers)."""
    if not self.dims.params_sharded:
      return params
    top = {k: v for k, v in params.items() if k not in _stacks(self.logical)}
    top = sharding.gather_layer(
      top,
      {k: self.logical[k] for k in top},
      jax.tree.map(lambda s: tuple(s.shape), {k: self.abstract_params[k] for k in top}),
      self.dims.grad_reduce_dtype,
    )
    return {**params, **top}

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, split over (stage, data, fsdp)."""
    return {
      k: jax.make_array_from_process_local_data(self.shardings.batch, v)
      for k, v in local_batch.items()
    }

  def rows_on_mesh(self, rows):
    """A tree of host arrays [rows, ...], every process holding all rows (decoding, serving),
    split over the mesh's batch axes."""
    batch = self.shardings.batch
    return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, batch, lambda i: x[i]), rows
    )

  def abstract_batch(self, global_batch: int | None = None, packed: bool | None = None) -> dict:
    rows = global_batch or self.cfg.train.global_batch_size
    shape = (rows, self.cfg.data.seq_len)
    keys = batch_keys(self.cfg.task, self.cfg.data.pack if packed is None else packed)
    batch = self.shardings.batch
    return {
      k: jax.ShapeDtypeStruct(shape[:1] if k == "labels" else shape, jnp.int32, sharding=batch)
      for k in keys
    }


def batch_keys(task: str, packed: bool) -> tuple[str, ...]:
  """The [batch, seq_len] int32 arrays of a training batch: tokens and segment ids (0 marks
  padding) per side, and positions when packed (else 0, 1, ...); a classifier's rows, one
  example each, and their `labels` [batch]."""
  if task == "classify":
    return ("inputs", "inputs_segment_ids", "labels")
  sides = ("targets",) if task == "lm" else ("inputs", "targets")
  parts = ("", "_segment_ids", "_positions") if packed else ("", "_segment_ids")
  return tuple(side + part for side in sides for part in parts)


def _stacks(logical) -> set[str]:
  """Top-level entries holding stacked layers (some leaf's first logical axis is 'layers')."""
  return {
    k
    for k, v in logical.items()
    if any(names[:1] == ("layers",) for names in jax.tree.leaves(v, is_leaf=_is_names))
  }


def _is_names(x) -> bool:
  return isinstance(x, tuple)
