"""What a request to the service may carry, and how it is refused: the error (in zerolm's
shape and OpenAI's), the body's reading and its field checks, a row's decode settings, and a
server-sent event. Shared by lm/serve.py and lm/openai_api.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse

from lm.data import multilingual
from lm.decode import DecodeOptions


class RequestError(Exception):
  """A bad request: its HTTP status, a readable message and the field at fault."""

  def __init__(
    self, message: str, field: str | None = None, status: int = 400, headers=None, code=None
  ):
    super().__init__(message)
    self.message, self.field, self.status, self.headers = message, field, status, headers
    self.code = code

  def response(self, openai: bool = False) -> JSONResponse:
    """{"error": {"message", "field"?}}, or OpenAI's {"error": {"message", "type", "param",
    "code"}} on its API."""
    if openai:
      kind = "server_error" if self.status >= 500 else "invalid_request_error"
      error = {"message": self.message, "type": kind, "param": self.field, "code": self.code}
    else:
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
  ignore_eos: bool = False  # LM: generate to the cap past EOS (load tests: fixed lengths)

  @classmethod
  def of(cls, options: DecodeOptions) -> RowSettings:
    """The decode options' defaults."""
    return cls(options.seed, options.temperature, options.top_k, options.top_p, options.alpha)


def target_language(body: dict, languages: tuple[str, ...]) -> str | None:
  """A translation request's target_lang, checked against the model's target languages (a
  single-pair model has none and takes none; see lm/data/multilingual.py)."""
  language = body.get("target_lang")
  if language is not None and not isinstance(language, str):
    raise RequestError("target_lang must be a string", "target_lang")
  problem = multilingual.language_error(languages, language)
  if problem:
    raise RequestError(f"target_lang: {problem}", "target_lang")
  return language


def text(value, field: str) -> str:
  """A request's text field: a non-empty string that a tokenizer takes."""
  if not isinstance(value, str):
    raise RequestError(f"{field} must be a string, not {type(value).__name__}", field)
  if not value.strip():
    raise RequestError(f"{field} is empty", field)
  try:  # JSON may carry a lone surrogate (\ud800), which no tokenizer takes
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise RequestError(f"{field} is not valid Unicode (a lone surrogate)", field) from None
  return value


def known_fields(body: dict, fields: set[str]) -> None:
  for name in body:
    if name not in fields:
      raise RequestError(f"unknown field {name!r}; known: {', '.join(sorted(fields))}", name)


def flag(body: dict, field: str, default: bool = False) -> bool:
  """A true/false field; absent or null: the default."""
  value = body.get(field)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise RequestError(f"{field} must be true or false", field)
  return value


def required(body: dict, field: str):
  if field not in body:
    raise RequestError(f"{field} is required", field)
  return body[field]


def integer(body: dict, field: str, default: int, low: int, high: int) -> int:
  """body[field], checked; absent or null: the default (clients send null for "unset")."""
  if body.get(field) is None:
    return default
  value = body[field]
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{field} must be an integer", field)
  if not low <= value <= high:
    raise RequestError(f"{field}={value} is out of range [{low}, {high}]", field)
  return value


def choice(body: dict, field: str, default: int, allowed: tuple[int, ...]) -> int:
  """An integer setting that programs are compiled for: one of `allowed`."""
  value = body.get(field, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(f"{field} must be an integer", field)
  if value not in allowed:
    names = ", ".join(map(str, allowed))
    raise RequestError(f"{field}={value} is not served; allowed values: {names}", field)
  return value


def number(body: dict, field: str, default: float, low: float, high: float) -> float:
  """body[field], checked; absent or null: the default."""
  if body.get(field) is None:
    return default
  value = body[field]
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise RequestError(f"{field} must be a number", field)
  if not low <= value <= high:
    raise RequestError(f"{field}={value} is out of range [{low:g}, {high:g}]", field)
  return float(value)


async def read_body(request: Request, limit: int) -> bytes:
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


async def json_body(request: Request, limit: int) -> dict:
  raw = await read_body(request, limit)
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


def sse(data) -> str:
  """One server-sent event."""
  return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def started(runs: AsyncIterator) -> AsyncIterator:
  """`runs` once its first run has come, so that what fails before it (no slot within
  serve.timeout_s, a dead engine) is still an HTTP status, not an event after a 200; closing
  the result closes `runs`."""
  try:
    first = await anext(runs)
  except BaseException:
    await runs.aclose()
    raise

  async def every():
    try:
      yield first
      async for run in runs:
        yield run
    finally:
      await runs.aclose()

  return every()


async def gather_or_cancel(coroutines) -> list:
  """Their results, in order; when one fails, the others are cancelled (freeing their slots)
  before its error is raised."""
  tasks = [asyncio.ensure_future(c) for c in coroutines]
  try:
    return await asyncio.gather(*tasks)
  finally:
    for task in tasks:
      task.cancel()
