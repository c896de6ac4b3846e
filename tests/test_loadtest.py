"""The load test's figures against a fake OpenAI-style server whose stream timing is known."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from experiments import loadtest
from tests.helpers import ROOT, free_port

# Latencies to the millisecond: no other worker's test runs beside these (tests/conftest.py).
pytestmark = pytest.mark.alone

FIRST = 0.1  # s from a request's arrival to its first text chunk
GAP = 0.05  # s between text chunks
LAST = 0.15  # s from the last text chunk to a final empty one (finish_reason): no token
SLACK = 0.03  # s a figure may run late on a busy 2-core machine


@dataclasses.dataclass
class Fake:
  """What the fake server does and saw."""

  usage: bool = True  # sends the usage chunk
  words_per_chunk: int = 1  # > 1: chunks bundle tokens, as some servers' do
  status: int = 200
  bodies: list = dataclasses.field(default_factory=list)
  authorizations: list = dataclasses.field(default_factory=list)
  arrivals: list = dataclasses.field(default_factory=list)  # time.perf_counter()
  ports: set = dataclasses.field(default_factory=set)  # the clients' connections
  in_flight: int = 0
  max_in_flight: int = 0


def _event(data) -> str:
  return f"data: {json.dumps(data)}\n\n"


def _chunk(text: str, finish_reason, usage=None, choices=True) -> dict:
  choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
  return {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 0,
    "model": "fake-lm",
    "choices": [choice] if choices else [],
    "usage": usage,
  }


def _app(holder: dict) -> Starlette:
  """The fake server; it serves holder["fake"], which each test replaces with its own."""

  async def models(request):
    return JSONResponse({"object": "list", "data": [{"id": "fake-lm", "object": "model"}]})

  async def completions(request):
    arrived, fake = time.perf_counter(), holder["fake"]
    body = await request.json()
    fake.arrivals.append(arrived)
    fake.bodies.append(body)
    fake.authorizations.append(request.headers.get("authorization"))
    fake.ports.add(request.client.port)
    if fake.status != 200:
      return JSONResponse({"error": {"message": "refused"}}, status_code=fake.status)
    fake.in_flight += 1
    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
    words = [f" w{i}" for i in range(body["max_tokens"])]

    async def events():
      try:
        chunks = range(0, len(words), fake.words_per_chunk)
        for c, start in enumerate(chunks):  # on a fixed schedule: the gaps do not drift
          await asyncio.sleep(max(0.0, arrived + FIRST + c * GAP - time.perf_counter()))
          yield _event(_chunk("".join(words[start : start + fake.words_per_chunk]), None))
        await asyncio.sleep(LAST)
        yield _event(_chunk("", "length"))
        if fake.usage:
          usage = {"prompt_tokens": 5, "completion_tokens": len(words)}
          yield _event(_chunk("", None, usage, choices=False))
        yield "data: [DONE]\n\n"
      finally:
        fake.in_flight -= 1

    return StreamingResponse(events(), media_type="text/event-stream")

  routes = [Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
  return Starlette(routes=routes)


@pytest.fixture(scope="module")
def server():
  """(base URL, the holder of its Fake) of the fake server, run by uvicorn in a thread."""
  holder = {"fake": Fake()}
  port = free_port()
  config = uvicorn.Config(
    _app(holder), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
  )
  runner = uvicorn.Server(config)
  thread = threading.Thread(target=runner.run, daemon=True)
  thread.start()
  deadline = time.time() + 10
  while not runner.started:
    assert time.time() < deadline, "the fake server did not start"
    time.sleep(0.01)
  yield f"http://127.0.0.1:{port}", holder
  runner.should_exit = True
  thread.join(timeout=10)


def _run(server, fake: Fake, **kwargs) -> loadtest.Load:
  url, holder = server
  holder["fake"] = fake
  return asyncio.run(loadtest.load(url, **kwargs))


def test_latency_and_throughput_figures_follow_vllms_definitions(server):
  fake = Fake()
  result = _run(server, fake, requests=6, max_tokens=4, concurrency=2, api_key="secret")
  figures = loadtest.summary(result)
  assert figures["completed"] == 6 and figures["failures"] == 0
  assert figures["model"] == "fake-lm" and figures["request_rate"] is None
  # Every request asked for a stream with usage, of max_tokens past EOS, from the served model.
  for body in fake.bodies:
    assert body["model"] == "fake-lm" and body["max_tokens"] == 4 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
  assert sorted(b["prompt"] for b in fake.bodies) == sorted(loadtest.prompts(6))
  assert fake.authorizations == ["Bearer secret"] * 6
  # The final empty chunk (finish_reason) is neither a token nor a gap: 3 gaps of GAP each.
  assert all(len(r.itl) == 3 and r.output_tokens == 4 for r in result.records)
  ms = lambda seconds: 1000 * seconds
  assert ms(FIRST) <= figures["p50_ttft_ms"] <= ms(FIRST + SLACK)
  assert ms(GAP - 0.008) <= figures["p50_itl_ms"] <= ms(GAP + 0.008)
  # TPOT = (E2E - TTFT) / (tokens - 1) = GAP; over all tokens it would be 0.75 GAP, and E2E / tokens
  # 1.25 GAP.
  assert ms(GAP - 0.008) <= figures["p50_tpot_ms"] <= ms(GAP + 0.008)
  # E2E ends at the last text chunk, not at the stream's end LAST later.
  e2e = FIRST + 3 * GAP
  assert ms(e2e) <= figures["p50_e2el_ms"] <= ms(e2e + SLACK)
  # 3 waves of 2 requests, each stream open FIRST + 3 GAP + LAST.
  waves = 3 * (e2e + LAST)
  assert waves <= figures["duration_s"] <= waves + 0.3
  assert figures["total_output_tokens"] == 24 and figures["total_input_tokens"] == 30
  assert figures["output_throughput"] == pytest.approx(24 / figures["duration_s"])
  assert figures["request_throughput"] == pytest.approx(6 / figures["duration_s"])
  assert "TPOT" in loadtest.report(figures)


def test_output_tokens_are_the_usage_count_else_the_text_chunks(server):
  with_usage = _run(server, Fake(words_per_chunk=2), requests=1, max_tokens=4)
  (record,) = with_usage.records
  assert record.ok and record.output_tokens == 4 and len(record.itl) == 1
  tpot = loadtest.summary(with_usage)["mean_tpot_ms"] / 1000
  assert tpot == pytest.approx((record.latency - record.ttft) / 3)
  without = _run(server, Fake(words_per_chunk=2, usage=False), requests=1, max_tokens=4)
  assert without.records[0].output_tokens == 2 and without.records[0].prompt_tokens == 0


def test_poisson_arrivals_have_the_rate_and_are_reproducible():
  times = loadtest.arrivals(20_000, 50.0, seed=1)
  gaps = np.diff(times)
  assert times[0] == 0 and (gaps >= 0).all()
  assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
  assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV 1
  np.testing.assert_array_equal(times, loadtest.arrivals(20_000, 50.0, seed=1))
  assert not np.array_equal(times, loadtest.arrivals(20_000, 50.0, seed=2))
  np.testing.assert_array_equal(loadtest.arrivals(5, math.inf, seed=1), np.zeros(5))


def test_requests_are_sent_on_the_arrival_schedule(server):
  fake = Fake()
  result = _run(server, fake, requests=10, max_tokens=1, request_rate=10.0, seed=3)
  schedule = loadtest.arrivals(10, 10.0, seed=3)
  assert schedule[-1] > 0.4  # spread out, not at once
  np.testing.assert_allclose([r.scheduled for r in result.records], schedule)
  np.testing.assert_allclose([r.sent for r in result.records], schedule, atol=SLACK)
  arrived = np.sort(fake.arrivals) - min(fake.arrivals)
  np.testing.assert_allclose(arrived, schedule, atol=SLACK)
  assert loadtest.summary(result)["request_rate"] == 10.0


def test_concurrency_caps_the_requests_in_flight_each_on_its_own_connection(server):
  capped = Fake()
  result = _run(server, capped, requests=9, max_tokens=1, concurrency=3)
  assert capped.max_in_flight == 3 and len(capped.ports) == 3
  sent = sorted(r.sent for r in result.records)
  assert sent[3] >= FIRST + LAST  # the 4th waits for a slot
  uncapped = Fake()
  _run(server, uncapped, requests=6, max_tokens=1, concurrency=0)
  assert uncapped.max_in_flight == 6


def test_failures_are_counted_not_measured(server):
  result = _run(server, Fake(), requests=3, max_tokens=2, timeout=FIRST / 2)
  figures = loadtest.summary(result)
  assert figures["failures"] == 3 and figures["completed"] == 0
  assert figures["p50_ttft_ms"] is None and figures["output_throughput"] == 0
  assert all(r.error == "TimeoutError" for r in result.records)
  refused = _run(server, Fake(status=503), requests=2, max_tokens=2)
  assert [r.error[:8] for r in refused.records] == ["HTTP 503"] * 2


def test_a_non_loopback_url_is_refused_in_one_line():
  run = subprocess.run(
    [sys.executable, "-m", "experiments.loadtest", "--url=http://192.0.2.1:8000"],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
    "--url: '192.0.2.1' is not loopback; this tool loads local servers only"
  )
