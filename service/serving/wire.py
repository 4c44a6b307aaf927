"""The owner topology's wire format, shared by the worker's client and the owner process.

Per connection: the worker makes a slab (a file in /dev/shm that both sides map) big enough for
one batch of images, and sends ``(slab path, pid, manifest digest, artifact folder)`` once; the
owner answers ``(providers, digest, heartbeat path)``. Then, per row, the worker writes the pixels
into a free slot of the slab; the rows of one turn of its event loop go in one message, ``HEAD``
(request id, rows, sequence width, status 0, 0) followed by the rows' slot numbers (uint32, padded
to 8 bytes) and their int64 token ids, several messages in flight; the owner answers each ``HEAD``
(status 0 ok, 1 failed; the last field: the rows of the call it ran in) followed by float32
probabilities [rows, classes], attention [rows, width] and OOD score [rows] (or an error text).
The owner's heartbeat file holds its ``time.monotonic()`` (``BEAT``), rewritten every ``HEARTBEAT_S``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

HEAD = struct.Struct("<IIIII")  # request id, rows, sequence width, status (replies: 0 ok, 1 failed), replies: batch rows
BEAT = struct.Struct("<d")  # the owner's time.monotonic() (one clock for every process on the host)
HEARTBEAT_S = 0.1
HEARTBEAT_TIMEOUT_S = 1.0
SLAB_PREFIX = "classifier-rows-"


def allocate_slab(fd: int, size: int) -> None:
    """Reserve the slab's memory now: with a plain ftruncate a full /dev/shm shows up later as SIGBUS."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # pragma: no cover (macOS): written through instead
        os.ftruncate(fd, size)
        os.pwrite(fd, bytes(size), 0)


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def is_slab(path: str) -> bool:
    """Only a worker's own slab: a file this module names, in the shared-memory folder."""
    return Path(path).parent == Path(shm_dir()) and Path(path).name.startswith(SLAB_PREFIX)


def manifest_digest(model_dir: Path) -> str:
    """Worker and owner must serve the same artifact (a SIGHUP may swap it): they compare this."""
    return hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()[:16]


def slots_bytes(rows: int) -> int:
    """The slot numbers' bytes (uint32), padded to 8 so the token ids after them stay aligned."""
    return (4 * rows + 7) // 8 * 8


def request(rid: int, ids: np.ndarray, slots: list[int]) -> bytes:
    """Rows at ``slots`` of the slab, with their token ids (right-padded, [rows, width])."""
    head = HEAD.pack(rid, len(ids), ids.shape[1], 0, 0)
    numbers = np.asarray(slots, np.uint32).tobytes().ljust(slots_bytes(len(slots)), b"\0")
    return head + numbers + np.ascontiguousarray(ids, np.int64).tobytes()


def reply(rid: int, probs: np.ndarray, attn: np.ndarray, ood: np.ndarray, batch_rows: int) -> bytes:
    n, width = attn.shape
    return (HEAD.pack(rid, n, width, 0, batch_rows) + np.ascontiguousarray(probs, np.float32).tobytes()
            + np.ascontiguousarray(attn, np.float32).tobytes() + np.ascontiguousarray(ood, np.float32).tobytes())


def failure(rid: int, rows: int, message: str) -> bytes:
    return HEAD.pack(rid, rows, 0, 1, 0) + message.encode()


def read_reply(data: bytes, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, attention, OOD) of a status-0 reply; ValueError when its size is not this model's."""
    _, n, width, _, _ = HEAD.unpack_from(data)
    if len(data) != HEAD.size + 4 * n * (classes + width + 1):  # never slice another row's numbers
        raise ValueError("the reply's size does not match the model")
    # copies: a Prediction must not keep the whole reply alive
    probs = np.frombuffer(data, np.float32, n * classes, HEAD.size).reshape(n, classes).copy()
    attn = np.frombuffer(data, np.float32, n * width, HEAD.size + probs.nbytes).reshape(n, width).copy()
    ood = np.frombuffer(data, np.float32, n, HEAD.size + probs.nbytes + attn.nbytes).copy()
    return probs, attn, ood
