"""Decoder-only language model on LM1B (One Billion Word), as in the Flax lm1b example.

  python -m experiments.run --config=experiments/lm1b.py --workdir=runs/lm1b
Hardware: a TPU v3-8 or 8 GPUs. Data: tfds lm1b (`tfds build lm1b --file_format=array_record`).
Expected: eval perplexity ~30 after 500k steps (flax example).
"""

from lm import config as lmc


def get_config(variant: str = "base"):
  if variant != "base":
    raise ValueError(f"variant {variant!r}: choose 'base'")
  cfg = lmc.lm_defaults()
  cfg.data.source = "tfds:lm1b:train"
  cfg.data.eval_source = "tfds:lm1b:test"
  cfg.data.workers = 8  # grain worker processes: a TPU/GPU host has the cores
  cfg.data.seq_len = 128
  cfg.model.update(
    vocab_size=32000,
    d_model=512,
    num_heads=8,
    mlp_dim=2048,
    dec_layers=6,
    max_len=512,
    dropout_rate=0.1,
  )
  cfg.optim.update(learning_rate=1e-3, warmup_steps=1000)
  cfg.train.update(total_steps=500_000, global_batch_size=256, log_every=100)
  cfg.eval.every = 2000
  return cfg
