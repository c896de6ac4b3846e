"""The HTTP service: the real server on 127.0.0.1, against decode mode, bad input, load."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import os
import re
import signal
import threading
import time

import httpx
import jax
import numpy as np
import pytest

from lm import api, decode, inference, serve
from lm.data import synthetic
from lm.data import tokenizer as tok
from lm.layout import Layout
from tests.helpers import Page, chromium, serve_process, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_server = serve_process  # 8 CPU devices, as conftest sets them


@pytest.fixture(scope="module")
def translation_server(trained_workdir):
  with _server(f"--workdir={trained_workdir}") as (proc, url):
    yield proc, url


def _lines(count: int, seed: int) -> list[str]:
  source = synthetic.DemoSource(count, seed)
  return [source[i][0] for i in range(count)]


@pytest.fixture(scope="module")
def decoded(trained_workdir):
  """What --mode=decode gives (the same Decoder, the same devices) for 50 lines."""
  lines = _lines(50, 11)
  return lines, decode.Decoder.from_workdir(str(trained_workdir))(lines)


async def _post_all(url: str, bodies: list[dict], path: str = "/v1/translate") -> list:
  async with httpx.AsyncClient(base_url=url, timeout=120) as client:
    return await asyncio.gather(*(client.post(path, json=b) for b in bodies))


def test_translations_equal_decode_mode_in_one_request_and_in_50(translation_server, decoded):
  _, url = translation_server
  lines, expected = decoded
  response = httpx.post(f"{url}/v1/translate", json={"text": lines}, timeout=120)
  assert response.status_code == 200, response.text
  assert response.json()["translations"] == expected
  assert response.json()["model_step"] == 20
  singles = asyncio.run(_post_all(url, [{"text": line} for line in lines]))
  assert [r.json()["translations"][0] for r in singles] == expected


BAD = [
  (b'{"text": "a b', "malformed JSON", None),
  (b'"just a string"', "JSON object", None),
  (b"\xff\xfe{}", "not UTF-8", None),
  (b'{"text": 5}', "must be a string", "text"),
  (b'{"text": "   "}', "is empty", "text"),
  (b'{"text": []}', "empty list", "text"),
  (b'{"text": "' + b"the cat " * 40 + b'"}', "text too long", "text"),
  (json.dumps({"text": ["a"] * 65}).encode(), "65 texts, limit 64", "text"),
  (b'{"text": "a", "colour": "red"}', "unknown field", "colour"),
  (b'{"text": "a", "beam_size": 2}', "not served; allowed values: 1, 4", "beam_size"),
  (b'{"text": "a", "beam_size": 2.5}', "must be an integer", "beam_size"),
  (b'{"text": "a", "alpha": "high"}', "must be a number", "alpha"),
  (b"{}", "text is required", "text"),
]


def test_bad_inputs_get_a_4xx_naming_the_field_and_the_server_goes_on(translation_server, decoded):
  _, url = translation_server
  before = _counter(httpx.get(f"{url}/metrics").text, "translate", "400")
  for body, message, field in BAD:
    response = httpx.post(f"{url}/v1/translate", content=body, timeout=30)
    assert response.status_code == 400, (body, response.text)
    error = response.json()["error"]
    assert message in error["message"], (body, error)
    assert error.get("field") == field, (body, error)
  too_long = httpx.post(f"{url}/v1/translate", content=BAD[6][0]).json()["error"]["message"]
  assert re.fullmatch(r"text too long \(\d+ tokens, limit 31\)", too_long), too_long
  assert httpx.post(f"{url}/v1/generate", json={"prompt": "a"}).status_code == 404
  lines, expected = decoded
  again = httpx.post(f"{url}/v1/translate", json={"text": lines[:3]}, timeout=60)
  assert again.json()["translations"] == expected[:3]
  after = _counter(httpx.get(f"{url}/metrics").text, "translate", "400")
  assert after - before == len(BAD) + 1


def test_completions_take_todays_bad_inputs_too(translation_server):
  """The 4xx suite above on /v1/completions (`prompt` for `text`), in OpenAI's error shape;
  fields it does not know (colour, beam_size, alpha) are ignored there, as real clients need."""
  _, url = translation_server
  for body, message, field in BAD:
    body = body.replace(b'"text"', b'"prompt"')
    ignored = any(name in body for name in (b"colour", b"beam_size", b"alpha"))
    response = httpx.post(f"{url}/v1/completions", content=body, timeout=30)
    if ignored:
      assert response.status_code == 200, (body, response.text)
      continue
    assert response.status_code == 400, (body, response.text)
    error = response.json()["error"]
    expected = message.replace("text", "prompt")
    assert expected in error["message"] and error["param"] == (field and "prompt"), (body, error)
    assert error["type"] == "invalid_request_error"
  hot = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "temperature": 0.5})
  assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature"


def test_greedy_translations_through_the_slots_equal_decode_mode(
  translation_server, trained_workdir
):
  """Beam 1 takes the decode slots (the source encoded at insert): 32 requests at once on
  /v1/translate and one /v1/completions of all of them give what decode mode gives."""
  _, url = translation_server
  lines = _lines(32, 13)
  base = decode.Decoder.from_workdir(str(trained_workdir))
  greedy = decode.Decoder(
    base.layout, base.params, base.tokenizer, dataclasses.replace(base.options, beam_size=1), 32
  )
  expected = greedy(lines)
  responses = asyncio.run(_post_all(url, [{"text": line, "beam_size": 1} for line in lines]))
  assert [r.json()["translations"][0] for r in responses] == expected
  completion = httpx.post(f"{url}/v1/completions", json={"prompt": lines}, timeout=120).json()
  assert [c["text"] for c in completion["choices"]] == expected
  assert "stop" in {c["finish_reason"] for c in completion["choices"]}  # EOS
  model = httpx.get(f"{url}/v1/model").json()
  assert model["batching"] == "continuous" and model["compiles_after_startup"] == 0


@pytest.fixture(scope="module")
def lm_server(trained_lm_workdir):
  with _server(f"--workdir={trained_lm_workdir}") as (proc, url):
    yield proc, url


def test_32_concurrent_generations_equal_decode_mode_token_for_token(lm_server, trained_lm_workdir):
  """The trained demo LM served on fsdp 8 with 8 slots: 32 requests at once, of mixed prompt
  lengths, caps and settings (greedy, seeded sampling with top-k / top-p), refill the slots
  while others generate; each row's tokens are decode mode's for it alone."""
  _, url = lm_server
  sentences = _lines(32, 21)
  settings = [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.2, 5, 1.0), (0.9, 0, 0.8)]
  caps = [None, 1, 2, 40]
  bodies = []
  for i, sentence in enumerate(sentences):
    words = sentence.split()
    t, k, p = settings[i % 4]
    body = {"prompt": " ".join(words[: 1 + i % len(words)]), "seed": 100 + i}
    body.update(temperature=t, top_k=k, top_p=p)
    if caps[i // 4 % 4]:
      body["max_tokens"] = caps[i // 4 % 4]
    bodies.append(body)
  responses = asyncio.run(_post_all(url, bodies, "/v1/generate"))
  decoder = decode.Decoder.from_workdir(str(trained_lm_workdir))
  # Decode mode's rows in one batch: a row's output depends on neither its neighbours nor its
  # place (tests/test_decode.py).
  ids = [decoder.tokenizer.encode(body["prompt"], "targets") for body in bodies]
  rows = decoder.decode_ids(
    ids,
    [body.get("max_tokens", 0) for body in bodies],
    [body["seed"] for body in bodies],
    temperatures=[body["temperature"] for body in bodies],
    top_ks=[body["top_k"] for body in bodies],
    top_ps=[body["top_p"] for body in bodies],
  )
  reasons = set()
  for body, response, prompt, row in zip(bodies, responses, ids, rows):
    assert response.status_code == 200, response.text
    expected = decode.until_end(row[len(prompt) :], decoder.specials.stops)
    assert response.json()["tokens"] == expected, body
    reasons.add(response.json()["finish_reason"])
  assert reasons == {"stop", "length"}
  model = httpx.get(f"{url}/v1/model").json()
  assert model["slots"] == 8 and model["mesh"] == {"stage": 1, "data": 1, "fsdp": 8, "tensor": 1}
  assert model["compiles_after_startup"] == 0


def _counter(metrics: str, endpoint: str, status: str) -> float:
  pattern = rf'zerolm_requests_total{{endpoint="{endpoint}",status="{status}"}} ([0-9.e+]+)'
  found = re.search(pattern, metrics)
  return float(found.group(1)) if found else 0.0


def _metric(metrics: str, name: str) -> float:
  return float(re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.M).group(1))


def test_64_concurrent_clients_share_batches_without_compiling(translation_server, decoded):
  """Batches as large as the traffic allows (at max_wait_ms 0 the first row may go alone), each
  row decoded once, each answer the one a request gets alone."""
  _, url = translation_server
  lines, expected = decoded
  picks = [i % len(lines) for i in range(64)]
  before = httpx.get(f"{url}/metrics").text
  responses = asyncio.run(_post_all(url, [{"text": lines[i]} for i in picks]))
  after = httpx.get(f"{url}/metrics").text
  together = [r.json()["translations"][0] for r in responses]
  assert together == [expected[i] for i in picks]
  alone = [
    httpx.post(f"{url}/v1/translate", json={"text": lines[i]}, timeout=60) for i in picks[:8]
  ]
  assert [r.json()["translations"][0] for r in alone] == together[:8]
  rows = _metric(after, "zerolm_batch_rows_sum") - _metric(before, "zerolm_batch_rows_sum")
  batches = _metric(after, "zerolm_batch_rows_count") - _metric(before, "zerolm_batch_rows_count")
  assert rows == 64 and math.ceil(64 / 32) <= batches < 64, (rows, batches)
  model = httpx.get(f"{url}/v1/model").json()
  assert model["compiles_after_startup"] == 0 and model["beam_sizes"] == [1, 4]
  assert model["mesh"] == {"stage": 1, "data": 1, "fsdp": 8, "tensor": 1}
  assert len(model["compiled_shapes"]) >= 3  # one per source length bucket


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
  """An untrained tiny LM as an export: streaming is about the wire, not the model."""
  cfg = tiny_config("lm")
  cfg.data.seq_len = 32
  run = Layout.build(cfg, devices=jax.devices()[:1])
  tokenizer = tok.train([f"w{i}" for i in range(100)] * 2, cfg.model.vocab_size, "word")
  directory = tmp_path_factory.mktemp("lm") / "export"
  inference.write_export(str(directory), run.init_params(), cfg, tokenizer, step=7)
  return directory


def test_generate_streams_the_tokens_it_returns_whole(lm_export, tmp_path):
  with _server(f"--workdir={tmp_path}", f"--export={lm_export}") as (_, url):
    body = {"prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 0.9, "seed": 3}
    whole = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
    assert whole["model_step"] == 7 and 1 <= len(whole["tokens"]) <= 8
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}) as r:
      events = [e for e in r.read().decode().split("\n\n") if e]
    data = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [d["token"] for d in data] == whole["tokens"] and events[-1].startswith("event: done")
    assert "".join(d["text"] for d in data) == whole["text"]
    other = httpx.post(f"{url}/v1/generate", json={**body, "seed": 4}, timeout=60).json()
    assert other["tokens"] != whole["tokens"]  # the seed reaches the sampler
    assert httpx.post(f"{url}/v1/translate", json={"text": "w1"}).status_code == 404


def test_a_full_queue_answers_503_and_a_slow_request_504(trained_workdir):
  """In this process: a service whose batching loop is not running never answers."""
  decoder = decode.Decoder.from_workdir(str(trained_workdir), devices=jax.devices()[:1])
  settings = serve_settings(max_queue=2, timeout_s=0.2)
  service = serve.Service(decoder, 20, settings)

  async def scenario():
    service._arrived = asyncio.Event()
    ids, settings = [[5, 6, 3]], api.RowSettings.of(decoder.options)
    with pytest.raises(api.RequestError) as full:
      await service.submit(ids * 3, [0] * 3, settings, 4)
    assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
    with pytest.raises(api.RequestError) as slow:
      await service.submit(ids, [0], settings, 4)
    assert slow.value.status == 504 and "timeout_s" in slow.value.message

  asyncio.run(scenario())


def serve_settings(**overrides):
  from lm import config as lmc

  settings = lmc.translation_defaults().serve
  settings.update(overrides)
  return settings


# -- In this process: a Service over an untrained tiny model, driven through its app or directly.

WORDS = [f"w{i}" for i in range(100)]


def _service(task: str, **serve_overrides) -> serve.Service:
  """A warmed-up service of batches of at most 2 rows. The LM's decode width (decode.max_len
  12) is below its data.seq_len (32); translation has one source bucket (16)."""
  cfg = tiny_config(task)
  if task == "lm":
    cfg.data.seq_len, cfg.decode.max_len = 32, 12
  else:
    cfg.decode.length_buckets = (16,)
  run = Layout.build(cfg, devices=jax.devices()[:1])
  tokenizer = tok.train(WORDS * 2, cfg.model.vocab_size, "word")
  options = decode.DecodeOptions.from_config(cfg.decode)
  decoder = decode.Decoder(run, run.init_params(), tokenizer, options, 2)
  service = serve.Service(decoder, 7, serve_settings(max_batch=2, **serve_overrides))
  service.warm_up()
  return service


@pytest.fixture(scope="module")
def lm_service():
  return _service("lm")


@pytest.fixture(scope="module")
def lm_static_service():
  return _service("lm", batching="static")


@pytest.fixture(scope="module")
def translation_service():
  return _service("translation")


def _while_running(service: serve.Service, work):
  """work(client) awaited while the service's batching loop runs, with an HTTP client on the
  service's app in the same event loop."""

  async def main():
    transport = httpx.ASGITransport(app=serve.app(service))
    async with service.running():
      async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        return await work(client)

  return asyncio.run(main())


