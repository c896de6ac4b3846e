"""What every mode builds: the sharded train state and the `Run` it is compiled against.

`Run.build(cfg)` lays model, gradients and optimizer state out on the mesh for the ZeRO
stage; `train_step` is one pure function of (state, batch) jitted with explicit in/out
shardings and a donated state. Training, evaluation, decoding and export all start here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from lm import config as lmc
from lm import optim
from lm.models.loss import cross_entropy_sums, distill_sums
from lm.models.transformer import ModelDims, build_model, logical_names
from lm.parallel import mesh as lm_mesh
from lm.parallel import sharding


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any  # nested dict of arrays, the model's nnx.Param values
  opt_state: Any
  skipped_steps: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient
  # Local SGD (train.sync_every > 0): each data replica's own parameters and inner optimizer
  # state, stacked on a leading [data] axis, and its target tokens since the last sync. Then
  # `params` are the replicas' consensus at the last sync (what evaluation and export use) and
  # `opt_state` is the outer optimizer's. Empty otherwise.
  replicas: Any = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, params, opt_state, replicas=None):
    zero = jnp.zeros((), jnp.int32)
    return cls(zero, params, opt_state, zero, replicas or {})


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
  outer_tx: optax.GradientTransformation | None  # local SGD's outer optimizer, else None
  # Per parameter: does it train (train.trainable)? Frozen ones get no gradient, no optimizer
  # state and no update; the optimizer sees only `select(params, trainable)`.
  trainable: dict
  # Distillation (train.teacher): the teacher's Run on this mesh and stage, and its params,
  # which the compiled step takes as a frozen argument (never donated, never saved).
  teacher: Run | None = None
  teacher_params: Any = None

  @classmethod
  def build(
    cls,
    cfg: ml_collections.ConfigDict,
    devices=None,
    tokenizer_size: int | None = None,
    teacher: tuple[Run, Any] | None = None,
  ) -> Run:
    """Validates the config against the devices and derives every sharding; compiles nothing.

    The embedding has max(model.vocab_size, tokenizer_size) rows padded for the mesh; only the
    tokenizer's ids (model.vocab_size without one) can be targets or outputs. `teacher`: (its
    Run on the same mesh and stage, its params) to distill from (train.distill_weight > 0).
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
      grad_reduce_dtype=cfg.train.grad_reduce_dtype,
    )
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: build_model(cfg.task, dims, cfg.seed))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    logical = logical_names(state)
    abstract_params = nnx.to_pure_dict(state)
    trainable = trainable_mask(cfg, abstract_params)
    lr = optim.schedule(cfg.optim, cfg.train.total_steps)
    tx = optim.optimizer(cfg.optim, cfg.train.total_steps)
    outer_tx = optim.outer_optimizer(cfg.train) if cfg.train.sync_every else None

    def opt_state_shardings(per_param, tx=tx):
      # Param-shaped leaves (Adam's m and v) follow the parameter; the rest (counts, and the
      # factored Adafactor statistics, which sit in param-structured trees but are smaller)
      # is small and replicated.
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      trained = select(abstract_params, trainable)
      return optax.tree_map_params(
        tx,
        lambda leaf, s, param: s if leaf.shape == param.shape else replicated,
        jax.eval_shape(tx.init, trained),
        select(per_param, trainable),
        trained,
        transform_non_params=lambda _: replicated,
      )

    shardings = sharding.stage_shardings(
      logical, abstract_params, mesh, cfg.zero_stage, opt_state_shardings
    )
    replicas = {}
    if outer_tx:
      replicas = {
        "params": _per_replica(shardings.params),
        "opt_state": _per_replica(shardings.opt_state),
        "tokens": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
      }
    state_shardings = TrainState(
      step=shardings.replicated,
      params=shardings.params,
      # Local SGD: the outer optimizer's state, laid out like the inner one's.
      opt_state=opt_state_shardings(shardings.update, outer_tx)
      if outer_tx
      else shardings.opt_state,
      skipped_steps=shardings.replicated,
      replicas=replicas,
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
      outer_tx,
      trainable,
      *(teacher if teacher and cfg.train.distill_weight > 0 else (None, None)),
    )

  @property
  def replica_count(self) -> int:
    """Data replicas that train apart between syncs (local SGD); 0 = fully synchronous."""
    return self.mesh.shape["data"] if self.outer_tx else 0

  def _fresh_state(self, params) -> TrainState:
    if not self.outer_tx:
      return TrainState.create(params, self.tx.init(select(params, self.trainable)))
    d = self.replica_count
    stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (d, *p.shape)), params)
    replicas = {
      "params": stacked,
      "opt_state": jax.vmap(self.tx.init)(stacked),
      "tokens": jnp.zeros((d,), jnp.float32),
    }
    return TrainState.create(params, self.outer_tx.init(params), replicas)

  def init_state(self, trained: dict | None = None) -> TrainState:
    """Initialized directly into its shardings: no device holds more than its share.
    `trained`: parameters to start from (a trained model's, laid out as `shardings.params`
    lays them); those it lacks (LoRA, adapters) start fresh."""

    def init(trained):
      with nnx.use_eager_sharding(False):
        model = build_model(self.cfg.task, self.dims, self.cfg.seed)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return self._fresh_state(merge(params, trained or {}))

    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(trained)

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, split over (data, fsdp)."""
    return {
      k: jax.make_array_from_process_local_data(self.shardings.batch, v)
      for k, v in local_batch.items()
    }

  def loss_sums(self, params, batch, dropout_key, teacher_logits=None):
    """(loss sum, (target tokens, correct tokens)) of one batch; with `teacher_logits`, the
    distillation mix (train.distill_weight, train.distill_temperature)."""
    model = nnx.merge(self.graphdef, params)
    logits = model(batch, dropout_key)  # [batch, length, vocab] float32
    weights = (batch["targets"] > 0).astype(jnp.float32)
    loss, tokens, correct = cross_entropy_sums(
      logits, batch["targets"], weights, self.cfg.model.label_smoothing, self.vocab_limit
    )
    if teacher_logits is not None:
      t = self.cfg.train
      kl = distill_sums(logits, teacher_logits, weights, t.distill_temperature, self.vocab_limit)
      loss = (1.0 - t.distill_weight) * loss + t.distill_weight * kl
    return loss, (tokens, correct)

  def train_step(
    self, state: TrainState, batch: dict, teacher_params=None
  ) -> tuple[TrainState, dict]:
    """Forward, loss, gradient (accumulated over microbatches) and update. Under local SGD each
    data replica updates its own parameters with its own rows' gradient (`sync_step` merges
    them)."""
    local = bool(self.outer_tx)
    params = state.replicas["params"] if local else state.params
    opt_state = state.replicas["opt_state"] if local else state.opt_state
    grads, sums = self.summed_grads(
      params, batch, state.step, teacher_params
    )  # sums [..., (loss, tokens, correct)]
    tokens = sums[..., 1]  # per replica under local SGD

    # The mean over the target tokens, in the params' dtype, so that the optimizer state keeps
    # the dtypes it was compiled for.
    def mean(g, p):
      per_row = jnp.maximum(tokens, 1.0).reshape(tokens.shape + (1,) * (g.ndim - tokens.ndim))
      return (g / per_row).astype(p.dtype)

    trained = select(params, self.trainable)
    grads = jax.lax.with_sharding_constraint(
      jax.tree.map(mean, grads, trained), select(self._update_shardings(), self.trainable)
    )
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = (jax.vmap(self.tx.update) if local else self.tx.update)(
      grads, opt_state, trained
    )
    new_params = merge(params, optax.apply_updates(trained, updates))
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

  def _update_shardings(self):
    """The gradients' layout for the update: the opt state's, per replica under local SGD."""
    if not self.outer_tx:
      return self.shardings.update
    return _per_replica(self.shardings.update)

  def sync_step(self, state: TrainState) -> TrainState:
    """Local SGD's outer step: the replicas' parameters averaged, weighted by the target tokens
    each trained on since the last sync; the outer optimizer moves the consensus `params` by
    (params - average) ("average": onto the average), and every replica restarts from it. The
    replicas keep their inner optimizer states (DiLoCo). One all-reduce over data."""
    tokens = state.replicas["tokens"]
    total = tokens.sum()
    weights = jnp.where(total > 0, tokens / jnp.maximum(total, 1.0), 1.0 / tokens.shape[0])
    # Averaged into the optimizer state's layout: each device sums only its fsdp shard over
    # data, then the new consensus is gathered over fsdp like any update.
    average = jax.lax.with_sharding_constraint(
      jax.tree.map(
        lambda p: jnp.tensordot(weights, p.astype(jnp.float32), axes=1), state.replicas["params"]
      ),
      self.shardings.update,
    )
    if self.cfg.train.outer_optimizer == "average":
      params, opt_state = average, state.opt_state
    else:
      delta = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a, state.params, average)
      updates, opt_state = self.outer_tx.update(delta, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    params = jax.lax.with_sharding_constraint(
      jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params),
      self.shardings.params,
    )
    d = self.replica_count
    replicas = {
      **state.replicas,
      "params": jax.tree.map(lambda p: jnp.broadcast_to(p, (d, *p.shape)), params),
      "tokens": jnp.zeros_like(tokens),
    }
    return state.replace(params=params, opt_state=opt_state, replicas=replicas)

  def compile_sync_step(self):
    with jax.set_mesh(self.mesh):
      jitted = jax.jit(
        self.sync_step,
        in_shardings=(self.state_shardings,),
        out_shardings=self.state_shardings,
        donate_argnums=0,
      )
      return jitted.lower(self.abstract_state()).compile()

  def summed_grads(self, params, batch: dict, step: jax.Array, teacher_params=None):
    """Gradient sums over the global batch in the update's layout, and (loss, tokens, correct)
    sums, with every reduction over the batch axes written out (docs/architecture.md, "one
    step").

    `jax.shard_map` is manual over (data, fsdp) and leaves tensor to the partitioner. Each
    device accumulates its own rows' gradients over the microbatches in float32, then reduces
    once: stage 0 all-reduces; stage 1 reduce-scatters over fsdp to the optimizer state's
    layout and all-reduces that shard over data; stage 2 reduce-scatters every microbatch into a
    sharded accumulator; under stage 3 each layer's gather (forward, and again in the backward)
    has a reduce-scatter as its transpose. Reductions run in `train.grad_reduce_dtype`.

    Under local SGD `params` carry a leading [data] axis (one copy per replica), nothing is
    summed over data, and the sums come per replica: [data, 3].

    Only the trainable parameters (`self.trainable`) get gradients, accumulators and
    reductions; frozen ones enter the loss as constants. With a teacher, its logits for each
    microbatch are computed in the same region, under stop_gradient.
    """
    k = self.cfg.train.microbatches
    local_sgd = bool(self.outer_tx)
    summed_over = ("fsdp",) if local_sgd else sharding.BATCH_AXES
    plan = select(self.reduction_plan(), self.trainable)
    reduce_dtype = jnp.dtype(self.cfg.train.grad_reduce_dtype)
    step_key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)

    def varying(x):
      # Values that enter the region invariant over a batch axis would get their gradient
      # summed over it by the transpose of the implicit cast, once per microbatch: cast first,
      # so that gradients stay local until the reductions below.
      missing = tuple(a for a in sharding.BATCH_AXES if a not in jax.typeof(x).mat.varying)
      return jax.lax.pcast(x, missing, to="varying") if missing else x

    # The partitioner keeps tensor-parallel dims sharded only where told: without these, local
    # gradients and accumulators came out whole over tensor (twice the reduce-scatter bytes on
    # tensor=2).
    tensor_specs = jax.tree.map(
      lambda s: sharding.keep_axes(s.spec, {"tensor"}),
      select(self.shardings.params, self.trainable),
    )

    def over_tensor(tree):
      return jax.lax.with_sharding_constraint(tree, tensor_specs)

    def local(params, batch, teacher_params):
      rows = jax.tree.leaves(batch)[0].shape[0]
      first_row = jax.lax.axis_index(sharding.BATCH_AXES) * rows
      keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, first_row + jnp.arange(rows))
      # [rows, ...] -> [k, rows/k, ...]: local row j*k+i goes to microbatch i; no traffic.
      split = lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1)
      if local_sgd:
        params = jax.tree.map(lambda p: p[0], params)  # this replica's own copy
      params = jax.tree.map(varying, params)
      trained = select(params, self.trainable)  # the rest is frozen: no gradient
      grad_fn = jax.value_and_grad(
        lambda t, mb, keys, teacher: self._sharded_loss_sums(merge(params, t), mb, keys, teacher),
        has_aux=True,
      )
      teacher_params = jax.tree.map(varying, teacher_params)

      def accumulate(carry, microbatch):
        acc, sums = carry
        mb, mb_keys = microbatch
        teacher_logits = None
        if self.teacher:  # frozen: its logits are constants of the student's gradient
          teacher_logits = jax.lax.stop_gradient(self.teacher.sharded_logits(teacher_params, mb))
        (loss, (tokens, correct)), grads = grad_fn(trained, mb, mb_keys, teacher_logits)
        grads = jax.tree.map(
          lambda g, p: p.per_microbatch(g, reduce_dtype).astype(jnp.float32),
          over_tensor(grads),
          plan,
        )
        acc = over_tensor(jax.tree.map(jnp.add, acc, grads))
        return (acc, sums + jnp.stack([loss, tokens, correct])), None

      zeros = over_tensor(
        jax.tree.map(
          lambda x, p: varying(jnp.zeros(p.accumulator_shape(x.shape), jnp.float32)),
          trained,
          plan,
        )
      )
      init = (zeros, varying(jnp.zeros(3, jnp.float32)))
      (acc, sums), _ = jax.lax.scan(accumulate, init, jax.tree.map(split, (batch, keys)))
      grads = over_tensor(jax.tree.map(lambda g, p: p.per_step(g, reduce_dtype), acc, plan))
      sums = jax.lax.psum(sums, summed_over)
      if local_sgd:
        return jax.tree.map(lambda g: g[None], grads), sums[None]
      return grads, sums

    P = jax.sharding.PartitionSpec
    replica = ("data",) if local_sgd else ()
    manual = lambda tree: jax.tree.map(
      lambda s: P(*replica, *sharding.keep_axes(s.spec, sharding.BATCH_AXES)), tree
    )
    batch_spec = P(sharding.BATCH_AXES)
    teacher_specs = manual(self.teacher.shardings.params) if self.teacher else {}
    region = jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=(
        manual(self.shardings.params),
        jax.tree.map(lambda _: batch_spec, batch),
        teacher_specs,
      ),
      out_specs=(manual(select(self.shardings.update, self.trainable)), P(*replica)),
      axis_names=set(sharding.BATCH_AXES),
    )
    return region(params, batch, teacher_params if self.teacher else {})

  def _sharded_loss_sums(self, params, batch, dropout_keys, teacher_logits=None):
    """loss_sums inside the manual region."""
    return self.loss_sums(self._gathered(params), batch, dropout_keys, teacher_logits)

  def sharded_logits(self, params, batch):
    """Logits without dropout inside the manual region (a teacher's)."""
    return nnx.merge(self.graphdef, self._gathered(params))(batch, None)

  def _gathered(self, params):
    """Under ZeRO-3 the parameters outside the layer stacks are gathered here, once per
    microbatch (each stack gathers its own layers)."""
    if self.dims.params_sharded:
      top = {k: v for k, v in params.items() if k not in _stacks(self.logical)}
      top = sharding.gather_layer(
        top,
        {k: self.logical[k] for k in top},
        jax.tree.map(lambda s: tuple(s.shape), {k: self.abstract_params[k] for k in top}),
        self.dims.grad_reduce_dtype,
      )
      params = {**params, **top}
    return params

  def reduction_plan(self):
    """Per parameter: where its gradient is reduced over the batch axes (a tree of
    `sharding.GradReduction`)."""
    return jax.tree.map(
      lambda p, u: sharding.GradReduction.for_stage(
        self.cfg.zero_stage, p.spec, u.spec, self.mesh.shape["fsdp"], not self.outer_tx
      ),
      self.shardings.params,
      self.shardings.update,
    )

  def jit_train_step(self):
    """step(state, batch) -> (state, metrics); with a teacher, step(state, batch, its params)."""
    teacher = (self.teacher.shardings.params,) if self.teacher else ()
    return jax.jit(
      self.train_step,
      in_shardings=(self.state_shardings, self.shardings.batch, *teacher),
      out_shardings=(self.state_shardings, self.shardings.replicated),
      donate_argnums=0,
    )

  def abstract_batch(self, global_batch: int | None = None, packed: bool | None = None) -> dict:
    rows = global_batch or self.cfg.train.global_batch_size
    shape = (rows, self.cfg.data.seq_len)
    keys = batch_keys(self.cfg.task, self.cfg.data.pack if packed is None else packed)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.shardings.batch) for k in keys}

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._fresh_state, self.abstract_params)
    return _placed(shapes, self.state_shardings)

  def lower_train_step(self) -> jax.stages.Lowered:
    teacher = ()
    if self.teacher:
      teacher = (_placed(self.teacher.abstract_params, self.teacher.shardings.params),)
    with jax.set_mesh(self.mesh):
      return self.jit_train_step().lower(self.abstract_state(), self.abstract_batch(), *teacher)

  def compile_train_step(self):
    """The jitted step lowered and compiled once, against abstract inputs: step(state, batch),
    with the teacher's parameters bound when there is one."""
    with jax.set_mesh(self.mesh):
      compiled = self.lower_train_step().compile()
    return _WithTeacher(compiled, self.teacher_params) if self.teacher else compiled


