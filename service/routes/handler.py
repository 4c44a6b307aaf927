"""The one request handler every HTTP protocol goes through; each protocol supplies a codec.

``handle`` is ``dataplane.infer`` (the steps of every inference call, gRPC's too) with the HTTP
request's body as the message. A codec translates wire formats and nothing else: readiness, model
routing and admission are done once for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response

from .. import dataplane
from ..pipeline import Answer, Pipeline, Row
from ..serving.base import ModelInfo


class Codec(Protocol):
    def check(self, model: ModelInfo) -> None:
        """The request's own parameters against the model, before the body is read (raise ServiceError)."""

    async def decode(self, request: Request, body: bytes, model: ModelInfo) -> list[Row]: ...

    def encode(self, answers: Sequence[Answer], model: ModelInfo, request: Request) -> Response: ...


async def handle(request: Request, pipeline: Pipeline, codec: Codec, model: str | None = None,
                 version: str | None = None) -> Response:
    async def decode(body: bytes, info: ModelInfo) -> list[Row]:
        return await codec.decode(request, body, info)

    return await dataplane.infer(pipeline, model, version, check=codec.check, read=request.body, decode=decode,
                                 encode=lambda answers, info: codec.encode(answers, info, request), state=request.state)
