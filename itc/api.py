"""Classify in-process, without a server: the service's own predictor, preprocessing and abstention.

    from itc import Classifier

    clf = Classifier.load("exported_models/default")
    for answer in clf.predict(["examples/tomato.jpg"], ["a cherry tomato on the table"]):
        print(answer.label, answer.confidence, answer.abstained)

An image is a path, the file's bytes, a PIL image or an HxWx3 uint8 array; a caption may be empty.
The answers are the ones ``POST /classify`` gives for the same inputs: the same decoding
(``classifier_core.images``), tokenizer, onnxruntime session (``service.serving.session.Predictor``),
temperature and abstention rules.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from classifier_core.images import ImageError, load_image

ImageInput = Any  # str | Path | bytes | PIL.Image.Image | np.ndarray


@dataclass
class Answer:
    """One image's answer, as ``POST /classify`` gives it."""

    label: str | None  # None when the model abstained
    confidence: float  # the top probability, calibrated (the artifact's temperature)
    abstained: str | None  # None, "out_of_distribution" or "low_confidence"
    top: list[tuple[str, float]] = field(default_factory=list)  # the top_k labels and probabilities
    best_guess: str = ""  # the top label, also when abstained
    ood_score: float | None = None  # over the artifact's threshold: above 1.0 the image is unlike the training data


class Classifier:
    """An exported model loaded in this process (onnxruntime; CPU unless ``provider`` says otherwise)."""

    def __init__(self, predictor: Any, min_confidence: float, ood_abstain: bool, max_pixels: int) -> None:
        self._predictor = predictor
        self.min_confidence, self.ood_abstain, self.max_pixels = min_confidence, ood_abstain, max_pixels
        info = predictor.loaded
        self.name, self.version, self.labels = info.name, info.version, list(info.labels)
        self.image_size = int(info.image_size)

    @classmethod
    def load(cls, model_dir: str | Path, threads: int = 0, batch_size: int = 32,
             provider: Literal["auto", "cuda", "tensorrt", "cpu", "openvino"] = "cpu", min_confidence: float = 0.0,
             ood_abstain: bool = True, max_pixels: int = 40_000_000) -> Classifier:
        """Verify and load an artifact folder (checksums, inputs and outputs, a warm-up run).

        ``threads``: onnxruntime threads (0 = every core); ``batch_size``: rows per onnxruntime call;
        ``min_confidence`` and ``ood_abstain``: the service's abstention settings."""
        from service.serving.session import Predictor
        from service.settings import Settings

        threads = threads or (os.cpu_count() or 1)
        settings = Settings(model_dir=Path(model_dir), provider=provider, workers=1, intra_op_threads=threads,
                            max_batch_size=batch_size, min_confidence=min_confidence, ood_abstain=ood_abstain,
                            max_image_pixels=max_pixels).resolved(processes=1)
        predictor = Predictor(settings)
        predictor.load()
        return cls(predictor, min_confidence, ood_abstain, max_pixels)

    def decode(self, image: ImageInput) -> np.ndarray:
        """One image as the model reads it (uint8 [S, S, 3]); ImageError if it is not a readable image."""
        return load_image(_as_bytes(image), self.image_size, self.max_pixels)

    def predict(self, images: Sequence[ImageInput], captions: Sequence[str] | None = None, top_k: int = 3) -> list[Answer]:
        """One Answer per image, in order. An unreadable image raises ImageError (naming its position)."""
        captions = list(captions) if captions is not None else [""] * len(images)
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        decoded = []
        for i, image in enumerate(images):
            try:
                decoded.append(self.decode(image))
            except ImageError as exc:
                raise ImageError(f"image {i}: {exc}") from None
        return self.predict_arrays(np.stack(decoded) if decoded else np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
                                   captions, top_k)

    def predict_arrays(self, images: np.ndarray, captions: Sequence[str], top_k: int = 3) -> list[Answer]:
        """Answers for images decoded already (``decode``): uint8 [N, S, S, 3]."""
        if len(images) == 0:
            return []
        p = self._predictor
        out = []
        for pred in p.predict(images, p.encode(list(captions))):
            order = pred.probabilities.argsort(kind="stable")[::-1][: max(1, top_k)]  # as routes/classify.py ranks
            reason = pred.abstain_reason(self.min_confidence, self.ood_abstain)
            best = self.labels[int(order[0])]
            out.append(Answer(None if reason else best, pred.confidence, reason,
                              [(self.labels[int(k)], float(pred.probabilities[k])) for k in order], best, pred.ood))
        return out

    def close(self) -> None:
        self._predictor.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        from PIL import Image

        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageError(f"an array image must be uint8 [H, W, 3 or 4], not {image.dtype} {list(image.shape)}")
        image = Image.fromarray(image)
    if hasattr(image, "save"):  # a PIL image: PNG is lossless, so the service's decoder sees these pixels
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image is a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}")
