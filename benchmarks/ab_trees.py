"""Interleaved A/B of the service from two source trees, with the plain baseline in every round.

Runs ``python -m service`` (defaults: one worker per core) from ``--tree-a`` and ``--tree-b`` and
``benchmarks.bench_plain`` in turns (A, B, plain, then B, A, plain, ...), each warmed up with 200
requests, then ``benchmarks.loadgen`` at concurrency 1 and 32 on 640x480 JPEGs. On a small machine
one run moves by 10-20 % from the next (the plain baseline too), so only rounds taken in turns,
compared pair by pair, say anything.

    git worktree add /tmp/old <commit>
    python -m benchmarks.ab_trees --tree-a . --tree-b /tmp/old --rounds 4 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench import CAPTIONS, make_jpegs, multipart

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "exported_models" / "default"  # --model-dir


def _serve(cmd: list[str], cwd: Path, port: int, bodies: str, extra: dict[str, str], model: Path = MODEL
           ) -> dict[int, dict[str, Any]]:
    env = {**os.environ, "CLASSIFIER_PROVIDER": "cpu", "CLASSIFIER_LOG_LEVEL": "warning", "CLASSIFIER_MODEL_DIR": str(model),
           **extra}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        out = {}
        for c, n in ((1, 600), (32, 2500)):
            gen = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--bodies", bodies, "--concurrency", str(c)]
            subprocess.run([*gen, "--requests", "200"], cwd=ROOT, capture_output=True, check=True)
            out[c] = json.loads(subprocess.run([*gen, "--requests", str(n)], cwd=ROOT, capture_output=True, text=True,
                                               check=True).stdout)
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree-a", default=str(ROOT))
    p.add_argument("--tree-b", required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for both services (e.g. CLASSIFIER_TOPOLOGY=owner); repeatable")
    p.add_argument("--no-plain", action="store_true", help="leave the plain baseline out of the rounds")
    p.add_argument("--model-dir", default=str(MODEL), help="the artifact every server serves")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    model = Path(a.model_dir).resolve()
    extra = dict(e.split("=", 1) for e in a.env)
    jpegs = make_jpegs(640, 480, 32, seed=640)
    bodies = str(Path(tempfile.mkdtemp(prefix="ab-")) / "bodies.pkl")
    with open(bodies, "wb") as f:
        pickle.dump([("/classify", *multipart(j, CAPTIONS[i % len(CAPTIONS)])) for i, j in enumerate(jpegs)], f)
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []} if a.no_plain else {"a": [], "b": [], "plain": []}
    port = 8600
    for rnd in range(a.rounds):
        for kind in [k for k in (("a", "b", "plain") if rnd % 2 == 0 else ("b", "a", "plain")) if k in runs]:
            port += 1
            if kind == "plain":
                cmd, cwd = [sys.executable, "-m", "benchmarks.bench_plain", "--port", str(port), "--model-dir", str(model)], ROOT
            else:
                cmd, cwd = [sys.executable, "-m", "service", "--port", str(port), "--host", "127.0.0.1"], Path(getattr(a, f"tree_{kind}"))
            out = _serve(cmd, cwd, port, bodies, {} if kind == "plain" else extra, model)
            row = {"c1_p50_ms": out[1]["p50_ms"], "c1_rps": out[1]["requests_per_s"], "c32_rps": out[32]["requests_per_s"]}
            runs[kind].append(row)
            print(rnd, kind, {k: round(v, 2) for k, v in row.items()}, flush=True)  # noqa: T201
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    pairs = {m: statistics.median(x[m] / y[m] for x, y in zip(runs["a"], runs["b"], strict=True)) for m in runs["a"][0]}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "command": "python -m benchmarks.ab_trees " + " ".join(argv if argv is not None else sys.argv[1:]),
              "median": med, "median_ratio_a_over_b_pair_by_pair": pairs, "runs": runs}
    print(json.dumps({"median": med, "ratio a/b": pairs}, indent=1))  # noqa: T201
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
