"""Service settings, read from ``CLASSIFIER_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "exported_models" / "default"


def default_model_dir() -> Path:
    # next to the package in a checkout or the container; else relative to the working dir
    return _PACKAGED_DEFAULT if _PACKAGED_DEFAULT.is_dir() else Path("exported_models/default")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLASSIFIER_", protected_namespaces=(), extra="ignore")

    model_dir: Path = Field(default_factory=default_model_dir, description="exported artifact folder")
    provider: Literal["auto", "cuda", "tensorrt", "cpu"] = "auto"  # auto: CUDA if really usable, else CPU
    device_id: int = 0  # GPU ordinal for cuda/tensorrt
    workers: int = 0  # server processes (python -m service); 0 = one per core
    # workers: each worker process owns a model session and batches its own rows (the default on
    # CPU: measured faster on small machines, docs/performance.md). owner: the workers decode and
    # send rows over shared memory to one process that owns the session and batches across all of
    # them (one CUDA context, large batches). auto: owner when a GPU is in use, else workers
    topology: Literal["auto", "workers", "owner"] = "auto"
    owner_max_batch: int = 128  # rows per onnxruntime call in the owner (merged from all workers)
    owner_threads: int = 0  # onnxruntime threads of the owner; 0 = one per core
    owner_address: str | None = None  # set by the supervisor for its workers: the owner's Unix socket
    intra_op_threads: int = 0  # onnxruntime threads per inference; 0 = cores / workers
    ort_spinning: bool = False  # let onnxruntime's idle workers spin (lower latency, steals CPU from decoding)
    max_upload_bytes: int = 10 * 1024 * 1024  # one image file; the request body may add 64 KiB of form overhead
    max_image_pixels: int = 40_000_000  # width x height from the header, checked before decoding
    max_description_chars: int = 2000
    # below this calibrated confidence an answer abstains ("label": null, "abstained": true); 0 = never.
    # Each request may set its own (?min_confidence= on /classify and /classify/batch, a V2 parameter)
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    # abstain when the artifact's out-of-distribution score says the input is unlike the training
    # data (a photo shown to a model of drawings), whatever the confidence
    ood_abstain: bool = True
    max_batch_items: int = 64  # items per POST /classify/batch
    max_batch_body_bytes: int = 32 * 1024 * 1024  # whole JSON body of /classify/batch
    max_batch_size: int = 32  # rows per onnxruntime call (dynamic batching); larger batches are split
    # 0 = greedy: a batch starts as soon as the engine is free and takes whatever queued meanwhile;
    # under load batches fill by themselves, and a lone request never waits (benchmarks/bench.py)
    max_batch_delay_ms: float = 0.0
    max_queue: int = 256  # rows waiting for inference; beyond it requests get 503 + Retry-After
    request_timeout_ms: float = 10_000  # a row that waited longer in the queue gets 504
    # the Open Inference Protocol over gRPC on this port too (every worker listens on it); 0 = off
    grpc_port: int = Field(default=0, ge=0, le=65535)
    grpc_host: str = "0.0.0.0"  # the gRPC listener's address
    max_header_bytes: int = 32 * 1024  # request line + headers; longer heads get 431 and the connection closes
    header_timeout_s: float = 10.0  # a request head must arrive within this of its first byte (408, closed)
    # open connections per worker process; past it a new connection gets 503 and is closed at once
    max_connections: int = Field(default=1024, ge=1)
    body_timeout_s: float = 20.0  # the whole request body must arrive within this (slow senders get 408)
    drain_delay_s: float = 2.0  # after SIGTERM: /readyz answers 503 and requests are still served this long
    shutdown_grace_s: float = 30.0  # after SIGTERM: in-flight requests finish within this, then exit 0
    api_key: SecretStr | None = None  # when set, required on all routes but /healthz, /readyz, /metrics
    cors_origins: list[str] = Field(default_factory=list)  # CORS is off unless origins are listed
    # /metrics is rendered at most this often (scrapes in between get the same text): its cost,
    # reading every worker's metric files, is bounded however often it is asked; 0 = every scrape
    metrics_max_age_s: float = Field(default=1.0, ge=0.0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "json"  # json: one object per line, for log pipelines
    otel_exporter: Literal["otlp", "console"] | None = None  # OpenTelemetry tracing; off unless set
    decode_threads: int = 0  # concurrent image decodes; 0 = one per core
    # one image's decode + tokenize must finish within this, or the row gets 422 image_too_complex.
    # Pillow cannot be interrupted: the thread runs on (bounded by the pixel and JPEG-scan limits),
    # and while decode_threads such overruns are still running, new rows get 503 at once
    decode_timeout_s: float = 5.0
    # request bodies being received at once, summed over a worker's connections; past it, new
    # bodies get 503 + Retry-After (declared lengths are reserved up front, chunked ones as they arrive)
    max_inflight_body_bytes: int = 256 * 1024 * 1024
    # JPEGs up to this size are decoded on the event loop, skipping the thread hand-off (about
    # 0.1 ms of the GIL per request; +4 % requests/s at concurrency 32 on 2 cores) at the price of
    # blocking the loop for the decode: about 1 ms for a 640x480 photo; pixels per byte peak for
    # flat images, and a flat 3000x3000 JPEG at quality 1 (138 kB, just over) took 3.4 ms. -1 = auto: 128 KiB when a
    # worker has at most one core (its decode threads could not run in parallel anyway), else 0
    inline_decode_bytes: int = -1
