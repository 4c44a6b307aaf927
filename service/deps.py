"""FastAPI dependencies: what a route needs, taken from the app that serves it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from .pipeline import Pipeline
from .settings import Settings


# async: FastAPI runs plain ``def`` dependencies in a thread pool, a thread hop per request
async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
_MODEL_DOC = "the model to ask (GET /model lists them); default: the service's default model"
_VERSION_DOC = "the model's version; default: its default version (pinned in model.json, else the latest loaded)"
_MIN_CONFIDENCE_DOC = "abstain (label null) below this calibrated confidence; default: the service's CLASSIFIER_MIN_CONFIDENCE"
ModelName = Annotated[str | None, Query(max_length=128, description=_MODEL_DOC)]
ModelVersion = Annotated[str | None, Query(max_length=128, description=_VERSION_DOC)]


class InferQuery(BaseModel):
    """The query of ``POST /classify`` and ``/classify/batch``, validated in one call: FastAPI's
    parameters cost 70 µs of a 3 ms request here, one validation each (docs/performance.md).
    The same types, bounds and errors (422 ``validation_error``, ``query.<name>``); keys it does
    not read are ignored, as FastAPI does; a repeated key counts its last value, as FastAPI does."""

    top_k: int = Field(3, ge=1, description="how many labels to return (1..number of labels)")
    explain: bool = Field(False, description="also return the caption tokens' attention weights")
    min_confidence: float | None = Field(None, ge=0.0, le=1.0, description=_MIN_CONFIDENCE_DOC)
    model: str | None = Field(None, max_length=128, description=_MODEL_DOC)
    version: str | None = Field(None, max_length=128, description=_VERSION_DOC)


_QUERY_KEYS = tuple(InferQuery.model_fields)


def read_query(request: Request) -> InferQuery:
    query = request.query_params
    try:
        return InferQuery.model_validate({k: query[k] for k in _QUERY_KEYS if k in query})
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]) from None


# what FastAPI would have written for them in /openapi.json (the routes pass it as openapi_extra)
INFER_QUERY_OPENAPI: dict[str, Any] = {"parameters": [
    {"name": name, "in": "query", "required": False, "schema": prop, "description": prop["description"]}
    for name, prop in InferQuery.model_json_schema()["properties"].items()]}
