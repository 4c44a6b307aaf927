"""Dataset readers: img2dataset-style WebDataset shards and CSV/JSONL manifests.

Every reader yields ``Sample`` records and counts what it had to skip, with the reason,
in a ``SkipReport``: a corrupt shard, a sample without image or caption, an image that
does not decode, a label that cannot be found. Images are decoded with the service's
``load_image`` so training sees exactly the pixels serving will.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from classifier_core.images import ImageError, load_image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TRAIN_MAX_PIXELS = 100_000_000  # a training sample bigger than this is skipped, not decoded


class DataError(ValueError):
    """A mistake in the data or how it was named: training stops with this one line."""


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str
    label: str
    group: str | None = None  # --group-key: samples of one group share a split


@dataclass
class SkipReport:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 samples"
        lines = [f"skipped {self.total} samples:"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n:6d}  {reason} (e.g. {self.examples[reason]})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, int]:
        return dict(self.counts)


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(p.glob("*.tar")) if p.is_dir() else [p])
    return out


def read_webdataset(
    shards: Sequence[str | Path],
    report: SkipReport,
    label_key: str = "label",
    label_map: dict[str, str] | None = None,
    group_key: str | None = None,
) -> Iterator[Sample]:
    """Read img2dataset shards: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per sample.

    The label is ``label_map[key]`` when a map is given, else ``json[label_key]``.
    """
    for shard in _expand(shards):
        groups: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = Path(member.name).name
                    key, _, ext = name.partition(".")
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    data = f.read()
                    if len(data) != member.size:  # tarfile reads a cut-off member short, silently
                        raise EOFError(f"{member.name} is truncated")
                    groups.setdefault(key, {})[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError) as exc:
            # keep what was read before the damage; count the shard
            report.skip(f"corrupt shard ({type(exc).__name__})", str(shard))
        for key, parts in groups.items():
            img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if img_ext is None:
                report.skip("no image file", f"{shard}:{key}")
                continue
            if "txt" not in parts:
                report.skip("no caption (.txt)", f"{shard}:{key}")
                continue
            try:
                meta = json.loads(parts.get("json", b"{}"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                report.skip("bad .json metadata", f"{shard}:{key}")
                continue
            meta = meta if isinstance(meta, dict) else {}
            status = meta.get("status")
            if status is not None and status != "success":  # img2dataset keeps failed downloads' metadata
                report.skip(f"img2dataset status {status}", f"{shard}:{key}")
                continue
            label = label_map.get(key) if label_map is not None else meta.get(label_key)
            if label is None or str(label) == "":
                report.skip("no label", f"{shard}:{key}")
                continue
            caption = parts["txt"].decode("utf-8", errors="replace").strip()
            group = meta.get(group_key) if group_key else None
            yield Sample(key, parts[img_ext], caption, str(label), None if group is None else str(group))


def read_manifest(path: str | Path, report: SkipReport, group_key: str | None = None) -> Iterator[Sample]:
    """A CSV or JSONL manifest with ``image`` (relative to the manifest), ``caption``, ``label``.

    Column names are matched without regard to case, and a byte-order mark (Excel's "CSV UTF-8")
    is ignored. A sample's key is its image path relative to the manifest, so ``a/000.jpg`` and
    ``b/000.jpg`` are two samples.
    """
    path = Path(path)
    rows: Iterable[dict[str, object]]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        def _jsonl() -> Iterator[dict[str, object]]:
            for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    report.skip("bad JSON line", f"{path}:{n}")
                    continue
                if isinstance(row, dict):
                    yield {str(k).strip().lower(): v for k, v in row.items()}
                else:
                    report.skip("bad JSON line", f"{path}:{n}")
        rows = _jsonl()
    else:
        reader = csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines())
        reader.fieldnames = [str(f).strip().lower() for f in reader.fieldnames or []]
        if "image" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise DataError(f"{path}: the header must name 'image' and 'label' columns (and 'caption'); "
                            f"it has {', '.join(reader.fieldnames) or 'none'}")
        rows = reader
    for n, row in enumerate(rows, 1):
        image, label = row.get("image"), row.get("label")
        caption = row.get("caption") or ""
        if not image or label is None or str(label) == "":
            report.skip("missing image or label field", f"{path}:{n}")
            continue
        img_path = (path.parent / str(image)).resolve()
        try:
            data = img_path.read_bytes()
        except OSError:
            report.skip("image file missing", str(img_path))
            continue
        group = row.get(group_key) if group_key else None
        key = Path(str(image)).as_posix()
        yield Sample(key, data, str(caption), str(label), None if group in (None, "") else str(group))


def check_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Every ``--data`` entry must exist: a mistyped one is an error, never silently left out."""
    paths = [Path(s) for s in sources]
    if not paths:
        raise DataError("no --data given")
    for p in paths:
        if not p.exists():
            raise DataError(f"--data {p}: no such file or folder")
        if p.is_dir() and not any(p.glob("*.tar")):
            raise DataError(f"--data {p}: a folder without .tar shards")
    return paths


def read_any(
    sources: Sequence[str | Path], report: SkipReport, label_key: str = "label", label_map_path: str | None = None,
    group_key: str | None = None,
) -> Iterator[Sample]:
    label_map = None
    if label_map_path:
        try:
            label_map = {str(k): str(v) for k, v in json.loads(Path(label_map_path).read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"--label-map {label_map_path}: not a readable JSON object ({type(exc).__name__})") from None
    for src in check_sources(sources):
        if src.suffix.lower() in (".csv", ".jsonl", ".ndjson"):
            yield from read_manifest(src, report, group_key)
        else:
            yield from read_webdataset([src], report, label_key, label_map, group_key)


def split_of(key: str, seed: int, val_frac: float = 0.1, test_frac: float = 0.1) -> str:
    """Deterministic split by hashing (seed, key): stable as data is added or reordered."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "val"
    return "train"


@dataclass
class DecodedSplit:
    keys: list[str]
    images: np.ndarray  # uint8 [N, S, S, 3]
    captions: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def decode_split(samples: Iterable[Sample], image_size: int, report: SkipReport) -> DecodedSplit:
    keys, images, captions, labels = [], [], [], []
    for s in samples:
        try:
            arr = load_image(s.image, image_size, TRAIN_MAX_PIXELS)
        except ImageError as exc:
            report.skip(f"image not decodable ({exc.code})", s.key)
            continue
        keys.append(s.key)
        images.append(arr)
        captions.append(s.caption)
        labels.append(s.label)
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return DecodedSplit(keys, stacked, captions, labels)


@dataclass
class LoadedData:
    splits: dict[str, DecodedSplit]
    report: SkipReport
    labels: list[str]  # sorted label names; index = class id
    duplicates_across_splits: int = 0  # identical decoded images in more than one split


def load_data(
    sources: Sequence[str | Path],
    image_size: int,
    seed: int,
    label_key: str = "label",
    label_map_path: str | None = None,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    group_key: str | None = None,
    require_splits: bool = True,
) -> LoadedData:
    report = SkipReport()
    buckets: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    seen: set[str] = set()
    for s in read_any(sources, report, label_key, label_map_path, group_key):
        if s.key in seen:
            report.skip("duplicate key", s.key)
            continue
        seen.add(s.key)
        # with --group-key, a group (a source photo, an item id) lands in one split whole
        buckets[split_of(s.group if s.group is not None else s.key, seed, val_frac, test_frac)].append(s)
    splits = {name: decode_split(b, image_size, report) for name, b in buckets.items()}
    labels = sorted(set(splits["train"].labels))
    # a label never seen in training cannot be predicted; keep such samples out of val/test
    for name in ("val", "test"):
        sp = splits[name]
        keep = [i for i, lab in enumerate(sp.labels) if lab in labels]
        for i in set(range(len(sp))) - set(keep):
            report.skip("label not in the training split", sp.keys[i])
        splits[name] = DecodedSplit([sp.keys[i] for i in keep], sp.images[keep] if len(sp) else sp.images,
                                    [sp.captions[i] for i in keep], [sp.labels[i] for i in keep])
    log.info(report.summary())
    data = LoadedData(splits, report, labels)
    data.duplicates_across_splits = duplicates_across_splits(splits)
    if data.duplicates_across_splits:
        log.warning("%d decoded images appear in more than one split: test accuracy partly measures memory "
                    "(near-duplicates? split by a source with --group-key)", data.duplicates_across_splits)
    if require_splits:
        check_splits(data, sources)
    return data


def duplicates_across_splits(splits: dict[str, DecodedSplit]) -> int:
    """Decoded images (identical pixels) found in more than one split."""
    seen: dict[bytes, str] = {}
    shared = 0
    for name, sp in splits.items():
        for img in sp.images:
            digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
            other = seen.setdefault(digest, name)
            if other != name:
                shared += 1
    return shared


def check_splits(data: LoadedData, sources: Sequence[str | Path]) -> None:
    """Data that cannot train a classifier or measure it is an error, not a model with accuracy 1.0 or NaN."""
    where = ", ".join(str(s) for s in sources)
    n_train = len(data.splits["train"])
    if n_train == 0:
        raise DataError(f"no usable training samples in {where}\n{data.report.summary()}")
    if len(data.labels) < 2:
        raise DataError(f"{where}: the training split has {len(data.labels)} label(s) ({', '.join(data.labels)}); "
                        "a classifier needs at least 2")
    if len(data.labels) * 2 > n_train:
        raise DataError(f"{where}: {len(data.labels)} labels for {n_train} training samples; each label needs a few "
                        "examples (is the label column an id?)")
    for name in ("val", "test"):
        if len(data.splits[name]) == 0:
            raise DataError(f"{where}: the {name} split is empty (too few samples, or no {name} sample has a label "
                            "seen in training); add data or raise --val-frac/--test-frac")
