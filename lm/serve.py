"""The HTTP service (--mode=serve): translation and generation, continuous or static batching.

starlette + uvicorn. A request is validated and encoded, then decoded in one of two ways.
Continuous batching (serve.batching=continuous, the default; lm/engine.py): every greedy or
sampled row takes a decode slot as one frees, and its tokens reach the client as they are made
(server-sent events when streaming). Static batching (and beam search, always): rows with the
same beam size are queued, and one loop takes up to serve.max_batch of them, waiting at most
serve.max_wait_ms after the oldest, and decodes them in a worker thread, one batch at a time,
padded to the smallest row bucket (powers of two up to max_batch) that holds them. Caps, seeds,
temperature, top_k, top_p and alpha are per-row data either way: any mix shares one program.
Every program is compiled at start-up (the beam size is the one setting compiled for: beam 1
and decode.beam_size; another gets a 400); nothing compiles on the request path (counted on
/v1/model). lm/openai_api.py adds the OpenAI-compatible /v1/completions and /v1/models.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import prometheus_client as prom
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lm import api, metrics, openai_api
from lm.data import multilingual
from lm.data import tokenizer as tok
from lm.decode import Decoder, until_end
from lm.engine import Engine, Generation
from lm.trees import param_count

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")
TRANSLATE_FIELDS = {"text", "beam_size", "alpha", "max_length", "target_lang"}
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there
GENERATE_FIELDS = {"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stream"}
TOKENS_PER_SECOND_WINDOW_S = 10.0  # zerolm_tokens_per_second counts the tokens of this window
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass
class _Row:
  ids: list[int]
  cap: int  # most output tokens (0 = the settings' limit)
  settings: api.RowSettings
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
      "zerolm_tokens_per_second",
      f"Generated tokens per second over the last {TOKENS_PER_SECOND_WINDOW_S:g} s.",
      registry=r,
    )
    self.compiles = prom.Gauge(
      "zerolm_compiles_after_startup", "XLA compiles since start-up finished.", registry=r
    )
    self.ttft = prom.Histogram(
      "zerolm_time_to_first_token_seconds",
      "From a request's arrival to its first generated token.",
      registry=r,
      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
    )
    self.tpot = prom.Histogram(
      "zerolm_time_per_output_token_seconds",
      "Per request of more than one token: (end - first token) / (tokens - 1).",
      registry=r,
      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    )
    self.slots = prom.Gauge("zerolm_slots", "Continuous batching's decode slots.", registry=r)
    self.slots_in_use = prom.Gauge("zerolm_slots_in_use", "Decode slots generating.", registry=r)
    self.backlog = prom.Gauge(
      "zerolm_prefill_backlog", "Requests waiting for a decode slot.", registry=r
    )
    self._recent = collections.deque()  # (perf_counter, tokens) of the last window

  def generated(self, count: int) -> None:
    """`count` new tokens (from any thread)."""
    self.tokens.inc(count)
    self._recent.append((time.perf_counter(), count))

  def refresh(self, engine: Engine | None) -> None:
    """The gauges read at scrape time."""
    now = time.perf_counter()
    while self._recent and self._recent[0][0] < now - TOKENS_PER_SECOND_WINDOW_S:
      self._recent.popleft()
    recent = sum(count for _, count in list(self._recent))
    self.tokens_per_second.set(recent / TOKENS_PER_SECOND_WINDOW_S)
    if engine is not None:
      self.slots.set(engine.slots)
      self.slots_in_use.set(engine.slots_in_use)
      self.backlog.set(engine.backlog)


class Service:
  """The model behind the API: validation, continuous batching's engine, the static queue."""

  def __init__(self, decoder: Decoder, step: int, serve_cfg, log=print):
    self.step, self.cfg, self.log = step, serve_cfg, log
    self.task = decoder.layout.cfg.task
    self.languages = multilingual.target_languages(decoder.layout.cfg)  # () for one pair
    self.max_batch = serve_cfg.max_batch
    d = decoder  # the model, tokenizer and default settings, batched up to max_batch rows
    self.decoder = Decoder(
      d.layout, d.params, d.tokenizer, d.options, self.max_batch, row_buckets=True
    )
    beam = d.options.beam_size if self.task == "translation" else 1
    self.beam_sizes = tuple(sorted({1, beam}))  # compiled at start-up; no other is served
    limit = self.decoder.max_input_tokens
    self.max_input_tokens = min(serve_cfg.max_input_tokens or limit, limit)
    self.engine = None
    if serve_cfg.batching == "continuous":
      self.engine = Engine(
        self.decoder,
        serve_cfg.slots,
        serve_cfg.steps_per_chunk,
        serve_cfg.prefill_rows,
        self.decoder.options.length_buckets,
        log,
      )
    self.queues: dict[int, list[_Row]] = {}  # by beam size
    self.queued = 0
    self.metrics = _Metrics(self.max_batch)
    if self.engine is not None:
      self.engine.on_tokens = self.metrics.generated
    self.compiled_shapes: list[tuple[int, int, int]] = []
    self.compiles_after_startup: list[float] | None = None
    self._arrived: asyncio.Event | None = None
    self._loop_task: asyncio.Task | None = None

  @property
  def batched_beam_sizes(self) -> tuple[int, ...]:
    """The beam sizes static batches serve: all of them, or with slots only beam search's."""
    return tuple(b for b in self.beam_sizes if self.engine is None or b > 1)

  # -- start-up -------------------------------------------------------------------------------

  def warm_up(self) -> tuple[int, float]:
    """Compiles every program a request can use: the engine's, and each static batch shape at
    each beam size static batches serve: (programs compiled, seconds)."""
    start = time.perf_counter()
    with metrics.counting_compiles() as compiles:
      for rows in self.decoder.row_counts if self.batched_beam_sizes else ():
        for width, out_len in self.decoder.shapes:
          eos = self.decoder.tokenizer.eos_id
          ids = [4] * (width - 1) + [eos] if self.task == "translation" else [4]
          for beam in self.batched_beam_sizes:  # one token: the program, not the output, matters
            self.decoder.decode_ids([ids] * rows, [1] * rows, beam_size=beam)
          self.compiled_shapes.append((rows, width, out_len))
      if self.engine is not None:
        self.engine.warm_up()
    return len(compiles), time.perf_counter() - start

  # -- one row's output, from the slots or a batch -------------------------------------------

  def output(
    self,
    ids: list[int],
    cap: int,
    settings: api.RowSettings,
    beam_size: int = 1,
    ignore_eos: bool = False,
  ) -> AsyncIterator[tuple[list[int], str | None]]:
    """A row's tokens as they come: runs of (tokens, finish reason or None); the last run
    has its reason, "stop" (an end token, not among the tokens) or "length". Refused (503)
    here, before anything is queued, when the server cannot take it; the row is queued when
    the iterator is first awaited, and leaves its slot or queue when the iterator is closed."""
    self._check_room(1)
    settings = dataclasses.replace(settings, ignore_eos=ignore_eos)
    if self.engine is not None and beam_size == 1:
      return self._from_slots(ids, cap, settings)
    return self._from_batch(ids, cap, settings, beam_size)

  def _check_room(self, rows: int) -> None:
    failure = self.batching_failure()
    if failure:
      raise api.RequestError(failure, status=503)
    waiting = self.queued + (self.engine.backlog if self.engine is not None else 0)
    if waiting + rows > self.cfg.max_queue:
      raise api.RequestError(
        f"the queue is full ({waiting} rows waiting); retry shortly",
        status=503,
        headers={"Retry-After": "1"},
      )

  async def _from_slots(self, ids, cap, settings: api.RowSettings):
    loop = asyncio.get_running_loop()
    runs: asyncio.Queue = asyncio.Queue()

    def emit(tokens, reason):  # from the engine's thread
      with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
        loop.call_soon_threadsafe(runs.put_nowait, (tokens, reason))

    g = Generation(
      ids,
      emit,
      cap,
      settings.seed,
      settings.temperature,
      settings.top_k,
      settings.top_p,
      settings.ignore_eos,
    )
    arrived, first, count = time.perf_counter(), None, 0
    self.engine.submit(g)
    try:
      while True:
        try:  # the wait for a slot is bounded; a generation, once started, runs to its end
          timeout = self.cfg.timeout_s if first is None else None
          tokens, reason = await asyncio.wait_for(runs.get(), timeout)
        except TimeoutError:
          raise api.RequestError(
            f"no token within serve.timeout_s={self.cfg.timeout_s:g} s", status=504
          ) from None
        if reason == "error":
          raise api.RequestError(self.batching_failure() or "the engine stopped", status=503)
        if tokens and first is None:
          first = time.perf_counter()
          self.metrics.ttft.observe(first - arrived)
        count += len(tokens)
        if reason and count > 1:
          self.metrics.tpot.observe((time.perf_counter() - first) / (count - 1))
        yield tokens, reason
        if reason:
          return
    finally:  # a client gone, a stop string, a timeout: the slot frees at the next step
      g.cancelled = True

  async def _from_batch(self, ids, cap, settings: api.RowSettings, beam_size: int):
    arrived = time.perf_counter()
    (row,) = await self.submit([ids], [cap], settings, beam_size)
    row, limit = row[len(ids) :] if self.task == "lm" else row, self.output_limit(ids, cap)
    if settings.ignore_eos:
      tokens = [int(t) for t in row[:limit]]
    else:
      tokens = until_end(row, self.decoder.specials.stops)
    if tokens:
      self.metrics.ttft.observe(time.perf_counter() - arrived)
    yield tokens, "length" if len(tokens) >= limit else "stop"

  def output_limit(self, ids: list[int], cap: int) -> int:
    """The most tokens a row's output may have: its cap within the model's limits."""
    if self.task == "lm":
      width = self.decoder.shapes[0][1]
      return (min(len(ids) + cap, width) if cap > 0 else width) - len(ids)
    o = self.decoder.options
    limit = math.ceil(o.max_len_a * len(ids) + o.max_len_b)
    limit = min(limit, cap) if cap > 0 else limit
    return max(1, min(limit, self.decoder._output_len(self.decoder.src_len)))

  async def collect(self, runs: AsyncIterator) -> tuple[list[int], str]:
    """A whole output, within serve.timeout_s: (tokens, finish reason)."""

    async def whole():
      tokens = []
      async for run, reason in runs:
        tokens += run
        if reason:
          return tokens, reason

    try:
      return await asyncio.wait_for(whole(), self.cfg.timeout_s)
    except TimeoutError:
      raise api.RequestError(
        f"not answered within serve.timeout_s={self.cfg.timeout_s:g} s", status=504
      ) from None
    finally:
      await runs.aclose()

  # -- the batching loop ----------------------------------------------------------------------

  async def submit(
    self, rows: list[list[int]], caps: list[int], settings: api.RowSettings, beam_size: int = 1
  ):
    """Output tokens per row, once batches holding them have run. Requests of one beam size
    share batches whatever their other settings: those are per-row data, so a row's output
    is the same wherever it sits."""
    self._check_room(len(rows))
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
      raise api.RequestError(
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
      ignore_eos=[s.ignore_eos for s in settings],
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
    tokens = sum(
      self.output_limit(r.ids, r.cap) if r.settings.ignore_eos else len(until_end(row[n:], stops))
      for r, row, n in zip(batch, out, skip)
    )
    self.metrics.batch_rows.observe(len(batch))
    self.metrics.generated(tokens)
    for row, tokens_row in zip(batch, out):
      if not row.future.done():
        row.future.set_result(tokens_row)

  @contextlib.asynccontextmanager
  async def running(self, app=None):
    """Starlette's lifespan: the batching loop and the engine run while the app serves."""
    self._arrived = asyncio.Event()
    self._loop_task = asyncio.create_task(self._batches())
    self._loop_task.add_done_callback(self._stopped)
    if self.engine is not None:
      self.engine.start()
    try:
      with metrics.counting_compiles() as compiles:
        self.compiles_after_startup = compiles
        yield
    finally:
      self._loop_task.cancel()
      if self.engine is not None:
        self.engine.stop()

  def batching_failure(self) -> str | None:
    """Why the batching loop or the engine is not running (None while they run, or before
    they start)."""
    e = self.engine.failure if self.engine is not None else None
    if e is not None:
      return f"the decode engine died ({type(e).__name__}: {e})"
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
          row.future.set_exception(api.RequestError(failure, status=503))

  # -- requests -------------------------------------------------------------------------------

  def _encode(self, text: Any, field: str, target_lang: str | None = None) -> list[int]:
    text = api.text(text, field)
    translation = self.task == "translation"
    if translation:  # a multi-pair model's source starts with its target's tag
      text = multilingual.prefixed(text, self.languages, target_lang)
    ids = self.decoder.tokenizer.encode(text, "inputs" if translation else "targets")
    limit = self.max_input_tokens
    if len(ids) > limit:
      raise api.RequestError(f"{field} too long ({len(ids)} tokens, limit {limit})", field)
    return ids + [self.decoder.tokenizer.eos_id] if translation else ids

  async def translate(self, body: dict) -> dict:
    if self.task != "translation":
      raise api.RequestError("this model is a language model: use /v1/generate", status=404)
    api.known_fields(body, TRANSLATE_FIELDS)
    text = api.required(body, "text")
    texts = text if isinstance(text, list) else [text]
    if isinstance(text, list) and not text:
      raise api.RequestError("text is an empty list", "text")
    if len(texts) > self.cfg.max_items:
      raise api.RequestError(f"{len(texts)} texts, limit {self.cfg.max_items}", "text")
    target_lang = api.target_language(body, self.languages)
    rows = [self._encode(t, "text", target_lang) for t in texts]
    default = self.decoder.options
    beam = api.choice(body, "beam_size", default.beam_size, self.beam_sizes)
    alpha = api.number(body, "alpha", default.alpha, 0.0, 2.0)
    settings = dataclasses.replace(api.RowSettings.of(default), alpha=alpha)
    cap = api.integer(body, "max_length", 0, 1, default.max_len)
    if self.engine is not None and beam == 1:  # each row its own slot
      self._check_room(len(rows))
      outputs = await api.gather_or_cancel(
        [self.collect(self.output(r, cap, settings)) for r in rows]
      )
      outputs = [tokens for tokens, _ in outputs]
    else:  # the rows share static batches
      outputs = await self.submit(rows, [cap] * len(rows), settings, beam)
    translations = [self.decoder.tokenizer.decode(row) for row in outputs]
    return {"translations": translations, "model_step": self.step}

  def generation_request(self, body: dict) -> tuple[list[int], int, api.RowSettings, bool]:
    """/v1/generate's body: (prompt ids, max tokens, settings, stream)."""
    if self.task != "lm":
      raise api.RequestError("this model translates: use /v1/translate", status=404)
    api.known_fields(body, GENERATE_FIELDS)
    ids = self._encode(api.required(body, "prompt"), "prompt")
    default = self.decoder.options
    room = self.decoder.shapes[0][1] - len(ids)  # at least 1: see Decoder.max_input_tokens
    settings = dataclasses.replace(
      api.RowSettings.of(default),
      seed=api.integer(body, "seed", default.seed, 0, 2**31 - 1),
      temperature=api.number(body, "temperature", default.temperature, 0.0, 5.0),
      top_k=api.integer(body, "top_k", default.top_k, 0, self.decoder.layout.vocab_limit),
      top_p=api.number(body, "top_p", default.top_p, 1e-6, 1.0),
    )
    cap = api.integer(body, "max_tokens", room, 1, room)
    return ids, cap, settings, api.flag(body, "stream")

  async def generate(self, body: dict) -> dict:
    """/v1/generate without streaming: the whole continuation."""
    ids, cap, settings, _ = self.generation_request(body)
    tokens, reason = await self.collect(self.output(ids, cap, settings))
    text = self.decoder.tokenizer.decode(tokens)
    return {"text": text, "tokens": tokens, "finish_reason": reason, "model_step": self.step}

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
      **({"target_languages": list(self.languages)} if self.task == "translation" else {}),
      "batching": self.cfg.batching,
      **(self._engine_info() if self.engine is not None else {}),
      "compiled_shapes": [list(s) for s in self.compiled_shapes],
      "compiles_after_startup": len(self.compiles_after_startup or []),
    }

  def _engine_info(self) -> dict:
    e = self.engine
    return {
      "slots": e.slots,
      "steps_per_chunk": e.steps_per_chunk,
      "prefill_shapes": [[rows, width] for rows in e.prefill_counts for width in e.widths],
    }


