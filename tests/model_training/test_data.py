from __future__ import annotations

import json
import tarfile
from pathlib import Path

from helpers import jpeg_bytes, write_shard

from model_training.data import DataSpec, SkipReport, read_table, read_webdataset, scan, split_of
from model_training.stream import collect


def test_webdataset_reader_reads_good_and_counts_bad(tmp_path: Path) -> None:
    good = {"jpg": jpeg_bytes(), "txt": b"a red apple", "json": json.dumps({"label": "apple"}).encode()}
    shard = write_shard(tmp_path / "00000.tar", {
        "000000001": good,
        "000000002": {**good, "jpg": b"not a jpeg at all"},
        "000000003": {"txt": b"caption only", "json": b'{"label": "apple"}'},
        "000000004": {"jpg": jpeg_bytes(), "json": b'{"label": "apple"}'},
        "000000005": {**good, "json": b"{broken"},
        "000000006": {**good, "json": b'{"other": 1}'},
    })
    report = SkipReport()
    samples = list(read_webdataset([shard], report))
    assert [s.key for s in samples] == ["000000001", "000000002"]
    assert samples[0].caption == "a red apple" and samples[0].label == "apple"
    assert report.counts == {"no image file": 1, "no caption (.txt)": 1, "bad .json metadata": 1, "no label": 1}
    # the undecodable image is caught when decoding
    spec = DataSpec([str(shard)], val_frac=0.0, test_frac=0.0)
    index = scan(spec, require_splits=False)
    assert index.counts == {"train": 2, "val": 0, "test": 0} and index.report.total == 4  # the metadata pass
    train = collect(spec, "train", index.labels, 16, report=index.report)
    assert len(train) == 1
    assert index.report.counts["image not decodable (invalid_image)"] == 1
    assert "skipped 5 samples" in index.report.summary()


def test_label_map_and_custom_key(tmp_path: Path) -> None:
    part = {"jpg": jpeg_bytes(), "txt": b"x", "json": json.dumps({"category": "pear"}).encode()}
    shard = write_shard(tmp_path / "a.tar", {"k1": part, "k2": part})
    assert [s.label for s in read_webdataset([shard], SkipReport(), label_key="category")] == ["pear", "pear"]
    got = list(read_webdataset([shard], SkipReport(), label_map={"k1": "plum"}))
    assert [(s.key, s.label) for s in got] == [("k1", "plum")]


def test_truncated_shard_keeps_what_was_read(tmp_path: Path) -> None:
    good = {"jpg": jpeg_bytes(), "txt": b"a", "json": b'{"label": "a"}'}
    shard = write_shard(tmp_path / "t.tar", {f"{i:03d}": good for i in range(5)})
    raw = shard.read_bytes()
    with tarfile.open(shard) as tar:
        member = tar.getmember("003.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: member.offset_data + member.size // 2])  # cut inside an image
    report = SkipReport()
    samples = list(read_webdataset([cut], report))
    assert [s.key for s in samples] == ["000", "001", "002"]
    assert any(r.startswith("corrupt shard") for r in report.counts)


def test_garbage_shard_is_counted_not_fatal(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x00garbage" * 100)
    report = SkipReport()
    assert list(read_webdataset([bad], report)) == []
    assert report.total == 1


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.csv").write_text("image,caption,label\nimg/a.jpg,a red apple,apple\nimg/missing.jpg,x,apple\n,no image,apple\n")
    report = SkipReport()
    rows = list(read_table(tmp_path / "m.csv", report))
    assert [(r.caption, r.label) for r in rows] == [("a red apple", "apple")]
    assert report.counts == {"image file missing": 1, "missing image or label field": 1}
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "img/a.jpg", "caption": "fruit", "label": "apple"}) + "\nnot json\n[1]\n")
    report = SkipReport()
    rows = list(read_table(tmp_path / "m.jsonl", report))
    assert [r.label for r in rows] == ["apple"] and report.counts == {"bad JSON line": 2}


def test_split_is_deterministic_and_seeded() -> None:
    keys = [f"{i:09d}" for i in range(2000)]
    a = [split_of(k, 0) for k in keys]
    assert a == [split_of(k, 0) for k in keys]
    assert a != [split_of(k, 1) for k in keys]
    frac = {s: a.count(s) / len(a) for s in ("train", "val", "test")}
    assert 0.75 < frac["train"] < 0.85 and 0.07 < frac["test"] < 0.13
