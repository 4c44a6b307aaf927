"""Open Inference Protocol (KServe V2): the official tritonclient[http] client, and golden bodies of real clients."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http  # a dev dependency: missing = failing, never skipped
from helpers import ROOT, running_server, synthetic_samples
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[str]:
    with running_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_METRICS_MAX_AGE_S="0") as (_, url):
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
    assert {o["name"]: o["datatype"] for o in m["outputs"]} == {"label": "BYTES", "probabilities": "FP32", "text_attention": "FP32",
                                                                 "abstained": "BOOL", "ood_score": "FP32"}
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
        assert labels[i] == (ref["label"] or "")  # V2's label is empty where /classify's is null (abstained)
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
        assert (label.decode() if isinstance(label, bytes) else label) == (ref["label"] or "")
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


# --- golden bodies from real clients (tests/fixtures/v2/capture.py wrote them) ---------------------
GOLDEN = ROOT / "tests" / "fixtures" / "v2"
GOLDEN_NAMES = sorted(p.stem for p in GOLDEN.glob("*.body"))


V2_DTYPES: dict[str, Any] = {"BYTES": np.object_, "FP32": np.float32, "BOOL": np.bool_}


def read_v2_answer(r: httpx.Response) -> dict[str, Any]:
    """output name -> numpy array, from a JSON or a binary-extension V2 response."""
    assert r.status_code == 200, r.text
    head_len = r.headers.get("inference-header-content-length")
    head = json.loads(r.content[: int(head_len)] if head_len else r.content)
    blob, out = r.content[int(head_len):] if head_len else b"", {}
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"], dtype=V2_DTYPES[o["datatype"]]).reshape(o["shape"])
            continue
        raw, blob = blob[:size], blob[size:]
        if o["datatype"] == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                items.append(raw[pos + 4 : pos + 4 + n].decode())
                pos += 4 + n
            out[o["name"]] = np.array(items, dtype=np.object_).reshape(o["shape"])
        else:
            out[o["name"]] = np.frombuffer(raw, V2_DTYPES[o["datatype"]]).reshape(o["shape"])
    out["_head"] = head
    return out


def test_golden_fixtures_cover_every_client() -> None:
    assert {"tritonclient_json", "tritonclient_binary", "kserve_json", "kserve_binary", "spec_every_field"} <= set(GOLDEN_NAMES)
    # the KServe SDK's own key, refused before this round, is in its bodies
    assert b'"model_name"' in (GOLDEN / "kserve_json.body").read_bytes()


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_request_gets_the_answer_of_classify(server: str, name: str) -> None:
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    headers = {"content-type": meta["content_type"]} if meta["content_type"] else {}  # tritonclient sends none
    if meta["inference_header_content_length"]:
        headers["inference-header-content-length"] = meta["inference_header_content_length"]
    # the clients spoke to a model named image-text-classifier; this server's model is 'tiny'
    r = httpx.post(f"{server}/v2/models/tiny/infer", content=(GOLDEN / f"{name}.body").read_bytes(), headers=headers)
    answer = read_v2_answer(r)
    names = httpx.get(f"{server}/v2/models/tiny").json()["parameters"]["labels"]
    assert answer["_head"]["model_name"] == "tiny"
    assert len(answer["label"]) == len(meta["rows"])
    for i, row in enumerate(meta["rows"]):
        ref = _classify(server, (ROOT / row["image"]).read_bytes(), row["caption"])
        assert answer["label"][i] == (ref["label"] or ""), name
        if "abstained" in answer:  # tritonclient's bodies ask for label and probabilities only
            assert bool(answer["abstained"][i]) == ref["abstained"], name
        scores = {p["label"]: p["score"] for p in ref["predictions"]}
        assert max(abs(scores[n] - float(answer["probabilities"][i, k])) for k, n in enumerate(names)) < 1e-5, name


def _body_with(level: str) -> dict[str, Any]:
    b64 = base64.b64encode((ROOT / "examples" / "cat.jpg").read_bytes()).decode()
    body: dict[str, Any] = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
                            "outputs": [{"name": "label"}]}
    extra = {"x_unknown": {"nested": [1, {"deeper": "yes"}]}}
    target = {"request": body, "input": body["inputs"][0], "output": body["outputs"][0]}.get(level)
    if target is not None:
        target.update(extra)
    else:  # parameters of the request, an input and an output
        body["parameters"] = {"x_param": 1}
        body["inputs"][0]["parameters"] = {"x_param": "a"}
        body["outputs"][0]["parameters"] = {"x_param": True}
    return body


def _unknown_key_counts(server: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith("classifier_v2_unknown_keys_total{"):
            out[line.split('level="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("level", ["request", "input", "output", "parameters"])
def test_an_unknown_key_at_each_level_is_ignored_and_counted(server: str, level: str) -> None:
    before = _unknown_key_counts(server).get(level, 0.0)
    r = httpx.post(f"{server}/v2/models/tiny/infer", json=_body_with(level))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["name"] == "label"
    assert _unknown_key_counts(server)[level] == before + (3 if level == "parameters" else 1)


def test_known_keys_stay_strict_and_unknown_ones_bounded(server: str) -> None:
    body = _body_with("request")
    for bad in ({"id": 5}, {"inputs": [{**body["inputs"][0], "shape": ["1"]}]}, {"outputs": [{"name": 3}]},
                {"parameters": {"binary_data_output": "yes"}}, {"inputs": [{**body["inputs"][0], "parameters": {"x": [1]}}]}):
        r = httpx.post(f"{server}/v2/models/tiny/infer", json={**body, **bad})
        assert r.status_code == 400 and r.json()["code"] == "bad_request", (bad, r.text)
    many = {**body, **{f"k{i}": i for i in range(65)}}
    r = httpx.post(f"{server}/v2/models/tiny/infer", json=many)
    assert r.status_code == 400 and "66 keys the service does not read" in r.json()["error"]
