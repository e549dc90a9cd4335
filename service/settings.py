"""Service settings, the options of `clip-serve`: each field `name` is the flag `--name` and the
environment variable `CLIPSERVE_NAME` (see clipserve/contract/cli_settings.py).

List options accept JSON (`'["a","b"]'`) or a comma-separated string (`a,b`).
Fields used by the retrieval routers: `data_dir`, `collections_backend`, `postgres_dsn`, `max_top_k`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from clipserve.contract.cli_settings import CliSettings, CommaList, usable_cores

Provider = Literal["cpu", "cuda", "tensorrt"]
# Pillow's names of the formats decoded by default: what cameras, phones and the web send (JPEG takes
# the multi-picture JPEGs of many phones too, which Pillow calls MPO)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class Settings(CliSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPSERVE_")

    # Server
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 for every interface")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    workers: int = Field(
        0,
        ge=0,
        description="server processes sharing the port, each with its own sessions and batchers, and "
        "cores/workers threads each; 0: automatic (one per core for models up to 64 MB of graphs with "
        "the pgvector backend, else 1); above 1 needs --collections-backend pgvector",
    )

    # Models
    models_dir: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")
    models: CommaList[str] = Field(
        default_factory=list,
        description="models to serve, as name (latest version, hot-reloaded) or name@version (pinned); "
        "empty: every model in the repository",
    )
    default_model: str | None = Field(None, description="model used when a request names none")
    precision: Literal["fp32", "fp16", "int8"] = Field("fp32", description="bundle variant to serve")
    engine: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="tensorrt serves the bundle's .plan engines (GPU only)"
    )
    providers: CommaList[Provider] = Field(
        default_factory=lambda: ["cpu"], description="execution providers, in order of preference"
    )
    engine_cache_dir: Path | None = Field(
        None,
        description="where ONNX Runtime's TensorRT provider keeps the engines it builds, per bundle, GPU model "
        "and TensorRT version, so a restart does not build them again; empty: <data_dir>/engine-cache",
    )
    intra_op_threads: int = Field(
        default_factory=usable_cores,
        ge=1,
        description="ONNX Runtime threads per session; default: the cores of the CPU affinity, or fewer "
        "under a cgroup CPU quota (a container's --cpus, a Kubernetes CPU limit)",
    )
    cpu_arena: bool = Field(
        False,
        description="ONNX Runtime's CPU memory arena: keeps the memory of the largest batch seen (ViT-B-32: "
        "3-12% faster, ~170 MB more resident); off frees each run's activations",
    )
    preprocess_workers: int = Field(
        default_factory=usable_cores,
        ge=1,
        description="threads decoding images; default as --intra-op-threads",
    )
    jpeg_draft_margin: float = Field(
        2.0,
        ge=0,
        description="JPEGs decode at a reduced scale while still this many times the resize target; "
        "1 is fastest, 0 turns it off",
    )
    warmup: bool = Field(True, description="run each tower once at load, before the model is ready")
    reload_poll_s: float = Field(
        30.0, ge=0, description="seconds between repository polls; 0 turns polling off"
    )
    retire_grace_s: float = Field(
        5.0, ge=0, description="how long a replaced model version keeps serving requests that already hold it"
    )

    # Batching
    max_batch_size_image: int = Field(8, ge=1, description="images per image-tower call")
    max_batch_size_text: int = Field(64, ge=1, description="texts per text-tower call")
    max_wait_ms: float = Field(4.0, ge=0, description="how long a batch waits to fill up")
    max_queue: int = Field(512, ge=1, description="items waiting per model and tower before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="a request still waiting after this gets 503")
    labelset_chunk_texts: int = Field(
        64,
        ge=1,
        description="texts per encoder call when building label sets; a run's activations grow with it "
        "(ViT-B-32: 256 texts of 16 tokens take 260 MB more at their peak than 64, and no less time)",
    )
    labelset_lease_s: float = Field(
        30.0,
        gt=0,
        description="a background label-set build whose owner sent no heartbeat for this long is taken "
        "over by another replica",
    )
    labelset_builds: int = Field(
        2,
        ge=1,
        description="background label-set builds running at once in one replica; the others queue, and "
        "their status says their place",
    )
    labelset_build_timeout_s: float = Field(
        3 * 3600.0,
        gt=0,
        description="a label-set build still running after this many seconds is stopped and the set's "
        "status says failed, and why (PUT the set again to retry)",
    )

    # Cache
    redis_url: str | None = Field(
        "redis://127.0.0.1:6379/0", description="Redis for the shared cache; 'none' or empty: in-process only"
    )
    cache_lru_size: int = Field(50_000, ge=0, description="entries in the in-process cache")
    cache_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="TTL in Redis of text vectors and class matrices (a class matrix's is renewed while it "
        "is used); 0 keeps them",
    )
    cache_matrix_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="bytes of class matrices kept in process, all models together; the least recently used "
        "go first (a matrix larger than this is kept alone)",
    )
    redis_retry_s: float = Field(5.0, ge=0, description="wait before trying Redis again after a failure")
    text_cache: Literal["auto", "shared", "local"] = Field(
        "auto",
        description="where text vectors are cached: shared (Redis, for every replica; the in-process cache "
        "while Redis is down), local (the in-process cache only); auto: shared when the model's text tower "
        "takes at least ten times as long as a Redis look-up (both measured at start), else local",
    )

    # Security and limits (docs/security.md)
    api_keys: CommaList[str] = Field(
        default_factory=list,
        description="Bearer keys with the read and write scopes; auth is off while no key has read or "
        "write (here or in --api-keys-file)",
    )
    admin_key: str | None = Field(
        None, description="Bearer key with the admin scope only (/v1/admin/*); no admin key: admin routes off"
    )
    api_keys_file: Path | None = Field(
        None,
        description="file of Bearer keys, one a line: '<key> <scope>[,<scope>...]' with the scopes read, "
        "write, admin, metrics; '#' starts a comment; re-read within a second of a change",
    )
    metrics_open: bool = Field(
        False,
        description="serve /metrics without a key while auth is on (for a Prometheus scraping over a "
        "private network); off: /metrics needs a key with the metrics scope",
    )
    allowed_hosts: CommaList[str] = Field(
        default_factory=list,
        description="host names the service answers to (the Host header, any port): names, "
        "'*.example.com', or '*' for any; empty: localhost, 127.0.0.1 and [::1] when --host is a "
        "loopback address, any host otherwise",
    )
    cors_origins: CommaList[str] = Field(
        default_factory=list,
        description="origins whose pages may call the service from a browser (CORS); empty: none, "
        "only the service's own pages",
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest request body")
    max_images_per_request: int = Field(64, ge=1, description="images in one request")
    max_texts_per_request: int = Field(512, ge=1, description="texts in one request")
    max_labels_per_request: int = Field(2000, ge=1, description="labels in one classify request")
    max_labelset_labels: int = Field(20_000, ge=1, description="labels in one label set")
    max_templates: int = Field(100, ge=1, description="prompt templates per request or label set")
    max_template_chars: int = Field(1000, ge=2, description="characters in one prompt template")
    max_template_slots: int = Field(4, ge=1, description="'{}' (where the label goes) in one prompt template")
    max_prompts_per_request: int = Field(
        10_000,
        ge=1,
        description="prompts (labels x templates) of one classify request with its own labels; larger "
        "vocabularies belong in a stored label set, which builds in the background",
    )
    max_labelset_prompts: int = Field(
        1_000_000, ge=1, description="prompts (labels x templates) of one label set"
    )
    max_text_chars: int = Field(2000, ge=1, description="characters in one text")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="pixels in one image (read from its header, before decoding)"
    )
    max_request_pixels: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="pixels of all the images of one request together (read from their headers, before "
        "decoding)",
    )
    image_formats: CommaList[str] = Field(
        default_factory=lambda: list(IMAGE_FORMATS),
        description="image formats decoded, by Pillow's names; any other is refused before decoding",
    )
    max_top_k: int = Field(1000, ge=1, description="largest top_k a request may ask for")
    max_metadata_bytes: int = Field(
        16 * 1024, ge=64, description="bytes of one collection item's metadata, as compact JSON"
    )

    # Image URLs
    url_fetch_enabled: bool = Field(False, description="accept image URLs and fetch them")
    url_allowed_hosts: CommaList[str] = Field(
        default_factory=list, description="hosts allowed; '*' allows any"
    )
    url_allow_private: bool = Field(False, description="allow URLs resolving to private addresses")
    url_connect_timeout_s: float = Field(3.0, gt=0, description="connect timeout of an image fetch")
    url_read_timeout_s: float = Field(10.0, gt=0, description="read timeout of an image fetch")
    url_fetch_timeout_s: float = Field(
        20.0, gt=0, description="total time one image fetch may take, redirects included"
    )
    url_fetch_connections: int = Field(
        8,
        ge=1,
        description="connections the image fetches of one request use at once (each request has its own, "
        "so slow URLs hold up only the request that sent them)",
    )
    url_max_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest fetched image")
    url_max_redirects: int = Field(3, ge=0, description="redirects followed per fetch")

    # Retrieval
    data_dir: Path = Field(Path("data"), description="where the embedded backend keeps collections")
    collections_backend: Literal["embedded", "pgvector"] = Field(
        "embedded", description="embedded: SQLite + FAISS in one process; pgvector: shared by replicas"
    )
    postgres_dsn: str | None = Field(None, description="PostgreSQL of the pgvector backend")
    max_collection_image_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="bytes of inline images one collection keeps as its items' sources (by sha256, each "
        "once), so they can be re-embedded; an upsert that would pass it answers 413",
    )

    # Re-embed jobs (a collection moving to a newer model version, in the background)
    reembed_threads: int = Field(
        1,
        ge=1,
        description="ONNX Runtime threads of a re-embed job's own sessions; the job decodes, preprocesses and "
        "infers on one thread of its own, so it takes about this many cores beside the online requests",
    )
    reembed_rate: float = Field(
        0.0, ge=0, description="most items a re-embed job embeds per second on this replica; 0: no limit"
    )
    reembed_chunk: int = Field(
        256,
        ge=1,
        le=4096,
        description="items a re-embed job embeds and commits at a time, with its progress: a replica killed "
        "mid-job loses at most one chunk",
    )
    reembed_concurrency: int = Field(1, ge=0, description="re-embed jobs one replica runs at once; 0: none")
    reembed_lease_s: float = Field(
        30.0,
        gt=0,
        description="a re-embed job whose replica sent no heartbeat for this long is taken over by another",
    )
    reembed_grace_s: float = Field(
        3600.0,
        ge=0,
        description="how long a collection keeps its previous space after a re-embed switched it, still "
        "written by every write, so that POST /v1/collections/{name}/rollback goes back",
    )
    reembed_poll_s: float = Field(
        5.0,
        gt=0,
        description="how often a replica looks for re-embed jobs to run, collections to move to a new model "
        "version (their policy permitting) and model versions to load or unload for them",
    )

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="least severe log level written"
    )
    log_format: Literal["json", "text"] | None = Field(
        None,
        description="json: one JSON object a line (for log collectors); text: one readable line each; "
        "none: text on a terminal, json otherwise",
    )

    def resolved_log_format(self, on_terminal: bool) -> Literal["json", "text"]:
        """The log format to use: --log-format, else by where logs go."""
        if self.log_format is not None:
            return self.log_format
        return "text" if on_terminal else "json"

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "/" in entry or "@" in entry or not entry.strip():
                raise ValueError(
                    f"{entry!r} is not a host name: give names as the Host header has them "
                    "(api.example.com, *.example.com, [::1]) or '*', without a scheme or path"
                )
        return value

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        names = [name.strip().upper() for name in value]
        unknown = [name for name in names if name not in Image.OPEN]
        if unknown or not names:
            raise ValueError(
                f"unknown image format {', '.join(unknown) or '(none given)'}; this Pillow decodes "
                f"{', '.join(sorted(Image.OPEN))}"
            )
        return names

    @model_validator(mode="after")
    def _one_image_fits_a_request(self) -> Settings:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) is below max_image_pixels "
                f"({self.max_image_pixels}): raise it, or lower max_image_pixels"
            )
        return self

    @field_validator("redis_url", mode="before")
    @classmethod
    def _no_redis(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        return value


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether an address to listen on (`--host`) is a loopback one."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """`Host` header value -> (lower-case name without a trailing dot, port or None); IPv6 in brackets."""
    text = value.strip().lower()
    if text.startswith("["):
        name, _, rest = text.partition("]")
        name += "]"
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") > 1:  # a bare IPv6 address
        name, port = f"[{text}]", ""
    else:
        name, _, port = text.partition(":")
    port_number = int(port) if port.isdigit() and len(port) <= 5 else None
    return name.rstrip("."), port_number


def resolved_allowed_hosts(allowed_hosts: Sequence[str], listen_host: str) -> tuple[str, ...]:
    """The setting as given, or by default the loopback names on a loopback address and any host
    ('*') on any other (0.0.0.0 in a container, behind a proxy or an orchestrator)."""
    if allowed_hosts:
        return tuple(split_host(entry)[0] if entry.strip() != "*" else "*" for entry in allowed_hosts)
    return LOOPBACK_NAMES if is_loopback(listen_host) else ("*",)
