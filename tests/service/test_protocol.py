"""The head guard (service/protocol.py) fuzzed against the HTTP parser underneath it (httptools).

Property: whatever valid HTTP/1.1 a client sends (Content-Length or chunked bodies, zero-padded
chunk sizes, chunk extensions, trailers, blank lines between requests), split at any points, the
guard counts exactly the request heads httptools counts, passes every byte on, and is watching
for the next head at the end. Whatever it cannot follow, it refuses: the guard is never off while
the connection is open.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import service.protocol as protocol


class Inner(asyncio.Protocol):
    """Stands for uvicorn's protocol: records what the guard passes on (uvicorn is not under test here)."""

    def __init__(self, **_: Any) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed = bytearray(), False

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Counting(protocol.GuardedProtocol):
    MAX_HEADER_BYTES = 8 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.heads = 0

    def _head_done(self, head: bytes) -> None:
        self.heads += 1
        super()._head_done(head)


@pytest.fixture(autouse=True, scope="module")
def _inner() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocol, "_Inner", Inner)
        yield


def httptools_messages(stream: bytes) -> int:
    class Count:
        n = 0

        def on_message_complete(self) -> None:
            Count.n += 1

    parser = httptools.HttpRequestParser(Count())
    parser.feed_data(stream)
    return Count.n


def feed(stream: bytes, cuts: list[int]) -> tuple[Counting, Transport]:
    async def run() -> tuple[Counting, Transport]:
        guard, transport = Counting(), Transport()
        guard.connection_made(transport)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for a, b in itertools.pairwise(points):
            guard.data_received(stream[a:b])
            # the invariant: watching, or the connection is closing; never off with the connection open
            assert guard.state != protocol._OFF or transport.closed
        guard.connection_lost(None)
        return guard, transport

    return asyncio.run(run())


def chunk_size(n: int, pad: int, upper: bool, ext: bool) -> bytes:
    digits = f"{n:x}".upper() if upper else f"{n:x}"
    return b"0" * pad + digits.encode() + (b";name=value" if ext else b"")


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    head = method + b" /p HTTP/1.1\r\nHost: t\r\n" + b"".join(
        b"X-%d: " % i + b"v" * draw(st.integers(0, 300)) + b"\r\n" for i in range(draw(st.integers(0, 4))))
    if draw(st.booleans()):
        body = b"b" * draw(st.integers(0, 2000))
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    out = head + b"Transfer-Encoding: chunked\r\n\r\n"
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.integers(1, 700))
        out += chunk_size(n, draw(st.integers(0, 20)), draw(st.booleans()), draw(st.booleans())) + b"\r\n" + b"c" * n + b"\r\n"
    out += chunk_size(0, draw(st.integers(0, 20)), False, draw(st.booleans())) + b"\r\n"
    for i in range(draw(st.integers(0, 3))):
        out += b"X-Trailer-%d: " % i + b"t" * draw(st.integers(0, 200)) + b"\r\n"
    return out + b"\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request(), min_size=1, max_size=5), blanks=st.lists(st.sampled_from([b"", b"\r\n"]), min_size=5, max_size=5),
       cuts=st.lists(st.integers(0, 1 << 20), max_size=12))
def test_the_guard_follows_every_valid_stream_the_parser_accepts(requests: list[bytes],
                                                                  blanks: list[bytes], cuts: list[int]) -> None:
    # httptools, like uvicorn's protocol, treats a blank line after a complete message as the next message's start
    stream = b"".join(blank + r for blank, r in zip(blanks, requests))
    assert httptools_messages(stream) == len(requests)
    guard, transport = feed(stream, cuts)
    assert not transport.closed, transport.written[:200]
    assert guard.heads == len(requests)
    assert bytes(guard.inner.data) == stream  # type: ignore[union-attr]
    assert guard.state == protocol._HEAD and not guard.head


@settings(max_examples=200, deadline=None)
@given(token=st.binary(min_size=1, max_size=40).filter(lambda t: b"\n" not in t and b"\r" not in t and b";" not in t),
       cuts=st.lists(st.integers(0, 1 << 12), max_size=6))
def test_a_chunk_size_the_guard_cannot_follow_is_refused(token: bytes, cuts: list[int]) -> None:
    stream = b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + token + b"\r\n"
    stripped = token.strip()
    followable = stripped.isascii() and all(c in b"0123456789abcdefABCDEF" for c in stripped) and stripped \
        and len(stripped.lstrip(b"0")) <= protocol.MAX_CHUNK_DIGITS
    _guard, transport = feed(stream, cuts)
    if followable:
        assert not transport.closed
    else:  # refused with 400 and closed: never handed on unwatched
        assert transport.closed and transport.written.startswith(b"HTTP/1.1 400"), (token, transport.written[:100])


def test_connections_past_the_limit_are_refused_before_uvicorn_sees_them() -> None:
    cls = protocol.guarded_protocol(8192, 5.0, max_connections=2)

    async def run() -> list[Transport]:
        conns = [(cls(), Transport()) for _ in range(3)]
        for g, t in conns:
            g.connection_made(t)
        assert [t.closed for _, t in conns] == [False, False, True]
        assert conns[2][1].written.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in conns[2][1].written
        conns[2][0].connection_lost(None)  # the refused one does not count
        conns[0][0].connection_lost(None)
        late, t = cls(), Transport()
        late.connection_made(t)  # a slot freed by a closed connection is taken again
        assert not t.closed
        return [t]

    asyncio.run(run())
