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
    intra_op_threads: int = 0  # onnxruntime threads per inference; 0 = one per core
    max_upload_bytes: int = 10 * 1024 * 1024  # one image file; the request body may add 64 KiB of form overhead
    max_image_pixels: int = 40_000_000  # width x height from the header, checked before decoding
    max_description_chars: int = 2000
    max_batch_items: int = 64  # items per POST /classify/batch
    max_batch_body_bytes: int = 32 * 1024 * 1024  # whole JSON body of /classify/batch
    max_batch_size: int = 32  # rows per onnxruntime call (dynamic batching); larger batches are split
    max_batch_delay_ms: float = 2.0  # how long the first row of a batch waits for company
    max_queue: int = 256  # rows waiting for inference; beyond it requests get 503 + Retry-After
    request_timeout_ms: float = 10_000  # a row that waited longer in the queue gets 504
    api_key: SecretStr | None = None  # when set, required on all routes but /healthz, /readyz, /metrics
    cors_origins: list[str] = Field(default_factory=list)  # CORS is off unless origins are listed
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    decode_threads: int = 0  # concurrent image decodes; 0 = one per core
