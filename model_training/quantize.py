"""INT8: a second artifact whose pretrained image backbone runs in 8-bit integers, written only if it
answers as the float artifact does.

    python -m model_training quantize exported_models/mine --out exported_models/mine-int8

The recipe (why each part: docs/performance.md, "INT8"): onnxruntime static quantization, QDQ format,
int8 weights per output channel in a 7-bit range (no saturation on CPUs without VNNI), uint8
activations with MinMax ranges measured on **training** rows
(``--calibration-rows``, through the service's own preprocessing and tokenizer), of the backbone's
convolutions **and their ReLU6** (a Clip left out of the quantized set makes onnxruntime quantize the
convolution's output before the clip, wasting most of the 256 levels on values the clip removes).
A pretrained caption encoder (MiniLM) gets dynamic int8 of its weight MatMuls (``--no-text-encoder``
leaves it float). What stays float: the stem convolution (it reads the raw pixels; quantized, it moved the
activation statistics enough to flag most inputs out-of-distribution), the caption branch, the head
and the out-of-distribution head (its Mahalanobis distance amplifies any error). ``--keep-float``
leaves more of the backbone float where an artifact fails the gate (the projection convolutions of
the first blocks were the most sensitive in our measurements).

The gate: the quantized graph's accuracy on the validation and on the test split (every row the
export reads, up to 4,096 each) may fall by at most ``--max-drop`` (0.5 point) from the float
graph's on the same rows, and the share it flags out-of-distribution may rise by at most 1 point;
otherwise nothing is written and the command fails with the figures. The manifest of the written
artifact records both graphs' figures under ``quantization``; the service shows them in ``/model``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier_core import contract
from classifier_core.artifact import MANIFEST, Manifest, load_manifest, sha256_file

from .data import DataError, DataSpec

log = logging.getLogger(__name__)


class QuantizeError(RuntimeError):
    """The quantized graph failed the accuracy gate (or could not be built): nothing was written."""


@dataclass
class QuantizeConfig:
    calibration_rows: int = 512  # training rows whose activation ranges set the int8 scales
    max_drop: float = 0.005  # accuracy on val and on test may fall by at most this (0.5 point)
    max_flag_rise: float = 0.01  # the share flagged out-of-distribution may rise by at most this (1 point)
    eval_rows: int = 4096  # rows of each of val and test compared (as export's report)
    text_encoder: bool = True  # a pretrained caption encoder (MiniLM): dynamic int8 of its weight MatMuls too
    # backbone convolutions left float, by role (stem, project, expand, depthwise, head) and, for
    # blocks, the last block index it applies to: "project<8" = projections of blocks 0-7
    keep_float: tuple[str, ...] = ("stem",)
    threads: int = 0  # onnxruntime threads for calibration and evaluation; 0 = all cores


ROLES = {"_conv_stem": "stem", "_expand_conv": "expand", "_depthwise_conv": "depthwise", "_project_conv": "project",
         "_conv_head": "head"}


def conv_role(name: str) -> tuple[str, int | None] | None:
    """(role, block index) of a backbone convolution node of our export, None for any other node (the
    scope is ``/image_encoder/...`` or, where the probe head reads the pooled features, the backbone's own)."""
    block = re.search(r"/_blocks\.(\d+)/", name)
    for key, role in ROLES.items():
        if f"/{key}/" in name:
            return role, int(block.group(1)) if block else None
    return None


def _kept(role: str, block: int | None, keep: tuple[str, ...]) -> bool:
    for rule in keep:
        r, _, upto = rule.partition("<")
        if r == role and (not upto or (block is not None and block < int(upto))):
            return True
    return False


def encoder_matmuls(model_path: Path) -> list[str]:
    """The pretrained caption encoder's weight products (MiniLM's query, key, value, output and
    feed-forward MatMuls: an initializer on one side); none for the paper's caption branch."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.name.startswith("/text_encoder/encoder/")
            and any(i in weights for i in n.input)]


def quantize_encoder(path: Path, nodes: list[str]) -> None:
    """Dynamic int8 of the caption encoder's weight products, in place (the usual recipe for a BERT:
    int8 weights, activations quantized per call from their own range, so no calibration)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.name + ".dyn")
    quantize_dynamic(str(path), str(tmp), op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                     weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    os.replace(tmp, path)


def plan(model_path: Path, keep_float: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(nodes to quantize, backbone convolutions kept float): the backbone's convolutions and the
    Clip/Relu that follow each quantized one."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantize, kept = [], []
    for n in graph.node:
        role = conv_role(n.name) if n.op_type == "Conv" else None
        if role is None:
            continue
        if _kept(*role, keep_float):
            kept.append(n.name)
            continue
        quantize.append(n.name)
        quantize += [c.name for c in consumers.get(n.output[0], []) if c.op_type in ("Clip", "Relu")]
    if not quantize:
        raise QuantizeError(f"{model_path}: no pretrained backbone convolution to quantize (only artifacts trained "
                            "with --model.backbone are quantized: the paper's small CNN is fast in float already)")
    return quantize, kept


@dataclass
class Rows:
    images: np.ndarray
    ids: np.ndarray
    targets: np.ndarray


def read_rows(model_dir: Path, m: Manifest, split: str, limit: int, data: list[str] | None = None) -> Rows:
    """Up to ``limit`` rows of one split of the artifact's data, as the service reads them."""
    from classifier_core.text import TextEncoder

    from .stream import collect

    d = m.data
    sources = data or [str(s) for s in d.get("sources", [])]
    if not sources:
        raise DataError(f"{model_dir}: the manifest names no training data: pass --data")
    spec = DataSpec(sources, int(d.get("seed", 0)), d.get("label_key", "label"), None, float(d.get("val_frac", 0.1)),
                    float(d.get("test_frac", 0.1)), d.get("group_key"), image_key=d.get("image_key", "image"),
                    caption_key=d.get("caption_key", "caption"), delimiter=d.get("delimiter"))
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise DataError(f"{model_dir}: its data {', '.join(missing)} is not found from here (the manifest keeps names, "
                        "not a training machine's paths): pass --data with the files or folders it was trained on")
    c = collect(spec, split, m.labels, m.image_size, limit=limit)
    text = TextEncoder.from_file(model_dir / m.tokenizer_file, m.max_len)
    index = {label: i for i, label in enumerate(m.labels)}
    return Rows(c.images, text.pad(text.encode_batch(c.captions), m.max_len), np.array([index[x] for x in c.labels], np.int64))


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or (os.cpu_count() or 1)
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def outputs(path: Path, rows: Rows, threads: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and (if the graph has it) the OOD score of every row."""
    from classifier_core import contract

    sess = _session(path, threads)
    names = [o.name for o in sess.get_outputs()]
    probs, ood = [], []
    for s in range(0, len(rows.targets), 64):
        out = dict(zip(names, sess.run(None, contract.feeds(rows.images[s : s + 64], rows.ids[s : s + 64])), strict=True))
        probs.append(out[contract.PROBABILITIES])
        if contract.OOD_SCORE in out:
            ood.append(out[contract.OOD_SCORE])
    return np.concatenate(probs), (np.concatenate(ood) if ood else None)


def quantize_graph(src: Path, dst: Path, calibration: Rows, nodes: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([contract.feeds(calibration.images[s : s + 32], calibration.ids[s : s + 32])
                                 for s in range(0, len(calibration.targets), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    # reduce_range: 7-bit weights. On x86 CPUs without AVX-512 VNNI (AVX2: this AMD EPYC) onnxruntime's
    # uint8 x int8 kernels add pairs of products in int16 and saturate; 7-bit weights cannot (changed
    # answers 9.1 % -> 5.8 % on the pretrained artifact of docs/performance.md); on VNNI it costs little
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["Conv", "Clip", "Relu"], nodes_to_quantize=nodes,
                    calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"])


def matched_threshold(float_scores: np.ndarray, int8_scores: np.ndarray, threshold: float) -> float:
    """The int8 graph's OOD threshold: its validation score at the rank where the float threshold sits.

    The OOD score is a Mahalanobis distance of the backbone's activation statistics, fitted on float
    activations; int8 activations move every distance a little, so the float threshold would flag
    more in-domain inputs (a 53-row validation split: 5.7 % -> 11.3 %). Matching the rank keeps the
    in-domain share the float model was given; the test split then checks it on rows the match never saw."""
    if len(float_scores) == 0:
        return threshold
    share = float((float_scores > threshold).mean())
    if share == 0.0:  # nothing flagged: a threshold above every int8 score too, as far above as the float one
        return float(max(threshold, int8_scores.max() * threshold / max(float(float_scores.max()), 1e-12)))
    return float(np.quantile(int8_scores, 1.0 - share, method="higher"))


def compare(float_path: Path, int8_path: Path, splits: dict[str, Rows], threshold: float | None,
            threads: int) -> dict[str, Any]:
    """Accuracy, OOD-flagged share and changed answers of both graphs on each split; with an OOD
    threshold, the int8 graph's (``matched_threshold`` on the validation split) under ``ood_threshold``."""
    out: dict[str, Any] = {}
    runs = {split: (outputs(float_path, rows, threads), outputs(int8_path, rows, threads)) for split, rows in splits.items()}
    int8_threshold = threshold
    if threshold is not None and "val" in runs and runs["val"][0][1] is not None and runs["val"][1][1] is not None:
        int8_threshold = matched_threshold(runs["val"][0][1], runs["val"][1][1], threshold)  # type: ignore[arg-type]
        out["ood_threshold"] = {"float": threshold, "int8": int8_threshold}
    for split, rows in splits.items():
        (fp, fo), (qp, qo) = runs[split]
        y = rows.targets
        entry: dict[str, Any] = {"rows": len(y), "accuracy": {"float": float((fp.argmax(1) == y).mean()) if len(y) else None,
                                                               "int8": float((qp.argmax(1) == y).mean()) if len(y) else None},
                                 "answers_changed": float((fp.argmax(1) != qp.argmax(1)).mean()) if len(y) else 0.0,
                                 "max_abs_prob_diff": float(np.abs(fp - qp).max()) if len(y) else 0.0}
        if threshold is not None and int8_threshold is not None and fo is not None and qo is not None and len(y):
            entry["ood_flagged"] = {"float": float((fo > threshold).mean()), "int8": float((qo > int8_threshold).mean())}
        out[split] = entry
    return out


def gate(figures: dict[str, Any], cfg: QuantizeConfig) -> list[str]:
    """What fails the gate, one line each (empty: it passes)."""
    failures = []
    for split, f in figures.items():
        if split not in ("val", "test"):
            continue
        acc = f["accuracy"]
        if acc["float"] is None:
            failures.append(f"{split}: no rows to compare (the gate needs the artifact's {split} split)")
            continue
        drop = acc["float"] - acc["int8"]
        if drop > cfg.max_drop + 1e-12:
            failures.append(f"{split} accuracy {acc['float']:.4f} -> {acc['int8']:.4f} ({100 * drop:.2f} points lost, "
                            f"{100 * cfg.max_drop:.2f} allowed; {100 * f['answers_changed']:.1f} % of answers changed)")
        flags = f.get("ood_flagged")
        if flags and flags["int8"] - flags["float"] > cfg.max_flag_rise + 1e-12:
            failures.append(f"{split} flagged out-of-distribution {100 * flags['float']:.1f} % -> {100 * flags['int8']:.1f} % "
                            f"(at most +{100 * cfg.max_flag_rise:.1f} points allowed)")
    return failures


def quantize_artifact(src: str | Path, out: str | Path, cfg: QuantizeConfig | None = None, data: list[str] | None = None,
                      version: str | None = None, force: bool = False) -> dict[str, Any]:
    """Quantize ``src``'s backbone, gate it, and write the artifact folder ``out``; returns its manifest."""
    cfg = cfg or QuantizeConfig()
    src, out = Path(src), Path(out)
    m = load_manifest(src)
    if m.quantization:
        raise QuantizeError(f"{src} is quantized already")
    if out.exists() and not force:
        raise DataError(f"{out} exists: pass --force to replace it")
    if out.resolve() == src.resolve():
        raise DataError("--out must be a new folder: the float artifact stays as it is")
    nodes, kept = plan(src / m.model_file, cfg.keep_float)
    t0 = time.time()
    calibration = read_rows(src, m, "train", cfg.calibration_rows, data)
    if len(calibration.targets) == 0:
        raise DataError(f"{src}: no training rows found to calibrate on (is the data where the manifest says? pass --data)")
    splits = {s: read_rows(src, m, s, cfg.eval_rows, data) for s in ("val", "test")}
    tmp = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out.parent if out.parent.exists() else None))
    try:
        for f in m.files:
            if f not in ("eval_report.json", "confusion_matrix.png"):  # the float model's evaluation, not this one's
                shutil.copy2(src / f, tmp / f)
        quantize_graph(src / m.model_file, tmp / m.model_file, calibration, nodes)
        encoder = encoder_matmuls(src / m.model_file) if cfg.text_encoder else []
        if encoder:
            quantize_encoder(tmp / m.model_file, encoder)
        figures = compare(src / m.model_file, tmp / m.model_file, splits, m.ood_threshold, cfg.threads)
        failures = gate(figures, cfg)
        if failures:
            raise QuantizeError("the int8 graph does not answer as the float one does, nothing written: " + "; ".join(failures))
        manifest = _manifest(m, src, tmp, cfg, nodes + encoder, kept, len(calibration.targets), figures, version,
                             time.time() - t0)
        from .export import write_atomically

        write_atomically(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(m: Manifest, src: Path, folder: Path, cfg: QuantizeConfig, nodes: list[str], kept: list[str], calibrated: int,
              figures: dict[str, Any], version: str | None, seconds: float) -> dict[str, Any]:
    import onnxruntime

    from .export import _load_seconds

    d = m.to_dict()
    d["version"] = version or f"{m.version}-int8"
    d["files"] = {f: sha256_file(folder / f) for f in sorted(os.listdir(folder)) if (folder / f).is_file()}
    d["quantization"] = {
        "type": "int8", "method": "onnxruntime static, QDQ, int8 weights per channel (7-bit range), uint8 activations (MinMax)"
                                  + ("; caption encoder: dynamic int8 MatMuls" if any("/text_encoder/" in n for n in nodes) else ""),
        "calibration": {"split": "train", "rows": calibrated}, "quantized_nodes": len(nodes),
        "float_convolutions": len(kept), "config": asdict(cfg), "source": {"version": m.version, "model_sha256": m.files[m.model_file]},
        "gate": {"max_drop": cfg.max_drop, "max_flag_rise": cfg.max_flag_rise}, "figures": figures,
        "onnxruntime": onnxruntime.__version__, "seconds": round(seconds, 1)}
    if "ood_threshold" in figures:
        d["ood"] = {**d["ood"], "threshold": figures["ood_threshold"]["int8"], "threshold_float": figures["ood_threshold"]["float"],
                    "threshold_int8": "the float threshold's rank among the validation split's scores, on the int8 graph's scores",
                    "flagged": {s: figures[s]["ood_flagged"]["int8"] for s in ("val", "test") if "ood_flagged" in figures.get(s, {})}}
    test = figures.get("test", {})
    if test.get("accuracy", {}).get("int8") is not None:  # the metrics describe this graph, not the float one
        d["metrics"] = {m.mode: {"test_acc": test["accuracy"]["int8"], "n_test": test["rows"],
                                 "float_test_acc": test["accuracy"]["float"]}}
    d["serving"] = {"model_bytes": (folder / m.model_file).stat().st_size,
                    "session_load_s": round(_load_seconds(folder / m.model_file), 3)}
    (folder / MANIFEST).write_text(json.dumps(d, indent=2) + "\n")
    return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model_training quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an exported artifact folder with a pretrained backbone")
    p.add_argument("--out", required=True, help="the quantized artifact's folder (a new one; --force replaces it)")
    p.add_argument("--data", default=None, help="the artifact's training data, comma separated (default: as its manifest names it)")
    p.add_argument("--version", default=None, help="(default: the float artifact's version + '-int8')")
    p.add_argument("--calibration-rows", type=int, default=QuantizeConfig.calibration_rows,
                   help=f"training rows the activation ranges come from (default: {QuantizeConfig.calibration_rows})")
    p.add_argument("--max-drop", type=float, default=QuantizeConfig.max_drop,
                   help=f"accuracy the quantized graph may lose on val and on test (default: {QuantizeConfig.max_drop}, 0.5 point)")
    p.add_argument("--keep-float", default=",".join(QuantizeConfig.keep_float),
                   help="backbone convolutions left float, by role: stem, expand, depthwise, project, head, optionally "
                        f"'<N' for blocks below N (default: {','.join(QuantizeConfig.keep_float)})")
    p.add_argument("--no-text-encoder", action="store_true", help="leave a MiniLM caption encoder float")
    p.add_argument("--force", action="store_true", help="replace an existing folder at --out")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    cfg = QuantizeConfig(calibration_rows=a.calibration_rows, max_drop=a.max_drop,
                         keep_float=tuple(x for x in a.keep_float.split(",") if x), text_encoder=not a.no_text_encoder)
    manifest = quantize_artifact(a.artifact, a.out, cfg, a.data.split(",") if a.data else None, a.version, a.force)
    q = manifest["quantization"]
    lines = [f"{s}: accuracy {f['accuracy']['float']:.4f} (float) -> {f['accuracy']['int8']:.4f} (int8), "
             f"{100 * f['answers_changed']:.1f} % of answers changed, n={f['rows']}" for s, f in q["figures"].items()
             if s in ("val", "test")]
    print(f"quantized to {a.out} (version {manifest['version']}, model {manifest['serving']['model_bytes'] / 1e6:.1f} MB):\n  "  # noqa: T201
          + "\n  ".join(lines))
    return manifest
