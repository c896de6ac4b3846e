"""Hugging Face model directories built here, for the tests: tiny tokenizers trained on a few
sentences, and models with random weights from a config, saved with save_pretrained. Nothing is
downloaded (HF_HUB_OFFLINE=1 before transformers is imported)."""

import importlib
import io
import json
import os
import pathlib

import numpy as np
import sentencepiece as spm
import tokenizers

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = importlib.import_module("transformers")
torch = importlib.import_module("torch")

ENGLISH = [
  "The quick brown fox jumps over the lazy dog.",
  "Hello world, hello there! It's a test, isn't it?",
  "numbers 12345 and 67890 in a sentence",
  "tabs\tand\nnewlines  and  double  spaces",
]
GERMAN = [
  "Der schnelle braune Fuchs springt über den faulen Hund.",
  "Hallo Welt, Grüße aus München!",
  "Zahlen 12345 und 67890 in einem Satz",
]


def write_json(path, value):
  pathlib.Path(path).write_text(json.dumps(value, indent=2))


def _train_spm(texts, **options) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts * 20), model_writer=model, minloglevel=2, **options
  )
  return model.getvalue()


def gpt2_tokenizer(directory):
  """GPT-2's layout: a byte-level BPE with <|endoftext|> last (GPT-2's 50256)."""
  directory = pathlib.Path(directory)
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=320, initial_alphabet=alphabet, show_progress=False
  )
  bpe.train_from_iterator(ENGLISH * 20, trainer)
  bpe.add_special_tokens(["<|endoftext|>"])
  eot = bpe.token_to_id("<|endoftext|>")
  transformers.GPT2TokenizerFast(tokenizer_object=bpe).save_pretrained(directory)
  write_json(directory / "config.json", dict(model_type="gpt2", bos_token_id=eot, eos_token_id=eot))
  return directory


def llama_spm_model() -> bytes:
  """A Llama-like SentencePiece BPE (byte fallback, unk 0, bos 1, eos 2, a user-defined piece),
  its normalization left at SentencePiece's default (NFKC, collapsing whitespace), which
  transformers does not apply: the whitespace texts tell the two apart."""
  return _train_spm(
    ENGLISH + GERMAN,
    vocab_size=400,
    model_type="bpe",
    byte_fallback=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    user_defined_symbols=["<sep>"],
  )


def llama_tokenizer(directory, model: bytes | None = None):
  """Llama 2's hub layout: tokenizer.model, and the tokenizer.json and tokenizer_config.json
  transformers writes. (In v5, LlamaTokenizer(vocab_file=...) does not read the file; its
  from_pretrained converts it, and save_pretrained writes no tokenizer.model.)"""
  directory = pathlib.Path(directory)
  model = model or llama_spm_model()
  source = directory / "_source"
  source.mkdir(parents=True, exist_ok=True)
  (source / "tokenizer.model").write_bytes(model)
  transformers.LlamaTokenizer.from_pretrained(source).save_pretrained(directory)
  (directory / "tokenizer.model").write_bytes(model)
  for f in source.iterdir():
    f.unlink()
  source.rmdir()
  write_json(directory / "config.json", dict(model_type="llama", bos_token_id=1, eos_token_id=2))
  return directory


def marian_tokenizer(directory):
  """opus-mt's layout: two unigram models, one vocab.json of both sides' pieces with </s>=0,
  <unk>=1 and <pad> last."""
  directory = pathlib.Path(directory)
  work = directory / "_source"
  work.mkdir(parents=True, exist_ok=True)
  vocab = {"</s>": 0, "<unk>": 1}
  for name, texts in (("source.spm", ENGLISH), ("target.spm", GERMAN)):
    (work / name).write_bytes(_train_spm(texts, vocab_size=70, hard_vocab_limit=False))
    model = spm.SentencePieceProcessor(model_file=str(work / name))
    for i in range(model.get_piece_size()):
      if not (model.is_control(i) or model.is_unknown(i)):
        vocab.setdefault(model.id_to_piece(i), len(vocab))
  vocab["<pad>"] = len(vocab)
  write_json(work / "vocab.json", vocab)
  transformers.MarianTokenizer(
    source_spm=str(work / "source.spm"),
    target_spm=str(work / "target.spm"),
    vocab=str(work / "vocab.json"),
  ).save_pretrained(directory)
  for f in work.iterdir():
    f.unlink()
  work.rmdir()
  pad = vocab["<pad>"]
  config = dict(model_type="marian", pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad)
  write_json(directory / "config.json", config)
  return directory


# -- models ---------------------------------------------------------------------------------

TOKENIZERS = {
  "gpt2": gpt2_tokenizer,
  "llama": llama_tokenizer,
  "mistral": llama_tokenizer,
  "qwen2": llama_tokenizer,
  "marian": marian_tokenizer,
}
MODELS = {
  "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
  "llama": ("LlamaConfig", "LlamaForCausalLM"),
  "mistral": ("MistralConfig", "MistralForCausalLM"),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
  "marian": ("MarianConfig", "MarianMTModel"),
}
# Small models; a test's options go over these.
BASE = {
  "gpt2": dict(n_embd=32, n_head=4, n_layer=2, n_positions=64),
  "llama": dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=64,
    max_position_embeddings=64,
  ),
  "marian": dict(
    d_model=32,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_layers=2,
    decoder_layers=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    activation_function="swish",
    scale_embedding=True,
  ),
}
BASE["mistral"] = dict(BASE["llama"], sliding_window=None)
BASE["qwen2"] = dict(BASE["llama"])


def save_model(kind: str, directory, seed: int = 0, **options):
  """A random `kind` model (model_type) with its tokenizer, saved in `directory`; its config's
  vocabulary and special ids are the tokenizer's. Returns the model as transformers loads it
  back from the directory (float32, eval mode)."""
  directory = pathlib.Path(directory)
  TOKENIZERS[kind](directory)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  ids = json.loads((directory / "config.json").read_text())
  config_cls, model_cls = (getattr(transformers, name) for name in MODELS[kind])
  values = dict(BASE[kind], vocab_size=len(tokenizer), **ids)
  values.pop("model_type")
  values.update(options)
  torch.manual_seed(seed)
  model = model_cls(config_cls(**values)).eval()
  with torch.no_grad():  # larger than the default init, so that errors show in the logits
    for name, p in model.named_parameters():
      if "embed_positions" not in name:  # Marian's sinusoids, rebuilt on load
        p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
  model.save_pretrained(directory)
  return model_cls.from_pretrained(directory).eval()


def logits(model, batch: dict, start_id: int) -> np.ndarray:
  """transformers' float32 logits for a zerolm batch (segment ids mark padding): the decoder
  reads the start token, then the targets shifted right, as zerolm's does."""
  targets = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long)
  decoder_inputs = torch.cat([torch.full_like(targets[:, :1], start_id), targets[:, :-1]], 1)
  mask = torch.tensor(np.asarray(batch["targets_segment_ids"]), dtype=torch.long)
  with torch.no_grad():
    if "inputs" in batch:
      return model(
        input_ids=torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long),
        attention_mask=torch.tensor(np.asarray(batch["inputs_segment_ids"]), dtype=torch.long),
        decoder_input_ids=decoder_inputs,
        decoder_attention_mask=mask,
      ).logits.numpy()
    return model(input_ids=decoder_inputs, attention_mask=mask).logits.numpy()
