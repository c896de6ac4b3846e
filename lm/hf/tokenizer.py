"""The tokenizers of Hugging Face checkpoints, giving the ids transformers (v5) gives for the same
text, rebuilt from a checkpoint directory's files without transformers.

`load` tells the kind by the files present:
- Marian (opus-mt): source.spm, target.spm and vocab.json, as transformers' MarianTokenizer reads
  them: pieces from the side's SentencePiece model, ids from vocab.json (a piece it lacks is
  <unk>), one shared vocabulary.
- tokenizer.json, through `tokenizers` (GPT-2, Llama 3). transformers takes the file as written,
  except that a tokenizer class rebuilds its own pipeline around the file's vocabulary and
  merges: GPT2Tokenizer (byte-level) and LlamaTokenizer (Metaspace, byte fallback) are rebuilt
  here as transformers rebuilds them; other classes are taken as written.
- tokenizer.model alone (Llama 2), read as transformers' LlamaTokenizer reads it: not through
  SentencePiece but converted to a `tokenizers` BPE (the model's pieces, merges ranked by piece
  id, byte fallback) with no normalizer, so the model's own normalization (NFKC, collapsing
  whitespace) does not apply. The same conversion is made here from the pieces SentencePiece
  reads.

Each gives ids without special tokens (`encode`, transformers' add_special_tokens=False), their
text up to the first EOS without special tokens (`decode`, transformers' skip_special_tokens=True),
and a JSON-able `to_meta` from which `from_meta` rebuilds it with no files on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from lm import paths
from lm.config import ConfigError

TOKENIZER_CONFIG = "tokenizer_config.json"
CONFIG_FILES = (TOKENIZER_CONFIG, "special_tokens_map.json")
MARIAN_FILES = ("source.spm", "target.spm", "vocab.json")
SIDES = ("inputs", "targets")
# transformers' named special tokens, in the order it adds those the tokenizer lacks.
TOKEN_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# The class transformers picks from config.json's model_type when tokenizer_config.json names
# none, for the model types whose class is rebuilt here.
MODEL_TYPE_CLASSES = {"gpt2": "GPT2Tokenizer", "marian": "MarianTokenizer"}
# The special tokens a class defaults to where the checkpoint names none.
CLASS_TOKENS = {
  "GPT2Tokenizer": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
  "LlamaTokenizer": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
  "MarianTokenizer": {"eos": "</s>", "unk": "<unk>", "pad": "<pad>"},
}
CONTROL, USER_DEFINED = 3, 4  # sentencepiece's ModelProto.SentencePiece.Type


class _HFTokenizer:
  """What the kinds share: the files, the special ids, and the meta, save and fingerprint made
  from them."""

  kind = ""

  def __init__(self, files: dict[str, bytes], origin: str):
    self.files = dict(files)
    self.origin = origin  # the directory, for error messages
    self.options = _json(files, TOKENIZER_CONFIG)
    self.tokenizer_class = _class_name(self.options.get("tokenizer_class"))
    self.specials: dict[str, int | None] = {}

  def _resolve_specials(self, config: dict, token_id) -> dict[str, int | None]:
    """config.json's ids first (the model's, which generation uses), else the tokenizer's
    named tokens'."""
    named = _named_tokens(self.files, self.tokenizer_class)
    specials = {}
    for name in ("pad", "bos", "eos", "unk"):
      from_config = _config_id(config, f"{name}_token_id")
      token = _content(named.get(name))
      specials[name] = from_config if from_config is not None else token_id(token)
    # Every id config.json lists as an end (Llama 3's instruct models list three); the first
    # is the one appended to sequences.
    ends = config.get("eos_token_id")
    ends = [int(i) for i in ends] if isinstance(ends, list) else []
    specials["stops"] = ends if len(set(ends)) > 1 else None  # one end: eos says it
    start = _config_id(config, "decoder_start_token_id")
    specials["decoder_start"] = next(
      (i for i in (start, specials["bos"], specials["pad"]) if i is not None), None
    )
    return specials

  @property
  def pad_id(self) -> int | None:
    return self.specials["pad"]

  @property
  def bos_id(self) -> int | None:
    return self.specials["bos"]

  @property
  def eos_id(self) -> int | None:
    return self.specials["eos"]

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a sequence: config.json's list, else the EOS."""
    stops = self.specials.get("stops") or [self.eos_id]
    return tuple(i for i in stops if i is not None)

  @property
  def unk_id(self) -> int | None:
    return self.specials["unk"]

  @property
  def decoder_start_id(self) -> int | None:
    return self.specials["decoder_start"]

  def _skipped_ids(self) -> set[int]:
    ids = {i for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id) if i is not None}
    return ids | set(self.eos_ids)

  def to_meta(self) -> dict:
    files = {name: base64.b64encode(data).decode("ascii") for name, data in self.files.items()}
    return {"kind": self.kind, "files": files, "specials": dict(self.specials)}

  def save(self, directory: str) -> None:
    """The files it was read from, so that transformers' AutoTokenizer reads the directory again
    (a tokenizer_config.json naming the class is among them where the checkpoint had none)."""
    root = paths.resolve(directory)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in self.files.items():
      (root / name).write_bytes(data)

  def fingerprint(self) -> str:
    files = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
    # A meta written before "stops" existed has none: the same tokenizer, the same print.
    specials = {k: v for k, v in self.specials.items() if not (k == "stops" and v is None)}
    described = {"kind": self.kind, "files": files, "specials": specials}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class _TokenizersBackend(_HFTokenizer):
  """A `tokenizers.Tokenizer` built as transformers builds it: the pipeline (`_pipeline`), then
  the added tokens and named special tokens it lacks, added in transformers' order."""

  def __init__(self, files, origin, config=None, specials=None):
    super().__init__(files, origin)
    self.tokenizer, added, extra = self._pipeline()
    config_added = self.options.get("added_tokens_decoder")
    if config_added is not None:  # transformers prefers these to the tokenizer.json's
      added = [dict(token, id=int(i)) for i, token in config_added.items()]
    named = _named_tokens(files, self.tokenizer_class).values()
    tokens = [_added_token(t) for t in sorted(added, key=lambda t: t["id"])]
    tokens += [_added_token(t, special=True) for t in named]
    extra_tokens, listed = _extra_tokens(files)
    tokens += [] if listed else extra
    tokens += [_added_token(t, special=True) for t in extra_tokens]
    present = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
    for token in tokens:  # a vocabulary piece keeps its id; a new string takes the next
      if token.content not in present:
        self.tokenizer.add_tokens([token])
        present.add(token.content)
    self.tokenizer.encode_special_tokens = bool(self.options.get("split_special_tokens", False))
    # transformers encodes with neither, whatever tokenizer.json sets
    self.tokenizer.no_truncation()
    self.tokenizer.no_padding()
    # transformers' clean-up of spaces before punctuation, which it skips for BPE models
    self.clean_up = bool(self.options.get("clean_up_tokenization_spaces", False)) and (
      type(self.tokenizer.model).__name__ != "BPE"
      or self.options.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
    )
    token_id = lambda token: self.tokenizer.token_to_id(token) if token else None
    self.specials = (
      dict(specials) if specials is not None else self._resolve_specials(config or {}, token_id)
    )

  def _pipeline(self) -> tuple[tokenizers.Tokenizer, list[dict], list[AddedToken]]:
    """The tokenizer, the added tokens transformers reads with it, and further tokens its class
    adds."""
    raise NotImplementedError

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, side: str = "targets") -> list[int]:
    _check_side(side)
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Stops at EOS; skips the special tokens."""
    skipped = self._skipped_ids()
    ids = [i for i in _before_eos(ids, self.eos_ids) if i not in skipped]
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    return _clean_up(text) if self.clean_up else text


class JsonTokenizer(_TokenizersBackend):
  """tokenizer.json (GPT-2, Llama 3, ...)."""

  kind = "tokenizer_json"

  def _pipeline(self):
    text = self.files["tokenizer.json"].decode("utf-8")
    spec = json.loads(text)
    added = spec.get("added_tokens") or []
    # transformers reads a ByteLevel tokenizer.json declared LlamaTokenizer (Llama 3) as written
    llama = self.tokenizer_class == "LlamaTokenizer" and '"ByteLevel"' not in text
    if self.tokenizer_class != "GPT2Tokenizer" and not llama:
      tokenizer = tokenizers.Tokenizer.from_str(text)
      return tokenizer, [], []  # its added tokens are in it already
    vocab = spec["model"]["vocab"]
    if isinstance(vocab, list):  # a Unigram's [piece, score] list: transformers takes the order
      vocab = {item[0] if isinstance(item, list) else item: i for i, item in enumerate(vocab)}
    merges = [
      tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
      for merge in spec["model"].get("merges", [])
    ]
    if llama:
      return _llama(vocab, merges, self.options), added, []
    tokenizer = tokenizers.Tokenizer(
      models.BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
      )
    )
    add_prefix_space = bool(self.options.get("add_prefix_space", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, added, []


class SentencePieceTokenizer(_TokenizersBackend):
  """tokenizer.model without tokenizer.json (Llama 2), as LlamaTokenizer converts it."""

  kind = "sentencepiece"

  def _pipeline(self):
    if self.tokenizer_class != "LlamaTokenizer":
      raise ConfigError(
        f"{self.origin}/{TOKENIZER_CONFIG}: tokenizer_class is {self.tokenizer_class!r}; a "
        "tokenizer.model without tokenizer.json is read as LlamaTokenizer only: add the "
        "checkpoint's tokenizer.json, or set tokenizer_class to LlamaTokenizer if it is one"
      )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self.files["tokenizer.model"])
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # control and user-defined pieces become added tokens (only control ones special)
    extra = [
      AddedToken(piece.piece, normalized=False, special=piece.type == CONTROL)
      for piece in proto.pieces
      if piece.type in (CONTROL, USER_DEFINED)
    ]
    return _llama(vocab, _merges(vocab), self.options), [], extra


class MarianTokenizer(_HFTokenizer):
  """Marian (opus-mt): source.spm for the inputs, target.spm for the targets, vocab.json's ids."""

  kind = "marian"

  def __init__(self, files, origin, config=None, specials=None):
    super().__init__(files, origin)
    self.tokenizer_class = "MarianTokenizer"  # whatever tokenizer_config.json names
    if self.options.get("separate_vocabs"):
      raise ConfigError(
        f"{origin}/{TOKENIZER_CONFIG}: separate_vocabs (a target_vocab.json) is not supported; "
        "use a checkpoint with one shared vocab.json"
      )
    self.vocab = json.loads(files["vocab.json"])
    self.pieces = {i: piece for piece, i in self.vocab.items()}
    self.spm = {
      "inputs": spm.SentencePieceProcessor(model_proto=files["source.spm"]),
      "targets": spm.SentencePieceProcessor(model_proto=files["target.spm"]),
    }
    # Added tokens, matched whole in the text: tokenizer_config.json's, then the named and extra
    # special tokens at their vocab.json ids.
    self.added, self.strips = {}, {}  # content -> id, (lstrip, rstrip)
    for i, token in (self.options.get("added_tokens_decoder") or {}).items():
      token = {"content": token} if isinstance(token, str) else token
      self.added[token["content"]] = int(i)
      self.strips[token["content"]] = (token.get("lstrip", False), token.get("rstrip", False))
    named = _named_tokens(files, self.tokenizer_class)
    if "unk" not in named:
      raise ConfigError(f"{origin}/{TOKENIZER_CONFIG}: unk_token is null; Marian needs one")
    special = [_content(token) for token in [*named.values(), *_extra_tokens(files)[0]]]
    for content in special:
      if content not in self.added and content not in self.vocab:
        raise ConfigError(
          f"{origin}/vocab.json: lacks the special token {content!r}; add it to vocab.json or "
          f"name another in {TOKENIZER_CONFIG}"
        )
      self.added.setdefault(content, self.vocab.get(content))
      self.strips.setdefault(content, (False, False))
    self.added_pieces = {i: content for content, i in self.added.items()}
    self.special_ids = {self.added[content] for content in special}  # transformers' all_special_ids
    longest_first = sorted(self.added, key=len, reverse=True)
    self.pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
    self.unk_piece = _content(named["unk"])
    self.unk = self.added[self.unk_piece]
    self.clean_up = bool(self.options.get("clean_up_tokenization_spaces", False))
    self.specials = (
      dict(specials)
      if specials is not None
      else self._resolve_specials(config or {}, lambda t: self.added.get(t, self.vocab.get(t)))
    )

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def _split(self, text: str) -> list[str]:
    """transformers' split around the added tokens: text, token, text, ... (tokens at odd
    indices), a token's lstrip/rstrip eating the spaces beside it."""
    if self.options.get("split_special_tokens"):
      return [text]
    parts = self.pattern.split(text)
    for i in range(1, len(parts), 2):
      lstrip, rstrip = self.strips[parts[i]]
      if lstrip:
        parts[i - 1] = parts[i - 1].rstrip()
      if rstrip:
        parts[i + 1] = parts[i + 1].lstrip()
    return parts

  def encode(self, text: str, side: str = "targets") -> list[int]:
    model = self.spm[_check_side(side)]
    ids = []
    for i, part in enumerate(self._split(text)):
      if i % 2:
        ids.append(self.added[part])
      elif part:
        # a leading >>lang<< code (multilingual targets) is one token, not pieces
        code = []
        if part.startswith(">>") and (end := part.find("<<")) != -1:
          code, part = [part[: end + 2]], part[end + 2 :]
        pieces = code + model.encode(part, out_type=str)
        ids += [self.added.get(p, self.vocab.get(p, self.unk)) for p in pieces]
    return ids

  def decode(self, ids) -> str:
    """Stops at EOS; skips the special tokens. Like transformers, with the source model, which
    joins any pieces (the vocabulary is shared)."""
    model = self.spm["inputs"]
    skipped = self._skipped_ids() | self.special_ids
    pieces = []
    for i in _before_eos(ids, self.eos_ids):
      if i in skipped:
        continue
      piece = self.added_pieces.get(i, self.pieces.get(i))
      if piece is None:  # an id vocab.json lacks: transformers asks the model for its piece
        piece = model.id_to_piece(i) if 0 <= i < model.get_piece_size() else ""
        piece = piece or self.unk_piece
      pieces.append(piece)
    text = model.decode_pieces(pieces).replace("\u2581", " ").strip()
    return _clean_up(text) if self.clean_up else text


