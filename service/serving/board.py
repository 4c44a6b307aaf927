"""Which of the service's worker processes have requests in flight: one shared integer per worker.

The supervisor makes the board before it starts the workers and gives each worker a slot; a
worker writes its own slot (rows admitted and not yet answered) and reads the others'. It is read
for one decision only: a lone request may run at once on the event loop, on every core of the
machine (``Predictor``'s lone session), when no other worker is working, since their cores are then
idle; under any load rows go to the batchers, where they meet, and each worker keeps its share of
the cores. A stale read costs speed, never an answer.

Plain shared memory, no lock: each slot has one writer, and a torn or late read only sends one row
down the other path. A worker that dies leaves its slot set; the supervisor clears it
before the slot is given to the replacement.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

SLOTS = 256  # more worker processes than this, counting a rolling restart's, are not lone-eligible


def make_board() -> Any:
    """The shared array (``multiprocessing`` RawArray of int32), passed to each worker at its start."""
    return multiprocessing.get_context("spawn").RawArray("i", SLOTS)


class Siblings:
    """One worker's view of the board: ``set(n)`` its own rows in flight, ``idle()`` for the others'."""

    def __init__(self, board: Any = None, slot: int = -1) -> None:
        self.board = board
        self.slot = slot
        if board is not None and 0 <= slot < len(board):
            board[slot] = 0

    @property
    def known(self) -> bool:
        """False when this worker has no slot (the others cannot see it): it then never runs lone,
        since a sibling might be working. A single process (no board) has no siblings."""
        return self.board is None or 0 <= self.slot < len(self.board)

    def set(self, rows: int) -> None:
        if self.board is not None and 0 <= self.slot < len(self.board):
            self.board[self.slot] = rows

    def idle(self) -> bool:
        """No other worker has rows in flight (a single process: always)."""
        if self.board is None:
            return True
        if not self.known:
            return False
        return sum(self.board[:]) == self.board[self.slot]  # counts are never negative: one sum, a few µs
