"""Pipeline parallelism: the layer stacks split over the `stage` mesh axis, GPipe or circular.

A stack of L layers holds, on stage s, the groups g = r * S + s (r < R) of k = L / (S * R)
consecutive layers: with R = 1 (GPipe) one contiguous block; with R > 1 (circular, MaxText's)
R blocks, so a microbatch loops over the stages R times. Inside a region manual over `stage`,
`run` is a scan of M * R + S - 1 iterations: each iteration every stage runs its current
microbatch through k layers and sends the result to the next stage (one ppermute). Bubble
iterations (a stage with no microbatch yet, or none left) compute on zeros and their outputs
are never stored, so they reach neither the outputs nor the gradients. The backward pass is
autodiff's; each iteration is rematerialized, so it keeps one stage input per iteration.

Stage 0 keeps a buffer of M microbatch activations: the inputs at first, then what the last
stage sends back (the next repeat's input, or after the last repeat the output). Writes land
only in slots whose microbatch is done with them, so M >= S suffices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

AXIS = "stage"
# What a bubble iteration sends on. Never read by the schedule's results: a test sets it to NaN
# to show that nothing a bubble computes leaks into the loss or the gradients.
BUBBLE_VALUE = 0.0


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: int  # S
  repeats: int  # R: 1 is GPipe; more is circular
  microbatches: int  # M, a multiple of S
  gather: str = "step"  # ZeRO-3: a stage's layers gathered once per pass or every iteration

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    """Iterations in which a stage has no microbatch: (S - 1) / (M * R + S - 1)."""
    return (self.stages - 1) / self.iterations

  def layers_per_group(self, num_layers: int) -> int:
    return num_layers // (self.stages * self.repeats)

  def run(self, stage_fn: Callable, inputs: jax.Array) -> jax.Array:
    """inputs [M, mb, ...]: this (data, fsdp) group's microbatches, on every stage. stage_fn(x,
    microbatch, repeat) -> y runs this stage's k layers of repeat `repeat` (traced ints).
    Returns [M, mb, ...], the outputs, valid on stage 0 only."""
    s, m, r = self.stages, self.microbatches, self.repeats
    stage = jax.lax.axis_index(AXIS)
    step = jax.checkpoint(stage_fn, prevent_cse=False)
    to_next = [(i, (i + 1) % s) for i in range(s)]

    def iteration(carry, t):
      buffer, received = carry
      work = t - stage  # the work item of this stage: repeat work // M, microbatch work % M
      valid = (work >= 0) & (work < m * r)
      x = jnp.where(stage == 0, buffer[t % m], received)
      x = jnp.where(valid, x, jnp.zeros_like(x))  # a bubble computes on zeros
      microbatch, repeat = jnp.mod(work, m), jnp.clip(work // m, 0, r - 1)
      y = step(x, microbatch, repeat)
      y = jnp.where(valid, y, jnp.asarray(BUBBLE_VALUE, y.dtype))
      received = jax.lax.ppermute(y, AXIS, to_next)
      # Stage 0 stores what the last stage finished: the next repeat's input, or an output.
      done = t - (s - 1)
      store = (stage == 0) & (done >= 0) & (done < m * r)
      slot = jnp.mod(done, m)
      kept = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
      buffer = jax.lax.dynamic_update_index_in_dim(
        buffer, jnp.where(store, received, kept), slot, 0
      )
      return (buffer, received), None

    first = jnp.full_like(inputs[0], BUBBLE_VALUE)  # what stages receive before any microbatch
    (buffer, _), _ = jax.lax.scan(iteration, (inputs, first), jnp.arange(self.iterations))
    return buffer


def to_stage_order(x: jax.Array, schedule: Schedule) -> jax.Array:
  """A stacked array [L, ...] in layer order -> stage order: stage s's groups (r * S + s for
  r < R) contiguous, so that a block split over `stage` gives each stage its own layers. The
  identity for R = 1."""
  s, r = schedule.stages, schedule.repeats
  if r == 1:
    return x
  k = x.shape[0] // (s * r)
  return x.reshape(r, s, k, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def to_layer_order(x: jax.Array, schedule: Schedule) -> jax.Array:
  """The inverse of `to_stage_order`: what checkpoints and exports hold."""
  s, r = schedule.stages, schedule.repeats
  if r == 1:
    return x
  k = x.shape[0] // (s * r)
  return x.reshape(s, r, k, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def permute_bytes(schedule: Schedule, activation_bytes: int) -> int:
  """Theory: collective-permute bytes each device sends per pipeline pass, forward and
  backward: one microbatch's activations per iteration each way."""
  return 2 * schedule.iterations * activation_bytes
