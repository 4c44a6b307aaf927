"""The LitServe peer: the same artifact, preprocessing and tokenizer behind LitServe's own batching.

Run in a venv of its own (LitServe is not a project dependency):

    python3 -m venv /tmp/lsvenv && /tmp/lsvenv/bin/pip install litserve onnxruntime numpy pillow tokenizers python-multipart
    PYTHONPATH=. /tmp/lsvenv/bin/python -m benchmarks.peer_litserve --model-dir DIR --port 8003 --workers 2

``POST /classify`` takes the same multipart form as the service (image, description) and answers
label, confidence and the top 3, so ``benchmarks.loadgen`` drives it unchanged. Batches of up to 32
rows with a 5 ms window (LitServe's ``max_batch_size``/``batch_timeout``), one onnxruntime session
per worker process, one onnxruntime thread each (as the service's workers).
"""

import argparse
from pathlib import Path
from typing import Any

import litserve as ls  # its own venv (above): not a project dependency
import numpy as np
from fastapi import Request


class ClassifierAPI(ls.LitAPI):  # type: ignore[misc]
    """Module level: LitServe pickles the API into its worker processes."""

    def __init__(self, model_dir: Path, batch: int, window_s: float) -> None:
        super().__init__(max_batch_size=batch, batch_timeout=window_s, api_path="/classify")
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        import onnxruntime as ort

        from classifier_core.artifact import load_manifest
        from classifier_core.text import TextEncoder

        self.manifest = load_manifest(self.model_dir)
        self.text = TextEncoder.from_file(self.model_dir / self.manifest.tokenizer_file, self.manifest.max_len)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.model_dir / self.manifest.model_file), so, providers=["CPUExecutionProvider"])

    # LitServe reads this parameter's name and type (no postponed annotations in this file): a Request
    # gets the parsed multipart form
    def decode_request(self, request: Request) -> tuple[np.ndarray, str]:
        from classifier_core.images import load_image

        form: Any = request  # LitServe passes the form, not the Request, for multipart bodies
        upload = form["image"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        return load_image(data, self.manifest.image_size), str(form.get("description", ""))

    def batch(self, inputs: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
        return np.stack([i for i, _ in inputs]), [c for _, c in inputs]

    def predict(self, x: tuple[np.ndarray, list[str]]) -> np.ndarray:
        images, captions = x
        ids = self.text.pad(self.text.encode_batch(captions))
        return self.session.run(["probabilities"], {"image": images, "input_ids": ids})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probs: np.ndarray) -> dict[str, Any]:
        order = np.argsort(-probs)[:3]
        labels = self.manifest.labels
        return {"label": labels[int(order[0])], "confidence": float(probs[order[0]]),
                "predictions": [{"label": labels[int(i)], "score": float(probs[i])} for i in order]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=8003)
    p.add_argument("--workers", type=int, default=2, help="LitServe API server processes (default: 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window-ms", type=float, default=5.0)
    a = p.parse_args(argv)
    server = ls.LitServer(ClassifierAPI(a.model_dir, a.batch, a.window_ms / 1000), accelerator="cpu",
                          workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=a.port, num_api_servers=a.workers, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
