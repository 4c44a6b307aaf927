"""The baseline a user would write: plain FastAPI, one ``session.run`` per request, decoding in the handler.

Same model, same preprocessing, no batching, no limits. Used by ``benchmarks.bench`` only.

    python -m benchmarks.bench_plain --port 8001 --model-dir exported_models/default
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Form, UploadFile

from classifier_core.artifact import load_manifest
from classifier_core.images import load_image
from classifier_core.text import TextEncoder


def create_plain_app(model_dir: str | Path) -> FastAPI:
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    text = TextEncoder.from_file(model_dir / manifest.tokenizer_file, manifest.max_len)
    session = ort.InferenceSession(str(model_dir / manifest.model_file), providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/classify")
    def classify(image: UploadFile = File(...), description: str = Form("")) -> dict[str, Any]:
        # a sync handler: FastAPI runs it in its thread pool, as a plain service would
        arr = load_image(image.file.read(), manifest.image_size)
        ids = text.pad([text.encode(description)])
        probs = session.run(["probabilities"], {"image": arr[None], "input_ids": ids})[0][0]
        order = np.argsort(-probs)[:3]
        return {"label": manifest.labels[int(order[0])], "confidence": float(probs[order[0]]),
                "predictions": [{"label": manifest.labels[int(i)], "score": float(probs[i])} for i in order]}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_plain", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--model-dir", default="exported_models/default")
    a = ap.parse_args(argv)
    uvicorn.run(create_plain_app(a.model_dir), host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
