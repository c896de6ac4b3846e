"""Label-smoothed cross-entropy, summed so that microbatches add up exactly."""

from __future__ import annotations

import functools

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
  puts 1 - eps on the label and eps / V on every class (the label included), which equals
  optax.smooth_labels + softmax_cross_entropy over the V classes.
  logits [b, l, vocab] float32; targets, weights [b, l].
  """
  classes = logits.shape[-1] if vocab_limit is None else min(vocab_limit, logits.shape[-1])
  loss, label_logit, max_logit = _token_losses(logits, targets, label_smoothing, classes)
  # Correct when the label's logit is the maximum (ties count as correct).
  correct = (label_logit >= max_logit) * weights
  return (loss * weights).sum(), weights.sum(), correct.sum()


def distill_sums(
  logits: jax.Array,
  teacher_logits: jax.Array,
  weights: jax.Array,
  temperature: float,
  vocab_limit: int | None = None,
) -> jax.Array:
  """Sum over tokens of temperature^2 * KL(teacher || student) between the softmaxes of
  logits / temperature (Hinton et al. 2015: the T^2 keeps gradients comparable across T).
  Only ids below `vocab_limit` are classes; a teacher with another padded vocab is cut or
  padded to the student's. logits [b, l, vocab] float32; weights [b, l]."""
  vocab = logits.shape[-1]
  teacher_logits = teacher_logits[..., :vocab].astype(logits.dtype)
  if teacher_logits.shape[-1] < vocab:
    pad = [(0, 0)] * (teacher_logits.ndim - 1) + [(0, vocab - teacher_logits.shape[-1])]
    teacher_logits = jnp.pad(teacher_logits, pad)
  classes = vocab if vocab_limit is None else min(vocab_limit, vocab)
  real, offsets = _class_offsets(logits, classes)
  log_q = jax.nn.log_softmax(logits / temperature + offsets, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits / temperature + offsets, axis=-1)
  kl = (jnp.exp(log_p) * (log_p - log_q) * real).sum(axis=-1)
  return (kl * weights).sum() * temperature**2


def _class_offsets(logits: jax.Array, classes: int) -> tuple[jax.Array, jax.Array]:
  """[vocab] float32: 1 for a class, else 0; and 0 for a class, else -1e30 (finite, so that
  exp underflows to exactly 0 with no inf arithmetic). Arithmetic masks rather than `where`:
  XLA's CPU reductions over a select ran ~10x slower than over a multiply or an add."""
  real = (jnp.arange(logits.shape[-1]) < classes).astype(logits.dtype)
  return real, (real - 1.0) * 1e30


def _one_hot(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return (jnp.arange(logits.shape[-1]) == targets[..., None]).astype(logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits, targets, label_smoothing: float, classes: int):
  """(loss, label logit, max logit) per token [b, l]; the last two carry no gradient.

  A custom VJP: the gradient is one elementwise pass, softmax - smoothed one-hot, where plain
  autodiff scatters the one-hot into a zero [b, l, vocab] array.
  """
  return _forward(logits, targets, label_smoothing, classes)[0]


def _forward(logits, targets, label_smoothing, classes):
  real, offsets = _class_offsets(logits, classes)
  masked = logits + offsets
  max_logit = masked.max(axis=-1)
  log_z = max_logit + jnp.log(jnp.exp(masked - max_logit[..., None]).sum(axis=-1))
  label_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = log_z - label_logit
  if label_smoothing:
    class_mean = (logits * real).sum(axis=-1) / classes
    loss = loss - label_smoothing * (class_mean - label_logit)
  return (loss, label_logit, max_logit), (logits, targets, log_z)


def _backward(label_smoothing, classes, residuals, cotangents):
  logits, targets, log_z = residuals
  real, offsets = _class_offsets(logits, classes)
  probs = jnp.exp(logits + offsets - log_z[..., None])
  target = (1.0 - label_smoothing) * _one_hot(logits, targets) + (label_smoothing / classes) * real
  return cotangents[0][..., None] * (probs - target), None  # only the loss carries gradient


_token_losses.defvjp(_forward, _backward)
