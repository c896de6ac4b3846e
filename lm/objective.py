"""The loss sums a step or an evaluation adds up: cross-entropy, and distillation's mix.

Sums, not means, so that microbatches and devices add up exactly; the train step divides by
the target tokens once. A sequence model's logits are computed from its final hidden states
chunk by chunk (model.loss_chunk positions), so no step holds [tokens, vocab] whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lm.layout import Layout
from lm.models.loss import chunked_sums, cross_entropy_sums, distill_sums
from lm.models.transformer import segment_ids

# What the loss projects: (features, head), head(features) = the logits.
Outputs = tuple[jax.Array, Callable[[jax.Array], jax.Array]]


def model_outputs(layout: Layout, params, batch: dict, dropout_key=None) -> Outputs:
  """A sequence model's final hidden states [batch, length, embed] and its output head, which
  the loss applies chunk by chunk; a classifier's class logits as one position per row
  [batch, 1, classes] and the identity."""
  if layout.cfg.task == "classify":
    return layout.logits(params, batch, dropout_key)[:, None], lambda x: x
  return layout.hidden(params, batch, dropout_key), layout.head(params)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model to distill from (train.teacher): its layout on the student's mesh and
  stage, and its parameters, which the step takes as an argument (never donated or saved)."""

  layout: Layout
  params: Any

  def outputs(self, params, batch: dict) -> Outputs:
    """Its hidden states and head (model_outputs) without dropout or gradient, inside the
    step's manual region; the parameters outside its stacks gathered once for both."""
    params = jax.lax.stop_gradient(self.layout.gathered(params))
    return model_outputs(self.layout, params, batch)


def loss_sums(
  layout: Layout,
  params,
  batch: dict,
  dropout_key,
  label_smoothing: float,
  teacher: Outputs | None = None,
):
  """(loss sum, (target tokens, correct tokens)) of one batch (task=classify: examples, not
  tokens); with the `teacher`'s outputs for the batch, the distillation mix
  (train.distill_weight, train.distill_temperature)."""
  outputs = model_outputs(layout, params, batch, dropout_key)
  return output_loss_sums(layout, outputs, batch, label_smoothing, teacher)


def output_loss_sums(
  layout: Layout,
  outputs: Outputs,
  batch: dict,
  label_smoothing: float,
  teacher: Outputs | None = None,
):
  """loss_sums from the model's outputs for the batch (model_outputs)."""
  features, head = outputs
  limit, chunk = layout.vocab_limit, layout.cfg.model.loss_chunk
  if layout.cfg.task == "classify":
    # One label per row: its class logits as one position; the counts are examples (padding
    # rows, all segment 0, count none), so the step's mean is per example. Never chunked.
    weights = (segment_ids(batch, "inputs").max(axis=1, keepdims=True) > 0).astype(jnp.float32)
    targets, limit, chunk = batch["labels"][:, None], None, 0
  else:
    weights = (segment_ids(batch, "targets") > 0).astype(jnp.float32)
    targets = batch["targets"]
  teacher_features, teacher_head = teacher or (None, None)
  t = layout.cfg.train

  def sums(features, targets, weights, teacher_features):
    logits = head(features)  # [batch, positions, vocab] float32
    loss, tokens, correct = cross_entropy_sums(logits, targets, weights, label_smoothing, limit)
    if teacher_head is not None:
      # stop_gradient: the chunks' vjp then builds no gradient of the teacher's head at all.
      taught = jax.lax.stop_gradient(teacher_head(teacher_features))
      kl = distill_sums(logits, taught, weights, t.distill_temperature, limit)
      loss = (1.0 - t.distill_weight) * loss + t.distill_weight * kl
    return loss, tokens, correct

  loss, tokens, correct = chunked_sums(sums, chunk, features, targets, weights, teacher_features)
  return loss, (tokens, correct)


def training_loss_sums(layout: Layout, params, batch: dict, dropout_key, teacher=None):
  """What training minimizes: cross-entropy with model.label_smoothing (and distillation)."""
  return loss_sums(layout, params, batch, dropout_key, layout.cfg.model.label_smoothing, teacher)


def nll_sums(layout: Layout, params, batch: dict):
  """(negative log-likelihood sum, (target tokens, correct tokens)): no smoothing, no dropout,
  so that exp(sum / tokens) is a perplexity."""
  return loss_sums(layout, params, batch, None, 0.0)
