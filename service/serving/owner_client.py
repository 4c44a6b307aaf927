"""The owner topology, the worker's side: ``RemotePredictor`` stands where a model's batcher stands.

The topology (``owner_server.py`` has the owner's side; ``wire.py`` the transport both speak: the
shared-memory slab, the message layout, the heartbeat):

Workers do what they do in the per-worker topology (parse, validate, admit, decode, tokenize)
but do not batch: ``RemotePredictor`` stands where a model's batcher stands, writes each row's
pixels into a free slot of a shared-memory slab (a file on ``/dev/shm`` that the worker and the
owner both map) and sends only the slot numbers and the token ids over a Unix socket (the rows
of one turn of its event loop in one message), several messages in flight. The owner merges what
every worker sent meanwhile into one onnxruntime call (one CUDA
context on a GPU, large batches): rows are batched once on their way to the model, and each row is
answered alone (its probabilities, attention and the size of the batch it ran in).

Guarantees kept from the per-worker pipeline: row isolation (a merged call that fails is run
again row by row, so only a failing row fails); a worker
never waits for ever (the owner's answer has the request timeout); a dead owner turns into 503
``not_ready`` for the rows in flight and readiness false until the supervisor has restarted it
and the worker has reconnected; on SIGTERM the workers drain first, then the owner stops.

Degrading cleanly: a slab is allocated with ``posix_fallocate`` when it is made, so a full
/dev/shm is a refused connection (the worker is not ready, requests get 503), never a SIGBUS on
first write. The owner writes a heartbeat (its monotonic clock, every 0.1 s) into a small file
beside its socket; a worker whose owner's heartbeat is over ``HEARTBEAT_TIMEOUT_S`` old (a stopped or wedged
owner) reports not ready and refuses rows at once. Each owner listens on a socket of its own
and publishes it by replacing the ``owner_address`` symlink, so on SIGHUP the new owner is
serving before the old one stops; a worker whose connection ends under a request sends it again,
once, over a fresh connection, and no request fails during the switch.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import numpy as np

from classifier_core.artifact import load_manifest
from classifier_core.text import EncodedText, TextEncoder

from ..batcher import BatchFailed, QueueTimeout, Stopped
from ..settings import Settings
from . import wire
from .base import ModelInfo, Prediction, predictions
from .wire import BEAT, HEAD, HEARTBEAT_TIMEOUT_S, allocate_slab, manifest_digest, shm_dir

log = logging.getLogger(__name__)



class _ConnectionLost(Exception):
    """The owner closed the connection under a request (it stopped): worth one try on a fresh one."""


Row = tuple[asyncio.Future[Prediction], int, EncodedText]  # (its caller's future, its slab slot, its tokens)


@dataclass(eq=False)
class _Link:
    """One connection to the owner and everything that lives and dies with it: its socket, slab,
    the owner's heartbeat, the free slots, the rows written but not sent yet and the rows in flight.
    A reconnect makes a new one; nothing of an old one is reused, so an old connection's late
    answers or losses can only touch its own rows (``closed`` once it has been dropped)."""

    conn: Connection
    slab: mmap.mmap
    beat: mmap.mmap  # the owner's heartbeat, read-only
    free: list[int]  # free slab slots
    pending: dict[int, list[Row]] = field(default_factory=dict)  # request id -> its rows, sent, not answered
    outbox: list[Row] = field(default_factory=list)  # rows of this loop turn, sent together at its end
    flush_due: bool = False
    closed: bool = False


# --- the worker's side ---------------------------------------------------------------


class RemotePredictor:
    """Stands where ``Predictor`` and its batcher stand in a worker; the session lives in the owner process.

    Rows are not batched here: each row is written into a free slot of the connection's slab and sent
    at the end of the event loop's turn (the rows submitted in one turn share a message: framing, with
    no size or delay to wait for), several messages in flight, so the owner's batch loop is the only
    batching on the way to the model. A reader thread per connection hands each answer back to the
    event loop by request id. A background thread (re)connects whenever there is no connection;
    ``ready`` never blocks. Each connection gets a fresh slab file, unlinked as soon as both sides have
    mapped it, so a killed worker or owner leaves nothing in /dev/shm.
    """

    HANDSHAKE_TIMEOUT_S = 120.0  # the owner loads a model it does not hold yet before it answers
    CONNECT_WAIT_S = 5.0  # at start, for the first connection
    RESEND_WAIT_S = 1.0  # after the owner closed under a row: how long a resend may wait for the next owner

    def __init__(self, settings: Settings, address: str, model_dir: Path | None = None, name: str | None = None,
                 version: str | None = None) -> None:
        self.settings = settings
        self.address = address
        self.model_dir = Path(model_dir or settings.model_dir).resolve()
        self.name, self.version = name, version
        # rows in flight to the owner per connection (their pixels wait in the slab until answered)
        self.slots = max(1, min(settings.max_queue, settings.owner_max_batch))
        self.manifest: Any = None
        self.text: TextEncoder | None = None
        self.providers: list[str] = []
        self.error: str | None = None
        self.digest = ""
        self._link: _Link | None = None  # the current connection (None: none; the reconnect thread makes one)
        self._next_id = 0
        self._lock = threading.Lock()  # the links' state (loop, reader, reconnect threads)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slot_freed: asyncio.Event | None = None
        self._loaded = False
        self._stopped = False  # stop(): every row held is answered, every later one refused
        self._closed = threading.Event()
        self._mismatch_logged = False
        self._shm_logged = False

    # --- the Backend interface ---------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._loaded and self._link is not None and self._beating()

    @property
    def state(self) -> str:
        if not self._loaded:
            return "loading"
        if self._link is None:
            return "owner_unavailable"
        return "ready" if self._beating() else "owner_not_answering"

    def _beating(self) -> bool:
        """The owner's heartbeat is fresh: it runs (a SIGSTOPped or wedged owner keeps its sockets open)."""
        link = self._link
        if link is None:
            return False
        beat = link.beat
        try:
            (at,) = BEAT.unpack_from(beat)
        except (ValueError, struct.error):
            return False
        return time.monotonic() - at < HEARTBEAT_TIMEOUT_S

    def load(self) -> ModelInfo:
        """The artifact's manifest and tokenizer (validation and tokenizing stay in the worker).

        The worker starts even while the owner is (re)starting: it is not ready until connected. It
        waits for a first connection a few seconds (``CONNECT_WAIT_S``), so that a worker that starts
        listening (a SIGHUP replacement, say) is normally connected and ready by then.
        """
        t0 = time.perf_counter()
        model_dir = self.model_dir
        self.manifest = load_manifest(model_dir)
        self.text = TextEncoder.from_file(model_dir / self.manifest.tokenizer_file, self.manifest.max_len)
        self.digest = manifest_digest(model_dir)
        self._loaded = True
        deadline = time.monotonic() + self.CONNECT_WAIT_S
        while not self._connect() and time.monotonic() < deadline:
            time.sleep(0.1)
        threading.Thread(target=self._reconnect_loop, daemon=True, name="owner-reconnect").start()
        m = self.manifest
        # the session's memory is the owner's (docs/operations.md); a worker holds the tokenizer only
        return ModelInfo(self.name or m.name, self.version or m.version, m, self.text, model_dir,
                         tuple(self.providers) or ("owner",), None, round(time.perf_counter() - t0, 3))

    def close(self) -> None:
        self._closed.set()
        link = self._link
        if link is not None:
            self._drop(link)

    # --- the batcher's interface: rows go straight to the owner -------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slot_freed = asyncio.Event()

    async def stop(self) -> None:
        reason = "the model version was unloaded or the service is shutting down"
        with self._lock:
            self._stopped = True
            link = self._link
            held: list[Row] = []
            if link is not None:  # (a dropped link's rows were failed when it was dropped)
                held = [r for rows in link.pending.values() for r in rows] + link.outbox
                link.pending, link.outbox = {}, []
        for fut, _, _ in held:
            _fail(fut, Stopped(reason))
        if self._slot_freed is not None:
            self._slot_freed.set()  # rows waiting for a slot see the stop

    @property
    def depth(self) -> int:
        with self._lock:  # the reader and reconnect threads change the link
            link = self._link
            return 0 if link is None else sum(len(rows) for rows in link.pending.values()) + len(link.outbox)

    async def submit(self, image: np.ndarray, text: EncodedText, alone: bool = False) -> Prediction:
        if self._stopped:
            raise Stopped("the model version was unloaded (replaced or stopped); send the request again")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_ms / 1000
        try:
            return await self._send(image, text, deadline)
        except _ConnectionLost:  # the owner stopped under this row (a SIGHUP switch): once more, to its successor
            wait_until = loop.time() + self.RESEND_WAIT_S
            while self._link is None and loop.time() < wait_until:
                await asyncio.sleep(0.05)  # the reconnect thread connects to the successor
            try:
                return await self._send(image, text, deadline)
            except _ConnectionLost:
                raise Stopped("the model owner process closed the connection") from None

    async def _send(self, image: np.ndarray, text: EncodedText, deadline: float) -> Prediction:
        if self._link is None or not self._beating():
            raise Stopped("the model owner process is not available (restarting?)" if self._link is None else
                          f"the model owner process has not answered for over {HEARTBEAT_TIMEOUT_S:g} s")
        loop = asyncio.get_running_loop()
        link, slot = await self._take_slot(deadline)
        fut: asyncio.Future[Prediction] = loop.create_future()
        with self._lock:
            if self._stopped:
                raise Stopped("the model version was unloaded (replaced or stopped); send the request again")
            if link.closed:
                raise _ConnectionLost
            row = image.nbytes
            np.frombuffer(link.slab, np.uint8, row, slot * row)[:] = image.reshape(-1)
            link.outbox.append((fut, slot, text))
        if not link.flush_due:
            # the rows submitted in this turn of the event loop travel in one message: framing, not a
            # batching policy (nothing waits for company; the owner's batch loop is the one batching)
            link.flush_due = True
            loop.call_soon(self._flush, link)
        try:
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        except TimeoutError:  # a silent owner is not worth a second wait: drop, reconnect
            self._drop(link)
            raise Stopped("the model owner process stopped answering (TimeoutError)") from None

    def _flush(self, link: _Link) -> None:
        with self._lock:
            link.flush_due = False
            rows, link.outbox = link.outbox, []
            gone = [slot for fut, slot, _ in rows if fut.done()]  # callers that went away (cancelled, timed out)
            if gone and not link.closed:
                link.free.extend(gone)  # their slots go back: nothing will answer them
        if gone:
            rows = [r for r in rows if not r[0].done()]
            if self._slot_freed is not None:
                self._slot_freed.set()
        if rows:
            self._post(link, rows)

    def _post(self, link: _Link, rows: list[Row]) -> None:
        """One message for ``rows`` (slots of ``link`` written already); a lost connection fails them for a resend."""
        assert self.text is not None
        with self._lock:
            open_ = not link.closed
            if open_:
                self._next_id += 1
                rid = self._next_id
                link.pending[rid] = rows
        if not open_:
            for fut, _, _ in rows:
                _fail(fut, _ConnectionLost())
            return
        try:
            link.conn.send_bytes(wire.request(rid, self.text.pad([t for _, _, t in rows]), [s for _, s, _ in rows]))
        except (OSError, ValueError):
            self._drop(link)

    async def _take_slot(self, deadline: float) -> tuple[_Link, int]:
        """A free slot of the current connection (whichever it is by the time one frees)."""
        loop = asyncio.get_running_loop()
        assert self._slot_freed is not None  # started
        while True:
            with self._lock:
                if self._stopped:
                    raise Stopped("the model version was unloaded (replaced or stopped); send the request again")
                link = self._link
                if link is None:
                    raise _ConnectionLost
                if link.free:
                    return link, link.free.pop()
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise QueueTimeout(f"every one of the {self.slots} rows to the model owner is in flight") from None

    # --- answers (the reader thread hands them to the loop) -----------------------------
    def _read_loop(self, link: _Link) -> None:
        while True:
            try:
                data = link.conn.recv_bytes()
            except (OSError, EOFError, ValueError):
                loop = self._loop
                if loop is None:
                    self._drop(link)
                else:  # after the answers already handed over, which must not be thrown away
                    loop.call_soon_threadsafe(self._drop, link)
                return
            loop = self._loop
            if loop is not None:
                loop.call_soon_threadsafe(self._answer, link, data)

    def _answer(self, link: _Link, data: bytes) -> None:
        rid, n, _, status, batch = HEAD.unpack_from(data)
        with self._lock:
            rows = link.pending.pop(rid, None)  # None: a dropped link (its rows were failed for a resend)
        if rows is None:
            return
        if status != 0 and len(rows) > 1:
            # row isolation: the rows of a failed message go again one by one, so only a failing row fails
            for r in rows:
                self._post(link, [r])
            return
        with self._lock:
            if not link.closed:
                link.free.extend(slot for _, slot, _ in rows)
        if self._slot_freed is not None:
            self._slot_freed.set()
        if status != 0:
            _fail(rows[0][0], BatchFailed(data[HEAD.size :].decode(errors="replace")[:200]))
            return
        try:
            if n != len(rows):
                raise ValueError
            probs, attn, ood = wire.read_reply(data, len(self.manifest.labels))
        except ValueError:
            self._drop(link)
            for fut, _, _ in rows:
                _fail(fut, Stopped("the model owner's answer does not match the request (another model?)"))
            return
        for (fut, _, _), p in zip(rows, predictions(probs, attn, ood, [t for _, _, t in rows]), strict=True):
            p.batch_size = batch
            if not fut.done():
                fut.set_result(p)

    # --- the connection ----------------------------------------------------------------
    def _reconnect_loop(self) -> None:
        while not self._closed.wait(0.2):
            if self._link is None:
                self._connect()

    def _connect(self) -> bool:
        assert self.manifest is not None
        side = self.manifest.image_size
        with self._lock:
            if self._link is not None:
                return True
        try:
            fd, path = tempfile.mkstemp(prefix=wire.SLAB_PREFIX, dir=shm_dir())
        except OSError as exc:
            self._log_shm(exc)
            return False
        try:
            size = self.slots * side * side * 3
            try:
                allocate_slab(fd, size)
            except OSError as exc:
                self._log_shm(exc, size)
                return False
            slab = mmap.mmap(fd, size)
            conn = Client(self.address, family="AF_UNIX")
            conn.send((path, os.getpid(), self.digest, str(self.model_dir)))
            if not conn.poll(self.HANDSHAKE_TIMEOUT_S):
                raise TimeoutError
            providers, digest, beat_path = conn.recv()
            beat = self._map_beat(beat_path)
        except (OSError, EOFError, TimeoutError, ValueError):
            return False
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)  # both sides have mapped it (or the attempt failed): nothing to leave behind
        if digest != self.digest:
            if not self._mismatch_logged:
                log.warning("the model owner serves another artifact (%s, this worker %s): not ready", digest, self.digest)
                self._mismatch_logged = True
            conn.close()
            return False
        link = _Link(conn, slab, beat, list(range(self.slots)))
        with self._lock:
            self._link, self.providers = link, list(providers)
            self._mismatch_logged = self._shm_logged = False
        threading.Thread(target=self._read_loop, args=(link,), daemon=True, name="owner-answers").start()
        loop, freed = self._loop, self._slot_freed
        if loop is not None and freed is not None:
            loop.call_soon_threadsafe(freed.set)  # rows waiting for a slot see the new connection
        log.info("connected to the model owner (%s)", self.providers[0] if self.providers else "?")
        return True

    def _log_shm(self, exc: OSError, size: int = 0) -> None:
        if not self._shm_logged:  # once per outage, not once per reconnect attempt
            log.error("cannot allocate a %d-byte row slab in %s (%s): not ready; give the container more shared "
                      "memory (docker: shm_size; Kubernetes: an emptyDir with medium Memory on /dev/shm)",
                      size, shm_dir(), exc.strerror or exc)
            self._shm_logged = True

    def _map_beat(self, path: str) -> mmap.mmap:
        if Path(path).parent != Path(self.address).parent or not path.endswith(".beat"):
            raise ValueError(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            return mmap.mmap(fd, BEAT.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def _drop(self, link: _Link) -> None:
        """Close ``link`` (once; if it is the current one, there is none until the reconnect thread makes
        another) and fail its rows in flight for a resend, whichever thread noticed first (the reader, a
        timed-out row, the loop): a row of a closed connection never waits for an answer that cannot
        come. Rows still in its outbox are failed when it is flushed (``_post`` sees it closed)."""
        with self._lock:
            if link.closed:
                return
            link.closed = True
            rows = [r for rs in link.pending.values() for r in rs]
            link.pending, link.free = {}, []
            if self._link is link:
                self._link = None
        loop = self._loop
        if rows and loop is not None:
            for fut, _, _ in rows:
                loop.call_soon_threadsafe(_fail, fut, _ConnectionLost())
        with contextlib.suppress(OSError):
            link.conn.close()
        log.warning("lost the model owner; reconnecting")


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
