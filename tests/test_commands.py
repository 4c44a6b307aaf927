"""The console command ``itc`` ([project.scripts]) reaches both halves, as ``python -m`` does."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["itc"], [sys.executable, "-m", "itc"]])
def test_itc_dispatches_to_serving_and_training(command: list[str]) -> None:
    if command == ["itc"]:
        found = shutil.which("itc")
        assert found, "the itc script is not installed (pip install -e . installs it)"
        command = [found]
    assert run(*command, "serve", "--help").stdout.startswith("usage: python -m service")
    for sub in ("train", "export"):
        out = run(*command, sub, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, (sub, out.stderr[-300:])
    nothing = run(*command)
    assert nothing.returncode == 2 and "itc serve" in nothing.stdout
    mistake = run(*command, "export", "runs/nothere/best.pt")
    assert mistake.returncode == 2 and "no such checkpoint" in mistake.stderr
