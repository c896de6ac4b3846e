"""EncoderDecoder (translation) and Decoder (language model) from the same layers.

Layers are stacked on a leading 'layers' axis and run with `lax.scan`, so compile time does
not grow with depth; under ZeRO-3 each scan iteration gathers just its own layer.
Batches are dicts of [batch, length] int32 arrays: `inputs`, `targets` and, for packing,
`*_segment_ids` (0 = padding) and `*_positions` (restarting at every packed example).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import PartitionSpec

from lm.models import attention
from lm.models.attention import AttentionMask
from lm.models.layers import (
  Attention,
  Embedding,
  Mlp,
  Norm,
  adapter,
  dropout,
  lookup,
  sinusoidal,
  split_keys,
)
from lm.parallel import pipeline as pp
from lm.parallel.sharding import (
  BATCH_AXES,
  constrain,
  gather_layer,
  keep_axes,
  manual_axes,
  spec_for,
)

REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """cfg.model resolved for one run: concrete dtypes, head_dim and the padded vocab."""

  vocab_size: int
  d_model: int
  num_heads: int
  num_kv_heads: int  # resolved: num_heads without grouped-query attention
  head_dim: int
  mlp_dim: int
  enc_layers: int
  dec_layers: int
  activation: str
  positions: str
  sinusoid: str
  rope_theta: float
  max_len: int
  norm: str
  norm_eps: float
  post_norm: bool
  embed_scale: float  # token embeddings are multiplied by this
  use_bias: bool
  qkv_bias: bool
  logits_bias: bool
  tie_embeddings: bool
  start_id: int  # the decoder's input at position 0 of every segment
  dropout_rate: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  remat: str  # resolved: none, full or save_dots
  attention: str  # resolved: xla, cudnn or splash (lm/models/attention.py)
  attention_chunk: int  # query positions per step of XLA attention; 0 = the whole length
  # ZeRO-3 on fsdp > 1: parameters are stored sharded, so every layer, embedding and lookup
  # gathers its weights before use and reduce-scatters their gradient.
  params_sharded: bool = False
  # The dtype a sharded parameter's gradient is reduce-scattered in (train.grad_reduce_dtype).
  grad_reduce_dtype: jnp.dtype = jnp.dtype("float32")
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = ""
  adapter_dim: int = 0
  quantized: bool = False  # int8 matmul kernels with float scales (an int8 export)
  pipeline: pp.Schedule | None = None  # the decoder stack split over mesh.stage > 1
  num_classes: int = 0  # task=classify (lm/models/classifier.py)
  classifier_body: str = "encoder"
  pooling: str = "mean"

  @classmethod
  def from_config(
    cls,
    model_cfg,
    vocab_size: int | None = None,
    platform: str | None = None,
    params_sharded: bool = False,
    grad_reduce_dtype: str = "float32",
    pipeline: pp.Schedule | None = None,
  ) -> ModelDims:
    m = model_cfg
    dtype = m.dtype
    if dtype == "auto":
      platform = platform or jax.default_backend()
      dtype = "float32" if platform == "cpu" else "bfloat16"
    remat = m.remat
    if remat == "auto":
      # Sharded parameters: keep matmul outputs but not the gathered weights, so the backward
      # gathers each layer again instead of holding every gathered layer at once.
      remat = "save_dots" if params_sharded else "none"
      if pipeline:  # each pipeline iteration is rematerialized whole: its layers keep nothing
        remat = "none"
    platform = platform or jax.default_backend()
    head_dim = m.head_dim or m.d_model // m.num_heads
    scaled = m.embed_scale == "sqrt_d" or (m.embed_scale == "auto" and m.positions == "sinusoidal")
    return cls(
      vocab_size=vocab_size or m.vocab_size,
      d_model=m.d_model,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads or m.num_heads,
      head_dim=head_dim,
      mlp_dim=m.mlp_dim,
      enc_layers=m.enc_layers,
      dec_layers=m.dec_layers,
      activation=m.activation,
      positions=m.positions,
      sinusoid=m.sinusoid,
      rope_theta=m.rope_theta,
      max_len=m.max_len,
      norm=m.norm,
      norm_eps=m.norm_eps,
      post_norm=m.norm_position == "post",
      embed_scale=m.d_model**0.5 if scaled else 1.0,
      use_bias=m.use_bias,
      qkv_bias=m.qkv_bias,
      logits_bias=m.logits_bias,
      tie_embeddings=m.tie_embeddings,
      start_id=m.start_id,
      dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(dtype),
      param_dtype=jnp.dtype(m.param_dtype),
      remat=remat,
      attention=attention.resolve(m.attention, platform, dtype, head_dim),
      attention_chunk=m.attention_chunk,
      params_sharded=params_sharded,
      grad_reduce_dtype=jnp.dtype(grad_reduce_dtype),
      lora_rank=m.lora_rank,
      lora_alpha=m.lora_alpha,
      lora_targets=m.lora_targets,
      adapter_dim=m.adapter_dim,
      quantized=m.quantize == "int8",
      pipeline=pipeline,
      num_classes=m.num_classes,
      classifier_body=m.classifier_body,
      pooling=m.pooling,
    )


class EncoderLayer(nnx.Module):
  def __init__(self, dims: ModelDims, rngs: nnx.Rngs):
    self.attn_norm = Norm(dims, rngs)
    self.attn = Attention(dims, rngs, "attn")
    self.attn_adapter = adapter(dims, rngs)
    self.mlp_norm = Norm(dims, rngs)
    self.mlp = Mlp(dims, rngs)
    self.mlp_adapter = adapter(dims, rngs)
    self.rate = dims.dropout_rate
    self.post_norm = dims.post_norm

  def __call__(self, x, key, *, mask, positions):
    k1, k2 = split_keys(key, 2)

    def attention(h):
      return dropout(
        _adapted(self.attn_adapter, self.attn(h, h, mask, positions, positions)), self.rate, k1
      )

    x = _residual(x, self.attn_norm, attention, self.post_norm)
    mlp = lambda h: dropout(_adapted(self.mlp_adapter, self.mlp(h)), self.rate, k2)
    return _residual(x, self.mlp_norm, mlp, self.post_norm)


def _adapted(adapter_module, y):
  """A block's output through its adapter, if it has one."""
  return y if adapter_module is None else adapter_module(y)


