"""Several translation directions in one model: sources that name pairs, target-language tags,
and the temperature mix of the pairs.

  KIND:SRC-TGT=ARG[,[KIND:]SRC-TGT=ARG ...]   each item a pair; KIND defaults to the last one's
  tsv:en-de=/data/de.tsv,en-fr=/data/fr.tsv
  tfds:en-de=wmt14_translate/de-en,en-fr=wmt14_translate/fr-en:train
  jsonl:en-de=de.jsonl,tsv:en-fr=fr.tsv
  synthetic:demo_multi                         = synthetic:en-xa=demo,en-xb=demo_xb

A pair's SRC-TGT is its direction: it picks a tfds or jsonl record's keys (as data.direction
does for one pair; data.fields, if set, applies to every jsonl pair). Each source is prefixed
with its target's tag, `<2TGT>` (Johnson et al. 2017), which the tokenizer learns as one
user-defined symbol; decoding and serving prepend the tag a request's target language names.
Several sources with one target language share its tag (many-to-one).

Training draws pair i with probability p_i ∝ n_i^(1/T) (n_i: its training examples,
T: data.mix_temperature; 1 = proportional, larger favours small pairs) through a fixed mixed
index (MixedSource): a random-access source, a function of (seed, index) alone, so the lanes,
the process count and resuming work on it as on any source.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from lm.config import ConfigError
from lm.data import sources

ALIASES = {"demo_multi": "synthetic:en-xa=demo,en-xb=demo_xb"}  # synthetic:NAME -> its pairs
_ITEM = re.compile(r"^(?:(\w+):)?([A-Za-z][A-Za-z0-9_]*)-([A-Za-z][A-Za-z0-9_]*)=(.+)$")
_LANGUAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
BLOCK = 256  # the mixed index keeps each pair's count before every BLOCK-th example
SYNTAX = "KIND:SRC-TGT=ARG,SRC-TGT=ARG (e.g. 'tsv:en-de=de.tsv,en-fr=fr.tsv')"


@dataclasses.dataclass(frozen=True)
class Pair:
  """One direction of a multi-pair source: its languages and the single source it reads."""

  src: str
  tgt: str
  kind: str
  arg: str

  @property
  def name(self) -> str:
    """As in metric names: bleu/en-de."""
    return f"{self.src}-{self.tgt}"

  @property
  def spec(self) -> str:
    return f"{self.kind}:{self.arg}"


def _expand(spec: str) -> str:
  kind, _, arg = spec.partition(":")
  return ALIASES.get(arg, spec) if kind == "synthetic" else spec


def names_pairs(spec: str) -> bool:
  """Whether a data.source string names pairs (the first item reads KIND:SRC-TGT=ARG)."""
  spec = _expand(spec)
  match = _ITEM.match(spec.split(",")[0])
  return bool(match and match.group(1))


def parse(spec: str, field: str = "data.source") -> list[Pair]:
  """The pairs a multi-pair spec names; ConfigError naming `field` if one is malformed."""
  pairs, kind = [], None
  for item in _expand(spec).split(","):
    match = _ITEM.match(item.strip())
    if not match:
      raise ConfigError(f"config.{field}: {item!r} in {spec!r} is not a pair; write {SYNTAX}")
    kind = match.group(1) or kind
    pairs.append(Pair(match.group(2), match.group(3), kind, match.group(4)))
  names = [p.name for p in pairs]
  if len(set(names)) < len(names):
    twice = sorted({n for n in names if names.count(n) > 1})
    raise ConfigError(f"config.{field}: pair {twice[0]} is named twice in {spec!r}; name it once")
  if len(pairs) > 255:
    raise ConfigError(f"config.{field}: {len(pairs)} pairs; at most 255")
  return pairs


def target_languages(cfg) -> tuple[str, ...]:
  """The target languages a translation config's data.source names, sorted; () for one pair
  without names (no tags). A checkpoint's saved config gives its model's languages."""
  if cfg.task != "translation" or not names_pairs(cfg.data.source):
    return ()
  return tuple(sorted({p.tgt for p in parse(cfg.data.source)}))


def tag(language: str) -> str:
  return f"<2{language}>"


def tagged(text: str, language: str) -> str:
  """A source prefixed with its target's tag."""
  return f"{tag(language)} {text}"


def language_error(languages: tuple[str, ...], language: str | None) -> str:
  """What is wrong with a requested target language for a model translating into `languages`
  ("" if nothing): a multilingual model needs one of its own (the only one by default); a
  single-pair model (no languages) takes none."""
  if not languages:
    if language:
      return "this model translates one direction (its data.source names no pairs); omit it"
    return ""
  if not language:
    return "" if len(languages) == 1 else f"required: name one of {', '.join(languages)}"
  if language not in languages:
    return f"{language!r} is not a target language of this model; choose {', '.join(languages)}"
  return ""


def prefixed(text: str, languages: tuple[str, ...], language: str | None) -> str:
  """`text` as the model reads it: tagged with the requested (or only) target language; as is
  for a single-pair model. Check the request with language_error first."""
  if not languages:
    return text
  return tagged(text, language or languages[0])


def check_tokenizer(tokenizer, languages: tuple[str, ...]) -> None:
  """A tokenizer given to a multi-pair run (data.tokenizer, an imported model's) must hold each
  tag as one token: zerolm adds none to a vocabulary it did not train."""
  for language in languages:
    ids = tokenizer.encode(tag(language))
    if not any(tokenizer.decode([i]).strip() == tag(language) for i in ids):
      raise ConfigError(
        f"config.data.tokenizer: it has no token for the target tag {tag(language)!r}; leave "
        "data.tokenizer empty so zerolm trains one with the tags, or give one that has them"
      )


