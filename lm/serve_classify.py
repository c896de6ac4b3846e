"""The HTTP service of a classifier (--mode=serve of a task=classify model): POST /v1/classify.

{"text": str | [str]} -> {"results": [{"label", "probabilities": {name: p}}], "model_step"}.
Rows of all requests are queued and batched as translation's static batches are (lm/serve.py):
one loop takes up to serve.max_batch rows, waiting at most serve.max_wait_ms after the oldest,
and runs them in a worker thread, padded to the smallest row count and width bucket that holds
them; every (rows, width) program is compiled at start-up. There is no decode engine: a
classifier generates nothing. A text longer than data.seq_len is cut as training cut it.
Errors have the service's shape (lm/api.py); /healthz and /v1/model answer as there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from lm import api, metrics
from lm.classify import Classifier
from lm.serve import LOOPBACK, PAGE, ApiKeys, run_until_stopped
from lm.trees import param_count

CLASSIFY_FIELDS = {"text"}


@dataclasses.dataclass
class _Row:
  ids: list[int]
  future: asyncio.Future
  queued: float


class ClassifyService:
  """Validation, the queue and its batching loop, over a Classifier batched to max_batch."""

  def __init__(self, classifier: Classifier, step: int, serve_cfg, log=print):
    self.step, self.cfg, self.log = step, serve_cfg, log
    c = classifier
    buckets = tuple(serve_cfg.length_buckets) or tuple(c.layout.cfg.decode.length_buckets)
    self.classifier = Classifier(
      c.layout, c.params, c.tokenizer, serve_cfg.max_batch, True, buckets
    )
    self.queue: list[_Row] = []
    self.compiles_after_startup: list | None = None
    self._arrived: asyncio.Event | None = None
    self._loop_task: asyncio.Task | None = None

  def warm_up(self) -> tuple[int, float]:
    """Compiles every (rows, width) program a batch can use: (programs, seconds)."""
    start = time.perf_counter()
    with metrics.counting_compiles() as compiles:
      for rows, width in self.classifier.shapes:
        self.classifier.probabilities([[4] * width] * rows)
    return len(compiles), time.perf_counter() - start

  def _encode(self, text: Any, field: str) -> list[int]:
    text = api.text(text, field)
    return self.classifier.encode(text)

  async def classify(self, body: dict) -> dict:
    api.known_fields(body, CLASSIFY_FIELDS)
    text = api.required(body, "text")
    texts = text if isinstance(text, list) else [text]
    if isinstance(text, list) and not text:
      raise api.RequestError("text is an empty list", "text")
    if len(texts) > self.cfg.max_items:
      raise api.RequestError(f"{len(texts)} texts, limit {self.cfg.max_items}", "text")
    rows = [self._encode(t, "text") for t in texts]
    probabilities = await self.submit(rows)
    answers = [self.classifier.answer(p) for p in probabilities]
    return {"results": answers, "model_step": self.step}

  async def submit(self, rows: list[list[int]]) -> list:
    """Each row's probabilities, once the batches holding them have run."""
    failure = self.batching_failure()
    if failure:
      raise api.RequestError(failure, status=503)
    if len(self.queue) + len(rows) > self.cfg.max_queue:
      raise api.RequestError(
        f"the queue is full ({len(self.queue)} rows waiting); retry shortly",
        status=503,
        headers={"Retry-After": "1"},
      )
    loop = asyncio.get_running_loop()
    pending = [_Row(ids, loop.create_future(), loop.time()) for ids in rows]
    self.queue.extend(pending)
    self._arrived.set()
    try:
      return await asyncio.wait_for(
        asyncio.gather(*(r.future for r in pending)), self.cfg.timeout_s
      )
    except TimeoutError:
      raise api.RequestError(
        f"not answered within serve.timeout_s={self.cfg.timeout_s:g} s", status=504
      ) from None
    finally:  # a timed-out or disconnected request's rows leave the queue
      for row in pending:
        row.future.cancel()

  async def _batches(self) -> None:
    loop = asyncio.get_running_loop()
    wait = self.cfg.max_wait_ms / 1000
    while True:
      await self._arrived.wait()
      self._arrived.clear()
      while True:
        self.queue = [r for r in self.queue if not r.future.done()]
        if not self.queue:
          break
        deadline = self.queue[0].queued + wait
        while len(self.queue) < self.cfg.max_batch and loop.time() < deadline:
          self._arrived.clear()
          with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
        batch, self.queue = self.queue[: self.cfg.max_batch], self.queue[self.cfg.max_batch :]
        await self._run([r for r in batch if not r.future.done()])

  async def _run(self, batch: list[_Row]) -> None:
    if not batch:
      return
    try:
      out = await asyncio.to_thread(self.classifier.probabilities, [r.ids for r in batch])
    except Exception as e:  # the batch's requests get a 500 each; the server goes on
      for row in batch:
        if not row.future.done():
          row.future.set_exception(e)
      return
    for row, probabilities in zip(batch, out):
      if not row.future.done():
        row.future.set_result(probabilities)

  @contextlib.asynccontextmanager
  async def running(self, app=None):
    """Starlette's lifespan: the batching loop runs while the app serves."""
    self._arrived = asyncio.Event()
    self._loop_task = asyncio.create_task(self._batches())
    try:
      with metrics.counting_compiles() as compiles:
        self.compiles_after_startup = compiles
        yield
    finally:
      self._loop_task.cancel()

  def batching_failure(self) -> str | None:
    task = self._loop_task
    if task is None or not task.done() or task.cancelled():
      return None
    e = task.exception()
    return f"the batching loop died ({type(e).__name__}: {e})" if e else "the batching loop ended"

  def model_info(self) -> dict:
    layout = self.classifier.layout
    m = layout.cfg.model
    return {
      "task": "classify",
      "model": {
        "d_model": m.d_model,
        "num_heads": m.num_heads,
        "mlp_dim": m.mlp_dim,
        "body": m.classifier_body,
        "layers": m.enc_layers if m.classifier_body == "encoder" else m.dec_layers,
        "pooling": m.pooling,
        "params": param_count(self.classifier.params),
      },
      "labels": self.classifier.labels,
      "vocab_size": self.classifier.tokenizer.vocab_size,
      "model_step": self.step,
      "mesh": dict(layout.mesh.shape),
      "zero_stage": layout.cfg.zero_stage,
      "max_batch": self.classifier.batch_size,
      "max_input_tokens": self.classifier.max_input_tokens,
      "compiled_shapes": [list(s) for s in self.classifier.shapes],
      "compiles_after_startup": len(self.compiles_after_startup or []),
    }


