"""The committed default model: checksums, size, and its test accuracy reproduced from scratch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DEFAULT_MODEL

from classifier_core.artifact import load_manifest
from classifier_core.images import load_image
from model_training.data import split_of
from model_training.evaluate import onnx_predict
from model_training.synthetic import GeneratorConfig, generate

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "manifest.json").exists(), reason="no committed default model")


def test_checksums_and_size() -> None:
    m = load_manifest(DEFAULT_MODEL)  # raises on any checksum mismatch
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024
    assert set(m.metrics) == {"image", "text", "fused"}
    assert m.data["dataset"]["name"] == "builtin-synthetic"


def test_regenerated_test_split_reproduces_the_manifest_accuracy() -> None:
    m = load_manifest(DEFAULT_MODEL)
    d = m.data
    cfg = GeneratorConfig(**d["dataset"]["config"])
    keep = lambda key: split_of(key, d["seed"], d["val_frac"], d["test_frac"]) == "test"  # noqa: E731
    samples = list(generate(cfg, keep))
    assert len(samples) == d["n"]["test"]
    images = np.stack([load_image(jpg, m.image_size) for _, jpg, _, _ in samples])
    probs, labels = onnx_predict(DEFAULT_MODEL, images, [cap for _, _, cap, _ in samples])
    truth = np.array([labels.index(str(meta["label"])) for *_, meta in samples])
    acc = float((probs.argmax(1) == truth).mean())
    assert abs(acc - m.metrics["fused"]["test_acc"]) <= 0.005, (acc, m.metrics["fused"])
