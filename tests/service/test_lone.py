"""A lone request on every core: the board of busy workers, the lone session, the pipeline's choice."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import jpeg_bytes

from service.metrics import Metrics
from service.pipeline import Pipeline, Row
from service.serving import session
from service.serving.base import WorkerContext
from service.serving.board import Siblings, make_board
from service.serving.session import Predictor
from service.settings import Settings


def test_the_board_says_whether_any_other_worker_has_rows_in_flight() -> None:
    board = make_board()
    a, b = Siblings(board, 0), Siblings(board, 1)
    assert a.idle() and b.idle()
    b.set(3)
    assert not a.idle() and b.idle()  # its own rows never count
    b.set(0)
    assert a.idle()
    assert not Siblings(board, -1).idle()  # a worker nobody can see must assume the others work
    assert Siblings().idle()  # one process: no siblings
    b.set(2)
    Siblings(board, 1)  # a replacement in the dead worker's slot starts from zero
    assert a.idle()


def test_the_lone_session_has_every_core_and_answers_as_the_main_one(tiny_artifact: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model_dir=tiny_artifact, provider="cpu", intra_op_threads=1, lone_threads=2)  # type: ignore[call-arg]
    two = Predictor(settings, lone=True)
    two.load()
    assert two.lone_session is not None and two.lone_session.get_session_options().intra_op_num_threads == 2
    assert two.lone_seconds is not None and 0 < two.lone_seconds < 1
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, (1, two.manifest.image_size, two.manifest.image_size, 3), np.uint8)  # type: ignore[union-attr]
    text = two.encode(["a red tomato on a plate"])
    main, lone = two.predict(images, text)[0], two.predict(images, text, lone=True)[0]
    assert np.allclose(main.probabilities, lone.probabilities, atol=1e-5) and main.tokens == lone.tokens
    off = Predictor(Settings(model_dir=tiny_artifact, provider="cpu", intra_op_threads=2, lone_threads=2), lone=True)  # type: ignore[call-arg]
    off.load()  # no more threads than the main session: no second session; lone rows on its own threads
    assert off.lone_session is None and off.lone_seconds is not None
    blind = Predictor(settings)  # a process that cannot see the other workers: neither
    blind.load()
    assert blind.lone_session is None and blind.lone_seconds is None
    monkeypatch.setattr(session, "LONE_MAX_S", 0.0)  # a model too slow to hold the event loop: none
    slow = Predictor(settings, lone=True)
    slow.load()
    assert slow.lone_session is None and slow.lone_seconds is None
    two.close()
    assert two.lone_session is None and two.lone_seconds is None


@pytest.mark.parametrize("sibling_rows", [0, 1, None])  # None: a process with no board (uvicorn --workers)
def test_a_lone_request_takes_the_lone_session_only_while_the_other_workers_idle(
        tiny_artifact: Path, sibling_rows: int | None) -> None:
    board = make_board()
    settings = Settings(model_dir=tiny_artifact, provider="cpu", intra_op_threads=1, lone_threads=2)  # type: ignore[call-arg]
    calls: list[tuple[bool, int, bool]] = []  # (lone, this worker's rows on the board, on the loop's thread)

    async def go() -> None:
        context = WorkerContext() if sibling_rows is None else WorkerContext(board=board, slot=0)
        pipeline = Pipeline(settings, Metrics(), context)
        await pipeline.start()
        try:
            model = next(pipeline.repository.loaded())
            real = model.backend.predict

            def spy(images: np.ndarray, encoded: list, lone: bool = False) -> list:
                calls.append((lone, board[0], threading.current_thread() is threading.main_thread()))
                return real(images, encoded, lone)

            model.backend.predict = spy  # type: ignore[method-assign]
            board[1] = sibling_rows or 0  # another worker, with or without rows in flight
            row = Row(jpeg_bytes(), "tomato")
            [answer] = await pipeline.run(model, [row])
            assert answer.batch_size == 1  # type: ignore[union-attr]
            await pipeline.run(model, [row, row])  # one request's two rows: never lone
            assert board[0] == 0  # nothing in flight once answered
        finally:
            await pipeline.stop()

    asyncio.run(go())
    alone, seen = sibling_rows == 0, sibling_rows is not None  # with no board, nothing is written to one
    assert calls[0] == (alone, int(seen), alone)  # lone: on the event loop; else in the batcher's thread
    assert calls[1:] and all(c == (False, 2 * seen, False) for c in calls[1:])  # its rows: one batch or two


def test_the_supervisor_clears_and_reuses_a_gone_workers_slot() -> None:
    """A worker that is reaped leaves its slot at zero (a killed worker cannot clear its own rows)
    and the slot goes back to the free list for its replacement."""
    import multiprocessing
    import shutil
    from dataclasses import dataclass

    from service.server import Listen, Supervisor, Worker

    @dataclass
    class Gone:  # a process that has exited: all _reap reads of it
        exitcode: int = -9
        pid: int | None = None

    sup = Supervisor(Settings(provider="cpu"), Listen("127.0.0.1", 0), workers=1)  # type: ignore[call-arg]
    try:
        assert sup.board is not None
        slot = sup.free_slots.pop(0)
        sup.board[slot] = 5  # its rows in flight when it was killed
        r, _w = multiprocessing.Pipe(duplex=False)
        sup.workers.append(Worker(Gone(), r, retiring=True, slot=slot))  # type: ignore[arg-type]
        sup._reap()
        assert sup.workers == [] and sup.board[slot] == 0 and slot in sup.free_slots
    finally:
        shutil.rmtree(sup.run_dir, ignore_errors=True)
