"""Incremental decoding with a KV cache: greedy, beam search, sampling; batched text in/out.

The model keeps per-layer self-attention keys/values ([layers, batch, max_len, kv heads, kv]),
written one position per step; an encoder-decoder computes the source's cross-attention keys
and values once. Everything runs under the training mesh's shardings (batch over data/fsdp,
heads over tensor, parameters gathered per layer under ZeRO-3) with the same jitted code.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import inference
from lm.data import tokenizer as tok
from lm.layout import Layout

NEG_INF = -1e30  # finite, so that sums and differences of masked scores stay well defined


@dataclasses.dataclass(frozen=True)
class Specials:
  """The ids decoding treats specially: the decoder's first input, the end token (which also
  fills every position after a row's end), every id that ends a row (`stops`: the end token
  and any others the model lists) and the ids never generated."""

  start: int = tok.BOS_ID
  eos: int = tok.EOS_ID
  banned: tuple[int, ...] = (tok.PAD_ID, tok.BOS_ID)
  stops: tuple[int, ...] = (tok.EOS_ID,)

  @classmethod
  def of(cls, tokenizer, start_id: int) -> Specials:
    """The tokenizer's ends, the model's start (model.start_id); pad and start are never
    generated, unless one of them also ends a row (GPT-2's 50256 is BOS and EOS)."""
    eos = tokenizer.eos_id
    stops = tuple(getattr(tokenizer, "eos_ids", None) or (eos,))
    banned = {tokenizer.pad_id, start_id} - {None, *stops}
    return cls(start_id, eos, tuple(sorted(banned)), stops)

  def ends(self, token: jax.Array) -> jax.Array:
    """Whether each token ends its row."""
    return jnp.isin(token, jnp.asarray(self.stops, token.dtype))


def _forbid(logits: jax.Array, vocab_limit: int, specials: Specials) -> jax.Array:
  """None of the banned ids and none of the ids padded onto the vocab for the mesh."""
  ids = jnp.arange(logits.shape[-1])
  banned = ids >= vocab_limit
  for i in specials.banned:
    banned = banned | (ids == i)
  return jnp.where(banned, NEG_INF, logits)


def length_penalty(length: jax.Array | float, alpha: jax.Array | float) -> jax.Array | float:
  """GNMT's ((5 + length) / 6) ** alpha; length counts every token including EOS."""
  return ((5.0 + length) / 6.0) ** alpha


def filter_logits(
  logits: jax.Array,
  temperature: jax.Array | float = 1.0,
  top_k: jax.Array | int = 0,
  top_p: jax.Array | float = 1.0,
) -> jax.Array:
  """Temperature, then keep the top_k tokens and the smallest set holding top_p of the mass.

  Each setting is a scalar or one value per row (logits [..., vocab], a setting [...]), so rows
  with different settings share one program; top_k 0 and top_p 1 keep every token."""
  temperature, top_k, top_p = (jnp.asarray(x)[..., None] for x in (temperature, top_k, top_p))
  logits = logits / temperature

  def truncate(logits):
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # [..., vocab], descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), -1)
    ordered = jnp.where(ordered < kth, NEG_INF, ordered)  # top_p weighs top_k's survivors
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.where(top_p < 1.0, cutoff, -jnp.inf)  # 1 keeps all, whatever the rounding
    return jnp.where((logits < kth) | (logits < cutoff), NEG_INF, logits)

  # The sort is skipped when no row asks for it (plain temperature sampling).
  return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), truncate, lambda x: x, logits)


