"""Probes and introspection: ``/healthz``, ``/readyz``, ``/model``, ``/metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import PipelineDep, SettingsDep
from ..errors import error_response
from ..schemas import Health, ModelInfo, Readiness, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
async def healthz() -> Any:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="Readiness: the model is loaded and warmed",
            responses=error_responses(503))
async def readyz(request: Request, pipeline: PipelineDep) -> Any:
    predictor = pipeline.predictor
    if pipeline.draining:
        return error_response(request, "not_ready", "the service is shutting down", {"status": "shutting_down"})
    if predictor.ready:
        return {"status": "ready", "model": predictor.manifest.name if predictor.manifest else None,
                "provider": predictor.providers[0] if predictor.providers else None}
    return error_response(request, "not_ready", f"the model is not ready (state: {predictor.state})",
                          {"status": predictor.state})


@router.get("/model", response_model=ModelInfo, summary="The loaded model, its providers and the service limits",
            responses=error_responses(401, 503))
async def model_info(pipeline: PipelineDep, settings: SettingsDep) -> Any:
    pipeline.require_ready()
    m = pipeline.predictor.manifest
    assert m is not None
    return {
        "name": m.name, "version": m.version, "mode": m.mode, "labels": m.labels, "image_size": m.image_size,
        "max_caption_tokens": m.max_len,
        "inputs": [vars(t) for t in m.inputs], "outputs": [vars(t) for t in m.outputs],
        "providers": pipeline.predictor.providers, "metrics": m.metrics, "trained_on": m.describe_training_data(),
        "training_data": {"sources": [Path(str(x)).name if Path(str(x)).is_absolute() else str(x) for x in m.data.get("sources", [])],
                          "n": {k: v for k, v in (m.data.get("n") or {}).items() if k in ("train", "val", "test")}},
        "example_caption": m.example_caption,
        "calibration": {k: m.calibration[k] for k in ("temperature", "ece_test_before", "ece_test_after") if k in m.calibration},
        "abstention": {"min_confidence": settings.min_confidence, "ood": settings.ood_abstain and m.ood_threshold is not None,
                       "ood_method": m.ood.get("method"), "ood_flagged_test": (m.ood.get("flagged") or {}).get("test")},
        "backbone": {k: m.backbone[k] for k in ("name", "weights_sha256", "licence", "input_size") if k in m.backbone} or None,
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_image_pixels": settings.max_image_pixels,
                   "max_description_chars": settings.max_description_chars,
                   "max_batch_items": settings.max_batch_items, "max_batch_body_bytes": settings.max_batch_body_bytes,
                   "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue},
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"example": "classifier_http_requests_total{...} 1.0"}}}})
async def prom(request: Request) -> Response:
    # off the event loop (it reads every worker's metric files) and cached for a second
    age = request.app.state.settings.metrics_max_age_s
    text = await anyio.to_thread.run_sync(request.app.state.metrics.render_cached, age)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
