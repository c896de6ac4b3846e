"""The HTTP service (--mode=serve): translation and generation with dynamic batching.

starlette + uvicorn. A request is validated and encoded, then queued as rows. One batching loop
takes rows with the same beam size, up to serve.max_batch, waiting at most serve.max_wait_ms
after the oldest, and decodes them on the mesh in a worker thread, one batch at a time (the
accelerator is the bottleneck; batches are how requests share it). A batch is padded to the
smallest row bucket (powers of two up to max_batch) that holds it, so light traffic does not
pay for full batches. Caps, seeds, temperature, top_k, top_p and alpha are per-row data: rows
with different settings share a batch and a program. The beam size is the one setting compiled
for: beam 1 and decode.beam_size, with every shape, at start-up; nothing compiles on the
request path (counted on /v1/model), and another beam size gets a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import prometheus_client as prom
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lm import metrics
from lm.data import tokenizer as tok
from lm.decode import DecodeOptions, Decoder, until_end
from lm.trees import param_count

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
TRANSLATE_FIELDS = {"text", "beam_size", "alpha", "max_length"}
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there
GENERATE_FIELDS = {"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stream"}


class RequestError(Exception):
  """A bad request: its HTTP status, a readable message and the field at fault."""

  def __init__(self, message: str, field: str | None = None, status: int = 400, headers=None):
    super().__init__(message)
    self.message, self.field, self.status, self.headers = message, field, status, headers

  def response(self) -> JSONResponse:
    error = {"message": self.message, **({"field": self.field} if self.field else {})}
    return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


@dataclasses.dataclass(frozen=True)
class RowSettings:
  """A request's decode settings: data in whatever batch its rows join, never a new program."""

  seed: int  # sampling: the row's own random stream
  temperature: float  # LM: 0 = greedy
  top_k: int
  top_p: float
  alpha: float  # beam search's length penalty

  @classmethod
  def of(cls, options: DecodeOptions) -> RowSettings:
    """The decode options' defaults."""
    return cls(options.seed, options.temperature, options.top_k, options.top_p, options.alpha)


@dataclasses.dataclass
class _Row:
  ids: list[int]
  cap: int  # most output tokens (0 = the settings' limit)
  settings: RowSettings
  future: asyncio.Future
  queued: float


class _Metrics:
  """Prometheus metrics of one server (its own registry: several servers in one process)."""

  def __init__(self, max_batch: int):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter(
      "zerolm_requests",
      "Requests answered, by endpoint and status.",
      ["endpoint", "status"],
      registry=r,
    )
    self.latency = prom.Histogram(
      "zerolm_request_seconds",
      "Request latency.",
      ["endpoint"],
      registry=r,
      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    )
    sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
    self.batch_rows = prom.Histogram(
      "zerolm_batch_rows",
      "Rows per decode batch.",
      registry=r,
      buckets=[s for s in sizes if s <= max_batch],
    )
    self.queue = prom.Gauge("zerolm_queue_rows", "Rows waiting for a batch.", registry=r)
    self.tokens = prom.Counter("zerolm_output_tokens", "Tokens generated.", registry=r)
    self.tokens_per_second = prom.Gauge(
      "zerolm_tokens_per_second", "Output tokens per second of the last batch.", registry=r
    )
    self.compiles = prom.Gauge(
      "zerolm_compiles_after_startup", "XLA compiles since start-up finished.", registry=r
    )


