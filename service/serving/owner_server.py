"""The owner topology, the owner's side: one process per device that owns the model sessions.

It accepts the workers' connections (``owner_client.RemotePredictor``), maps each one's slab, merges
the rows every worker sent meanwhile into one onnxruntime call per model, answers each row alone and
writes its heartbeat; ``owner_main`` is the process the supervisor spawns. The topology is described
in ``owner_client.py``; the transport in ``wire.py``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import numpy as np

from ..settings import Settings
from . import wire
from .session import Predictor
from .wire import BEAT, HEAD, HEARTBEAT_S, allocate_slab, manifest_digest

log = logging.getLogger(__name__)


# --- the owner's side ----------------------------------------------------------------


@dataclass
class _Job:
    conn: Connection
    rid: int
    model: _Held
    images: np.ndarray  # a view of the worker's slab
    ids: np.ndarray


@dataclass
class _Held:
    """One artifact the owner holds a session for, and how many worker connections use it."""

    predictor: Predictor
    digest: str
    key: str  # folder and digest: a folder whose files changed is another artifact, with its own session
    connections: int = 0


class Owner:
    """Accepts worker connections, merges their batches per model, runs the sessions, answers each.

    It holds a session per artifact (folder and manifest digest) its workers ask for, so a version
    whose files changed in place gets a new session while the old one serves the connections it has;
    the ones the repository serves at
    start are loaded before it reports ready; a version a worker loads later (a repository poll or
    the load API) is loaded when its first connection arrives, and closed
    ``UNLOAD_GRACE_S`` after its last connection ended (every worker has unloaded it).
    """

    UNLOAD_GRACE_S = 10.0

    def __init__(self, settings: Settings, address: str, preload: list[Path] | None = None) -> None:
        self.settings = settings
        self.address = address
        self.preload = [Path(p).resolve() for p in (preload if preload is not None else [settings.model_dir])]
        self.models: dict[str, _Held] = {}
        self._models_lock = threading.Lock()  # loads (in connection threads) and unloads
        # SimpleQueue: its put is safe in a signal handler (SIGTERM), queue.Queue's lock is not
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.max_rows = settings.owner_max_batch
        self.providers: list[str] = []

    def _hold(self, model_dir: Path, digest: str = "") -> _Held:
        """The session for ``model_dir`` as the worker saw it (``digest``; "" = as it is on disk now),
        loaded now if the owner does not hold it (ArtifactError if broken)."""
        disk = manifest_digest(model_dir)
        with self._models_lock:
            # the worker's artifact, else what the folder holds now (a worker that saw older files is
            # refused by its digest check; it is never a reason to load the same files twice)
            held = self.models.get(f"{model_dir}#{digest or disk}") or self.models.get(f"{model_dir}#{disk}")
            if held is None:
                predictor = Predictor(self.settings, model_dir)
                predictor.load()
                loaded = manifest_digest(model_dir)
                held = self.models.setdefault(f"{model_dir}#{loaded}", _Held(predictor, loaded, f"{model_dir}#{loaded}"))
                self.providers = predictor.providers
            held.connections += 1
            return held

    def _release(self, held: _Held) -> None:
        with self._models_lock:
            held.connections -= 1
        if held.connections == 0 and held.predictor.model_dir not in self.preload:
            timer = threading.Timer(self.UNLOAD_GRACE_S, self._unload_if_unused, args=(held,))
            timer.daemon = True  # a pending unload must not hold the owner's exit back by its grace
            timer.start()

    def _unload_if_unused(self, held: _Held) -> None:
        with self._models_lock:
            if held.connections == 0 and self.models.get(held.key) is held:
                del self.models[held.key]
                log.info("model owner: unloaded %s (no worker uses it)", held.predictor.model_dir)
        # its session goes when the last batch holding it ends (jobs keep a reference)

    def serve(self, ready: Connection | None = None) -> None:
        for model_dir in self.preload:
            self._release(self._hold(model_dir))  # loaded, held for the workers to come
        pid = os.getpid()
        own = f"{self.address}.{pid}"  # this owner's socket; ``address`` is a symlink to the current owner's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(own)
        listener = Listener(own, family="AF_UNIX")
        # beside the socket: the supervisor's folder, removed with it whatever becomes of this process
        self.beat_path = f"{own}.beat"
        beat_fd = os.open(self.beat_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            allocate_slab(beat_fd, BEAT.size)
            beat = mmap.mmap(beat_fd, BEAT.size)
        finally:
            os.close(beat_fd)
        threading.Thread(target=self._heartbeat, args=(beat,), daemon=True, name="owner-heartbeat").start()
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="owner-accept").start()
        link = f"{self.address}.{pid}.link"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(own, link)
        os.replace(link, self.address)  # atomic: new connections reach this owner from now on
        log.info("model owner ready: %d model(s) on %s, up to %d rows per call", len(self.models),
                 self.providers[0] if self.providers else "?", self.max_rows)
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
            BEAT.pack_into(beat, 0, time.monotonic())
            time.sleep(HEARTBEAT_S)

    def _accept(self, listener: Listener) -> None:
        while not self.stopping.is_set():
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True, name="owner-conn").start()

    def _read(self, conn: Connection) -> None:
        held: _Held | None = None
        try:
            path, pid, digest, model_dir = conn.recv()
            if not wire.is_slab(path):
                log.warning("refused a connection from pid %s: slab %r", pid, path)
                conn.close()
                return
            try:
                held = self._hold(Path(model_dir), str(digest))
            except Exception as exc:  # a broken artifact: this worker's model is not ready, the others serve on
                log.error("model owner: cannot load %s for pid %s: %s", model_dir, pid, exc)
                conn.send((self.providers, "", self.beat_path))
                conn.close()
                return
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                slab = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            conn.send((held.predictor.providers, held.digest, self.beat_path))
            manifest = held.predictor.manifest
            assert manifest is not None  # _hold returns loaded models only
            side = manifest.image_size
            row = side * side * 3
            while True:
                msg = conn.recv_bytes()
                rid, n, width, _, _ = HEAD.unpack_from(msg)
                at = HEAD.size + wire.slots_bytes(n)
                slots = np.frombuffer(msg, np.uint32, n, HEAD.size)
                if len(msg) != at + 8 * n * width or n == 0 or int(slots.max()) >= len(slab) // row:
                    log.warning("refused a malformed message from pid %s", pid)
                    return
                ids = np.frombuffer(msg, np.int64, n * width, at).reshape(n, width)
                images = np.frombuffer(slab, np.uint8).reshape(-1, side, side, 3)[slots]  # a copy of these rows
                self.jobs.put(_Job(conn, rid, held, images, ids))
        except (OSError, EOFError, ValueError):
            return  # the worker went away: its rows were answered or are lost with it
        finally:
            if held is not None:
                self._release(held)

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
            self._run_by_model(jobs)
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
            self._run_by_model(leftover[i : i + 8])

    def _run_by_model(self, jobs: list[_Job]) -> None:
        groups: dict[int, list[_Job]] = {}
        for j in jobs:  # one call per model, in arrival order of each model's first job
            groups.setdefault(id(j.model), []).append(j)
        for group in groups.values():
            self._run(group)

    def _run(self, jobs: list[_Job]) -> None:
        predictor = jobs[0].model.predictor
        assert predictor.text is not None
        pad = predictor.text.pad_id
        width = max(j.ids.shape[1] for j in jobs)
        ids = np.full((sum(len(j.ids) for j in jobs), width), pad, np.int64)
        at = 0
        for j in jobs:
            ids[at : at + len(j.ids), : j.ids.shape[1]] = j.ids
            at += len(j.ids)
        try:
            probs, attn, ood = predictor.run_arrays(np.concatenate([j.images for j in jobs]), ids)
        except Exception as exc:
            if len(jobs) > 1:  # isolation: each row (job) on its own, so a bad row fails alone
                for j in jobs:
                    self._run([j])
                return
            log.error("inference failed for a batch of %d: %s", len(ids), exc)
            self._reply(jobs[0], wire.failure(jobs[0].rid, len(jobs[0].ids), "inference failed for this batch"))
            return
        at, total = 0, len(ids)
        for j in jobs:
            n, w = j.ids.shape
            self._reply(j, wire.reply(j.rid, probs[at : at + n], attn[at : at + n, :w], ood[at : at + n], total))
            at += n

    def _reply(self, job: _Job, data: bytes) -> None:
        with contextlib.suppress(OSError):
            job.conn.send_bytes(data)

    def stop(self) -> None:
        self.stopping.set()
        self.jobs.put(None)


def owner_main(settings: Settings, address: str, ready: Connection) -> None:
    """The owner process (spawned by the supervisor): loads the repository's models, serves until SIGTERM."""
    import logging.config

    from ..logs import log_config
    from .repository import initial_versions

    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    owner = Owner(settings, address, [v.directory for v in initial_versions(settings)])
    # SIGTERM comes after the workers have drained: finish the call in progress, then exit
    signal.signal(signal.SIGTERM, lambda *_: owner.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor orders the stop
    try:
        owner.serve(ready)
    except Exception as exc:
        log.error("model owner failed: %s", exc)
        raise SystemExit(2) from None
