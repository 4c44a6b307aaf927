"""Dynamic batching: one bounded queue, one onnxruntime call per batch.

Every route (``/classify``, ``/classify/batch``, later protocols) submits decoded rows
here. The collector takes up to ``max_batch_size`` rows, or what arrived within
``max_delay_s`` of the first one, and runs them as one inference in a worker thread.
While that runs, the next batch gathers, so under load batches grow by themselves.

Guarantees: each caller gets exactly its own row's result (futures are paired with rows
by position, never by content); when an onnxruntime call fails, the batch is run again row
by row, so only the rows that fail on their own get ``BatchFailed``; a full queue refuses at
once (``QueueFull``); a row that waited longer than ``timeout_s`` is answered
``QueueTimeout`` without being run. A one-row request (``alone``) that finds nothing queued,
collected or running skips the queue and runs at once, as the batcher's own task: batching cannot
help it, the hand-off and the ``max_delay_s`` wait would only add to its latency (measured neutral
on 2 cores: docs/performance.md). Where ``run_lone`` is given (and ``direct``) and no backend call
runs in this worker, it first offers the row to it: ``run_lone`` answers it at once, on the event
loop (the pipeline's: while no other worker is working, on the session with every core), or
declines with None.
``stop()`` answers every row the batcher holds (queued, or in the batch being collected or run)
with ``Stopped``, and so is every row submitted after it: no caller is left waiting on a future
nobody will answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import numpy as np
from opentelemetry.trace import StatusCode

from classifier_core.text import EncodedText

from .metrics import Metrics
from .serving.base import Prediction
from .tracing import active as tracing_active
from .tracing import tracer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` rows already."""


class QueueTimeout(Exception):
    """The row waited longer than the request timeout before a batch took it."""


class BatchFailed(Exception):
    """The inference call for this row raised, even on its own; the message is safe to show."""


class Stopped(Exception):
    """The service is shutting down: the row was never run."""


