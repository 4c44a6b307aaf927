"""The one request handler every HTTP protocol goes through; each protocol supplies a codec.

::

    handle(request, pipeline, codec, model, version)
      lease the model version            404 model_not_found / 503 not_ready, before the body is read;
                                         held until the answer is encoded (a swap waits for it)
      codec.check(model)                 the protocol's own checks on its query (top_k, outputs...)
      refuse if the row budget is spent  503 overloaded, before the body is read, and once more after
      codec.decode(request, body, model) wire -> rows
      pipeline.run(model, rows)          admission, decode, batches: one answer per row
      codec.encode(answers, model)       answers -> wire

A codec translates wire formats and nothing else: readiness, model routing and admission are done
here once for all of them (gRPC's servicer does the same steps on its own transport).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response

from ..pipeline import Answer, Pipeline, Row
from ..serving.base import ModelInfo


class Codec(Protocol):
    def check(self, model: ModelInfo) -> None:
        """The request's own parameters against the model, before the body is read (raise ServiceError)."""

    async def decode(self, request: Request, body: bytes, model: ModelInfo) -> list[Row]: ...

    def encode(self, answers: Sequence[Answer], model: ModelInfo, request: Request) -> Response: ...


async def handle(request: Request, pipeline: Pipeline, codec: Codec, model: str | None = None,
                 version: str | None = None) -> Response:
    with pipeline.lease(model, version) as loaded:
        codec.check(loaded.info)
        pipeline.refuse_if_full()
        body = await request.body()  # waiting for the network holds no rows (only the version's lease)
        pipeline.refuse_if_full()  # still room? parsing is work on the event loop: not for a row that cannot run
        rows = await codec.decode(request, body, loaded.info)
        answers = await pipeline.run(loaded, rows, request.state)
        return codec.encode(answers, loaded.info, request)
