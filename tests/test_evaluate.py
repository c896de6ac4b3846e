"""Evaluation: the plain negative log-likelihood (no smoothing), in training's microbatches."""

import math
import types

import jax
import numpy as np
import pytest

from lm import evaluate, inference
from lm.data.synthetic import random_batch
from lm.layout import Layout
from tests.helpers import tiny_config


def _evaluator(cfg):
  layout = Layout.build(cfg, devices=jax.devices()[:1])
  rows = {k: np.asarray(v) for k, v in random_batch(cfg, seed=5, padding=3).items()}
  data = types.SimpleNamespace(
    eval=rows, tokenizer=types.SimpleNamespace(vocab_size=64, pad_id=0, bos_id=2, eos_id=3)
  )
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


def test_eval_takes_the_eval_source_mesh_decode_and_batch_settings_it_is_given(
  trained_workdir, tmp_path
):
  """What --mode=eval --config=... --config.data.eval_source=... applies (experiments/run.py
  passes lm.config.inference_settings to evaluate_workdir)."""
  from experiments import demo
  from lm import checkpoint
  from lm import config as lmc
  from lm.data import pipeline

  cfg = demo.get_config("tiny")
  pairs = pipeline.load(
    inference.restore_latest(str(trained_workdir))[0].cfg, str(trained_workdir)
  ).eval_text[:5]
  source = tmp_path / "dev.tsv"
  source.write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
  cfg.data.eval_source = f"tsv:{source}"
  cfg.mesh.update(data=2, fsdp=4, tensor=1)
  cfg.decode.beam_size = 1
  cfg.train.update(global_batch_size=8, microbatches=2)
  cfg.eval.bleu = False
  overridden = {"data.eval_source", "train.global_batch_size", "train.microbatches"}
  settings = lmc.inference_settings(cfg, overridden, "eval")
  layout = inference.restore_latest(str(trained_workdir), settings=settings)[0]
  assert dict(layout.mesh.shape) == {"stage": 1, "data": 2, "fsdp": 4, "tensor": 1}
  assert layout.cfg.decode.beam_size == 1 and layout.cfg.data.eval_source == f"tsv:{source}"
  assert (
    layout.cfg.model.d_model == 64
    or layout.cfg.model == checkpoint.meta_config(inference.source_meta(str(trained_workdir))).model
  )  # the model stays the checkpoint's

  results = evaluate.evaluate_workdir(str(trained_workdir), settings=settings)
  everything = evaluate.evaluate_workdir(str(trained_workdir))
  assert results["eval_loss"] != everything["eval_loss"]  # 5 pairs, not the whole held-out set
  layout, params, tokenizer, _ = inference.restore_latest(str(trained_workdir), settings=settings)
  data = pipeline.load(layout.cfg, str(trained_workdir), tokenizer=tokenizer)
  assert len(data.eval_text) == 5
  expected = evaluate.Evaluator(layout, data).teacher_forced(params)
  np.testing.assert_allclose(results["eval_loss"], expected["eval_loss"], rtol=1e-6)
