"""Start-up: a broken artifact stops `python -m service` with one clear line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from classifier_core.artifact import ArtifactError
from service.serving.base import ProviderError
from service.serving.session import Predictor, gpu_present
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _start(model_dir: Path, *env_pairs: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "CLASSIFIER_MODEL_DIR": str(model_dir), **dict(env_pairs)}
    return subprocess.run([sys.executable, "-m", "service", "--port", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _corrupt_onnx(d: Path) -> str:
    with (d / "model.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    return "sha256 mismatch"


def _drop_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").unlink()
    return "tokenizer.json: file not found"


def _bad_schema(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    return "unsupported schema_version 99"


def _labels_mismatch(d: Path) -> str:
    m = json.loads((d / "manifest.json").read_text())
    m["labels"] = m["labels"][:-1]
    (d / "manifest.json").write_text(json.dumps(m))
    return "7 labels but the model outputs 8 classes"


@pytest.mark.parametrize("breaker", [_corrupt_onnx, _drop_tokenizer, _bad_schema, _labels_mismatch])
def test_broken_artifact_refuses_to_start(tiny_artifact: Path, tmp_path: Path, breaker) -> None:  # type: ignore[no-untyped-def]
    d = _copy(tiny_artifact, tmp_path / "m")
    expected = breaker(d)
    with pytest.raises(ArtifactError, match=expected.split(":")[0]):
        Predictor(Settings(model_dir=d, provider="cpu")).load()  # type: ignore[call-arg]
    out = _start(d)
    assert out.returncode == 2
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("service: cannot start:") and expected in lines[0], out.stderr


def test_missing_model_dir(tmp_path: Path) -> None:
    out = _start(tmp_path / "nothing-here")
    assert out.returncode == 2 and "manifest.json: file not found" in out.stderr


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU")
def test_cuda_without_gpu_fails_clearly(tiny_artifact: Path) -> None:
    with pytest.raises(ProviderError, match="CLASSIFIER_PROVIDER=cuda"):
        Predictor(Settings(model_dir=tiny_artifact, provider="cuda")).load()  # type: ignore[call-arg]
    out = _start(tiny_artifact, ("CLASSIFIER_PROVIDER", "cuda"))
    assert out.returncode == 2 and "CLASSIFIER_PROVIDER=cuda" in out.stderr


def test_auto_probes_cuda_quietly_and_falls_back(tiny_artifact: Path, capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe runs on every machine: told a GPU is there, onnxruntime tries CUDA for real; where
    # its libraries or the device are missing it logs errors, which must stay muted during the probe
    real_gpu = gpu_present()
    monkeypatch.setattr("service.serving.session.gpu_present", lambda: True)
    p = Predictor(Settings(model_dir=tiny_artifact, provider="auto"))  # type: ignore[call-arg]
    p.load()
    if not real_gpu:
        assert p.providers == ["CPUExecutionProvider"]
    err = capfd.readouterr().err
    assert "Failed to load library" not in err and "CUDA" not in err, err


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "link.bin"])
def test_a_manifest_names_only_files_inside_its_folder(tiny_artifact: Path, tmp_path: Path, name: str) -> None:
    from classifier_core.artifact import load_manifest, sha256_file

    d = _copy(tiny_artifact, tmp_path / "m")
    (tmp_path / "outside.bin").write_bytes(b"a server file")
    (d / "link.bin").symlink_to(tmp_path / "outside.bin")
    m = json.loads((d / "manifest.json").read_text())
    m["files"][name] = sha256_file(tmp_path / "outside.bin")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="not inside the artifact's folder"):
        load_manifest(d)


def test_outputs_are_read_by_name_whatever_their_order(tiny_artifact: Path, tmp_path: Path) -> None:
    """An artifact whose graph and manifest list the outputs in another order answers the same."""
    import numpy as np
    import onnx

    from classifier_core.artifact import sha256_file

    d = _copy(tiny_artifact, tmp_path / "m")
    model = onnx.load(str(d / "model.onnx"))
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend(outputs[::-1])
    onnx.save(model, str(d / "model.onnx"))
    m = json.loads((d / "manifest.json").read_text())
    m["outputs"] = m["outputs"][::-1]
    m["files"]["model.onnx"] = sha256_file(d / "model.onnx")
    (d / "manifest.json").write_text(json.dumps(m))
    assert m["outputs"][0]["name"] != "probabilities"

    settings = Settings(model_dir=tiny_artifact, provider="cpu")  # type: ignore[call-arg]
    original, reordered = Predictor(settings), Predictor(settings, d)
    original.load()
    reordered.load()
    images = np.random.default_rng(0).integers(0, 255, (3, m["image_size"], m["image_size"], 3), np.uint8)
    ids = np.array([[5, 6, 7], [8, 9, 0], [3, 0, 0]], np.int64)
    for a, b in zip(original.run_arrays(images, ids), reordered.run_arrays(images, ids), strict=True):
        assert np.allclose(a, b, equal_nan=True)
