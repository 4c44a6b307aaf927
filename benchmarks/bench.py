"""Throughput benchmark: the service against the machine's limit and against a plain FastAPI service.

Not a test. It measures, on this machine and these inputs:

1. in-process limits: decode+preprocess alone (a thread per core), onnxruntime alone at batch
   1 and at the service's batch size, the combined pipeline (decoding on every core while
   batches run), and one request's in-process time (decode + tokenise + batch-1 inference);
2. over HTTP, with ``benchmarks.loadgen`` in its own process: the service with dynamic batching,
   the same service with batching off (``CLASSIFIER_MAX_BATCH_SIZE=1``), and the plain
   baseline (``benchmarks.bench_plain``), at each concurrency and image size;
3. optionally the service's resident memory over a long run (``--memory-requests``).

It prints a table and writes JSON (``--out``).

    python -m benchmarks.bench --quick                  # about 3 minutes
    python -m benchmarks.bench --out bench.json         # the full grid
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter

from classifier_core.artifact import load_manifest
from classifier_core.images import load_image
from classifier_core.text import TextEncoder
from service.settings import default_model_dir

from .procstats import cpu_seconds, listening_sockets, proc_stats

CAPTIONS = [
    "",
    "tomato",
    "a photo of a cherry tomato on the kitchen table",
    "fresh fuji apple , free shipping on all orders , best seller this month",
    "traffic cone at the roadworks near the intersection seen in the city today",
    "look at this basketball , shot at golden hour , no filter needed , follow for more",
    "the meyer lemon i found",
    "banana bunch for sale",
]


def make_jpegs(width: int, height: int, n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth gradients, a few shapes, texture and sensor noise, quality 88."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(n):
        base = np.stack([(xx / width) * rng.uniform(60, 200) + (yy / height) * rng.uniform(0, 80) + rng.uniform(0, 60)
                         for _ in range(3)], -1)
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.05, 0.3) * min(width, height)
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        im = im.filter(ImageFilter.GaussianBlur(1.5))
        arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def multipart(jpeg: bytes, caption: str, boundary: str = "benchb0undary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"description\"\r\n\r\n{caption}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _rate(fn: Any, min_seconds: float = 1.5) -> float:
    """Calls per second of ``fn`` (which returns how many items it did), run for at least min_seconds."""
    fn()  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        n += fn()
    return n / (time.perf_counter() - t0)


def in_process(model_dir: Path, jpegs: list[bytes], batch: int, threads: int) -> dict[str, float]:
    m = load_manifest(model_dir)
    text = TextEncoder.from_file(model_dir / m.tokenizer_file, m.max_len)
    # the service's own session options (threads, no spinning, full graph optimisation)
    from service.serving.session import Predictor
    from service.settings import Settings

    so = Predictor(Settings(model_dir=model_dir, provider="cpu"))._session_options()  # type: ignore[call-arg]
    sess = ort.InferenceSession(str(model_dir / m.model_file), so, providers=["CPUExecutionProvider"])
    size = m.image_size
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(jpegs))]
    arrays = np.stack([load_image(j, size) for j in jpegs])
    pool = ThreadPoolExecutor(threads)

    def decode_all() -> int:
        list(pool.map(lambda j: load_image(j, size), jpegs))
        return len(jpegs)

    def ort_rows(b: int) -> Any:
        imgs = np.ascontiguousarray(np.resize(arrays, (b, size, size, 3)))
        ids = text.pad(text.encode_batch([captions[i % len(captions)] for i in range(b)]))
        return lambda: (sess.run(None, {"image": imgs, "input_ids": ids}), b)[1]

    def single() -> int:
        arr = load_image(jpegs[0], size)
        sess.run(None, {"image": arr[None], "input_ids": text.pad([text.encode(captions[2])])})
        return 1

    def pipeline() -> int:
        # decoding on every core while the previous chunk runs through onnxruntime
        chunks = [list(range(s, min(s + batch, len(jpegs)))) for s in range(0, len(jpegs), batch)] * 4
        parts = [pool.submit(load_image, jpegs[i], size) for i in chunks[0]]
        done = 0
        for k in range(len(chunks)):
            imgs = np.stack([p.result() for p in parts])
            if k + 1 < len(chunks):
                parts = [pool.submit(load_image, jpegs[i], size) for i in chunks[k + 1]]
            ids = text.pad(text.encode_batch([captions[i] for i in chunks[k]]))
            sess.run(None, {"image": imgs, "input_ids": ids})
            done += len(chunks[k])
        return done

    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        single()
        times.append(time.perf_counter() - t0)
    result = {
        "decode_per_s": _rate(decode_all),
        "onnxruntime_batch1_per_s": _rate(ort_rows(1)),
        f"onnxruntime_batch{batch}_per_s": _rate(ort_rows(batch)),
        "pipeline_per_s": _rate(pipeline),
        "single_request_ms": float(np.median(times) * 1000),
    }
    pool.shutdown()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, kind: str, model_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        module = "service" if kind != "plain" else "benchmarks.bench_plain"
        args = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port)]
        if kind == "plain":
            args += ["--model-dir", str(model_dir)]
        # python -m service's default is a worker per core (Linux: a listening socket each)
        self.workers = 1 if kind == "plain" or not sys.platform.startswith("linux") else int(
            (env or {}).get("CLASSIFIER_WORKERS") or os.environ.get("CLASSIFIER_WORKERS") or os.cpu_count() or 1)
        provider = os.environ.get("CLASSIFIER_PROVIDER", "cpu")
        full_env = {**os.environ, "CLASSIFIER_MODEL_DIR": str(model_dir), "CLASSIFIER_PROVIDER": provider,
                    "CLASSIFIER_LOG_LEVEL": "warning", **(env or {})}
        # stderr to a file, not a pipe: an undrained pipe fills up and blocks the server's logging
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server; closed in stop)
        self.proc = subprocess.Popen(args, env=full_env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{kind} server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                # ready answers come from the first worker up; with a socket per worker, wait for all of them
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200 and listening_sockets(self.port) >= self.workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{kind} server not ready")

    def rss_mb(self) -> float:
        """Resident memory of the server and its worker processes, summed."""
        return proc_stats(self.proc.pid)["rss_mb"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def load(url: str, bodies_file: str, concurrency: int, requests: int, server_pid: int | None = None) -> dict[str, Any]:
    """One loadgen run; with ``server_pid``, also the cores each server process kept busy
    (a worker well under its share means the connections were spread unevenly)."""
    before, t0 = (cpu_seconds(server_pid) if server_pid else {}), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--bodies", bodies_file,
                          "--concurrency", str(concurrency), "--requests", str(requests)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result = dict(json.loads(out.stdout))
    if server_pid:
        elapsed = time.perf_counter() - t0
        after = cpu_seconds(server_pid)
        result["server_cores_by_process"] = {str(p): round((after[p] - before.get(p, 0.0)) / elapsed, 2) for p in after}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(default_model_dir()))
    ap.add_argument("--sizes", default="640x480,1280x960,4000x3000")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=1000, help="requests per cell at 640x480 (fewer for larger images)")
    ap.add_argument("--servers", default="batched,unbatched,plain")
    ap.add_argument("--memory-requests", type=int, default=0, help="also run this many requests and report RSS growth")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is reported")
    ap.add_argument("--quick", action="store_true", help="640x480 only, concurrency 1 and 32, 400 requests")
    ap.add_argument("--out", default="bench_results.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.concurrency, a.requests = "640x480", "1,32", 400
    model_dir = Path(a.model_dir)
    cores = os.cpu_count() or 1
    batch = 32
    sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
    concurrency = [int(c) for c in a.concurrency.split(",")]
    report: dict[str, Any] = {
        "machine": {"cpus": cores, "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "node": platform.node()},
        "command": "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "in_process": {}, "http": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    inputs: dict[str, str] = {}
    for w, h in sizes:
        key = f"{w}x{h}"
        jpegs = make_jpegs(w, h, 16 if w * h > 2e6 else 32, seed=w)
        report["in_process"][key] = in_process(model_dir, jpegs, batch, cores)
        report["in_process"][key]["jpeg_kb_mean"] = float(np.mean([len(j) for j in jpegs]) / 1024)
        print(f"in-process {key}: {json.dumps({k: round(v, 2) for k, v in report['in_process'][key].items()})}", flush=True)  # noqa: T201
        bodies = [("/classify", *multipart(j, CAPTIONS[i % len(CAPTIONS)])) for i, j in enumerate(jpegs)]
        inputs[key] = str(tmp / f"{key}.pkl")
        with open(inputs[key], "wb") as f:
            pickle.dump(bodies, f)

    server_env = {"batched": {}, "unbatched": {"CLASSIFIER_MAX_BATCH_SIZE": "1"}, "plain": {}}
    for kind in a.servers.split(","):
        server = Server(kind if kind == "plain" else "service", model_dir, server_env[kind])
        try:
            for w, h in sizes:
                key = f"{w}x{h}"
                n = max(100, int(a.requests * min(1.0, 640 * 480 / (w * h)) ** 0.5))
                load(server.url, inputs[key], 8, min(100, n))  # warm the connections and the server
                for c in concurrency:
                    runs = sorted((load(server.url, inputs[key], c, n, server.proc.pid) for _ in range(a.repeat)),
                                  key=lambda x: float(x["requests_per_s"]))
                    r = runs[len(runs) // 2]  # the median run: connection balancing across workers is noisy
                    r["runs_requests_per_s"] = [x["requests_per_s"] for x in runs]
                    r.update({"server": kind, "size": key})
                    r["ratio_to_pipeline"] = r["requests_per_s"] / report["in_process"][key]["pipeline_per_s"]
                    report["http"].append(r)
                    print(f"{kind:>9} {key:>9} c={c:<3} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "  # noqa: T201
                          f"p95 {r['p95_ms']:7.2f}  p99 {r['p99_ms']:7.2f}  errors {r['errors']}  runs "
                          + " ".join(f"{x['requests_per_s']:.0f}" for x in runs)
                          + "  busy cores per process " + " | ".join(
                              "/".join(f"{v:.2f}" for v in x["server_cores_by_process"].values()) for x in runs), flush=True)
            if kind == "batched" and a.memory_requests:
                key = f"{sizes[0][0]}x{sizes[0][1]}"
                load(server.url, inputs[key], 32, 1000)
                before = server.rss_mb()
                r = load(server.url, inputs[key], 32, a.memory_requests)
                after = server.rss_mb()
                report["memory"] = {"requests": a.memory_requests, "rss_before_mb": before, "rss_after_mb": after,
                                    "growth_mb": after - before, "errors": r["errors"]}
                print(f"memory: RSS {before:.1f} -> {after:.1f} MB over {a.memory_requests} requests", flush=True)  # noqa: T201
        finally:
            server.stop()

    print_table(report)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {a.out}")  # noqa: T201
    return 0


def print_table(report: dict[str, Any]) -> None:
    print("\n| server | image | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | vs in-process pipeline |")  # noqa: T201
    print("|---|---|---|---|---|---|---|---|---|")  # noqa: T201
    for r in report["http"]:
        print(f"| {r['server']} | {r['size']} | {r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.2f} | "  # noqa: T201
              f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {100 * r['ratio_to_pipeline']:.0f}% |")
    print("\n| image | decode/s | ORT b1 rows/s | ORT b32 rows/s | pipeline/s | single request ms |")  # noqa: T201
    print("|---|---|---|---|---|---|")  # noqa: T201
    for key, v in report["in_process"].items():
        print(f"| {key} | {v['decode_per_s']:.0f} | {v['onnxruntime_batch1_per_s']:.0f} | {v['onnxruntime_batch32_per_s']:.0f} | "  # noqa: T201
              f"{v['pipeline_per_s']:.0f} | {v['single_request_ms']:.2f} |")



if __name__ == "__main__":
    sys.exit(main())
