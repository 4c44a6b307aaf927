"""Abstention in every protocol: a confidence threshold (service-wide and per request) and the
artifact's out-of-distribution score, on the committed default model and real photographs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import DEFAULT_MODEL, ROOT, running_server

CAT = (ROOT / "examples" / "cat.jpg").read_bytes()  # a photograph: the default model knows drawings only
TOMATO = (ROOT / "examples" / "tomato.jpg").read_bytes()  # one of its own drawings


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server(DEFAULT_MODEL, CLASSIFIER_WORKERS="1") as (_, url):
        yield url


def classify(url: str, image: bytes, caption: str = "", **params: object) -> dict:
    r = httpx.post(f"{url}/classify", params=params, files={"image": ("x.jpg", image, "image/jpeg")}, data={"description": caption})
    assert r.status_code == 200, r.text
    return r.json()


def v2(url: str, images: list[bytes], **parameters: object) -> dict:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(i).decode() for i in images]}],
            "parameters": {"binary_data_output": False, **parameters}}
    r = httpx.post(f"{url}/v2/models/image-text-classifier/infer", json=body)
    assert r.status_code == 200, r.text
    return {o["name"]: o["data"] for o in r.json()["outputs"]}


def test_a_photo_is_out_of_distribution_and_a_drawing_is_not(server: str) -> None:
    cat = classify(server, CAT, "a cherry tomato")  # a caption from its own labels does not pull it in
    assert cat["label"] is None and cat["abstained"] and cat["abstain_reason"] == "out_of_distribution"
    assert cat["ood_score"] > 1.0 and cat["predictions"][0]["label"]  # the best guess is still shown
    tomato = classify(server, TOMATO, "a cherry tomato")
    assert tomato["label"] == "tomato" and not tomato["abstained"] and tomato["ood_score"] < 1.0
    assert "abstain_reason" not in tomato


def test_min_confidence_per_request_on_classify_and_batch(server: str) -> None:
    sure = classify(server, TOMATO, "a cherry tomato", min_confidence=0.5)
    assert not sure["abstained"] and sure["confidence"] > 0.5
    unsure = classify(server, TOMATO, "a cherry tomato", min_confidence=1.0)
    assert unsure["label"] is None and unsure["abstain_reason"] == "low_confidence"
    assert unsure["predictions"] == sure["predictions"]
    items = [{"image_base64": base64.b64encode(i).decode(), "description": "a cherry tomato"} for i in (TOMATO, CAT)]
    results = httpx.post(f"{server}/classify/batch", json={"items": items}).json()["results"]
    assert [r["abstain_reason"] if r["abstained"] else r["label"] for r in results] == ["tomato", "out_of_distribution"]
    results = httpx.post(f"{server}/classify/batch", params={"min_confidence": 1}, json={"items": items}).json()["results"]
    assert [r.get("abstain_reason") for r in results] == ["low_confidence", "out_of_distribution"]
    bad = httpx.post(f"{server}/classify", params={"min_confidence": 1.5}, files={"image": ("x.jpg", TOMATO, "image/jpeg")})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_abstention_on_v2(server: str) -> None:
    out = v2(server, [TOMATO, CAT])
    assert out["label"] == ["tomato", ""] and out["abstained"] == [False, True]
    assert out["ood_score"][0] < 1.0 < out["ood_score"][1]
    out = v2(server, [TOMATO, CAT], min_confidence=1.0)
    assert out["label"] == ["", ""] and out["abstained"] == [True, True]
    for wrong in ("high", 10**400, -1e-9, True):  # a 401-digit integer: out of range, not a float overflow (500)
        r = httpx.post(f"{server}/v2/models/image-text-classifier/infer", json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(TOMATO).decode()]}],
            "parameters": {"min_confidence": wrong}})
        assert r.status_code == 400 and r.json()["code"] == "bad_request", (wrong, r.text)
    meta = httpx.get(f"{server}/v2/models/image-text-classifier").json()
    assert meta["parameters"]["ood_abstain"] is True and meta["parameters"]["temperature"] > 0


def test_service_settings_set_the_defaults(tmp_path: Path) -> None:
    with running_server(DEFAULT_MODEL, CLASSIFIER_WORKERS="1", CLASSIFIER_MIN_CONFIDENCE="1.0",
                        CLASSIFIER_OOD_ABSTAIN="false") as (_, url):
        cat = classify(url, CAT)
        assert cat["abstain_reason"] == "low_confidence"  # the OOD score is reported, not acted on
        assert cat["ood_score"] > 1.0
        assert not classify(url, CAT, min_confidence=0.0)["abstained"]
        info = httpx.get(f"{url}/model").json()
        assert info["abstention"]["min_confidence"] == 1.0 and info["abstention"]["ood"] is False
        assert info["calibration"]["temperature"] > 0 and "ece_test_after" in info["calibration"]


def test_a_pretrained_artifact_is_served_like_any_other(tiny_pretrained_artifact: Path) -> None:
    with running_server(tiny_pretrained_artifact, CLASSIFIER_WORKERS="1") as (_, url):
        body = classify(url, TOMATO, "a cherry tomato", top_k=8)
        assert len(body["predictions"]) == 8 and body["ood_score"] is not None
        assert httpx.get(f"{url}/model").json()["backbone"]["name"] == "efficientnet-lite0"
        r = httpx.post(f"{url}/v2/models/tiny-pretrained/infer", json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(TOMATO).decode()]}],
            "outputs": [{"name": "probabilities"}]})
        assert r.status_code == 200, r.text
        probs = r.json()["outputs"][0]["data"]
        assert abs(sum(probs) - 1.0) < 1e-4
