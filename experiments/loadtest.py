"""Load test of a running server (--mode=serve) on this machine.

python -m experiments.loadtest --url=http://127.0.0.1:8000 --concurrency=64 --requests=512

C clients each send one sentence per request, back to back, until N requests are answered;
prints throughput (sentences/s, output tokens/s) and latency percentiles. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse

import httpx
import numpy as np
from absl import app, flags

from lm.data import synthetic

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "The server (loopback only).")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Clients sending at once.")
_REQUESTS = flags.DEFINE_integer("requests", 256, "Requests in all.")
_TIMEOUT = flags.DEFINE_float("timeout", 60.0, "Seconds a request may take.")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


async def load(url: str, concurrency: int, requests: int, timeout: float) -> dict:
  """Sends the requests; latencies, output tokens and failures."""
  demo = synthetic.DemoSource(max(requests, 1), seed=7)
  model = httpx.get(f"{url}/v1/model", timeout=timeout).json()
  translate = model["task"] == "translation"
  latencies, tokens, failures = [], 0, 0
  next_request = iter(range(requests))

  async def client():
    nonlocal tokens, failures
    # A connection of its own per client: one pool shared by every client serializes them on
    # its lock, and the load generator, not the server, became the bottleneck (measured at
    # concurrency 64: half the throughput that `ab` reaches on the same server).
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as session:
      for i in next_request:
        text = demo[i][0]
        body = {"text": text} if translate else {"prompt": text, "max_tokens": 16}
        start = time.perf_counter()
        path = "/v1/translate" if translate else "/v1/generate"
        response = await session.post(path, json=body)
        latencies.append(time.perf_counter() - start)
        if response.status_code != 200:
          failures += 1
          continue
        result = response.json()
        tokens += len(result["translations"][0].split()) if translate else len(result["tokens"])

  start = time.perf_counter()
  await asyncio.gather(*(client() for _ in range(concurrency)))
  elapsed = time.perf_counter() - start
  return {"elapsed": elapsed, "latencies": latencies, "tokens": tokens, "failures": failures}


def summary(result: dict, concurrency: int) -> dict:
  latencies = np.asarray(result["latencies"])
  answered = len(latencies) - result["failures"]
  return {
    "concurrency": concurrency,
    "requests": len(latencies),
    "failures": result["failures"],
    "sentences_per_s": answered / result["elapsed"],
    "tokens_per_s": result["tokens"] / result["elapsed"],
    **{f"p{q}_ms": float(np.percentile(latencies, q) * 1000) for q in (50, 90, 99)},
  }


def main(argv):
  del argv
  logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
  host = urllib.parse.urlparse(_URL.value).hostname
  if host not in LOOPBACK:
    raise app.UsageError(f"--url: {host!r} is not loopback; this tool loads local servers only")
  result = asyncio.run(load(_URL.value, _CONCURRENCY.value, _REQUESTS.value, _TIMEOUT.value))
  figures = summary(result, _CONCURRENCY.value)
  print(
    f"concurrency {figures['concurrency']}: {figures['requests']} requests "
    f"({figures['failures']} failed), {figures['sentences_per_s']:.1f} sentences/s, "
    f"{figures['tokens_per_s']:.0f} tokens/s (words for translation), latency p50 "
    f"{figures['p50_ms']:.0f} ms, p90 {figures['p90_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms"
  )
  print(json.dumps(figures))


if __name__ == "__main__":
  app.run(main)
