"""Example sources named by one config string, as random-access sequences of text records.

  tfds:NAME[/CONFIG][:SPLIT]   through `tfds.data_source` (array_record, no TensorFlow)
  tsv:PATH_OR_GLOB             source<TAB>target per line (translation)
  text:PATH_OR_GLOB            one document per line (LM)
  jsonl:PATH_OR_GLOB           one object per line; `data.fields` names the keys
  synthetic:demo               the generated language pair of experiments/demo.py
  synthetic:demo_shifted       that pair with the verb second (experiments/demo_adapt.py)
  synthetic:demo_english       the pair's English side alone, for an LM (experiments/demo.py:lm)
  synthetic:demo_xb            the demo's English into a second language, xb
  KIND:SRC-TGT=ARG,...         several pairs in one model: see lm/data/multilingual.py

A record is {"inputs": str, "targets": str} for translation and {"targets": str} for an LM,
or {} for a malformed example, which the pipeline skips and counts (not None, which grain
would drop before anything could count it). Local files are
indexed once (valid line offsets); their malformed lines are counted exactly at that point.
"""

from __future__ import annotations

import codecs
import glob
import importlib
import io
import json
import os
import threading

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


class Source:
  """A random-access sequence of records; `close()` (or `with`) closes what it holds open."""

  def close(self) -> None:
    """Nothing to close: a source that opens files closes them here."""

  def __enter__(self) -> Source:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class TfdsSource(Source):
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


def _byte_class(b: int) -> int:
  """In a valid UTF-8 line: 0, whitespace (str.isspace); 2, a byte that is or starts a
  non-whitespace character; 1, a byte that may be part of either (continuation bytes; the leads
  C2, E1, E2, E3 begin U+0085, U+00A0, U+1680, U+2000-U+205F, U+3000), or a rare control one."""
  if b < 0x80 and chr(b).isspace():
    return 0
  if 0x21 <= b < 0x80 or (0xC3 <= b <= 0xF4 and b not in (0xE1, 0xE2, 0xE3)):
    return 2
  return 1


_CLASSES = bytes(map(_byte_class, range(256)))  # a bytes.translate table: finds empty sides fast
SCAN_BYTES = 1 << 20  # files are indexed in blocks of this many bytes
MAX_OPEN_FILES = 64  # of a source's files, at most this many are open at once


