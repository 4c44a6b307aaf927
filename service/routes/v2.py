"""Open Inference Protocol (KServe V2 REST): an adapter over the same pipeline as ``/classify``.

Inputs: ``image`` (BYTES, shape [N]: encoded image files; base64 strings when sent as JSON
data) and ``description`` (BYTES, [N]; optional). Outputs: ``label`` (BYTES; empty where the
service abstains), ``probabilities`` (FP32, [N, C], calibrated), ``text_attention`` (FP32, [N, L],
zero past each caption's tokens), ``abstained`` (BOOL, [N]) and ``ood_score`` (FP32, [N]: above 1
the input is unlike the training data; NaN for artifacts without the score). The request parameter
``min_confidence`` (a number in [0, 1]) sets this request's abstention threshold.
Supports the binary tensor data extension (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data`` / ``binary_data_output``), which ``tritonclient[http]``
uses by default. Errors are the protocol's ``{"error": message}`` (with our ``code`` beside it).

The request header is validated with pydantic models (the protocol's JSON schema as reference)
before anything is allocated: strict on every key the service reads (a number where text belongs,
a non-integer shape, a non-finite float or JSON nested deeper than the models allow is a 400,
never a 500), tolerant of keys it does not read, as the protocol allows and KServe's own server
is: KServe's SDK sends ``model_name`` in the body, Triton's clients ``sequence_id`` or
``priority`` parameters. Such keys are ignored, counted in ``classifier_v2_unknown_keys_total``
by level and logged at debug; their number and the length of their names are bounded.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Sequence
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .. import __version__, dataplane
from ..dataplane import INPUTS, OUTPUT_NAMES, PROTOCOL_EXTENSIONS, SERVER_NAME, check_outputs, output_tensors, server_ready
from ..deps import PipelineDep
from ..errors import BadRequest, describe_validation_errors, http_status, truncate
from ..pipeline import Answer, Pipeline, Row, RowError
from ..serving.base import ModelInfo, Prediction
from .handler import handle
from .jsonscan import json_values_bound, max_json_values

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe V2)"])
MAX_TENSORS = 16  # inputs or outputs named in one request
MAX_ELEMENTS = 4096  # JSON data elements per tensor, before the pipeline's own row limit
MAX_UNKNOWN_KEYS = 64  # keys the service does not read, per object (request, input, output, parameters)
MAX_UNKNOWN_KEY_CHARS = 256  # the length of such a key's name
# parameters the service reads; any other parameter is the protocol's or a client's own, and ignored
KNOWN_PARAMETERS = {"request": {"binary_data_output", "min_confidence"}, "input": {"binary_data_size"},
                    "output": {"binary_data"}}

FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Scalar = StrictBool | StrictInt | FiniteFloat | Annotated[StrictStr, Field(max_length=1024)]
Parameters = Annotated[dict[Annotated[StrictStr, Field(max_length=128)], Scalar], Field(max_length=32)]
Text = Annotated[StrictStr, Field(max_length=64 * 1024 * 1024)]


class _Open(BaseModel):
    """Strict types for the fields declared here; other keys are kept aside (``model_extra``),
    checked for number and name length by :func:`unknown_keys`, and otherwise ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class InferInput(_Open):
    name: Annotated[StrictStr, Field(max_length=128)]
    shape: Annotated[list[Annotated[StrictInt, Field(ge=0, le=1 << 31)]], Field(max_length=8)]
    datatype: Annotated[StrictStr, Field(max_length=16)]
    parameters: Parameters | None = None
    # BYTES elements as JSON strings, flat or one level nested (row-major)
    data: Annotated[list[Text | Annotated[list[Text], Field(max_length=MAX_ELEMENTS)]], Field(max_length=MAX_ELEMENTS)] | None = None


class RequestedOutput(_Open):
    name: Annotated[StrictStr, Field(max_length=128)]
    parameters: Parameters | None = None


