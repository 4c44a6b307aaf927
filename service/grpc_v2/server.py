"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on grpcio's asyncio server.

An adapter like ``routes/v2.py``: it translates the protocol's messages to rows and answers back,
and nothing else; the pipeline (validation, admission, decoding, batching) is the one every
protocol goes through, with the same limits and error codes. Each worker process runs its own
server on the same port (``SO_REUSEPORT``, grpcio's default on Linux), on the worker's event loop,
so a gRPC call costs no hop to another process. Started with the app when ``CLASSIFIER_GRPC_PORT``
is set; on shutdown it stops taking calls and lets those in flight finish within the grace.

BYTES inputs arrive raw (``raw_input_contents``, what tritonclient sends) or typed
(``contents.bytes_contents``); outputs go back raw (``raw_output_contents``), as Triton answers.
Errors: the service's error code maps to a gRPC status (``errors.GRPC_STATUS``) and travels in
the trailing metadata as ``error-code``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from .. import __version__
from ..codes import BadRequest, Overloaded, ServiceError, Timeout, Unauthorized, grpc_status
from ..metrics import Metrics
from ..pipeline import Pipeline, RowError
from ..routes.v2 import (
    OUTPUT_NAMES,
    PROTOCOL_EXTENSIONS,
    check_input,
    check_shape,
    deserialize_bytes,
    encode_binary,
    output_tensors,
    parameter_min_confidence,
    to_rows,
)
from ..routes.v2 import (
    metadata as v2_metadata,
)
from ..serving.base import Prediction
from ..settings import Settings
from . import inference_pb2 as pb
from . import inference_pb2_grpc as pb_grpc

log = logging.getLogger("service.grpc")
T = TypeVar("T")
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # like /v2/health/*: no API key


def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, pipeline: Pipeline, settings: Settings, metrics: Metrics, max_message_bytes: int) -> None:
        self.pipeline, self.settings, self.metrics = pipeline, settings, metrics
        self.max_message_bytes = max_message_bytes
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self.inflight_bytes = 0  # request messages being served, summed (bounded like HTTP bodies in flight)

    # --- the protocol's calls ----------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return await self._call("ServerLive", context, lambda: self._now(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return await self._call("ServerReady", context, lambda: self._now(pb.ServerReadyResponse(ready=self.pipeline.ready)))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        def ready() -> Awaitable[pb.ModelReadyResponse]:
            loaded = self.pipeline.repository.find(request.name, request.version or None)
            return self._now(pb.ModelReadyResponse(ready=loaded.ready and not self.pipeline.draining))
        return await self._call("ModelReady", context, ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return await self._call("ServerMetadata", context, lambda: self._now(pb.ServerMetadataResponse(
            name="image-text-classifier", version=__version__, extensions=PROTOCOL_EXTENSIONS)))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        def metadata() -> Awaitable[pb.ModelMetadataResponse]:
            info = self.pipeline.repository.find(request.name, request.version or None).info
            m = info.manifest
            t = pb.ModelMetadataResponse.TensorMetadata
            return self._now(pb.ModelMetadataResponse(
                name=info.name, versions=v2_metadata(self.pipeline, info)["versions"], platform="onnxruntime_onnx",
                inputs=[t(name="image", datatype="BYTES", shape=[-1]), t(name="description", datatype="BYTES", shape=[-1])],
                outputs=[t(name="label", datatype="BYTES", shape=[-1]),
                         t(name="probabilities", datatype="FP32", shape=[-1, len(m.labels)]),
                         t(name="text_attention", datatype="FP32", shape=[-1, -1]),
                         t(name="abstained", datatype="BOOL", shape=[-1]), t(name="ood_score", datatype="FP32", shape=[-1])]))
        return await self._call("ModelMetadata", context, metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._call("ModelInfer", context, lambda: self._infer(request, context))

    # --- inference -------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        p = self.pipeline
        loaded = p.model(request.model_name, request.model_version or None)
        p.refuse_if_full()
        size = request.ByteSize()
        budget = self.settings.max_inflight_body_bytes
        if self.inflight_bytes + size > budget:
            raise Overloaded(f"requests in progress hold {self.inflight_bytes} bytes; {size} more would pass the "
                             f"limit of {budget}")
        self.inflight_bytes += size
        try:
            rows = to_rows(self._tensors(request))
            parameters = {k: _param(v) for k, v in request.parameters.items()}
            min_confidence = parameter_min_confidence(parameters, p)
            names = [o.name for o in request.outputs] or list(OUTPUT_NAMES)
            for name in names:
                if name not in OUTPUT_NAMES:
                    raise BadRequest(f"unknown output '{name[:200]}'; the model has {', '.join(OUTPUT_NAMES)}", code="bad_request")
            remaining = context.time_remaining()
            try:  # the client's deadline bounds the work: past it the rows are cancelled, not finished
                async with asyncio.timeout(remaining):
                    answers = await p.run(loaded, rows)
            except TimeoutError:
                raise Timeout(f"the call's deadline ({remaining:.3f} s) passed before the answer") from None
        finally:
            self.inflight_bytes -= size
        for i, a in enumerate(answers):
            if isinstance(a, RowError):  # the protocol answers a request whole: the first failing row speaks for it
                raise a.exception(f"image[{i}]: ")
        preds = [a for a in answers if isinstance(a, Prediction)]
        info = loaded.info
        tensors = output_tensors(preds, info, min_confidence, self.settings.ood_abstain)
        response = pb.ModelInferResponse(model_name=info.name, model_version=info.version, id=request.id)
        for name in names:
            datatype, shape, value = tensors[name]
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(encode_binary(datatype, value))
        return response

    def _tensors(self, request: pb.ModelInferRequest) -> dict[str, tuple[list[Any], bool]]:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs", code="bad_request")
        tensors: dict[str, tuple[list[Any], bool]] = {}
        for i, t in enumerate(request.inputs):
            check_input(tensors, t.name, t.datatype)
            if raw:
                elements: list[Any] = deserialize_bytes(raw[i])
            elif t.contents.bytes_contents:
                elements = list(t.contents.bytes_contents)
            else:
                raise BadRequest(f"input '{t.name}' has no data (raw_input_contents or contents.bytes_contents)",
                                 code="bad_request")
            check_shape(t.name, list(t.shape), len(elements))
            tensors[t.name] = (elements, True)  # raw bytes either way: never base64 here
        if "image" not in tensors:
            raise BadRequest("input 'image' is required", code="bad_request")
        return tensors

    # --- around every call -----------------------------------------------------------
    @staticmethod
    async def _now(value: T) -> T:
        return value

    def _key_ok(self, context: grpc.aio.ServicerContext) -> bool:
        assert self._key_digest is not None
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        supplied = metadata.get("x-api-key")
        auth = metadata.get("authorization", "")
        if supplied is None and auth[:7].lower() == "bearer ":
            supplied = auth[7:].strip()
        digest = hashlib.sha256((supplied or "").encode()).digest()
        return hmac.compare_digest(digest, self._key_digest) and supplied is not None

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        start, code = time.perf_counter(), "OK"
        try:
            if self._key_digest is not None and method not in OPEN_METHODS and not self._key_ok(context):
                raise Unauthorized("missing or invalid API key (metadata authorization: Bearer <key> or x-api-key)")
            return await work()
        except ServiceError as exc:
            code = grpc_status(exc.code)
            context.set_trailing_metadata((("error-code", exc.code),))
            await context.abort(getattr(grpc.StatusCode, code), exc.message)
            raise  # abort raises; never reached
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code = "INTERNAL"
            log.error("gRPC %s failed: %s", method, type(exc).__name__, exc_info=exc)
            context.set_trailing_metadata((("error-code", "internal_error"),))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.metrics.grpc_requests.labels(method, code).inc()
            self.metrics.grpc_latency.labels(method).observe(elapsed)
            log.info("gRPC %s %s", method, code, extra={"method": method, "route": f"grpc:{method}", "status": code,
                                                        "latency_ms": round(elapsed * 1000, 2)})


async def start_grpc(pipeline: Pipeline, settings: Settings, metrics: Metrics, max_message_bytes: int) -> grpc.aio.Server:
    """This worker's gRPC server, listening on ``CLASSIFIER_GRPC_HOST:CLASSIFIER_GRPC_PORT``."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max(max_message_bytes, 64 * 1024 * 1024)),
                 ("grpc.so_reuseport", 1),  # every worker listens on the port; the kernel spreads connections
                 ("grpc.max_concurrent_streams", 256),
                 ("grpc.keepalive_permit_without_calls", 0)],
        # calls beyond this many at once are refused RESOURCE_EXHAUSTED before their handler runs
        maximum_concurrent_rpcs=max(1, settings.max_queue))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(pipeline, settings, metrics, max_message_bytes), server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
