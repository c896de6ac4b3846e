"""Held-out loss, perplexity and token accuracy; example translations."""

from __future__ import annotations

import math

import jax
import numpy as np

from lm.data import pipeline
from lm.decode import greedy_translate


def evaluate(run, params, data) -> dict:
  """Teacher-forced metrics over every held-out row (the last batch padded, nothing dropped)."""
  eval_step = jax.jit(lambda p, b: run.loss_sums(p, b, None))
  totals = np.zeros(3)
  batch = run.cfg.train.global_batch_size
  with jax.set_mesh(run.mesh):
    for local in pipeline.eval_batches(data.eval, batch):
      loss, (tokens, correct) = eval_step(params, run.shard_batch(local))
      totals += np.array([float(loss), float(tokens), float(correct)])
  loss = totals[0] / max(totals[1], 1.0)
  return {
    "eval_loss": loss,
    "eval_perplexity": math.exp(min(loss, 50.0)),
    "eval_accuracy": totals[2] / max(totals[1], 1.0),
  }


def show_examples(run, params, data, log, count: int = 4) -> None:
  if run.cfg.task != "translation":
    return
  rows = {k: v[:count] for k, v in data.eval.items()}
  with jax.set_mesh(run.mesh):
    decode = jax.jit(greedy_translate, static_argnums=(0, 3))
    predictions = np.asarray(decode(run.graphdef, params, rows["inputs"], run.cfg.data.seq_len))
  for (source, target), pred in zip(data.eval_text[:count], predictions):
    log.info(
      f"source:     {source}\ntarget:     {target}\nprediction: {data.tokenizer.decode(pred)}"
    )
