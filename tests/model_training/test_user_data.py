"""A user's own data: every mistake is an error naming it or a counted skip, never silent nonsense."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, jpeg_bytes, write_shard

from model_training.data import DataError, DataSpec, SkipReport, read_table, read_webdataset, scan
from model_training.jsonsafe import dumps

COLOURS = {"apple": (200, 20, 20), "lemon": (230, 220, 40), "plum": (90, 20, 110)}


def write_images(folder: Path, n: int, labels: tuple[str, ...] = ("apple", "lemon", "plum")) -> list[tuple[str, str]]:
    """n small JPEGs under folder/<sub>/NNN.jpg; (relative path, label) pairs."""
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        rel = f"{'ab'[i % 2]}/{i // 2:03d}.jpg"  # a/000.jpg and b/000.jpg both exist
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        c = COLOURS.get(label, (i % 255, 90, 90))
        (folder / rel).write_bytes(jpeg_bytes((40, 30), colour=(c[0], (c[1] + i) % 255, c[2])))
        rows.append((rel, label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "image,caption,label", bom: bool = False) -> Path:
    text = header + "\n" + "".join(f"{rel},a photo of a {lab},{lab}\n" for rel, lab in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "model_training", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_excel_csv_with_bom_and_capitalised_headers_reads_every_row(tmp_path: Path) -> None:
    rows = write_images(tmp_path, 12)
    manifest = write_csv(tmp_path / "data.csv", rows, header="Image,Caption,Label", bom=True)
    report = SkipReport()
    samples = list(read_table(manifest, report))
    assert report.total == 0, report.summary()
    # the key is the path relative to the manifest: a/000.jpg and b/000.jpg are two samples
    assert sorted(s.key for s in samples) == sorted(r for r, _ in rows) and "a/000.jpg" in {s.key for s in samples}


def test_missing_data_entries_are_errors_naming_them(tmp_path: Path) -> None:
    rows = write_images(tmp_path, 30)
    good = write_csv(tmp_path / "good.csv", rows)
    for bad, message in ((tmp_path / "typo.csv", "no such file or folder"), (tmp_path / "shards", "no such file or folder")):
        with pytest.raises(DataError, match=re.escape(f"--data {bad}: {message}")):
            scan(DataSpec([str(good), str(bad)]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"a folder with neither \.tar shards nor class subfolders of images"):
        scan(DataSpec([str(tmp_path / "empty")]))
    out = cli("train", "--data", f"{good},{tmp_path / 'typo.csv'}", "--out-dir", str(tmp_path / "run"), "--preset", "smoke")
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.strip() and " INFO " not in x]
    assert lines == [f"python -m model_training train: error: --data {tmp_path / 'typo.csv'}: no such file or folder"], out.stderr


@pytest.mark.parametrize("labels,reason", [
    (("apple",), "a classifier needs at least 2"),
    (tuple(f"id{i}" for i in range(40)), "labels for 32 training samples"),
])
def test_labels_that_cannot_train_a_classifier_are_errors(tmp_path: Path, labels: tuple[str, ...], reason: str) -> None:
    rows = write_images(tmp_path, 40, labels)
    manifest = write_csv(tmp_path / "data.csv", rows)
    out = cli("train", "--data", str(manifest), "--out-dir", str(tmp_path / "run"), "--preset", "smoke")
    assert out.returncode == 2 and reason in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run" / "best.pt").exists()


def test_an_empty_test_split_is_an_error(tmp_path: Path) -> None:
    rows = write_images(tmp_path, 12)
    manifest = write_csv(tmp_path / "data.csv", rows)
    with pytest.raises(DataError, match="the test split is empty"):
        scan(DataSpec([str(manifest)], test_frac=0.0))


def test_failed_downloads_are_skipped_and_counted(tmp_path: Path) -> None:
    def part(status: str | None) -> dict[str, bytes]:
        meta = {"label": "apple", **({"status": status} if status else {})}
        return {"jpg": jpeg_bytes(), "txt": b"an apple", "json": json.dumps(meta).encode()}

    shard = write_shard(tmp_path / "00000.tar", {"1": part("success"), "2": part("failed_to_download"), "3": part(None),
                                           "4": part("failed_to_resize")})
    report = SkipReport()
    assert [s.key for s in read_webdataset([shard], report)] == ["1", "3"]
    assert report.counts == {"img2dataset status failed_to_download": 1, "img2dataset status failed_to_resize": 1}


def test_group_key_keeps_a_group_in_one_split_and_duplicates_are_reported(tmp_path: Path) -> None:
    from model_training import train

    rows = write_images(tmp_path, 60)
    # each source photo appears three times (a crop, a copy from another site...): the same pixels
    lines = ["image,caption,label,source"]
    for k in range(len(rows)):
        src = rows[(k // 3) * 3][0]
        (tmp_path / f"copy{k}.jpg").write_bytes((tmp_path / src).read_bytes())
        group_label = ("apple", "lemon", "plum")[(k // 3) % 3]  # one label per source photo
        lines.append(f"copy{k}.jpg,a {group_label},{group_label},{src}")
    manifest = tmp_path / "dups.csv"
    manifest.write_text("\n".join(lines) + "\n")
    common = ["--preset", "smoke", "--data", str(manifest), "--val-frac", "0.2", "--test-frac", "0.2",
              "--model.image-size", "16", "--max-len", "8", "--workers", "0"]
    naive = train.main([*common, "--out-dir", str(tmp_path / "naive")])
    assert naive["duplicates_across_splits"] > 0  # the same photo in train and test: reported
    grouped = train.main([*common, "--out-dir", str(tmp_path / "grouped"), "--group-key", "source"])
    assert grouped["duplicates_across_splits"] == 0
    assert json.loads((tmp_path / "grouped" / "metrics.json").read_text())["duplicates_across_splits"] == 0


def test_json_is_never_written_with_nan() -> None:
    assert dumps({"test_acc": float("nan"), "x": [float("inf"), 1.5]}) == '{"test_acc": null, "x": [null, 1.5]}'


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_data: Path, tmp_path: Path) -> None:
    from model_training import train

    common = ["--preset", "smoke", "--data", str(tiny_data), "--max-len", "12", "--model.image-size", "16",
              "--threads", "1", "--patience", "5", "--model.dropout", "0.3"]
    train.main([*common, "--out-dir", str(tmp_path / "whole"), "--epochs", "3"])
    train.main([*common, "--out-dir", str(tmp_path / "cut"), "--epochs", "1"])  # "interrupted" after epoch 1
    train.main([*common, "--resume", str(tmp_path / "cut"), "--epochs", "3"])
    whole = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in cut] == [1, 2, 3]
    # epoch 1 was trained once, by the first run; the resumed run trained only 2 and 3
    assert [r.get("resumed_after_epoch") for r in cut] == [None, 1, 1]
    for a, b in zip(whole, cut, strict=True):  # the same losses epoch by epoch, the same weights at the end
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6) and a["val_acc"] == b["val_acc"]
    wa = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_the_paper_is_compared_only_on_the_builtin_dataset(tmp_path: Path) -> None:
    from model_training import ablate

    rows = write_images(tmp_path, 60)
    manifest = write_csv(tmp_path / "data.csv", rows)
    summary = ablate.main(["--preset", "smoke", "--data", str(manifest), "--out-dir", str(tmp_path / "abl"),
                           "--model.image-size", "16", "--max-len", "8"])
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "paper" not in table and summary["paper"] is None
    assert "| image-only |" in table and "| text-only |" in table and "| fused |" in table


def test_augmentation_keeps_shape_and_type_and_follows_the_seed() -> None:
    from model_training.augment import augment

    images = torch.randint(0, 256, (6, 24, 24, 3), dtype=torch.uint8)
    torch.manual_seed(0)
    a = augment(images)
    torch.manual_seed(0)
    b = augment(images)
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, images)


def test_the_photo_preset_trains_and_exports_with_parity(tiny_data: Path, tmp_path: Path) -> None:
    from classifier_core.artifact import load_manifest
    from model_training import train
    from model_training.export import export_artifact

    # the photo preset's design (BatchNorm, global pooling, augmentation, label smoothing, cosine),
    # at a size the suite can afford
    train.main(["--preset", "photo", "--data", str(tiny_data), "--out-dir", str(tmp_path / "run"), "--epochs", "2",
                "--model.image-size", "32", "--model.conv-channels", "8,16", "--model.image-dim", "16", "--threads", "2",
                "--max-len", "12", "--no-progress"])
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["batch_norm"] and ckpt["model_config"]["global_pool"]
    assert ckpt["train_config"]["schedule"] == "cosine" and ckpt["train_config"]["augment"]
    assert any("running_mean" in k for k in ckpt["state_dict"])
    manifest = export_artifact(tmp_path / "run" / "best.pt", tmp_path / "art", name="photo-smoke")
    assert manifest["parity"]["max"] < 1e-4 and load_manifest(tmp_path / "art").image_size == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA trains on it")
def test_asking_for_a_gpu_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    rows = write_images(tmp_path, 30)
    out = cli("train", "--data", str(write_csv(tmp_path / "d.csv", rows)), "--out-dir", str(tmp_path / "run"),
              "--preset", "smoke", "--device", "cuda")
    assert out.returncode == 2 and "--device cuda: torch sees no CUDA device" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