class ApiKeys:
  """ASGI middleware: every /v1/ request (and /healthz, /metrics with `guard_probes`) needs
  `Authorization: Bearer KEY` with one of `keys`; anything else gets a 401 in the OpenAI error
  shape. Keys are compared as SHA-256 digests, each one every time, in constant time."""

  def __init__(self, app, keys: list[str], guard_probes: bool = False, on_refused=None):
    self.app, self.guard_probes, self.on_refused = app, guard_probes, on_refused
    self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

  def guarded(self, path: str) -> bool:
    return path.startswith("/v1/") or (self.guard_probes and path in ("/healthz", "/metrics"))

  def allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
    given = dict(headers).get(b"authorization", b"")
    scheme, _, key = given.partition(b" ")
    digest = hashlib.sha256(key.strip()).digest()
    matched = False
    for known in self.digests:  # no early exit: the time taken tells nothing of which matched
      matched |= hmac.compare_digest(digest, known)
    return matched and scheme.lower() == b"bearer"

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http" and self.guarded(scope["path"]):
      if not self.allowed(scope["headers"]):
        if self.on_refused:
          self.on_refused(scope["path"])
        refused = api.RequestError(
          "a valid API key is required: send Authorization: Bearer KEY",
          status=401,
          code="invalid_api_key",
          headers={"WWW-Authenticate": "Bearer"},
        )
        await refused.response(openai=True)(scope, receive, send)
        return
    await self.app(scope, receive, send)


