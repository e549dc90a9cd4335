"""Service settings: pydantic-settings, every option also an environment variable `CLIPSERVE_<NAME>`.

List options accept JSON (`'["a","b"]'`) or a comma-separated string (`a,b`) in the environment.
Fields used by the retrieval routers: `data_dir`, `collections_backend`, `postgres_dsn`, `max_top_k`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Provider = Literal["cpu", "cuda", "tensorrt"]
StrList = Annotated[list[str], NoDecode]


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _split_list(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPSERVE_", extra="forbid", validate_default=True)

    # Models
    models_dir: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")
    models: StrList = Field(
        default_factory=list,
        description="models to serve, as name (latest version, hot-reloaded) or name@version (pinned); "
        "empty: every model in the repository",
    )
    default_model: str | None = Field(None, description="model used when a request names none")
    precision: Literal["fp32", "fp16", "int8"] = Field("fp32", description="bundle variant to serve")
    engine: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="tensorrt serves the bundle's .plan engines (GPU only)"
    )
    providers: Annotated[list[Provider], NoDecode] = Field(
        default_factory=lambda: ["cpu"], description="execution providers, in order of preference"
    )
    engine_cache_dir: Path | None = Field(
        None,
        description="where ONNX Runtime's TensorRT provider keeps the engines it builds, per bundle, GPU model "
        "and TensorRT version, so a restart does not build them again; empty: <data_dir>/engine-cache",
    )
    intra_op_threads: int = Field(
        default_factory=_cores, ge=1, description="ONNX Runtime threads per session"
    )
    preprocess_workers: int = Field(default_factory=_cores, ge=1, description="threads decoding images")
    jpeg_draft_margin: float = Field(
        2.0,
        ge=0,
        description="JPEGs decode at a reduced scale while still this many times the resize target; "
        "1 is fastest, 0 turns it off",
    )
    warmup: bool = True
    reload_poll_s: float = Field(
        30.0, ge=0, description="seconds between repository polls; 0 turns polling off"
    )
    retire_grace_s: float = Field(
        5.0, ge=0, description="how long a replaced model version keeps serving requests that already hold it"
    )

    # Batching
    max_batch_size_image: int = Field(8, ge=1)
    max_batch_size_text: int = Field(64, ge=1)
    max_wait_ms: float = Field(4.0, ge=0)
    max_queue: int = Field(512, ge=1, description="items waiting per model and tower before 429")
    request_timeout_s: float = Field(30.0, gt=0)
    labelset_chunk_texts: int = Field(
        256, ge=1, description="texts per encoder call when building label sets"
    )

    # Cache
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    cache_lru_size: int = Field(50_000, ge=0, description="entries in the in-process cache")
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=0, description="TTL of cached text vectors; 0 keeps them")
    redis_retry_s: float = Field(5.0, ge=0, description="wait before trying Redis again after a failure")

    # Security and limits
    api_keys: StrList = Field(default_factory=list, description="Bearer keys; empty turns auth off")
    admin_key: str | None = None
    cors_origins: StrList = Field(default_factory=list)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(64, ge=1)
    max_texts_per_request: int = Field(512, ge=1)
    max_labels_per_request: int = Field(2000, ge=1)
    max_labelset_labels: int = Field(20_000, ge=1)
    max_templates: int = Field(100, ge=1)
    max_text_chars: int = Field(2000, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_top_k: int = Field(1000, ge=1)

    # Image URLs
    url_fetch_enabled: bool = False
    url_allowed_hosts: StrList = Field(default_factory=list, description="hosts allowed; '*' allows any")
    url_allow_private: bool = False
    url_connect_timeout_s: float = Field(3.0, gt=0)
    url_read_timeout_s: float = Field(10.0, gt=0)
    url_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    url_max_redirects: int = Field(3, ge=0)

    # Retrieval
    data_dir: Path = Path("data")
    collections_backend: Literal["embedded", "pgvector"] = "embedded"
    postgres_dsn: str | None = None

    # Logs
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("models", "providers", "api_keys", "cors_origins", "url_allowed_hosts", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)
