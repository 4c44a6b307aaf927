"""Fusion ``heads``: the weights of the joint head and of each branch's own head, fitted on validation.

A jointly trained head over both branches' features leans on whichever branch memorises the training
split fastest (on photographs, the image branch: train accuracy 1.0 in a few epochs) and then ignores
the other; a late fusion of two separately trained models does not, because its weight is chosen on
data neither model trained on. ``--model.fusion heads`` gives the fused model both: each branch has
its own head trained on its own loss (the auxiliary losses of AutoGluon's fusion MLP), the joint head
stays, and after training the answer's logits ``w_joint * joint + w_image * image + w_text * text`` get
the weights that score best on the validation split (ties: the lowest validation loss). The weights
are a buffer of the model, so they travel in ``best.pt`` and into the ONNX graph like any weight.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .model import FusedClassifier

log = logging.getLogger(__name__)

MAX_ROWS = 20_000  # validation rows read for the fit (a few hundred already decide it)
JOINT = (0.0, 0.5, 1.0)
BRANCH = (0.0, 0.25, 0.5, 1.0, 2.0)


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


def score(weights: tuple[float, ...], parts: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) of the weighted logits."""
    z = np.tensordot(np.asarray(weights, np.float64), parts.astype(np.float64), axes=1)  # [N, C]
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float((z.argmax(1) == targets).mean()), float(-logp[np.arange(len(targets)), targets].mean())


def fit_weights(parts: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """The grid's best (joint, image, text) weights on these rows, with each head's own accuracy.

    Without rows the training weights (1, 1, 1) stay."""
    if len(targets) == 0:
        return {"weights": [1.0, 1.0, 1.0], "rows": 0}
    grid = [w for w in itertools.product(JOINT, BRANCH, BRANCH) if any(w)]
    scored = [(score(w, parts, targets), w) for w in grid]
    (acc, nll), best = max(scored, key=lambda s: (s[0][0], -s[0][1]))
    heads = {name: score(w, parts, targets)[0]
             for name, w in (("joint", (1, 0, 0)), ("image", (0, 1, 0)), ("text", (0, 0, 1)), ("trained", (1, 1, 1)))}
    return {"weights": [float(x) for x in best], "rows": len(targets), "val_acc": acc, "val_nll": nll,
            "val_acc_by_head": heads}


def apply(model: FusedClassifier, fit: dict[str, Any]) -> None:
    model.fusion_weights.copy_(torch.tensor(fit["weights"], dtype=model.fusion_weights.dtype))
