"""A real server under load: SIGTERM drains, overload is refused cheaply, slow and huge bodies are cut off."""

from __future__ import annotations

import asyncio
import io
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import ROOT, app_client, jpeg_bytes, multipart_body, start_server, synthetic_samples
from PIL import Image

from benchmarks.procstats import proc_stats


def rss_mb(pid: int) -> float:
    return proc_stats(pid)["rss_mb"]


def big_jpeg() -> bytes:
    arr = np.random.default_rng(3).integers(0, 60, (1200, 1600, 3), dtype=np.uint8) + 90
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_in_flight_requests(tiny_artifact: Path, workers: str) -> None:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS=workers, CLASSIFIER_DRAIN_DELAY_S="1.5",
                      CLASSIFIER_SHUTDOWN_GRACE_S="15")
    image = big_jpeg()
    n = 24
    results: list[int] = []

    async def fire() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=n)) as c:
            rs = await asyncio.gather(*(c.post("/classify", files={"image": ("x.jpg", image, "image/jpeg")},
                                               data={"description": f"tomato {i}"}) for i in range(n)),
                                      return_exceptions=True)
            results.extend(r.status_code if isinstance(r, httpx.Response) else -1 for r in rs)

    t = threading.Thread(target=lambda: asyncio.run(fire()))
    t.start()
    time.sleep(0.15)  # requests are in flight
    t_sig = time.time()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = httpx.get(f"{url}/readyz", timeout=5)  # still accepting during the drain delay...
    assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
    t.join(timeout=30)
    assert results == [200] * n, results  # ...and every accepted request was answered
    time.sleep(max(0.0, t_sig + 2.5 - time.time()))
    with pytest.raises(httpx.ConnectError):  # after the delay, no new connections
        httpx.get(f"{url}/healthz", timeout=2)
    assert proc.wait(timeout=15) == 0
    assert time.time() - t_sig < 15


def test_overload_is_refused_early_and_health_stays_fast(tiny_artifact: Path, tmp_path: Path) -> None:
    import json
    import pickle


    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_MAX_QUEUE="4")
    try:
        small = synthetic_samples(1, seed=4)[0][0]

        def timed_request() -> float:
            t0 = time.perf_counter()
            assert httpx.post(f"{url}/classify", files={"image": ("x.jpg", small, "image/jpeg")}).status_code == 200
            return time.perf_counter() - t0

        baseline = [timed_request() for _ in range(10)]
        rss_before = rss_mb(proc.pid)
        with open(tmp_path / "bodies.pkl", "wb") as f:
            pickle.dump([("/classify", *multipart_body(big_jpeg(), "tomato"))], f)
        # the load comes from another process, so this one measures /healthz undisturbed
        gen = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--bodies", str(tmp_path / "bodies.pkl"),
                                "--concurrency", "64", "--requests", "5000"], stdout=subprocess.PIPE, cwd=ROOT)
        health: list[float] = []
        retry_after = None
        with httpx.Client(base_url=url, timeout=5) as h:
            while gen.poll() is None:
                t0 = time.perf_counter()
                assert h.get("/healthz").status_code == 200
                health.append(time.perf_counter() - t0)
                if retry_after is None:
                    r = h.post("/classify", files={"image": ("x.jpg", small, "image/jpeg")})
                    if r.status_code == 503:
                        retry_after = r.headers.get("retry-after")
                        assert r.json()["error"]["code"] == "overloaded"
                time.sleep(0.05)
        result = json.loads(gen.stdout.read() if gen.stdout else b"{}")
        statuses = result["statuses"]
        assert set(statuses) == {"200", "503"}, statuses  # nothing else: no 5xx, no dropped connection
        assert statuses["503"] > statuses["200"]  # several times capacity: most are refused...
        p50 = result["p50_ms_by_status"]
        # ...faster than service, before any decoding. Refusals close their connection now (the body
        # is never read: a client must not be able to trickle it for ever), so the load generator
        # reconnects after each: measured 143-176 ms against 217-262 ms for a 200 (it was under 1/3
        # while refused connections were kept alive)
        assert p50["503"] < 0.8 * p50["200"], p50
        assert retry_after == "1"
        # the single worst probe gets slack for scheduler noise on a 2-core CI box
        p95 = sorted(health)[int(0.95 * (len(health) - 1))]
        # measured on the 2-core dev box: p95 86-104 ms before rows were admitted after their body
        # (bodies of refused requests were never read), 104-108 ms since; probes time out after 1 s
        assert len(health) > 10 and p95 < 0.2 and max(health) < 0.5, f"/healthz p95 {p95 * 1000:.0f} ms, max {max(health) * 1000:.0f} ms"
        assert rss_mb(proc.pid) - rss_before < 100
        after = [timed_request() for _ in range(10)]
        assert np.median(after) < 3 * np.median(baseline) + 0.005  # back to normal once the load stops
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_BODY_TIMEOUT_S="2")
    yield proc, url
    proc.terminate()
    proc.wait(timeout=20)


def test_slow_client_times_out_and_others_are_served(server: tuple[subprocess.Popen[bytes], str]) -> None:
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n" + jpeg_bytes() + b"\r\n--b--\r\n"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode())
    t0 = time.time()
    answer = b""
    sock.settimeout(0.5)
    for i in range(0, len(body), 16):  # a trickle: 16 bytes every 0.25 s would take minutes
        try:
            sock.sendall(body[i : i + 16])
        except OSError:
            break
        fast = httpx.post(f"{url}/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")}, timeout=5)
        assert fast.status_code == 200  # other clients are not held up
        try:
            answer = sock.recv(65536)
            if answer:
                sock.settimeout(1.0)
                try:  # headers and body may come in separate segments
                    while chunk := sock.recv(65536):
                        answer += chunk
                except (TimeoutError, OSError):
                    pass
                break
        except TimeoutError:
            pass
        if time.time() - t0 > 10:
            break
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    assert 1.5 < time.time() - t0 < 6


def test_sixty_megabyte_upload_is_refused_while_streaming(server: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = server
    before = rss_mb(proc.pid)
    big = b"\xff" * (60 * 1024 * 1024)
    r = httpx.post(f"{url}/classify", files={"image": ("big.jpg", big, "image/jpeg")}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    # no Content-Length (chunked): counted as it streams. Only two outcomes are a refusal: a 413, or
    # the connection reset after the server has answered 413 (it stops reading a body it refused)
    port = int(url.rsplit(":", 1)[1])
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        head = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
        try:
            s.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
            for _ in range(60):
                s.sendall(b"100000\r\n" + b"\xff" * (1024 * 1024) + b"\r\n")
                if select.select([s], [], [], 0)[0]:
                    answer += s.recv(65536)
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        # the head and the body may come in separate segments: read on until the body, EOF or a reset
        s.settimeout(5)
        while b"payload_too_large" not in answer:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"payload_too_large" in answer
    assert rss_mb(proc.pid) - before < 30
    assert httpx.post(f"{url}/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")}).status_code == 200


def test_a_draining_worker_closes_each_connection_after_its_answer(tiny_artifact: Path) -> None:
    """Past SIGTERM (a rolling restart's old worker) no client reuses a connection the worker is about
    to close: a request sent on it at that moment would be reset, with no answer to retry on."""
    with app_client(tiny_artifact) as c:
        assert "close" not in c.get("/healthz").headers.get("connection", "")
        c.app.state.pipeline.draining = True
        for r in (c.get("/healthz"), c.post("/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")})):
            assert r.headers["connection"] == "close", r.headers
