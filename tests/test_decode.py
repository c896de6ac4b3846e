"""Decoding: KV cache against the full forward pass, beam search against exhaustive search,
sampling, BLEU, sharded decoding, and the eval / decode modes of the runner."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
import scipy.stats
from flax import nnx

from experiments import demo
from lm import decode, evaluate, metrics
from lm import train as lm_train
from lm.data import synthetic
from lm.data.tokenizer import BOS_ID, EOS_ID
from lm.layout import Layout
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(task, devices=1, **model):
  cfg = tiny_config(task, **model)
  run = Layout.build(cfg, devices=jax.devices()[:devices])
  return run, nnx.merge(run.graphdef, run.init_params())


def _tokens(seed, shape, low=4, high=60):
  return jnp.asarray(np.random.RandomState(seed).randint(low, high, size=shape), jnp.int32)


def _full(inputs):
  """Every row's length: the whole width (no padding)."""
  return jnp.full((inputs.shape[0],), inputs.shape[1])


@pytest.mark.parametrize(
  "task,positions", [("translation", "sinusoidal"), ("lm", "rotary"), ("lm", "learned")]
)
@pytest.mark.parametrize("chunk", [0, 3])  # model.attention_chunk: 3 splits the forward's 9
def test_cached_decoding_matches_the_full_forward_pass(task, positions, chunk):
  """Decode steps (and an LM's prefill) give the forward pass's logits, with grouped-query
  attention, whole or query-chunked."""
  run, model = _model(task, positions=positions, num_kv_heads=2, attention_chunk=chunk)
  targets = _tokens(1, (2, 9))
  if task == "translation":
    inputs = _tokens(2, (2, 7)).at[1, 5:].set(0)  # padded source
    lengths = jnp.asarray([7, 5])
    segments = (jnp.arange(7)[None] < lengths[:, None]).astype(jnp.int32)
    full = model({"inputs": inputs, "inputs_segment_ids": segments, "targets": targets})
    cache = model.init_cache(inputs, lengths, 9)
  else:
    full = model({"targets": targets})
    starts = jnp.concatenate([jnp.full((2, 1), BOS_ID), targets[:, :5]], axis=1)
    first, _ = model.prefill(starts, jnp.asarray([6, 4]))  # row 1 padded after 4 inputs
    np.testing.assert_allclose(first, full[jnp.arange(2), jnp.asarray([5, 3])], atol=2e-5)
    cache = model.init_cache(2, 9)
  previous = jnp.full((2,), BOS_ID, jnp.int32)
  for t in range(9):
    logits, cache = model.decode_step(previous, t, cache)
    np.testing.assert_allclose(logits, full[:, t], atol=2e-5, rtol=1e-5)
    previous = targets[:, t]


def _sequence_log_probs(model, inputs, sequences, vocab_limit):
  """log P(sequence | input) by teacher forcing, with the decoder's forbidden ids masked."""
  length = max(len(s) for s in sequences)
  targets = jnp.asarray([s + [0] * (length - len(s)) for s in sequences], jnp.int32)
  rows = jnp.repeat(inputs[None], len(sequences), axis=0)
  logp = jax.nn.log_softmax(
    decode._forbid(model({"inputs": rows, "targets": targets}), vocab_limit, decode.Specials())
  )
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  lengths = jnp.asarray([len(s) for s in sequences])
  return np.asarray((picked * (jnp.arange(length)[None] < lengths[:, None])).sum(-1))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_finds_the_exhaustive_best(alpha):
  run, model = _model("translation")
  vocab_limit, max_len = 8, 3
  words = [t for t in range(1, vocab_limit) if t not in (BOS_ID, EOS_ID)]
  inputs = _tokens(3, (2, 6))
  found, found_score = decode.beam_search(
    model, model.init_cache(inputs, _full(inputs), max_len), 2, 32, max_len, vocab_limit, alpha
  )
  for row in range(2):
    candidates = [
      list(p) + [EOS_ID] for n in range(max_len) for p in itertools.product(words, repeat=n)
    ]
    candidates += [list(p) for p in itertools.product(words, repeat=max_len)]  # no EOS: kept whole
    log_probs = _sequence_log_probs(model, inputs[row], candidates, vocab_limit)
    scores = [lp / decode.length_penalty(len(c), alpha) for lp, c in zip(log_probs, candidates)]
    best = int(np.argmax(scores))
    expected = candidates[best] + [EOS_ID] * (max_len - len(candidates[best]))  # EOS fills
    assert np.asarray(found[row]).tolist() == expected
    np.testing.assert_allclose(float(found_score[row]), scores[best], rtol=1e-5)


