"""task=classify's sources: random-access records {"inputs": text, "label": class index}.

  tsv:PATH_OR_GLOB       label<TAB>text per line
  jsonl:PATH_OR_GLOB     one object per line; data.fields = "label_key,text_key"
  tfds:glue/sst2         SST-2 (sentence, label); tfds:imdb_reviews (text, label); another
                         dataset with data.fields; through `tfds.data_source`, no TensorFlow
  synthetic:classify     demo sentences labelled by a rule (lm/data/synthetic.py)

The class order is data.labels (names, comma-separated) or, when that is empty, the sorted
labels a scan of the training source finds (numerically when all are integers; a tfds
dataset's own names). `resolve_labels` writes it into the run's config, which the checkpoint
saves, so eval, decode and serve use the same order. Local files are read once into memory;
their malformed lines and lines whose label is not among data.labels are skipped and counted
(`skipped`). A tfds example with a label outside the classes (GLUE's unlabelled test split: -1)
is {}, which the pipeline skips and counts as it reads.
"""

from __future__ import annotations

import glob
import importlib
import json
import os

import ml_collections
import numpy as np

from lm.config import ConfigError, check_best_metric, label_names
from lm.data import synthetic
from lm.data.sources import SYNTHETIC_DEMO_SIZE, Source, _text

# tfds datasets with known keys: (label key, text key), and the builder module to import.
TFDS_KEYS = {"glue/sst2": ("label", "sentence"), "imdb_reviews": ("label", "text")}
TFDS_MODULES = {"glue": "text.glue", "imdb_reviews": "text.imdb"}


def label_text_keys(data_cfg, spec: str) -> tuple[str, str]:
  """(label key, text key) of jsonl / tfds records: data.fields, or a known dataset's."""
  if data_cfg.fields:
    keys = tuple(k.strip() for k in data_cfg.fields.split(","))
    if len(keys) != 2 or not all(keys):
      raise ConfigError(
        f"config.data.fields: {data_cfg.fields!r} must name the keys as 'label_key,text_key'"
      )
    return keys
  name = spec.partition(":")[2].partition(":")[0]
  if name in TFDS_KEYS:
    return TFDS_KEYS[name]
  raise ConfigError(
    f"config.data.fields: empty, and {spec!r} has no known keys; set 'label_key,text_key'"
  )


def _ordered(seen: set[str]) -> list[str]:
  """Labels found in the data, sorted (as numbers when every one is an integer)."""
  if all(s.lstrip("-").isdigit() for s in seen):
    return sorted(seen, key=int)
  return sorted(seen)


class LabelledLines(Source):
  """A tsv or jsonl file set read into memory: (text, label index) pairs."""

  def __init__(self, kind: str, pattern: str, keys: tuple[str, str], labels: list[str]):
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
      raise ConfigError(f"config.data.source: no file matches {pattern!r}; check the path")
    pairs, self.skipped = [], 0
    for path in paths:
      with open(path, "rb") as f:
        for line in f:
          pair = _parse(kind, keys, line)
          if pair is None:
            self.skipped += 1
          else:
            pairs.append(pair)
    self.labels = labels or _ordered({label for _, label in pairs})
    index = {name: i for i, name in enumerate(self.labels)}
    known = [(text, index[label]) for text, label in pairs if label in index]
    self.skipped += len(pairs) - len(known)  # labels not among data.labels
    self.texts = [text for text, _ in known]
    self.label_ids = np.asarray([label for _, label in known], np.int32)

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {"inputs": self.texts[index], "label": int(self.label_ids[index])}


def _parse(kind: str, keys: tuple[str, str], line: bytes) -> tuple[str, str] | None:
  """(text, label name) of one line, or None when malformed."""
  try:
    line = line.decode("utf-8").rstrip("\r\n")
  except UnicodeDecodeError:
    return None
  if kind == "tsv":
    parts = line.split("\t")
    if len(parts) != 2:
      return None
    label, text = parts
  else:
    try:
      obj = json.loads(line)
    except ValueError:
      return None
    if not isinstance(obj, dict):
      return None
    label, text = obj.get(keys[0]), obj.get(keys[1])
    label = str(label) if isinstance(label, int) and not isinstance(label, bool) else label
  label, text = _text(label), _text(text)
  return None if label is None or text is None else (text, label)