def _generate(
  model,
  cache,
  batch: int,
  max_len: int,
  pick: Callable,
  specials: Specials,
  prompt=None,
  prompt_lengths=None,
  seeds=None,
  limits=None,
  ignore_eos=None,
):
  """Token by token until every row has emitted EOS or reached its length limit.

  `prompt` [batch, width <= max_len] forces each row's first `prompt_lengths` [batch]
  positions; `limits` [batch] (default max_len) caps each row; `seeds` [batch] (default 0)
  seed each row's own random stream, so a row's draws do not depend on the rows beside it.
  Tokens after the end are EOS; a row that reaches its limit without EOS keeps all its tokens.
  A row of `ignore_eos` [batch] runs to its limit whatever it emits (load tests: fixed lengths).
  """
  ignore_eos = jnp.zeros((batch,), bool) if ignore_eos is None else ignore_eos
  limits = jnp.full((batch,), max_len) if limits is None else limits
  seeds = jnp.zeros((batch,), jnp.int32) if seeds is None else seeds
  out = jnp.full((batch, max_len), specials.eos, jnp.int32)
  if prompt is not None:
    prompt = jnp.pad(prompt, ((0, 0), (0, max_len - prompt.shape[1])))

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < max_len) & ~done.all()

  def body(carry):
    t, out, previous, done, cache = carry
    logits, cache = model.decode_step(previous, t, cache)
    token = pick(logits, step_keys(seeds, t)).astype(jnp.int32)
    forcing = jnp.zeros((batch,), bool)
    if prompt is not None:
      forcing = t < prompt_lengths
      token = jnp.where(forcing, prompt[:, t], token)
    token = jnp.where(done, specials.eos, token)
    done = done | (specials.ends(token) & ~forcing & ~ignore_eos) | (t + 1 >= limits)
    return t + 1, out.at[:, t].set(token), token, done, cache

  first = jnp.full((batch,), specials.start, jnp.int32)
  start = (0, out, first, jnp.zeros((batch,), bool), cache)
  return jax.lax.while_loop(cond, body, start)[1]


def greedy(
  model: nnx.Module,
  cache: dict,
  batch: int,
  max_len: int,
  vocab_limit: int,
  prompt: jax.Array | None = None,
  prompt_lengths: jax.Array | None = None,
  limits: jax.Array | None = None,
  specials: Specials = Specials(),
) -> jax.Array:
  """Tokens [batch, max_len], the most likely one at every step."""

  def pick(logits, _):
    return _forbid(logits, vocab_limit, specials).argmax(-1)

  return _generate(
    model, cache, batch, max_len, pick, specials, prompt, prompt_lengths, limits=limits
  )


def step_keys(seeds: jax.Array, positions: jax.Array | int) -> jax.Array:
  """The keys row r draws its token at position t with: its own stream, key(seeds[r]), folded
  with t (one position for every row, or one per row), so that a row's draws depend on neither
  the rows beside it nor when it joined them."""
  keys = jax.vmap(jax.random.key)(seeds)
  positions = jnp.broadcast_to(jnp.asarray(positions), seeds.shape)
  return jax.vmap(jax.random.fold_in)(keys, positions)


def pick_tokens(
  logits: jax.Array,
  keys: jax.Array,
  temperature: jax.Array,
  top_k: jax.Array,
  top_p: jax.Array,
  vocab_limit: int,
  specials: Specials,
) -> jax.Array:
  """Each row's next token [b] from its logits [b, vocab]: the most likely where its
  temperature is 0, else drawn with its key from the filtered softmax (see filter_logits).
  The settings are per row ([b]): any mix shares one program."""
  logits = _forbid(logits, vocab_limit, specials)
  most_likely = logits.argmax(-1)
  drawing = temperature > 0

  def draw():
    filtered = filter_logits(logits, jnp.where(drawing, temperature, 1.0), top_k, top_p)
    return jax.vmap(jax.random.categorical)(keys, filtered)

  # A greedy batch never pays for the filter.
  drawn = jax.lax.cond(drawing.any(), draw, lambda: most_likely)
  return jnp.where(drawing, drawn, most_likely).astype(jnp.int32)


def sample(
  model: nnx.Module,
  cache: dict,
  batch: int,
  max_len: int,
  vocab_limit: int,
  seeds: jax.Array,
  temperature: jax.Array | float = 1.0,
  top_k: jax.Array | int = 0,
  top_p: jax.Array | float = 1.0,
  prompt: jax.Array | None = None,
  prompt_lengths: jax.Array | None = None,
  limits: jax.Array | None = None,
  specials: Specials = Specials(),
  ignore_eos: jax.Array | None = None,
) -> jax.Array:
  """Tokens [batch, max_len] drawn from the filtered softmax (see filter_logits); row r's
  draws come from its own seed, seeds[r]. The settings are scalars or per row ([batch]); a row
  of temperature 0 is greedy."""
  temperature, top_k, top_p = (
    jnp.broadcast_to(jnp.asarray(x), (batch,)) for x in (temperature, top_k, top_p)
  )

  def pick(logits, keys):
    return pick_tokens(logits, keys, temperature, top_k, top_p, vocab_limit, specials)

  return _generate(
    model, cache, batch, max_len, pick, specials, prompt, prompt_lengths, seeds, limits, ignore_eos
  )


