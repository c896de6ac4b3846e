"""Attention's masks and kernels: which positions a query sees (`AttentionMask`: segment ids, a
causal flag, a decode step's cache index) and the kernel per platform (`attend`).

No layer holds a [b, 1, t, s] mask: the XLA path builds one for a chunk of queries at a time
(Rabe & Staats 2021, memory-efficient attention), cuDNN takes sequence lengths and splash
attention (TPU) segment ids and a causal flag.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from lm.config import ConfigError
from lm.parallel.memory import balanced_chunks
from lm.parallel.sharding import keep_axes, spec_for

_PLATFORM_PICK = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
# Tests run splash attention's Pallas kernel in interpret mode on CPU by setting this.
SPLASH_INTERPRET = False
# jax's own masked value: finite, so a query that sees no key (padding) averages all of them.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("q_segments", "kv_segments", "q_positions"),
  meta_fields=("causal", "packed"),
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
  """Query i sees key j iff q_segments[i] == kv_segments[j] > 0 (same packed example, not
  padding) and, when causal, j <= q_positions[i]. A pytree: it passes through scans,
  checkpoints and shard_maps like the arrays it holds."""

  q_segments: jax.Array  # [b, t] int, 0 = padding
  kv_segments: jax.Array  # [b, s] int, 0 = padding
  q_positions: jax.Array | None = None  # [b, t] the key index of each query; None = 0, 1, ...
  causal: bool = False
  packed: bool = False  # rows may hold several segments (cuDNN's path takes only lengths)

  @classmethod
  def decode(cls, index: jax.Array, batch: int, width: int) -> AttentionMask:
    """One query per row at cache position `index` (scalar or [b]) over `width` positions."""
    q_positions = jnp.broadcast_to(jnp.reshape(index, (-1, 1)), (batch, 1)).astype(jnp.int32)
    ones = jnp.ones((batch, 1), jnp.int32)
    return cls(ones, jnp.ones((batch, width), jnp.int32), q_positions, causal=True)

  def positions(self) -> jax.Array:
    """[b, t] the key index each query stands at."""
    if self.q_positions is not None:
      return self.q_positions
    return jnp.broadcast_to(jnp.arange(self.q_segments.shape[1]), self.q_segments.shape)

  def dense(self, q_segments: jax.Array, q_positions: jax.Array) -> jax.Array:
    """[b, 1, c, s] boolean for these queries ([b, c] segments and positions) only."""
    kv = self.kv_segments[:, None, :]
    mask = (q_segments[:, :, None] == kv) & (kv > 0)
    if self.causal:
      mask = mask & (q_positions[:, :, None] >= jnp.arange(kv.shape[-1])[None, None, :])
    return mask[:, None]


def resolve(choice: str, platform: str, dtype, head_dim: int) -> str:
  """model.attention for this platform: auto picks cuDNN on GPU, splash on TPU, XLA elsewhere
  or where the kernel cannot take the model (a start-up log line); an explicit choice the
  platform cannot run is a ConfigError."""
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  pick = _PLATFORM_PICK.get(platform, "xla") if choice == "auto" else choice
  if pick == "splash" and SPLASH_INTERPRET:
    return pick
  needs = {"cudnn": "gpu", "splash": "tpu"}.get(pick)
  if needs and platform != needs:
    if choice == "auto":
      return "xla"
    _fail(f"{choice!r} needs a {needs.upper()} but this runs on {platform}; set auto or xla")
  if pick == "cudnn":
    reason = _cudnn_limit(jnp.dtype(dtype), head_dim)
    if reason and choice == "cudnn":
      _fail(f"cudnn {reason}; set auto or xla")
    if reason:
      logging.info("model.attention=auto: XLA attention, since cuDNN %s", reason)
      return "xla"
  return pick


def _fail(message: str):
  raise ConfigError(f"config.model.attention: {message}")


def _cudnn_limit(dtype, head_dim: int) -> str | None:
  """Why cuDNN's flash attention cannot take this model, or None (its checks in jax 0.10:
  fused_attention_stablehlo.check_layout / check_is_flash_attention)."""
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"takes bfloat16 or float16, not model.dtype={dtype}"
  most = _cudnn_max_head_dim()
  if head_dim % 8 or head_dim > most:
    return f"needs a head dimension that is a multiple of 8 up to {most} here, not {head_dim}"
  return None


def _cudnn_max_head_dim() -> int:
  """256 on Hopper (compute capability 9.0) and later, 128 before (jax's check)."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is None:  # not a CUDA device: resolve() has refused cudnn already
    return 256
  return 256 if float(capability) >= 9.0 else 128


@functools.cache
def _log_once(message: str) -> None:
  logging.info(message)


def attend(q, k, v, mask: AttentionMask, *, implementation: str, chunk: int = 0) -> jax.Array:
  """q [b, t, h, kv], k/v [b, s, kv heads, kv] -> [b, t, h, kv]; each key/value head serves
  h / kv heads consecutive query heads. `implementation`: a resolved one (xla, cudnn, splash);
  `chunk`: query positions per step of the XLA path (0 = all at once)."""
  # A decode step (one query over a cache: the self-attention's q_positions set, or
  # cross-attention's single query) takes the XLA path everywhere: a single query row has
  # nothing for a flash kernel to tile.
  if mask.q_positions is not None or q.shape[1] == 1:
    return _xla(q, k, v, mask, chunk)
  if implementation == "cudnn":
    if not mask.packed:
      return _cudnn(q, k, v, mask)
    # jax.nn.dot_product_attention takes lengths only; cuDNN's packed layout (q/kv offsets)
    # is private jax API and Hopper-only.
    _log_once("cuDNN attention takes no packed rows: packed batches use XLA attention")
  if implementation == "splash":
    block = _splash_block(q.shape[1], k.shape[1])
    if block:
      return _splash(q, k, v, mask, block)
    _log_once("splash attention needs lengths that are multiples of 128: XLA attention")
  return _xla(q, k, v, mask, chunk)


def _xla(q, k, v, mask: AttentionMask, chunk: int) -> jax.Array:
  """Query-chunked attention: a scan over chunks of `chunk` queries whose body is
  rematerialized, so neither pass holds more than one chunk's [b, h, chunk, s] scores. A
  length that `chunk` does not divide splits into equal chunks (balanced_chunks), the last one
  padded with padding queries (sliced off after)."""
  b, t, h, d = q.shape
  g = k.shape[2]
  q = q.reshape(b, t, g, h // g, d)  # [b, t, kv heads, group, kv]: no copy of k or v per head
  segments, positions = mask.q_segments, mask.positions()
  if chunk == 0 or chunk >= t:
    return _xla_block(q, k, v, mask, segments, positions).reshape(b, t, h, d)
  n, chunk = balanced_chunks(t, chunk)
  pad = n * chunk - t

  def chunked(x):  # [b, t, ...] -> [n, b, chunk, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def body(_, xs):
    q_chunk, segments_chunk, positions_chunk = xs
    return None, _xla_block(q_chunk, k, v, mask, segments_chunk, positions_chunk)

  _, y = jax.lax.scan(body, None, (chunked(q), chunked(segments), chunked(positions)))
  return jnp.moveaxis(y, 0, 1).reshape(b, n * chunk, h, d)[:, :t]


def _xla_block(q, k, v, mask: AttentionMask, segments, positions) -> jax.Array:
  """q [b, c, g, r, kv] -> [b, c, g, r, kv]: jax.nn.dot_product_attention's XLA arithmetic
  (scores in float32, scaled after the product, softmax in float32) for c queries."""
  scores = jnp.einsum("bcgrd,bsgd->bgrcs", q, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(q.shape[-1] ** -0.5)
  visible = mask.dense(segments, positions)[:, :, None]  # [b, 1, 1, c, s]
  probs = jax.nn.softmax(jnp.where(visible, scores, _MASKED), axis=-1).astype(v.dtype)
  return jnp.einsum("bgrcs,bsgd->bcgrd", probs, v)


def _cudnn(q, k, v, mask: AttentionMask) -> jax.Array:
  """cuDNN flash attention; unpacked rows are one segment then padding, so their lengths say
  everything the segment ids do (a padding query's output is 0: no loss reads it)."""
  lengths = lambda s: jnp.sum(s > 0, axis=1, dtype=jnp.int32)
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    is_causal=mask.causal,
    query_seq_lengths=lengths(mask.q_segments),
    key_value_seq_lengths=lengths(mask.kv_segments),
    implementation="cudnn",
  )


def _splash_block(t: int, s: int) -> int:
  """The largest of splash's block sizes dividing both lengths (its kernels tile by 128
  lanes), or 0."""
  return next((b for b in (512, 256, 128) if t % b == 0 and s % b == 0), 0)


def _splash(q, k, v, mask: AttentionMask, block: int) -> jax.Array:
  """Splash attention (a Pallas TPU kernel) in a shard_map over the mesh axes not yet manual,
  so each device runs it on its own rows and heads: all axes outside any region, tensor inside
  the train step's (manual over the batch axes, whose rows are already local)."""
  mesh = jax.sharding.get_abstract_mesh()
  free = set() if mesh.empty else set(mesh.axis_names) - set(mesh.manual_axes)
  h, g = q.shape[2], k.shape[2]
  local = functools.partial(_splash_local, causal=mask.causal, block=block, heads=h, kv_heads=g)
  segments = (mask.q_segments, mask.kv_segments)
  if not free:
    return local(q, k, v, *segments)

  def spec(names, shape):
    return keep_axes(spec_for(names, shape, mesh, False), free)

  q_spec = spec(("batch", "length", "heads", "kv"), q.shape)
  kv_spec = spec(("batch", "length", "kv_heads", "kv"), k.shape)
  seg_spec = spec(("batch", "length"), mask.q_segments.shape)
  # Axes that split query heads but not key/value heads: each device's k/v gradient is a part.
  partial_over = tuple(a for a in free if a in jax.tree.leaves(q_spec[2]) and a not in kv_spec)
  inputs = (q_spec, kv_spec, kv_spec, seg_spec, seg_spec)
  # check_vma=False: a pallas_call's outputs need a declared vma (jax 0.10: the kernel's
  # ShapeDtypeStructs declare none), so the regions are unchecked and `run` types their
  # results (_vary_like) for an enclosing checked region. The backward is a region of its own
  # (the kernel's vjp inside), which sums the k/v gradient parts explicitly.
  region = functools.partial(jax.shard_map, axis_names=free, check_vma=False)
  forward = region(lambda *args: local(*map(_untyped, args)), in_specs=inputs, out_specs=q_spec)

  def backward_local(*args):
    q, k, v, qs, ks, dy = map(_untyped, args)
    _, vjp = jax.vjp(lambda q, k, v: local(q, k, v, qs, ks), q, k, v)
    dq, dk, dv = vjp(dy)
    return dq, *(jax.lax.psum(x, partial_over) if partial_over else x for x in (dk, dv))

  backward = region(backward_local, in_specs=(*inputs, q_spec), out_specs=inputs[:3])

  @jax.custom_vjp
  def run(q, k, v, qs, ks):
    varying = frozenset().union(*(_vma(x) for x in (q, k, v, qs, ks)))
    return _vary_like(forward(q, k, v, qs, ks), varying)

  def run_fwd(q, k, v, qs, ks):
    return run(q, k, v, qs, ks), (q, k, v, qs, ks)

  def run_bwd(saved, dy):
    grads = backward(*saved, dy)
    return (*(_vary_like(d, _vma(x)) for d, x in zip(grads, saved)), None, None)

  run.defvjp(run_fwd, run_bwd)
  return run(q, k, v, *segments)


def _vma(x) -> frozenset:
  """The manual axes `x` varies over (none outside a checked region)."""
  return frozenset(jax.typeof(x).mat.varying)


def _untyped(x):
  """`x` typed as varying over no axis, as an unchecked region types every primitive's result
  (its inputs keep the enclosing region's types, which a vjp inside would then mismatch)."""
  return x * jnp.ones_like(x)


def _vary_like(x, varying: frozenset):
  """An unchecked region's result typed as varying over `varying`: its values are per device
  already, so the cast moves no data."""
  missing = tuple(sorted(varying - _vma(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _splash_local(q, k, v, q_segments, kv_segments, *, causal, block, heads, kv_heads):
  """One device's rows and heads: q [b, t, hl, kv], k/v [b, s, gl, kv]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, t, hl, d = q.shape
  s, gl = k.shape[1], k.shape[2]
  if gl == kv_heads and hl < heads and kv_heads < heads:
    # Query heads split over tensor, key/value heads replicated: this device's heads' own.
    first = jax.lax.axis_index("tensor") * hl
    own = (first + jnp.arange(hl)) // (heads // kv_heads)
    k, v, gl = jnp.take(k, own, axis=2), jnp.take(v, own, axis=2), hl
  r = hl // gl
  shape = (t, s)
  head_mask = sm.CausalMask(shape) if causal else sm.FullMask(shape)
  sizes = sk.BlockSizes(*(min(block, 512),) * 8)
  make = sk.make_splash_mqa if r > 1 else sk.make_splash_mha
  kernel = make(
    sm.MultiHeadMask([head_mask] * r if r > 1 else [head_mask] * gl),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=SPLASH_INTERPRET,
  )
  q = q.reshape(b, t, gl, r, d) * jnp.asarray(d**-0.5, q.dtype)  # splash does not scale
  qt = jnp.transpose(q, (0, 2, 3, 1, 4))  # [b, gl, r, t, kv]
  kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, gl, s, kv]

  def row(q, k, v, qs, ks):
    ids = sk.SegmentIds(q=qs, kv=ks)
    if r > 1:  # one MQA kernel per key/value head
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
    return kernel(q[:, 0], k, v, segment_ids=ids)[:, None]

  y = jax.vmap(row)(qt, kt, vt, q_segments, kv_segments)  # [b, gl, r, t, kv]
  return jnp.transpose(y, (0, 3, 1, 2, 4)).reshape(b, t, hl, d)
