"""Continuous batching's engine: every row gets, token for token, what decode mode gives it
alone, whatever shares the slots, on every mesh; prefill equals decoding the prompt."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm import decode, engine, metrics
from lm.data import tokenizer as tok
from lm.layout import Layout
from tests.helpers import tiny_config

WORDS = [f"w{i}" for i in range(100)]


def _decoder(task: str, mesh=(1, 1, 1), width: int = 24, **model) -> decode.Decoder:
  """An untrained tiny model. The LM's decode width is `width` (prompts of up to 23 tokens)."""
  cfg = tiny_config(task, **model)
  if task == "lm":
    cfg.data.seq_len, cfg.decode.max_len, cfg.model.max_len = 32, width, max(64, width)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  run = Layout.build(cfg, devices=jax.devices()[: int(np.prod(mesh))])
  tokenizer = tok.train(WORDS * 2, cfg.model.vocab_size, "word")
  options = decode.DecodeOptions.from_config(cfg.decode)
  return decode.Decoder(run, run.init_params(), tokenizer, options, 8)


def _requests(task: str, count: int, seed: int) -> list[dict]:
  """Mixed lengths, caps and (LM) sampling settings."""
  rng = np.random.RandomState(seed)
  out = []
  for i in range(count):
    ids = [int(x) for x in rng.randint(5, 60, size=rng.randint(1, 14))]
    r = dict(ids=ids, cap=int(rng.choice([0, 1, 3, 7])), seed=1000 + i)
    if task == "lm":
      r.update(temperature=[0.0, 0.7, 1.3][i % 3], top_k=[0, 5][i % 2], top_p=[1.0, 0.8][i % 4 > 1])
    else:
      r["ids"] = ids + [tok.EOS_ID]
    out.append(r)
  return out


def _alone(decoder: decode.Decoder, r: dict) -> list[int]:
  """What decode mode gives one request alone."""
  settings = {k: [r[k]] for k in ("temperature", "top_k", "top_p") if k in r}
  row = decoder.decode_ids(
    [r["ids"]],
    [r["cap"]],
    [r["seed"]],
    temperatures=settings.get("temperature"),
    top_ks=settings.get("top_k"),
    top_ps=settings.get("top_p"),
    beam_size=1,
  )[0]
  if decoder.layout.cfg.task == "lm":
    row = row[len(r["ids"]) :]
  return decode.until_end(row, decoder.specials.stops)


def _run(eng: engine.Engine, requests: list[dict]) -> list[tuple[list[int], str]]:
  """The requests through the running engine, sent in bursts from another thread."""
  results, finished = {}, threading.Event()

  def sink(i):
    tokens = []

    def emit(run, reason):
      tokens.extend(run)
      if reason:
        results[i] = (tokens, reason)
        if len(results) == len(requests):
          finished.set()

    return emit

  def send():
    for i, r in enumerate(requests):
      eng.submit(engine.Generation(emit=sink(i), **r))
      if i % 5 == 4:
        time.sleep(0.02)  # later ones join slots that are mid-generation

  sender = threading.Thread(target=send)
  sender.start()
  assert finished.wait(120), f"{len(results)} of {len(requests)} finished"
  sender.join()
  return [results[i] for i in range(len(requests))]


# (task, mesh, steps per chunk, slots): (1, 2, 1) with 8 slots is 2 device blocks of 4 rows,
# whose steps run 1 or 4 rows of each; the others have 1 row per block (or one block).
CASES = [
  ("lm", (1, 1, 1), 1, 4),
  ("lm", (1, 1, 1), 3, 4),
  ("lm", (2, 2, 2), 1, 4),
  ("lm", (1, 8, 1), 2, 8),
  ("lm", (1, 2, 1), 2, 8),
  ("translation", (1, 1, 1), 1, 4),
  ("translation", (2, 2, 2), 2, 4),
  ("translation", (1, 2, 1), 1, 8),
]


@pytest.mark.parametrize("task, mesh, steps_per_chunk, slots", CASES)
def test_every_row_is_what_decode_mode_gives_it_alone(task, mesh, steps_per_chunk, slots):
  """24 requests through the slots, refilled while others generate. Each row's tokens and
  finish reason are its own alone; nothing compiles after warm-up."""
  decoder = _decoder(task, mesh)
  eng = engine.Engine(decoder, slots, steps_per_chunk, prefill_rows=4)
  counts = []
  real = eng._active_count
  eng._active_count = lambda: counts.append(real()) or counts[-1]
  eng.warm_up()
  requests = _requests(task, 24, seed=len(task) + mesh[0] + steps_per_chunk)
  with metrics.counting_compiles() as compiles:
    eng.start()
    try:
      alone = _run(eng, requests[:1])  # one slot: the smallest step
      results = _run(eng, requests)
    finally:
      eng.stop()
  assert compiles == []
  assert set(counts) == set(eng.active_counts)  # every compiled row count ran
  assert alone == results[:1]
  limit = eng.max_len
  for r, (tokens, reason) in zip(requests, results):
    assert tokens == _alone(decoder, r), r
    n = len(r["ids"])
    if task == "lm":
      room = min(n + r["cap"], limit) - n if r["cap"] else limit - n
    else:
      o = decoder.options
      room = min(int(np.ceil(o.max_len_a * n + o.max_len_b)), r["cap"] or limit, limit)
    assert reason == ("length" if len(tokens) == room else "stop"), (r, tokens, reason)
    assert len(tokens) <= room
  assert eng.slots_in_use == 0 and eng.backlog == 0


