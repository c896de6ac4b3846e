"""Label-smoothed cross-entropy, summed so that microbatches add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(
  logits: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  label_smoothing: float = 0.0,
  vocab_limit: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (sum of per-token losses, sum of weights, number of correct tokens).

  Only ids below `vocab_limit` (default: all) are classes: the rows padded onto the embedding
  for the mesh, or past the tokenizer, get no probability, as in decoding. The smoothed target
  puts 1 - eps on the label and eps / V on every class (the label included): loss = logsumexp -
  (1 - eps) * logit[label] - eps * mean(logits). This equals optax.smooth_labels +
  softmax_cross_entropy without materializing the [batch, length, vocab] one-hot or
  log-probabilities, which cost as much memory and bandwidth as the logits.
  logits [b, l, vocab] float32; targets, weights [b, l].
  """
  classes = logits.shape[-1] if vocab_limit is None else min(vocab_limit, logits.shape[-1])
  real = jnp.arange(logits.shape[-1]) < classes  # [vocab]
  if classes < logits.shape[-1]:
    logits = jnp.where(real, logits, -jnp.inf)
  label_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  loss = log_z - label_logit
  if label_smoothing:
    class_sum = jnp.where(real, logits, 0.0).sum(axis=-1)
    loss = loss - label_smoothing * (class_sum / classes - label_logit)
  # Correct when the label's logit is the maximum (ties count as correct).
  correct = (label_logit >= jax.lax.stop_gradient(logits.max(axis=-1))) * weights
  return (loss * weights).sum(), weights.sum(), correct.sum()
