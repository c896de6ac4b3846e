"""The train state and the step: optimizer, its state's layout, init, update, compile.

`Trainer.build(cfg)` adds to the layout what training alone needs: the optimizer and its
state's shardings for the ZeRO stage, the trainable mask, local SGD's replicas and a teacher.
`train_step` is one pure function of (state, batch) jitted with explicit in/out shardings and a
donated state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from lm import config as lmc
from lm import grads, optim, trees
from lm.layout import Layout
from lm.local_sgd import LocalSGD, per_replica
from lm.objective import Teacher
from lm.parallel import mesh as lm_mesh
from lm.parallel import pipeline as pp


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nested dict of arrays, the model's nnx.Param values
  opt_state: Any
  skipped_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient
  # Local SGD only (lm.local_sgd): the replicas' own parameters, inner optimizer states and
  # tokens since the last sync; then `params` is the consensus and `opt_state` the outer
  # optimizer's. Empty otherwise.
  replicas: Any = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, params, opt_state, replicas=None):
    zero = jnp.zeros((), jnp.int32)
    return cls(zero, params, opt_state, zero, replicas or {})


@dataclasses.dataclass
class Trainer:
  """Everything one training run compiles against, derived from the config alone."""

  layout: Layout
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  # Per parameter: does it train (train.trainable)? Frozen ones get no gradient, no optimizer
  # state and no update; the optimizer sees only `select(params, trainable)`.
  trainable: dict
  state_shardings: TrainState
  local_sgd: LocalSGD | None
  teacher: Teacher | None  # distillation (train.teacher with train.distill_weight > 0)
  _reorders: dict = dataclasses.field(default_factory=dict, repr=False)  # compiled once each

  @classmethod
  def build(
    cls,
    cfg: ml_collections.ConfigDict,
    devices=None,
    tokenizer_size: int | None = None,
    teacher: Teacher | None = None,
  ) -> Trainer:
    """The layout and the training pieces on it; compiles nothing. `teacher` is used when
    train.distill_weight > 0."""
    return cls.for_layout(Layout.build(cfg, devices, tokenizer_size), teacher)

  @classmethod
  def for_layout(cls, layout: Layout, teacher: Teacher | None = None) -> Trainer:
    cfg = layout.cfg
    lmc.validate(cfg)  # training's own rules, beyond the layout's (before anything compiles)
    lm_mesh.check_batch_divisibility(cfg, layout.mesh)
    trainable = trees.trainable_mask(cfg, layout.abstract_params)
    tx = optim.optimizer(cfg.optim, cfg.train.total_steps)
    local_sgd = LocalSGD.build(layout)

    def opt_state_shardings(per_param, tx):
      # Param-shaped leaves (Adam's m and v) follow the parameter; the rest (counts, and the
      # factored Adafactor statistics, which sit in param-structured trees but are smaller)
      # is small and replicated.
      replicated = layout.shardings.replicated
      trained = trees.select(layout.abstract_params, trainable)
      return optax.tree_map_params(
        tx,
        lambda leaf, s, param: s if leaf.shape == param.shape else replicated,
        jax.eval_shape(tx.init, trained),
        trees.select(per_param, trainable),
        trained,
        transform_non_params=lambda _: replicated,
      )

    update = layout.shardings.update
    inner = opt_state_shardings(update, tx)
    state_shardings = TrainState(
      step=layout.shardings.replicated,
      params=layout.shardings.params,
      # Local SGD: the outer optimizer's state, laid out like the inner one's.
      opt_state=opt_state_shardings(update, local_sgd.outer_tx) if local_sgd else inner,
      skipped_steps=layout.shardings.replicated,
      replicas=local_sgd.replica_shardings(inner) if local_sgd else {},
    )
    if not (teacher and cfg.train.distill_weight > 0):
      teacher = None
    lr = optim.schedule(cfg.optim, cfg.train.total_steps)
    return cls(layout, tx, lr, trainable, state_shardings, local_sgd, teacher)

  @property
  def replica_count(self) -> int:
    """Data replicas that train apart between syncs (local SGD); 0 = fully synchronous."""
    return self.local_sgd.replica_count if self.local_sgd else 0

  def _fresh_state(self, params) -> TrainState:
    if not self.local_sgd:
      return TrainState.create(params, self.tx.init(trees.select(params, self.trainable)))
    replicas = self.local_sgd.fresh_replicas(params, self.tx)
    return TrainState.create(params, self.local_sgd.outer_tx.init(params), replicas)

  def init_state(self, trained: dict | None = None) -> TrainState:
    """Initialized directly into its shardings: no device holds more than its share.
    `trained`: parameters to start from (a trained model's, laid out as `shardings.params`
    lays them); those it lacks (LoRA, adapters) start fresh."""

    def init(trained):
      return self._fresh_state(trees.merge(self.layout.fresh_params(), trained or {}))

    with jax.set_mesh(self.layout.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(trained)

  def train_step(
    self, state: TrainState, batch: dict, teacher_params=None
  ) -> tuple[TrainState, dict]:
    """Forward, loss, gradient (accumulated over microbatches) and update. Under local SGD each
    data replica updates its own parameters with its own rows' gradient (`sync_step` merges
    them)."""
    local = bool(self.local_sgd)
    params = state.replicas["params"] if local else state.params
    opt_state = state.replicas["opt_state"] if local else state.opt_state
    summed, sums = grads.summed_grads(
      self.layout, self.trainable, params, batch, state.step, self.teacher, teacher_params, local
    )  # sums [..., (loss, tokens, correct)]
    tokens = sums[..., 1]  # per replica under local SGD

    # The mean over the target tokens, in the params' dtype, so that the optimizer state keeps
    # the dtypes it was compiled for.
    def mean(g, p):
      per_row = jnp.maximum(tokens, 1.0).reshape(tokens.shape + (1,) * (g.ndim - tokens.ndim))
      return (g / per_row).astype(p.dtype)

    update_shardings = self.layout.shardings.update
    if local:
      update_shardings = per_replica(update_shardings)
    trained = trees.select(params, self.trainable)
    mean_grads = jax.lax.with_sharding_constraint(
      jax.tree.map(mean, summed, trained), trees.select(update_shardings, self.trainable)
    )
    grad_norm = optax.tree.norm(mean_grads)
    updates, new_opt_state = (jax.vmap(self.tx.update) if local else self.tx.update)(
      mean_grads, opt_state, trained
    )
    new_params = trees.merge(params, optax.apply_updates(trained, updates))
    loss, tokens_total, correct = sums.reshape(-1, 3).sum(0)
    # A non-finite loss or gradient leaves params and optimizer state as they were.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_params, new_opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old),
      (new_params, new_opt_state),
      (params, opt_state),
    )
    metrics = {
      "loss": loss / jnp.maximum(tokens_total, 1.0),
      "accuracy": correct / jnp.maximum(tokens_total, 1.0),
      "grad_norm": grad_norm,
      "learning_rate": self.lr_schedule(state.step),
      "tokens": tokens_total,
      "finite": finite,
    }
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    if local:
      replicas = {
        "params": new_params,
        "opt_state": new_opt_state,
        "tokens": state.replicas["tokens"] + jnp.where(finite, tokens, 0.0),
      }
      return TrainState(state.step + 1, state.params, state.opt_state, skipped, replicas), metrics
    return TrainState(state.step + 1, new_params, new_opt_state, skipped), metrics

  def in_layer_order(self, state: TrainState) -> TrainState:
    """The state as checkpoints hold it: stacked layers in layer order (a circular pipeline
    keeps them in stage order in memory; see Layout.to_stage_order). A copy when they differ."""
    return self._reordered(state, "layer")

  def in_memory_order(self, state: TrainState) -> TrainState:
    """A state read from a checkpoint (layer order) in this run's memory order; donated."""
    return self._reordered(state, "stage", donate=True)

  def _reordered(self, state: TrainState, to: str, donate: bool = False) -> TrainState:
    layout = self.layout
    if not layout.reorders_layers:
      return state
    reorder = pp.to_stage_order if to == "stage" else pp.to_layer_order
    schedule = layout.dims.pipeline
    stacked = trees.select(layout.stacked(), self.trainable)

    def per_param(leaf, is_stacked, param):
      # Adam's moments, and factored statistics that keep the layers axis first.
      if is_stacked and leaf.ndim and leaf.shape[0] == param.shape[0]:
        return reorder(leaf, schedule)
      return leaf

    def fn(state):
      opt_state = optax.tree_map_params(
        self.tx,
        per_param,
        state.opt_state,
        stacked,
        trees.select(state.params, self.trainable),
        transform_non_params=lambda x: x,
      )
      params = (layout.to_stage_order if to == "stage" else layout.to_layer_order)(state.params)
      return state.replace(params=params, opt_state=opt_state)

    if (to, donate) not in self._reorders:
      self._reorders[to, donate] = jax.jit(
        fn,
        in_shardings=(self.state_shardings,),
        out_shardings=self.state_shardings,
        donate_argnums=(0,) if donate else (),
      )
    with jax.set_mesh(layout.mesh):
      return self._reorders[to, donate](state)

  def jit_train_step(self):
    """step(state, batch) -> (state, metrics); with a teacher, step(state, batch, its params)."""
    teacher = (self.teacher.layout.shardings.params,) if self.teacher else ()
    shardings = self.layout.shardings
    return jax.jit(
      self.train_step,
      in_shardings=(self.state_shardings, shardings.batch, *teacher),
      out_shardings=(self.state_shardings, shardings.replicated),
      donate_argnums=0,
    )

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._fresh_state, self.layout.abstract_params)
    return trees.placed(shapes, self.state_shardings)

  def lower_train_step(self) -> jax.stages.Lowered:
    teacher = (self.teacher.layout.placed_params(),) if self.teacher else ()
    with jax.set_mesh(self.layout.mesh):
      return self.jit_train_step().lower(
        self.abstract_state(), self.layout.abstract_batch(), *teacher
      )

  def compile_train_step(self):
    """The jitted step lowered and compiled once, against abstract inputs: step(state, batch),
    with the teacher's parameters bound when there is one."""
    with jax.set_mesh(self.layout.mesh):
      compiled = self.lower_train_step().compile()
    return _WithTeacher(compiled, self.teacher.params) if self.teacher else compiled

  def compile_sync_step(self):
    """Local SGD's outer step (lm.local_sgd), compiled against the abstract state."""
    with jax.set_mesh(self.layout.mesh):
      jitted = jax.jit(
        self.local_sgd.sync_step,
        in_shardings=(self.state_shardings,),
        out_shardings=self.state_shardings,
        donate_argnums=0,
      )
      return jitted.lower(self.abstract_state()).compile()


class _WithTeacher:
  """A compiled step with the teacher's parameters as its bound last argument; otherwise the
  compiled object (as_text, memory_analysis, ...)."""

  def __init__(self, compiled, teacher_params):
    self.compiled, self.teacher_params = compiled, teacher_params

  def __call__(self, state, batch):
    return self.compiled(state, batch, self.teacher_params)

  def __getattr__(self, name):
    return getattr(self.compiled, name)
