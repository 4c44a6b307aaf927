"""Our own API: ``POST /classify`` (multipart, one image) and ``POST /classify/batch`` (JSON, many).

Both read their wire format into :class:`~service.pipeline.Row`\\ s and render the pipeline's
answers; limits, admission, decoding and errors are the pipeline's.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..deps import Explain, MinConfidence, PipelineDep, TopK
from ..errors import BadRequest, InvalidField, ServiceError, truncate
from ..pipeline import Pipeline, Row, RowError
from ..predictor import Prediction
from ..schemas import BatchRequest, BatchResponse, ClassifyResponse, error_responses
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


def render(p: Prediction, labels: list[str], model: dict[str, str], top_k: int, explain: bool, request_id: str,
           min_confidence: float = 0.0, use_ood: bool = True) -> dict[str, Any]:
    order = p.probabilities.argsort(kind="stable")[::-1][:top_k]
    reason = p.abstain_reason(min_confidence, use_ood)
    out: dict[str, Any] = {
        "label": None if reason else labels[int(order[0])],
        "confidence": float(p.probabilities[order[0]]),
        "abstained": reason is not None,
        "predictions": [{"label": labels[int(i)], "score": float(p.probabilities[i])} for i in order],
        "model": model,
        "request_id": request_id,
    }
    if reason:
        out["abstain_reason"] = reason
    if p.ood is not None:
        out["ood_score"] = p.ood
    if explain:
        out["text_attention"] = [{"token": t, "weight": float(w)} for t, w in zip(p.tokens, p.attention, strict=True)]
    return out


def _model_ref(pipeline: Pipeline) -> dict[str, str]:
    m = pipeline.predictor.manifest
    assert m is not None
    return {"name": m.name, "version": m.version}


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
            raise InvalidField("send exactly one 'image' file field", code="invalid_field")
        if not isinstance(images[0], UploadFile):
            raise InvalidField("'image' must be a file part (with a filename), not a text field", code="invalid_field")
        descriptions = fields.get("description", [])
        if len(descriptions) > 1:
            raise InvalidField("send at most one 'description' field", code="invalid_field")
        description = descriptions[0] if descriptions else ""
        if not isinstance(description, str):
            raise InvalidField("'description' must be a text field, not a file", code="invalid_field")
        return Row(await images[0].read(), description)
    finally:
        await form.close()


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=CLASSIFY_FORM_SCHEMA, response_model_exclude_none=True,
             summary="Classify one image with its description",
             responses=error_responses(400, 401, 413, 415, 422, 500, 503, 504))
async def classify(request: Request, pipeline: PipelineDep, top_k: TopK = 3, explain: Explain = False,
                   min_confidence: MinConfidence = None) -> Any:
    pipeline.require_ready()
    pipeline.check_top_k(top_k)
    pipeline.refuse_if_full()
    await request.body()  # waiting for the network holds nothing; the form is parsed from these bytes
    pipeline.refuse_if_full()  # still room? parsing is work on the event loop: not for a row that cannot run
    row = await read_form_row(request)
    [answer] = await pipeline.run([row], request.state)
    if isinstance(answer, RowError):
        raise answer.exception()
    # a ready response skips FastAPI's re-validation of the model; the OpenAPI fuzz test checks
    # these answers against the declared schema
    return JSONResponse(render(answer, pipeline.labels, _model_ref(pipeline), top_k, explain, request.state.request_id,
                               pipeline.min_confidence(min_confidence), pipeline.settings.ood_abstain))


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


@router.post("/classify/batch", response_model=BatchResponse, response_model_exclude_none=True,
             summary="Classify up to 64 images in one call", openapi_extra=BATCH_BODY_SCHEMA,
             responses=error_responses(400, 401, 413, 415, 422, 500, 503, 504))
async def classify_batch(request: Request, pipeline: PipelineDep, top_k: TopK = 3, explain: Explain = False,
                         min_confidence: MinConfidence = None) -> Any:
    pipeline.require_ready()
    pipeline.check_top_k(top_k)
    pipeline.refuse_if_full()
    body = await request.body()
    pipeline.refuse_if_full()
    s = pipeline.settings
    limit = max_json_values(s.max_batch_items, s.max_description_chars)
    if (values := json_values_bound(body)) > limit:  # before the parse, which holds the GIL throughout
        raise InvalidField(f"the batch body holds up to {values} JSON values; {s.max_batch_items} items "
                           f"need at most {limit}", code="too_many_items")
    # JSON parsing and validation of a body of many megabytes stay off the event loop
    payload = await anyio.to_thread.run_sync(parse_batch, body)
    pipeline.check_row_count(len(payload.items), "the batch")
    rows = [Row(item.image_base64, item.description, base64=True) for item in payload.items]
    answers = await pipeline.run(rows, request.state)
    rid, labels, model = request.state.request_id, pipeline.labels, _model_ref(pipeline)
    threshold, use_ood = pipeline.min_confidence(min_confidence), pipeline.settings.ood_abstain
    results: list[dict[str, Any]] = []
    for i, a in enumerate(answers):
        if isinstance(a, RowError):
            results.append({"error": {"code": a.code, "message": f"items[{i}]: {a.message}"}})
        else:
            results.append(render(a, labels, model, top_k, explain, f"{rid}-{i}", threshold, use_ood))
    return JSONResponse({"results": results})
