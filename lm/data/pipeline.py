"""The grain input pipeline: data lanes, tokenization, packing, batches, resumable state.

Training: the source shuffled (reseeded every epoch) and repeated -> one lane per row of the
global batch (example i -> lane i mod batch) -> per lane: tokenize (+EOS, truncate, drop or
split past seq_len) -> first-fit packing into seq_len rows with `*_segment_ids` / `*_positions`
-> this process's lanes zipped into its rows of the global batch -> thread prefetch. The state
is a small JSON-able dict per lane, so a resumed run, on any process count, sees exactly the
batches the uninterrupted run would have seen. Evaluation: padded, unpacked rows; no example is
dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from lm.config import ConfigError
from lm.data import labelled, multilingual, sources
from lm.data import tokenizer as tok

MAX_PIECES = 64  # data.too_long=split: tokens past 64 x seq_len of one document are cut
# Rows a lane fills at once: fewer pack sparser (speed config: 4 -> 88%, 32 -> 93% tokens).
LANE_PACKING_BINS = 32
PROBE_EXAMPLES = 256  # a source whose first examples are all unusable is an error, not a hang
SKIPPED = "skipped"  # the examples skipped before a lane's example, row, or a batch's rows


@dataclasses.dataclass
class Data:
  """A run's data: the tokenizer, the training source and the held-out records."""

  cfg: ml_collections.ConfigDict  # the full config (task, seed, data, batch size)
  tokenizer: tok.Tokenizer
  train: grain.MapDataset  # records: dicts of text, {} for a malformed example
  eval_records: list[dict]
  eval: dict[str, np.ndarray]  # eval_records as padded token rows
  skipped_at_load: int  # malformed lines found while indexing local files
  source: sources.Source  # what `train` reads; `close()` closes its files
  eval_pairs: list[str] = dataclasses.field(default_factory=list)  # each record's, multi-pair

  @property
  def eval_text(self) -> list[tuple[str, str]]:
    return [(r.get("inputs", ""), r["targets"]) for r in self.eval_records]

  def close(self) -> None:
    """Closes the training source's files (a later read opens them again)."""
    self.source.close()


def _held_out_split(cfg, train):
  """(train, eval records): `data.eval_source`, or the first data.eval_examples examples
  (task=classify: of a seeded permutation, since labelled files are often sorted by label)."""
  limit = cfg.data.eval_examples
  classify = cfg.task == "classify"
  if cfg.data.eval_source:
    with open_source(cfg.data.eval_source, cfg, cfg.seed + 1) as source:
      held_out = grain.MapDataset.source(source)
      held_out = held_out.shuffle(seed=cfg.seed + 1) if classify else held_out
      records = [r for r in (held_out[i] for i in range(min(limit, len(held_out)))) if r]
  else:
    if len(train) <= limit:
      raise ConfigError(
        f"config.data.eval_examples: {limit} leaves no training example of the {len(train)} "
        "in data.source; lower it or set data.eval_source"
      )
    train = train.shuffle(seed=cfg.seed + 1) if classify else train
    records = [r for r in (train[i] for i in range(limit)) if r]
    train = train[limit:]
  if not records:
    field = "data.eval_source" if cfg.data.eval_source else "data.source"
    raise ConfigError(
      f"config.{field}: its held-out examples hold no usable one (malformed, or labels outside "
      "the classes, as GLUE's unlabelled test split); name another split or file"
    )
  return train, records


def open_source(spec: str, cfg: ml_collections.ConfigDict, seed: int) -> sources.Source:
  """The source `spec` names for the config's task: labelled records for task=classify."""
  if cfg.task == "classify":
    return labelled.open_labelled(spec, cfg.data, seed)
  return sources.open_source(spec, cfg.data, cfg.task, seed)


def load(
  cfg: ml_collections.ConfigDict, workdir: str, log=print, tokenizer: tok.Tokenizer | None = None
) -> Data:
  """The run's data; `tokenizer` (a checkpoint's) instead of data.tokenizer / WORKDIR's."""
  pairs = multilingual.open_pairs(cfg) if multilingual.names_pairs(cfg.data.source) else None
  source = pairs.source if pairs else open_source(cfg.data.source, cfg, cfg.seed)
  if cfg.task == "classify":  # its class order, for the held-out source and the checkpoint
    cfg = labelled.resolve_labels(cfg, source)
  if len(source) == 0:
    raise ConfigError(f"config.data.source: {cfg.data.source!r} has no usable example")
  if source.skipped:
    log(f"data: skipped {source.skipped} malformed lines in {cfg.data.source}")
  if pairs:  # held out per pair before mixing
    train, eval_records = grain.MapDataset.source(source), pairs.eval_records
  else:
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
        yield from (v for v in record.values() if isinstance(v, str))  # not a class index

  tags = [multilingual.tag(lang) for lang in pairs.languages] if pairs else []
  if tokenizer is None:
    tokenizer = tok.load_or_train(
      cfg.data, cfg.model.vocab_size, workdir, sample_texts, log, symbols=tags
    )
  if pairs:
    multilingual.check_tokenizer(tokenizer, pairs.languages)
  eval_tokens = eval_arrays(tokenizer, eval_records, cfg.data.seq_len)
  eval_pairs = pairs.eval_pairs if pairs else []
  return Data(cfg, tokenizer, train, eval_records, eval_tokens, source.skipped, source, eval_pairs)


