"""Open Inference Protocol (KServe V2 REST), beside our own API, on the same batcher.

Inputs: ``image`` (BYTES, shape [-1]: encoded image files; base64 strings when sent as JSON
data) and ``description`` (BYTES, [-1]; optional). Outputs: ``label`` (BYTES), ``probabilities``
(FP32, [-1, C]) and ``text_attention`` (FP32, [-1, L], zero past each caption's tokens).
Supports the binary tensor data extension (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data`` / ``binary_data_output``), which is what the official
``tritonclient[http]`` uses by default. Errors are ``{"error": str}`` with a non-2xx status.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from .errors import ServiceError
from .predictor import Prediction, Predictor
from .preprocessing import ImageError

PROTOCOL_EXTENSIONS = ["binary_tensor_data"]


class V2ErrorBody(BaseModel):
    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": V2ErrorBody, "description": "the protocol's error shape"} for s in statuses}


class V2Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    """BYTES tensor in binary form: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise V2Error(400, "malformed BYTES tensor data")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise V2Error(400, "malformed BYTES tensor data")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise V2Error(400, "Inference-Header-Content-Length is not an integer") from None
        if not 0 <= n <= len(body):
            raise V2Error(400, "Inference-Header-Content-Length is out of range")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except ValueError:
        raise V2Error(400, "the inference request header is not valid JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise V2Error(400, "the inference request needs an 'inputs' list")
    return request, binary


def _read_inputs(request: dict[str, Any], binary: bytes) -> dict[str, tuple[list[bytes], bool]]:
    """name -> (elements, came_as_binary)"""
    tensors: dict[str, tuple[list[bytes], bool]] = {}
    offset = 0
    for t in request["inputs"]:
        if not isinstance(t, dict) or "name" not in t:
            raise V2Error(400, "each input needs a 'name'")
        name = str(t["name"])
        if name not in ("image", "description"):
            raise V2Error(400, f"unexpected input '{name}'; the model takes 'image' and 'description'")
        if t.get("datatype", "BYTES") != "BYTES":
            raise V2Error(400, f"input '{name}' must have datatype BYTES")
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = binary[offset : offset + int(size)]
            if len(chunk) != int(size):
                raise V2Error(400, f"input '{name}': binary data is shorter than binary_data_size")
            offset += int(size)
            tensors[name] = (_deserialize_bytes(chunk), True)
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise V2Error(400, f"input '{name}' has no data")
            tensors[name] = ([x.encode() if isinstance(x, str) else bytes(x) for x in _flatten(data)], False)
        shape = t.get("shape")
        if isinstance(shape, list) and shape and int(np.prod(shape)) != len(tensors[name][0]):
            raise V2Error(400, f"input '{name}': shape {shape} does not match {len(tensors[name][0])} elements")
    if "image" not in tensors:
        raise V2Error(400, "input 'image' is required")
    return tensors


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def build_router(predictor: Predictor, decode: Callable[[bytes], Awaitable[np.ndarray]],
                 infer_one: Callable[[np.ndarray, str], Awaitable[Prediction]], max_items: int,
                 server_version: str, is_draining: Callable[[], bool]) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe V2)"])

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def check_model(name: str, version: str | None) -> None:
        m = predictor.manifest
        if m is None:
            raise V2Error(503, "the model is not loaded yet")
        if name != m.name or (version is not None and version != m.version):
            raise V2Error(404, f"unknown model '{name}'" + (f" version '{version}'" if version else ""))

    def metadata() -> dict[str, Any]:
        m = predictor.manifest
        assert m is not None
        return {
            "name": m.name, "versions": [m.version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "description", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(m.labels)]},
                        {"name": "text_attention", "datatype": "FP32", "shape": [-1, -1]}],
            "parameters": {"labels": m.labels, "image_size": m.image_size, "max_caption_tokens": m.max_len},
        }

    @router.get("", summary="Server metadata")
    async def server_metadata() -> Any:
        return {"name": "image-text-classifier", "version": server_version, "extensions": PROTOCOL_EXTENSIONS}

    @router.get("/health/live", summary="Server liveness")
    async def live() -> Any:
        return {"live": True}

    @router.get("/health/ready", summary="Server readiness", responses=_errors(503))
    async def ready() -> Any:
        ok = predictor.ready and not is_draining()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_metadata(name: str, version: str | None = None) -> Any:
        try:
            check_model(name, version)
        except V2Error as e:
            return error(e.status, e.message)
        return metadata()

    async def model_ready(name: str, version: str | None = None) -> Any:
        try:
            check_model(name, version)
        except V2Error as e:
            return error(e.status, e.message)
        ok = predictor.ready and not is_draining()
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request, name: str, version: str | None = None) -> Any:
        try:
            check_model(name, version)
            if not predictor.ready:
                raise V2Error(503, "the model is not ready")
            body = await request.body()
            req, binary = _parse_request(body, request.headers.get("inference-header-content-length"))
            tensors = _read_inputs(req, binary)
            images, images_binary = tensors["image"]
            descriptions = [d.decode("utf-8", errors="replace") for d in tensors.get("description", ([], False))[0]]
            if not descriptions:
                descriptions = [""] * len(images)
            if len(descriptions) != len(images):
                raise V2Error(400, "'description' must have as many elements as 'image'")
            if not 1 <= len(images) <= max_items:
                raise V2Error(400, f"'image' must have 1 to {max_items} elements")
            if not images_binary:  # JSON has no raw bytes: images come base64-encoded
                try:
                    images = [base64.b64decode(x, validate=True) for x in images]
                except (binascii.Error, ValueError):
                    raise V2Error(400, "'image' elements sent as JSON data must be base64 strings") from None
            arrays = []
            for i, data in enumerate(images):
                try:
                    arrays.append(await decode(data))
                except ImageError as exc:
                    raise V2Error(400, f"image[{i}]: {exc}") from None
            import anyio

            preds: list[Prediction | None] = [None] * len(arrays)

            async def run(i: int) -> None:
                preds[i] = await infer_one(arrays[i], descriptions[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(arrays)):
                    tg.start_soon(run, i)
        except V2Error as e:
            return error(e.status, e.message)
        except ServiceError as e:
            status = int(getattr(e, "status", 500))
            return error(status, e.message)
        return _response(req, [p for p in preds if p is not None], name)

    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"], summary="Model metadata", responses=_errors(404, 503))
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"], summary="Model readiness",
                             responses=_errors(404, 503))
        router.add_api_route(prefix + "/infer", infer, methods=["POST"], summary="Inference (JSON or binary tensor data)",
                             responses=_errors(400, 401, 404, 413, 500, 503, 504))

    def _response(req: dict[str, Any], preds: list[Prediction], name: str) -> Response:
        m = predictor.manifest
        assert m is not None
        n = len(preds)
        probs = np.stack([p.probabilities for p in preds]).astype(np.float32)
        width = max(len(p.attention) for p in preds)
        attn = np.zeros((n, width), np.float32)
        for i, p in enumerate(preds):
            attn[i, : len(p.attention)] = p.attention
        labels = [m.labels[int(i)] for i in probs.argmax(1)]
        tensors: dict[str, tuple[str, list[int], Any]] = {
            "label": ("BYTES", [n], labels),
            "probabilities": ("FP32", [n, len(m.labels)], probs),
            "text_attention": ("FP32", [n, width], attn),
        }
        wanted = req.get("outputs")
        default_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
        if wanted:
            selection = [(str(o["name"]), bool((o.get("parameters") or {}).get("binary_data", default_binary)))
                         for o in wanted if isinstance(o, dict) and o.get("name") in tensors]
        else:
            selection = [(k, default_binary) for k in tensors]
        outputs, blobs = [], []
        for out_name, binary in selection:
            dtype, shape, value = tensors[out_name]
            entry: dict[str, Any] = {"name": out_name, "datatype": dtype, "shape": shape}
            if binary:
                blob = _serialize_bytes([x.encode() for x in value]) if dtype == "BYTES" else np.ascontiguousarray(value).tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = list(value) if dtype == "BYTES" else value.reshape(-1).tolist()
            outputs.append(entry)
        head: dict[str, Any] = {"model_name": name, "model_version": m.version, "outputs": outputs}
        if "id" in req:
            head["id"] = req["id"]
        head_bytes = json.dumps(head).encode()
        if not blobs:
            return Response(head_bytes, media_type="application/json")
        return Response(head_bytes + b"".join(blobs), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head_bytes))})

    return router
