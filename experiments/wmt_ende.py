"""English->German Transformer (Vaswani et al. 2017) on WMT14, evaluated on newstest2014.

  python -m experiments.run --config=experiments/wmt_ende.py:base --workdir=runs/wmt_base
Hardware: base on a TPU v4-8 or 8 GPUs, big on 32 chips. Data: tfds wmt14_translate/de-en,
prepared once with `tfds build wmt14_translate/de-en --file_format=array_record` (the error
says so when it is missing); the SentencePiece vocabulary is trained into the workdir.
Expected: ~27 BLEU (base) and ~28 BLEU (big), cased sacreBLEU 13a on newstest2014,
after 100k / 300k steps.
"""

from lm import config as lmc


def get_config(variant: str = "base"):
  if variant not in ("base", "big"):
    raise ValueError(f"variant {variant!r}: choose 'base' or 'big'")
  cfg = lmc.translation_defaults()
  cfg.data.source = "tfds:wmt14_translate/de-en:train"
  cfg.data.eval_source = "tfds:wmt14_translate/de-en:test"  # newstest2014
  cfg.data.direction = "en->de"
  cfg.data.eval_examples = 3003  # all of newstest2014
  cfg.data.workers = 8  # grain worker processes: a TPU/GPU host has the cores
  cfg.data.seq_len = 256
  cfg.model.update(lmc.TRANSFORMER_SIZES[variant])
  cfg.model.update(vocab_size=37000, max_len=256, dropout_rate=0.1 if variant == "base" else 0.3)
  d_model = cfg.model.d_model
  # Paper schedule: lr = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
  cfg.optim.update(learning_rate=d_model**-0.5 * 4000**-0.5, warmup_steps=4000)
  cfg.train.update(
    total_steps=100_000 if variant == "base" else 300_000,
    global_batch_size=128,
    log_every=100,
  )
  cfg.eval.every = 5000
  return cfg