KINDS = {cls.kind: cls for cls in (JsonTokenizer, SentencePieceTokenizer, MarianTokenizer)}


def load(directory: str, config: dict | None = None) -> _HFTokenizer:
  """The tokenizer of a checkpoint directory; `config` is its config.json (read from the
  directory if not given), for the special ids."""
  root = paths.resolve(directory)
  if config is None:
    path = root / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
  names = (*MARIAN_FILES, "tokenizer.json", "tokenizer.model", *CONFIG_FILES)
  present = {name for name in names if (root / name).exists()}
  if set(MARIAN_FILES) <= present:
    cls, names = MarianTokenizer, MARIAN_FILES
  elif "tokenizer.json" in present:
    # transformers reads no tokenizer.model (or vocab.json, merges.txt) beside it: nor is it kept
    cls, names = JsonTokenizer, ("tokenizer.json",)
  elif "tokenizer.model" in present:
    cls, names = SentencePieceTokenizer, ("tokenizer.model",)
  else:
    raise ConfigError(
      f"{root}: no tokenizer files; expected tokenizer.json, tokenizer.model (SentencePiece), "
      "or source.spm, target.spm and vocab.json (Marian)"
    )
  files = {name: (root / name).read_bytes() for name in (*names, *CONFIG_FILES) if name in present}
  options = _json(files, TOKENIZER_CONFIG)
  if cls is MarianTokenizer:
    class_name = "MarianTokenizer"
  else:
    class_name = _class_name(
      options.get("tokenizer_class")
      or config.get("tokenizer_class")
      or MODEL_TYPE_CLASSES.get(config.get("model_type"))
    )
  if class_name and not options.get("tokenizer_class"):
    # Name the class transformers chose from config.json, so that the files alone read the same.
    options["tokenizer_class"] = class_name
    files[TOKENIZER_CONFIG] = json.dumps(options, indent=2).encode()
  return cls(files, str(root), config=config)


