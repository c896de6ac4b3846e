"""The embedded default: translation of a generated artificial language pair (no download).

  python -m experiments.run --config=experiments/demo.py --workdir=runs/demo
Hardware: 2 CPU cores. Time: 2-4 minutes. Expected: held-out token accuracy above 0.99 and
sacreBLEU above 95 (beam 4), then a few source / target / prediction examples. Variant `tiny`
(50 steps) is for tests.

Variant `lm`: a decoder-only LM on the pair's English side (`synthetic:demo_english`), one word
a token, trained on rows of 32 tokens; rotary positions and decode.max_len 256 leave a decode
width of 256 for serving long continuations.
  python -m experiments.run --config=experiments/demo.py:lm --workdir=runs/demo_lm
Hardware: 2 CPU cores. Time: 1.5 minutes (600 steps). Expected: eval perplexity 10.99 (eval_loss
2.397, token accuracy 0.27) and grammatical continuations. That is the floor: the grammar draws
28.6 bits a sentence, over 8.3 tokens with EOS, so the held-out sentences' own perplexity under
the generator is 10.92 at one word a token. Variant `lm_tiny` (20 steps) is for tests.

Variant `classify`: text classification (task=classify) of the pair's English sentences
(`synthetic:classify`) into 4 classes, the subject's number x whether the object is definite,
by a 2-layer encoder with a mean-pooled head. The same variant trains on a file with
--config.data.source=tsv:PATH (label<TAB>text per line).
  python -m experiments.run --config=experiments/demo.py:classify --workdir=runs/demo_classify
Hardware: 2 CPU cores. Time: about 1 minute (400 steps). Expected: held-out accuracy and
macro-F1 1.000 (measured), the confusion matrix all diagonal. Variant `classify_tiny` (20 steps)
is for tests.

Variant `multi`: one model translating the English into both generated languages, en->xa (the
default's) and en->xb (verb first, other words and inflections), from `synthetic:demo_multi`;
each source carries its target's tag, <2xa> or <2xb>, and eval reports BLEU per pair.
  python -m experiments.run --config=experiments/demo.py:multi --workdir=runs/demo_multi
  python -m experiments.run --mode=decode --workdir=runs/demo_multi --target_lang=xb
Hardware: 2 CPU cores. Time: about 4 minutes alone (1000 steps; 7:41 measured with other jobs on
the cores). Expected: BLEU 99.16 (en-xa) and 99.74 (en-xb), mean 99.45, eval token accuracy
0.998 (the README's "Several languages in one model"). Variant `multi_tiny` (40 steps) is for
tests.
"""

from lm import config as lmc

VARIANTS = ("default", "tiny", "lm", "lm_tiny", "classify", "classify_tiny", "multi", "multi_tiny")


def get_config(variant: str = "default"):
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r}: choose {', '.join(map(repr, VARIANTS))}")
  if variant.startswith("lm"):
    return lm_config(variant)
  if variant.startswith("classify"):
    return classify_config(variant)
  cfg = lmc.translation_defaults()
  cfg.data.source = "synthetic:demo"
  cfg.data.update(seq_len=32, spm_model_type="word", tokenizer_sample=20_000)
  cfg.model.update(
    vocab_size=256,
    d_model=128,
    num_heads=4,
    mlp_dim=512,
    enc_layers=2,
    dec_layers=2,
    dropout_rate=0.0,
    label_smoothing=0.0,
  )
  cfg.optim.update(learning_rate=2e-3, schedule="rsqrt", warmup_steps=200)
  cfg.train.update(total_steps=800, global_batch_size=64, log_every=100)
  if variant == "tiny":
    cfg.train.update(total_steps=50, log_every=5)
    cfg.optim.update(warmup_steps=10)
    cfg.data.eval_examples = 64
  if variant.startswith("multi"):
    multi_config(cfg, variant)
  return cfg


def multi_config(cfg, variant: str) -> None:
  """Both target languages in one model: the default's model, trained longer."""
  cfg.data.source = "synthetic:demo_multi"
  cfg.data.eval_examples = 256  # per pair
  cfg.train.update(total_steps=1000)
  if variant == "multi_tiny":
    cfg.train.update(total_steps=40, log_every=5)
    cfg.optim.update(warmup_steps=10)
    cfg.data.update(eval_examples=32, tokenizer_sample=4000)


def lm_config(variant: str):
  cfg = lmc.lm_defaults()
  cfg.data.source = "synthetic:demo_english"
  cfg.data.update(seq_len=32, spm_model_type="word", tokenizer_sample=20_000)
  cfg.model.update(
    vocab_size=128,  # the English side has 93 words
    d_model=128,
    num_heads=4,
    mlp_dim=512,
    dec_layers=2,
    positions="rotary",  # no table to outgrow: serving decodes past the rows trained on
    max_len=256,
  )
  cfg.decode.max_len = 256
  # No weight decay, as in the translation demo: endless generated data, nothing to regularize.
  cfg.optim.update(learning_rate=2e-3, warmup_steps=100, weight_decay=0.0)
  cfg.train.update(total_steps=600, global_batch_size=64, log_every=100)
  if variant == "lm_tiny":
    cfg.train.update(total_steps=20, log_every=5)
    cfg.optim.update(warmup_steps=5)
    cfg.data.eval_examples = 64
  return cfg


def classify_config(variant: str):
  """Text classification (task=classify) of the demo's English sentences (synthetic:classify)
  into 4 classes: the subject's number x the object's definiteness."""
  cfg = lmc.classify_defaults()
  cfg.data.source = "synthetic:classify"
  cfg.data.update(seq_len=32, spm_model_type="word", tokenizer_sample=20_000)
  cfg.model.update(
    vocab_size=128,
    d_model=64,
    num_heads=4,
    mlp_dim=256,
    enc_layers=2,
    dropout_rate=0.0,
    label_smoothing=0.0,
  )
  cfg.optim.update(learning_rate=2e-3, schedule="rsqrt", warmup_steps=100)
  cfg.train.update(total_steps=400, global_batch_size=64, log_every=50)
  cfg.eval.examples = 0
  if variant == "classify_tiny":
    cfg.train.update(total_steps=20, log_every=5)
    cfg.optim.update(warmup_steps=5)
    cfg.data.update(eval_examples=64, tokenizer_sample=2000)
  return cfg
