"""GPT-2 sized decoder-only language models (Radford et al. 2019) on C4 (English).

  python -m experiments.run --config=experiments/gpt2.py:small --workdir=runs/gpt2_small
Hardware: small on 8 GPUs or a TPU v4-8, medium on 32 chips with zero_stage=3. Data: tfds c4/en
(`tfds build c4/en --file_format=array_record`, a large download). Expected: eval loss
~3.3 nats after 20B tokens (small).
"""

from lm import config as lmc


def get_config(variant: str = "small"):
  if variant not in lmc.GPT2_SIZES:
    raise ValueError(f"variant {variant!r}: choose one of {sorted(lmc.GPT2_SIZES)}")
  cfg = lmc.lm_defaults()
  cfg.data.source = "tfds:c4/en:train"
  cfg.data.eval_source = "tfds:c4/en:validation"
  cfg.data.workers = 8  # grain worker processes: a TPU/GPU host has the cores
  cfg.data.seq_len = 1024
  cfg.data.too_long = "split"  # C4 documents often pass 1024 tokens: train on all of them
  cfg.model.update(lmc.GPT2_SIZES[variant])
  cfg.model.update(
    vocab_size=50257,
    max_len=1024,
    activation="gelu",
    positions="learned",
    norm="layernorm",
    use_bias=True,
    tie_embeddings=True,
    dropout_rate=0.0,
    # The loss over chunks of 256 positions: [rows, 256, 50,304] float32 logits at a time,
    # not [rows, 1024, 50,304] (1.6 GB at 8 rows a device), at the same loss and gradients.
    loss_chunk=256,
  )
  cfg.optim.update(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1, b2=0.95)
  cfg.train.update(total_steps=40_000, global_batch_size=512, log_every=100)
  cfg.eval.every = 2000
  return cfg
