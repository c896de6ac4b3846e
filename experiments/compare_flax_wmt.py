"""The speed target's comparison: the Flax wmt example's own train step against ours, on the
same model (experiments/speed.py), in paired, alternating runs.

  git clone --depth 1 https://github.com/google/flax /tmp/flax
  python -m experiments.compare_flax_wmt --flax_wmt=/tmp/flax/examples/wmt --rounds=3

Each side runs in a fresh process, one after the other, `--rounds` times; each reports the
median of `--steps` steps after compiling once. The example's step is its own
`train.train_step` under `jax.pmap` with its optimizer (adamw, as its train.py builds it), fed
packed rows (two examples each, four padding tokens) of the same shape as ours. This machine's
speed varies by up to 2x from one day to the next, so only the ratio within a round counts.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import statistics
import subprocess
import sys
import time
import types

from absl import app, flags

_FLAX_WMT = flags.DEFINE_string("flax_wmt", None, "examples/wmt of a flax checkout.")
_BATCH = flags.DEFINE_integer("batch", 64, "Rows of 64 tokens per step, both sides.")
_STEPS = flags.DEFINE_integer("timed_steps", 8, "Timed steps per run, after one compiling step.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Pairs of runs (the example first, then ours).")
_SIDE = flags.DEFINE_enum("side", None, ["flax", "zerolm"], "Run one side only (as a round does).")

SEQ_LEN = 64


def _import_flax_example(path: str):
  """The example's models and train modules. Its train.py imports clu, TensorFlow, its input
  pipeline, BLEU and decoding at module level; the step needs none of them, so those that do not
  import here are stood in for by empty modules."""
  sys.path.insert(0, path)
  import flax.training.checkpoints  # noqa: F401  (before the stand-ins: it probes for TensorFlow)

  names = ("clu", "clu.metric_writers", "clu.periodic_actions", "tensorflow")
  for name in (*names, "bleu", "decode", "input_pipeline"):
    try:
      importlib.import_module(name)
    except ImportError:
      module = types.ModuleType(name)
      module.__spec__ = importlib.machinery.ModuleSpec(name, None)
      sys.modules[name] = module
  tensorflow = sys.modules["tensorflow"]
  if not hasattr(tensorflow, "data"):  # only used in train.py's annotations
    tensorflow.data = types.SimpleNamespace(Dataset=object)
  clu = sys.modules["clu"]
  clu.metric_writers = sys.modules["clu.metric_writers"]
  clu.periodic_actions = sys.modules["clu.periodic_actions"]
  return importlib.import_module("models"), importlib.import_module("train")


def _packed_rows(rng, batch: int) -> dict:
  """Two examples per row (30 and 30 tokens) and 4 padding tokens, as the example names them."""
  import numpy as np

  rows = {}
  segments = np.where(np.arange(SEQ_LEN) < 30, 1, 2)
  segments[60:] = 0
  positions = np.where(segments == 1, np.arange(SEQ_LEN), np.arange(SEQ_LEN) - 30) * (segments > 0)
  for side in ("inputs", "targets"):
    rows[side] = rng.randint(4, 8000, size=(batch, SEQ_LEN)).astype(np.int32) * (segments > 0)
    rows[side + "_segmentation"] = np.tile(segments, (batch, 1)).astype(np.int32)
    rows[side + "_position"] = np.tile(positions, (batch, 1)).astype(np.int32)
  return rows


def flax_step_seconds(path: str, batch: int, steps: int) -> float:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import jax_utils
  from flax import linen as nn

  from experiments import speed

  models, train = _import_flax_example(path)
  m = speed.get_config().model
  cfg = models.TransformerConfig(
    vocab_size=m.vocab_size,
    output_vocab_size=m.vocab_size,
    share_embeddings=True,
    logits_via_embedding=True,
    dtype=jnp.float32,
    emb_dim=m.d_model,
    num_heads=m.num_heads,
    num_layers=m.enc_layers,
    qkv_dim=m.d_model,
    mlp_dim=m.mlp_dim,
    max_len=SEQ_LEN,
    dropout_rate=m.dropout_rate,
    attention_dropout_rate=m.dropout_rate,
    deterministic=False,
    decode=False,
    kernel_init=nn.initializers.xavier_uniform(),
    bias_init=nn.initializers.normal(stddev=1e-6),
  )
  model = models.Transformer(cfg.replace(deterministic=True))
  shape = jnp.ones((batch, SEQ_LEN), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), shape, shape)["params"]
  schedule = train.create_learning_rate_schedule(learning_rate=0.002, warmup_steps=1000)
  state = train.TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=optax.adamw(learning_rate=schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0),
    dynamic_scale=None,
  )
  state = jax_utils.replicate(state)
  step = jax.pmap(
    functools.partial(train.train_step, config=cfg, learning_rate_fn=schedule, label_smoothing=0.1),
    axis_name="batch",
    donate_argnums=(0,),
  )
  rng = np.random.RandomState(0)
  dropout = jax_utils.replicate(jax.random.key(1))
  times = []
  for _ in range(steps + 1):
    rows = jax.tree.map(lambda x: x[None], _packed_rows(rng, batch))  # one device's share
    start = time.perf_counter()
    state, metrics = step(state, rows, dropout_rng=dropout)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:])


def zerolm_step_seconds(batch: int, steps: int) -> float:
  from experiments import bench, speed

  cfg = speed.get_config()
  cfg.train.global_batch_size = batch
  return bench.bench_one(cfg, steps, peak=1.0)["step_seconds"]


def _run_side(side: str) -> float:
  command = [
    sys.executable,
    "-m",
    "experiments.compare_flax_wmt",
    f"--side={side}",
    f"--flax_wmt={_FLAX_WMT.value}",
    f"--batch={_BATCH.value}",
    f"--timed_steps={_STEPS.value}",
  ]
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"error: the {side} run failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])["step_seconds"]


def main(argv):
  del argv
  if not _FLAX_WMT.value or not os.path.isfile(os.path.join(_FLAX_WMT.value, "train.py")):
    print(
      f"error: --flax_wmt: {_FLAX_WMT.value!r} holds no train.py; give examples/wmt of a flax "
      "checkout",
      file=sys.stderr,
    )
    sys.exit(2)
  if _SIDE.value:
    seconds = (
      flax_step_seconds(_FLAX_WMT.value, _BATCH.value, _STEPS.value)
      if _SIDE.value == "flax"
      else zerolm_step_seconds(_BATCH.value, _STEPS.value)
    )
    print(json.dumps({"side": _SIDE.value, "step_seconds": seconds}))
    return
  print(f"batch {_BATCH.value} x {SEQ_LEN} tokens, both sides; median of {_STEPS.value} steps")
  print("round | flax wmt s | zerolm s | ratio")
  ratios = []
  for i in range(_ROUNDS.value):
    flax_s, ours_s = _run_side("flax"), _run_side("zerolm")
    ratios.append(ours_s / flax_s)
    print(f"{i + 1:5d} | {flax_s:10.3f} | {ours_s:8.3f} | {ratios[-1]:.2f}")
  print(f"ratio {min(ratios):.2f}-{max(ratios):.2f} (target: at most 0.6)")


if __name__ == "__main__":
  app.run(main)
