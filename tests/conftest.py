"""Session fixtures: a real tiny dataset, a real one-epoch model and its real ONNX artifact."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "exported_models" / "default"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_training.synthetic import GeneratorConfig, write_shards

    out = tmp_path_factory.mktemp("tiny_data")
    write_shards(GeneratorConfig(seed=3, num_samples=480, shard_size=200, max_canvas=96), out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_training import train

    run = tmp_path_factory.mktemp("tiny_run")
    train.main(["--preset", "smoke", "--data", str(tiny_data), "--out-dir", str(run), "--max-len", "12",
                "--model.image-size", "32", "--threads", "2"])
    return run


@pytest.fixture(scope="session")
def tiny_artifact(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_training.export import export_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_artifact(tiny_run / "best.pt", out, name="tiny", version="0.0.1")
    return out


def jpeg_bytes(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 30, 30), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (40, 40), mode: str = "RGB", colour: object = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def synthetic_samples(n: int, seed: int = 11) -> list[tuple[bytes, str, str]]:
    """Real generated (jpeg, caption, label) triples, distinct images and caption lengths."""
    from model_training.synthetic import GeneratorConfig, generate

    return [(jpg, cap, meta["label"]) for _, jpg, cap, meta in generate(GeneratorConfig(seed=seed, num_samples=n))]  # type: ignore[misc]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def rng_image(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