def app(service: ClassifyService, api_keys: list[str] | None = None, guard_probes: bool = False):
  """The ASGI app over a warmed-up service; with `api_keys`, /v1/ needs one (ApiKeys)."""

  async def classify(request: Request) -> Response:
    try:
      body = await api.json_body(request, service.cfg.max_body_bytes)
      return JSONResponse(await service.classify(body))
    except api.RequestError as e:
      return e.response()
    except Exception as e:  # one bad batch must not take the server down
      return api.RequestError(f"internal error: {type(e).__name__}: {e}", status=500).response()

  async def health(request: Request) -> Response:
    failure = service.batching_failure()
    if failure:
      return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return JSONResponse({"status": "ok", **service.model_info()})

  async def model(request: Request) -> Response:
    return JSONResponse(service.model_info())

  async def page(request: Request) -> Response:  # the service's page, which asks /v1/model
    return FileResponse(PAGE, media_type="text/html")

  routes = [
    Route("/", page),
    Route("/healthz", health),
    Route("/v1/model", model),
    Route("/v1/classify", classify, methods=["POST"]),
  ]
  asgi = Starlette(routes=routes, lifespan=service.running)
  return ApiKeys(asgi, api_keys, guard_probes) if api_keys else asgi


def serve(
  classifier: Classifier,
  step: int,
  serve_cfg,
  host: str,
  port: int,
  log=print,
  api_keys: list[str] | None = None,
  guard_probes: bool = False,
) -> None:
  """Warms up, then serves until SIGTERM/SIGINT."""
  service = ClassifyService(classifier, step, serve_cfg, log)
  if host not in LOOPBACK and not api_keys:
    log(f"serve: warning: listening on {host} without API keys; pass --api_key_file")
  count, seconds = service.warm_up()
  log(
    f"serve: compiled {count} programs: classify batches (rows, width) "
    f"{service.model_info()['compiled_shapes']} in {seconds:.1f}s; labels "
    f"{', '.join(service.classifier.labels)}; listening on http://{host}:{port}"
  )
  run_until_stopped(app(service, api_keys, guard_probes), host, port, log)
