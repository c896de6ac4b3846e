"""Datasets as token arrays, and the global batches each process feeds to the mesh."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from lm.config import ConfigError
from lm.data import synthetic
from lm.data.tokenizer import EOS_ID, PAD_ID, WordTokenizer

DEMO_TRAIN_PAIRS, DEMO_EVAL_SEED = 200_000, 10_000


@dataclasses.dataclass
class Dataset:
  """Padded token rows ([rows, seq_len] int32 under 'inputs'/'targets') and the raw text."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  eval_text: list[tuple[str, str]]
  tokenizer: WordTokenizer


def encode_rows(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
  """Token ids + EOS, truncated to seq_len, padded with PAD_ID."""
  rows = np.full((len(texts), seq_len), PAD_ID, np.int32)
  for r, text in enumerate(texts):
    ids = (tokenizer.encode(text) + [EOS_ID])[:seq_len]
    rows[r, : len(ids)] = ids
  return rows


def _pairs_to_arrays(tokenizer, pairs, seq_len, task):
  targets = encode_rows(tokenizer, [t for _, t in pairs], seq_len)
  if task == "lm":
    return {"targets": targets}
  return {"inputs": encode_rows(tokenizer, [s for s, _ in pairs], seq_len), "targets": targets}


def load(cfg: ml_collections.ConfigDict) -> Dataset:
  kind, _, arg = cfg.data.source.partition(":")
  if kind != "synthetic" or arg.split(":")[0] != "demo":
    raise ConfigError(
      f"config.data.source: {cfg.data.source!r} is not a known source; use 'synthetic:demo'"
    )
  tokenizer = WordTokenizer(synthetic.demo_words())
  train_pairs = synthetic.demo_pairs(DEMO_TRAIN_PAIRS, cfg.seed)
  eval_pairs = synthetic.demo_pairs(cfg.data.eval_examples, DEMO_EVAL_SEED + cfg.seed)
  seq_len = cfg.data.seq_len
  return Dataset(
    train=_pairs_to_arrays(tokenizer, train_pairs, seq_len, cfg.task),
    eval=_pairs_to_arrays(tokenizer, eval_pairs, seq_len, cfg.task),
    eval_text=eval_pairs,
    tokenizer=tokenizer,
  )


def train_batches(
  arrays: dict[str, np.ndarray], global_batch: int, seed: int, start_step: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of each global batch; epochs reshuffle with (seed, epoch).

  Batch k is a pure function of (seed, k), so a run resumed at step k sees the same data.
  """
  num_rows = len(next(iter(arrays.values())))
  if num_rows < global_batch:
    raise ConfigError(
      f"config.train.global_batch_size: {global_batch} exceeds the {num_rows} training rows"
    )
  per_epoch = num_rows // global_batch
  per_process = global_batch // jax.process_count()
  first = jax.process_index() * per_process
  step = start_step
  while True:
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(num_rows)
    rows = order[index * global_batch : (index + 1) * global_batch][first : first + per_process]
    yield {k: v[rows] for k, v in arrays.items()}
    step += 1


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int):
  """Fixed-size batches covering every row; the last is padded with empty rows."""
  num_rows = len(next(iter(arrays.values())))
  for start in range(0, num_rows, batch_size):
    batch = {k: v[start : start + batch_size] for k, v in arrays.items()}
    short = batch_size - len(next(iter(batch.values())))
    if short:
      batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
    yield batch
