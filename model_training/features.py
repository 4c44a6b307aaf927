"""The feature cache: a frozen backbone's pooled features, computed once per sample and read back each epoch.

With the backbone frozen and no augmentation, the backbone's output for a sample never changes,
so computing it every epoch is the whole cost of an epoch for nothing. The first epoch streams the
split once (the usual loader: decoding in workers), runs the backbone and writes, per sample, its
pooled features (float16), token ids, target and pixel digest (and, with a frozen pretrained caption
encoder, its caption vector) to files in the run folder; every
later epoch trains the layers after the backbone on those rows. Memory stays bounded: rows are
written as they come and read back in blocks, shuffled within a window of blocks (like the
streaming loader's shuffle buffer), never held whole.

A cache belongs to one run: its key (backbone weights, image size, data, split, tokenizer, rank)
is checked when it is opened, so a resumed run reuses it and anything else rebuilds it. The data
part is what the data is, not where: every file a source holds and every image a table names, by
name, size and modification time (``data_fingerprint``), so images replaced in place rebuild it. Files are
written under a temporary name and renamed when complete: a run killed mid-build rebuilds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataSpec, SkipReport, source_kind
from .stream import SplitStream, StreamConfig, loader

log = logging.getLogger(__name__)

BLOCK = 1024  # rows read at once
WINDOW = 8  # blocks shuffled together (8 x 1024 rows of 1280 float16 features: about 21 MB)
FILES = {"pooled": np.float16, "ids": np.int32, "lengths": np.int16, "targets": np.int64, "digests": np.int64}
TEXT = "text"  # the frozen caption encoder's vectors (float16), when the model has one


@dataclass
class FeatureCache:
    folder: Path
    n: int
    dim: int
    max_len: int
    text_dim: int = 0  # width of the cached caption vectors; 0 = none

    @property
    def names(self) -> list[str]:
        return [*FILES, TEXT] if self.text_dim else list(FILES)

    def _read(self, name: str, start: int, count: int) -> np.ndarray:
        dtype = np.dtype(FILES.get(name, np.float16))
        width = {"pooled": self.dim, "ids": self.max_len, TEXT: self.text_dim}.get(name, 1)
        with open(self.folder / f"{name}.bin", "rb") as f:
            f.seek(start * width * dtype.itemsize)
            arr = np.fromfile(f, dtype, count * width)
        return arr.reshape(count, width) if width > 1 else arr

    def rows(self, start: int, count: int) -> dict[str, np.ndarray]:
        return {name: self._read(name, start, count) for name in self.names}

    def batches(self, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``pooled`` float32 [n, D], ``ids`` int64 [n, L] (trimmed to the longest row),
        ``targets``; shuffled blocks, then rows shuffled within a window of blocks."""
        blocks = list(range(0, self.n, BLOCK))
        rng = random.Random(f"{seed}:{epoch}:cache")
        if shuffle:
            rng.shuffle(blocks)
        carry: dict[str, np.ndarray] | None = None
        for g in range(0, len(blocks), WINDOW if shuffle else 1):
            parts = [self.rows(b, min(BLOCK, self.n - b)) for b in blocks[g : g + (WINDOW if shuffle else 1)]]
            if carry is not None:
                parts.insert(0, carry)
            group = {k: np.concatenate([p[k] for p in parts]) for k in self.names}
            order = np.arange(len(group["targets"]))
            if shuffle:
                rng.shuffle(order)  # type: ignore[arg-type]
            full = len(order) // batch_size * batch_size
            last = g + (WINDOW if shuffle else 1) >= len(blocks)
            stop = len(order) if last else full
            for s in range(0, stop, batch_size):
                yield _batch(group, order[s : s + batch_size])
            carry = None if last or full == len(order) else {k: v[order[full:]] for k, v in group.items()}


def _batch(group: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, torch.Tensor]:
    width = int(group["lengths"][idx].max()) if len(idx) else 1
    out = {"pooled": torch.from_numpy(group["pooled"][idx].astype(np.float32)),
           "ids": torch.from_numpy(group["ids"][idx, :width].astype(np.int64)),
           "targets": torch.from_numpy(group["targets"][idx])}
    if TEXT in group:
        out[TEXT] = torch.from_numpy(group[TEXT][idx].astype(np.float32))
    return out


