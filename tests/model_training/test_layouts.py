"""Training on one's own data as people lay it out: class folders, CSV/TSV/semicolons, JSON Lines, shards;
errors before work, one line and exit 2 for every command's user mistakes, facts that are right."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import ROOT, jpeg_bytes, write_shard

from model_training.data import DataError, DataSpec, scan

LABELS = {"apple": (200, 20, 20), "lemon": (230, 220, 40), "plum": (90, 20, 110)}
SMALL = ["--preset", "smoke", "--model.image-size", "16", "--max-len", "8", "--workers", "0", "--val-frac", "0.2",
         "--test-frac", "0.2"]


def cli(*args: str, module: str = "model_training") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def error_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    """What a command printed on stderr besides its log lines."""
    return [x for x in out.stderr.splitlines() if x.strip() and not re.match(r"\d{4}-\d\d-\d\d \d\d:", x)]


def image_folder(root: Path, n: int = 45, captions: bool = True) -> Path:
    """root/<label>/<i>.jpg (+ <i>.txt captions): torchvision's ImageFolder layout."""
    for i in range(n):
        label = list(LABELS)[i % 3]
        c = LABELS[label]
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:03d}.jpg").write_bytes(jpeg_bytes((24, 18), colour=(c[0], (c[1] + 3 * i) % 255, c[2])))
        if captions and i % 5:  # most, not all, have a caption beside them
            (root / label / f"{i:03d}.txt").write_text(f"a photo of a {label}\n")
    return root


def table(folder: Path, name: str, sep: str, n: int = 45, header: tuple[str, str, str] = ("image", "caption", "label"),
          missing: int = 0) -> Path:
    image_folder(folder / "img", n, captions=False)
    rows = [header] + [(f"img/{lab}/{i:03d}.jpg", f"a {lab}, ripe", lab) for i, lab in ((i, list(LABELS)[i % 3]) for i in range(n))]
    rows += [(f"img/gone/{k}.jpg", "a ghost", "apple") for k in range(missing)]
    with (folder / name).open("w", newline="") as f:  # as spreadsheets write it: a field with the delimiter is quoted
        csv.writer(f, delimiter=sep).writerows(rows)
    return folder / name


def test_a_folder_of_class_subfolders_is_a_dataset_with_sidecar_captions(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "photos")
    index = scan(DataSpec([str(root)], val_frac=0.2, test_frac=0.2))
    assert index.labels == ["apple", "lemon", "plum"] and sum(index.counts.values()) == 45
    assert 0 < index.captioned < index.counts["train"]  # the ones without a .txt have empty captions
    assert "a photo of a apple" in index.captions


@pytest.mark.parametrize("name,sep,flags", [("semi.csv", ";", []), ("data.tsv", "\t", []), ("pipe.csv", "|", []),
                                            ("odd.csv", "^", ["--delimiter", "^"])])
def test_tables_with_any_common_delimiter(tmp_path: Path, name: str, sep: str, flags: list[str]) -> None:
    path = table(tmp_path, name, sep)
    spec = DataSpec([str(path)], val_frac=0.2, test_frac=0.2, delimiter=flags[1] if flags else None)
    index = scan(spec)
    # the caption's own comma did not split it: every caption is whole
    assert sum(index.counts.values()) == 45 and all(c.endswith(", ripe") for c in index.captions)


def test_keys_name_the_columns_of_every_tabular_format(tmp_path: Path) -> None:
    csv_path = table(tmp_path, "custom.csv", ",", header=("path", "text", "category"))
    jsonl = tmp_path / "custom.jsonl"
    jsonl.write_text("".join(json.dumps({"path": f"img/{lab}/{i:03d}.jpg", "text": f"a {lab}", "category": lab}) + "\n"
                             for i, lab in ((i, list(LABELS)[i % 3]) for i in range(45))))
    for path in (csv_path, jsonl):
        spec = DataSpec([str(path)], label_key="category", image_key="path", caption_key="text", val_frac=0.2, test_frac=0.2)
        index = scan(spec)
        assert index.labels == ["apple", "lemon", "plum"] and index.captioned == index.counts["train"]
    with pytest.raises(DataError, match="read with the delimiter ',' it has 'path', 'text', 'category'; --delimiter"):
        scan(DataSpec([str(csv_path)]))