def mix_probabilities(sizes, temperature: float) -> np.ndarray:
  """p_i ∝ n_i^(1/T)."""
  weights = np.asarray(sizes, np.float64) ** (1.0 / temperature)
  return weights / weights.sum()


class MixedSource(sources.Source):
  """The pairs' training examples mixed at the temperature's rates, tagged: a random-access
  source of fixed length. Its length is the smallest that holds every example of the pair the
  mix samples least often relative to its size (sum n_i at T=1); each pair's share of it is
  exact, and the pairs' order in it is a fixed permutation (seed). A pair sampled more often
  than it has examples repeats them. Memory: one byte an example, plus counts every BLOCK."""

  def __init__(self, pairs: list[Pair], parts, starts, temperature: float, seed: int):
    self.pairs, self.parts, self.starts = pairs, parts, list(starts)
    self.sizes = np.array([len(s) - start for s, start in zip(parts, starts)], np.int64)
    self.probabilities = mix_probabilities(self.sizes, temperature)
    length = float(np.max(self.sizes / self.probabilities))
    counts = np.maximum(np.round(self.probabilities * length).astype(np.int64), 1)
    order = np.repeat(np.arange(len(pairs), dtype=np.uint8), counts)
    np.random.default_rng(seed).shuffle(order)
    self.order = order
    blocks = math.ceil(len(order) / BLOCK)
    per_block = np.zeros((blocks + 1, len(pairs)), np.int64)
    np.add.at(per_block, (np.arange(len(order)) // BLOCK + 1, order), 1)
    self.before_block = np.cumsum(per_block, axis=0)  # [b, pair]: its examples before block b
    self.skipped = sum(part.skipped for part in parts)

  def __len__(self) -> int:
    return len(self.order)

  def pair_of(self, index: int) -> int:
    return int(self.order[index])

  def __getitem__(self, index: int) -> dict:
    index = range(len(self))[int(index)]
    pair, block = int(self.order[index]), index // BLOCK
    earlier = self.order[block * BLOCK : index]
    rank = int(self.before_block[block, pair]) + int(np.count_nonzero(earlier == pair))
    part = self.parts[pair]
    record = part[self.starts[pair] + rank % int(self.sizes[pair])]
    if not record:
      return record
    return {**record, "inputs": tagged(record["inputs"], self.pairs[pair].tgt)}

  def close(self) -> None:
    for part in self.parts:
      part.close()


@dataclasses.dataclass
class Opened:
  """A multi-pair run's training source and held-out records, with each record's pair."""

  source: MixedSource
  eval_records: list[dict]
  eval_pairs: list[str]
  languages: tuple[str, ...]


def _open_pair(pair: Pair, cfg, seed: int, field: str) -> sources.Source:
  data = cfg.data.copy_and_resolve_references()
  data.direction = f"{pair.src}->{pair.tgt}"
  source = sources.open_source(pair.spec, data, cfg.task, seed)
  if len(source) == 0:
    raise ConfigError(f"config.{field}: pair {pair.name} ({pair.spec!r}) has no usable example")
  return source


def _held_out(pairs: list[Pair], parts, limit: int) -> tuple[list[dict], list[str]]:
  """The first `limit` usable examples of each pair, tagged, taking the pairs in turn (so that
  the few examples an evaluation logs show every pair); and each one's pair."""
  records, names = [], []
  for i in range(limit):
    for pair, part in zip(pairs, parts):
      if i < len(part) and part[i]:
        records.append({**part[i], "inputs": tagged(part[i]["inputs"], pair.tgt)})
        names.append(pair.name)
  return records, names


def open_pairs(cfg) -> Opened:
  """The mixed training source of a multi-pair data.source and its held-out records: per pair,
  data.eval_examples from data.eval_source (which then names the same pairs) or the first
  data.eval_examples of its source, not trained on."""
  if cfg.task != "translation":
    raise ConfigError(f"config.data.source: pairs are for task 'translation', not {cfg.task!r}")
  if cfg.data.direction:
    raise ConfigError(
      "config.data.direction: the pairs in data.source name their directions; leave it empty"
    )
  pairs, limit = parse(cfg.data.source), cfg.data.eval_examples
  parts = [_open_pair(p, cfg, cfg.seed, "data.source") for p in pairs]
  if cfg.data.eval_source:
    held = parse(cfg.data.eval_source, "data.eval_source")
    if sorted(p.name for p in held) != sorted(p.name for p in pairs):
      raise ConfigError(
        "config.data.eval_source: it must name the pairs data.source names "
        f"({', '.join(p.name for p in pairs)})"
      )
    eval_parts = [_open_pair(p, cfg, cfg.seed + 1, "data.eval_source") for p in held]
    records, names = _held_out(held, eval_parts, limit)
    for part in eval_parts:
      part.close()
    starts = [0] * len(pairs)
  else:
    for pair, part in zip(pairs, parts):
      if len(part) <= limit:
        raise ConfigError(
          f"config.data.eval_examples: {limit} leaves no training example of the {len(part)} "
          f"of pair {pair.name}; lower it or set data.eval_source"
        )
    records, names = _held_out(pairs, parts, limit)
    starts = [limit] * len(pairs)
  mixed = MixedSource(pairs, parts, starts, cfg.data.mix_temperature, cfg.seed)
  return Opened(mixed, records, names, tuple(sorted({p.tgt for p in pairs})))
