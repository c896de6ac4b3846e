"""The model the CPU speed target is set on (the Flax wmt example's step on this machine).

  python -m experiments.bench --config=experiments/speed.py --steps=10
Hardware: one CPU device (2 cores). Encoder-decoder d_model 256, mlp 1024, 4 heads, 3+3 layers,
vocab 8000, 64-token rows, global batch 64, float32. Target: at most 0.6x the example's step
time, compiled once, in paired runs (experiments/compare_flax_wmt.py); the bench prints the step
time and the fraction of the measured matmul peak.
"""

from lm import config as lmc


def get_config(variant: str = "default"):
  if variant != "default":
    raise ValueError(f"variant {variant!r}: choose 'default'")
  cfg = lmc.translation_defaults()
  cfg.model.update(
    vocab_size=8000,
    d_model=256,
    num_heads=4,
    mlp_dim=1024,
    enc_layers=3,
    dec_layers=3,
    max_len=64,
    dtype="float32",
    dropout_rate=0.1,
  )
  cfg.data.seq_len = 64
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.train.update(global_batch_size=64, total_steps=100)
  return cfg
