"""FastAPI dependencies: what a route needs, taken from the app that serves it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

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
TopK = Annotated[int, Query(ge=1, description="how many labels to return (1..number of labels)")]
Explain = Annotated[bool, Query(description="also return the caption tokens' attention weights")]
ModelName = Annotated[str | None, Query(max_length=128, description=(
    "the model to ask (GET /model lists them); default: the service's default model"))]
ModelVersion = Annotated[str | None, Query(max_length=128, description=(
    "the model's version; default: its default version (pinned in model.json, else the latest loaded)"))]
MinConfidence = Annotated[float | None, Query(ge=0.0, le=1.0, description=(
    "abstain (label null) below this calibrated confidence; default: the service's CLASSIFIER_MIN_CONFIDENCE"))]
