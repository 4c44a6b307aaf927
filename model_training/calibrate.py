"""Confidence that means something: temperature scaling and an out-of-distribution score, fitted at export.

* **Temperature** (Guo et al. 2017): one scalar T fitted on the validation split by minimising
  the negative log-likelihood of softmax(logits / T). It changes no prediction, only how sure each
  one claims to be; the expected calibration error (ECE, 15 equal-width bins) before and after goes
  into the manifest. The service applies T to the model's probabilities (softmax(log p / T) equals
  softmax(logits / T)).
* **Out-of-distribution score**: temperature scaling fixes over-confidence on data like the
  training data, not on photos of things outside the labels, which a softmax still answers with
  certainty. The score is the Mahalanobis distance (Lee et al. 2018) of a sample's image statistics
  (per channel mean and standard deviation of the image branch's pooled block outputs; a text-only model:
  its caption features) to the nearest class mean of the training split, with one shared
  covariance, computed inside the ONNX graph. The covariance is shrunk towards its mean variance by the
  weight Ledoit and Wolf (2004) estimate from the rows: a covariance of a few hundred dimensions fitted
  on a few hundred samples memorises them (scored by it, its own samples sit at half the distance of
  new ones, and statistics fitted on four fifths of them score the fifth at twice it). Its threshold
  is a quantile (95 % by default) of scores of samples the statistics were not fitted on: the
  validation split's, and the training split's scored out of fold (``CrossFit``: the training rows
  in ``CROSS_FOLDS`` folds, each scored by the statistics of the others). A small validation split
  alone gives a noisy quantile: 57 images set the threshold that abstained on half a new user's
  in-scope test images. The export reports the share flagged of each split.

  Why those features (measured on the default model, 21 photographs that ship in scikit-image
  against its validation split, flagged at the validation split's 95 % quantile): the features the
  classifier head reads flagged 7 of 21 (AUROC 0.42-0.57: photos of textures land near a class
  mean), the energy score 12 (but 16 % of validation samples without their caption), k-nearest
  neighbours of those features 7-11; the block outputs' statistics 15 (17 before pooling, at a
  quarter of the graph's speed; AUROC 0.90-0.96). A classifier learns to ignore what does not tell
  its labels apart; the statistics keep it.

Memory is bounded: the training features come in chunks and only sums, class means and one D x D
scatter matrix are kept; validation logits and scores are kept for at most ``MAX_FIT_ROWS`` rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

ECE_BINS = 15
MAX_FIT_ROWS = 20_000  # validation rows kept for the temperature and the threshold
SHRINKAGE = 1e-3  # ridge added to the covariance (relative to its mean variance): a stable inverse
CROSS_FOLDS = 5  # folds of the training rows scored out of fold for the threshold


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the gap between confidence and accuracy, averaged over bins."""
    if len(targets) == 0:
        return float("nan")
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(float(conf[inside].mean()) - float(correct[inside].mean()))
    return float(total)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(1, keepdims=True))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on these rows (LBFGS on log T)."""
    if len(targets) == 0:
        return 1.0
    z = torch.from_numpy(np.asarray(logits, np.float64))
    y = torch.from_numpy(np.asarray(targets, np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


class FeatureStats:
    """Per-class sums and one scatter matrix of features, accumulated chunk by chunk."""

    def __init__(self, classes: int, dim: int) -> None:
        self.n = np.zeros(classes, np.float64)
        self.sums = np.zeros((classes, dim), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        f = np.asarray(features, np.float64)
        np.add.at(self.n, targets, 1)
        np.add.at(self.sums, targets, f)
        self.outer += f.T @ f

    def without(self, other: FeatureStats) -> FeatureStats:
        """These statistics less ``other``'s rows (sums and the scatter matrix add up)."""
        out = FeatureStats(len(self.n), self.sums.shape[1])
        out.n, out.sums, out.outer = self.n - other.n, self.sums - other.sums, self.outer - other.outer
        return out

    def means(self) -> np.ndarray:
        seen = self.n > 0
        means = np.zeros_like(self.sums)
        means[seen] = self.sums[seen] / self.n[seen, None]
        return means

    def covariance(self) -> np.ndarray:
        """The within-class covariance, shared by all classes: (sum f f^T - sum_c n_c mu_c mu_c^T) / (n - C)."""
        means, seen = self.means(), self.n > 0
        return (self.outer - (means * self.n[:, None]).T @ means) / max(self.n.sum() - seen.sum(), 1.0)

    def fit(self, shrinkage: float | None = None) -> OODFit:
        """``shrinkage``: the weight of (mean variance) x I in the covariance (``ledoit_wolf``); None: a ridge
        of ``SHRINKAGE`` times the mean variance."""
        seen = self.n > 0
        means = self.means()
        cov = self.covariance()
        scale = max(float(np.trace(cov)) / len(cov), 1e-12)
        if shrinkage is None:
            cov += np.eye(len(cov)) * SHRINKAGE * scale
        else:
            cov = (1.0 - shrinkage) * cov + np.eye(len(cov)) * shrinkage * scale
        precision = np.linalg.inv(cov)
        # P = L L^T, so (f - mu)^T P (f - mu) = |(f - mu) L|^2: the graph needs one MatMul
        chol = np.linalg.cholesky((precision + precision.T) / 2)
        return OODFit(chol.astype(np.float32), (means @ chol).astype(np.float32), seen)


