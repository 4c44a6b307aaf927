"""The request pipeline every protocol goes through: rows in, one answer per row out.

::

    adapter (/classify, /classify/batch, /v2, gRPC) wire format -> list[Row]
      -> Pipeline.lease                            which model version (404 / 503 before any read), held to the answer
      -> Pipeline.run                              row count within limits?
           -> admission                            one budget, counted in rows, for every route
           -> per row: validate                    size, description text and length
           -> prepare (decode + tokenize)          a decode thread, or inline for small JPEGs
           -> that version's Batcher               dynamic batches, one backend call each
      <- list[Prediction | RowError]               a typed error fails only its own row
    adapter renders the answers in its wire shape

Request-level refusals (not ready, too many rows, overload) raise :class:`ServiceError`;
anything that goes wrong with one row becomes that row's :class:`RowError`, so one bad row
never fails the rows beside it, whoever sent them. Admission comes after the adapter has
read and parsed the body: a client that has not sent its data holds no share of the budget.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np

from classifier_core.images import ImageError, is_progressive_jpeg, load_image
from classifier_core.text import EncodedText

from .batcher import Batcher, BatchFailed, QueueFull, QueueTimeout, Stopped
from .codes import InvalidField, Overloaded, ServiceError
from .metrics import Metrics
from .serving.base import Backend, BatchBackend, ModelInfo, Prediction, RowSink, WorkerContext
from .serving.board import Siblings
from .serving.repository import Candidate, Loaded, Repository
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One image with its caption, as an adapter read it off the wire.

    ``image`` is the encoded file; with ``base64=True`` it is still base64 text (decoded in the
    decode thread, not on the event loop). ``description`` may be raw bytes (decoded as strict
    UTF-8 here, so every protocol refuses bad text the same way).
    """

    image: bytes | str
    description: str | bytes = ""
    base64: bool = False


@dataclass(frozen=True)
class RowError:
    """Why one row got no prediction: an error code from ``codes.TABLE``."""

    code: str
    message: str

    def exception(self, where: str = "") -> ServiceError:
        return ServiceError(f"{where}{self.message}", code=self.code)


Answer = Prediction | RowError


