"""zerolm's SentencePiece tokenizer, with fixed special ids: pad=0, unk=1, bos=2, eos=3.

Trained on a random sample of the training data (both sides for translation: one shared
vocabulary) and cached as WORKDIR/tokenizer.model; process 0 trains and writes it atomically,
the other processes wait for the file.

Every tokenizer (this one, and an imported model's, lm.hf.tokenizer) offers the same interface:
`vocab_size`, the special ids `pad_id` / `bos_id` / `eos_id` / `unk_id` (None where it has
none) and `eos_ids` (every id that ends a sequence, `eos_id` first), `encode(text, side)`
without special tokens, `decode(ids)` up to the first end, and
`to_meta()` / `fingerprint()`. The code outside reads special ids from it, never constants.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
import sentencepiece as spm

from lm import paths
from lm.config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"
WAIT_SECONDS = 1800


class Tokenizer:
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
  eos_ids = (EOS_ID,)

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    special = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
    if special != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ConfigError(
        f"config.data.tokenizer: special ids (pad, unk, bos, eos) are {special}; "
        "train it with pad_id=0 unk_id=1 bos_id=2 eos_id=3"
      )

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    return cls(paths.resolve(path).read_bytes())

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  def encode(self, text: str, side: str = "targets") -> list[int]:
    """One vocabulary for both sides (`side`, "inputs" or "targets", is for tokenizers with
    one per side)."""
    return self.sp.encode(text)

  def decode(self, ids) -> str:
    """Stops at EOS; a sequence without EOS keeps all its tokens."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
      ids = ids[: ids.index(EOS_ID)]
    return self.sp.decode([i for i in ids if i > EOS_ID])

  def to_meta(self) -> str:
    """What a checkpoint's meta holds: the model, base64."""
    return base64.b64encode(self.model_proto).decode("ascii")

  def fingerprint(self) -> str:
    return hashlib.sha256(self.model_proto).hexdigest()


def from_meta(value):
  """The tokenizer a checkpoint's meta holds: zerolm's own (a base64 string) or an imported
  model's (a dict, see lm.hf.tokenizer)."""
  if isinstance(value, str):
    return Tokenizer(base64.b64decode(value))
  from lm.hf import tokenizer as hf_tokenizer  # only runs that imported a model need it

  return hf_tokenizer.from_meta(value)


def train(
  texts: Iterable[str], vocab_size: int, model_type: str, symbols: Iterable[str] = ()
) -> Tokenizer:
  """`symbols`: pieces always kept whole (user-defined symbols: a multi-pair run's tags)."""
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=proto,
    vocab_size=vocab_size,
    model_type=model_type,
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    character_coverage=1.0 if model_type == "word" else 0.9995,
    hard_vocab_limit=False,  # a small corpus may have fewer pieces than asked for
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
    minloglevel=2,
    user_defined_symbols=list(symbols),
  )
  return Tokenizer(proto.getvalue())


def save(tokenizer: Tokenizer, workdir: str) -> None:
  """WORKDIR/tokenizer.model, written atomically: readers see no file or the whole file."""
  directory = paths.resolve(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / TOKENIZER_FILE
  partial = directory / f"{TOKENIZER_FILE}.tmp{os.getpid()}"
  with partial.open("wb") as f:
    f.write(tokenizer.model_proto)
    f.flush()
    if not paths.is_url(partial):
      os.fsync(f.fileno())
  partial.replace(path)


def load_or_train(
  data_cfg, vocab_size: int, workdir: str, sample_texts, log=print, symbols: Iterable[str] = ()
) -> Tokenizer:
  """`data.tokenizer` if set; else WORKDIR/tokenizer.model, trained by process 0 if absent.

  `sample_texts()` returns the training texts; it is called only when training is needed.
  `symbols`: user-defined pieces a trained one holds whole (see `train`).
  """
  if data_cfg.tokenizer:
    if not paths.resolve(data_cfg.tokenizer).exists():
      raise ConfigError(f"config.data.tokenizer: {data_cfg.tokenizer!r} does not exist")
    return Tokenizer.load(data_cfg.tokenizer)
  path = paths.resolve(workdir) / TOKENIZER_FILE
  if path.exists():
    log(f"tokenizer: reusing {path}")
    return Tokenizer.load(path)
  if jax.process_index() == 0:
    started = time.time()
    tokenizer = train(sample_texts(), vocab_size, data_cfg.spm_model_type, symbols)
    save(tokenizer, workdir)
    log(
      f"tokenizer: trained {tokenizer.vocab_size} pieces in {time.time() - started:.1f}s -> {path}"
    )
    return tokenizer
  deadline = time.time() + WAIT_SECONDS
  while not path.exists():
    if time.time() > deadline:
      raise RuntimeError(f"process 0 wrote no {path} in {WAIT_SECONDS}s")
    time.sleep(0.5)
  return Tokenizer.load(path)


class TextStream:
  """What each token adds to the text of the tokens before it, as tokens arrive, decoding a few
  tokens per step (O(tokens) in all) instead of the whole prefix. A step decodes from the start
  of a context that shows text (sentencepiece drops a text's leading spaces, so a window must
  not begin in them); a token that shows nothing yet (UNK, an incomplete character: U+FFFD)
  adds to the next piece, or to `flush`'s at the end."""

  def __init__(self, decode: Callable[[list[int]], str]):
    self.decode = decode
    self.tokens: list[int] = []
    self.start = self.shown = 0  # tokens[start:shown]: the next window's context; [:shown] sent
    self.context = ""  # decode(tokens[start:shown])

  def add(self, token: int, last: bool = False) -> str:
    """The text `token` adds (maybe ""); `last`: no token follows, so show what there is."""
    self.tokens.append(token)
    return self._piece(last)

  def flush(self) -> str:
    """What the held-back tokens add, once no token follows."""
    return self._piece(True) if self.shown < len(self.tokens) else ""

  def _piece(self, last: bool) -> str:
    end = len(self.tokens)
    text = self.decode(self.tokens[self.start : end])
    if len(text) <= len(self.context) or (text.endswith("\ufffd") and not last):
      return ""
    latest = self.decode(self.tokens[self.shown : end])  # the piece's own tokens: the context
    piece = text[len(self.context) :]
    self.start, self.context = (self.shown, latest) if latest else (self.start, text)
    self.shown = end
    return piece


def text_pieces(decode: Callable[[list[int]], str], tokens: list[int]) -> Iterator[str]:
  """What each of `tokens` adds to the text (see TextStream)."""
  stream = TextStream(decode)
  for n, token in enumerate(tokens):
    yield stream.add(token, last=n == len(tokens) - 1)