def _repeat_rows(cache: dict, beam: int) -> dict:
  """Each batch row's cache repeated `beam` times, beams of one row adjacent."""
  rows_axis = lambda name: 0 if name == "cross_segments" else 1  # the rest: [layers, b, ...]
  return {name: jnp.repeat(x, beam, axis=rows_axis(name)) for name, x in cache.items()}


def beam_search(
  model: nnx.Module,
  cache: dict,
  batch: int,
  beam: int,
  max_len: int,
  vocab_limit: int,
  alpha: jax.Array | float,
  limits: jax.Array | None = None,
  specials: Specials = Specials(),
) -> tuple[jax.Array, jax.Array]:
  """Best sequences [batch, max_len] and their scores (log-prob / length penalty).

  Keeps `beam` live and `beam` finished hypotheses per row (a candidate ending in EOS finishes
  when it ranks among the step's top `beam`); stops early when no live beam can beat the worst
  finished one (log-probs only fall, the penalty is largest at the row's limit). At its
  limit (`limits` [batch], default max_len), a row's live hypotheses finish without EOS,
  keeping all their tokens. `alpha` is a scalar or per row ([batch]).
  """
  limits = jnp.full((batch,), max_len) if limits is None else limits
  alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (batch,))
  cache = _repeat_rows(cache, beam)
  seqs = jnp.full((batch, beam, max_len), specials.eos, jnp.int32)  # EOS after the end
  live_lp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (beam - 1)), (batch, 1))
  state = dict(
    t=0,
    live=seqs,
    live_lp=live_lp,
    previous=jnp.full((batch, beam), specials.start, jnp.int32),
    done=seqs,
    done_score=jnp.full((batch, beam), NEG_INF),
    cache=cache,
  )

  def cond(s):
    best_possible = s["live_lp"].max(-1) / length_penalty(limits, alpha)
    settled = (s["done_score"].min(-1) >= best_possible) | (s["t"] >= limits)
    return (s["t"] < max_len) & ~settled.all()

  def body(s):
    t = s["t"]
    logits, cache = model.decode_step(s["previous"].reshape(-1), t, s["cache"])
    logp = jax.nn.log_softmax(_forbid(logits, vocab_limit, specials)).reshape(batch, beam, -1)
    vocab = logp.shape[-1]
    scores = (s["live_lp"][..., None] + logp).reshape(batch, beam * vocab)
    top_lp, top_index = jax.lax.top_k(scores, 2 * beam)
    origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    grown = jnp.take_along_axis(s["live"], origin[..., None], axis=1).at[:, :, t].set(token)
    ends = specials.ends(token) | (t + 1 >= limits)[:, None]
    # Finished: the old finished hypotheses and the candidates that end here among the top
    # `beam` (as in fairseq: so beam 1 is greedy); keep the best `beam`.
    in_beam = jnp.arange(2 * beam) < beam
    penalty = length_penalty(t + 1.0, alpha[:, None])
    finished = jnp.where(ends & in_beam, top_lp / penalty, NEG_INF)
    pool_score = jnp.concatenate([s["done_score"], finished], axis=1)
    pool_seq = jnp.concatenate([s["done"], grown], axis=1)
    done_score, pick = jax.lax.top_k(pool_score, beam)
    done = jnp.take_along_axis(pool_seq, pick[..., None], axis=1)
    # Live: the best candidates that did not end.
    live_lp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_lp), beam)
    live = jnp.take_along_axis(grown, pick[..., None], axis=1)
    rows = (jnp.arange(batch)[:, None] * beam + jnp.take_along_axis(origin, pick, 1)).reshape(-1)
    cache = {
      k: (jnp.take(v, rows, axis=1) if k in ("k", "v") else v) for k, v in cache.items()
    }  # the source's keys/values are the same for every beam of a row
    previous = jnp.take_along_axis(token, pick, axis=1)
    return dict(
      t=t + 1,
      live=live,
      live_lp=live_lp,
      previous=previous,
      done=done,
      done_score=done_score,
      cache=cache,
    )

  s = jax.lax.while_loop(cond, body, state)
  return s["done"][:, 0], s["done_score"][:, 0]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  beam_size: int = 4
  alpha: float = 0.6
  max_len: int = 256  # a hard cap; a translation stops at max_len_a * its source + max_len_b
  max_len_a: float = 1.5
  max_len_b: int = 10
  temperature: float = 0.0  # LM: 0 = greedy, else sampling with top_k / top_p
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  length_buckets: tuple[int, ...] = ()  # source widths compiled for; () = powers of two

  @classmethod
  def from_config(cls, decode_cfg) -> DecodeOptions:
    values = {f.name: decode_cfg[f.name] for f in dataclasses.fields(cls)}
    values["length_buckets"] = tuple(values["length_buckets"])
    return cls(**values)


