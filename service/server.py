"""Serving processes, on uvicorn's public API only: ``uvicorn.Config`` and ``Server.serve(sockets=...)``.

One worker: the process serves itself. Several: :class:`Supervisor` spawns one process per
worker, as KServe's model server and LitServe do. On Linux each worker binds its own
``SO_REUSEPORT`` socket and the kernel spreads new connections evenly over them (with one
shared socket, the worker that wakes first took most keep-alive connections in 2 runs of 6:
670-690 instead of 860-910 requests/s on 2 cores). Before any worker binds, the supervisor
binds the port once *without* ``SO_REUSEPORT``, so a second instance on the same port fails
with one line instead of silently joining the first. Elsewhere the workers share one socket.

Signals to the supervisor:

* SIGTERM / SIGINT: passed on to every worker at once; each turns not-ready, closes its
  listener after ``drain_delay_s`` and finishes what it accepted. Workers still running after
  ``shutdown_grace_s`` are killed, so the service always exits within its grace.
* SIGHUP: rolling restart, one worker at a time: the replacement listens before the old one
  is told to stop.
* SIGTTIN / SIGTTOU: one worker more / one fewer (never fewer than one).

A worker that dies is replaced; one that fails at start-up (a broken model, a port it cannot
bind) stops the service, since every replacement would fail the same way.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import multiprocess

from classifier_core.artifact import ArtifactError

from .logs import log_config
from .protocol import guarded_protocol
from .serving.base import Backend, ProviderError, WorkerContext
from .serving.board import SLOTS, make_board
from .serving.session import Predictor
from .settings import Settings

log = logging.getLogger("service")

STARTUP_FAILURE = 3  # a worker's exit code when it could not start serving
READY_TIMEOUT_S = 120.0  # a SIGHUP replacement must be listening within this


class PortInUse(RuntimeError):
    """The address is taken: one line names it."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def bind(self, reuse_port: bool = False) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise PortInUse(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        # no listen() here: uvicorn listens once the app has started, so the kernel routes no
        # connection to a worker that is still loading its model (they would wait in its backlog,
        # and be reset if it were told to stop before it served them)
        sock.set_inheritable(True)
        return sock


def reuse_port_supported() -> bool:
    """SO_REUSEPORT balances TCP connections on Linux only (elsewhere one socket gets them all)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app, log_config=None, access_log=False, server_header=False, lifespan="on",
        http=guarded_protocol(settings.max_header_bytes, settings.header_timeout_s, settings.max_connections),
        # uvicorn's graceful shutdown starts after the drain delay; the supervisor's kill is the backstop
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s - settings.drain_delay_s)),
    )


def return_large_blocks_to_the_os(threshold: int = 1 << 20) -> bool:
    """glibc: blocks of ``threshold`` bytes and more come from mmap and go back to the system when freed.

    By default glibc raises its mmap threshold to the largest block freed (up to 32 MiB), so after one
    burst of large uploads or gRPC messages their buffers are carved from the heap and a worker keeps
    its peak size. A fixed threshold ends that, for the price of a fresh mapping per large block
    (3 floods of 32 gRPC calls of 3.9 MB: peak RSS +40 MB with it, +53 to +57 MB without). False where the C library is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, 2 * threshold))
    except (OSError, AttributeError):
        return False


def serve_socket(settings: Settings, sock: socket.socket, preloaded: dict[Path, Backend] | None = None,
                 ready: Connection | None = None, context: WorkerContext | None = None) -> int:
    """Serve on ``sock`` in this process until shut down; returns the process's exit code.

    ``ready`` (a pipe) gets this process's pid once the server listens.
    """
    from .app import create_app

    return_large_blocks_to_the_os()
    # uvicorn re-raises the signal that stopped it after its graceful shutdown; after a clean
    # drain the process should exit 0, which orchestrators read as a normal stop. A signal that
    # arrives before uvicorn has installed its own handlers is remembered and acted on once it has.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _frame: early.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _frame: early.append(sig))
    config = uvicorn_config(create_app(settings, context, preloaded), settings)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if early:
            signal.raise_signal(early[0])  # now handled by uvicorn (and the drain wrapper)
        if server.started and ready is not None:
            ready.send(os.getpid())
        await task

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    return 0 if server.started else STARTUP_FAILURE


