"""Continuous batching on the wire: the official OpenAI client, API keys, streaming as tokens are
made, no head-of-line blocking, freed slots, bad input, SIGTERM draining streams."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import jax
import openai
import pytest

from lm import inference
from lm.data import tokenizer as tok
from lm.layout import Layout
from tests.helpers import serve_process, tiny_config

KEY = "sk-test-0123456789"
WORDS = [f"w{i}" for i in range(100)]
AUTH = {"Authorization": f"Bearer {KEY}"}


def _lm_export(directory, batching: str):
  """An untrained tiny LM (its decode width 256) as an export: the wire, not the model, is
  under test here; its greedy rows rarely meet EOS, so lengths are what max_tokens says."""
  cfg = tiny_config("lm", max_len=256)
  cfg.data.seq_len = 32
  cfg.decode.max_len = 256
  # One step per chunk: an event per token, which the tests count and time.
  cfg.serve.update(batching=batching, slots=16, prefill_rows=4, max_batch=16, steps_per_chunk=1)
  run = Layout.build(cfg, devices=jax.devices()[:1])
  tokenizer = tok.train(WORDS * 2, cfg.model.vocab_size, "word")
  inference.write_export(str(directory), run.init_params(), cfg, tokenizer, step=3)
  return directory


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
  base = tmp_path_factory.mktemp("openai")
  export = _lm_export(base / "export", "continuous")
  keys = base / "keys.txt"
  keys.write_text(f"sk-other\n\n  {KEY}  \n")
  with serve_process(f"--workdir={base}", f"--export={export}", f"--api_key_file={keys}") as s:
    yield s


@pytest.fixture(scope="module")
def static_server(tmp_path_factory):
  base = tmp_path_factory.mktemp("openai_static")
  export = _lm_export(base / "export", "static")
  with serve_process(f"--workdir={base}", f"--export={export}") as s:
    yield s


def _client(url: str, key: str = KEY) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _generate(url: str, **body) -> dict:
  response = httpx.post(f"{url}/v1/generate", json=body, headers=AUTH, timeout=60)
  assert response.status_code == 200, response.text
  return response.json()


def test_the_official_client_gets_what_generate_gives(keyed_server):
  _, url = keyed_server
  client = _client(url)
  assert [m.id for m in client.models.list().data] == ["zerolm"]
  for settings in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.8, "seed": 5}):
    expected = _generate(url, prompt="w1 w2 w3", max_tokens=12, **settings)
    whole = client.completions.create(model="zerolm", prompt="w1 w2 w3", max_tokens=12, **settings)
    assert whole.object == "text_completion" and whole.model == "zerolm"
    assert whole.choices[0].text == expected["text"]
    assert whole.choices[0].finish_reason == "length" and expected["finish_reason"] == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == 3
    chunks = list(
      client.completions.create(
        model="zerolm",
        prompt="w1 w2 w3",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **settings,
      )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
  # A stop sequence: the text before its first occurrence, finish_reason "stop".
  text = expected["text"]
  stop = " " + text.split()[4]
  stopped = client.completions.create(
    model="zerolm", prompt="w1 w2 w3", max_tokens=12, temperature=0.9, top_p=0.8, seed=5, stop=stop
  )
  assert stopped.choices[0].text == text[: text.index(stop)]
  assert stopped.choices[0].finish_reason == "stop"
  streamed = client.completions.create(
    model="zerolm",
    prompt="w1 w2 w3",
    max_tokens=12,
    temperature=0.9,
    top_p=0.8,
    seed=5,
    stop=[stop, "never there"],
    stream=True,
  )
  chunks = list(streamed)
  assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]
  assert chunks[-1].choices[0].finish_reason == "stop"
  # Equal prompts sample apart: choice i draws with seed + i.
  twins = client.completions.create(
    model="zerolm", prompt=["w1 w2"] * 2, max_tokens=12, temperature=1.0, seed=3
  )
  assert twins.choices[0].text != twins.choices[1].text
  assert (
    twins.choices[1].text
    == _generate(url, prompt="w1 w2", max_tokens=12, temperature=1.0, seed=4)["text"]
  )
  # Several prompts: one choice each, in order.
  both = client.completions.create(model="zerolm", prompt=["w1 w2 w3", "w4"], max_tokens=12)
  assert [c.index for c in both.choices] == [0, 1]
  assert both.choices[0].text == _generate(url, prompt="w1 w2 w3", max_tokens=12)["text"]
  assert both.choices[1].text == _generate(url, prompt="w4", max_tokens=12)["text"]


def test_without_a_valid_key_every_v1_request_gets_401(keyed_server):
  _, url = keyed_server
  with pytest.raises(openai.AuthenticationError) as refused:
    _client(url, "sk-wrong").completions.create(model="zerolm", prompt="w1", max_tokens=2)
  assert refused.value.status_code == 401
  for headers in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
    response = httpx.post(f"{url}/v1/generate", json={"prompt": "w1"}, headers=headers)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
  other = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-other"})
  assert other.status_code == 200  # any key of the file
  assert httpx.get(f"{url}/healthz").status_code == 200  # probes stay open
  assert httpx.get(f"{url}/metrics").status_code == 200


def _stream(url: str, body: dict, on_chunk=None) -> dict:
  """A streamed completion, timed: first event, every text chunk, the end."""
  start = time.perf_counter()
  times, texts, reasons, done = [], [], [], False
  with httpx.stream(
    "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60
  ) as response:
    assert response.status_code == 200, response.read()
    for line in response.iter_lines():
      if not line.startswith("data: "):
        continue
      if line == "data: [DONE]":
        done = True
        continue
      chunk = json.loads(line.removeprefix("data: "))
      times.append(time.perf_counter() - start)
      texts.append(chunk["choices"][0]["text"])
      reasons.append(chunk["choices"][0]["finish_reason"])
      if on_chunk:
        on_chunk(len(times))
  return dict(
    first=times[0], end=time.perf_counter() - start, texts=texts, reasons=reasons, done=done
  )


LONG = {"model": "zerolm", "prompt": "w5 w6", "temperature": 0.0, "ignore_eos": True}


@pytest.mark.alone
def test_a_stream_sends_its_first_token_before_half_its_time(keyed_server, static_server):
  """Continuous batching streams as tokens are made; static batching (the old behaviour) sends
  them only once the whole batch has finished, so there the first event comes at the end."""
  _, url = keyed_server
  live = _stream(url, {**LONG, "max_tokens": 64})
  assert live["done"] and live["reasons"][-1] == "length"
  assert len([t for t in live["texts"] if t]) == 64  # one event per token
  assert live["first"] < 0.5 * live["end"], live
  _, static_url = static_server
  batched = _stream(static_url, {**LONG, "max_tokens": 64})
  assert batched["reasons"][-1] == "length"
  assert "".join(batched["texts"]) == "".join(live["texts"])  # the same model, the same tokens
  assert batched["first"] > 0.5 * batched["end"], batched


def _slots_in_use(url: str) -> float:
  metrics = httpx.get(f"{url}/metrics").text
  return float(re.search(r"^zerolm_slots_in_use ([0-9.e+]+)$", metrics, re.M).group(1))


def _generated(url: str) -> float:
  metrics = httpx.get(f"{url}/metrics").text
  return float(re.search(r"^zerolm_output_tokens_total ([0-9.e+]+)$", metrics, re.M).group(1))


def test_a_short_request_does_not_wait_for_long_ones(keyed_server):
  """8 generations of 240 tokens run; a 4-token request sent meanwhile ends while they are under
  half done. Counted in decode steps (the server's token counter), not seconds, so a loaded
  machine's slow HTTP round trip cannot fail it; a queue behind the long ones would take 239."""
  _, url = keyed_server
  started = threading.Barrier(9)
  results = []

  def long_one():
    results.append(_stream(url, {**LONG, "max_tokens": 240}, lambda n: n == 1 and started.wait()))

  threads = [threading.Thread(target=long_one) for _ in range(8)]
  for t in threads:
    t.start()
  started.wait(timeout=60)  # all 8 are generating
  assert _slots_in_use(url) >= 8
  before = _generated(url)
  short = httpx.post(
    f"{url}/v1/completions", json={**LONG, "max_tokens": 4}, headers=AUTH, timeout=60
  )
  during = _generated(url) - before
  ended_first = len(results)
  for t in threads:
    t.join(timeout=120)
  assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
  assert len(results) == 8 and all(r["done"] for r in results)
  assert ended_first == 0
  # At one token a slot a step, 8 long rows make 8 tokens a step: under 120 steps.
  assert during < 8 * 120, during


def test_a_client_that_leaves_mid_stream_frees_its_slot(keyed_server):
  """Its slot frees long before its 250 tokens would have been made."""
  _, url = keyed_server
  assert _slots_in_use(url) == 0
  before = _generated(url)
  with httpx.stream(
    "POST",
    f"{url}/v1/completions",
    json={**LONG, "max_tokens": 250, "stream": True},
    headers=AUTH,
    timeout=60,
  ) as response:
    lines = response.iter_lines()
    while not next(lines).startswith("data: "):
      pass
    assert _slots_in_use(url) == 1
  deadline = time.time() + 10
  while _slots_in_use(url) and time.time() < deadline:
    time.sleep(0.05)
  assert _slots_in_use(url) == 0
  assert _generated(url) - before < 125, _generated(url) - before


BAD = [
  (b'{"prompt": "w1', 400, "malformed JSON", None),
  (b'"just a string"', 400, "JSON object", None),
  (b"\xff\xfe{}", 400, "not UTF-8", None),
  (b'{"prompt": 5}', 400, "must be a string", "prompt"),
  (b'{"prompt": "   "}', 400, "is empty", "prompt"),
  (b'{"prompt": []}', 400, "empty list", "prompt"),
  (b'{"prompt": [1, 2]}', 400, "token ids is not supported", "prompt"),
  (b'{"prompt": "' + b"w1 " * 40 + b'"}', 400, "prompt too long", "prompt"),
  (json.dumps({"prompt": ["w1"] * 65}).encode(), 400, "65 prompts, limit 64", "prompt"),
  (b"{}", 400, "prompt is required", "prompt"),
  (b'{"prompt": "w1", "max_tokens": 0}', 400, "out of range", "max_tokens"),
  (b'{"prompt": "w1", "max_tokens": 300}', 400, "exceed the model's 256", "max_tokens"),
  (b'{"prompt": "w1", "max_tokens": "8"}', 400, "must be an integer", "max_tokens"),
  (b'{"prompt": "w1", "temperature": 2.5}', 400, "out of range", "temperature"),
  (b'{"prompt": "w1", "top_p": 0}', 400, "out of range", "top_p"),
  (b'{"prompt": "w1", "seed": 1.5}', 400, "must be an integer", "seed"),
  (b'{"prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}', 400, "limit 4", "stop"),
  (b'{"prompt": "w1", "stop": [""]}', 400, "non-empty string", "stop"),
  (b'{"prompt": "w1", "stream": "yes"}', 400, "true or false", "stream"),
  (b'{"prompt": "w1", "n": 2}', 400, "not supported", "n"),
  (b'{"prompt": "w1", "echo": true}', 400, "not supported", "echo"),
  (b'{"prompt": "w1", "logprobs": 3}', 400, "not supported", "logprobs"),
  (b'{"prompt": "w1", "model": "gpt-4"}', 404, "does not exist", "model"),
  (b'{"prompt": "w1 \\ud800"}', 400, "lone surrogate", "prompt"),
]


def test_bad_input_gets_openai_errors_naming_the_field(keyed_server):
  _, url = keyed_server
  for body, status, message, field in BAD:
    response = httpx.post(f"{url}/v1/completions", content=body, headers=AUTH, timeout=30)
    assert response.status_code == status, (body, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert message in error["message"] and error["param"] == field, (body, error)
  # null means "unset", as the official client sends it.
  nulls = {"prompt": "w1", "max_tokens": None, "temperature": None, "top_p": None, "stream": None}
  response = httpx.post(f"{url}/v1/completions", json=nulls, headers=AUTH, timeout=30)
  assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16
  # Real clients send extras: accepted and ignored.
  extra = {"prompt": "w1", "max_tokens": 2, "colour": "red", "n": 1, "logprobs": None, "user": "u"}
  response = httpx.post(f"{url}/v1/completions", json=extra, headers=AUTH, timeout=30)
  assert response.status_code == 200, response.text
  assert response.json()["usage"]["completion_tokens"] == 2


def test_metrics_and_no_compiles_after_all_of_it(keyed_server):
  _, url = keyed_server
  metrics = httpx.get(f"{url}/metrics").text

  def value(name):
    return float(re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.M).group(1))

  assert value("zerolm_time_to_first_token_seconds_count") >= 20
  assert value("zerolm_time_per_output_token_seconds_count") >= 20
  assert value("zerolm_slots") == 16
  assert value("zerolm_prefill_backlog") == 0
  # Generated tokens only: the prompts' are not counted.
  assert value("zerolm_output_tokens_total") >= 8 * 200 + 64
  model = httpx.get(f"{url}/v1/model", headers=AUTH).json()
  assert model["batching"] == "continuous" and model["slots"] == 16
  assert model["compiles_after_startup"] == 0


def test_sigterm_lets_streams_in_flight_finish_then_exits_0(keyed_server):
  """(Last in this module: it stops the module's server.)"""
  proc, url = keyed_server
  results, first = [], threading.Event()
  sender = threading.Thread(
    target=lambda: results.append(
      _stream(url, {**LONG, "max_tokens": 250}, lambda n: n == 1 and first.set())
    )
  )
  sender.start()
  assert first.wait(60)
  proc.send_signal(signal.SIGTERM)
  sender.join(timeout=120)
  assert proc.wait(timeout=60) == 0
  assert results and results[0]["done"] and results[0]["reasons"][-1] == "length"
  assert len([t for t in results[0]["texts"] if t]) == 250
  assert "serve: stopped by SIGTERM" in proc.stdout.read()
