"""The exported artifact: a folder with ``model.onnx``, ``tokenizer.json`` and ``manifest.json``.

The manifest is the contract between training and serving: :class:`Manifest`, written by
``model_training.export`` as ``Manifest(...).to_dict()`` and read back here with ``from_dict``,
without torch; ``from_dict(d).to_dict() == d`` for what export writes (tested), so no field is
written that the reader drops.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


# the outputs the service reads, by name (an artifact may list them in any order); the OOD score's
# name is the manifest's own (``ood.output``)
PROBABILITIES = "probabilities"
ATTENTION = "text_attention"


class ArtifactError(RuntimeError):
    """The artifact is missing, corrupt or inconsistent; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: uint8, int64, float32
    shape: list[int | str]  # str entries are dynamic axes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), list(d["shape"]))


@dataclass
class Manifest:
    schema_version: int
    name: str
    version: str
    created: str
    labels: list[str]
    image_size: int
    max_len: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]  # file name -> sha256
    model_file: str = "model.onnx"
    tokenizer_file: str = "tokenizer.json"
    mode: str = "fused"
    opset: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature, ECE before/after (none: T = 1)
    ood: dict[str, Any] = field(default_factory=dict)  # out-of-distribution score: method, output, threshold
    backbone: dict[str, Any] = field(default_factory=dict)  # pretrained image backbone: name, weights sha256, licence
    text_encoder: dict[str, Any] = field(default_factory=dict)  # pretrained caption encoder: name, weights sha256, licence
    parity: dict[str, Any] = field(default_factory=dict)  # onnxruntime vs torch at export: max abs differences
    training: dict[str, Any] = field(default_factory=dict)  # best epoch, val accuracy, model config, optimiser
    serving: dict[str, Any] = field(default_factory=dict)  # model bytes, session load seconds (measured at export)
    quantization: dict[str, Any] = field(default_factory=dict)  # int8: recipe, calibration, float vs int8 figures (quantize)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            return cls(
                schema_version=int(d["schema_version"]),
                name=str(d["name"]),
                version=str(d["version"]),
                created=str(d.get("created", "")),
                labels=[str(x) for x in d["labels"]],
                image_size=int(d["image_size"]),
                max_len=int(d["max_len"]),
                inputs=[TensorSpec.from_dict(x) for x in d["inputs"]],
                outputs=[TensorSpec.from_dict(x) for x in d["outputs"]],
                files={str(k): str(v) for k, v in d["files"].items()},
                model_file=str(d.get("model_file", "model.onnx")),
                tokenizer_file=str(d.get("tokenizer_file", "tokenizer.json")),
                mode=str(d.get("mode", "fused")),
                opset=d.get("opset"),
                data=dict(d.get("data", {})),
                metrics=dict(d.get("metrics", {})),
                libraries=dict(d.get("libraries", {})),
                preprocessing=dict(d.get("preprocessing", {})),
                calibration=dict(d.get("calibration") or {}),
                ood=dict(d.get("ood") or {}),
                backbone=dict(d.get("backbone") or {}),
                text_encoder=dict(d.get("text_encoder") or {}),
                parity=dict(d.get("parity") or {}),
                training=dict(d.get("training") or {}),
                serving=dict(d.get("serving") or {}),
                quantization=dict(d.get("quantization") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{MANIFEST}: missing or invalid field: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json object (empty optional sections left out)."""
        from dataclasses import asdict

        out = asdict(self)
        return {k: v for k, v in out.items() if v not in ({}, None) or k in ("files", "opset")}

    def describe_training_data(self) -> str:
        """One honest line on what the model learned from, for people who are about to try it."""
        dataset = self.data.get("dataset") or {}
        # the splits as trained (older artifacts also kept a re-checked test count in here: not a split)
        n = {k: int(v) for k, v in (self.data.get("n") or {}).items() if k in ("train", "val", "test") and v is not None}
        total = sum(n.values()) if n else None
        if dataset.get("name") == "builtin-synthetic":
            count = f"{total:,}" if total else "about 12,000"
            return (f"Trained on {count} synthetic drawings of {len(self.labels)} objects with captions "
                    "(the built-in dataset), not on photographs: a photo is usually abstained as out-of-distribution, "
                    "and what it names for one means little. Train on your own photos for real use.")
        # a name, never a training machine's absolute path (older artifacts recorded those)
        sources = ", ".join(Path(str(s)).name if Path(str(s)).is_absolute() else str(s)
                            for s in self.data.get("sources", [])) or "unrecorded data"
        if not total:
            return f"Trained on {sources}."
        splits = " / ".join(f"{n[k]:,} {k}" for k in ("train", "val", "test") if k in n)
        return f"Trained on {total:,} image-caption pairs from {sources} ({splits})."

    @property
    def example_caption(self) -> str:
        """A caption from the model's own test data, for a demo's placeholder ("" if the artifact has none)."""
        return str(self.data.get("example_caption") or "")

    @property
    def temperature(self) -> float:
        """The softmax temperature fitted at export; 1.0 for artifacts without one."""
        t = float(self.calibration.get("temperature", 1.0))
        return t if t > 0 else 1.0

    @property
    def ood_threshold(self) -> float | None:
        """The out-of-distribution score above which a sample is unlike the training data, if the
        artifact has that score."""
        if "threshold" not in self.ood or self.ood.get("output") not in {o.name for o in self.outputs}:
            return None
        t = float(self.ood["threshold"])
        return t if t > 0 else None

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


def load_manifest(model_dir: str | Path, verify_checksums: bool = True) -> Manifest:
    """Read and check ``manifest.json``: schema version, and the sha256 of every file it lists."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        if (model_dir / "best.pt").is_file():  # a training run, not what serving reads
            raise ArtifactError(f"{model_dir} is a training run folder, not an exported model: export it first "
                                f"(itc export {model_dir / 'best.pt'} --out exported_models/NAME) and serve that folder")
        raise ArtifactError(f"{path}: file not found (is CLASSIFIER_MODEL_DIR an exported model folder?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: unsupported schema_version {raw.get('schema_version')!r}; this service reads {SCHEMA_VERSION}"
        )
    manifest = Manifest.from_dict(raw)
    for required in (manifest.model_file, manifest.tokenizer_file):
        if required not in manifest.files:
            raise ArtifactError(f"{path}: 'files' does not list {required}")
    inside = model_dir.resolve()
    for name in manifest.files:
        # every file the artifact names is in its folder: never a path the service would read (and hash)
        # elsewhere on the server, through "..", an absolute name or a symlink
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts or not (inside / rel).resolve().is_relative_to(inside):
            raise ArtifactError(f"{path}: 'files' names {name[:200]!r}, which is not inside the artifact's folder")
    if verify_checksums:
        for name, expected in manifest.files.items():
            f = model_dir / name
            if not f.is_file():
                raise ArtifactError(f"{f}: file not found (listed in {MANIFEST})")
            actual = sha256_file(f)
            if actual != expected:
                raise ArtifactError(f"{f}: sha256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): corrupt or replaced")
    if len(manifest.labels) < 1:
        raise ArtifactError(f"{path}: no labels")
    return manifest
