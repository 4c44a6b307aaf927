"""Request heads bounded in size and time, before uvicorn's HTTP parser sees them.

uvicorn's httptools protocol accepts a header of any size (a 64 MB value took seconds of the
event loop: the parser grows it by concatenation) and has no deadline for a request head, so
a client that trickles header bytes holds its connection for ever. :class:`GuardedProtocol`
sits between the socket and uvicorn's protocol (composition: the same protocol class uvicorn
would pick, given through ``Config(http=...)``) and follows HTTP/1.1 framing just enough to
know where each request head starts and ends:

* a head longer than ``max_header_bytes`` gets 431 and the connection is closed;
* a head not complete ``header_timeout_s`` after its first byte (or after the connection
  opened) gets 408 and the connection is closed;
* past ``max_connections`` open connections in this worker, a new one gets 503 and is closed
  before uvicorn sees it (uvicorn's ``limit_concurrency`` answers 503 but keeps the connection).

Bodies pass through untouched (their size and time are the request middleware's). The guard
fails closed: framing it cannot follow (a malformed chunk size, say) is answered 400 and the
connection closed; it never stops watching a connection. Chunk sizes may carry leading zeros (as
the parser underneath accepts them), trailers count against ``max_header_bytes``, and bytes
between requests (a bare CRLF after a response, which cancels uvicorn's keep-alive timer) start the
head clock, so an idle connection cannot be held open by sending nothing but line ends.
"""

from __future__ import annotations

import asyncio
import re
from http import HTTPStatus
from typing import Any

try:  # the class uvicorn's "auto" would choose
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Inner
except ImportError:  # pragma: no cover (uvicorn without httptools)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Inner  # type: ignore[assignment]

from .errors import error_body, http_status, render_json, retry_headers

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _OFF = range(6)
MAX_CHUNK_LINE = 1024
_DECIMAL = re.compile(rb"[0-9]{1,19}")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
MAX_CHUNK_DIGITS = 15  # significant hex digits of a chunk size (leading zeros aside): under 2**60


def _error(code: str, message: str) -> bytes:
    """A whole error answer for a code of the error table (its status, reason and Retry-After), then close."""
    body = render_json(error_body(code, message, ""))
    status = http_status(code)
    extra = "".join(f"{k.lower()}: {v}\r\n" for k, v in retry_headers(code).items())
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n").encode() + body