def test_beam_search_takes_a_length_penalty_per_row():
  run, model = _model("translation")
  inputs = _tokens(3, (2, 6))
  cache = model.init_cache(inputs, _full(inputs), 3)
  low, low_score = decode.beam_search(model, cache, 2, 32, 3, 8, 0.0)
  high, high_score = decode.beam_search(model, cache, 2, 32, 3, 8, 2.0)
  mixed, mixed_score = decode.beam_search(model, cache, 2, 32, 3, 8, jnp.asarray([0.0, 2.0]))
  np.testing.assert_array_equal(mixed, jnp.stack([low[0], high[1]]))
  np.testing.assert_allclose(mixed_score, jnp.stack([low_score[0], high_score[1]]), rtol=1e-6)
  assert not np.allclose(low_score, high_score)  # each row's own penalty reached its scores


@pytest.mark.parametrize("beam", [1, 3])
def test_any_of_several_end_ids_ends_a_row(beam):
  """A model may list several end ids (Llama 3's instruct models): each ends a row, and EOS
  fills the rest."""
  run, model = _model("translation")
  inputs = _tokens(4, (3, 6))
  cache = lambda: model.init_cache(inputs, _full(inputs), 8)
  plain = decode.Specials()
  if beam == 1:
    free = decode.greedy(model, cache(), 3, 8, 60, specials=plain)
  else:
    free = decode.beam_search(model, cache(), 3, beam, 8, 60, 0.0, specials=plain)[0]
  # A row's token at position p >= 1 before any EOS, now an end too.
  r, p = next(
    (r, p)
    for p in (2, 1)
    for r in range(3)
    if EOS_ID not in np.asarray(free[r, : p + 2]).tolist()  # the free row goes on past p
  )
  extra = int(free[r, p])
  ends = dataclasses.replace(plain, stops=(EOS_ID, extra))
  if beam == 1:
    out = decode.greedy(model, cache(), 3, 8, 60, specials=ends)
  else:
    out = decode.beam_search(model, cache(), 3, beam, 8, 60, 0.0, specials=ends)[0]
  row = np.asarray(out[r]).tolist()
  stop = row.index(extra)
  assert stop <= p and all(t == EOS_ID for t in row[stop + 1 :])
  assert decode.until_end(row, ends.stops) == row[:stop]
  assert len(decode.until_end(free[r], EOS_ID)) > stop + 1  # without the second end it went on
  assert (np.asarray(out[r]) != np.asarray(free[r])).any()


def test_beam_one_and_top_k_one_equal_greedy():
  run, model = _model("translation")
  inputs = _tokens(4, (3, 6))
  greedy = decode.greedy(model, model.init_cache(inputs, _full(inputs), 8), 3, 8, 60)
  beam1, _ = decode.beam_search(model, model.init_cache(inputs, _full(inputs), 8), 3, 1, 8, 60, 0.0)
  np.testing.assert_array_equal(beam1, greedy)
  lm_run, lm = _model("lm")
  lm_greedy = decode.greedy(lm, lm.init_cache(3, 8), 3, 8, 60)
  sampled = decode.sample(lm, lm.init_cache(3, 8), 3, 8, 60, jnp.arange(3), top_k=1)
  np.testing.assert_array_equal(sampled, lm_greedy)


def test_sampled_frequencies_match_the_softmax():
  run, model = _model("lm")
  draws, vocab_limit = 20_000, 12
  seeds = jnp.arange(draws)  # one draw from each row's own stream
  first = decode.sample(model, model.init_cache(draws, 1), draws, 1, vocab_limit, seeds)
  logits, _ = model.decode_step(jnp.full((1,), BOS_ID, jnp.int32), 0, model.init_cache(1, 1))
  probs = np.asarray(
    jax.nn.softmax(decode._forbid(logits[0], vocab_limit, decode.Specials())), np.float64
  )
  allowed = np.flatnonzero(probs > 1e-12)
  counts = np.bincount(np.asarray(first[:, 0]), minlength=len(probs))
  assert counts[probs <= 1e-12].sum() == 0  # PAD, BOS and padded ids never drawn
  expected = probs[allowed] / probs[allowed].sum() * draws
  assert scipy.stats.chisquare(counts[allowed], expected).pvalue > 1e-3


