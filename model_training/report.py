"""What a run leaves for a person to read: ``curves.png`` and ``summary.md`` beside its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plot_curves(log_path: Path, path: Path, title: str) -> None:
    """Loss and accuracy per epoch, train against validation, from the run's log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    # epochs as run, 1..n: an early-stopped phase 1 leaves a gap in the epoch numbers (phase 2 counts
    # from --epochs), which would draw as a jump in the curves
    epochs = list(range(1, len(rows) + 1))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, what in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(epochs, [r[f"train_{what}"] for r in rows], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{what}"] for r in rows], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    phase2 = [i for i, r in zip(epochs, rows, strict=True) if r.get("phase") == 2]
    if phase2:  # where fine-tuning of the backbone began
        for ax in (loss_ax, acc_ax):
            ax.axvline(phase2[0] - 0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel("epoch run (dashed: fine-tuning starts)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(path: Path, summary: dict[str, Any], sources: list[str], labels: list[str],
                  confusion: list[list[int]]) -> None:
    """A short Markdown summary: data, splits, best epoch, accuracies, skips and the test confusion matrix."""
    n = {s: summary.get(f"n_{s}") for s in ("train", "val", "test")}
    lines = [
        f"# {summary['mode']} model",
        "",
        f"- data: {', '.join(sources)}",
        f"- samples: {n['train']} train / {n['val']} val / {n['test']} test, {len(labels)} labels",
        f"- best epoch: {summary.get('best_epoch_run', summary['best_epoch'])} of {summary['epochs_run']} run"
        + (f" ({summary['epochs_frozen']} with the backbone frozen, then {summary['epochs_run'] - summary['epochs_frozen']} "
           "fine-tuning it)" if summary.get("epochs_frozen") not in (None, summary["epochs_run"]) else ""),
        f"- accuracy: train {summary['train_acc']:.4f}, validation {summary['val_acc']:.4f}, "
        f"**test {summary['test_acc']:.4f}**",
        f"- skipped: {sum(summary['skipped'].values())} samples (skipped.json lists them)",
        f"- images in more than one split: {summary['duplicates_across_splits']}",
        f"- {summary['seconds']:.0f} s; curves: curves.png",
        "",
        "## Confusion matrix (test; rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    lines += [f"| **{lab}** | " + " | ".join(str(v) for v in row) + " |" for lab, row in zip(labels, confusion)]
    path.write_text("\n".join(lines) + "\n")
