"""Service settings, read from ``CLASSIFIER_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGED_DEFAULT = Path(__file__).resolve().parent.parent / "exported_models" / "default"


def default_model_dir() -> Path:
    # next to the package in a checkout or the container; else relative to the working dir
    return _PACKAGED_DEFAULT if _PACKAGED_DEFAULT.is_dir() else Path("exported_models/default")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLASSIFIER_", protected_namespaces=(), extra="ignore")

    model_dir: Path = Field(default_factory=default_model_dir, description=(
        "exported artifact folder, served alone (a repository of one); ignored when model_repository is set"))
    model_repository: Path | None = Field(default=None, description=(
        "a model repository: DIR/NAME/VERSION/ holds an artifact, DIR/NAME/model.json (optional) picks the versions "
        "served and the default one (docs/operations.md)"))
    default_model: str | None = Field(default=None, description=(
        "the model that answers /classify, /classify/batch and gRPC calls that name none; default: the first name "
        "in alphabetical order"))
    poll_repository_s: float = Field(default=0.0, ge=0.0, description=(
        "scan the repository this often (seconds): a new version folder is loaded and takes over once ready, a "
        "removed one is unloaded; 0 = only at start and through the repository API"))
    max_loaded_models: int = Field(default=8, ge=1, description=(
        "model versions loaded at once in a worker; a load past it fails with 422 model_load_failed (a version "
        "replacing another counts once)"))
    provider: Literal["auto", "cuda", "tensorrt", "cpu", "openvino"] = Field(default="auto", description=(
        "auto: CUDA if really usable, else CPU (onnxruntime). openvino: OpenVINO on the CPU (pip install "
        "-e '.[openvino]'), used only if its answers match onnxruntime's on a check at load"))
    device_id: int = Field(default=0, description='GPU ordinal for cuda/tensorrt')
    workers: int = Field(default=0, ge=0, description='server processes (python -m service); 0 = one per core')
    topology: Literal["auto", "workers", "owner"] = Field(default="auto", description=(
        'workers: each worker process owns a model session and batches its own rows (the default on CPU: measured '
        'faster on small machines, docs/performance.md). owner: the workers decode and send rows over shared memory to '
        'one process that owns the session and batches across all of them (one CUDA context, large batches). auto: '
        'owner when a GPU is in use, else workers'))
    owner_max_batch: int = Field(default=128, description='rows per onnxruntime call in the owner (merged from all workers)')
    owner_threads: int = Field(default=0, ge=0, description='onnxruntime threads of the owner; 0 = one per core')
    intra_op_threads: int = Field(default=0, ge=0, description='onnxruntime threads per inference; 0 = cores / workers')
    ort_spinning: bool = Field(default=False, description="let onnxruntime's idle workers spin (lower latency, steals CPU from decoding)")
    lone_threads: int = Field(default=0, ge=0, description=(
        'onnxruntime threads for a lone request: one row, with nothing else in its worker and no other worker busy, '
        'run on the event loop (several workers of python -m service, a model under 20 ms at one row). Above intra_op_threads, '
        'each worker (onnxruntime on the CPU) holds a second session of each loaded model version with this many '
        "threads, spinning only during its call: the model's memory twice. 0 = auto: the machine's cores, at most 4; a"
        " value not above intra_op_threads: no second session, lone requests on the worker's own threads. Measured: "
        'docs/performance.md'))
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, description='one image file; the request body may add 64 KiB of form overhead')
    max_image_pixels: int = Field(default=40_000_000, description='width x height from the header, checked before decoding')
    max_description_chars: int = Field(default=2000, description=(
        'characters of one description (caption); longer ones get 422 description_too_long'))
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        'below this calibrated confidence an answer abstains ("label": null, "abstained": true); 0 = never. Each '
        'request may set its own (?min_confidence= on /classify and /classify/batch, a V2 parameter)'))
    ood_abstain: bool = Field(default=True, description=(
        "abstain when the artifact's out-of-distribution score says the input is unlike the training data (a photo "
        'shown to a model of drawings), whatever the confidence'))
    max_batch_items: int = Field(default=64, description='items per POST /classify/batch')
    max_batch_body_bytes: int = Field(default=32 * 1024 * 1024, description='whole JSON body of /classify/batch')
    max_batch_size: int = Field(default=32, description='rows per onnxruntime call (dynamic batching); larger batches are split')
    max_batch_delay_ms: float = Field(default=0.0, description=(
        '0 = greedy: a batch starts as soon as the engine is free and takes whatever queued meanwhile; under load '
        'batches fill by themselves, and a lone request never waits (benchmarks/bench.py)'))
    max_queue: int = Field(default=256, description='rows waiting for inference; beyond it requests get 503 + Retry-After')
    request_timeout_ms: float = Field(default=10_000, description='a row that waited longer in the queue gets 504')
    grpc_port: int = Field(default=0, ge=0, le=65535, description=(
        'the Open Inference Protocol over gRPC on this port too (every worker listens on it); 0 = off'))
    grpc_host: str | None = Field(default=None, description=(
        "the gRPC listener's address; default: the service's own (--host; 127.0.0.1 for an app run any other way)"))
    grpc_max_concurrent_calls: int = Field(default=64, ge=1, description=(
        "gRPC calls a worker handles at once; more are refused RESOURCE_EXHAUSTED. A gRPC message may be at most "
        "max_inflight_body_bytes / this (4 MiB with the defaults) and at most what a request of rows can need, so the "
        "messages a worker holds never pass max_inflight_body_bytes (grpcio reads a message whole before a handler "
        "runs): fewer calls allow larger messages"))
    max_header_bytes: int = Field(default=32 * 1024, description='request line + headers; longer heads get 431 and the connection closes')
    header_timeout_s: float = Field(default=10.0, description='a request head must arrive within this of its first byte (408, closed)')
    max_connections: int = Field(default=1024, ge=1, description=(
        'open connections per worker process; past it a new connection gets 503 and is closed at once'))
    body_timeout_s: float = Field(default=20.0, description='the whole request body must arrive within this (slow senders get 408)')
    drain_delay_s: float = Field(default=2.0, description='after SIGTERM: /readyz answers 503 and requests are still served this long')
    shutdown_grace_s: float = Field(default=30.0, description='after SIGTERM: in-flight requests finish within this, then exit 0')
    api_key: SecretStr | None = Field(default=None, description='when set, required on all routes but /healthz, /readyz, /metrics')
    cors_origins: list[str] = Field(default_factory=list, description='CORS is off unless origins are listed')
    metrics_max_age_s: float = Field(default=1.0, ge=0.0, description=(
        '/metrics is rendered at most this often (scrapes in between get the same text): its cost, reading every '
        "worker's metric files, is bounded however often it is asked; 0 = every scrape"))
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(default="info", description="the service's log level")
    log_format: Literal["json", "text"] = Field(default="json", description='json: one object per line, for log pipelines')
    otel_exporter: Literal["otlp", "console"] | None = Field(default=None, description='OpenTelemetry tracing; off unless set')
    decode_threads: int = Field(default=0, ge=0, description='concurrent image decodes; 0 = one per core')
    decode_timeout_s: float = Field(default=5.0, description=(
        "one image's decode + tokenize must finish within this, or the row gets 422 image_too_complex. Pillow cannot be"
        ' interrupted: the thread runs on (bounded by the pixel and JPEG-scan limits), and while decode_threads such '
        'overruns are still running, new rows get 503 at once'))
    max_inflight_body_bytes: int = Field(default=256 * 1024 * 1024, description=(
        "request bodies being received at once, summed over a worker's connections; past it, new bodies get 503 + "
        'Retry-After (declared lengths are reserved up front, chunked ones as they arrive)'))
    inline_decode_bytes: int = Field(default=-1, description=(
        'JPEGs up to this size are decoded on the event loop, skipping the thread hand-off (about 0.1 ms of the GIL per'
        ' request; +4 % requests/s at concurrency 32 on 2 cores) at the price of blocking the loop for the decode: '
        'about 1 ms for a 640x480 photo; pixels per byte peak for flat images, and a flat 3000x3000 JPEG at quality 1 '
        '(138 kB, just over) took 3.4 ms. -1 = auto: 128 KiB when a worker has at most one core (its decode threads '
        'could not run in parallel anyway), else 0'))

    _resolved: bool = PrivateAttr(default=False)

    @property
    def is_resolved(self) -> bool:
        return self._resolved

    def resolved(self, processes: int | None = None) -> Settings:
        """Every "0 = automatic" value worked out for this machine: done once, at start-up, and passed on.

        ``processes``: how many serving processes share the machine (``python -m service``: the
        workers; an app built in one process, such as a test client: 1). Nothing else in the service
        counts cores: a worker reads what was resolved here. By default one worker per core with one
        onnxruntime thread each: the request path (HTTP parsing, decoding) is Python and bound to one
        core per process, so more processes beat more onnxruntime threads, on a GPU machine too
        (benchmarks/bench.py at concurrency 32-64, 2 CPU cores: 694 -> 756-969 requests/s; an H200
        host with 16 cores on CUDA: 1 worker 460, 4 workers 577, 16 workers 1,263 requests/s). Each
        GPU worker holds its own CUDA context (device memory); CLASSIFIER_WORKERS caps them.
        """
        if self._resolved:
            return self
        cores = os.cpu_count() or 1
        workers = self.workers or (processes or cores)
        update = {
            "workers": workers,
            "intra_op_threads": self.intra_op_threads or max(1, cores // workers),
            # at most 4: measured on 2 cores only; past a few threads a small graph's row gains little
            "lone_threads": self.lone_threads or min(cores, 4),
            "decode_threads": self.decode_threads or cores,
            "owner_threads": self.owner_threads or cores,
            # see inline_decode_bytes: 128 KiB when a worker has at most one core, else 0
            "inline_decode_bytes": self.inline_decode_bytes if self.inline_decode_bytes >= 0
            else (128 * 1024 if cores <= workers else 0),
            # absolute from here on: a relative spelling ("--model-repository models") means the folder it
            # named at start, whatever a worker's working directory, and compares equal to itself
            "model_dir": Path(self.model_dir).resolve(),
            "model_repository": Path(self.model_repository).resolve() if self.model_repository is not None else None,
        }
        out = self.model_copy(update=update)
        out._resolved = True
        return out
