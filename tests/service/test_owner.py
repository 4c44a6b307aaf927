"""The owner topology on CPU: real processes (supervisor, HTTP workers, the model owner), real requests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from helpers import DEFAULT_MODEL, jpeg_bytes, running_server, start_server, wait_ready

from service.owner import shm_dir

OWNER = {"CLASSIFIER_TOPOLOGY": "owner", "CLASSIFIER_LOG_LEVEL": "info", "CLASSIFIER_LOG_FORMAT": "text"}
ROWS = [(jpeg_bytes((64 + 8 * i, 48), colour=(30 * i % 255, 200 - 20 * i, 90)), f"item {i}: a red apple or a lemon")
        for i in range(10)]


def classify(url: str, image: bytes, caption: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"image": ("x.jpg", image, "image/jpeg")}, data={"description": caption},
                      timeout=timeout)


def owner_pid(log: Path) -> int:
    deadline = time.time() + 30
    while time.time() < deadline:
        found = re.findall(r"model owner \[(\d+)\] started", log.read_text(errors="replace"))
        if found:
            return int(found[-1])
        time.sleep(0.1)
    raise AssertionError("no 'model owner started' line:\n" + log.read_text(errors="replace")[-2000:])


@contextmanager
def owner_server(tmp_path: Path, workers: int, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, int]]:
    """An owner-topology server logging to a file: (process, url, log, the owner's pid); stopped after."""
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc, url = start_server(DEFAULT_MODEL, "--workers", str(workers), stdout=out, **{**OWNER, **env})
    try:
        yield proc, url, log, owner_pid(log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(40)


def scores(url: str) -> list[list[float]]:
    out = []
    for image, caption in ROWS:
        r = classify(url, image, caption)
        assert r.status_code == 200, r.text
        body = r.json()
        # the OOD score crosses the shared-memory wire too
        out.append([p["score"] for p in sorted(body["predictions"], key=lambda p: p["label"])] + [body["ood_score"]])
    return out


def test_the_owner_answers_exactly_as_the_per_worker_topology() -> None:
    with running_server(DEFAULT_MODEL, "--workers", "1", CLASSIFIER_TOPOLOGY="workers") as (_, url):
        alone = scores(url)
    with running_server(DEFAULT_MODEL, "--workers", "2", CLASSIFIER_TOPOLOGY="owner") as (_, url):
        owned = scores(url)
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
    worst = max(abs(a - b) / max(1.0, abs(a)) for ra, rb in zip(alone, owned, strict=True) for a, b in zip(ra, rb, strict=True))
    assert worst <= 1e-6, worst


def test_a_killed_owner_gives_clear_503s_then_comes_back(tmp_path: Path) -> None:
    with owner_server(tmp_path, 2) as (proc, url, log, pid):
        results: list[int] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    results.append(classify(url, *ROWS[len(results) % len(ROWS)], timeout=15).status_code)
                except httpx.HTTPError as exc:  # a hang would end here as a timeout
                    results.append(-1)
                    raise AssertionError(f"no answer: {exc!r}") from exc

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert results and set(results) <= {200, 503}, results  # every request answered: a prediction or 503
        # the supervisor starts a new owner, the workers reconnect, readiness comes back
        wait_ready(url, proc, timeout=60)
        assert owner_pid(log) != pid
        assert classify(url, *ROWS[0]).status_code == 200
        text = log.read_text(errors="replace")
        assert "died" in text and "starting a new one" in text
        # slabs are unlinked once both sides have mapped them: a killed owner leaves nothing behind
        assert not list(Path(shm_dir()).glob("classifier-rows-*"))


def test_a_request_while_the_owner_is_down_gets_503_with_a_reason(tmp_path: Path) -> None:
    with owner_server(tmp_path, 1, CLASSIFIER_REQUEST_TIMEOUT_MS="3000") as (proc, url, _, pid):
        os.kill(pid, signal.SIGSTOP)  # a hung owner: the worker must not wait for ever
        try:
            t0 = time.time()
            r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", ROWS[0][0], "image/jpeg")},
                           data={"description": "x"}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
            assert "owner" in r.json()["error"]["message"]
            assert time.time() - t0 < 8  # the request timeout (3 s), not for ever
            # the worker dropped the connection; reconnecting to a hung owner happens off the event
            # loop, so readiness answers at once, and says not ready
            t0 = time.time()
            ready = httpx.get(f"{url}/readyz", timeout=10)
            assert ready.status_code == 503 and time.time() - t0 < 1, (ready.status_code, time.time() - t0)
        finally:
            os.kill(pid, signal.SIGKILL)
        wait_ready(url, proc, timeout=60)


def test_sigterm_drains_the_workers_then_stops_the_owner(tmp_path: Path) -> None:
    with owner_server(tmp_path, 2, CLASSIFIER_DRAIN_DELAY_S="0.5") as (proc, url, _, pid):
        codes: list[int] = []

        def client(i: int) -> None:
            codes.append(classify(url, *ROWS[i % len(ROWS)]).status_code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(40) == 0
        assert codes == [200] * 8, codes  # requests in flight at SIGTERM were answered
        assert not Path(f"/proc/{pid}").exists()  # the owner stopped too
