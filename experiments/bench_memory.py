"""The train step's compiled temp bytes over sequence lengths, at GPT-2 small's width (d 768,
12 heads, vocab 50,304), 2 layers, 8 rows, one device, float32: how attention and the loss grow
with length. Abstract compiles only (nothing is allocated), so it runs on a CPU.

  python -m experiments.bench_memory --lengths=1024,2048,4096 --attention_chunk=0 --loss_chunk=0
  python -m experiments.bench_memory --lengths=1024,2048,4096 --attention_chunk=512 --loss_chunk=256

Each length is compiled twice, at the vocabulary and at --small_vocab: the difference is the
vocabulary's share of temp bytes (the logits, their gradient and the head's).
Results (2-core CPU, jax 0.10.2) are in docs/parallelism.md, "Long sequences in bounded memory".
"""

from __future__ import annotations

import json
import os

from absl import app, flags

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "Sequence lengths.")
_VOCAB = flags.DEFINE_integer("vocab", 50304, "The vocabulary (GPT-2's, padded to 128).")
_SMALL_VOCAB = flags.DEFINE_integer("small_vocab", 128, "The stand-in vocabulary.")
_ATTENTION_CHUNK = flags.DEFINE_integer("attention_chunk", 512, "model.attention_chunk.")
_LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 256, "model.loss_chunk.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "save_dots"], "model.remat.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")


def step_config(length: int, vocab: int):
  from lm import config as lmc

  cfg = lmc.lm_defaults()
  cfg.data.source = "synthetic:demo"
  cfg.data.seq_len = length
  cfg.model.update(lmc.GPT2_SIZES["small"])
  cfg.model.update(
    dec_layers=2,
    vocab_size=vocab,
    max_len=length,
    norm="layernorm",
    use_bias=True,
    tie_embeddings=True,
    dtype="float32",
    remat=_REMAT.value,
    attention_chunk=_ATTENTION_CHUNK.value,
    loss_chunk=_LOSS_CHUNK.value,
  )
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.train.update(global_batch_size=8, microbatches=1)
  return cfg


def temp_bytes(cfg) -> int:
  from lm.train_step import Trainer

  trainer = Trainer.build(cfg, tokenizer_size=cfg.model.vocab_size)
  return trainer.compile_train_step().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  rows = []
  for length in map(int, _LENGTHS.value):
    whole = temp_bytes(step_config(length, _VOCAB.value))
    small = temp_bytes(step_config(length, _SMALL_VOCAB.value))
    rows.append({"length": length, "temp": whole, "temp_small_vocab": small})
    print(
      f"length {length}: temp {whole / 2**20:,.0f} MiB; at vocab {_SMALL_VOCAB.value} "
      f"{small / 2**20:,.0f} MiB; the vocabulary's share {(whole - small) / 2**20:,.0f} MiB",
      flush=True,
    )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  app.run(main)
