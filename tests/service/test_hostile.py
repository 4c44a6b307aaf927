"""Hostile and broken input: the exact status and code, and the next valid request still served."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import app_client, encode, jpeg_bytes
from PIL import Image

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    with app_client(tiny_artifact) as c:
        yield c


def _gif_animated() -> bytes:
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _huge_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a 60 kB EXIF block
    exif[0x0112] = 3
    return encode(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG", exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG")


CASES: list[tuple[str, bytes, int, str | None]] = [
    ("zero bytes", b"", 400, "invalid_image"),
    ("truncated jpeg", jpeg_bytes((300, 300), quality=95)[:600], 400, "invalid_image"),
    ("random bytes", np.random.default_rng(0).bytes(5000), 400, "invalid_image"),
    ("text file", b"just some text, not an image\n" * 20, 400, "invalid_image"),
    ("pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n", 400, "invalid_image"),
    ("svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', 400, "invalid_image"),
    ("png bomb 30000x30000", encode(Image.new("1", (30000, 30000)), "PNG"), 413, "image_too_large"),
    ("animated gif", _gif_animated(), 200, None),
    ("huge exif", _huge_exif(), 200, None),
    ("1x1", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), 200, None),
    ("20000x5", encode(Image.new("RGB", (20000, 5), (1, 2, 3)), "PNG"), 422, "image_too_complex"),  # 4000:1
    ("16-bit png", _sixteen_bit_png(), 200, None),
]


@pytest.mark.parametrize("name,data,status,code", CASES, ids=[c[0] for c in CASES])
def test_hostile_image(client: TestClient, name: str, data: bytes, status: int, code: str | None) -> None:
    r = client.post("/classify", files={"image": ("x.jpg", data, "image/jpeg")}, data={"description": "tomato"})
    assert r.status_code == status, (name, r.text)
    if code:
        assert r.json()["error"]["code"] == code
        assert "Traceback" not in r.text and "site-packages" not in r.text
    ok = client.post("/classify", files={"image": ("ok.jpg", jpeg_bytes(), "image/jpeg")}, data={"description": "x"})
    assert ok.status_code == 200


def test_one_megabyte_description(client: TestClient) -> None:
    r = client.post("/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")}, data={"description": "a" * 1_000_000})
    assert r.status_code == 422 and r.json()["error"]["code"] == "description_too_long"


def test_two_megabyte_description_field(client: TestClient) -> None:
    # over the multipart part limit: refused by the form parser, still our error shape
    r = client.post("/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")}, data={"description": "a" * 2_000_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text


def test_error_bodies_hold_no_versions_or_paths(client: TestClient) -> None:
    import fastapi
    import onnxruntime

    for r, status, code in (
            (client.get("/nope"), 404, "not_found"),
            (client.post("/classify", content=b"x", headers={"content-type": "multipart/form-data"}), 400, "bad_request"),
            (client.post("/classify/batch", content=b"[", headers={"content-type": "application/json"}), 400, "invalid_json")):
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        for leak in (fastapi.__version__, onnxruntime.__version__, "/work", "site-packages", "Traceback"):
            assert leak not in r.text


def test_cors_is_off_unless_configured(client: TestClient, tiny_artifact: Path) -> None:
    r = client.options("/classify", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    app = create_app(Settings(model_dir=tiny_artifact, provider="cpu", cors_origins=["https://app.example"]))  # type: ignore[call-arg]
    with TestClient(app) as c:
        r = c.options("/classify", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert r.headers.get("access-control-allow-origin") == "https://app.example"
