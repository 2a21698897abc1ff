"""One error shape for every failure: ``{"error": {"code", "message", "param"}}``, never a stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.db import DatabaseBusy

log = logging.getLogger("beaver.api")

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 411: "length_required", 413: "payload_too_large", 415: "unsupported_media_type",
          422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 details: list | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status, "error")
        self.details = details
        self.headers = headers


def busy(message: str, retry_after: int = 1) -> ApiError:
    """429: every database session of the process is in use (``api.db``); come back after ``retry_after`` s."""
    return ApiError(429, message, headers={"Retry-After": str(retry_after)})


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    details: list | None = None


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"code", "message", "param"}}`` (+ ``details`` listing each problem)."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad request: the body is not JSON (code invalid_json), or a parameter Beaver does not support",
    401: "Missing, malformed, unknown or revoked API key (checked before the body is read)",
    403: "The key's role may not do this",
    404: "Not found",
    409: "Conflict with the current state",
    413: "The request body is larger than the route's limit (or too many items in one request)",
    415: "Unsupported content type",
    422: "A value Beaver cannot accept, named in error.param",
    429: "Too many requests at once: retry after the Retry-After header's seconds",
    503: "A service the request needs (broker, model) is unavailable",
}


def responses(*codes: int) -> dict:
    """OpenAPI ``responses=`` for these statuses, all with the one error shape."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def error_body(code: str, message: str, param: str | None = None, details: list | None = None) -> dict:
    body = {"code": code, "message": message, "param": param}
    if details is not None:
        body["details"] = details
    return {"error": body}


def not_found(what: str, ident: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"{what} {ident!r} not found", param=param)


def path_methods(request: Request) -> list[str]:
    """Every method the routes at the request's path answer, OPTIONS included. Starlette's own 405 names
    only the first route's (POST on /v1/jobs, where GET lists them)."""
    try:  # FastAPI ≥ 0.16x keeps included routers whole: this walks their routes
        from fastapi.routing import iter_route_contexts
        routes = iter_route_contexts(request.app.routes)
    except ImportError:
        routes = request.app.routes
    # The most specific routes only: /v1/keys/me (GET) also matches /v1/keys/{key_id} (DELETE), but its
    # methods are the ones /openapi.json gives that path.
    matching = [r for r in routes if getattr(r, "methods", None) and r.matches(request.scope)[0] != Match.NONE]
    fewest = min((len(getattr(r, "param_convertors", {})) for r in matching), default=0)
    methods = {"OPTIONS"}
    for route in matching:
        if len(getattr(route, "param_convertors", {})) == fewest:
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(error_body(exc.code, exc.message, exc.param, exc.details), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(DatabaseBusy)
    async def _database_busy(request: Request, exc: DatabaseBusy):
        return await _api_error(request, busy(str(exc), exc.retry_after))

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout):
        # The pool's own wait ran out: more connections than sessions were needed at once (past
        # BEAVER_DB_MAX_OVERFLOW). Still the server being busy, not a bug of the request.
        return await _api_error(request, busy("the server is busy: no database connection came free in time"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # the path exists, not with this method
            allow = {"Allow": ", ".join(path_methods(request))}
            if request.method == "OPTIONS":  # what this path answers (RFC 9110), no key needed
                return Response(status_code=204, headers=allow)
            headers = {**(headers or {}), **allow}
        return JSONResponse(error_body(_CODES.get(exc.status_code, "error"), str(exc.detail)),
                            status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # api.limits answers it first; the same answer here
            reason = first.get("ctx", {}).get("error")
            return JSONResponse(error_body("invalid_json", f"body is not valid JSON: {reason}"), status_code=400)
        loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request")
        details = [{"param": ".".join(str(p) for p in e.get("loc", [])[1:]) or None, "message": e.get("msg")}
                   for e in errors]
        return JSONResponse(error_body("invalid_request", message, param, details), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", f"internal error: {type(exc).__name__}"), status_code=500)