def read_api_keys(path: str) -> list[str]:
  """One key per line (blank lines and surrounding spaces ignored); at least one."""
  from lm import paths

  keys = [line.strip() for line in paths.resolve(path).read_text().splitlines() if line.strip()]
  if not keys:
    raise ValueError(f"--api_key_file={path} holds no key (one per line)")
  return keys


def endpoint(service: Service, name: str, handle, openai: bool = False):
  """A POST route: the JSON body, then `handle(request, body)`'s response; errors in the API's
  shape; a client that goes away before its answer cancels the handler, freeing its rows."""
  m = service.metrics

  async def respond(request: Request) -> Response:
    start = time.perf_counter()
    try:
      body = await api.json_body(request, service.cfg.max_body_bytes)
      work = asyncio.create_task(handle(request, body))
      while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
          work.cancel()
          m.requests.labels(name, "499").inc()
          return Response(status_code=499)
      response = work.result()
    except api.RequestError as e:
      response = e.response(openai)
    except Exception as e:  # one bad batch must not take the server down
      error = api.RequestError(f"internal error: {type(e).__name__}: {e}", status=500)
      response = error.response(openai)
    m.requests.labels(name, str(response.status_code)).inc()
    m.latency.labels(name).observe(time.perf_counter() - start)
    return response

  return respond


