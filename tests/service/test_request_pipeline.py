"""One pipeline behind every protocol: the same limits and error codes everywhere, and row isolation."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import app_client, jpeg_bytes, png_bytes
from PIL import Image

from service.app import create_app
from service.settings import Settings

LIMITS = {"max_upload_bytes": 20_000, "max_description_chars": 50, "max_image_pixels": 1_000_000}


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buf, format="PNG")  # 9 megapixels in a few kB
    return buf.getvalue()


def _noise_png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (n, n, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# (name, image, description as bytes, status, code): each row is wrong in one way
BAD_ROWS: list[tuple[str, bytes, bytes, int, str]] = [
    ("not an image", b"just text, no image here" * 4, b"tomato", 400, "invalid_image"),
    ("empty image", b"", b"tomato", 400, "invalid_image"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', b"x", 400, "invalid_image"),
    ("pixel bomb", _bomb(), b"tomato", 413, "image_too_large"),
    ("image over the upload limit", _noise_png(120), b"tomato", 413, "payload_too_large"),
    ("description too long", jpeg_bytes(), b"a" * 51, 422, "description_too_long"),
]


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Any:
    with app_client(tiny_artifact, **LIMITS) as c:
        yield c


def _v2_binary(image: bytes, description: bytes) -> tuple[bytes, dict[str, str]]:
    img = struct.pack("<I", len(image)) + image
    desc = struct.pack("<I", len(description)) + description
    head = json.dumps({"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(img)}},
        {"name": "description", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(desc)}}]}).encode()
    return head + img + desc, {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}


@pytest.mark.parametrize("name,image,description,status,code", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_the_same_bad_row_gets_the_same_code_on_every_protocol(client: TestClient, name: str, image: bytes,
                                                               description: bytes, status: int, code: str) -> None:
    # /classify: multipart, one row -> the row's status and code
    r = client.post("/classify", files={"image": ("x", image, "application/octet-stream")},
                    data={"description": description})  # type: ignore[dict-item]
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text

    # /classify/batch: JSON, the row's error in its place beside a valid row
    items = [{"image_base64": base64.b64encode(jpeg_bytes()).decode(), "description": "ok"},
             {"image_base64": base64.b64encode(image).decode(), "description": description.decode()}]
    r = client.post("/classify/batch", json={"items": items})
    assert r.status_code == 200, r.text
    ok, bad = r.json()["results"]
    assert "label" in ok and bad["error"]["code"] == code, bad

    # /v2 with binary tensors: the protocol answers the request whole, with the row's status and code
    content, headers = _v2_binary(image, description)
    r = client.post("/v2/models/tiny/infer", content=content, headers=headers)
    assert r.status_code == status and r.json()["code"] == code, r.text
    assert r.json()["error"].startswith("image[0]: ")


def test_description_text_is_read_the_same_on_every_protocol(client: TestClient) -> None:
    jpg = jpeg_bytes()
    # a lone surrogate ("\\ud800") is not text: both JSON protocols refuse it as invalid JSON
    b64 = base64.b64encode(jpg).decode()
    body = '{"items": [{"image_base64": "' + b64 + '", "description": "caf\\ud800"}]}'
    r = client.post("/classify/batch", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json"), r.text
    body = ('{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["' + b64 + '"]},'
            ' {"name": "description", "datatype": "BYTES", "shape": [1], "data": ["caf\\ud800"]}]}')
    r = client.post("/v2/models/tiny/infer", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_json"), r.text
    # bytes that are not UTF-8 are read as Latin-1 by the multipart parser and by /v2's binary tensors alike
    latin1 = "tomato café".encode("latin-1")
    a = client.post("/classify", params={"explain": "true", "top_k": 8}, files={"image": ("x", jpg, "image/jpeg")},
                    data={"description": latin1})  # type: ignore[dict-item]
    content, headers = _v2_binary(jpg, latin1)
    b = client.post("/v2/models/tiny/infer", content=content, headers=headers)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    scores = {p["label"]: p["score"] for p in a.json()["predictions"]}
    probs = next(o for o in b.json()["outputs"] if o["name"] == "probabilities")["data"]
    labels = client.get("/model").json()["labels"]
    assert all(abs(scores[lab] - probs[i]) < 1e-6 for i, lab in enumerate(labels))


def test_request_limits_are_the_same_on_every_protocol(client: TestClient) -> None:
    jpg = base64.b64encode(jpeg_bytes()).decode()
    too_many = 65  # CLASSIFIER_MAX_BATCH_ITEMS defaults to 64
    r = client.post("/classify/batch", json={"items": [{"image_base64": jpg}] * too_many})
    assert (r.status_code, r.json()["error"]["code"]) == (422, "too_many_items")
    r = client.post("/v2/models/tiny/infer", json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [too_many],
                                                               "data": [jpg] * too_many}]})
    assert (r.status_code, r.json()["code"]) == (422, "too_many_items")
    # every row answered is counted by outcome, whichever protocol sent it
    metrics = client.get("/metrics").text
    assert 'outcome="ok"' in metrics and 'classifier_rows_total{model="tiny",outcome="invalid_image",version="0.0.1"}' in metrics


class PoisonedSession:
    """A real onnxruntime session that fails any call holding an all-black image, as a device fault would."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, []  # type: ignore[var-annotated]

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        poisoned = bool((feed["image"].reshape(len(feed["image"]), -1).max(1) == 0).any())
        self.calls.append((len(feed["image"]), poisoned))
        if poisoned:
            raise RuntimeError("device fault")
        return self.real.run(outputs, feed)


def test_a_poisoned_row_leaves_other_clients_rows_at_200(tiny_artifact: Path) -> None:
    app = create_app(Settings(model_dir=tiny_artifact, provider="cpu", max_batch_delay_ms=30))  # type: ignore[call-arg]
    black, good = png_bytes((40, 40), colour=(0, 0, 0)), [jpeg_bytes(colour=(20 * i, 200 - 10 * i, 90)) for i in range(12)]

    async def go() -> tuple[list[httpx.Response], list[httpx.Response], list[tuple[int, bool]], list[dict[str, Any]]]:
        async with app.router.lifespan_context(app):
            predictor = app.state.pipeline.model().backend
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                def post(img: bytes) -> Any:
                    return c.post("/classify", params={"top_k": 8}, files={"image": ("x", img, "image/png")},
                                  data={"description": "a red tomato"})
                alone = [(await post(g)).json() for g in good]  # one at a time, before the poison
                session = PoisonedSession(predictor.session)
                predictor.session = session
                answers = await asyncio.gather(*[post(g) for g in good], *[post(black) for _ in range(3)])
                return list(answers[:12]), list(answers[12:]), session.calls, alone

    valid, poisoned, calls, alone = asyncio.run(go())
    assert any(size > 1 and bad for size, bad in calls), calls  # the poison did share batches with valid rows
    for r, expected in zip(valid, alone, strict=True):
        assert r.status_code == 200, r.text
        assert {p["label"]: round(p["score"], 5) for p in r.json()["predictions"]} == \
               {p["label"]: round(p["score"], 5) for p in expected["predictions"]}
    for r in poisoned:
        assert r.status_code == 500 and r.json()["error"]["code"] == "inference_failed"
