"""End to end: `python -m service` as a real subprocess, driven through service.client."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import start_server, synthetic_samples
from PIL import Image

from service.client import AsyncClassifierClient, ClassifierClient, ClassifierError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[str]:
    proc, url = start_server(tiny_artifact, CLASSIFIER_API_KEY="k3y")
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_jpeg_and_png_through_the_sync_client(server: str) -> None:
    jpg, caption, _ = synthetic_samples(1)[0]
    png = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(png, format="PNG")
    with ClassifierClient(server, api_key="k3y") as c:
        assert c.ready()
        a = c.classify(jpg, caption, top_k=2, explain=True, filename="a.jpg")
        b = c.classify(png.getvalue(), caption, top_k=2, filename="a.png")
        assert a.label == b.label and len(a.predictions) == 2 and a.text_attention
        assert c.model()["name"] == "tiny"
        res = c.classify_batch([(jpg, caption), (b"nope", "")])
        assert not isinstance(res[0], ClassifierError) and res[0].label == a.label
        assert isinstance(res[1], ClassifierError) and res[1].code == "invalid_image"
    with ClassifierClient(server, api_key="wrong") as bad, pytest.raises(ClassifierError) as e:
        bad.classify(jpg, caption)
    assert e.value.status == 401 and e.value.code == "unauthorized"


def test_async_client_concurrently(server: str) -> None:
    samples = synthetic_samples(8, seed=5)

    async def go() -> list[str]:
        async with AsyncClassifierClient(server, api_key="k3y") as c:
            assert await c.ready()
            results = await asyncio.gather(*(c.classify(j, d) for j, d, _ in samples))
            return [r.label for r in results]

    labels = asyncio.run(go())
    with ClassifierClient(server, api_key="k3y") as c:
        assert labels == [c.classify(j, d).label for j, d, _ in samples]


def test_headers_have_no_server_banner(server: str) -> None:
    r = httpx.get(f"{server}/healthz")
    assert r.status_code == 200 and "server" not in r.headers and r.headers["x-request-id"]


def test_health_answers_promptly_while_inference_is_busy(server: str) -> None:
    import base64
    import threading

    big = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 40, (1500, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise + 100).save(big, format="JPEG", quality=80)  # a ~1 MB photo-sized JPEG
    item = {"image_base64": base64.b64encode(big.getvalue()).decode(), "description": "a tomato"}
    done = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server, headers={"X-API-Key": "k3y"}, timeout=120) as c:
            for _ in range(2):
                assert c.post("/classify/batch", json={"items": [item] * 16}).status_code == 200
        done.set()

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    worst = 0.0
    checks = 0
    with httpx.Client(base_url=server, timeout=5) as c:
        while not done.is_set() and checks < 200:
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            checks += 1
            time.sleep(0.02)
    for t in threads:
        t.join()
    assert checks >= 5, "the load finished before health could be probed"
    assert worst < 0.25, f"/healthz took {worst * 1000:.0f} ms under load"