def _residual(x, norm, block, post_norm: bool):
  """One residual block: x + block(norm(x)) (pre-norm) or norm(x + block(x)) (post-norm)."""
  if post_norm:
    return norm(x + block(x))
  return x + block(norm(x))


class DecoderLayer(nnx.Module):
  """Causal self-attention, cross-attention (encoder-decoder only), MLP."""

  def __init__(self, dims: ModelDims, cross_attention: bool, rngs: nnx.Rngs):
    self.self_attn_norm = Norm(dims, rngs)
    self.self_attn = Attention(dims, rngs, "self_attn")
    self.self_attn_adapter = adapter(dims, rngs)
    if cross_attention:
      self.cross_attn_norm = Norm(dims, rngs)
      self.cross_attn = Attention(dims, rngs, "cross_attn")
      self.cross_attn_adapter = adapter(dims, rngs)
    self.has_cross = cross_attention
    self.mlp_norm = Norm(dims, rngs)
    self.mlp = Mlp(dims, rngs)
    self.mlp_adapter = adapter(dims, rngs)
    self.rate = dims.dropout_rate
    self.post_norm = dims.post_norm

  def __call__(self, x, key, *, mask, positions, encoded=None, cross_mask=None):
    k1, k2, k3 = split_keys(key, 3)

    def attention(h):
      y = self.self_attn(h, h, mask, positions, positions)
      return dropout(_adapted(self.self_attn_adapter, y), self.rate, k1)

    x = _residual(x, self.self_attn_norm, attention, self.post_norm)
    if self.has_cross:

      def cross(h):
        # Rotary is for self-attention only: source and target positions are not comparable.
        y = self.cross_attn.attend(
          self.cross_attn.project(h, "query"),
          self.cross_attn.project(encoded, "key"),
          self.cross_attn.project(encoded, "value"),
          cross_mask,
        )
        return dropout(_adapted(self.cross_attn_adapter, y), self.rate, k2)

      x = _residual(x, self.cross_attn_norm, cross, self.post_norm)
    mlp = lambda h: dropout(_adapted(self.mlp_adapter, self.mlp(h)), self.rate, k3)
    return _residual(x, self.mlp_norm, mlp, self.post_norm)

  def _self_qkv(self, h, positions):
    attn = self.self_attn
    q, k, v = attn.project(h, "query"), attn.project(h, "key"), attn.project(h, "value")
    if attn.use_rotary:
      q, k = attn.rotate(q, positions), attn.rotate(k, positions)
    return q, k, v

  def prefill(self, x, *, mask, positions):
    """A whole prompt at once (decoder-only, no dropout): the layer's output and its
    self-attention keys/values [b, length, kv heads, kv], what decode_step would have cached."""
    assert not self.has_cross, "an encoder-decoder's decoder starts from an empty cache"
    cached = {}

    def attention(h):
      q, cached["k"], cached["v"] = self._self_qkv(h, positions)
      y = self.self_attn.attend(q, cached["k"], cached["v"], mask)
      return _adapted(self.self_attn_adapter, y)

    x = _residual(x, self.self_attn_norm, attention, self.post_norm)
    mlp = lambda h: _adapted(self.mlp_adapter, self.mlp(h))
    return _residual(x, self.mlp_norm, mlp, self.post_norm), cached

  def decode_step(self, x, cache, *, index, positions, layer, cross_mask=None, span=None):
    """One new position: x [b, 1, embed]. `cache` holds every layer's self-attention keys and
    values [layers, b, T, kv heads, kv]; this one, number `layer`, writes its new position
    (`index`: one for every row, or [b] one per row, as a server's slots are) in place and
    attends over its own first `span` positions (default all T; a caller that knows every row
    is below a span reads no more of the cache); and the source's (cross_k, cross_v), computed
    once."""
    cache = dict(cache)
    per_row = jnp.ndim(index) == 1

    def write(every, new):  # new [b, 1, kv heads, kv]: one position, not a layer, is written
      new = new.astype(every.dtype)
      if per_row:
        return every.at[layer, jnp.arange(new.shape[0]), index].set(new[:, 0])
      return jax.lax.dynamic_update_slice(every, new[None], (layer, 0, index, 0, 0))

    def attention(h):
      q, k, v = self._self_qkv(h, positions)
      cache["k"], cache["v"] = write(cache["k"], k), write(cache["v"], v)
      width = span or cache["k"].shape[2]
      visible = AttentionMask.decode(index, q.shape[0], width)  # cache positions <= index
      keys, values = (cache[n][layer][:, :width] for n in ("k", "v"))
      y = self.self_attn.attend(q, keys, values, visible)
      return _adapted(self.self_attn_adapter, y)

    x = _residual(x, self.self_attn_norm, attention, self.post_norm)
    if self.has_cross:

      def cross(h):
        q = self.cross_attn.project(h, "query")
        y = self.cross_attn.attend(q, cache["cross_k"][layer], cache["cross_v"][layer], cross_mask)
        return _adapted(self.cross_attn_adapter, y)

      x = _residual(x, self.cross_attn_norm, cross, self.post_norm)
    mlp = lambda h: _adapted(self.mlp_adapter, self.mlp(h))
    return _residual(x, self.mlp_norm, mlp, self.post_norm), cache

  def cross_keys_values(self, encoded):
    return self.cross_attn.project(encoded, "key"), self.cross_attn.project(encoded, "value")


