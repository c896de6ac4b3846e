"""task=classify's held-out metrics from a confusion matrix: accuracy, macro-F1, per-class
precision and recall; the matrix as a text table (the logs) and as an RGB image (TensorBoard).

confusion[i, j] counts the examples of true class i predicted as class j. A class with no
prediction has precision 0, one with no example recall 0 (sklearn's zero_division=0); macro-F1
is the unweighted mean of the per-class F1 scores over every class.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
  """[classes, classes] int64 counts: row = true class, column = predicted class."""
  matrix = np.zeros((classes, classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def scores(confusion: np.ndarray, names: list[str]) -> dict:
  """{"eval_accuracy", "eval_macro_f1", "eval_precision/NAME", "eval_recall/NAME"}."""
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  precision = _ratio(hits, confusion.sum(axis=0))
  recall = _ratio(hits, confusion.sum(axis=1))
  f1 = _ratio(2 * precision * recall, precision + recall)
  out = {
    "eval_accuracy": float(hits.sum() / max(confusion.sum(), 1.0)),
    "eval_macro_f1": float(f1.mean()),
  }
  for name, p, r in zip(names, precision, recall):
    out[f"eval_precision/{name}"] = float(p)
    out[f"eval_recall/{name}"] = float(r)
  return out


def table(confusion: np.ndarray, names: list[str]) -> str:
  """The matrix as aligned text: a row per true class, a column per predicted class."""
  width = max(max(map(len, names)), len(str(int(np.max(confusion, initial=0)))), 4)
  lines = ["true \\ predicted".ljust(width) + "  " + "  ".join(n.rjust(width) for n in names)]
  for name, row in zip(names, confusion):
    lines.append(name.ljust(width) + "  " + "  ".join(str(int(c)).rjust(width) for c in row))
  return "\n".join(lines)


CELL = 24  # pixels per cell of the image


def image(confusion: np.ndarray) -> np.ndarray:
  """[H, W, 3] uint8: each cell shaded by its share of its true class's examples (white 0 ->
  dark blue 1), so a good classifier shows a dark diagonal; a one-cell grey border between
  cells. Plain numpy: no plotting library on the training path."""
  confusion = np.asarray(confusion, np.float64)
  share = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
  white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
  cells = white + share[..., None] * (blue - white)  # [classes, classes, 3]
  pixels = np.repeat(np.repeat(cells, CELL, axis=0), CELL, axis=1)
  pixels[::CELL, :], pixels[:, ::CELL] = 128.0, 128.0
  return pixels.round().astype(np.uint8)
