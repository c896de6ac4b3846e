"""Gradient accumulation and the demo's learning curve."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import demo
from lm import metrics
from lm import train as lm_train
from lm.data import tokenizer as tok
from lm.data.synthetic import random_batch
from lm.parallel import report
from lm.train_step import Trainer
from tests.helpers import tiny_config


def _first_step_grads(microbatches):
  cfg = tiny_config(dropout_rate=0.0)
  cfg.train.microbatches = microbatches
  cfg.optim.update(name="sgd", learning_rate=1.0, clip_norm=0.0)
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  state = run.init_state()
  before = jax.device_get(state.params)
  with jax.set_mesh(run.layout.mesh):
    new_state, metrics = run.jit_train_step()(
      state, run.layout.shard_batch(random_batch(cfg, padding=3))
    )
  # SGD with lr 1: the update is exactly minus the gradient.
  return jax.tree.map(lambda a, b: a - b, before, jax.device_get(new_state.params)), metrics


def test_microbatches_give_the_same_gradients_as_one_batch():
  one, m1 = _first_step_grads(1)
  four, m4 = _first_step_grads(4)
  np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_demo_loss_falls_by_half_in_50_steps(tmp_path, capsys):
  cfg = demo.get_config("tiny")
  cfg.eval.update(bleu=False, examples=0)
  cfg.zero_stage = 3  # on every device (mesh.fsdp=-1): gathers and reductions to report
  results = lm_train.train(cfg, str(tmp_path))
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in lines if "loss" in r]
  assert losses[-1] <= 0.5 * losses[0], losses
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
    assert key in lines[0]
  # MFU: the model's FLOPs per step over the step time, against the peak the start-up line
  # names (this CPU has no published one: a measured matmul's).
  out = capsys.readouterr().out
  (source,) = [line for line in out.splitlines() if line.startswith("mfu: against ")]
  assert "no published peak for device kind 'cpu'" in source, source
  per_device = float(source.split("matmul, ")[1].split()[0]) * 1e9
  tokenizer = tok.Tokenizer.load(str(tmp_path / "tokenizer.model"))
  run = Trainer.build(cfg, tokenizer_size=tokenizer.vocab_size)
  flops = metrics.model_flops(cfg, run.layout.abstract_params)
  peak = per_device * run.layout.mesh.size
  for r in lines:
    if "mfu" in r:
      np.testing.assert_allclose(r["mfu"], flops / r["seconds_per_step"] / peak, rtol=1e-5)
  assert results["eval_accuracy"] > 0.3
  np.testing.assert_allclose(results["eval_perplexity"], np.exp(results["eval_loss"]), rtol=1e-6)
  assert (tmp_path / "config.json").exists() and any((tmp_path / "tb").iterdir())

  # The start-up communication lines are the compiled step's collectives, per device per step.
  logged = {
    line.split(":")[0]: float(line.split(": ")[1].split()[0])
    for line in out.splitlines()
    if line.split(":")[0] in report.COLLECTIVES
  }
  traffic = report.collective_traffic(
    run.compile_train_step().as_text(), dict(run.layout.mesh.shape)
  )
  expected = {k: round(t["bandwidth_bytes"] / 2**20, 2) for k, t in traffic.items() if t["count"]}
  assert logged == expected and {"all-gather", "all-reduce"} <= set(logged), logged


def _losses_on_one_batch(cfg, steps=15):
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  state, step = run.init_state(), run.compile_train_step()
  batch = run.layout.shard_batch(random_batch(cfg, padding=2, packed=cfg.data.pack))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_adafactor_trains():
  cfg = tiny_config()
  cfg.optim.update(name="adafactor", learning_rate=3e-2, weight_decay=0.0)
  _, losses = _losses_on_one_batch(cfg)
  assert losses[-1] < 0.6 * losses[0], losses


def test_bfloat16_parameters_train():
  cfg = tiny_config(param_dtype="bfloat16")
  state, losses = _losses_on_one_batch(cfg)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
  assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0], losses