def test_top_p_keeps_the_smallest_set_with_the_mass():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = decode.filter_logits(logits, top_p=0.75) > decode.NEG_INF / 2
  assert np.asarray(kept).tolist() == [[True, True, False, False]]
  kept = decode.filter_logits(logits, top_k=3) > decode.NEG_INF / 2
  assert np.asarray(kept).tolist() == [[True, True, True, False]]


def test_per_row_filter_settings_equal_each_row_filtered_alone():
  logits = jax.random.normal(jax.random.key(0), (5, 10))
  settings = [(1.0, 0, 1.0), (0.5, 3, 1.0), (2.0, 0, 0.6), (0.7, 4, 0.5), (1.0, 20, 0.9)]
  temperature, top_k, top_p = (jnp.asarray(column) for column in zip(*settings))
  together = decode.filter_logits(logits, temperature, top_k, top_p)
  for r, (t, k, p) in enumerate(settings):
    np.testing.assert_array_equal(together[r], decode.filter_logits(logits[r : r + 1], t, k, p)[0])
  kept = np.asarray(together > decode.NEG_INF / 2).sum(-1)
  assert kept[0] == 10 and kept[1] == 3 and kept[3] <= 4  # top_k 0 keeps all, 20 > vocab too
  assert kept[4] < 10


def _row_settings_case(task):
  """A decoder and per-row settings for `task`: LM sampling (temperature 0 = greedy) or beam
  search's length penalty."""
  run = Layout.build(tiny_config(task), devices=jax.devices()[:1])
  params = run.init_params()
  if task == "lm":
    options = decode.DecodeOptions(max_len=12)
    rows = [[5, 9], [11, 12, 13], [7], [8, 8]]
    first = dict(
      temperatures=[0.0, 1.0, 0.7, 1.3], top_ks=[0, 5, 0, 2], top_ps=[1.0, 1.0, 0.8, 0.9]
    )
    other = dict(
      temperatures=[1.5, 0.0, 2.0, 0.4], top_ks=[3, 0, 1, 0], top_ps=[0.5, 1.0, 1.0, 0.7]
    )
  else:
    options = decode.DecodeOptions(beam_size=3, max_len=12, max_len_a=1.0, max_len_b=4)
    rows = [[7, 9, EOS_ID], [11, 12, 13, EOS_ID], [8, EOS_ID], [20, 21, EOS_ID]]
    first, other = dict(alphas=[0.0, 0.6, 2.0, 1.0]), dict(alphas=[1.5, 0.1, 0.0, 0.3])
  decoder = decode.Decoder(run, params, _Ids(), options, 4, row_buckets=True)
  return run, params, decoder, rows, first, other


@pytest.mark.parametrize("task", ["lm", "translation"])
def test_rows_with_different_settings_share_a_program_and_decode_as_alone(task):
  run, params, decoder, rows, first, other = _row_settings_case(task)
  seeds = [1, 2, 3, 4]
  together = decoder.decode_ids(rows, seeds=seeds, **first)
  for r in range(len(rows)):
    alone = decoder.decode_ids([rows[r]], seeds=[seeds[r]], **{k: [v[r]] for k, v in first.items()})
    np.testing.assert_array_equal(alone[0], together[r])
  with metrics.counting_compiles() as compiles:
    again = decoder.decode_ids(rows, seeds=seeds, **other)
  assert compiles == []  # other settings, the same program
  if task == "lm":  # the settings reach the sampler; temperature 0 is greedy among sampled rows
    assert (again != together).any()
    model = nnx.merge(run.graphdef, params)
    prompt = jnp.zeros((1, 12), jnp.int32).at[0, :2].set(jnp.asarray(rows[0]))
    greedy = decode.greedy(
      model, model.init_cache(1, 12), 1, 12, 60, prompt=prompt, prompt_lengths=jnp.asarray([2])
    )
    np.testing.assert_array_equal(together[0], greedy[0])


class _Numbers:
  """Token ids written as numbers: "5 9" <-> [5, 9]."""

  vocab_size = 60
  pad_id, bos_id, eos_id = 0, BOS_ID, EOS_ID

  def encode(self, text, side="targets"):
    return [int(word) for word in text.split()]

  def decode(self, ids):
    ids = list(ids)
    ids = ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids
    return " ".join(str(i) for i in ids if i > EOS_ID)