def test_layouts_that_are_not_datasets_say_what_to_pass(tmp_path: Path) -> None:
    (tmp_path / "one.jpg").write_bytes(jpeg_bytes())
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(jpeg_bytes())
    for path, message in ((tmp_path / "one.jpg", "a single image; --data takes a folder of class subfolders"),
                          (flat, "images without class subfolders")):
        out = cli("train", "--data", str(path), "--out-dir", str(tmp_path / "run"), *SMALL)
        assert out.returncode == 2 and error_lines(out) == [
            f"python -m model_training train: error: --data {path}: {message}" + error_lines(out)[0].split(message, 1)[1]]


def test_no_captions_is_an_error_for_a_model_that_reads_them(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "bare", captions=False)
    out = cli("train", "--data", str(root), "--out-dir", str(tmp_path / "fused"), *SMALL)
    assert out.returncode == 2, out.stderr[-500:]
    assert error_lines(out) == [f"python -m model_training train: error: {root}: no training sample has a caption, and a "
                                "fused model reads them; train an image-only model with --model.mode image, or add "
                                "captions (a caption column, or a .txt beside each image of a class folder)"]
    ok = cli("train", "--data", str(root), "--out-dir", str(tmp_path / "image"), "--model.mode", "image", *SMALL)
    assert ok.returncode == 0, ok.stderr[-1000:]
    run = tmp_path / "image"
    assert (run / "curves.png").stat().st_size > 1000 and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = (run / "summary.md").read_text()
    assert "# image model" in summary and "| **apple** |" in summary and "test" in summary


def test_missing_images_stop_training_before_any_epoch_unless_allowed(tmp_path: Path) -> None:
    path = table(tmp_path, "gaps.csv", ",", missing=2)
    out = cli("train", "--data", str(path), "--out-dir", str(tmp_path / "stopped"), *SMALL)
    assert out.returncode == 2 and "epoch 1" not in out.stderr
    assert error_lines(out) == [
        "python -m model_training train: error: 2 of 47 samples name an image that is missing or not an image, e.g. "
        "img/gone/0.jpg (image file missing), img/gone/1.jpg (image file missing); fix them, or pass --skip-bad "
        "(or --max-bad 1%) to train without them"]
    (tmp_path / "img" / "apple" / "000.jpg").write_bytes(b"not a jpeg at all")  # unreadable, found by its header
    for flags in (["--skip-bad"], ["--max-bad", "10%"]):
        run = tmp_path / f"run{len(flags)}"
        ok = cli("train", "--data", str(path), "--out-dir", str(run), *SMALL, *flags)
        assert ok.returncode == 0, ok.stderr[-1000:]
        skipped = json.loads((run / "skipped.json").read_text())
        listed = {(x["key"], x["reason"]) for x in skipped["samples"]}
        assert {("img/gone/0.jpg", "image file missing"), ("img/gone/1.jpg", "image file missing"),
                ("img/apple/000.jpg", "image file unreadable")} <= listed and skipped["total"] == 3
    assert cli("train", "--data", str(path), "--out-dir", str(tmp_path / "r"), *SMALL, "--max-bad", "2").returncode == 2


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("own")
    path = table(folder, "fruit.csv", ";", n=60)
    out = cli("train", "--data", str(path), "--out-dir", str(folder / "run"), *SMALL)
    assert out.returncode == 0, out.stderr[-1000:]
    return folder / "run"


