"""Transformer building blocks in flax.nnx. Every parameter carries logical axis names.

Dropout takes explicit keys (None = deterministic), one per batch row in training, so that
the masks are a pure function of (seed, step, global row): a resumed run draws the same ones, and
so does any mesh or microbatch count, whichever device holds the row.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lm.models import attention
from lm.models.attention import AttentionMask
from lm.parallel.sharding import constrain, fsdp_specs, manual_axes


def _param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


# Matmul kernels an int8 export quantizes: (input dims, output dims), after any leading layer
# dim. Embeddings, norms, biases, LoRA and adapters stay float.
QUANTIZED_KERNELS = {
  "query": (1, 2),
  "key": (1, 2),
  "value": (1, 2),
  "out": (2, 1),
  "wi": (1, 1),
  "wi_gate": (1, 1),
  "wo": (1, 1),
}


def _kernel(cfg, rngs: nnx.Rngs, init, shape, names, name: str):
  """A matmul kernel and, for an int8 model (model.quantize), its per-output-channel float
  scales (None otherwise)."""
  if not cfg.quantized:
    return _param(rngs, init, shape, names, cfg.param_dtype), None
  inputs = QUANTIZED_KERNELS[name][0]
  kernel = nnx.Param(jnp.zeros(shape, jnp.int8), out_sharding=names)
  ones = jax.nn.initializers.ones
  return kernel, _param(rngs, ones, shape[inputs:], names[inputs:], jnp.float32)


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
  """A kernel in `dtype`; an int8 one dequantized (times its scales) here, where it is used,
  so that only the running layer's weights ever exist in float."""
  kernel, scale = getattr(module, name)[...], getattr(module, f"{name}_scale")
  if scale is None:
    return kernel.astype(dtype)
  return kernel.astype(dtype) * scale[...].astype(dtype)


def quantize_int8(params: dict) -> dict:
  """Parameters (a nested dict) with every QUANTIZED_KERNELS kernel as symmetric int8 per
  output channel, round(w / s) with s = max |w| / 127 over the input dims, plus "<name>_scale"
  = s in float32."""
  out = {}
  for key, value in params.items():
    if isinstance(value, dict):
      out[key] = quantize_int8(value)
      continue
    out[key] = value
    if key in QUANTIZED_KERNELS:
      inputs, outputs = QUANTIZED_KERNELS[key]
      lead = value.ndim - inputs - outputs
      axes = tuple(range(lead, lead + inputs))
      w = value.astype(jnp.float32)
      scale = jnp.max(jnp.abs(w), axis=axes) / 127.0
      scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
      q = jnp.round(w / jnp.expand_dims(scale, axes))
      out[key], out[f"{key}_scale"] = jnp.clip(q, -127, 127).astype(jnp.int8), scale
  return out


def _fan_in_init(fan_in: int):
  return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


def split_keys(keys: jax.Array | None, n: int):
  """n independent key arrays [n, *keys.shape] from one key or a key per row (None: n Nones)."""
  if keys is None:
    return (None,) * n
  if keys.ndim == 0:
    return jax.random.split(keys, n)
  return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, n))(keys), 1, 0)


def dropout(x: jax.Array, rate: float, keys: jax.Array | None) -> jax.Array:
  """x [rows, ...] with keys [rows] (one key per row) or a single key."""
  if keys is None or rate == 0.0:
    return x
  # 8 random bits per element, the rate rounded to 1/256 (the scale uses the exact keep
  # probability): the PRNG dominates dropout's cost.
  drop = round(rate * 256)
  if keys.ndim == 0:
    bits = _random_bytes(keys, x.shape)
  else:
    bits = jax.vmap(lambda k: _random_bytes(k, x.shape[1:]))(keys)
  keep = bits >= drop
  return jnp.where(keep, x * (256.0 / (256 - drop)), 0).astype(x.dtype)