class InferRequest(_Open):
    id: Annotated[StrictStr, Field(max_length=256)] | None = None
    parameters: Parameters | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=MAX_TENSORS)]
    outputs: Annotated[list[RequestedOutput], Field(max_length=MAX_TENSORS)] | None = None


class V2ErrorBody(BaseModel):
    error: str = Field(description="what went wrong")
    code: str = Field(description="the service's error code (the same as on /classify)")


def v2_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": V2ErrorBody, "description": "the protocol's error shape"} for s in statuses}


def _bad(message: str) -> BadRequest:
    return BadRequest(message)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """BYTES tensor in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad("malformed BYTES tensor data")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad("malformed BYTES tensor data")
        out.append(raw[pos : pos + n])
        pos += n
        if len(out) > MAX_ELEMENTS:
            raise _bad(f"a BYTES tensor has more than {MAX_ELEMENTS} elements")
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _unknown_in(level: str, keys: Any, known: set[str] | None = None) -> list[str]:
    names = [k for k in keys if known is None or k not in known]
    if len(names) > MAX_UNKNOWN_KEYS:
        raise _bad(f"the {level} object has {len(names)} keys the service does not read; the limit is {MAX_UNKNOWN_KEYS}")
    for k in names:
        if len(k) > MAX_UNKNOWN_KEY_CHARS:
            raise _bad(f"the {level} object has a key of {len(k)} characters; the limit is {MAX_UNKNOWN_KEY_CHARS}")
    return names


def unknown_keys(req: InferRequest) -> dict[str, list[str]]:
    """level -> the keys the service does not read, at every level the protocol leaves open
    (request, each input and requested output, and their parameters); bounded in number and length."""
    found: dict[str, list[str]] = {}

    def add(level: str, keys: Any, known: set[str] | None = None) -> None:
        names = _unknown_in(level, keys, known)
        if names:
            found.setdefault(level, []).extend(names)

    add("request", req.model_extra or {})
    add("parameters", req.parameters or {}, KNOWN_PARAMETERS["request"])
    for t in req.inputs:
        add("input", t.model_extra or {})
        add("parameters", t.parameters or {}, KNOWN_PARAMETERS["input"])
    for o in req.outputs or []:
        add("output", o.model_extra or {})
        add("parameters", o.parameters or {}, KNOWN_PARAMETERS["output"])
    return found


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    if header_length is not None:
        if not re.fullmatch(r"[0-9]{1,19}", header_length) or int(header_length) > len(body):
            raise _bad("Inference-Header-Content-Length must be an integer within the body's length")
        n = int(header_length)
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        return InferRequest.model_validate_json(head), binary
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e.get("type") == "json_invalid" for e in errors):
            raise BadRequest("the inference request header is not valid JSON", code="invalid_json") from None
        raise _bad(f"invalid inference request: {describe_validation_errors(errors)}") from None


def _flatten(data: list[Any]) -> list[str]:
    return [y for x in data for y in (x if isinstance(x, list) else [x])]


def check_input(tensors: dict[str, Any], name: str, datatype: str) -> None:
    """One input's name and type, before its data is read (REST and gRPC alike)."""
    if name not in INPUTS:
        raise _bad(f"unexpected input '{truncate(name)}'; the model takes 'image' and 'description'")
    if name in tensors:
        raise _bad(f"input '{name}' appears twice")
    if datatype != INPUTS[name]:
        raise _bad(f"input '{name}' must have datatype {INPUTS[name]}, not {truncate(datatype)}")


def check_shape(name: str, shape: list[int], n: int) -> None:
    if math.prod(shape) != n:
        raise _bad(f"input '{name}': shape {shape} does not match its {n} elements")


