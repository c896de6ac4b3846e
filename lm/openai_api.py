"""OpenAI-compatible completions: POST /v1/completions and GET /v1/models over a Service.

The request and answer follow OpenAI's completions API, so its clients and benchmarks work
unchanged: `prompt` (a string or a list of them: one choice each), `max_tokens` (default 16, as
OpenAI's; a translation's default is its length rule), `temperature`, `top_p`, `seed`, `stop`
(up to 4 strings), `stream` and `stream_options.include_usage`; vLLM's `top_k` and `ignore_eos`
too. Defaults the API leaves open (temperature, top_p, top_k) are the model's decode.* settings,
as vLLM takes a model's generation config. Fields this server does not know are accepted,
ignored and logged (clients send extras); known ones it cannot honour (n > 1, echo, logprobs,
penalties, logit_bias, suffix) get a 400. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}. For a translation model, the prompt is the
source text and the completion its (greedy) translation; a model trained on several pairs takes
/v1/translate's `target_lang` here too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lm.api import (
  RequestError,
  RowSettings,
  flag,
  gather_or_cancel,
  integer,
  number,
  sse,
  target_language,
)
from lm.data import tokenizer as tok

DEFAULT_MAX_TOKENS = 16  # OpenAI's
MAX_STOPS = 4  # OpenAI's
# Known fields that would change the answer: accepted only at the value that changes nothing.
UNSUPPORTED = {
  "n": 1,
  "best_of": 1,
  "echo": False,
  "logprobs": None,
  "suffix": None,
  "presence_penalty": 0,
  "frequency_penalty": 0,
  "logit_bias": None,
}
KNOWN = {
  "model",
  "target_lang",  # zerolm's: a multi-pair translation model's target language (/v1/translate's)
  "prompt",
  "max_tokens",
  "temperature",
  "top_p",
  "top_k",
  "seed",
  "stop",
  "stream",
  "stream_options",
  "ignore_eos",
  "user",
  *UNSUPPORTED,
}


@dataclasses.dataclass
class Completion:
  """A parsed request."""

  rows: list[list[int]]  # the prompts' ids
  caps: list[int]
  settings: RowSettings
  stops: list[str]
  stream: bool
  include_usage: bool
  ignore_eos: bool


class _Choice:
  """One prompt's text as its tokens come: pieces from a TextStream, cut at the first stop
  string. While stop strings are set, the last (longest stop - 1) characters are held back,
  since they may begin one."""

  def __init__(self, decode, stops: list[str]):
    self.stream, self.stops = tok.TextStream(decode), stops
    self.hold = max((len(s) for s in stops), default=1) - 1
    self.text, self.sent, self.tokens = "", 0, 0

  def add(self, tokens: list[int], reason: str | None) -> tuple[str, str | None]:
    """The text now safe to send, and the finish reason if it ends here."""
    self.tokens += len(tokens)
    for n, token in enumerate(tokens):
      self.text += self.stream.add(token, last=bool(reason) and n == len(tokens) - 1)
    if reason:
      self.text += self.stream.flush()
    found = [
      i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0
    ]
    if found:
      end, reason = min(found), "stop"
    else:
      end = len(self.text) if reason else max(self.sent, len(self.text) - self.hold)
    new, self.sent = self.text[self.sent : end], end
    return new, reason


class Completions:
  """The endpoints over one service."""

  def __init__(self, service):  # an lm.serve.Service (which imports this module)
    self.service = service
    self.name = service.cfg.model_name
    self.created = int(time.time())
    self.logged: set[str] = set()  # unknown field names already logged

  async def models(self, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [self._model_card()]})

  def _model_card(self) -> dict:
    return {"id": self.name, "object": "model", "created": self.created, "owned_by": "zerolm"}

  # -- parsing --------------------------------------------------------------------------------

  def parse(self, body: dict) -> Completion:
    s = self.service
    unknown = sorted(set(body) - KNOWN - self.logged)
    if unknown:  # each name once: benchmark clients send the same extras with every request
      self.logged |= set(unknown)
      s.log(f"serve: /v1/completions ignores unknown fields {', '.join(unknown)}")
    for field, neutral in UNSUPPORTED.items():
      value = body.get(field)
      if value is not None and value != neutral and not (neutral is None and value in ({}, 0)):
        raise RequestError(f"{field}={value!r} is not supported by this server", field)
    model = body.get("model", self.name)
    if model != self.name:
      raise RequestError(
        f"the model {model!r} does not exist; this server serves {self.name!r}",
        "model",
        status=404,
        code="model_not_found",
      )
    if "prompt" not in body:
      raise RequestError("prompt is required", "prompt")
    prompt = body["prompt"]
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts:
      raise RequestError("prompt is an empty list", "prompt")
    ids = isinstance(prompt, list) and all(
      isinstance(p, int) and not isinstance(p, bool) for p in prompt
    )
    if ids or any(isinstance(p, list) for p in prompts):
      raise RequestError("prompt as token ids is not supported: send text", "prompt")
    if len(prompts) > s.cfg.max_items:
      raise RequestError(f"{len(prompts)} prompts, limit {s.cfg.max_items}", "prompt")
    if s.task == "translation":
      target_lang = target_language(body, s.languages)
    elif body.get("target_lang") is not None:
      raise RequestError("target_lang: a language model translates nothing; omit it", "target_lang")
    else:
      target_lang = None
    rows = [s._encode(p, "prompt", target_lang) for p in prompts]
    default = s.decoder.options
    lm = s.task == "lm"
    settings = RowSettings.of(default)
    if lm:
      settings = dataclasses.replace(
        settings,
        temperature=number(body, "temperature", default.temperature, 0.0, 2.0),
        top_p=number(body, "top_p", default.top_p, 1e-6, 1.0),
        top_k=integer(body, "top_k", default.top_k, 0, s.decoder.layout.vocab_limit),
      )
    elif number(body, "temperature", 0.0, 0.0, 2.0) > 0:
      raise RequestError(
        "a translation model decodes greedily: temperature must be 0", "temperature"
      )
    seed = body.get("seed")
    if seed is None:
      seed = secrets.randbits(31)  # OpenAI's: no seed, a fresh draw
    else:
      seed = integer(body, "seed", 0, -(2**63), 2**63 - 1) % 2**31
    settings = dataclasses.replace(settings, seed=seed)
    caps = [self._cap(body, ids) for ids in rows]
    stops = self._stops(body.get("stop"))
    stream = flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
      raise RequestError("stream_options must be an object", "stream_options")
    include_usage = flag(options, "include_usage")
    ignore_eos = flag(body, "ignore_eos")
    if ignore_eos and not lm:
      raise RequestError(
        "ignore_eos is for language models: a translation ends at EOS", "ignore_eos"
      )
    return Completion(rows, caps, settings, stops, stream, include_usage, ignore_eos)

  def _cap(self, body: dict, ids: list[int]) -> int:
    s = self.service
    if s.task == "translation":
      return integer(body, "max_tokens", 0, 1, s.decoder.max_output_tokens)
    room = s.decoder.shapes[0][1] - len(ids)
    if "max_tokens" not in body or body["max_tokens"] is None:
      return min(DEFAULT_MAX_TOKENS, room)
    cap = integer(body, "max_tokens", 0, 1, 2**31 - 1)
    if cap > room:
      width = s.decoder.shapes[0][1]
      raise RequestError(
        f"max_tokens={cap} and the prompt's {len(ids)} tokens exceed the model's {width}; "
        f"at most {room} here",
        "max_tokens",
      )
    return cap

  @staticmethod
  def _stops(stop) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
      raise RequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
      raise RequestError(f"{len(stops)} stop sequences, limit {MAX_STOPS}", "stop")
    return stops

  # -- answering ------------------------------------------------------------------------------

  async def respond(self, request: Request, body: dict) -> Response:
    c = self.parse(body)
    s = self.service
    s._check_room(len(c.rows))
    # Choice i samples with seed + i, as decode mode's line i: equal prompts, distinct draws.
    outputs = [
      s.output(ids, cap, self._seeded(c.settings, i), ignore_eos=c.ignore_eos)
      for i, (ids, cap) in enumerate(zip(c.rows, c.caps))
    ]
    head = {
      "id": f"cmpl-{secrets.token_hex(12)}",
      "object": "text_completion",
      "created": int(time.time()),
      "model": self.name,
    }
    if c.stream:
      return await self._stream(c, outputs, head)
    choices = await gather_or_cancel([self._whole(c, runs) for runs in outputs])
    texts = [
      {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
      for i, (text, reason, _) in enumerate(choices)
    ]
    usage = self._usage(c, [count for _, _, count in choices])
    return JSONResponse({**head, "choices": texts, "usage": usage})

  @staticmethod
  def _seeded(settings: RowSettings, index: int) -> RowSettings:
    return dataclasses.replace(settings, seed=(settings.seed + index) % 2**31)

  async def _whole(self, c: Completion, runs) -> tuple[str, str, int]:
    choice = _Choice(self.service.decoder.tokenizer.decode, c.stops)

    async def whole():
      text = ""
      async for tokens, reason in runs:
        new, reason = choice.add(tokens, reason)
        text += new
        if reason:
          return text, reason, choice.tokens

    try:
      return await asyncio.wait_for(whole(), self.service.cfg.timeout_s)
    except TimeoutError:
      timeout = self.service.cfg.timeout_s
      raise RequestError(f"not answered within serve.timeout_s={timeout:g} s", status=504) from None
    finally:
      await runs.aclose()  # a stop string ends it early: its slot frees

  def _usage(self, c: Completion, completion_tokens: list[int]) -> dict:
    prompt = sum(len(ids) for ids in c.rows)
    done = sum(completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

  def _feeds(self, c: Completion, outputs) -> tuple[asyncio.Queue, list, list]:
    """One task per prompt putting (choice, new text or an error, finish reason) on a queue
    as its tokens come; the queue, the tasks and the choices' texts."""
    queue: asyncio.Queue = asyncio.Queue()
    decode = self.service.decoder.tokenizer.decode
    choices = [_Choice(decode, c.stops) for _ in outputs]

    async def feed(index, runs):
      try:
        async for tokens, reason in runs:
          new, reason = choices[index].add(tokens, reason)
          if tokens or new or reason:  # a token that shows no text still gets its chunk
            await queue.put((index, new, reason))
          if reason:
            return
      except RequestError as e:
        await queue.put((index, e, None))
      except Exception as e:  # any other failure: the stream must end, not wait forever
        error = RequestError(f"internal error: {type(e).__name__}: {e}", status=500)
        await queue.put((index, error, None))
      finally:
        await runs.aclose()

    return queue, [asyncio.create_task(feed(i, runs)) for i, runs in enumerate(outputs)], choices

  async def _stream(self, c: Completion, outputs, head: dict) -> Response:
    """The streamed answer, once the first chunk is ready: what fails before it (no slot
    within serve.timeout_s, a dead engine) is an HTTP status, not an event after a 200."""
    queue, tasks, choices = self._feeds(c, outputs)
    try:
      first = await queue.get()
      if isinstance(first[1], RequestError):
        raise first[1]
    except BaseException:
      for task in tasks:
        task.cancel()
      raise
    events = self._events(c, queue, tasks, choices, first, head)
    return StreamingResponse(events, media_type="text/event-stream")

  async def _events(self, c: Completion, queue, tasks, choices, first, head: dict):
    """Every prompt's chunks as they come (several prompts interleave, each chunk naming its
    choice), the usage chunk if asked, then [DONE]."""
    usage = {"usage": None} if c.include_usage else {}
    try:
      open_choices, item = len(choices), first
      while True:
        index, new, reason = item
        if isinstance(new, RequestError):  # after the headers: the stream's last event
          yield sse({"error": {"message": new.message, "type": "server_error"}})
          return
        choice = {"index": index, "text": new, "finish_reason": reason, "logprobs": None}
        yield sse({**head, "choices": [choice], **usage})
        open_choices -= reason is not None
        if not open_choices:
          break
        item = await queue.get()
      if c.include_usage:
        yield sse({**head, "choices": [], "usage": self._usage(c, [x.tokens for x in choices])})
      yield sse("[DONE]")
    finally:  # a client gone mid-stream: every prompt's slot frees
      for task in tasks:
        task.cancel()
