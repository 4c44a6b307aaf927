"""Export a checkpoint to a self-describing, verified ONNX artifact folder.

In order, and nothing is left behind if a step fails (``ExportError``):

1. **fit** (eval mode): the temperature on the validation split, the out-of-distribution head on the
   training split's image statistics and its threshold on the validation split (``calibrate.py``);
2. **build**: ``torch.onnx.export`` of the model with the OOD head, named inputs and explicit
   dynamic axes, then ``onnx.checker`` (full check);
3. **verify**: onnxruntime vs torch parity over the test split at several batch sizes and every
   caption length (probabilities and attention within ``PARITY_ATOL``, the OOD score within the same
   relative tolerance);
4. **write**: manifest (with calibration, OOD threshold, backbone and its weights' digest),
   tokenizer, evaluation report and plots into a temporary folder, renamed into place at the end.

Exporter choice: the TorchScript exporter (``dynamo=False``). With torch 2.13 the dynamo exporter
specialises the LSTM's sequence axis (text-only model: ``input_ids`` fixed to the example length;
fused model: ``text_attention`` declared with the example length), which breaks variable-length
captions. The TorchScript exporter emits one ONNX ``LSTM`` node with a truly dynamic sequence axis.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier_core import contract
from classifier_core.artifact import MANIFEST, SCHEMA_VERSION, Manifest, sha256_file
from classifier_core.text import TextEncoder, pad_ids

from . import jsonsafe
from .calibrate import CROSS_FOLDS, MAX_FIT_ROWS, CrossFit, OODFit, OODHead, ece, fit_temperature, softmax
from .model import FusedClassifier, InferenceWrapper

log = logging.getLogger(__name__)

OPSET = 17
INPUTS, OUTPUTS = contract.INPUTS, contract.OUTPUTS
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 2, 7, 32)
PARITY_SAMPLES = 512  # test samples the parity check runs at each batch size
EXPORT_TEST_SAMPLES = 4096  # test samples decoded for the report in the artifact (metrics.json has the whole split)
OOD_QUANTILE = 0.95  # the OOD threshold: this quantile of the validation split's scores


class ExportError(RuntimeError):
    pass


def _onnx_export(wrapper: InferenceWrapper, path: Path, image_size: int) -> None:
    example = (torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8), torch.ones(2, 5, dtype=torch.long))
    names = [n for n, _ in OUTPUTS][: 3 if wrapper.ood is not None else 2]
    axes = {contract.IMAGE: {0: "batch"}, contract.INPUT_IDS: {0: "batch", 1: "sequence"}, contract.PROBABILITIES: {0: "batch"},
            contract.ATTENTION: {0: "batch", 1: "sequence"}, contract.OOD_SCORE: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=[n for n, _ in INPUTS], output_names=names,
                          dynamic_axes={k: v for k, v in axes.items() if k in names or k in (contract.IMAGE, contract.INPUT_IDS)})


def check_parity(wrapper: InferenceWrapper, onnx_path: Path, images: np.ndarray, ids: list[list[int]],
                 max_len: int, vocab_size: int, ood_scale: float = 1.0) -> dict[str, Any]:
    """Max |onnx - torch| over the split at each batch size, and over lengths 1..max_len. The OOD
    score is compared relative to its size or ``ood_scale`` (its threshold), whichever is larger: what
    it is used for is a comparison with the threshold, and a small model's nearly singular feature
    covariance magnifies float32 rounding in scores far below it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}

    def compare(img: np.ndarray, batch_ids: np.ndarray) -> float:
        got = sess.run(None, contract.feeds(img, batch_ids))
        with torch.no_grad():
            want = [t.numpy() for t in wrapper(torch.from_numpy(img), torch.from_numpy(batch_ids))]
        if len(got) != len(want):
            raise ExportError(f"the ONNX file has {len(got)} outputs, the model {len(want)}")
        if not all(np.isfinite(g).all() for g in got):
            raise ExportError("onnxruntime produced non-finite outputs")
        diffs = [float(np.abs(g - w).max()) for g, w in zip(got[:2], want[:2])]
        if len(got) > 2:  # a distance of hundreds: compared relative to its size
            diffs.append(float((np.abs(got[2] - want[2]) / np.maximum(max(1.0, ood_scale), np.abs(want[2]))).max()))
        return max(diffs)

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


