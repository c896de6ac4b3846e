r"""Load test of a running server's OpenAI completions API (--mode=serve) on this machine.

python -m experiments.loadtest --url=http://127.0.0.1:8000 --requests=256 --request_rate=8 \
  --concurrency=0 --max_tokens=128

Requests (`POST /v1/completions`, streamed, the first half of a demo English sentence as the
prompt of each) arrive
as a Poisson process of --request_rate per second (inf: all at once), at most --concurrency in
flight (0: no cap), --requests in all. The definitions are those of vLLM's
benchmarks/benchmark_serving.py, so figures compare with it (one difference: an empty chunk
that only ends a stream is not counted as a token's, where vLLM counts every chunk with choices):
  TTFT  send -> the first token's chunk (its text, or none for a token that shows no text;
        an empty chunk that only ends the stream is not a token's)
  ITL   the gaps between successive tokens' chunks, pooled over all requests
  E2E   send -> the last token's chunk
  TPOT  (E2E - TTFT) / (output tokens - 1), per request with more than one output token
  output tokens: the stream's usage.completion_tokens, else its text chunks; output tokens/s and
  requests/s are over the benchmark's duration (the first arrival to the last answer).
A request fails on a status other than 200, an error, a stream without text or without
`data: [DONE]`, or past --timeout. Prints a summary, then the figures as one JSON line.
Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import ssl
import time
import urllib.parse

import httpx
import numpy as np
from absl import app, flags

from lm.data import synthetic

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "The server (loopback only).")
_REQUESTS = flags.DEFINE_integer("requests", 256, "Requests in all.")
_RATE = flags.DEFINE_float("request_rate", math.inf, "Poisson arrivals per second; inf = at once.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Most requests in flight; 0 = no cap.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens each request asks for.")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", True, "Generate max_tokens whatever the model says.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the arrival process.")
_TIMEOUT = flags.DEFINE_float("timeout", 60.0, "Seconds a request may take, stream included.")
_API_KEY = flags.DEFINE_string("api_key", None, "Sent as a Bearer token; default $OPENAI_API_KEY.")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass
class Record:
  """One request. Times in seconds: `scheduled` and `sent` after the benchmark's start (they
  differ while the concurrency cap holds it back), the rest after `sent`."""

  scheduled: float
  sent: float = 0.0
  ok: bool = False
  error: str = ""
  ttft: float = 0.0
  itl: list[float] = dataclasses.field(default_factory=list)
  latency: float = 0.0  # E2E: to the last token's chunk
  output_tokens: int = 0
  prompt_tokens: int = 0


@dataclasses.dataclass
class Load:
  """A load's raw result: every request's record, the duration and what was asked."""

  model: str
  duration: float
  records: list[Record]
  settings: dict


def arrivals(requests: int, rate: float, seed: int) -> np.ndarray:
  """Send times (s after the start) of a Poisson process: the first at 0, then exponential
  gaps of mean 1 / rate; all 0 for an infinite rate."""
  if math.isinf(rate):
    return np.zeros(requests)
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=max(requests - 1, 0))
  return np.concatenate([[0.0], np.cumsum(gaps)])[:requests]


def prompts(count: int) -> list[str]:
  """The first half (at least 2 words) of the demo's English sentences: a language model has
  a sentence to continue (after a whole one the demo LM says EOS, and past EOS only EOS, whose
  text is empty), a translation model a source to translate."""
  demo = synthetic.DemoSource(max(count, 1), seed=7)
  words = [demo[i][0].split() for i in range(count)]
  return [" ".join(w[: max(2, len(w) // 2)]) for w in words]


def _headers(api_key: str | None) -> dict:
  return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def served_model(url: str, api_key: str | None = None, timeout: float = 60.0) -> str:
  """The first model /v1/models lists."""
  async with httpx.AsyncClient(base_url=url, timeout=timeout, headers=_headers(api_key)) as c:
    listing = await c.get("/v1/models")
    listing.raise_for_status()
    return listing.json()["data"][0]["id"]


async def _complete(client: httpx.AsyncClient, body: dict, record: Record, timeout: float):
  """Streams one completion into `record`."""
  start = last = time.perf_counter()
  texts, usage, done = 0, {}, False
  try:
    async with asyncio.timeout(timeout):
      async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
          message = (await response.aread()).decode("utf-8", "replace")[:200]
          record.error = f"HTTP {response.status_code}: {message}"
          return
        async for line in response.aiter_lines():
          now = time.perf_counter()
          if done or not line.startswith("data:"):  # separators, ": keep-alive" comments
            continue
          data = line[len("data:") :].strip()
          if data == "[DONE]":  # read on to the body's end: a connection left unread closes
            done = True
            continue
          chunk = json.loads(data)
          if not isinstance(chunk, dict) or "error" in chunk:
            record.error = f"stream error: {data[:200]}"
            return
          # A token's chunk: its text, or none (a token that shows nothing, e.g. EOS under
          # ignore_eos, as vLLM counts them); an empty chunk that only ends the stream is not.
          choices = chunk.get("choices") or ()
          if any(c.get("text") or c.get("finish_reason") is None for c in choices):
            if texts:
              record.itl.append(now - last)
            else:
              record.ttft = now - start
            last, texts = now, texts + 1
          if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
  # ValueError: a chunk not JSON; AttributeError: a choice not an object
  except (httpx.HTTPError, TimeoutError, ValueError, AttributeError) as e:
    record.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return
  if not (texts and done):
    record.error = "the stream ended without [DONE]" if texts else "no text in the stream"
    return
  record.ok, record.latency = True, last - start
  record.output_tokens = usage.get("completion_tokens") or texts
  record.prompt_tokens = usage.get("prompt_tokens") or 0


async def load(
  url: str,
  requests: int,
  max_tokens: int,
  request_rate: float = math.inf,
  concurrency: int = 0,
  ignore_eos: bool = True,
  temperature: float = 0.0,
  seed: int = 0,
  timeout: float = 60.0,
  api_key: str | None = None,
  model: str | None = None,
) -> Load:
  """Sends the requests on the arrival schedule, at most `concurrency` (0: any number) at once,
  to `model` (default: the served one)."""
  headers = _headers(api_key)
  model = model or await served_model(url, api_key, timeout)
  texts = prompts(requests)
  records = [Record(float(t)) for t in arrivals(requests, request_rate, seed)]
  cap = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
  # A connection of its own per request in flight, reused by the next: one pool shared by every
  # request serializes them on its lock, and the load generator, not the server, became the
  # bottleneck (measured at concurrency 64: half the throughput that `ab` reaches). One TLS
  # context for them all: a client building its own takes ~30 ms, which would delay the sends.
  idle, opened, tls = [], [], ssl.create_default_context()

  async def send(i: int, start: float):
    record = records[i]
    await asyncio.sleep(max(0.0, start + record.scheduled - time.perf_counter()))
    async with cap:
      if not idle:
        opened.append(httpx.AsyncClient(base_url=url, timeout=timeout, headers=headers, verify=tls))
        idle.append(opened[-1])
      client = idle.pop()
      body = {
        "model": model,
        "prompt": texts[i],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
      }
      record.sent = time.perf_counter() - start
      try:
        await _complete(client, body, record, timeout)
      finally:
        idle.append(client)

  start = time.perf_counter()
  try:
    await asyncio.gather(*(send(i, start) for i in range(requests)))
    duration = time.perf_counter() - start
  finally:
    await asyncio.gather(*(client.aclose() for client in opened))
  settings = dict(
    request_rate=None if math.isinf(request_rate) else request_rate,  # None: all at once
    concurrency=concurrency,
    max_tokens=max_tokens,
    ignore_eos=ignore_eos,
    temperature=temperature,
    seed=seed,
  )
  return Load(model, duration, records, settings)


def _stats(name: str, seconds: list[float]) -> dict:
  """Mean, p50 and p99 in ms; None where no request gave one."""
  if not seconds:
    return {f"{k}_{name}_ms": None for k in ("mean", "p50", "p99")}
  ms = np.asarray(seconds) * 1000
  return {
    f"mean_{name}_ms": float(ms.mean()),
    f"p50_{name}_ms": float(np.percentile(ms, 50)),
    f"p99_{name}_ms": float(np.percentile(ms, 99)),
  }


def summary(result: Load) -> dict:
  """The figures of a load (module docstring), over its successful requests."""
  done = [r for r in result.records if r.ok]
  tokens = sum(r.output_tokens for r in done)
  tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
  return {
    "model": result.model,
    **result.settings,
    "requests": len(result.records),
    "completed": len(done),
    "failures": len(result.records) - len(done),
    "duration_s": result.duration,
    "request_throughput": len(done) / result.duration,
    "output_throughput": tokens / result.duration,
    "total_output_tokens": tokens,
    "total_input_tokens": sum(r.prompt_tokens for r in done),
    **_stats("ttft", [r.ttft for r in done]),
    **_stats("tpot", tpot),
    **_stats("itl", [gap for r in done for gap in r.itl]),
    **_stats("e2el", [r.latency for r in done]),
  }


def report(figures: dict) -> str:
  """The figures as a few readable lines."""
  rate = figures["request_rate"] or "inf"
  cap = figures["concurrency"] or "none"
  lines = [
    f"{figures['model']}: {figures['requests']} requests ({figures['failures']} failed), "
    f"rate {rate}/s, concurrency cap {cap}, max_tokens {figures['max_tokens']}",
    f"duration {figures['duration_s']:.2f} s: {figures['request_throughput']:.2f} requests/s, "
    f"{figures['output_throughput']:.1f} output tokens/s ({figures['total_output_tokens']} tokens)",
    f"{'':5}{'mean':>10}{'p50':>10}{'p99':>10}  ms",
  ]
  for name in ("ttft", "tpot", "itl", "e2el"):
    values = [figures[f"{k}_{name}_ms"] for k in ("mean", "p50", "p99")]
    cells = "".join(f"{'-' if v is None else f'{v:.1f}':>10}" for v in values)
    lines.append(f"{name.upper():5}{cells}")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
  host = urllib.parse.urlparse(_URL.value).hostname
  if host not in LOOPBACK:
    raise app.UsageError(f"--url: {host!r} is not loopback; this tool loads local servers only")
  for flag in (_REQUESTS, _MAX_TOKENS, _TIMEOUT, _RATE):
    if not flag.value > 0:
      raise app.UsageError(f"--{flag.name}: {flag.value} must be > 0")
  if _CONCURRENCY.value < 0:
    raise app.UsageError(f"--concurrency: {_CONCURRENCY.value} must be >= 0 (0: no cap)")
  api_key = _API_KEY.value or os.environ.get("OPENAI_API_KEY")
  try:
    model = asyncio.run(served_model(_URL.value, api_key, _TIMEOUT.value))
  except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
    raise app.UsageError(f"--url: {_URL.value}/v1/models names no model ({e!r})") from None
  result = asyncio.run(
    load(
      _URL.value,
      _REQUESTS.value,
      _MAX_TOKENS.value,
      request_rate=_RATE.value,
      concurrency=_CONCURRENCY.value,
      ignore_eos=_IGNORE_EOS.value,
      temperature=_TEMPERATURE.value,
      seed=_SEED.value,
      timeout=_TIMEOUT.value,
      api_key=api_key,
      model=model,
    )
  )
  figures = summary(result)
  print(report(figures))
  if failed := next((r.error for r in result.records if not r.ok), None):
    print(f"first failure: {failed}")
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
