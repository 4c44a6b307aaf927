"""INT8 or not: onnxruntime static quantization of an artifact, its accuracy and speed beside the float model's.

    python -m benchmarks.int8_check exported_models/mine --data my_pairs.csv --out benchmarks/results/int8.json

Static quantization (QDQ, per-channel weights) of the convolutions and matrix products only (the
LSTM and the OOD head stay float), calibrated on the artifact's own validation split (up to 256 rows,
through the service's preprocessing); then the test split's accuracy through both models, and
onnxruntime rows/s at batch 32 on this machine. The rule the project keeps: an INT8 artifact is
offered only if its test accuracy stays within 1 point of the float model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _rows(model_dir: Path, data: list[str], split: str, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from classifier_core.artifact import load_manifest
    from classifier_core.text import TextEncoder
    from model_training.data import DataSpec
    from model_training.stream import collect

    m = load_manifest(model_dir)
    d = m.data
    spec = DataSpec(data, int(d.get("seed", 0)), d.get("label_key", "label"), None, d.get("val_frac", 0.1),
                    d.get("test_frac", 0.1), d.get("group_key"))
    c = collect(spec, split, m.labels, m.image_size, limit=limit)
    text = TextEncoder.from_file(model_dir / m.tokenizer_file, m.max_len)
    ids = text.pad(text.encode_batch(c.captions), m.max_len)
    index = {lab: i for i, lab in enumerate(m.labels)}
    return c.images, ids, np.array([index[x] for x in c.labels])


def _accuracy_and_speed(path: Path, images: np.ndarray, ids: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(["probabilities"], {"image": images[s : s + 64], "input_ids": ids[s : s + 64]})[0].argmax(1)
                            for s in range(0, len(ids), 64)])
    batch = {"image": images[:32], "input_ids": ids[:32]}
    sess.run(None, batch)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3:
        sess.run(None, batch)
        n += len(batch["image"])
    return {"test_acc": float((preds == targets).mean()), "rows_per_s_batch32": n / (time.perf_counter() - t0),
            "bytes": path.stat().st_size}


def check(model_dir: Path, data: list[str]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    cal_images, cal_ids, _ = _rows(model_dir, data, "val", 256)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"image": cal_images[s : s + 16], "input_ids": cal_ids[s : s + 16]}
                                 for s in range(0, len(cal_ids), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = Path(tempfile.mkdtemp()) / "model.int8.onnx"
    quantize_static(str(model_dir / "model.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    images, ids, targets = _rows(model_dir, data, "test", 4096)
    fp32 = _accuracy_and_speed(model_dir / "model.onnx", images, ids, targets)
    int8 = _accuracy_and_speed(out, images, ids, targets)
    drop = fp32["test_acc"] - int8["test_acc"]
    return {"float32": fp32, "int8": int8, "accuracy_drop_points": 100 * drop, "offer_int8": drop <= 0.01,
            "speedup": int8["rows_per_s_batch32"] / fp32["rows_per_s_batch32"], "n_test": len(targets),
            "calibration_rows": len(cal_ids)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--data", required=True, help="the artifact's training data (comma separated)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    result = check(a.model_dir, a.data.split(","))
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    result["command"] = "python -m benchmarks.int8_check " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(result, indent=2))  # noqa: T201
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
