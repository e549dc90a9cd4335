"""Retrieval collections: a small store interface and its two backends.

`EmbeddedStore` (FAISS + SQLite under a data dir) is the default for a single instance;
`PgVectorStore` (PostgreSQL + pgvector, by DSN) lets every replica share the same collections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .collection_store import (
    BackendUnavailableError,
    CollectionExistsError,
    CollectionInfo,
    CollectionNotFoundError,
    CollectionStore,
    ImageStorageFullError,
    IndexParams,
    IndexStoreError,
    InvalidInputError,
    ItemNotFoundError,
    ModelBinding,
    ModelMismatchError,
    SearchHit,
    Source,
    StoredItem,
)
from .jobs import JobStore

BackendName = Literal["embedded", "pgvector"]

__all__ = [
    "BackendName",
    "BackendUnavailableError",
    "CollectionExistsError",
    "CollectionInfo",
    "CollectionNotFoundError",
    "CollectionStore",
    "ImageStorageFullError",
    "IndexParams",
    "IndexStoreError",
    "InvalidInputError",
    "ItemNotFoundError",
    "JobStore",
    "ModelBinding",
    "ModelMismatchError",
    "SearchHit",
    "Source",
    "StoredItem",
    "open_store",
]


def open_store(
    backend: BackendName,
    *,
    data_dir: Path | str | None = None,
    dsn: str | None = None,
    max_image_bytes: int | None = None,
) -> JobStore:
    """The configured backend; imports only what that backend needs. `max_image_bytes`: inline images'
    bytes kept per collection (None: no limit)."""
    if backend == "embedded":
        if data_dir is None:
            raise BackendUnavailableError("the embedded collections backend needs a data dir")
        from .embedded import EmbeddedStore

        return EmbeddedStore(Path(data_dir) / "collections", max_image_bytes=max_image_bytes)
    if backend == "pgvector":
        if not dsn:
            raise BackendUnavailableError(
                "the pgvector collections backend needs a PostgreSQL DSN (postgres_dsn)"
            )
        from .pgvector import PgVectorStore

        return PgVectorStore(dsn, max_image_bytes=max_image_bytes)
    raise BackendUnavailableError(f"unknown collections backend {backend!r}: use 'embedded' or 'pgvector'")
