"""Example sources named by one config string, as random-access sequences of text records.

  tfds:NAME[/CONFIG][:SPLIT]   through `tfds.data_source` (array_record, no TensorFlow)
  tsv:PATH_OR_GLOB             source<TAB>target per line (translation)
  text:PATH_OR_GLOB            one document per line (LM)
  jsonl:PATH_OR_GLOB           one object per line; `data.fields` names the keys
  synthetic:demo               the generated language pair of experiments/demo.py
  synthetic:demo_shifted       that pair with the verb second (experiments/demo_adapt.py)

A record is {"inputs": str, "targets": str} for translation and {"targets": str} for an LM,
or {} for a malformed example, which the pipeline skips and counts (not None, which grain
would drop before anything could count it). Local files are
indexed once (valid line offsets); their malformed lines are counted exactly at that point.
"""

from __future__ import annotations

import glob
import importlib
import json
import os

import numpy as np

from lm.config import ConfigError
from lm.data import synthetic

# Builder modules `tfds.data_source` needs imported before it knows a dataset.
TFDS_MODULES = {
  "wmt14_translate": "translate.wmt14",
  "wmt15_translate": "translate.wmt15",
  "wmt16_translate": "translate.wmt16",
  "wmt17_translate": "translate.wmt17",
  "wmt18_translate": "translate.wmt18",
  "wmt19_translate": "translate.wmt19",
  "wmt_t2t_translate": "translate.wmt_t2t",
  "lm1b": "text.lm1b",
  "c4": "text.c4",
}
SYNTHETIC_DEMO_SIZE = 1_000_000


def record_keys(task: str, direction: str, fields: str, source: str) -> tuple[str, ...]:
  """The raw keys of (inputs, targets), or (text,) for an LM."""
  if fields:
    keys = tuple(k.strip() for k in fields.split(","))
    if len(keys) != (2 if task == "translation" else 1) or not all(keys):
      want = "'source_key,target_key'" if task == "translation" else "'text_key'"
      raise ConfigError(f"config.data.fields: {fields!r} must name the keys as {want}")
    return keys
  if task == "lm":
    return ("text",)
  langs = tuple(lang.strip() for lang in direction.split("->"))
  if len(langs) != 2 or not all(langs):
    raise ConfigError(
      f"config.data.direction: {direction!r} must read 'src->tgt' (e.g. 'en->de') for {source!r}"
    )
  return langs


def _text(value) -> str | None:
  """Stripped text, or None when empty or not valid UTF-8."""
  if isinstance(value, (bytes, np.bytes_)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError:
      return None
  if not isinstance(value, str):
    return None
  value = value.strip()
  return value or None


def make_record(task: str, values) -> dict:
  texts = [_text(v) for v in values]
  if any(t is None for t in texts):
    return {}
  return {"targets": texts[0]} if task == "lm" else {"inputs": texts[0], "targets": texts[1]}


class TfdsSource:
  def __init__(self, spec: str, task: str, keys: tuple[str, ...], data_dir: str | None):
    import tensorflow_datasets as tfds  # imported here: only tfds sources pay for it

    name, _, split = spec.partition(":")
    split = split or "train"
    module = TFDS_MODULES.get(name.split("/")[0])
    if module:
      importlib.import_module("tensorflow_datasets." + module)
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for "not prepared" and "unknown split"
      where = f" --data_dir={data_dir}" if data_dir else ""
      raise ConfigError(
        f"config.data.source: tfds dataset {name!r} split {split!r} is not prepared in "
        f"{data_dir or 'the default data dir'} ({type(e).__name__}); "
        f"prepare it once with: pip install tensorflow && "
        f"tfds build {name} --file_format=array_record{where}"
      ) from None
    self.task, self.keys, self.skipped = task, keys, 0

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    example = self.source[int(index)]
    return make_record(self.task, [example.get(k) for k in self.keys])


def _parse_line(kind: str, task: str, keys, line: bytes) -> dict:
  try:
    text = line.decode("utf-8").rstrip("\r\n")
  except UnicodeDecodeError:
    return {}
  if kind == "tsv":
    parts = text.split("\t")
    return make_record(task, parts) if len(parts) == 2 else {}
  if kind == "text":
    return make_record(task, [text])
  try:
    obj = json.loads(text)
  except ValueError:
    return {}
  return make_record(task, [obj.get(k) for k in keys]) if isinstance(obj, dict) else {}


class LineFileSource:
  """Lines of local files; one pass at construction keeps the offsets of the valid lines."""

  def __init__(self, kind: str, pattern: str, task: str, keys: tuple[str, ...]):
    wanted = {"tsv": "translation", "text": "lm"}.get(kind, task)
    if wanted != task:
      raise ConfigError(
        f"config.data.source: {kind}: files are for task {wanted!r}, not {task!r}; use jsonl: "
        "with data.fields or the other kind"
      )
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
      raise ConfigError(f"config.data.source: no file matches {pattern!r}; check the path")
    self.kind, self.task, self.keys, self.paths = kind, task, keys, paths
    files, offsets, lengths, self.skipped = [], [], [], 0
    for file_index, path in enumerate(paths):
      offset = 0
      with open(path, "rb") as f:
        for line in f:
          if not _parse_line(kind, task, keys, line):
            self.skipped += 1
          else:
            files.append(file_index)
            offsets.append(offset)
            lengths.append(len(line))
          offset += len(line)
    self.files = np.asarray(files, np.int32)
    self.offsets = np.asarray(offsets, np.int64)
    self.lengths = np.asarray(lengths, np.int32)
    self._fds = [os.open(p, os.O_RDONLY) for p in paths]  # pread is thread-safe

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    fd = self._fds[self.files[index]]
    line = os.pread(fd, int(self.lengths[index]), int(self.offsets[index]))
    return _parse_line(self.kind, self.task, self.keys, line)

  def __getstate__(self):  # picklable for worker processes: reopen the files there
    return {k: v for k, v in self.__dict__.items() if k != "_fds"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]


class SyntheticSource:
  def __init__(self, name: str, task: str, seed: int):
    variants = {"demo": "", "demo_shifted": "shifted"}
    if name not in variants or task != "translation":
      raise ConfigError(
        f"config.data.source: 'synthetic:{name}' is unknown; 'synthetic:demo' and "
        "'synthetic:demo_shifted' are translation tasks"
      )
    self.pairs = synthetic.DemoSource(SYNTHETIC_DEMO_SIZE, seed, variants[name])
    self.skipped = 0

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    source, target = self.pairs[index]
    return {"inputs": source, "targets": target}


def open_source(
  spec: str, data_cfg, task: str, seed: int
) -> TfdsSource | LineFileSource | SyntheticSource:
  """The random-access source a config string names; raises ConfigError naming the field."""
  kind, sep, arg = spec.partition(":")
  if not sep or not arg:
    raise ConfigError(
      f"config.data.source: {spec!r} must read KIND:ARG with KIND one of tfds, tsv, text, "
      "jsonl, synthetic (e.g. 'tsv:/data/train.tsv')"
    )
  if kind == "synthetic":
    return SyntheticSource(arg, task, seed)
  keys = ()
  if kind in ("tfds", "jsonl"):
    keys = record_keys(task, data_cfg.direction, data_cfg.fields, spec)
  if kind == "tfds":
    return TfdsSource(arg, task, keys, data_cfg.tfds_data_dir)
  if kind in ("tsv", "text", "jsonl"):
    return LineFileSource(kind, arg, task, keys)
  raise ConfigError(
    f"config.data.source: unknown kind {kind!r} in {spec!r}; "
    "use tfds, tsv, text, jsonl or synthetic"
  )
