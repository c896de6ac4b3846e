"""Autoregressive decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.data.tokenizer import EOS_ID, PAD_ID
from lm.models.transformer import default_segments_and_positions, shift_right


def greedy_translate(graphdef, params, inputs: jax.Array, max_len: int) -> jax.Array:
  """Greedy decoding of an EncoderDecoder: [batch, src_len] -> [batch, max_len] tokens.

  Re-runs the decoder over the prefix at every step (no cache): simple and exact. Tokens after
  EOS are PAD; a row that never emits EOS keeps all max_len tokens.
  """
  model = nnx.merge(graphdef, params)
  in_seg, in_pos = default_segments_and_positions(inputs)
  encoded = model.encode(inputs, in_seg, in_pos)
  batch = inputs.shape[0]
  positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
  segments = jnp.ones((batch, max_len), jnp.int32)

  def step(t, carry):
    out, done = carry
    logits = model.decode(encoded, in_seg, shift_right(out, positions), segments, positions)
    token = jnp.where(done, PAD_ID, logits[:, t].argmax(-1).astype(jnp.int32))
    return out.at[:, t].set(token), done | (token == EOS_ID)

  out = jnp.zeros((batch, max_len), jnp.int32)
  out, _ = jax.lax.fori_loop(0, max_len, step, (out, jnp.zeros((batch,), bool)))
  return out
