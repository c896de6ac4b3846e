"""Label-smoothed cross-entropy, summed so that microbatches add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, weights, label_smoothing: float = 0.0):
  """Returns (sum of per-token losses, sum of weights, number of correct tokens).

  The smoothed target puts 1 - eps on the label and eps / V on every class (the label
  included). This is optax.smooth_labels + softmax_cross_entropy, written without the
  [batch, length, vocab] one-hot, which costs as much memory as the logits.
  logits [b, l, vocab] float32; targets, weights [b, l].
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss = nll
  if label_smoothing:
    loss = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
  correct = (logits.argmax(-1) == targets) * weights
  return (loss * weights).sum(), weights.sum(), correct.sum()
