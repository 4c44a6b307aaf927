"""Request and response models of the HTTP API, with the examples shown in /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ERROR_CATALOGUE


class LabelScore(BaseModel):
    label: str
    score: float


class TokenWeight(BaseModel):
    token: str
    weight: float


class ModelRef(BaseModel):
    name: str
    version: str


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "label": "tomato", "confidence": 0.97, "abstained": False, "ood_score": 0.42,
        "predictions": [{"label": "tomato", "score": 0.97}, {"label": "apple", "score": 0.02},
                        {"label": "stop_sign", "score": 0.004}],
        "model": {"name": "image-text-classifier", "version": "2026.11.28"},
        "request_id": "3f2b8c0e9a7d4e51b1c2d3e4f5a6b7c8",
        "text_attention": [{"token": "cherry", "weight": 0.41}, {"token": "tomato", "weight": 0.55},
                           {"token": "salad", "weight": 0.04}],
    }]})

    label: str | None = Field(description="the most probable label; null when the service abstains")
    confidence: float = Field(description="the most probable label's calibrated probability")
    abstained: bool = Field(default=False, description="true when the service would rather not name a label: "
                            "the confidence is under min_confidence, or the input is unlike the training data")
    abstain_reason: str | None = Field(default=None, description="low_confidence | out_of_distribution (only when abstained)")
    ood_score: float | None = Field(default=None, description="out-of-distribution score: above 1.0 the input is unlike "
                                    "the model's training data (absent for artifacts without one)")
    predictions: list[LabelScore] = Field(description="top_k labels, best first")
    model: ModelRef
    request_id: str
    text_attention: list[TokenWeight] | None = Field(
        default=None, description="with explain=true: attention weight of each caption token")


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_base64: str = Field(description="the encoded image file (JPEG, PNG, ...), base64")
    description: str = Field(default="", description="caption text; may be empty")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "items": [{"image_base64": "/9j/4AAQSkZJRgABAQAAAQABAAD...", "description": "a cherry tomato"},
                  {"image_base64": "iVBORw0KGgoAAAANSUhEUgAA...", "description": ""}]}]})
    items: list[BatchItem] = Field(description="at most CLASSIFIER_MAX_BATCH_ITEMS (64) items")


class ItemError(BaseModel):
    code: str
    message: str


class BatchItemError(BaseModel):
    error: ItemError


class BatchResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"label": "tomato", "confidence": 0.97, "abstained": False, "predictions": [{"label": "tomato", "score": 0.97}],
         "model": {"name": "image-text-classifier", "version": "2026.11.28"}, "request_id": "3f2b8c0e-0"},
        {"error": {"code": "bad_base64", "message": "items[1].image_base64 is not valid base64"}},
    ]}]})
    results: list[ClassifyResponse | BatchItemError]


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})
    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready", "model": "image-text-classifier",
                                                                "provider": "CPUExecutionProvider"}]})
    status: str = Field(description="ready | not_loaded | loading | failed | shutting_down")
    model: str | None = None
    provider: str | None = None
    detail: str | None = None


class ModelInfoBody(BaseModel):
    name: str
    version: str
    mode: str
    labels: list[str]
    image_size: int
    max_caption_tokens: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    providers: list[str]
    metrics: dict[str, Any]
    trained_on: str = Field(description="one line on the data the model learned from (from its manifest)")
    training_data: dict[str, Any] = Field(default_factory=dict, description="the data sources as named at training "
                                          "(relative) and the samples per split as trained")
    example_caption: str = Field(default="", description="a caption from the model's own test data (the demo's "
                                 "placeholder); empty for artifacts that do not record one")
    calibration: dict[str, float] = Field(description="the softmax temperature fitted at export and the test split's "
                                          "expected calibration error before and after it")
    abstention: dict[str, Any] = Field(description="min_confidence (the service's default), whether the "
                                       "out-of-distribution score abstains, and what share of the test split it flagged")
    backbone: dict[str, Any] | None = Field(default=None, description="the pretrained image backbone, if any")
    quantization: dict[str, Any] | None = Field(default=None, description="an int8 artifact: its type, the float "
                                                "version it came from, and both graphs' accuracy on val and test")
    memory_bytes: int | None = Field(default=None, description="resident memory its load added to the worker (None: "
                                     "not measured, e.g. in the owner topology, where the owner holds the session)")
    load_seconds: float = Field(default=0.0, description="how long its load and warm-up took")
    default: bool = Field(default=True, description="this is the service's default model (no model was asked for)")
    models: list[dict[str, Any]] = Field(default_factory=list, description="every loaded model version: name, version, "
                                         "labels, ready, whether it is its model's default")
    default_model: str | None = Field(default=None, description="the model that answers requests that name none")
    limits: dict[str, int]


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries: the error schema with one example per error code."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        examples = {
            code: {"summary": code, "value": {"error": {"code": code, "message": msg, "request_id": "3f2b8c0e9a7d4e51"}}}
            for code, (st, msg) in ERROR_CATALOGUE.items() if st == status
        }
        out[status] = {"model": ErrorBody, "content": {"application/json": {"examples": examples}}}
    return out