def ledoit_wolf(rows: np.ndarray, cov: np.ndarray) -> float:
    """Ledoit and Wolf (2004): the weight a of (mean variance) x I in (1 - a) S + a (mean variance) I that
    minimises the expected error of the estimate, from the centred rows S was computed from. With about
    as many rows as dimensions (a few hundred images, a few hundred activation statistics) S alone
    memorises its rows: scored by it they sit at half the distance of new samples."""
    n, dim = rows.shape
    if n < 2:
        return 1.0
    mu = float(np.trace(cov)) / dim
    spread = float((np.einsum("ij,ij->i", rows, rows) ** 2).sum()) / n**2 - float((cov**2).sum()) / n
    distance = float(((cov - mu * np.eye(dim)) ** 2).sum())
    return float(np.clip(spread / distance, SHRINKAGE, 1.0)) if distance > 0 else 1.0


class CrossFit:
    """The training features' statistics, whole and per fold, and (at most ``MAX_FIT_ROWS``) the rows
    themselves: the covariance's shrinkage is estimated from them (``ledoit_wolf``), and each can be
    scored by statistics that did not see it."""

    def __init__(self, classes: int, dim: int, folds: int = CROSS_FOLDS) -> None:
        self.total = FeatureStats(classes, dim)
        self.folds = [FeatureStats(classes, dim) for _ in range(folds)]
        self.kept: list[tuple[int, np.ndarray, np.ndarray]] = []  # (fold, features, targets) of the rows kept
        self.rows = self.kept_rows = 0

    def add(self, features: np.ndarray, targets: np.ndarray) -> None:
        fold = (self.rows + np.arange(len(targets))) % len(self.folds)  # round robin: every class in every fold
        self.rows += len(targets)
        self.total.add(features, targets)
        for k, stats in enumerate(self.folds):
            mine = fold == k
            if mine.any():
                stats.add(features[mine], targets[mine])
                room = MAX_FIT_ROWS - self.kept_rows
                if room > 0:
                    part = np.asarray(features[mine][:room], np.float64)
                    self.kept.append((k, part, np.asarray(targets[mine][:room])))
                    self.kept_rows += len(part)

    def _fit(self, stats: FeatureStats, without: int | None = None) -> OODFit:
        kept = [(f, t) for k, f, t in self.kept if k != without]
        cov = stats.covariance()
        if not kept:
            return stats.fit(ledoit_wolf(np.zeros((0, cov.shape[0])), cov))
        rows = np.concatenate([f for f, _ in kept]) - stats.means()[np.concatenate([t for _, t in kept])]
        n, seen = float(stats.n.sum()), float((stats.n > 0).sum())
        # Ledoit and Wolf's estimate is for the covariance divided by n (ours: by n - classes)
        return stats.fit(ledoit_wolf(rows, cov * max(n - seen, 1.0) / max(n, 1.0)))

    def fit(self) -> OODFit:
        return self._fit(self.total)

    def out_of_fold(self) -> np.ndarray:
        """Each kept training row's score by the statistics (and shrinkage) of the other folds."""
        scores = []
        for k, stats in enumerate(self.folds):
            rows = [f for fold, f, _ in self.kept if fold == k]
            if rows and stats.n.sum() < self.total.n.sum():
                scores.append(self._fit(self.total.without(stats), without=k).distances(np.concatenate(rows)))
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)


@dataclass
class OODFit:
    whiten: np.ndarray  # [D, D]
    centres: np.ndarray  # [C, D]: the class means, whitened
    seen: np.ndarray  # [C] bool: classes with training features (others are never nearest)
    threshold: float = float("inf")

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared distance to the nearest seen class centre, whitened; by blocks of rows, so memory stays
        at a block x classes x dimensions (not every row's)."""
        centres = self.centres[None, self.seen, :]
        out = []
        for s in range(0, len(features), 512):
            z = np.asarray(features[s : s + 512], np.float32) @ self.whiten
            out.append(((z[:, None, :] - centres) ** 2).sum(-1).min(1))
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class OODHead(nn.Module):
    """In the graph: the squared Mahalanobis distance to the nearest class mean, float32 [N].

    Its constants are buffers used as they are (no transpose or square at export time), so the ONNX
    file keeps them under their names: ``ood.whiten``, ``ood.origin``, ``ood.centres_t``, ``ood.centre_sq``.
    The whitened features are taken relative to the centres' mean (``origin``) before the expansion
    |z - c|^2 = |z|^2 - 2 z.c + |c|^2: the terms stay small for typical samples, so float32 loses
    little to cancellation (torch and onnxruntime agree to 1e-6 relative, not 1e-4).
    """

    def __init__(self, fit: OODFit) -> None:
        super().__init__()
        origin = fit.centres[fit.seen].astype(np.float64).mean(0)
        centres = (fit.centres[fit.seen] - origin).astype(np.float32)
        self.whiten: torch.Tensor
        self.origin: torch.Tensor
        self.centres_t: torch.Tensor
        self.centre_sq: torch.Tensor
        self.register_buffer("whiten", torch.tensor(fit.whiten, dtype=torch.float32))
        self.register_buffer("origin", torch.tensor(origin, dtype=torch.float32))
        self.register_buffer("centres_t", torch.tensor(centres.T, dtype=torch.float32))
        self.register_buffer("centre_sq", torch.tensor((centres.astype(np.float64) ** 2).sum(1), dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features @ self.whiten - self.origin  # [N, D]
        # without an [N, C, D] intermediate
        d = (z * z).sum(-1, keepdim=True) - 2 * (z @ self.centres_t) + self.centre_sq
        return d.min(-1).values.clamp(min=0.0)
