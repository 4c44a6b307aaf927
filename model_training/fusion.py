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

``--model.refit-heads`` (the pretrained preset's, with ``--model.probe-head``): before the weights,
each branch head's final linear layer is fitted again as a linear probe of what it reads (L-BFGS,
L2 chosen on validation), and the answer is the two probes' late fusion as a practitioner picks it:
temperatures 1 (a second fit on the same few validation photographs sharpened the head that looked
best there), the joint head out (trained beside the others, it memorises), the image weight from
0.25/0.5/0.75 (ties: the caption-heavier). Scenes, seeds 0-4: 0.557 (heads) -> 0.682 (docs/training.md).
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


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the probes' grid (benchmarks/real_image_check.py)


@torch.no_grad()
def head_inputs(model: FusedClassifier, batches: Iterable[dict[str, Any]], device: torch.device
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Targets [N] and what each branch head's final linear layer reads [(N, D_image), (N, D_text)]."""
    model.eval()
    feats: list[list[np.ndarray]] = [[], []]
    targets, n = [], 0
    for b in batches:
        if len(b["targets"]) == 0:
            continue
        ids = b["ids"].to(device)
        text = b["text"].to(device) if "text" in b else None
        images = None if "pooled" in b else b["images"].to(device)
        pooled = b["pooled"].to(device) if "pooled" in b else None
        for k, f in enumerate(model.head_inputs(images, ids, pooled=pooled, text_pooled=text)):
            feats[k].append(f.float().cpu().numpy())
        targets.append(b["targets"].numpy().copy())
        n += len(targets[-1])
        if n >= MAX_ROWS:
            break
    if not targets:  # (a rank with no rows: empty, of the widths the other ranks' rows have)
        assert model.branch_heads is not None
        return np.zeros(0, np.int64), [np.zeros((0, _final(h).in_features), np.float32) for h in model.branch_heads]
    return np.concatenate(targets)[:MAX_ROWS], [np.concatenate(f)[:MAX_ROWS] for f in feats]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on (standardised) ``x`` by L-BFGS, in ``x``'s dtype: weights
    [D, C], bias [C]. The linear probes' recipe (``benchmarks/real_image_check.py`` uses it too)."""
    w = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def refit_head(layer: torch.nn.Linear, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> dict[str, Any]:
    """Fit ``layer`` again as a linear probe of its inputs: standardised with the training rows'
    statistics, L2 from ``L2_GRID`` chosen on the validation rows (accuracy; ties: the smallest L2, as
    the probes choose), the standardisation folded into the layer's weights. A head trained by Adam beside the joint one
    memorises a few hundred photographs; the probe's strong, validation-chosen L2 is what makes a
    late fusion of linear probes generalise."""
    classes = layer.out_features
    x, xv = x.astype(np.float64), xv.astype(np.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt, xvt = (torch.from_numpy((a - mu) / sd) for a in (x, xv))
    yt, yvt = torch.from_numpy(y), torch.from_numpy(yv)
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    for l2 in L2_GRID:
        w, b = fit_logistic(xt, yt, l2, classes)
        z = xvt @ w + b
        acc = float((z.argmax(1) == yvt).double().mean())
        if best is None or acc > best[0]:  # ties keep the smaller L2 (a loss tie-break chose 1.0: 0.639 vs 0.659)
            best = (acc, l2, w, b)
    assert best is not None
    acc, l2, w, b = best
    sd_t, mu_t = torch.from_numpy(sd), torch.from_numpy(mu)
    with torch.no_grad():  # (x - mu) / sd @ w + b  ==  x @ (w / sd) + (b - (mu / sd) @ w)
        layer.weight.copy_((w / sd_t[:, None]).T.to(layer.weight.dtype))
        layer.bias.copy_((b - (mu_t / sd_t) @ w).to(layer.bias.dtype))
    return {"l2": l2, "val_acc": acc}


def _final(head: torch.nn.Module) -> torch.nn.Linear:
    """A branch head's final linear layer (the probe head is BatchNorm, Dropout, Linear)."""
    layer = head[-1] if isinstance(head, torch.nn.Sequential) else head
    assert isinstance(layer, torch.nn.Linear)
    return layer


def refit_heads(model: FusedClassifier, train: tuple[np.ndarray, list[np.ndarray]],
                val: tuple[np.ndarray, list[np.ndarray]]) -> dict[str, Any]:
    """Each branch head's final linear layer fitted again as a linear probe (``refit_head``)."""
    assert model.branch_heads is not None
    (y, xs), (yv, xvs) = train, val
    if len(y) == 0 or len(yv) == 0:
        return {}
    out = {}
    for name, head, x, xv in zip(("image", "text"), model.branch_heads, xs, xvs, strict=True):
        out[name] = refit_head(_final(head), x, y, xv, yv)
    return out


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


def fit_weights(parts: np.ndarray, targets: np.ndarray, probes: bool = False) -> dict[str, Any]:
    """Each head's temperature, then the grid's best weights on these rows (accuracy, ties: loss),
    with each head's own accuracy. Without rows the training values (all 1) stay.

    ``probes`` (the branch heads were refit as probes): a late fusion of the two probes as a
    practitioner picks it: temperatures 1, the joint head out, the image weight 0.25, 0.5 or 0.75,
    ties to the first (the caption-heavier)."""
    if len(targets) == 0:
        return {"weights": [1.0, 1.0, 1.0], "temperatures": [1.0, 1.0, 1.0], "rows": 0}
    ones: tuple[float, ...] = (1.0, 1.0, 1.0)
    temps: tuple[float, ...]
    scored: list[tuple[tuple[float, float], tuple[float, ...], tuple[float, ...]]]
    if probes:
        temps = ones
        scored = [(score((0.0, i, t), temps, parts, targets), (0.0, i, t), temps) for i, t in MIXTURES]
        (acc, loss), best, temps = max(scored, key=lambda s: s[0][0])  # max keeps the first of equals
    else:
        temps = tuple(temperature(parts[k], targets) for k in range(3))
        grid: list[tuple[float, ...]] = [(j, i, t) for j in JOINT for i, t in MIXTURES]
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
