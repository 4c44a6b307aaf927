"""Export a checkpoint to a self-describing, verified ONNX artifact folder.

One function does it all, in order: eval mode -> ``torch.onnx.export`` with named
inputs and explicit dynamic axes -> ``onnx.checker`` full check -> onnxruntime vs torch
parity over the whole test split at several batch sizes and every caption length ->
artifact folder with manifest, tokenizer, evaluation report and plots. Parity failure
raises ``ExportError``: no artifact is left behind.

Exporter choice: the TorchScript exporter (``dynamo=False``). With torch 2.13 the dynamo
exporter specialises the LSTM's sequence axis (text-only model: ``input_ids`` fixed to
the example length; fused model: ``text_attention`` declared with the example length),
which breaks variable-length captions. The TorchScript exporter emits one ONNX ``LSTM``
node with a truly dynamic sequence axis.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier_core.artifact import MANIFEST, SCHEMA_VERSION, sha256_file
from classifier_core.text import TextEncoder, pad_ids

from . import jsonsafe
from .model import InferenceWrapper

log = logging.getLogger(__name__)

OPSET = 17
INPUTS = [("image", "uint8"), ("input_ids", "int64")]
OUTPUTS = [("probabilities", "float32"), ("text_attention", "float32")]
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 2, 7, 32)
PARITY_SAMPLES = 512  # test samples the parity check runs at each batch size
EXPORT_TEST_SAMPLES = 4096  # test samples decoded for the report in the artifact (metrics.json has the whole split)


class ExportError(RuntimeError):
    pass


def _onnx_export(wrapper: InferenceWrapper, path: Path, image_size: int) -> None:
    example = (torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8), torch.ones(2, 5, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, example, str(path), dynamo=False, opset_version=OPSET,
            input_names=[n for n, _ in INPUTS], output_names=[n for n, _ in OUTPUTS],
            dynamic_axes={"image": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
                          "probabilities": {0: "batch"}, "text_attention": {0: "batch", 1: "sequence"}},
        )


def check_parity(wrapper: InferenceWrapper, onnx_path: Path, images: np.ndarray, ids: list[list[int]],
                 max_len: int, vocab_size: int) -> dict[str, Any]:
    """Max |p_onnx - p_torch| over the split at each batch size, and over lengths 1..max_len."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}

    def compare(img: np.ndarray, batch_ids: np.ndarray) -> float:
        p_onnx, a_onnx = sess.run(None, {"image": img, "input_ids": batch_ids})
        with torch.no_grad():
            p_t, a_t = wrapper(torch.from_numpy(img), torch.from_numpy(batch_ids))
        if not np.isfinite(p_onnx).all():
            raise ExportError("onnxruntime produced non-finite probabilities")
        return max(float(np.abs(p_onnx - p_t.numpy()).max()), float(np.abs(a_onnx - a_t.numpy()).max()))

    for bs in PARITY_BATCH_SIZES:
        diff = 0.0
        for s in range(0, len(ids), bs):
            diff = max(diff, compare(images[s : s + bs], pad_ids(ids[s : s + bs])))
        worst[f"batch_{bs}"] = diff
    rng = np.random.default_rng(0)
    n = min(32, len(ids))
    diff = 0.0
    for length in range(1, max_len + 1):
        rows = rng.integers(3, max(vocab_size, 4), size=(n, length)).astype(np.int64)
        rows[: n // 2, max(1, length // 2) :] = 0  # half the rows padded
        diff = max(diff, compare(images[:n], rows))
    worst["lengths_1_to_max_len"] = diff
    worst["max"] = max(worst.values())
    return worst


def export_artifact(
    checkpoint: str | Path,
    out_dir: str | Path,
    name: str = "image-text-classifier",
    version: str | None = None,
    data: list[str] | None = None,
    ablation: dict[str, Any] | None = None,
    extra_files: list[Path] | None = None,
) -> dict[str, Any]:
    from .checkpoint import load_checkpoint, text_encoder_from_checkpoint
    from .data import DataSpec, SkipReport
    from .evaluate import classification_report, plot_confusion
    from .tensors import predict_probs, to_tensors

    model, ckpt = load_checkpoint(checkpoint)
    model.eval()
    wrapper = InferenceWrapper(model).eval()
    tc = ckpt["train_config"]
    text: TextEncoder = text_encoder_from_checkpoint(ckpt)
    labels = list(ckpt["labels"])
    sources = data or tc["data"]
    from .stream import collect

    spec = DataSpec(list(sources), tc["seed"], tc["label_key"], tc["label_map"], tc["val_frac"], tc["test_frac"],
                    tc.get("group_key"))
    skipped = SkipReport()
    # the test split is held decoded for the parity check and the report: at most EXPORT_TEST_SAMPLES of it
    test = collect(spec, "test", labels, model.cfg.image_size, limit=EXPORT_TEST_SAMPLES, report=skipped)
    run_metrics = Path(checkpoint).with_name("metrics.json")
    trained = json.loads(run_metrics.read_text()) if run_metrics.is_file() else {}
    if len(test) == 0:
        raise ExportError("the test split is empty: nothing to check parity or accuracy on")
    tensors = to_tensors(test, text, labels)

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        onnx_path = tmp / "model.onnx"
        _onnx_export(wrapper, onnx_path, model.cfg.image_size)
        import onnx

        onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
        parity = check_parity(wrapper, onnx_path, test.images[:PARITY_SAMPLES], tensors.ids[:PARITY_SAMPLES],
                              text.max_len, text.vocab_size)
        log.info("parity (max abs diff): %s", parity)
        if parity["max"] > PARITY_ATOL:
            raise ExportError(f"onnxruntime vs torch parity failed: max abs diff {parity['max']:.2e} > {PARITY_ATOL:.0e} ({parity})")

        text.tokenizer.save(str(tmp / "tokenizer.json"))
        probs = predict_probs(model, tensors)
        index = {lab: i for i, lab in enumerate(labels)}
        report = classification_report(np.array([index[x] for x in test.labels]), probs.argmax(-1), labels)
        (tmp / "eval_report.json").write_text(jsonsafe.dumps(report, indent=2))
        plot_confusion(report, tmp / "confusion_matrix.png", f"{name} ({model.cfg.mode}) on test")
        for f in extra_files or []:
            shutil.copy(f, tmp / f.name)

        dataset_info: dict[str, Any] = {}
        for src in map(Path, sources):
            if (src / "dataset.json").is_file():
                dataset_info = json.loads((src / "dataset.json").read_text())
        metrics = {model.cfg.mode: {"test_acc": report["accuracy"], "macro_f1": report["macro_f1"], "n_test": report["n"]}}
        if ablation:
            metrics = {**ablation, **metrics}
        import onnxruntime
        import tokenizers

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version or dt.datetime.now(dt.UTC).strftime("%Y.%m.%d"),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "mode": model.cfg.mode,
            "labels": labels,
            "image_size": model.cfg.image_size,
            "max_len": text.max_len,
            "inputs": [{"name": "image", "dtype": "uint8", "shape": ["batch", model.cfg.image_size, model.cfg.image_size, 3]},
                       {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
            "outputs": [{"name": "probabilities", "dtype": "float32", "shape": ["batch", len(labels)]},
                        {"name": "text_attention", "dtype": "float32", "shape": ["batch", "sequence"]}],
            "model_file": "model.onnx",
            "tokenizer_file": "tokenizer.json",
            "opset": OPSET,
            "preprocessing": {"image": "classifier_core.images.load_image (RGB, alpha on white, EXIF, bilinear resize)",
                              "pixel_scaling": "in graph", "mean": list(model.cfg.mean), "std": list(model.cfg.std),
                              "text": "NFKC + lowercase, whitespace/punctuation split, WordLevel",
                              "pad_id": text.pad_id, "unk_id": text.unk_id, "empty_id": text.empty_id},
            "data": {"sources": [str(s) for s in sources], "seed": tc["seed"], "label_key": tc["label_key"],
                     "group_key": tc.get("group_key"), "duplicates_across_splits": trained.get("duplicates_across_splits"),
                     "val_frac": tc["val_frac"], "test_frac": tc["test_frac"],
                     "n": {s: trained.get(f"n_{s}") for s in ("train", "val", "test")} | {"test_checked": len(test)},
                     "skipped": trained.get("skipped", skipped.to_dict()), "dataset": dataset_info},
            "metrics": metrics,
            "parity": parity,
            "training": {"best_epoch": ckpt["extra"].get("epoch"), "val_acc": ckpt["extra"].get("val_acc"),
                         "model_config": ckpt["model_config"], "optimizer": "Adam", "lr": tc["lr"],
                         "batch_size": tc["batch_size"]},
            "libraries": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                          "tokenizers": tokenizers.__version__, "numpy": np.__version__, "python": platform.python_version()},
        }
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(jsonsafe.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(out))
        out.chmod(0o755)  # mkdtemp made it 0700; a container's non-root user must read it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s, test accuracy %.4f) to %s", name, model.cfg.mode, report["accuracy"], out)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="best.pt of a training run")
    p.add_argument("--out", default="exported_models/custom",
                   help="artifact folder, replaced if it exists (default: exported_models/custom)")
    p.add_argument("--name", default=None, help="the model's name, as clients and /v2/models/<name> see it "
                   "(default: the --out folder's name)")
    p.add_argument("--version", default=None, help="(default: today's date)")
    p.add_argument("--data", default=None, help="data sources, comma separated (default: the training run's)")
    p.add_argument("--ablation", default=None, help="ablation.json from 'ablate', recorded in the manifest")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    ablation = json.loads(Path(a.ablation).read_text())["test_metrics"] if a.ablation else None
    name = a.name or Path(a.out).resolve().name
    manifest = export_artifact(a.checkpoint, a.out, name, a.version, a.data.split(",") if a.data else None, ablation)
    print(f"exported to {a.out}: parity max abs diff {manifest['parity']['max']:.2e}, metrics {jsonsafe.dumps(manifest['metrics'])}")  # noqa: T201
    return manifest
