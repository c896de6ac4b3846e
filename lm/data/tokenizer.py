"""Tokenizers with the project's fixed special ids: pad=0, unk=1, bos=2, eos=3."""

from __future__ import annotations

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


class WordTokenizer:
  """Whitespace words over a closed vocabulary (the generated demo language)."""

  def __init__(self, words: list[str]):
    self.pieces = list(SPECIALS) + list(words)
    self.ids = {w: i for i, w in enumerate(self.pieces)}

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  def encode(self, text: str) -> list[int]:
    return [self.ids.get(w, UNK_ID) for w in text.split()]

  def decode(self, ids) -> str:
    """Stops at EOS; a sequence without EOS keeps all its tokens."""
    words = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i > EOS_ID:
        words.append(self.pieces[i] if i < len(self.pieces) else SPECIALS[UNK_ID])
    return " ".join(words)
