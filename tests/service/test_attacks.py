"""Attacks on a real server (two workers): no request may kill a worker, hold it for long, or lock others out.

For each class of hostile input: the answer is the exact 4xx/503 with the right error shape
(or, for broken framing, a closed connection); the same worker processes before and after;
a well-behaved client running beside the attack keeps getting 200 with p99 under 2 s; the
workers' resident memory grows by less than 300 MB; and a valid request is served afterwards.
Inputs are generated here; nothing over 1 MB is committed.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import jpeg_bytes, running_server, start_server, workers_of
from PIL import Image

from benchmarks.procstats import proc_stats

SETTINGS = {"CLASSIFIER_WORKERS": "2", "CLASSIFIER_HEADER_TIMEOUT_S": "1", "CLASSIFIER_BODY_TIMEOUT_S": "3",
            "CLASSIFIER_MAX_INFLIGHT_BODY_BYTES": str(24 * 1024 * 1024), "CLASSIFIER_LOG_LEVEL": "info"}


class GoodClient:
    """A well-behaved client beside the attack: one valid /classify after another."""

    def __init__(self, url: str) -> None:
        self.url, self.stop, self.results = url, threading.Event(), []  # type: ignore[var-annotated]
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        image = jpeg_bytes((320, 240), colour=(180, 40, 40))
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = c.post("/classify", files={"image": ("x.jpg", image, "image/jpeg")},
                                    data={"description": "a red tomato"}).status_code
                except httpx.HTTPError:
                    status = -1
                self.results.append((status, time.perf_counter() - t0))
                time.sleep(0.02)

    def __enter__(self) -> GoodClient:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Path]]:
    log_path = tmp_path_factory.mktemp("attacks") / "server.log"
    log = log_path.open("wb")
    proc, url = start_server(tiny_artifact, stdout=log, **SETTINGS)
    deadline = time.time() + 60
    while len(workers_of(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the second worker loads its model
    yield proc, url, log_path
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    log.close()


def attack(server: tuple[Any, str, Path], run: Callable[[str], None]) -> None:
    """Run ``run(url)`` beside a good client and check the service came through whole."""
    proc, url, _ = server
    pids, rss = workers_of(proc.pid), proc_stats(proc.pid)["rss_mb"]
    assert len(pids) == 2
    with GoodClient(url) as good:
        time.sleep(0.2)
        run(url)
        time.sleep(0.3)
    statuses = [s for s, _ in good.results]
    latencies = sorted(t for _, t in good.results)
    assert statuses and set(statuses) == {200}, statuses
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    assert p99 < 2.0, f"the good client's p99 was {p99:.2f} s"
    assert workers_of(proc.pid) == pids, "a worker died or was replaced"
    growth = proc_stats(proc.pid)["rss_mb"] - rss
    assert growth < 300, f"resident memory grew by {growth:.0f} MB"
    r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")}, timeout=30)
    assert r.status_code == 200


def read_answer(s: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def v2_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and isinstance(body["error"], str) and len(r.content) < 2000, r.text
    assert "Traceback" not in r.text


# --- 1. wrongly typed /v2 JSON -------------------------------------------------------------
def _v2(**fields: Any) -> dict[str, Any]:
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg_bytes()).decode()]}
    image.update(fields)
    return {"inputs": [image]}


V2_BAD_BODIES: list[tuple[str, bytes]] = [
    (name, json.dumps(body).encode()) for name, body in [
        ("number for BYTES data (a gigabyte)", _v2(data=[1_000_000_000])),
        ("negative number for data", _v2(data=[-1])),
        ("float for data", _v2(data=[1.5])),
        ("null element", _v2(data=[None])),
        ("binary_data_size as text", _v2(parameters={"binary_data_size": "10"}, data=None)),
        ("binary_data_size as list", _v2(parameters={"binary_data_size": [1, 2]}, data=None)),
        ("binary_data_size huge", _v2(parameters={"binary_data_size": 10**18}, data=None)),
        ("shape of floats", _v2(shape=[1e308, 1e308])),
        ("shape as text", _v2(shape="1")),
        ("shape negative", _v2(shape=[-1])),
        ("parameters as list", _v2(parameters=[1, 2])),
        ("outputs as text", {**_v2(), "outputs": "label"}),
        ("outputs of numbers", {**_v2(), "outputs": [1, 2]}),
        ("unknown output", {**_v2(), "outputs": [{"name": "nope"}]}),
        ("inputs missing", {"inputs": []}),
        ("datatype wrong", _v2(datatype="FP32")),
    ]
] + [
    ("NaN parameter", json.dumps(_v2()).replace('"shape": [1]', '"shape": [1], "parameters": {"x": NaN}').encode()),
    ("1e400 parameter", json.dumps(_v2()).replace('"shape": [1]', '"shape": [1], "parameters": {"x": 1e400}').encode()),
    ("lone surrogate", json.dumps(_v2()).replace('"name": "image"', '"name": "image\\ud800"').encode()),
    ("nested 1000 deep", b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ' + b"[" * 1000 + b"]" * 1000 + b"}]}"),
    ("not JSON", b"{nope"),
]


def test_wrongly_typed_v2_json_is_a_400_before_anything_is_allocated(server: tuple[Any, str, Path]) -> None:
    def run(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for name, body in V2_BAD_BODIES:
                r = c.post("/v2/models/tiny/infer", content=body, headers={"content-type": "application/json"})
                # JSON that is not JSON (a lone surrogate, nesting past the parser's limit) vs. JSON of the wrong shape
                v2_error(r, 400, "invalid_json" if name in ("lone surrogate", "nested 1000 deep", "not JSON") else "bad_request")
            # a 900 kB unknown field name is not echoed back whole
            r = c.post("/classify/batch", json={"items": [{"image_base64": "", "x" * 900_000: 1}]})
            assert r.status_code == 422 and len(r.content) < 2000, len(r.content)
            # keys /v2 does not read are ignored, but their names are bounded (and not echoed)
            r = c.post("/v2/models/tiny/infer", json={**_v2(), "y" * 900_000: 1})
            v2_error(r, 400, "bad_request")

    attack(server, run)


# --- 2 and 5. overload and slow uploads --------------------------------------------------------
def test_slow_uploads_hold_nothing_and_big_bodies_are_bounded(server: tuple[Any, str, Path]) -> None:
    port = int(server[1].rsplit(":", 1)[1])

    def run(url: str) -> None:
        # 128 connections send a head and a few body bytes, then stall: they hold no admission
        # (the good client beside them keeps getting 200) and are cut at the body timeout
        slow = []
        for _ in range(128):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
            slow.append(s)
        # declared bodies past the in-flight budget (24 MB here): refused at once with 503, nothing read
        big = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        for s in big:
            s.sendall(b"POST /classify/batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 30000000\r\n\r\n{")
        answers = [read_answer(s) for s in big]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert refused and all(b"overloaded" in a and b"retry-after: 1" in a.lower() for a in refused), answers
        time.sleep(3.5)  # past the body timeout: the stalled uploads were answered 408 and closed
        for s in slow + big:
            s.settimeout(5)
            try:
                data = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                data = b"?"
            assert data == b"" or data.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503", b"HTTP/1.1 413")), data[:100]
            s.close()

    attack(server, run)


def test_overload_is_503_with_retry_after_on_every_route(tiny_artifact: Path) -> None:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_MAX_QUEUE="2")
    try:
        jpg = base64.b64encode(jpeg_bytes((800, 600))).decode()
        v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [jpg] * 3}]}
        with httpx.Client(base_url=url, timeout=30) as c:
            for route, body in (("/v2/models/tiny/infer", v2), ("/classify/batch", {"items": [{"image_base64": jpg}] * 3})):
                r = c.post(route, json=body)  # 3 rows never fit a budget of 2
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                code = r.json()["code"] if route.startswith("/v2") else r.json()["error"]["code"]
                assert code == "overloaded"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


# --- 3. decoding cost -------------------------------------------------------------------------
def _many_scans_jpeg(repeats: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rfind(b"\xff\xda")
    scan = data[last:-2]  # the final refinement scan, repeated before EOI
    return data[:-2] + scan * repeats + b"\xff\xd9"


def _sixteen_bit_png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((n, n), np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_decoding_cost_is_bounded(server: tuple[Any, str, Path]) -> None:
    scans = _many_scans_jpeg(300)
    png16 = _sixteen_bit_png(6300)  # about 40 megapixels at 16 bits, under 200 kB
    assert len(png16) < 1_000_000

    def run(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(2):
                r = c.post("/classify", files={"image": ("x.jpg", scans, "image/jpeg")})
                assert (r.status_code, r.json()["error"]["code"]) == (422, "image_too_complex"), r.text
            t0 = time.perf_counter()
            r = c.post("/classify", files={"image": ("x.png", png16, "image/png")})
            assert r.status_code == 200, r.text  # scaled in integers: no float64 copy of 40 megapixels
            assert time.perf_counter() - t0 < 5

    attack(server, run)


def test_a_decode_past_its_budget_is_answered_at_once(tiny_artifact: Path) -> None:
    rng = np.random.default_rng(2)
    big = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (1500, 1500, 3), dtype=np.uint8)).save(big, format="PNG", compress_level=1)
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_DECODE_TIMEOUT_S="0.005")
    try:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/classify", files={"image": ("x.png", big.getvalue(), "image/png")}, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "image_too_complex"), r.text
        assert time.perf_counter() - t0 < 2
        assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


# --- 4. headers -------------------------------------------------------------------------------
def test_huge_and_trickled_headers_are_cut(server: tuple[Any, str, Path]) -> None:
    port = int(server[1].rsplit(":", 1)[1])

    def run(url: str) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (8 * 1024 * 1024) + b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 431") and b"header_too_large" in answer, answer[:200]
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.perf_counter()
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        answer = b""
        for _ in range(40):  # one header byte every 0.1 s: never a whole head
            try:
                trickle.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            trickle.setblocking(False)
            try:
                answer += trickle.recv(4096)
            except BlockingIOError:
                pass
            trickle.setblocking(True)
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.perf_counter() - t0 < 2.5  # CLASSIFIER_HEADER_TIMEOUT_S=1
        trickle.close()

    attack(server, run)


# --- 6, 8. hang-ups and nesting ------------------------------------------------------------------
def test_hang_ups_are_499_at_info_and_nesting_is_invalid_json(server: tuple[Any, str, Path]) -> None:
    port = int(server[1].rsplit(":", 1)[1])
    log_path = server[2]

    def run(url: str) -> None:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nxx")
                time.sleep(0.1)
        nested = b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(f"{url}/classify/batch", content=nested, headers={"content-type": "application/json"}, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json"), r.text

    attack(server, run)
    time.sleep(0.5)
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    hung = [x for x in lines if x.get("status") == 499]
    assert len(hung) >= 5 and all(x["level"] == "info" for x in hung)
    assert not [x for x in lines if x.get("level") == "error"], [x for x in lines if x.get("level") == "error"][:3]
    metrics = httpx.get(f"{server[1]}/metrics").text
    assert 'status="499"' in metrics and 'status="500"' not in metrics


# --- 7. shutdown within the grace --------------------------------------------------------------
def test_shutdown_keeps_its_grace_whatever_is_running(tiny_artifact: Path) -> None:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_SHUTDOWN_GRACE_S="3",
                             CLASSIFIER_DRAIN_DELAY_S="0.5", CLASSIFIER_BODY_TIMEOUT_S="60")
    port = int(url.rsplit(":", 1)[1])
    stalled = socket.create_connection(("127.0.0.1", port))  # a request that would hold the drain for a minute
    stalled.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 100000\r\n\r\n--b\r\n")
    time.sleep(0.3)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.perf_counter() - t0 < 3 + 1.5
    stalled.close()


def test_v2_binary_sizes_cannot_ask_for_memory(server: tuple[Any, str, Path]) -> None:
    def run(url: str) -> None:
        head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": 8}}]}).encode()
        for blob in (struct.pack("<I", 2**31) + b"abcd", struct.pack("<I", 3) + b"abcd", b"\x01\x02"):
            r = httpx.post(f"{url}/v2/models/tiny/infer", content=head + blob.ljust(8, b"\0")[:8],
                           headers={"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"})
            v2_error(r, 400, "bad_request")

    attack(server, run)


# --- broken framing: refused or closed, never a stuck worker ------------------------------------
FRAMING: list[tuple[str, bytes, bytes]] = [
    # (name, raw request, how the answer must start; b"" = the connection is closed without one)
    ("negative chunk size", b"POST /classify HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n56\r\n" + b"A" * 86
     + b"\r\n-63\r\nX", b"HTTP/1.1 400"),
    ("chunk extension of 5 kB", b"POST /classify HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;"
     + b"x" * 5000 + b"\r\nhello\r\n0\r\n\r\n", b"HTTP/1.1 400"),
    ("Content-Length of 5000 digits", b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
     b"HTTP/1.1 4"),
    ("non-ASCII digit length", b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
     b"Inference-Header-Content-Length: \xb2\r\nContent-Length: 2\r\n\r\n{}", b"HTTP/1.1 400"),
]


def test_broken_framing_is_refused_and_the_worker_keeps_serving(server: tuple[Any, str, Path]) -> None:
    port = int(server[1].rsplit(":", 1)[1])

    def run(url: str) -> None:
        for name, raw, start in FRAMING:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(raw)
                answer = read_answer(s, timeout=5)
            assert answer.startswith(start), (name, answer[:200])
        # a body the service never reads (a GET with a huge declared length): answered, then closed,
        # so a client cannot trickle the rest for ever
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999999\r\n\r\nx")
            t0 = time.perf_counter()
            answer = read_answer(s, timeout=8)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower(), answer[:300]
            assert time.perf_counter() - t0 < 5  # closed by the server, not by our timeout

    attack(server, run)


# --- second round: the guard never switches off; trailers, bare line ends, metric labels ----------
def test_the_head_guard_cannot_be_switched_off(server: tuple[Any, str, Path]) -> None:
    port = int(server[1].rsplit(":", 1)[1])

    def run(url: str) -> None:
        # a zero-padded chunk size (valid for the parser underneath) used to stop the guard watching the
        # connection: the next request's 1 MB head must still be refused
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # a route that reads its body (and so keeps the connection): answered 422, then the next head
            s.sendall(b"POST /classify/batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0000000000000000002\r\n{}\r\n0\r\n\r\n")
            time.sleep(0.3)
            try:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = read_answer(s, timeout=5)
        assert b"header_too_large" in answer, answer[-300:]
        # a chunk size it cannot follow is refused, not handed on unwatched
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 20 + b"\r\nx")
            answer = read_answer(s, timeout=5)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        # trailers count against the head limit: a flood is cut at 32 kB, not at the body timeout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /classify/batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
            t0 = time.perf_counter()
            try:
                for _ in range(2000):  # 2000 x 1000 bytes of trailer lines
                    s.sendall(b"X-T: " + b"t" * 993 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = read_answer(s, timeout=5)
        assert b"431" in answer.split(b"\r\n", 1)[0] and time.perf_counter() - t0 < 3, answer[:200]
        # a bare CRLF after a response re-arms the clock: the idle connection is closed (header timeout 1 s)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            first = b""
            while b'{"status":"ok"}' not in first:  # the whole first answer, head and body
                first += s.recv(4096)
            assert first.startswith(b"HTTP/1.1 200")
            s.sendall(b"\r\n")
            t0 = time.perf_counter()
            rest = read_answer(s, timeout=8)
            assert time.perf_counter() - t0 < 4, "a bare CRLF held the connection open"
            assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]

    attack(server, run)


def test_metric_labels_and_log_lines_name_route_templates_only(server: tuple[Any, str, Path]) -> None:
    _, url, log_path = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v2/models/zz-413-probe%0aFORGED/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n")
        assert read_answer(s, timeout=5).startswith(b"HTTP/1.1 413")
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/static/zz-405-probe").status_code == 405
        assert c.get("/zz-404-probe%0aFORGED").status_code == 404
        metrics = c.get("/metrics").text
    assert "zz-" not in metrics and 'route="unmatched"' in metrics
    assert "FORGED" not in log_path.read_text(errors="replace")


# --- parse and decode cost, bounded before the work ---------------------------------------------
def _probe_while(url: str, work: Callable[[], httpx.Response]) -> tuple[httpx.Response, float, float]:
    """Run ``work`` while another thread probes /healthz on the same (single) worker: the answer,
    how long the work took and the slowest probe."""
    stop, probes = threading.Event(), []

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                probes.append(time.perf_counter() - t0)
                time.sleep(0.01)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    r = work()
    took = time.perf_counter() - t0
    time.sleep(0.2)
    stop.set()
    t.join(10)
    return r, took, max(probes)


def test_documents_of_millions_of_json_values_are_refused_before_the_parse(tiny_artifact: Path) -> None:
    # the JSON parser holds the GIL for the whole document, in its thread too: 1.7 M items froze the
    # worker for seconds. One worker, so the probe shares its event loop with the attack
    batch = b'{"items": [' + b",".join([b"1"] * 1_680_000) + b"]}"
    nested = (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ['
              + b",".join([b'"a"'] * 1_500_000) + b"]}]}")
    with running_server(tiny_artifact, CLASSIFIER_WORKERS="1") as (_, url), httpx.Client(base_url=url, timeout=60) as c:
        r, took, slowest = _probe_while(url, lambda: c.post("/classify/batch", content=batch,
                                                             headers={"content-type": "application/json"}))
        assert (r.status_code, r.json()["error"]["code"]) == (422, "too_many_items"), r.text[:300]
        assert took < 1.0 and slowest < 0.1, (took, slowest)
        r, took, slowest = _probe_while(url, lambda: c.post("/v2/models/tiny/infer", content=nested,
                                                             headers={"content-type": "application/json"}))
        assert r.status_code == 400 and "JSON values" in r.json()["error"], r.text[:300]
        assert took < 1.0 and slowest < 0.1, (took, slowest)
        # a legitimate batch is still parsed: 64 items, each caption as long as allowed and full of commas
        image = base64.b64encode(jpeg_bytes()).decode()
        ok = c.post("/classify/batch", json={"items": [{"image_base64": image, "description": "," * 2000}] * 64})
        assert ok.status_code == 200, ok.text[:300]


def test_rows_waiting_for_a_decode_thread_count_against_the_request_budget(tiny_artifact: Path) -> None:
    # 64 images that each take tens of milliseconds to decode, one decode thread, a 300 ms budget:
    # the rows not started in time are answered 504 at once instead of holding the pool for seconds
    flat = io.BytesIO()
    Image.new("RGB", (2000, 2000), (40, 120, 200)).save(flat, format="PNG")
    item = {"image_base64": base64.b64encode(flat.getvalue()).decode(), "description": "a flat blue square"}
    env = {"CLASSIFIER_WORKERS": "1", "CLASSIFIER_DECODE_THREADS": "1", "CLASSIFIER_REQUEST_TIMEOUT_MS": "300"}
    with running_server(tiny_artifact, **env) as (_, url):
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/classify/batch", json={"items": [item] * 64}, timeout=60)
        took = time.perf_counter() - t0
    codes = [x.get("error", {}).get("code", "ok") for x in r.json()["results"]]
    assert r.status_code == 200 and "ok" in codes and "timeout" in codes, codes
    assert took < 1.5, f"{took:.2f} s: rows kept waiting for the decode thread"