MIN_BUCKET = 8


def row_counts(batch_size: int, multiple: int, buckets: bool) -> tuple[int, ...]:
  """The row counts a batch is padded to, ascending: batch_size rounded up to the mesh's batch
  divisor `multiple` and, with `buckets`, the powers of two times it below that (a few rows
  need not pay for a full batch: a server's batches are as large as the traffic)."""
  full = -(-batch_size // multiple) * multiple
  counts = {full}
  if buckets:
    counts |= {multiple << i for i in range(full.bit_length())}
  return tuple(sorted(c for c in counts if c <= full))


def source_buckets(seq_len: int, buckets: tuple[int, ...] = ()) -> tuple[int, ...]:
  """The source widths a translation batch is padded to: the given sizes, or powers of two from
  MIN_BUCKET, always ending at seq_len (the longest source the model takes)."""
  if not buckets:
    buckets = tuple(MIN_BUCKET << i for i in range(max(seq_len.bit_length(), 1)))
  return tuple(sorted({b for b in buckets if b < seq_len} | {seq_len}))


class Decoder:
  """Batched text -> text with a trained model on its mesh; the API the CLI (and a server) use.

  Each batch is padded to a fixed shape (a source length bucket for translation, and with
  `row_buckets` a row count), so the set of compiled programs is small and known up front:
  `row_counts` x `shapes` x the beam sizes asked for (translation). Every other setting is
  per-row data. `params` may be replaced between calls (periodic evaluation does) without
  recompiling.
  """

  def __init__(
    self,
    layout: Layout,
    params: Any,
    tokenizer: tok.Tokenizer,
    options: DecodeOptions,
    batch_size: int,
    row_buckets: bool = False,
  ):
    # A pipelined layout's parameters are gathered into one without stages (see `params`).
    self.source_layout, layout, self._move = layout, layout.unpipelined(), None
    self.layout, self.params, self.tokenizer, self.options = layout, params, tokenizer, options
    self.specials = Specials.of(tokenizer, layout.dims.start_id)
    self.row_counts = row_counts(batch_size, layout.batch_multiple, row_buckets)
    self.batch_size = self.row_counts[-1]
    self.src_len = layout.cfg.data.seq_len
    self.buckets = source_buckets(self.src_len, options.length_buckets)
    self._jitted = {}
    # Held while a program is dispatched: a server dispatches from two threads (the engine's,
    # static batches'), and programs with collectives must reach every device in one order.
    self.dispatch_lock = threading.Lock()

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, params) -> None:
    """Parameters on the layout the decoder was given; moved to its own if that differs."""
    source, own = self.source_layout, self.layout
    if params is not None and own is not source:
      if self._move is None:  # compiled once: periodic evaluation sets new parameters each time
        self._move = jax.jit(source.to_layer_order, out_shardings=own.shardings.params)
      with jax.set_mesh(source.mesh):
        params = self._move(params)
    self._params = params

  @classmethod
  def from_workdir(
    cls, workdir: str, devices=None, export=None, settings: dict | None = None
  ) -> Decoder:
    """The workdir's latest checkpoint (or `export`) on a mesh over the devices, decoding as
    its config says; `settings` (lm.config.inference_settings) override mesh and decoding."""
    layout, params, tokenizer, _ = inference.restore_for_inference(
      workdir, export, devices, settings=settings
    )
    decode_cfg = layout.cfg.decode
    options = DecodeOptions.from_config(decode_cfg)
    return cls(layout, params, tokenizer, options, decode_cfg.batch_size)

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """Every (input width, output length) a batch can have: one compiled program each."""
    if self.layout.cfg.task == "lm":
      width = min(self.options.max_len, self.layout.cfg.model.max_len)
      return [(width, width)]
    return [(width, self._output_len(width)) for width in self.buckets]

  @property
  def max_input_tokens(self) -> int:
    """The longest input, EOS aside: a source fits data.seq_len with its EOS; a prompt stays
    within what training saw and leaves room for one token in the decode width."""
    if self.layout.cfg.task == "lm":
      return min(self.src_len - 2, self.shapes[0][1] - 1)
    return self.src_len - 1

  @property
  def max_output_tokens(self) -> int:
    """The most tokens an output can have (an LM's continuation of a one-token prompt)."""
    return self.shapes[-1][1] - (self.layout.cfg.task == "lm")

  def _output_len(self, source_len: int) -> int:
    o, m = self.options, self.layout.cfg.model
    # Learned positions end at model.max_len: a longer output would look up past the table.
    cap = min(o.max_len, m.max_len) if m.positions == "learned" else o.max_len
    return int(min(cap, np.ceil(o.max_len_a * source_len + o.max_len_b)))

  def _shape(self, source_lengths: list[int]) -> tuple[int, int]:
    if self.layout.cfg.task == "lm":
      return self.shapes[0]
    longest = max(source_lengths, default=1)
    width = next(b for b in self.buckets if b >= longest)
    return width, self._output_len(width)

  def _compiled(self, max_len: int, beam: int):
    if (max_len, beam) not in self._jitted:
      # Outputs come back replicated so that every process can read them whole.
      self._jitted[max_len, beam] = jax.jit(
        functools.partial(
          _decode_batch,
          self.layout,
          self.options,
          self.specials,
          max_len,
          beam,
          self.tokenizer.vocab_size,
        ),
        out_shardings=self.layout.shardings.replicated,
      )
    return self._jitted[max_len, beam]

  def _encode(self, line: str, warn: Callable[[str], None]) -> list[int]:
    translation = self.layout.cfg.task == "translation"
    ids = self.tokenizer.encode(line, "inputs" if translation else "targets")
    limit = self.max_input_tokens
    if len(ids) > limit:
      warn(f"warning: input of {len(ids)} tokens truncated to {limit}: {line[:40]!r}...")
      ids = ids[:limit]
    return ids + [self.tokenizer.eos_id] if translation else ids

  def decode_ids(
    self,
    batch_ids: list[list[int]],
    caps: list[int] | None = None,
    seeds: list[int] | None = None,
    *,
    temperatures: list[float] | None = None,
    top_ks: list[int] | None = None,
    top_ps: list[float] | None = None,
    alphas: list[float] | None = None,
    beam_size: int | None = None,
    ignore_eos: list[bool] | None = None,
  ) -> np.ndarray:
    """Token ids of one batch (at most batch_size rows) -> output tokens [rows, max_len].

    Per row, each default the options': `caps`, at most this many output tokens (0 = the
    options' limit; an LM counts the continuation only); `seeds`, the sampling seed;
    `temperatures` (0 = greedy), `top_ks`, `top_ps` (LM sampling, see filter_logits); `alphas`
    (beam search's length penalty); `ignore_eos` (LM: run to the cap past EOS, whose
    ids then stay in the row). All are data: any values share one compiled program, and
    a row's output depends on neither the rows beside it nor its place in the batch.
    `beam_size` (translation; default the options') is the one setting compiled for. Under
    several processes every process passes the same rows (as --mode=decode does: each process
    reads the whole input) and gets every output."""
    rows = len(batch_ids)
    limit = self.max_input_tokens + (self.layout.cfg.task == "translation")  # with EOS
    for r, ids in enumerate(batch_ids):
      if len(ids) > limit:
        raise ValueError(f"row {r} has {len(ids)} tokens; an input has at most {limit}")
    padded = next(c for c in self.row_counts if c >= rows)
    width, max_len = self._shape([len(ids) for ids in batch_ids])
    tokens = np.zeros((padded, width), np.int32)
    for r, ids in enumerate(batch_ids):
      tokens[r, : len(ids)] = ids
    o = self.options
    # name: (the given values, the default, a padding row's: greedy, done after one token)
    settings = dict(
      length=([len(ids) for ids in batch_ids], 0, 0),
      cap=(caps, 0, 1),
      seed=(seeds, o.seed, 0),
      temperature=(temperatures, o.temperature, 0.0),
      top_k=(top_ks, o.top_k, 0),
      top_p=(top_ps, o.top_p, 1.0),
      alpha=(alphas, o.alpha, 0.0),
      ignore_eos=(ignore_eos, 0, 0),
    )
    per_row = {name: _column(*setting, rows, padded) for name, setting in settings.items()}
    beam = 1 if self.layout.cfg.task == "lm" else beam_size or self.options.beam_size
    with jax.set_mesh(self.layout.mesh):
      array, per_row = self.layout.rows_on_mesh((tokens, per_row))
      with self.dispatch_lock:
        out = self._compiled(max_len, beam)(self.params, array, per_row)
    return np.asarray(out.addressable_data(0))[:rows]

  def __call__(
    self,
    lines: Iterable[str],
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
  ) -> list[str]:
    """One output line per input line, in order; an empty input line gives an empty output.
    Lines are decoded in batches of similar length, so that short ones share a small shape."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    lines = list(lines)
    outputs = [""] * len(lines)
    todo = [(i, self._encode(line, warn)) for i, line in enumerate(lines) if line.strip()]
    todo.sort(key=lambda item: len(item[1]))
    for start in range(0, len(todo), self.batch_size):
      chunk = todo[start : start + self.batch_size]
      # Line i samples with seed + i: reproducible whatever the batch size.
      seeds = [self.options.seed + i for i, _ in chunk]
      tokens = self.decode_ids([ids for _, ids in chunk], seeds=seeds)
      for (i, ids), row in zip(chunk, tokens):
        if self.layout.cfg.task == "lm":  # a continuation: what follows the prompt
          row = row[len(ids) :]
        outputs[i] = self.tokenizer.decode(row)
      if progress:
        progress(min(start + self.batch_size, len(todo)), len(todo))
    return outputs


def until_end(row, stops) -> list[int]:
  """An output row's tokens before the first that ends it (`stops`: an id or several; all of
  them if none is there)."""
  stops = {stops} if isinstance(stops, int) else set(stops)
  row = [int(t) for t in np.asarray(row).reshape(-1)]
  return row[: next((n for n, t in enumerate(row) if t in stops), len(row))]


def _column(given: list | None, default, pad, rows: int, padded: int) -> np.ndarray:
  """One per-row setting [padded]: the given values (or the default), then padding rows'."""
  column = np.full((padded,), pad, np.int32 if isinstance(pad, int) else np.float32)
  column[:rows] = default if given is None else given
  return column