def app(service: Service, api_keys: list[str] | None = None, guard_probes: bool = False):
  """The ASGI app over a warmed-up service; with `api_keys`, /v1/ needs one (ApiKeys)."""
  m = service.metrics

  async def translate(request: Request, body: dict) -> Response:
    return JSONResponse(await service.translate(body))

  async def generate(request: Request, body: dict) -> Response:
    if not body.get("stream", False):
      return JSONResponse(await service.generate(body))
    ids, cap, settings, _ = service.generation_request(body)
    runs = await api.started(service.output(ids, cap, settings))
    text = tok.TextStream(service.decoder.tokenizer.decode)

    async def events():  # each token's event carries what it adds to the text
      reason = None
      try:
        async for tokens, reason in runs:
          for n, token in enumerate(tokens):
            piece = text.add(token, last=bool(reason) and n == len(tokens) - 1)
            yield api.sse({"token": token, "text": piece})
      except api.RequestError as e:  # after the headers: the error is the stream's last event
        yield f"event: error\n{api.sse({'error': {'message': e.message}})}"
        return
      finally:
        await runs.aclose()
      done = {"finish_reason": reason, "text": text.flush(), "model_step": service.step}
      yield f"event: done\n{api.sse(done)}"

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
    m.refresh(service.engine)
    return Response(prom.generate_latest(m.registry), media_type=prom.CONTENT_TYPE_LATEST)

  async def page(request: Request) -> Response:
    return FileResponse(PAGE, media_type="text/html")

  completions = openai_api.Completions(service)
  routes = [
    Route("/", page),
    Route("/healthz", health),
    Route("/v1/model", model),
    Route("/metrics", metrics_text),
    Route("/v1/translate", endpoint(service, "translate", translate), methods=["POST"]),
    Route("/v1/generate", endpoint(service, "generate", generate), methods=["POST"]),
    Route(
      "/v1/completions",
      endpoint(service, "completions", completions.respond, openai=True),
      methods=["POST"],
    ),
    Route("/v1/models", completions.models),
  ]
  asgi = Starlette(routes=routes, lifespan=service.running)
  if not api_keys:
    return asgi

  known = {"/v1/translate": "translate", "/v1/generate": "generate"}
  known |= {"/v1/completions": "completions", "/v1/models": "models", "/v1/model": "model"}
  known |= {"/healthz": "healthz", "/metrics": "metrics"}

  def refused(path: str) -> None:  # a label per route: a client's paths must not mint series
    m.requests.labels(known.get(path, "other"), "401").inc()

  return ApiKeys(asgi, api_keys, guard_probes, refused)


