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
from jax.sharding import NamedSharding, PartitionSpec

# logical axis -> mesh axes. ZeRO decides only whether 'embed' maps to 'fsdp'.
RULES = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("embed", None),
  ("kv", None),
  ("length", None),
  ("layers", None),
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
      axes[shared[0]] = (axes[shared[0]], "fsdp")
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
  """Where each kind of training state lives for one ZeRO stage."""

  params: object
  grads: object  # the gradient accumulator over microbatches
  update: object  # per-parameter layout of the optimizer update (the opt-state sharding)
  opt_state: object
  batch: NamedSharding
  replicated: NamedSharding


def stage_shardings(logical, shapes, mesh, zero_stage: int, opt_state_fn) -> StateShardings:
  """Shardings of params, grads and optimizer state; `opt_state_fn(param_shardings)` maps
  the opt-state sharding of each parameter onto the optimizer's state tree."""
  shards = STAGE_SHARDS[zero_stage]

  def kind(name):
    return named_shardings(logical, shapes, mesh, name in shards)

  return StateShardings(
    params=kind("params"),
    grads=kind("grads"),
    update=kind("opt_state"),
    opt_state=opt_state_fn(kind("opt_state")),
    batch=NamedSharding(mesh, PartitionSpec(_RULES["batch"])),
    replicated=NamedSharding(mesh, PartitionSpec()),
  )


def _current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or "fsdp" not in mesh.axis_names else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh."""
  mesh = _current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh, False))


def gather_layer(params, logical):
  """One layer's parameters, stored sharded over fsdp (ZeRO-3), all-gathered for compute.

  The custom VJP constrains the gradient back to the sharded layout, so the backward pass
  reduce-scatters each layer's gradient instead of all-reducing it.
  """
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
