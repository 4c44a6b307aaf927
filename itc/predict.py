"""``itc predict MODEL --data X --out FILE``: an exported model over a folder or a table, without a server.

    itc predict exported_models/default --data heldout/ --out answers.csv

``--data`` is any layout ``train`` reads (class subfolders, CSV/TSV/JSON Lines tables, .tar shards:
their labels, where present, are written as ``true_label``), a table without a label column, or a
plain folder of images with optional ``.txt`` captions beside them (``a.jpg`` + ``a.txt``). One row
per image goes to ``--out`` (``.csv`` or ``.jsonl``), written as it is computed: key, path, label (empty
when the model abstained), abstained (why), confidence, best_guess, top_k, ood_score, true_label,
error. An image that cannot be read is a row with its error, in its place, never the end of the run;
rows a table's or shard's reader rejects before any image is read (an image file that is not there)
come after the others. Unlabelled .tar shards are not read (their reader needs labels): use a table. Memory stays
bounded: rows are read, decoded and answered ``--batch-size`` at a time. The answers are those of
``POST /classify`` (``itc.api.Classifier``: the service's own predictor).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
COLUMNS = ["key", "path", "label", "abstained", "confidence", "best_guess", "top_k", "ood_score", "true_label", "error"]


@dataclass
class Item:
    key: str
    path: str
    caption: str
    true_label: str
    read: Any  # () -> bytes


def plain_folder(root: Path) -> Iterator[Item]:
    """Images directly in ``root`` (sorted), each with the caption in its ``.txt`` twin if there is one."""
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            txt = f.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            yield Item(f.name, str(f), caption, "", f.read_bytes)


def unlabelled_table(path: Path, image_key: str, caption_key: str) -> Iterator[Item]:
    """A CSV/TSV or JSON Lines table with an image column and, optionally, a caption column."""
    def rows() -> Iterator[dict[str, Any]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                for line in f:
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except ValueError:
                            row = None
                        yield row if isinstance(row, dict) else {}  # a bad line: a row with no image, its error
            else:
                yield from csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    for n, row in enumerate(rows(), 1):
        image = str(row.get(image_key) or "")
        p = path.parent / image
        yield Item(f"{path.name}:{n}", str(p) if image else "", str(row.get(caption_key) or ""), "",
                   (lambda p=p: p.read_bytes()) if image else _failing(f"no {image_key!r} in this row"))


def _columns(path: Path) -> set[str]:
    """A table's column names (CSV/TSV header, or the first JSON Lines object's keys)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        first = f.readline()
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        try:
            return set(json.loads(first)) if first.strip() else set()
        except (ValueError, TypeError):
            return set()
    return {c.strip() for c in next(csv.reader([first], delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])}


def items(data: str, image_key: str, caption_key: str, label_key: str) -> Iterator[Item]:
    from model_training.data import Columns, SkipReport, read_any, source_kind

    p = Path(data)
    if p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir() if f.is_file()) \
            and not any(d.is_dir() for d in p.iterdir()):
        yield from plain_folder(p)
        return
    if p.is_file() and source_kind(p) == "table" and label_key not in _columns(p):  # no labels: answers only
        yield from unlabelled_table(p, image_key, caption_key)
        return
    report = SkipReport()
    for s in read_any([p], report, label_key, columns=Columns(label=label_key, image=image_key, caption=caption_key)):
        yield Item(s.key, s.key, s.caption, s.label, s.read)
    # what the reader could not even list as a sample (no image file, no label...): a row each, with why
    for reason, where, _ in report.listed:
        yield Item(where, "", "", "", _failing(reason))


def _failing(reason: str) -> Any:
    def read() -> bytes:
        raise ValueError(reason)
    return read


