"""Retake docs/demo.png: the demo page on the default model with a real answer, in Debian's chromium.

    python benchmarks/demo_screenshot.py            # needs the dev extra (playwright) and chromium
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import DEFAULT_MODEL, running_server  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from model_training.synthetic import GeneratorConfig, generate  # noqa: E402


def main() -> int:
    # a held-out drawing of the built-in dataset's kind (a seed the default model never saw)
    _, jpg, caption, _ = next(s for s in generate(GeneratorConfig(seed=4242, num_samples=40))
                              if s[3]["label"] == "tomato" and len(s[2]) > 15)  # type: ignore[index]
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "drawing.png"
        Image.open(io.BytesIO(jpg)).save(image)
        with running_server(DEFAULT_MODEL, CLASSIFIER_WORKERS="1") as (_, url), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 760, "height": 900})
            page.goto(f"{url}/")
            page.wait_for_selector("#labels .label-chip")
            page.set_input_files("#image", str(image))
            page.fill("#description", caption)
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])")
            shot = page.screenshot(full_page=True)
            browser.close()
    out = ROOT / "docs" / "demo.png"
    Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=128).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
