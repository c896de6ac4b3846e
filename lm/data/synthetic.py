"""The demo task: an artificial language pair generated in-process, deterministically.

English-like source sentences (subject-verb-object, adjectives before nouns) map to a target
language with a word mapping, subject-object-verb order, adjectives after the noun that agree
with it in number, a postposed definite article, an object-case marker and verb agreement with
the subject. Learning it needs reordering, agreement and lexical translation, not copying.

The "shifted" variant (a domain shift, for adaptation) puts the target's verb second, after
the subject (subject-verb-object, as in the source), with the same words and inflections: a
model trained on the demo translates it with every word right and the verb in the wrong place.

The "xb" variant is a second target language for the same English (the demo's own is "xa"):
other invented words (lexicon salts 11-14), verb-subject-object order with the verb's plural
agreement as its own suffix, a definite article before the noun phrase, adjectives before the
noun, number marked on the noun alone, and the object introduced by a preposition. One model
translating into both must read the target tag (lm/data/multilingual.py) to know which.
"""

from __future__ import annotations

import random

import numpy as np

NOUNS = (
  "cat dog bird fish horse child woman man king queen farmer teacher doctor river "
  "tree house boat city garden window apple letter song book"
).split()
ADJECTIVES = "big small red old young happy quiet green dark bright cold brave".split()
VERBS = "see like help find carry paint watch follow call visit hear need".split()
ADVERBS = "today often quickly slowly again there".split()

_SYLLABLES = "ka lo mi nu pe ra si to vu ze ba do fi gu he ja ko le mo ni".split()


def _invented_word(index: int, salt: int) -> str:
  """A deterministic made-up target word for source word `index` of a category."""
  rng = random.Random(1000 * salt + index)
  return "".join(rng.choices(_SYLLABLES, k=2 + index % 2))


def _lexicon(words, salt):
  out, used = {}, set()
  for i, w in enumerate(words):
    t, bump = _invented_word(i, salt), 0
    while t in used:  # keep the mapping one-to-one
      bump += 1
      t = _invented_word(i + 100 * bump, salt)
    used.add(t)
    out[w] = t
  return out


NOUN_T = _lexicon(NOUNS, 1)
ADJ_T = _lexicon(ADJECTIVES, 2)
VERB_T = _lexicon(VERBS, 3)
ADV_T = _lexicon(ADVERBS, 4)
PLURAL, DEFINITE, OBJECT_CASE = "-ne", "-ta", "-o"


IRREGULAR_PLURALS = {"child": "children", "woman": "women", "man": "men", "fish": "fish"}


def _inflect(word: str) -> str:
  """English -s form of a regular noun or verb: watch -> watches, carry -> carries."""
  if word.endswith(("s", "sh", "ch", "x", "z")):
    return word + "es"
  if word.endswith("y") and word[-2] not in "aeiou":
    return word[:-1] + "ies"
  return word + "s"


def plural(noun: str) -> str:
  return IRREGULAR_PLURALS.get(noun) or _inflect(noun)


def third_person(verb: str) -> str:
  return _inflect(verb)


def _noun_phrase(rng):
  return dict(
    noun=rng.choice(NOUNS),
    plural=rng.random() < 0.4,
    definite=rng.random() < 0.5,
    adjectives=rng.sample(ADJECTIVES, rng.randrange(3)),
  )


def _source_np(p) -> list[str]:
  words = [*p["adjectives"], plural(p["noun"]) if p["plural"] else p["noun"]]
  det = "the" if p["definite"] else ("some" if p["plural"] else "a")
  if det == "a" and words[0][0] in "aeiou":
    det = "an"
  return [det, *words]


def _target_np(p, is_object: bool) -> list[str]:
  number = [PLURAL] if p["plural"] else []
  words = [NOUN_T[p["noun"]], *number]
  for adj in reversed(p["adjectives"]):  # after the noun, agreeing in number
    words += [ADJ_T[adj], *number]
  if p["definite"]:
    words.append(DEFINITE)
  if is_object:
    words.append(OBJECT_CASE)
  return words


XB_NOUN_T = _lexicon(NOUNS, 11)
XB_ADJ_T = _lexicon(ADJECTIVES, 12)
XB_VERB_T = _lexicon(VERBS, 13)
XB_ADV_T = _lexicon(ADVERBS, 14)
XB_PLURAL, XB_VERB_PLURAL, XB_DEFINITE, XB_OBJECT = "-i", "-an", "el", "na"


def _xb_np(p, is_object: bool) -> list[str]:
  words = [XB_ADJ_T[a] for a in p["adjectives"]] + [XB_NOUN_T[p["noun"]]]
  words += [XB_PLURAL] if p["plural"] else []
  words = [XB_DEFINITE, *words] if p["definite"] else words
  return [XB_OBJECT, *words] if is_object else words


