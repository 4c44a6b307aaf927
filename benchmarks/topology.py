"""Serving topologies side by side (not a test): per-worker sessions vs one model owner, CPU and CUDA.

    python -m benchmarks.topology --configs cpu-workers,cpu-owner --concurrency 64 --requests 3000

Each configuration is a real ``python -m service`` with one HTTP worker per core (or
``--workers``), driven by ``benchmarks.loadgen`` in its own process with the bench's 640x480
photo-like JPEGs. Per configuration: requests/s, p50/p99, errors by status (-1 = the server
closed a connection), whether the server was still alive, and the last lines of its log
(kept, so a transport error can be traced to a cause).

    cpu-workers   CLASSIFIER_PROVIDER=cpu,  TOPOLOGY=workers  (each worker owns a session)
    cpu-owner     CLASSIFIER_PROVIDER=cpu,  TOPOLOGY=owner    (workers decode; one owner process infers)
    cuda-workers  CLASSIFIER_PROVIDER=cuda, TOPOLOGY=workers  (a CUDA context per worker)
    cuda-owner    CLASSIFIER_PROVIDER=cuda, TOPOLOGY=owner    (one CUDA context, batches across workers)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.settings import default_model_dir

from .bench import Server, load, make_jpegs, multipart

CONFIGS = {
    "cpu-workers": {"CLASSIFIER_PROVIDER": "cpu", "CLASSIFIER_TOPOLOGY": "workers"},
    "cpu-owner": {"CLASSIFIER_PROVIDER": "cpu", "CLASSIFIER_TOPOLOGY": "owner"},
    "cuda-workers": {"CLASSIFIER_PROVIDER": "cuda", "CLASSIFIER_TOPOLOGY": "workers"},
    "cuda-owner": {"CLASSIFIER_PROVIDER": "cuda", "CLASSIFIER_TOPOLOGY": "owner"},
}


def run_config(name: str, model_dir: Path, bodies: str, concurrency: int, requests: int, workers: int) -> dict[str, Any]:
    env = {**CONFIGS[name], "CLASSIFIER_WORKERS": str(workers), "CLASSIFIER_LOG_LEVEL": "info",
           "CLASSIFIER_LOG_FORMAT": "text"}
    os.environ["CLASSIFIER_PROVIDER"] = env["CLASSIFIER_PROVIDER"]  # Server reads the provider from here
    try:
        server = Server("service", model_dir, env)
    except RuntimeError as exc:
        return {"error": str(exc)[-1500:]}
    try:
        load(server.url, bodies, min(concurrency, 8), min(400, requests))  # warm every worker and bucket
        result = load(server.url, bodies, concurrency, requests, server.proc.pid)
        result["server_alive_after"] = server.proc.poll() is None
        server.log.seek(0)
        lines = server.log.read().decode(errors="replace").splitlines()
        result["server_log_warnings"] = [x for x in lines if " WARNING " in x or " ERROR " in x][-10:]
    finally:
        server.stop()
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.topology", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="cpu-workers,cpu-owner", help=f"comma separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="HTTP workers (default: one per core)")
    ap.add_argument("--model-dir", default=str(default_model_dir()))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    jpegs = make_jpegs(640, 480, 16)
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump([("/classify", *multipart(j, f"photo {i}: a red apple on a table")) for i, j in enumerate(jpegs)], f)
        bodies = f.name
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": "python -m benchmarks.topology " + " ".join(argv if argv is not None else sys.argv[1:]),
        "image": "640x480 JPEG", "concurrency": a.concurrency, "requests": a.requests, "workers": a.workers, "results": {}}
    try:
        for name in a.configs.split(","):
            report["results"][name] = run_config(name, Path(a.model_dir), bodies, a.concurrency, a.requests, a.workers)
            print(name, json.dumps(report["results"][name]), flush=True)  # noqa: T201
    finally:
        Path(bodies).unlink(missing_ok=True)
    print(json.dumps(report, indent=2))  # noqa: T201
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
