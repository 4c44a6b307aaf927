"""The FastAPI application: ``create_app(settings)`` builds it; the model loads in ``lifespan``.

Image decoding and inference run in worker threads (never on the event loop), each
behind its own limiter, so /healthz and /readyz answer while inference is busy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__, tracing
from .batcher import Batcher, BatchFailed, QueueFull, QueueTimeout
from .errors import (
    BadRequest,
    InvalidField,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    error_body,
    install_error_handlers,
)
from .metrics import Metrics
from .middleware import RequestContextMiddleware
from .multipart import FilePart, parse_form
from .predictor import Prediction, Predictor
from .preprocessing import ImageError, load_image
from .schemas import (
    BatchRequest,
    BatchResponse,
    ClassifyResponse,
    Health,
    ModelInfo,
    Readiness,
    error_responses,
)
from .settings import Settings
from .v2 import build_router

log = logging.getLogger(__name__)
FAST_FORM_MAX_BYTES = 1024 * 1024  # multipart bodies up to this size are parsed by service.multipart

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


class ItemError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message


def parse_batch(body: bytes) -> BatchRequest:
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from exc
    try:
        return BatchRequest.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


def decode_base64_item(b64: str, index: int, size: int, settings: Settings) -> np.ndarray:
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ItemError("bad_base64", f"items[{index}].image_base64 is not valid base64") from None
    if len(data) > settings.max_upload_bytes:
        raise ItemError("payload_too_large", f"items[{index}] is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
    return load_image(data, size, settings.max_image_pixels)


class Admission:
    """Requests admitted and not yet answered (decoding, queued or in a batch), bounded.

    The batcher's queue alone is not enough: when decoding is the bottleneck, work piles
    up before the queue. Counting from admission refuses the excess at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0  # touched only on the event loop

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        if self.count + n > self.limit:
            raise Overloaded(f"{self.count} requests are in progress; {n} more would pass the limit of {self.limit}",
                             headers={"Retry-After": "1"})
        self.count += n
        try:
            yield
        finally:
            self.count -= n


class ImageLoadFailed(Exception):
    def __init__(self, err: ImageError) -> None:
        self.err = err


def _image_error_status(err: ImageError) -> int:
    return 413 if err.code == "image_too_large" else 400


