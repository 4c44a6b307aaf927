"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on grpcio's asyncio server.

An adapter like ``routes/v2.py``: it translates the protocol's messages to rows and answers back,
and nothing else; the pipeline (validation, admission, decoding, batching) is the one every
protocol goes through, with the same limits and error codes. Each worker process runs its own
server on the same port (``SO_REUSEPORT``, grpcio's default on Linux), on the worker's event loop,
so a gRPC call costs no hop to another process. Started with the app when ``CLASSIFIER_GRPC_PORT``
is set; on shutdown it stops taking calls and lets those in flight finish within the grace.

BYTES inputs arrive raw (``raw_input_contents``, what tritonclient sends) or typed
(``contents.bytes_contents``); outputs go back raw (``raw_output_contents``), as Triton answers.
Errors: the service's error code maps to a gRPC status (``codes.py``) and travels in
the trailing metadata as ``error-code``.

Bounds, the same as REST's (docs/reliability.md). grpcio reads a call's whole message before any
handler runs, so the bound on those bytes is calls x message size: a worker handles at most
``CLASSIFIER_GRPC_MAX_CONCURRENT_CALLS`` calls at once (more are refused RESOURCE_EXHAUSTED by
grpcio) and a message is at most the budget's share of one call (``message_limit``), so the messages
a worker holds never pass ``CLASSIFIER_MAX_INFLIGHT_BODY_BYTES``. Every handler gets its message as
bytes, counts them against that budget, then checks its counts on the wire (``precheck.py``) before
protobuf parses it, so neither size nor element count turns into memory or event-loop time first.
An undecodable message is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from .. import __version__, dataplane
from ..codes import BadRequest, Overloaded, ServiceError, Unauthorized, grpc_status
from ..metrics import Metrics
from ..pipeline import Answer, Pipeline, Row, RowError
from ..routes.v2 import (
    MAX_ELEMENTS,
    MAX_TENSORS,
    check_input,
    check_shape,
    deserialize_bytes,
    encode_binary,
    parameter_min_confidence,
    to_rows,
)
from ..serving.base import ModelInfo, Prediction
from ..settings import Settings
from . import inference_pb2 as pb
from .precheck import Caps, Malformed, check_infer_request

log = logging.getLogger("service.grpc")
T = TypeVar("T")
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # like /v2/health/*: no API key
SERVICE = "inference.GRPCInferenceService"
MAX_PARAMETERS = 64  # entries of one parameters map (the protocol's requests use one or two)
MAX_DIMS = 8  # shape dimensions of one input (ours are 1-D)
CAPS = Caps(tensors=MAX_TENSORS, elements=MAX_ELEMENTS, parameters=MAX_PARAMETERS, dims=MAX_DIMS)


def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def message_limit(settings: Settings, rows_limit: int) -> int:
    """The largest message a call may send: what a request of rows can need (the /v2 body bound),
    and no more than the in-flight budget's share of one call, so that
    ``CLASSIFIER_GRPC_MAX_CONCURRENT_CALLS`` messages at once never pass the budget. grpcio reads a
    call's whole message before any handler runs: the product of the two is the only bound on it."""
    return max(1024, min(rows_limit, settings.max_inflight_body_bytes // settings.grpc_max_concurrent_calls))


class InferenceService:
    def __init__(self, pipeline: Pipeline, settings: Settings, metrics: Metrics, max_message_bytes: int) -> None:
        self.pipeline, self.settings, self.metrics = pipeline, settings, metrics
        self.max_message_bytes = max_message_bytes
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self.inflight_bytes = 0  # request messages being served, summed (bounded like HTTP bodies in flight)

    # --- the protocol's calls (each wrapped once by ``handler``: key, budget, parse, status) ---------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=dataplane.server_ready(self.pipeline))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=dataplane.model_ready(self.pipeline, request.name, request.version or None))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=dataplane.SERVER_NAME, version=__version__, extensions=dataplane.PROTOCOL_EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        d = dataplane.model_metadata(self.pipeline, self.pipeline.repository.find(request.name, request.version or None).info)
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=d["name"], versions=d["versions"], platform=d["platform"],
                                        inputs=[t(**x) for x in d["inputs"]], outputs=[t(**x) for x in d["outputs"]])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    # --- inference -------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """``dataplane.infer`` with the protocol's message (already read: grpcio hands it over whole)."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        names = [o.name for o in request.outputs] or list(dataplane.OUTPUT_NAMES)
        params: dict[str, float] = {}

        def check(info: ModelInfo) -> None:  # after the model is found, as REST's V2 checks them
            if len(request.parameters) > MAX_PARAMETERS:
                raise BadRequest(f"more than {MAX_PARAMETERS} parameters")
            parameters = {k: _param(v) for k, v in request.parameters.items()}
            params["min_confidence"] = parameter_min_confidence(parameters, self.pipeline)
            dataplane.check_outputs(names)

        async def read() -> pb.ModelInferRequest:
            return request

        async def decode(message: pb.ModelInferRequest, info: ModelInfo) -> list[Row]:
            return to_rows(self._tensors(message))

        def encode(answers: Sequence[Answer], info: ModelInfo) -> pb.ModelInferResponse:
            for i, a in enumerate(answers):
                if isinstance(a, RowError):  # the protocol answers a request whole: the first failing row speaks for it
                    raise a.exception(f"image[{i}]: ")
            preds = [a for a in answers if isinstance(a, Prediction)]
            tensors = dataplane.output_tensors(preds, info, params["min_confidence"], self.settings.ood_abstain)
            response = pb.ModelInferResponse(model_name=info.name, model_version=info.version, id=request.id)
            for name in names:
                datatype, shape, value = tensors[name]
                response.outputs.add(name=name, datatype=datatype, shape=shape)
                response.raw_output_contents.append(encode_binary(datatype, value))
            return response

        return await dataplane.infer(self.pipeline, request.model_name, request.model_version or None,
                                     check=check, read=read, decode=decode, encode=encode, deadline=deadline)

    def _tensors(self, request: pb.ModelInferRequest) -> dict[str, tuple[list[Any], bool]]:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        tensors: dict[str, tuple[list[Any], bool]] = {}
        for i, t in enumerate(request.inputs):
            check_input(tensors, t.name, t.datatype)
            c = t.contents
            if c.bool_contents or c.int_contents or c.int64_contents or c.uint_contents or c.uint64_contents \
                    or c.fp32_contents or c.fp64_contents:
                raise BadRequest(f"input '{t.name}' is BYTES: its data belongs in contents.bytes_contents or "
                                 "raw_input_contents")
            if raw:
                elements: list[Any] = deserialize_bytes(raw[i])
            elif c.bytes_contents:
                elements = list(c.bytes_contents)
            else:
                raise BadRequest(f"input '{t.name}' has no data (raw_input_contents or contents.bytes_contents)")
            check_shape(t.name, list(t.shape), len(elements))
            tensors[t.name] = (elements, True)  # raw bytes either way: never base64 here
        if "image" not in tensors:
            raise BadRequest("input 'image' is required")
        return tensors

    # --- around every call -----------------------------------------------------------
    def _key_ok(self, context: grpc.aio.ServicerContext) -> bool:
        assert self._key_digest is not None
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        supplied = metadata.get("x-api-key")
        auth = metadata.get("authorization", "")
        if supplied is None and auth[:7].lower() == "bearer ":
            supplied = auth[7:].strip()
        digest = hashlib.sha256((supplied or "").encode()).digest()
        return hmac.compare_digest(digest, self._key_digest) and supplied is not None

    def handler(self, method: str, message: type[Any]) -> grpc.RpcMethodHandler:
        """``method`` as grpcio sees it: the message arrives as bytes (no deserializer), so its size is
        counted and its counts checked before protobuf parses it."""
        serve = getattr(self, method)

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await self._call(method, context, lambda: self._parse_and_serve(method, message, serve, raw, context))

        return grpc.unary_unary_rpc_method_handler(call, response_serializer=lambda m: m.SerializeToString())

    async def _parse_and_serve(self, method: str, message: type[Any], serve: Callable[..., Awaitable[Any]], raw: bytes,
                               context: grpc.aio.ServicerContext) -> Any:
        size = len(raw)
        budget = self.settings.max_inflight_body_bytes
        if self.inflight_bytes + size > budget:
            raise Overloaded(f"requests in progress hold {self.inflight_bytes} bytes; {size} more would pass the "
                             f"limit of {budget}")
        self.inflight_bytes += size
        try:
            try:
                if method == "ModelInfer":
                    check_infer_request(raw, CAPS)
                request = message.FromString(raw)
            except Malformed as exc:
                raise BadRequest(str(exc)) from None
            except DecodeError:
                raise BadRequest(f"the message is not a valid {message.__name__} (protobuf)") from None
            return await serve(request, context)
        finally:
            self.inflight_bytes -= size

    async def _call(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        start, status = time.perf_counter(), "OK"
        failure: tuple[str, str] | None = None  # (error code, message)
        try:
            if self._key_digest is not None and method not in OPEN_METHODS and not self._key_ok(context):
                raise Unauthorized("missing or invalid API key (metadata authorization: Bearer <key> or x-api-key)")
            return await work()
        except ServiceError as exc:
            failure = (exc.code, exc.message)
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.error("gRPC %s failed: %s", method, type(exc).__name__, exc_info=exc)
            failure = ("internal_error", "internal error; see the service log")
        finally:
            if failure is not None:
                status = grpc_status(failure[0])
            elapsed = time.perf_counter() - start
            self.metrics.grpc_requests.labels(method, status).inc()
            self.metrics.grpc_latency.labels(method).observe(elapsed)
            log.info("gRPC %s %s", method, status, extra={"method": method, "route": f"grpc:{method}", "status": status,
                                                          "latency_ms": round(elapsed * 1000, 2)})
        # The status is set, not raised with context.abort(): grpcio keeps an abort's exception on the
        # call's state, a reference cycle through every frame of the call (the message's bytes among
        # them) that lived until the next full garbage collection (seen: +12 MB kept per refused
        # 3.9 MB call, +130 MB before a collection came). grpcio sends no message with a non-OK status.
        del work
        context.set_trailing_metadata((("error-code", failure[0]),))
        context.set_code(getattr(grpc.StatusCode, status))
        context.set_details(failure[1])
        return cast(T, None)


METHODS = {"ServerLive": pb.ServerLiveRequest, "ServerReady": pb.ServerReadyRequest, "ModelReady": pb.ModelReadyRequest,
           "ServerMetadata": pb.ServerMetadataRequest, "ModelMetadata": pb.ModelMetadataRequest,
           "ModelInfer": pb.ModelInferRequest}


async def start_grpc(pipeline: Pipeline, settings: Settings, metrics: Metrics, rows_limit: int) -> grpc.aio.Server:
    """This worker's gRPC server, listening on ``CLASSIFIER_GRPC_HOST`` (default: the service's own
    host) and ``CLASSIFIER_GRPC_PORT``; ``rows_limit``: the largest body a request of rows can need."""
    calls = settings.grpc_max_concurrent_calls
    max_message_bytes = message_limit(settings, rows_limit)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max(max_message_bytes, 64 * 1024 * 1024)),
                 ("grpc.so_reuseport", 1),  # every worker listens on the port; the kernel spreads connections
                 ("grpc.max_concurrent_streams", 256),
                 ("grpc.keepalive_permit_without_calls", 0),
                 # fixed HTTP/2 windows (64 KiB a stream): with BDP probing a refused call's stream window grew
                 # to megabytes that grpcio buffered anyway (peak RSS +133 MB for 96 refused 3.9 MB calls; +51 MB
                 # without). The cost: one stream moves at most 64 KiB per round trip on a slow link
                 ("grpc.http2.bdp_probe", 0)],
        # calls beyond this many at once are refused RESOURCE_EXHAUSTED by grpcio, before a handler runs
        maximum_concurrent_rpcs=calls)
    service = InferenceService(pipeline, settings, metrics, max_message_bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {name: service.handler(name, message) for name, message in METHODS.items()}),))
    host = settings.grpc_host or "127.0.0.1"
    address = f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"  # IPv6: bracketed
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s: %d calls at once per worker, messages up to %d bytes",
             address, calls, max_message_bytes)
    return server