def _decodes(block: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Whether each line block[starts[i]:ends[i]] is valid UTF-8 (whole lines: a newline never
  falls inside a character, so the block decodes iff every line does)."""
  ok = np.ones(len(starts), bool)
  if block.isascii():
    return ok
  try:
    codecs.utf_8_decode(block, "strict", True)
    return ok
  except UnicodeDecodeError:
    pass
  high = np.logical_or.reduceat(np.frombuffer(block, np.uint8) >= 0x80, starts)
  for i in np.flatnonzero(high).tolist():
    try:
      block[starts[i] : ends[i]].decode("utf-8")
    except UnicodeDecodeError:
      ok[i] = False
  return ok


def _sides(kind: str, buf: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[lines, sides] bounds of each line's texts: a tsv line's two sides around its tab, or the
  whole text line; and whether a tsv line has exactly one tab."""
  if kind == "text":
    return starts[:, None], np.ones(len(starts), bool)
  tabs = np.flatnonzero(buf == 0x09)
  line_of_tab = np.searchsorted(starts, tabs, "right") - 1
  count = np.bincount(line_of_tab, minlength=len(starts))
  one = count == 1
  tab = starts.copy()  # lines without one tab: an empty first side (they are invalid anyway)
  tab[one] = tabs[(np.cumsum(count) - count)[one]]
  return np.stack([starts, tab], axis=1), one


def _valid_lines(kind: str, task: str, keys, block: bytes, ends: np.ndarray) -> np.ndarray:
  """Whether each line of `block` (whole lines, ending at `ends`) parses to a record: exactly as
  _parse_line decides, found with array operations, and with it only where bytes alone cannot
  tell (all of jsonl; a side whose only non-blank characters may be Unicode whitespace)."""
  starts = np.concatenate(([0], ends[:-1]))
  if kind == "jsonl":
    lines = zip(starts.tolist(), ends.tolist())
    return np.fromiter((bool(_parse_line(kind, task, keys, block[s:e])) for s, e in lines), bool)
  bounds, valid = _sides(kind, np.frombuffer(block, np.uint8), starts)
  flat = bounds.ravel()
  side = np.maximum.reduceat(np.frombuffer(block.translate(_CLASSES), np.uint8), flat)
  side[np.diff(flat, append=len(block)) == 0] = 0  # reduceat gives an empty side one byte
  side = side.reshape(bounds.shape)  # 0: empty, 1: may be empty, 2: holds text
  valid &= _decodes(block, starts, ends) & (side > 0).all(axis=1)
  check = valid & (side == 1).any(axis=1)
  for i in np.flatnonzero(check).tolist():
    valid[i] = bool(_parse_line(kind, task, keys, block[starts[i] : ends[i]]))
  return valid


class _Growing:
  """An array appended to in blocks that grows in place (realloc), so that building the index
  never holds it twice."""

  def __init__(self, dtype):
    self.array, self.size = np.empty(1 << 16, dtype), 0

  def extend(self, values: np.ndarray) -> None:
    end = self.size + len(values)
    if end > len(self.array):  # no view of self.array outlives a call: resizing is safe
      self.array.resize(max(end, len(self.array) * 5 // 4), refcheck=False)
    self.array[self.size : end] = values
    self.size = end

  def finish(self) -> np.ndarray:
    self.array.resize(self.size, refcheck=False)
    return self.array


class LineFileSource(Source):
  """Lines of local files, indexed by one scan in blocks: the byte offset and length of every
  valid line (12 bytes a line, in numpy arrays). An example is read with one pread of its line,
  so a process reads only the lines its lanes ask for. `close()` (or `with`) closes the files,
  which open on first use."""

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
    offsets, lengths, self.skipped = _Growing(np.int64), _Growing(np.int32), 0
    file_ends = []
    for path in paths:
      self.skipped += self._scan(path, offsets, lengths)
      file_ends.append(offsets.size)
    self.offsets, self.lengths = offsets.finish(), lengths.finish()
    self.file_ends = np.asarray(file_ends, np.int64)  # example i is in file searchsorted(i)
    self._no_open_files()

  def _scan(self, path: str, offsets: _Growing, lengths: _Growing) -> int:
    """Appends the valid lines of one file; returns how many were malformed."""
    skipped, start, rest = 0, 0, b""  # rest: the unfinished line at the end of the last block
    with open(path, "rb", buffering=0) as f:
      while True:
        read = f.read(SCAN_BYTES)
        block = rest + read if rest else read
        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 0x0A) + 1
        if not read and block and (not len(ends) or ends[-1] < len(block)):
          ends = np.append(ends, len(block))  # the last line of a file without a final newline
        if len(ends):
          valid = _valid_lines(self.kind, self.task, self.keys, block[: ends[-1]], ends)
          line_lengths = np.diff(ends, prepend=0)
          if line_lengths.max() >= 2**31:
            raise ConfigError(f"config.data.source: {path} has a line over 2 GiB")
          offsets.extend(start + (ends - line_lengths)[valid])
          lengths.extend(line_lengths[valid])
          skipped += len(valid) - int(valid.sum())
          start += int(ends[-1])
          block = block[ends[-1] :]
        if not read:
          return skipped
        rest = block

  def _no_open_files(self) -> None:
    self._files, self._lock = {}, threading.Lock()  # file index -> file, least recent first

  def _file(self, index: int) -> io.FileIO:
    file = self._files.pop(index, None)
    if file is None:
      if len(self._files) >= MAX_OPEN_FILES:
        self._files.pop(next(iter(self._files))).close()
      file = open(self.paths[index], "rb", buffering=0)  # closed by close() or when collected
    self._files[index] = file
    return file

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> dict:
    index = range(len(self))[int(index)]  # negative indices count from the end, as before
    file = int(np.searchsorted(self.file_ends, index, "right"))
    with self._lock:  # the prefetch thread and the main thread may read at once
      fd = self._file(file).fileno()
      line = os.pread(fd, int(self.lengths[index]), int(self.offsets[index]))
    return _parse_line(self.kind, self.task, self.keys, line)

  def close(self) -> None:
    """Closes the open files; a later read opens them again."""
    with self._lock:
      for file in self._files.values():
        file.close()
      self._files.clear()

  def __getstate__(self):  # picklable for worker processes, which open the files they read
    return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._no_open_files()


# synthetic:NAME -> (its task, the DemoSource variant); an LM one reads the pairs' English side.
SYNTHETIC = {
  "demo": ("translation", ""),
  "demo_shifted": ("translation", "shifted"),
  "demo_english": ("lm", ""),
  "demo_xb": ("translation", "xb"),  # the second target language (lm/data/multilingual.py)
}


class SyntheticSource(Source):
  def __init__(self, name: str, task: str, seed: int):
    if name not in SYNTHETIC:
      known = ", ".join(f"'synthetic:{n}' ({t})" for n, (t, _) in SYNTHETIC.items())
      raise ConfigError(f"config.data.source: 'synthetic:{name}' is unknown; choose {known}")
    wanted, variant = SYNTHETIC[name]
    if task != wanted:
      raise ConfigError(
        f"config.data.source: 'synthetic:{name}' is for task {wanted!r}, not {task!r}; "
        + ("use 'synthetic:demo_english'" if task == "lm" else "use 'synthetic:demo'")
      )
    self.pairs = synthetic.DemoSource(SYNTHETIC_DEMO_SIZE, seed, variant)
    self.task, self.skipped = task, 0

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    source, target = self.pairs[index]
    return {"targets": source} if self.task == "lm" else {"inputs": source, "targets": target}


def open_source(spec: str, data_cfg, task: str, seed: int) -> Source:
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
