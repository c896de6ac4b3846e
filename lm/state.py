"""What every mode builds: the sharded train state and the `Run` it is compiled against.

`Run.build(cfg)` lays model, gradients and optimizer state out on the mesh for the ZeRO
stage; `train_step` is one pure function of (state, batch) jitted with explicit in/out
shardings and a donated state. Training, evaluation, decoding and export all start here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from lm import config as lmc
from lm import optim
from lm.models.loss import cross_entropy_sums
from lm.models.transformer import ModelDims, build_model, logical_names
from lm.parallel import mesh as lm_mesh
from lm.parallel import sharding


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nested dict of arrays, the model's nnx.Param values
  opt_state: Any
  skipped_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient

  @classmethod
  def create(cls, params, opt_state):
    return cls(jnp.zeros((), jnp.int32), params, opt_state, jnp.zeros((), jnp.int32))


@dataclasses.dataclass
class Run:
  """Everything one training run compiles against, derived from the config alone."""

  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  dims: ModelDims
  graphdef: Any
  logical: dict  # logical axis names per parameter
  abstract_params: dict  # ShapeDtypeStructs
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  shardings: sharding.StateShardings
  state_shardings: TrainState
  vocab_limit: int  # ids >= this (mesh padding, unused rows) never enter a loss or an output

  @classmethod
  def build(
    cls, cfg: ml_collections.ConfigDict, devices=None, tokenizer_size: int | None = None
  ) -> Run:
    """Validates the config against the devices and derives every sharding; compiles nothing.

    The embedding has max(model.vocab_size, tokenizer_size) rows padded for the mesh; only the
    tokenizer's ids (model.vocab_size without one) can be targets or outputs.
    """
    lmc.validate(cfg)
    mesh = lm_mesh.make_mesh(cfg.mesh, devices)
    lm_mesh.check_divisibility(cfg, mesh)
    vocab_limit = tokenizer_size or cfg.model.vocab_size
    rows = lm_mesh.padded_vocab_size(max(cfg.model.vocab_size, vocab_limit), mesh)
    dims = ModelDims.from_config(
      cfg.model,
      vocab_size=rows,
      platform=mesh.devices.flat[0].platform,
      params_sharded=cfg.zero_stage == 3 and mesh.shape["fsdp"] > 1,
    )
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: build_model(cfg.task, dims, cfg.seed))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    logical = logical_names(state)
    abstract_params = nnx.to_pure_dict(state)
    lr = optim.schedule(cfg.optim, cfg.train.total_steps)
    tx = optim.optimizer(cfg.optim, cfg.train.total_steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)

    def opt_state_shardings(per_param):
      # Param-shaped leaves (Adam's m and v) follow the parameter; the rest (counts, and the
      # factored Adafactor statistics, which sit in param-structured trees but are smaller)
      # is small and replicated.
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      return optax.tree_map_params(
        tx,
        lambda leaf, s, param: s if leaf.shape == param.shape else replicated,
        abstract_opt,
        per_param,
        abstract_params,
        transform_non_params=lambda _: replicated,
      )

    shardings = sharding.stage_shardings(
      logical, abstract_params, mesh, cfg.zero_stage, opt_state_shardings
    )
    state_shardings = TrainState(
      step=shardings.replicated,
      params=shardings.params,
      opt_state=shardings.opt_state,
      skipped_steps=shardings.replicated,
    )
    return cls(
      cfg,
      mesh,
      dims,
      graphdef,
      logical,
      abstract_params,
      tx,
      lr,
      shardings,
      state_shardings,
      vocab_limit,
    )

  def init_state(self) -> TrainState:
    """Initialized directly into its shardings: no device holds more than its share."""

    def init():
      with nnx.use_eager_sharding(False):
        model = build_model(self.cfg.task, self.dims, self.cfg.seed)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return TrainState.create(params, self.tx.init(params))

    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)()

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, split over (data, fsdp)."""
    return {
      k: jax.make_array_from_process_local_data(self.shardings.batch, v)
      for k, v in local_batch.items()
    }

  def loss_sums(self, params, batch, dropout_key):
    """(loss sum, (target tokens, correct tokens)) of one batch."""
    model = nnx.merge(self.graphdef, params)
    logits = model(batch, dropout_key)  # [batch, length, vocab] float32
    weights = (batch["targets"] > 0).astype(jnp.float32)
    loss, tokens, correct = cross_entropy_sums(
      logits, batch["targets"], weights, self.cfg.model.label_smoothing, self.vocab_limit
    )
    return loss, (tokens, correct)

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """Forward, loss, gradient (accumulated over microbatches) and update."""
    k = self.cfg.train.microbatches
    dropout_key = jax.random.fold_in(jax.random.key(self.cfg.seed), state.step)
    grad_fn = jax.value_and_grad(self.loss_sums, has_aux=True)
    batch_spec = self.shardings.batch.spec

    def microbatch(b):  # [B, L] -> [k, B/k, L]: row j*k+i goes to microbatch i; no traffic
      b = b.reshape(b.shape[0] // k, k, *b.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(b, jax.sharding.PartitionSpec(None, *batch_spec))

    def accumulate(carry, scanned):
      grads, loss, tokens, correct = carry
      mb, i = scanned
      (mb_loss, (mb_tokens, mb_correct)), mb_grads = grad_fn(
        state.params, mb, jax.random.fold_in(dropout_key, i)
      )
      # ZeRO-2: each microbatch's gradient is reduce-scattered as soon as it exists.
      grads = jax.lax.with_sharding_constraint(
        jax.tree.map(jnp.add, grads, mb_grads), self.shardings.grads
      )
      return (grads, loss + mb_loss, tokens + mb_tokens, correct + mb_correct), None

    # Accumulated in float32 whatever the parameters' dtype; the update gets the params' dtype,
    # so that the optimizer state keeps the dtypes it was compiled for.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (jax.lax.with_sharding_constraint(zeros, self.shardings.grads), 0.0, 0.0, 0.0)
    scanned = (jax.tree.map(microbatch, batch), jnp.arange(k))
    (grads, loss, tokens, correct), _ = jax.lax.scan(accumulate, init, scanned)
    # ZeRO-1: one reduce-scatter per step, to the optimizer state's layout.
    grads = jax.lax.with_sharding_constraint(
      jax.tree.map(
        lambda g, p: (g / jnp.maximum(tokens, 1.0)).astype(p.dtype), grads, state.params
      ),
      self.shardings.update,
    )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves params and optimizer state as they were.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      (params, opt_state),
      (state.params, state.opt_state),
    )
    metrics = {
      "loss": loss / jnp.maximum(tokens, 1.0),
      "accuracy": correct / jnp.maximum(tokens, 1.0),
      "grad_norm": grad_norm,
      "learning_rate": self.lr_schedule(state.step),
      "tokens": tokens,
      "finite": finite,
    }
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    return TrainState(state.step + 1, params, opt_state, skipped), metrics

  def jit_train_step(self):
    return jax.jit(
      self.train_step,
      in_shardings=(self.state_shardings, self.shardings.batch),
      out_shardings=(self.state_shardings, self.shardings.replicated),
      donate_argnums=0,
    )

  def abstract_batch(self, global_batch: int | None = None, packed: bool | None = None) -> dict:
    rows = global_batch or self.cfg.train.global_batch_size
    shape = (rows, self.cfg.data.seq_len)
    keys = batch_keys(self.cfg.task, self.cfg.data.pack if packed is None else packed)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.shardings.batch) for k in keys}

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(lambda p: TrainState.create(p, self.tx.init(p)), self.abstract_params)
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes,
      self.state_shardings,
    )

  def compile_train_step(self):
    """The jitted step lowered and compiled once, against abstract inputs."""
    with jax.set_mesh(self.mesh):
      return self.jit_train_step().lower(self.abstract_state(), self.abstract_batch()).compile()


def batch_keys(task: str, packed: bool) -> tuple[str, ...]:
  """The [batch, seq_len] int32 arrays of a training batch."""
  sides = ("targets",) if task == "lm" else ("inputs", "targets")
  if not packed:
    return sides
  return tuple(side + part for side in sides for part in ("", "_segment_ids", "_positions"))


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
