"""The artifact contract, executable: what the graph takes, what it gives, and what its outputs mean.

``manifest.json`` says which tensors an artifact has and the numbers fitted at export (the
temperature, the out-of-distribution threshold); this module is the one reading of them (as
timm's ``PretrainedCfg`` or Triton's ``config.pbtxt`` beside the model): the input feed, the
outputs to ask for, and ``postprocess``: the calibrated probabilities, the OOD score over its
threshold and the abstention rule. The service, evaluation, quantization and the tests answer
through it, so an artifact means the same thing everywhere. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .artifact import ATTENTION, PROBABILITIES, Manifest

IMAGE = "image"  # uint8 [N, S, S, 3], RGB, resized as classifier_core.images does
INPUT_IDS = "input_ids"  # int64 [N, L], right-padded with the tokenizer's pad id
OOD_SCORE = "ood_score"  # float32 [N]: the name export gives it (an artifact names its own in ood.output)
# the graph's tensors as export writes them, in order: (name, dtype); the OOD score only where fitted
INPUTS = [(IMAGE, "uint8"), (INPUT_IDS, "int64")]
OUTPUTS = [(PROBABILITIES, "float32"), (ATTENTION, "float32"), (OOD_SCORE, "float32")]
OUT_OF_DISTRIBUTION = "out_of_distribution"
LOW_CONFIDENCE = "low_confidence"


def feeds(images: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's inputs by name."""
    return {IMAGE: images, INPUT_IDS: ids}


def output_names(manifest: Manifest, attention: bool = True) -> list[str]:
    """The outputs ``postprocess`` reads: probabilities, the caption's attention (``attention``) and
    the OOD score where the artifact has one (its name is the manifest's own)."""
    names = [PROBABILITIES] + ([ATTENTION] if attention else [])
    return names + ([str(manifest.ood["output"])] if manifest.ood_threshold is not None else [])


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log p differs from the logits by a per-row constant."""
    if temperature == 1.0:
        return probs
    z = np.log(np.maximum(probs, np.float32(1e-45))) / np.float32(temperature)
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


@dataclass
class Outputs:
    probabilities: np.ndarray  # float32 [N, C], calibrated (the artifact's temperature applied)
    attention: np.ndarray | None  # float32 [N, L], when asked for
    ood: np.ndarray  # float32 [N]: the OOD score over its threshold (above 1: unlike the training data); NaN without one

    @property
    def ood_flagged(self) -> np.ndarray:
        """bool [N]: the rows the OOD rule abstains on (none for an artifact without the score)."""
        return np.nan_to_num(self.ood, nan=0.0) > 1.0


def postprocess(outputs: Mapping[str, np.ndarray], manifest: Manifest) -> Outputs:
    """What the graph's outputs (by name, as ``output_names`` asked) mean for this artifact."""
    probs = np.asarray(outputs[PROBABILITIES])
    threshold = manifest.ood_threshold
    n = len(probs)
    ood = (np.asarray(outputs[str(manifest.ood["output"])]).reshape(n) / threshold).astype(np.float32) \
        if threshold is not None else np.full(n, np.nan, np.float32)
    return Outputs(calibrate(probs, manifest.temperature), outputs.get(ATTENTION), ood)


def abstain_reason(confidence: float, ood: float | None, min_confidence: float, use_ood: bool = True) -> str | None:
    """Why an answer would rather name no label (None: it names one). ``out_of_distribution`` first:
    a photo of something the model never learned is answered with high confidence all the same, so
    confidence cannot catch it."""
    if use_ood and ood is not None and ood > 1.0:
        return OUT_OF_DISTRIBUTION
    if confidence < min_confidence:
        return LOW_CONFIDENCE
    return None
