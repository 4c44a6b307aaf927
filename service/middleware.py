"""One pure-ASGI middleware for what every request needs before and after its route.

Request id, API key, content type per route, the streaming body limit, metrics, the
access log line and response headers. Pure ASGI (not BaseHTTPMiddleware) so the body
is counted as it streams in and an oversized upload is refused before it is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind
from starlette.requests import ClientDisconnect

from .errors import ServiceError, error_body, error_payload, http_status, render_json, retry_headers
from .metrics import Metrics
from .pipeline import Pipeline
from .settings import Settings
from .tracing import active as tracing_active
from .tracing import tracer

log = logging.getLogger("service.access")

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[..., Any]

_DECIMAL = re.compile(rb"[0-9]{1,19}")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# open without the API key: probes, metrics, and what a browser needs to show the demo page and docs
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready",
                        "/", "/docs", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static/", "/docs-assets/")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and a description


def rows_body_limit(settings: Settings) -> int:
    """The largest body (or gRPC message) a request of rows can need: each row at most one image
    (base64: 4/3 of its bytes) and a caption (JSON escapes: up to 12 bytes a character, a surrogate
    pair), capped by MAX_BATCH_BODY_BYTES; nothing bigger is read whatever that setting says."""
    row = -(-settings.max_upload_bytes // 3) * 4 + 12 * settings.max_description_chars + 256
    return min(settings.max_batch_body_bytes, settings.max_batch_items * row + FORM_OVERHEAD)


class BodyAborted(ServiceError):
    """The body broke a limit (size, time) while streaming in; raised from ``receive``."""


class _Exchange:
    """One request's answer: the status it got, whether it started, the body error that must win."""

    def __init__(self, send: Callable[[Message], Any], request_id: str, path: str, headers: dict[bytes, bytes],
                 draining: bool = False) -> None:
        self._send = send
        self.request_id, self.path = request_id, path
        self.draining = draining  # the worker is shutting down: the connection is not kept for another request
        self.status = http_status("internal_error")  # until the app answers
        self.started = False
        self.override = False  # our body error replaced the framework's answer
        self.abort: BodyAborted | None = None
        length = headers.get(b"content-length")
        self.has_body = b"transfer-encoding" in headers or (length is not None and length.strip(b" 0") != b"")
        self.body_done = not self.has_body

    def note(self, message: Message) -> None:
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.body_done = True

    def tracking(self, receive: Callable[[], Any]) -> Callable[[], Any]:
        async def tracked() -> Message:
            message: Message = await receive()
            self.note(message)
            return message
        return tracked

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self.override:
                return
            if self.abort is not None and message["status"] != self.abort.status:
                # the framework turned our body error into another answer; the caller must see ours
                self.override = True
                abort, body = self.abort, render_json(error_body(self.abort.code, self.abort.message, self.request_id))
                self.status, self.started = abort.status, True
                await self._send({"type": "http.response.start", "status": abort.status, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", self.request_id.encode()), (b"connection", b"close")]})
                await self._send({"type": "http.response.body", "body": body})
                return
            self.status, self.started = message["status"], True
            hdrs = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
            hdrs += [(b"x-request-id", self.request_id.encode()), (b"x-content-type-options", b"nosniff")]
            if (self.draining or (self.has_body and not self.body_done)) and not any(k.lower() == b"connection" for k, _ in hdrs):
                # answered before its body was read: close, or the client could trickle the rest for ever.
                # Draining: close after the answer, so that no client sends its next request on a connection
                # the worker is about to close (a reset the client cannot tell from a failure)
                hdrs.append((b"connection", b"close"))
            message = {**message, "headers": hdrs}
        elif message["type"] == "http.response.body" and self.override:
            return
        await self._send(message)

    async def reply(self, code: str, msg: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """An error answer: its status and Retry-After from the error table."""
        body = render_json(error_payload(self.path, code, msg, self.request_id))
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (extra or [])
        hdrs += [(k.lower().encode(), v.encode()) for k, v in retry_headers(code).items()]
        await self.send({"type": "http.response.start", "status": http_status(code), "headers": hdrs})
        await self.send({"type": "http.response.body", "body": body})


class _BodyGuard:
    """A request body counted as it streams: refused past its size limit, past its deadline, or
    when this worker's bodies in flight pass their budget. Never buffered whole here."""

    def __init__(self, owner: RequestContextMiddleware, ex: _Exchange, receive: Callable[[], Any], limit: int,
                 reserved: int, deadline: float) -> None:
        self.owner, self.ex, self._receive, self.limit = owner, ex, receive, limit
        self.received = 0
        self.held = reserved  # bytes counted in owner.inflight_body_bytes for this body
        owner.inflight_body_bytes += reserved
        self.loop_deadline = asyncio.get_running_loop().time() + max(0.0, deadline - time.perf_counter())

    def _fail(self, code: str, message: str) -> BodyAborted:
        self.ex.abort = BodyAborted(message, code=code)
        return self.ex.abort

    async def receive(self) -> Message:
        settings = self.owner.settings
        try:
            # asyncio.timeout_at, not wait_for: no task per body chunk (a 10 MB upload is ~160 chunks)
            async with asyncio.timeout_at(self.loop_deadline):
                message: Message = await self._receive()
        except TimeoutError:
            raise self._fail("request_timeout",
                             f"the request body did not arrive within {settings.body_timeout_s:g} s") from None
        if message["type"] != "http.request":
            return message
        self.ex.note(message)
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            raise self._fail("payload_too_large", f"the request body exceeds {self.limit} bytes")
        if self.received > self.held:  # past its reservation (a chunked body): count the rest now
            self.owner.inflight_body_bytes += self.received - self.held
            self.held = self.received
            if self.owner.inflight_body_bytes > settings.max_inflight_body_bytes:
                raise self._fail("overloaded", "request bodies in progress hold more than the limit of "
                                 f"{settings.max_inflight_body_bytes} bytes")
        return message

    def release(self) -> None:
        self.owner.inflight_body_bytes -= self.held
        self.held = 0


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, pipeline: Pipeline | None = None) -> None:
        self.app = app
        self.pipeline = pipeline
        self.settings = settings
        self.metrics = metrics
        self.inflight_body_bytes = 0  # bodies being received on this worker (touched on the event loop only)
        key = settings.api_key.get_secret_value() if settings.api_key else None
        # digests have equal length, so compare_digest's time does not depend on the key's length
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None
        # route -> (required content type, body limit)
        # a route's body limit is what it can accept, capped by the configured one
        self.rows_limit = rows_body_limit(settings)
        self.post_rules = {
            "/classify": ("multipart/form-data", settings.max_upload_bytes + FORM_OVERHEAD + 4 * settings.max_description_chars),
            "/classify/batch": ("application/json", self.rows_limit),
        }

    def _rule(self, path: str) -> tuple[str, int] | None:
        rule = self.post_rules.get(path)
        if rule is None and path.startswith("/v2/models/") and path.endswith("/infer"):
            # JSON or JSON + binary tensors: the protocol tells them apart by a header, not the type
            return ("", self.rows_limit)
        return rule

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        assert self._key_digest is not None
        supplied = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if supplied is None and auth[:7].lower() == b"bearer ":
            supplied = auth[7:].strip()
        digest = hashlib.sha256(supplied or b"").digest()
        return hmac.compare_digest(digest, self._key_digest) and supplied is not None

    async def _call_app(self, scope: Scope, receive: Callable[[], Any], ex: _Exchange) -> None:
        try:
            await self.app(scope, receive, ex.send)
        except BodyAborted:
            raise
        except ClientDisconnect:
            # the client hung up before its body arrived: nothing to answer, and not a server error
            if not ex.started:
                ex.status = http_status("client_closed_request")  # 499, logged, never sent
        except Exception as exc:
            # answered here, inside the request-id scope; the traceback goes to the log only
            log.error("unhandled error (request_id=%s): %s", ex.request_id, type(exc).__name__, exc_info=exc)
            if not ex.started:
                await ex.reply("internal_error", "internal error; see the service log with this request id")

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        # ids need uniqueness, not secrecy: getrandbits avoids uuid4's urandom syscall per request
        request_id = incoming if _SANE_ID.match(incoming) else f"{random.getrandbits(128):032x}"
        scope.setdefault("state", {})["request_id"] = request_id
        path, method = scope["path"], scope["method"]
        ex = _Exchange(send, request_id, path, headers, self.pipeline is not None and self.pipeline.draining)
        if not tracing_active():
            await self._handle(scope, receive, ex, headers, method, start)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        with tracer.start_as_current_span(f"HTTP {method}", context=extract(carrier), kind=SpanKind.SERVER) as span:
            await self._handle(scope, receive, ex, headers, method, start)
            if span.is_recording():
                route = getattr(scope.get("route"), "path", path)
                span.update_name(f"{method} {route}")
                span.set_attributes({"http.request.method": method, "http.route": route,
                                     "http.response.status_code": int(ex.status), "request_id": request_id})

    async def _handle(self, scope: Scope, receive: Callable[[], Any], ex: _Exchange, headers: dict[bytes, bytes],
                      method: str, start: float) -> None:
        try:
            await self._checked(scope, receive, ex, headers, method, start)
        finally:
            self._account(scope, ex, method, start)

    async def _checked(self, scope: Scope, receive: Callable[[], Any], ex: _Exchange, headers: dict[bytes, bytes],
                       method: str, start: float) -> None:
        """API key, then for POST routes with a body rule: content type, declared size, the in-flight budget."""
        path = ex.path
        if (self._key_digest is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)
                and not self._key_ok(headers)):
            await ex.reply("unauthorized", "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                           [(b"www-authenticate", b"Bearer")])
            return
        rule = self._rule(path) if method == "POST" else None
        if rule is None:
            await self._call_app(scope, ex.tracking(receive), ex)
            return
        ctype, limit = rule
        got = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype and got != ctype:
            await ex.reply("unsupported_media_type", f"POST {path} takes {ctype}, not {got or 'no content type'}")
            return
        declared = headers.get(b"content-length")
        # not a plain length: uvicorn's parser has refused such a request already
        reserved = int(declared) if declared is not None and _DECIMAL.fullmatch(declared) else 0
        if reserved > limit:
            await ex.reply("payload_too_large", f"the request body is {reserved} bytes; the limit is {limit}")
            return
        # memory for bodies in flight is bounded: a declared length is reserved before anything is read
        budget = self.settings.max_inflight_body_bytes
        if reserved and self.inflight_body_bytes + reserved > budget:
            await ex.reply("overloaded", f"request bodies in progress hold {self.inflight_body_bytes} bytes; "
                           f"{reserved} more would pass the limit of {budget}", [(b"connection", b"close")])
            return
        guard = _BodyGuard(self, ex, receive, limit, reserved, start + self.settings.body_timeout_s)
        try:
            await self._call_app(scope, guard.receive, ex)
        except BodyAborted as exc:
            if not ex.started:
                await ex.reply(exc.code, exc.message, [(b"connection", b"close")])
        finally:
            guard.release()

    def _account(self, scope: Scope, ex: _Exchange, method: str, start: float) -> None:
        """Metrics and the access log line: the same fields for every route and protocol."""
        # labels and the log line name route templates only: a path no route matched is "unmatched",
        # whatever its status (401, 405, 413...), so no client can add label values or forge log lines
        template = getattr(scope.get("route"), "path", None) or "unmatched"
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(template, method, str(ex.status)).inc()
        self.metrics.request_latency.labels(template).observe(elapsed)
        if not log.isEnabledFor(logging.INFO):  # no access log: skip gathering its fields (a few µs)
            return
        state = scope.get("state", {})
        log.info("%s %s %s", method, template, ex.status, extra={
            "request_id": ex.request_id, "method": method, "route": template, "status": ex.status,
            "latency_ms": round(elapsed * 1000, 2), "rows": state.get("rows"), "batch_size": state.get("batch_size"),
            # the version that answered (set by the pipeline: a loaded model's, never a client-chosen name)
            "model": state.get("model"), "model_version": state.get("model_version"), "provider": self._provider()})

    def _provider(self) -> str | None:
        if self.pipeline is None:
            return None
        loaded = next(self.pipeline.repository.loaded(), None)
        return loaded.info.provider if loaded is not None else None
