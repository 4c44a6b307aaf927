"""Typed errors and the one place that turns any failure into an error body.

Our API answers ``{"error": {"code", "message", "request_id"}}``; the Open Inference Protocol
routes (``/v2``) answer the protocol's ``{"error": message}`` with the same ``code`` beside it.
The codes and their statuses are one catalogue for every protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .codes import (  # noqa: F401 (re-exported: the edges and the adapters import them from here)
    TABLE,
    BadRequest,
    InvalidField,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    Timeout,
    Unauthorized,
    grpc_status,
    http_status,
    retry_after,
    truncate,
)

log = logging.getLogger(__name__)


# the table and the typed errors live in codes.py (no web framework there); re-exported for the edges
ERROR_CATALOGUE: dict[str, tuple[int, str]] = {code: (c.http, c.example) for code, c in TABLE.items()}


def retry_headers(code: str) -> dict[str, str]:
    seconds = retry_after(code)
    return {"Retry-After": str(seconds)} if seconds is not None else {}


V2_PREFIX = "/v2"


def error_body(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_payload(path: str, code: str, message: str, request_id: str) -> dict[str, Any]:
    """The error body in the wire shape of the protocol that owns ``path``."""
    if path.startswith(V2_PREFIX):
        return {"error": message, "code": code}
    return error_body(code, message, request_id)


def render_json(payload: Any) -> bytes:
    """Bytes exactly as JSONResponse writes them: every error body, whoever sends it, is serialised one way."""
    return bytes(JSONResponse(payload).body)


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def error_response(request: Request, code: str, message: str, body: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer for an error code: its status and Retry-After from the table, the body in the path's protocol shape."""
    payload = error_payload(request.url.path, code, message, request_id_of(request)) | (body or {})
    return JSONResponse(payload, status_code=http_status(code), headers=retry_headers(code) | (headers or {}))


# what Starlette's own HTTPException (routing, form parsing) means, as a code of the table
_STARLETTE_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type",
                    422: "validation_error", 503: "not_ready", 504: "timeout"}


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """pydantic's errors as one line: at most five, each location and message truncated."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(truncate(str(x), 60) for x in err.get("loc", ()))
        parts.append(f"{loc}: {truncate(str(err.get('msg', 'invalid')))}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request, "invalid_json", "the request body is not valid JSON")
        return error_response(request, "validation_error", describe_validation_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STARLETTE_CODES.get(exc.status_code)
        if code is None:  # nothing raises another: a bug, answered as one
            log.error("unexpected HTTPException %s: %s", exc.status_code, exc.detail)
            return error_response(request, "internal_error", "internal error; see the service log with this request id")
        message = str(exc.detail)
        if code == "not_found":
            message = f"no route {request.method} {request.url.path}"
        elif code == "method_not_allowed":
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(request, code, message, headers=dict(exc.headers or {}))  # Allow on a 405

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # last resort (the request middleware answers unhandled errors first): no traceback to the caller
        log.error("unhandled error (request_id=%s): %s", request_id_of(request), type(exc).__name__, exc_info=exc)
        return error_response(request, "internal_error", "internal error; see the service log with this request id")
