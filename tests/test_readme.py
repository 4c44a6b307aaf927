"""The README's examples run as written: its API section's shell and Python blocks, against a live service.

Each block is taken from README.md as it is (only ``localhost:8000`` becomes the test server's
address) and run from the repository root, as a user would paste it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEFAULT_MODEL, ROOT, free_port, running_server

README = (ROOT / "README.md").read_text()


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced bash/python block under the README heading ``section``."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(bash|python)\n(.*?)```", body, re.S)]


def test_the_examples_name_only_files_that_ship() -> None:
    named = set(re.findall(r"examples/[\w.-]+", README))
    assert named and all((ROOT / p).is_file() for p in named), sorted(p for p in named if not (ROOT / p).is_file())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_api_examples_run_as_written_against_a_live_service() -> None:
    examples = blocks("The API at a glance")
    assert [lang for lang, _ in examples] == ["bash", "python", "python", "python"], examples
    grpc_port = free_port()
    with running_server(DEFAULT_MODEL, CLASSIFIER_WORKERS="1", CLASSIFIER_GRPC_PORT=str(grpc_port),
                        CLASSIFIER_GRPC_HOST="127.0.0.1") as (_, url):
        address = url.removeprefix("http://")
        for lang, code in examples:
            code = code.replace("localhost:8000", address).replace("localhost:8001", f"127.0.0.1:{grpc_port}")
            cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, (code, out.stdout[-500:], out.stderr[-1500:])
            assert out.stdout.strip(), code  # each example prints its answer
            if lang == "bash":
                assert '"label"' in out.stdout and '"request_id"' in out.stdout, out.stdout[:500]


def test_the_no_server_examples_run_as_written() -> None:
    examples = blocks("Without a server")
    assert [lang for lang, _ in examples] == ["bash", "python"], examples
    answers = ROOT / "runs" / "answers.csv"
    answers.unlink(missing_ok=True)
    for lang, code in examples:
        cmd = ["bash", "-euo", "pipefail", "-c", f'PATH="{Path(sys.executable).parent}:$PATH"; {code}'] if lang == "bash" \
            else [sys.executable, "-c", code]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (code, out.stdout[-500:], out.stderr[-1500:])
        assert out.stdout.strip(), code
    rows = answers.read_text().splitlines()
    assert len(rows) == 1 + len(list((ROOT / "examples").glob("*.jpg"))) and rows[0].startswith("key,path,label")
    answers.unlink()
    printed = out.stdout.split()
    assert printed[:2] == ["tomato", "tomato"] and "None" in printed[4:] and "out_of_distribution" in printed  # the cat: abstained
