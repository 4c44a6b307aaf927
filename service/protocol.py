"""Request heads bounded in size and time, before uvicorn's HTTP parser sees them.

uvicorn's httptools protocol accepts a header of any size (a 64 MB value took seconds of the
event loop: the parser grows it by concatenation) and has no deadline for a request head, so
a client that trickles header bytes holds its connection for ever. :class:`GuardedProtocol`
sits between the socket and uvicorn's protocol (composition: the same protocol class uvicorn
would pick, given through ``Config(http=...)``) and follows HTTP/1.1 framing just enough to
know where each request head starts and ends:

* a head longer than ``max_header_bytes`` gets 431 and the connection is closed;
* a head not complete ``header_timeout_s`` after its first byte (or after the connection
  opened) gets 408 and the connection is closed.

Bodies pass through untouched (their size and time are the request middleware's). Framing it
cannot follow (a malformed chunk size, say) stops the tracking for that connection and leaves
the judgement to uvicorn's parser.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

try:  # the class uvicorn's "auto" would choose
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Inner
except ImportError:  # pragma: no cover (uvicorn without httptools)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Inner  # type: ignore[assignment]

from .errors import error_body, render_json

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _OFF = range(6)
MAX_CHUNK_LINE = 1024
_DECIMAL = re.compile(rb"[0-9]{1,19}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


def _error(status: int, reason: str, code: str, message: str) -> bytes:
    body = render_json(error_body(code, message, ""))
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def guarded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these bounds."""

    class Guarded(GuardedProtocol):
        MAX_HEADER_BYTES = max_header_bytes
        HEADER_TIMEOUT_S = header_timeout_s

    return Guarded


class GuardedProtocol(asyncio.Protocol):
    MAX_HEADER_BYTES = 32 * 1024
    HEADER_TIMEOUT_S = 10.0

    def __init__(self, **kwargs: Any) -> None:
        self.inner = _Inner(**kwargs)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.head = bytearray()  # the current head so far (bounded by MAX_HEADER_BYTES)
        self.remaining = 0  # body or chunk bytes still to pass
        self.line = bytearray()  # a chunk-size or trailer line so far
        self.timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol, passed on -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._start_timer()
        self.inner.connection_made(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        return None  # close the transport, as uvicorn's protocols do

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.state != _OFF and not self._track(data):
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
            self._refuse(_error(408, "Request Timeout", "request_timeout",
                                f"the request head did not arrive within {self.HEADER_TIMEOUT_S:g} s"))

    def _track(self, data: bytes) -> bool:
        """Follow the framing over ``data``; False when the connection was refused."""
        pos, n = 0, len(data)
        while pos < n and self.state != _OFF:
            if self.state == _HEAD:
                if not self.head:
                    while pos < n and data[pos] in b"\r\n":  # empty lines before a request line are ignored
                        pos += 1
                    if pos == n:
                        break
                    if self.timer is None:
                        self._start_timer()  # a new head begins: its clock starts with its first byte
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
                        self._refuse(_error(431, "Request Header Fields Too Large", "header_too_large",
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
                    self._refuse(_error(400, "Bad Request", "bad_request", "malformed chunked body"))
                    return False
                if nl >= 0:
                    self._line_done(bytes(self.line).strip())
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

    def _line_done(self, line: bytes) -> None:
        if self.state == _TRAILER:
            if not line:
                self._next_head()
            return
        token = line.split(b";")[0].strip()
        if not _HEX.fullmatch(token):
            self.state = _OFF  # uvicorn's parser answers a malformed chunk size itself
            return
        size = int(token, 16)
        if size == 0:
            self.state = _TRAILER
        else:
            self.state, self.remaining = _CHUNK_DATA, size + 2  # the data and its CRLF
