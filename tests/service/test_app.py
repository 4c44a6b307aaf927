"""The HTTP API with TestClient, on a real tiny artifact and on the committed default model."""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from helpers import DEFAULT_MODEL, app_client, best_guess, calibrated, jpeg_bytes, png_bytes, synthetic_samples
from PIL import Image

from classifier_core.images import load_image
from classifier_core.text import TextEncoder
from service.app import create_app
from service.settings import Settings


def make_client(model_dir: Path, **kw: object) -> Any:
    return app_client(model_dir, **kw)


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    with make_client(tiny_artifact) as c:
        yield c


def classify(c: TestClient, image: bytes = b"", description: str = "a red tomato", **params: object):  # type: ignore[no-untyped-def]
    return c.post("/classify", params=params, files={"image": ("x.jpg", image or jpeg_bytes(), "image/jpeg")},
                  data={"description": description})


def assert_error(resp, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error"} and body["error"]["code"] == code
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    assert "Traceback" not in resp.text and "/work/" not in resp.text


def test_classify_response_shape(client: TestClient, tiny_artifact: Path) -> None:
    r = classify(client, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"label", "confidence", "abstained", "predictions", "model", "request_id", "ood_score"} <= set(body)
    assert set(body) - {"abstain_reason"} == {"label", "confidence", "abstained", "predictions", "model", "request_id", "ood_score"}
    scores = [p["score"] for p in body["predictions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert best_guess(body) == body["predictions"][0]["label"] and body["confidence"] == scores[0]
    assert body["model"] == {"name": "tiny", "version": "0.0.1"}
    assert body["request_id"] == r.headers["x-request-id"]
    assert "server" not in r.headers


def test_prediction_equals_in_process_onnxruntime(client: TestClient, tiny_artifact: Path) -> None:
    from classifier_core.artifact import load_manifest

    m = load_manifest(tiny_artifact)
    sess = ort.InferenceSession(str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    text = TextEncoder.from_file(tiny_artifact / "tokenizer.json", m.max_len)
    for jpg, caption, _ in synthetic_samples(6):
        img = load_image(jpg, m.image_size)[None]
        raw = sess.run(["probabilities"], {"image": img, "input_ids": text.pad([text.encode(caption)])})[0][0]
        probs = calibrated(raw, tiny_artifact)
        body = classify(client, jpg, caption, top_k=8).json()
        assert best_guess(body) == m.labels[int(np.argmax(probs))]
        got = {p["label"]: p["score"] for p in body["predictions"]}
        assert all(abs(got[lab] - float(probs[i])) < 1e-6 for i, lab in enumerate(m.labels))


def test_top_k_and_explain(client: TestClient, tiny_artifact: Path) -> None:
    from classifier_core.artifact import load_manifest

    text = TextEncoder.from_file(tiny_artifact / "tokenizer.json", load_manifest(tiny_artifact).max_len)
    caption = "Cherry TOMATO salad"
    r = classify(client, description=caption, top_k=8, explain="true").json()
    assert len(r["predictions"]) == 8
    att = r["text_attention"]
    # one weight per token of the caption, as the model's own tokenizer splits it (lower-cased)
    assert [a["token"] for a in att] == text.encode(caption).tokens
    assert len(att) == 3 and att[0]["token"] in ("cherry", "[UNK]") and att[1]["token"] in ("tomato", "[UNK]")
    assert abs(sum(a["weight"] for a in att) - 1.0) < 1e-4
    r1 = classify(client, top_k=1).json()
    assert len(r1["predictions"]) == 1 and "text_attention" not in r1


def test_empty_and_missing_description(client: TestClient) -> None:
    r = client.post("/classify", params={"explain": "true"}, files={"image": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 200
    assert r.json()["text_attention"] == [{"token": "[EMPTY]", "weight": 1.0}]
    assert classify(client, description="").status_code == 200


@pytest.mark.parametrize("top_k", ["0", "-1", "1000000000", "abc", "9"])
def test_bad_top_k(client: TestClient, top_k: str) -> None:
    assert_error(classify(client, top_k=top_k), 422, "validation_error")


def test_image_errors(client: TestClient) -> None:
    assert_error(classify(client, image=b"\x00" * 10), 400, "invalid_image")
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    assert_error(classify(client, image=bomb.getvalue()), 413, "image_too_large")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"></svg>'
    assert_error(classify(client, image=svg), 400, "invalid_image")
    zero = client.post("/classify", files={"image": ("z.jpg", b"", "image/jpeg")})
    assert_error(zero, 400, "invalid_image")


def test_form_errors(client: TestClient) -> None:
    assert_error(client.post("/classify", data={"description": "x"}, files={"other": ("a", b"1")}), 422, "unknown_field")
    assert_error(client.post("/classify", files={"description": (None, "only text")}), 422, "missing_field")
    assert_error(client.post("/classify", files={"image": (None, "not a file")}), 422, "invalid_field")
    two = [("image", ("a.jpg", jpeg_bytes(), "image/jpeg")), ("image", ("b.jpg", jpeg_bytes(), "image/jpeg"))]
    assert_error(client.post("/classify", files=two), 422, "invalid_field")
    assert_error(classify(client, description="x" * 2001), 422, "description_too_long")
    assert_error(client.post("/classify", json={"image": "x"}), 415, "unsupported_media_type")
    assert_error(client.get("/classify"), 405, "method_not_allowed")
    assert_error(client.get("/nope"), 404, "not_found")


def test_odd_descriptions_are_fine(client: TestClient) -> None:
    for text in ("tomato\x00apple", "🍅🍎 tomato", "طماطم حمراء", "ＴＯＭＡＴＯ"):
        assert classify(client, description=text).status_code == 200


def test_invalid_utf8_description(client: TestClient) -> None:
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"description\"\r\n\r\n").encode() + b"\xff\xfe tomato" + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg_bytes() + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/classify", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                    params={"explain": "true"})
    # lenient by design: undecodable bytes become U+FFFD (Starlette's form decoding), then [UNK]
    assert r.status_code == 200, r.text
    assert [t["token"] for t in r.json()["text_attention"]] == ["[UNK]", "tomato"]


def test_upload_limit(tiny_artifact: Path) -> None:
    with make_client(tiny_artifact, max_upload_bytes=50_000) as c:
        big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="PNG")
        assert len(buf.getvalue()) > 200_000
        assert_error(classify(c, image=buf.getvalue()), 413, "payload_too_large")
        # streamed without a Content-Length: refused while reading
        def chunks() -> Iterator[bytes]:
            for _ in range(100):
                yield b"x" * 10_000

        r = c.post("/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zz"})
        assert_error(r, 413, "payload_too_large")
        assert classify(c).status_code == 200


def test_batch_mixed_items(client: TestClient) -> None:
    samples = synthetic_samples(3)
    items = [{"image_base64": base64.b64encode(j).decode(), "description": d} for j, d, _ in samples]
    items.insert(1, {"image_base64": "!!!not base64", "description": "x"})
    items.append({"image_base64": base64.b64encode(b"garbage").decode(), "description": ""})
    r = client.post("/classify/batch", json={"items": items}, params={"top_k": 2})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 5
    assert res[1] == {"error": {"code": "bad_base64", "message": "items[1]: the image is not valid base64"}}
    assert res[4]["error"]["code"] == "invalid_image"
    for i, (j, d, _) in zip((0, 2, 3), samples):
        single = classify(client, j, d, top_k=2).json()
        assert res[i]["label"] == single["label"] and res[i]["abstained"] == single["abstained"]
        assert [p["label"] for p in res[i]["predictions"]] == [p["label"] for p in single["predictions"]]
        assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(res[i]["predictions"], single["predictions"]))


def test_batch_errors(client: TestClient) -> None:
    item = {"image_base64": base64.b64encode(jpeg_bytes()).decode(), "description": ""}
    assert_error(client.post("/classify/batch", json={"items": [item] * 65}), 422, "too_many_items")
    assert_error(client.post("/classify/batch", json={"items": "nope"}), 422, "validation_error")
    assert_error(client.post("/classify/batch", json={"things": []}), 422, "validation_error")
    assert_error(client.post("/classify/batch", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")
    assert_error(client.post("/classify/batch", content=b"x", headers={"content-type": "text/plain"}), 415,
                 "unsupported_media_type")


def test_health_ready_model_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["provider"] == "CPUExecutionProvider"
    m = client.get("/model").json()
    assert m["providers"] == ["CPUExecutionProvider"] and m["image_size"] == 32 and len(m["labels"]) == 8
    assert m["limits"]["max_upload_bytes"] == 10 * 1024 * 1024 and m["max_caption_tokens"] == 12
    classify(client)
    text = client.get("/metrics").text
    assert 'classifier_http_requests_total{method="POST",route="/classify",status="200"}' in text
    assert "classifier_inference_duration_seconds_bucket" in text
    assert 'classifier_images_decoded_total{outcome="ok"}' in text
    assert 'classifier_model_info{name="tiny",provider="CPUExecutionProvider",version="0.0.1"} 1.0' in text


def test_metrics_are_rendered_at_most_once_a_second(client: TestClient) -> None:
    # scrapes in a burst share one rendering (it reads every worker's files): its cost is bounded
    time.sleep(1.05)
    first = client.get("/metrics").text
    classify(client)
    assert client.get("/metrics").text == first
    time.sleep(1.05)
    assert client.get("/metrics").text != first


def test_request_id_passthrough(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])  # refused and replaced by a fresh id


def test_readiness_before_load(tiny_artifact: Path) -> None:
    app = create_app(Settings(model_dir=tiny_artifact, provider="cpu"), load_model=False)  # type: ignore[call-arg]
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not_loaded"
        assert c.get("/healthz").status_code == 200
        assert_error(classify(c), 503, "not_ready")
        c.portal.call(app.state.pipeline.repository.start)
        assert c.get("/readyz").status_code == 200
        assert classify(c).status_code == 200


def test_batch_body_limits_follow_what_the_rows_can_hold(tiny_artifact: Path) -> None:
    # 2 rows of 1000-byte images and 10-character captions: nothing near 1 MB is a legitimate body,
    # whatever MAX_BATCH_BODY_BYTES (32 MiB) says, so it is refused before it is read
    with make_client(tiny_artifact, max_batch_items=2, max_upload_bytes=1000, max_description_chars=10) as c:
        big = b'{"items": [' + b" " * 1_000_000 + b"]}"
        for path in ("/classify/batch", "/v2/models/tiny/infer"):
            r = c.post(path, content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413, (path, r.text[:200])
        image = base64.b64encode(b"x" * 999).decode()
        r = c.post("/classify/batch", json={"items": [{"image_base64": image, "description": "\U0001f600" * 10}] * 2})
        assert r.status_code != 413, r.text[:200]  # the largest legitimate body still gets in


def test_api_key(tiny_artifact: Path) -> None:
    with make_client(tiny_artifact, api_key="s3cret", metrics_max_age_s=0) as c:
        assert_error(classify(c), 401, "unauthorized")
        # a 401 on a path no route has: the metric label is "unmatched", never the client's path
        assert c.get("/zz-401-probe").status_code == 401
        assert "zz-401" not in c.get("/metrics").text
        assert_error(c.get("/model", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert_error(c.get("/model", headers={"Authorization": "Bearer s3cre"}), 401, "unauthorized")
        assert c.get("/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(open_path).status_code == 200


def test_openapi_documents_every_route_and_error(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/classify", "/classify/batch", "/healthz", "/readyz", "/model", "/metrics"} <= set(paths)
    classify_op = paths["/classify"]["post"]
    assert "multipart/form-data" in classify_op["requestBody"]["content"]
    assert {"400", "401", "413", "415", "422", "503"} <= set(classify_op["responses"])
    assert "invalid_image" in classify_op["responses"]["400"]["content"]["application/json"]["examples"]
    assert client.get("/docs").status_code == 200


@pytest.mark.skipif(not (DEFAULT_MODEL / "manifest.json").exists(), reason="no committed default model")
def test_default_model_serves_the_built_in_classes() -> None:
    with make_client(DEFAULT_MODEL) as c:
        samples = synthetic_samples(24, seed=123)
        right = sum(classify(c, j, d).json()["label"] == lab for j, d, lab in samples)
        assert right >= 18  # a trained model, not chance (1/8)


def test_internal_error_has_no_traceback(tiny_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(model_dir=tiny_artifact, provider="cpu"))  # type: ignore[call-arg]
    with TestClient(app, raise_server_exceptions=False) as c:
        predictor = app.state.pipeline.model().backend

        class Broken:  # a session that fails the way a GPU fault would: an exception from run()
            def run(self, *a: object, **k: object) -> None:
                raise RuntimeError("CUDA failure 700 at /secret/path/kernel.cu:12")

        real, predictor.session = predictor.session, Broken()
        try:
            r = classify(c)
        finally:
            predictor.session = real
        assert_error(r, 500, "inference_failed")
        assert "CUDA" not in r.text and "secret" not in r.text
        assert any("inference failed for a batch" in rec.message for rec in caplog.records)
        assert classify(c).status_code == 200  # the next request is served


def test_access_log_is_structured_and_holds_no_content(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import json as _json
    import logging

    from service.logs import JsonFormatter

    with caplog.at_level(logging.INFO, logger="service.access"):
        r = classify(client, description="my secret caption about tomatoes")
    assert r.status_code == 200
    records = [rec for rec in caplog.records if rec.name == "service.access"]
    assert records
    line = _json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == r.headers["x-request-id"] and line["route"] == "/classify" and line["status"] == 200
    assert line["batch_size"] >= 1 and line["provider"] == "CPUExecutionProvider" and line["latency_ms"] > 0
    everything = "\n".join(JsonFormatter().format(rec) for rec in caplog.records)
    assert "secret caption" not in everything and "\xff\xd8" not in everything


def test_inline_and_threaded_decoding_answer_alike(tiny_artifact: Path) -> None:
    samples = synthetic_samples(4, seed=11)
    truncated = samples[0][0][: len(samples[0][0]) // 2]
    answers = []
    for inline in (0, 1 << 20):  # every JPEG in a thread / every JPEG on the event loop
        with make_client(tiny_artifact, inline_decode_bytes=inline) as c:
            ok = [classify(c, jpg, caption, top_k=8).json() for jpg, caption, _ in samples]
            bad = classify(c, truncated)
            assert_error(bad, 400, "invalid_image")
            answers.append(([{k: v for k, v in a.items() if k != "request_id"} for a in ok], bad.json()["error"]["code"]))
    assert answers[0] == answers[1]


def test_pages_run_only_their_own_scripts_and_cannot_be_framed(client: TestClient) -> None:
    """No inline script runs unless the page lists its hash; no other site may frame a page (the browser
    tests render each page under this policy)."""
    import base64
    import hashlib
    import re

    for path in ("/", "/docs", "/redoc"):
        r = client.get(path)
        policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'", path
        scripts = policy["script-src"].split()
        assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts, path
        for body in re.findall(rb"<script>(.*?)</script>", r.content, re.S):  # each inline script, by its hash
            assert f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" in scripts, path
