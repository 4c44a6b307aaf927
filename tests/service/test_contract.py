"""The documented contract against real answers: every error example in /openapi.json is one the service gives."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import app_client, encode, jpeg_bytes, make_repository
from PIL import Image

from service.app import create_app
from service.errors import ERROR_CATALOGUE
from service.settings import Settings

# codes this module cannot provoke in-process; each is provoked for real elsewhere (or cannot be sent)
ELSEWHERE = {
    "request_timeout": "tests/service/test_lifecycle.py (slow body), test_attacks.py (trickled head)",
    "header_too_large": "tests/service/test_attacks.py (an 8 MB header on a real server)",
    "client_closed_request": "logged, never sent: tests/service/test_attacks.py",
    "overloaded": "tests/service/test_attacks.py, test_lifecycle.py",
    "timeout": "tests/service/test_batching.py (QueueTimeout)",
    "internal_error": "a bug: tests/service/test_request_pipeline.py keeps it to its row",
    "invalid_description": "JSON parsers refuse lone surrogates first (invalid_json); the pipeline's own check stays",
}




def _many_scans() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG",
                   progressive=True)
    scan = data[data.rfind(b"\xff\xda"):-2]
    return data[:-2] + scan * 300 + b"\xff\xd9"


def shape(message: str) -> str:
    """A message with its numbers blanked: examples and answers must agree on everything else."""
    return re.sub(r"\d+", "#", message)


@pytest.fixture(scope="module")
def client(tiny_artifact: Path) -> Iterator[TestClient]:
    with app_client(tiny_artifact, raise_server_exceptions=False) as c:
        yield c


def v2_answer(r: httpx.Response) -> tuple[int, str, str]:
    return r.status_code, r.json()["code"], r.json()["error"]


def repository_trigger(tiny_artifact: Path, key: str | None) -> tuple[int, str, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repository(Path(tmp), {"tiny": {"1": tiny_artifact}})
        (repo / "broken" / "1").mkdir(parents=True)
        with app_client(tiny_artifact, model_repository=repo, api_key=key) as c:
            return v2_answer(c.post("/v2/repository/models/broken/load", headers={"x-api-key": key or ""}))


def triggers(c: TestClient, tiny_artifact: Path) -> dict[str, Callable[[], tuple[int, str, str]]]:
    jpg = jpeg_bytes()

    def post(image: bytes | None = None, description: str = "x", params: dict[str, Any] | None = None,
             files: dict[str, Any] | None = None) -> tuple[int, str, str]:
        r = c.post("/classify", params=params or {}, files=files or {"image": ("x", image or jpg, "image/jpeg")},
                   data={"description": description} if files is None else None)
        return answer(r)

    def answer(r: httpx.Response) -> tuple[int, str, str]:
        e = r.json()["error"]
        return r.status_code, e["code"], e["message"]

    def batch_item(items: list[dict[str, str]]) -> tuple[int, str, str]:
        r = c.post("/classify/batch", json={"items": items})
        if r.status_code != 200:
            return answer(r)
        e = r.json()["results"][0]["error"]
        return 400, e["code"], e["message"]

    def not_ready() -> tuple[int, str, str]:
        with TestClient(create_app(Settings(model_dir=tiny_artifact, provider="cpu"), load_model=False)) as cold:  # type: ignore[call-arg]
            cold.app.state.pipeline.repository.state = "loading"  # type: ignore[attr-defined]
            return answer(cold.post("/classify", files={"image": ("x", jpg, "image/jpeg")}))

    def unauthorized() -> tuple[int, str, str]:
        with TestClient(create_app(Settings(model_dir=tiny_artifact, provider="cpu", api_key="k"))) as locked:  # type: ignore[call-arg]
            return answer(locked.get("/model"))

    def inference_failed() -> tuple[int, str, str]:
        predictor = c.app.state.pipeline.model().backend  # type: ignore[attr-defined]

        class Broken:
            def run(self, *a: object) -> None:
                raise RuntimeError("device fault")

        real, predictor.session = predictor.session, Broken()
        try:
            return post()
        finally:
            predictor.session = real

    return {
        "invalid_image": lambda: post(b"just some text, no image" * 5),
        "unsupported_image_format": lambda: post(encode(Image.new("RGB", (8, 8)), "PPM")),
        "bad_base64": lambda: batch_item([{"image_base64": "!!!not base64"}]),
        "bad_request": lambda: answer(c.post("/classify", content=b"x", headers={"content-type": "multipart/form-data"})),
        "invalid_json": lambda: answer(c.post("/classify/batch", content=b"[", headers={"content-type": "application/json"})),
        "unauthorized": unauthorized,
        "not_found": lambda: answer(c.get("/nope")),
        "method_not_allowed": lambda: answer(c.get("/classify")),
        "payload_too_large": lambda: post(b"\xff" * (10_560_000)),
        "image_too_large": lambda: post(encode(Image.new("1", (30000, 30000)), "PNG")),
        "unsupported_media_type": lambda: answer(c.post("/classify", json={})),
        "missing_field": lambda: post(files={"description": (None, "a tomato")}),
        "invalid_field": lambda: post(files={"image": (None, "some text")}),
        "unknown_field": lambda: post(files={"image": ("x", jpg, "image/jpeg"), "colour": (None, "red")}),
        "description_too_long": lambda: post(description="a" * 5000),
        "image_too_complex": lambda: post(_many_scans()),
        "too_many_items": lambda: batch_item([{"image_base64": base64.b64encode(jpg).decode()}] * 65),
        "validation_error": lambda: post(params={"top_k": 0}),
        "not_ready": not_ready,
        "model_not_found": lambda: post(params={"model": "nope"}),
        "forbidden": lambda: repository_trigger(tiny_artifact, None),
        "model_load_failed": lambda: repository_trigger(tiny_artifact, "k"),
        "inference_failed": inference_failed,
    }


def test_every_error_code_is_documented_as_the_service_answers_it(client: TestClient, tiny_artifact: Path) -> None:
    actions = triggers(client, tiny_artifact)
    assert set(actions) | set(ELSEWHERE) == set(ERROR_CATALOGUE)
    for code, provoke in actions.items():
        status, got_code, message = provoke()
        want_status, example = ERROR_CATALOGUE[code]
        assert (status, got_code) == (want_status, code), (code, status, got_code, message)
        assert shape(message) == shape(example), f"{code}: example {example!r}, real answer {message!r}"


def test_openapi_shows_the_catalogue_and_the_v2_error_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            for status, resp in op.get("responses", {}).items():
                for name, ex in resp.get("content", {}).get("application/json", {}).get("examples", {}).items():
                    err = ex["value"]["error"]
                    assert ERROR_CATALOGUE[err["code"]] == (int(status), err["message"]), (path, status, name)
    v2 = spec["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
    assert v2["$ref"].endswith("/V2ErrorBody")
    assert set(spec["components"]["schemas"]["V2ErrorBody"]["properties"]) == {"error", "code"}
    assert "HTTPValidationError" not in str(spec["paths"]["/v2/models/{name}/infer"])


def test_every_code_is_documented_and_no_edge_writes_a_status_by_hand() -> None:
    import re

    from helpers import ROOT

    from service.codes import TABLE

    doc = (ROOT / "docs" / "api.md").read_text()
    assert not [c for c in TABLE if f"`{c}`" not in doc], "codes missing from docs/api.md"
    # statuses and Retry-After come from the table: no literal status or Retry-After value in the service's code
    literal = re.compile(r"status(_code)?\s*=\s*[3-5][0-9]{2}\b|\"status\":\s*[3-5][0-9]{2}|[Rr]etry-[Aa]fter[\"']?\s*[:,]\s*b?[\"'][0-9]")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "service").rglob("*.py")) if p.name != "codes.py"
            and "inference_pb2" not in p.name for n, line in enumerate(p.read_text().splitlines(), 1)
            if literal.search(line) and not line.lstrip().startswith("#")]
    assert not hits, hits


# every place a code is written as a literal: keyword or class attribute, a row's error, an edge's lookup
CODE_LITERALS = [r'\bcode\s*=\s*"([a-z_]+)"', r'RowError\(\s*"([a-z_]+)"',
                 r'\b(?:error_response|http_status|grpc_status|retry_headers|retry_after|lookup)\((?:[a-z_.]+,\s*)?"([a-z_]+)"']


def unknown_codes(root: Any, table: Any) -> list[str]:
    import re

    found = []
    for package in ("service", "classifier_core", "itc"):
        for p in sorted((root / package).rglob("*.py")):
            text = p.read_text()
            for pattern in CODE_LITERALS:
                for m in re.finditer(pattern, text):
                    if m.group(1) not in table:
                        found.append(f"{p.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(1)}")
    return found


def test_every_code_written_in_the_code_is_in_the_table(tmp_path: Path) -> None:
    """A mistyped code would be answered as internal_error (a 500): it fails here instead."""
    from helpers import ROOT

    from service.codes import TABLE

    assert unknown_codes(ROOT, TABLE) == []
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "x.py").write_text('raise BadRequest("no", code="bad_reqest")\nerror_response(request, "not_redy", "m")\n')
    assert [h.split(": ")[1] for h in unknown_codes(tmp_path, TABLE)] == ["bad_reqest", "not_redy"]