def _sample(service: serve.Service, name: str) -> float:
  return service.metrics.registry.get_sample_value(name) or 0.0


def test_sampling_settings_are_per_row_data_and_compile_nothing(lm_service):
  async def work(client):
    for i in range(12):
      settings = {"temperature": 0.13 * i, "top_k": i % 5, "top_p": 0.5 + 0.04 * i, "seed": i}
      body = {"prompt": "w1 w2", "max_tokens": 3, **settings}
      response = await client.post("/v1/generate", json=body)
      assert response.status_code == 200, response.text
    return (await client.get("/v1/model")).json()

  assert _while_running(lm_service, work)["compiles_after_startup"] == 0


def test_beam_sizes_are_a_fixed_set_and_alpha_is_per_row_data(translation_service):
  async def work(client):
    for alpha in (0.0, 0.3, 0.61, 1.7, 2.0):
      for beam in (1, 4):
        body = {"text": "w1 w2", "alpha": alpha, "beam_size": beam}
        assert (await client.post("/v1/translate", json=body)).status_code == 200
    other = await client.post("/v1/translate", json={"text": "w1", "beam_size": 3})
    return other, (await client.get("/v1/model")).json()

  other, model = _while_running(translation_service, work)
  assert other.status_code == 400, other.text
  message = "beam_size=3 is not served; allowed values: 1, 4"
  assert other.json()["error"] == {"message": message, "field": "beam_size"}
  assert model["compiles_after_startup"] == 0 and model["beam_sizes"] == [1, 4]