def test_a_long_lm_prompt_is_truncated_to_leave_room_to_generate():
  """decode.max_len (the decode width, 12) below data.seq_len (32): the width bounds prompts."""
  cfg = tiny_config("lm")
  cfg.data.seq_len = 32
  run = Layout.build(cfg, devices=jax.devices()[:1])
  options = decode.DecodeOptions(max_len=12)
  decoder = decode.Decoder(run, run.init_params(), _Numbers(), options, 4)
  warnings = []
  short, long = decoder(["5 6", " ".join(["7"] * 20)], warn=warnings.append)
  assert len(warnings) == 1 and "input of 20 tokens truncated to 11" in warnings[0]
  assert len(long.split()) <= 1 and len(short.split()) <= 10
  assert (decoder.max_input_tokens, decoder.max_output_tokens) == (11, 11)
  with pytest.raises(ValueError, match="row 1 has 12 tokens; an input has at most 11"):
    decoder.decode_ids([[5], [7] * 12])


def test_bleu_equals_sacrebleu():
  hyps = ["The cat sat on the mat.", "A quick brown fox jumps.", "Hello there"]
  refs = ["The cat is on the mat.", "The quick brown fox jumps.", "Hello there!"]
  score, signature = evaluate.bleu(hyps, refs)
  assert score == sacrebleu.corpus_bleu(hyps, [refs]).score
  assert "case:mixed" in signature and "tok:13a" in signature


@pytest.mark.parametrize("beam", [1, 4])
def test_sharded_zero3_decoding_equals_one_device(beam):
  outputs = []
  for mesh, stage, devices in [((1, 1, 1), 0, 1), ((2, 2, 2), 3, 8)]:
    cfg = tiny_config("translation")
    cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    cfg.zero_stage = stage
    run = Layout.build(cfg, devices=jax.devices()[:devices])
    options = decode.DecodeOptions(beam_size=beam, max_len=10)
    decoder = decode.Decoder(run, run.init_params(), _Ids(), options, batch_size=8)
    sources = np.asarray(_tokens(7, (6, 10)))
    outputs.append(decoder.decode_ids([list(row) + [EOS_ID] for row in sources[:, :5]]))
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert outputs[0].shape[0] == 6


class _Ids:  # token ids in, ids out: no tokenizer needed
  vocab_size = 60
  pad_id, bos_id, eos_id = 0, BOS_ID, EOS_ID


def test_a_sampled_row_depends_on_neither_its_neighbours_nor_its_place():
  """Row buckets pad a batch to 1, 2, 4 or 8 rows; each row samples from its own seed."""
  run = Layout.build(tiny_config("lm"), devices=jax.devices()[:1])
  options = decode.DecodeOptions(temperature=1.0, max_len=12)
  decoder = decode.Decoder(run, run.init_params(), _Ids(), options, 8, row_buckets=True)
  assert decoder.row_counts == (1, 2, 4, 8)
  a, b, c = [5, 9], [11, 12, 13], [7]
  alone = decoder.decode_ids([a], seeds=[3])
  among = decoder.decode_ids([b, c, a], seeds=[4, 5, 3])
  np.testing.assert_array_equal(alone[0], among[2])
  assert (among[0] != among[2]).any()  # other seeds, other draws


@pytest.mark.parametrize("beam", [1, 3])
def test_each_translation_stops_at_its_own_length_limit(beam):
  cfg = tiny_config("translation")
  run = Layout.build(cfg, devices=jax.devices()[:1])
  options = decode.DecodeOptions(beam_size=beam, max_len=40, max_len_a=1.0, max_len_b=1)
  decoder = decode.Decoder(run, run.init_params(), _Ids(), options, batch_size=4)
  sources = [[7] * n + [EOS_ID] for n in (2, 5, 9)]
  out = decoder.decode_ids(sources)
  # The batch is padded to its source bucket (16 = seq_len, for a longest source of 10 tokens)
  # and compiled for that bucket's limit, 1.0 * 16 + 1; each row stops at its own limit.
  assert decoder.buckets == (8, 16) and out.shape[1] == 17
  lengths = np.asarray([len(decode.until_end(row, EOS_ID)) for row in out])
  # An untrained model rarely says EOS: rows end at their limits (or earlier with EOS).
  assert all(n <= len(s) + 1 for n, s in zip(lengths, sources))
  assert (out[0, len(sources[0]) + 1 :] == EOS_ID).all()  # EOS fills a row after its end
  assert lengths.max() > len(sources[0]) + 1


