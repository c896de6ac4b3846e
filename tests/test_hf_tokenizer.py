"""lm/hf/tokenizer.py against transformers: the same ids and text for each kind of checkpoint
tokenizer, from tiny models trained here (nothing is downloaded)."""

import importlib
import json
import os
import shutil

import numpy as np
import pytest

from lm.config import ConfigError
from lm.hf import tokenizer as hf_tokenizer
from tests import hf_fixtures

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is first imported: no download
transformers = importlib.import_module("transformers")

# MarianTokenizer warns that sacremoses (which it does not use to tokenize) is missing.
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

TEXTS = [
  "The quick brown fox jumps over the lazy dog.",
  "Grüße, 東京 🙂",  # characters the training text lacks
  "a   b\t\tc\n\nd",  # runs of whitespace
  "  leading and trailing  ",
  " ",
  "",
  "Ω≈ç√∫ ∂ƒ©˙∆˚¬",  # outside the vocabulary
  "it's 12345 , isn't it ?",
  "special strings: <s> </s> <unk> <pad> <sep> <|endoftext|> x<s>y",
  ">>de<< Hallo Welt",
]
KINDS = {
  "gpt2": "tokenizer_json",
  "llama_json": "tokenizer_json",
  "llama_hub": "tokenizer_json",
  "llama_spm": "sentencepiece",
  "llama_legacy": "sentencepiece",
  "marian": "marian",
  "marian_hub": "marian",
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  return hf_fixtures.gpt2_tokenizer(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_model():
  return hf_fixtures.llama_spm_model()


@pytest.fixture(scope="module")
def llama_json_dir(tmp_path_factory, llama_model):
  return hf_fixtures.llama_tokenizer(tmp_path_factory.mktemp("llama_json"), llama_model)


ENGLISH = hf_fixtures.ENGLISH


@pytest.fixture(scope="module")
def llama_hub_dir(tmp_path_factory, llama_json_dir):
  """The tokenizer.json Llama 2's hub repository has: the "▁" put in by a normalizer before
  every text between added tokens, no pre-tokenizer. transformers reads only its vocabulary and
  merges, into LlamaTokenizer's own pipeline (a "▁" before the first text only)."""
  directory = tmp_path_factory.mktemp("llama_hub")
  shutil.copytree(llama_json_dir, directory, dirs_exist_ok=True)
  spec = json.loads((directory / "tokenizer.json").read_text())
  spec["normalizer"] = {
    "type": "Sequence",
    "normalizers": [
      {"type": "Prepend", "prepend": "\u2581"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
  }
  spec["pre_tokenizer"] = None
  hf_fixtures.write_json(directory / "tokenizer.json", spec)
  return directory


@pytest.fixture(scope="module")
def llama_spm_dir(tmp_path_factory, llama_json_dir):
  """The same without tokenizer.json: tokenizer.model, tokenizer_config.json, config.json."""
  directory = tmp_path_factory.mktemp("llama_spm")
  for name in ("tokenizer.model", "tokenizer_config.json", "config.json"):
    shutil.copy(llama_json_dir / name, directory / name)
  return directory


@pytest.fixture(scope="module")
def llama_legacy_dir(tmp_path_factory, llama_spm_dir):
  """legacy=true: a "▁" before every text between added tokens, not only the first."""
  directory = tmp_path_factory.mktemp("llama_legacy")
  shutil.copytree(llama_spm_dir, directory, dirs_exist_ok=True)
  options = json.loads((directory / "tokenizer_config.json").read_text())
  hf_fixtures.write_json(directory / "tokenizer_config.json", dict(options, legacy=True))
  return directory


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
  return hf_fixtures.marian_tokenizer(tmp_path_factory.mktemp("marian"))


@pytest.fixture(scope="module")
def marian_hub_dir(tmp_path_factory, marian_dir):
  """opus-mt's hub files: the special tokens in special_tokens_map.json, a tokenizer_config.json
  without added_tokens_decoder or tokenizer_class (config.json's model_type names the class)."""
  directory = tmp_path_factory.mktemp("marian_hub")
  shutil.copytree(marian_dir, directory, dirs_exist_ok=True)
  hf_fixtures.write_json(
    directory / "tokenizer_config.json", dict(source_lang="en", target_lang="de")
  )
  specials = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
  hf_fixtures.write_json(directory / "special_tokens_map.json", specials)
  return directory


@pytest.fixture(scope="module", params=sorted(KINDS))
def case(request):
  """(name, directory, ours, transformers')"""
  directory = request.getfixturevalue(f"{request.param}_dir")
  ours = hf_tokenizer.load(str(directory))
  return request.param, directory, ours, transformers.AutoTokenizer.from_pretrained(directory)


def _sides(tokenizer):
  return hf_tokenizer.SIDES if tokenizer.kind == "marian" else ("targets",)


def _their_ids(theirs, text, side):
  if side == "targets" and isinstance(theirs, transformers.MarianTokenizer):
    return theirs(text_target=text, add_special_tokens=False)["input_ids"]
  return theirs(text, add_special_tokens=False)["input_ids"]


def _all_ids(tokenizer):
  return [tokenizer.encode(text, side) for side in _sides(tokenizer) for text in TEXTS]


def test_kind_follows_the_files(case):
  name, _, ours, _ = case
  assert ours.kind == KINDS[name]


def test_encode_matches_transformers(case):
  _, _, ours, theirs = case
  for side in _sides(ours):
    for text in TEXTS:
      assert ours.encode(text, side) == _their_ids(theirs, text, side), (side, text)


def test_decode_matches_transformers(case):
  _, _, ours, theirs = case
  round_trips = 0
  for side in _sides(ours):
    for text in TEXTS:
      ids = [i for i in _their_ids(theirs, text, side) if i != ours.eos_id]
      expected = theirs.decode(ids, skip_special_tokens=True)
      assert ours.decode(ids) == expected, (side, text)
      round_trips += expected == text
  assert round_trips >= 2  # the comparison covers texts that come back whole


def test_decode_stops_at_eos(case):
  _, _, ours, _ = case
  ids = ours.encode("The quick brown fox")
  assert ours.decode(np.array(ids + [ours.eos_id] + ours.encode("lazy dog"))) == ours.decode(ids)
  assert ours.decode(ids) == "The quick brown fox"


def test_special_ids(case):
  name, directory, ours, theirs = case
  assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.unk_id) == (
    theirs.pad_token_id,
    theirs.bos_token_id,
    theirs.eos_token_id,
    theirs.unk_token_id,
  )
  if name.startswith("marian"):
    vocab = json.loads((directory / "vocab.json").read_text())
    assert ours.vocab_size == theirs.vocab_size == len(vocab)
    assert (ours.eos_id, ours.pad_id, ours.decoder_start_id) == (0, len(vocab) - 1, len(vocab) - 1)
  else:
    assert ours.vocab_size == len(theirs)
    assert ours.decoder_start_id == ours.bos_id
  if name == "gpt2":
    assert ours.pad_id is None and ours.eos_id == ours.vocab_size - 1


def test_special_ids_prefer_config_json(gpt2_dir):
  """The model's ids (config.json) over its tokenizer's; a list of EOS ids gives its first."""
  config = dict(pad_token_id=3, bos_token_id=4, eos_token_id=[5, 6], decoder_start_token_id=7)
  ours = hf_tokenizer.load(str(gpt2_dir), config)
  assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.decoder_start_id) == (3, 4, 5, 7)
  assert ours.eos_ids == (5, 6)  # every listed end stops a sequence (Llama 3's instruct models)
  ids = ours.encode("The quick brown fox")
  assert ours.decode(ids + [6] + ours.encode("lazy dog")) == ours.decode(ids)
  assert hf_tokenizer.from_meta(ours.to_meta()).eos_ids == (5, 6)
  assert hf_tokenizer.load(str(gpt2_dir), dict(pad_token_id=3)).decoder_start_id == ours.unk_id
  assert hf_tokenizer.load(str(gpt2_dir), {}).eos_id == ours.unk_id  # <|endoftext|>


def test_from_meta_needs_no_files(case, tmp_path):
  _, directory, _, _ = case
  shutil.copytree(directory, tmp_path / "copy")
  loaded = hf_tokenizer.load(str(tmp_path / "copy"))
  meta = json.loads(json.dumps(loaded.to_meta()))
  shutil.rmtree(tmp_path / "copy")
  rebuilt = hf_tokenizer.from_meta(meta)
  assert (rebuilt.kind, rebuilt.vocab_size) == (loaded.kind, loaded.vocab_size)
  assert rebuilt.specials == loaded.specials
  assert _all_ids(rebuilt) == _all_ids(loaded)
  assert rebuilt.fingerprint() == loaded.fingerprint()


def test_saved_directory_loads_in_transformers(case, tmp_path):
  _, directory, ours, _ = case
  ours.save(str(tmp_path))
  expected = {p.name for p in directory.iterdir()} - {"config.json"}
  if ours.kind == "tokenizer_json":
    expected -= {"tokenizer.model"}  # transformers does not read it beside tokenizer.json
  assert {p.name for p in tmp_path.iterdir()} == expected
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)  # with no config.json
  for side in _sides(ours):
    for text in TEXTS:
      assert _their_ids(theirs, text, side) == ours.encode(text, side), (side, text)
  config = json.loads((directory / "config.json").read_text())
  assert hf_tokenizer.load(str(tmp_path), config).fingerprint() == ours.fingerprint()


def test_class_from_model_type_is_saved(gpt2_dir, tmp_path):
  """Without tokenizer_config.json transformers picks GPT2Tokenizer from config.json's
  model_type; save() names it, so the directory reads the same without config.json."""
  shutil.copy(gpt2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  shutil.copy(gpt2_dir / "config.json", tmp_path / "config.json")
  ours = hf_tokenizer.load(str(tmp_path))
  assert ours.tokenizer_class == "GPT2Tokenizer"
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert [ours.encode(t) for t in TEXTS] == [_their_ids(theirs, t, "targets") for t in TEXTS]
  ours.save(str(tmp_path / "saved"))
  saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
  assert saved == {"tokenizer_class": "GPT2Tokenizer"}


def test_fingerprint_tells_tokenizers_apart(gpt2_dir, llama_spm_dir, llama_legacy_dir, marian_dir):
  directories = (gpt2_dir, llama_spm_dir, llama_legacy_dir, marian_dir)
  prints = [hf_tokenizer.load(str(d)).fingerprint() for d in directories]
  assert len(set(prints)) == len(prints)
  assert hf_tokenizer.load(str(gpt2_dir)).fingerprint() == prints[0]
  meta = hf_tokenizer.load(str(gpt2_dir)).to_meta()
  meta["specials"]["pad"] = 0
  assert hf_tokenizer.from_meta(meta).fingerprint() != prints[0]


def _one_line_error(directory, match):
  with pytest.raises(ConfigError, match=match) as error:
    hf_tokenizer.load(str(directory))
  assert "\n" not in str(error.value)
  return str(error.value)


def test_directory_without_tokenizer_files(tmp_path):
  hf_fixtures.write_json(tmp_path / "config.json", dict(model_type="llama"))
  (tmp_path / "source.spm").write_bytes(b"")  # half of Marian's files is none
  message = _one_line_error(tmp_path, "tokenizer.json")
  assert str(tmp_path) in message and "vocab.json" in message


def test_sentencepiece_model_read_as_llama_only(llama_model, tmp_path):
  """transformers reads a tokenizer.model without a tokenizer class by another conversion."""
  (tmp_path / "tokenizer.model").write_bytes(llama_model)
  _one_line_error(tmp_path, "tokenizer_class is None.*LlamaTokenizer")