def logical_names(state) -> dict:
  """Pure dict of logical-name tuples for a State (or Module) of annotated Params."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(state, nnx.Param)))
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


class LayerStack(nnx.Module):
  """`num_layers` copies of a layer with parameters stacked on a leading 'layers' axis."""

  def __init__(self, make_layer, num_layers: int, dims: ModelDims, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
      return make_layer(rngs)

    self.layers = create(rngs)
    self.num_layers = num_layers
    self.remat = dims.remat
    self.params_sharded = dims.params_sharded
    self.grad_reduce_dtype = dims.grad_reduce_dtype
    self.pipeline = dims.pipeline
    # One layer's global shapes, as hashable (path, shape) pairs: a manual region sees only its
    # shards and needs them to find the sharded dimension.
    self.layer_shapes = tuple(
      (path, tuple(x.shape[1:]))
      for path, x in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(self.layers))).items()
    )

  def _layer(self, graphdef, layer_params, per_layer_names) -> nnx.Module:
    """One layer of the stack, its weights gathered over fsdp first if they are stored sharded."""
    if self.params_sharded:
      shapes = dict(self.layer_shapes)
      layer_params = gather_layer(
        layer_params,
        per_layer_names,
        traverse_util.unflatten_dict(
          {path: shapes[path] for path in traverse_util.flatten_dict(layer_params)}
        ),
        self.grad_reduce_dtype,
      )
    return nnx.merge(graphdef, layer_params)

  def __call__(self, x: jax.Array, key: jax.Array | None, **kwargs) -> jax.Array:
    graphdef, state = nnx.split(self.layers)
    params = nnx.to_pure_dict(state)
    per_layer_names = jax.tree.map(
      lambda n: n[1:], logical_names(state), is_leaf=lambda x: isinstance(x, tuple)
    )
    keys = split_keys(key, self.num_layers) if key is not None else None

    def body(x, scanned):
      layer_params, layer_key = scanned
      layer = self._layer(graphdef, layer_params, per_layer_names)
      x = layer(x, layer_key, **kwargs)
      return constrain(x, ("batch", "length", "embed")), None

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (params, keys))
    return x

  def pipelined(self, x, key, rows: dict, layer_kwargs) -> jax.Array:
    """The stack over pipeline stages (`lm.parallel.pipeline`): x [rows, length, embed], key a
    key per row (or None), `rows` per-row arrays the layers need ([rows, ...]) and
    layer_kwargs(rows of one microbatch) -> the layers' keyword arguments. Inside the training
    step's region (manual over the batch axes) directly; elsewhere (evaluation) in a region of
    its own, so that both run the same program."""
    graphdef, state = nnx.split(self.layers)
    params = nnx.to_pure_dict(state)
    names = logical_names(state)
    key_data = None if key is None else jax.random.key_data(key)

    def local(params, x, key_data, rows):
      keys = None if key_data is None else jax.random.wrap_key_data(key_data)
      return self._pipeline_local(graphdef, names, params, x, keys, rows, layer_kwargs)

    if pp.AXIS in manual_axes():
      return local(params, x, key_data, rows)
    mesh = jax.sharding.get_abstract_mesh()
    param_specs = jax.tree.map(
      lambda n, p: keep_axes(spec_for(n, p.shape, mesh, self.params_sharded), BATCH_AXES),
      names,
      params,
      is_leaf=lambda n: isinstance(n, tuple),
    )
    rows_spec = jax.sharding.PartitionSpec(BATCH_AXES)
    region = jax.shard_map(
      local,
      in_specs=(param_specs, rows_spec, None if key is None else rows_spec, rows_spec),
      out_specs=rows_spec,
      axis_names=set(BATCH_AXES),
    )
    return region(params, x, key_data, rows)

  def _pipeline_local(self, graphdef, names, params, x, keys, rows, layer_kwargs):
    """One (stage, data, fsdp) device's part: its rows in, its rows out. The rows of the
    stages of one (data, fsdp) group are gathered and split into M microbatches; after the
    schedule each stage takes its own rows' outputs back from stage 0."""
    sched = self.pipeline
    s, m = sched.stages, sched.microbatches
    k = sched.layers_per_group(self.num_layers)
    stage = jax.lax.axis_index(pp.AXIS)
    own_rows = x.shape[0]

    def microbatches(a, axis=0):
      a = jax.lax.all_gather(a, pp.AXIS, axis=axis, tiled=True)
      return a.reshape(*a.shape[:axis], m, a.shape[axis] // m, *a.shape[axis + 1 :])

    inputs = microbatches(x)
    rows = jax.tree.map(microbatches, rows)
    # [L, rows] keys -> [L, M, mb]: layer l of each row draws what it draws without stages.
    key_data = None
    if keys is not None:
      key_data = microbatches(jax.random.key_data(split_keys(keys, self.num_layers)), axis=1)
    per_layer_names = jax.tree.map(lambda n: n[1:], names, is_leaf=lambda n: isinstance(n, tuple))
    if self.params_sharded and sched.gather == "step" and "fsdp" in manual_axes():
      # Gathered once for the whole pass: the stage's layers stay whole until its backward.
      shapes = {path: (self.num_layers, *shape) for path, shape in self.layer_shapes}
      params = gather_layer(
        params,
        names,
        traverse_util.unflatten_dict({p: shapes[p] for p in traverse_util.flatten_dict(params)}),
        self.grad_reduce_dtype,
      )

    def stage_fn(x, microbatch, repeat):
      group = jax.tree.map(lambda p: jax.lax.dynamic_slice_in_dim(p, repeat * k, k, 0), params)
      mb_rows = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, microbatch, 0, False), rows)
      kwargs = layer_kwargs(mb_rows)
      layer_keys = None
      if key_data is not None:  # this group's layers: (repeat * S + stage) * k + j
        first = (repeat * s + stage) * k
        data = jax.lax.dynamic_slice_in_dim(key_data, first, k, 0)
        layer_keys = jax.random.wrap_key_data(
          jax.lax.dynamic_index_in_dim(data, microbatch, 1, False)
        )

      def body(x, scanned):
        layer_params, layer_key = scanned
        layer = self._layer(graphdef, layer_params, per_layer_names)
        return constrain(layer(x, layer_key, **kwargs), ("batch", "length", "embed")), None

      if self.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
      y, _ = jax.lax.scan(body, x, (group, layer_keys))
      return y

    outputs = sched.run(stage_fn, inputs)  # valid on stage 0
    outputs = jnp.where(stage == 0, outputs, jnp.zeros_like(outputs))
    outputs = outputs.reshape(s * own_rows, *outputs.shape[2:])
    return jax.lax.psum_scatter(outputs, pp.AXIS, scatter_dimension=0, tiled=True)

  def _scan_layers(self, fn, carry, per_layer):
    """lax.scan of fn(layer, carry, per_layer_slice) over the stacked layers (gathered per layer
    under ZeRO-3, as in training); per_layer arrays have a leading layers axis."""
    graphdef, state = nnx.split(self.layers)
    per_layer_names = jax.tree.map(
      lambda n: n[1:], logical_names(state), is_leaf=lambda x: isinstance(x, tuple)
    )

    def body(carry, scanned):
      layer_params, sliced = scanned
      return fn(self._layer(graphdef, layer_params, per_layer_names), carry, sliced)

    return jax.lax.scan(body, carry, (nnx.to_pure_dict(state), per_layer))

  def decode_step(self, x, cache, **kwargs):
    """x [b, 1, embed] through every layer; the cache's arrays have a leading layers axis and
    ride in the scan's carry, so each layer writes its one new position in place instead of
    the scan copying every layer's cache each step (the demo LM's engine step, 64 slots x 256
    positions on one CPU device: 32.0 -> 7.6 ms)."""

    def step(layer, carry, number):
      x, cache = carry
      return layer.decode_step(x, cache, layer=number, **kwargs), None

    (x, cache), _ = self._scan_layers(step, (x, cache), jnp.arange(self.num_layers))
    return x, cache

  def prefill(self, x, **kwargs):
    """x [b, length, embed] through every layer: the output and each layer's keys/values
    ({"k", "v"} [layers, b, length, kv heads, kv])."""
    return self._scan_layers(lambda layer, x, _: layer.prefill(x, **kwargs), x, None)

  def cross_keys_values(self, encoded):
    _, (k, v) = self._scan_layers(
      lambda layer, x, _: (x, layer.cross_keys_values(x)), encoded, None
    )
    return k, v


