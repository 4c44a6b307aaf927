"""The data plane's facts (service/dataplane.py): one version order, one output table."""

from __future__ import annotations

from service import dataplane


def test_one_version_order_text_first_then_numbers_by_value() -> None:
    # "10" after "2" (not as text), text versions before numbers, and a digit that int() cannot read is text
    assert dataplane.sorted_versions(["10", "2", "abc", "\u00b2", "1"]) == ["abc", "\u00b2", "1", "2", "10"]


def test_every_output_the_metadata_names_is_an_output_tensor() -> None:
    assert dataplane.OUTPUT_NAMES == ("label", "probabilities", "text_attention", "abstained", "ood_score")
    assert set(dataplane.OUTPUTS.values()) <= {"BYTES", "FP32", "BOOL"}
