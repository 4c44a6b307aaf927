"""Model repository figures: the memory each loaded version adds, and a live version switch under load.

Builds a repository of the committed default model (version 1 of two models), starts
``python -m service --model-repository ... --poll-repository P``, puts a steady load on it
(``--clients`` threads, each one request after another), renames a version 2 into place and
measures how long until every answer comes from version 2, counting every status meanwhile.

    python -m benchmarks.repository_switch --out benchmarks/results/repository_switch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "exported_models" / "default"
IMAGE = (ROOT / "examples" / "tomato.jpg").read_bytes()


def _load(url: str, stop: threading.Event, statuses: Counter[int], versions: list[tuple[float, str]]) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            r = c.post("/classify", files={"image": ("t.jpg", IMAGE, "image/jpeg")}, data={"description": "a tomato"})
            statuses[r.status_code] += 1
            if r.status_code == 200:
                versions.append((time.monotonic(), r.json()["model"]["version"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="repo-bench-"))
    repo = tmp / "models"
    for name in ("fused", "other"):
        shutil.copytree(DEFAULT, repo / name / "1")
    env = {**os.environ, "CLASSIFIER_PROVIDER": "cpu", "CLASSIFIER_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(a.port), "--host", "127.0.0.1",
                             "--model-repository", str(repo), "--poll-repository", str(a.poll), "--workers", str(a.workers)],
                            cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{a.port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        models = httpx.get(f"{url}/model").json()["models"]
        stop, statuses = threading.Event(), Counter[int]()
        versions: list[tuple[float, str]] = []
        threads = [threading.Thread(target=_load, args=(url, stop, statuses, versions)) for _ in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        shutil.copytree(DEFAULT, tmp / "incoming")
        dropped = time.monotonic()
        (tmp / "incoming").rename(repo / "fused" / "2")
        while time.monotonic() - dropped < 60:
            recent = [v for at, v in versions if at > dropped]
            if len(recent) > 200 and set(recent[-100:]) == {"2"}:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join()
        after = [(at - dropped, v) for at, v in versions if at > dropped]
        first_new = next((t for t, v in after if v == "2"), None)
        last_old = max((t for t, v in after if v == "1"), default=0.0)
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "command": "python -m benchmarks.repository_switch " + " ".join(argv if argv is not None else sys.argv[1:]),
            "workers": a.workers, "clients": a.clients, "poll_s": a.poll,
            "memory_bytes_per_version": {f"{m['name']}/{m['version']}": m["memory_bytes"] for m in models},
            "model_bytes": DEFAULT.joinpath("model.onnx").stat().st_size,
            "requests": sum(statuses.values()), "statuses": {str(k): v for k, v in statuses.items()},
            "first_answer_from_new_s": None if first_new is None else round(first_new, 3),
            "last_answer_from_old_s": round(last_old, 3),
        }
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))  # noqa: T201
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