def _worker_main(settings: Settings, listen: Listen, shared: socket.socket | None, ready: Connection,
                 context: WorkerContext) -> None:
    """A worker process: its own socket (SO_REUSEPORT) or the shared one, its own app and model."""
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    try:
        sock = shared if shared is not None else listen.bind(reuse_port=True)
    except PortInUse as exc:
        log.error("%s", exc)
        sys.exit(STARTUP_FAILURE)
    sys.exit(serve_socket(settings, sock, ready=ready, context=context))


def load_problem(predictor: Predictor) -> str | None:
    """Load and verify; the one-line reason it cannot serve, or None."""
    try:
        predictor.load()
    except (ArtifactError, ProviderError) as exc:
        return str(exc)
    return None


def _check(settings: Settings, conn: Connection) -> None:  # in a spawned child: importable, not in __main__
    conn.send(load_problem(Predictor(settings)))


def check_in_child(settings: Settings) -> str | None:
    ctx = multiprocessing.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_check, args=(settings, w), name="classifier-model-check")
    child.start()
    w.close()
    try:
        result: str | None = r.recv()
    except EOFError:
        child.join()
        return f"the model check process died (exit code {child.exitcode})"
    child.join()
    return result


@dataclass
class Worker:
    process: BaseProcess
    ready: Connection
    retiring: bool = False  # told to stop on purpose (SIGHUP, SIGTTOU): not replaced
    started: float = 0.0
    slot: int = -1  # its place on the busy board (serving/board.py); -1: none