@pytest.mark.parametrize("task", ["translation", "lm"])
def test_requests_with_different_settings_share_batches_and_decode_as_alone(task, request):
  """Static batching (beam search's, translating): every request is queued before the loop
  wakes: 5 rows make ceil(5 / 2) batches of 2, 2, 1, and each request's answer is the one it
  gets alone."""
  service = request.getfixturevalue(
    f"{task}_service" if task == "translation" else "lm_static_service"
  )
  if task == "translation":
    call = service.translate
    bodies = [{"text": f"w{i} w{i + 1} w{i + 2}", "alpha": 0.5 * i} for i in range(5)]
  else:
    call = service.generate
    sampling = [(0.0, 0, 1.0), (0.8, 0, 0.9), (1.5, 5, 1.0), (0.8, 3, 0.7), (0.0, 0, 1.0)]
    bodies = [
      {"prompt": f"w{i} w{2 * i}", "temperature": t, "top_k": k, "top_p": p, "seed": i}
      for i, (t, k, p) in enumerate(sampling)
    ]

  async def together(client):
    return await asyncio.gather(*(call(body) for body in bodies))

  async def one_by_one(client):
    return [await call(body) for body in bodies]

  batches = _sample(service, "zerolm_batch_rows_count")
  batched = _while_running(service, together)
  assert _sample(service, "zerolm_batch_rows_count") - batches == math.ceil(len(bodies) / 2)
  assert len(service.compiles_after_startup) == 0
  assert batched == _while_running(service, one_by_one)


