"""Local SGD (train.sync_every > 0): data replicas that train apart and merge every few steps.

Each data replica keeps its own parameters and inner optimizer state, stacked on a leading
[data] axis, and counts its target tokens since the last sync. The train state's `params` are
then the replicas' consensus at the last sync (what evaluation, export and serving read) and
its `opt_state` is the outer optimizer's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lm import optim
from lm.layout import Layout


def per_replica(shardings):
  """Local SGD: a layout with a leading [data] axis, one copy per data replica."""
  return jax.tree.map(
    lambda s: jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec("data", *s.spec)),
    shardings,
  )


@dataclasses.dataclass(frozen=True)
class LocalSGD:
  layout: Layout
  outer_tx: optax.GradientTransformation

  @classmethod
  def build(cls, layout: Layout) -> LocalSGD | None:
    """None when training is fully synchronous (train.sync_every = 0)."""
    if not layout.cfg.train.sync_every:
      return None
    return cls(layout, optim.outer_optimizer(layout.cfg.train))

  @property
  def replica_count(self) -> int:
    return self.layout.mesh.shape["data"]

  def replica_shardings(self, inner_opt_state_shardings) -> dict:
    mesh = self.layout.mesh
    return {
      "params": per_replica(self.layout.shardings.params),
      "opt_state": per_replica(inner_opt_state_shardings),
      "tokens": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
    }

  def fresh_replicas(self, params, inner_tx: optax.GradientTransformation) -> dict:
    """Every replica starting from `params`, with a fresh inner optimizer state."""
    stacked = self._stacked(params)
    return {
      "params": stacked,
      "opt_state": jax.vmap(inner_tx.init)(stacked),
      "tokens": jnp.zeros((self.replica_count,), jnp.float32),
    }

  def _stacked(self, params):
    d = self.replica_count
    return jax.tree.map(lambda p: jnp.broadcast_to(p, (d, *p.shape)), params)

  def sync_step(self, state):
    """The outer step: the replicas' parameters averaged, weighted by the target tokens each
    trained on since the last sync; the outer optimizer moves the consensus `params` by
    (params - average) ("average": onto the average), and every replica restarts from it. The
    replicas keep their inner optimizer states (DiLoCo). One all-reduce over data."""
    shardings = self.layout.shardings
    tokens = state.replicas["tokens"]
    total = tokens.sum()
    weights = jnp.where(total > 0, tokens / jnp.maximum(total, 1.0), 1.0 / tokens.shape[0])
    # Averaged into the optimizer state's layout: each device sums only its fsdp shard over
    # data, then the new consensus is gathered over fsdp like any update.
    average = jax.lax.with_sharding_constraint(
      jax.tree.map(
        lambda p: jnp.tensordot(weights, p.astype(jnp.float32), axes=1), state.replicas["params"]
      ),
      shardings.update,
    )
    if self.layout.cfg.train.outer_optimizer == "average":
      params, opt_state = average, state.opt_state
    else:
      delta = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a, state.params, average)
      updates, opt_state = self.outer_tx.update(delta, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    params = jax.lax.with_sharding_constraint(
      jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params),
      shardings.params,
    )
    replicas = {
      **state.replicas,
      "params": self._stacked(params),
      "tokens": jnp.zeros_like(tokens),
    }
    return state.replace(params=params, opt_state=opt_state, replicas=replicas)
