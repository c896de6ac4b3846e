"""task=classify: a Transformer body under a pooled classification head.

The body is the translation model's encoder stack (bidirectional; pooling "mean" over the
example's tokens or its "first" token) or the language model's decoder stack (causal; pooling
"last", the one position that has seen the whole text). Its parameters are named as in those
models (embed, encoder / decoder, encoder_norm / decoder_norm, pos_table), so a translation or
LM checkpoint's body loads into it as it is; the head (head/kernel, head/bias) starts fresh.
A row holds one example: `inputs` [batch, length], its `inputs_segment_ids` (0 on padding,
whatever the padding's token id) and, for training and evaluation, `labels` [batch].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.models.attention import AttentionMask
from lm.models.layers import Embedding, Norm, dropout, split_keys
from lm.models.transformer import (
  DecoderLayer,
  EncoderLayer,
  LayerStack,
  ModelDims,
  _Model,
  default_positions,
  segment_ids,
  shift_right,
)
from lm.models.transformer import (
  build_model as build_transformer,
)
from lm.parallel.sharding import constrain


class ClassHead(nnx.Module):
  """Pooled features [batch, embed] -> class logits [batch, classes] float32."""

  def __init__(self, dims: ModelDims, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(stddev=dims.d_model**-0.5)
    shape = (dims.d_model, dims.num_classes)
    self.kernel = nnx.Param(
      init(rngs.params(), shape, dims.param_dtype), out_sharding=("embed", "classes")
    )
    self.bias = nnx.Param(
      jnp.zeros((dims.num_classes,), dims.param_dtype), out_sharding=("classes",)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    out = x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
    return constrain(out + self.bias[...].astype(jnp.float32), ("batch", "classes"))


class SequenceClassifier(_Model):
  def __init__(self, dims: ModelDims, rngs: nnx.Rngs):
    assert dims.num_classes >= 2, "resolve model.num_classes before building the model"
    self.dims = dims
    self.embed = Embedding(dims, rngs)
    self._init_positions(dims, rngs)
    if dims.classifier_body == "encoder":
      self.encoder = LayerStack(lambda r: EncoderLayer(dims, r), dims.enc_layers, dims, rngs)
      self.encoder_norm = None if dims.post_norm else Norm(dims, rngs)
    else:
      self.decoder = LayerStack(lambda r: DecoderLayer(dims, False, r), dims.dec_layers, dims, rngs)
      self.decoder_norm = None if dims.post_norm else Norm(dims, rngs)
    self.head = ClassHead(dims, rngs)

  def features(self, inputs, segments, key=None) -> jax.Array:
    """The body's output [batch, length, embed]."""
    d = self.dims
    k_embed, k_layers = split_keys(key, 2)
    positions = default_positions(inputs)
    if d.classifier_body == "encoder":
      x = dropout(self.embed_tokens(inputs, positions), d.dropout_rate, k_embed)
      mask = AttentionMask(segments, segments)
      x = self.encoder(x, k_layers, mask=mask, positions=positions)
      return self.final_norm(x, self.encoder_norm)
    # As the LM reads text: the start token, then the text (its EOS last, which shifts out).
    tokens = shift_right(inputs, positions, d.start_id)
    x = dropout(self.embed_tokens(tokens, positions), d.dropout_rate, k_embed)
    mask = AttentionMask(segments, segments, causal=True)
    x = self.decoder(x, k_layers, mask=mask, positions=positions)
    return self.final_norm(x, self.decoder_norm)

  def pool(self, x, segments) -> jax.Array:
    """[batch, length, embed] -> [batch, embed] over each row's real positions only."""
    real = (segments > 0).astype(x.dtype)
    if self.dims.pooling == "first":
      return x[:, 0]
    if self.dims.pooling == "last":
      last = jnp.maximum(real.sum(axis=1).astype(jnp.int32) - 1, 0)
      return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    total = jnp.einsum("ble,bl->be", x, real)
    return total / jnp.maximum(real.sum(axis=1), 1.0)[:, None]

  def __call__(self, batch: dict, dropout_key=None) -> jax.Array:
    """Class logits [batch, classes] float32."""
    k_body, k_pool = split_keys(dropout_key, 2)
    segments = segment_ids(batch, "inputs")
    pooled = self.pool(self.features(batch["inputs"], segments, k_body), segments)
    return self.head(dropout(pooled, self.dims.dropout_rate, k_pool))


def build_model(task: str, dims: ModelDims, seed: int) -> nnx.Module:
  """The model for any task (a classifier, or lm.models.transformer's); call inside
  `nnx.use_eager_sharding(False)` or a jitted init."""
  if task == "classify":
    return SequenceClassifier(dims, nnx.Rngs(params=seed))
  return build_transformer(task, dims, seed)