def test_user_mistakes_end_every_command_with_one_line_and_exit_2(csv_run: Path, tmp_path: Path) -> None:
    nothere = tmp_path / "nothere" / "best.pt"
    cases = [
        (["export", str(nothere)], f"{nothere}: no such checkpoint; run `python -m model_training train` first"),
        (["export", str(csv_run)], f"{csv_run} is a run folder: pass {csv_run / 'best.pt'}"),
        (["export", str(csv_run.parent / "fruit.csv")], f"{csv_run.parent / 'fruit.csv'}: not a checkpoint"),
        (["evaluate", str(csv_run)], f"{csv_run} is a run folder: pass {csv_run / 'best.pt'}"),
        (["evaluate", str(nothere)], f"{nothere}: no such checkpoint"),
        (["ablate", "--data", str(tmp_path / "typo.csv"), "--out-dir", str(tmp_path / "ab")],
         f"--data {tmp_path / 'typo.csv'}: no such file or folder"),
        (["make-dataset", "--num-samples", "0", "--out", str(tmp_path / "md")], "--num-samples must be at least 1, not 0"),
        (["make-dataset", "--out", str(csv_run / "best.pt"), "--num-samples", "5"], f"{csv_run / 'best.pt'}: File exists"),
    ]
    for args, start in cases:
        out = cli(*args)
        lines = error_lines(out)
        assert out.returncode == 2 and len(lines) == 1, (args, out.returncode, out.stderr[-800:])
        assert lines[0].startswith(f"python -m model_training {args[0]}: error: {start}"), (args, lines)
    out = cli("--model-dir", str(tmp_path), module="service")
    assert out.returncode == 2 and error_lines(out) == [
        f"service: cannot start: {tmp_path}/manifest.json: file not found (is CLASSIFIER_MODEL_DIR an exported model folder?)"]
    out = cli("--model-dir", str(csv_run), module="service")  # a training run: say what to do with it
    assert out.returncode == 2 and error_lines(out) == [
        f"service: cannot start: {csv_run} is a training run folder, not an exported model: export it first "
        f"(itc export {csv_run / 'best.pt'} --out exported_models/NAME) and serve that folder"]


def test_evaluate_defaults_to_the_runs_own_data(csv_run: Path, tmp_path: Path) -> None:
    out = cli("evaluate", str(csv_run / "best.pt"), "--out", str(tmp_path / "eval"), "--json")
    assert out.returncode == 0, out.stderr[-800:]
    assert json.loads(out.stdout)["n"] == json.loads((csv_run / "metrics.json").read_text())["n_test"]


def test_export_refuses_to_replace_an_artifact_and_records_the_right_facts(csv_run: Path, tmp_path: Path) -> None:
    from service.app import create_app
    from service.settings import Settings

    art = tmp_path / "art"
    first = cli("export", str(csv_run / "best.pt"), "--out", str(art), "--name", "fruit")
    assert first.returncode == 0, first.stderr[-800:]
    again = cli("export", str(csv_run / "best.pt"), "--out", str(art), "--name", "fruit")
    assert again.returncode == 2 and error_lines(again) == [
        f"python -m model_training export: error: {art} already holds an artifact; pass --force to replace it, "
        "or --out another folder"]
    assert cli("export", str(csv_run / "best.pt"), "--out", str(art), "--name", "fruit", "--force").returncode == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert re.fullmatch(r"\d{4}\.\d\d\.\d\d-[0-9a-f]{8}", manifest["version"])  # date + weights digest
    trained = json.loads((csv_run / "metrics.json").read_text())
    with TestClient(create_app(Settings(model_dir=art, provider="cpu"))) as c:  # type: ignore[call-arg]
        m = c.get("/model").json()
    n = {s: trained[f"n_{s}"] for s in ("train", "val", "test")}
    assert m["training_data"]["n"] == n and sum(n.values()) == 60  # 60 rows, counted once each
    assert m["training_data"]["sources"] == ["fruit.csv"] and "/" not in m["trained_on"].split(" from ")[1].split(" (")[0]
    assert m["trained_on"] == f"Trained on 60 image-caption pairs from fruit.csv ({n['train']} train / {n['val']} val / {n['test']} test)."
    assert re.fullmatch(r"a (apple|lemon|plum), ripe", m["example_caption"])


def test_shards_still_train_as_before(tmp_path: Path) -> None:
    samples = {f"{i:04d}": {"jpg": jpeg_bytes((20, 20), colour=LABELS[list(LABELS)[i % 3]]), "txt": b"a fruit",
                            "json": json.dumps({"category": list(LABELS)[i % 3]}).encode()} for i in range(45)}
    shard = write_shard(tmp_path / "00000.tar", samples)
    index = scan(DataSpec([str(tmp_path)], label_key="category", val_frac=0.2, test_frac=0.2))
    assert index.labels == ["apple", "lemon", "plum"] and sum(index.counts.values()) == 45 and shard.exists()
