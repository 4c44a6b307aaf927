"""The streaming input pipeline: real shards, real DataLoader worker processes, no held dataset."""

from __future__ import annotations

import functools
import io
import json
import operator
import tarfile
from pathlib import Path

import pytest
from helpers import jpeg_bytes, write_shard

from model_training.data import DataSpec, scan
from model_training.stream import SplitStream, StreamConfig, loader, ordered_samples


def sample(i: int, label: str) -> dict[str, bytes]:
    # each image differs, so each sample is its own
    return {"jpg": jpeg_bytes((24, 20), colour=(i % 251, (7 * i) % 253, 90)), "txt": f"item {i} {label}".encode(),
            "json": json.dumps({"label": label}).encode()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for s in range(4):
        write_shard(root / f"{s:05d}.tar", {f"{s}{i:04d}": sample(100 * s + i, "ab"[i % 2]) for i in range(37)})
    return root


def tok_json(spec: DataSpec) -> str:
    from classifier_core.text import train_tokenizer

    return str(train_tokenizer(scan(spec, require_splits=False).captions, 100, 1).to_str())  # type: ignore[attr-defined]


def keys_seen(spec: DataSpec, tok: str, *, world: int, workers: int, epoch: int = 1, limit: int | None = None
              ) -> list[list[list[str]]]:
    """For each rank, its batches' keys in the order the loader gave them."""
    labels = scan(spec, require_splits=False).labels
    out = []
    for rank in range(world):
        cfg = StreamConfig(16, 8, 8, epoch=epoch, shuffle=True, buffer=20, rank=rank, world=world, limit=limit)
        out.append([b["keys"] for b in loader(SplitStream(spec, "train", labels, tok, cfg), workers)])
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_ranks_times_workers_cover_every_sample_once_per_epoch(shards: Path, world: int, workers: int) -> None:
    spec = DataSpec([str(shards)])
    tok = tok_json(spec)
    expected = sorted(s.key for s in ordered_samples(spec, "train", {"a", "b"}, 1, shuffle=False))
    assert len(expected) > 100
    seen = keys_seen(spec, tok, world=world, workers=workers)
    flat = [k for rank in seen for batch in rank for k in batch]
    assert sorted(flat) == expected  # disjoint (no key twice) and covering (every key)
    # the batches a rank sees do not depend on how many loader workers decode them
    assert seen == keys_seen(spec, tok, world=world, workers=0)
    # the ranks' i-th batches together are the i-th batch of one process with the ranks' total batch size
    if world > 1:
        one = StreamConfig(16, 8 * world, 8, epoch=1, shuffle=True, buffer=20)
        single = [b["keys"] for b in loader(SplitStream(spec, "train", ["a", "b"], tok, one), 0)]
        for i, batch in enumerate(single):
            assert sorted(batch) == sorted(k for rank in seen if i < len(rank) for k in rank[i])


def test_epochs_shuffle_differently_and_reproducibly(shards: Path) -> None:
    spec = DataSpec([str(shards)])
    tok = tok_json(spec)
    e1, e2 = keys_seen(spec, tok, world=1, workers=0, epoch=1), keys_seen(spec, tok, world=1, workers=0, epoch=2)
    assert e1 != e2 and sorted(functools.reduce(operator.iadd, e1[0], [])) == sorted(functools.reduce(operator.iadd, e2[0], []))
    assert e1 == keys_seen(spec, tok, world=1, workers=1, epoch=1)


def test_ddp_limit_gives_every_rank_the_same_number_of_samples(shards: Path) -> None:
    spec = DataSpec([str(shards)])
    n = scan(spec).counts["train"]
    seen = keys_seen(spec, tok_json(spec), world=3, workers=0, limit=n // 3 * 3)
    sizes = {sum(len(b) for b in rank) for rank in seen}
    assert sizes == {n // 3}


def test_stream_over_good_truncated_and_corrupt_shards(tmp_path: Path) -> None:
    write_shard(tmp_path / "00000.tar", {f"g{i:03d}": sample(i, "ab"[i % 2]) for i in range(30)})
    cut_src = write_shard(tmp_path / "cut-src.tar", {f"c{i:03d}": sample(50 + i, "ab"[i % 2]) for i in range(30)})
    with tarfile.open(cut_src) as tar:
        member = tar.getmember("c020.jpg")
    (tmp_path / "00001.tar").write_bytes(cut_src.read_bytes()[: member.offset_data + member.size // 2])
    cut_src.unlink()
    (tmp_path / "00002.tar").write_bytes(b"\x00not a tar" * 300)
    spec = DataSpec([str(tmp_path)], val_frac=0.0, test_frac=0.0)
    index = scan(spec, require_splits=False)
    assert index.report.counts == {"corrupt shard (EOFError)": 1, "corrupt shard (ReadError)": 1}
    tok = tok_json(spec)
    batches = list(loader(SplitStream(spec, "train", index.labels, tok, StreamConfig(16, 8, 8, shuffle=True)), 2))
    keys = sorted(k for b in batches for k in b["keys"])
    # every good sample, and the cut shard's samples before the damage: nothing else, nothing twice
    assert keys == sorted([f"g{i:03d}" for i in range(30)] + [f"c{i:03d}" for i in range(20)])
    assert all(b["images"].shape[1:] == (16, 16, 3) for b in batches)


def test_an_image_that_fails_to_decode_is_counted_by_the_worker(tmp_path: Path) -> None:
    parts = {f"k{i:03d}": sample(i, "ab"[i % 2]) for i in range(20)}
    parts["k005"]["jpg"] = b"\xff\xd8 not really a jpeg"
    spec = DataSpec([str(write_shard(tmp_path / "s.tar", parts))], val_frac=0.0, test_frac=0.0)
    index = scan(spec, require_splits=False)
    stream = SplitStream(spec, "train", index.labels, tok_json(spec), StreamConfig(16, 4, 8))
    batches = list(loader(stream, 2))
    assert sum(len(b["keys"]) for b in batches) == 19
    # the failed image leaves its batch one short; it does not shift the batches after it
    assert [b["keys"] for b in batches] == [b["keys"] for b in loader(stream, 0)]
    assert [len(b["keys"]) for b in batches] == [4, 3, 4, 4, 4]
    skipped: dict[str, int] = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"image not decodable (invalid_image)": 1}


def test_images_are_read_only_when_decoded_and_long_names_survive(tmp_path: Path) -> None:
    from model_training.data import SkipReport, read_webdataset

    parts = {f"k{i:03d}": sample(i, "ab"[i % 2]) for i in range(6)}
    shard = write_shard(tmp_path / "s.tar", parts)
    samples = list(read_webdataset([shard], SkipReport()))
    shard.unlink()  # captions and labels were read with the headers; a small image was not
    assert [s.caption for s in samples][:2] == ["item 0 a", "item 1 b"]
    with pytest.raises(OSError):
        samples[0].read()
    # names longer than a ustar header holds: GNU long-name and pax records
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"long{fmt}.tar"
        long_dir = "d" * 120 + "/"
        with tarfile.open(path, "w", format=fmt) as tar:
            for key, p in parts.items():
                for ext, data in p.items():
                    info = tarfile.TarInfo(f"{long_dir}{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        report = SkipReport()
        assert [s.key for s in read_webdataset([path], report)] == sorted(parts) and report.total == 0
