"""Session fixtures: a real tiny dataset, a real one-epoch model and its real ONNX artifact."""

from __future__ import annotations

from pathlib import Path

import pytest


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


@pytest.fixture(scope="session")
def tiny_pretrained_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained preset, small: EfficientNet-Lite0 at 32 px, one frozen epoch (cached features)
    and one fine-tuning epoch of the last two blocks."""
    from model_training import train

    run = tmp_path_factory.mktemp("tiny_pretrained_run")
    train.main(["--preset", "pretrained", "--data", str(tiny_data), "--out-dir", str(run), "--max-len", "12",
                "--model.image-size", "32", "--epochs", "1", "--finetune-epochs", "1", "--threads", "2", "--no-progress"])
    return run


@pytest.fixture(scope="session")
def tiny_pretrained_artifact(tiny_pretrained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_training.export import export_artifact

    out = tmp_path_factory.mktemp("artifacts") / "tiny-pretrained"
    export_artifact(tiny_pretrained_run / "best.pt", out, name="tiny-pretrained", version="0.0.1")
    return out
