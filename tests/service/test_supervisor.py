"""Several workers: a listening socket each, connections spread over them, crashes replaced, a busy port refused."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, free_port, jpeg_bytes, multipart_body, start_server, workers_of

from benchmarks.procstats import cpu_seconds, listening_sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing is Linux-only")


def wait_listening(port: int, n: int, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while listening_sockets(port) != n and time.time() < deadline:
        time.sleep(0.05)
    return listening_sockets(port) == n


def classify_ok(url: str) -> bool:
    # a new connection each time: which worker gets it is the kernel's choice
    r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")},
                   data={"description": "a red tomato"}, timeout=10)
    return r.status_code == 200


def test_each_worker_has_its_own_socket_and_connections_spread(tiny_artifact: Path, tmp_path: Path) -> None:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="2")
    try:
        port = int(url.rsplit(":", 1)[1])
        assert wait_listening(port, 2)  # ready means one worker is up; the other may still be loading
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        before = cpu_seconds(proc.pid)
        with open(tmp_path / "bodies.pkl", "wb") as f:
            pickle.dump([("/classify", *multipart_body(jpeg_bytes(), "a red tomato"))], f)
        # 32 keep-alive connections opened in one burst: with one shared socket, the worker
        # that woke first often took nearly all of them
        out = subprocess.run([sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--bodies", str(tmp_path / "bodies.pkl"),
                              "--concurrency", "32", "--requests", "1500"], capture_output=True, cwd=ROOT, timeout=120, check=True)
        assert b'"errors": 0' in out.stdout, out.stdout
        after = cpu_seconds(proc.pid)
        used = [after[w] - before[w] for w in workers]
        assert min(used) > 0.25 * sum(used), f"CPU seconds per worker: {used}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_killed_worker_is_replaced_and_its_socket_leaves(tiny_artifact: Path) -> None:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="2")
    try:
        port = int(url.rsplit(":", 1)[1])
        assert wait_listening(port, 2)
        victim = workers_of(proc.pid)[0]
        env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{victim}/environ").read_bytes().split(b"\0") if b"=" in kv)
        metrics_dir = Path(env[b"PROMETHEUS_MULTIPROC_DIR"].decode())
        assert list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))
        os.kill(victim, signal.SIGKILL)
        assert wait_listening(port, 1, timeout=5)
        # the dead worker's socket is gone with it (the supervisor keeps no copy), so no new
        # connection waits in an accept queue that nobody serves
        assert all(classify_ok(url) for _ in range(10))
        assert wait_listening(port, 2)  # the replacement, on a socket of its own
        assert victim not in workers_of(proc.pid) and len(workers_of(proc.pid)) == 2
        assert all(classify_ok(url) for _ in range(10))
        # the dead worker's live gauge (queue depth) left the sums; its counters stay
        assert not list(metrics_dir.glob(f"gauge_livesum_{victim}.db"))
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert not metrics_dir.exists(), "the metrics folder outlived the service"


def test_sighup_replaces_every_worker_on_new_sockets(tiny_artifact: Path) -> None:
    proc, url = start_server(tiny_artifact, CLASSIFIER_WORKERS="2")
    try:
        port = int(url.rsplit(":", 1)[1])
        assert wait_listening(port, 2)
        old = set(workers_of(proc.pid))
        proc.send_signal(signal.SIGHUP)  # rolling restart, one worker at a time
        deadline = time.time() + 60
        while time.time() < deadline and not (set(workers_of(proc.pid)).isdisjoint(old) and len(workers_of(proc.pid)) == 2):
            time.sleep(0.2)
        assert set(workers_of(proc.pid)).isdisjoint(old) and len(workers_of(proc.pid)) == 2
        assert wait_listening(port, 2)  # each replacement listens on a socket of its own
        assert all(classify_ok(url) for _ in range(10))
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_a_busy_port_stops_start_up(tiny_artifact: Path) -> None:
    port = free_port()
    with socket.socket() as other:  # e.g. another instance of this service, which SO_REUSEPORT would silently join
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        env = {**os.environ, "CLASSIFIER_MODEL_DIR": str(tiny_artifact), "CLASSIFIER_PROVIDER": "cpu", "CLASSIFIER_WORKERS": "2"}
        done = subprocess.run([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    # one line naming the address, no traceback
    assert f"service: cannot listen on 127.0.0.1:{port}: Address already in use".encode() in done.stderr
    assert b"Traceback" not in done.stderr


def test_sigttin_adds_a_worker_and_sigttou_removes_one(tiny_artifact: Path, tmp_path: Path) -> None:
    log = (tmp_path / "server.log").open("wb")
    proc, url = start_server(tiny_artifact, stdout=log, CLASSIFIER_WORKERS="2")  # type: ignore[arg-type]
    port = int(url.rsplit(":", 1)[1])

    def settle(n: int) -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not (len(workers_of(proc.pid)) == n and listening_sockets(port) == n):
            time.sleep(0.1)
        assert len(workers_of(proc.pid)) == n and listening_sockets(port) == n

    try:
        settle(2)
        proc.send_signal(signal.SIGTTIN)
        settle(3)
        assert all(classify_ok(url) for _ in range(6))
        for n in (2, 1):
            proc.send_signal(signal.SIGTTOU)
            settle(n)
        proc.send_signal(signal.SIGTTOU)  # never below one worker: refused, with a log line
        time.sleep(1)
        settle(1)
        assert all(classify_ok(url) for _ in range(3))
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log.close()
    assert "SIGTTOU refused" in (tmp_path / "server.log").read_text()
