"""The options of `clip-index`: each field `name` is the flag `--name` and the environment variable
`CLIP_INDEX_NAME` (see clipserve/contract/cli_settings.py). The source may also come first, bare:
`clip-index DIR --model NAME ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from clipserve.contract.cli_settings import CliSettings, CommaList, usable_cores
from clipserve.index.sources import SourceKind

Provider = Literal["cpu", "cuda", "tensorrt"]


def default_state_dir() -> Path:
    return Path("~/.cache/clip-index").expanduser()


class IndexSettings(CliSettings):
    model_config = SettingsConfigDict(env_prefix="CLIP_INDEX_")

    # What to index
    source: str = Field(
        description="a folder of images (with NAME.txt captions), a file list, a CSV or parquet table "
        "(columns path|url, text, id, metadata), or webdataset .tar shards; may come first, without the flag"
    )
    source_kind: SourceKind = Field("auto", description="how to read the source; auto: by its name")
    model: str = Field(description="model to embed with: name (latest version) or name@version")
    models_dir: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")

    # Where the vectors go (one or more)
    collection: str | None = Field(
        None, description="collection to fill (with --server or --postgres-dsn); created when missing"
    )
    server: str | None = Field(None, description="a running clip-serve to write the collection through")
    api_key: str | None = Field(None, description="Bearer key of --server, when it has keys")
    postgres_dsn: str | None = Field(
        None, description="PostgreSQL of the pgvector backend, written directly (every replica serves it)"
    )
    output: Path | None = Field(
        None,
        description="folder for files in clip-retrieval's layout: img_emb/img_emb_N.npy, "
        "text_emb/text_emb_N.npy, metadata/metadata_N.parquet (autofaiss reads them as they are)",
    )
    index_kind: Literal["flat", "hnsw", "ivf"] = Field(
        "flat", description="index of a collection created here: flat (exact), hnsw or ivf (approximate)"
    )
    keep_image_bytes: bool = Field(
        True,
        description="a collection keeps each local image's bytes as its source, so the service can "
        "re-embed it with another model (URLs are kept as URLs)",
    )
    max_collection_image_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="with --postgres-dsn: bytes of images one collection keeps (the service's limit of "
        "the same name applies through --server)",
    )

    # The job
    shard_size: int = Field(
        256, ge=1, description="items per shard: the unit that is recorded as done, and redone after a crash"
    )
    batch_size: int = Field(32, ge=1, description="images or texts per inference call")
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="with --server: where the finished shards of each job are recorded "
        "(with --postgres-dsn they are in the database, with --output beside the files)",
    )
    errors_file: Path | None = Field(
        None,
        description="JSON lines, one per item that could not be indexed, with its reason; "
        "none: errors.jsonl in --output, else clip-index-errors.jsonl here",
    )
    server_batch: int = Field(
        64, ge=1, description="items per write request to --server (at most its max_images_per_request)"
    )

    # Ray
    ray_address: str | None = Field(
        None,
        description="a Ray cluster to join, as its head's host:port (the GCS port of `ray start --head`); "
        "none: a local one",
    )
    num_cpus: int = Field(
        default_factory=usable_cores, ge=1, description="CPUs of the local Ray started without --ray-address"
    )
    object_store_mb: int = Field(
        2048, ge=64, description="object store of the local Ray (decoded images travel through it)"
    )
    actors: int | None = Field(
        None,
        ge=1,
        description="inference actors, each loading the model once; none: one per GPU on GPU clusters, "
        "else the cluster's CPUs divided by --threads-per-actor",
    )
    threads_per_actor: int = Field(
        default_factory=usable_cores, ge=1, description="ONNX Runtime threads of each inference actor"
    )
    actor_cpus: float | None = Field(
        None,
        gt=0,
        description="Ray CPUs each actor reserves; none: half its threads (at least 0.5), leaving room "
        "for the decode tasks beside it, which a small model needs more than its own threads",
    )
    decode_cpus: float = Field(0.25, gt=0, description="Ray CPUs each decode task reserves")
    gpu: Literal["auto", "on", "off"] = Field(
        "auto",
        description="GPU actors (num_gpus=1, CUDA, the bundle's fp16 graphs): auto when the cluster has "
        "GPUs and the bundle an fp16 variant",
    )

    # Inference, as the service does it
    precision: Literal["fp32", "fp16", "int8"] = Field("fp32", description="bundle variant on CPU actors")
    providers: CommaList[Provider] = Field(
        default_factory=lambda: ["cpu"], description="execution providers of CPU actors"
    )
    max_image_pixels: int = Field(50_000_000, ge=1, description="pixels in one decoded image")
    max_file_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="largest image file or fetched image read"
    )
    max_text_chars: int = Field(2000, ge=1, description="characters in one text")
    jpeg_draft_margin: float = Field(2.0, ge=0, description="JPEG draft decoding margin, as in clip-serve")

    # Image URLs, with the service's rules
    url_allowed_hosts: CommaList[str] = Field(
        default_factory=lambda: ["*"], description="hosts image URLs may name; '*' allows any"
    )
    url_allow_private: bool = Field(
        False, description="allow URLs resolving to private or loopback addresses"
    )
    url_connect_timeout_s: float = Field(3.0, gt=0, description="connect timeout of an image fetch")
    url_read_timeout_s: float = Field(10.0, gt=0, description="read timeout of an image fetch")
    url_max_redirects: int = Field(3, ge=0, description="redirects followed per fetch")

    # Output
    progress: Literal["auto", "bar", "log", "off"] = Field(
        "auto", description="a bar (auto: on a terminal), or a line every --log-every-s (auto: otherwise)"
    )
    log_every_s: float = Field(10.0, gt=0, description="seconds between progress lines in a log")

    @model_validator(mode="after")
    def _one_target_at_least(self) -> IndexSettings:
        if self.collection and not (self.server or self.postgres_dsn):
            raise ValueError("--collection needs --server URL or --postgres-dsn DSN to say where it lives")
        if self.server is None and self.postgres_dsn is None and self.output is None:
            raise ValueError(
                "say where the vectors go: --collection NAME with --server URL or --postgres-dsn DSN, "
                "or --output DIR"
            )
        if (self.server or self.postgres_dsn) and not self.collection:
            raise ValueError("--server and --postgres-dsn fill a collection: add --collection NAME")
        return self

    def service_settings(self) -> dict[str, object]:
        """The values the service's own code (preprocessing, URL fetching, runtimes) takes from here."""
        return {
            "max_image_pixels": self.max_image_pixels,
            "max_text_chars": self.max_text_chars,
            "jpeg_draft_margin": self.jpeg_draft_margin,
            "precision": self.precision,
            "providers": list(self.providers),
            "url_fetch_enabled": True,
            "url_allowed_hosts": list(self.url_allowed_hosts),
            "url_allow_private": self.url_allow_private,
            "url_connect_timeout_s": self.url_connect_timeout_s,
            "url_read_timeout_s": self.url_read_timeout_s,
            "url_max_bytes": self.max_file_bytes,
            "url_max_redirects": self.url_max_redirects,
            "warmup": False,
        }