# --- 1. fit ----------------------------------------------------------------------------------


@dataclass
class Outputs:
    """The model's logits, out-of-distribution features and the targets of some samples of one split."""

    logits: np.ndarray
    features: np.ndarray
    targets: np.ndarray


@torch.no_grad()
def forward_split(model: FusedClassifier, spec: Any, split: str, labels: list[str], text: TextEncoder,
                  limit: int | None, batch_size: int = 64) -> Iterator[Outputs]:
    """The split in order, ``limit`` samples at most, chunk by chunk (the memory of one chunk)."""
    from .stream import chunks

    index = {lab: i for i, lab in enumerate(labels)}
    model.eval()
    for c in chunks(spec, split, labels, model.cfg.image_size, limit=limit):
        ids = [e.ids for e in text.encode_batch(c.captions)]
        logits, features = [], []
        for s in range(0, len(ids), batch_size):
            z, _, f = model.forward_all(torch.from_numpy(c.images[s : s + batch_size]),
                                        torch.from_numpy(pad_ids(ids[s : s + batch_size])), ood=True)
            assert f is not None
            logits.append(z.float().numpy())
            features.append(f.float().numpy())
        yield Outputs(np.concatenate(logits), np.concatenate(features), np.array([index[x] for x in c.labels], np.int64))