def _placed(shapes, shardings):
  """Abstract arrays: `shapes` (anything with .shape and .dtype) laid out as `shardings`."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


class _WithTeacher:
  """A compiled step with the teacher's parameters as its bound last argument; otherwise the
  compiled object (as_text, memory_analysis, ...)."""

  def __init__(self, compiled, teacher_params):
    self.compiled, self.teacher_params = compiled, teacher_params

  def __call__(self, state, batch):
    return self.compiled(state, batch, self.teacher_params)

  def __getattr__(self, name):
    return getattr(self.compiled, name)


def batch_keys(task: str, packed: bool) -> tuple[str, ...]:
  """The [batch, seq_len] int32 arrays of a training batch."""
  sides = ("targets",) if task == "lm" else ("inputs", "targets")
  if not packed:
    return sides
  return tuple(side + part for side in sides for part in ("", "_segment_ids", "_positions"))


def _per_replica(shardings):
  """Local SGD: a layout with a leading [data] axis, one copy per data replica."""
  return jax.tree.map(
    lambda s: jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec("data", *s.spec)),
    shardings,
  )


def _stacks(logical) -> set[str]:
  """Top-level entries holding stacked layers (some leaf's first logical axis is 'layers')."""
  return {
    k
    for k, v in logical.items()
    if any(names[:1] == ("layers",) for names in jax.tree.leaves(v, is_leaf=_is_names))
  }


def _is_names(x) -> bool:
  return isinstance(x, tuple)


# With LoRA or adapters on and train.trainable empty, only their parameters train.
ADAPTATION_PARAMS = r"_lora/|_adapter/"


def param_paths(tree) -> dict:
  """The tree with each leaf replaced by its path, "decoder/layers/mlp/wi"."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree
  )


def trainable_mask(cfg, abstract_params) -> dict:
  """Per parameter: whether train.trainable (or, by default, the adaptation) trains it."""
  pattern = cfg.train.trainable
  if not pattern and (cfg.model.lora_rank or cfg.model.adapter_dim):
    pattern = ADAPTATION_PARAMS
  mask = jax.tree.map(lambda path: bool(re.search(pattern, path)), param_paths(abstract_params))
  if not any(jax.tree.leaves(mask)):
    raise lmc.ConfigError(
      f"config.train.trainable: {pattern!r} matches no parameter; paths look like "
      "decoder/layers/mlp/wi or embed/table"
    )
  return mask


def select(tree: dict, mask: dict) -> dict:
  """The entries of a nested dict whose mask is True (emptied branches dropped)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      part = select(value, mask[key])
      if part:
        out[key] = part
    elif mask[key]:
      out[key] = value
  return out


def merge(tree: dict, part: dict) -> dict:
  """`tree` with the entries of `part` (a `select` of a tree of its structure) replaced."""
  out = dict(tree)
  for key, value in part.items():
    out[key] = merge(tree[key], value) if isinstance(value, dict) else value
  return out


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
