"""The owner topology: N HTTP/decode workers, one process per device that owns the model session.

Workers do what they do in the per-worker topology (parse, validate, admit, decode, tokenize,
batch their own rows) but their batcher's engine is ``RemotePredictor``: it writes the batch's
pixels into a shared-memory slab (a file on ``/dev/shm`` that the worker and the owner both
map) and sends only the token ids and a few numbers over a Unix socket. The owner merges what
every worker sent meanwhile into one onnxruntime call (one CUDA context on a GPU, large
batches) and answers each worker with its own rows' probabilities and attention.

Guarantees kept from the per-worker pipeline: row isolation (a merged call that fails is run
again worker batch by worker batch, and the worker's batcher then goes row by row); a worker
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

import contextlib
import logging
import mmap
import os
import queue
import signal
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np

from classifier_core.artifact import load_manifest
from classifier_core.text import EncodedText, TextEncoder

from .predictor import EngineUnavailable, Prediction, Predictor, predictions
from .settings import Settings

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<IIII")  # request id, rows, sequence width, status (replies: 0 ok, 1 failed)
_BEAT = struct.Struct("<d")  # the owner's time.monotonic() (one clock for every process on the host)
HEARTBEAT_S = 0.1
HEARTBEAT_TIMEOUT_S = 1.0


class _ConnectionLost(Exception):
    """The owner closed the connection under a request (it stopped): worth one try on a fresh one."""


def allocate_slab(fd: int, size: int) -> None:
    """Reserve the slab's memory now: with a plain ftruncate a full /dev/shm shows up later as SIGBUS."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # pragma: no cover (macOS): written through instead
        os.ftruncate(fd, size)
        os.pwrite(fd, bytes(size), 0)


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


# --- the worker's side ---------------------------------------------------------------


def manifest_digest(model_dir: Path) -> str:
    """Worker and owner must serve the same artifact (a SIGHUP may swap it): they compare this."""
    import hashlib

    return hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()[:16]


