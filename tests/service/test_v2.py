"""Open Inference Protocol (KServe V2) through the official tritonclient[http] client."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http  # a dev dependency: missing = failing, never skipped
from helpers import running_server, synthetic_samples
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[str]:
    with running_server(tiny_artifact, CLASSIFIER_WORKERS="1") as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[object]:
    c = tritonclient_http.InferenceServerClient(server.removeprefix("http://"))
    yield c
    c.close()


def _inputs(samples: list[tuple[bytes, str, str]], binary: bool) -> list[object]:
    images = [j if binary else base64.b64encode(j) for j, _, _ in samples]
    img = tritonclient_http.InferInput("image", [len(samples)], "BYTES")
    img.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    desc = tritonclient_http.InferInput("description", [len(samples)], "BYTES")
    desc.set_data_from_numpy(np.array([c.encode() for _, c, _ in samples], dtype=np.object_), binary_data=binary)
    return [img, desc]


def _classify(server: str, jpg: bytes, caption: str) -> dict:
    return httpx.post(f"{server}/classify", params={"top_k": 8}, files={"image": ("x.jpg", jpg, "image/jpeg")},
                      data={"description": caption}).json()


def test_metadata_and_readiness(client, server: str) -> None:  # type: ignore[no-untyped-def]
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "0.0.1")
    m = client.get_model_metadata("tiny")
    assert [i["name"] for i in m["inputs"]] == ["image", "description"]
    assert {o["name"]: o["datatype"] for o in m["outputs"]} == {"label": "BYTES", "probabilities": "FP32", "text_attention": "FP32"}
    assert m["outputs"][1]["shape"] == [-1, 8]
    assert httpx.get(f"{server}/v2/models/tiny/versions/0.0.1").status_code == 200


def test_binary_inference_equals_classify(client, server: str) -> None:  # type: ignore[no-untyped-def]
    samples = synthetic_samples(5, seed=21)
    result = client.infer("tiny", _inputs(samples, binary=True), request_id="req-42")  # defaults: binary outputs
    assert result.get_response()["id"] == "req-42"
    labels = [x.decode() for x in result.as_numpy("label")]
    probs = result.as_numpy("probabilities")
    attn = result.as_numpy("text_attention")
    assert probs.shape == (5, 8) and attn.shape[0] == 5
    for i, (jpg, cap, _) in enumerate(samples):
        ref = _classify(server, jpg, cap)
        assert labels[i] == ref["label"]
        scores = {p["label"]: p["score"] for p in ref["predictions"]}
        names = client.get_model_metadata("tiny")["parameters"]["labels"]
        assert max(abs(scores[n] - float(probs[i, k])) for k, n in enumerate(names)) < 1e-5


def test_json_inference(client, server: str) -> None:  # type: ignore[no-untyped-def]
    samples = synthetic_samples(2, seed=22)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities")]
    result = client.infer("tiny", _inputs(samples, binary=False), outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label", "probabilities"]
    assert all("data" in o for o in response["outputs"])
    names = client.get_model_metadata("tiny")["parameters"]["labels"]
    probs = result.as_numpy("probabilities")
    for i, (jpg, cap, _) in enumerate(samples):
        ref = _classify(server, jpg, cap)
        label = result.as_numpy("label")[i]
        assert (label.decode() if isinstance(label, bytes) else label) == ref["label"]
        scores = {p["label"]: p["score"] for p in ref["predictions"]}
        assert max(abs(scores[n] - float(probs[i, k])) for k, n in enumerate(names)) < 1e-6


def test_errors(client, server: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as e:
        client.infer("no-such-model", _inputs(synthetic_samples(1), binary=True))
    assert "unknown model" in str(e.value)
    img = tritonclient_http.InferInput("image", [1], "BYTES")
    img.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as e2:
        client.infer("tiny", [img])
    assert "image[0]" in str(e2.value)
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_json" and isinstance(r.json()["error"], str)
    assert httpx.get(f"{server}/v2/models/other").status_code == 404
