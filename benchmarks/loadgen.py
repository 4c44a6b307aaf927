"""A small, fast HTTP/1.1 load generator for the benchmark (its own process, raw asyncio streams).

Each of ``concurrency`` keep-alive connections sends prebuilt requests one after another
until ``requests`` have been sent in total; it records each request's latency and status.
Raw sockets keep the generator's own CPU cost far below an HTTP client library's, which
matters on a 2-core machine where the generator and the server share the cores.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --bodies bodies.pkl --concurrency 32 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import sys
import time
from urllib.parse import urlsplit


def build_request(host: str, path: str, body: bytes, content_type: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def _connection(host: str, port: int, requests: list[bytes], counter: list[int], total: int,
                      latencies: list[float], statuses: dict[int, int], by_status: dict[int, list[float]]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] < total:
            i = counter[0]
            counter[0] += 1
            t0 = time.perf_counter()
            try:
                writer.write(requests[i % len(requests)])
                await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the body was read (413, 503 + close): the answer may be waiting to be read
            try:
                status_line = await reader.readline()
            except ConnectionResetError:
                status_line = b""
            if not status_line:
                statuses[-1] = statuses.get(-1, 0) + 1  # connection closed by the server
                reader, writer = await asyncio.open_connection(host, port)
                continue
            status = int(status_line.split()[1])
            length = 0
            close = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                lname = name.strip().lower()
                if lname == b"content-length":
                    length = int(value.strip())
                elif lname == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            by_status.setdefault(status, []).append(latencies[-1])
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def run(url: str, requests: list[bytes], concurrency: int, total: int) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    by_status: dict[int, list[float]] = {}
    counter = [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(_connection(host, port, requests, counter, total, latencies, statuses, by_status) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    ok = statuses.get(200, 0)
    return {"requests": total, "concurrency": concurrency, "seconds": elapsed, "ok": ok, "errors": total - ok,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "requests_per_s": ok / elapsed,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
            "p50_ms_by_status": {str(k): sorted(v)[len(v) // 2] * 1000 for k, v in sorted(by_status.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--bodies", required=True, help="pickle of [(path, body bytes, content type), ...]")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1000)
    a = ap.parse_args(argv)
    with open(a.bodies, "rb") as f:
        bodies = pickle.load(f)
    host = urlsplit(a.url).netloc
    reqs = [build_request(host, path, body, ctype) for path, body, ctype in bodies]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(a.url, reqs, a.concurrency, a.requests))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
