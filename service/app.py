"""``create_app(settings)``: wires the pipeline, the middleware and the routers; nothing else.

The request path is ``routes/*`` (one codec per protocol, ``routes/handler.py`` for what they
share) -> ``pipeline.Pipeline`` (resolve the model, validate, admit, decode, tokenize) -> that
model version's ``batcher.Batcher`` -> its backend (``serving/``: an onnxruntime session here,
or the owner process's). The repository's models load in the lifespan, before the first
request is served.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from . import __version__, tracing
from .errors import install_error_handlers
from .lifecycle import install_drain_on_sigterm
from .metrics import Metrics
from .middleware import RequestContextMiddleware, rows_body_limit
from .pipeline import Pipeline
from .routes import classify, health, pages, repository, v2
from .schemas import BatchRequest
from .serving.base import Backend, WorkerContext
from .settings import Settings


def create_app(settings: Settings | None = None, context: WorkerContext | None = None,
               preloaded: dict[Path, Backend] | None = None, load_model: bool = True) -> FastAPI:
    """Build the app. ``context``: the worker's topology, from the supervisor (default: one process
    holding its own sessions). ``preloaded``: backends loaded already, by artifact folder
    (``python -m service`` checks the model before binding)."""
    settings = (settings or Settings()).resolved(processes=1)  # resolved already under python -m service
    metrics = Metrics()
    pipeline = Pipeline(settings, metrics, context, preloaded)
    tracing.configure(settings.otel_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pipeline.start(load_model)
        install_drain_on_sigterm(pipeline, settings.drain_delay_s, settings.shutdown_grace_s)
        grpc_server = None
        if settings.grpc_port:
            from .grpc_v2.server import start_grpc  # grpcio is imported only where gRPC is on

            grpc_server = await start_grpc(pipeline, settings, metrics, rows_body_limit(settings))
        try:
            yield
        finally:
            if grpc_server is not None:  # no new calls; those in flight finish within the grace
                await grpc_server.stop(max(1.0, settings.shutdown_grace_s - settings.drain_delay_s))
            await pipeline.stop()
            metrics.close()

    app = FastAPI(title="Image + text classifier", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classifies an image together with its description (Kim & Lee 2023 fused model), on ONNX Runtime.")
    app.state.settings, app.state.pipeline, app.state.metrics = settings, pipeline, metrics
    install_error_handlers(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics, pipeline=pipeline)
    for module in (classify, health, v2, repository, pages):
        app.include_router(module.router)
    pages.mount_static(app)
    app.openapi = lambda: openapi_schema(app, pipeline)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI, pipeline: Pipeline) -> dict[str, Any]:
    """FastAPI's schema, plus the batch request model (read by hand, off the event loop) and
    ``top_k``'s upper bound from the loaded model's labels."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        batch = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(batch.pop("$defs", {}))
        components["BatchRequest"] = batch
        labels = [len(lo.info.labels) for lo in pipeline.repository.loaded()]
        if labels:
            for path in ("/classify", "/classify/batch"):
                for param in schema["paths"][path]["post"].get("parameters", []):
                    if param["name"] == "top_k":
                        param["schema"]["maximum"] = max(labels)
            app.openapi_schema = schema
        return schema
    return app.openapi_schema