def encode(tokenizer: tok.Tokenizer, text: str, seq_len: int, side: str = "targets") -> np.ndarray:
  """Token ids + the tokenizer's EOS, truncated to seq_len; `side` "inputs" for a source (a
  tokenizer may have one per side, as Marian's)."""
  return np.asarray(tokenizer.encode(text, side) + [tokenizer.eos_id], np.int32)[:seq_len]


class _Tokenize(grain.transforms.Map):
  """Record -> token arrays (+EOS); {} (dropped and counted by _DropSkipped; grain would drop a
  None uncounted) for a malformed or too long one.

  too_long: "truncate" cuts at seq_len; "drop" skips; "split" keeps up to MAX_PIECES x seq_len
  tokens for _SplitLong to cut into pieces.
  """

  def __init__(self, tokenizer, seq_len: int, too_long: str):
    self.tokenizer = tokenizer
    self.keep = seq_len * (MAX_PIECES if too_long == "split" else 1)
    self.drop_long = too_long == "drop"

  def map(self, record):
    if not record:
      return {}
    keep = self.keep
    texts = {k: v for k, v in record.items() if k != "label"}
    out = {k: encode(self.tokenizer, text, keep + 1, k) for k, text in texts.items()}
    if any(len(v) > keep for v in out.values()):
      if self.drop_long:
        return {}
      out = {k: v[:keep] for k, v in out.items()}
    if "label" in record:  # task=classify: the row's class index
      out["labels"] = np.int32(record["label"])
    return out


class _DropSkipped(grain.IterDataset):
  """Drops the examples _Tokenize rejected ({}) and writes into each kept one how many it
  dropped just before it (SKIPPED). The count travels with the example through worker
  processes, packing and prefetch, and reaches the main process with the row that holds it:
  exact, and resumed exactly, whatever runs where."""

  def __iter__(self) -> grain.DatasetIterator:
    return _DropSkippedIterator(self._parent.__iter__())


class _DropSkippedIterator(grain.DatasetIterator):
  def __next__(self) -> dict[str, np.ndarray | int]:
    skipped = 0
    while not (example := next(self._parent)):
      skipped += 1
    example[SKIPPED] = skipped
    return example

  def get_state(self) -> dict:  # nothing pending between examples: the parent's position
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


class _SplitLong(grain.experimental.FlatMapTransform):
  """A long LM document -> consecutive seq_len pieces, each its own example (positions restart),
  so that packing wastes none of it."""

  max_fan_out = MAX_PIECES

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, example):
    tokens, n = example["targets"], self.seq_len
    return [
      {"targets": tokens[i : i + n], SKIPPED: example[SKIPPED] if i == 0 else 0}
      for i in range(0, len(tokens), n)
    ]


def _pad_to(seq_len: int):
  """An unpacked example -> seq_len columns, with segment ids marking its tokens."""

  def pad(example):
    out = {SKIPPED: example[SKIPPED]}
    for k, v in example.items():
      if k == "labels":  # one per row, not per position
        out[k] = v
      elif k != SKIPPED:
        out[k] = np.pad(v, (0, seq_len - len(v)))
        out[k + "_segment_ids"] = (np.arange(seq_len) < len(v)).astype(np.int32)
    return out

  return pad


def local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ConfigError(
      f"config.train.global_batch_size: {global_batch} is not divisible by the "
      f"{process_count} processes; make it a multiple"
    )
  return global_batch // process_count


