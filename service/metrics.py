"""Prometheus metrics (prometheus_client), one registry per app so apps never share counters.

With several worker processes (``python -m service`` sets ``PROMETHEUS_MULTIPROC_DIR``)
prometheus_client keeps values in files there and ``render`` sums every worker's, so
/metrics tells the whole service's story whichever worker answers.
"""

from __future__ import annotations

import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("classifier_http_requests_total", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_latency = Histogram("classifier_http_request_duration_seconds", "HTTP request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference_latency = Histogram("classifier_inference_duration_seconds",
                                           "onnxruntime time per inference call, by model and version",
                                           ["model", "version"], buckets=LATENCY_BUCKETS,
                                           registry=self.registry)
        self.images_decoded = Counter("classifier_images_decoded_total", "images decoded, by outcome",
                                      ["outcome"], registry=self.registry)
        self.rows = Counter("classifier_rows_total", "rows answered by the pipeline, by model, version and outcome (ok or an error code)",
                            ["model", "version", "outcome"], registry=self.registry)
        self.batch_size = Histogram("classifier_batch_size", "rows per onnxruntime call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue_wait = Histogram("classifier_queue_wait_seconds", "time a row waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.v2_unknown_keys = Counter("classifier_v2_unknown_keys_total",
                                       "keys of /v2 inference requests the service does not read (ignored), by level: "
                                       "request, input, output, parameters", ["level"], registry=self.registry)
        self.grpc_requests = Counter("classifier_grpc_requests_total", "gRPC calls by method and status",
                                     ["method", "code"], registry=self.registry)
        self.grpc_latency = Histogram("classifier_grpc_request_duration_seconds", "gRPC call latency", ["method"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("classifier_queue_depth", "rows waiting for inference", registry=self.registry,
                                 multiprocess_mode="livesum")
        self.model_info = Gauge("classifier_model_info", "each model version this service loaded: 1 while loaded, 0 once unloaded",
                                ["name", "version", "provider"], registry=self.registry, multiprocess_mode="max")

        self._cache: tuple[float, bytes] = (-1e9, b"")
        self._render_lock = threading.Lock()

    @staticmethod
    def multiprocess() -> bool:
        return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def render_cached(self, max_age_s: float = 1.0) -> bytes:
        """``render`` at most once per ``max_age_s``: scrapes in a burst share one rendering, so its cost
        (it reads every worker's files) is bounded however often /metrics is asked. Call it off the
        event loop."""
        with self._render_lock:  # concurrent scrapes wait for the one rendering, not render again
            at, text = self._cache
            now = time.monotonic()
            if now - at >= max_age_s:
                text = self.render()
                self._cache = (time.monotonic(), text)
            return text

    def render(self) -> bytes:
        if self.multiprocess():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))

    def close(self) -> None:
        """A worker that stops takes its live gauges out of the sums."""
        if self.multiprocess():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
