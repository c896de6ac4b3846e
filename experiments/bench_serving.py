r"""Static vs continuous batching under load: one server of each, loaded in alternation.

python -m experiments.bench_serving --workdir=runs/demo_lm --config=experiments/demo.py:lm \
  --clients=1,8,64 --max_tokens=64

Starts `--mode=serve` twice over the same checkpoint (serve.batching static and continuous,
the other settings as --config and its overrides give them) on loopback ports, then for each
client count runs experiments.loadtest against one and then the other (paired, alternating:
this machine's speed drifts between runs), with `clients` requests in flight at once, each
streaming `max_tokens` tokens (ignore_eos: equal work for both), `--rounds` rounds of
max(4 x clients, 32) requests; the last round's figures are reported (the first warms the
client's connections). Prints a Markdown table: TTFT and TPOT p50 / p99, output tokens/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from absl import app, flags

from experiments import loadtest

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained model's workdir.", required=True)
_CONFIG = flags.DEFINE_string("config", None, "experiments/<module>.py[:variant] for serving.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "--config.X=Y for both servers.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "64"], "Requests in flight at once.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds per client count and server.")
MODES = ("static", "continuous")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _server(mode: str):
  port = _free_port()
  command = [
    sys.executable,
    "-m",
    "experiments.run",
    "--mode=serve",
    f"--port={port}",
    f"--workdir={_WORKDIR.value}",
    *([f"--config={_CONFIG.value}"] if _CONFIG.value else []),
    f"--config.serve.batching={mode}",
    *(f"--config.{o}" for o in _OVERRIDES.value),
  ]
  log = tempfile.TemporaryFile("w+")  # read only if it fails; a pipe nobody reads would fill
  proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 600
    while True:
      if proc.poll() is not None:
        log.seek(0)
        raise RuntimeError(f"the {mode} server stopped:\n{log.read()[-3000:]}")
      if time.time() > deadline:
        raise RuntimeError(f"the {mode} server did not start in 600 s")
      with contextlib.suppress(httpx.TransportError):
        if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
          break
      time.sleep(0.5)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=120)


def main(argv):
  del argv
  logging.getLogger("httpx").setLevel(logging.WARNING)
  clients = [int(c) for c in _CLIENTS.value]
  rows = []
  with _server("static") as static, _server("continuous") as continuous:
    urls = dict(zip(MODES, (static, continuous)))
    for count in clients:
      requests = max(4 * count, 32)
      figures = {}
      for _ in range(_ROUNDS.value):
        for mode in MODES:
          tokens = loadtest._MAX_TOKENS.value  # the load test's --max_tokens
          result = asyncio.run(loadtest.load(urls[mode], requests, tokens, concurrency=count))
          figures[mode] = loadtest.summary(result)
      for mode in MODES:
        f = figures[mode]
        rows.append((mode, count, f))
        print(json.dumps({"batching": mode, "clients": count, **f}))
  print()
  print("| batching | clients | TTFT p50 / p99 ms | TPOT p50 / p99 ms | output tokens/s | failed |")
  print("|---|---|---|---|---|---|")
  for mode, count, f in rows:
    print(
      f"| {mode} | {count} | {f['p50_ttft_ms']:.0f} / {f['p99_ttft_ms']:.0f} | "
      f"{f['p50_tpot_ms']:.1f} / {f['p99_tpot_ms']:.1f} | {f['output_throughput']:.0f} | "
      f"{f['failures']} |"
    )
  by = {(mode, count): f for mode, count, f in rows}
  for count in clients:
    s, c = by["static", count], by["continuous", count]
    print(
      f"{count} clients: TTFT p50 {s['p50_ttft_ms'] / c['p50_ttft_ms']:.1f}x lower, output "
      f"tokens/s x{c['output_throughput'] / s['output_throughput']:.2f} with continuous batching"
    )


if __name__ == "__main__":
  app.run(main)