def _forget_frames(exc: BaseException | None) -> None:
    """Cut an answered error's tracebacks. A decode error is raised in a decode thread inside an
    ``except`` block and travels back through a future its frames refer to: a reference cycle that
    keeps the frames, and the row's image bytes in them, until the next full garbage collection (seen:
    +12 MB kept per refused 3.9 MB upload, +130 MB before a collection came). Without the tracebacks
    the frames go at once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


@dataclass
class Prepared:
    image: np.ndarray  # uint8 [S, S, 3]
    text: EncodedText


class Admission:
    """Rows admitted and not yet answered (decoding, queued or in a batch), bounded.

    Counted from admission, not from the batcher's queue: when decoding is the bottleneck,
    work piles up before the queue, and the excess is refused at once.
    """

    def __init__(self, limit: int, siblings: Siblings | None = None) -> None:
        self.limit = limit
        self.count = 0  # touched only on the event loop
        self.siblings = siblings or Siblings()  # the other workers read this count (serving/board.py)

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        if self.count + n > self.limit:
            raise Overloaded(f"{self.count} rows are in progress; {n} more would pass the limit of {self.limit}")
        self.count += n
        self.siblings.set(self.count)
        try:
            yield
        finally:
            self.count -= n
            self.siblings.set(self.count)


class Pipeline:
    """Validate -> admit -> decode + tokenize -> batch -> answer, for rows from any protocol.

    ``context``: the worker's topology (the owner's address, the repository's control folder);
    ``preloaded``: backends already loaded, by artifact folder (``python -m service`` checks the
    model before it binds the port, and serves that same session)."""

    def __init__(self, settings: Settings, metrics: Metrics, context: WorkerContext | None = None,
                 preloaded: dict[Path, Backend] | None = None) -> None:
        settings = settings.resolved(processes=1)  # resolved already under python -m service
        self.settings = settings
        self.context = context or WorkerContext()
        self.metrics = metrics
        self.preloaded = {p.resolve(): b for p, b in (preloaded or {}).items()}
        self.draining = False  # set on SIGTERM: readiness answers 503 from then on
        self.decode_threads = settings.decode_threads
        # a plain executor: cheaper per row than anyio's thread hop, and its size bounds the decodes
        self.decoder = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.inline_decode_bytes = settings.inline_decode_bytes
        self.siblings = Siblings(self.context.board, self.context.slot)
        self.admission = Admission(settings.max_queue, self.siblings)
        self.overrunning = 0  # decode threads past their time budget, still running
        self._overrun_lock = threading.Lock()
        # one backend call at a time in this worker, whichever model: each already uses intra_op_threads cores
        self.limiter = anyio.CapacityLimiter(1)
        self.repository = Repository(settings, metrics, self.context, self._backend, self._sink)

    def _backend(self, c: Candidate) -> Backend:
        """The engine for one version folder: in this process, or the owner process's (the owner topology)."""
        if c.directory.resolve() in self.preloaded:
            return self.preloaded.pop(c.directory.resolve())
        # a repository serves its folder names; a single --model-dir the manifest's name and version
        name, version = (c.name, c.version) if self.settings.model_repository is not None else (None, None)
        if self.context.owner_address:
            from .serving.owner_client import RemotePredictor

            return RemotePredictor(self.settings, self.context.owner_address, c.directory, name, version)
        from .serving.session import Predictor

        # a lone session only where the other workers' load can be seen (python -m service's board)
        return Predictor(self.settings, c.directory, name, version, lone=self.context.board is not None)

    def _sink(self, backend: Backend, info: ModelInfo) -> RowSink:
        """A batcher before a session; the owner client takes rows as they come (the owner batches them)."""
        if hasattr(backend, "submit"):
            return cast(RowSink, backend)
        engine = cast(BatchBackend, backend)
        latency = self.metrics.inference_latency.labels(info.name, info.version)

        def infer(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction]:
            with latency.time():
                return engine.predict(images, texts)

        def infer_lone(images: np.ndarray, texts: list[EncodedText]) -> list[Prediction] | None:
            # a lone request (the only row in this worker, none still decoding, and no other worker
            # working) runs on the event loop, for a model whose call is short (the loop waits for
            # it), with every core (the lone session, where there is one). The other workers' load
            # matters twice: their cores are idle, and under load rows must meet in batches, which
            # a loop busy with one row at a time would never let them do
            if self.admission.count != 1 or not self.siblings.idle():
                return None
            with latency.time():
                return engine.predict(images, texts, lone=True)

        s = self.settings
        return Batcher(infer, self.metrics, s.max_batch_size, s.max_batch_delay_ms / 1000, s.max_queue,
                       s.request_timeout_ms / 1000, self.limiter,
                       # only a model timed short at load, in a worker that sees the others (Predictor.lone)
                       run_lone=infer_lone if engine.lone_seconds is not None else None)

    # --- lifecycle -------------------------------------------------------------------
    async def start(self, load_model: bool = True) -> None:
        if load_model:
            await self.repository.start()

    async def stop(self) -> None:
        await self.repository.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # --- request-level checks --------------------------------------------------------

    def model(self, name: str | None = None, version: str | None = None) -> Loaded:
        """The version that would serve a request (the default model's default version unless named);
        holds nothing: a request takes ``lease`` instead."""
        return self.repository.resolve(name, version)

    @contextmanager
    def lease(self, name: str | None = None, version: str | None = None) -> Iterator[Loaded]:
        """The version that serves this request, held from resolution to the answer (body, parse,
        decode, batch, encoding): a swap or unload retires it only once every lease is back, or
        after the longest a request may take (``Repository.retire_wait_s``), when its row sink answers
        what is left with 503 not_ready. Every protocol takes its model here."""
        loaded = self.repository.resolve(name, version)
        loaded.inflight += 1
        try:
            yield loaded
        finally:
            self.repository.release(loaded)

    def min_confidence(self, override: float | None = None) -> float:
        """The request's own abstention threshold, or the service's."""
        return self.settings.min_confidence if override is None else override

    @staticmethod
    def check_top_k(top_k: int, model: ModelInfo) -> None:
        n = len(model.labels)
        if not 1 <= top_k <= n:
            raise InvalidField(f"top_k must be between 1 and {n} (the number of labels), got {top_k}", code="validation_error")

    def refuse_if_full(self) -> None:
        """Before a body is read: when the budget is already spent, refuse at once (503 costs no
        read, parse or decode). Holds nothing: admission proper comes in ``run``, once the rows are here."""
        if self.admission.count >= self.admission.limit:
            raise Overloaded(f"{self.admission.count} rows are in progress; the limit is {self.admission.limit}")

    def check_row_count(self, n: int, what: str = "the request") -> None:
        """Before any row is decoded: every protocol has the same bounds on rows per request."""
        if n < 1:
            raise InvalidField(f"{what} has no rows (send at least one image)", code="validation_error")
        if n > self.settings.max_batch_items:
            raise InvalidField(f"{what} has {n} rows; the limit is {self.settings.max_batch_items}", code="too_many_items")

    # --- the pipeline ----------------------------------------------------------------
    async def run(self, model: Loaded, rows: Sequence[Row], state: Any = None) -> list[Answer]:
        """One answer per row, in order, from ``model`` (resolved by the adapter, before it read the body).
        ``state`` (the request's) gets ``rows``, ``batch_size`` and the model for the access log,
        the same fields whichever protocol called."""
        self.check_row_count(len(rows))
        # the request's time budget: a row still waiting for a decode thread when it runs out gets 504,
        # so a batch of slow images costs at most this much of the decode pool, not a minute of it
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_ms / 1000
        with self.admission.admit(len(rows)):
            model.inflight += 1  # the adapter's lease holds it already; this one covers a direct caller
            try:
                # one row (the common case) skips gather's task per row
                answers = ([await self._row(model, rows[0], deadline, alone=True)] if len(rows) == 1
                           else list(await asyncio.gather(*(self._row(model, r, deadline) for r in rows))))
            finally:
                self.repository.release(model)
        info = model.info
        for a in answers:
            self.metrics.rows.labels(info.name, info.version, "ok" if isinstance(a, Prediction) else a.code).inc()
        if state is not None:
            state.model, state.model_version = info.name, info.version
            state.rows = len(rows)
            sizes = [a.batch_size for a in answers if isinstance(a, Prediction)]
            state.batch_size = max(sizes) if sizes else None
        return answers

    async def _row(self, model: Loaded, row: Row, deadline: float, alone: bool = False) -> Answer:
        try:
            description = self._validate(row)
            prepared = await self._prepare(model.info, row, description, deadline)
            return await self._submit(model.sink, prepared, alone)
        except ServiceError as f:  # the one conversion: a code raised anywhere for this row becomes its answer
            _forget_frames(f)
            return RowError(f.code, f.message)
        except Exception as exc:  # a bug must cost one row, never its neighbours or the worker
            log.error("row failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
            _forget_frames(exc)
            return RowError("internal_error", "internal error; see the service log with this request id")

    def _validate(self, row: Row) -> str:
        s = self.settings
        size = len(row.image)
        if row.base64:
            size = len(row.image) * 3 // 4  # decoded size, known before decoding
        if size > s.max_upload_bytes:
            raise ServiceError(f"the image is {size} bytes; the limit is {s.max_upload_bytes}", code="payload_too_large")
        raw = row.description
        if isinstance(raw, bytes):
            # UTF-8, or Latin-1 where it is not valid UTF-8: what the multipart parser does with a
            # text field, so /classify and /v2's binary tensors read the same bytes the same way
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
        else:
            text = raw
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON can carry lone surrogates ("\ud800"): not text
                raise ServiceError("the description is not valid Unicode text (a lone surrogate)", code="invalid_description") from None
        if len(text) > s.max_description_chars:
            raise ServiceError(f"the description has {len(text)} characters; the limit is {s.max_description_chars}",
                               code="description_too_long")
        return text

    def _prepare_sync(self, model: ModelInfo, row: Row, description: str) -> Prepared:
        """Decode and tokenize (in a decode thread, or inline): LitServe's ``decode_request``."""
        data = row.image
        if row.base64:
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ServiceError("the image is not valid base64", code="bad_base64") from None
            if len(data) > self.settings.max_upload_bytes:
                raise ServiceError(f"the image is {len(data)} bytes; the limit is {self.settings.max_upload_bytes}",
                                   code="payload_too_large")
        assert isinstance(data, bytes)
        try:
            image = load_image(data, model.image_size, self.settings.max_image_pixels)
        except ImageError as err:
            self.metrics.images_decoded.labels("error").inc()
            raise ServiceError(str(err), code=err.code) from None
        self.metrics.images_decoded.labels("ok").inc()
        try:
            encoded = model.text.encode(description)
        except Exception as exc:
            raise ServiceError(f"the description could not be tokenized ({type(exc).__name__})", code="invalid_description") from None
        return Prepared(image, encoded)

    async def _prepare(self, model: ModelInfo, row: Row, description: str, deadline: float) -> Prepared:
        image = row.image
        if (not row.base64 and isinstance(image, bytes) and len(image) <= self.inline_decode_bytes
                and image[:2] == b"\xff\xd8" and not is_progressive_jpeg(image)):
            return self._prepare_sync(model, row, description)  # a small baseline JPEG: cheaper than a thread hop
        if self.overrunning >= self.decode_threads:
            raise ServiceError(f"{self.overrunning} image decodes are past their time budget and still running", code="overloaded")
        # past the budget the row is answered at once; its thread runs on (Pillow cannot be
        # interrupted) and holds its executor slot until it ends, so overruns cannot pile up
        loop = asyncio.get_running_loop()
        state = {"started": False, "done": False, "expired": False, "counted": False, "queued_out": False}
        budget = self.settings.decode_timeout_s
        timer: list[asyncio.TimerHandle] = []

        def queued_too_long() -> None:
            with self._overrun_lock:
                if state["started"]:
                    return
                state["expired"] = state["queued_out"] = True  # skipped when a thread gets to it
            fut.cancel()

        def expire() -> None:
            with self._overrun_lock:
                if state["done"]:
                    return
                state["expired"] = state["counted"] = True
                self.overrunning += 1
            fut.cancel()

        def work() -> Prepared | None:
            with self._overrun_lock:
                if state["expired"]:
                    return None  # its request went away while it was queued
                state["started"] = True
            # the decode's own budget starts now; the wait for a thread counts against the request's
            loop.call_soon_threadsafe(lambda: timer.append(loop.call_later(budget, expire)))
            try:
                return self._prepare_sync(model, row, description)
            finally:
                with self._overrun_lock:
                    state["done"] = True
                    if state["counted"]:
                        self.overrunning -= 1

        fut = loop.run_in_executor(self.decoder, work)
        timer.append(loop.call_at(deadline, queued_too_long))
        try:
            prepared = await fut
            assert prepared is not None
            return prepared
        except asyncio.CancelledError:
            if not state["expired"]:
                with self._overrun_lock:
                    state["expired"] = True  # cancelled from outside: a queued decode is skipped
                raise
            if state["queued_out"]:
                raise ServiceError("the image waited for a decode thread past the request's time budget of "
                                   f"{self.settings.request_timeout_ms:g} ms", code="timeout") from None
            log.warning("an image decode passed its budget of %.1f s (%d still running)", budget, self.overrunning)
            raise ServiceError(f"decoding the image took longer than its budget of {budget:g} s", code="image_too_complex") from None
        finally:
            for t in timer:
                t.cancel()

    @staticmethod
    async def _submit(sink: RowSink, prepared: Prepared, alone: bool = False) -> Prediction:
        try:
            return await sink.submit(prepared.image, prepared.text, alone)
        except QueueFull as exc:
            raise ServiceError(str(exc), code="overloaded") from None
        except QueueTimeout as exc:
            raise ServiceError(str(exc), code="timeout") from None
        except Stopped as exc:
            raise ServiceError(str(exc), code="not_ready") from None
        except BatchFailed as exc:
            raise ServiceError(str(exc), code="inference_failed") from None
