"""GPU check: the service on CUDA, parity with CPU onnxruntime, and a throughput figure.

Run on a machine with an NVIDIA GPU where onnxruntime-gpu and its CUDA 13 / cuDNN 9
libraries are installed; it installs nothing. Exit code 0 only if every check passes.

    python benchmarks/gpu_check.py [--model-dir exported_models/default] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classifier_core.artifact import load_manifest  # noqa: E402
from classifier_core.images import load_image  # noqa: E402
from classifier_core.text import TextEncoder  # noqa: E402
from model_training.synthetic import GeneratorConfig, generate  # noqa: E402  (numpy + Pillow only)

transport_errors: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(url: str, samples: list[tuple[bytes, str]], total: int, concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    transport_errors.clear()
    errors = 0
    queue = list(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            i = queue.pop()
            jpg, cap = samples[i % len(samples)]
            t = time.perf_counter()
            try:
                r = await client.post("/classify", files={"image": ("x.jpg", jpg, "image/jpeg")}, data={"description": cap})
                errors += r.status_code != 200
            except httpx.HTTPError as exc:  # counted, not fatal: the report must still come out
                errors += 1
                transport_errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "exported_models" / "default"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--server-log", default="gpu_check_server.log", help="where the service's output goes")
    a = ap.parse_args()
    import onnxruntime as ort

    report: dict[str, object] = {"machine": platform.node(), "onnxruntime": ort.__version__,
                                 "available_providers": ort.get_available_providers()}
    ok = True
    port = free_port()
    env = {**os.environ, "CLASSIFIER_MODEL_DIR": a.model_dir, "CLASSIFIER_PROVIDER": "cuda", "CLASSIFIER_LOG_LEVEL": "warning",
           "CLASSIFIER_WORKERS": os.environ.get("CLASSIFIER_WORKERS", "1")}
    server_log = open(a.server_log, "w")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=server_log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                print(Path(a.server_log).read_text()[-3000:], file=sys.stderr)  # noqa: T201
                print(json.dumps({**report, "ok": False, "error": "service exited during start-up"}))  # noqa: T201
                return 1
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("service not ready in 180 s")
            time.sleep(0.3)
        info = httpx.get(f"{url}/model").json()
        report["service_providers"] = info["providers"]
        cuda_ok = info["providers"][0] == "CUDAExecutionProvider"
        report["cuda_in_use"] = cuda_ok
        ok &= cuda_ok

        m = load_manifest(a.model_dir)
        text = TextEncoder.from_file(Path(a.model_dir) / m.tokenizer_file, m.max_len)
        cpu = ort.InferenceSession(str(Path(a.model_dir) / m.model_file), providers=["CPUExecutionProvider"])
        samples = [(jpg, cap) for _, jpg, cap, _ in generate(GeneratorConfig(seed=99, num_samples=a.samples))]
        worst = 0.0
        for jpg, cap in samples:
            ref = cpu.run(["probabilities"], {"image": load_image(jpg, m.image_size)[None],
                                              "input_ids": text.pad([text.encode(cap)])})[0][0]
            body = httpx.post(f"{url}/classify", params={"top_k": len(m.labels)},
                              files={"image": ("x.jpg", jpg, "image/jpeg")}, data={"description": cap}).json()
            got = {p["label"]: p["score"] for p in body["predictions"]}
            worst = max(worst, max(abs(got[lab] - float(ref[i])) for i, lab in enumerate(m.labels)))
        report["parity_max_abs_diff_vs_cpu"] = worst
        ok &= worst <= 1e-3

        elapsed, lat, errors = asyncio.run(drive(url, samples, a.requests, a.concurrency))
        lat_ms = np.array(lat) * 1000
        report["http"] = {"requests": a.requests, "concurrency": a.concurrency, "errors": errors,
                          "requests_per_s": round(a.requests / elapsed, 1),
                          "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
                          "p95_ms": round(float(np.percentile(lat_ms, 95)), 2),
                          "transport_errors": dict(Counter(transport_errors)),
                          "server_alive_after": proc.poll() is None}
        ok &= errors == 0

        gpu = ort.InferenceSession(str(Path(a.model_dir) / m.model_file), providers=["CUDAExecutionProvider"])
        imgs = np.stack([load_image(j, m.image_size) for j, _ in samples[:32]])
        ids = text.pad(text.encode_batch([c for _, c in samples[:32]]))
        for _ in range(10):
            gpu.run(None, {"image": imgs, "input_ids": ids})
        t = time.perf_counter()
        n = 200
        for _ in range(n):
            gpu.run(None, {"image": imgs, "input_ids": ids})
        report["onnxruntime_cuda_batch32_rows_per_s"] = round(n * 32 / (time.perf_counter() - t), 1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        server_log.close()
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=2))  # noqa: T201
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
