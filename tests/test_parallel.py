"""The core promise: every ZeRO stage on every mesh trains exactly like one device."""

import functools

import jax
import numpy as np
import pytest

from lm.data.synthetic import random_batch
from lm.train_step import Trainer
from tests.helpers import tiny_config

MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1)]
STEPS = 5


# The options imported architectures need, trained from scratch: a Llama-style LM (grouped-query
# attention whose 2 KV heads the tensor axis of 4 does not divide, so they stay replicated there,
# rotary with another theta, RMSNorm, SwiGLU, Qwen2's query/key/value biases, an untied head)
# and a Marian-style translation model (post-norm, SiLU, Marian's sinusoids, sqrt(d) embedding
# scale, a logits bias).
VARIANTS = {
  "llama": (
    "lm",
    dict(
      num_kv_heads=2,
      positions="rotary",
      rope_theta=500.0,
      norm="rmsnorm",
      norm_eps=1e-5,
      activation="swiglu",
      use_bias=False,
      qkv_bias=True,
      tie_embeddings=False,
      start_id=1,
    ),
  ),
  "marian": (
    "translation",
    dict(
      norm_position="post",
      activation="silu",
      sinusoid="marian",
      embed_scale="sqrt_d",
      logits_bias=True,
      norm_eps=1e-5,
      start_id=63,
    ),
  ),
}


def _config(task, mesh=(1, 1, 1), stage=0, microbatches=1):
  task, model = VARIANTS.get(task, (task, {}))
  cfg = tiny_config(task, **model)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  cfg.zero_stage = stage
  cfg.train.update(global_batch_size=32, microbatches=microbatches)
  cfg.data.pack = False  # the batches below are plain rows
  # eps 1e-6: with eps near 0, Adam divides rounding noise on near-zero gradients by its own
  # magnitude and turns it into lr-sized updates, which no reduction order can reproduce.
  cfg.optim.update(name="adamw", learning_rate=1e-3, eps=1e-6, weight_decay=0.1, clip_norm=1.0)
  return cfg


def _batches(cfg):
  return (random_batch(cfg, seed=step, padding=2) for step in range(STEPS))


def train_steps(cfg):
  n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
  run = Trainer.build(cfg, devices=jax.devices()[:n])
  state = run.init_state()
  step = run.compile_train_step()
  losses = []
  for batch in _batches(cfg):
    state, metrics = step(state, run.layout.shard_batch(batch))
    losses.append(float(metrics["loss"]))
  return run, state, losses


@functools.cache
def reference(task):
  _, state, losses = train_steps(_config(task))
  return jax.tree.map(lambda x: np.array(x, copy=True), state.params), losses


def assert_matches_reference(task, state, losses):
  ref_params, ref_losses = reference(task)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # Relative to each tensor's scale, plus 0.5% of one Adam step (lr 1e-3): Adam normalizes
  # rounding noise on near-zero gradients into small updates that differ with reduction order.
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_params)):
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 5e-6, np.abs(a - b).max()


# With fsdp = 1 every stage lays state out as stage 0 (checked below), so (8, 1, 1) runs once.
# Each mesh runs one microbatch count, both counts covered, to bound the suite's time: 4 (the
# accumulation scan) on the meshes that shard most, 1 on the others.
MICROBATCHES = {(1, 8, 1): 4, (2, 4, 1): 1, (2, 2, 2): 4, (1, 2, 4): 4, (8, 1, 1): 1}
CASES = [
  (mesh, stage, MICROBATCHES[mesh])
  for mesh in MESHES
  for stage in range(4)
  if mesh[1] > 1 or stage == 0
  # tensor=4 changes what tensor parallelism splits, not what ZeRO does: its stages 1 and 2
  # (optimizer state, gradients over fsdp) run on the other fsdp meshes (the suite's time).
  if not (mesh == (1, 2, 4) and stage in (1, 2))
]


# The LM is the translation model's decoder stack without cross-attention, under the same
# sharding rules: it runs stages 0 and 3 on the mesh that uses all three axes, plus ZeRO-3 on
# the widest fsdp, rather than the whole matrix again (the suite's time).
LM_CASES = [c for c in CASES if c[0] == (2, 2, 2) and c[1] in (0, 3)] + [
  ((1, 8, 1), 3, MICROBATCHES[(1, 8, 1)])
]


# The imported architectures' options: stages 0 and 3 on (2, 2, 2), ZeRO-3 on the widest fsdp,
# and tensor=4 (the Llama-style model's KV heads replicated) at stage 3.
VARIANT_CASES = LM_CASES + [((1, 2, 4), 3, MICROBATCHES[(1, 2, 4)])]


@pytest.mark.parametrize(
  "task,mesh,stage,microbatches",
  [("translation", *c) for c in CASES]
  + [("lm", *c) for c in LM_CASES]
  + [(variant, *c) for variant in VARIANTS for c in VARIANT_CASES],
  ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c),
)
def test_zero_stage_matches_single_device(task, stage, mesh, microbatches):
  # One reference for both: accumulating over microbatches changes nothing but rounding.
  _, state, losses = train_steps(_config(task, mesh, stage, microbatches))
  assert_matches_reference(task, state, losses)


def test_without_fsdp_every_stage_has_stage_0_layout():
  layouts = []
  for stage in range(4):
    run = Trainer.build(_config("translation", (8, 1, 1), stage), devices=jax.devices())
    layouts.append(jax.tree.map(lambda s: s.spec, run.state_shardings))
    assert not run.layout.dims.params_sharded
  assert all(layout == layouts[0] for layout in layouts[1:])
