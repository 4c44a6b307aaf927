"""Smoke train -> export -> parity -> evaluate, on real tiny data; and every CLI's --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from classifier_core.artifact import load_manifest, sha256_file
from model_training.cli import COMMANDS
from model_training.export import ExportError, check_parity
from model_training.model import InferenceWrapper

ROOT = Path(__file__).resolve().parents[2]


def test_run_folder_contents(tiny_run: Path) -> None:
    for name in ("config.yaml", "tokenizer.json", "log.jsonl", "best.pt", "metrics.json", "skipped.json"):
        assert (tiny_run / name).is_file(), name
    rows = [json.loads(x) for x in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"train_loss", "train_acc", "val_loss", "val_acc"} <= rows[0].keys()
    assert np.isfinite(rows[0]["train_loss"])
    import yaml

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["lr"] == 1e-3 and cfg["batch_size"] == 32 and cfg["model"]["image_size"] == 32
    assert cfg["model"]["num_classes"] == 8 and cfg["model"]["vocab_size"] > 3


def test_artifact_is_complete_and_checksummed(tiny_artifact: Path) -> None:
    m = load_manifest(tiny_artifact)
    assert m.name == "tiny" and m.version == "0.0.1" and len(m.labels) == 8
    assert [t.name for t in m.inputs] == ["image", "input_ids"]
    assert [t.name for t in m.outputs] == ["probabilities", "text_attention", "ood_score"]
    for name, digest in m.files.items():
        assert sha256_file(tiny_artifact / name) == digest
    assert {"model.onnx", "tokenizer.json", "eval_report.json", "confusion_matrix.png"} <= set(m.files)
    raw = json.loads((tiny_artifact / "manifest.json").read_text())
    assert raw["parity"]["max"] <= 1e-4
    assert set(raw["parity"]) >= {"batch_1", "batch_2", "batch_7", "batch_32", "lengths_1_to_max_len"}
    onnx.checker.check_model(onnx.load(str(tiny_artifact / "model.onnx")), full_check=True)


def test_onnx_has_dynamic_batch_and_sequence(tiny_artifact: Path) -> None:
    sess = ort.InferenceSession(str(tiny_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in sess.get_inputs()}
    assert ins["image"].type == "tensor(uint8)" and ins["input_ids"].type == "tensor(int64)"
    assert isinstance(ins["input_ids"].shape[0], str) and isinstance(ins["input_ids"].shape[1], str)
    for n, length in ((1, 1), (5, 40), (33, 3)):
        p, a, ood = sess.run(None, {"image": np.zeros((n, 32, 32, 3), np.uint8), "input_ids": np.full((n, length), 3, np.int64)})
        assert p.shape == (n, 8) and a.shape == (n, length) and ood.shape == (n,)
        assert np.allclose(p.sum(1), 1, atol=1e-5)


def _wrapper_of(tiny_run: Path, tiny_artifact: Path) -> InferenceWrapper:
    """The exported torch wrapper again: the checkpoint, with the OOD head's buffers read back from the ONNX file."""
    from onnx import numpy_helper

    from model_training.calibrate import OODFit, OODHead
    from model_training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_run / "best.pt")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny_artifact / "model.onnx")).graph.initializer}
    centres = inits["ood.centres_t"].T + inits["ood.origin"]
    head = OODHead(OODFit(inits["ood.whiten"], centres, np.ones(len(centres), bool)))
    return InferenceWrapper(model, head).eval()


def test_parity_check_catches_a_wrong_model(tiny_run: Path, tiny_artifact: Path) -> None:
    imgs = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    rows = [[3, 4], [5], [6, 7, 8], [9]]
    wrapper = _wrapper_of(tiny_run, tiny_artifact)
    assert check_parity(wrapper, tiny_artifact / "model.onnx", imgs, rows, 4, 20)["max"] <= 1e-4
    with torch.no_grad():
        wrapper.model.head.bias += 1.0 * torch.arange(wrapper.model.head.bias.numel())  # torch now differs from the ONNX file
    assert check_parity(wrapper, tiny_artifact / "model.onnx", imgs, rows, 4, 20)["max"] > 1e-3
    with pytest.raises(ExportError, match="outputs"):  # a graph without the OOD score is another model
        check_parity(InferenceWrapper(wrapper.model).eval(), tiny_artifact / "model.onnx", imgs, rows, 4, 20)


