"""The streaming input pipeline: sources -> one deterministic order -> (rank, worker) slots -> decode -> batches.

Nothing is held whole: samples are read lazily (``data.py``), shuffled in a bounded buffer of
metadata records, and only the samples a worker owns have their image read and decoded, in
``DataLoader`` worker processes. Memory is the shuffle buffer plus a few batches per worker,
whatever the dataset's size.

Every worker of every rank walks the same order (shards shuffled, then a buffer shuffle, both
seeded by ``(seed, epoch)``) and keeps its share of it:

- rank ``r`` of ``world`` takes the samples at positions ``r, r + world, ...``; so the ranks' i-th
  batches together are the i-th batch one process would train on (DDP = one big batch);
- within a rank, loader worker ``w`` of ``W`` decodes the rank's batches ``w, w + W, ...``, and
  ``DataLoader`` hands batches back round-robin, so a rank sees the same batches in the same order
  with 0, 1 or 8 workers.

Ranks and workers together see every usable sample of the split once per epoch. Under DDP each
rank stops at the same sample count (the split's size rounded down to a multiple of the world
size), so all ranks take the same number of steps.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from classifier_core.images import ImageError, load_image
from classifier_core.text import TextEncoder, pad_ids

from .data import TRAIN_MAX_PIXELS, DataSpec, Sample, SkipReport, units

SHUFFLE_BUFFER = 10_000  # metadata records (a few hundred bytes each), not decoded images


def digest(img: np.ndarray) -> int:
    """64 bits of a hash of the decoded pixels: finds identical images in different splits."""
    return int.from_bytes(hashlib.blake2b(img.tobytes(), digest_size=8).digest(), "little", signed=True)


def ordered_samples(spec: DataSpec, split: str, labels: set[str], epoch: int, shuffle: bool,
                    buffer: int = SHUFFLE_BUFFER) -> Iterator[Sample]:
    """The split's usable samples in this epoch's order: the same on every rank and worker."""
    order = units(spec)
    rng = random.Random(f"{spec.seed}:{epoch}:{split}")
    if shuffle:
        rng.shuffle(order)
    quiet = SkipReport()  # the metadata pass (scan) already counted these skips

    def walk() -> Iterator[Sample]:
        for unit in order:
            for name, s in spec.only(unit).samples(quiet):
                if (split == "all" or name == split) and s.label in labels:  # all: every split (evaluate --data)
                    yield s

    if not shuffle or buffer <= 1:  # (a buffer of 0 or 1 shuffles nothing: the shard order only)
        yield from walk()
        return
    # a shuffle buffer: once full, each new record swaps with a random one that leaves
    pool: list[Sample] = []
    for s in walk():
        if len(pool) < buffer:
            pool.append(s)
            continue
        j = rng.randrange(buffer)
        pool[j], s = s, pool[j]
        yield s
    rng.shuffle(pool)
    yield from pool


@dataclass
class StreamConfig:
    image_size: int
    batch_size: int
    max_len: int
    epoch: int = 0
    shuffle: bool = False
    buffer: int = SHUFFLE_BUFFER
    rank: int = 0
    world: int = 1
    limit: int | None = None  # stop after this many samples of the split (DDP: equal steps on every rank)


class SplitStream(IterableDataset):  # type: ignore[type-arg]
    """Batches of one split: dicts of ``images`` uint8 [n,S,S,3], ``ids`` int64 [n,L], ``targets``,
    ``digests`` (int64 [n]), ``keys``, ``skipped`` ({reason: count} of the images that failed to decode)
    and ``skipped_keys`` ([(reason, key)] of the same).
    """

    def __init__(self, spec: DataSpec, split: str, labels: list[str], tokenizer_json: str, cfg: StreamConfig) -> None:
        self.spec, self.split, self.labels, self.tokenizer_json, self.cfg = spec, split, labels, tokenizer_json, cfg

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from tokenizers import Tokenizer

        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        c = self.cfg
        text = TextEncoder(Tokenizer.from_str(self.tokenizer_json), c.max_len)
        index = {lab: i for i, lab in enumerate(self.labels)}
        rows: list[tuple[np.ndarray, str, int, str]] = []
        skipped = SkipReport()
        for pos, s in enumerate(ordered_samples(self.spec, self.split, set(self.labels), c.epoch, c.shuffle, c.buffer)):
            if c.limit is not None and pos >= c.limit:
                break
            if pos % c.world != c.rank:
                continue
            j = pos // c.world  # position within this rank's share
            if (j // c.batch_size) % n_workers != worker:
                continue
            try:
                rows.append((load_image(s.read(), c.image_size, TRAIN_MAX_PIXELS), s.caption, index[s.label], s.key))
            except ImageError as exc:
                skipped.skip(f"image not decodable ({exc.code})", s.key)
            except OSError:
                skipped.skip("image not readable (shard cut off)", s.key)
            if (j + 1) % c.batch_size == 0:  # this worker's batch ends here, whatever failed to decode in it
                yield self._batch(rows, skipped, text)
                rows, skipped = [], SkipReport()
        if rows or skipped.counts:
            yield self._batch(rows, skipped, text)

    def _batch(self, rows: list[tuple[np.ndarray, str, int, str]], skipped: SkipReport, text: TextEncoder) -> dict[str, Any]:
        size = self.cfg.image_size
        images = np.stack([r[0] for r in rows]) if rows else np.zeros((0, size, size, 3), np.uint8)
        ids = pad_ids([e.ids for e in text.encode_batch([r[1] for r in rows])]) if rows else np.zeros((0, 1), np.int64)
        return {"images": torch.from_numpy(images), "ids": torch.from_numpy(ids),
                "targets": torch.tensor([r[2] for r in rows], dtype=torch.long),
                "digests": torch.tensor([digest(r[0]) for r in rows], dtype=torch.long),
                "keys": [r[3] for r in rows], "skipped": {k: int(v) for k, v in skipped.counts.items()},
                "skipped_keys": [(reason, key) for reason, key, _ in skipped.listed]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL's; torch threads in every worker would fight the trainer's


def loader(stream: SplitStream, workers: int, pin_memory: bool = False) -> DataLoader:  # type: ignore[type-arg]
    """A DataLoader over a stream: ``workers`` processes decode, batches come back in order."""
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, worker_init_fn=_worker_init if workers else None)


@dataclass
class Collected:
    images: np.ndarray  # uint8 [N, S, S, 3]
    captions: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def chunks(spec: DataSpec, split: str, labels: list[str], image_size: int, size: int = 256,
           report: SkipReport | None = None, limit: int | None = None) -> Iterator[Collected]:
    """A split decoded in order, ``size`` samples at a time (evaluation and export: memory of one chunk)."""
    images: list[np.ndarray] = []
    captions: list[str] = []
    out_labels: list[str] = []
    taken = 0
    for s in ordered_samples(spec, split, set(labels), 0, shuffle=False):
        if limit is not None and taken >= limit:
            break
        try:
            images.append(load_image(s.read(), image_size, TRAIN_MAX_PIXELS))
        except (ImageError, OSError) as exc:
            if report is not None:
                report.skip(f"image not decodable ({getattr(exc, 'code', 'truncated')})", s.key)
            continue
        captions.append(s.caption)
        out_labels.append(s.label)
        taken += 1
        if len(captions) == size:
            yield Collected(np.stack(images), captions, out_labels)
            images, captions, out_labels = [], [], []
    if captions:
        yield Collected(np.stack(images), captions, out_labels)


def collect(spec: DataSpec, split: str, labels: list[str], image_size: int, limit: int | None = None,
            report: SkipReport | None = None) -> Collected:
    """Up to ``limit`` decoded samples of a split, in memory: for parity checks and small data."""
    got = list(chunks(spec, split, labels, image_size, report=report, limit=limit))
    if not got:
        return Collected(np.zeros((0, image_size, image_size, 3), np.uint8), [], [])
    return Collected(np.concatenate([c.images for c in got]), [x for c in got for x in c.captions],
                     [x for c in got for x in c.labels])


__all__ = ["SplitStream", "StreamConfig", "chunks", "collect", "digest", "loader", "ordered_samples"]