def _random_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint8 random bits of `shape`, four from each 32-bit draw when the last dim allows: jax's
  (partitionable) threefry costs one hash per element whatever its width. Each byte depends on
  the key and its index only, so a sharded draw equals the whole one."""
  if not shape or shape[-1] % 4:
    return jax.random.bits(key, shape, jnp.uint8)
  words = jax.random.bits(key, (*shape[:-1], shape[-1] // 4), jnp.uint32)
  return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape)


class Norm(nnx.Module):
  """LayerNorm or RMSNorm over 'embed'; statistics in float32."""

  def __init__(self, dims, rngs: nnx.Rngs):
    d_model, kind, param_dtype = dims.d_model, dims.norm, dims.param_dtype
    self.kind, self.eps = kind, dims.norm_eps
    self.scale = _param(rngs, jax.nn.initializers.ones, (d_model,), ("embed",), param_dtype)
    if kind == "layernorm":
      self.bias = _param(rngs, jax.nn.initializers.zeros, (d_model,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.eps)
    y = y * self.scale[...]
    if self.kind == "layernorm":
      y = y + self.bias[...]
    return y.astype(x.dtype)


def sinusoidal(positions: jax.Array, d_model: int, kind: str = "t2t") -> jax.Array:
  """[batch, length] integer positions -> [batch, length, d_model]: sines, then cosines, of
  positions times frequencies from 1 down to 1/10000 ("t2t", tensor2tensor's) or towards it
  ("marian": 1 / 10000^(2i / d_model), Vaswani et al.'s)."""
  half = d_model // 2
  steps = max(half - 1, 1) if kind == "t2t" else half
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / steps)
  angle = positions[..., None].astype(jnp.float32) * freq
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] times kernel [in, out], computed as one [rows, in] x [in, out] matmul.

  With batch and length merged, the backward's weight gradient is one 2-D contraction, without
  the transposing copies XLA inserts for the 3-D form (measured on CPU: an MLP stack's
  forward+backward 24% faster alone, the speed model's step 5%). The reshapes are bitcasts and
  keep the batch dims' sharding.
  """
  y = x.reshape(-1, x.shape[-1]) @ kernel.astype(x.dtype)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def rotary(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary embedding on [batch, length, heads, kv] by [batch, length] positions; dims i and
  i + kv/2 form a pair (the "rotate half" layout of GPT-NeoX and Hugging Face's Llama, not the
  interleaved pairs of Meta's original checkpoints)."""
  half = x.shape[-1] // 2
  freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[..., None, None].astype(jnp.float32) * freq  # [b, l, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


# Letters of the einsum subscripts below -> logical axis names.
_AXIS_NAMES = {"e": "embed", "h": "heads", "g": "kv_heads", "k": "kv", "f": "mlp"}


class LowRank(nnx.Module):
  """LoRA: x -> (x A) B * alpha / rank beside a projection from dims `inputs` to `outputs`
  (einsum letters of _AXIS_NAMES). A and B carry logical names, so ZeRO and tensor parallelism
  shard them like any parameter; B starts at zero, so the model starts exactly as without."""

  def __init__(self, cfg, inputs: str, outputs: str, rngs: nnx.Rngs):
    size = {
      "e": cfg.d_model,
      "h": cfg.num_heads,
      "g": cfg.num_kv_heads,
      "k": cfg.head_dim,
      "f": cfg.mlp_dim,
    }
    r = cfg.lora_rank
    names = lambda dims: tuple(_AXIS_NAMES[c] for c in dims)
    fan_in = math.prod(size[c] for c in inputs)
    self.a = _param(
      rngs,
      _fan_in_init(fan_in),
      (*(size[c] for c in inputs), r),
      (*names(inputs), "lora"),
      cfg.param_dtype,
    )
    self.b = _param(
      rngs,
      jax.nn.initializers.zeros,
      (r, *(size[c] for c in outputs)),
      ("lora", *names(outputs)),
      cfg.param_dtype,
    )
    self.inputs, self.outputs, self.scale = inputs, outputs, cfg.lora_alpha / r

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [batch, length, *inputs] -> [batch, length, *outputs]."""
    low = jnp.einsum(f"bl{self.inputs},{self.inputs}r->blr", x, self.a[...].astype(x.dtype))
    y = jnp.einsum(f"blr,r{self.outputs}->bl{self.outputs}", low, self.b[...].astype(x.dtype))
    return y * jnp.asarray(self.scale, x.dtype)


def _lora(cfg, block: str, name: str, inputs: str, outputs: str, rngs) -> LowRank | None:
  if cfg.lora_rank and re.search(cfg.lora_targets, f"{block}/{name}"):
    return LowRank(cfg, inputs, outputs, rngs)
  return None


class Adapter(nnx.Module):
  """Houlsby adapter: y + up(gelu(down(y))) on a block's output; up starts at zero, so the
  model starts exactly as without."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    d, a = cfg.d_model, cfg.adapter_dim
    self.down = _param(rngs, _fan_in_init(d), (d, a), ("embed", "adapter"), cfg.param_dtype)
    self.up = _param(rngs, jax.nn.initializers.zeros, (a, d), ("adapter", "embed"), cfg.param_dtype)

  def __call__(self, y: jax.Array) -> jax.Array:
    return y + dense(jax.nn.gelu(dense(y, self.down[...])), self.up[...])


def merge_lora(params: dict, scale: float) -> dict:
  """Parameters (a nested dict) with every LoRA update folded into its projection's kernel,
  kernel + scale * A B, and the factors dropped: the model without LoRA computes the same."""
  out = {}
  for key, value in params.items():
    if key.endswith("_lora"):
      continue
    lora = params.get(f"{key}_lora")
    if lora is not None:
      a, b = lora["a"], lora["b"]
      lead = a.ndim + b.ndim - 2 - value.ndim  # stacked layers
      rank = a.shape[-1]
      a2 = a.reshape(*a.shape[:lead], -1, rank).astype(jnp.float32)
      b2 = b.reshape(*b.shape[:lead], rank, -1).astype(jnp.float32)
      update = jnp.matmul(a2, b2).reshape(value.shape)
      value = (value.astype(jnp.float32) + scale * update).astype(value.dtype)
    out[key] = merge_lora(value, scale) if isinstance(value, dict) else value
  return out


def adapter(cfg, rngs: nnx.Rngs) -> Adapter | None:
  return Adapter(cfg, rngs) if cfg.adapter_dim else None


class Attention(nnx.Module):
  """Multi-head attention, grouped-query when num_kv_heads < num_heads; query heads shard over
  'tensor' (Megatron column/row split), key/value heads too where the axis divides them."""

  def __init__(self, cfg, rngs: nnx.Rngs, block: str = "attn"):
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.use_rotary = cfg.positions == "rotary"
    self.implementation, self.chunk = cfg.attention, cfg.attention_chunk
    self.rope_theta = cfg.rope_theta
    init_in, init_out = _fan_in_init(d), _fan_in_init(h * k)
    for name, heads in (("query", "heads"), ("key", "kv_heads"), ("value", "kv_heads")):
      shape = (d, h if heads == "heads" else g, k)
      kernel, scale = _kernel(cfg, rngs, init_in, shape, ("embed", heads, "kv"), name)
      setattr(self, name, kernel)
      setattr(self, f"{name}_scale", scale)
    self.out, self.out_scale = _kernel(
      cfg, rngs, init_out, (h, k, d), ("heads", "kv", "embed"), "out"
    )
    self.in_bias = cfg.use_bias or cfg.qkv_bias
    self.out_has_bias = cfg.use_bias
    zeros = jax.nn.initializers.zeros
    # No key bias without rotary: q.(k + b) shifts every score of a query equally, so softmax
    # ignores it and its gradient is pure rounding noise (that Adam would amplify into drift);
    # an imported one is dropped, the attention exactly the same without. Rotary turns b by
    # the key's position, so there it changes the scores: Qwen2's (qkv_bias) stays. use_bias
    # with rotary keeps none, as zerolm's models always had (their checkpoints restore).
    self.key_has_bias = cfg.qkv_bias and self.use_rotary
    if self.in_bias:
      self.query_bias = _param(rngs, zeros, (h, k), ("heads", "kv"), cfg.param_dtype)
      self.value_bias = _param(rngs, zeros, (g, k), ("kv_heads", "kv"), cfg.param_dtype)
    if self.key_has_bias:
      self.key_bias = _param(rngs, zeros, (g, k), ("kv_heads", "kv"), cfg.param_dtype)
    if self.out_has_bias:
      self.out_bias = _param(rngs, zeros, (d,), ("embed",), cfg.param_dtype)
    for name, outputs in (("query", "hk"), ("key", "gk"), ("value", "gk")):
      setattr(self, f"{name}_lora", _lora(cfg, block, name, "e", outputs, rngs))
    self.out_lora = _lora(cfg, block, "out", "hk", "e", rngs)

  def project(self, x: jax.Array, name: str) -> jax.Array:
    """[batch, length, embed] -> [batch, length, heads (kv heads for key, value), kv]."""
    y = jnp.einsum("ble,ehk->blhk", x, weight(self, name, x.dtype))
    if (lora := getattr(self, f"{name}_lora")) is not None:
      y = y + lora(x)
    if self.in_bias and (name != "key" or self.key_has_bias):
      y = y + getattr(self, name + "_bias")[...].astype(x.dtype)
    heads = "heads" if name == "query" else "kv_heads"
    return constrain(y, ("batch", "length", heads, "kv"))

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return rotary(x, positions, self.rope_theta)

  def attend(self, q, k, v, mask: AttentionMask) -> jax.Array:
    """q [b, t, h, kv], k/v [b, s, kv heads, kv] -> [b, t, embed]; each key/value head serves
    h / kv heads consecutive query heads."""
    y = attention.attend(q, k, v, mask, implementation=self.implementation, chunk=self.chunk)
    y = constrain(y, ("batch", "length", "heads", "kv"))
    out = jnp.einsum("blhk,hke->ble", y, weight(self, "out", y.dtype))
    if self.out_lora is not None:
      out = out + self.out_lora(y)
    if self.out_has_bias:
      out = out + self.out_bias[...].astype(out.dtype)
    return constrain(out, ("batch", "length", "embed"))

  def __call__(self, x, kv_input, mask, q_positions=None, kv_positions=None) -> jax.Array:
    q, k, v = (
      self.project(x, "query"),
      self.project(kv_input, "key"),
      self.project(kv_input, "value"),
    )
    if self.use_rotary:
      q, k = self.rotate(q, q_positions), self.rotate(k, kv_positions)
    return self.attend(q, k, v, mask)


class Mlp(nnx.Module):
  """Position-wise feed-forward; 'mlp' shards over 'tensor'."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.mlp_dim
    self.activation = cfg.activation
    self.use_bias = cfg.use_bias
    self.wi, self.wi_scale = _kernel(cfg, rngs, _fan_in_init(d), (d, f), ("embed", "mlp"), "wi")
    if cfg.activation == "swiglu":
      self.wi_gate, self.wi_gate_scale = _kernel(
        cfg, rngs, _fan_in_init(d), (d, f), ("embed", "mlp"), "wi_gate"
      )
    self.wo, self.wo_scale = _kernel(cfg, rngs, _fan_in_init(f), (f, d), ("mlp", "embed"), "wo")
    self.wi_lora = _lora(cfg, "mlp", "wi", "e", "f", rngs)
    self.wi_gate_lora = (
      _lora(cfg, "mlp", "wi_gate", "e", "f", rngs) if self.activation == "swiglu" else None
    )
    self.wo_lora = _lora(cfg, "mlp", "wo", "f", "e", rngs)
    if cfg.use_bias:
      self.wi_bias = _param(rngs, jax.nn.initializers.zeros, (f,), ("mlp",), cfg.param_dtype)
      self.wo_bias = _param(rngs, jax.nn.initializers.zeros, (d,), ("embed",), cfg.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(x, weight(self, "wi", x.dtype))  # [b, l, mlp]
    if self.wi_lora is not None:
      h = h + self.wi_lora(x)
    if self.use_bias:
      h = h + self.wi_bias[...].astype(x.dtype)
    if self.activation == "swiglu":
      gate = dense(x, weight(self, "wi_gate", x.dtype))
      if self.wi_gate_lora is not None:
        gate = gate + self.wi_gate_lora(x)
      h = jax.nn.silu(gate) * h
    elif self.activation == "gelu":  # the tanh approximation (GPT-2's gelu_new)
      h = jax.nn.gelu(h, approximate=True)
    elif self.activation == "gelu_exact":
      h = jax.nn.gelu(h, approximate=False)
    elif self.activation == "silu":
      h = jax.nn.silu(h)
    else:
      h = jax.nn.relu(h)
    h = constrain(h, ("batch", "length", "mlp"))
    y = dense(h, weight(self, "wo", h.dtype))
    if self.wo_lora is not None:
      y = y + self.wo_lora(h)
    if self.use_bias:
      y = y + self.wo_bias[...].astype(x.dtype)
    return constrain(y, ("batch", "length", "embed"))


class Embedding(nnx.Module):
  """Token table [vocab, embed]; with tying also the output head's (`_Model.head`)."""

  def __init__(self, dims, rngs: nnx.Rngs):
    shape, init = (dims.vocab_size, dims.d_model), _fan_in_init(dims.d_model)
    self.table = _param(rngs, init, shape, ("vocab", "embed"), dims.param_dtype)
    self.shape = shape
    self.params_sharded = dims.params_sharded

  def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
    return lookup(self.table[...], ("vocab", "embed"), tokens, dtype, self.params_sharded)


def lookup(
  table: jax.Array, names: tuple[str, str], ids: jax.Array, dtype, params_sharded: bool
) -> jax.Array:
  """Rows of a [n, embed] table -> [..., embed].

  With `params_sharded` (ZeRO-3) the table is gathered over fsdp first, like each layer, and its
  gradient is summed in that layout before it goes back to the sharded one: a lookup into (or a
  scatter onto) an fsdp-sharded embed dim would need activations sharded on embed, which GSPMD
  can only reach from the batch layout by replicating them ("involuntary full
  rematerialization"). Inside the training step's manual region the step has gathered the table
  already.
  """
  if not params_sharded or "fsdp" in manual_axes():
    return jnp.take(table, ids, axis=0).astype(dtype)
  gathered, sharded = fsdp_specs(names, table)

  # ids are an argument, not a closure: a custom VJP must not close over traced values.
  @jax.custom_vjp
  def rows(t, ids):
    return jnp.take(jax.lax.with_sharding_constraint(t, gathered), ids, axis=0)

  def fwd(t, ids):
    return rows(t, ids), ids

  def bwd(ids, g):
    grad = jnp.zeros(table.shape, g.dtype).at[ids].add(g)
    grad = jax.lax.with_sharding_constraint(grad, gathered)
    return jax.lax.with_sharding_constraint(grad, sharded), None

  rows.defvjp(fwd, bwd)
  return rows(table, ids).astype(dtype)