class RemotePredictor:
    """Stands where ``Predictor`` stands in a worker; the session lives in the owner process.

    A background thread (re)connects whenever there is no connection; ``ready`` never blocks.
    Each connection gets a fresh slab file, unlinked as soon as both sides have mapped it, so a
    killed worker or owner leaves nothing in /dev/shm.
    """

    HANDSHAKE_TIMEOUT_S = 5.0
    CONNECT_WAIT_S = 5.0  # at start, for the first connection
    RESEND_WAIT_S = 1.0  # after the owner closed under a request: how long a resend may wait for the next owner

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = str(settings.owner_address)
        self.manifest: Any = None
        self.text: TextEncoder | None = None
        self.providers: list[str] = []
        self.error: str | None = None
        self.digest = ""
        self._conn: Connection | None = None
        self._slab: mmap.mmap | None = None
        self._next_id = 0
        self._lock = threading.Lock()  # one request at a time on the connection
        self._loaded = False
        self._closed = threading.Event()
        self._mismatch_logged = False
        self._shm_logged = False
        self._beat: mmap.mmap | None = None  # the owner's heartbeat, read-only

    # the Predictor interface the pipeline and the routes use
    @property
    def ready(self) -> bool:
        return self._loaded and self._alive() and self._beating()

    @property
    def state(self) -> str:
        if not self._loaded:
            return "loading"
        if self._conn is None:
            return "owner_unavailable"
        return "ready" if self._beating() else "owner_not_answering"

    def _beating(self) -> bool:
        """The owner's heartbeat is fresh: it runs (a SIGSTOPped or wedged owner keeps its sockets open)."""
        beat = self._beat
        if beat is None:
            return False
        try:
            (at,) = _BEAT.unpack_from(beat)
        except (ValueError, struct.error):
            return False
        return time.monotonic() - at < HEARTBEAT_TIMEOUT_S

    def load(self) -> None:
        """The artifact's manifest and tokenizer (validation and tokenizing stay in the worker).

        The worker starts even while the owner is (re)starting: it is not ready until connected. It
        waits for a first connection a few seconds (``CONNECT_WAIT_S``), so that a worker that starts
        listening (a SIGHUP replacement, say) is normally connected and ready by then.
        """
        model_dir = Path(self.settings.model_dir)
        self.manifest = load_manifest(model_dir)
        self.text = TextEncoder.from_file(model_dir / self.manifest.tokenizer_file, self.manifest.max_len)
        self.digest = manifest_digest(model_dir)
        self._loaded = True
        deadline = time.monotonic() + self.CONNECT_WAIT_S
        while not self._connect() and time.monotonic() < deadline:
            time.sleep(0.1)
        threading.Thread(target=self._reconnect_loop, daemon=True, name="owner-reconnect").start()

    def _reconnect_loop(self) -> None:
        while not self._closed.wait(0.2):
            if self._conn is None:
                self._connect()

    def _alive(self) -> bool:
        """Connected, and the owner has not closed its end (checked only between requests)."""
        conn = self._conn
        if conn is None:
            return False
        if self._lock.acquire(blocking=False):
            try:
                if conn.poll(0):  # readable with no request outstanding: the owner went away
                    self._drop()
                    return False
            except OSError:
                self._drop()
                return False
            finally:
                self._lock.release()
        return True

    def _connect(self) -> bool:
        assert self.manifest is not None
        side = self.manifest.image_size
        with self._lock:
            if self._conn is not None:
                return True
            try:
                fd, path = tempfile.mkstemp(prefix="classifier-rows-", dir=shm_dir())
            except OSError as exc:
                self._log_shm(exc)
                return False
            try:
                size = self.settings.max_batch_size * side * side * 3
                try:
                    allocate_slab(fd, size)
                except OSError as exc:
                    self._log_shm(exc, size)
                    return False
                slab = mmap.mmap(fd, size)
                conn = Client(self.address, family="AF_UNIX")
                conn.send((path, os.getpid(), self.digest))
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
            self._conn, self._slab, self._beat, self.providers = conn, slab, beat, list(providers)
            self._mismatch_logged = self._shm_logged = False
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
            return mmap.mmap(fd, _BEAT.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def encode(self, descriptions: list[str]) -> list[EncodedText]:
        assert self.text is not None
        return self.text.encode_batch(descriptions)

    def predict(self, images: np.ndarray, encoded: list[EncodedText]) -> list[Prediction]:
        assert self.text is not None
        n = len(encoded)
        if n > self.settings.max_batch_size:  # the batcher never sends more; split rather than overrun the slab
            step = self.settings.max_batch_size
            return [p for s in range(0, n, step) for p in self.predict(images[s : s + step], encoded[s : s + step])]
        ids = self.text.pad(encoded)
        try:
            reply = self._exchange(images, ids)
        except _ConnectionLost:  # the owner stopped under this request (a SIGHUP switch): once more, on a fresh one
            deadline = time.monotonic() + self.RESEND_WAIT_S
            while not self._connect() and time.monotonic() < deadline:
                time.sleep(0.05)  # the successor may be a moment from accepting
            try:
                reply = self._exchange(images, ids)
            except _ConnectionLost:
                raise EngineUnavailable("the model owner process closed the connection") from None
        return self._read_reply(reply, n, encoded)

    def _exchange(self, images: np.ndarray, ids: np.ndarray) -> bytes:
        if not self._alive() and not self._connect():  # one immediate try: the owner may be back already
            raise EngineUnavailable("the model owner process is not available (restarting?)")
        if not self._beating():
            raise EngineUnavailable(f"the model owner process has not answered for over {HEARTBEAT_TIMEOUT_S:g} s")
        with self._lock:
            conn, slab = self._conn, self._slab
            if conn is None or slab is None:
                raise EngineUnavailable("the model owner process is not available (restarting?)")
            np.frombuffer(slab, np.uint8, images.size).reshape(images.shape)[:] = images
            self._next_id += 1
            try:
                conn.send_bytes(_HEAD.pack(self._next_id, len(ids), ids.shape[1], 0) + ids.tobytes())
                if not conn.poll(self.settings.request_timeout_ms / 1000):
                    raise TimeoutError
                reply = conn.recv_bytes()
            except TimeoutError:  # an OSError too: first, a silent owner is not worth a second wait
                self._drop()
                raise EngineUnavailable("the model owner process stopped answering (TimeoutError)") from None
            except (OSError, EOFError) as exc:
                self._drop()
                raise _ConnectionLost from exc
            if _HEAD.unpack_from(reply)[0] != self._next_id:
                self._drop()
                raise EngineUnavailable("the model owner's answer did not match the request")
            return reply

    def _read_reply(self, reply: bytes, n: int, encoded: list[EncodedText]) -> list[Prediction]:
        _, rows, width, status = _HEAD.unpack_from(reply)
        classes = len(self.manifest.labels)
        if rows != n:
            self._drop()
            raise EngineUnavailable("the model owner's answer did not match the request")
        if status != 0:
            raise RuntimeError(reply[_HEAD.size :].decode(errors="replace"))
        if len(reply) != _HEAD.size + 4 * n * (classes + width + 1):  # never slice another row's numbers
            self._drop()
            raise EngineUnavailable("the model owner's answer has the wrong size (another model?)")
        # copies: a Prediction must not keep the whole reply alive
        probs = np.frombuffer(reply, np.float32, n * classes, _HEAD.size).reshape(n, classes).copy()
        attn = np.frombuffer(reply, np.float32, n * width, _HEAD.size + probs.nbytes).reshape(n, width).copy()
        ood = np.frombuffer(reply, np.float32, n, _HEAD.size + probs.nbytes + attn.nbytes).copy()
        return predictions(probs, attn, ood, encoded)

    def _drop(self) -> None:
        """Forget the connection (the caller holds the lock or owns the connection's failure)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            log.warning("lost the model owner; reconnecting")
        self._conn, self._slab, self._beat = None, None, None

    def close(self) -> None:
        self._closed.set()
        self._drop()

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"state": self.state, "name": m.name if m else None, "version": m.version if m else None,
                "providers": self.providers, "topology": "owner"}


# --- the owner's side ----------------------------------------------------------------


@dataclass
class _Job:
    conn: Connection
    rid: int
    images: np.ndarray  # a view of the worker's slab
    ids: np.ndarray


class Owner:
    """Accepts worker connections, merges their batches, runs the one session, answers each."""

    def __init__(self, settings: Settings, address: str) -> None:
        self.settings = settings
        self.address = address
        self.predictor = Predictor(settings)
        # SimpleQueue: its put is safe in a signal handler (SIGTERM), queue.Queue's lock is not
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.digest = manifest_digest(Path(settings.model_dir))
        self.stopping = threading.Event()
        self.max_rows = settings.owner_max_batch

    def serve(self, ready: Connection | None = None) -> None:
        self.predictor.load()
        pid = os.getpid()
        own = f"{self.address}.{pid}"  # this owner's socket; ``address`` is a symlink to the current owner's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(own)
        listener = Listener(own, family="AF_UNIX")
        # beside the socket: the supervisor's folder, removed with it whatever becomes of this process
        self.beat_path = f"{own}.beat"
        beat_fd = os.open(self.beat_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            allocate_slab(beat_fd, _BEAT.size)
            beat = mmap.mmap(beat_fd, _BEAT.size)
        finally:
            os.close(beat_fd)
        threading.Thread(target=self._heartbeat, args=(beat,), daemon=True, name="owner-heartbeat").start()
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="owner-accept").start()
        link = f"{self.address}.{pid}.link"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(own, link)
        os.replace(link, self.address)  # atomic: new connections reach this owner from now on
        log.info("model owner ready: %s, up to %d rows per call", self.predictor.providers[0], self.max_rows)
        if ready is not None:
            ready.send(pid)
        try:
            self._batch_loop()
        finally:
            listener.close()  # unlinks this owner's own socket, never the symlink a successor replaced
            with contextlib.suppress(OSError):
                os.unlink(self.beat_path)

    def _heartbeat(self, beat: mmap.mmap) -> None:
        while True:
            _BEAT.pack_into(beat, 0, time.monotonic())
            time.sleep(HEARTBEAT_S)

    def _accept(self, listener: Listener) -> None:
        while not self.stopping.is_set():
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True, name="owner-conn").start()

    def _read(self, conn: Connection) -> None:
        assert self.predictor.manifest is not None
        side = self.predictor.manifest.image_size
        try:
            path, pid, _digest = conn.recv()
            # only a worker's own slab: a file this module names, in the shared-memory folder
            if Path(path).parent != Path(shm_dir()) or not Path(path).name.startswith("classifier-rows-"):
                log.warning("refused a connection from pid %s: slab %r", pid, path)
                conn.close()
                return
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                slab = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            conn.send((self.predictor.providers, self.digest, self.beat_path))
            while True:
                msg = conn.recv_bytes()
                rid, n, width, _ = _HEAD.unpack_from(msg)
                ids = np.frombuffer(msg, np.int64, n * width, _HEAD.size).reshape(n, width)
                images = np.frombuffer(slab, np.uint8, n * side * side * 3).reshape(n, side, side, 3)
                self.jobs.put(_Job(conn, rid, images, ids))
        except (OSError, EOFError, ValueError):
            return  # the worker went away: its rows were answered or are lost with it

    def _batch_loop(self) -> None:
        while not self.stopping.is_set():
            first = self.jobs.get()
            if first is None:
                self.stopping.set()
                break
            jobs, rows = [first], len(first.ids)
            while rows < self.max_rows:  # greedy: whatever the other workers sent meanwhile
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.stopping.set()
                    break
                jobs.append(job)
                rows += len(job.ids)
            self._run(jobs)
        # stopping: what the workers sent before they could see it is still answered
        leftover = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftover.append(job)
        for i in range(0, len(leftover), 8):
            self._run(leftover[i : i + 8])

    def _run(self, jobs: list[_Job]) -> None:
        assert self.predictor.text is not None
        pad = self.predictor.text.pad_id
        width = max(j.ids.shape[1] for j in jobs)
        ids = np.full((sum(len(j.ids) for j in jobs), width), pad, np.int64)
        at = 0
        for j in jobs:
            ids[at : at + len(j.ids), : j.ids.shape[1]] = j.ids
            at += len(j.ids)
        try:
            probs, attn, ood = self.predictor.run_arrays(np.concatenate([j.images for j in jobs]), ids)
        except Exception as exc:
            if len(jobs) > 1:  # isolation: each worker's batch on its own, so one bad batch fails alone
                for j in jobs:
                    self._run([j])
                return
            log.error("inference failed for a batch of %d: %s", len(ids), exc)
            self._reply(jobs[0], _HEAD.pack(jobs[0].rid, len(jobs[0].ids), 0, 1) + b"inference failed for this batch")
            return
        at = 0
        for j in jobs:
            n, w = j.ids.shape
            body = (probs[at : at + n].astype(np.float32).tobytes() + np.ascontiguousarray(attn[at : at + n, :w], np.float32).tobytes()
                    + ood[at : at + n].astype(np.float32).tobytes())
            self._reply(j, _HEAD.pack(j.rid, n, w, 0) + body)
            at += n

    def _reply(self, job: _Job, data: bytes) -> None:
        with contextlib.suppress(OSError):
            job.conn.send_bytes(data)

    def stop(self) -> None:
        self.stopping.set()
        self.jobs.put(None)


def owner_main(settings: Settings, address: str, ready: Connection) -> None:
    """The owner process (spawned by the supervisor): loads the model, serves until SIGTERM."""
    import logging.config

    from .logs import log_config

    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    owner = Owner(settings, address)
    # SIGTERM comes after the workers have drained: finish the call in progress, then exit
    signal.signal(signal.SIGTERM, lambda *_: owner.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor orders the stop
    try:
        owner.serve(ready)
    except Exception as exc:
        log.error("model owner failed: %s", exc)
        raise SystemExit(2) from None
