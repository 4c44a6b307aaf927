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

from .errors import ServiceError, error_body, error_payload, render_json
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


class BodyAborted(ServiceError):
    """The body broke a limit (size, time) while streaming in; raised from ``receive``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.status = status


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
        self.post_rules = {
            "/classify": ("multipart/form-data", settings.max_upload_bytes + FORM_OVERHEAD + 4 * settings.max_description_chars),
            "/classify/batch": ("application/json", settings.max_batch_body_bytes),
        }

    def _rule(self, path: str) -> tuple[str, int] | None:
        rule = self.post_rules.get(path)
        if rule is None and path.startswith("/v2/models/") and path.endswith("/infer"):
            # JSON or JSON + binary tensors: the protocol tells them apart by a header, not the type
            return ("", self.settings.max_batch_body_bytes)
        return rule

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        assert self._key_digest is not None
        supplied = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if supplied is None and auth[:7].lower() == b"bearer ":
            supplied = auth[7:].strip()
        digest = hashlib.sha256(supplied or b"").digest()
        return hmac.compare_digest(digest, self._key_digest) and supplied is not None

    async def _call_app(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any],
                        reply: Callable[..., Any], status: dict[str, Any], request_id: str) -> None:
        try:
            await self.app(scope, receive, send)
        except BodyAborted:
            raise
        except ClientDisconnect:
            # the client hung up before its body arrived: nothing to answer, and not a server error
            if not status["started"]:
                status["status"] = 499
        except Exception as exc:
            # answered here, inside the request-id scope; the traceback goes to the log only
            log.error("unhandled error (request_id=%s): %s", request_id, type(exc).__name__, exc_info=exc)
            if not status["started"]:
                await reply(500, "internal_error", "internal error; see the service log with this request id")

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
        status_holder: dict[str, Any] = {"status": 500, "started": False, "override": False, "abort": None}
        if not tracing_active():
            await self._handle(scope, receive, send, start, headers, request_id, path, method, status_holder)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        with tracer.start_as_current_span(f"HTTP {method}", context=extract(carrier), kind=SpanKind.SERVER) as span:
            await self._handle(scope, receive, send, start, headers, request_id, path, method, status_holder)
            if span.is_recording():
                route = scope.get("route")
                span.update_name(f"{method} {getattr(route, 'path', path)}")
                span.set_attributes({"http.request.method": method, "http.route": getattr(route, "path", path),
                                     "http.response.status_code": int(status_holder["status"]), "request_id": request_id})

    async def _handle(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any], start: float,
                      headers: dict[bytes, bytes], request_id: str, path: str, method: str,
                      status_holder: dict[str, Any]) -> None:

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                if status_holder["override"]:
                    return
                abort: BodyAborted | None = status_holder["abort"]
                if abort is not None and message["status"] != abort.status:
                    # the framework turned our body error into another answer; the caller must see ours
                    status_holder["override"] = True
                    body = render_json(error_body(abort.code, abort.message, request_id))
                    status_holder["status"], status_holder["started"] = abort.status, True
                    await send({"type": "http.response.start", "status": abort.status, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"x-request-id", request_id.encode()), (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                    return
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                hdrs = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                hdrs += [(b"x-request-id", request_id.encode()), (b"x-content-type-options", b"nosniff")]
                if has_body and not status_holder["body_done"] and not any(k.lower() == b"connection" for k, _ in hdrs):
                    # answered before its body was read: close, or the client could trickle the rest for ever
                    hdrs.append((b"connection", b"close"))
                message = {**message, "headers": hdrs}
            elif message["type"] == "http.response.body" and status_holder["override"]:
                return
            await send(message)

        declared_length = headers.get(b"content-length")
        has_body = b"transfer-encoding" in headers or (declared_length is not None and declared_length.strip(b" 0") != b"")
        status_holder["body_done"] = not has_body

        async def receive_tracked() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                status_holder["body_done"] = True
            return message

        async def reply(status: int, code: str, msg: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
            body = render_json(error_payload(path, code, msg, request_id))
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (extra or [])
            await send_wrapped({"type": "http.response.start", "status": status, "headers": hdrs})
            await send_wrapped({"type": "http.response.body", "body": body})

        try:
            if (self._key_digest is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)
                    and not self._key_ok(headers)):
                await reply(401, "unauthorized", "missing or invalid API key (Authorization: Bearer <key> or X-API-Key)",
                            [(b"www-authenticate", b"Bearer")])
                return
            rule = self._rule(path) if method == "POST" else None
            if rule is None:
                await self._call_app(scope, receive_tracked, send_wrapped, reply, status_holder, request_id)
                return
            ctype, limit = rule
            got = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype and got != ctype:
                await reply(415, "unsupported_media_type", f"POST {path} takes {ctype}, not {got or 'no content type'}")
                return
            declared = headers.get(b"content-length")
            if declared is not None and not _DECIMAL.fullmatch(declared):
                declared = None  # not a length: uvicorn's parser has refused such a request already
            if declared is not None and int(declared) > limit:
                await reply(413, "payload_too_large", f"the request body is {int(declared)} bytes; the limit is {limit}")
                return
            # memory for bodies in flight is bounded: a declared length is reserved before anything
            # is read; a chunked body is counted as it arrives
            budget = self.settings.max_inflight_body_bytes
            reserved = int(declared) if declared is not None else 0
            if reserved and self.inflight_body_bytes + reserved > budget:
                await reply(503, "overloaded", f"request bodies in progress hold {self.inflight_body_bytes} bytes; "
                            f"{reserved} more would pass the limit of {budget}", [(b"retry-after", b"1"), (b"connection", b"close")])
                return
            self.inflight_body_bytes += reserved
            held = reserved
            received = 0
            deadline = start + self.settings.body_timeout_s
            loop_deadline = asyncio.get_running_loop().time() + max(0.0, deadline - time.perf_counter())

            async def receive_guarded() -> Message:
                # the body is counted as it streams (refused past the limit, never buffered whole)
                # and must arrive within body_timeout_s, so a slow sender cannot hold a request open
                nonlocal received, held
                try:
                    # asyncio.timeout_at, not wait_for: no task per body chunk (a 10 MB upload is ~160 chunks)
                    async with asyncio.timeout_at(loop_deadline):
                        message = await receive()
                except TimeoutError:
                    status_holder["abort"] = BodyAborted(408, "request_timeout",
                                                         f"the request body did not arrive within {self.settings.body_timeout_s:g} s")
                    raise status_holder["abort"] from None
                if message["type"] == "http.request":
                    if not message.get("more_body", False):
                        status_holder["body_done"] = True
                    received += len(message.get("body", b""))
                    if received > limit:
                        status_holder["abort"] = BodyAborted(413, "payload_too_large", f"the request body exceeds {limit} bytes")
                        raise status_holder["abort"]
                    if received > held:  # past its reservation (a chunked body): count the rest now
                        self.inflight_body_bytes += received - held
                        held = received
                        if self.inflight_body_bytes > budget:
                            status_holder["abort"] = BodyAborted(503, "overloaded", "request bodies in progress hold more "
                                                                 f"than the limit of {budget} bytes")
                            raise status_holder["abort"]
                return message

            try:
                await self._call_app(scope, receive_guarded, send_wrapped, reply, status_holder, request_id)
            except BodyAborted as exc:
                if not status_holder["started"]:
                    extra = [(b"connection", b"close")] + ([(b"retry-after", b"1")] if exc.status == 503 else [])
                    await reply(exc.status, exc.code, exc.message, extra)
                return
            finally:
                self.inflight_body_bytes -= held
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("unmatched" if status_holder["status"] == 404 else path)
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(template, method, str(status_holder["status"])).inc()
            self.metrics.request_latency.labels(template).observe(elapsed)
            state = scope.get("state", {})
            log.info("%s %s %s", method, template, status_holder["status"], extra={
                "request_id": request_id, "method": method, "route": template, "status": status_holder["status"],
                "latency_ms": round(elapsed * 1000, 2), "rows": state.get("rows"), "batch_size": state.get("batch_size"),
                "provider": self._provider()})

    def _provider(self) -> str | None:
        providers = self.pipeline.predictor.providers if self.pipeline is not None else []
        return providers[0] if providers else None