def shift_right(targets: jax.Array, positions: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs: previous token, and the start token at the start of every (packed)
  segment."""
  previous = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  return jnp.where(positions == 0, start_id, previous)


def default_positions(tokens: jax.Array) -> jax.Array:
  """Unpacked rows: positions 0, 1, ..."""
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def length_segments(tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Unpacked rows of `lengths` [batch] tokens each: segment 1 on them, 0 on the padding
  (whatever id pads: a real token's id may be 0)."""
  return (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)


class _Model(nnx.Module):
  """Shared parts: token embedding, positions, output projection."""

  def _init_io(self, dims: ModelDims, rngs: nnx.Rngs):
    self.dims = dims
    self.embed = Embedding(dims, rngs)
    if dims.logits_bias:
      self.logits_bias = nnx.Param(
        jnp.zeros((dims.vocab_size,), dims.param_dtype), out_sharding=("vocab",)
      )
    self._init_positions(dims, rngs)
    if not dims.tie_embeddings:
      init = jax.nn.initializers.normal(stddev=dims.d_model**-0.5)
      self.output = nnx.Param(
        init(rngs.params(), (dims.d_model, dims.vocab_size), dims.param_dtype),
        out_sharding=("embed", "vocab"),
      )

  def _init_positions(self, dims: ModelDims, rngs: nnx.Rngs):
    if dims.positions == "learned":
      init = jax.nn.initializers.normal(stddev=0.02)
      self.pos_table = nnx.Param(
        init(rngs.params(), (dims.max_len, dims.d_model), dims.param_dtype),
        out_sharding=("length", "embed"),
      )

  def embed_tokens(self, tokens, positions) -> jax.Array:
    d = self.dims
    x = self.embed(tokens, d.dtype)
    if d.embed_scale != 1.0:
      x = x * jnp.asarray(d.embed_scale, d.dtype)
    if d.positions == "sinusoidal":
      x = x + sinusoidal(positions, d.d_model, d.sinusoid).astype(d.dtype)
    elif d.positions == "learned":
      table = self.pos_table[...]
      x = x + lookup(table, ("length", "embed"), positions, d.dtype, d.params_sharded)
    return constrain(x, ("batch", "length", "embed"))

  def __call__(self, batch: dict, dropout_key=None) -> jax.Array:
    """Logits [batch, length, vocab] float32."""
    return self.logits(self.hidden(batch, dropout_key))

  def logits(self, x) -> jax.Array:
    """[batch, length, embed] -> [batch, length, vocab] float32."""
    return self.head()(x)

  def head(self) -> Callable[[jax.Array], jax.Array]:
    """The output projection as a function of hidden states [batch, positions, embed], its
    weights read (and gathered, under ZeRO-3 outside the step's region) once: a loss looping
    over sequence chunks calls it per chunk without gathering per chunk."""
    d = self.dims
    if d.tie_embeddings:  # the table [vocab, embed]
      table = self.embed.table[...]
      if d.params_sharded:
        table = gather_layer(table, ("vocab", "embed"), self.embed.shape)
      kernel, spec = table, "ble,ve->blv"
    else:
      kernel, spec = self.output[...], "ble,ev->blv"
    bias = self.logits_bias[...].astype(jnp.float32) if d.logits_bias else None

    def logits(x):
      out = jnp.einsum(spec, x, kernel.astype(x.dtype)).astype(jnp.float32)
      if bias is not None:
        out = out + bias
      return constrain(out, ("batch", "length", "vocab"))

    return logits

  def final_norm(self, x, norm) -> jax.Array:
    """Pre-norm stacks end with a norm; post-norm ones have normed every block already."""
    return x if norm is None else norm(x)


class EncoderDecoder(_Model):
  def __init__(self, dims: ModelDims, rngs: nnx.Rngs):
    self._init_io(dims, rngs)
    self.encoder = LayerStack(lambda r: EncoderLayer(dims, r), dims.enc_layers, dims, rngs)
    self.encoder_norm = None if dims.post_norm else Norm(dims, rngs)
    self.decoder = LayerStack(lambda r: DecoderLayer(dims, True, r), dims.dec_layers, dims, rngs)
    self.decoder_norm = None if dims.post_norm else Norm(dims, rngs)

  def encode(self, inputs, segments, positions, key=None, packed=False) -> jax.Array:
    k_embed, k_layers = split_keys(key, 2)
    x = dropout(self.embed_tokens(inputs, positions), self.dims.dropout_rate, k_embed)
    mask = AttentionMask(segments, segments, packed=packed)
    x = self.encoder(x, k_layers, mask=mask, positions=positions)
    return self.final_norm(x, self.encoder_norm)

  def decode(
    self, encoded, input_segments, decoder_inputs, segments, positions, key=None, packed=False
  ):
    k_embed, k_layers = split_keys(key, 2)
    x = dropout(self.embed_tokens(decoder_inputs, positions), self.dims.dropout_rate, k_embed)
    x = self.decoder(
      x,
      k_layers,
      mask=AttentionMask(segments, segments, causal=True, packed=packed),
      positions=positions,
      encoded=encoded,
      cross_mask=AttentionMask(segments, input_segments, packed=packed),
    )
    return self.final_norm(x, self.decoder_norm)

  def encode_source(self, inputs, lengths) -> dict:
    """Encodes the source (`lengths` [batch] tokens of each row of `inputs`) once: the
    cross-attention keys/values of every layer and the source's segment ids (1 real, 0 not)."""
    in_seg, in_pos = length_segments(inputs, lengths), default_positions(inputs)
    cross_k, cross_v = self.decoder.cross_keys_values(self.encode(inputs, in_seg, in_pos))
    return {"cross_k": cross_k, "cross_v": cross_v, "cross_segments": in_seg}

  def init_cache(self, inputs, lengths, max_len: int) -> dict:
    """The source's cross-attention cache (encode_source) and empty self caches."""
    source = self.encode_source(inputs, lengths)
    dtype = source["cross_k"].dtype
    return {**_empty_self_cache(self.dims, inputs.shape[0], max_len, dtype), **source}

  def decode_step(self, tokens, index, cache, span=None) -> tuple[jax.Array, dict]:
    """Logits [b, vocab] for the next position after `tokens` [b] at position `index`
    (attending over the cache's first `span` positions: see DecoderLayer.decode_step)."""
    source = cache["cross_segments"]  # [b, s]: the target's one query sees the real ones
    cross_mask = AttentionMask(jnp.ones_like(source[:, :1]), source)
    return _decode_step(self, tokens, index, cache, cross_mask=cross_mask, span=span)

  def hidden(self, batch: dict, dropout_key=None) -> jax.Array:
    """The decoder's final hidden states [batch, length, embed] (after its final norm)."""
    k_enc, k_dec = split_keys(dropout_key, 2)
    in_seg, in_pos = _segments_and_positions(batch, "inputs")
    tgt_seg, tgt_pos = _segments_and_positions(batch, "targets")
    packed = is_packed(batch)
    encoded = self.encode(batch["inputs"], in_seg, in_pos, k_enc, packed)
    decoder_inputs = shift_right(batch["targets"], tgt_pos, self.dims.start_id)
    return self.decode(encoded, in_seg, decoder_inputs, tgt_seg, tgt_pos, k_dec, packed)


class Decoder(_Model):
  """Decoder-only language model over `targets`."""

  def __init__(self, dims: ModelDims, rngs: nnx.Rngs):
    self._init_io(dims, rngs)
    self.decoder = LayerStack(lambda r: DecoderLayer(dims, False, r), dims.dec_layers, dims, rngs)
    self.decoder_norm = None if dims.post_norm else Norm(dims, rngs)

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    return _empty_self_cache(self.dims, batch_size, max_len, self.dims.dtype)

  def decode_step(self, tokens, index, cache, span=None) -> tuple[jax.Array, dict]:
    """Logits [b, vocab] for the next position after `tokens` [b] at position `index`
    (attending over the cache's first `span` positions: see DecoderLayer.decode_step)."""
    return _decode_step(self, tokens, index, cache, span=span)

  def prefill(self, inputs, lengths) -> tuple[jax.Array, dict]:
    """One forward pass over `inputs` [b, width] (the decoder's inputs: the start token, then
    the prompt), each row's first `lengths` [b] real: the logits [b, vocab] after each row's
    last real input, and the self-attention keys/values of every position ({"k", "v"}
    [layers, b, width, kv heads, kv]; past a row's length they are padding's, which later
    decode steps overwrite before they become visible)."""
    positions = default_positions(inputs)
    segments = length_segments(inputs, lengths)
    x = self.embed_tokens(inputs, positions)
    mask = AttentionMask(segments, segments, causal=True)
    x, cached = self.decoder.prefill(x, mask=mask, positions=positions)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)
    return self.logits(self.final_norm(last, self.decoder_norm))[:, 0], cached

  def hidden(self, batch: dict, dropout_key=None) -> jax.Array:
    """The final hidden states [batch, length, embed] (after the final norm)."""
    k_embed, k_layers = split_keys(dropout_key, 2)
    segments, positions = _segments_and_positions(batch, "targets")
    tokens = shift_right(batch["targets"], positions, self.dims.start_id)
    x = dropout(self.embed_tokens(tokens, positions), self.dims.dropout_rate, k_embed)
    packed = is_packed(batch)
    if self.dims.pipeline:
      layer_inputs = functools.partial(causal_layer_inputs, packed=packed)
      x = self.decoder.pipelined(
        x, k_layers, {"segments": segments, "positions": positions}, layer_inputs
      )
    else:
      mask = AttentionMask(segments, segments, causal=True, packed=packed)
      x = self.decoder(x, k_layers, mask=mask, positions=positions)
    return self.final_norm(x, self.decoder_norm)