def from_meta(meta: dict) -> _HFTokenizer:
  """The tokenizer `to_meta` describes."""
  if meta.get("kind") not in KINDS:
    raise ConfigError(
      f"tokenizer meta: kind {meta.get('kind')!r} is not one of {sorted(KINDS)}; write it with "
      "to_meta()"
    )
  files = {name: base64.b64decode(data) for name, data in meta["files"].items()}
  return KINDS[meta["kind"]](files, "tokenizer meta", specials=meta["specials"])


def _llama(vocab: dict, merges: list, options: dict) -> tokenizers.Tokenizer:
  """transformers' LlamaTokenizer: byte-fallback BPE, no normalizer, a "▁" before the text (or
  before every text between added tokens, with legacy=true) unless add_prefix_space is false."""
  add_prefix_space = options.get("add_prefix_space")
  add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
  scheme = ("always" if options.get("legacy") else "first") if add_prefix_space else "never"
  tokenizer = tokenizers.Tokenizer(
    models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
  )
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement="\u2581", prepend_scheme=scheme, split=False
  )
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if add_prefix_space:
    steps.append(decoders.Strip(content=" ", left=1))
  tokenizer.decoder = decoders.Sequence(steps)
  return tokenizer


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
  """transformers' generate_merges: every split of a piece into two pieces, ranked by the
  piece's id, then by the lengths of the halves."""
  merges = []
  for piece, rank in vocab.items():
    halves = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
    local = [(left, right, rank) for left, right in halves if left in vocab and right in vocab]
    merges += sorted(local, key=lambda merge: (vocab[merge[0]], vocab[merge[1]]))
  merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])))
  return [(left, right) for left, right, _ in merges]