class LabelledTfds(Source):
  """A tfds dataset's (text, integer label) examples, read as they are asked for."""

  def __init__(self, spec: str, keys: tuple[str, str], labels: list[str], data_dir: str):
    import tensorflow_datasets as tfds  # imported here: only tfds sources pay for it

    name, _, split = spec.partition(":")
    module = TFDS_MODULES.get(name.split("/")[0])
    if module:
      importlib.import_module("tensorflow_datasets." + module)
    try:
      self.source = tfds.data_source(
        name, split=split or "train", data_dir=data_dir or None, download=False
      )
    except Exception as e:  # tfds raises several types for "not prepared" and "unknown split"
      raise ConfigError(
        f"config.data.source: tfds dataset {name!r} split {split or 'train'!r} is not prepared "
        f"({type(e).__name__}); prepare it once with: pip install tensorflow && "
        f"tfds build {name} --file_format=array_record"
      ) from None
    self.label_key, self.text_key = keys
    self.labels = labels or self._dataset_names(name)
    self.skipped = 0

  def _dataset_names(self, name: str) -> list[str]:
    info = getattr(self.source, "dataset_info", None)
    feature = info.features[self.label_key] if info else None
    names = list(getattr(feature, "names", None) or [])
    if not names:
      raise ConfigError(f"config.data.labels: empty, and {name!r} names no labels; set them")
    return names

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self.source[int(index)]
    text, label = _text(example.get(self.text_key)), example.get(self.label_key)
    if text is None or label is None or not 0 <= int(label) < len(self.labels):
      return {}
    return {"inputs": text, "label": int(label)}


class LabelledSynthetic(Source):
  """synthetic:classify: its labels are the rule's (data.labels may only rename them)."""

  def __init__(self, labels: list[str], seed: int):
    if labels and len(labels) != len(synthetic.CLASSIFY_LABELS):
      raise ConfigError(
        f"config.data.labels: synthetic:classify has {len(synthetic.CLASSIFY_LABELS)} classes "
        f"({', '.join(synthetic.CLASSIFY_LABELS)}); give as many names or none"
      )
    self.labels = labels or list(synthetic.CLASSIFY_LABELS)
    self.sentences = synthetic.LabelledSource(SYNTHETIC_DEMO_SIZE, seed)
    self.skipped = 0

  def __len__(self) -> int:
    return len(self.sentences)

  def __getitem__(self, index: int) -> dict:
    text, label = self.sentences[index]
    return {"inputs": text, "label": label}


def open_labelled(spec: str, data_cfg, seed: int) -> Source:
  """The classification source a config string names; `.labels` is its class order."""
  kind, _, arg = spec.partition(":")
  labels = label_names(data_cfg.labels)
  if kind == "synthetic":
    if arg != "classify":
      raise ConfigError(
        f"config.data.source: {spec!r} is not a classification source; use 'synthetic:classify'"
      )
    return LabelledSynthetic(labels, seed)
  if kind == "tsv":
    return LabelledLines(kind, arg, ("", ""), labels)
  if kind == "jsonl":
    return LabelledLines(kind, arg, label_text_keys(data_cfg, spec), labels)
  if kind == "tfds":
    return LabelledTfds(arg, label_text_keys(data_cfg, spec), labels, data_cfg.tfds_data_dir)
  raise ConfigError(
    f"config.data.source: {kind!r} in {spec!r} holds no labels; classification reads tsv, "
    "jsonl, tfds or synthetic:classify"
  )


def resolve_labels(cfg: ml_collections.ConfigDict, source: Source) -> ml_collections.ConfigDict:
  """A copy of `cfg` with data.labels (the source's class order) and model.num_classes set."""
  labels = list(source.labels)
  if len(labels) < 2:
    raise ConfigError(
      f"config.data.labels: {cfg.data.source!r} holds {len(labels)} label(s); a classifier "
      "needs at least 2"
    )
  if cfg.model.num_classes and cfg.model.num_classes != len(labels):
    raise ConfigError(
      f"config.model.num_classes: {cfg.model.num_classes}, but the data has {len(labels)} "
      f"labels ({', '.join(labels)}); set it to {len(labels)} or 0"
    )
  if any("," in name for name in labels):
    raise ConfigError(f"config.data.source: a label holds a comma: {labels!r}; rename it")
  cfg = cfg.copy_and_resolve_references()
  cfg.data.labels = ",".join(labels)
  cfg.model.num_classes = len(labels)
  check_best_metric(cfg)  # e.g. one naming a class the data lacks
  return cfg
