"""Decoded samples in memory as tensors, batching, and batched prediction: for evaluate and export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from classifier_core.text import TextEncoder, pad_ids

from .model import FusedClassifier
from .stream import Collected


@dataclass
class Tensors:
    images: torch.Tensor  # uint8 [N, S, S, 3]
    ids: list[list[int]]  # unpadded token ids
    targets: torch.Tensor  # int64 [N]


def to_tensors(split: Collected, text: TextEncoder, labels: list[str]) -> Tensors:
    index = {lab: i for i, lab in enumerate(labels)}
    ids = [e.ids for e in text.encode_batch(split.captions)] if len(split) else []
    return Tensors(torch.from_numpy(split.images), ids, torch.tensor([index[x] for x in split.labels], dtype=torch.long))


def iterate(t: Tensors, batch_size: int, order: np.ndarray | None = None) -> Any:
    idx = order if order is not None else np.arange(len(t.targets))
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        yield t.images[b], torch.from_numpy(pad_ids([t.ids[i] for i in b])), t.targets[b]


@torch.no_grad()
def predict_probs(model: FusedClassifier, t: Tensors, batch_size: int = 256) -> np.ndarray:
    model.eval()
    dev = next(model.parameters()).device
    out = [torch.softmax(model(img.to(dev), ids.to(dev))[0], -1).cpu() for img, ids, _ in iterate(t, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.num_classes), np.float32)


def accuracy(probs: np.ndarray, targets: torch.Tensor) -> float:
    return float((probs.argmax(-1) == targets.numpy()).mean()) if len(targets) else float("nan")
