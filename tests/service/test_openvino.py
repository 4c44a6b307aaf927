"""CLASSIFIER_PROVIDER=openvino: the same artifact on OpenVINO's CPU plugin, with onnxruntime's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import DEFAULT_MODEL, ROOT, app_client, calibrated

from classifier_core.artifact import load_manifest
from classifier_core.images import load_image
from classifier_core.text import TextEncoder

pytest.importorskip("openvino", reason="the openvino extra is not installed (.ci/run installs it)")

TOMATO = (ROOT / "examples" / "tomato.jpg").read_bytes()


def _ort_probs(model_dir: Path, image: bytes, caption: str) -> np.ndarray:
    m = load_manifest(model_dir)
    text = TextEncoder.from_file(model_dir / m.tokenizer_file, m.max_len)
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = sess.run(["probabilities"], {"image": load_image(image, m.image_size)[None],
                                       "input_ids": text.pad(text.encode_batch([caption]))})[0]
    return calibrated(raw, model_dir)[0]


@pytest.mark.parametrize("model", ["default", "pretrained"])
def test_openvino_serves_the_answers_of_onnxruntime(model: str, tiny_pretrained_artifact: Path) -> None:
    model_dir = DEFAULT_MODEL if model == "default" else tiny_pretrained_artifact
    labels = load_manifest(model_dir).labels
    want = _ort_probs(model_dir, TOMATO, "a cherry tomato")
    with app_client(model_dir, provider="openvino") as c:
        assert c.get("/model").json()["providers"] == ["OpenVINOCPU"]
        r = c.post("/classify", files={"image": ("x.jpg", TOMATO, "image/jpeg")}, data={"description": "a cherry tomato"},
                   params={"top_k": len(labels)})
        assert r.status_code == 200, r.text
        got = {p["label"]: p["score"] for p in r.json()["predictions"]}
        assert max(abs(got[label] - want[i]) for i, label in enumerate(labels)) < 1e-4
        batch = c.post("/classify/batch", json={"items": [{"image_base64": __import__("base64").b64encode(TOMATO).decode(),
                                                           "description": d} for d in ("a cherry tomato", "", "x " * 40)]})
        assert batch.status_code == 200 and len(batch.json()["results"]) == 3, batch.text


def test_openvino_that_disagrees_with_onnxruntime_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.serving import openvino
    from service.serving.base import ProviderError
    from service.serving.session import Predictor
    from service.settings import Settings

    monkeypatch.setattr(openvino, "PARITY_ATOL", -1.0)  # no answer can match: the refusal path runs on a real model
    with pytest.raises(ProviderError, match="differ from onnxruntime"):
        Predictor(Settings(model_dir=DEFAULT_MODEL, provider="openvino", workers=1)).load()
