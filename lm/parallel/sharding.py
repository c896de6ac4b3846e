"""Logical axis names -> mesh axes, and what each ZeRO stage shards over `fsdp`.

The model names every dimension logically ('embed', 'heads', ...). This module alone turns
names into PartitionSpecs. ZeRO decides only whether a tensor kind maps 'embed' (or, where
'embed' does not divide, another free dimension) to 'fsdp'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# logical axis -> mesh axes. ZeRO decides only whether 'embed' maps to 'fsdp'.
RULES = (
  # Pipeline stages are one more batch axis for everything outside the layer stacks.
  ("batch", ("stage", "data", "fsdp")),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),  # grouped-query attention's key/value heads (replicated if indivisible)
  ("mlp", "tensor"),
  ("embed", None),
  ("kv", None),
  ("length", None),
  ("layers", "stage"),  # a stack's layers split over pipeline stages (1: all on every device)
  ("lora", None),  # LoRA's rank: small; A and B shard on their other dims
  ("adapter", None),  # an adapter's bottleneck
  ("classes", None),  # a classifier head's outputs: few; its kernel shards on embed
)
_RULES = dict(RULES)

# Which tensor kinds each stage shards over fsdp.
STAGE_SHARDS = {
  0: frozenset(),
  1: frozenset({"opt_state"}),
  2: frozenset({"opt_state", "grads"}),
  3: frozenset({"opt_state", "grads", "params"}),
}


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


def spec_for(
  names: Sequence[str | None], shape: Sequence[int], mesh, shard_over_fsdp: bool
) -> PartitionSpec:
  """PartitionSpec for one tensor; dims that an axis does not divide stay replicated."""
  axes = [_RULES.get(n) if n else None for n in names]
  # An axis of size 1 shards nothing: leave the dim free for the fsdp fallback below.
  axes = [
    a if shape[i] % _axis_size(mesh, a) == 0 and _axis_size(mesh, a) > 1 else None
    for i, a in enumerate(axes)
  ]
  if shard_over_fsdp and mesh.shape["fsdp"] > 1:
    fsdp = mesh.shape["fsdp"]
    # 'embed' first; otherwise the largest free dim that fsdp divides (never 'layers':
    # the layer scan slices that dim). Small tensors may stay replicated.
    candidates = [i for i, n in enumerate(names) if n == "embed"]
    candidates += sorted(
      (i for i, n in enumerate(names) if n not in ("embed", "layers")),
      key=lambda i: -shape[i],
    )
    free = [i for i in candidates if axes[i] is None and shape[i] % fsdp == 0]
    # Last resort: share a tensor-sharded dim, e.g. a bias [layers, mlp] on tensor x fsdp.
    shared = [
      i
      for i in candidates
      if axes[i] is not None and shape[i] % (_axis_size(mesh, axes[i]) * fsdp) == 0
    ]
    if free:
      axes[free[0]] = "fsdp"
    elif shared:
      # fsdp outermost: each fsdp shard is then one contiguous block, the layout the training
      # step's manual region (manual over fsdp, tensor automatic) receives without a reshuffle.
      axes[shared[0]] = ("fsdp", axes[shared[0]])
  return PartitionSpec(*axes)


def replicated_over_fsdp(logical, shapes, mesh) -> dict[str, tuple[tuple[int, ...], int]]:
  """Tensors that a stage sharding them would still keep whole on every fsdp device, because no
  dimension divides the axis: {path: (shape, bytes per device)}."""
  if mesh.shape["fsdp"] == 1:
    return {}
  found = {}

  def check(path, names, s):
    if "fsdp" not in jax.tree.leaves(tuple(spec_for(names, s.shape, mesh, True))):
      shard = NamedSharding(mesh, spec_for(names, s.shape, mesh, False)).shard_shape(s.shape)
      found[jax.tree_util.keystr(path, simple=True, separator="/")] = (
        tuple(s.shape),
        math.prod(shard) * s.dtype.itemsize,
      )

  jax.tree_util.tree_map_with_path(check, logical, shapes, is_leaf=lambda x: isinstance(x, tuple))
  return found


def named_shardings(logical, shapes, mesh, shard_over_fsdp: bool):
  """NamedShardings for a tree of logical-name tuples and a matching tree of shapes."""
  return jax.tree.map(
    lambda names, s: NamedSharding(mesh, spec_for(names, s.shape, mesh, shard_over_fsdp)),
    logical,
    shapes,
    is_leaf=lambda x: isinstance(x, tuple),
  )


@dataclasses.dataclass(frozen=True)
class StateShardings:
  """Where each kind of per-parameter state lives for one ZeRO stage (the optimizer's own
  tree is laid out from `update` by the train step)."""

  params: object
  grads: object  # the gradient accumulator over microbatches
  update: object  # per-parameter layout of the optimizer update (the opt-state sharding)
  batch: NamedSharding
  replicated: NamedSharding


def stage_shardings(logical, shapes, mesh, zero_stage: int) -> StateShardings:
  """Shardings of params, grads and the per-parameter optimizer state for the stage."""
  shards = STAGE_SHARDS[zero_stage]

  def kind(name):
    return named_shardings(logical, shapes, mesh, name in shards)

  return StateShardings(
    params=kind("params"),
    grads=kind("grads"),
    update=kind("opt_state"),
    batch=NamedSharding(mesh, PartitionSpec(_RULES["batch"])),
    replicated=NamedSharding(mesh, PartitionSpec()),
  )


# The axes the batch splits over and gradients are summed over; `stage` only for parameters
# outside the layer stacks (each stage's layers have their own gradient).
BATCH_AXES = ("stage", "data", "fsdp")


def manual_axes() -> frozenset[str]:
  """Mesh axes that the enclosing `jax.shard_map` makes manual (none outside one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return frozenset() if mesh.empty else frozenset(mesh.manual_axes)


def keep_axes(spec: PartitionSpec, axes) -> PartitionSpec:
  """`spec` with every mesh axis outside `axes` dropped: a manual region's view of a layout."""

  def keep(entry):
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a in axes)
    return kept[0] if len(kept) == 1 else (kept or None)

  return PartitionSpec(*(keep(e) for e in spec))


