"""Held-out loss, perplexity and token accuracy; sacreBLEU of decoded translations; examples."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import sacrebleu

from lm.data import pipeline
from lm.decode import DecodeOptions, Decoder


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
  """Corpus BLEU on detokenized text: sacreBLEU defaults (cased, 13a); score and signature."""
  metric = sacrebleu.metrics.BLEU()
  return metric.corpus_score(hypotheses, [references]).score, str(metric.get_signature())


def teacher_forced(run, params, data) -> dict:
  """Loss, perplexity and accuracy over every held-out row (last batch padded, none dropped)."""
  eval_step = jax.jit(lambda p, b: run.loss_sums(p, b, None))
  totals = np.zeros(3)
  with jax.set_mesh(run.mesh):
    for local in pipeline.eval_batches(data.eval, run.cfg.train.global_batch_size):
      loss, (tokens, correct) = eval_step(params, run.shard_batch(local))
      totals += np.array([float(loss), float(tokens), float(correct)])
  loss = totals[0] / max(totals[1], 1.0)
  return {
    "eval_loss": loss,
    "eval_perplexity": math.exp(min(loss, 50.0)),
    "eval_accuracy": totals[2] / max(totals[1], 1.0),
  }


def evaluate(run, params, data, log=None) -> dict:
  """Teacher-forced metrics, BLEU for translation (eval.bleu), and a few logged examples."""
  results = teacher_forced(run, params, data)
  cfg = run.cfg
  shown = cfg.eval.examples if log else 0
  decoder = Decoder(
    run, params, data.tokenizer, DecodeOptions.from_config(cfg.decode), cfg.decode.batch_size
  )
  if cfg.task == "translation" and (cfg.eval.bleu or shown):
    pairs = data.eval_text if cfg.eval.bleu else data.eval_text[:shown]
    hypotheses = decoder([source for source, _ in pairs], warn=lambda _: None)
    if cfg.eval.bleu:
      results["bleu"], signature = bleu(hypotheses, [target for _, target in pairs])
      if log:
        log.info(f"sacreBLEU signature: {signature}")
    for (source, target), hypothesis in list(zip(pairs, hypotheses))[:shown]:
      log.info(f"source:     {source}\ntarget:     {target}\nprediction: {hypothesis}")
  elif shown:
    prompts = [" ".join(text.split()[:4]) for _, text in data.eval_text[:shown]]
    for prompt, continuation in zip(prompts, decoder(prompts, warn=lambda _: None)):
      log.info(f"prompt:       {prompt}\ncontinuation: {continuation}")
  return results


def evaluate_workdir(workdir: str, decode_cfg=None, log=None) -> dict:
  """--mode=eval: the latest checkpoint on its held-out set; also written to WORKDIR/eval.json."""
  from lm.train import restore_latest  # noqa: PLC0415

  run, params, _, step = restore_latest(workdir)
  if decode_cfg is not None:
    run.cfg.decode = decode_cfg
  data = pipeline.load(run.cfg, workdir, log.info if log else print)
  results = {"step": step, **evaluate(run, params, data, log)}
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results
