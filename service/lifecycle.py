"""Shutdown as orchestrators expect it: readiness turns false first, then the listener closes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

from .pipeline import Pipeline

log = logging.getLogger(__name__)


def _exit_after_grace(grace_s: float) -> None:
    log.error("still running %.0f s after SIGTERM: exiting now", grace_s)
    logging.shutdown()
    os._exit(1)


def install_drain_on_sigterm(pipeline: Pipeline, delay_s: float, grace_s: float | None = None) -> None:
    """On SIGTERM: readiness answers 503 at once; the server stops accepting after ``delay_s``.

    uvicorn has installed its own SIGTERM handler by the time the lifespan runs (in every
    worker process); this one wraps it, so load balancers see "not ready" and stop sending
    before the listening socket closes, and uvicorn's graceful shutdown then drains what was
    accepted. A second SIGTERM skips the delay. ``grace_s`` after the first SIGTERM the process
    exits whatever is still running (a decode thread that cannot be interrupted, say): the
    grace an orchestrator was promised is kept.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # not under a real server (e.g. TestClient): signals cannot be handled here
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(sig: int, frame: Any) -> None:
        if pipeline.draining:
            previous(sig, frame)
            return
        pipeline.draining = True
        log.info("SIGTERM: not ready from now; closing the listener in %.1f s, then draining", delay_s)
        loop.call_soon_threadsafe(loop.call_later, delay_s, previous, sig, frame)
        if grace_s is not None:
            watchdog = threading.Timer(grace_s, _exit_after_grace, args=(grace_s,))
            watchdog.daemon = True
            watchdog.start()

    signal.signal(signal.SIGTERM, on_sigterm)
