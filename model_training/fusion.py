"""Fusion ``heads``: the weights of the joint head and of each branch's own head, fitted on validation.

A jointly trained head over both branches' features leans on whichever branch memorises the training
split fastest (on photographs, the image branch: train accuracy 1.0 in a few epochs) and then ignores
the other; a late fusion of two separately trained models does not, because its weight is chosen on
data neither model trained on. ``--model.fusion heads`` gives the fused model both: each branch has
its own head trained on its own loss (the auxiliary losses of AutoGluon's fusion MLP), the joint head
stays, and the answer is a product of experts: the sum of each head's log-probabilities at its own
temperature, weighted. After training both are fitted on the validation split: each head's
temperature (lowest loss: the head that memorised is confidently wrong on new images and gets a high
one), then the weights from a small grid of mixtures (best accuracy, ties: lowest loss). They are
buffers of the model, so they travel in ``best.pt`` and into the ONNX graph like any weight.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .model import FusedClassifier

log = logging.getLogger(__name__)

MAX_ROWS = 20_000  # validation rows read for the fit (a few hundred already decide it)
# (image, text) weight pairs: mixtures only, as a practitioner's late fusion picks them (one branch
# alone is never chosen: on a small validation split that choice is noise); the joint head's weight
JOINT = (0.0, 0.5, 1.0)
MIXTURES = ((0.25, 0.75), (0.5, 0.5), (0.75, 0.25))
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 64.0, 33))


@torch.no_grad()
def branch_logits(model: FusedClassifier, batches: Iterable[dict[str, Any]], device: torch.device
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Targets [N] and the three heads' logits [3, N, C] of up to MAX_ROWS rows of ``batches`` (the
    feature cache's batches or the image stream's)."""
    model.eval()
    parts, targets, n = [], [], 0
    for b in batches:
        if len(b["targets"]) == 0:
            continue
        ids = b["ids"].to(device)
        text = b["text"].to(device) if "text" in b else None
        if "pooled" in b:
            out = model(None, ids, pooled=b["pooled"].to(device), text_pooled=text, branches=True)
        else:
            out = model(b["images"].to(device), ids, text_pooled=text, branches=True)
        parts.append(out[2].float().cpu().numpy())
        targets.append(b["targets"].numpy().copy())
        n += len(targets[-1])
        if n >= MAX_ROWS:
            break
    if not parts:
        return np.zeros(0, np.int64), np.zeros((3, 0, model.cfg.num_classes), np.float32)
    return np.concatenate(targets)[:MAX_ROWS], np.concatenate(parts, axis=1)[:, :MAX_ROWS]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def nll(logp: np.ndarray, targets: np.ndarray) -> float:
    return float(-logp[np.arange(len(targets)), targets].mean())


def temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature (a grid from 0.25 to 64) of the lowest validation loss: a head that memorised
    its training images is confidently wrong on new ones, and gets a high one."""
    z = logits.astype(np.float64)
    return min(TEMPERATURES, key=lambda t: nll(_log_softmax(z / t), targets))


def combine(parts: np.ndarray, weights: tuple[float, ...], temperatures: tuple[float, ...]) -> np.ndarray:
    """What the model computes: the weighted sum of each head's log-probabilities at its temperature [N, C]."""
    return sum(w * _log_softmax(parts[k].astype(np.float64) / t)
               for k, (w, t) in enumerate(zip(weights, temperatures, strict=True)))  # type: ignore[return-value]


def score(weights: tuple[float, ...], temperatures: tuple[float, ...], parts: np.ndarray,
          targets: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) of the combined answer."""
    z = combine(parts, weights, temperatures)
    return float((z.argmax(1) == targets).mean()), nll(_log_softmax(z), targets)


def fit_weights(parts: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Each head's temperature, then the grid's best weights on these rows (accuracy, ties: loss),
    with each head's own accuracy. Without rows the training values (all 1) stay."""
    if len(targets) == 0:
        return {"weights": [1.0, 1.0, 1.0], "temperatures": [1.0, 1.0, 1.0], "rows": 0}
    temps = tuple(temperature(parts[k], targets) for k in range(3))
    ones = (1.0, 1.0, 1.0)
    grid = [(j, i, t) for j in JOINT for i, t in MIXTURES]
    scored = [(score(w, temps, parts, targets), w, temps) for w in grid]
    scored.append((score(ones, ones, parts, targets), ones, ones))  # as trained: what chose the best epoch
    (acc, loss), best, temps = max(scored, key=lambda s: (s[0][0], -s[0][1]))
    heads = {name: score(w, ones, parts, targets)[0]
             for name, w in (("joint", (1, 0, 0)), ("image", (0, 1, 0)), ("text", (0, 0, 1)), ("trained", ones))}
    return {"weights": [float(x) for x in best], "temperatures": [float(t) for t in temps], "rows": len(targets),
            "val_acc": acc, "val_nll": loss, "val_acc_by_head": heads}


def apply(model: FusedClassifier, fit: dict[str, Any]) -> None:
    model.fusion_weights.copy_(torch.tensor(fit["weights"], dtype=model.fusion_weights.dtype))
    model.fusion_temperatures.copy_(torch.tensor(fit.get("temperatures", [1.0, 1.0, 1.0]), dtype=model.fusion_temperatures.dtype))