def run(model: str, data: str, out: Path, batch_size: int = 32, threads: int = 0, top_k: int = 3, image_key: str = "image",
        caption_key: str = "caption", label_key: str = "label", progress: bool = True) -> dict[str, Any]:
    from classifier_core.images import ImageError

    from .api import Classifier

    clf = Classifier.load(model, threads=threads, batch_size=batch_size)
    fmt = "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, float] = {"rows": 0, "errors": 0, "abstained": 0, "labelled": 0, "correct": 0}
    t0 = time.time()
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = _Writer(f, fmt)
        # rows in input order: an unreadable image waits in the batch as its error, answered with the rest
        batch: list[tuple[Item, np.ndarray | None, str]] = []

        def flush() -> None:
            good = [(item, arr) for item, arr, _ in batch if arr is not None]
            answers = iter(clf.predict_arrays(np.stack([a for _, a in good]), [i.caption for i, _ in good], top_k)
                           if good else [])
            for item, arr, error in batch:
                if arr is None:
                    writer.row({**dict.fromkeys(COLUMNS, ""), "key": item.key, "path": item.path,
                                "true_label": item.true_label, "error": error})
                    continue
                ans = next(answers)
                counts["abstained"] += ans.abstained is not None
                if item.true_label:
                    counts["labelled"] += 1
                    counts["correct"] += ans.best_guess == item.true_label
                writer.row({"key": item.key, "path": item.path, "label": ans.label or "", "abstained": ans.abstained or "",
                            "confidence": round(ans.confidence, 6), "best_guess": ans.best_guess,
                            "top_k": ";".join(f"{lab}:{p:.6f}" for lab, p in ans.top),
                            "ood_score": "" if ans.ood_score is None else round(ans.ood_score, 6),
                            "true_label": item.true_label, "error": ""})
            batch.clear()

        for item in items(data, image_key, caption_key, label_key):
            counts["rows"] += 1
            try:
                batch.append((item, clf.decode(item.read()), ""))
            except (ImageError, OSError, ValueError) as exc:
                counts["errors"] += 1
                batch.append((item, None, str(exc) or type(exc).__name__))
            if len(batch) >= batch_size:
                flush()
            if progress and counts["rows"] % 1000 == 0:
                print(f"\r{counts['rows']:,} rows, {counts['rows'] / max(time.time() - t0, 1e-9):.0f}/s", end="",  # noqa: T201
                      file=sys.stderr, flush=True)
        flush()
    if progress and counts["rows"] >= 1000:
        print(file=sys.stderr)  # noqa: T201
    counts["seconds"] = round(time.time() - t0, 1)
    return counts


class _Writer:
    def __init__(self, f: TextIO, fmt: str) -> None:
        self.f, self.fmt = f, fmt
        self.csv = csv.DictWriter(f, COLUMNS) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writeheader()

    def row(self, r: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.writerow(r)
        else:
            self.f.write(json.dumps({k: (None if r[k] == "" else r[k]) for k in COLUMNS}, ensure_ascii=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itc predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported model folder (itc export --out ...)")
    p.add_argument("--data", required=True, help="a folder (class subfolders, or images with .txt captions), a table or .tar shards")
    p.add_argument("--out", required=True, help="answers.csv or answers.jsonl")
    p.add_argument("--batch-size", type=int, default=32, help="rows per onnxruntime call (default: 32)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: 0 = every core)")
    p.add_argument("--top-k", type=int, default=3, help="labels listed per row (default: 3)")
    p.add_argument("--image-key", default="image", help="a table's image column (default: image)")
    p.add_argument("--caption-key", default="caption", help="a table's caption column (default: caption)")
    p.add_argument("--label-key", default="label", help="a table's label column, if it has one (default: label)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from classifier_core.artifact import ArtifactError
    from model_training.data import DataError

    try:
        counts = run(a.model, a.data, Path(a.out), a.batch_size, a.threads, a.top_k, a.image_key, a.caption_key, a.label_key,
                     not a.no_progress)
    except (DataError, ArtifactError, FileNotFoundError) as exc:
        print(f"itc predict: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    acc = f", accuracy of the best guess {counts['correct'] / counts['labelled']:.4f} on {counts['labelled']} labelled rows" \
        if counts["labelled"] else ""
    print(f"{counts['rows']} rows -> {a.out} in {counts['seconds']} s: {counts['errors']} unreadable, "  # noqa: T201
          f"{counts['abstained']} abstained{acc}")
    return 0