def data_fingerprint(spec: DataSpec) -> str:
    """A digest of the files the data is read from: every file under a folder source and every shard or
    table (name, size, modification time), and every image file a table names. A stat per file (and
    a read of each table): changed, added or removed files change it."""
    h = hashlib.sha256()

    def add(path: Path) -> None:
        try:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())

    tables = []
    for src in map(Path, spec.sources):
        for f in sorted(src.rglob("*")) if src.is_dir() else [src]:
            if f.is_file() or not f.exists():
                add(f)
        if src.is_file() and source_kind(src) == "table":
            tables.append(str(src))
    if tables:  # a table names images anywhere: each one's stat too (folders and shards hold theirs)
        for _, sample in dataclasses.replace(spec, sources=tables).samples(SkipReport()):
            owner = getattr(sample.read, "__self__", None)  # Path.read_bytes of the image the row names
            if isinstance(owner, Path):
                add(owner)
    return h.hexdigest()


def cache_key(spec: DataSpec, split: str, image_size: int, pretrained: dict[str, Any], tokenizer_json: str,
              rank: int, world: int, limit: int | None, data: str = "") -> str:
    """``data``: ``data_fingerprint(spec)``, worked out once per run."""
    spec_dict = {**asdict(spec), "bad_keys": sorted(spec.bad_keys)}
    blob = json.dumps({"spec": spec_dict, "split": split, "image_size": image_size, "pretrained": pretrained,
                       "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(), "rank": rank, "world": world,
                       "limit": limit, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.no_grad()
def build_or_open(model: Any, folder: Path, key: str, spec: DataSpec, split: str, labels: list[str], tokenizer_json: str,
                  cfg: StreamConfig, workers: int, device: torch.device) -> tuple[FeatureCache, dict[str, int]]:
    """The cache of one split's share (``cfg.rank`` of ``cfg.world``): opened if its key matches,
    else built by streaming the split once through ``model.image_encoder.pool``. Returns it and the
    decode skips of the build (empty when opened)."""
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            log.info("feature cache %s: %d rows (reused)", folder, meta["n"])
            return FeatureCache(folder, int(meta["n"]), int(meta["dim"]), int(meta["max_len"]), int(meta.get("text_dim", 0))), {}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sentence = getattr(model.text_encoder, "pool", None) if model.sentence_encoder is not None else None
    names = [*FILES, TEXT] if sentence is not None else list(FILES)
    files = {name: open(tmp / f"{name}.bin", "wb") for name in names}  # noqa: SIM115 (closed below)
    n, dim, text_dim = 0, 0, 0
    skipped: dict[str, int] = {}
    encoder = model.image_encoder
    encoder.eval()
    try:
        stream = SplitStream(spec, split, labels, tokenizer_json, cfg)
        for b in loader(stream, workers, pin_memory=device.type == "cuda"):
            for reason, k in b["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + k
            if len(b["targets"]) == 0:
                continue
            pooled = encoder.pool(b["images"].to(device, non_blocking=True)).float().cpu().numpy()
            dim = pooled.shape[1]
            ids = np.zeros((len(pooled), cfg.max_len), np.int32)
            width = min(b["ids"].shape[1], cfg.max_len)
            ids[:, :width] = b["ids"][:, :width].numpy()
            lengths = (ids != 0).sum(1).clip(1, None).astype(np.int16)
            for name, arr in (("pooled", pooled.astype(np.float16)), ("ids", ids), ("lengths", lengths),
                              ("targets", b["targets"].numpy()), ("digests", b["digests"].numpy())):
                files[name].write(np.ascontiguousarray(arr, FILES[name]).tobytes())
            if sentence is not None:
                vectors = sentence(torch.from_numpy(ids[:, : int(lengths.max())].astype(np.int64)).to(device)).float().cpu().numpy()
                text_dim = vectors.shape[1]
                files[TEXT].write(np.ascontiguousarray(vectors, np.float16).tobytes())
            n += len(pooled)
    finally:
        for f in files.values():
            f.close()
    (tmp / "meta.json").write_text(json.dumps({"key": key, "n": n, "dim": dim, "max_len": cfg.max_len, "text_dim": text_dim}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    log.info("feature cache %s: %d rows, %.1f MB", folder, n, size / 1e6)
    return FeatureCache(folder, n, dim, cfg.max_len, text_dim), skipped
