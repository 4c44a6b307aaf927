"""``itc predict`` and the in-process API: every layout, bad rows reported per row, answers equal to /classify."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEFAULT_MODEL, ROOT, app_client

from itc import Classifier

TOMATO = (ROOT / "examples" / "tomato.jpg").read_bytes()
LEMON = (ROOT / "examples" / "lemon.jpg").read_bytes()


def _itc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "itc", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images without class folders: one with a caption, one without, one corrupt, one empty file."""
    d = tmp_path_factory.mktemp("plain")
    (d / "a_tomato.jpg").write_bytes(TOMATO)
    (d / "a_tomato.txt").write_text("a cherry tomato on the table")
    (d / "b_lemon.jpg").write_bytes(LEMON)  # no caption
    (d / "c_broken.jpg").write_bytes(TOMATO[:300])
    (d / "d_empty.png").write_bytes(b"")
    (d / "notes.md").write_text("not an image: not a row")
    return d


def test_a_plain_folder_answers_every_image_and_reports_bad_ones_per_row(plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "answers.csv"
    r = _itc("predict", str(DEFAULT_MODEL), "--data", str(plain), "--out", str(out), "--top-k", "2")
    assert r.returncode == 0, r.stderr
    assert "4 rows" in r.stdout and "2 unreadable" in r.stdout
    rows = {row["key"]: row for row in _rows(out)}
    assert list(rows) == ["a_tomato.jpg", "b_lemon.jpg", "c_broken.jpg", "d_empty.png"]
    assert list(_rows(out)[0]) == ["key", "path", "label", "abstained", "confidence", "best_guess", "top_k", "ood_score",
                                   "true_label", "error"]
    assert rows["c_broken.jpg"]["error"] and rows["d_empty.png"]["error"] and not rows["c_broken.jpg"]["label"]
    with app_client(DEFAULT_MODEL) as c:  # the service's answers to the same inputs
        for key, image, caption in (("a_tomato.jpg", TOMATO, "a cherry tomato on the table"), ("b_lemon.jpg", LEMON, "")):
            body = c.post("/classify", files={"image": ("x.jpg", image, "image/jpeg")}, data={"description": caption},
                          params={"top_k": 2}).json()
            row = rows[key]
            assert row["error"] == "" and row["label"] == (body["label"] or "")
            assert abs(float(row["confidence"]) - body["confidence"]) < 1e-6
            assert row["top_k"].split(";")[0].split(":")[0] == body["predictions"][0]["label"]
            assert len(row["top_k"].split(";")) == 2


def test_labelled_layouts_carry_their_labels_and_tables_without_labels_work(tmp_path: Path) -> None:
    folders = tmp_path / "folders"
    for label, image in (("tomato", TOMATO), ("lemon", LEMON)):
        (folders / label).mkdir(parents=True)
        (folders / label / "1.jpg").write_bytes(image)
        (folders / label / "1.txt").write_text(f"a {label}")
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption,label\nfolders/tomato/1.jpg,a tomato,tomato\nfolders/lemon/1.jpg,,lemon\nmissing.jpg,x,lemon\n")
    unlabelled = tmp_path / "pairs.jsonl"
    unlabelled.write_text(json.dumps({"image": "folders/tomato/1.jpg", "caption": "a tomato"}) + "\n"
                          + json.dumps({"image": "folders/lemon/1.jpg"}) + "\n")
    for data, n, labelled in ((folders, 2, True), (table, 3, True), (unlabelled, 2, False)):
        out = tmp_path / f"{data.name}.jsonl"
        r = _itc("predict", str(DEFAULT_MODEL), "--data", str(data), "--out", str(out), "--no-progress")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == n, rows
        good = [row for row in rows if row["error"] is None]
        assert {row["best_guess"] for row in good} == {"tomato", "lemon"}
        assert all((row["true_label"] is not None) == labelled for row in good)
        if labelled:
            assert "accuracy of the best guess 1.0000 on 2 labelled rows" in r.stdout, r.stdout
    missing = [json.loads(line) for line in (tmp_path / "pairs.csv.jsonl").read_text().splitlines() if "missing" in line]
    assert missing and missing[0]["error"], missing  # a row whose image file is not there is a row with its error


def test_the_python_api_gives_the_service_answers(tmp_path: Path) -> None:
    from PIL import Image

    with Classifier.load(DEFAULT_MODEL) as clf:
        answers = clf.predict([ROOT / "examples" / "tomato.jpg", LEMON, Image.open(ROOT / "examples" / "tomato.jpg")],
                              ["a cherry tomato", "", "a cherry tomato"], top_k=3)
        assert [a.best_guess for a in answers] == ["tomato", "lemon", "tomato"]
        assert answers[0].confidence == pytest.approx(answers[2].confidence, abs=1e-6)  # a PIL image: the same pixels
        assert len(answers[0].top) == 3 and answers[0].ood_score is not None
        with pytest.raises(ValueError, match="image 1"):
            clf.predict([TOMATO, b"not an image"])
        with pytest.raises(ValueError, match="captions"):
            clf.predict([TOMATO], ["a", "b"])


def test_help_lists_each_command() -> None:
    r = _itc("--help")
    assert r.returncode == 0
    for command in ("serve", "predict", "train", "evaluate", "export", "quantize", "ablate", "make-dataset"):
        assert f"itc {command} " in r.stdout, r.stdout
