"""Why INT8 lost accuracy, and what keeps it: a sweep of static-quantization recipes on one artifact.

    python -m benchmarks.int8_check ARTIFACT --data DATA --out benchmarks/results/int8_sweep_cpu.json

Each recipe quantizes the artifact's graph (onnxruntime ``quantize_static``), then both graphs answer
the same validation + test rows (through the service's preprocessing and tokenizer,
``model_training.quantize.read_rows``): accuracy, the share of answers that changed, the largest
probability difference, the share flagged out-of-distribution at the float threshold, and model-only
rows/s at batch 1 and 32 (2 onnxruntime threads, medians of 3 interleaved 2-second runs).
``model_training.quantize`` (``itc quantize``) is the recipe this sweep chose; it adds the accuracy
gate and a rank-matched OOD threshold.
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


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16") if f in flags)


def recipes(model: Path) -> dict[str, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod

    from model_training.quantize import plan

    backbone, _ = plan(model, ())
    no_stem, _ = plan(model, ("stem",))
    return {
        "A: issue's recipe (Conv/MatMul/Gemm everywhere, 256 val rows)": {"ops": ["Conv", "MatMul", "Gemm"], "split": "val", "rows": 256},
        "B: backbone convolutions only": {"ops": ["Conv"], "nodes": [n for n in backbone if "Conv" in n]},
        "C: + their ReLU6 (Clip)": {"ops": ["Conv", "Clip", "Relu"], "nodes": backbone},
        "D: + stem left float": {"ops": ["Conv", "Clip", "Relu"], "nodes": no_stem},
        "E: D, percentile calibration": {"ops": ["Conv", "Clip", "Relu"], "nodes": no_stem, "method": CalibrationMethod.Percentile},
        "F: D, 7-bit weights (reduce_range)": {"ops": ["Conv", "Clip", "Relu"], "nodes": no_stem, "reduce_range": True},
        "G: C, 7-bit weights (stem quantized)": {"ops": ["Conv", "Clip", "Relu"], "nodes": backbone, "reduce_range": True},
    }


def speed(path: Path, image_size: int) -> dict[int, list[float]]:
    from model_training.quantize import _session

    sess = _session(path, 2)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, image_size, image_size, 3), dtype=np.uint8)
    ids = rng.integers(2, 6, (32, 16)).astype(np.int64)
    out: dict[int, list[float]] = {}
    for b in (1, 32):
        feed = {"image": img[:b], "input_ids": ids[:b]}
        sess.run(None, feed)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            sess.run(None, feed)
            n += b
        out.setdefault(b, []).append(n / (time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from classifier_core.artifact import load_manifest
    from model_training import quantize as q

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--data", required=True, help="the artifact's data (comma separated)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    m = load_manifest(a.artifact)
    data = a.data.split(",")
    model = a.artifact / m.model_file
    rows = {s: q.read_rows(a.artifact, m, s, 4096 if s != "train" else 512, data) for s in ("train", "val", "test")}
    ev = q.Rows(*(np.concatenate([getattr(rows["val"], k), getattr(rows["test"], k)]) for k in ("images", "ids", "targets")))
    fp, fo = q.outputs(model, ev, 2)
    thr = m.ood_threshold
    work = Path(tempfile.mkdtemp(prefix="int8-sweep-"))
    paths = {"float32": model}
    results: dict[str, Any] = {}
    for name, r in recipes(model).items():
        cal = rows[r.get("split", "train")]
        cal = q.Rows(cal.images[: r.get("rows", 512)], cal.ids[: r.get("rows", 512)], cal.targets[: r.get("rows", 512)])

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self, c: q.Rows = cal) -> None:
                self.it = iter([{"image": c.images[s : s + 32], "input_ids": c.ids[s : s + 32]} for s in range(0, len(c.targets), 32)])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        out = work / f"{name[0]}.onnx"
        quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=r.get("reduce_range", False), weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=r["ops"], nodes_to_quantize=r.get("nodes"),
                        calibrate_method=r.get("method", CalibrationMethod.MinMax))
        qp, qo = q.outputs(out, ev, 2)
        results[name] = {"accuracy": float((qp.argmax(1) == ev.targets).mean()),
                         "answers_changed": float((qp.argmax(1) != fp.argmax(1)).mean()),
                         "max_abs_prob_diff": float(np.abs(qp - fp).max()),
                         "ood_flagged_at_float_threshold": None if thr is None or qo is None else float((qo > thr).mean()),
                         "bytes": out.stat().st_size}
        paths[name] = out
        print(name, json.dumps(results[name]), flush=True)  # noqa: T201
    rates: dict[str, dict[int, list[float]]] = {k: {} for k in paths}
    for _ in range(3):  # interleaved: every graph once per round
        for k, path in paths.items():
            for b, v in speed(path, m.image_size).items():
                rates[k].setdefault(b, []).extend(v)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, flags: {_cpu_flags()}",
              "command": "python -m benchmarks.int8_check " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": {"val+test": len(ev.targets), "calibration (train)": len(rows["train"].targets)},
              "float32": {"accuracy": float((fp.argmax(1) == ev.targets).mean()),
                          "ood_flagged": None if thr is None or fo is None else float((fo > thr).mean()),
                          "bytes": model.stat().st_size},
              "recipes": results,
              "rows_per_s_median": {k: {str(b): round(float(np.median(v)), 1) for b, v in r.items()} for k, r in rates.items()}}
    print(json.dumps(report, indent=2))  # noqa: T201
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
