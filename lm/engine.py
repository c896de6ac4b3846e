"""Continuous batching: a fixed set of decode slots that requests join and leave between steps.

The decode state holds `slots` rows on the device: a KV cache per slot (and, translating, the
source's cross-attention keys/values), with each slot's position, length limit, seed, sampling
settings and whether it stops at EOS as data, so any mix of requests runs one program. One
thread owns the state and loops:
  1. admit: waiting requests take free slots. A language model's prompts are prefilled in one
     forward pass (rows padded to a compiled row count, inputs to a compiled length bucket),
     which also picks each one's first token; a source is encoded and its keys/values fill the
     slot's cross-attention cache. Either is written into its slots by the same program.
  2. step: one compiled program advances the occupied slots by `steps_per_chunk` tokens (it
     runs the first rows of each device block that hold them, and attends over the cache's
     first span past the longest: compiled counts and spans, so light traffic and short rows
     cost less).
  3. deliver: the previous dispatch's tokens, copied to the host asynchronously while this one
     runs, go to their requests; a slot whose request ended (EOS, its limit, or cancelled: a
     client gone, a stop string) is free for the next admit.
A row's tokens are those `lm.decode.Decoder` gives it alone: the same per-row keys (seed folded
with the position), the same sampling code, the same limits. Every program is compiled by
`warm_up`; nothing compiles while serving.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from lm.decode import Decoder, pick_tokens, source_buckets, step_keys
from lm.parallel import sharding


@dataclasses.dataclass(eq=False)
class Generation:
  """One row to generate, and where its tokens go.

  `emit(tokens, reason)` is called from the engine's thread with each new run of tokens (a stop
  token is not among them) and, on the last call, the reason it ended: "stop" (a stop token),
  "length" (its cap or the model's limit) or "error" (the engine stopped before it ended).
  Set `cancelled` from any thread to free its slot at the next step (emit is then not called
  again)."""

  ids: list[int]  # LM: the prompt; translation: the source with its EOS
  emit: Callable[[list[int], str | None], None]
  cap: int = 0  # most output tokens; 0 = the model's limit
  seed: int = 0
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  ignore_eos: bool = False
  cancelled: bool = False
  finished: bool = False


# Per-slot settings: (name, dtype, a free slot's value)
_SLOT_FIELDS = (
  ("t", jnp.int32, 0),  # the position of the slot's next input
  ("previous", jnp.int32, 0),  # that input: the last token
  ("limit", jnp.int32, 0),  # the slot is done once t reaches it
  ("seed", jnp.int32, 0),
  ("temperature", jnp.float32, 0.0),
  ("top_k", jnp.int32, 0),
  ("top_p", jnp.float32, 1.0),
  ("ignore_eos", jnp.bool_, False),
)


class Engine:
  """The decode slots of one model (see the module docstring). `decoder` brings the model, its
  mesh, tokenizer, default options and limits; `buckets` are the prefill (or source) widths
  compiled for, () = powers of two; `prefill_rows` the most requests one prefill holds."""

  def __init__(
    self,
    decoder: Decoder,
    slots: int,
    steps_per_chunk: int = 1,
    prefill_rows: int = 8,
    buckets: tuple[int, ...] = (),
    log: Callable[[str], None] = print,
  ):
    self.log = log
    self.decoder, layout = decoder, decoder.layout
    self.layout, self.task = layout, layout.cfg.task
    multiple = layout.batch_multiple  # rows every batch-sharded array must divide into
    self.slots = -(-slots // multiple) * multiple
    # The slot axis is split in `shards` blocks of `per_shard` (one per device group of the
    # batch axes). Slots fill each block's first rows first, and a step runs only the first
    # `local` rows of every block (a compiled count: powers of 4 down from per_shard), so
    # light traffic does not pay for every slot, and no step moves rows between devices.
    self.shards, self.per_shard = multiple, self.slots // multiple
    self.active_counts = tuple(
      sorted({self.per_shard >> 2 * i for i in range(self.per_shard.bit_length())} - {0})
    )
    self._order = sorted(range(self.slots), key=lambda s: (s % self.per_shard, s // self.per_shard))
    self.steps_per_chunk = steps_per_chunk
    top = min(-(-prefill_rows // multiple) * multiple, self.slots)
    self.prefill_counts = tuple(
      sorted({top} | {multiple << i for i in range(top.bit_length()) if multiple << i < top})
    )
    if self.task == "lm":
      self.max_len = decoder.shapes[0][1]  # prompt and continuation share the decode width
      # Prefill inputs: the start token and a prompt of at most max_input_tokens.
      self.widths = source_buckets(decoder.max_input_tokens + 1, buckets)
    else:
      self.max_len = decoder._output_len(decoder.src_len)
      self.widths = source_buckets(decoder.src_len, buckets or decoder.buckets)
    # A step attends over the cache's first `span` positions, the smallest of these past
    # every occupied slot's: decoding's reads grow with the longest row, not the cache.
    t = self.max_len
    self.spans = tuple(sorted({t} | {t >> i for i in (1, 2) if t >> i >= 32}))
    self._positions = np.zeros(self.slots, np.int64)  # each slot's next input position
    self.specials = decoder.specials
    self.vocab_limit = decoder.tokenizer.vocab_size
    self._state_shardings = self._shardings()
    self._state = None
    self._waiting: collections.deque[Generation] = collections.deque()
    self._occupants: list[Generation | None] = [None] * self.slots
    self._wake = threading.Condition()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._closed = False  # the loop has ended: a submit is answered "error" at once
    self.failure: BaseException | None = None  # what stopped the loop, if it died
    self.on_tokens: Callable[[int], None] | None = None  # called with each delivery's count

  # -- the device programs --------------------------------------------------------------------

  def _shapes(self) -> dict:
    d, s = self.layout.dims, self.slots
    kv = (d.dec_layers, s, self.max_len, d.num_kv_heads, d.head_dim)
    shapes = {"k": (kv, d.dtype), "v": (kv, d.dtype)}
    if self.task == "translation":
      cross = (d.dec_layers, s, self.decoder.src_len, d.num_kv_heads, d.head_dim)
      shapes |= {"cross_k": (cross, d.dtype), "cross_v": (cross, d.dtype)}
      shapes["cross_segments"] = ((s, self.decoder.src_len), jnp.int32)
    return {"cache": shapes, **{name: ((s,), dtype) for name, dtype, _ in _SLOT_FIELDS}}

  def _shardings(self) -> dict:
    mesh = self.layout.mesh
    names = {
      "k": ("layers", "batch", "length", "kv_heads", "kv"),
      "cross_segments": ("batch", None),
    }
    names["v"] = names["cross_k"] = names["cross_v"] = names["k"]

    def place(name, shape):
      spec = sharding.spec_for(names.get(name, ("batch",)), shape, mesh, False)
      return NamedSharding(mesh, spec)

    shapes = self._shapes()
    cache = {n: place(n, shape) for n, (shape, _) in shapes.pop("cache").items()}
    return {"cache": cache, **{n: place(n, shape) for n, (shape, _) in shapes.items()}}

  def _empty_state(self) -> dict:
    shapes = self._shapes()
    free = {name: value for name, _, value in _SLOT_FIELDS}

    def build():
      cache = {n: jnp.zeros(shape, dtype) for n, (shape, dtype) in shapes.pop("cache").items()}
      return {"cache": cache, **{n: jnp.full(s, free[n], t) for n, (s, t) in shapes.items()}}

    with jax.set_mesh(self.layout.mesh):
      return jax.jit(build, out_shardings=self._state_shardings)()

  @functools.cached_property
  def _steps(self) -> dict:
    """The step program for each (active count (rows per block), attention span)."""
    replicated = self.layout.shardings.replicated
    programs = {}
    for local in self.active_counts:
      for span in self.spans:
        fn = functools.partial(
          _step,
          self.layout,
          self.specials,
          self.vocab_limit,
          self.max_len,
          self.steps_per_chunk,
          self.shards,
          local,
          span,
        )
        programs[local, span] = jax.jit(
          fn,
          out_shardings=(self._state_shardings, replicated, replicated, replicated),
          donate_argnums=1,
        )
    return programs

  def _span(self) -> int:
    """The smallest span that holds every position the next chunk writes in an occupied slot."""
    occupied = [s for s, g in enumerate(self._occupants) if g is not None]
    needed = int(self._positions[occupied].max()) + self.steps_per_chunk if occupied else 1
    return next((s for s in self.spans if s >= needed), self.spans[-1])

  def _active_count(self) -> int:
    """The fewest rows per block that hold every occupied slot."""
    used = max(
      (s % self.per_shard for s, g in enumerate(self._occupants) if g is not None), default=0
    )
    return next(c for c in self.active_counts if c > used)

  def _in_step(self, slot: int, local: int) -> int:
    """A slot's row in the outputs of a step over `local` rows per block."""
    return slot // self.per_shard * local + slot % self.per_shard

  @functools.cached_property
  def _insert(self):
    replicated = self.layout.shardings.replicated
    fn = functools.partial(_insert, self.layout, self.specials, self.vocab_limit, self.max_len)
    return jax.jit(
      fn,
      out_shardings=(self._state_shardings, replicated, replicated, replicated),
      donate_argnums=1,
    )

  def _prefill_rows(
    self, chunk: list[Generation], slots: list[int], width: int, count: int = 0
  ) -> dict:
    """The insert program's per-row inputs, `count` rows (default the smallest compiled count
    that holds the chunk); padding rows target slot `self.slots`, which the writes drop."""
    count = count or next(c for c in self.prefill_counts if c >= len(chunk))
    tokens = np.zeros((count, width), np.int32)
    columns = {
      "length": np.ones(count, np.int32),
      "slot": np.full(count, self.slots, np.int32),
      "cap": np.zeros(count, np.int32),
      "seed": np.zeros(count, np.int32),
      "temperature": np.zeros(count, np.float32),
      "top_k": np.zeros(count, np.int32),
      "top_p": np.ones(count, np.float32),
      "ignore_eos": np.zeros(count, bool),
    }
    for r, (g, slot) in enumerate(zip(chunk, slots)):
      ids = [self.specials.start, *g.ids] if self.task == "lm" else g.ids
      tokens[r, : len(ids)] = ids
      columns["length"][r], columns["slot"][r] = len(ids), slot
      for name in ("cap", "seed", "temperature", "top_k", "top_p", "ignore_eos"):
        columns[name][r] = getattr(g, name)
    return self.decoder.layout.rows_on_mesh({"tokens": tokens, **columns})

  def _width(self, g: Generation) -> int:
    length = len(g.ids) + (self.task == "lm")  # an LM's inputs start with the start token
    return next(w for w in self.widths if w >= length)

  def warm_up(self) -> int:
    """Compiles every step (active count) and insert (prefill row count x width), each run
    once on free slots or padding rows: the number of programs."""
    self._state = self._empty_state()
    with jax.set_mesh(self.layout.mesh):
      for count in self.prefill_counts:
        for width in self.widths:
          rows = self._prefill_rows([], [], width, count)
          self._state, *_ = self._insert(self.decoder.params, self._state, rows)
      for step in self._steps.values():
        self._state, *out = step(self.decoder.params, self._state)
        jax.block_until_ready(out)
    return len(self._steps) + len(self.prefill_counts) * len(self.widths)

  # -- the loop -------------------------------------------------------------------------------

  def submit(self, generation: Generation) -> None:
    """Queues a row (from any thread); it takes the first free slot."""
    if len(generation.ids) + (self.task == "lm") > self.widths[-1]:
      raise ValueError(f"{len(generation.ids)} tokens do not fit the widest prefill")
    with self._wake:
      if not self._closed:
        self._waiting.append(generation)
        self._wake.notify()
        return
    generation.emit([], "error")  # stopped or dead: nothing will generate it

  @property
  def backlog(self) -> int:
    """Requests waiting for a slot."""
    return sum(not g.cancelled for g in list(self._waiting))

  @property
  def slots_in_use(self) -> int:
    return sum(g is not None for g in self._occupants)

  def start(self) -> None:
    if self._state is None:
      self.warm_up()
    self._stopping = self._closed = False
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    with self._wake:
      self._stopping = True
      self._wake.notify()
    if self._thread is not None:
      self._thread.join(timeout=60)

  @property
  def running(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def _run(self) -> None:
    pending = collections.deque()  # dispatched, not yet delivered: oldest first
    try:
      with jax.set_mesh(self.layout.mesh):
        while not self._stopping:
          self._admit(pending)
          live = self.slots_in_use > 0
          if live:
            local, span = self._active_count(), self._span()
            with self.decoder.dispatch_lock:
              self._state, *out = self._steps[local, span](self.decoder.params, self._state)
            self._positions += self.steps_per_chunk
            for array in out:
              array.copy_to_host_async()
            pending.append(("step", (out, local), list(self._occupants)))
          # One dispatch stays in flight while the host hands out the one before it.
          while len(pending) > live:
            self._deliver(*pending.popleft())
          if not live and not pending:
            with self._wake:
              while not self._stopping and not self._waiting:
                self._wake.wait()
    except Exception as e:  # reported through `failure` (the service's /healthz) and the log
      self.failure = e
      self.log(f"serve: the decode engine died ({type(e).__name__}: {e}); /healthz answers 503")
    finally:  # stopped or dead: nothing will generate what is left; say so
      with self._wake:
        self._closed = True
        left = [g for g in [*self._waiting, *self._occupants] if g is not None]
        self._waiting.clear()
      self._occupants = [None] * self.slots
      for g in left:
        if not g.finished and not g.cancelled:
          g.finished = True
          g.emit([], "error")

  def _admit(self, pending: collections.deque) -> None:
    free = [s for s in self._order if self._occupants[s] is None]
    if not free:
      return
    taken = []
    with self._wake:
      while self._waiting and len(taken) < len(free):
        g = self._waiting.popleft()
        if not g.cancelled:
          taken.append(g)
    by_width = collections.defaultdict(list)
    for g in taken:
      by_width[self._width(g)].append(g)
    for width, group in by_width.items():
      for start in range(0, len(group), self.prefill_counts[-1]):
        chunk = group[start : start + self.prefill_counts[-1]]
        slots = [free.pop(0) for _ in chunk]
        rows = self._prefill_rows(chunk, slots, width)
        with self.decoder.dispatch_lock:
          self._state, *out = self._insert(self.decoder.params, self._state, rows)
        for g, slot in zip(chunk, slots):
          self._occupants[slot] = g
          # After the start token and the prompt (the insert picked the first output token).
          self._positions[slot] = len(g.ids) + 1 if self.task == "lm" else 0
        if self.task == "lm":  # the prefill picked each prompt's first token
          for array in out:
            array.copy_to_host_async()
          occupants = [None] * self.slots
          for g, slot in zip(chunk, slots):
            occupants[slot] = g
          pending.append(("insert", (out, slots), occupants))

  def _deliver(self, kind: str, out, occupants: list[Generation | None]) -> None:
    if kind == "insert":
      arrays, slots = out
      token, ends, done = (np.asarray(a.addressable_data(0)) for a in arrays)
      rows = {
        slot: (token[r : r + 1], ends[r : r + 1], done[r : r + 1]) for r, slot in enumerate(slots)
      }
    else:
      arrays, local = out
      token, ends, done = (np.asarray(a.addressable_data(0)) for a in arrays)  # [steps, rows]
      rows = {}
      for slot, g in enumerate(occupants):
        if g is not None:
          r = self._in_step(slot, local)
          rows[slot] = (token[:, r], ends[:, r], done[:, r])
    delivered = 0
    for slot, (tokens, stopped, finished) in rows.items():
      g = occupants[slot]
      if g is None or g.finished:
        continue
      if g.cancelled:
        self._free(slot, g)
        continue
      run, reason = [], None
      for t, s, f in zip(tokens, stopped, finished):
        if s:
          reason = "stop"
          break
        run.append(int(t))
        if f:
          reason = "length"
          break
      delivered += len(run)
      if reason:
        self._free(slot, g)
      g.emit(run, reason)
    for slot, g in enumerate(self._occupants):  # cancelled while its tokens were on the way
      if g is not None and g.cancelled and not g.finished:
        self._free(slot, g)
    if self.on_tokens and delivered:
      self.on_tokens(delivered)

  def _free(self, slot: int, g: Generation) -> None:
    g.finished = True
    if self._occupants[slot] is g:
      self._occupants[slot] = None


def _scatter_rows(state: jax.Array, rows: jax.Array, slots: jax.Array, axis: int = 0):
  """state with `rows` written at `slots` along `axis` (out-of-range slots: padding, dropped);
  rows may be narrower than the state along the next axis (a prefill bucket)."""
  index = (slice(None),) * axis + (slots,)
  if rows.ndim > axis + 1 and rows.shape[axis + 1] < state.shape[axis + 1]:
    index = index + (slice(0, rows.shape[axis + 1]),)
  return state.at[index].set(rows.astype(state.dtype), mode="drop")


def _pick(logits, settings: dict, positions, vocab_limit: int, specials) -> jax.Array:
  """Each row's token at its position, with its own seed and sampling settings."""
  keys = step_keys(settings["seed"], positions)
  temperature, top_k, top_p = settings["temperature"], settings["top_k"], settings["top_p"]
  return pick_tokens(logits, keys, temperature, top_k, top_p, vocab_limit, specials)


def _insert(layout, specials, vocab_limit, max_len, params, state, rows):
  """Prefills (LM) or encodes (translation) the rows and writes them into their slots: the new
  state and, for an LM, each row's first token, whether it is a stop and whether it ends."""
  model = nnx.merge(layout.graphdef, params)
  cache, lengths, slots = dict(state["cache"]), rows["length"], rows["slot"]
  caps = rows["cap"]
  o = layout.cfg.decode
  if layout.cfg.task == "lm":
    logits, cached = model.prefill(rows["tokens"], lengths)
    for name in ("k", "v"):
      cache[name] = _scatter_rows(cache[name], cached[name], slots, axis=1)
    n = lengths - 1  # the first output position: after the start token and the prompt
    first = _pick(logits, rows, n, vocab_limit, specials)
    limit = jnp.where(caps > 0, jnp.minimum(n + caps, max_len), max_len)
    ends = specials.ends(first) & ~rows["ignore_eos"]
    done = ends | (n + 1 >= limit)
    t, previous = jnp.minimum(n + 1, max_len - 1), first
  else:
    source = model.encode_source(rows["tokens"], lengths)
    for name in ("cross_k", "cross_v"):
      cache[name] = _scatter_rows(cache[name], source[name], slots, axis=1)
    # The slot's whole width: a narrower bucket must not leave a former row's source visible.
    width = cache["cross_segments"].shape[-1]
    real = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
    cache["cross_segments"] = _scatter_rows(cache["cross_segments"], real, slots)
    limit = jnp.ceil(o.max_len_a * lengths + o.max_len_b).astype(jnp.int32)
    limit = jnp.clip(jnp.where(caps > 0, jnp.minimum(limit, caps), limit), 1, max_len)
    t = jnp.zeros_like(lengths)
    previous = jnp.full_like(lengths, specials.start)
    first = ends = done = jnp.zeros_like(lengths, bool)
  new = {**state, "cache": cache}
  values = dict(
    t=t,
    previous=previous,
    limit=limit,
    seed=rows["seed"],
    temperature=rows["temperature"],
    top_k=rows["top_k"],
    top_p=rows["top_p"],
    ignore_eos=rows["ignore_eos"],
  )
  for name, value in values.items():
    new[name] = _scatter_rows(state[name], value, slots)
  return new, first, ends, done


def _blocks(x: jax.Array, axis: int, shards: int) -> jax.Array:
  """[..., slots, ...] -> [..., shards, slots / shards, ...]: the slot axis's device blocks."""
  return x.reshape(x.shape[:axis] + (shards, x.shape[axis] // shards) + x.shape[axis + 1 :])


def _slot_axis(path) -> int:
  """Where a state array's slot axis is: after the layers axis in the caches' keys/values."""
  names = [getattr(p, "key", None) for p in path]
  return 1 if names[-1] in ("k", "v", "cross_k", "cross_v") else 0


def _step(layout, specials, vocab_limit, max_len, steps, shards, local, span, params, state):
  """`steps` tokens for the first `local` slots of every device block, attending over the
  cache's first `span` positions: the state, and per step and those rows
  [steps, shards * local] the token, whether it is a stop and whether the slot is done (a stop,
  or its limit reached)."""
  model = nnx.merge(layout.graphdef, params)
  full = state

  def active(path, x):
    axis = _slot_axis(path)
    y = jax.lax.slice_in_dim(_blocks(x, axis, shards), 0, local, axis=axis + 1)
    return y.reshape(x.shape[:axis] + (shards * local,) + x.shape[axis + 1 :])

  def put_back(path, x, y):
    axis = _slot_axis(path)
    y = y.reshape(x.shape[:axis] + (shards, local) + x.shape[axis + 1 :])
    return jax.lax.dynamic_update_slice_in_dim(_blocks(x, axis, shards), y, 0, axis + 1).reshape(
      x.shape
    )

  state = jax.tree_util.tree_map_with_path(active, state)

  def one(state, _):
    t = state["t"]
    logits, cache = model.decode_step(state["previous"], t, state["cache"], span)
    token = _pick(logits, state, t, vocab_limit, specials)
    ends = specials.ends(token) & ~state["ignore_eos"]
    done = ends | (t + 1 >= state["limit"])
    # A finished or free slot keeps computing (the program's shape is fixed) within bounds.
    state = {**state, "cache": cache, "previous": token, "t": jnp.minimum(t + 1, max_len - 1)}
    return state, (token, ends, done)

  state, (tokens, ends, done) = jax.lax.scan(one, state, None, length=steps)
  state = jax.tree_util.tree_map_with_path(put_back, full, state)
  return state, tokens, ends, done
