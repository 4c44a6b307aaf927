"""Temperature scaling, ECE and the out-of-distribution head, on real exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from model_training.calibrate import FeatureStats, OODHead, ece, fit_temperature, softmax


def _calibrated_logits(n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (n, classes))
    p = softmax(z)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


def test_temperature_undoes_over_confidence() -> None:
    z, y = _calibrated_logits()
    assert ece(softmax(z), y) < 0.03  # calibrated to begin with
    t = fit_temperature(4.0 * z, y)  # a model four times too sure
    assert 3.3 < t < 4.7
    assert ece(softmax(4.0 * z, t), y) < 0.5 * ece(softmax(4.0 * z), y)
    assert abs(fit_temperature(z, y) - 1.0) < 0.15  # and leaves a calibrated one alone


def test_ood_head_in_the_graph_equals_the_numpy_distances() -> None:
    rng = np.random.default_rng(1)
    feats, y = rng.normal(size=(600, 6)), rng.integers(0, 3, 600)
    feats[y == 1] += 3.0
    stats = FeatureStats(4, 6)  # class 3 never seen: never the nearest
    stats.add(feats[:300], y[:300])
    stats.add(feats[300:], y[300:])
    fit = stats.fit()
    probe = rng.normal(size=(20, 6)).astype(np.float32) * 3
    with torch.no_grad():
        graph = OODHead(fit)(torch.from_numpy(probe)).numpy()
    assert np.allclose(graph, fit.distances(probe), rtol=1e-4, atol=1e-3)
    # the distance is a Mahalanobis distance: far points score higher than the class means
    assert fit.distances(np.full((1, 6), 50.0, np.float32))[0] > 10 * np.quantile(fit.distances(feats.astype(np.float32)), 0.95)


def test_an_over_confident_model_is_calibrated_at_export(tiny_run: Path, tmp_path: Path) -> None:
    """The tiny model with its logits scaled by 20: the export fits T > 1 and lowers the ECE, and
    the service's predictor applies T to what the graph outputs."""
    from model_training.export import export_artifact
    from service.serving.session import Predictor
    from service.settings import Settings

    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    for k in ("head.weight", "head.bias"):
        ckpt["state_dict"][k] = ckpt["state_dict"][k] * 20
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "best.pt")
    manifest = export_artifact(run / "best.pt", tmp_path / "art", name="sure", version="1")
    cal = manifest["calibration"]
    assert cal["temperature"] > 2.0
    assert cal["ece_val_after"] < cal["ece_val_before"]
    assert cal["nll_val_after"] < cal["nll_val_before"]
    raw = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert raw["ood"]["threshold"] > 0 and 0 <= raw["ood"]["flagged"]["test"] <= 1

    predictor = Predictor(Settings(model_dir=tmp_path / "art", provider="cpu", workers=1))
    predictor.load()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ids = np.full((4, 3), 5, np.int64)
    sess = ort.InferenceSession(str(tmp_path / "art" / "model.onnx"), providers=["CPUExecutionProvider"])
    graph_probs = sess.run(["probabilities"], {"image": images, "input_ids": ids})[0]
    served, _, _ = predictor.run_arrays(images, ids)
    assert np.allclose(served, softmax(np.log(graph_probs), cal["temperature"]), atol=1e-5)
    assert served.max(1).mean() < graph_probs.max(1).mean()  # less sure than the raw graph


def test_with_as_many_rows_as_dimensions_the_shrunk_fit_scores_its_rows_like_new_ones() -> None:
    """A covariance fitted on a few hundred rows of a hundred dimensions memorises them: scored by it,
    its own rows sit far closer than new samples (the old ridge). Shrunk as Ledoit and Wolf estimate,
    its rows, the rows scored out of fold (what the threshold is a quantile of) and new samples score
    alike."""
    from model_training.calibrate import CrossFit

    rng = np.random.default_rng(0)
    dim, n = 150, 300  # each fold's fit: 240 rows of 150 dimensions
    scales = np.logspace(-1, 1, dim)  # unequal variances, as activation statistics have
    centres = rng.normal(0, 3, (2, dim))
    train_y = np.arange(n) % 2
    train = centres[train_y] + rng.normal(0, 1, (n, dim)) * scales
    fresh = centres[np.arange(2000) % 2] + rng.normal(0, 1, (2000, dim)) * scales
    cf = CrossFit(2, dim)
    for s in range(0, n, 128):  # in chunks, as the export streams them
        cf.add(train[s : s + 128], train_y[s : s + 128])
    ridge = cf.total.fit()  # the old fit: a ridge of 1e-3 of the mean variance
    assert np.median(ridge.distances(train)) < 0.6 * np.median(ridge.distances(fresh))  # measured 131 vs 237
    fit = cf.fit()
    in_sample, new, oof = (float(np.median(x)) for x in (fit.distances(train), fit.distances(fresh), cf.out_of_fold()))
    assert len(cf.out_of_fold()) == n
    # measured: 72.6, 94.0, 94.8 (with the ridge the out-of-fold median was 291: a threshold far too high)
    assert abs(oof - new) < 0.1 * new and abs(in_sample - new) < 0.3 * new, (in_sample, oof, new)