def _decode_batch(
  layout: Layout,
  options: DecodeOptions,
  specials: Specials,
  max_len: int,
  beam: int,
  vocab_limit: int,
  params,
  tokens: jax.Array,
  per_row: dict[str, jax.Array],
) -> jax.Array:
  model = nnx.merge(layout.graphdef, params)
  batch = tokens.shape[0]
  lengths, caps = per_row["length"], per_row["cap"]
  if layout.cfg.task == "translation":
    cache = model.init_cache(tokens, lengths, max_len)
    limits = jnp.ceil(options.max_len_a * lengths + options.max_len_b).astype(jnp.int32)
    limits = jnp.clip(jnp.where(caps > 0, jnp.minimum(limits, caps), limits), 1, max_len)
    if beam > 1:
      alpha = per_row["alpha"]
      return beam_search(model, cache, batch, beam, max_len, vocab_limit, alpha, limits, specials)[
        0
      ]
    return greedy(model, cache, batch, max_len, vocab_limit, limits=limits, specials=specials)
  cache = model.init_cache(batch, max_len)
  limits = jnp.where(caps > 0, jnp.minimum(lengths + caps, max_len), max_len)
  return sample(
    model,
    cache,
    batch,
    max_len,
    vocab_limit,
    per_row["seed"],
    per_row["temperature"],
    per_row["top_k"],
    per_row["top_p"],
    prompt=tokens,
    prompt_lengths=lengths,
    limits=limits,
    specials=specials,
    ignore_eos=per_row["ignore_eos"] > 0,
  )
