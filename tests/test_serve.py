"""The HTTP service: the real server on 127.0.0.1, against decode mode, bad input, load."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import pytest
import websockets.sync.client

from lm import checkpoint, decode, serve
from lm.data import synthetic
from lm.data import tokenizer as tok
from lm.train_step import Trainer
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _server(*args):
  """A server process (8 CPU devices) and its base URL, once /healthz answers."""
  port = _free_port()
  command = [sys.executable, "-m", "experiments.run", "--mode=serve", f"--port={port}", *args]
  proc = subprocess.Popen(
    command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 180
  while True:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "the server did not start within 180 s"
    with contextlib.suppress(httpx.TransportError):
      if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
        break
    time.sleep(0.3)
  try:
    yield proc, url
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=30)


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
  (b'{"text": "a", "beam_size": 0}', "out of range", "beam_size"),
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


def _counter(metrics: str, endpoint: str, status: str) -> float:
  pattern = rf'zerolm_requests_total{{endpoint="{endpoint}",status="{status}"}} ([0-9.e+]+)'
  found = re.search(pattern, metrics)
  return float(found.group(1)) if found else 0.0


def test_64_concurrent_clients_share_batches_without_compiling(translation_server, decoded):
  _, url = translation_server
  lines, expected = decoded
  picks = [i % len(lines) for i in range(64)]
  responses = asyncio.run(_post_all(url, [{"text": lines[i]} for i in picks]))
  assert [r.json()["translations"][0] for r in responses] == [expected[i] for i in picks]
  metrics = httpx.get(f"{url}/metrics").text
  batches = float(re.search(r"zerolm_batch_rows_count ([0-9.e+]+)", metrics).group(1))
  single = float(re.search(r'zerolm_batch_rows_bucket{le="1.0"} ([0-9.e+]+)', metrics).group(1))
  assert single < batches, "no batch held more than one row"
  model = httpx.get(f"{url}/v1/model").json()
  assert model["compiles_after_startup"] == 0
  assert model["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert len(model["compiled_shapes"]) >= 3  # one per source length bucket


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
  """An untrained tiny LM as an export: streaming is about the wire, not the model."""
  cfg = tiny_config("lm")
  cfg.data.seq_len = 32
  run = Trainer.build(cfg, devices=jax.devices()[:1])
  tokenizer = tok.train([f"w{i}" for i in range(100)] * 2, cfg.model.vocab_size, "word")
  directory = tmp_path_factory.mktemp("lm") / "export"
  checkpoint.write_export(str(directory), run.init_state().params, cfg, tokenizer, step=7)
  return directory


def test_generate_streams_the_tokens_it_returns_whole(lm_export, tmp_path):
  with _server(f"--workdir={tmp_path}", f"--export={lm_export}") as (_, url):
    body = {"prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 0.9, "seed": 3}
    whole = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
    assert whole["model_step"] == 7 and 1 <= len(whole["tokens"]) <= 8
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}) as r:
      events = [e for e in r.read().decode().split("\n\n") if e]
    streamed = [json.loads(e.removeprefix("data: "))["token"] for e in events[:-1]]
    assert streamed == whole["tokens"] and events[-1].startswith("event: done")
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
    ids = [[5, 6, 3]]
    with pytest.raises(serve.RequestError) as full:
      await service.submit(ids * 3, [0] * 3, decoder.options)
    assert full.value.status == 503 and full.value.headers == {"Retry-After": "1"}
    with pytest.raises(serve.RequestError) as slow:
      await service.submit(ids, [0], decoder.options)
    assert slow.value.status == 504 and "timeout_s" in slow.value.message

  asyncio.run(scenario())


def serve_settings(**overrides):
  from lm import config as lmc

  settings = lmc.translation_defaults().serve
  settings.update(overrides)
  return settings


def _chromium() -> str | None:
  for name in ("chromium", "chromium-browser"):
    path = shutil.which(name)
    if path:
      return path
  return None


class _Page:
  """One headless Chromium tab driven over the DevTools protocol."""

  def __init__(self, browser: str, profile):
    port = _free_port()
    self.proc = subprocess.Popen(
      [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--remote-debugging-port={port}",
        f"--user-data-dir={profile}",
        "--window-size=900,700",
        "about:blank",
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
      with contextlib.suppress(httpx.TransportError):
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
        pages = [t for t in targets if t["type"] == "page"]
        if pages:
          break
      assert time.time() < deadline, "Chromium did not open its debugging port"
      time.sleep(0.2)
    self.connection = contextlib.ExitStack()
    self.socket = self.connection.enter_context(
      websockets.sync.client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
    )
    self.next_id = 0

  def call(self, method: str, **params) -> dict:
    self.next_id += 1
    self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
    while True:
      message = json.loads(self.socket.recv(timeout=60))
      if message.get("id") == self.next_id:
        assert "error" not in message, message
        return message["result"]

  def js(self, expression: str):
    return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get(
      "value"
    )

  def wait_for(self, expression: str, timeout: float = 60):
    deadline = time.time() + timeout
    while not (value := self.js(expression)):
      assert time.time() < deadline, f"never true: {expression}"
      time.sleep(0.1)
    return value

  def close(self):
    self.connection.close()
    self.proc.kill()
    self.proc.wait(timeout=30)


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_translates_what_is_typed_in_a_real_browser(translation_server, tmp_path):
  _, url = translation_server
  page = _Page(_chromium(), tmp_path / "profile")
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