def read_inputs(req: InferRequest, binary: bytes) -> dict[str, tuple[list[Any], bool]]:
    """name -> (elements, came_as_binary), every input checked against its declared shape."""
    tensors: dict[str, tuple[list[Any], bool]] = {}
    offset = 0
    for t in req.inputs:
        check_input(tensors, t.name, t.datatype)
        size = (t.parameters or {}).get("binary_data_size")
        elements: list[Any]
        if size is not None:
            if type(size) is not int or size < 0:
                raise _bad(f"input '{t.name}': binary_data_size must be a non-negative integer")
            if t.data is not None:
                raise _bad(f"input '{t.name}' has both data and binary_data_size")
            if offset + size > len(binary):
                raise _bad(f"input '{t.name}': the binary data is shorter than binary_data_size")
            elements = deserialize_bytes(binary[offset : offset + size])
            offset += size
            tensors[t.name] = (elements, True)
        else:
            if t.data is None:
                raise _bad(f"input '{t.name}' has no data")
            elements = _flatten(t.data)
            tensors[t.name] = (elements, False)
        check_shape(t.name, t.shape, len(elements))
    if offset != len(binary):
        raise _bad(f"the body has {len(binary) - offset} bytes of binary data that no input claims")
    if "image" not in tensors:
        raise _bad("input 'image' is required")
    return tensors


def to_rows(tensors: dict[str, tuple[list[Any], bool]]) -> list[Row]:
    images, images_binary = tensors["image"]
    descriptions: list[Any] = tensors["description"][0] if "description" in tensors else [""] * len(images)
    if len(descriptions) != len(images):
        raise _bad("'description' must have as many elements as 'image'")
    # JSON has no raw bytes: images sent as JSON data are base64 text, decoded by the pipeline
    return [Row(img, desc, base64=not images_binary) for img, desc in zip(images, descriptions, strict=True)]


def request_min_confidence(req: InferRequest, pipeline: Pipeline) -> float:
    return parameter_min_confidence(req.parameters or {}, pipeline)


def parameter_min_confidence(parameters: dict[str, Any], pipeline: Pipeline) -> float:
    value = parameters.get("min_confidence")
    if value is None:
        return pipeline.min_confidence()
    # compared before float(): a 401-digit integer is out of range, not an OverflowError (a 500)
    if type(value) not in (int, float) or not 0 <= value <= 1:
        raise _bad("parameter min_confidence must be a number between 0 and 1")
    return float(value)


def select_outputs(req: InferRequest) -> list[tuple[str, bool]]:
    """(output name, as binary) for each output to return; checked before any inference runs."""
    default_binary = (req.parameters or {}).get("binary_data_output", False)
    if type(default_binary) is not bool:
        raise _bad("parameter binary_data_output must be a boolean")
    if not req.outputs:
        return [(k, default_binary) for k in OUTPUT_NAMES]
    check_outputs([o.name for o in req.outputs])
    selection: list[tuple[str, bool]] = []
    for o in req.outputs:
        binary = (o.parameters or {}).get("binary_data", default_binary)
        if type(binary) is not bool:
            raise _bad(f"output '{o.name}': parameter binary_data must be a boolean")
        selection.append((o.name, binary))
    return selection


def encode_binary(datatype: str, value: Any) -> bytes:
    """A tensor in the protocol's binary form (BYTES: length-prefixed elements; others: row-major raw)."""
    return serialize_bytes([x.encode() for x in value]) if datatype == "BYTES" else np.ascontiguousarray(value).tobytes()


def render(req: InferRequest, selection: list[tuple[str, bool]], preds: list[Prediction], model: ModelInfo,
           min_confidence: float, ood_abstain: bool) -> Response:
    tensors = output_tensors(preds, model, min_confidence, ood_abstain)
    outputs, blobs = [], []
    for out_name, binary in selection:
        dtype, shape, value = tensors[out_name]
        entry: dict[str, Any] = {"name": out_name, "datatype": dtype, "shape": shape}
        if binary:
            blob = encode_binary(dtype, value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # JSON has no NaN: a missing OOD score is null
            entry["data"] = list(value) if dtype == "BYTES" else [None if x != x else x for x in value.reshape(-1).tolist()]
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    head_bytes = json.dumps(head).encode()
    if not blobs:
        return Response(head_bytes, media_type="application/json")
    return Response(head_bytes + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head_bytes))})