def test_requests_with_different_settings_share_slots_and_decode_as_alone(lm_service):
  """Continuous batching: 12 requests of mixed settings through the slots at once, each
  answer the one it gets alone; no static batch runs and nothing compiles."""
  sampling = [(0.0, 0, 1.0), (0.8, 0, 0.9), (1.5, 5, 1.0), (0.8, 3, 0.7)]
  bodies = [
    {
      "prompt": f"w{i} w{2 * i}",
      "temperature": t,
      "top_k": k,
      "top_p": p,
      "seed": i,
      "max_tokens": 1 + i % 9,
    }
    for i, (t, k, p) in enumerate(sampling * 3)
  ]

  async def together(client):
    return await asyncio.gather(*(lm_service.generate(body) for body in bodies))

  async def one_by_one(client):
    return [await lm_service.generate(body) for body in bodies]

  batches = _sample(lm_service, "zerolm_batch_rows_count")
  first_tokens = _sample(lm_service, "zerolm_time_to_first_token_seconds_count")
  batched = _while_running(lm_service, together)
  assert batched == _while_running(lm_service, one_by_one)
  assert _sample(lm_service, "zerolm_batch_rows_count") == batches
  assert _sample(lm_service, "zerolm_time_to_first_token_seconds_count") - first_tokens == 24
  assert len(lm_service.compiles_after_startup) == 0
  assert [r["finish_reason"] for r in batched[:3]] == ["length"] * 3  # untrained: no EOS soon


