"""Our own API: ``POST /classify`` (multipart, one image) and ``POST /classify/batch`` (JSON, many).

Each is a codec (``FormCodec``, ``BatchCodec``) for the one handler in ``handler.py``: it reads its
wire format into :class:`~service.pipeline.Row`\\ s and renders the answers; model routing
(``?model=&version=``), readiness, limits, admission and decoding are the handler's and the pipeline's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..deps import INFER_QUERY_OPENAPI, read_query
from ..errors import BadRequest, InvalidField, ServiceError, truncate
from ..pipeline import Answer, Pipeline, Row, RowError
from ..schemas import BatchRequest, BatchResponse, ClassifyResponse, error_responses
from ..serving.base import ModelInfo, Prediction
from .handler import handle
from .jsonscan import json_values_bound, max_json_values

router = APIRouter(tags=["classify"])

MAX_FORM_PARTS = 8  # /classify takes two fields; a few more get a clear "unknown field" answer
MAX_FORM_FILES = 2

CLASSIFY_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary",
                              "description": "JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF file"},
                    "description": {"type": "string", "description": "caption text; optional, may be empty",
                                    "example": "a cherry tomato on the kitchen table"},
                },
            },
        }},
    }
}
BATCH_BODY_SCHEMA = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}}}
}


def render(p: Prediction, model: ModelInfo, top_k: int, explain: bool, request_id: str,
           min_confidence: float = 0.0, use_ood: bool = True) -> dict[str, Any]:
    labels = model.labels
    order = p.probabilities.argsort(kind="stable")[::-1][:top_k]
    reason = p.abstain_reason(min_confidence, use_ood)
    out: dict[str, Any] = {
        "label": None if reason else labels[int(order[0])],
        "confidence": float(p.probabilities[order[0]]),
        "abstained": reason is not None,
        "predictions": [{"label": labels[int(i)], "score": float(p.probabilities[i])} for i in order],
        "model": {"name": model.name, "version": model.version},
        "request_id": request_id,
    }
    if reason:
        out["abstain_reason"] = reason
    if p.ood is not None:
        out["ood_score"] = p.ood
    if explain:
        out["text_attention"] = [{"token": t, "weight": float(w)} for t, w in zip(p.tokens, p.attention, strict=True)]
    return out


async def read_form_row(request: Request) -> Row:
    """The multipart body as one row: exactly one ``image`` file, at most one ``description``."""
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_PARTS, max_part_size=1024 * 1024)
    except ServiceError:
        raise
    except StarletteHTTPException as exc:
        raise BadRequest(f"the request body is not valid multipart/form-data: {exc.detail}") from exc
    try:
        fields: dict[str, list[Any]] = {}
        for key, value in form.multi_items():
            fields.setdefault(key, []).append(value)
        unknown = sorted(set(fields) - {"image", "description"})
        if unknown:
            raise InvalidField(f"unknown form field(s): {truncate(', '.join(unknown))}; send 'image' and 'description'",
                               code="unknown_field")
        images = fields.get("image", [])
        if not images:
            raise InvalidField("the 'image' file field is required", code="missing_field")
        if len(images) > 1:
            raise InvalidField("send exactly one 'image' file field")
        if not isinstance(images[0], UploadFile):
            raise InvalidField("'image' must be a file part (with a filename), not a text field")
        descriptions = fields.get("description", [])
        if len(descriptions) > 1:
            raise InvalidField("send at most one 'description' field")
        description = descriptions[0] if descriptions else ""
        if not isinstance(description, str):
            raise InvalidField("'description' must be a text field, not a file")
        return Row(await images[0].read(), description)
    finally:
        await form.close()


@dataclass
class FormCodec:
    """``POST /classify``: one multipart row in, one JSON answer out."""

    pipeline: Pipeline
    top_k: int
    explain: bool
    min_confidence: float | None

    def check(self, model: ModelInfo) -> None:
        self.pipeline.check_top_k(self.top_k, model)

    async def decode(self, request: Request, body: bytes, model: ModelInfo) -> list[Row]:
        return [await read_form_row(request)]  # the form is parsed from the body already read

    def encode(self, answers: Sequence[Answer], model: ModelInfo, request: Request) -> Response:
        [answer] = answers
        if isinstance(answer, RowError):
            raise answer.exception()
        # a ready response skips FastAPI's re-validation of the model; the OpenAPI fuzz test checks
        # these answers against the declared schema
        return JSONResponse(render(answer, model, self.top_k, self.explain, request.state.request_id,
                                   self.pipeline.min_confidence(self.min_confidence), self.pipeline.settings.ood_abstain))


@router.post("/classify", response_model=ClassifyResponse, openapi_extra={**INFER_QUERY_OPENAPI, **CLASSIFY_FORM_SCHEMA},
             response_model_exclude_none=True,
             summary="Classify one image with its description",
             responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504))
async def classify(request: Request) -> Any:
    q, pipeline = read_query(request), request.app.state.pipeline
    return await handle(request, pipeline, FormCodec(pipeline, q.top_k, q.explain, q.min_confidence), q.model, q.version)


def parse_batch(body: bytes) -> BatchRequest:
    """pydantic's own JSON parser, the same as /v2's: strict (no NaN, no lone surrogates), and
    nesting beyond its recursion limit is invalid JSON, not a RecursionError."""
    try:
        return BatchRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e.get("type") == "json_invalid" for e in errors):
            raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
        raise RequestValidationError(errors) from None


@dataclass
class BatchCodec(FormCodec):
    """``POST /classify/batch``: JSON items in, one result (or error) per item out."""

    async def decode(self, request: Request, body: bytes, model: ModelInfo) -> list[Row]:
        s = self.pipeline.settings
        limit = max_json_values(s.max_batch_items, s.max_description_chars)
        if (values := json_values_bound(body)) > limit:  # before the parse, which holds the GIL throughout
            raise InvalidField(f"the batch body holds up to {values} JSON values; {s.max_batch_items} items "
                               f"need at most {limit}", code="too_many_items")
        # JSON parsing and validation of a body of many megabytes stay off the event loop
        payload = await anyio.to_thread.run_sync(parse_batch, body)
        self.pipeline.check_row_count(len(payload.items), "the batch")
        return [Row(item.image_base64, item.description, base64=True) for item in payload.items]

    def encode(self, answers: Sequence[Answer], model: ModelInfo, request: Request) -> Response:
        rid = request.state.request_id
        threshold, use_ood = self.pipeline.min_confidence(self.min_confidence), self.pipeline.settings.ood_abstain
        results: list[dict[str, Any]] = []
        for i, a in enumerate(answers):
            if isinstance(a, RowError):
                results.append({"error": {"code": a.code, "message": f"items[{i}]: {a.message}"}})
            else:
                results.append(render(a, model, self.top_k, self.explain, f"{rid}-{i}", threshold, use_ood))
        return JSONResponse({"results": results})


@router.post("/classify/batch", response_model=BatchResponse, response_model_exclude_none=True,
             summary="Classify up to 64 images in one call", openapi_extra={**INFER_QUERY_OPENAPI, **BATCH_BODY_SCHEMA},
             responses=error_responses(400, 401, 404, 413, 415, 422, 500, 503, 504))
async def classify_batch(request: Request) -> Any:
    q, pipeline = read_query(request), request.app.state.pipeline
    return await handle(request, pipeline, BatchCodec(pipeline, q.top_k, q.explain, q.min_confidence), q.model, q.version)
