"""gRPC beside REST on the same server, images, rows and concurrency (a benchmark, not a test).

    python -m benchmarks.grpc_vs_rest --out benchmarks/results/grpc_vs_rest_cpu.json

Starts ``python -m service`` (default workers, ``CLASSIFIER_GRPC_PORT`` on) on the committed
default model, then runs, in turns (``--rounds`` times each, interleaved so drift hits both
alike), one client process per measurement:

* REST: ``POST /v2/models/<m>/infer`` with the binary tensor extension (what tritonclient[http]
  sends), over raw keep-alive connections (``benchmarks.loadgen``: the cheapest client there is);
* gRPC: ``ModelInfer`` with ``raw_input_contents`` (what tritonclient[grpc] sends) on grpcio's
  asyncio channel, one channel (one HTTP/2 connection) per concurrent caller.

Both send the same example photographs with captions, one row per call. Reports requests/s and
latency percentiles per round and the medians, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "image-text-classifier"
IMAGES = [("tomato.jpg", b"a cherry tomato on the table"), ("lemon.jpg", b"a lemon"), ("cat.jpg", b""),
          ("coffee.jpg", b"a cup of coffee")]


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def rest_requests(host: str) -> list[bytes]:
    out = []
    for name, caption in IMAGES:
        blobs = [_bytes_tensor([(ROOT / "examples" / name).read_bytes()]), _bytes_tensor([caption])]
        head = json.dumps({"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blobs[0])}},
            {"name": "description", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blobs[1])}}],
            "parameters": {"binary_data_output": True}}).encode()
        body = head + b"".join(blobs)
        out.append((f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                    f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: keep-alive\r\n\r\n").encode() + body)
    return out


async def grpc_run(target: str, concurrency: int, total: int) -> dict[str, Any]:
    import grpc

    from service.grpc_v2 import inference_pb2 as pb
    from service.grpc_v2 import inference_pb2_grpc as pb_grpc

    requests = []
    for name, caption in IMAGES:
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="image", datatype="BYTES", shape=[1])
        req.inputs.add(name="description", datatype="BYTES", shape=[1])
        req.raw_input_contents.extend([_bytes_tensor([(ROOT / "examples" / name).read_bytes()]), _bytes_tensor([caption])])
        requests.append(req)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = [0]

    async def caller() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while counter[0] < total:
                i = counter[0]
                counter[0] += 1
                t0 = time.perf_counter()
                try:
                    await stub.ModelInfer(requests[i % len(requests)], timeout=30)
                    latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"requests": total, "concurrency": concurrency, "seconds": elapsed, "ok": len(lat), "errors": sum(errors.values()),
            "statuses": errors, "requests_per_s": len(lat) / elapsed, "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


def client_main(a: argparse.Namespace) -> int:
    """One measurement, in its own process (``--client rest|grpc``): JSON on stdout."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.client == "rest":
        from benchmarks.loadgen import run

        result = asyncio.run(run(a.url, rest_requests(a.url.removeprefix("http://")), a.concurrency, a.requests))
    else:
        result = asyncio.run(grpc_run(a.grpc, a.concurrency, a.requests))
    json.dump(result, sys.stdout)
    return 0


def _wait_ready(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not become ready")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client", choices=("rest", "grpc"), help=argparse.SUPPRESS)
    p.add_argument("--url", default="http://127.0.0.1:18400")
    p.add_argument("--grpc", default="127.0.0.1:18401")
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--concurrencies", default="1,32")
    p.add_argument("--requests", type=int, default=0, help="calls per measurement (default: 300 at c=1, 2000 at c>1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.client:
        client_main(a)
        return {}
    port, grpc_port = int(a.url.rsplit(":", 1)[1]), int(a.grpc.rsplit(":", 1)[1])
    env = {**os.environ, "CLASSIFIER_GRPC_PORT": str(grpc_port), "CLASSIFIER_GRPC_HOST": "127.0.0.1",
           "CLASSIFIER_LOG_LEVEL": "warning", "CLASSIFIER_PROVIDER": os.environ.get("CLASSIFIER_PROVIDER", "cpu")}
    server = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        _wait_ready(a.url)
        time.sleep(2)  # every worker loaded
        for c in (int(x) for x in a.concurrencies.split(",")):
            n = a.requests or (300 if c == 1 else 2000)
            for _ in range(a.rounds):
                for client in ("grpc", "rest"):
                    cmd = [sys.executable, "-m", "benchmarks.grpc_vs_rest", "--client", client, "--url", a.url,
                           "--grpc", a.grpc, "--concurrency", str(c), "--requests", str(n)]
                    out = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
                    runs.setdefault(f"{client} c={c}", []).append(out)
                    print(f"{client} c={c}: {out['requests_per_s']:.0f} req/s, p50 {out['p50_ms']:.1f} ms, "  # noqa: T201
                          f"p99 {out['p99_ms']:.1f} ms, errors {out['errors']}", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    summary = {k: {"requests_per_s_median": round(statistics.median(r["requests_per_s"] for r in v), 1),
                   "p50_ms_median": round(statistics.median(r["p50_ms"] for r in v), 2),
                   "p99_ms_median": round(statistics.median(r["p99_ms"] for r in v), 2),
                   "errors": sum(r["errors"] for r in v)} for k, v in runs.items()}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "command": "python -m benchmarks.grpc_vs_rest " + " ".join(argv if argv is not None else sys.argv[1:]),
              "server": "python -m service, default workers (one per core), CLASSIFIER_GRPC_PORT on, default model, CPU",
              "rows_per_call": 1, "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=2))  # noqa: T201
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