def test_healthz_and_requests_answer_503_once_the_engine_has_died(monkeypatch):
  service = _service("lm")

  def broken(*args):
    raise RuntimeError("boom")

  async def work(client):
    first = await client.post("/v1/generate", json={"prompt": "w1"})  # in flight as it dies
    health = await client.get("/healthz")
    later = [await client.post("/v1/generate", json={"prompt": "w1"})]
    # Streams too: nothing is sent before the first token, so the failure is the status.
    later.append(await client.post("/v1/generate", json={"prompt": "w1", "stream": True}))
    later.append(await client.post("/v1/completions", json={"prompt": "w1", "stream": True}))
    return first, health, later

  service.engine.__dict__["_steps"] = dict.fromkeys(service.engine._steps, broken)
  first, health, later = _while_running(service, work)
  died = "the decode engine died (RuntimeError: boom)"
  assert health.status_code == 503 and health.json() == {"status": "failed", "error": died}
  for response in (first, *later):
    assert response.status_code == 503 and response.json()["error"]["message"] == died


def test_completions_log_the_unknown_fields_they_ignore(lm_service, monkeypatch):
  logged = []
  monkeypatch.setattr(lm_service, "log", logged.append)

  async def work(client):
    body = {"prompt": "w1", "max_tokens": 2, "colour": "red", "priority": 3}
    return await client.post("/v1/completions", json=body)

  response = _while_running(lm_service, work)
  assert response.status_code == 200, response.text
  assert logged == ["serve: /v1/completions ignores unknown fields colour, priority"]


