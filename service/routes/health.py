"""Probes and introspection: ``/healthz``, ``/readyz``, ``/model``, ``/metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..dataplane import server_state, version_key
from ..deps import ModelName, ModelVersion, PipelineDep, SettingsDep
from ..errors import error_response
from ..schemas import Health, ModelInfoBody, Readiness, error_responses
from ..serving.base import ModelInfo
from ..settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
async def healthz() -> Any:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="Readiness: the default model is loaded and warmed",
            responses=error_responses(503))
async def readyz(request: Request, pipeline: PipelineDep) -> Any:
    state = server_state(pipeline)
    if state == "ready":
        info = pipeline.model().info  # the default model's default version: what server_state found ready
        return {"status": "ready", "model": info.name, "provider": info.provider or None}
    message = "the service is shutting down" if state == "shutting_down" else f"the model is not ready (state: {state})"
    return error_response(request, "not_ready", message, {"status": state})


def describe(info: ModelInfo, settings: Settings) -> dict[str, Any]:
    """One loaded model version as ``/model`` shows it."""
    m = info.manifest
    return {
        "name": info.name, "version": info.version, "mode": m.mode, "labels": m.labels, "image_size": m.image_size,
        "max_caption_tokens": m.max_len,
        "inputs": [vars(t) for t in m.inputs], "outputs": [vars(t) for t in m.outputs],
        "providers": list(info.providers), "metrics": m.metrics, "trained_on": m.describe_training_data(),
        "training_data": {"sources": [Path(str(x)).name if Path(str(x)).is_absolute() else str(x) for x in m.data.get("sources", [])],
                          "n": {k: v for k, v in (m.data.get("n") or {}).items() if k in ("train", "val", "test")}},
        "example_caption": m.example_caption,
        "calibration": {k: m.calibration[k] for k in ("temperature", "ece_test_before", "ece_test_after") if k in m.calibration},
        "abstention": {"min_confidence": settings.min_confidence, "ood": settings.ood_abstain and m.ood_threshold is not None,
                       "ood_method": m.ood.get("method"), "ood_flagged_test": (m.ood.get("flagged") or {}).get("test")},
        "backbone": {k: m.backbone[k] for k in ("name", "weights_sha256", "licence", "input_size") if k in m.backbone} or None,
        "quantization": ({"type": m.quantization.get("type"), "source_version": (m.quantization.get("source") or {}).get("version"),
                          "accuracy": {s: f.get("accuracy") for s, f in (m.quantization.get("figures") or {}).items()}}
                         if m.quantization else None),
        "memory_bytes": info.memory_bytes, "load_seconds": info.load_seconds,
    }


@router.get("/model", response_model=ModelInfoBody, summary="The default model, every loaded model, and the service limits",
            responses=error_responses(401, 404, 503))
async def model_info(pipeline: PipelineDep, settings: SettingsDep, model: ModelName = None, version: ModelVersion = None) -> Any:
    default = pipeline.model(model, version).info
    repo = pipeline.repository
    return {
        **describe(default, settings),
        "default": model is None and version is None,
        "models": [{"name": lo.info.name, "version": lo.info.version, "labels": lo.info.labels, "ready": lo.ready,
                    "default": repo.default_version(lo.info.name) is lo, "trained_on": lo.info.manifest.describe_training_data(),
                    "example_caption": lo.info.manifest.example_caption, "memory_bytes": lo.info.memory_bytes}
                   for lo in sorted(repo.loaded(), key=lambda lo: (lo.info.name, version_key(lo.info.version)))],
        "default_model": repo.default_name(),
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_image_pixels": settings.max_image_pixels,
                   "max_description_chars": settings.max_description_chars,
                   "max_batch_items": settings.max_batch_items, "max_batch_body_bytes": settings.max_batch_body_bytes,
                   "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
                   "max_loaded_models": settings.max_loaded_models},
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"example": "classifier_http_requests_total{...} 1.0"}}}})
async def prom(request: Request) -> Response:
    # off the event loop (it reads every worker's metric files) and cached for a second
    age = request.app.state.settings.metrics_max_age_s
    text = await anyio.to_thread.run_sync(request.app.state.metrics.render_cached, age)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
