"""Optional OpenTelemetry tracing: spans for requests and batches, and the caller's trace continued."""

from __future__ import annotations

from pathlib import Path

import opentelemetry.sdk.trace.export.in_memory_span_exporter as sdk  # a dev dependency: missing = failing
from fastapi.testclient import TestClient
from helpers import jpeg_bytes

from service import tracing
from service.app import create_app
from service.settings import Settings


def test_spans_for_request_and_batch(tiny_artifact: Path) -> None:
    exporter = sdk.InMemorySpanExporter()
    assert tracing.configure(None, span_exporter=exporter)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with TestClient(create_app(Settings(model_dir=tiny_artifact, provider="cpu"))) as c:  # type: ignore[call-arg]
        r = c.post("/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")},
                   headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.name == "POST /classify"]
    assert server, [s.name for s in spans]
    attrs = dict(server[-1].attributes)
    assert attrs["http.route"] == "/classify" and attrs["http.response.status_code"] == 200
    assert attrs["request_id"] == r.headers["x-request-id"]
    assert format(server[-1].context.trace_id, "032x") == trace_id  # the caller's trace goes on
    batches = [s for s in spans if s.name == "onnxruntime batch"]
    assert batches and dict(batches[-1].attributes)["batch.size"] >= 1


def test_tracing_is_off_by_default() -> None:
    assert Settings().otel_exporter is None
    assert tracing.configure(None) is False


def test_text_logs_escape_control_characters() -> None:
    import logging

    from service.logs import TextFormatter

    fmt = TextFormatter("%(levelname)s %(message)s")
    line = fmt.format(logging.LogRecord("x", logging.INFO, "f", 1, "GET %s", ("/a\nINFO forged\r\x1b[2J",), None))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line == "INFO GET /a\\nINFO forged\\r\\x1b[2J"
