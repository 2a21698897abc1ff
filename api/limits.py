"""What a request may carry, checked before any route sees it (issue 12: "bounded input everywhere").

``RequestLimits`` is a pure ASGI middleware, in this order:

1. the URL: no NUL in the path or a query parameter (422 naming the parameter);
2. the API key of a request that has a body (401 before a byte of the body is read; 429 when
   every database session of the process stays busy, ``api.db``);
3. the body's size, counted while it streams — Content-Length may be absent (chunked) or lie — and
   answered with 413 as soon as it passes the route's limit: ``BEAVER_MAX_UPLOAD_MB`` for the whole
   dataset upload request (multipart form included), ``BEAVER_MAX_BODY_MB`` for every other route;
4. a JSON body (every route but the upload, which parses its own with ``loads``) is JSON Beaver can
   store: invalid JSON is 400 ``invalid_json`` on every route; nesting deeper than ``MAX_DEPTH``,
   NaN / Infinity (or a number that overflows to it), an integer outside 64 bits, a string with NUL or
   a lone surrogate are 422 naming the field (``messages.0.content``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, busy, error_body, responses
from api.settings import get_settings

UPLOAD_ROUTES = {("POST", "/v1/datasets")}  # the whole request under BEAVER_MAX_UPLOAD_MB
MAX_DEPTH = 64  # JSON nesting; json.loads itself stops near 1000 with a RecursionError
INT_BOUND = 2 ** 63  # integers must fit a signed 64-bit column (and torch / vLLM seeds)
KEY_SCOPE = "beaver.api_key"  # the ApiKey row the middleware checked, for ``api.deps.current_key``
LIMIT_RESPONSES = responses(400, 413, 422)  # what the middleware may answer on any route (OpenAPI)


class InvalidJson(ValueError):
    """JSON Beaver refuses: ``syntax`` when it is not JSON at all (400), else a value (422) at ``param``;
    ``reason`` is the message without the field's name."""

    def __init__(self, reason: str, param: str | None = None, syntax: bool = False, what: str = "body"):
        self.reason, self.param, self.syntax = reason, param, syntax
        self.message = f"{what} {reason}" if syntax else f"{param or what}: {reason}"
        super().__init__(self.message)

    def as_api_error(self) -> ApiError:
        if self.syntax:
            return ApiError(400, self.message, code="invalid_json")
        return ApiError(422, self.message, param=self.param)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` inside the upload route: FastAPI and Starlette pass an HTTPException
    through their body parsing, so it reaches the app's handler as one 413."""

    def __init__(self, limit: int, setting: str):
        super().__init__(413, too_large_message(limit, setting))


def too_large_message(limit: int, setting: str) -> str:
    return f"request body exceeds the limit of {limit} bytes ({setting})"


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored (PostgreSQL refuses NUL; a lone surrogate is not Unicode), or None."""
    if "\x00" in text:
        return "contains a NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (e.g. \\ud800), which is not valid Unicode"
    return None


def json_problem(value: Any) -> tuple[str | None, str] | None:
    """The first value of parsed JSON that Beaver refuses, as (param, message); None when all is well."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        problem = None
        if isinstance(item, str):
            problem = text_problem(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not -INT_BOUND <= item < INT_BOUND:
                problem = "integer out of range: it must fit in 64 bits (-2^63 ≤ n < 2^63)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                problem = "must be a finite number (NaN and Infinity are not JSON numbers)"
        elif len(path) >= MAX_DEPTH:
            return (str(path[0]) if path else None), f"nested deeper than {MAX_DEPTH} levels"
        elif isinstance(item, dict):
            for key in item:
                if (key_problem := text_problem(key)) is not None:
                    problem = f"has a key that {key_problem}"
                    break
            stack.extend((child, (*path, name)) for name, child in reversed(item.items()))
        else:  # a list
            stack.extend((child, (*path, i)) for i, child in reversed(list(enumerate(item))))
        if problem is not None:
            return ".".join(str(p) for p in path) or None, problem
    return None


def loads(raw: bytes | str, what: str = "body") -> Any:
    """Parse JSON the way every route does; raises ``InvalidJson``."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidJson(f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", syntax=True,
                          what=what) from None
    except UnicodeDecodeError:
        raise InvalidJson("is not valid JSON: not UTF-8 text", syntax=True, what=what) from None
    except RecursionError:
        raise InvalidJson(f"nested deeper than {MAX_DEPTH} levels", what=what) from None
    except ValueError as e:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
        raise InvalidJson(f"holds an integer out of range ({e})", what=what) from None
    problem = json_problem(value)
    if problem is not None:
        raise InvalidJson(problem[1], param=problem[0], what=what)
    return value


def is_json(headers: Headers) -> bool:
    """FastAPI parses a body as JSON under these content types (and when there is none)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    return not content_type or content_type == "application/json" or content_type.endswith("+json")


def needs_key(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith("/v1/health")


def check_url(scope: Scope) -> None:
    if "\x00" in scope["path"]:
        raise ApiError(422, "the URL path contains a NUL character (%00)", param="path")
    for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if (problem := text_problem(name) or text_problem(value)) is not None:
            param = name if text_problem(name) is None else None
            raise ApiError(422, f"{param or 'a query parameter'}: {problem}", param=param)


NO_NUL = r"^[^\u0000]*$"  # JSON Schema (ECMA 262) and Python read it alike


def declare_url_limits(openapi: dict) -> dict:
    """/openapi.json says what ``check_url`` refuses: every string path or query parameter has no NUL."""
    for operations in openapi.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("in") not in ("path", "query"):
                    continue
                schema = parameter.get("schema", {})
                for option in schema.get("anyOf", [schema]):
                    if option.get("type") == "string":
                        option.setdefault("pattern", NO_NUL)
    return openapi


def content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", value.strip()):
        raise ApiError(400, f"invalid Content-Length {value[:40]!r}", param="Content-Length")
    return int(value)


async def _authenticate(authorization: str | None):
    from api.db import DatabaseBusy, run_db
    from api.deps import authenticate

    try:  # a short session of its own, in one of the process's session slots (api.db)
        return await run_db(authenticate, authorization)
    except DatabaseBusy as e:
        raise busy(str(e), e.retry_after) from None


class RequestLimits:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from api.db import start_queue_budget

        start_queue_budget()  # all of this request's waits, for sessions and for a model, share one timeout
        headers = Headers(scope=scope)
        settings = get_settings()
        upload = (scope["method"], scope["path"]) in UPLOAD_ROUTES
        limit, setting = ((settings.max_upload_bytes, "BEAVER_MAX_UPLOAD_MB") if upload
                          else (settings.max_body_bytes, "BEAVER_MAX_BODY_MB"))
        body, has_body = None, False
        try:
            check_url(scope)
            length = content_length(headers)
            has_body = bool(length) or "transfer-encoding" in headers
            if has_body and needs_key(scope["path"]):
                scope[KEY_SCOPE] = await _authenticate(headers.get("authorization"))
            if length is not None and length > limit:  # refused before a byte is read
                raise ApiError(413, too_large_message(limit, setting))
            if has_body and not upload:
                body = await _read_body(receive, limit, setting)
                if body is None:
                    return  # the client went away
                if is_json(headers) and body:
                    try:
                        loads(body)
                    except InvalidJson as e:
                        raise e.as_api_error() from None
        except ApiError as e:
            await _refuse(e, scope, receive, send, close=has_body and body is None)
            return
        if body is not None:
            await self.app(scope, _replay(body, receive), send)
        else:
            await _run_counted(self.app, scope, receive, send, limit, setting)


async def _read_body(receive: Receive, limit: int, setting: str) -> bytes | None:
    """The whole body (at most ``limit`` bytes: 413 as soon as it grows past it); None on disconnect."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large_message(limit, setting))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read here, then the client's own messages (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _run_counted(app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int, setting: str) -> None:
    """Run the app with a ``receive`` that raises ``BodyTooLarge`` once more than ``limit`` bytes came."""
    size, started = 0, False

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyTooLarge(limit, setting)
        return message

    async def tracked(message: Message) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, counted, tracked)
    except BodyTooLarge as e:  # raised where no handler caught it (e.g. a middleware that read the body)
        if started:
            raise
        await _refuse(ApiError(413, e.detail), scope, receive, send, close=True)


async def _refuse(e: ApiError, scope: Scope, receive: Receive, send: Send, close: bool) -> None:
    # ``close``: the body may be unread; close the connection rather than read the rest of it.
    response = JSONResponse(error_body(e.code, e.message, e.param, e.details), status_code=e.status,
                            headers={**(e.headers or {}), **({"Connection": "close"} if close else {})})
    await response(scope, receive, send)
