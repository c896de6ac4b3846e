"""The gradient path: per-parameter reduction plans and the shard_map that sums gradients.

Every reduction over the batch axes is written out (docs/architecture.md, "one step"):
`jax.shard_map` is manual over (stage, data, fsdp) and leaves tensor to the partitioner.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm import objective, trees
from lm.layout import Layout
from lm.parallel import sharding

P = jax.sharding.PartitionSpec


def reduction_plan(layout: Layout, local_sgd: bool = False):
  """Per parameter: where its gradient is reduced over the batch axes (a tree of
  `sharding.GradReduction`). Under local SGD nothing is reduced over data."""
  return jax.tree.map(
    lambda p, u: sharding.GradReduction.for_stage(
      layout.cfg.zero_stage, p.spec, u.spec, layout.mesh.shape["fsdp"], not local_sgd
    ),
    layout.shardings.params,
    layout.shardings.update,
  )


def summed_grads(
  layout: Layout,
  trainable: dict,
  params,
  batch: dict,
  step: jax.Array,
  teacher: objective.Teacher | None = None,
  teacher_params=None,
  local_sgd: bool = False,
):
  """Gradient sums over the global batch in the update's layout, and (loss, tokens, correct)
  sums.

  Each device accumulates its own rows' gradients over the microbatches in float32, then
  reduces once: stage 0 all-reduces; stage 1 reduce-scatters over fsdp to the optimizer state's
  layout and all-reduces that shard over data; stage 2 reduce-scatters every microbatch into a
  sharded accumulator; under stage 3 each layer's gather (forward, and again in the backward)
  has a reduce-scatter as its transpose. Reductions run in `train.grad_reduce_dtype`.

  Under local SGD `params` carry a leading [data] axis (one copy per replica), nothing is
  summed over data, and the sums come per replica: [data, 3].

  Only the trainable parameters (`trainable`) get gradients, accumulators and reductions;
  frozen ones enter the loss as constants. With a teacher, its hidden states for each
  microbatch are computed in the same region, without gradient, and its head runs on each of
  the loss's chunks; `teacher_params` are its parameters as the step's argument.
  """
  cfg = layout.cfg
  k = cfg.train.microbatches
  summed_over = ("stage", "fsdp") if local_sgd else sharding.BATCH_AXES  # stage: 1 there
  plan = trees.select(reduction_plan(layout, local_sgd), trainable)
  reduce_dtype = jnp.dtype(cfg.train.grad_reduce_dtype)
  step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)

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
    trees.select(layout.shardings.params, trainable),
  )

  def over_tensor(tree):
    return jax.lax.with_sharding_constraint(tree, tensor_specs)

  def loss_of(params, trained, microbatch, keys, teacher_params):
    full = layout.gathered(trees.merge(params, trained))
    taught = teacher.outputs(teacher_params, microbatch) if teacher else None
    return objective.training_loss_sums(layout, full, microbatch, keys, taught)

  def local(params, batch, teacher_params):
    rows = jax.tree.leaves(batch)[0].shape[0]
    first_row = jax.lax.axis_index(sharding.BATCH_AXES) * rows
    keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, first_row + jnp.arange(rows))
    # [rows, ...] -> [k, rows/k, ...]: local row j*k+i goes to microbatch i; no traffic.
    split = lambda x: x.reshape(rows // k, k, *x.shape[1:]).swapaxes(0, 1)
    if local_sgd:
      params = jax.tree.map(lambda p: p[0], params)  # this replica's own copy
    params = jax.tree.map(varying, params)
    trained = trees.select(params, trainable)  # the rest is frozen: no gradient
    teacher_params = jax.tree.map(varying, teacher_params)
    grad_fn = jax.value_and_grad(
      lambda t, mb, keys: loss_of(params, t, mb, keys, teacher_params), has_aux=True
    )

    def accumulate(carry, microbatch):
      acc, sums = carry
      mb, mb_keys = microbatch
      (loss, (tokens, correct)), grads = grad_fn(trained, mb, mb_keys)
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

  replica = ("data",) if local_sgd else ()
  manual = lambda tree: jax.tree.map(
    lambda s: P(*replica, *sharding.keep_axes(s.spec, sharding.BATCH_AXES)), tree
  )
  batch_spec = P(sharding.BATCH_AXES)
  teacher_specs = {}
  if teacher:
    teacher_specs = jax.tree.map(
      lambda s: P(*sharding.keep_axes(s.spec, sharding.BATCH_AXES)),
      teacher.layout.shardings.params,
    )
  region = jax.shard_map(
    local,
    mesh=layout.mesh,
    in_specs=(
      manual(layout.shardings.params),
      jax.tree.map(lambda _: batch_spec, batch),
      teacher_specs,
    ),
    out_specs=(manual(trees.select(layout.shardings.update, trainable)), P(*replica)),
    axis_names=set(sharding.BATCH_AXES),
  )
  return region(params, batch, teacher_params if teacher else {})