def guarded_protocol(max_header_bytes: int, header_timeout_s: float, max_connections: int = 1024) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these bounds."""

    class Guarded(GuardedProtocol):
        MAX_HEADER_BYTES = max_header_bytes
        HEADER_TIMEOUT_S = header_timeout_s
        MAX_CONNECTIONS = max_connections
        open_connections = 0  # this class's, i.e. this server's (one per worker process)

    return Guarded


class GuardedProtocol(asyncio.Protocol):
    MAX_HEADER_BYTES = 32 * 1024
    HEADER_TIMEOUT_S = 10.0
    MAX_CONNECTIONS = 1024
    open_connections = 0

    def __init__(self, **kwargs: Any) -> None:
        self.inner: asyncio.Protocol | None = _Inner(**kwargs)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.head = bytearray()  # the current head so far (bounded by MAX_HEADER_BYTES)
        self.remaining = 0  # body or chunk bytes still to pass
        self.line = bytearray()  # a chunk-size or trailer line so far
        self.trailers = 0  # bytes of the current body's trailer section so far
        self.timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol, passed on -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        cls = type(self)
        if cls.open_connections >= self.MAX_CONNECTIONS:
            # refused before uvicorn sees it: an idle flood cannot take every file descriptor
            self.inner = None
            self._refuse(_error("overloaded", f"this worker holds {cls.open_connections} connections, its limit"))
            return
        cls.open_connections += 1
        self._start_timer()
        assert self.inner is not None
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.inner is not None:
            type(self).open_connections -= 1
            self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            self.inner.eof_received()
        return None  # close the transport, as uvicorn's protocols do

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.inner is None or (self.state != _OFF and not self._track(data)):
            return  # refused: the connection is closing
        self.inner.data_received(data)

    # --- the guard -------------------------------------------------------------------
    def _start_timer(self) -> None:
        self._stop_timer()
        self.timer = self.loop.call_later(self.HEADER_TIMEOUT_S, self._timed_out)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _refuse(self, payload: bytes) -> None:
        self._stop_timer()
        self.state = _OFF
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(payload)
            self.transport.close()

    def _timed_out(self) -> None:
        self.timer = None
        if self.state == _HEAD:
            self._refuse(_error("request_timeout",
                                f"the request head did not arrive within {self.HEADER_TIMEOUT_S:g} s"))

    def _track(self, data: bytes) -> bool:
        """Follow the framing over ``data``; False when the connection was refused."""
        pos, n = 0, len(data)
        while pos < n and self.state != _OFF:
            if self.state == _HEAD:
                if not self.head:
                    if self.timer is None:
                        # a new head begins, or bytes between requests: the clock starts with the first
                        # byte, line ends included (they cancel uvicorn's keep-alive timer)
                        self._start_timer()
                    while pos < n and data[pos] in b"\r\n":  # empty lines before a request line are ignored
                        pos += 1
                    if pos == n:
                        break
                    end = data.find(b"\r\n\r\n", pos, pos + self.MAX_HEADER_BYTES)
                    if end >= 0:  # the usual case: a whole head in one piece, nothing copied
                        self._head_done(data[pos : end + 4])
                        pos = end + 4
                        continue
                start = max(0, len(self.head) - 3)
                take = min(n - pos, self.MAX_HEADER_BYTES + 1 - len(self.head))
                self.head += data[pos : pos + take]
                end = self.head.find(b"\r\n\r\n", start)
                if end < 0 or end + 4 > self.MAX_HEADER_BYTES:
                    if end >= 0 or len(self.head) > self.MAX_HEADER_BYTES:
                        self._refuse(_error("header_too_large",
                                            f"the request head exceeds {self.MAX_HEADER_BYTES} bytes"))
                        return False
                    return True
                pos += take - (len(self.head) - (end + 4))
                self._head_done(bytes(self.head[: end + 4]))
            elif self.state == _BODY or self.state == _CHUNK_DATA:
                k = min(self.remaining, n - pos)
                self.remaining -= k
                pos += k
                if self.remaining == 0:
                    if self.state == _BODY:
                        self._next_head()
                    else:
                        self.state = _CHUNK_SIZE
            else:  # a chunk-size line or a trailer line
                nl = data.find(b"\n", pos)
                stop = n if nl < 0 else nl + 1
                self.line += data[pos:stop]
                pos = stop
                if len(self.line) > MAX_CHUNK_LINE:  # a chunk size or trailer line this long is no real client's
                    self._refuse(_error("bad_request", "malformed chunked body"))
                    return False
                if nl >= 0:
                    if self.state == _TRAILER:
                        self.trailers += len(self.line)
                        if self.trailers > self.MAX_HEADER_BYTES:
                            self._refuse(_error("header_too_large",
                                                f"the request's trailers exceed {self.MAX_HEADER_BYTES} bytes"))
                            return False
                    if not self._line_done(bytes(self.line).strip()):
                        return False
                    self.line.clear()
        return True

    def _next_head(self) -> None:
        self.state = _HEAD
        self.head.clear()

    def _head_done(self, head: bytes) -> None:
        self._stop_timer()
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and _DECIMAL.fullmatch(value.strip()):
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        self.head.clear()
        if chunked:
            self.state = _CHUNK_SIZE
        elif length:
            self.state, self.remaining = _BODY, length
        else:
            self._next_head()

    def _line_done(self, line: bytes) -> bool:
        """A chunk-size or trailer line; False when the connection was refused."""
        if self.state == _TRAILER:
            if not line:
                self._next_head()
            return True
        token = line.split(b";")[0].strip()
        if not _HEX.fullmatch(token) or len(token.lstrip(b"0")) > MAX_CHUNK_DIGITS:
            self._refuse(_error("bad_request", "malformed chunked body"))  # fail closed
            return False
        size = int(token, 16)
        if size == 0:
            self.state, self.trailers = _TRAILER, 0
        else:
            self.state, self.remaining = _CHUNK_DATA, size + 2  # the data and its CRLF
        return True