class Service:
  """The model behind the API: validation, the queue and the batching loop."""

  def __init__(self, decoder: Decoder, step: int, serve_cfg, log=print):
    self.step, self.cfg, self.log = step, serve_cfg, log
    self.task = decoder.layout.cfg.task
    self.max_batch = serve_cfg.max_batch
    d = decoder  # the model, tokenizer and default settings, batched up to max_batch rows
    self.decoder = Decoder(
      d.layout, d.params, d.tokenizer, d.options, self.max_batch, row_buckets=True
    )
    beam = d.options.beam_size if self.task == "translation" else 1
    self.beam_sizes = tuple(sorted({1, beam}))  # compiled at start-up; no other is served
    limit = self.decoder.max_input_tokens
    self.max_input_tokens = min(serve_cfg.max_input_tokens or limit, limit)
    self.queues: dict[int, list[_Row]] = {}  # by beam size
    self.queued = 0
    self.metrics = _Metrics(self.max_batch)
    self.compiled_shapes: list[tuple[int, int, int]] = []
    self.compiles_after_startup: list[float] | None = None
    self._arrived: asyncio.Event | None = None
    self._loop_task: asyncio.Task | None = None

  # -- start-up -------------------------------------------------------------------------------

  def warm_up(self) -> tuple[int, float]:
    """Compiles every program a request can use, each shape at each served beam size:
    (programs compiled, seconds)."""
    start = time.perf_counter()
    with metrics.counting_compiles() as compiles:
      for rows in self.decoder.row_counts:
        for width, out_len in self.decoder.shapes:
          eos = self.decoder.tokenizer.eos_id
          ids = [4] * (width - 1) + [eos] if self.task == "translation" else [4]
          for beam in self.beam_sizes:  # one token each: the program, not the output, matters
            self.decoder.decode_ids([ids] * rows, [1] * rows, beam_size=beam)
          self.compiled_shapes.append((rows, width, out_len))
    return len(compiles), time.perf_counter() - start

  # -- the batching loop ----------------------------------------------------------------------

  async def submit(
    self, rows: list[list[int]], caps: list[int], settings: RowSettings, beam_size: int = 1
  ):
    """Output tokens per row, once batches holding them have run. Requests of one beam size
    share batches whatever their other settings: those are per-row data, so a row's output
    is the same wherever it sits."""
    failure = self.batching_failure()
    if failure:
      raise RequestError(failure, status=503)
    if self.queued + len(rows) > self.cfg.max_queue:
      raise RequestError(
        f"the queue is full ({self.queued} rows waiting); retry shortly",
        status=503,
        headers={"Retry-After": "1"},
      )
    loop = asyncio.get_running_loop()
    now = loop.time()
    pending = [_Row(ids, cap, settings, loop.create_future(), now) for ids, cap in zip(rows, caps)]
    self.queues.setdefault(beam_size, []).extend(pending)
    self._count_queued()
    self._arrived.set()
    try:
      return await asyncio.wait_for(
        asyncio.gather(*(r.future for r in pending)), self.cfg.timeout_s
      )
    except TimeoutError:
      raise RequestError(
        f"not answered within serve.timeout_s={self.cfg.timeout_s:g} s", status=504
      ) from None
    finally:  # a timed-out or disconnected request's rows leave the queue (their slots free)
      for row in pending:
        row.future.cancel()

  async def _batches(self) -> None:
    loop = asyncio.get_running_loop()
    wait = self.cfg.max_wait_ms / 1000
    while True:
      await self._arrived.wait()
      self._arrived.clear()
      while True:
        for beam in list(self.queues):  # rows of cancelled requests leave here
          queue = [r for r in self.queues[beam] if not r.future.done()]
          if queue:
            self.queues[beam] = queue
          else:
            del self.queues[beam]
        self._count_queued()
        if not self.queues:
          break
        beam = min(self.queues, key=lambda b: self.queues[b][0].queued)
        queue = self.queues[beam]
        deadline = queue[0].queued + wait
        while len(queue) < self.max_batch and loop.time() < deadline:
          self._arrived.clear()
          with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
        batch = [r for r in queue[: self.max_batch] if not r.future.done()]
        del queue[: self.max_batch]
        self._count_queued()
        if batch:
          await self._run(batch, beam)

  def _count_queued(self) -> None:
    self.queued = sum(len(q) for q in self.queues.values())
    self.metrics.queue.set(self.queued)

  async def _run(self, batch: list[_Row], beam: int) -> None:
    start = time.perf_counter()
    settings = [r.settings for r in batch]
    decode = functools.partial(
      self.decoder.decode_ids,
      [r.ids for r in batch],
      [r.cap for r in batch],
      [s.seed for s in settings],
      temperatures=[s.temperature for s in settings],
      top_ks=[s.top_k for s in settings],
      top_ps=[s.top_p for s in settings],
      alphas=[s.alpha for s in settings],
      beam_size=beam,
    )
    try:
      out = await asyncio.to_thread(decode)
    except Exception as e:  # the batch's requests get a 500 each; the server goes on
      for row in batch:
        if not row.future.done():
          row.future.set_exception(e)
      return
    # Generated tokens only: an LM's output row starts with its prompt.
    skip = [len(r.ids) if self.task == "lm" else 0 for r in batch]
    stops = self.decoder.specials.stops
    tokens = sum(len(until_end(row[n:], stops)) for row, n in zip(out, skip))
    self.metrics.batch_rows.observe(len(batch))
    self.metrics.tokens.inc(tokens)
    self.metrics.tokens_per_second.set(tokens / max(time.perf_counter() - start, 1e-9))
    for row, tokens_row in zip(batch, out):
      if not row.future.done():
        row.future.set_result(tokens_row)

  @contextlib.asynccontextmanager
  async def running(self, app=None):
    """Starlette's lifespan: the batching loop runs while the app serves."""
    self._arrived = asyncio.Event()
    self._loop_task = asyncio.create_task(self._batches())
    self._loop_task.add_done_callback(self._stopped)
    with metrics.counting_compiles() as compiles:
      self.compiles_after_startup = compiles
      yield
    self._loop_task.cancel()

  def batching_failure(self) -> str | None:
    """Why the batching loop is not running (None while it runs, or before it starts)."""
    task = self._loop_task
    if task is None or not task.done() or task.cancelled():
      return None
    e = task.exception()
    return f"the batching loop died ({type(e).__name__}: {e})" if e else "the batching loop ended"

  def _stopped(self, task: asyncio.Task) -> None:
    failure = self.batching_failure()
    if failure is None:
      return
    self.log(f"serve: {failure}; /healthz answers 503")
    for queue in self.queues.values():  # nothing will decode these rows: answer them now
      for row in queue:
        if not row.future.done():
          row.future.set_exception(RequestError(failure, status=503))

  # -- requests -------------------------------------------------------------------------------

  def _encode(self, text: Any, field: str) -> list[int]:
    if not isinstance(text, str):
      raise RequestError(f"{field} must be a string, not {type(text).__name__}", field)
    if not text.strip():
      raise RequestError(f"{field} is empty", field)
    translation = self.task == "translation"
    ids = self.decoder.tokenizer.encode(text, "inputs" if translation else "targets")
    limit = self.max_input_tokens
    if len(ids) > limit:
      raise RequestError(f"{field} too long ({len(ids)} tokens, limit {limit})", field)
    return ids + [self.decoder.tokenizer.eos_id] if translation else ids

  async def translate(self, body: dict) -> dict:
    if self.task != "translation":
      raise RequestError("this model is a language model: use /v1/generate", status=404)
    _known(body, TRANSLATE_FIELDS)
    text = _required(body, "text")
    texts = text if isinstance(text, list) else [text]
    if isinstance(text, list) and not text:
      raise RequestError("text is an empty list", "text")
    if len(texts) > self.cfg.max_items:
      raise RequestError(f"{len(texts)} texts, limit {self.cfg.max_items}", "text")
    rows = [self._encode(t, "text") for t in texts]
    default = self.decoder.options
    beam = _choice(body, "beam_size", default.beam_size, self.beam_sizes)
    alpha = _number(body, "alpha", default.alpha, 0.0, 2.0)
    settings = dataclasses.replace(RowSettings.of(default), alpha=alpha)
    cap = _integer(body, "max_length", 0, 1, default.max_len)
    outputs = await self.submit(rows, [cap] * len(rows), settings, beam)
    translations = [self.decoder.tokenizer.decode(row) for row in outputs]
    return {"translations": translations, "model_step": self.step}

  async def generate(self, body: dict) -> tuple[dict, bool]:
    if self.task != "lm":
      raise RequestError("this model translates: use /v1/translate", status=404)
    _known(body, GENERATE_FIELDS)
    ids = self._encode(_required(body, "prompt"), "prompt")
    default = self.decoder.options
    room = self.decoder.shapes[0][1] - len(ids)  # at least 1: see Decoder.max_input_tokens
    settings = dataclasses.replace(
      RowSettings.of(default),
      seed=_integer(body, "seed", default.seed, 0, 2**31 - 1),
      temperature=_number(body, "temperature", default.temperature, 0.0, 5.0),
      top_k=_integer(body, "top_k", default.top_k, 0, self.decoder.layout.vocab_limit),
      top_p=_number(body, "top_p", default.top_p, 1e-6, 1.0),
    )
    cap = _integer(body, "max_tokens", room, 1, room)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
      raise RequestError("stream must be true or false", "stream")
    (row,) = await self.submit([ids], [cap], settings)
    tokens = until_end(row[len(ids) :], self.decoder.specials.stops)
    text = self.decoder.tokenizer.decode(tokens)
    return {"text": text, "tokens": tokens, "model_step": self.step}, stream

  def model_info(self) -> dict:
    layout = self.decoder.layout
    m = layout.cfg.model
    return {
      "task": self.task,
      "model": {
        "d_model": m.d_model,
        "num_heads": m.num_heads,
        "mlp_dim": m.mlp_dim,
        "enc_layers": m.enc_layers if self.task == "translation" else 0,
        "dec_layers": m.dec_layers,
        "params": param_count(self.decoder.params),
      },
      "vocab_size": self.decoder.tokenizer.vocab_size,
      "model_step": self.step,
      "mesh": dict(layout.mesh.shape),
      "zero_stage": layout.cfg.zero_stage,
      "max_batch": self.max_batch,
      "max_input_tokens": self.max_input_tokens,
      "max_output_tokens": self.decoder.max_output_tokens,
      **({"max_total_tokens": self.decoder.shapes[0][1]} if self.task == "lm" else {}),
      "beam_sizes": list(self.beam_sizes),
      "compiled_shapes": [list(s) for s in self.compiled_shapes],
      "compiles_after_startup": len(self.compiles_after_startup or []),
    }


