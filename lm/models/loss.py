"""Label-smoothed cross-entropy, summed so that microbatches add up exactly; and the sums over
sequence chunks that keep one chunk's logits at a time."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lm.parallel.memory import balanced_chunks


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


def chunked_sums(sums_of: Callable, chunk: int, *per_position) -> tuple[jax.Array, ...]:
  """`sums_of(*per_position)` (a tuple of sums over positions, the first differentiable: the
  loss) added up over chunks of `chunk` positions along axis 1 of every array ([batch, length,
  ...]; None passes through). Gradients flow to the first array (the hidden states) and to what
  `sums_of` closes over (the head's weights).

  A `lax.scan` over the chunks with a custom VJP: under differentiation each chunk's gradient
  is taken as its sums are (`jax.vjp` inside the scan), so one chunk's logits serve its forward
  and its backward, then are dropped; the weights' gradient adds up over the chunks, and the
  backward only scales what the forward kept by the loss's cotangent. No chunk is recomputed.
  The last chunk is padded with zeros, which `sums_of` must weigh as nothing (weights 0).
  chunk 0: one call over all positions.
  """
  if not chunk:
    return sums_of(*per_position)
  length = jax.tree.leaves(per_position)[0].shape[1]
  count, chunk = balanced_chunks(length, chunk)

  def split(x):  # [batch, length, ...] -> [count, batch, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, count * chunk - length)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], count, chunk, *x.shape[2:]).swapaxes(0, 1)

  chunks = jax.tree.map(split, per_position)
  # The closed-over values that carry gradient (the head's weights) become arguments, so that
  # the custom VJP can return their gradient.
  converted, weights = jax.closure_convert(sums_of, *jax.tree.map(lambda x: x[0], chunks))
  return _chunk_sums(converted, chunks, *weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_sums(sums_of, chunks, *weights):
  # Per-chunk sums as the scan's outputs, not a carry: no initial value to match the manual
  # region's varying axes.
  _, per_chunk = jax.lax.scan(lambda _, c: (None, sums_of(*c, *weights)), None, chunks)
  return tuple(s.sum(axis=0) for s in per_chunk)


def _chunk_sums_forward(sums_of, chunks, *weights):
  def body(grad_w, c):  # this chunk's sums and the loss's gradient (features, weights)
    others = c[1:]
    sums, vjp = jax.vjp(lambda x, w: sums_of(x, *others, *w), c[0], weights)
    grad_x, chunk_grad_w = vjp((jnp.ones_like(sums[0]), *map(jnp.zeros_like, sums[1:])))
    added = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_w, chunk_grad_w)
    return added, (sums, grad_x)

  # Inside a manual region the carry varies over the axes its summands vary over. float32
  # whatever the weights' dtype: a bfloat16 sum over many chunks would lose what one dot keeps.
  leaves = jax.tree.leaves((chunks, weights))
  varying = frozenset().union(*(jax.typeof(x).mat.varying for x in leaves))
  zeros = tuple(_varying(jnp.zeros(w.shape, jnp.float32), varying) for w in weights)
  grad_w, (per_chunk, grad_x) = jax.lax.scan(body, zeros, chunks)
  grad_w = tuple(g.astype(w.dtype) for g, w in zip(grad_w, weights, strict=True))
  others = jax.tree.map(lambda _: None, chunks[1:])  # no gradient: targets, weights, teacher
  return tuple(s.sum(axis=0) for s in per_chunk), (grad_x, grad_w, others)


def _varying(x: jax.Array, axes: frozenset) -> jax.Array:
  missing = tuple(sorted(axes - jax.typeof(x).mat.varying))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _chunk_sums_backward(sums_of, residuals, cotangents):
  grad_x, grad_w, others = residuals
  scale = cotangents[0]  # only the loss carries gradient
  return ((grad_x * scale, *others), *jax.tree.map(lambda g: g * scale, grad_w))


_chunk_sums.defvjp(_chunk_sums_forward, _chunk_sums_backward)


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
