"""What every backend shares: the interface, the loaded model's description, one row's answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from classifier_core import contract
from classifier_core.artifact import Manifest
from classifier_core.text import EncodedText, TextEncoder


class ProviderError(RuntimeError):
    """The requested execution provider cannot be used on this machine."""


@dataclass(frozen=True)
class WorkerContext:
    """What the supervisor tells a worker about its topology: internal, never a public setting.

    ``owner_address``: the model owner's Unix socket (the owner topology); None: the worker holds
    its own sessions. ``control_dir``: where the workers' repositories agree on explicit loads and
    unloads (several workers); None: this process alone. ``board`` and ``slot``: the shared record
    of which workers have requests in flight, and this worker's place on it (serving/board.py).
    """

    owner_address: str | None = None
    control_dir: str | None = None
    board: Any = field(default=None, compare=False)  # shared memory: not a value to compare or hash
    slot: int = -1


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model version, read-only: it exists only once the model is loaded and warm.

    ``name`` and ``version`` are what clients address (the repository's folder names, or the
    manifest's for a single ``--model-dir``); ``manifest`` is the artifact's own record.
    """

    name: str
    version: str
    manifest: Manifest
    text: TextEncoder
    directory: Path
    providers: tuple[str, ...]
    memory_bytes: int | None = None  # resident memory the load added in this process (None: not measured)
    load_seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def provider(self) -> str:
        return self.providers[0] if self.providers else ""


@dataclass
class Prediction:
    probabilities: np.ndarray  # float32 [C], calibrated (the artifact's temperature applied)
    attention: np.ndarray  # float32 [L_real]
    tokens: list[str]
    batch_size: int = 1  # rows in the onnxruntime call that produced it (set by the batcher)
    # the out-of-distribution score over the artifact's threshold: above 1.0 the input is unlike the
    # training data; None when the artifact has no such score
    ood: float | None = None

    @property
    def confidence(self) -> float:
        return float(self.probabilities.max())

    def abstain_reason(self, min_confidence: float, use_ood: bool = True) -> str | None:
        """Why the service would rather not name a label (None: it names one): the contract's rule."""
        return contract.abstain_reason(self.confidence, self.ood, min_confidence, use_ood)


class Backend(Protocol):
    """One model version's engine: ``session.Predictor`` in this process, ``owner.RemotePredictor``
    in front of the owner process. ``load`` verifies the artifact and returns what it loaded."""

    error: str | None

    @property
    def ready(self) -> bool: ...
    @property
    def state(self) -> str: ...  # not_loaded -> loading -> ready | failed (the owner client: also owner_unavailable...)
    def load(self) -> ModelInfo: ...
    def close(self) -> None: ...


class BatchBackend(Backend, Protocol):
    """A backend that runs whole batches (the in-process session): the pipeline puts a Batcher before it.
    ``predict`` is called from the batcher's thread, one batch at a time; ``lone``: the batch is one
    request's row and no other worker is working, so it may use every core (Predictor's lone session,
    called on the event loop)."""

    lone_seconds: float | None  # one row's warm call; None: lone rows do not run on the event loop

    def predict(self, images: np.ndarray, encoded: list[EncodedText], lone: bool = False) -> list[Prediction]: ...


class RowSink(Protocol):
    """Where the pipeline submits one decoded row: a ``Batcher`` (in front of a BatchBackend), or the
    owner client itself (the owner process batches the rows of every worker)."""

    async def start(self) -> None: ...
    async def stop(self) -> None:
        """Answer every row held with ``Stopped``; rows submitted afterwards are refused the same way."""
    async def submit(self, image: np.ndarray, text: EncodedText, alone: bool = False) -> Prediction:
        """One row's prediction; ``alone``: the row is a whole request (no sibling rows follow it)."""
    @property
    def depth(self) -> int: ...


def predictions(probs: np.ndarray, attn: np.ndarray, ood: np.ndarray, encoded: list[EncodedText]) -> list[Prediction]:
    return [Prediction(probs[r], attn[r, : len(e.ids)], e.tokens, ood=None if np.isnan(ood[r]) else float(ood[r]))
            for r, e in enumerate(encoded)]


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), for the memory a model load adds."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
