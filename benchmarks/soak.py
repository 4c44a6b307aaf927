"""Soak test: mixed valid and invalid traffic for N minutes against a real server.

Every interval it prints the server's resident memory, open file descriptors and threads
(all its processes), latency percentiles of the valid requests and counts by status. It
exits 1 on any 5xx or dropped connection, or when memory or descriptors keep growing.

    python -m benchmarks.soak --minutes 10              # starts its own server on the default model
    python -m benchmarks.soak --minutes 0.5 --interval 5 # the CI variant
    python -m benchmarks.soak --minutes 10 --attacks 2  # with attackers mixing hostile inputs in
    python -m benchmarks.soak --url http://host:8000 --pid 1234 --minutes 30
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service.settings import default_model_dir

from .bench import CAPTIONS, Server, make_jpegs
from .procstats import proc_stats


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        return []
    return sorted(int(c) for c in children.read_text().split() if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def _inputs() -> dict[str, object]:
    jpegs = make_jpegs(640, 480, 8, seed=1) + make_jpegs(1280, 960, 2, seed=2)
    png = io.BytesIO()
    Image.new("RGBA", (300, 200), (10, 200, 30, 128)).save(png, format="PNG")
    return {"jpegs": jpegs, "png": png.getvalue()}


def _worker(url: str, headers: dict[str, str], stop: threading.Event, inputs: dict[str, object],
            lock: threading.Lock, stats: dict[str, object], seed: int) -> None:
    rng = random.Random(seed)
    jpegs: list[bytes] = inputs["jpegs"]  # type: ignore[assignment]
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        while not stop.is_set():
            kind = rng.choices(["valid", "png", "batch", "garbage", "missing", "top_k", "health"], [50, 8, 6, 12, 8, 8, 8])[0]
            t0 = time.perf_counter()
            try:
                if kind == "valid":
                    r = c.post("/classify", files={"image": ("a.jpg", rng.choice(jpegs), "image/jpeg")},
                               data={"description": rng.choice(CAPTIONS)})
                elif kind == "png":
                    png: bytes = inputs["png"]  # type: ignore[assignment]
                    r = c.post("/classify", files={"image": ("a.png", png, "image/png")}, params={"explain": "true"})
                elif kind == "batch":
                    items = [{"image_base64": base64.b64encode(rng.choice(jpegs)).decode(), "description": rng.choice(CAPTIONS)}
                             for _ in range(rng.randint(1, 8))] + [{"image_base64": "%%%", "description": ""}]
                    r = c.post("/classify/batch", json={"items": items})
                elif kind == "garbage":
                    r = c.post("/classify", files={"image": ("a.jpg", rng.randbytes(rng.randint(0, 5000)), "image/jpeg")})
                elif kind == "missing":
                    r = c.post("/classify", data={"description": "no image"}, files={"other": ("x", b"1")})
                elif kind == "top_k":
                    r = c.post("/classify", params={"top_k": rng.choice(["0", "-1", "abc", "1000000000"])},
                               files={"image": ("a.jpg", jpegs[0], "image/jpeg")})
                else:
                    r = c.get(rng.choice(["/healthz", "/readyz", "/metrics", "/model"]))
                status = r.status_code
            except httpx.HTTPError as exc:
                status = -1
                with lock:
                    stats["transport_errors"].append(type(exc).__name__)  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - t0
            with lock:
                stats["status"][status] += 1  # type: ignore[index]
                if status not in EXPECTED.get(kind, {200}):
                    stats["unexpected"][f"{kind}:{status}"] += 1  # type: ignore[index]
                if kind == "valid" and status == 200:
                    stats["latency"].append(elapsed)  # type: ignore[attr-defined]


def _attack_inputs() -> dict[str, bytes]:
    """Hostile inputs of each class (docs/reliability.md), generated: nothing committed."""
    prog = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
        prog, format="JPEG", progressive=True)
    data = prog.getvalue()
    scan = data[data.rfind(b"\xff\xda"):-2]
    png16 = io.BytesIO()
    Image.fromarray(np.zeros((6300, 6300), np.uint16)).save(png16, format="PNG")
    v2_number = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [10**9]}]}).encode()
    nested = b'{"items": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    return {"scans": data[:-2] + scan * 300 + b"\xff\xd9", "png16": png16.getvalue(), "v2_number": v2_number, "nested": nested}


def _attacker(url: str, headers: dict[str, str], stop: threading.Event, lock: threading.Lock,
              stats: dict[str, object], seed: int) -> None:
    """One attack after another, each with the answer it must get (EXPECTED)."""
    rng = random.Random(seed)
    inputs = _attack_inputs()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        while not stop.is_set():
            kind = rng.choice(["scans", "png16", "v2_number", "nested", "huge_header", "slow_head", "hangup"])
            status = -2  # no HTTP answer expected (the connection is the attack)
            try:
                if kind in ("scans", "png16"):
                    status = c.post("/classify", files={"image": ("a", inputs[kind], "application/octet-stream")}).status_code
                elif kind == "v2_number":
                    status = c.post("/v2/models/image-text-classifier/infer", content=inputs[kind],
                                    headers={"content-type": "application/json"}).status_code
                elif kind == "nested":
                    status = c.post("/classify/batch", content=inputs[kind], headers={"content-type": "application/json"}).status_code
                else:
                    with socket.create_connection((host, int(port)), timeout=30) as sock:
                        if kind == "huge_header":
                            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 2_000_000 + b"\r\n\r\n")
                            status = int(sock.recv(64).split(b" ")[1])
                        elif kind == "slow_head":
                            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
                            stop.wait(rng.uniform(0.5, 2))
                        else:  # hang up mid-body
                            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; "
                                         b"boundary=b\r\nContent-Length: 9000\r\n\r\n--b\r\n")
                            stop.wait(0.2)
            except (httpx.HTTPError, OSError, IndexError, ValueError):
                status = -1 if kind not in ("huge_header",) else -2  # the server may reset a refused huge head
            with lock:
                if status == -2:  # a connection-level attack: no answer to count (its effect is on the others)
                    continue
                stats["status"][status] += 1  # type: ignore[index]
                if status not in EXPECTED[kind]:
                    stats["unexpected"][f"{kind}:{status}"] += 1  # type: ignore[index]


# the status each kind of request must get; anything else fails the soak
EXPECTED: dict[str, set[int]] = {"valid": {200}, "png": {200}, "batch": {200}, "garbage": {400}, "missing": {422},
                                 "top_k": {422}, "health": {200},
                                 "scans": {422}, "png16": {200}, "v2_number": {400}, "nested": {400}, "huge_header": {431}}


def soak(url: str, pid: int, minutes: float, interval: float, concurrency: int, api_key: str | None,
         attackers: int = 0) -> int:
    inputs = _inputs()
    lock = threading.Lock()
    stats: dict[str, object] = {"status": Counter(), "latency": [], "transport_errors": [], "unexpected": Counter()}
    stop = threading.Event()
    headers = {"X-API-Key": api_key} if api_key else {}
    threads = [threading.Thread(target=_worker, args=(url, headers, stop, inputs, lock, stats, i), daemon=True)
               for i in range(concurrency)]
    threads += [threading.Thread(target=_attacker, args=(url, headers, stop, lock, stats, 1000 + i), daemon=True)
                for i in range(attackers)]
    workers_before = worker_pids(pid)
    for t in threads:
        t.start()
    samples: list[dict[str, Any]] = []
    failed: list[str] = []
    end = time.time() + minutes * 60
    print("   t_s   rss_mb  fds  threads   req  p50_ms  p95_ms  p99_ms  statuses", flush=True)  # noqa: T201
    t_start = time.time()
    while time.time() < end:
        time.sleep(min(interval, max(0.0, end - time.time())))
        with lock:
            lat = np.array(stats["latency"]) * 1000  # type: ignore[arg-type]
            status: Counter[int] = stats["status"]  # type: ignore[assignment]
            counts = dict(status)
            stats["latency"], stats["status"] = [], Counter()
        s = proc_stats(pid)
        pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
        samples.append({"t_s": round(time.time() - t_start), **s, "requests": sum(counts.values()),
                        "p50_ms": pct[0], "p95_ms": pct[1], "p99_ms": pct[2], "statuses": counts})
        print(f"{samples[-1]['t_s']:6d} {s['rss_mb']:8.1f} {s['fds']:4.0f} {s['threads']:8.0f} {sum(counts.values()):5d} "  # noqa: T201
              f"{pct[0]:7.2f} {pct[1]:7.2f} {pct[2]:7.2f}  {json.dumps({str(k): v for k, v in sorted(counts.items())})}",
              flush=True)
        bad = {k: v for k, v in counts.items() if k >= 500 or k < 0}
        if bad:
            failed.append(f"at {samples[-1]['t_s']} s: server errors or dropped connections {bad}")
        with lock:
            unexpected = dict(stats["unexpected"])  # type: ignore[call-overload]
            stats["unexpected"] = Counter()
        if unexpected:  # e.g. a valid image refused: a service answering 400 to everything must not pass
            failed.append(f"at {samples[-1]['t_s']} s: unexpected statuses by kind {unexpected}")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    # growth: compare the second half with the first sample after warm-up
    if len(samples) >= 3:
        base = samples[1]
        tail = samples[len(samples) // 2 :]
        rss_growth = min(x["rss_mb"] for x in tail) - base["rss_mb"]
        fd_growth = min(x["fds"] for x in tail) - base["fds"]
        rising = all(b["rss_mb"] > a["rss_mb"] + 1 for a, b in itertools.pairwise(samples[1:]))
        if rss_growth > 50 or (rising and rss_growth > 20):
            failed.append(f"resident memory keeps growing: +{rss_growth:.1f} MB")
        if fd_growth > 10:
            failed.append(f"open file descriptors keep growing: +{fd_growth:.0f}")
    if worker_pids(pid) != workers_before:
        failed.append(f"worker processes changed: {workers_before} -> {worker_pids(pid)} (a worker died or was replaced)")
    summary = {"minutes": minutes, "attackers": attackers, "workers": workers_before,
               "start": samples[0] if samples else None, "end": samples[-1] if samples else None, "failed": failed}
    print(json.dumps(summary, default=float))  # noqa: T201
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--interval", type=float, default=60, help="seconds between reports")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="its process id, for memory/fd/thread figures")
    ap.add_argument("--model-dir", default=str(default_model_dir()))
    ap.add_argument("--api-key", default=os.environ.get("CLASSIFIER_API_KEY"))
    ap.add_argument("--attacks", type=int, default=0, metavar="N",
                    help="also run N attacker threads mixing hostile inputs of every class into the traffic")
    a = ap.parse_args(argv)
    if a.url:
        return soak(a.url, a.pid or os.getpid(), a.minutes, a.interval, a.concurrency, a.api_key, a.attacks)
    server = Server("service", Path(a.model_dir))
    try:
        return soak(server.url, server.proc.pid, a.minutes, a.interval, a.concurrency, a.api_key, a.attacks)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
