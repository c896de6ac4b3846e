"""The grain input pipeline: per-process shares, tokenization, packing, batches, resumable state.

Training: this process's disjoint 1/P share of the source -> shuffle (reseeded every epoch)
-> tokenize (+EOS, truncate or drop past seq_len) -> first-fit packing into seq_len rows with
`*_segment_ids` / `*_positions` -> this process's rows of the global batch -> thread prefetch.
The iterator's state is a small JSON-able dict, so a resumed run sees exactly the batches the
uninterrupted run would have seen. Evaluation: padded, unpacked rows; no example is dropped.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from lm.config import ConfigError
from lm.data import sources
from lm.data import tokenizer as tok

READ_THREADS, READ_AHEAD = 4, 64  # parallel source reads + tokenization
MAX_PIECES = 64  # data.too_long=split: tokens past 64 x seq_len of one document are cut
PROBE_EXAMPLES = 256  # a source whose first examples are all unusable is an error, not a hang


@dataclasses.dataclass
class Data:
  """A run's data: the tokenizer, the training source and the held-out records."""

  cfg: ml_collections.ConfigDict  # the full config (task, seed, data, batch size)
  tokenizer: tok.Tokenizer
  train: grain.MapDataset  # records: dicts of text, {} for a malformed example
  eval_records: list[dict]
  eval: dict[str, np.ndarray]  # eval_records as padded token rows
  skipped_at_load: int  # malformed lines found while indexing local files

  @property
  def eval_text(self) -> list[tuple[str, str]]:
    return [(r.get("inputs", ""), r["targets"]) for r in self.eval_records]


def _held_out_split(cfg, train):
  """(train, eval records): `data.eval_source`, or the first data.eval_examples examples."""
  limit = cfg.data.eval_examples
  if cfg.data.eval_source:
    held_out = sources.open_source(cfg.data.eval_source, cfg.data, cfg.task, cfg.seed + 1)
    records = [r for r in (held_out[i] for i in range(min(limit, len(held_out)))) if r]
    return train, records
  if len(train) <= limit:
    raise ConfigError(
      f"config.data.eval_examples: {limit} leaves no training example of the {len(train)} "
      "in data.source; lower it or set data.eval_source"
    )
  records = [r for r in (train[i] for i in range(limit)) if r]
  return train[limit:], records


def load(cfg: ml_collections.ConfigDict, workdir: str, log=print) -> Data:
  source = sources.open_source(cfg.data.source, cfg.data, cfg.task, cfg.seed)
  if len(source) == 0:
    raise ConfigError(f"config.data.source: {cfg.data.source!r} has no usable example")
  if source.skipped:
    log(f"data: skipped {source.skipped} malformed lines in {cfg.data.source}")
  train, eval_records = _held_out_split(cfg, grain.MapDataset.source(source))
  probe = [train[i] for i in range(min(PROBE_EXAMPLES, len(train)))]
  if not any(probe):
    raise ConfigError(
      f"config.data.source: the first {len(probe)} examples of {cfg.data.source!r} are all "
      "malformed or empty; check data.direction / data.fields"
    )

  def sample_texts():
    count = min(cfg.data.tokenizer_sample, len(train))
    picks = np.random.default_rng(cfg.seed).choice(len(train), size=count, replace=False)
    for i in np.sort(picks):
      record = train[int(i)]
      if record:
        yield from record.values()

  tokenizer = tok.load_or_train(cfg.data, cfg.model.vocab_size, workdir, sample_texts, log)
  eval_tokens = eval_arrays(tokenizer, eval_records, cfg.data.seq_len)
  return Data(cfg, tokenizer, train, eval_records, eval_tokens, source.skipped)


def encode(tokenizer: tok.Tokenizer, text: str, seq_len: int) -> np.ndarray:
  """Token ids + EOS, truncated to seq_len."""
  return np.asarray(tokenizer.encode(text) + [tok.EOS_ID], np.int32)[:seq_len]


class _Tokenize(grain.transforms.Map):
  """Record -> token arrays (+EOS); None (dropped, counted) for a malformed or too long one.

  too_long: "truncate" cuts at seq_len; "drop" skips; "split" keeps up to MAX_PIECES x seq_len
  tokens for _SplitLong to cut into pieces.
  """

  def __init__(self, tokenizer, seq_len: int, too_long: str, skipped: SkipCounter):
    self.tokenizer = tokenizer
    self.keep = seq_len * (MAX_PIECES if too_long == "split" else 1)
    self.drop_long = too_long == "drop"
    self.skipped = skipped

  def map(self, record):
    if not record:
      self.skipped.add()
      return None
    keep = self.keep
    out = {k: encode(self.tokenizer, text, keep + 1) for k, text in record.items()}
    if any(len(v) > keep for v in out.values()):
      if self.drop_long:
        self.skipped.add()
        return None
      out = {k: v[:keep] for k, v in out.items()}
    return out


