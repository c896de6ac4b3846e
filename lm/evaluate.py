"""Held-out loss, perplexity and token accuracy; sacreBLEU of decoded translations; examples.

A multi-pair model (lm/data/multilingual.py) reports each metric per pair as METRIC/PAIR
(bleu/en-de, eval_loss/en-de) and, under the plain name, their mean over the pairs.

The loss here is the plain negative log-likelihood per target token (no label smoothing, no
dropout), so that eval_perplexity = exp(eval_loss); the training loss may be smoothed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import numpy as np
import sacrebleu

from lm import inference, objective, paths
from lm.classify import HeldOutClasses
from lm.data import pipeline
from lm.decode import DecodeOptions, Decoder
from lm.layout import Layout


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
  """Corpus BLEU on detokenized text: sacreBLEU defaults (cased, 13a); score and signature."""
  metric = sacrebleu.metrics.BLEU()
  return metric.corpus_score(hypotheses, [references]).score, str(metric.get_signature())


class Interrupted(Exception):
  """A stop signal arrived during an evaluation: its results are incomplete."""


class Evaluator:
  """One run's held-out evaluation. The loss step and the decoder are built once, so periodic
  evaluations reuse their compiled programs."""

  def __init__(self, layout: Layout, data: pipeline.Data, log=None, stopping=None):
    """`stopping()`: True once the run must stop; checked between batches (Interrupted)."""
    self.layout, self.data, self.log = layout, data, log
    self.stopping = stopping or (lambda: False)
    self._nll_sums = jax.jit(lambda p, b: objective.nll_sums(layout, p, b))
    # Rows per evaluation batch: training's microbatch, so that evaluation's peak memory is
    # never above training's; rounded up to fill every batch shard (padding rows count nothing).
    train, shards = layout.cfg.train, layout.batch_multiple
    self.rows = -(-train.global_batch_size // train.microbatches // shards) * shards
    self.classes, self.decoder = None, None
    if layout.cfg.task == "classify":  # its confusion matrix and scores, instead of decoding
      self.classes = HeldOutClasses(layout, data, self.rows)
      return
    options = DecodeOptions.from_config(layout.cfg.decode)
    self.decoder = Decoder(layout, None, data.tokenizer, options, layout.cfg.decode.batch_size)

  def teacher_forced(self, params: Any, arrays: dict[str, np.ndarray] | None = None) -> dict:
    """NLL, perplexity and accuracy over every held-out row (last batch padded, none dropped);
    `arrays`: some of the rows (one pair's) instead of all."""
    totals = np.zeros(3)
    with jax.set_mesh(self.layout.mesh):
      for local in pipeline.eval_batches(self.data.eval if arrays is None else arrays, self.rows):
        self._check_stop()
        loss, (tokens, correct) = self._nll_sums(params, self.layout.shard_batch(local))
        totals += np.array([float(loss), float(tokens), float(correct)])
    loss = totals[0] / max(totals[1], 1.0)
    return {
      "eval_loss": loss,
      "eval_perplexity": math.exp(min(loss, 50.0)),
      "eval_accuracy": totals[2] / max(totals[1], 1.0),
    }

  def _check_stop(self, *progress) -> None:
    if self.stopping():
      raise Interrupted("evaluation interrupted by a stop signal")

  def __call__(self, params: Any) -> dict:
    """Teacher-forced metrics, BLEU for translation (eval.bleu), and a few logged examples."""
    if self.data.eval_pairs:
      results = per_pair_means(
        self._pair_rows(), lambda rows: self._teacher_forced_rows(params, rows)
      )
    else:
      results = self.teacher_forced(params)
    cfg, log = self.layout.cfg, self.log
    if self.classes:
      del results["eval_perplexity"]  # of one label: no use
      results.update(self.classes(params, self._check_stop, log))
      return results
    shown = cfg.eval.examples if log else 0
    try:
      self._decode(params, results, shown)
    finally:
      # With pipeline stages the decoder holds its own copy of the parameters (a layout
      # without stages): not kept between evaluations.
      self.decoder.params = None
    return results

  def _decode(self, params: Any, results: dict, shown: int) -> None:
    """BLEU into `results` (translation, eval.bleu) and `shown` logged examples."""
    cfg, log = self.layout.cfg, self.log
    translating = cfg.task == "translation" and (cfg.eval.bleu or shown)
    if not (translating or shown):
      return
    self.decoder.params = params
    if translating:
      pairs = self.data.eval_text if cfg.eval.bleu else self.data.eval_text[:shown]
      hypotheses = self.decoder(
        [source for source, _ in pairs], warn=lambda _: None, progress=self._check_stop
      )
      if cfg.eval.bleu:
        references = [target for _, target in pairs]
        if self.data.eval_pairs:
          results |= per_pair_means(
            self._pair_rows(),
            lambda rows: {"bleu": self._pair_bleu(hypotheses, references, rows)},
          )
          signature = bleu(hypotheses[:1], references[:1])[1]  # the same for every pair
        else:
          results["bleu"], signature = bleu(hypotheses, references)
        if log:
          log.info(f"sacreBLEU signature: {signature}")
      for (source, target), hypothesis in list(zip(pairs, hypotheses))[:shown]:
        log.info(f"source:     {source}\ntarget:     {target}\nprediction: {hypothesis}")
    elif shown:
      prompts = [" ".join(text.split()[:4]) for _, text in self.data.eval_text[:shown]]
      for prompt, continuation in zip(prompts, self.decoder(prompts, warn=lambda _: None)):
        log.info(f"prompt:       {prompt}\ncontinuation: {continuation}")

  def _pair_rows(self) -> dict[str, np.ndarray]:
    names = np.array(self.data.eval_pairs)
    return {name: np.flatnonzero(names == name) for name in dict.fromkeys(self.data.eval_pairs)}

  def _teacher_forced_rows(self, params: Any, rows: np.ndarray) -> dict:
    return self.teacher_forced(params, {k: v[rows] for k, v in self.data.eval.items()})

  @staticmethod
  def _pair_bleu(hypotheses: list[str], references: list[str], rows: np.ndarray) -> float:
    return bleu([hypotheses[r] for r in rows], [references[r] for r in rows])[0]


def per_pair_means(pair_rows: dict[str, np.ndarray], metrics_of) -> dict:
  """METRIC/PAIR for each pair's metrics (`metrics_of(rows)`), and under METRIC their mean
  (eval_perplexity: exp of the mean eval_loss, as for one pair)."""
  results, per_pair = {}, [metrics_of(rows) for rows in pair_rows.values()]
  for name, values in zip(pair_rows, per_pair):
    results.update({f"{key}/{name}": value for key, value in values.items()})
  for key in per_pair[0]:
    results[key] = float(np.mean([values[key] for values in per_pair]))
  if "eval_loss" in per_pair[0]:
    results["eval_perplexity"] = math.exp(min(results["eval_loss"], 50.0))
  return results


def evaluate_workdir(workdir: str, log=None, export=None, settings: dict | None = None) -> dict:
  """--mode=eval: the latest checkpoint (or `export`) on its held-out set, with the tokenizer it
  was trained with; also written to WORKDIR/eval.json. `settings`: the fields --config sets
  (lm.config.inference_settings)."""
  layout, params, tokenizer, step = inference.restore_for_inference(
    workdir, export, settings=settings
  )
  data = pipeline.load(layout.cfg, workdir, log.info if log else print, tokenizer)
  data.close()  # the held-out rows are in memory; no training example is read
  results = {"step": step, **Evaluator(layout, data, log)(params)}
  if jax.process_index() == 0:  # every process holds the same results
    root = paths.resolve(workdir)
    root.mkdir(parents=True, exist_ok=True)  # a new workdir, for an --export evaluated
    (root / "eval.json").write_text(json.dumps(results, indent=2))
  return results
