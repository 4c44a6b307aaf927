"""Dynamic batching: no mix-ups under concurrency, no padding effect, clean failure and overload."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import synthetic_samples

from service.artifact import load_manifest
from service.batcher import Batcher, BatchFailed, QueueFull, QueueTimeout
from service.metrics import Metrics
from service.predictor import Prediction, Predictor
from service.preprocessing import TextEncoder, load_image
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def batching_server(tiny_artifact: Path) -> Iterator[str]:
    from test_e2e import free_port

    port = free_port()
    env = {**os.environ, "CLASSIFIER_MODEL_DIR": str(tiny_artifact), "CLASSIFIER_PROVIDER": "cpu",
           "CLASSIFIER_LOG_LEVEL": "warning", "CLASSIFIER_MAX_BATCH_DELAY_MS": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_200_concurrent_requests_each_get_their_own_answer(batching_server: str, tiny_artifact: Path) -> None:
    m = load_manifest(tiny_artifact)
    text = TextEncoder.from_file(tiny_artifact / "tokenizer.json", m.max_len)
    sess = ort.InferenceSession(str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    samples = synthetic_samples(200, seed=77)
    lengths = {len(text.encode(c).ids) for _, c, _ in samples}
    assert len(lengths) >= 5  # captions of many different lengths share batches
    expected = []
    for jpg, cap, _ in samples:  # single-request answers, batch 1, no padding
        probs = sess.run(["probabilities"], {"image": load_image(jpg, m.image_size)[None],
                                             "input_ids": text.pad([text.encode(cap)])})[0][0]
        expected.append(probs)

    async def fire() -> list[dict]:
        async with httpx.AsyncClient(base_url=batching_server, timeout=60,
                                     limits=httpx.Limits(max_connections=200)) as c:
            rs = await asyncio.gather(*(c.post("/classify", params={"top_k": 8},
                                               files={"image": ("x.jpg", jpg, "image/jpeg")}, data={"description": cap})
                                        for jpg, cap, _ in samples))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:3]
            return [r.json() for r in rs]

    answers = asyncio.run(fire())
    for body, probs in zip(answers, expected):
        got = {p["label"]: p["score"] for p in body["predictions"]}
        assert max(abs(got[lab] - float(probs[i])) for i, lab in enumerate(m.labels)) < 1e-5
        assert body["label"] == m.labels[int(np.argmax(probs))]
    metrics = httpx.get(f"{batching_server}/metrics").text
    count = float(re.search(r"^classifier_batch_size_count (\S+)", metrics, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^classifier_batch_size_sum (\S+)", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert total >= 200 and count < total, "requests were not batched together"
    assert "classifier_queue_wait_seconds_bucket" in metrics and "classifier_queue_depth" in metrics


@pytest.fixture(scope="module")
def predictor(tiny_artifact: Path) -> Predictor:
    p = Predictor(Settings(model_dir=tiny_artifact, provider="cpu"))  # type: ignore[call-arg]
    p.load()
    return p


def _run_real(p: Predictor):  # type: ignore[no-untyped-def]
    def run(images: np.ndarray, descriptions: list[str]) -> list[Prediction]:
        return p.predict(images, p.encode(descriptions))
    return run


def test_a_failing_batch_fails_only_its_callers(predictor: Predictor) -> None:
    calls = {"n": 0}
    real = _run_real(predictor)

    def flaky(images: np.ndarray, descriptions: list[str]) -> list[Prediction]:
        calls["n"] += 1
        if "boom" in descriptions:
            raise RuntimeError("device lost")
        return real(images, descriptions)

    async def go() -> None:
        b = Batcher(flaky, Metrics(), max_batch_size=4, max_delay_s=0.05)
        await b.start()
        img = np.zeros((32, 32, 3), np.uint8)
        first = await asyncio.gather(b.submit(img, "boom"), b.submit(img, "tomato"), return_exceptions=True)
        assert all(isinstance(x, BatchFailed) for x in first)  # same batch
        after = await b.submit(img, "tomato")  # the batcher goes on
        assert isinstance(after, Prediction) and after.probabilities.shape == (8,)
        await b.stop()

    asyncio.run(go())
    assert calls["n"] == 2


def test_full_queue_and_queue_timeout(predictor: Predictor) -> None:
    real = _run_real(predictor)

    def slow(images: np.ndarray, descriptions: list[str]) -> list[Prediction]:
        time.sleep(0.3)
        return real(images, descriptions)

    async def go() -> None:
        b = Batcher(slow, Metrics(), max_batch_size=1, max_delay_s=0.0, max_queue=2, timeout_s=0.2)
        await b.start()
        img = np.zeros((32, 32, 3), np.uint8)
        tasks = [asyncio.create_task(b.submit(img, "r0"))]
        await asyncio.sleep(0.05)  # the first is running
        tasks += [asyncio.create_task(b.submit(img, f"r{i}")) for i in (1, 2)]
        await asyncio.sleep(0.02)  # two wait
        with pytest.raises(QueueFull):
            await b.submit(img, "one too many")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], Prediction)
        assert isinstance(results[1], QueueTimeout) and isinstance(results[2], QueueTimeout)
        await b.stop()

    asyncio.run(go())


def test_gpu_shape_buckets_give_the_same_answers(tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path pads batches to power-of-two buckets and captions to max_len; exercised here on CPU."""
    p = Predictor(Settings(model_dir=tiny_artifact, provider="cpu", max_batch_size=8))  # type: ignore[call-arg]
    p.load()
    samples = synthetic_samples(11, seed=9)
    assert p.manifest is not None
    images = np.stack([load_image(j, p.manifest.image_size) for j, _, _ in samples])
    encoded = p.encode([c for _, c, _ in samples])
    exact = p.predict(images, encoded)
    monkeypatch.setattr(Predictor, "fixed_shapes", property(lambda self: True))
    assert p.batch_buckets() == [1, 2, 4, 8]
    seen: list[tuple[int, ...]] = []
    real_run = p.session.run  # type: ignore[union-attr]
    p.session = type("Spy", (), {"run": lambda self, out, feed: (seen.append(feed["input_ids"].shape), real_run(out, feed))[1]})()
    bucketed = p.predict(images, encoded)
    assert seen == [(8, 12), (4, 12)]  # 11 rows: a full batch of 8, then 3 rows padded to 4; captions to max_len
    for a, b in zip(exact, bucketed):
        assert np.allclose(a.probabilities, b.probabilities, atol=1e-6)
        assert np.allclose(a.attention, b.attention, atol=1e-6) and a.tokens == b.tokens
