"""Gradient accumulation and the demo's learning curve."""

import json

import jax
import numpy as np

from experiments import demo
from lm import train as lm_train
from lm.state import Run
from tests.helpers import tiny_config


def _batch(cfg, seed=0):
  rng = np.random.RandomState(seed)
  shape = (cfg.train.global_batch_size, cfg.data.seq_len)
  tokens = rng.randint(4, cfg.model.vocab_size, size=shape).astype(np.int32)
  tokens[:, -3:] = 0  # some padding, so that microbatches differ in token count
  tokens[0, 5:] = 0
  return {"inputs": tokens[:, ::-1].copy(), "targets": tokens}


def _first_step_grads(microbatches):
  cfg = tiny_config(dropout_rate=0.0)
  cfg.train.microbatches = microbatches
  cfg.optim.update(name="sgd", learning_rate=1.0, clip_norm=0.0)
  run = Run.build(cfg, devices=jax.devices()[:1])
  state = run.init_state()
  before = jax.device_get(state.params)
  with jax.set_mesh(run.mesh):
    new_state, metrics = run.jit_train_step()(state, run.shard_batch(_batch(cfg)))
  # SGD with lr 1: the update is exactly minus the gradient.
  return jax.tree.map(lambda a, b: a - b, before, jax.device_get(new_state.params)), metrics


def test_microbatches_give_the_same_gradients_as_one_batch():
  one, m1 = _first_step_grads(1)
  four, m4 = _first_step_grads(4)
  np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_demo_loss_falls_by_half_in_50_steps(tmp_path):
  cfg = demo.get_config("tiny")
  results = lm_train.train(cfg, str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in lines if "loss" in r]
  assert losses[-1] <= 0.5 * losses[0], losses
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second"):
    assert key in lines[0]
  assert results["eval_accuracy"] > 0.3
  assert (tmp_path / "config.json").exists() and any((tmp_path / "tb").iterdir())
