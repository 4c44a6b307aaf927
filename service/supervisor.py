"""Worker supervision for ``python -m service`` with several worker processes.

Two changes to uvicorn's supervisor, each measured on the 2-core machine:

* SIGTERM reaches the workers at once. uvicorn queues signals and reads the queue every
  0.5 s, after pinging each worker (longer while a worker is busy), so ``/readyz`` stayed 200
  for 0.34-0.42 s after an orchestrator's SIGTERM: the load balancer kept sending to a
  process that was about to stop.
* On Linux each worker gets its own listening socket on the same port (``SO_REUSEPORT``), and
  the kernel spreads new connections evenly over them. With uvicorn's one shared socket the
  worker that wakes first accepts a whole burst of keep-alive connections: 2 runs in 6 at
  concurrency 32 left one worker with nearly all of them (670-690 instead of 860-910
  requests/s, 1.45 of 2 cores busy); with a socket per worker, 6 runs in 6 used both cores.
  The price: connections that wait in a crashed worker's accept queue are reset (with a shared
  socket another worker would take them); the replacement worker gets a new socket.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from types import FrameType

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

log = logging.getLogger("service")


def reuse_port_supported(config: Config) -> bool:
    """SO_REUSEPORT balances TCP connections on Linux only (elsewhere one socket gets them all)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT") and config.uds is None and config.fd is None


class ForwardingSupervisor(Multiprocess):
    """uvicorn's ``Multiprocess`` with immediate SIGTERM forwarding and a listening socket per worker."""

    def __init__(self, config: Config) -> None:
        self.reuse_port = reuse_port_supported(config)
        # a shared socket is bound (and a busy port reported) by uvicorn's own code
        super().__init__(config, [] if self.reuse_port else [config.bind_socket()])
        self.forwarded = False
        signal.signal(signal.SIGTERM, self.forward_sigterm)
        if self.reuse_port:
            self.family = socket.AF_INET6 if config.host and ":" in config.host else socket.AF_INET
            self.port = self._check_port_free()
            log.info("listening on %s:%d: %d workers, a SO_REUSEPORT socket each", config.host, self.port, config.workers)

    # signals -----------------------------------------------------------------------------

    def forward_sigterm(self, sig: int, frame: FrameType | None) -> None:
        self.forwarded = True
        self.should_exit.set()
        # each further SIGTERM is passed on too: a worker's second SIGTERM skips its drain delay
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def terminate_all(self) -> None:
        # uvicorn's terminate() also closes the ping pipes; closing one while the supervisor
        # pings would make it take a draining worker for a hung one and kill it
        if not self.forwarded:  # e.g. SIGINT: uvicorn's own path
            super().terminate_all()

    # sockets and workers -----------------------------------------------------------------

    def _check_port_free(self) -> int:
        """Bind once without SO_REUSEPORT: fails like uvicorn if anything listens there, even
        another instance of this service (which SO_REUSEPORT would otherwise silently join)."""
        probe = socket.socket(self.family)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((self.config.host, self.config.port))
        except OSError as exc:
            logging.getLogger("uvicorn.error").error(exc)
            sys.exit(STARTUP_FAILURE)
        port = int(probe.getsockname()[1])  # resolves port 0
        probe.close()
        return port

    def _listening_socket(self) -> socket.socket:
        sock = socket.socket(self.family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.config.host, self.port))
        sock.set_inheritable(True)
        return sock

    def _new_process(self) -> Process:
        if not self.reuse_port:
            process = Process(self.config, self.sockets)
            process.start()
            return process
        sock = self._listening_socket()
        process = Process(self.config, [sock])
        process.start()  # the child gets its own descriptor here
        # the parent keeps no copy: when the worker closes its listener (shutdown, crash), the
        # kernel stops routing connections to it instead of queueing them where nobody accepts
        sock.close()
        return process

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._new_process())

    def keep_subprocess_alive(self) -> None:
        # uvicorn's logic, with a new socket for each replacement worker
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # the app or its model cannot start: every replacement would fail the same way
                log.error("worker [%s] failed to start; stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.warning("worker [%s] died (exit code %s); starting a replacement", process.pid, process.exitcode)
            self.processes[idx] = self._new_process()

    def restart_all(self) -> None:
        # SIGHUP: uvicorn's rolling restart, each replacement on its own socket
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._new_process()
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error("replacement worker [%s] was not ready in time; keeping [%s]", new.pid, old.pid)
                return
            old.terminate()
            old.join()
            self.processes[idx] = new
