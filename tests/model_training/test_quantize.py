"""INT8: the accuracy gate refuses a broken quantization and passes a good one; the quantized artifact
serves like any other, with the answers of its own graph."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import calibrated, free_port, jpeg_bytes, running_server

from classifier_core.artifact import load_manifest
from model_training import quantize as q

# The gate at 0.5 point cannot be met by chance on the session's small artifact (53 validation rows:
# one answer is 1.9 points), so the good quantization here is a conservative one (the backbone's last
# convolution and its ReLU6, 7-bit weights): what must pass is the gate and the artifact, on real data.
# The default recipe's accuracy on 274 rows is docs/performance.md's table (benchmarks/int8_check.py).
# a few answers may flip even so: the tiny model trains a little differently run to run and answers near
# its decision boundaries (test accuracy about 0.63 with the refit probe heads; CI saw 2 of 86 test answers
# flip, 2.3 points), so this gate allows about four rows; the default 0.5 point is the command's, exercised
# by the refusal tests below (blank calibration loses far more)
GOOD = q.QuantizeConfig(calibration_rows=256, keep_float=("stem", "expand", "depthwise", "project"), max_drop=0.05)


@pytest.fixture(scope="module")
def int8_artifact(tiny_pretrained_artifact: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    q.quantize_artifact(tiny_pretrained_artifact, out, GOOD, data=[str(tiny_data)])
    return out


def test_a_good_quantization_passes_the_gate_and_records_both_figures(tiny_pretrained_artifact: Path,
                                                                      int8_artifact: Path) -> None:
    m = load_manifest(int8_artifact)  # every file's sha256 checked
    assert m.version == "0.0.1-int8" and m.quantization["type"] == "int8"
    assert m.quantization["source"]["version"] == "0.0.1"
    for split in ("val", "test"):
        acc = m.quantization["figures"][split]["accuracy"]
        assert acc["float"] - acc["int8"] <= GOOD.max_drop, acc
    assert m.metrics[m.mode]["test_acc"] == m.quantization["figures"]["test"]["accuracy"]["int8"]  # this graph's
    assert m.quantization["quantized_nodes"] == 2 and m.quantization["float_convolutions"] > 40  # as configured
    assert m.serving["model_bytes"] < load_manifest(tiny_pretrained_artifact).serving["model_bytes"]
    assert "eval_report.json" not in m.files  # the float model's report does not describe this graph


def test_a_broken_quantization_is_refused_with_its_figures(tiny_pretrained_artifact: Path, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    """Calibrated on blank images, the activation ranges clip every real image: the gate must say no."""
    m = load_manifest(tiny_pretrained_artifact)
    train = q.read_rows(tiny_pretrained_artifact, m, "train", 64, [str(tiny_data)])
    blank = q.Rows(np.zeros_like(train.images), train.ids, train.targets)
    nodes, _ = q.plan(tiny_pretrained_artifact / "model.onnx", q.QuantizeConfig.keep_float)
    q.quantize_graph(tiny_pretrained_artifact / "model.onnx", tmp_path / "broken.onnx", blank, nodes)
    splits = {s: q.read_rows(tiny_pretrained_artifact, m, s, 4096, [str(tiny_data)]) for s in ("val", "test")}
    figures = q.compare(tiny_pretrained_artifact / "model.onnx", tmp_path / "broken.onnx", splits, m.ood_threshold, 2)
    failures = q.gate(figures, q.QuantizeConfig())
    assert failures and any("points lost" in f or "out-of-distribution" in f for f in failures), figures


def test_the_command_refuses_and_writes_nothing(tiny_pretrained_artifact: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "model_training", "quantize", str(tiny_pretrained_artifact), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pass --data" in r.stderr, r.stderr  # the manifest names its data, not where it was
    # a negative allowance: no quantized graph can pass it, so the refusal path runs end to end
    r = subprocess.run([sys.executable, "-m", "model_training", "quantize", str(tiny_pretrained_artifact), "--out", str(out),
                        "--max-drop", "-1", "--calibration-rows", "64", "--data", str(tiny_data)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "quantization refused" in r.stderr and "points lost" in r.stderr and "->" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".quantize-*"))


def test_the_paper_model_is_not_quantized(tiny_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(q.QuantizeError, match="backbone"):
        q.quantize_artifact(tiny_artifact, tmp_path / "x")


def test_the_int8_artifact_serves_the_answers_of_its_own_graph_on_every_protocol(int8_artifact: Path) -> None:
    import onnxruntime as ort
    import tritonclient.grpc as tg

    from classifier_core.images import load_image
    from classifier_core.text import TextEncoder

    m = load_manifest(int8_artifact)
    image, caption = jpeg_bytes(size=(80, 60), colour=(230, 180, 20)), "a ripe banana on the table"
    text = TextEncoder.from_file(int8_artifact / m.tokenizer_file, m.max_len)
    sess = ort.InferenceSession(str(int8_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = sess.run(["probabilities"], {"image": load_image(image, m.image_size)[None],
                                       "input_ids": text.pad(text.encode_batch([caption]))})[0]
    want = calibrated(raw, int8_artifact)[0]  # what the service answers: the graph's, at the fitted temperature
    port = free_port()
    with running_server(int8_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_GRPC_PORT=str(port),
                        CLASSIFIER_GRPC_HOST="127.0.0.1") as (_, url):
        info = httpx.get(f"{url}/model").json()
        assert info["quantization"]["type"] == "int8" and info["version"] == "0.0.1-int8"
        r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", image, "image/jpeg")}, data={"description": caption},
                       params={"top_k": len(m.labels)})
        assert r.status_code == 200, r.text
        rest = {p["label"]: p["score"] for p in r.json()["predictions"]}
        v2 = httpx.post(f"{url}/v2/models/{m.name}/infer", json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]},
                       {"name": "description", "datatype": "BYTES", "shape": [1], "data": [caption]}],
            "outputs": [{"name": "probabilities"}]})
        assert v2.status_code == 200, v2.text
        img = tg.InferInput("image", [1], "BYTES")
        img.set_data_from_numpy(np.array([image], dtype=object))
        txt = tg.InferInput("description", [1], "BYTES")
        txt.set_data_from_numpy(np.array([caption.encode()], dtype=object))
        grpc_probs = tg.InferenceServerClient(f"127.0.0.1:{port}").infer(m.name, [img, txt]).as_numpy("probabilities")[0]
    for got in ([rest[label] for label in m.labels], v2.json()["outputs"][0]["data"], grpc_probs.tolist()):
        assert np.abs(np.asarray(got) - want).max() < 1e-5, (got, want)