def fsdp_dim(spec: PartitionSpec) -> int | None:
  """The dimension a layout shards over fsdp, if any."""
  for i, entry in enumerate(spec):
    if entry == "fsdp" or (isinstance(entry, tuple) and "fsdp" in entry):
      return i
  return None


@dataclasses.dataclass(frozen=True)
class GradReduction:
  """Where one parameter's gradient is summed over the batch axes inside the training step."""

  # 'backward': the parameter is stored sharded (ZeRO-3); its gather's transpose reduce-scatters
  # over fsdp in the backward pass. 'microbatch' (ZeRO-2): reduce-scattered after every
  # microbatch. 'step': accumulated whole and local, reduced once per step.
  when: str
  scatter_dim: int | None  # the update layout's fsdp dimension; None = kept whole
  fsdp: int
  tensor_spec: PartitionSpec  # the parameter's tensor-parallel layout
  over_data: bool = True  # False under local SGD: each data replica keeps its own gradient
  over_stage: bool = True  # False for a layer stack split over pipeline stages

  @classmethod
  def for_stage(
    cls, zero_stage: int, param_spec, update_spec, fsdp: int, over_data: bool = True
  ) -> GradReduction:
    dim = fsdp_dim(update_spec)
    if fsdp_dim(param_spec) is not None:
      when = "backward"
    elif dim is not None and zero_stage == 2:
      when = "microbatch"
    else:
      when = "step"
    over_stage = "stage" not in jax.tree.leaves(tuple(param_spec))
    return cls(when, dim, fsdp, keep_axes(param_spec, {"tensor"}), over_data, over_stage)

  def accumulator_shape(self, local_shape) -> tuple[int, ...]:
    shape = list(local_shape)
    if self.when == "microbatch":
      shape[self.scatter_dim] //= self.fsdp
    return tuple(shape)

  def per_microbatch(self, grad, dtype):
    if self.when != "microbatch":
      return grad
    scatter = lambda g: _scatter(g.astype(dtype), self.scatter_dim).astype(jnp.float32)
    return _tensor_manual(scatter, grad, self.tensor_spec, self.scatter_dim)

  def per_step(self, grad, dtype):
    """The accumulated local gradient, summed over the whole batch, in float32."""

    def reduce(g):
      g = g.astype(dtype)
      axes = ["data"] if self.over_data else []
      if self.when == "step":
        if self.scatter_dim is None:
          axes.append("fsdp")
        else:
          g = _scatter(g, self.scatter_dim)
      g = jax.lax.psum(g, tuple(axes)) if axes else g
      # Outside the layer stacks every pipeline stage adds its rows' share last: the reductions
      # above are the ones a run without stages makes, and what crosses the stages (which may
      # span slices) is the reduced gradient: its fsdp shard where the stage scatters it.
      g = jax.lax.psum(g, "stage") if self.over_stage else g
      return g.astype(jnp.float32)

    return _tensor_manual(reduce, grad, self.tensor_spec, self.scatter_dim)


