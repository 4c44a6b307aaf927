"""Optional OpenTelemetry tracing: off by default, on with ``CLASSIFIER_OTEL_EXPORTER``.

The code always talks to the OpenTelemetry API (a no-op without an SDK). When an exporter is
configured, an SDK tracer provider is installed: ``otlp`` sends spans over OTLP/HTTP to
``OTEL_EXPORTER_OTLP_ENDPOINT`` (the standard variable), ``console`` prints them. The SDK and
exporter are the ``otel`` extra: ``pip install -e '.[serve,otel]'``.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace

log = logging.getLogger(__name__)
tracer = trace.get_tracer("image-text-classifier")


def active() -> bool:
    """Whether a real tracer provider is installed (ours, or one set up by the host process).

    The request path asks before opening spans: the API's no-op spans, context attach and
    detach still cost about 4 % of the CPU the event loop spends per request (py-spy, 1 worker).
    """
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def configure(exporter: str | None, service_name: str = "image-text-classifier", span_exporter: Any = None) -> bool:
    """Install an SDK tracer provider; returns whether tracing is on. ``span_exporter`` is for tests."""
    if not exporter and span_exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        log.error("CLASSIFIER_OTEL_EXPORTER=%s but opentelemetry-sdk is not installed (pip install '.[otel]'); "
                  "tracing stays off", exporter)
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("OpenTelemetry tracing on (%s)", exporter or "custom exporter")
    return True
