"""A training checkpoint rebuilt from an exported artifact, so an older artifact can be exported again.

    python -m model_training.from_artifact exported_models/default --out runs/default/best.pt
    python -m model_training export runs/default/best.pt --out exported_models/default --version 1.1.0

Why: artifacts exported before calibration existed carry no temperature and no
out-of-distribution head. Their weights live in ``model.onnx``; this reads them back into the
model of the manifest's ``training.model_config`` (the ONNX initialisers named after the torch
parameters are taken as they are, the LSTM's are put back from ONNX's gate order i, o, f, c into
torch's i, f, g, o, and the two attention projections exported as MatMul come back transposed),
then checks that the rebuilt torch model gives the ONNX file's outputs on real and random inputs
before anything is written. The weights are the same numbers, so the re-exported model predicts
what the old one did; only what export adds (calibration, OOD score, manifest fields) is new.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier_core import contract
from classifier_core.artifact import load_manifest
from classifier_core.text import TextEncoder

from .checkpoint import save_checkpoint
from .config import TrainConfig
from .model import FusedClassifier, InferenceWrapper, ModelConfig, build_model

MATCH_ATOL = 1e-5


class ArtifactImportError(RuntimeError):
    pass


def _lstm_back(w: np.ndarray) -> np.ndarray:
    """ONNX LSTM gates (i, o, f, c) -> torch's (i, f, g, o), along the first axis of one direction."""
    i, o, f, c = np.split(w, 4, axis=0)
    return np.concatenate([i, f, c, o], axis=0)


def state_dict_from_onnx(model: FusedClassifier, onnx_path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    wanted = {k: v for k, v in model.state_dict().items()}
    for key in list(wanted):
        name = f"model.{key}"
        if name in inits:
            state[key] = torch.from_numpy(inits.pop(name).copy())
    lstm = [n for n in graph.node if n.op_type == "LSTM"]
    if model.cfg.text_encoder != "lstm":
        raise ArtifactImportError(f"{onnx_path}: an artifact with the {model.cfg.text_encoder} caption encoder cannot be "
                                  "turned back into a checkpoint (only the paper's LSTM branch can)")
    if model.text_encoder is not None:
        if len(lstm) != 1:
            raise ArtifactImportError(f"{onnx_path}: expected one LSTM node, found {len(lstm)}")
        w, r, b = (inits.pop(x) for x in lstm[0].input[1:4])
        hidden = r.shape[-1]
        state["text_encoder.lstm.weight_ih_l0"] = torch.from_numpy(_lstm_back(w[0]))
        state["text_encoder.lstm.weight_hh_l0"] = torch.from_numpy(_lstm_back(r[0]))
        state["text_encoder.lstm.bias_ih_l0"] = torch.from_numpy(_lstm_back(b[0, : 4 * hidden]))
        state["text_encoder.lstm.bias_hh_l0"] = torch.from_numpy(_lstm_back(b[0, 4 * hidden :]))
    # what is left was exported as MatMul of the transposed weight: match by shape, uniquely
    for key in sorted(set(wanted) - set(state)):
        shape = tuple(wanted[key].shape)
        candidates = [n for n, a in inits.items() if a.ndim == 2 and tuple(a.T.shape) == shape]
        if len(candidates) != 1:
            raise ArtifactImportError(f"{onnx_path}: cannot tell which initialiser is {key} {shape} ({candidates})")
        state[key] = torch.from_numpy(inits.pop(candidates[0]).T.copy())
    return state


def checkpoint_from_artifact(artifact: str | Path, out: str | Path) -> dict[str, Any]:
    """Rebuild, verify against the ONNX file, write ``out`` (a best.pt export and evaluate read)."""
    import onnxruntime as ort

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    raw = json.loads((artifact / "manifest.json").read_text())
    cfg = ModelConfig(**raw["training"]["model_config"])
    model = build_model(cfg).eval()
    model.load_state_dict(state_dict_from_onnx(model, artifact / manifest.model_file))
    text = TextEncoder.from_file(artifact / manifest.tokenizer_file, manifest.max_len)
    # the rebuilt model must compute what the file computes, on every kind of row
    sess = ort.InferenceSession(str(artifact / manifest.model_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    ids = rng.integers(3, cfg.vocab_size, (16, manifest.max_len)).astype(np.int64)
    ids[8:, 5:] = text.pad_id
    got = sess.run(None, contract.feeds(images, ids))
    with torch.no_grad():
        want = InferenceWrapper(model)(torch.from_numpy(images), torch.from_numpy(ids))
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got[:2], want[:2]))
    if diff > MATCH_ATOL:
        raise ArtifactImportError(f"the rebuilt model differs from {artifact / manifest.model_file} by {diff:.2e}")
    d = raw.get("data", {})
    tc = TrainConfig(data=list(d.get("sources", [])), seed=int(d.get("seed", 0)), label_key=d.get("label_key", "label"),
                     group_key=d.get("group_key"), val_frac=float(d.get("val_frac", 0.1)), test_frac=float(d.get("test_frac", 0.1)),
                     max_len=manifest.max_len, model=cfg)
    training = raw.get("training", {})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, manifest.labels, text, tc, {"epoch": training.get("best_epoch"), "val_acc": training.get("val_acc"),
                                                            "from_artifact": str(artifact), "max_abs_diff": diff})
    metrics = {f"n_{s}": n for s, n in (d.get("n") or {}).items() if s in ("train", "val", "test")}
    metrics["duplicates_across_splits"] = d.get("duplicates_across_splits")
    out.with_name("metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"checkpoint": str(out), "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m model_training.from_artifact", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an exported model folder")
    p.add_argument("--out", required=True, help="the checkpoint to write (best.pt)")
    a = p.parse_args(argv)
    result = checkpoint_from_artifact(a.artifact, a.out)
    print(f"wrote {result['checkpoint']}: the rebuilt model matches the ONNX file to {result['max_abs_diff']:.1e}")  # noqa: T201
    return result


if __name__ == "__main__":
    main()