def serve(
  decoder: Decoder,
  step: int,
  serve_cfg,
  host: str,
  port: int,
  log=print,
  api_keys: list[str] | None = None,
  guard_probes: bool = False,
) -> None:
  """Warms up, then serves until SIGTERM/SIGINT (uvicorn stops taking connections, finishes
  the requests in flight, streams included, then returns)."""
  service = Service(decoder, step, serve_cfg, log)
  for line in decoder.layout.notes():
    log(f"serve: {line}")
  if host not in LOOPBACK and not api_keys:
    log(
      f"serve: warning: listening on {host} without API keys: anyone who can reach it may use "
      "it; pass --api_key_file"
    )
  count, seconds = service.warm_up()
  engine = service.engine
  slots = (
    f"; {engine.slots} decode slots, prefill (rows, width) "
    f"{[list(s) for s in service._engine_info()['prefill_shapes']]}"
    if engine is not None
    else ""
  )
  log(
    f"serve: compiled {count} programs: static batches (rows, width, output) "
    f"{service.compiled_shapes} x beam sizes {list(service.batched_beam_sizes)}{slots}, "
    f"in {seconds:.1f}s; {serve_cfg.batching} batching; listening on http://{host}:{port}"
  )
  run_until_stopped(app(service, api_keys, guard_probes), host, port, log)


def run_until_stopped(asgi, host: str, port: int, log=print) -> None:
  """Serves `asgi` with uvicorn until SIGTERM/SIGINT."""
  import uvicorn

  # uvicorn handles SIGTERM/SIGINT (stop accepting, finish what is in flight), then raises the
  # signal again for the handler that was there before: this one lets the process exit 0.
  stopped = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda number, frame: stopped.append(number))
  uvicorn.run(asgi, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
  log(f"serve: stopped by {signal.Signals(stopped[0]).name}" if stopped else "serve: stopped")