@dataclass
class _Row:
    image: np.ndarray  # uint8 [S, S, 3]
    text: EncodedText
    future: asyncio.Future[Prediction]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[np.ndarray, list[EncodedText]], list[Prediction]],
        metrics: Metrics,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue: int = 256,
        timeout_s: float = 10.0,
        limiter: anyio.CapacityLimiter | None = None,
        direct: bool = True,
        run_lone: Callable[[np.ndarray, list[EncodedText]], list[Prediction] | None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.run_lone = run_lone
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.limiter = limiter or anyio.CapacityLimiter(1)
        self._queue: asyncio.Queue[_Row] | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: list[_Row] = []  # the batch being collected or run (answered by stop() if it is cut short)
        self._direct: _Row | None = None  # the lone row running without the queue (see submit)
        self._direct_done = asyncio.Event()  # clear while it runs: the collector waits for it before it batches
        self._direct_done.set()
        self._holding = False  # the collector holds a first row until the lone row is done: still a queued row
        self._direct_task: asyncio.Task[None] | None = None
        self.direct = direct
        self._stopped = False

    @property
    def depth(self) -> int:
        """Rows waiting to run (queued, or held by the collector behind a lone row)."""
        return (self._queue.qsize() if self._queue is not None else 0) + (1 if self._holding else 0)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self, reason: str = "the model version was unloaded or the service is shutting down") -> None:
        self._stopped = True  # from here on submit() refuses at once
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        held = list(self._current) + ([self._direct] if self._direct is not None else [])
        self._current = []
        while self._queue is not None and not self._queue.empty():
            held.append(self._queue.get_nowait())
        for row in held:
            if not row.future.done():
                row.future.set_exception(Stopped(reason))
        if self._direct_task is not None and not self._direct_task.done():
            # its session call runs on in its thread: the version closes only once it has returned
            await asyncio.wait([self._direct_task])

    async def submit(self, image: np.ndarray, text: EncodedText, alone: bool = False) -> Prediction:
        """The row's prediction. ``alone``: a one-row request, which may skip the queue (below); the
        rows of a larger request never do, so they batch together."""
        if self._stopped:
            raise Stopped("the model version was unloaded (replaced or stopped); send the request again")
        if self._queue is None:
            raise RuntimeError("batcher not started")
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} requests are queued; the limit is {self.max_queue}")
        idle = alone and self.direct and self._direct is None and not self._current and self._queue.empty()
        if idle and self.run_lone is not None and self.limiter.borrowed_tokens == 0:
            # nothing runs in this worker (every backend call holds the limiter): the lone row may run
            # here and now, with no task, thread hop or wake-up between it and its answer (c=1: 0.4-0.5
            # ms of 3.5, docs/performance.md). Nothing else can run on the loop meanwhile, so none of the
            # batcher's state can change under it
            answer = self._run_lone(image, text)
            if answer is not None:
                return answer
        row = _Row(image, text, asyncio.get_running_loop().create_future())
        if idle:
            # a lone request: nothing queued, collected or running, so no batch can form around it; it
            # goes straight to the session (no collector hand-off, no max_delay wait). Rows arriving
            # meanwhile are held by the collector and batch once it is done. It runs as the batcher's
            # own task, as a batch does: a caller that goes away stops waiting, not the session call,
            # and the next batch starts only when that call has returned.
            self._direct = row
            self._direct_done.clear()
            self._direct_task = asyncio.create_task(self._run_direct(row), name="batcher-direct")
            return await row.future
        self._queue.put_nowait(row)
        self.metrics.queue_depth.set(self._queue.qsize())
        return await row.future

    def _run_lone(self, image: np.ndarray, text: EncodedText) -> Prediction | None:
        assert self.run_lone is not None
        started = time.time_ns()
        try:
            preds = self.run_lone(image[None], [text])
        except Exception as exc:  # as a batch of one that fails: this row's answer, never a 500
            log.error("inference failed for a lone row: %s", type(exc).__name__, exc_info=exc)
            self._lone_span(started, exc)
            raise BatchFailed("inference failed for this row") from None
        if preds is None:  # declined: no span, the direct path's call will have one
            return None
        self._lone_span(started)
        self.metrics.queue_wait.observe(0.0)
        self.metrics.batch_size.observe(1)
        preds[0].batch_size = 1
        return preds[0]

    @staticmethod
    def _lone_span(started: int, exc: Exception | None = None) -> None:
        """The call's span, as a batch's (recorded afterwards: a declined offer leaves none)."""
        if not tracing_active():
            return
        span = tracer.start_span("onnxruntime batch", start_time=started, attributes={"batch.size": 1, "lone": True})
        if exc is not None:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR)
        span.end()

    async def _run_direct(self, row: _Row) -> None:
        try:
            await self._serve([row])
        except Exception as exc:  # as in _loop: a bug here answers this row, it does not escape as a 500
            log.error("batcher (direct): %s", type(exc).__name__, exc_info=exc)
            if not row.future.done():
                row.future.set_exception(BatchFailed("inference failed for this row"))
        finally:
            self._direct = None
            self._direct_done.set()

    async def _collect(self) -> list[_Row]:
        assert self._queue is not None
        first = await self._queue.get()
        rows = self._current = [first]
        if not self._direct_done.is_set():
            # a lone row is running: this row waits (its queue time still counts) and the batch forms
            # once the engine is free, as it would have had the lone row come through the queue
            self._holding = True
            try:
                await self._direct_done.wait()
            finally:
                self._holding = False
        deadline = time.perf_counter() + self.max_delay_s
        while len(rows) < self.max_batch_size:
            try:
                rows.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation (stop())
                # when the get completes in the same turn, and the loop would then wait for ever
                async with asyncio.timeout(remaining):
                    rows.append(await self._queue.get())
            except TimeoutError:
                break
        return rows

    async def _loop(self) -> None:
        while not self._stopped:
            rows = await self._collect()
            try:
                await self._serve(rows)
            except Exception as exc:  # a bug here must not stop batching for good (callers would wait for ever)
                log.error("batcher: %s", type(exc).__name__, exc_info=exc)
                for r in rows:
                    if not r.future.done():
                        r.future.set_exception(BatchFailed("inference failed for this row"))
            self._current = []

    async def _serve(self, rows: list[_Row]) -> None:
        now = time.perf_counter()
        live: list[_Row] = []
        for row in rows:
            if row.future.done():  # the caller went away (cancelled)
                continue
            waited = now - row.enqueued
            self.metrics.queue_wait.observe(waited)
            if waited > self.timeout_s:
                row.future.set_exception(QueueTimeout(f"the request waited {waited * 1000:.0f} ms in the queue"))
            else:
                live.append(row)
        assert self._queue is not None
        self.metrics.queue_depth.set(self._queue.qsize())
        if not live:
            return
        await self._run(live)

    async def _call(self, rows: list[_Row]) -> list[Prediction]:
        self.metrics.batch_size.observe(len(rows))
        images = np.stack([r.image for r in rows])
        texts = [r.text for r in rows]
        if not tracing_active():
            return await anyio.to_thread.run_sync(self.run_batch, images, texts, limiter=self.limiter)
        with tracer.start_as_current_span("onnxruntime batch", attributes={"batch.size": len(rows)}):
            return await anyio.to_thread.run_sync(self.run_batch, images, texts, limiter=self.limiter)

    async def _run(self, rows: list[_Row]) -> None:
        try:
            preds = await self._call(rows)
        except Exception as exc:
            log.error("inference failed for a batch of %d: %s", len(rows), type(exc).__name__, exc_info=exc)
            if len(rows) > 1:
                # row isolation: one poisoned row must not fail its neighbours (other clients'
                # requests); each row is tried on its own and only the failing ones fail
                for r in rows:
                    if not r.future.done():
                        await self._run([r])
                return
            for r in rows:
                if not r.future.done():
                    r.future.set_exception(BatchFailed("inference failed for this row"))
            return
        for r, p in zip(rows, preds, strict=True):
            p.batch_size = len(rows)
            if not r.future.done():
                r.future.set_result(p)
