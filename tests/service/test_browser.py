"""The demo page and the API docs in a real browser: Debian's chromium, driven by Playwright.

No browser is downloaded: Playwright is pointed at the system chromium (``.ci/run`` installs
it). Every request the page makes must stay on this machine (the docs load no CDN).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_repository, running_server
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium; .ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[str]:
    with running_server(tiny_artifact, CLASSIFIER_WORKERS="1") as (_, url):
        yield url


def offline_page(browser: Browser, url: str, **kw: Any) -> tuple[Page, list[str]]:
    """A page that may only reach the service: anything else is blocked and recorded."""
    page = browser.new_page(**kw)
    blocked: list[str] = []

    def route(r: Any) -> None:
        if r.request.url.startswith(url):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    # a script or style the page's Content-Security-Policy refuses shows as a console error: recorded too
    # (images from elsewhere are refused on purpose: ReDoc's bundle asks its CDN for a logo)
    page.on("console", lambda m: blocked.append(m.text) if m.type == "error" and "Content Security Policy" in m.text
            and "img-src" not in m.text else None)
    return page, blocked


def test_demo_page_classifies_an_uploaded_image(browser: Browser, server: str, tmp_path: Path) -> None:
    image = tmp_path / "tomato.png"
    Image.new("RGB", (120, 90), (210, 30, 25)).save(image)
    caption = "a red tomato on the table"
    page, blocked = offline_page(browser, server, viewport=PHONE)
    page.goto(f"{server}/")
    page.wait_for_selector("#labels .label-chip")
    assert page.inner_text("#model-name") == "tiny"
    assert len(page.locator("#labels .label-chip").all()) == 8
    assert page.is_hidden("#key-row")  # no key is asked for where the service needs none
    page.set_input_files("#image", str(image))
    page.fill("#description", caption)
    page.select_option("#top-k", "3")
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])")

    ref = httpx.post(f"{server}/classify", params={"top_k": 3, "explain": "true"},
                     files={"image": ("tomato.png", image.read_bytes(), "image/png")}, data={"description": caption}).json()
    labels = page.locator("#bars .bar .label").all_inner_texts()
    assert labels == [p["label"] for p in ref["predictions"]]
    tokens = page.locator("#tokens .token")
    assert tokens.all_inner_texts() == [t["token"] for t in ref["text_attention"]]
    weights = [float(tokens.nth(i).get_attribute("data-weight") or "nan") for i in range(tokens.count())]
    assert weights == pytest.approx([t["weight"] for t in ref["text_attention"]], abs=1e-6)
    verdict = page.inner_text("#verdict")
    assert verdict.startswith("Not sure") if ref["abstained"] else verdict.startswith(f"{ref['label']} (")
    # asked for certainty no answer has: the page says it does not know, and still shows the guesses
    page.fill("#min-confidence", "100")
    page.click("#submit")
    page.wait_for_function("document.getElementById('verdict').textContent.startsWith('Not sure')")
    assert page.locator("#bars .bar .label").all_inner_texts() == labels
    # usable at phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert blocked == []
    page.close()


def test_demo_page_shows_the_services_error(browser: Browser, server: str, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image at all" * 10)
    page, _ = offline_page(browser, server)
    page.goto(f"{server}/")
    page.wait_for_selector("#labels .label-chip")
    page.set_input_files("#image", str(bad))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "the file is not a recognised image"
    assert page.is_hidden("#result")
    page.close()


def test_demo_page_asks_for_the_api_key(browser: Browser, tiny_artifact: Path) -> None:
    with running_server(tiny_artifact, CLASSIFIER_WORKERS="1", CLASSIFIER_API_KEY="s3cret") as (_, url):
        page, _ = offline_page(browser, url)
        page.goto(f"{url}/")
        page.wait_for_selector("#key-row:not([hidden])")
        page.fill("#api-key", "s3cret")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#labels .label-chip")
        assert page.inner_text("#model-name") == "tiny"
        page.close()


def test_demo_page_lets_the_user_pick_a_model_of_the_repository(browser: Browser, tiny_artifact: Path, tmp_path: Path) -> None:
    import json

    base = json.loads((tiny_artifact / "manifest.json").read_text())["labels"]
    repo = make_repository(tmp_path / "repo", {"alpha": {"1": tiny_artifact}, "beta": {"1": tiny_artifact}},
                           labels={"beta/1": [f"beta-{x}" for x in base]})
    image = tmp_path / "red.png"
    Image.new("RGB", (120, 90), (210, 30, 25)).save(image)
    with running_server(repo, "--model-repository", str(repo), CLASSIFIER_WORKERS="1") as (_, url):
        page, blocked = offline_page(browser, url, viewport=PHONE)
        page.goto(f"{url}/")
        page.wait_for_selector("#model-row:not([hidden])")
        assert page.inner_text("#model-name") == "alpha"
        assert page.locator("#model-pick option").all_inner_texts() == ["alpha 1 (default)", "beta 1"]
        page.select_option("#model-pick", label="beta 1")
        page.wait_for_selector("#model-name:text-is('beta')")
        assert page.locator("#labels .label-chip").first.inner_text().startswith("beta-")
        page.set_input_files("#image", str(image))
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])")
        assert all(x.startswith("beta-") for x in page.locator("#bars .bar .label").all_inner_texts())
        assert blocked == []
        page.close()


@pytest.mark.parametrize("path,selector", [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id]")])
def test_api_docs_render_without_internet(browser: Browser, server: str, path: str, selector: str) -> None:
    page, blocked = offline_page(browser, server)
    page.goto(f"{server}{path}")
    page.wait_for_selector(selector, timeout=30_000)
    text = page.inner_text("body")
    for operation in ("/classify", "/classify/batch", "/readyz"):
        assert operation in text, operation
    assert blocked == [], blocked
    page.close()


def test_screenshot_of_the_demo_is_small(browser: Browser, server: str) -> None:
    # the committed screenshot (docs/demo.png) is made the same way, on the default model
    page, _ = offline_page(browser, server, viewport={"width": 900, "height": 900})
    page.goto(f"{server}/")
    page.wait_for_selector("#labels .label-chip")
    buf = io.BytesIO(page.screenshot(full_page=True))
    assert Image.open(buf).size[0] == 900
    page.close()
