"""Dynamic batching: no mix-ups under concurrency, no padding effect, clean failure and overload."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from helpers import best_guess, calibrated, running_server, synthetic_samples

from classifier_core.artifact import load_manifest
from classifier_core.images import load_image
from classifier_core.text import EncodedText, TextEncoder
from service.batcher import Batcher, BatchFailed, QueueFull, QueueTimeout, Stopped
from service.metrics import Metrics
from service.serving.base import Prediction
from service.serving.session import Predictor
from service.settings import Settings


@pytest.fixture(scope="module")
def batching_server(tiny_artifact: Path) -> Iterator[str]:
    with running_server(tiny_artifact, CLASSIFIER_MAX_BATCH_DELAY_MS="5") as (_, url):
        yield url


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
        expected.append(calibrated(probs, tiny_artifact))

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
        assert best_guess(body) == m.labels[int(np.argmax(probs))]
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
    def run(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction]:
        return p.predict(images, texts)
    return run


POISON = EncodedText([1], ["poison"])  # a row the (simulated) engine fails on


def test_a_failing_row_fails_alone_and_rows_queued_behind_are_served(predictor: Predictor) -> None:
    calls: list[int] = []
    real = _run_real(predictor)
    tomato = predictor.encode(["tomato"])[0]
    img = np.full((32, 32, 3), 90, np.uint8)
    alone = real(img[None], [tomato])[0]

    def flaky(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction]:
        calls.append(len(texts))
        time.sleep(0.2)  # slow, so the innocent request queues behind the failing batch
        if any(t is POISON for t in texts):
            raise RuntimeError("device lost")
        return real(images, texts)

    async def go() -> None:
        b = Batcher(flaky, Metrics(), max_batch_size=2, max_delay_s=0.05, direct=False)  # the two rows batch together
        await b.start()
        first = [asyncio.create_task(b.submit(img, POISON)), asyncio.create_task(b.submit(img, tomato))]
        await asyncio.sleep(0.1)  # both in the first batch, which is running
        innocent = asyncio.create_task(b.submit(img, tomato))
        results = await asyncio.gather(*first, innocent, return_exceptions=True)
        assert isinstance(results[0], BatchFailed)
        for r in results[1:]:  # its batch neighbour and the row queued behind both get answers
            assert isinstance(r, Prediction)
            assert np.allclose(r.probabilities, alone.probabilities, atol=1e-6)
        after = await b.submit(img, tomato)  # the batcher goes on
        assert isinstance(after, Prediction)
        await b.stop()

    asyncio.run(go())
    # the batch of 2 failed, was retried row by row (1 fails, 1 succeeds), then the innocent row, then one more
    assert calls == [2, 1, 1, 1, 1]


def test_a_lone_row_skips_the_queue_and_rows_behind_it_batch(predictor: Predictor) -> None:
    """A one-row request that finds nothing queued or running goes straight to the engine (it would
    otherwise wait max_delay_s for company, 1 s here); rows arriving meanwhile wait for it and then
    batch; the rows of one larger request never split; a caller that goes away while its lone row
    runs does not let the next batch start before that call has returned."""
    calls: list[int] = []
    running: list[int] = [0, 0]  # now, most at once
    real, text = _run_real(predictor), predictor.encode(["tomato"])[0]

    def run(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction]:
        calls.append(len(texts))
        running[0] += 1
        running[1] = max(running)
        time.sleep(0.3)
        running[0] -= 1
        return real(images, texts)

    async def go() -> None:
        b = Batcher(run, Metrics(), max_batch_size=8, max_delay_s=1.0, max_queue=2)
        await b.start()
        img = np.zeros((32, 32, 3), np.uint8)
        t0 = time.perf_counter()
        lone = asyncio.create_task(b.submit(img, text, alone=True))
        await asyncio.sleep(0.05)
        behind = [asyncio.create_task(b.submit(img, text, alone=True)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):  # the row the collector holds behind the lone one still counts
            await b.submit(img, text)
        assert isinstance(await lone, Prediction)
        assert time.perf_counter() - t0 < 0.9, "the lone row waited for company"
        assert all(isinstance(r, Prediction) for r in await asyncio.gather(*behind))
        # one request of three rows: none of them is alone, they run as one batch
        b.max_queue = 8  # (three rows queue in one turn of the loop, before the collector wakes)
        assert all(isinstance(r, Prediction) for r in await asyncio.gather(*(b.submit(img, text) for _ in range(3))))
        # a lone row whose caller goes away: the next rows wait for its session call all the same
        gone = asyncio.create_task(b.submit(img, text, alone=True))
        await asyncio.sleep(0.05)
        gone.cancel()
        after = asyncio.create_task(b.submit(img, text, alone=True))
        assert isinstance(await after, Prediction)
        await b.stop()

    asyncio.run(go())
    assert calls == [1, 2, 3, 1, 1] and running[1] == 1, (calls, running)


def _slow_run(predictor: Predictor, seconds: float = 0.3) -> Callable[[np.ndarray, list[EncodedText]], list[Prediction]]:
    """The real model, ``seconds`` slower per batch: time for the test to queue rows behind it."""
    real = _run_real(predictor)

    def slow(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction]:
        time.sleep(seconds)
        return real(images, texts)

    return slow


def test_full_queue_and_queue_timeout(predictor: Predictor) -> None:
    slow, text = _slow_run(predictor), predictor.encode(["tomato"])[0]

    async def go() -> None:
        b = Batcher(slow, Metrics(), max_batch_size=1, max_delay_s=0.0, max_queue=2, timeout_s=0.2)
        await b.start()
        img = np.zeros((32, 32, 3), np.uint8)
        tasks = [asyncio.create_task(b.submit(img, text))]
        await asyncio.sleep(0.05)  # the first is running
        tasks += [asyncio.create_task(b.submit(img, text)) for _ in (1, 2)]
        await asyncio.sleep(0.02)  # two wait
        with pytest.raises(QueueFull):
            await b.submit(img, text)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], Prediction)
        assert isinstance(results[1], QueueTimeout) and isinstance(results[2], QueueTimeout)
        await b.stop()

    asyncio.run(go())


def test_stop_answers_every_row_it_holds_and_every_later_one(predictor: Predictor) -> None:
    """A retired version's batcher: the row in the running batch, the rows queued behind it and rows
    submitted afterwards all get ``Stopped`` (503 not_ready), none waits for ever."""
    slow, text = _slow_run(predictor), predictor.encode(["tomato"])[0]

    async def go() -> None:
        b = Batcher(slow, Metrics(), max_batch_size=1, max_delay_s=0.0, max_queue=8, timeout_s=10)
        await b.start()
        img = np.zeros((32, 32, 3), np.uint8)
        running = asyncio.create_task(b.submit(img, text))
        await asyncio.sleep(0.05)  # in the running batch
        queued = [asyncio.create_task(b.submit(img, text)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await b.stop()
        results = await asyncio.wait_for(asyncio.gather(running, *queued, return_exceptions=True), 2)
        assert all(isinstance(r, Stopped) for r in results), results
        with pytest.raises(Stopped):
            await asyncio.wait_for(b.submit(img, text), 1)

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


def test_a_lone_row_is_offered_to_run_lone_first_and_only_when_nothing_runs(predictor: Predictor) -> None:
    """``run_lone`` answers a lone row on the event loop, or declines (None) and the row takes the
    direct path; it is not offered a row while a backend call holds the worker's limiter; when it
    raises, that row alone gets BatchFailed."""
    real, text = _run_real(predictor), predictor.encode(["tomato"])[0]
    img = np.full((32, 32, 3), 40, np.uint8)
    expected = real(img[None], [text])[0]
    offered: list[int] = []
    batches: list[int] = []
    mode = ["accept"]

    def lone(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction] | None:
        offered.append(len(texts))
        if mode[0] == "raise":
            raise RuntimeError("device lost")
        return real(images, texts) if mode[0] == "accept" else None

    def run(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction]:
        batches.append(len(texts))
        return real(images, texts)

    async def go() -> None:
        metrics = Metrics()
        b = Batcher(run, metrics, max_batch_size=8, max_delay_s=0.01, run_lone=lone)
        await b.start()
        got = await b.submit(img, text, alone=True)
        assert np.allclose(got.probabilities, expected.probabilities, atol=1e-6) and got.batch_size == 1
        assert (offered, batches) == ([1], [])  # answered on the loop: no batch ran
        # counted as a batch of one that waited for nothing, as the direct path would count it
        assert metrics.registry.get_sample_value("classifier_batch_size_count") == 1
        assert metrics.registry.get_sample_value("classifier_queue_wait_seconds_count") == 1
        mode[0] = "decline"
        assert isinstance(await b.submit(img, text, alone=True), Prediction)
        assert (offered, batches) == ([1, 1], [1])  # declined: the direct path ran it
        async with b.limiter:  # another model's call holds the worker: not offered, it waits its turn
            waiting = asyncio.create_task(b.submit(img, text, alone=True))
            await asyncio.sleep(0.05)
            assert not waiting.done() and offered == [1, 1]
        assert isinstance(await waiting, Prediction)
        mode[0] = "raise"
        with pytest.raises(BatchFailed):
            await b.submit(img, text, alone=True)
        mode[0] = "accept"
        assert isinstance(await b.submit(img, text, alone=True), Prediction)  # the batcher goes on
        await b.stop()

    asyncio.run(go())