def test_a_prompt_past_the_decode_width_gets_400_and_the_model_reports_the_limits(lm_service):
  async def work(client):
    too_long = await client.post("/v1/generate", json={"prompt": " ".join(["w1"] * 20)})
    longest = await client.post("/v1/generate", json={"prompt": " ".join(["w1"] * 11)})
    return too_long, longest, (await client.get("/v1/model")).json()

  too_long, longest, model = _while_running(lm_service, work)
  assert too_long.status_code == 400, too_long.text
  message = "prompt too long (20 tokens, limit 11)"
  assert too_long.json()["error"] == {"message": message, "field": "prompt"}
  assert longest.status_code == 200 and len(longest.json()["tokens"]) == 1
  limits = model["max_input_tokens"], model["max_output_tokens"], model["max_total_tokens"]
  assert limits == (11, 11, 12)  # a 1-token prompt leaves 11 of the decode width's 12


def test_streaming_decodes_each_token_once_not_the_whole_prefix(lm_service, monkeypatch):
  real = lm_service.decoder.tokenizer
  decoded = []  # the length of every decode call

  class Counting:
    vocab_size, encode = real.vocab_size, real.encode
    pad_id, bos_id, eos_id = real.pad_id, real.bos_id, real.eos_id

    def decode(self, ids):
      decoded.append(len(ids))
      return real.decode(ids)

  monkeypatch.setattr(lm_service.decoder, "tokenizer", Counting())
  body = {"prompt": "w1", "max_tokens": 11, "stream": True}

  async def work(client):
    return (await client.post("/v1/generate", json=body)).text

  events = [e for e in _while_running(lm_service, work).split("\n\n") if e]
  data = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
  tokens = [d["token"] for d in data]
  assert len(tokens) >= 8 and events[-1].startswith("event: done")  # enough to tell O(n^2)
  assert "".join(d["text"] for d in data) == real.decode(tokens)
  # The whole text once for the answer, then about a piece and its context per token.
  assert sum(decoded) <= 4 * len(tokens), decoded


def test_streamed_pieces_add_up_to_the_text():
  """Subword pieces (a word spelled by several), UNK and BOS (which show nothing), lone word
  boundaries (which sentencepiece drops at a text's start) and EOS."""
  texts = [" ".join(synthetic.DemoSource(400, 3)[i]) for i in range(400)]
  tokenizer = tok.train(texts, 96, "bpe")
  rng = np.random.RandomState(0)
  for _ in range(300):
    ids = [int(i) for i in rng.randint(1, tokenizer.vocab_size, size=rng.randint(1, 30))]
    pieces = list(tok.text_pieces(tokenizer.decode, ids))
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids), ids


def test_lm_tokens_per_second_counts_generated_tokens_not_the_prompt(lm_service):
  async def work(client):
    body = {"prompt": "w1 w2 w3 w4 w5", "max_tokens": 4}
    return (await client.post("/v1/generate", json=body)).json()

  counted = _sample(lm_service, "zerolm_output_tokens_total")
  result = _while_running(lm_service, work)
  assert 1 <= len(result["tokens"]) <= 4
  assert _sample(lm_service, "zerolm_output_tokens_total") - counted == len(result["tokens"])


def test_a_body_over_serve_max_body_bytes_gets_413(lm_service, monkeypatch):
  monkeypatch.setitem(lm_service.cfg, "max_body_bytes", 256)
  big = json.dumps({"prompt": "w1 " * 100}).encode()

  async def chunks():  # a body without a declared length
    yield big[:200]
    yield big[200:]

  async def work(client):
    declared = await client.post("/v1/generate", content=big)
    chunked = await client.post("/v1/generate", content=chunks())
    small = await client.post("/v1/generate", json={"prompt": "w1", "max_tokens": 1})
    return declared, chunked, small

  declared, chunked, small = _while_running(lm_service, work)
  assert "content-length" not in chunked.request.headers
  for response in (declared, chunked):
    assert response.status_code == 413, response.text
    error = '{"error":{"message":"the body is over serve.max_body_bytes=256 bytes"}}'
    assert response.text == error
  assert small.status_code == 200