def _json(files: dict[str, bytes], name: str) -> dict:
  return json.loads(files[name]) if name in files else {}


def _class_name(name: str | None) -> str | None:
  return name.removesuffix("Fast") if name else None


def _content(token) -> str | None:
  """A token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
  return token.get("content") if isinstance(token, dict) else token


def _added_token(token, special: bool | None = None) -> AddedToken:
  if isinstance(token, str):
    token = {"content": token, "normalized": False}
  flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
  return AddedToken(token["content"], special=bool(token.get("special")) or bool(special), **flags)


def _named_tokens(files: dict[str, bytes], class_name: str | None) -> dict:
  """name (bos, eos, ...) -> token: the class's default, then tokenizer_config.json's, then
  special_tokens_map.json's, which transformers reads (and lets win) only when
  tokenizer_config.json has no added_tokens_decoder. A null token removes the default."""
  named = dict(CLASS_TOKENS.get(class_name, {}))
  options = _json(files, TOKENIZER_CONFIG)
  sources = [options]
  if "added_tokens_decoder" not in options:
    sources.append(_json(files, "special_tokens_map.json"))
  for source in sources:
    for name in TOKEN_NAMES:
      if f"{name}_token" in source:
        named[name] = source[f"{name}_token"]
  return {name: token for name, token in named.items() if _content(token) is not None}


def _extra_tokens(files: dict[str, bytes]) -> tuple[list, bool]:
  """The extra special tokens tokenizer_config.json names (and special_tokens_map.json, read as
  in `_named_tokens`), and whether they name a list of them: then transformers takes that list
  instead of the SentencePiece model's control and user-defined pieces."""
  options = _json(files, TOKENIZER_CONFIG)
  sources = [options]
  if "added_tokens_decoder" not in options:
    sources.append(_json(files, "special_tokens_map.json"))
  tokens, listed = [], False
  for source in sources:
    for key in ("additional_special_tokens", "extra_special_tokens"):
      value = source.get(key)
      if isinstance(value, dict):  # named model-specific tokens ({"image_token": ...})
        tokens += list(value.values())
      elif key in source:
        tokens += list(value or [])
        listed = True
  return tokens, listed


def _config_id(config: dict, key: str) -> int | None:
  """An id of config.json; a list (several EOS ids) gives its first."""
  value = config.get(key)
  if isinstance(value, list):
    value = value[0] if value else None
  return int(value) if value is not None else None


def _check_side(side: str) -> str:
  if side not in SIDES:
    raise ValueError(f"encode: side {side!r} is not one of {SIDES}")
  return side


def _before_eos(ids, eos_ids: tuple[int, ...]) -> list[int]:
  """The ids before the first that ends a sequence."""
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  end = next((n for n, i in enumerate(ids) if i in eos_ids), len(ids))
  return ids[:end]


def _clean_up(text: str) -> str:
  """transformers' clean_up_tokenization: no space before punctuation and contractions."""
  for before, after in (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
  ):
    text = text.replace(before, after)
  return text
