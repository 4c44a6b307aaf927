"""Ablation as in the paper's Fig. 6: image-only, text-only and fused on the same data and seeds.

Writes ``ablation.md`` (table), ``ablation.png`` (bar chart of train/test accuracy, the
paper's figures beside ours) and ``ablation.json`` to ``--out-dir``; with ``--export`` it
also exports the fused model as an artifact whose manifest records all three results.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path
from typing import Any

from . import jsonsafe
from .config import add_config_flags, resolve_config
from .data import scan
from .train import data_spec, train

log = logging.getLogger(__name__)

# Kim & Lee (2023), test accuracy. Their earlier model (0.835) has no counterpart here.
PAPER = {"image": 0.825, "text": None, "fused": 0.926}
MODES = ("image", "text", "fused")


def is_builtin(sources: list[str]) -> bool:
    """The paper's figures are a reference only on the built-in dataset, which was built to match them."""
    for src in map(Path, sources):
        info = src / "dataset.json"
        if not (src.is_dir() and info.is_file() and json.loads(info.read_text()).get("name") == "builtin-synthetic"):
            return False
    return bool(sources)


def write_table(results: dict[str, dict[str, Any]], path: Path, with_paper: bool = True) -> str:
    """The three models side by side; the paper's column only where its figures are comparable."""
    head = "| model | train acc | val acc | test acc |" + (" paper test acc |" if with_paper else "") + " best epoch | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode in MODES:
        r = results[mode]
        paper = (f" {PAPER[mode]:.3f} |" if PAPER[mode] is not None else " n/a |") if with_paper else ""
        lines.append(f"| {mode}-only |".replace("fused-only", "fused") +
                     f" {r['train_acc']:.3f} | {r['val_acc']:.3f} | {r['test_acc']:.3f} |{paper} {r['best_epoch']} | {r['seconds']} |")
    f, i, t = (results[m]["test_acc"] for m in ("fused", "image", "text"))
    ref = " (paper: +10.1)" if with_paper else ""
    lines += ["", f"Fused vs image-only: {100 * (f - i):+.1f} points{ref}; fused vs text-only: {100 * (f - t):+.1f} points."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: dict[str, dict[str, Any]], path: Path, with_paper: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(MODES))
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [("train (ours)", [results[m]["train_acc"] for m in MODES]),
            ("test (ours)", [results[m]["test_acc"] for m in MODES])]
    if with_paper:
        bars.append(("test (paper)", [PAPER[m] or 0.0 for m in MODES]))
    for k, (label, vals) in enumerate(bars):
        rects = ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label)
        ax.bar_label(rects, labels=[f"{v:.3f}" if v else "n/a" for v in vals], fontsize=7)
    ax.set_xticks(x, ["image-only", "text-only", "fused"])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title("Ablation (cf. Kim & Lee 2023, Fig. 6)" if with_paper else "Ablation: image-only, text-only, fused")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    p.add_argument("--export", default=None, help="also export the fused model to this artifact folder")
    p.add_argument("--name", default="image-text-classifier", help="artifact name (with --export)")
    p.add_argument("--version", default=None, help="artifact version (with --export)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    base = resolve_config(args)
    if base.out_dir == "runs/fused":
        base.out_dir = "runs/ablation"
    root = Path(base.out_dir)
    index = scan(data_spec(base))  # one metadata pass for the three runs
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        cfg = copy.deepcopy(base)
        cfg.model.mode = mode
        cfg.out_dir = str(root / mode)
        results[mode] = train(cfg, index)
        log.info("%s: test accuracy %.4f", mode, results[mode]["test_acc"])
    with_paper = is_builtin(base.data)
    table = write_table(results, root / "ablation.md", with_paper)
    plot(results, root / "ablation.png", with_paper)
    summary: dict[str, Any] = {"results": results, "paper": PAPER if with_paper else None,
               "test_metrics": {m: {"test_acc": results[m]["test_acc"], "train_acc": results[m]["train_acc"]} for m in MODES}}
    (root / "ablation.json").write_text(jsonsafe.dumps(summary, indent=2))
    print(table)  # noqa: T201
    if args.export:
        from .export import export_artifact

        export_artifact(root / "fused" / "best.pt", args.export, args.name, args.version, base.data,
                        summary["test_metrics"], [root / "ablation.md", root / "ablation.png"])
        print(f"exported the fused model to {args.export}")  # noqa: T201
    return summary
