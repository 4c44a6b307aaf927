"""Helpers shared by the test modules: free ports, real server processes, generated inputs.

Imported as ``from helpers import ...`` (tests/ is on pytest's python path); fixtures that
build the tiny dataset, model and artifact live in ``conftest.py``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "exported_models" / "default"


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    """A Pillow image encoded as ``fmt`` (PNG, JPEG, WEBP...)."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@contextmanager
def app_client(model_dir: Path, raise_server_exceptions: bool = True, **settings: Any) -> Iterator[Any]:
    """The app in this process (FastAPI's TestClient, lifespan included), on the CPU provider unless told."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(**{"model_dir": model_dir, "provider": "cpu", **settings}))
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 90) -> None:
    """Until ``GET /readyz`` answers 200; fails at once if the server process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited during start-up with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout:.0f} s")


def start_server(model_dir: Path, *args: str, port: int | None = None, wait: bool = True, stdout: Any = None,
                 **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m service`` as a real process on 127.0.0.1 (CPU provider, quiet logs unless ``env`` says)."""
    port = port or free_port()
    full = {**os.environ, "CLASSIFIER_MODEL_DIR": str(model_dir), "CLASSIFIER_PROVIDER": "cpu",
            "CLASSIFIER_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=ROOT, env=full, stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None)
    url = f"http://127.0.0.1:{port}"
    if wait:
        try:
            wait_ready(url, proc)
        except AssertionError:
            proc.kill()
            raise
    return proc, url


@contextmanager
def running_server(model_dir: Path, *args: str, **env: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A server for the length of a ``with`` block; it must stop cleanly (exit 0) on SIGTERM."""
    proc, url = start_server(model_dir, *args, **env)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def workers_of(pid: int) -> list[int]:
    """The worker processes of a ``python -m service`` supervisor (spawned children), sorted."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def jpeg_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (40, 40), mode: str = "RGB", colour: object = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def synthetic_samples(n: int, seed: int = 11) -> list[tuple[bytes, str, str]]:
    """Real generated (jpeg, caption, label) triples, distinct images and caption lengths."""
    from model_training.synthetic import GeneratorConfig, generate

    return [(jpg, cap, meta["label"]) for _, jpg, cap, meta in generate(GeneratorConfig(seed=seed, num_samples=n))]  # type: ignore[misc]


def calibrated(probs: np.ndarray, model_dir: Path) -> np.ndarray:
    """What the service answers for the graph's probabilities: the artifact's temperature applied,
    softmax(log p / T) (written here from the definition, not taken from the service)."""
    t = float(read_json(model_dir / "manifest.json").get("calibration", {}).get("temperature", 1.0))
    z = np.log(np.maximum(np.asarray(probs, np.float64), 1e-45)) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def best_guess(body: dict[str, Any]) -> str:
    """The label a /classify answer ranks first, whether or not it abstained (label null)."""
    assert body["abstained"] == (body["label"] is None), body
    return str(body["predictions"][0]["label"])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def rng_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def multipart_body(jpeg: bytes, caption: str, boundary: str = "testb0undary") -> tuple[bytes, str]:
    """A ``/classify`` body as a client sends it, and its content type."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"description\"\r\n\r\n{caption}\r\n"
            f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A WebDataset shard as img2dataset writes it: ``KEY.EXT`` members, grouped by key."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples.items():
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_repository(root: Path, models: dict[str, dict[str, Path]], labels: dict[str, list[str]] | None = None,
                    policies: dict[str, dict[str, Any]] | None = None) -> Path:
    """A model repository of real artifacts: ``models`` is name -> version -> artifact folder (copied).

    ``labels``: "name/version" -> label names written into that copy's manifest (the manifest is not
    in its own checksums), so two copies of one artifact answer with different labels. ``policies``:
    name -> its ``model.json``.
    """
    import shutil

    for name, versions in models.items():
        for version, artifact in versions.items():
            dest = root / name / version
            shutil.copytree(artifact, dest)
            renamed = (labels or {}).get(f"{name}/{version}")
            if renamed is not None:
                manifest = json.loads((dest / "manifest.json").read_text())
                assert len(renamed) == len(manifest["labels"])
                manifest["labels"] = renamed
                (dest / "manifest.json").write_text(json.dumps(manifest))
        if name in (policies or {}):
            (root / name / "model.json").write_text(json.dumps((policies or {})[name]))
    return root