class _SplitLong(grain.experimental.FlatMapTransform):
  """A long LM document -> consecutive seq_len pieces, each its own example (positions restart),
  so that packing wastes none of it."""

  max_fan_out = MAX_PIECES

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, example):
    tokens = example["targets"]
    return [{"targets": tokens[i : i + self.seq_len]} for i in range(0, len(tokens), self.seq_len)]


class SkipCounter:
  """Examples skipped by the running pipeline (malformed, empty, or too long to keep)."""

  def __init__(self, value: int = 0):
    self.value, self._lock = value, threading.Lock()

  def add(self):
    with self._lock:
      self.value += 1

  def __getstate__(self):  # grain workers get a copy; their counts stay in the worker
    return self.value

  def __setstate__(self, value):
    self.__init__(value)


def _pad_to(seq_len: int):
  def pad(example):
    return {k: np.pad(v, (0, seq_len - len(v))) for k, v in example.items()}

  return pad


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ConfigError(
      f"config.train.global_batch_size: {global_batch} is not divisible by the "
      f"{process_count} processes; make it a multiple"
    )
  return global_batch // process_count


class TrainIterator:
  """This process's share of every global batch; `get_state` / `set_state` resume it exactly."""

  def __init__(
    self, data: Data, process_index: int | None = None, process_count: int | None = None
  ):
    cfg = data.cfg
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    rows = local_batch_size(cfg.train.global_batch_size, count)
    seq_len = cfg.data.seq_len
    self.skipped = SkipCounter()
    tokenize = _Tokenize(data.tokenizer, seq_len, cfg.data.too_long, self.skipped)
    share = data.train[index::count]
    if len(share) == 0:
      raise ConfigError(f"config.data.source: no example for process {index} of {count}")
    # A short read-ahead: grain's default (500) costs O(buffer) bookkeeping per element.
    reads = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD)
    ds = share.shuffle(seed=cfg.seed).repeat().map(tokenize).to_iter_dataset(reads)
    ds = ds.filter(lambda example: example is not None)
    if cfg.data.too_long == "split":
      ds = grain.experimental.FlatMapIterDataset(ds, _SplitLong(seq_len))
    if cfg.data.pack:
      keys = ("targets",) if cfg.task == "lm" else ("inputs", "targets")
      ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={k: seq_len for k in keys}, num_packing_bins=rows, seed=cfg.seed
      )
    else:
      ds = ds.map(_pad_to(seq_len))
    ds = ds.batch(rows, drop_remainder=True)
    if cfg.data.workers:  # worker processes each build whole batches: scales past the GIL
      if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()  # (tests, notebooks) their defaults apply
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.workers))
    elif cfg.data.prefetch:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.data.prefetch)
    self._iterator = iter(ds)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    return {"grain": self._iterator.get_state(), "skipped": self.skipped.value}

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state["grain"])
    self.skipped.value = state["skipped"]


def eval_arrays(tokenizer, records: list[dict], seq_len: int) -> dict[str, np.ndarray]:
  """Records as padded [rows, seq_len] token arrays (long ones truncated, none dropped)."""
  arrays = {}
  for key in records[0] if records else ("targets",):
    rows = np.zeros((len(records), seq_len), np.int32)
    for r, record in enumerate(records):
      ids = encode(tokenizer, record[key], seq_len)
      rows[r, : len(ids)] = ids
    arrays[key] = rows
  return arrays


def eval_batches(
  arrays: dict[str, np.ndarray],
  global_batch: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of fixed-size global batches covering every row once.

  Every process yields the same number of batches; missing rows are padding (no tokens).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  rows = local_batch_size(global_batch, count)
  total = len(next(iter(arrays.values())))
  share = {k: v[index::count] for k, v in arrays.items()}
  for b in range(math.ceil(math.ceil(total / count) / rows)):
    batch = {k: v[b * rows : (b + 1) * rows] for k, v in share.items()}
    short = rows - len(next(iter(batch.values())))
    if short:
      batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
    yield batch
