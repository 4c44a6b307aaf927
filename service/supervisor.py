"""Worker supervision for ``python -m service`` with several worker processes."""

from __future__ import annotations

import os
import signal
from socket import socket
from types import FrameType

from uvicorn import Config
from uvicorn.supervisors import Multiprocess


class ForwardingSupervisor(Multiprocess):
    """uvicorn's worker supervisor, except that SIGTERM reaches the workers at once.

    uvicorn queues signals and reads the queue every 0.5 s, after pinging each worker
    (which takes longer while a worker is busy), so a worker's readiness stayed 200 for up to
    a second after the orchestrator's SIGTERM: the load balancer kept sending to a process
    that was about to stop. Here the signal is passed on from the handler itself, and every
    further SIGTERM too (a worker's second SIGTERM skips its drain delay). The pipes uvicorn
    pings through stay open until the end: closing one mid-ping would make the supervisor
    take a draining worker for a hung one and kill it.
    """

    def __init__(self, config: Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self.forwarded = False
        signal.signal(signal.SIGTERM, self.forward_sigterm)

    def forward_sigterm(self, sig: int, frame: FrameType | None) -> None:
        self.forwarded = True
        self.should_exit.set()
        for process in self.processes:
            if process.exitcode is None and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def terminate_all(self) -> None:
        if not self.forwarded:  # e.g. SIGINT: uvicorn's own path
            super().terminate_all()