def test_healthz_answers_503_once_the_batching_loop_has_died(lm_service, monkeypatch):
  async def broken():
    raise RuntimeError("boom")

  async def work(client):
    await asyncio.sleep(0)  # the loop's first step: it dies
    return await client.get("/healthz"), await client.post("/v1/generate", json={"prompt": "w1"})

  monkeypatch.setattr(lm_service, "_batches", broken)
  health, generate = _while_running(lm_service, work)
  assert health.status_code == 503, health.text
  died = "the batching loop died (RuntimeError: boom)"
  assert health.json() == {"status": "failed", "error": died}
  assert generate.status_code == 503 and generate.json()["error"]["message"] == died


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_translates_what_is_typed_in_a_real_browser(translation_server, tmp_path):
  _, url = translation_server
  page = Page(chromium(), tmp_path / "profile")
  try:
    page.call("Page.navigate", url=url + "/")
    page.wait_for("document.getElementById('about').textContent.includes('model step 20')")
    page.js("document.getElementById('input').focus()")
    sentence = "the cat sees a dog"
    page.call("Input.insertText", text=sentence)  # typed, as a keyboard's text input
    page.js("document.getElementById('go').click()")
    shown = page.wait_for("document.getElementById('output').textContent")
    status = page.wait_for("document.getElementById('status').textContent")
    expected = httpx.post(f"{url}/v1/translate", json={"text": sentence}).json()["translations"][0]
    assert shown == expected
    assert re.fullmatch(r"\d+ ms, model step 20", status), status
    # An error reads as a sentence, not a stack trace.
    page.js("document.getElementById('input').value = 'the cat '.repeat(40)")
    page.js("document.getElementById('go').click()")
    error = page.wait_for("document.getElementById('error').textContent")
    assert re.fullmatch(r"text too long \(\d+ tokens, limit 31\)", error), error
    page.js("document.getElementById('input').value = " + json.dumps(sentence))
    page.js("document.getElementById('go').click()")
    page.wait_for("document.getElementById('output').textContent.length > 0")
    shot = page.call("Page.captureScreenshot", format="png")["data"]
    artifacts = os.path.join(ROOT, "tests", "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    with open(os.path.join(artifacts, "serve_page.png"), "wb") as f:
      f.write(base64.b64decode(shot))
  finally:
    page.close()


def test_a_client_that_goes_away_frees_its_rows(translation_server):
  _, url = translation_server

  def rows_decoded() -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return float(re.search(r"zerolm_batch_rows_sum ([0-9.e+]+)", metrics).group(1))

  before = rows_decoded()
  gone_before = _counter(httpx.get(f"{url}/metrics").text, "translate", "499")
  # 8 requests of 64 rows ahead of it keep the server busy for 16 batches.
  busy = threading.Thread(target=lambda: asyncio.run(_post_all(url, [{"text": _lines(64, 5)}] * 8)))
  busy.start()
  time.sleep(0.1)
  with pytest.raises(httpx.TimeoutException):
    httpx.post(f"{url}/v1/translate", json={"text": "the cat sees a dog"}, timeout=0.1)
  busy.join(timeout=300)
  time.sleep(0.5)
  metrics = httpx.get(f"{url}/metrics").text
  assert _counter(metrics, "translate", "499") == gone_before + 1
  assert rows_decoded() - before == 8 * 64  # the busy requests' rows, not the abandoned one


def test_sigterm_finishes_requests_in_flight_then_exits_0(translation_server, decoded):
  """(Last in this module: it stops the module's server.)"""
  proc, url = translation_server
  lines, expected = decoded
  results = []
  sender = threading.Thread(
    target=lambda: results.append(
      httpx.post(f"{url}/v1/translate", json={"text": lines}, timeout=120)
    )
  )
  sender.start()
  time.sleep(0.3)  # the request is in
  proc.send_signal(signal.SIGTERM)
  sender.join(timeout=120)
  assert proc.wait(timeout=60) == 0
  assert results and results[0].status_code == 200
  assert results[0].json()["translations"] == expected
  assert "serve: stopped by SIGTERM" in proc.stdout.read()
