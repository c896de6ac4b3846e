"""Tiny configs shared by the tests."""

from lm import config as lmc


def tiny_config(task: str = "translation", **model):
  cfg = lmc.translation_defaults() if task == "translation" else lmc.lm_defaults()
  cfg.model.update(
    vocab_size=64,
    d_model=32,
    num_heads=4,
    mlp_dim=64,
    enc_layers=2,
    dec_layers=2,
    max_len=32,
    dropout_rate=0.0,
    label_smoothing=0.0,
    dtype="float32",
  )
  cfg.model.update(model)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.data.seq_len = 16
  cfg.train.update(global_batch_size=8, total_steps=10)
  cfg.optim.update(learning_rate=1e-2, schedule="constant", warmup_steps=0)
  return cfg