def causal_layer_inputs(rows: dict, packed: bool) -> dict:
  """A decoder-only layer's keyword arguments from one microbatch's segments and positions."""
  segments = rows["segments"]
  mask = AttentionMask(segments, segments, causal=True, packed=packed)
  return {"mask": mask, "positions": rows["positions"]}


def _empty_self_cache(dims: ModelDims, batch: int, max_len: int, dtype) -> dict:
  shape = (dims.dec_layers, batch, max_len, dims.num_kv_heads, dims.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _decode_step(model, tokens, index, cache, cross_mask=None, span=None):
  """Shared by both families: embed one token, run the layers with their caches, logits."""
  index = jnp.asarray(index, jnp.int32)
  positions = jnp.broadcast_to(index.reshape(-1, 1), (tokens.shape[0], 1))
  x = model.embed_tokens(tokens[:, None], positions)
  self_cache = {k: v for k, v in cache.items() if k != "cross_segments"}
  x, self_cache = model.decoder.decode_step(
    x, self_cache, index=index, positions=positions, cross_mask=cross_mask, span=span
  )
  return model.logits(model.final_norm(x, model.decoder_norm))[:, 0], {**cache, **self_cache}


def segment_ids(batch: dict, name: str) -> jax.Array:
  """A side's segment ids, 0 on padding; a batch without them has none. No token id marks
  padding: in an imported vocabulary id 0 may be a real token (GPT-2's "!")."""
  segments = batch.get(name + "_segment_ids")
  return jnp.ones_like(batch[name]) if segments is None else segments


def is_packed(batch: dict) -> bool:
  """Whether rows may hold several examples: packed batches carry positions (a trace-time
  fact: unpacked rows are one example, then padding, as cuDNN's lengths describe)."""
  return any(name.endswith("_positions") for name in batch)


def _segments_and_positions(batch: dict, name: str):
  """A side's segment ids and its positions (0, 1, ... in an unpacked batch)."""
  positions = batch.get(name + "_positions")
  positions = default_positions(batch[name]) if positions is None else positions
  return segment_ids(batch, name), positions


def build_model(task: str, dims: ModelDims, seed: int) -> nnx.Module:
  """The model for a task; call inside `nnx.use_eager_sharding(False)` or a jitted init."""
  assert task != "classify", "lm.models.classifier.build_model builds classifiers"
  model_cls = EncoderDecoder if task == "translation" else Decoder
  return model_cls(dims, nnx.Rngs(params=seed))
