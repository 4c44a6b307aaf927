"""Dataset readers, read lazily: img2dataset-style WebDataset shards, a folder of class subfolders
(torchvision's ImageFolder layout, captions from a ``.txt`` beside each image), and tables: CSV or
TSV (the delimiter sniffed, or ``--delimiter``) and JSON Lines, with ``--image-key``,
``--caption-key`` and ``--label-key`` naming their columns.

A reader yields ``Sample`` records that carry metadata (key, caption, label, group) and a way
to read the image: the bytes are read only for the samples a loader worker decodes, so a pass
over the metadata (labels, counts, tokenizer captions) never holds images and a worker never
reads another worker's images. What a reader has to skip is counted with its reason in a
``SkipReport``. Images are decoded with ``classifier_core.images.load_image``, so training sees
exactly the pixels serving will.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .shards import IMAGE_EXTS, TruncatedImage, tar_groups  # noqa: F401 (TruncatedImage: re-exported)

log = logging.getLogger(__name__)

TRAIN_MAX_PIXELS = 100_000_000  # a training sample bigger than this is skipped, not decoded
TOKENIZER_CAPTIONS = 200_000  # the tokenizer learns from at most this many training captions (a seeded sample)


class DataError(ValueError):
    """A mistake in the data or how it was named: training stops with this one line."""


@dataclass
class Sample:
    key: str
    caption: str
    label: str
    group: str | None  # --group-key: samples of one group share a split
    read: Callable[[], bytes]  # the image's bytes, read only when the sample is decoded

    @property
    def image(self) -> bytes:
        return self.read()


MAX_LISTED_SKIPS = 100_000  # skipped samples listed by key in skipped.json; past it only counted
# what the pre-flight check stops for unless --skip-bad / --max-bad allow it: a sample whose image
# file the data names but that is not there or not an image
BAD_IMAGE_REASONS = ("image file missing", "image file unreadable")


@dataclass
class SkipReport:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    listed: list[tuple[str, str, int]] = field(default_factory=list)  # (reason, key or place, count)
    unlisted: int = 0  # skips past MAX_LISTED_SKIPS: counted, not listed

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        self.examples.setdefault(reason, where)
        if len(self.listed) < MAX_LISTED_SKIPS:
            self.listed.append((reason, where, n))
        else:
            self.unlisted += n

    def merge(self, other: SkipReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.examples.setdefault(reason, other.examples.get(reason, "?"))
        room = MAX_LISTED_SKIPS - len(self.listed)
        self.listed.extend(other.listed[:room])
        self.unlisted += other.unlisted + sum(n for _, _, n in other.listed[room:])

    def bad_images(self) -> list[tuple[str, str]]:
        return [(where, reason) for reason, where, _ in self.listed if reason in BAD_IMAGE_REASONS]

    def to_json(self) -> dict[str, object]:
        """skipped.json: the counts, and every skipped sample with its reason (up to MAX_LISTED_SKIPS)."""
        return {"total": self.total, "counts": dict(self.counts),
                "samples": [{"key": w, "reason": r, **({"count": n} if n != 1 else {})} for r, w, n in self.listed],
                "not_listed": self.unlisted}

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
        for key, parts in tar_groups(shard, report):
            img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if img_ext is None:
                report.skip("no image file", f"{shard}:{key}")
                continue
            if "txt" not in parts:
                report.skip("no caption (.txt)", f"{shard}:{key}")
                continue
            try:
                meta = json.loads(parts["json"]()) if "json" in parts else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                report.skip("bad .json metadata", f"{shard}:{key}")
                continue
            except OSError:
                report.skip("corrupt shard (EOFError)", str(shard))
                break
            meta = meta if isinstance(meta, dict) else {}
            status = meta.get("status")
            if status is not None and status != "success":  # img2dataset keeps failed downloads' metadata
                report.skip(f"img2dataset status {status}", f"{shard}:{key}")
                continue
            label = label_map.get(key) if label_map is not None else meta.get(label_key)
            if label is None or str(label) == "":
                report.skip("no label", f"{shard}:{key}")
                continue
            try:
                caption = parts["txt"]().decode("utf-8", errors="replace").strip()
            except OSError:
                report.skip("corrupt shard (EOFError)", str(shard))
                break
            group = meta.get(group_key) if group_key else None
            yield Sample(key, caption, str(label), None if group is None else str(group), parts[img_ext])


@dataclass(frozen=True)
class Columns:
    """Which column (CSV, TSV) or key (JSON Lines, a shard's .json) holds what."""

    image: str = "image"
    caption: str = "caption"
    label: str = "label"
    group: str | None = None
    delimiter: str | None = None  # CSV/TSV: None = sniffed from the file's start


TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
SNIFFED = ",;\t|"


def _delimiter(path: Path, text: str, given: str | None) -> str:
    if given:
        return {"tab": "\t", "\\t": "\t"}.get(given, given)
    head = "\n".join(text.splitlines()[:50])
    try:
        return csv.Sniffer().sniff(head, delimiters=SNIFFED).delimiter
    except csv.Error:  # one column, or too little to tell
        return "\t" if path.suffix.lower() == ".tsv" else ","


def image_header_ok(path: Path) -> bool:
    """Open the file as an image and read its header only (no decoding): a cheap check for a pre-flight pass."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.width > 0 and im.height > 0
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


def read_table(path: str | Path, report: SkipReport, group_key: str | None = None, columns: Columns | None = None,
                  check_images: bool = False) -> Iterator[Sample]:
    """A CSV, TSV or JSON Lines table with an image path (relative to the table), a caption and a label.

    Column names are matched without regard to case, and a byte-order mark (Excel's "CSV UTF-8")
    is ignored. A sample's key is its image path relative to the manifest, so ``a/000.jpg`` and
    ``b/000.jpg`` are two samples. A table without the caption column gives empty captions.
    ``check_images``: the pre-flight pass opens each image's header (reading, not decoding).
    """
    path = Path(path)
    cols = columns or Columns(group=group_key)
    if group_key and not cols.group:
        cols = dataclasses.replace(cols, group=group_key)
    image_key, caption_key, label_key = cols.image.lower(), cols.caption.lower(), cols.label.lower()
    group_key = cols.group.lower() if cols.group else None
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
        text = path.read_text(encoding="utf-8-sig")
        delimiter = _delimiter(path, text, cols.delimiter)
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
        reader.fieldnames = [str(f).strip().lower() for f in reader.fieldnames or []]
        if image_key not in reader.fieldnames or label_key not in reader.fieldnames:
            shown = {",": "','", "\t": "a tab", ";": "';'", "|": "'|'"}.get(delimiter, repr(delimiter))
            raise DataError(f"{path}: the header must name the image and label columns ('{cols.image}', '{cols.label}'; "
                            f"--image-key/--label-key name others); read with the delimiter {shown} it has "
                            f"{', '.join(repr(f) for f in reader.fieldnames) or 'no columns'}; --delimiter sets another")
        rows = reader
    for n, row in enumerate(rows, 1):
        image, label = row.get(image_key), row.get(label_key)
        caption = row.get(caption_key) or ""
        if not image or label is None or str(label) == "":
            report.skip("missing image or label field", f"{path}:{n}")
            continue
        img_path = (path.parent / str(image)).resolve()
        key = Path(str(image)).as_posix()
        if not img_path.is_file():
            report.skip("image file missing", key)
            continue
        if check_images and not image_header_ok(img_path):
            report.skip("image file unreadable", key)
            continue
        group = row.get(group_key) if group_key else None
        yield Sample(key, str(caption), str(label), None if group in (None, "") else str(group), img_path.read_bytes)


CLASS_FOLDER = "class-folder:"  # a unit: one class subfolder of an image folder, "class-folder:ROOT::CLASS"


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS


def class_folders(root: Path) -> list[Path]:
    """The subfolders of ``root`` that hold images (at any depth): the classes of an ImageFolder layout."""
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and any(_is_image_file(f) for f in d.rglob("*"))]


def source_kind(p: Path) -> str:
    """``shards``, ``folder`` (class subfolders), ``table`` or ``unit``; a DataError says what to pass instead."""
    if str(p).startswith(CLASS_FOLDER):
        return "unit"
    if not p.exists():
        raise DataError(f"--data {p}: no such file or folder")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            return "table"
        if suffix == ".tar" or p.name.lower().endswith((".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")):
            return "shards"
        if suffix.lstrip(".") in IMAGE_EXTS:
            raise DataError(f"--data {p}: a single image; --data takes a folder of class subfolders (data/cat/*.jpg, "
                            "data/dog/*.jpg), a CSV, TSV or JSON Lines table, or .tar shards")
        raise DataError(f"--data {p}: not a dataset (.csv, .tsv, .jsonl, .tar, or a folder of class subfolders)")
    if any(p.glob("*.tar")):
        return "shards"
    if class_folders(p):
        return "folder"
    if any(_is_image_file(f) for f in p.iterdir()):
        raise DataError(f"--data {p}: images without class subfolders; put each class in a subfolder of its own "
                        f"({p}/cat/*.jpg, {p}/dog/*.jpg) or list them in a CSV with a label column")
    raise DataError(f"--data {p}: a folder with neither .tar shards nor class subfolders of images")


def check_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Every ``--data`` entry must exist and be a layout we read: a mistyped one is an error, never left out."""
    paths = [Path(s) for s in sources]
    if not paths:
        raise DataError("no --data given")
    for p in paths:
        source_kind(p)
    return paths


def read_class_folder(unit: str, report: SkipReport, check_images: bool = False) -> Iterator[Sample]:
    """One class of an ImageFolder layout: label = the subfolder's name; caption = ``IMAGE.txt`` beside
    the image (``cat/001.jpg`` + ``cat/001.txt``) if there is one, else empty; key = ``cat/001.jpg``."""
    root, _, name = unit[len(CLASS_FOLDER):].rpartition("::")
    folder = Path(root) / name
    for f in sorted(folder.rglob("*")):
        if not _is_image_file(f):
            continue
        key = f.relative_to(root).as_posix()
        if check_images and not image_header_ok(f):
            report.skip("image file unreadable", key)
            continue
        side = f.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8", errors="replace").strip() if side.is_file() else ""
        yield Sample(key, caption, name, None, f.read_bytes)


def read_any(
    sources: Sequence[str | Path], report: SkipReport, label_key: str = "label", label_map_path: str | None = None,
    group_key: str | None = None, columns: Columns | None = None, check_images: bool = False,
) -> Iterator[Sample]:
    label_map = None
    if label_map_path:
        try:
            label_map = {str(k): str(v) for k, v in json.loads(Path(label_map_path).read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"--label-map {label_map_path}: not a readable JSON object ({type(exc).__name__})") from None
    cols = columns or Columns(label=label_key, group=group_key)
    for src in check_sources(sources):
        kind = source_kind(src)
        if kind == "unit":
            yield from read_class_folder(str(src), report, check_images)
        elif kind == "folder":
            for d in class_folders(src):
                yield from read_class_folder(f"{CLASS_FOLDER}{src}::{d.name}", report, check_images)
        elif kind == "table":
            yield from read_table(src, report, group_key, cols, check_images)
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
class DataSpec:
    """Which samples a run reads and how they are split: everything a reader needs, nothing decoded."""

    sources: list[str]
    seed: int = 0
    label_key: str = "label"
    label_map: str | None = None
    val_frac: float = 0.1
    test_frac: float = 0.1
    group_key: str | None = None
    image_key: str = "image"
    caption_key: str = "caption"
    delimiter: str | None = None
    # keys the pre-flight pass found bad (image missing or not an image): later passes skip them
    # without opening them again, and without counting them twice
    bad_keys: frozenset[str] = frozenset()

    @classmethod
    def of(cls, tc: dict[str, Any], sources: Sequence[str] | None = None) -> DataSpec:
        """The spec a training run used, from its saved config (``train_config`` of a checkpoint)."""
        return cls(list(sources if sources is not None else tc["data"]), int(tc.get("seed", 0)),
                   tc.get("label_key", "label"), tc.get("label_map"), float(tc.get("val_frac", 0.1)),
                   float(tc.get("test_frac", 0.1)), tc.get("group_key"), tc.get("image_key", "image"),
                   tc.get("caption_key", "caption"), tc.get("delimiter"))

    def only(self, unit: str) -> DataSpec:
        """The same spec over one shard, table or class folder."""
        return dataclasses.replace(self, sources=[unit])

    @property
    def columns(self) -> Columns:
        return Columns(self.image_key, self.caption_key, self.label_key, self.group_key, self.delimiter)

    def samples(self, report: SkipReport, check_images: bool = False) -> Iterator[tuple[str, Sample]]:
        """(split, sample) for every readable sample, in source order."""
        for s in read_any(self.sources, report, self.label_key, self.label_map, self.group_key, self.columns, check_images):
            if s.key in self.bad_keys:
                continue
            yield split_of(s.group if s.group is not None else s.key, self.seed, self.val_frac, self.test_frac), s


@dataclass
class DataIndex:
    """What one pass over the metadata found: labels, counts per split, captions for the tokenizer."""

    labels: list[str]  # sorted label names of the training split; index = class id
    counts: dict[str, int]  # usable samples per split (before image decoding)
    report: SkipReport
    captions: list[str]  # training captions for the tokenizer (a seeded sample of at most TOKENIZER_CAPTIONS)
    captioned: int = 0  # training samples with a non-empty caption


def units(spec: DataSpec) -> list[str]:
    """The shards and manifests of a spec: the units a scan reads in parallel and an epoch shuffles."""
    out: list[str] = []
    for src in check_sources(spec.sources):
        kind = source_kind(src)
        if kind == "folder":
            out.extend(f"{CLASS_FOLDER}{src}::{d.name}" for d in class_folders(src))
        elif kind in ("table", "unit"):
            out.append(str(src))
        else:
            out.extend(str(p) for p in _expand([src]))
    return out


def _scan_unit(job: tuple[DataSpec, str]) -> tuple[dict[str, Counter[str]], list[str], SkipReport]:
    spec, unit = job
    report = SkipReport()
    per_split: dict[str, Counter[str]] = {"train": Counter(), "val": Counter(), "test": Counter()}
    captions: list[str] = []
    for split, s in spec.only(unit).samples(report, check_images=True):
        per_split[split][s.label] += 1
        if split == "train":
            captions.append(s.caption)
    return per_split, captions, report


def bad_allowance(max_bad: str | None, total: int) -> int:
    """``--max-bad``: a count (``10``) or a share of the samples (``1%``); None: no limit."""
    if max_bad is None:
        return total
    text = str(max_bad).strip()
    try:
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * total)
        return int(text)
    except ValueError:
        raise DataError(f"--max-bad must be a count (10) or a percentage (1%), not {max_bad!r}") from None


def scan(spec: DataSpec, require_splits: bool = True, max_captions: int = TOKENIZER_CAPTIONS,
         processes: int | None = None, max_bad: str | None = None) -> DataIndex:
    # ``processes``: default the cores (divided among torchrun's ranks, which each scan), at most 8
    """One pass over metadata only (no image is decoded), shards in parallel processes. Tables and
    class folders name image files: each is checked to exist and to open as an image (its header
    only) here, before any epoch. More such bad samples than ``max_bad`` allows stop it with the
    first few paths and the total (None: they are skipped and counted, whatever their number).

    Memory grows with the number of labels and of shards, not of samples: a shard's training
    captions come back to be sampled (a seeded reservoir of at most ``max_captions``) and dropped.
    """
    report = SkipReport()
    per_split: dict[str, Counter[str]] = {"train": Counter(), "val": Counter(), "test": Counter()}
    captions: list[str] = []
    rng = random.Random(spec.seed)
    seen = captioned = 0
    jobs = [(spec, u) for u in units(spec)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    processes = min(processes or max(1, (os.cpu_count() or 1) // world), len(jobs), 8)
    # a process pool, not threads: the header reader is Python; a killed child raises, never hangs
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) if processes > 1 else None
    try:
        results = pool.map(_scan_unit, jobs) if pool is not None else map(_scan_unit, jobs)
        for unit_counts, unit_captions, unit_report in results:  # in unit order: the sample is reproducible
            for split, counter in unit_counts.items():
                per_split[split].update(counter)
            report.merge(unit_report)
            for caption in unit_captions:  # reservoir sampling: uniform, whatever the number of captions
                seen += 1
                captioned += bool(caption.strip())
                if len(captions) < max_captions:
                    captions.append(caption)
                else:
                    j = rng.randrange(seen)
                    if j < max_captions:
                        captions[j] = caption
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    labels = sorted(per_split["train"])
    counts = {"train": sum(per_split["train"].values())}
    for name in ("val", "test"):
        # a label never seen in training cannot be predicted; such samples stay out of val/test
        unseen = sum(n for lab, n in per_split[name].items() if lab not in per_split["train"])
        if unseen:
            report.skip("label not in the training split", f"{name} split", unseen)
        counts[name] = sum(per_split[name].values()) - unseen
    log.info("%s: %s samples (train/val/test), %d labels; %d of %d training samples have a caption",
             ", ".join(spec.sources), "/".join(str(counts[k]) for k in ("train", "val", "test")), len(labels),
             captioned, counts["train"])
    bad = report.bad_images()
    found = sum(report.counts[r] for r in BAD_IMAGE_REASONS)
    if found > bad_allowance(max_bad, found + sum(counts.values())):
        shown = ", ".join(f"{where} ({reason})" for where, reason in bad[:5])
        raise DataError(f"{found} of {found + sum(counts.values())} samples name an image that is missing or not an "
                        f"image, e.g. {shown}; fix them, or pass --skip-bad (or --max-bad 1%) to train without them")
    index = DataIndex(labels, counts, report, captions, captioned)
    if require_splits:
        check_splits(index, spec.sources)
    return index


def check_splits(index: DataIndex, sources: Sequence[str | Path]) -> None:
    """Data that cannot train a classifier or measure it is an error, not a model with accuracy 1.0 or NaN."""
    where = ", ".join(str(s) for s in sources)
    n_train = index.counts["train"]
    if n_train == 0:
        raise DataError(f"no usable training samples in {where}\n{index.report.summary()}")
    if len(index.labels) < 2:
        raise DataError(f"{where}: the training split has {len(index.labels)} label(s) ({', '.join(index.labels)}); "
                        "a classifier needs at least 2")
    if len(index.labels) * 2 > n_train:
        raise DataError(f"{where}: {len(index.labels)} labels for {n_train} training samples; each label needs a few "
                        "examples (is the label column an id?)")
    for name in ("val", "test"):
        if index.counts[name] == 0:
            raise DataError(f"{where}: the {name} split is empty (too few samples, or no {name} sample has a label "
                            "seen in training); add data or raise --val-frac/--test-frac")