@router.get("", summary="Server metadata")
async def server_metadata() -> Any:
    return {"name": SERVER_NAME, "version": __version__, "extensions": PROTOCOL_EXTENSIONS}


@router.get("/health/live", summary="Server liveness")
async def live() -> Any:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness", responses=v2_error_responses(503))
async def ready(pipeline: PipelineDep) -> Any:
    ok = server_ready(pipeline)
    return JSONResponse({"ready": ok}, status_code=200 if ok else http_status("not_ready"))


async def model_metadata(pipeline: PipelineDep, name: str, version: str | None = None) -> Any:
    return dataplane.model_metadata(pipeline, pipeline.repository.find(name, version).info)


async def model_ready(pipeline: PipelineDep, name: str, version: str | None = None) -> Any:
    ready = dataplane.model_ready(pipeline, name, version)
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else http_status("not_ready"))


class V2Codec:
    """Open Inference Protocol (REST): the JSON header (and binary tensors) in, output tensors out."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.req: InferRequest | None = None

    def check(self, model: ModelInfo) -> None:
        """Nothing to check before the body: the request's parameters are in it."""

    async def decode(self, request: Request, body: bytes, model: ModelInfo) -> list[Row]:
        header_length = request.headers.get("inference-header-content-length")
        s, metrics = self.pipeline.settings, self.pipeline.metrics
        # before the parse (it holds the GIL throughout): the JSON header's values are bounded by what
        # the protocol can carry here (rows, and the tensor element limit of each input)
        head = body[: int(header_length)] if header_length is not None and re.fullmatch(r"[0-9]{1,19}", header_length) else body
        limit = max_json_values(s.max_batch_items, s.max_description_chars, MAX_TENSORS * MAX_ELEMENTS)
        if (values := json_values_bound(head)) > limit:
            raise _bad(f"the inference request holds up to {values} JSON values; the limit is {limit}")
        if len(body) > 64 * 1024:  # parsing megabytes of JSON stays off the event loop
            req, binary = await anyio.to_thread.run_sync(parse_request, body, header_length)
        else:
            req, binary = parse_request(body, header_length)
        ignored = unknown_keys(req)
        for level, keys in ignored.items():
            metrics.v2_unknown_keys.labels(level).inc(len(keys))
        if ignored and log.isEnabledFor(logging.DEBUG):
            log.debug("ignored keys the service does not read: %s",
                      "; ".join(f"{lv}: {', '.join(truncate(k, 40) for k in ks[:8])}" for lv, ks in ignored.items()))
        rows = to_rows(read_inputs(req, binary))
        self.req, self.selection = req, select_outputs(req)
        self.min_confidence = request_min_confidence(req, self.pipeline)
        return rows

    def encode(self, answers: Sequence[Answer], model: ModelInfo, request: Request) -> Response:
        for i, a in enumerate(answers):
            if isinstance(a, RowError):  # the protocol answers a request whole: the first failing row speaks for it
                raise a.exception(f"image[{i}]: ")
        assert self.req is not None  # decoded before
        return render(self.req, self.selection, [a for a in answers if isinstance(a, Prediction)], model,
                      self.min_confidence, self.pipeline.settings.ood_abstain)


async def infer(request: Request, pipeline: PipelineDep, name: str, version: str | None = None) -> Any:
    return await handle(request, pipeline, V2Codec(pipeline), name, version)


for _prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
    router.add_api_route(_prefix, model_metadata, methods=["GET"], summary="Model metadata", responses=v2_error_responses(404, 503))
    router.add_api_route(_prefix + "/ready", model_ready, methods=["GET"], summary="Model readiness",
                         responses=v2_error_responses(404, 503))
    router.add_api_route(_prefix + "/infer", infer, methods=["POST"], summary="Inference (JSON or binary tensor data)",
                         responses=v2_error_responses(400, 401, 404, 413, 422, 500, 503, 504))
