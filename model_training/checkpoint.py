"""Checkpoints: what ``train`` writes and ``evaluate``, ``export`` and resuming read.

A checkpoint is a plain dict saved with ``torch.save`` and read with ``weights_only=True``
(no pickled code): model config and weights, labels, the tokenizer, the resolved training
config, ``extra`` (epoch, validation accuracy...) and, in ``last.pt``, the optimizer state.
Writes are atomic (a temporary file renamed into place), so a run killed mid-save never
leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from classifier_core.text import TextEncoder

from .config import TrainConfig, config_to_dict
from .model import FusedClassifier, ModelConfig, build_model


def save_checkpoint(path: Path, model: FusedClassifier, labels: list[str], text: TextEncoder, cfg: TrainConfig,
                    extra: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    rng: torch.Tensor | None = None) -> None:
    state: dict[str, Any] = {
        "model_config": model.cfg.to_dict(),
        "state_dict": model.state_dict(),
        "labels": labels,
        "max_len": cfg.max_len,
        "tokenizer": text.tokenizer.to_str(),  # type: ignore[attr-defined]
        "train_config": config_to_dict(cfg),
        "extra": extra,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if rng is not None:
        state["torch_rng"] = rng
    write_checkpoint(path, state)


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


REQUIRED = ("model_config", "state_dict", "labels", "tokenizer", "train_config")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (tensors on the CPU). A path that is not a checkpoint is a DataError
    saying what to pass instead (the command ends with that one line), never a traceback."""
    from .data import DataError

    p = Path(path)
    if p.is_dir():
        if (p / "best.pt").is_file():
            raise DataError(f"{p} is a run folder: pass {p / 'best.pt'}")
        if (p / "manifest.json").is_file():
            raise DataError(f"{p} is an exported model, not a checkpoint: pass the run's best.pt")
        raise DataError(f"{p} is a folder, not a checkpoint (RUN/best.pt, written by train)")
    if not p.is_file():
        hint = "run `python -m model_training train` first (it writes RUN/best.pt)"
        raise DataError(f"{p}: no such checkpoint; {hint}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a zip, not a pickle, pickled code: torch raises many types
        raise DataError(f"{p}: not a checkpoint (RUN/best.pt, written by train): {type(exc).__name__}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise DataError(f"{p}: a torch file, but not a checkpoint written by train (no model config, weights and labels)")
    return dict(ckpt)


def load_checkpoint(path: str | Path) -> tuple[FusedClassifier, dict[str, Any]]:
    """The model in eval mode, and the checkpoint dict it came from."""
    ckpt = read_checkpoint(path)
    model = build_model(ModelConfig(**dict(ckpt["model_config"])))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def text_encoder_from_checkpoint(ckpt: dict[str, Any]) -> TextEncoder:
    from tokenizers import Tokenizer

    return TextEncoder(Tokenizer.from_str(ckpt["tokenizer"]), int(ckpt["max_len"]))