def _scatter(x, dim):
  return jax.lax.psum_scatter(x, "fsdp", scatter_dimension=dim, tiled=True)


def _tensor_manual(collective, x, tensor_spec: PartitionSpec, fsdp_dim: int | None):
  """Runs collectives over the batch axes with tensor manual too, each device on its own
  tensor shard. In a region manual over the batch axes only, the partitioner gathers
  tensor-sharded dims whole around a reduce-scatter (measured: twice the bytes on tensor=2), and
  XLA's CPU compiler aborts on a bfloat16 reduction (jax 0.10.2: the reducer carries a sharding
  constraint). A dim that fsdp and tensor share (fsdp outermost) enters whole over tensor: in a
  nested region its blocks would come out in tensor-major order."""
  if "tensor" in manual_axes():
    return collective(x)
  spec = PartitionSpec(*(None if i == fsdp_dim else e for i, e in enumerate(tensor_spec)))
  return jax.shard_map(collective, in_specs=spec, out_specs=spec, axis_names={"tensor"})(x)


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or "fsdp" not in mesh.axis_names else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh. Inside a manual
  region only the automatic axes (tensor) are constrained."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  spec = spec_for(names, x.shape, mesh, False)
  manual = manual_axes()
  if manual:
    spec = keep_axes(spec, set(mesh.axis_names) - manual)
  return jax.lax.with_sharding_constraint(x, spec)


def gather_layer(params, logical, global_shapes, reduce_dtype=None):
  """Parameters stored sharded over fsdp (ZeRO-3), gathered whole for compute; trees alike
  (`logical` and `global_shapes` hold tuples as leaves), or one array, its names and shape.

  The gradient goes back to the sharded layout with a reduce-scatter. Inside the training
  step's manual region (fsdp manual) that is an explicit `all_gather` whose transpose is a
  `psum_scatter` in `reduce_dtype`; elsewhere (evaluation, decoding) sharding constraints let
  the partitioner place the same collectives. An array that already has its global shape (the
  step gathers parameters outside the layer stacks itself) passes through.
  """
  if "fsdp" not in manual_axes():
    return _constrained_gather(params, logical)
  mesh = _current_mesh()

  def gather(x, names, shape):
    dim = fsdp_dim(spec_for(names, shape, mesh, True))
    if dim is None or tuple(x.shape) == tuple(shape):
      return x
    tensor_spec = keep_axes(spec_for(names, shape, mesh, False), {"tensor"})
    return _all_gather_fsdp(x, dim, reduce_dtype or x.dtype, tensor_spec)

  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x)
  if not isinstance(logical, dict):
    return gather(params, logical, global_shapes)
  return jax.tree.map(
    lambda names, x, shape: gather(x, names, shape),
    logical,
    params,
    global_shapes,
    is_leaf=is_names,
  )


def _all_gather_fsdp(x: jax.Array, dim: int, reduce_dtype, tensor_spec) -> jax.Array:
  @jax.custom_vjp
  def gather(x):
    return _tensor_manual(
      lambda x: jax.lax.all_gather(x, "fsdp", axis=dim, tiled=True), x, tensor_spec, dim
    )

  def fwd(x):
    return gather(x), None

  def bwd(_, g):
    scatter = lambda g: _scatter(g.astype(reduce_dtype), dim).astype(g.dtype)
    return (_tensor_manual(scatter, g, tensor_spec, dim),)

  gather.defvjp(fwd, bwd)
  return gather(x)


def _constrained_gather(params, logical):
  gathered, sharded = fsdp_specs(logical, params)

  @jax.custom_vjp
  def gather(p):
    return jax.lax.with_sharding_constraint(p, gathered)

  def fwd(p):
    return gather(p), None

  def bwd(_, g):
    return (jax.lax.with_sharding_constraint(g, sharded),)

  gather.defvjp(fwd, bwd)
  return gather(params)


def fsdp_specs(logical, params):
  """(gathered, sharded) PartitionSpecs under ZeRO-3, trees like `params` (or one array and its
  names)."""
  mesh = _current_mesh()

  def specs(shard):
    return jax.tree.map(
      lambda n, x: spec_for(n, x.shape, mesh, shard),
      logical,
      params,
      is_leaf=lambda x: isinstance(x, tuple),
    )

  return specs(False), specs(True)
