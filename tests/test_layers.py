"""The package layers: a torch-free, web-free core imported by both halves, which never import each other.

    classifier_core   numpy, Pillow, tokenizers
    model_training -> classifier_core (+ torch)          never service, never benchmarks
    service        -> classifier_core (+ web, onnxruntime) never model_training, torch or benchmarks
    benchmarks     -> service, classifier_core            not installed, not in the image
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

FORBIDDEN = {
    "classifier_core": {"torch", "fastapi", "starlette", "uvicorn", "onnxruntime", "service", "model_training", "benchmarks"},
    "model_training": {"service", "benchmarks", "fastapi", "starlette", "uvicorn"},
    "service": {"model_training", "torch", "benchmarks"},
}


def imported_modules(path: Path, package: str) -> set[str]:
    """Top-level names of every module a file imports, at any depth (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_it_must_not(package: str) -> None:
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = imported_modules(path, package) & FORBIDDEN[package]
        if hits:
            bad[str(path.relative_to(ROOT))] = sorted(hits)
    assert not bad, f"layer violations: {bad}"


def test_the_error_table_is_free_of_every_protocol() -> None:
    # domain code raises codes from service/codes.py; only the edges know HTTP or gRPC
    hits = imported_modules(ROOT / "service" / "codes.py", "service")
    assert not hits & {"fastapi", "starlette", "uvicorn", "grpc", "service", "http"}, hits


def test_the_core_imports_without_torch_or_the_web_stack() -> None:
    code = ("import sys, classifier_core.images, classifier_core.text, classifier_core.artifact\n"
            "heavy = sorted(m for m in ('torch', 'fastapi', 'starlette', 'uvicorn', 'onnxruntime', 'service', 'model_training')"
            " if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the core pulled in: {out.stdout.strip()}"


def test_the_scanner_sees_a_violation(tmp_path: Path) -> None:
    # the check itself can fail: a relative import inside a package and a plain import are both seen
    f = tmp_path / "m.py"
    f.write_text("from service.app import create_app\nfrom . import x\nimport torch.nn\n")
    assert imported_modules(f, "model_training") == {"service", "model_training", "torch"}


def test_benchmarks_ship_neither_in_the_package_nor_in_the_image() -> None:
    assert not any((ROOT / "service").glob("bench*.py")) and not (ROOT / "service" / "soak.py").exists()
    dockerfile = (ROOT / "Dockerfile").read_text()
    copies = [line for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert any("classifier_core/" in c for c in copies) and any("service/" in c for c in copies)
    assert not any(x in c for c in copies for x in ("benchmarks", "model_training", "tests", " . "))


def test_every_tool_and_every_results_file_is_named() -> None:
    """One tooling folder: each tool in benchmarks/README.md, each results file named by a document."""
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    docs = readme + (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    tools = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if p.name != "__init__.py"]
    tools += [p.name for p in sorted((ROOT / "benchmarks").glob("*.sh"))]
    assert [t for t in tools if t.removesuffix(".py").removesuffix(".sh") not in readme] == []
    assert [r.name for r in sorted((ROOT / "benchmarks" / "results").iterdir()) if r.name not in docs] == []
    assert not (ROOT / "scripts").exists()


def test_the_serving_package_knows_no_protocol() -> None:
    # service/serving/ (backends, repository) is below the edges: no web framework, no gRPC, no routes
    bad = {}
    for path in sorted((ROOT / "service" / "serving").rglob("*.py")):
        text = path.read_text()
        hits = imported_modules(path, "service") & {"fastapi", "starlette", "uvicorn", "grpc", "http"}
        if hits or "from ..routes" in text or "from ..errors" in text or "from ..grpc_v2" in text:
            bad[path.name] = sorted(hits) or ["an edge module"]
    assert not bad, bad


# facts every protocol states, each allowed in service/dataplane.py only: a second definition (a
# transport spelling out the outputs, its own version order or readiness) fails here
ONCE = {
    "the V2 outputs": r'"abstained",\s*"ood_score"|name="ood_score"|"ood_score":\s*\("',
    "a version order": r"isdigit\(\)\s*else",
    "readiness": r"\.ready\s+and\s+not\b[^\n]*draining|default\.ready\b",
    "the V2 inputs": r'\(\s*"image",\s*"description"\s*\)|name="description"',
}


def second_definitions(root: Path) -> dict[str, list[str]]:
    import re

    found: dict[str, list[str]] = {}
    for path in sorted((root / "service").rglob("*.py")):
        if path.name == "dataplane.py":
            continue
        text = path.read_text()
        for fact, pattern in ONCE.items():
            for m in re.finditer(pattern, text):
                found.setdefault(fact, []).append(f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}")
    return found


def test_the_data_plane_facts_are_defined_once() -> None:
    assert second_definitions(ROOT) == {}


def test_the_once_check_sees_a_second_definition(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "rest.py").write_text(
        'NAMES = ("label", "abstained", "ood_score")\nkey = lambda v: (1, int(v)) if v.isdigit() else (0, 0)\n'
        "ok = loaded.ready and not pipeline.draining\n")
    assert sorted(second_definitions(tmp_path)) == ["a version order", "readiness", "the V2 outputs"]