def test_rows_that_outgrow_the_attention_span_are_what_decode_mode_gives():
  """A decode width of 128: steps attend over 32, 64 or 128 positions, as far as the longest
  occupied slot has come; rows of every length, some running to the width, cross them."""
  decoder = _decoder("lm", width=128)
  eng = engine.Engine(decoder, 4, prefill_rows=2)
  eng.warm_up()
  assert eng.spans == (32, 64, 128) and len(eng._steps) == len(eng.active_counts) * 3
  requests = _requests("lm", 10, seed=5)
  for i, r in enumerate(requests):
    r["cap"] = [0, 40, 90, 5, 0][i % 5]
  spans = []
  real = eng._span
  eng._span = lambda: spans.append(real()) or spans[-1]
  eng.start()
  try:
    results = _run(eng, requests)
  finally:
    eng.stop()
  assert {32, 64, 128} <= set(spans)
  for r, (tokens, _) in zip(requests, results):
    assert tokens == _alone(decoder, r), r


def test_ignore_eos_runs_to_the_cap_past_the_end_token():
  decoder = _decoder("lm")
  eng = engine.Engine(decoder, 4, prefill_rows=2)
  eng.warm_up()
  # Sampled rows whose decode-mode output ends early at EOS.
  requests = [
    dict(ids=[5, 9], cap=0, seed=i, temperature=1.5, top_k=0, top_p=1.0) for i in range(60)
  ]
  stopping = [r for r in requests if len(_alone(decoder, r)) < eng.max_len - 2][:3]
  assert stopping, "no prompt ends early: pick others"
  eng.start()
  try:
    results = _run(eng, [{**r, "ignore_eos": True} for r in stopping])
  finally:
    eng.stop()
  for r, (tokens, reason) in zip(stopping, results):
    alone = _alone(decoder, r)
    assert reason == "length" and len(tokens) == eng.max_len - len(r["ids"])
    assert tokens[: len(alone) + 1] == alone + [tok.EOS_ID]
    # Decode mode (static batches) runs past EOS the same way.
    row = decoder.decode_ids([r["ids"]], [0], [r["seed"]], temperatures=[1.5], ignore_eos=[True])
    assert tokens == [int(t) for t in row[0][len(r["ids"]) :]]


def test_a_cancelled_row_frees_its_slot_and_hears_nothing_more():
  decoder = _decoder("lm")
  eng = engine.Engine(decoder, 2, prefill_rows=1)
  eng.warm_up()
  heard = []
  long = engine.Generation([5, 6], lambda run, reason: heard.append((run, reason)), ignore_eos=True)
  eng.start()
  try:
    eng.submit(long)
    deadline = time.time() + 30
    while not heard and time.time() < deadline:
      time.sleep(0.001)
    long.cancelled = True
    time.sleep(0.2)
    count = len(heard)
    assert eng.slots_in_use == 0
    time.sleep(0.1)
    assert len(heard) == count and all(reason is None for _, reason in heard)
    assert sum(len(run) for run, _ in heard) < eng.max_len - 2  # it did not run to its end
    # The freed slot serves the next request.
    done = threading.Event()
    eng.submit(engine.Generation([7], lambda run, reason: reason and done.set(), cap=3))
    assert done.wait(30)
  finally:
    eng.stop()


def test_a_dead_engine_ends_every_row_with_error():
  decoder = _decoder("lm")
  eng = engine.Engine(decoder, 2, prefill_rows=1)
  eng.warm_up()

  def broken(*args):
    raise RuntimeError("boom")

  eng.__dict__["_steps"] = dict.fromkeys(eng._steps, broken)  # the compiled programs
  reasons = []
  eng.start()
  eng.submit(engine.Generation([5], lambda run, reason: reasons.append(reason)))
  eng._thread.join(timeout=30)
  assert isinstance(eng.failure, RuntimeError) and reasons[-1] == "error"
  eng.submit(engine.Generation([5], lambda run, reason: reasons.append(reason)))
  assert reasons[-1] == "error"  # nothing waits on a dead engine


def test_prefill_gives_the_logits_and_keys_values_that_decoding_the_prompt_caches():
  decoder = _decoder("lm")
  layout = decoder.layout
  model = nnx.merge(layout.graphdef, decoder.params)
  inputs = jnp.asarray([[1, 7, 9, 11, 13, 0, 0, 0], [1, 20, 21, 0, 0, 0, 0, 0]], jnp.int32)
  lengths = jnp.asarray([5, 3])
  logits, cached = model.prefill(inputs, lengths)
  cache = model.init_cache(2, 8)
  steps = []
  for t in range(8):
    step_logits, cache = model.decode_step(inputs[:, t], t, cache)
    steps.append(step_logits)
  for row, n in enumerate([5, 3]):
    np.testing.assert_allclose(logits[row], steps[n - 1][row], rtol=1e-5, atol=1e-5)
    for name in ("k", "v"):
      np.testing.assert_allclose(
        cached[name][:, row, :n], cache[name][:, row, :n], rtol=1e-5, atol=1e-5
      )
  # One position per row (slots at different places) equals one position for all.
  per_row, _ = model.decode_step(inputs[:, 2], jnp.asarray([2, 2]), model.init_cache(2, 8))
  shared, _ = model.decode_step(inputs[:, 2], 2, model.init_cache(2, 8))
  np.testing.assert_allclose(per_row, shared, rtol=1e-6, atol=1e-6)
