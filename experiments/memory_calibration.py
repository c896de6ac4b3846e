"""The calibration grid of lm/parallel/memory.py's activation coefficients: each point's
compiled temp bytes (one CPU device, float32) beside the formula's.

  python -m experiments.memory_calibration            # all 37 points (~10 minutes on 2 cores)
  python -m experiments.memory_calibration --points=3  # the first 3

The coefficients were fitted (least squares, the formula's max() structure) to these points;
docs/parallelism.md ("Memory model") gives the residuals and the held-out checks.
"""

from __future__ import annotations

import os

from absl import app, flags

_POINTS = flags.DEFINE_integer("points", 0, "Only the first N points (0 = all).")

BASE = dict(vocab_size=1024, d_model=256, num_heads=4, mlp_dim=1024, enc_layers=4, dec_layers=4)
GQA = dict(
  num_heads=8,
  num_kv_heads=2,
  activation="swiglu",
  mlp_dim=768,
  norm="rmsnorm",
  positions="rotary",
  use_bias=False,
)
# (task, model overrides, seq_len, global batch); every point at remat none, save_dots and full.
VARIANTS = (
  ("lm", {}, 256, 8),
  ("lm", {"dec_layers": 8}, 256, 8),
  ("lm", {}, 256, 16),
  ("lm", {}, 8, 1),
  ("lm", {"dec_layers": 8}, 8, 1),
  ("lm", {"mlp_dim": 2048}, 256, 8),
  ("lm", {"max_len": 512}, 512, 4),
  ("lm", {"vocab_size": 4096}, 256, 8),
  ("lm", {"mlp_dim": 2048, "dec_layers": 8}, 256, 8),
  ("lm", {"max_len": 512, "dec_layers": 8}, 512, 4),
  ("translation", {"enc_layers": 2, "dec_layers": 2}, 128, 8),
  ("lm", GQA, 256, 8),
)
EXTRA = (("lm", {"dec_layers": 8}, 256, 16, "full"),)  # the 37th point


def points() -> list[tuple]:
  grid = [(*v, remat) for v in VARIANTS for remat in ("none", "save_dots", "full")]
  return grid + list(EXTRA)


def measure(task: str, model: dict, length: int, rows: int, remat: str) -> tuple[int, float]:
  """(compiled temp bytes, the formula's) of one point."""
  import jax

  from lm import config as lmc
  from lm.parallel import memory
  from lm.train_step import Trainer

  cfg = lmc.lm_defaults() if task == "lm" else lmc.translation_defaults()
  cfg.model.update(BASE, max_len=256, dropout_rate=0.0, label_smoothing=0.0, dtype="float32")
  cfg.model.update(model, remat=remat)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.data.seq_len, cfg.train.global_batch_size = length, rows
  cfg.optim.update(schedule="constant", warmup_steps=0)
  trainer = Trainer.build(cfg, devices=jax.devices()[:1])
  measured = trainer.compile_train_step().memory_analysis().temp_size_in_bytes
  return measured, memory.layout_formula(trainer.layout, trainer.trainable)[2]["total"]


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print("task | model | seq_len | rows | remat | compiled temp MiB | formula MiB | ratio")
  for point in points()[: _POINTS.value or None]:
    measured, formula = measure(*point)
    task, model, length, rows, remat = point
    print(
      f"{task} | {model} | {length} | {rows} | {remat} | {measured / 2**20:.1f} | "
      f"{formula / 2**20:.1f} | {formula / measured:.3f}",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
