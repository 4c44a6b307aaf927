"""Evaluate a checkpoint (``best.pt``) or an exported ONNX artifact folder on a data split.

Writes ``report.json`` and ``confusion_matrix.png`` to ``--out`` and prints a summary, or
the figures as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import jsonsafe


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    for i, lab in enumerate(labels):
        tp = int(cm[i, i])
        fp = int(cm[:, i].sum() - tp)
        fn = int(cm[i, :].sum() - tp)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[lab] = {"precision": p, "recall": r, "f1": f1, "support": int(cm[i, :].sum())}
    acc = float(np.trace(cm) / cm.sum()) if cm.sum() else float("nan")
    # a class neither present nor predicted here has no figure to average: macro F1 is over the classes
    # that are either (as sklearn's labels=None): an answer naming an absent class still counts against it
    present = [v["f1"] for i, v in enumerate(per_class.values()) if v["support"] or cm[:, i].sum()]
    macro_f1 = float(np.mean(present)) if present else float("nan")
    return {"accuracy": acc, "macro_f1": macro_f1, "n": int(cm.sum()), "labels": labels, "classes_present": len(present),
            "per_class": per_class, "confusion_matrix": cm.tolist()}


def plot_confusion(report: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion_matrix"])
    labels = report["labels"]
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(labels), 1 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=8)
    ax.set_title(f"{title}\naccuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def onnx_predict(model_dir: Path, images: np.ndarray, captions: list[str], batch_size: int = 64,
                 with_ood: bool = False) -> tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], np.ndarray]:
    """Probabilities (calibrated, as the service answers) from an exported artifact, through the
    service's own preprocessing and the artifact contract; with ``with_ood``, also whether each row
    would be abstained as out-of-distribution (the contract's rule)."""
    import onnxruntime as ort

    from classifier_core import contract
    from classifier_core.artifact import load_manifest
    from classifier_core.text import TextEncoder

    manifest, text, sess = _loaded(model_dir, ort, load_manifest, TextEncoder)
    names = contract.output_names(manifest, attention=False)
    out, flagged = [], []
    for s in range(0, len(captions), batch_size):
        ids = text.pad(text.encode_batch(captions[s : s + batch_size]))
        res = contract.postprocess(dict(zip(names, sess.run(names, contract.feeds(images[s : s + batch_size], ids)), strict=True)),
                                   manifest)
        out.append(res.probabilities)
        flagged.append(res.ood_flagged)
    probs = np.concatenate(out) if out else np.zeros((0, len(manifest.labels)), np.float32)
    if with_ood:
        return probs, manifest.labels, (np.concatenate(flagged) if flagged else np.zeros(0, bool))
    return probs, manifest.labels


_LOADED: dict[tuple[Path, int], tuple[Any, Any, Any]] = {}


def _loaded(model_dir: Path, ort: Any, load_manifest: Any, encoder: Any) -> tuple[Any, Any, Any]:
    # manifest (checksums verified), tokenizer and session once per artifact for the whole evaluation:
    # onnx_predict is called for every chunk of 256 rows: the model file (19-109 MB) is hashed once, not per chunk
    key = (model_dir, (model_dir / "manifest.json").stat().st_mtime_ns)  # an artifact replaced in place reloads
    if key not in _LOADED:
        _LOADED.clear()
        m = load_manifest(model_dir)
        _LOADED[key] = (m, encoder.from_file(model_dir / m.tokenizer_file, m.max_len),
                        ort.InferenceSession(str(model_dir / m.model_file), providers=["CPUExecutionProvider"]))
    return _LOADED[key]


def _same_sources(target: str, data: list[str]) -> bool:
    """Whether ``data`` names the sources the model was trained on (by file or folder name: an
    artifact records names, not a training machine's paths); their test split is then what is fair."""
    path = Path(target)
    if path.is_dir() and (path / "manifest.json").is_file():
        recorded = json.loads((path / "manifest.json").read_text()).get("data", {}).get("sources", [])
    else:
        from .checkpoint import read_checkpoint

        recorded = read_checkpoint(path)["train_config"].get("data", [])
    names = (lambda xs: sorted(Path(str(x).rstrip("/")).name for x in xs))  # noqa: E731
    return bool(recorded) and names(recorded) == names(data)


def evaluate(target: str, data: list[str] | None, split: str | None, seed: int | None, out: Path | None) -> dict[str, Any]:
    """Accuracy, per-class figures and a confusion matrix, streaming the split in chunks (bounded memory).

    ``split`` None: the test split of the model's own data, or every row of ``data`` given (data the
    model did not train on has no splits to respect). Beside the accuracy with captions: the accuracy
    with empty captions (what the image alone gives) and, for an artifact with an OOD score, the
    share the service would abstain on."""
    split = split or ("all" if data and not _same_sources(target, data) else "test")
    from .data import DataSpec, SkipReport
    from .stream import chunks

    path = Path(target)
    predict: Any
    abstained: Any
    if path.is_dir() and (path / "manifest.json").is_file():  # exported artifact
        from classifier_core.artifact import load_manifest

        manifest = load_manifest(path)
        image_size, labels, d = manifest.image_size, list(manifest.labels), manifest.data
        seed = int(d.get("seed", 0) if seed is None else seed)
        spec = DataSpec.of({**d, "seed": seed}, data or [str(x) for x in d.get("sources", [])])

        def predict(images: np.ndarray, captions: list[str]) -> np.ndarray:
            return onnx_predict(path, images, captions)[0]

        def abstained(images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
            out = onnx_predict(path, images, captions, with_ood=True)  # probabilities and flags in one run
            return out[0], out[2]  # type: ignore[misc]
    else:  # checkpoint
        import torch

        from .checkpoint import load_checkpoint, text_encoder_from_checkpoint
        from .tensors import Tensors, predict_probs

        model, ckpt = load_checkpoint(path)
        tc, labels, image_size = ckpt["train_config"], list(ckpt["labels"]), model.cfg.image_size
        seed = int(tc["seed"] if seed is None else seed)
        spec = DataSpec.of({**tc, "seed": seed}, data)  # no --data: the run's own data, as export does
        text = text_encoder_from_checkpoint(ckpt)

        def predict(images: np.ndarray, captions: list[str]) -> np.ndarray:
            ids = [e.ids for e in text.encode_batch(captions)]
            return predict_probs(model, Tensors(torch.from_numpy(images), ids, torch.zeros(len(ids), dtype=torch.long)))

        abstained = None
    index = {lab: i for i, lab in enumerate(labels)}
    skipped = SkipReport()
    y_true: list[np.ndarray] = []
    y_pred: list[np.ndarray] = []
    y_image: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    for c in chunks(spec, split, labels, image_size, report=skipped):
        y_true.append(np.array([index[x] for x in c.labels], dtype=np.int64))
        if abstained is not None:
            probs, flagged = abstained(c.images, c.captions)
            flags.append(flagged)
        else:
            probs = predict(c.images, c.captions)
        y_pred.append(probs.argmax(-1))
        y_image.append(predict(c.images, [""] * len(c.captions)).argmax(-1))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
    truth = cat(y_true)
    report = classification_report(truth, cat(y_pred), labels)
    report.update({"target": str(target), "split": split, "seed": seed, "skipped": skipped.to_dict(),
                   "accuracy_without_captions": float((cat(y_image) == truth).mean()) if len(truth) else float("nan"),
                   "abstained_ood": float(np.concatenate(flags).mean()) if flags and len(truth) else None})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(jsonsafe.dumps(report, indent=2))
        plot_confusion(report, out / "confusion_matrix.png", f"{path.name} on {split}")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a checkpoint (.pt) or an exported model folder")
    p.add_argument("--data", default=None, help="data sources, comma separated (default: the ones the model was trained on)")
    p.add_argument("--split", default=None, choices=("train", "val", "test", "all"),
                   help="(default: test when --data is absent or names the sources the model trained on; all, every row, for "
                        "any other --data)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the one the model was trained with)")
    p.add_argument("--out", default=None, help="folder for report.json and confusion_matrix.png "
                   "(default: runs/eval/<the model's folder name>; never inside an exported model)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    target = Path(a.target)
    out = Path(a.out) if a.out else Path("runs") / "eval" / (target.name if target.is_dir() else target.parent.name)
    report = evaluate(a.target, a.data.split(",") if a.data else None, a.split, a.seed, out)
    if a.json:
        print(jsonsafe.dumps(report, indent=2))  # noqa: T201
    else:
        ood = report["abstained_ood"]
        print(f"{a.target} on {report['split']} ({', '.join(a.data.split(',')) if a.data else 'its own data'}): "  # noqa: T201
              f"accuracy {report['accuracy']:.4f} with captions, {report['accuracy_without_captions']:.4f} without; "
              f"macro F1 {report['macro_f1']:.4f} over the {report['classes_present']} classes present or predicted; n={report['n']}"
              + (f"; abstained as out-of-distribution: {100 * ood:.1f} %" if ood is not None else ""))
        for lab, m in report["per_class"].items():
            print(f"  {lab:>14}  P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  n={m['support']}")  # noqa: T201
        print(f"report: {out / 'report.json'}, confusion matrix: {out / 'confusion_matrix.png'}")  # noqa: T201
    return report
