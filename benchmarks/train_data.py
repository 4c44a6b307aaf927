"""Training-data benchmark (not a test): the streaming pipeline's throughput, memory and start-up.

    python -m benchmarks.train_data --sizes 10000,100000 --out benchmarks/results/train_data_cpu.json
    python -m benchmarks.train_data --sizes 6000,24000 --shapes duplicated,small --mode image \
        --out benchmarks/results/train_data_shapes_cpu.json

1. Generates COYO-sized samples (512x384 JPEGs of about 80 KB, a caption, a label) as
   img2dataset-style shards in a temporary folder (deleted afterwards, never committed).
   There are 1,000 distinct pictures; each sample's JPEG carries its own comment segment,
   so every file differs while decoding costs what a real photo of that size costs.
   ``--shapes`` adds other data shapes beside these distinct photos: ``duplicated`` (a quarter
   as many pictures, each byte-identical file under four keys, so copies land in every split, as
   when a crawl is re-keyed) and ``small`` (64x48 thumbnails of about 2 KB: many samples per
   megabyte, so whatever is kept per sample dominates).
2. Loader throughput: samples/s through ``SplitStream`` + ``DataLoader`` with 0, 1 and 2
   worker processes (decode to 64x64, tokenize, batch 32; no model).
3. For each size: one epoch of ``python -m model_training train`` (the paper's model) as a
   subprocess; peak RSS of the trainer and of its process tree (trainer + loader workers,
   sampled every 0.2 s from /proc), and the time from launch to the first training batch
   (the trainer's "first batch" log line as it appears on stderr).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "car", "tree", "boat", "house", "flower", "bird", "chair", "cup"]


def base_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 512x384 pictures, about 80 KB as JPEG (smooth gradients plus noise, like photos)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:384, 0:512]
    for _ in range(n):
        base = np.stack([(np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * 100 + 128),
                         (np.cos(yy / rng.uniform(20, 80)) * 100 + 128),
                         ((xx + yy) / 4 % 256)], -1)
        noise = rng.normal(0, 18, base.shape)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same picture with a COM segment after SOI: a different file, identical pixels."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def small_jpegs(n: int, seed: int = 1) -> list[bytes]:
    """n distinct 64x48 thumbnails (about 2 KB as JPEG)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = np.clip(rng.normal(128, 60, (48, 64, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def generate(folder: Path, n: int, bases: list[bytes], shard_size: int = 1000, shape: str = "distinct") -> None:
    rng = random.Random(n)
    pictures = max(1, n // 4) if shape == "duplicated" else len(bases)
    for s in range(0, n, shard_size):
        with tarfile.open(folder / f"{s // shard_size:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + shard_size)):
                label = LABELS[i % len(LABELS)]
                if shape == "duplicated":  # the same bytes under four keys
                    jpeg = with_comment(bases[(i % pictures) % len(bases)], f"picture {i % pictures}")
                else:
                    jpeg = with_comment(bases[i % len(bases)], f"sample {i}")
                parts = {"jpg": jpeg,
                         "txt": f"a photo of a {label} number {rng.randrange(1000)}".encode(),
                         "json": json.dumps({"label": label, "status": "success", "key": f"{i:09d}"}).encode()}
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def loader_rate(folder: Path, workers: int, samples: int) -> float:
    from classifier_core.text import train_tokenizer
    from model_training.data import DataSpec, scan
    from model_training.stream import SplitStream, StreamConfig, loader

    spec = DataSpec([str(folder)])
    index = scan(spec, require_splits=False)
    tok = train_tokenizer(index.captions[:5000], 1000, 1).to_str()  # type: ignore[attr-defined]
    stream = SplitStream(spec, "train", index.labels, tok, StreamConfig(64, 32, 32, shuffle=True, limit=samples))
    t0 = time.perf_counter()
    n = sum(len(b["targets"]) for b in loader(stream, workers))
    return n / (time.perf_counter() - t0)


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """(RSS of pid, RSS of pid and all its descendants) in MB."""
    def rss(p: int) -> float:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def kids(p: int) -> list[int]:
        try:
            out = []
            for t in os.listdir(f"/proc/{p}/task"):
                out += [int(x) for x in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            return out
        except OSError:
            return []

    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        total += rss(p)
        stack += kids(p)
    return rss(pid), total


def one_epoch(folder: Path, out: Path, workers: int, device: str = "cpu", mode: str = "fused") -> dict[str, float]:
    cmd = [sys.executable, "-m", "model_training", "train", "--data", str(folder), "--out-dir", str(out),
           "--epochs", "1", "--workers", str(workers), "--no-progress", "--device", device, "--model.mode", mode]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"main": 0.0, "tree": 0.0}
    first: dict[str, float] = {}
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "first batch" in line and "first" not in first:
                first["first"] = time.perf_counter() - t0
            if " samples (train/val/test)" in line and "scan" not in first:
                first["scan"] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        m, t = tree_rss_mb(proc.pid)
        peak["main"], peak["tree"] = max(peak["main"], m), max(peak["tree"], t)
        time.sleep(0.2)
    reader.join(5)
    if proc.returncode != 0:
        raise RuntimeError("training failed:\n" + "".join(log[-30:]))
    return {"peak_rss_trainer_mb": round(peak["main"], 1), "peak_rss_tree_mb": round(peak["tree"], 1),
            "seconds_to_metadata_scan_done": round(first.get("scan", float("nan")), 2),
            "seconds_to_first_batch": round(first.get("first", float("nan")), 2),
            "seconds_total": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="samples per generated dataset, comma separated")
    p.add_argument("--rate-samples", type=int, default=4000, help="samples per loader-throughput measurement")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the one-epoch runs")
    p.add_argument("--device", default="cpu", help="the one-epoch runs' --device (cuda: pinned memory, bfloat16 autocast)")
    p.add_argument("--shapes", default="distinct", help="data shapes, comma separated: distinct, duplicated, small")
    p.add_argument("--mode", default="fused", help="the one-epoch runs' --model.mode (fused, image, text)")
    p.add_argument("--tmp", default=None, help="folder for the generated data (default: the system's temp)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    photos = base_jpegs(1000)
    runs: dict[str, dict[str, float]] = {}
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": "python -m benchmarks.train_data " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": a.device, "mode": a.mode, "jpeg_bytes_mean": int(np.mean([len(b) for b in photos])),
        "image": "512x384 JPEG (small: 64x48) -> 64x64", "epoch_runs": runs,
    }
    sizes = [int(x) for x in a.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="train-data-bench-", dir=a.tmp))
    try:
        for shape in a.shapes.split(","):
            bases = small_jpegs(max(sizes)) if shape == "small" else photos
            for n in sizes:
                folder = tmp / f"{shape}{n}"
                folder.mkdir()
                t0 = time.perf_counter()
                generate(folder, n, bases, shape=shape)
                print(f"generated {n} {shape} samples in {time.perf_counter() - t0:.0f} s", flush=True)  # noqa: T201
                if "loader_samples_per_s" not in results and shape == "distinct":
                    results["loader_samples_per_s"] = {w: round(loader_rate(folder, w, a.rate_samples), 1) for w in (0, 1, 2)}
                    print("loader samples/s by workers:", results["loader_samples_per_s"], flush=True)  # noqa: T201
                run = one_epoch(folder, tmp / f"run-{shape}{n}", a.workers, a.device, a.mode)
                name = str(n) if shape == "distinct" else f"{shape}:{n}"
                runs[name] = run
                print(name, run, flush=True)  # noqa: T201
                shutil.rmtree(folder)
            lo, hi = runs[str(sizes[0]) if shape == "distinct" else f"{shape}:{sizes[0]}"], runs[
                str(sizes[-1]) if shape == "distinct" else f"{shape}:{sizes[-1]}"]
            if len(sizes) >= 2:
                results.setdefault("rss_ratio_largest_vs_smallest", {})[shape] = {  # type: ignore[index]
                    "trainer": round(hi["peak_rss_trainer_mb"] / lo["peak_rss_trainer_mb"], 3),
                    "tree": round(hi["peak_rss_tree_mb"] / lo["peak_rss_tree_mb"], 3)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))  # noqa: T201
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
