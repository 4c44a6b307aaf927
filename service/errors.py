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

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.headers = headers or {}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidField(ServiceError):
    status, code = 422, "invalid_field"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class Timeout(ServiceError):
    status, code = 504, "timeout"


# error code -> (status, example message): the OpenAPI examples. Each example is a real answer
# (tests/service/test_contract.py triggers every code it can and compares, numbers aside).
ERROR_CATALOGUE: dict[str, tuple[int, str]] = {
    "invalid_image": (400, "the file is not a recognised image"),
    "unsupported_image_format": (400, "image format PPM is not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF"),
    "bad_base64": (400, "items[0]: the image is not valid base64"),
    "bad_request": (400, "the request body is not valid multipart/form-data: Missing boundary in multipart."),
    "invalid_json": (400, "the request body is not valid JSON"),
    "invalid_description": (400, "the description is not valid Unicode text (a lone surrogate)"),
    "unauthorized": (401, "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)"),
    "not_found": (404, "no route GET /nope"),
    "method_not_allowed": (405, "method GET not allowed on /classify"),
    "request_timeout": (408, "the request body did not arrive within 20 s"),
    "payload_too_large": (413, "the request body is 10559489 bytes; the limit is 10559488"),
    "image_too_large": (413, "the image is 30000x30000 = 900000000 pixels; the limit is 40000000"),
    "unsupported_media_type": (415, "POST /classify takes multipart/form-data, not application/json"),
    "missing_field": (422, "the 'image' file field is required"),
    "invalid_field": (422, "'image' must be a file part (with a filename), not a text field"),
    "unknown_field": (422, "unknown form field(s): colour; send 'image' and 'description'"),
    "description_too_long": (422, "the description has 5000 characters; the limit is 2000"),
    "image_too_complex": (422, "the JPEG has 300 scans; real encoders write at most a few dozen (the limit is 64)"),
    "too_many_items": (422, "the batch has 65 rows; the limit is 64"),
    "validation_error": (422, "query.top_k: Input should be greater than or equal to 1"),
    "header_too_large": (431, "the request head exceeds 32768 bytes"),
    "client_closed_request": (499, "the client closed the connection before its body arrived (logged, never sent)"),
    "inference_failed": (500, "inference failed for this row"),
    "internal_error": (500, "internal error; see the service log with this request id"),
    "not_ready": (503, "the model is not ready (state: loading)"),
    "overloaded": (503, "256 rows are in progress; the limit is 256"),
    "timeout": (504, "the request waited 10012 ms in the queue"),
}


ERROR_STATUS: dict[str, int] = {code: status for code, (status, _) in ERROR_CATALOGUE.items()}

# error code -> gRPC status (a grpc.StatusCode name) for the Open Inference Protocol over gRPC; a code
# not listed maps by its HTTP status: 4xx -> INVALID_ARGUMENT, 5xx -> INTERNAL
GRPC_STATUS: dict[str, str] = {
    "unauthorized": "UNAUTHENTICATED",
    "not_found": "NOT_FOUND",
    "request_timeout": "DEADLINE_EXCEEDED",
    "timeout": "DEADLINE_EXCEEDED",
    "payload_too_large": "RESOURCE_EXHAUSTED",
    "overloaded": "RESOURCE_EXHAUSTED",
    "not_ready": "UNAVAILABLE",
}


def grpc_status_name(code: str, status: int) -> str:
    return GRPC_STATUS.get(code) or ("INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")
V2_PREFIX = "/v2"
MAX_ECHO = 200  # characters of client input quoted back in an error message


def truncate(text: str, limit: int = MAX_ECHO) -> str:
    """Client input quoted in a message is cut: an error must not echo a megabyte back."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


def error_response(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(request.url.path, code, message, request_id_of(request)), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error", 503: "not_ready",
               504: "timeout"}


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
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(request, 400, "invalid_json", "the request body is not valid JSON")
        return error_response(request, 422, "validation_error", describe_validation_errors(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(request, exc.status_code, code, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # last resort (the request middleware answers unhandled errors first): no traceback to the caller
        log.error("unhandled error (request_id=%s): %s", request_id_of(request), type(exc).__name__, exc_info=exc)
        return error_response(request, 500, "internal_error", "internal error; see the service log with this request id")