class Supervisor:
    def __init__(self, settings: Settings, listen: Listen, workers: int, owner: bool = False) -> None:
        self.settings = settings
        # the owner topology: one process owns the model session, the workers send it rows
        self.owner: Worker | None = None
        self.owner_settings: Settings | None = None
        self._owner_due: float | None = None  # a dead owner's replacement starts then
        self._owner_backoff = 0.0
        # the workers' internal context: where they agree on the repository, and the owner's socket
        self.run_dir = tempfile.mkdtemp(prefix="classifier-run-")
        self.context = WorkerContext(control_dir=self.run_dir)
        if owner:
            settings = settings.resolved()
            self.owner_settings = settings.model_copy(update={
                "max_batch_size": settings.owner_max_batch, "intra_op_threads": settings.owner_threads})
            self.context = WorkerContext(owner_address=str(Path(self.run_dir) / "owner.sock"), control_dir=self.run_dir)
        self.listen = listen
        self.target = workers
        self.ctx = multiprocessing.get_context("spawn")
        # which workers have requests in flight, for the lone-request session (serving/board.py);
        # the owner topology's workers hold no session
        self.board = None if owner else make_board()
        self.free_slots = list(range(SLOTS)) if self.board is not None else []
        self.workers: list[Worker] = []
        self.shared: socket.socket | None = None
        self.stopping_since: float | None = None
        self.exit_code = 0
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe()  # signal handlers write a byte: the loop wakes at once
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- the model owner -------------------------------------------------------------
    def _spawn_owner(self) -> Worker:
        from .serving.owner_server import owner_main

        assert self.owner_settings is not None and self.context.owner_address is not None
        r, w = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=owner_main, args=(self.owner_settings, self.context.owner_address, w),
                                   name="classifier-model-owner", daemon=False)
        process.start()
        w.close()
        self.owner = Worker(process, r, started=time.monotonic())
        log.info("model owner [%s] started", process.pid)
        return self.owner

    def _stop_owner(self) -> None:
        """After the workers: they needed the owner to drain."""
        if self.owner is None:
            return
        self._signal_all(signal.SIGTERM, [self.owner])
        self.owner.process.join(max(5.0, self.settings.shutdown_grace_s))
        if self.owner.process.exitcode is None:
            log.error("the model owner did not stop: killing it")
            self._signal_all(signal.SIGKILL, [self.owner])
            self.owner.process.join(5)
        # the owners' sockets and heartbeats, the symlink to the current one: in the run folder, removed in run()

    def _reap_owner(self) -> None:
        if self._owner_due is not None and time.monotonic() >= self._owner_due and self.stopping_since is None:
            self._owner_due = None
            self._spawn_owner()
            return
        if self.owner is None or self.owner.process.exitcode is None or self._owner_due is not None:
            return
        code = self.owner.process.exitcode
        self.owner.ready.close()
        if self.stopping_since is not None:
            return
        # the workers' rows in flight get 503 and their readiness is false until they reconnect.
        # An owner that dies young (out of GPU memory...) is restarted after a growing pause
        young = time.monotonic() - self.owner.started < 10
        self._owner_backoff = min(30.0, self._owner_backoff * 2 or 0.5) if young else 0.0
        log.warning("model owner [%s] died (exit code %s); starting a new one%s", self.owner.process.pid, code,
                    f" in {self._owner_backoff:.1f} s" if self._owner_backoff else "")
        self._owner_due = time.monotonic() + self._owner_backoff

    def _restart_owner(self) -> None:
        """SIGHUP: the artifact may have changed; the workers refuse an owner whose manifest differs."""
        if self.owner is None:
            return
        old = self.owner
        # the new owner first: it takes over the socket address once it is ready, the old one then
        # finishes what it was sent and stops; the workers move over without failing a request
        new = self._spawn_owner()
        if not self._wait_listening(new):
            log.error("SIGHUP: the new model owner did not start (exit code %s); the old one keeps serving",
                      new.process.exitcode)
            self._signal_all(signal.SIGKILL, [new])
            new.process.join(5)
            new.ready.close()
            self.owner = old
            return
        self._signal_all(signal.SIGTERM, [old])
        old.process.join(max(5.0, self.settings.shutdown_grace_s))
        if old.process.exitcode is None:
            self._signal_all(signal.SIGKILL, [old])
            old.process.join(5)
        old.ready.close()

    # --- workers ---------------------------------------------------------------------
    def _spawn(self) -> Worker:
        r, w = self.ctx.Pipe(duplex=False)
        slot = self.free_slots.pop(0) if self.free_slots else -1
        context = self.context if self.board is None else replace(self.context, board=self.board, slot=slot)
        process = self.ctx.Process(target=_worker_main, args=(self.settings, self.listen, self.shared, w, context),
                                   name="classifier-worker", daemon=False)
        process.start()
        w.close()
        worker = Worker(process, r, started=time.monotonic(), slot=slot)
        self.workers.append(worker)
        return worker

    def _signal_all(self, sig: int, workers: list[Worker] | None = None) -> None:
        for wk in workers if workers is not None else self.workers:
            if wk.process.pid is not None and wk.process.exitcode is None:
                try:
                    os.kill(wk.process.pid, sig)
                except ProcessLookupError:
                    pass

    def _wait_listening(self, worker: Worker) -> bool:
        """Until the worker listens; False if it died, timed out, or a stop signal came meanwhile."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(sig in (signal.SIGTERM, signal.SIGINT) for sig in self._signals):
                return False  # the loop handles the stop at once
            try:
                if worker.ready.poll(0.1):
                    worker.ready.recv()
                    return True
            except (EOFError, OSError):  # it exited before it listened
                return False
            if worker.process.exitcode is not None:
                return False
        return False

    def _rolling_restart(self) -> None:
        for old in [w for w in self.workers if not w.retiring]:
            if self.stopping_since is not None:
                return
            new = self._spawn()
            if not self._wait_listening(new):
                log.error("SIGHUP: replacement worker [%s] did not start listening; keeping [%s]", new.process.pid, old.process.pid)
                new.retiring = True
                self._signal_all(signal.SIGKILL, [new])
                return
            old.retiring = True
            self._signal_all(signal.SIGTERM, [old])
            log.info("SIGHUP: worker [%s] replaced by [%s]", old.process.pid, new.process.pid)

    # --- signals ---------------------------------------------------------------------
    def _on_signal(self, sig: int, frame: Any) -> None:
        self._signals.append(sig)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass

    def _handle(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            if self.stopping_since is None:
                self.stopping_since = time.monotonic()
                log.info("%s: stopping %d workers (grace %.0f s)", signal.Signals(sig).name, len(self.workers),
                         self.settings.shutdown_grace_s)
            # every SIGTERM is passed on: a worker's second one skips its drain delay
            self._signal_all(signal.SIGTERM)
        elif self.stopping_since is not None:
            log.info("%s ignored: the service is stopping", signal.Signals(sig).name)
        elif sig == signal.SIGHUP:
            if self.owner is not None:
                log.info("SIGHUP: restarting the model owner, then the workers one at a time")
                self._restart_owner()
            else:
                log.info("SIGHUP: restarting the workers one at a time")
            self._rolling_restart()
        elif sig == signal.SIGTTIN:
            self.target += 1
            log.info("SIGTTIN: %d workers", self.target)
            self._spawn()
        elif sig == signal.SIGTTOU:
            active = [w for w in self.workers if not w.retiring]
            if len(active) <= 1:
                log.warning("SIGTTOU refused: the service keeps at least one worker")
                return
            self.target -= 1
            active[-1].retiring = True
            self._signal_all(signal.SIGTERM, [active[-1]])
            log.info("SIGTTOU: %d workers", self.target)

    # --- the loop --------------------------------------------------------------------
    def _reap(self) -> None:
        for wk in list(self.workers):
            code = wk.process.exitcode
            if code is None:
                continue
            self.workers.remove(wk)
            wk.ready.close()
            if self.board is not None and wk.slot >= 0:  # a dead worker's rows are no longer in flight
                self.board[wk.slot] = 0
                self.free_slots.append(wk.slot)
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and wk.process.pid is not None:
                # its live gauges (queue depth) leave the sums; its counters stay, as they happened
                multiprocess.mark_process_dead(wk.process.pid)  # type: ignore[no-untyped-call]
            if wk.retiring or self.stopping_since is not None:
                if code not in (0, -signal.SIGTERM) and self.stopping_since is not None:
                    log.warning("worker [%s] exited with code %s while stopping", wk.process.pid, code)
                    self.exit_code = self.exit_code or 1
                continue
            if code == STARTUP_FAILURE:
                log.error("worker [%s] could not start; stopping the service", wk.process.pid)
                self.exit_code = STARTUP_FAILURE
                self._handle(signal.SIGTERM)
                continue
            log.warning("worker [%s] died (exit code %s); starting a replacement", wk.process.pid, code)
            self._spawn()

    def run(self) -> int:
        if reuse_port_supported():
            self.listen.bind(reuse_port=False).close()  # raises PortInUse if anything listens there
        else:
            self.shared = self.listen.bind()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, self._on_signal)
        log.info("listening on %s:%d with %d workers%s", self.listen.host, self.listen.port, self.target,
                 ", a SO_REUSEPORT socket each" if self.shared is None else "")
        if self.owner_settings is not None:
            owner = self._spawn_owner()
            if not self._wait_listening(owner):
                log.error("the model owner did not start (exit code %s)", owner.process.exitcode)
                self._signal_all(signal.SIGKILL, [owner])
                return STARTUP_FAILURE
            log.info("model owner [%s] ready", owner.process.pid)
        for _ in range(self.target):
            self._spawn()
        while self.workers:
            owner_sentinel = [self.owner.process.sentinel] if self.owner is not None and self.owner.process.exitcode is None else []
            wait([self._wake_r, *(w.process.sentinel for w in self.workers), *owner_sentinel], timeout=0.5)
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            while self._signals:
                self._handle(self._signals.pop(0))
            self._reap()
            self._reap_owner()
            if self.stopping_since is not None and time.monotonic() - self.stopping_since > self.settings.shutdown_grace_s:
                log.error("workers still running %.0f s after SIGTERM: killing them", self.settings.shutdown_grace_s)
                self._signal_all(signal.SIGKILL)
                self.exit_code = self.exit_code or 1
                for wk in self.workers:
                    wk.process.join(5)
                self._reap()
        self._stop_owner()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.shared is not None:
            self.shared.close()
        return self.exit_code
