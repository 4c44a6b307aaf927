"""What a person opens in a browser: the demo page at ``/`` and the API docs, all served from here.

Swagger UI and ReDoc load their scripts from the ``fastapi-offline`` package's files, not from
a CDN, so the docs work on machines and networks without internet access.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)

# the pages may load nothing from elsewhere: the browser refuses it before any request leaves
# (ReDoc's bundle would fetch a logo from its CDN, say); no page runs a script it did not ship as a
# file (the demo) or whose hash is not listed (the docs pages' one inline start-up script); no page
# may be framed by another site (clickjacking)
_COMMON = ("default-src 'self'; img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; "
           "font-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
CSP = f"{_COMMON}; style-src 'self'; script-src 'self'"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def csp_with_inline_scripts(html: bytes) -> str:
    """The policy for a generated page (Swagger UI, ReDoc): its own inline scripts allowed by hash, no
    other; their inline styles allowed (the generated markup has them)."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()}'"
                      for m in _INLINE_SCRIPT.finditer(html))
    return f"{_COMMON}; style-src 'self' 'unsafe-inline'; script-src 'self' {hashes}"


def mount_static(app: object) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # type: ignore[attr-defined]
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")  # type: ignore[attr-defined]


@router.get("/")
async def demo() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Content-Security-Policy": CSP})


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - API docs",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/docs-assets/favicon.png")
    page.headers["Content-Security-Policy"] = csp_with_inline_scripts(bytes(page.body))
    return page


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc",
                          redoc_js_url="/docs-assets/redoc.standalone.js", redoc_favicon_url="/docs-assets/favicon.png",
                          with_google_fonts=False)
    page.headers["Content-Security-Policy"] = csp_with_inline_scripts(bytes(page.body))
    return page
