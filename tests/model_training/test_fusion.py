"""Fusion ``heads``: each branch's own head, weights fitted on the validation split, in the graph."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_training import fusion, train
from model_training.checkpoint import load_checkpoint
from model_training.model import ModelConfig, build_model


def _heads_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(mode="fused", fusion="heads", num_classes=3, vocab_size=30, image_size=16,
                                   conv_channels=(4, 8), image_dim=8, embed_dim=8, hidden_dim=8, attn_dim=4)).eval()


def test_the_answer_is_the_weighted_sum_of_the_heads_log_probabilities() -> None:
    model = _heads_model()
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    ids = torch.randint(3, 30, (4, 5), generator=g)
    with torch.no_grad():
        logits, _, parts = model(img, ids, branches=True)
        assert parts.shape == (3, 4, 3)
        assert torch.allclose(logits, torch.log_softmax(parts, -1).sum(0), atol=1e-5)  # as trained: all 1
        fusion.apply(model, {"weights": [0.0, 0.0, 1.0], "temperatures": [1.0, 1.0, 2.0]})  # the text head alone
        other = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
        assert torch.allclose(model(img, ids)[0], torch.log_softmax(parts[2] / 2.0, -1), atol=1e-5)
        assert torch.allclose(model(other, ids)[0], model(img, ids)[0], atol=1e-6)  # the image cannot matter
    state = model.state_dict()
    assert state["fusion_weights"].tolist() == [0.0, 0.0, 1.0] and state["fusion_temperatures"].tolist() == [1.0, 1.0, 2.0]


def test_the_fit_tames_a_head_that_memorised_and_keeps_the_one_that_reads() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    right = np.eye(4)[y] * 3 + rng.normal(0, 0.5, (200, 4))  # the text head: right, moderately confident
    wrong = rng.normal(0, 1, (2, 200, 4)) * 20  # joint and image heads: confidently wrong (memorised training images)
    parts = np.stack([wrong[0], wrong[1], right]).astype(np.float32)
    fit = fusion.fit_weights(parts, y)
    assert fit["val_acc_by_head"]["text"] == 1.0 and fit["val_acc_by_head"]["trained"] < 0.6  # summed as trained: drowned
    assert fit["val_acc"] == 1.0, fit
    assert min(fit["temperatures"][:2]) > 4 * fit["temperatures"][2]  # the confident, wrong heads are flattened
    assert fusion.fit_weights(parts[:, :0], y[:0])["weights"] == [1.0, 1.0, 1.0]  # no validation rows: as trained


def test_refit_probes_are_fused_as_a_late_fusion_without_the_joint_head() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 90)
    joint = np.eye(3)[y] * 9  # the joint head looks perfect on validation: it is left out all the same
    noisy = np.eye(3)[y] * 2 + rng.normal(0, 1, (2, 90, 3))
    fit = fusion.fit_weights(np.stack([joint, noisy[0], noisy[1]]).astype(np.float32), y, probes=True)
    assert fit["weights"][0] == 0.0 and fit["temperatures"] == [1.0, 1.0, 1.0]
    assert tuple(fit["weights"][1:]) in fusion.MIXTURES
    same = np.stack([joint, noisy[0], noisy[0]]).astype(np.float32)  # every mixture ties: the caption-heavier first
    assert fusion.fit_weights(same, y, probes=True)["weights"] == [0.0, 0.25, 0.75]


def test_a_refit_head_is_the_validation_chosen_probe_folded_into_the_layer() -> None:
    """Features on very different scales, one informative: the probe standardises them, its L2 comes
    from the grid, and the layer (standardisation folded into its weights) answers as it scored."""
    rng = np.random.default_rng(1)
    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        x = rng.normal(0, 1, (n, 20)) * np.geomspace(0.01, 100, 20)  # scales from 0.01 to 100
        x[:, 0] += y * 0.05  # the one informative feature has the smallest scale
        return x.astype(np.float32), y
    (x, y), (xv, yv) = rows(300), rows(200)
    layer = torch.nn.Linear(20, 3)
    refit = fusion.refit_head(layer, x, y, xv, yv)
    assert refit["l2"] in fusion.L2_GRID and refit["val_acc"] > 0.85, refit
    with torch.no_grad():
        acc = float((layer(torch.from_numpy(xv)).argmax(1).numpy() == yv).mean())
    assert acc == pytest.approx(refit["val_acc"])


def _write(root: Path, n: int) -> Path:
    """Two classes whose images are random noise (nothing to learn but each training image itself) and
    whose captions tell them apart."""
    rng, px = random.Random(0), np.random.default_rng(0)
    for label, words in (("a", ["red", "crimson"]), ("b", ["blue", "navy"])):
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(px.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
            (root / label / f"{i}.txt").write_text(f"a {rng.choice(words)} thing")
    return root


def test_training_fits_the_weights_and_the_checkpoint_answers_with_them(tmp_path: Path) -> None:
    data = _write(tmp_path / "data", 40)
    out = tmp_path / "run"
    train.main(["--preset", "smoke", "--data", str(data), "--out-dir", str(out), "--model.fusion", "heads",
                "--model.refit-heads", "true", "--model.image-size", "16",
                "--epochs", "4", "--patience", "4", "--min-freq", "1", "--lr", "0.01",
                "--threads", "2", "--workers", "0", "--no-progress"])
    model, ckpt = load_checkpoint(out / "best.pt")
    fit = ckpt["extra"]["fusion"]
    assert fit["rows"] > 0 and model.fusion_weights.tolist() == fit["weights"]
    assert model.fusion_temperatures.tolist() == pytest.approx(fit["temperatures"])
    # random pixels say nothing of the class on new images: the caption's head must carry the answer
    assert fit["val_acc"] == 1.0 and fit["val_acc_by_head"]["text"] == 1.0, fit
    # both branch heads were refit as probes (each with its validation-chosen L2), their temperatures left at 1
    assert set(fit["refit"]) == {"image", "text"} and fit["refit"]["text"]["val_acc"] == 1.0
    assert fit["temperatures"] == [1.0, 1.0, 1.0]


def test_an_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="sum")