def install_drain_on_sigterm(app: FastAPI, delay_s: float) -> None:
    """On SIGTERM: readiness turns 503 at once; the server stops accepting after ``delay_s``.

    uvicorn has installed its own SIGTERM handler by the time the lifespan runs (in every
    worker process); this one wraps it, so load balancers see "not ready" and stop sending
    before the listening socket closes, and uvicorn's graceful shutdown then drains what
    was accepted. A second SIGTERM skips the delay.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # not under a real server (e.g. TestClient): signals cannot be handled here
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(sig: int, frame: Any) -> None:
        if app.state.draining:
            previous(sig, frame)
            return
        app.state.draining = True
        log.info("SIGTERM: not ready from now; closing the listener in %.1f s, then draining", delay_s)
        loop.call_soon_threadsafe(loop.call_later, delay_s, previous, sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def create_app(settings: Settings | None = None, predictor: Predictor | None = None, load_model: bool = True) -> FastAPI:
    """Build the app. ``predictor`` may come loaded (``python -m service`` loads before binding)."""
    settings = settings or Settings()
    predictor = predictor or Predictor(settings)
    metrics = Metrics()
    tracing.configure(settings.otel_exporter)
    cores = os.cpu_count() or 1
    decode_limiter = anyio.CapacityLimiter(settings.decode_threads or cores)
    inline_decode_bytes = settings.inline_decode_bytes
    if inline_decode_bytes < 0:
        inline_decode_bytes = 128 * 1024 if cores <= (settings.workers or cores) else 0
    # one onnxruntime call at a time: each already uses intra_op_threads cores
    infer_limiter = anyio.CapacityLimiter(1)

    def run_batch(images: np.ndarray, descriptions: list[str]) -> list[Prediction]:
        encoded = predictor.encode(descriptions)
        with metrics.inference_latency.time():
            return predictor.predict(images, encoded)

    admission = Admission(settings.max_queue)
    batcher = Batcher(run_batch, metrics, settings.max_batch_size, settings.max_batch_delay_ms / 1000,
                      settings.max_queue, settings.request_timeout_ms / 1000, infer_limiter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_model and not predictor.ready:
            await anyio.to_thread.run_sync(predictor.load)
        if predictor.ready and predictor.manifest is not None:
            metrics.model_info.labels(predictor.manifest.name, predictor.manifest.version, predictor.providers[0]).set(1)
        await batcher.start()
        install_drain_on_sigterm(app, settings.drain_delay_s)
        try:
            yield
        finally:
            await batcher.stop()
            metrics.close()

    app = FastAPI(
        title="Image + text classifier",
        version=__version__,
        description="Classifies an image together with its description (Kim & Lee 2023 fused model), on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.predictor, app.state.metrics = settings, predictor, metrics
    app.state.batcher = batcher
    app.state.draining = False
    install_error_handlers(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(RequestContextMiddleware, settings=settings, metrics=metrics,
                       provider=lambda: predictor.providers[0] if predictor.providers else None)

    def require_ready() -> None:
        if not predictor.ready:
            raise NotReady(f"the model is not ready (state: {predictor.state})", headers={"Retry-After": "5"})

    async def decode(data: bytes) -> np.ndarray:
        assert predictor.manifest is not None
        size = predictor.manifest.image_size
        try:
            if len(data) <= inline_decode_bytes and data.startswith(b"\xff\xd8"):
                arr = load_image(data, size, settings.max_image_pixels)  # small JPEG: cheaper than a thread hop
            else:
                arr = await anyio.to_thread.run_sync(load_image, data, size, settings.max_image_pixels, limiter=decode_limiter)
        except ImageError as err:
            metrics.images_decoded.labels("error").inc()
            raise ImageLoadFailed(err) from err
        metrics.images_decoded.labels("ok").inc()
        return arr

    async def infer_one(image: np.ndarray, description: str) -> Prediction:
        try:
            return await batcher.submit(image, description)
        except QueueFull as exc:
            raise Overloaded(str(exc), headers={"Retry-After": "1"}) from None
        except QueueTimeout as exc:
            raise Timeout(str(exc)) from None
        except BatchFailed as exc:
            raise ServiceError(str(exc), code="inference_failed") from None

    def result(p: Prediction, top_k: int, explain: bool, request_id: str) -> dict[str, Any]:
        assert predictor.manifest is not None
        labels = predictor.manifest.labels
        order = np.argsort(-p.probabilities, kind="stable")[:top_k]
        out: dict[str, Any] = {
            "label": labels[int(order[0])],
            "confidence": float(p.probabilities[order[0]]),
            "predictions": [{"label": labels[int(i)], "score": float(p.probabilities[i])} for i in order],
            "model": {"name": predictor.manifest.name, "version": predictor.manifest.version},
            "request_id": request_id,
        }
        if explain:
            out["text_attention"] = [{"token": t, "weight": float(w)} for t, w in zip(p.tokens, p.attention, strict=True)]
        return out

    def check_top_k(top_k: int) -> None:
        assert predictor.manifest is not None
        n = len(predictor.manifest.labels)
        if top_k > n:
            raise InvalidField(f"top_k must be between 1 and {n} (the number of labels), got {top_k}", code="validation_error")

    def check_description(text: str, where: str = "description") -> None:
        if len(text) > settings.max_description_chars:
            raise InvalidField(f"{where} has {len(text)} characters; the limit is {settings.max_description_chars}",
                               code="description_too_long")

    async def read_form(request: Request) -> dict[str, list[str | FilePart]]:
        length = request.headers.get("content-length", "")
        # the fast path holds the whole body in memory: only for bodies of known, modest size;
        # larger ones stream through Starlette's parser, which spools files past 1 MiB to disk
        if length.isdigit() and int(length) <= FAST_FORM_MAX_BYTES:
            body = await request.body()  # framed by Content-Length (the HTTP parser), timed by the middleware
            fast = parse_form(body, request.headers.get("content-type", "").encode("latin-1"))
            if fast is not None:
                return fast
        # anything unusual: Starlette's general parser (on the same bytes if already read), with its errors
        try:
            form = await request.form(max_files=4, max_fields=8, max_part_size=1024 * 1024)
        except ServiceError:
            raise
        except UnicodeDecodeError as exc:
            raise BadRequest("the description is not valid UTF-8", code="invalid_description") from exc
        except StarletteHTTPException as exc:
            raise BadRequest(f"the request body is not valid multipart/form-data: {exc.detail}") from exc
        fields: dict[str, list[str | FilePart]] = {}
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    fields.setdefault(key, []).append(FilePart(value.filename or "", value.content_type, await value.read()))
                else:
                    fields.setdefault(key, []).append(value)
        finally:
            await form.close()
        return fields

    @app.post("/classify", response_model=ClassifyResponse, openapi_extra=CLASSIFY_FORM_SCHEMA, response_model_exclude_none=True,
              summary="Classify one image with its description",
              responses=error_responses(400, 401, 413, 415, 422, 500, 503, 504))
    async def classify(
        request: Request,
        top_k: int = Query(3, ge=1, description="how many labels to return (1..number of labels)"),
        explain: bool = Query(False, description="also return the caption tokens' attention weights"),
    ) -> Any:
        require_ready()
        check_top_k(top_k)
        # admission before the upload is read or decoded: overload must be cheap to answer
        with admission.admit(1):
            fields = await read_form(request)
            unknown = sorted(set(fields) - {"image", "description"})
            if unknown:
                raise InvalidField(f"unknown form field(s): {', '.join(unknown)}; send 'image' and 'description'",
                                   code="unknown_field")
            images = fields.get("image", [])
            if not images:
                raise InvalidField("the 'image' file field is required", code="missing_field")
            if len(images) > 1:
                raise InvalidField("send exactly one 'image' file field", code="invalid_field")
            upload = images[0]
            if not isinstance(upload, FilePart):
                raise InvalidField("'image' must be a file part (with a filename), not a text field", code="invalid_field")
            descriptions = fields.get("description", [])
            if len(descriptions) > 1:
                raise InvalidField("send at most one 'description' field", code="invalid_field")
            description = descriptions[0] if descriptions else ""
            if not isinstance(description, str):
                raise InvalidField("'description' must be a text field, not a file", code="invalid_field")
            check_description(description)
            data = upload.data
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(f"the image file is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
            try:
                image = await decode(data)
            except ImageLoadFailed as f:
                status = _image_error_status(f.err)
                return JSONResponse(error_body(f.err.code, str(f.err), request.state.request_id), status_code=status)
            pred = await infer_one(image, description)
            request.state.batch_size = pred.batch_size
            # a ready response skips FastAPI's re-validation of the model (3 % of the loop's time);
            # the OpenAPI fuzz test checks these answers against the declared schema
            return JSONResponse(result(pred, top_k, explain, request.state.request_id))

    @app.post("/classify/batch", response_model=BatchResponse, response_model_exclude_none=True,
              summary="Classify up to 64 images in one call", openapi_extra=BATCH_BODY_SCHEMA,
              responses=error_responses(400, 401, 413, 415, 422, 500, 503, 504))
    async def classify_batch(
        request: Request,
        top_k: int = Query(3, ge=1, description="how many labels to return per item"),
        explain: bool = Query(False, description="also return each caption's attention weights"),
    ) -> Any:
        require_ready()
        check_top_k(top_k)
        body = await request.body()
        # JSON parsing and validation of a body of many megabytes stay off the event loop
        payload = await anyio.to_thread.run_sync(parse_batch, body)
        items = payload.items
        if len(items) > settings.max_batch_items:
            raise InvalidField(f"the batch has {len(items)} items; the limit is {settings.max_batch_items}",
                               code="too_many_items")
        if not items:
            raise InvalidField("the batch has no items", code="validation_error")
        with admission.admit(len(items)):
            rid = request.state.request_id
            results: list[dict[str, Any] | None] = [None] * len(items)
            arrays: list[np.ndarray | None] = [None] * len(items)
            assert predictor.manifest is not None
            size = predictor.manifest.image_size

            async def prepare(i: int) -> None:
                item = items[i]
                if len(item.description) > settings.max_description_chars:
                    results[i] = {"error": {"code": "description_too_long",
                                            "message": f"items[{i}].description has {len(item.description)} characters; "
                                                       f"the limit is {settings.max_description_chars}"}}
                    return
                try:
                    arrays[i] = await anyio.to_thread.run_sync(decode_base64_item, item.image_base64, i, size, settings,
                                                               limiter=decode_limiter)
                    metrics.images_decoded.labels("ok").inc()
                except ItemError as err:
                    results[i] = {"error": {"code": err.code, "message": err.message}}
                except ImageError as err:
                    metrics.images_decoded.labels("error").inc()
                    results[i] = {"error": {"code": err.code, "message": f"items[{i}]: {err}"}}

            async with anyio.create_task_group() as tg:
                for i in range(len(items)):
                    tg.start_soon(prepare, i)
            good = [i for i, a in enumerate(arrays) if a is not None]

            async def run(i: int) -> None:
                image = arrays[i]
                assert image is not None
                try:
                    results[i] = result(await infer_one(image, items[i].description), top_k, explain, f"{rid}-{i}")
                except ServiceError as err:
                    results[i] = {"error": {"code": err.code, "message": err.message}}

            async with anyio.create_task_group() as tg:
                for i in good:
                    tg.start_soon(run, i)
            return {"results": results}

    @app.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, summary="Readiness: the model is loaded and warmed",
             responses=error_responses(503))
    async def readyz(request: Request) -> Any:
        if app.state.draining:
            body = error_body("not_ready", "the service is shutting down", request.state.request_id)
            body["status"] = "shutting_down"
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        if predictor.ready:
            return {"status": "ready", "model": predictor.manifest.name if predictor.manifest else None,
                    "provider": predictor.providers[0] if predictor.providers else None}
        body = error_body("not_ready", f"the model is not ready (state: {predictor.state})", request.state.request_id)
        body["status"] = predictor.state
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.get("/model", response_model=ModelInfo, summary="The loaded model, its providers and the service limits",
             responses=error_responses(401, 503))
    async def model_info() -> Any:
        require_ready()
        m = predictor.manifest
        assert m is not None
        return {
            "name": m.name, "version": m.version, "mode": m.mode, "labels": m.labels, "image_size": m.image_size,
            "max_caption_tokens": m.max_len,
            "inputs": [vars(t) for t in m.inputs], "outputs": [vars(t) for t in m.outputs],
            "providers": predictor.providers, "metrics": m.metrics,
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_image_pixels": settings.max_image_pixels,
                       "max_description_chars": settings.max_description_chars,
                       "max_batch_items": settings.max_batch_items, "max_batch_body_bytes": settings.max_batch_body_bytes,
                       "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue},
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"example": "classifier_http_requests_total{...} 1.0"}}}})
    async def prom() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def decode_or_raise(data: bytes) -> np.ndarray:
        try:
            return await decode(data)
        except ImageLoadFailed as f:
            raise f.err from None

    app.include_router(build_router(predictor, decode_or_raise, infer_one, settings.max_batch_items, __version__,
                                    lambda: bool(app.state.draining)))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            batch = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(batch.pop("$defs", {}))
            components["BatchRequest"] = batch
            if predictor.manifest is not None:  # top_k's upper bound is the loaded model's label count
                for path in ("/classify", "/classify/batch"):
                    for param in schema["paths"][path]["post"].get("parameters", []):
                        if param["name"] == "top_k":
                            param["schema"]["maximum"] = len(predictor.manifest.labels)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