def _xb_sentence(subject, obj, verb: str, adverb: list[str]) -> list[str]:
  """Verb-subject-object, then the adverb."""
  target_verb = [XB_VERB_T[verb]] + ([XB_VERB_PLURAL] if subject["plural"] else [])
  return [*target_verb, *_xb_np(subject, False), *_xb_np(obj, True)] + [XB_ADV_T[a] for a in adverb]


VARIANTS = ("", "shifted", "xb")


def sentence_pair(rng: random.Random, variant: str = "") -> tuple[str, str]:
  subject, obj = _noun_phrase(rng), _noun_phrase(rng)
  verb = rng.choice(VERBS)
  adverb = [rng.choice(ADVERBS)] if rng.random() < 0.3 else []
  source_verb = verb if subject["plural"] else third_person(verb)
  source = [*_source_np(subject), source_verb, *_source_np(obj), *adverb]
  if variant == "xb":
    return " ".join(source), " ".join(_xb_sentence(subject, obj, verb, adverb))
  target_verb = [VERB_T[verb]] + ([PLURAL] if subject["plural"] else [])
  adverbs = [ADV_T[a] for a in adverb]
  if variant == "shifted":
    target = [*_target_np(subject, False), *target_verb, *_target_np(obj, True), *adverbs]
  else:
    target = [*_target_np(subject, False), *_target_np(obj, True), *adverbs, *target_verb]
  return " ".join(source), " ".join(target)


class DemoSource:
  """Random-access pairs: pair i is a pure function of (seed, i), so nothing is held in memory.
  Python's generator, not numpy's: seeding one per pair is 10x cheaper, and the demo's input
  pipeline shares two cores with the train step."""

  def __init__(self, size: int, seed: int, variant: str = ""):
    self.size, self.seed, self.variant = size, seed, variant

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> tuple[str, str]:
    return sentence_pair(random.Random(self.seed << 32 | int(index)), self.variant)


# synthetic:classify (task=classify): a demo source sentence labelled by two facts found at two
# places: its subject's number (which only the verb's agreement tells for "the fish") and
# whether its object is definite ("the" after the verb; the subject may have one too). No word
# alone decides the label.
CLASSIFY_LABELS = (
  "plural-definite",
  "plural-indefinite",
  "singular-definite",
  "singular-indefinite",
)


def labelled_sentence(rng: random.Random) -> tuple[str, int]:
  """(sentence, its CLASSIFY_LABELS index)."""
  subject, obj = _noun_phrase(rng), _noun_phrase(rng)
  verb = rng.choice(VERBS)
  adverb = [rng.choice(ADVERBS)] if rng.random() < 0.3 else []
  verb = verb if subject["plural"] else third_person(verb)
  words = [*_source_np(subject), verb, *_source_np(obj), *adverb]
  number = "plural" if subject["plural"] else "singular"
  article = "definite" if obj["definite"] else "indefinite"
  return " ".join(words), CLASSIFY_LABELS.index(f"{number}-{article}")


class LabelledSource:
  """Random-access labelled sentences: sentence i is a pure function of (seed, i)."""

  def __init__(self, size: int, seed: int):
    self.size, self.seed = size, seed

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> tuple[str, int]:
    return labelled_sentence(random.Random(self.seed << 32 | int(index)))


def random_batch(cfg, seed: int = 0, padding: int = 0, packed: bool = False) -> dict:
  """A global batch of random token rows (ids 4 .. vocab_size - 1) for the config's task, one
  example per row, for tests and benchmarks. `padding` > 0 pads the last `padding` columns and
  row 0 from a third of its length, so that rows and microbatches differ in token count.
  Segment ids mark the padding (id 0 here); `packed` adds the positions a packed batch
  carries."""
  rng = np.random.RandomState(seed)
  shape = (cfg.train.global_batch_size, cfg.data.seq_len)
  tokens = rng.randint(4, cfg.model.vocab_size, size=shape).astype(np.int32)
  if padding:
    tokens[:, -padding:] = 0
    tokens[0, shape[1] // 3 :] = 0
  # A source differs from its target: the row's real tokens reversed, padding still last (an
  # unpacked row is one example then padding, as the pipeline makes it and cuDNN assumes).
  lengths = (tokens > 0).sum(axis=1)
  sources = np.zeros_like(tokens)
  for row, n in enumerate(lengths):
    sources[row, :n] = tokens[row, :n][::-1]
  sides = {"targets": tokens} if cfg.task == "lm" else {"inputs": sources, "targets": tokens}
  batch = {}
  for side, ids in sides.items():
    batch[side] = np.ascontiguousarray(ids)
    batch[side + "_segment_ids"] = (ids > 0).astype(np.int32)
    if packed:
      batch[side + "_positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
  return batch
