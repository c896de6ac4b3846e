"""The loss sums a step or an evaluation adds up: cross-entropy, and distillation's mix.

Sums, not means, so that microbatches and devices add up exactly; the train step divides by
the target tokens once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lm.layout import Layout
from lm.models.loss import cross_entropy_sums, distill_sums
from lm.models.transformer import segment_ids


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen model to distill from (train.teacher): its layout on the student's mesh and
  stage, and its parameters, which the step takes as an argument (never donated or saved)."""

  layout: Layout
  params: Any

  def logits(self, params, batch: dict) -> jax.Array:
    """Its logits without dropout, inside the step's manual region."""
    return self.layout.logits(self.layout.gathered(params), batch)


def loss_sums(
  layout: Layout, params, batch: dict, dropout_key, label_smoothing: float, teacher_logits=None
):
  """(loss sum, (target tokens, correct tokens)) of one batch (task=classify: examples, not
  tokens); with `teacher_logits`, the
  distillation mix (train.distill_weight, train.distill_temperature)."""
  logits = layout.logits(params, batch, dropout_key)  # [batch, length, vocab] float32
  targets, limit = batch.get("targets"), layout.vocab_limit
  if layout.cfg.task == "classify":
    # One label per row: its class logits [batch, classes] as one position; the counts are
    # examples (padding rows, all segment 0, count none), so the step's mean is per example.
    weights = (segment_ids(batch, "inputs").max(axis=1, keepdims=True) > 0).astype(jnp.float32)
    logits, targets, limit = logits[:, None], batch["labels"][:, None], None
    if teacher_logits is not None:
      teacher_logits = teacher_logits[:, None]
  else:
    weights = (segment_ids(batch, "targets") > 0).astype(jnp.float32)
  loss, tokens, correct = cross_entropy_sums(logits, targets, weights, label_smoothing, limit)
  if teacher_logits is not None:
    t = layout.cfg.train
    kl = distill_sums(logits, teacher_logits, weights, t.distill_temperature, limit)
    loss = (1.0 - t.distill_weight) * loss + t.distill_weight * kl
  return loss, (tokens, correct)


def training_loss_sums(layout: Layout, params, batch: dict, dropout_key, teacher_logits=None):
  """What training minimizes: cross-entropy with model.label_smoothing (and distillation)."""
  return loss_sums(
    layout, params, batch, dropout_key, layout.cfg.model.label_smoothing, teacher_logits
  )


def nll_sums(layout: Layout, params, batch: dict):
  """(negative log-likelihood sum, (target tokens, correct tokens)): no smoothing, no dropout,
  so that exp(sum / tokens) is a perplexity."""
  return loss_sums(layout, params, batch, None, 0.0)