class TrainIterator:
  """This process's rows of every global batch; `get_state` / `set_state` resume it exactly.

  The global order of examples depends only on (seed, epoch): example i of the shuffled,
  repeated source goes to lane i mod global_batch_size, each lane is packed on its own, and
  row j of global batch t is lane j's t-th row. A process builds only its own lanes' rows (and
  reads only their examples), so 1, 2 or 4 processes build the same global batches, and the
  state, kept per lane, resumes on any process count. With data.workers > 0 grain's workers
  share out the work, so the order also depends on data.workers and a resume needs the same
  process count.
  """

  def __init__(
    self, data: Data, process_index: int | None = None, process_count: int | None = None
  ):
    cfg = data.cfg
    index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    rows = local_batch_size(cfg.train.global_batch_size, self.process_count)
    self.lanes = range(index * rows, (index + 1) * rows)
    self.workers = cfg.data.workers
    order = data.train.shuffle(seed=cfg.seed).repeat()  # reshuffled every epoch
    self._skipped = dict.fromkeys(self.lanes, 0)  # lane -> skipped for the rows taken so far
    lanes = [
      self._lane(cfg, data, order[lane :: cfg.train.global_batch_size]) for lane in self.lanes
    ]
    ds = grain.experimental.ZipIterDataset(lanes).map(_stack_rows)
    if cfg.data.workers:  # worker processes each build whole batches: scales past the GIL
      if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()  # (tests, notebooks) their defaults apply
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.workers))
    elif cfg.data.prefetch:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.data.prefetch)
    self._iterator = iter(ds)

  def _lane(self, cfg, data, examples: grain.MapDataset) -> grain.IterDataset:
    seq_len = cfg.data.seq_len
    tokenize = _Tokenize(data.tokenizer, seq_len, cfg.data.too_long)
    # Reads and tokenizes in the batch-building thread (the prefetch thread or a worker): a
    # thread pool per lane would cost more in bookkeeping than it saves.
    reads = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    ds = _DropSkipped(examples.map(tokenize).to_iter_dataset(reads))
    if cfg.data.too_long == "split":
      ds = grain.experimental.FlatMapIterDataset(ds, _SplitLong(seq_len))
    if not cfg.data.pack:
      return ds.map(_pad_to(seq_len))
    keys = ("targets",) if cfg.task == "lm" else ("inputs", "targets")
    return grain.experimental.FirstFitPackIterDataset(
      ds,
      length_struct={k: seq_len for k in keys},
      num_packing_bins=LANE_PACKING_BINS,
      seed=cfg.seed,
      meta_features=(SKIPPED,),  # not packed: each row keeps the list of its examples' counts
    )

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    for lane, count in zip(self.lanes, batch.pop(SKIPPED).tolist(), strict=True):
      self._skipped[lane] += count
    return batch

  def close(self) -> None:
    """Stops the prefetch thread or the worker processes."""
    self._iterator.close()

  @property
  def skipped(self) -> int:
    """Examples this process skipped (malformed, empty, too long) to build the batches it took
    since the run began; with workers too, as the count comes with the rows."""
    return sum(self._skipped.values())

  def get_state(self) -> dict:
    skipped = {str(lane): count for lane, count in self._skipped.items()}
    if self.workers:
      return {
        "grain": self._iterator.get_state(),
        "skipped": skipped,
        "processes": self.process_count,
      }
    lanes = self._iterator.get_state()["parents"]  # the zip's state: one entry per lane
    return {"lanes": dict(zip(map(str, self.lanes), lanes)), "skipped": skipped}

  def set_state(self, state: dict) -> None:
    """Takes this process's lanes from `state`, which may hold every lane of the run (see
    `merge_states`)."""
    if "lanes" not in state and "processes" not in state:
      raise ConfigError(
        "--workdir: the checkpoint's data position predates per-lane data order; resume it "
        "with the zerolm that wrote it, or start a new workdir"
      )
    self._skipped = {lane: state["skipped"][str(lane)] for lane in self.lanes}
    if bool(self.workers) != ("grain" in state):
      raise ConfigError(
        "config.data.workers: a run saved with data workers resumes only with them, and one "
        "saved without only without; set it as the run had it"
      )
    if self.workers:
      if state["processes"] != self.process_count:
        raise ConfigError(
          f"config.data.workers: a run saved by {state['processes']} processes with data "
          f"workers cannot resume on {self.process_count}; use the same process count"
        )
      self._iterator.set_state(state["grain"])
    else:
      self._iterator.set_state({"parents": [state["lanes"][str(lane)] for lane in self.lanes]})


def merge_states(states: list[dict], own: dict | None) -> dict:
  """One state with every lane, from the states every process of a run saved (`own`: this
  process's, if the run had as many processes)."""
  if any("grain" in state for state in states):  # workers: only a process's own state resumes
    return own or states[0]
  merged = {"lanes": {}, "skipped": {}}
  for state in states:
    merged["lanes"].update(state["lanes"])
    merged["skipped"].update(state["skipped"])
  return merged


def _stack_rows(rows: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
  batch = {key: np.stack([row[key] for row in rows]) for key in rows[0] if key != SKIPPED}
  batch[SKIPPED] = np.array([np.sum(row[SKIPPED]) for row in rows], np.int64)  # a list if packed
  return batch


def eval_arrays(tokenizer, records: list[dict], seq_len: int) -> dict[str, np.ndarray]:
  """Records as padded [rows, seq_len] token arrays with segment ids (long ones truncated,
  none dropped)."""
  arrays = {}
  for key in records[0] if records else ("targets",):
    if key == "label":  # task=classify: one class index per row
      arrays["labels"] = np.asarray([r["label"] for r in records], np.int32)
      continue
    rows = np.zeros((len(records), seq_len), np.int32)
    segments = np.zeros((len(records), seq_len), np.int32)
    for r, record in enumerate(records):
      ids = encode(tokenizer, record[key], seq_len, key)
      rows[r, : len(ids)] = ids
      segments[r, : len(ids)] = 1
    arrays[key], arrays[key + "_segment_ids"] = rows, segments
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
      batch = {k: np.pad(v, [(0, short)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
    yield batch