def _gather(parts: Iterator[Outputs]) -> Outputs:
    got = list(parts)
    if not got:
        return Outputs(np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
    return Outputs(*(np.concatenate([getattr(o, k) for o in got]) for k in ("logits", "features", "targets")))


def fit_confidence(model: FusedClassifier, spec: Any, labels: list[str], text: TextEncoder,
                   quantile: float = OOD_QUANTILE) -> tuple[dict[str, Any], OODFit, Outputs]:
    """Temperature and OOD head (threshold included); returns their manifest entries, the fit and the
    validation outputs (reused for the report)."""
    val = _gather(forward_split(model, spec, "val", labels, text, MAX_FIT_ROWS))
    if len(val.targets) == 0:
        raise ExportError("the validation split is empty: nothing to fit the temperature on")
    temperature = fit_temperature(val.logits, val.targets)
    stats = CrossFit(len(labels), val.features.shape[1])
    for part in forward_split(model, spec, "train", labels, text, MAX_FIT_ROWS):
        stats.add(part.features, part.targets)
    n_train = stats.rows
    fit = stats.fit()
    # the threshold from scores of samples the statistics did not see: validation, and training out of fold
    train_oof, val_scores = stats.out_of_fold(), fit.distances(val.features)
    fit.threshold = float(np.quantile(np.concatenate([train_oof, val_scores]), quantile))
    nll = {name: float(-np.log(np.maximum(softmax(val.logits, t)[np.arange(len(val.targets)), val.targets], 1e-12)).mean())
           for name, t in (("before", 1.0), ("after", temperature))}
    calibration = {"temperature": temperature, "fitted_on": "val", "n": len(val.targets), "bins": 15,
                   "ece_val_before": ece(softmax(val.logits), val.targets),
                   "ece_val_after": ece(softmax(val.logits, temperature), val.targets),
                   "nll_val_before": nll["before"], "nll_val_after": nll["after"]}
    features = ("per channel mean and standard deviation of the image branch's block outputs" if model.image_encoder is not None
                else "the caption features the classifier head reads")
    flagged_val = float((val_scores > fit.threshold).mean())
    ood: dict[str, Any] = {"method": "mahalanobis", "output": contract.OOD_SCORE, "threshold": fit.threshold, "quantile": quantile,
           "features": features, "dim": int(val.features.shape[1]), "fitted_on": {"train": n_train, "val": len(val.targets)},
           "threshold_from": {"val": len(val_scores), "train_out_of_fold": len(train_oof), "folds": CROSS_FOLDS},
           "flagged": {"val": flagged_val,
                       "train_out_of_fold": float((train_oof > fit.threshold).mean()) if len(train_oof) else None},
           "meaning": "squared Mahalanobis distance to the nearest training class mean (shared covariance); "
                      "above the threshold the sample is unlike the training data"}
    log.info("temperature %.3f: ECE on val %.4f -> %.4f; OOD threshold %.2f (%.0f %% quantile of %d val and %d "
             "out-of-fold train scores; flags %.1f %% of val)", temperature, calibration["ece_val_before"],
             calibration["ece_val_after"], fit.threshold, 100 * quantile, len(val_scores), len(train_oof),
             100 * flagged_val)
    return {"calibration": calibration, "ood": ood}, fit, val


# --- 4. write --------------------------------------------------------------------------------


def _backbone_entry(ckpt: dict[str, Any], image_size: int) -> dict[str, Any] | None:
    info = ckpt["extra"].get("backbone")
    if not info:
        return None
    return {**info, "input_size": image_size, "normalisation": "(x - 127) / 128 per RGB channel, in the graph"}


def _dataset_info(sources: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for src in map(Path, sources):
        if (src / "dataset.json").is_file():
            info = json.loads((src / "dataset.json").read_text())
    return info


def display_source(source: str | Path) -> str:
    """A data source as the manifest records it: as the user named it when relative, else relative to
    the working folder when under it, else its name alone (no training machine's absolute paths)."""
    p = Path(source)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.name


def unique_version(state_dict: dict[str, Any]) -> str:
    """Today's date and a short digest of the weights: two different models never share a version."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().numpy().tobytes())
    return f"{dt.datetime.now(dt.UTC):%Y.%m.%d}-{h.hexdigest()[:8]}"


def write_atomically(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out))
    out.chmod(0o755)  # mkdtemp made it 0700; a container's non-root user must read it


@dataclass
class Prepared:
    """What export has fitted and measured before anything is written."""

    model: FusedClassifier
    ckpt: dict[str, Any]
    text: TextEncoder
    labels: list[str]
    sources: list[str]
    test: Any  # the decoded test split (at most EXPORT_TEST_SAMPLES)
    tensors: Any
    skipped: Any
    trained: dict[str, Any]  # the run's metrics.json
    wrapper: InferenceWrapper  # eval mode, with the OOD head: what is exported
    fit: OODFit
    confidence: dict[str, Any]  # calibration + ood sections of the manifest
    report: dict[str, Any]


def prepare(checkpoint: str | Path, data: list[str] | None, ood_quantile: float) -> Prepared:
    """Load the checkpoint, fit temperature and OOD head, evaluate on the test split (export = eval)."""
    from .checkpoint import load_checkpoint, text_encoder_from_checkpoint
    from .data import DataSpec, SkipReport
    from .evaluate import classification_report
    from .stream import collect
    from .tensors import to_tensors

    model, ckpt = load_checkpoint(checkpoint)
    tc = ckpt["train_config"]
    text: TextEncoder = text_encoder_from_checkpoint(ckpt)
    labels = list(ckpt["labels"])
    sources = list(data or tc["data"])
    spec = DataSpec.of(tc, sources)
    skipped = SkipReport()
    # the test split is held decoded for the parity check and the report: at most EXPORT_TEST_SAMPLES of it
    test = collect(spec, "test", labels, model.cfg.image_size, limit=EXPORT_TEST_SAMPLES, report=skipped)
    run_metrics = Path(checkpoint).with_name("metrics.json")
    trained = json.loads(run_metrics.read_text()) if run_metrics.is_file() else {}
    if len(test) == 0:
        raise ExportError("the test split is empty: nothing to check parity or accuracy on")
    tensors = to_tensors(test, text, labels)
    confidence, fit, _ = fit_confidence(model, spec, labels, text, ood_quantile)
    wrapper = InferenceWrapper(model, OODHead(fit)).eval()
    test_out = Outputs(*_test_outputs(model, tensors))
    probs = softmax(test_out.logits)
    temperature = confidence["calibration"]["temperature"]
    confidence["calibration"]["ece_test_before"] = ece(probs, test_out.targets)
    confidence["calibration"]["ece_test_after"] = ece(softmax(test_out.logits, temperature), test_out.targets)
    confidence["ood"]["flagged"]["test"] = float((fit.distances(test_out.features) > fit.threshold).mean())
    report = classification_report(test_out.targets, probs.argmax(-1), labels)
    return Prepared(model, ckpt, text, labels, sources, test, tensors, skipped, trained, wrapper, fit, confidence, report)


def build_and_verify(p: Prepared, onnx_path: Path) -> dict[str, Any]:
    """torch.onnx.export, onnx.checker (full), then onnxruntime vs torch parity; ExportError past PARITY_ATOL."""
    import onnx

    _onnx_export(p.wrapper, onnx_path, p.model.cfg.image_size)
    onnx.checker.check_model(onnx.load(str(onnx_path)), full_check=True)
    parity = check_parity(p.wrapper, onnx_path, p.test.images[:PARITY_SAMPLES], p.tensors.ids[:PARITY_SAMPLES],
                          p.text.max_len, p.text.vocab_size, ood_scale=p.fit.threshold)
    log.info("parity (max abs diff): %s", parity)
    if parity["max"] > PARITY_ATOL:
        raise ExportError(f"onnxruntime vs torch parity failed: max abs diff {parity['max']:.2e} > {PARITY_ATOL:.0e} ({parity})")
    return parity


def export_artifact(
    checkpoint: str | Path,
    out_dir: str | Path,
    name: str = "image-text-classifier",
    version: str | None = None,
    data: list[str] | None = None,
    ablation: dict[str, Any] | None = None,
    extra_files: list[Path] | None = None,
    ood_quantile: float = OOD_QUANTILE,
    force: bool = True,
) -> dict[str, Any]:
    """prepare (fit + evaluate) -> build and verify (ONNX, checker, parity) -> write (manifest last), atomically."""
    from .data import DataError
    from .evaluate import plot_confusion

    if Path(out_dir).exists() and any(Path(out_dir).iterdir()) and not force:
        raise DataError(f"{out_dir} already holds an artifact; pass --force to replace it, or --out another folder")
    p = prepare(checkpoint, data, ood_quantile)
    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        onnx_path = tmp / "model.onnx"
        parity = build_and_verify(p, onnx_path)
        load_s = _load_seconds(onnx_path)
        p.text.tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "eval_report.json").write_text(jsonsafe.dumps(p.report, indent=2))
        plot_confusion(p.report, tmp / "confusion_matrix.png", f"{name} ({p.model.cfg.mode}) on test")
        for f in extra_files or []:
            shutil.copy(f, tmp / f.name)
        metrics = {p.model.cfg.mode: {"test_acc": p.report["accuracy"], "macro_f1": p.report["macro_f1"], "n_test": p.report["n"]}}
        manifest = build_manifest(p, name, version, {**(ablation or {}), **metrics}, parity)
        manifest.serving = {"model_bytes": onnx_path.stat().st_size, "session_load_s": round(load_s, 3)}
        manifest.files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file() and f.name != MANIFEST}
        written = manifest.to_dict()
        (tmp / MANIFEST).write_text(jsonsafe.dumps(written, indent=2) + "\n")
        write_atomically(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s, test accuracy %.4f, %.1f MB) to %s", name, p.model.cfg.mode, p.report["accuracy"],
             manifest.serving["model_bytes"] / 1e6, out)
    return written


@torch.no_grad()
def _test_outputs(model: FusedClassifier, tensors: Any, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from .tensors import iterate

    logits, features = [], []
    for img, ids, _ in iterate(tensors, batch_size):
        z, _, f = model.forward_all(img, ids, ood=True)
        assert f is not None
        logits.append(z.float().numpy())
        features.append(f.float().numpy())
    return np.concatenate(logits), np.concatenate(features), tensors.targets.numpy()


def _load_seconds(onnx_path: Path) -> float:
    import onnxruntime as ort

    t0 = time.perf_counter()
    ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return time.perf_counter() - t0


def build_manifest(p: Prepared, name: str, version: str | None, metrics: dict[str, Any],
                   parity: dict[str, Any]) -> Manifest:
    """The artifact's contract as one object (``files`` and ``serving`` are filled in once written)."""
    import onnx
    import onnxruntime
    import tokenizers

    model, ckpt, text, labels, sources, trained, test, skipped = (p.model, p.ckpt, p.text, p.labels, p.sources,
                                                                   p.trained, p.test, p.skipped)
    tc, size = ckpt["train_config"], model.cfg.image_size
    backbone = model.cfg.backbone != "none"
    return Manifest.from_dict({
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version or unique_version(model.state_dict()),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": model.cfg.mode,
        "labels": labels,
        "image_size": size,
        "max_len": text.max_len,
        "inputs": [{"name": name, "dtype": dtype, "shape": shape} for (name, dtype), shape
                   in zip(contract.INPUTS, (["batch", size, size, 3], ["batch", "sequence"]), strict=True)],
        "outputs": [{"name": name, "dtype": dtype, "shape": shape} for (name, dtype), shape
                    in zip(contract.OUTPUTS, (["batch", len(labels)], ["batch", "sequence"], ["batch"]), strict=True)],
        "model_file": "model.onnx",
        "tokenizer_file": "tokenizer.json",
        "opset": OPSET,
        "preprocessing": {"image": "classifier_core.images.load_image (RGB, alpha on white, EXIF, bilinear resize)",
                          "pixel_scaling": "in graph",
                          **({"mean_px": [127.0] * 3, "std_px": [128.0] * 3} if backbone
                             else {"mean": list(model.cfg.mean), "std": list(model.cfg.std)}),
                          "text": (f"{ckpt['extra']['text_encoder']['name']}'s WordPiece tokenizer (BERT normaliser: "
                                   "lowercase; [CLS] pieces [SEP], cut to max_len)" if ckpt["extra"].get("text_encoder")
                                   else "NFKC + lowercase, whitespace/punctuation split, WordLevel"),
                          "pad_id": text.pad_id, "unk_id": text.unk_id, "empty_id": text.empty_id},
        "data": {"sources": [display_source(s) for s in sources], "seed": tc["seed"], "label_key": tc["label_key"],
                 "image_key": tc.get("image_key", "image"), "caption_key": tc.get("caption_key", "caption"),
                 "delimiter": tc.get("delimiter"),
                 "group_key": tc.get("group_key"), "duplicates_across_splits": trained.get("duplicates_across_splits"),
                 "val_frac": tc["val_frac"], "test_frac": tc["test_frac"],
                 "n": {s: trained.get(f"n_{s}") for s in ("train", "val", "test")}, "test_checked": len(test),
                 # the demo page's placeholder: a caption of this model's own data, not the built-in one's
                 "example_caption": next((c for c in test.captions if c.strip()), ""),
                 "skipped": trained.get("skipped", skipped.to_dict()), "dataset": _dataset_info(sources)},
        "metrics": metrics,
        "parity": parity,
        "training": {"best_epoch": ckpt["extra"].get("epoch"), "val_acc": ckpt["extra"].get("val_acc"),
                     "model_config": ckpt["model_config"], "optimizer": "Adam", "lr": tc["lr"],
                     "batch_size": tc["batch_size"]},
        "libraries": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                      "tokenizers": tokenizers.__version__, "numpy": np.__version__, "python": platform.python_version()},
        **p.confidence,
        "backbone": _backbone_entry(ckpt, size) or {},
        "text_encoder": ckpt["extra"].get("text_encoder") or {},
        "files": {},
    })


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="best.pt of a training run")
    p.add_argument("--out", default="exported_models/custom",
                   help="artifact folder; an existing one is replaced only with --force (default: exported_models/custom)")
    p.add_argument("--name", default=None, help="the model's name, as clients and /v2/models/<name> see it "
                   "(default: the --out folder's name)")
    p.add_argument("--version", default=None, help="(default: today's date and a digest of the weights, e.g. 2026.12.02-1a2b3c4d)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder at --out")
    p.add_argument("--data", default=None, help="data sources, comma separated (default: the training run's)")
    p.add_argument("--ablation", default=None, help="ablation.json from 'ablate', recorded in the manifest")
    p.add_argument("--ood-quantile", type=float, default=OOD_QUANTILE,
                   help=f"the out-of-distribution threshold: this quantile of the validation split's scores (default: {OOD_QUANTILE})")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    ablation = json.loads(Path(a.ablation).read_text())["test_metrics"] if a.ablation else None
    name = a.name or Path(a.out).resolve().name
    manifest = export_artifact(a.checkpoint, a.out, name, a.version, a.data.split(",") if a.data else None, ablation,
                               ood_quantile=a.ood_quantile, force=a.force)
    cal = manifest["calibration"]
    print(f"exported to {a.out}: parity max abs diff {manifest['parity']['max']:.2e}, metrics {jsonsafe.dumps(manifest['metrics'])}, "  # noqa: T201
          f"temperature {cal['temperature']:.3f} (ECE on test {cal['ece_test_before']:.3f} -> {cal['ece_test_after']:.3f}), "
          f"OOD flags {100 * manifest['ood']['flagged']['test']:.1f} % of test, model {manifest['serving']['model_bytes'] / 1e6:.1f} MB")
    return manifest
