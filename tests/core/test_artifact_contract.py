"""The executable artifact contract (classifier_core/contract.py) against its definition, on a real artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from helpers import calibrated

from classifier_core import contract
from classifier_core.artifact import load_manifest
from classifier_core.text import TextEncoder


def test_postprocess_is_the_temperature_and_the_ood_threshold_the_manifest_states(tiny_artifact: Path) -> None:
    m = load_manifest(tiny_artifact)
    assert m.ood_threshold is not None and m.temperature != 1.0  # both facts are exercised
    text = TextEncoder.from_file(tiny_artifact / m.tokenizer_file, m.max_len)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, m.image_size, m.image_size, 3), dtype=np.uint8)
    ids = text.pad(text.encode_batch(["a red tomato", "", "zzz qqq", "tomato", "a bird", "x"]))
    sess = ort.InferenceSession(str(tiny_artifact / m.model_file), providers=["CPUExecutionProvider"])
    names = contract.output_names(m)
    assert names == [contract.PROBABILITIES, contract.ATTENTION, m.ood["output"]]
    raw = dict(zip(names, sess.run(names, contract.feeds(images, ids)), strict=True))
    out = contract.postprocess(raw, m)
    np.testing.assert_allclose(out.probabilities, calibrated(raw[contract.PROBABILITIES], tiny_artifact), atol=1e-6)
    np.testing.assert_allclose(out.ood, raw[m.ood["output"]] / m.ood_threshold, rtol=1e-6)
    assert (out.ood_flagged == (raw[m.ood["output"]] > m.ood_threshold)).all()


def test_abstention_names_out_of_distribution_before_low_confidence() -> None:
    assert contract.abstain_reason(0.99, 1.5, 0.5) == contract.OUT_OF_DISTRIBUTION
    assert contract.abstain_reason(0.3, 1.5, 0.5) == contract.OUT_OF_DISTRIBUTION
    assert contract.abstain_reason(0.3, 0.5, 0.5) == contract.LOW_CONFIDENCE
    assert contract.abstain_reason(0.3, 1.5, 0.5, use_ood=False) == contract.LOW_CONFIDENCE
    assert contract.abstain_reason(0.9, None, 0.5) is None
