"""Error codes: the one table every protocol's edge reads, and the typed errors domain code raises.

Domain code (the pipeline, the batcher, the predictor, the adapters' parsing) raises a
``ServiceError`` subclass with a code and a message, nothing about HTTP or gRPC. The edges look
the code up in ``TABLE``: the HTTP status and ``Retry-After`` (``errors.py``, ``middleware.py``,
the framing guard in ``protocol.py``), the gRPC status (``grpc_v2/server.py``). Each example is a
real answer: ``tests/service/test_contract.py`` triggers every code and compares; another test
checks that every code is documented in docs/api.md. No web framework is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    http: int  # HTTP status
    example: str  # a real message (the OpenAPI examples)
    grpc: str = ""  # a grpc.StatusCode name; "" = by the HTTP status (4xx INVALID_ARGUMENT, 5xx INTERNAL)
    retry_after: int | None = None  # seconds, sent as Retry-After (HTTP) with the answer


TABLE: dict[str, Code] = {
    "invalid_image": Code(400, "the file is not a recognised image"),
    "unsupported_image_format": Code(400, "image format PPM is not supported; send JPEG, PNG, WebP, BMP, GIF or TIFF"),
    "bad_base64": Code(400, "items[0]: the image is not valid base64"),
    "bad_request": Code(400, "the request body is not valid multipart/form-data: Missing boundary in multipart."),
    "invalid_json": Code(400, "the request body is not valid JSON"),
    "invalid_description": Code(400, "the description is not valid Unicode text (a lone surrogate)"),
    "unauthorized": Code(401, "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)", "UNAUTHENTICATED"),
    "forbidden": Code(403, "the repository API changes what the service serves: set CLASSIFIER_API_KEY to use it",
                      "PERMISSION_DENIED"),
    "not_found": Code(404, "no route GET /nope", "NOT_FOUND"),
    "model_not_found": Code(404, "unknown model 'nope' (loaded: tiny)", "NOT_FOUND"),
    "method_not_allowed": Code(405, "method GET not allowed on /classify"),
    "request_timeout": Code(408, "the request body did not arrive within 20 s", "DEADLINE_EXCEEDED"),
    "payload_too_large": Code(413, "the request body is 10559489 bytes; the limit is 10559488", "RESOURCE_EXHAUSTED"),
    "image_too_large": Code(413, "the image is 30000x30000 = 900000000 pixels; the limit is 40000000"),
    "unsupported_media_type": Code(415, "POST /classify takes multipart/form-data, not application/json"),
    "missing_field": Code(422, "the 'image' file field is required"),
    "invalid_field": Code(422, "'image' must be a file part (with a filename), not a text field"),
    "unknown_field": Code(422, "unknown form field(s): colour; send 'image' and 'description'"),
    "description_too_long": Code(422, "the description has 5000 characters; the limit is 2000"),
    "image_too_complex": Code(422, "the JPEG has 300 scans; real encoders write at most a few dozen (the limit is 64)"),
    "too_many_items": Code(422, "the batch has 65 rows; the limit is 64"),
    "model_load_failed": Code(422, "broken/1: broken/1/manifest.json: file not found (is CLASSIFIER_MODEL_DIR an exported "
                              "model folder?)", "FAILED_PRECONDITION"),
    "validation_error": Code(422, "query.top_k: Input should be greater than or equal to 1"),
    "header_too_large": Code(431, "the request head exceeds 32768 bytes"),
    "client_closed_request": Code(499, "the client closed the connection before its body arrived (logged, never sent)", "CANCELLED"),
    "inference_failed": Code(500, "inference failed for this row"),
    "internal_error": Code(500, "internal error; see the service log with this request id"),
    "not_ready": Code(503, "the model is not ready (state: loading)", "UNAVAILABLE", retry_after=5),
    "overloaded": Code(503, "256 rows are in progress; the limit is 256", "RESOURCE_EXHAUSTED", retry_after=1),
    "timeout": Code(504, "the request waited 10012 ms in the queue", "DEADLINE_EXCEEDED"),
}


MAX_ECHO = 200  # characters of client input quoted back in an error message


def truncate(text: str, limit: int = MAX_ECHO) -> str:
    """Client input quoted in a message is cut: an error must not echo a megabyte back."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def lookup(code: str) -> Code:
    """The table's entry; an unknown code is a 500 (a bug, never a client's doing)."""
    return TABLE.get(code) or TABLE["internal_error"]


def http_status(code: str) -> int:
    return lookup(code).http


def grpc_status(code: str) -> str:
    entry = lookup(code)
    return entry.grpc or ("INVALID_ARGUMENT" if 400 <= entry.http < 500 else "INTERNAL")


def retry_after(code: str) -> int | None:
    return lookup(code).retry_after


class ServiceError(Exception):
    """A failure with an error code from ``TABLE``: what went wrong, never how a protocol says it."""

    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code

    @property
    def status(self) -> int:  # for the HTTP edge
        return http_status(self.code)


class BadRequest(ServiceError):
    code = "bad_request"


class Unauthorized(ServiceError):
    code = "unauthorized"


class NotFound(ServiceError):
    code = "not_found"


class ModelNotFound(ServiceError):
    """An unknown model name or version, on any protocol."""

    code = "model_not_found"


class InvalidField(ServiceError):
    code = "invalid_field"


class NotReady(ServiceError):
    code = "not_ready"


class Overloaded(ServiceError):
    code = "overloaded"


class Timeout(ServiceError):
    code = "timeout"
