"""The data plane: what every transport says about models, defined once (KServe's ``dataplane.py``).

The Open Inference Protocol's REST routes (``routes/v2.py``), its gRPC servicer
(``grpc_v2/server.py``), ``/classify`` (``routes/handler.py``), ``/readyz`` and ``/model`` only
translate wire formats; the facts they translate live here: ``infer`` (the steps of every
inference call, whatever its transport), the inputs and outputs (names, datatypes, shapes), the
output tensors of a batch of predictions, the model metadata, the server's and a model's
readiness, and the one version order (text versions first, then numbers by value: "abc" < "2" <
"10"; the last is the latest, which the ``latest`` policy loads and a request naming no version
gets). No web framework or gRPC is imported here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .codes import BadRequest, Timeout, truncate

if TYPE_CHECKING:
    from .pipeline import Answer, Pipeline, Row
    from .serving.base import ModelInfo, Prediction

Body = TypeVar("Body")
Reply = TypeVar("Reply")

SERVER_NAME = "image-text-classifier"
PLATFORM = "onnxruntime_onnx"
PROTOCOL_EXTENSIONS = ["binary_tensor_data"]
INPUTS = {"image": "BYTES", "description": "BYTES"}  # name -> datatype, each of shape [N]
# name -> datatype; the order is the order a request naming no outputs gets them in
OUTPUTS = {"label": "BYTES", "probabilities": "FP32", "text_attention": "FP32", "abstained": "BOOL", "ood_score": "FP32"}
OUTPUT_NAMES = tuple(OUTPUTS)


def version_key(version: str) -> tuple[int, int, str]:
    """The one version order: text versions first (by text), then numbers by value."""
    return (1, int(version), "") if version.isascii() and version.isdigit() else (0, 0, version)


def sorted_versions(versions: Iterable[str]) -> list[str]:
    return sorted(versions, key=version_key)


def check_outputs(names: Sequence[str]) -> None:
    """Outputs a request asks for, checked before any inference runs."""
    for i, name in enumerate(names):
        if name not in OUTPUTS:
            raise BadRequest(f"unknown output '{truncate(name)}'; the model has {', '.join(OUTPUT_NAMES)}")
        if name in names[:i]:
            raise BadRequest(f"output '{truncate(name)}' is requested more than once")


def model_metadata(pipeline: Pipeline, model: ModelInfo) -> dict[str, Any]:
    """The protocol's model metadata (REST's JSON; gRPC copies the same fields into its message)."""
    m = model.manifest
    shapes = {"probabilities": [-1, len(m.labels)], "text_attention": [-1, -1]}
    return {
        "name": model.name, "versions": sorted_versions(pipeline.repository.models.get(model.name, {})) or [model.version],
        "platform": PLATFORM,
        "inputs": [{"name": k, "datatype": d, "shape": [-1]} for k, d in INPUTS.items()],
        "outputs": [{"name": k, "datatype": d, "shape": shapes.get(k, [-1])} for k, d in OUTPUTS.items()],
        "parameters": {"labels": m.labels, "image_size": m.image_size, "max_caption_tokens": m.max_len,
                       "temperature": m.temperature, "min_confidence": pipeline.min_confidence(),
                       "ood_abstain": pipeline.settings.ood_abstain and m.ood_threshold is not None,
                       "version": model.version},
    }


def output_tensors(preds: list[Prediction], model: ModelInfo, min_confidence: float,
                   ood_abstain: bool) -> dict[str, tuple[str, list[int], Any]]:
    """name -> (datatype, shape, values) of every output, for any transport to encode."""
    n = len(preds)
    probs = np.stack([p.probabilities for p in preds]).astype(np.float32)
    width = max(len(p.attention) for p in preds)
    attn = np.zeros((n, width), np.float32)
    for i, p in enumerate(preds):
        attn[i, : len(p.attention)] = p.attention
    abstained = np.array([p.abstain_reason(min_confidence, ood_abstain) is not None for p in preds])
    labels = ["" if a else model.labels[int(i)] for a, i in zip(abstained, probs.argmax(1))]
    ood = np.array([np.nan if p.ood is None else p.ood for p in preds], np.float32)
    values: dict[str, tuple[list[int], Any]] = {
        "label": ([n], labels), "probabilities": ([n, len(model.labels)], probs), "text_attention": ([n, width], attn),
        "abstained": ([n], abstained), "ood_score": ([n], ood)}
    return {k: (d, *values[k]) for k, d in OUTPUTS.items()}


def server_state(pipeline: Pipeline) -> str:
    """"ready" (the default model's default version is loaded and warm, and the service is not
    draining), or why not: shutting_down, the repository's state (loading, ...), no_model, or the
    default version's own state."""
    if pipeline.draining:
        return "shutting_down"
    repo = pipeline.repository
    if repo.state != "ready":
        return repo.state
    name = repo.default_name()
    default = repo.default_version(name) if name else None
    if default is None:
        return "no_model"
    return "ready" if default.ready else default.backend.state


def server_ready(pipeline: Pipeline) -> bool:
    return server_state(pipeline) == "ready"


def model_ready(pipeline: Pipeline, name: str, version: str | None) -> bool:
    """A named model (version)'s readiness; unknown names are ModelNotFound, a loading repository NotReady."""
    return pipeline.repository.find(name, version).ready and not pipeline.draining


async def infer(pipeline: Pipeline, name: str | None, version: str | None, *,
                check: Callable[[ModelInfo], None],
                read: Callable[[], Awaitable[Body]],
                decode: Callable[[Body, ModelInfo], Awaitable[list[Row]]],
                encode: Callable[[Sequence[Answer], ModelInfo], Reply],
                state: Any = None, deadline: float | None = None) -> Reply:
    """One inference call, every transport's steps in one place; the transport supplies the four
    translations (``check`` its own parameters against the model, ``read`` its message, ``decode``
    wire -> rows, ``encode`` answers -> wire)::

        lease the model version          model_not_found / not_ready, before the message is read; held
                                         until the answer is encoded (a version swap waits for it)
        check(model)                     the call's own parameters (outputs, top_k, ...)
        refuse if the row budget is spent  overloaded, before the message is read, and once more after
        read() -> decode(message, model) wire -> rows
        pipeline.run(model, rows)        admission, decode, batches: one answer per row; by
                                         ``deadline`` (time.monotonic(); a gRPC call's) or timeout, the rows cancelled
        encode(answers, model)           answers -> wire
    """
    with pipeline.lease(name, version) as loaded:
        check(loaded.info)
        pipeline.refuse_if_full()
        message = await read()  # waiting for the network holds no rows (only the version's lease)
        pipeline.refuse_if_full()  # still room? parsing is work on the event loop: not for a row that cannot run
        rows = await decode(message, loaded.info)
        left = None if deadline is None else deadline - time.monotonic()  # what the lease and decoding left of it
        try:  # a deadline bounds the work: past it the rows are cancelled, not finished
            async with asyncio.timeout(left):
                answers = await pipeline.run(loaded, rows, state)
        except TimeoutError:
            if deadline is None:
                raise
            raise Timeout(f"the call's deadline passed before the answer ({left:.3f} s were left for inference)") from None
        return encode(answers, loaded.info)
