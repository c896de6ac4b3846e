"""Evaluation: the plain negative log-likelihood (no smoothing), in training's microbatches."""

import math
import types

import jax
import numpy as np
import pytest

from lm import evaluate
from lm.data.synthetic import random_batch
from lm.layout import Layout
from tests.helpers import tiny_config


def _evaluator(cfg):
  layout = Layout.build(cfg, devices=jax.devices()[:1])
  rows = {k: np.asarray(v) for k, v in random_batch(cfg, seed=5, padding=3).items()}
  data = types.SimpleNamespace(eval=rows, tokenizer=types.SimpleNamespace(vocab_size=64))
  return layout, evaluate.Evaluator(layout, data), rows


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_eval_loss_is_the_plain_nll_and_perplexity_its_exponential(task):
  cfg = tiny_config(task, label_smoothing=0.1)  # training smooths; evaluation must not
  layout, evaluator, rows = _evaluator(cfg)
  params = layout.init_params()
  results = evaluator.teacher_forced(params)

  logits = np.asarray(layout.logits(params, rows), np.float64)[..., : layout.vocab_limit]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = rows["targets"]
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0][targets > 0]
  np.testing.assert_allclose(results["eval_loss"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(results["eval_perplexity"], math.exp(nll.mean()), rtol=1e-5)


def test_evaluation_runs_in_the_training_microbatch_and_adds_up_to_the_whole_batch():
  whole = _evaluator(tiny_config("translation"))
  cfg = tiny_config("translation")
  cfg.train.microbatches = 4
  layout, evaluator, _ = _evaluator(cfg)
  shapes = []
  nll_sums = evaluator._nll_sums
  evaluator._nll_sums = lambda p, b: shapes.append(b["targets"].shape) or nll_sums(p, b)
  params = layout.init_params()
  results = evaluator.teacher_forced(params)
  assert shapes == [(2, cfg.data.seq_len)] * 4  # 8 rows in microbatches of 8 / 4
  expected = whole[1].teacher_forced(params)
  for key in ("eval_loss", "eval_accuracy"):
    np.testing.assert_allclose(results[key], expected[key], rtol=1e-6)
