"""task=classify at inference: batched text -> label and class probabilities, and the held-out
confusion matrix that evaluation reports.

`Classifier` is to a classification model what `lm.decode.Decoder` is to a generating one: rows
padded to a width bucket and a row count (powers of two times the mesh's batch divisor), so the
compiled programs are few and known up front, run on the layout's mesh with its shardings.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm import classify_metrics, inference
from lm.config import label_names
from lm.data import pipeline
from lm.data import tokenizer as tok
from lm.decode import row_counts, source_buckets
from lm.layout import Layout


class Classifier:
  """A trained classifier on its mesh: `__call__(lines)` -> one {label, probabilities} each."""

  def __init__(
    self,
    layout: Layout,
    params: Any,
    tokenizer: tok.Tokenizer,
    batch_size: int,
    row_buckets: bool = False,
    length_buckets: tuple[int, ...] = (),
  ):
    self.layout, self.params, self.tokenizer = layout, params, tokenizer
    self.labels = label_names(layout.cfg.data.labels)
    self.row_counts = row_counts(batch_size, layout.batch_multiple, row_buckets)
    self.batch_size = self.row_counts[-1]
    self.max_input_tokens = layout.cfg.data.seq_len - 1  # and the EOS training appended
    self.buckets = source_buckets(layout.cfg.data.seq_len, length_buckets)
    replicated = layout.shardings.replicated  # every process reads every row's answer
    self._probabilities = jax.jit(
      lambda p, b: jax.nn.softmax(layout.logits(p, b), axis=-1), out_shardings=replicated
    )
    self.dispatch_lock = threading.Lock()  # programs with collectives run in one order

  @classmethod
  def from_workdir(cls, workdir: str, devices=None, export=None, settings=None) -> Classifier:
    """The workdir's latest checkpoint (or `export`), batched by decode.batch_size."""
    layout, params, tokenizer, _ = inference.restore_for_inference(
      workdir, export, devices, settings=settings
    )
    decode = layout.cfg.decode
    return cls(layout, params, tokenizer, decode.batch_size, False, tuple(decode.length_buckets))

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """Every (rows, width) a batch can have: one compiled program each."""
    return [(rows, width) for rows in self.row_counts for width in self.buckets]

  def encode(self, text: str) -> list[int]:
    """Token ids + EOS, as training read them; longer texts are cut to data.seq_len."""
    ids = self.tokenizer.encode(text, "inputs")[: self.max_input_tokens]
    return ids + [self.tokenizer.eos_id]

  def probabilities(self, batch_ids: list[list[int]]) -> np.ndarray:
    """[rows, classes] float32 for at most batch_size rows of token ids; a row's answer does
    not depend on the rows beside it."""
    rows = len(batch_ids)
    padded = next(c for c in self.row_counts if c >= rows)
    width = next(b for b in self.buckets if b >= max(map(len, batch_ids), default=1))
    tokens, segments = np.zeros((padded, width), np.int32), np.zeros((padded, width), np.int32)
    for r, ids in enumerate(batch_ids):
      tokens[r, : len(ids)], segments[r, : len(ids)] = ids, 1
    with jax.set_mesh(self.layout.mesh):
      batch = self.layout.rows_on_mesh({"inputs": tokens, "inputs_segment_ids": segments})
      with self.dispatch_lock:
        out = self._probabilities(self.params, batch)
    return np.asarray(out.addressable_data(0))[:rows]

  def answer(self, probabilities: np.ndarray) -> dict:
    """One row's {"label", "probabilities": {name: p}}."""
    best = int(np.argmax(probabilities))
    return {
      "label": self.labels[best],
      "probabilities": {n: float(p) for n, p in zip(self.labels, probabilities)},
    }

  def __call__(
    self, lines: Iterable[str], progress: Callable[[int, int], None] | None = None
  ) -> list[dict | None]:
    """One answer per line, in order (None for an empty line); batches of similar length."""
    lines = list(lines)
    answers: list[dict | None] = [None] * len(lines)
    todo = sorted(
      ((i, self.encode(line)) for i, line in enumerate(lines) if line.strip()),
      key=lambda item: len(item[1]),
    )
    for start in range(0, len(todo), self.batch_size):
      chunk = todo[start : start + self.batch_size]
      for (i, _), row in zip(chunk, self.probabilities([ids for _, ids in chunk])):
        answers[i] = self.answer(row)
      if progress:
        progress(min(start + self.batch_size, len(todo)), len(todo))
    return answers


def format_answer(answer: dict | None) -> str:
  """--mode=decode's output line: LABEL<TAB>{"name": probability, ...} ("" for no input)."""
  if answer is None:
    return ""
  return f"{answer['label']}\t{json.dumps(answer['probabilities'])}"


class HeldOutClasses:
  """Evaluation's predictions over the held-out rows -> confusion matrix and its scores."""

  def __init__(self, layout: Layout, data: pipeline.Data, rows: int):
    self.layout, self.data, self.rows = layout, data, rows
    self.labels = label_names(layout.cfg.data.labels)

    def predict(params, batch):
      real = batch["inputs_segment_ids"].max(axis=1) > 0  # padding rows: no example
      return jnp.argmax(layout.logits(params, batch), axis=-1), batch["labels"], real

    self._predict = jax.jit(predict, out_shardings=layout.shardings.replicated)

  def __call__(self, params, check_stop: Callable[[], None], log=None) -> dict:
    """Scores (lm.classify_metrics) and "confusion_matrix" (rows: true classes) as lists."""
    found = []
    with jax.set_mesh(self.layout.mesh):
      for local in pipeline.eval_batches(self.data.eval, self.rows):
        check_stop()
        found.append(jax.device_get(self._predict(params, self.layout.shard_batch(local))))
    predicted, labels, real = (np.concatenate(parts) for parts in zip(*found))
    confusion = classify_metrics.confusion_matrix(labels[real], predicted[real], len(self.labels))
    if log:
      log.info(
        "confusion matrix (rows: true class):\n" + classify_metrics.table(confusion, self.labels)
      )
    return {
      **classify_metrics.scores(confusion, self.labels),
      "confusion_matrix": confusion.tolist(),
    }