def _run_cli(*args, stdin=None):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run(
    [sys.executable, "-m", "experiments.run", *args],
    cwd=ROOT,
    env=env,
    input=stdin,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_decode_mode_keeps_every_line_in_order(trained_workdir, tmp_path):
  sentences = synthetic.DemoSource(100, 123)
  lines = [sentences[i][0] for i in range(100)]
  for i in range(0, 100, 17):
    lines[i] = ""
  lines[5] = " ".join([lines[6]] * 20)  # far longer than data.seq_len
  (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
  result = _run_cli(
    "--mode=decode",
    f"--workdir={trained_workdir}",
    f"--input={tmp_path / 'in.txt'}",
    f"--output={tmp_path / 'out.txt'}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "truncated" in result.stderr and "decoded 94/94 lines" in result.stderr
  outputs = (tmp_path / "out.txt").read_text().split("\n")[:-1]
  assert len(outputs) == 100
  assert [i for i, o in enumerate(outputs) if not o] == [
    i for i, line in enumerate(lines) if not line
  ]
  # In order: the same lines decoded one by one in this process give the same outputs.
  decoder = decode.Decoder.from_workdir(str(trained_workdir), devices=jax.devices()[:1])
  for i in (1, 2, 5, 50, 99):
    assert decoder([lines[i]], warn=lambda _: None) == [outputs[i]]


def test_eval_mode_writes_eval_json(trained_workdir):
  result = _run_cli("--mode=eval", f"--workdir={trained_workdir}")
  assert result.returncode == 0, result.stderr[-2000:]
  written = json.loads((trained_workdir / "eval.json").read_text())
  assert written["step"] == 20 and 0 <= written["bleu"] <= 100
  last = [json.loads(line) for line in open(trained_workdir / "metrics.jsonl")][-1]
  np.testing.assert_allclose(written["eval_loss"], last["eval_loss"], rtol=1e-5)
  assert written["bleu"] == pytest.approx(last["bleu"], abs=1e-6)


def test_periodic_evaluation_compiles_once_per_run(tmp_path, monkeypatch):
  per_evaluation = []
  original = evaluate.Evaluator.__call__

  def counted(self, params):
    with metrics.counting_compiles() as compiles:
      results = original(self, params)
    per_evaluation.append(len(compiles))
    return results

  monkeypatch.setattr(evaluate.Evaluator, "__call__", counted)
  cfg = demo.get_config("tiny")
  cfg.model.update(d_model=32, num_heads=2, mlp_dim=64)
  cfg.train.update(total_steps=30, log_every=10)
  cfg.eval.every = 10
  cfg.data.update(tokenizer_sample=2000, eval_examples=48)
  cfg.decode.batch_size = 16  # three decode batches of varied length per evaluation
  results = lm_train.train(cfg, str(tmp_path))
  assert "bleu" in results and len(per_evaluation) == 3  # steps 10, 20 and the final one
  assert per_evaluation[0] >= 2  # the loss step and at least one decoder shape
  assert per_evaluation[1:] == [0, 0], per_evaluation


@pytest.mark.parametrize("beam", [1, 3])
def test_translation_with_learned_positions_never_decodes_past_the_position_table(beam):
  """model.max_len 20 learned positions, sources up to 16 tokens: the length rule (1.5 x 16 +
  10 = 34) would ask for positions 20..33, which the table does not have."""
  cfg = tiny_config("translation", positions="learned", max_len=20)
  run = Layout.build(cfg, devices=jax.devices()[:1])
  options = decode.DecodeOptions(beam_size=beam, max_len=256, max_len_a=1.5, max_len_b=10)
  decoder = decode.Decoder(run, run.init_params(), _Ids(), options, batch_size=4)
  assert max(out for _, out in decoder.shapes) == 20
  sources = [[7] * 15 + [EOS_ID], [9, 8, EOS_ID]]
  out = decoder.decode_ids(sources)
  assert out.shape[1] <= 20 and ((out >= 0) & (out < 60)).all()