def test_export_that_breaks_parity_fails_and_leaves_nothing(tiny_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX file is written from a model patched after training; export must refuse it whole."""
    import copy

    from model_training import export

    real_export = export._onnx_export

    def export_a_different_model(wrapper, path, image_size):  # type: ignore[no-untyped-def]
        other = copy.deepcopy(wrapper)
        with torch.no_grad():
            other.model.head.bias += torch.arange(other.model.head.bias.numel(), dtype=torch.float32)
        real_export(other, path, image_size)

    monkeypatch.setattr(export, "_onnx_export", export_a_different_model)
    out = tmp_path / "artifacts" / "broken"
    out.parent.mkdir()
    with pytest.raises(export.ExportError, match="parity failed"):
        export.export_artifact(tiny_run / "best.pt", out, name="broken")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temporary .export-* folder left behind either


def test_evaluate_checkpoint_and_artifact_agree(tiny_run: Path, tiny_artifact: Path, tiny_data: Path, tmp_path: Path) -> None:
    from model_training import evaluate

    r_ckpt = evaluate.main([str(tiny_run / "best.pt"), "--data", str(tiny_data), "--out", str(tmp_path / "a")])
    r_onnx = evaluate.main([str(tiny_artifact), "--data", str(tiny_data), "--out", str(tmp_path / "b"), "--json"])
    assert r_ckpt["n"] == r_onnx["n"] > 0
    assert abs(r_ckpt["accuracy"] - r_onnx["accuracy"]) < 1e-9
    assert np.array(r_onnx["confusion_matrix"]).sum() == r_onnx["n"]
    assert (tmp_path / "b" / "confusion_matrix.png").stat().st_size > 1000
    assert set(r_onnx["per_class"]["apple"]) == {"precision", "recall", "f1", "support"}


def test_ablate_smoke(tiny_data: Path, tmp_path: Path) -> None:
    from model_training import ablate

    out = tmp_path / "abl"
    summary = ablate.main(["--preset", "smoke", "--data", str(tiny_data), "--out-dir", str(out), "--max-len", "8",
                           "--model.image-size", "16", "--export", str(tmp_path / "art")])
    assert set(summary["results"]) == {"image", "text", "fused"}
    table = (out / "ablation.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line and "model" not in line}
    assert set(rows) == {"image-only", "text-only", "fused"}
    for mode, label in (("image", "image-only"), ("text", "text-only"), ("fused", "fused")):
        r = summary["results"][mode]
        # train, val and test accuracy in the table are this run's, to the table's 3 decimals
        assert rows[label][:3] == [f"{r['train_acc']:.3f}", f"{r['val_acc']:.3f}", f"{r['test_acc']:.3f}"], (rows[label], r)
        assert json.loads((out / mode / "metrics.json").read_text())["test_acc"] == r["test_acc"]
    assert (out / "ablation.png").stat().st_size > 1000
    m = load_manifest(tmp_path / "art")
    assert set(m.metrics) == {"image", "text", "fused"}
    assert "ablation.png" in m.files


def test_yaml_config_and_flags_precedence(tmp_path: Path) -> None:
    from model_training.config import resolve_config
    from model_training.train import build_parser

    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.01\nmodel:\n  hidden_dim: 24\n")
    cfg = resolve_config(build_parser().parse_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.005"]))
    assert cfg.epochs == 7 and cfg.lr == 0.005 and cfg.model.hidden_dim == 24 and cfg.batch_size == 32
    (tmp_path / "bad.yaml").write_text("epoch: 7\n")
    with pytest.raises(ValueError, match="unknown config key"):
        resolve_config(build_parser().parse_args(["--config", str(tmp_path / "bad.yaml")]))


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_cli_help(command: str | None) -> None:
    args = [sys.executable, "-m", "model_training"] + ([command] if command else []) + ["--help"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_the_written_manifest_is_the_readers_object_whole(tiny_artifact: Path) -> None:
    # export writes Manifest(...).to_dict(): nothing in manifest.json is a key the reader drops
    import json

    from classifier_core.artifact import Manifest

    written = json.loads((tiny_artifact / "manifest.json").read_text())
    assert Manifest.from_dict(written).to_dict() == written
    assert {"parity", "training", "serving", "calibration", "ood"} <= set(written)


def test_evaluate_scores_every_row_of_data_it_never_trained_on(tiny_artifact: Path, tmp_path: Path) -> None:
    """A held-out folder: every row counts (no 10 % test split of it), and the six classes it lacks do not
    pull the macro F1 down as zeros."""
    from helpers import ROOT

    from model_training import evaluate

    held = tmp_path / "heldout"
    for label, name in (("tomato", "tomato.jpg"), ("lemon", "lemon.jpg")):
        (held / label).mkdir(parents=True)
        for i in range(5):
            (held / label / f"{i}.jpg").write_bytes((ROOT / "examples" / name).read_bytes())
            (held / label / f"{i}.txt").write_text(f"a {label}" if i % 2 else "")
    r = evaluate.main([str(tiny_artifact), "--data", str(held), "--out", str(tmp_path / "e"), "--json"])
    assert r["split"] == "all" and r["n"] == 10
    predicted = np.array(r["confusion_matrix"]).sum(0)
    counted = [m["f1"] for i, m in enumerate(r["per_class"].values()) if m["support"] or predicted[i]]
    assert 2 <= r["classes_present"] == len(counted) < 8  # classes with samples or answers, never all eight
    assert r["macro_f1"] == pytest.approx(sum(counted) / len(counted))
    assert 0.0 <= r["accuracy_without_captions"] <= 1.0 and r["abstained_ood"] is not None
    only_test = evaluate.main([str(tiny_artifact), "--data", str(held), "--split", "test", "--out", str(tmp_path / "t"), "--json"])
    assert only_test["n"] < 10  # the split, only when asked