def _known(body: dict, fields: set[str]) -> None:
  for name in body:
    if name not in fields:
      raise RequestError(f"unknown field {name!r}; known: {', '.join(sorted(fields))}", name)


def _required(body: dict, field: str):
  if field not in body:
    raise RequestError(f"{field} is required", field)
  return body[field]


def _integer(body: dict, field: str, default: int, low: int, high: int) -> int:
  if field not in body:
    return default
  value = body[field]
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{field} must be an integer", field)
  if not low <= value <= high:
    raise RequestError(f"{field}={value} is out of range [{low}, {high}]", field)
  return value


def _choice(body: dict, field: str, default: int, allowed: tuple[int, ...]) -> int:
  """An integer setting that programs are compiled for: one of `allowed`."""
  value = body.get(field, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{field} must be an integer", field)
  if value not in allowed:
    names = ", ".join(map(str, allowed))
    raise RequestError(f"{field}={value} is not served; allowed values: {names}", field)
  return value


def _number(body: dict, field: str, default: float, low: float, high: float) -> float:
  if field not in body:
    return default
  value = body[field]
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise RequestError(f"{field} must be a number", field)
  if not low <= value <= high:
    raise RequestError(f"{field}={value} is out of range [{low:g}, {high:g}]", field)
  return float(value)


async def _read_body(request: Request, limit: int) -> bytes:
  """The body, refused (413) as soon as it is known to pass `limit` bytes: from its declared
  length, or while it streams in (chunked)."""
  too_big = RequestError(f"the body is over serve.max_body_bytes={limit} bytes", status=413)
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    raise too_big
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise too_big
    chunks.append(chunk)
  return b"".join(chunks)


async def _json_body(request: Request, limit: int) -> dict:
  raw = await _read_body(request, limit)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise RequestError("the body is not UTF-8") from None
  try:
    body = json.loads(text)
  except json.JSONDecodeError as e:
    raise RequestError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  if not isinstance(body, dict):
    raise RequestError("the body must be a JSON object")
  return body


def app(service: Service) -> Starlette:
  """The ASGI app over a warmed-up service."""
  m = service.metrics

  def endpoint(name: str, handle):
    async def respond(request: Request) -> Response:
      start = time.perf_counter()
      try:
        body = await _json_body(request, service.cfg.max_body_bytes)
        work = asyncio.create_task(handle(request, body))
        # A client that goes away before its answer frees its rows: the handler is cancelled,
        # and Service.submit takes its rows out of the queue.
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
          if await request.is_disconnected():
            work.cancel()
            m.requests.labels(name, "499").inc()
            return Response(status_code=499)
        response = work.result()
      except RequestError as e:
        response = e.response()
      except Exception as e:  # one bad batch must not take the server down
        response = RequestError(f"internal error: {type(e).__name__}: {e}", status=500).response()
      m.requests.labels(name, str(response.status_code)).inc()
      m.latency.labels(name).observe(time.perf_counter() - start)
      return response

    return respond

  async def translate(request: Request, body: dict) -> Response:
    return JSONResponse(await service.translate(body))

  async def generate(request: Request, body: dict) -> Response:
    result, stream = await service.generate(body)
    if not stream:
      return JSONResponse(result)
    tokenizer = service.decoder.tokenizer

    async def events():  # each event carries what its token adds to the text
      pieces = tok.text_pieces(tokenizer.decode, result["tokens"])
      for token, piece in zip(result["tokens"], pieces):
        if await request.is_disconnected():
          return
        yield f"data: {json.dumps({'token': token, 'text': piece})}\n\n"
      yield f"event: done\ndata: {json.dumps({'model_step': service.step})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  async def health(request: Request) -> Response:
    failure = service.batching_failure()
    if failure:  # requests would never be answered: take this server out of rotation
      return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return JSONResponse({"status": "ok", **service.model_info()})

  async def model(request: Request) -> Response:
    return JSONResponse(service.model_info())

  async def metrics_text(request: Request) -> Response:
    m.compiles.set(len(service.compiles_after_startup or []))
    return Response(prom.generate_latest(m.registry), media_type=prom.CONTENT_TYPE_LATEST)

  async def page(request: Request) -> Response:
    return FileResponse(PAGE, media_type="text/html")

  routes = [
    Route("/", page),
    Route("/healthz", health),
    Route("/v1/model", model),
    Route("/metrics", metrics_text),
    Route("/v1/translate", endpoint("translate", translate), methods=["POST"]),
    Route("/v1/generate", endpoint("generate", generate), methods=["POST"]),
  ]
  return Starlette(routes=routes, lifespan=service.running)


def serve(decoder: Decoder, step: int, serve_cfg, host: str, port: int, log=print) -> None:
  """Warms up, then serves until SIGTERM/SIGINT (uvicorn stops taking connections, finishes
  the requests in flight, then returns)."""
  import uvicorn

  service = Service(decoder, step, serve_cfg, log)
  for line in decoder.layout.notes():
    log(f"serve: {line}")
  count, seconds = service.warm_up()
  log(
    f"serve: compiled {count} decode programs for {len(service.compiled_shapes)} shapes "
    f"(rows, width, output) {service.compiled_shapes} x beam sizes {list(service.beam_sizes)} "
    f"in {seconds:.1f}s; listening on http://{host}:{port}"
  )
  # uvicorn handles SIGTERM/SIGINT (stop accepting, finish what is in flight), then raises the
  # signal again for the handler that was there before: this one lets the process exit 0.
  stopped = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda number, frame: stopped.append(number))
  uvicorn.run(app(service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
  log(f"serve: stopped by {signal.Signals(stopped[0]).name}" if stopped else "serve: stopped")
