"""The service beside its peers on one artifact, interleaved: the service (onnxruntime, and OpenVINO
when installed), the plain FastAPI baseline and LitServe (``benchmarks.peer_litserve``, its own venv).

    python -m benchmarks.peers --model-dir DIR --litserve-python /tmp/lsvenv/bin/python --rounds 2 --out peers.json

Each round starts every server in turn, warms it, runs ``benchmarks.loadgen`` at each concurrency
(640x480 JPEGs with captions, the same bodies for all) and stops it; the table is the median over
rounds. Every server answers the same multipart ``POST /classify``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from .bench import CAPTIONS, Server, free_port, load, make_jpegs, multipart


class LitServe:
    def __init__(self, python: str, model_dir: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = Path(__file__).resolve().parent.parent
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([python, "-m", "benchmarks.peer_litserve", "--model-dir", str(model_dir), "--port",
                                      str(self.port), "--workers", str(workers)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                                     stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        jpeg = make_jpegs(64, 48, 1)[0]
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"litserve exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.post(f"{self.url}/classify", files={"image": ("x.jpg", jpeg, "image/jpeg")}, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("litserve not ready")

    def stop(self) -> None:
        # LitServe's worker processes outlive a terminated parent: end the whole session
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--litserve-python", default=None, help="the python of a venv with litserve (none: no LitServe)")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--openvino", action="store_true", help="also the service with CLASSIFIER_PROVIDER=openvino")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    jpegs = make_jpegs(640, 480, 32, seed=640)
    bodies = str(Path(tempfile.mkdtemp(prefix="peers-")) / "bodies.pkl")
    with open(bodies, "wb") as f:
        pickle.dump([("/classify", *multipart(j, CAPTIONS[i % len(CAPTIONS)])) for i, j in enumerate(jpegs)], f)
    kinds = ["service", "plain"] + (["service-openvino"] if a.openvino else []) + (["litserve"] if a.litserve_python else [])
    results: dict[str, dict[int, list[dict[str, Any]]]] = {k: {} for k in kinds}
    for rnd in range(a.rounds):
        for kind in kinds:
            server: Any
            if kind == "litserve":
                server = LitServe(str(a.litserve_python), a.model_dir, cores)
            else:
                env = {"CLASSIFIER_PROVIDER": "openvino"} if kind == "service-openvino" else {"CLASSIFIER_PROVIDER": "cpu"}
                os.environ["CLASSIFIER_PROVIDER"] = env["CLASSIFIER_PROVIDER"]
                server = Server("plain" if kind == "plain" else "service", a.model_dir, env)
            try:
                load(server.url, bodies, 8, 100)  # warm
                for c in (int(x) for x in a.concurrency.split(",")):
                    r = load(server.url, bodies, c, a.requests)
                    results[kind].setdefault(c, []).append(r)
                    print(f"round {rnd} {kind:>16} c={c:<3} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "  # noqa: T201
                          f"p99 {r['p99_ms']:7.2f}  errors {r['errors']}", flush=True)
            finally:
                server.stop()
    table = {k: {str(c): {"requests_per_s": statistics.median(x["requests_per_s"] for x in rs),
                          "p50_ms": statistics.median(x["p50_ms"] for x in rs), "p99_ms": statistics.median(x["p99_ms"] for x in rs),
                          "errors": sum(int(x["errors"]) for x in rs), "runs": [round(x["requests_per_s"], 1) for x in rs]}
                 for c, rs in v.items()} for k, v in results.items()}
    report = {"machine": f"{platform.machine()}, {cores} CPUs", "model_dir": str(a.model_dir),
              "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv), "median_over_rounds": table}
    print(json.dumps(report, indent=2))  # noqa: T201
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
