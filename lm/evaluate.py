"""Held-out loss, perplexity and token accuracy; sacreBLEU of decoded translations; examples."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
import sacrebleu

from lm import checkpoint
from lm.data import pipeline
from lm.decode import DecodeOptions, Decoder
from lm.state import Run


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
  """Corpus BLEU on detokenized text: sacreBLEU defaults (cased, 13a); score and signature."""
  metric = sacrebleu.metrics.BLEU()
  return metric.corpus_score(hypotheses, [references]).score, str(metric.get_signature())


class Evaluator:
  """One run's held-out evaluation. The loss step and the decoder are built once, so periodic
  evaluations reuse their compiled programs."""

  def __init__(self, run: Run, data: pipeline.Data, log=None):
    self.run, self.data, self.log = run, data, log
    self._loss_sums = jax.jit(lambda p, b: run.loss_sums(p, b, None))
    options = DecodeOptions.from_config(run.cfg.decode)
    self.decoder = Decoder(run, None, data.tokenizer, options, run.cfg.decode.batch_size)

  def teacher_forced(self, params: Any) -> dict:
    """Loss, perplexity and accuracy over every held-out row (last batch padded, none dropped)."""
    totals = np.zeros(3)
    with jax.set_mesh(self.run.mesh):
      for local in pipeline.eval_batches(self.data.eval, self.run.cfg.train.global_batch_size):
        loss, (tokens, correct) = self._loss_sums(params, self.run.shard_batch(local))
        totals += np.array([float(loss), float(tokens), float(correct)])
    loss = totals[0] / max(totals[1], 1.0)
    return {
      "eval_loss": loss,
      "eval_perplexity": math.exp(min(loss, 50.0)),
      "eval_accuracy": totals[2] / max(totals[1], 1.0),
    }

  def __call__(self, params: Any) -> dict:
    """Teacher-forced metrics, BLEU for translation (eval.bleu), and a few logged examples."""
    results = self.teacher_forced(params)
    cfg, log = self.run.cfg, self.log
    shown = cfg.eval.examples if log else 0
    self.decoder.params = params
    if cfg.task == "translation" and (cfg.eval.bleu or shown):
      pairs = self.data.eval_text if cfg.eval.bleu else self.data.eval_text[:shown]
      hypotheses = self.decoder([source for source, _ in pairs], warn=lambda _: None)
      if cfg.eval.bleu:
        results["bleu"], signature = bleu(hypotheses, [target for _, target in pairs])
        if log:
          log.info(f"sacreBLEU signature: {signature}")
      for (source, target), hypothesis in list(zip(pairs, hypotheses))[:shown]:
        log.info(f"source:     {source}\ntarget:     {target}\nprediction: {hypothesis}")
    elif shown:
      prompts = [" ".join(text.split()[:4]) for _, text in self.data.eval_text[:shown]]
      for prompt, continuation in zip(prompts, self.decoder(prompts, warn=lambda _: None)):
        log.info(f"prompt:       {prompt}\ncontinuation: {continuation}")
    return results


def evaluate_workdir(workdir: str, decode_cfg=None, log=None, export=None) -> dict:
  """--mode=eval: the latest checkpoint (or `export`) on its held-out set, with the tokenizer it
  was trained with; also written to WORKDIR/eval.json."""
  run, params, tokenizer, step = checkpoint.restore_for_inference(workdir, export)
  if decode_cfg is not None:
    run.cfg.decode = decode_cfg
  data = pipeline.load(run.cfg, workdir, log.info if log else print, tokenizer)
  data.close()  # the held-out rows are in memory; no training example is read
  results = {"step": step, **Evaluator(run, data, log)(params)}
  if jax.process_index() == 0:  # every process holds the same results
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
